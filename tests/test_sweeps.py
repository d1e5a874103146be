"""Sweeps end to end: a parallel Hydra multirun into one SQLite store, its report, an Optuna search."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kd_experiments import report
from kd_experiments.config import CONFIG_DIR
from kd_experiments.errors import ConfigError
from kd_experiments.search import SearchSpec, compose_config, run_search
from kd_experiments.search import main as kd_search_main
from kd_experiments.tracking import REQUIRED_PARAMS
from tests.conftest import sqlite_store, sweep_runs

KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false",
         "trainer.enable_progress_bar=false"]
#: one run's summary line; found anywhere in the output, since parallel jobs share one stdout
SUMMARY = re.compile(r"\[kd-train\] \S+: compression_ratio=\S+ student_params=\d+ test/image_auroc=\S+")
RUN_METRICS = ("test/image_auroc", "test/teacher_image_auroc", "val/loss", "train/teacher_loss", "duration_s")
SEARCHES = sorted(p.stem for p in (CONFIG_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.slow
def test_parallel_sweep_loses_no_run_and_reports_into_its_parent(tmp_path: Path, monkeypatch) -> None:
    """2 ratios x 1 seed, 2 joblib jobs at once writing to one fresh SQLite store: 2 FINISHED children."""
    uri = sqlite_store(tmp_path / 'mlruns' / 'mlflow.db')
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "KD_LOG_DIR": str(tmp_path / "logs"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*KD_TRAIN, "-m", "experiment=quickstart", "trainer.max_epochs=1",
         "scheme.compression_ratio=8,128", "seed=0", "deploy.measure=false", "deploy.log_model=false",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *QUIET],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summaries = SUMMARY.findall(result.stdout)
    assert len(summaries) == 2, result.stdout[-3000:]

    client = MlflowClient(tracking_uri=uri)
    parents, children = sweep_runs(client, "quickstart")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]}
    assert [c.info.status for c in children] == ["FINISHED"] * 2
    grid = sorted((int(c.data.params["scheme.compression_ratio"]), int(c.data.tags["seed"])) for c in children)
    assert grid == [(8, 0), (128, 0)]
    for child in children:
        missing = [k for k in REQUIRED_PARAMS if k not in child.data.params]
        missing += [k for k in RUN_METRICS if k not in child.data.metrics]
        assert not missing, (child.info.run_name, missing)
        # one epoch, one validation point: nothing lost, nothing written twice
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 1
        assert "plots/roc_curve.png" in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert report.main(["--experiment", "quickstart", "--sweep", "latest", "--output", str(tmp_path / "report")]) == 0
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, report.REPORT_ARTIFACT_DIR)}
    assert logged == {f"{report.REPORT_ARTIFACT_DIR}/{name}" for name in report.REPORT_FILES}
    markdown = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "runs: 2 (2 FINISHED)" in markdown
    assert sum(line.startswith("| score_regression | digits-c6 |") for line in markdown.splitlines()) == 2
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_the_demo_sweep_is_the_rules_ratios_by_3_seeds_with_offline_outliers() -> None:
    """`make demo`'s grid: the ratios the selection rule keeps from the committed validation records,
    3 seeds per ratio (kd-report's mean ± std), joblib jobs, and an experiment that needs no data
    beyond the installed packages (digits, bundled photo crops as outliers)."""
    sweep = yaml.safe_load((CONFIG_DIR.parent / "sweeps" / "quickstart_compression.yaml").read_text())
    params = sweep["hydra"]["sweeper"]["params"]
    from benchmarks.harness import ResultsFile
    from benchmarks.quickstart_selection import RULE_VAL_ANOMALIES, chosen, demo_ratios, summarise

    records = ResultsFile(CONFIG_DIR.parent / "benchmarks" / "results" / "quickstart_selection.json").runs
    best = chosen(summarise(records, RULE_VAL_ANOMALIES))
    assert best is not None
    assert [float(r) for r in str(params["scheme.compression_ratio"]).split(",")] == demo_ratios(best)
    cfg = compose_config(["experiment=quickstart"])
    assert f"warp_copies={cfg.scheme.corruption_exposure.warp_copies}" in best["candidate"]
    assert f"student_restarts={cfg.scheme.student_restarts}" in best["candidate"]
    assert cfg.data.normal_class == best["normal_class"]
    assert str(params["seed"]).split(",") == ["0", "1", "2"] and "joblib" in str(sweep["defaults"])
    assert cfg.data.dataset == "digits" and cfg.data.root is None
    assert cfg.scheme.outlier_exposure.dataset == "photo_patches" and cfg.scheme.outlier_exposure.root is None


def test_demo_ratios_keep_the_smaller_of_two_students_that_tie_on_validation() -> None:
    from benchmarks.quickstart_selection import demo_ratios

    def row(cells: dict[float, tuple[float, float]]) -> dict:
        ratios = sorted(cells)
        return {"ratios": ratios, "rule_ratios": ratios,
                "means": [cells[r][0] for r in ratios], "stds": [cells[r][1] for r in ratios]}

    apart = {8: (0.999, 0.001), 32: (0.990, 0.002), 128: (0.970, 0.005), 640: (0.900, 0.010)}
    assert demo_ratios(row(apart)) == [8, 32, 128, 640]
    # 8 beats 32 by less than 32's spread: the 32x student is kept, the 8x one dropped
    assert demo_ratios(row({**apart, 8: (0.9915, 0.001)})) == [32, 128, 640]
    # a larger student scoring below a smaller one is dropped too, and the next is compared with
    # the last kept ratio (128 against 640, not against the dropped 256)
    assert demo_ratios(row({**apart, 256: (0.89, 0.001)})) == [8, 32, 128, 640]
    assert demo_ratios(row({**apart, 32: (0.973, 0.002), 8: (0.985, 0.002)})) == [8, 128, 640]
    # ratios outside the rule's are ignored
    extra = row(apart)
    extra["rule_ratios"] = [32, 128, 640]
    assert demo_ratios(extra) == [32, 128, 640]


# -- the Optuna search --------------------------------------------------------------------------
@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_space_composes_and_parses(search: str) -> None:
    cfg = compose_config([f"hparams_search={search}", "experiment=quickstart"])
    spec = SearchSpec.from_config(cfg)
    assert spec.params and not spec.metric.startswith("test/")
    assert cfg.scheme.compression_ratio is not None, "a search runs at a fixed compression ratio"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=test/image_auroc"], "validation metric"),
        (["+search.params.scheme.compression_ratio={type:int,low:2,high:8}"], "fixed compression_ratio"),
        (["+search.params.scheme.no_such_key={type:float,low:0,high:1}"], "no key scheme.no_such_key"),
        (["search.params.scheme.student_lr.low=1"], "low < high"),
        (["search.direction=down"], "minimize or maximize"),
    ],
    ids=["test-metric", "ratio-searched", "unknown-key", "empty-range", "direction"],
)
def test_bad_search_configs_are_refused(overrides: list[str], message: str) -> None:
    cfg = compose_config(["hparams_search=score_regression_optuna", "experiment=quickstart", *overrides])
    with pytest.raises(ConfigError, match=message):
        SearchSpec.from_config(cfg)


def test_kd_search_without_a_search_space_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert kd_search_main(["experiment=quickstart"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("kd-search: error:") and "hparams_search=" in error and "\n" not in error


@pytest.mark.slow
def test_search_trials_are_children_of_one_parent_that_holds_the_best(
    mlflow_uri: str, tmp_path: Path
) -> None:
    result = run_search([
        "hparams_search=score_regression_optuna", "experiment=quickstart", "search.n_trials=2",
        "trainer.max_epochs=1", "test=false", f"paths.log_dir={tmp_path / 'logs'}", *QUIET,
    ])
    client = MlflowClient(tracking_uri=mlflow_uri)
    parents, children = sweep_runs(client, "quickstart")
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kd.search"] == "optuna"
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {result.parent_run_id}
    assert sorted(c.data.tags["optuna_trial"] for c in children) == ["0", "1"]
    assert {c.data.params["scheme.compression_ratio"] for c in children} == {"8"}  # fixed by the search
    assert all(c.info.status == "FINISHED" and "test/image_auroc" not in c.data.metrics for c in children)
    sampled = {(c.data.params["scheme.student_lr"], c.data.params["scheme.teacher_lr"]) for c in children}
    assert len(sampled) == 2
    losses = {c.info.run_id: c.data.metrics["val/loss"] for c in children}
    best_run = min(losses, key=losses.get)
    assert result.best_run_id == best_run == parent.data.tags["best_run_id"]
    assert result.best_value == pytest.approx(losses[best_run], rel=1e-6)
    assert parent.data.metrics["best/val/loss"] == pytest.approx(losses[best_run], rel=1e-6)
    best_child = next(c for c in children if c.info.run_id == best_run)
    assert parent.data.params["best.scheme.student_lr"] == best_child.data.params["scheme.student_lr"]
    best = yaml.safe_load((result.search_dir / "best.yaml").read_text())
    assert best["command"].startswith("kd-train experiment=quickstart")
    assert "hparams_search" not in best["command"] and "search.n_trials" not in best["command"]
    assert "scheme.compression_ratio=8" in best["command"]  # fixed by the search group, which kd-train lacks
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "search")} == {
        "search/best.yaml", "search/space.yaml"}
