"""The benchmark harness: one locked, resumable writer with per-record provenance; the package layout."""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.harness import ResultsFile, mark_file_level

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")


def test_a_record_carries_its_own_provenance(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "x.json")
    with results.record({"scheme": "rd", "seed": 0}) as record:
        record["image_auroc"] = 0.9
    run = json.loads((tmp_path / "x.json").read_text())["runs"][0]
    assert run["scheme"] == "rd" and run["image_auroc"] == 0.9
    for name in harness.PROVENANCE_FIELDS:
        assert name in run, name
    assert run["provenance"] == "record"
    assert run["git_commit"] == harness.commit() and run["git_commit"] != ""
    assert run["started_at"].endswith("+00:00") and run["wall_s"] >= 0
    assert {"cpu", "cores", "torch", "torch_threads"} <= set(run["machine"])


def test_the_commit_is_the_one_the_benchmark_started_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import kd_experiments.tracking as tracking

    monkeypatch.setattr(harness, "_PROCESS_COMMIT", None)
    monkeypatch.setattr(tracking, "git_commit", lambda cwd=None, ignore=(): "started-on")
    harness.base_parser("A benchmark.", output="x.json")
    monkeypatch.setattr(tracking, "git_commit", lambda cwd=None, ignore=(): "committed-while-running")
    assert harness.commit() == "started-on"


def test_results_written_beside_a_benchmark_do_not_make_its_commit_dirty(tmp_path: Path) -> None:
    from kd_experiments.tracking import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    clean = git_commit(tmp_path, ignore=("benchmarks/results",))
    assert len(clean) == 40
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"runs": []}\n')  # another benchmark wrote
    assert git_commit(tmp_path / "benchmarks", ignore=("benchmarks/results",)) == clean  # from a subfolder too
    assert git_commit(tmp_path) == clean + "-dirty"
    (tmp_path / "code.py").write_text("x = 2\n")  # the code that runs changed
    assert git_commit(tmp_path, ignore=("benchmarks/results",)) == clean + "-dirty"


def test_a_failed_run_writes_nothing(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "x.json")
    with pytest.raises(RuntimeError), results.record({"seed": 0}) as record:
        record["partial"] = 1
        raise RuntimeError("diverged")
    assert not (tmp_path / "x.json").exists() or not results.reload()["runs"]


def test_has_skips_done_records_by_key_fields(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "x.json", key_fields=("dataset", "seed"))
    results.append({"dataset": "mnist", "seed": 0, "auroc": 0.5})
    assert results.has(dataset="mnist", seed=0, auroc=0.9)  # only the key fields count
    assert not results.has(dataset="mnist", seed=1)
    assert results.append({"dataset": "mnist", "seed": 0, "auroc": 0.7}, skip_if_present=True)
    assert len(results.reload()["runs"]) == 1


def test_update_keeps_a_log_of_what_changed(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "x.json")
    results.append({"scheme": "rd", "aupro": float("nan")})
    run = results.update({"scheme": "rd"}, {"aupro": 0.93})
    assert run["aupro"] == 0.93 and run["updates"][0]["fields"] == ["aupro"]
    with pytest.raises(KeyError, match="no record"):
        results.update({"scheme": "nope"}, {"aupro": 1.0})


def test_old_records_are_marked_file_level_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    old = {"runs": [{"scheme": "rd", "image_auroc": 0.99}], "command": "python old.py", "commit": "abc1234",
           "machine": {"cpu": "x"}}
    path.write_text(json.dumps(old, indent=2))
    ResultsFile(path).append({"scheme": "rd_expert", "image_auroc": 0.98})
    data = json.loads(path.read_text())
    first, second = data["runs"]
    assert first["image_auroc"] == 0.99 and first["provenance"] == "file-level"
    assert first["file_command"] == "python old.py" and first["file_commit"] == "abc1234"
    assert "git_commit" not in first and second["provenance"] == "record"
    assert data["command"] == "python old.py"  # the file-level fields are left as they were
    assert mark_file_level(data) == 0  # idempotent


def _append_many(path: str, worker: int) -> None:
    results = ResultsFile(path)
    for index in range(15):
        results.append({"worker": worker, "index": index})


def test_concurrent_writers_lose_no_record(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, worker)) for worker in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    runs = json.loads(Path(path).read_text())["runs"]
    assert sorted((r["worker"], r["index"]) for r in runs) == [(w, i) for w in range(3) for i in range(15)]


def test_data_root_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KD_DATA_DIR", str(tmp_path))
    assert harness.data_root() == tmp_path
    assert harness.base_parser("Doc.", output="x.json").parse_args([]).data_root == tmp_path
    monkeypatch.delenv("KD_DATA_DIR")
    assert harness.data_root() == ROOT.parent / "shared" / "data"


def test_compose_is_the_packages_kd_train_config(tmp_path: Path) -> None:
    cfg = harness.compose(["experiment=quickstart", "seed=3"], output_dir=tmp_path)
    assert int(cfg.seed) == 3 and "scheme" in cfg and "hydra" not in cfg


@pytest.mark.parametrize("module", MODULES)
def test_every_benchmark_is_a_module_of_the_package(module: str) -> None:
    text = (ROOT / "benchmarks" / f"{module}.py").read_text()
    assert "sys.path.insert" not in text
    assert not re.search(r"\bsessions? \d", text, re.IGNORECASE), "name protocols by their settings"
    importlib.import_module(f"benchmarks.{module}")


def test_a_benchmark_runs_as_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.rd_bottle", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--data-root" in done.stdout and "--only" in done.stdout


def test_the_benchmarks_student_and_teacher_wrappers_live_in_the_scheme() -> None:
    import torch

    from kd_experiments.schemes.score_regression.family import autoencoder_scorer
    from kd_experiments.schemes.score_regression.torch_model import (
        PAPER_STUDENTS,
        ConvAutoencoder,
        PooledScoreRegressor,
        ReconstructionScorer,
        build_student,
        reconstruction_score,
    )

    torch.manual_seed(0)
    teacher = ConvAutoencoder().eval()
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        expected = reconstruction_score(images, teacher(images))
        assert torch.equal(ReconstructionScorer(teacher)(images), expected)
        assert torch.equal(autoencoder_scorer(teacher)(images), expected)
    core = build_student(PAPER_STUDENTS["D"], (3, 32, 32))
    student = PooledScoreRegressor(core, 2, target_mean=1.5, target_std=0.5).eval()
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in core.parameters())
    big = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(student(big), core(torch.nn.functional.avg_pool2d(big, 2)) * 0.5 + 1.5)


def test_a_stopped_budget_study_continues_from_its_checkpoint_into_the_same_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MVTec budget study (hours of CPU per run): a second call after a stop passes the run
    folder's last.ckpt to kd-train and finds the first call's MLflow run by the tag it kept."""
    from types import SimpleNamespace

    import kd_experiments.train
    from benchmarks import mvtec

    monkeypatch.setattr(mvtec, "ROOT", tmp_path)
    composed: list[list[str]] = []
    monkeypatch.setattr(mvtec, "compose", lambda overrides, output_dir: (composed.append(list(overrides)),
                                                                       SimpleNamespace(experiment_name="x"))[1])
    monkeypatch.setattr(kd_experiments.train, "train", lambda cfg: {})
    looked_up: list[str] = []

    class History:
        def get_metric_history(self, run_id: str, name: str) -> list:
            return [SimpleNamespace(step=0, value=0.0 if name == "epoch" else 0.5)]

    monkeypatch.setattr(mvtec, "mlflow_run", lambda tag, experiment: (looked_up.append(tag),
                                                                      (History(), SimpleNamespace(info=SimpleNamespace(run_id="r"))))[1])
    args = argparse.Namespace(image_size=32, data_root=tmp_path, threads=1, trainer="cpu")
    entry = mvtec.Entry("rd", "bottle", 1, 0)

    epochs, resumed = mvtec.study_budget(entry, args)  # a first call: no checkpoint yet
    assert not resumed and not any(o.startswith("ckpt_path=") for o in composed[0])
    assert epochs == {1: {name.replace("/", "_"): 0.5 for name in mvtec.STUDY_METRICS}}
    run_dir = tmp_path / "logs" / "benchmarks" / "mvtec" / "budget-rd-bottle-r1-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"stopped at some epoch")

    _, resumed = mvtec.study_budget(entry, args)  # after a stop: continue, same run
    assert resumed and f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in composed[1]
    assert looked_up[1] == looked_up[0] and f"+tags.benchmark_run={looked_up[0]}" in composed[1]


def test_the_map_budget_rule_and_a_schedule_that_decays_over_the_run() -> None:
    from benchmarks.map_regression import STUDY_EPOCHS, choose_epochs, preferred_setting, setting_spreads

    def study(variant: str | None, top: float = 0.75) -> list[dict]:  # a curve that levels off at epoch 30
        return [{"teacher_scheme": "patchcore", "variant": variant, "epoch": epoch,
                 "val_synthetic_pixel_auroc": min(epoch, 30) / 30 * top, "val_synthetic_image_auroc": min(epoch, 30) / 40}
                for epoch in range(1, STUDY_EPOCHS + 1)]

    assert choose_epochs(study(None), "patchcore") == 30
    assert choose_epochs(study("scheme.feature_weight=1.0"), "patchcore", "scheme.feature_weight=1.0") == 30
    cosine = "scheme.feature_weight=1.0 scheme.lr_schedule=cosine"
    assert choose_epochs(study(cosine), "patchcore", cosine) == STUDY_EPOCHS  # its curve is not a shorter run's
    assert choose_epochs(study(None)[:-1], "patchcore") is None  # the study has not ended
    # rule 5: the setting with the highest validation mean over its last epochs; unfinished studies do not count
    records = study(None) + study("scheme.feature_weight=1.0", top=0.8) + study(cosine, top=0.9)[:-1]
    assert preferred_setting(records, "patchcore") == "scheme.feature_weight=1.0"
    assert preferred_setting(study(None), "patchcore") is None and preferred_setting([], "patchcore") is None
    # beside it, the standard error of each score: zero on a flat tail, the epoch-to-epoch spread otherwise
    assert setting_spreads(records, "patchcore") == {None: 0.0, "scheme.feature_weight=1.0": 0.0}
    noisy = study(None)
    for record, step in zip(noisy[-5:], (0.0, 0.1, 0.0, 0.1, 0.0)):
        record["val_synthetic_image_auroc"] += 2 * step  # per-epoch scores 0, .1, 0, .1, 0 above the tail
    assert setting_spreads(noisy, "patchcore")[None] == pytest.approx(0.0547723 / 5 ** 0.5, rel=1e-4)


def test_a_longer_schedule_is_a_studied_setting_with_its_own_length_and_candidates() -> None:
    """``trainer.max_epochs=N`` in a variant: its study runs N epochs, rule 2 reads its own curve
    (candidates beyond 60 every 20 epochs and N), rule 5 compares the last epochs of each study."""
    from benchmarks.map_regression import (STUDY_EPOCHS, Entry, budget_candidates, choose_epochs, preferred_setting,
                                           student_overrides, study_epochs)

    longer = "trainer.max_epochs=120 scheme.feature_weight=4.0"
    assert study_epochs(None) == STUDY_EPOCHS and study_epochs("scheme.feature_weight=4.0") == STUDY_EPOCHS
    assert study_epochs(longer) == 120
    assert budget_candidates(longer)[-4:] == (60, 80, 100, 120) and budget_candidates(None)[-1] == STUDY_EPOCHS

    def study(variant: str | None, length: int, level: int, top: float) -> list[dict]:  # rises until `level`
        return [{"teacher_scheme": "patchcore", "variant": variant, "epoch": epoch,
                 "val_synthetic_pixel_auroc": min(epoch, level) / level * top, "val_synthetic_image_auroc": top}
                for epoch in range(1, length + 1)]

    records = study(None, STUDY_EPOCHS, 60, 0.7) + study(longer, 120, 100, 0.8)
    assert choose_epochs(records, "patchcore", longer) == 100  # within 0.01 of its last epochs from 100 on
    assert choose_epochs(records[:-1], "patchcore", longer) is None  # not ended
    assert preferred_setting(records, "patchcore") == longer
    # its runs take the length from the budget, not from the variant's own override
    overrides = student_overrides(Entry("bottle", "patchcore", 30, 0, longer), Path("t.ckpt"),
                                  argparse.Namespace(data_root=Path("d")), 100, "tag", "benchmark")
    assert [o for o in overrides if o.startswith("trainer.max_epochs=")] == ["trainer.max_epochs=100"]
    assert "scheme.feature_weight=4.0" in overrides


def test_the_gpu_plan_refuses_a_budget_study_of_its_own(monkeypatch, capsys) -> None:
    """The GPU plan uses the CPU study's budgets; ``--budget --trainer gpu`` stops with one line saying so."""
    from benchmarks import mvtec

    monkeypatch.setattr("sys.argv", ["mvtec", "--trainer", "gpu", "--budget"])
    with pytest.raises(SystemExit) as stopped:
        mvtec.main()
    assert stopped.value.code == 2 and "the GPU plan uses its budgets" in capsys.readouterr().err


def test_a_stopped_mvtec_run_continues_only_with_the_same_settings(tmp_path: Path) -> None:
    """``resumable_run``: a fresh folder gets a new tag; a stopped run of the same epochs continues
    with its tag and checkpoint; one of other epochs starts afresh; a study folder written with the
    tag alone (no settings line) still continues."""
    from benchmarks import mvtec

    run_dir = tmp_path / "rd-bottle-r1-s0"
    tag, checkpoint = mvtec.resumable_run(run_dir, "mvtec-rd-bottle-r1-s0", "epochs=45")
    assert checkpoint is None and tag.startswith("mvtec-rd-bottle-r1-s0-")
    assert mvtec.resumable_run(run_dir, "x", "epochs=45")[1] is None  # no checkpoint yet: fresh again
    tag, _ = mvtec.resumable_run(run_dir, "mvtec-rd-bottle-r1-s0", "epochs=45")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"stopped at epoch 20")
    assert mvtec.resumable_run(run_dir, "other", "epochs=45") == (tag, run_dir / "checkpoints" / "last.ckpt")
    other, checkpoint = mvtec.resumable_run(run_dir, "mvtec-rd-bottle-r1-s0", "epochs=30")
    assert checkpoint is None and other != tag  # another budget: never continue that checkpoint
    study = tmp_path / "budget-rd-bottle-r1-s0"
    (study / "checkpoints").mkdir(parents=True)
    (study / "checkpoints" / "last.ckpt").write_bytes(b"stopped")
    (study / "benchmark_run.txt").write_text("mvtec-budget-old-1-2\n")
    assert mvtec.resumable_run(study, "mvtec-budget") == ("mvtec-budget-old-1-2", study / "checkpoints" / "last.ckpt")


def test_the_mvtec_budget_study_runs_only_the_configurations_only_names(tmp_path: Path, monkeypatch) -> None:
    """``--budget --only 'rd_expert/*'`` studies RD with Expert alone (a second process can take RD),
    appends one record per studied epoch, and leaves the category's budget open until both are studied."""
    import torch

    from benchmarks import mvtec

    studied = []

    def fake_study(entry, args):
        studied.append(entry.name)
        return {epoch: {"val_synthetic_image_auroc": 0.9, "val_synthetic_pixel_auroc": 0.8}
                for epoch in range(1, mvtec.BUDGET_STUDY_EPOCHS + 1)}, False

    monkeypatch.setattr(mvtec, "study_budget", fake_study)
    monkeypatch.setattr(mvtec, "use_project_mlflow_store", lambda: None)
    output = tmp_path / "mvtec.json"
    monkeypatch.setattr("sys.argv", ["mvtec", "--budget", "--categories", "screw", "--only", "rd_expert/*",
                                     "--output", str(output), "--threads", str(torch.get_num_threads())])
    mvtec.main()
    assert studied == ["rd_expert/screw/r1/s0"]
    records = json.loads(mvtec.budget_path(output).read_text())["runs"]
    assert {r["scheme"] for r in records} == {"rd_expert"} and len(records) == mvtec.BUDGET_STUDY_EPOCHS
    assert mvtec.choose_budget(records, "screw") is None  # RD not studied yet


def test_the_mvtec_plan_draws_rd_expert_anomalies_on_the_screw_and_keeps_other_settings_apart(
        tmp_path: Path) -> None:
    """RD with Expert on screw runs with URD's foreground rule (its own run folder and key); a record
    drawn anywhere stays in the file, out of the results and gap tables, in a table of its own."""
    from benchmarks import mvtec

    screw = [e for e in mvtec.plan() if e.scheme == "rd_expert" and e.category == "screw"]
    assert screw and all(e.foreground == "dark" and e.name.endswith("/fg-dark") for e in screw)
    assert all(e.foreground is None for e in mvtec.plan() if e.category != "screw" or e.scheme != "rd_expert")
    args = argparse.Namespace(data_root=tmp_path, image_size=256, trainer="cpu")
    assert "scheme.synthetic_foreground=dark" in mvtec.overrides(screw[0], args, 20, "t", "benchmark")
    assert screw[0].key(256, "cpu", "validation")["synthetic_foreground"] == "dark"
    assert "synthetic_foreground" not in mvtec.Entry("rd", "screw", 1.0, 0).key(256, "cpu", "validation")

    def run(scheme: str, pixel: float, **extra) -> dict:
        return {"scheme": scheme, "category": "screw", "image_size": 256, "compression_ratio": 1.0, "seed": 0,
                "budget_rule": "validation", "image_auroc": 0.9, "pixel_auroc": pixel, "aupro": 0.9, **extra}

    path = tmp_path / "mvtec.json"
    path.write_text(json.dumps({"runs": [run("rd", 0.98), run("rd_expert", 0.85),
                                         run("rd_expert", 0.99, synthetic_foreground="dark")]}))
    table = mvtec.results_table(path)
    assert "0.9900" in table and "0.8500" not in table and "dark foreground" in table
    assert "+0.0100" in mvtec.retention_table(path)  # the gap pairs the plan's run with RD's
    others = mvtec.other_settings_table(path)
    assert "| anywhere | 0.9000 | 0.8500 |" in others and "0.9000 / 0.9900 / 0.9000" in others
    path.write_text(json.dumps({"runs": [run("rd", 0.98)]}))
    assert mvtec.other_settings_table(path) == ""


def test_rd_expert_reference_reads_the_plan_entry_checkpoint_and_tables_both_references(tmp_path: Path) -> None:
    from benchmarks import rd_expert_reference as reference

    record = {"scheme": "rd_expert", "category": "screw", "compression_ratio": 1.0, "seed": 2,
              "synthetic_foreground": "dark"}
    assert reference.checkpoint_of(record).parts[-3:] == ("rd_expert-screw-r1-s2-fg-dark", "checkpoints", "last.ckpt")
    assert reference.checkpoint_of({**record, "synthetic_foreground": None}).parts[-3] == "rd_expert-screw-r1-s2"
    results = ResultsFile(tmp_path / "ref.json", key_fields=("mlflow_run_id", "reference"))
    for name, figure in (("expert", 0.8), ("teacher", 0.5)):
        results.append({**record, "mlflow_run_id": "r", "reference": name, "image_auroc": figure,
                        "pixel_auroc": figure, "aupro": figure, "teacher_expert_drift_per_level": [0.2, 0.1, 0.05]})
    results.append({**record, "mlflow_run_id": "r", "reference": "teacher_expert_bn", "image_auroc": 0.7,
                    "pixel_auroc": 0.7, "aupro": 0.7, "teacher_expert_drift_per_level": [0.2, 0.1, 0.05],
                    "reference_expert_drift_per_level": [0.03, 0.02, 0.01]})
    lines = reference.table(tmp_path / "ref.json").splitlines()
    assert "trained teacher (deployed) | 0.5000" in lines[2] and "frozen expert | 0.8000" in lines[3]
    assert lines[2].endswith("| 0.200 / 0.100 / 0.050 |")
    assert "expert's BatchNorm statistics | 0.7000" in lines[4] and lines[4].endswith("| 0.030 / 0.020 / 0.010 |")


def test_rd_expert_reference_swaps_batchnorm_statistics_and_keeps_the_weights() -> None:
    import torch

    from benchmarks.rd_expert_reference import with_batchnorm_statistics_of

    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        model.train()
        model(torch.randn(8, 3, 8, 8) * (seed + 1) + seed)  # running statistics of its own
        return model.eval()

    teacher, expert = net(1), net(2)
    before = teacher[1].running_mean.clone()
    swapped = with_batchnorm_statistics_of(teacher, expert)
    assert torch.equal(swapped[1].running_mean, expert[1].running_mean)
    assert torch.equal(swapped[1].running_var, expert[1].running_var)
    assert torch.equal(swapped[0].weight, teacher[0].weight) and torch.equal(swapped[1].weight, teacher[1].weight)
    assert torch.equal(teacher[1].running_mean, before) and not swapped.training
    with pytest.raises(ValueError, match="no BatchNorm"):
        with_batchnorm_statistics_of(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3))


def test_only_patterns_that_match_no_plan_entry_stop_with_one_line() -> None:
    """A plan entry of a variant is named ``<category>/<teacher>/m<ratio>/s<seed>/<variant>``: a pattern
    without the variant part matches nothing, and says so instead of running nothing."""
    from benchmarks.harness import select
    from benchmarks.map_regression import plan

    entries = plan("patchcore", ("bottle",), "scheme.feature_level=0")
    assert [e.name for e in select(entries, ["bottle/patchcore/m30/s0/*"])] == [
        "bottle/patchcore/m30/s0/scheme.feature_level=0"]
    assert select(entries, None) == entries
    with pytest.raises(SystemExit, match="matches no plan entry; see --plan"):
        select(entries, ["bottle/patchcore/m30/s0"])


def test_a_setting_that_fixes_the_width_has_no_ratio_family() -> None:
    """scheme.width wins over the requested ratio, so a setting that fixes it plans its bottle runs at the
    seed ratio only (its seeds and the other categories stay); other settings plan every ratio."""
    from benchmarks.map_regression import BOTTLE_RATIOS, EXTRA_SEEDS, SEED_RATIO, plan

    def bottle_ratios(variant: str | None) -> list[float]:
        return sorted({e.ratio for e in plan("patchcore", ("bottle", "screw"), variant) if e.category == "bottle"})

    assert bottle_ratios(None) == bottle_ratios("scheme.fusion=pyramid") == sorted(BOTTLE_RATIOS)
    fixed = plan("patchcore", ("bottle", "screw"), "scheme.fusion=pyramid scheme.width=17")
    assert bottle_ratios("scheme.fusion=pyramid scheme.width=17") == [SEED_RATIO]
    assert sorted(e.seed for e in fixed if e.category == "bottle") == [0, *EXTRA_SEEDS]
    assert [(e.category, e.ratio) for e in fixed if e.category != "bottle"] == [("screw", SEED_RATIO)]


def test_region_figures_read_the_overlap_curve_and_where_false_positives_lie() -> None:
    """benchmarks.map_regression_regions: a map that marks each defect exactly covers every region at
    every false-positive rate, with no false positive near it; a map that also lights a ring around
    each defect puts its false positives there; a map that lights a defect-free image puts them
    there; regions are binned by size."""
    import numpy as np

    from benchmarks.map_regression_regions import FPRS, region_figures

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 64, 64), dtype=np.float32)
    masks[0, 10:20, 10:20] = 1  # 100 pixels
    masks[1, 20:50, 20:50] = 1  # 900 pixels
    background = rng.uniform(0.0, 0.1, masks.shape).astype(np.float32)
    exact = figures = region_figures(background + masks, masks)  # defects at 1.0-1.1, the rest below 0.1
    assert exact["regions"] == 2 and exact["regions_0_500"] == 1 and exact["regions_500_2000"] == 1
    assert all(figures[f"pro_at_fpr_{f:g}"] == 1.0 for f in FPRS) and figures["aupro"] > 0.99
    ring = background.copy()
    ring[0, 4:26, 4:26] += 0.5  # a halo 6 pixels wide around the first defect
    ring[1, 14:56, 14:56] += 0.5
    halo = region_figures(ring + masks, masks)
    assert halo["fp_share_near_defect"] == 1.0 and halo["fp_share_good_images"] == 0.0
    lit = background.copy()
    lit[3, 20:45, 20:45] += 2.0  # a bright patch on a defect-free image (more than 3 % of the normal pixels)
    figures = region_figures(lit + masks, masks)
    assert figures["fp_share_good_images"] == 1.0 and figures["pro_at_fpr_0.005"] < 0.5


def test_the_floors_table_counts_records_that_meet_every_floor_and_names_what_is_missed() -> None:
    """benchmarks.map_regression.floors_table: bottle students at requested ratio >= 30 only, grouped by
    setting and ratio; a record meets the floors only when all five hold (retention and the latency ratio
    derived from the record itself); the preferred setting comes first."""
    from benchmarks.map_regression import floors_table, same_size_map_students

    def run(variant, ratio, seed, aupro, image=0.99, pixel=0.975, category="bottle", student_ms=2.0,
            deployed=None) -> dict:
        return {"category": category, "teacher_scheme": "patchcore", "variant": variant, "requested_mac_ratio": ratio,
                "deployed_mac_ratio": ratio * 1.02 if deployed is None else deployed, "seed": seed, "image_auroc": image, "pixel_auroc": pixel, "aupro": aupro, "teacher_pixel_auroc": 0.98,
                "student_latency_ms_b1": student_ms, "teacher_latency_ms_b1": 60.0, "deployed_macs": 124e6}

    runs = [run("a=1", 30, 0, 0.91), run("a=1", 30, 1, 0.89), run("a=1", 30, 2, 0.92, student_ms=7.0),
            run(None, 30, 0, 0.95), run(None, 10, 0, 0.99), run("b=2", 30, 0, 0.95, deployed=29.7), run(None, 30, 0, 0.2, category="screw"),
            {**run(None, 30, 0, 0.0), "student": "score_regression"}]
    lines = floors_table(runs, preferred="a=1").splitlines()
    # header, rule, a=1 at 30, default at 30, b=2 at 30 (not ratio 10, screw or the score student)
    assert len(lines) == 5
    assert lines[2].startswith("| `a=1` (rule 5 prefers it) | 30 | 0, 1, 2 | 30.6 ± 0.0 | 0.9900 ± 0.0000 |")
    assert lines[2].endswith("| 1 of 3 | AUPRO, latency ratio |")  # seed 1: AUPRO; seed 2: 60 / 7 < 10
    assert "| 0.9067 ± 0.0153 |" in lines[2]
    # requested 30 but deployed 29.7: every quality floor met, the size floor not
    assert lines[3].startswith("| default | 30 | 0 |") and lines[3].endswith("| 1 of 1 | none |")
    assert lines[4].startswith("| `b=2` | 30 | 0 | 29.7 |") and lines[4].endswith("| 0 of 1 | deployed MAC ratio |")
    assert floors_table([run(None, 10, 0, 0.95)]) == ""
    same = same_size_map_students(runs, preferred="a=1").splitlines()
    # the seed-0 ratio-30 students of the categories with a comparison row (bottle only here), preferred first
    assert [line.split(" | ")[2] for line in same[2:]] == ["`a=1` (rule 5 prefers it)", "default", "`b=2`"]


def test_the_results_table_summarises_the_refit_of_rule_6s_setting_apart_from_the_setting(tmp_path: Path) -> None:
    """benchmarks.map_regression.results_table: the seed line of ``<rule 6's setting> data.refit=true`` is
    its own, labelled a refit, and the setting's seed line reads the setting's records only."""
    import json

    from benchmarks.map_regression import REFIT, results_table

    def run(variant, seed, aupro) -> dict:
        return {"category": "bottle", "teacher_scheme": "patchcore", "variant": variant, "requested_mac_ratio": 30,
                "deployed_mac_ratio": 30.4, "deployed_param_ratio": 50.0, "seed": seed, "image_auroc": 0.99,
                "pixel_auroc": 0.98, "aupro": aupro, "teacher_image_auroc": 1.0, "teacher_pixel_auroc": 0.985,
                "teacher_aupro": 0.93, "student_latency_ms_b1": 4.0, "teacher_latency_ms_b1": 100.0}

    path = tmp_path / "map_regression.json"
    path.write_text(json.dumps({"runs": [run("a=1", 0, 0.91), run("a=1", 1, 0.89),
                                         run(f"a=1 {REFIT}", 0, 0.92), run(f"a=1 {REFIT}", 1, 0.94)]}))
    table = results_table(path, preferred=None, fidelity="a=1")
    setting = next(line for line in table.splitlines() if line.startswith("**Preferred by rule 6.**"))
    refit = next(line for line in table.splitlines() if line.startswith("**Rule 6's setting, refitted"))
    assert "AUPRO 0.9000 ± 0.0141" in setting and f"`a=1 {REFIT}`" in refit and "AUPRO 0.9300 ± 0.0141" in refit


def test_the_budget_table_shows_validation_aupro_only_when_a_study_logged_it(tmp_path: Path) -> None:
    from benchmarks.harness import ResultsFile
    from benchmarks.map_regression import STUDY_EPOCHS, budget_table, study_record

    def record(variant, aupro=None):  # one study run's record, as record_study writes it
        epochs = {epoch: {"val_synthetic_pixel_auroc": 0.7, "val_synthetic_image_auroc": 0.8, "val_loss": 0.2,
                          **({} if aupro is None else {"val_synthetic_aupro": aupro})}
                  for epoch in range(1, STUDY_EPOCHS + 1)}
        return study_record({"teacher_scheme": "patchcore", "variant": variant}, epochs,
                            {"val_teacher_synthetic_pixel_auroc": 0.79, "val_teacher_synthetic_image_auroc": 0.96})

    path = tmp_path / "budget.json"
    results = ResultsFile(path)
    results.append(record(None))
    assert "AUPRO" not in budget_table(path)
    results.append(record("scheme.feature_weight=4.0", aupro=0.55))
    table = budget_table(path).splitlines()
    assert table[0].count("|") == table[1].count("|") == 9  # the column appears, header and rule alike
    assert f"| patchcore | `scheme.feature_weight=4.0` | 0.7900 / 0.9600 | {STUDY_EPOCHS} | 0.7000 | 0.8000 | 0.5500 | 0.2000 |" \
        in table
    assert f"| patchcore | default | 0.7900 / 0.9600 | {STUDY_EPOCHS} | 0.7000 | 0.8000 | - | 0.2000 |" in table


def _fake_study(length: int, aupro: bool = True, skip_aupro_at: int | None = None):
    """What ``map_regression.study`` returns for a study of ``length`` epochs: per-epoch figures, the teacher's."""
    epochs = {epoch: {"val_synthetic_pixel_auroc": 0.5 + epoch / 1000, "val_synthetic_image_auroc": 0.6,
                      **({"val_synthetic_aupro": 0.3} if aupro and epoch != skip_aupro_at else {}),
                      "val_loss": 1 / epoch, "train_loss": 2 / epoch} for epoch in range(1, length + 1)}
    return epochs, {"val_teacher_synthetic_pixel_auroc": 0.79, "val_teacher_synthetic_image_auroc": 0.96,
                    "teacher_epochs": None, "teacher_budget_rule": None}


def test_a_budget_study_writes_one_record_with_per_epoch_arrays(tmp_path: Path, monkeypatch) -> None:
    """benchmarks.map_regression.record_study: one record per study run, its key, teacher figures and provenance
    once, the per-epoch figures as arrays named by ``per_epoch``; expanded, one row per epoch as the per-epoch
    records were; a study whose last epoch is in the file is not run again."""
    from benchmarks import map_regression
    from benchmarks.harness import epoch_rows

    studied = []
    monkeypatch.setattr(map_regression, "study", lambda entry, args: (studied.append(entry), _fake_study(
        map_regression.STUDY_EPOCHS, skip_aupro_at=2))[1])
    results = ResultsFile(tmp_path / "map_regression_budget.json")
    entry = map_regression.Entry("bottle", "patchcore", 30, 0)
    map_regression.record_study(entry, argparse.Namespace(), results)
    (record,) = json.loads(results.path.read_text())["runs"]
    length = map_regression.STUDY_EPOCHS
    assert record["per_epoch"] == ["epoch", "val_synthetic_pixel_auroc", "val_synthetic_image_auroc",
                                   "val_synthetic_aupro", "val_loss", "train_loss"]
    assert record["epoch"] == list(range(1, length + 1))
    assert all(len(record[name]) == length for name in record["per_epoch"])
    assert record["val_synthetic_aupro"][:3] == [0.3, None, 0.3]  # epoch 2 did not log it
    assert record["val_teacher_synthetic_pixel_auroc"] == 0.79 and record["max_epochs"] == length
    assert record["provenance"] == "record" and all(name in record for name in harness.PROVENANCE_FIELDS)
    rows = epoch_rows([record])
    assert len(rows) == length and "per_epoch" not in rows[0]
    epochs, teacher = _fake_study(length, skip_aupro_at=2)
    provenance = {name: record[name] for name in (*harness.PROVENANCE_FIELDS, "provenance")}
    assert rows[4] == {**entry.key(), "max_epochs": length, "epoch": 5, **epochs[5], **teacher, **provenance}
    assert rows[1]["val_synthetic_aupro"] is None
    map_regression.record_study(entry, argparse.Namespace(), results)  # done: not studied again
    assert len(studied) == 1 and len(results.reload()["runs"]) == 1


def test_a_study_record_carries_the_students_deployed_size_from_its_run() -> None:
    """benchmarks.map_regression.student_size: the size a rule may hold a setting to, from the run's params."""
    from benchmarks import map_regression

    params = {"deployed_macs": "124144640", "deployed_mac_compression_ratio": "30.541444302387923", "x": "1"}
    assert map_regression.student_size(params) == {"deployed_macs": 124144640, "deployed_mac_ratio": 30.541444302387923}
    assert map_regression.student_size({"x": "1"}) == {}  # a run without the sizes (none counted): no fields


def test_the_budget_file_is_migrated_to_one_record_per_study_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """benchmarks.map_regression.migrate_budget: the per-epoch records of each complete study run become one
    record that expands to exactly those rows; rows of an incomplete run or with a repeated epoch stay as they
    are; records already per run are kept; it is idempotent, and readers give what they gave on the old file."""
    from benchmarks import map_regression, report
    from benchmarks.harness import epoch_rows

    length = map_regression.STUDY_EPOCHS

    def rows(teacher, started_at, variant=..., epochs=range(1, length + 1), aupro=False):
        provenance = {"git_commit": "abc", "command": "python -m benchmarks.map_regression --budget",
                      "machine": {"cores": 2}, "started_at": started_at, "wall_s": 10.0, "provenance": "record"}
        key = {"category": "bottle", "teacher_scheme": teacher, "requested_mac_ratio": 30, "seed": 0,
               "image_size": 256, **({} if variant is ... else {"variant": variant}), "max_epochs": length}
        figures, teacher_figures = _fake_study(length, aupro)
        teacher_figures["val_teacher_synthetic_pixel_auroc"] -= 0.1 if teacher == "rd" else 0.0
        if variant == "a=1":  # validation prefers it by rules 5 and 6 (no tie with the default)
            for values in figures.values():
                values["val_synthetic_pixel_auroc"] += 0.01
                values["val_loss"] -= 0.001
        return [{**key, "epoch": epoch, **figures[epoch], **teacher_figures, **provenance} for epoch in epochs]

    old = (rows("patchcore", "t0") + rows("rd", "t1") + rows("patchcore", "t2", variant="a=1", aupro=True)
           + rows("patchcore", "t3", variant="b=1", epochs=[1, 2, 2, 3])  # a repeated epoch, a gap: kept
           + rows("patchcore", "t4", variant="c=1", epochs=range(1, 4)))  # still being appended: kept
    path = tmp_path / "map_regression_budget.json"
    path.write_text(json.dumps({"runs": old}, indent=1) + "\n")
    before = map_regression.budget_table(path)

    assert map_regression.migrate_budget(path).endswith(f"{len(old)} records -> 10 (3 per-run records, "
                                                        "7 per-epoch rows kept as they are)")
    runs = json.loads(path.read_text())["runs"]
    assert [run.get("per_epoch") is not None for run in runs[:4]] == [True, True, True, False]
    assert "variant" not in runs[0] and runs[2]["per_epoch"][3] == "val_synthetic_aupro"
    assert runs[1]["val_teacher_synthetic_pixel_auroc"] == pytest.approx(0.69)  # one value per run
    assert [json.dumps(row) for row in epoch_rows(runs)] == [json.dumps(row) for row in old]  # field order too
    assert map_regression.budget_table(path) == before  # rules 1, 2, 5 and 6 read the same rows
    assert "Rule 1 (teacher): patchcore; rule 2 (budget): 50 epochs." in before and "Preferred: `a=1`" in before
    assert report.load_runs(tmp_path, path.name) == old
    migrated = path.read_bytes()
    monkeypatch.setattr("sys.argv", ["map_regression", "--migrate-budget", str(path)])
    map_regression.main()  # the command line, again: idempotent
    assert path.read_bytes() == migrated and "10 records -> 10 (3 per-run records" in capsys.readouterr().out

    # the per-epoch writer of a study that is still running appends beside per-run records: a mixed file
    later = rows("patchcore", "t5", variant="d=1")
    with ResultsFile(path).rewrite() as data:
        data["runs"] += later
    assert epoch_rows(json.loads(path.read_text())["runs"]) == old + later
    assert map_regression.migrate_budget(path).endswith("-> 11 (4 per-run records, 7 per-epoch rows kept as they are)")
    assert epoch_rows(json.loads(path.read_text())["runs"]) == old + later


def test_the_criteria_table_sets_validation_criteria_beside_test_aupro_and_ranks_them() -> None:
    """benchmarks.map_regression.criteria_table: per studied setting of the chosen teacher, rule 5's score and the
    validation L1 to the teacher beside the bottle ratio-30 test AUPRO (mean over seeds); Spearman per criterion,
    with the L1 oriented so that lower distance counts as better."""
    from benchmarks.map_regression import STUDY_EPOCHS, criteria_table

    def study(teacher, variant, score, loss):
        return [{"teacher_scheme": teacher, "variant": variant, "epoch": epoch, "val_synthetic_pixel_auroc": score,
                 "val_synthetic_image_auroc": score, "val_loss": loss, "val_teacher_synthetic_pixel_auroc":
                 0.8 if teacher == "patchcore" else 0.7, "val_teacher_synthetic_image_auroc": 0.9}
                for epoch in range(1, STUDY_EPOCHS + 1)]

    # rule 5 ranks a > b > default > c; the L1 ranks c, default, b, a (closest first); the test agrees with the L1
    budget = (study("rd", None, 0.5, 0.3) + study("patchcore", None, 0.7, 0.2) + study("patchcore", "a=1", 0.9, 0.4)
              + study("patchcore", "b=1", 0.8, 0.3) + study("patchcore", "c=1", 0.6, 0.1))
    test = {None: [0.85], "a=1": [0.70], "b=1": [0.75, 0.81], "c=1": [0.90]}
    runs = [{"category": "bottle", "teacher_scheme": "patchcore", "variant": variant, "requested_mac_ratio": 30,
             "seed": seed, "aupro": aupro, "pixel_auroc": 0.97} for variant, values in test.items()
            for seed, aupro in enumerate(values)]
    runs.append({**runs[0], "category": "screw", "aupro": 0.1})  # another category: not read
    table = criteria_table(budget, runs).splitlines()
    assert [line.split(" | ")[0] for line in table[2:6]] == ["| `a=1`", "| `b=1`", "| default", "| `c=1`"]
    assert table[3] == "| `b=1` | 0.8000 | 0.3000 | - | 0.7800 (0, 1) | 0.9700 |"
    assert table[-1].endswith("rule 5 score -1.00 (n=4); val L1 to the teacher 1.00 (n=4).")
    assert criteria_table(study("patchcore", None, 0.7, 0.2), runs) == ""  # no teacher chosen yet


def test_rule_6_prefers_the_setting_closest_to_the_teacher_and_says_whether_that_tests_it() -> None:
    from benchmarks.map_regression import STUDY_EPOCHS, fidelity_preferred, rule_6_line

    def study(variant, loss, epochs=STUDY_EPOCHS):
        return [{"teacher_scheme": "patchcore", "variant": variant, "epoch": epoch, "val_loss": loss}
                for epoch in range(1, epochs + 1)]

    known = "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=0"  # studied before rule 6
    records = study(None, 0.2) + study("scheme.feature_weight=4.0", 0.15)
    assert fidelity_preferred(records, "patchcore") == "scheme.feature_weight=4.0"
    assert "not a test of rule 6" in rule_6_line(records, "patchcore")
    new = "scheme.feature_weight=4.0 scheme.width=64"
    records += study(new, 0.1) + study("scheme.depth=9", 0.01)[:-1]  # an unfinished study does not count
    assert fidelity_preferred(records, "patchcore") == new
    assert rule_6_line(records, "patchcore").endswith("(studied after rule 6 was written: its test runs are a "
                                                      "forward test of rule 6).")
    assert fidelity_preferred(study(known, 0.3), "rd") is None and rule_6_line([], "patchcore") == ""


def _study_checkpoint(path: Path, processed: int, **settings) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "kd_mlflow_run_id": "study-run",
                "loops": {"fit_loop": {"epoch_progress": {"total": {"processed": processed}}}},
                "hyper_parameters": {"input_shape": [3, 256, 256], "cache_dir": "/elsewhere", **settings}}, path)


def test_the_seed_0_test_run_tests_its_study_runs_final_weights_only_when_they_are_what_it_would_train(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.map_regression.study_weights: bottle, seed 0, ratio 30, the study's whole length, a finished
    study, the same learned settings, a study newer than its teacher; else None (the run trains)."""
    import os

    from benchmarks import map_regression as mr

    monkeypatch.setattr(mr, "ROOT", tmp_path)
    variant = "trainer.max_epochs=200 scheme.lr_schedule=cosine scheme.width=17"
    entry = mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, variant)
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"teacher")
    os.utime(teacher, (1_000, 1_000))
    study = mr.study_run_dir(entry) / "checkpoints" / "last.ckpt"
    scheme = {"width": 17, "lr_schedule": "cosine", "cache_dir": "/here", "teacher": {"checkpoint": "t"}}
    _study_checkpoint(study, 200, width=17, lr_schedule="cosine")
    assert mr.study_weights(entry, 200, scheme, teacher) == study  # where it caches does not count
    assert mr.study_weights(entry, 180, scheme, teacher) is None  # a shorter budget: not the study's weights
    for other in (mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 1, variant),
                  mr.Entry("bottle", "patchcore", 10, 0, variant), mr.Entry("screw", "patchcore", mr.SEED_RATIO, 0, variant)):
        assert mr.study_weights(other, 200, scheme, teacher) is None  # no study of that entry
    assert mr.study_weights(entry, 200, {**scheme, "width": 18}, teacher) is None  # another setting
    os.utime(teacher, None)
    os.utime(study, (1_000, 1_000))
    assert mr.study_weights(entry, 200, scheme, teacher) is None  # the teacher was built again after it
    _study_checkpoint(study, 120, width=17, lr_schedule="cosine")
    assert mr.study_weights(entry, 200, scheme, teacher) is None  # a study stopped before its end


def test_a_test_run_from_the_study_runs_weights_is_test_only_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.map_regression.run_student: with the study's weights, kd-train runs ``train=false`` with
    ``ckpt_path`` the study's last.ckpt and the record says ``weights: study`` and names the study's run;
    ``--retrain`` (or no such weights) trains, ``weights: trained``."""
    from types import SimpleNamespace

    import kd_experiments.checkpoints
    import kd_experiments.train
    from benchmarks import map_regression as mr

    study = tmp_path / "last.ckpt"
    composed: list[list[str]] = []
    monkeypatch.setattr(mr, "build_teacher", lambda teacher, category, args: (tmp_path / "t.ckpt", {}))
    monkeypatch.setattr(mr, "compose", lambda overrides, output_dir: (composed.append(list(overrides)), SimpleNamespace(
        experiment_name="x", scheme={}, trainer=SimpleNamespace(max_epochs=200)))[1])
    monkeypatch.setattr(mr, "study_weights", lambda entry, epochs, scheme, teacher: study)
    monkeypatch.setattr(kd_experiments.train, "train", lambda cfg: {"test/image_auroc": 0.99})
    monkeypatch.setattr(kd_experiments.checkpoints, "mlflow_run_id_of", lambda path: "study-run")
    run = SimpleNamespace(data=SimpleNamespace(metrics={}, params={}), info=SimpleNamespace(run_id="test-run"))
    history = [SimpleNamespace(step=step, value=float(step)) for step in range(8)]  # the trained run's val/loss
    client = SimpleNamespace(get_metric_history=lambda run_id, key: history if run_id == "test-run" else [])
    monkeypatch.setattr(mr, "mlflow_run", lambda tag, experiment: (client, run))
    entry = mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, "trainer.max_epochs=200 scheme.lr_schedule=cosine")

    record = mr.run_student(entry, argparse.Namespace(retrain=False, data_root=tmp_path), 200)
    assert record["weights"] == "study" and record["weights_mlflow_run_id"] == "study-run"
    assert "val_loss_last" not in record  # a test-only run validates nothing; its study's figure is rule 6's
    assert composed[-1][-2:] == ["train=false", f"ckpt_path={study}"]
    assert not any(o.startswith(("train=", "ckpt_path=")) for o in composed[0])
    composed.clear()
    record = mr.run_student(entry, argparse.Namespace(retrain=True, data_root=tmp_path), 200)
    assert record["weights"] == "trained" and "weights_mlflow_run_id" not in record and len(composed) == 1
    assert record["val_loss_last"] == pytest.approx(5.0)  # the mean of its last 5 epochs: 3, 4, 5, 6, 7


def test_a_decaying_variants_test_runs_may_start_once_its_study_has_but_the_study_entry_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.map_regression.variant_budget / waits_for_study: a cosine variant's budget is its study's length
    as soon as its study run exists (not before); a constant-rate variant's waits for rule 2 on the ended study;
    until the study ends, bottle's seed-0 ratio-30 entry (the study's own weights) waits, the other entries run."""
    from benchmarks import map_regression as mr

    monkeypatch.setattr(mr, "ROOT", tmp_path)
    cosine = "trainer.max_epochs=300 scheme.lr_schedule=cosine scheme.width=17"
    constant = "trainer.max_epochs=300 scheme.width=17"
    assert mr.variant_budget([], "patchcore", cosine) == (None, False)  # no study begun: no test
    for variant in (cosine, constant):
        mr.study_run_dir(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, variant)).mkdir(parents=True)
    assert mr.variant_budget([], "patchcore", cosine) == (300, False)
    assert mr.variant_budget([], "patchcore", constant) == (None, False)  # rule 2 needs its curve
    ended = [{"teacher_scheme": "patchcore", "variant": cosine, "epoch": epoch, "val_synthetic_pixel_auroc": 0.7,
              "val_synthetic_image_auroc": 0.8} for epoch in range(1, 301)]
    assert mr.variant_budget(ended, "patchcore", cosine) == (300, True)
    assert mr.waits_for_study(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, cosine), False)
    assert not mr.waits_for_study(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, cosine), True)
    assert not mr.waits_for_study(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 1, cosine), False)
    assert not mr.waits_for_study(mr.Entry("screw", "patchcore", mr.SEED_RATIO, 0, cosine), False)


def test_a_refit_has_its_studied_settings_budget_always_trains_on_every_image_and_is_never_studied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.map_regression: ``--variant <setting> data.refit=true`` is tested at the setting's own
    budget once the setting's study has ended (never before, never one of its own), trains even where the
    setting's study weights exist (they never saw the held-out tenth), validates only every
    REFIT_VAL_EVERY epochs, composes a datamodule with refit on, and cannot be studied."""
    from types import SimpleNamespace

    import kd_experiments.train
    from benchmarks import map_regression as mr
    from benchmarks.harness import compose

    setting = "trainer.max_epochs=300 scheme.lr_schedule=cosine scheme.width=17"
    refit = f"{setting} {mr.REFIT}"
    assert mr.is_refit(refit) and not mr.is_refit(setting) and mr.refitted_setting(refit) == setting
    monkeypatch.setattr(mr, "ROOT", tmp_path)
    mr.study_run_dir(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, setting)).mkdir(parents=True)
    assert mr.variant_budget([], "patchcore", refit) == (None, False)  # begun is not enough for a refit
    ended = [{"teacher_scheme": "patchcore", "variant": setting, "epoch": epoch, "val_synthetic_pixel_auroc": 0.7,
              "val_synthetic_image_auroc": 0.8} for epoch in range(1, 301)]
    assert mr.variant_budget(ended, "patchcore", refit) == (300, True)
    assert mr.variant_budget(ended, "patchcore", mr.REFIT) == (None, False)  # refits nothing studied

    composed: list[list[str]] = []
    monkeypatch.setattr(mr, "build_teacher", lambda teacher, category, args: (tmp_path / "t.ckpt", {}))
    monkeypatch.setattr(mr, "compose", lambda overrides, output_dir: (composed.append(list(overrides)), SimpleNamespace(
        experiment_name="x", scheme={}, trainer=SimpleNamespace(max_epochs=300)))[1])
    monkeypatch.setattr(mr, "study_weights", lambda entry, epochs, scheme, teacher: tmp_path / "last.ckpt")
    monkeypatch.setattr(kd_experiments.train, "train", lambda cfg: {"test/image_auroc": 0.99})
    run = SimpleNamespace(data=SimpleNamespace(metrics={}, params={}), info=SimpleNamespace(run_id="r"))
    monkeypatch.setattr(mr, "mlflow_run", lambda tag, experiment: (None, run))
    record = mr.run_student(mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 0, refit),
                            argparse.Namespace(retrain=False, data_root=tmp_path), 300)
    assert record["weights"] == "trained" and record["val_every_n_epochs"] == mr.REFIT_VAL_EVERY
    assert len(composed) == 1 and f"trainer.check_val_every_n_epoch={mr.REFIT_VAL_EVERY}" in composed[0]
    (tmp_path / "mvtec_ad" / "bottle").mkdir(parents=True)
    cfg = compose(composed[0], output_dir=tmp_path)
    assert cfg.data.refit is True and cfg.trainer.check_val_every_n_epoch == mr.REFIT_VAL_EVERY

    monkeypatch.setattr("sys.argv", ["map_regression", "--budget", "--output", str(tmp_path / "m.json"),
                                     "--variant", *refit.split()])
    with pytest.raises(SystemExit, match="not studied"):
        mr.main()


def test_the_split_benchmark_overrides_only_the_data_seed_and_tables_crossed_cells_beside_the_diagonal(
        tmp_path: Path) -> None:
    """benchmarks.map_regression_split: a crossed cell is the setting's run with data.seed overridden
    after seed (so the run's split is the other seed's and its initialisation its own); the table joins
    the crossed records with the setting's own ratio-30 records of seeds 0 and 1, and nothing else."""
    from benchmarks.harness import compose
    from benchmarks.map_regression import student_overrides
    from benchmarks.map_regression_split import cell_entry, split_table

    setting = "scheme.width=17"
    entry = cell_entry("patchcore", setting, seed=1, data_seed=0)
    args = argparse.Namespace(data_root=tmp_path)
    (tmp_path / "mvtec_ad" / "bottle").mkdir(parents=True)
    cfg = compose(student_overrides(entry, tmp_path / "teacher.ckpt", args, 3, "tag", "test"), output_dir=tmp_path)
    assert (cfg.seed, cfg.data.seed, cfg.scheme.width) == (1, 0, 17)
    with pytest.raises(SystemExit, match="data.seed"):
        cell_entry("patchcore", f"{setting} data.seed=2", seed=0, data_seed=1)

    def run(seed, data_seed=None, variant=setting, aupro=0.9, **extra):
        return {"category": "bottle", "teacher_scheme": "patchcore", "requested_mac_ratio": 30, "seed": seed,
                "variant": variant, "image_auroc": 0.99, "pixel_auroc": 0.98, "aupro": aupro,
                "git_commit": "abcdef0123", **({} if data_seed is None else {"data_seed": data_seed}), **extra}

    records = [run(0, aupro=0.915), run(1, aupro=0.889), run(2, aupro=0.91), run(1, variant="other", aupro=0.5),
               run(1, aupro=0.1, student="score_regression")]
    assert split_table(records, []) == ""
    lines = split_table(records, [run(1, 0, aupro=0.912), run(0, 1, aupro=0.887)]).splitlines()[2:]
    cells = [[field.strip() for field in line.split("|")[2:7]] for line in lines]
    assert cells == [["0", "0", "0.9900", "0.9800", "0.9150"], ["0", "1", "0.9900", "0.9800", "0.9120"],
                     ["1", "0", "0.9900", "0.9800", "0.8870"], ["1", "1", "0.9900", "0.9800", "0.8890"]]


def test_a_map_regression_entry_of_many_overrides_gets_a_short_distinct_folder_and_short_ones_keep_theirs():
    from benchmarks import map_regression as mr

    short = mr.Entry("bottle", "patchcore", 30, 0, "scheme.width=17 callbacks=ema")
    assert short.folder == "bottle-patchcore-m30-s0-scheme.width_17_callbacks_ema"  # existing folders keep their names
    many = ("trainer.max_epochs=400 scheme.feature_weight=4.0 scheme.feature_level=0 scheme.teacher_leave_one_out=true "
            "scheme.lr_schedule=cosine scheme.fusion=pyramid scheme.width=17 scheme.merge_depth=3 callbacks=ema")
    folders = {mr.Entry("bottle", "patchcore", 30, 0, f"{many} scheme.learning_rate={lr}").folder for lr in ("4.0e-3", "3.0e-3")}
    assert len(folders) == 2  # the digest keeps entries that differ past the cut apart
    for folder in folders:
        assert len(folder) == mr.FOLDER_MAX and folder.startswith("bottle-patchcore-m30-s0-trainer.max_epochs_400")
    assert len(mr.study_run_dir(mr.Entry("bottle", "patchcore", 30, 0, many + " x=1")).name.encode()) <= 255


def test_a_trained_runs_record_carries_rule_6s_figure_over_its_last_validated_epochs() -> None:
    """``val_loss_last``: the mean of the run's last ``REFERENCE_EPOCHS`` ``val/loss`` points in step order,
    whatever order the store returns them in; None when fewer epochs were validated."""
    from types import SimpleNamespace

    from benchmarks.map_regression import REFERENCE_EPOCHS, last_epochs_val_loss

    class Client:
        def __init__(self, values: list[float]) -> None:
            self.points = [SimpleNamespace(step=10 * i, value=v) for i, v in enumerate(values)][::-1]

        def get_metric_history(self, run_id: str, key: str) -> list:
            assert (run_id, key) == ("run", "val/loss")
            return self.points

    values = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert REFERENCE_EPOCHS == 5
    assert last_epochs_val_loss(Client(values), "run") == pytest.approx(3.0)
    assert last_epochs_val_loss(Client(values[:REFERENCE_EPOCHS - 1]), "run") is None


def test_plan_lists_a_budget_study_and_never_runs_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--budget --variant X --plan`` says whether X's study is done; it starts no training."""
    from argparse import Namespace

    from benchmarks import map_regression

    def refuse(*_: object) -> None:
        raise AssertionError("--plan ran a study")

    monkeypatch.setattr(map_regression, "study", refuse)
    entry = map_regression.study_entry("patchcore", "trainer.max_epochs=300 scheme.lr_schedule=cosine")
    map_regression.record_study(entry, Namespace(plan=True), ResultsFile(tmp_path / "budget.json"))
    assert capsys.readouterr().out.startswith(f"to do  study {entry.name} (300 epochs)")
    with pytest.raises(AssertionError, match="ran a study"):
        map_regression.record_study(entry, Namespace(plan=False), ResultsFile(tmp_path / "budget.json"))


def test_rule_7_averages_rule_6s_figure_over_three_seeds_and_ranks_only_settings_with_all_three() -> None:
    """Seed 0's figure is the study's (rule 6); seeds 1 and 2's are their trained test records' ``val_loss_last``.
    A setting missing a seed's figure is not ranked; the forward-test standing follows ``STUDIED_BEFORE_RULE_7``."""
    from benchmarks.map_regression import (STUDY_EPOCHS, seed_fidelity_figures, seed_fidelity_preferred,
                                           rule_7_line)

    def study(variant, loss):
        return [{"teacher_scheme": "patchcore", "variant": variant, "epoch": epoch, "val_loss": loss}
                for epoch in range(1, STUDY_EPOCHS + 1)]

    def run(variant, seed, loss, **fields):
        return {"category": "bottle", "teacher_scheme": "patchcore", "variant": variant, "requested_mac_ratio": 30,
                "seed": seed, "val_loss_last": loss, **fields}

    known = "scheme.feature_weight=4.0"  # its test figures were known when rule 7 was written
    new = "scheme.feature_weight=4.0 scheme.width=64"
    # rule 6 (seed 0 alone) prefers `known`; over three seeds `new` is closer to the teacher
    records = study(known, 0.070) + study(new, 0.072) + study(None, 0.060)
    runs = [run(known, 1, 0.074), run(known, 2, 0.075), run(new, 1, 0.068), run(new, 2, 0.067),
            run(None, 1, 0.01), run(None, 2, None),  # the default lacks seed 2's figure: not ranked
            run(new, 1, 0.001, category="screw"), run(new, 2, 0.001, requested_mac_ratio=100),  # not read
            {**run(new, 1, 0.001), "student": "score_regression"}]
    figures = seed_fidelity_figures(records, runs, "patchcore")
    assert figures == {known: [0.070, 0.074, 0.075], new: [0.072, 0.068, 0.067]}
    assert seed_fidelity_preferred(records, runs, "patchcore") == new
    line = rule_7_line(records, runs, "patchcore")
    assert "`scheme.feature_weight=4.0 scheme.width=64` 0.0690 (0.0720 / 0.0680 / 0.0670)" in line
    assert "forward test of rule 7" in line and line.endswith("Not ranked: 1 studied setting(s) whose seed runs' "
                                                              "validation figures are not on record.")
    runs[2:4] = [run(new, 1, 0.08), run(new, 2, 0.08)]
    assert seed_fidelity_preferred(records, runs, "patchcore") == known
    assert "not a test of rule 7" in rule_7_line(records, runs, "patchcore")
    assert rule_7_line(records, [], "patchcore") == "" and seed_fidelity_preferred(records, [], "patchcore") is None


def test_the_backfill_adds_rule_7s_figure_from_the_store_and_logs_it(tmp_path: Path) -> None:
    """Trained, non-refit map students lacking ``val_loss_last`` get it from their MLflow run; a run the store
    lacks, a study-weights run, a refit and a record that has the field are left as they are."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from benchmarks.map_regression import backfill_val_loss

    class Client:  # "gone": a file store raises, the SQL store answers an empty history; "short": 4 epochs
        def get_metric_history(self, run_id: str, key: str) -> list:
            if run_id == "gone":
                raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
            if run_id == "broken":
                raise MlflowException("database is locked")
            points = {"kept": 6, "short": 4}.get(run_id, 0)
            return [SimpleNamespace(step=step, value=0.07 + step / 1000) for step in range(points)]

    base = {"category": "bottle", "teacher_scheme": "patchcore", "requested_mac_ratio": 30, "variant": "a=1"}
    results = ResultsFile(tmp_path / "map_regression.json")
    for seed, run_id, fields in ((1, "kept", {}), (2, "gone", {}), (1, "short", {}), (2, "empty", {}),
                                 (0, "study", {"weights": "study"}),
                                 (1, "refit", {"variant": "a=1 data.refit=true"}), (2, "done", {"val_loss_last": 0.5})):
        results.append({**base, "seed": seed, "mlflow_run_id": run_id, "weights": "trained", **fields})
    lines = backfill_val_loss(results, Client()).splitlines()
    left = "validated epochs of val/loss in the store (or not the run at all), left as it is"
    assert lines == ["kept: val_loss_last 0.0730 (bottle, seed 1, `a=1`)", f"gone: fewer than 5 {left}",
                     f"short: fewer than 5 {left}", f"empty: fewer than 5 {left}"]
    runs = {run["mlflow_run_id"]: run for run in ResultsFile(results.path).runs}
    assert runs["kept"]["val_loss_last"] == pytest.approx(0.073) and runs["kept"]["updates"][0]["fields"] == [
        "val_loss_last"]
    assert "val_loss_last" not in runs["gone"] and runs["done"]["val_loss_last"] == 0.5
    assert backfill_val_loss(results, Client()).splitlines() == lines[1:]  # idempotent
    results.append({**base, "seed": 2, "mlflow_run_id": "broken", "weights": "trained"})
    with pytest.raises(MlflowException, match="locked"):  # any other store error is not swallowed
        backfill_val_loss(results, Client())


def test_rule_7_reads_a_validation_only_seed_run_where_the_test_record_lacks_the_figure(tmp_path: Path) -> None:
    """``--seed-validation`` runs (the study at seeds 1 and 2, ``test=false``) stand in for a seed whose test record
    has no ``val_loss_last``; an unfinished one does not count, and a test record's figure comes first."""
    from benchmarks.map_regression import (STUDY_EPOCHS, seed_fidelity_figures, seed_study_entries,
                                           seed_validation_path)

    def study(variant, loss, seed=0, epochs=STUDY_EPOCHS):
        return [{"category": "bottle", "teacher_scheme": "patchcore", "requested_mac_ratio": 30, "seed": seed,
                 "variant": variant, "epoch": epoch, "val_loss": loss} for epoch in range(1, epochs + 1)]

    setting = "scheme.feature_weight=4.0"
    records = study(setting, 0.070)
    tested = [{"category": "bottle", "teacher_scheme": "patchcore", "variant": setting, "requested_mac_ratio": 30,
               "seed": seed, "weights": "trained"} for seed in (1, 2)]  # test records that predate the field
    seed_studies = study(setting, 0.066, seed=1) + study(setting, 0.068, seed=2, epochs=STUDY_EPOCHS - 1)
    assert seed_fidelity_figures(records, tested, "patchcore", seed_studies) == {}  # seed 2's run unfinished
    seed_studies += study(setting, 0.064, seed=2)[-1:]
    assert seed_fidelity_figures(records, tested, "patchcore", seed_studies) == {setting: [0.070, 0.066, pytest.approx(0.0672)]}  # (4 x 0.068 + 0.064) / 5
    tested[0]["val_loss_last"] = 0.05
    assert seed_fidelity_figures(records, tested, "patchcore", seed_studies)[setting][1] == 0.05
    assert [entry.name for entry in seed_study_entries("patchcore", setting)] == [
        f"bottle/patchcore/m30/s{seed}/{setting}" for seed in (1, 2)]
    assert seed_validation_path(tmp_path / "map_regression.json").name == "map_regression_seed_validation.json"


def test_a_stopped_map_study_continues_from_its_checkpoint_into_the_same_run_unless_the_teacher_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.map_regression.study: a second call after a stop passes the study folder's last.ckpt to kd-train,
    finds the first call's MLflow run by the tag it kept, and says ``resumed``; after the teacher is built again
    (or with another length) the study starts afresh."""
    import os
    from types import SimpleNamespace

    import kd_experiments.train
    from benchmarks import map_regression as mr

    monkeypatch.setattr(mr, "ROOT", tmp_path)
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"teacher")
    monkeypatch.setattr(mr, "build_teacher", lambda name, category, args: (teacher, {}))
    composed: list[list[str]] = []
    monkeypatch.setattr(mr, "compose", lambda overrides, output_dir: composed.append(list(overrides)))
    monkeypatch.setattr(kd_experiments.train, "train", lambda cfg: {})
    looked_up: list[str] = []

    class History:
        def get_metric_history(self, run_id: str, name: str) -> list:
            return [SimpleNamespace(step=0, value=0.0 if name == "epoch" else 0.5)]

    run = SimpleNamespace(info=SimpleNamespace(run_id="r"), data=SimpleNamespace(metrics={}, params={}))
    monkeypatch.setattr(mr, "mlflow_run", lambda tag, experiment: (looked_up.append(tag), (History(), run))[1])
    args = argparse.Namespace(data_root=tmp_path, threads=1, trainer="cpu")
    entry = mr.Entry("bottle", "patchcore", mr.SEED_RATIO, 1, "trainer.max_epochs=300 scheme.lr_schedule=cosine")

    _, figures = mr.study(entry, args)  # a first call: no checkpoint yet
    assert "resumed" not in figures and not any(o.startswith("ckpt_path=") for o in composed[0])
    last = mr.study_run_dir(entry) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"stopped at some epoch")
    _, figures = mr.study(entry, args)  # after a stop: continue, same run
    assert figures["resumed"] is True and f"ckpt_path={last}" in composed[1]
    assert looked_up[1] == looked_up[0] and f"+tags.benchmark_run={looked_up[0]}" in composed[1]
    os.utime(teacher, ns=(1, 1))  # the teacher built again: its maps changed, the stopped study is not continued
    _, figures = mr.study(entry, args)
    assert "resumed" not in figures and not any(o.startswith("ckpt_path=") for o in composed[2])
    assert looked_up[2] != looked_up[0]
