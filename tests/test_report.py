"""kd-report on a store of known runs: tables, Pareto fronts, charts, artifacts on the sweep's parent."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from kd_experiments import report
from kd_experiments.config import SWEEP_DIR
from kd_experiments.data.synthetic import generate_mvtec_like
from kd_experiments.tracking import PARENT_TAG
from tests.conftest import kd_train_cli, sqlite_store


TEACHER_PARAMS = 20_000


def _log_sweep(client: MlflowClient, experiment_id: str, sweep_id: str, rows: list[dict]) -> str:
    """A sweep as kd-train leaves it: a parent tagged kd.sweep_parent and one child per row."""
    parent = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}",
                               tags={PARENT_TAG: "true", "sweep_id": sweep_id})
    for row in rows:
        ratio, seed = row["ratio"], row["seed"]
        measured = ratio * 1.05
        child = client.create_run(
            experiment_id,
            run_name=f"score_regression-digits-c0-cr{ratio}-s{seed}-{sweep_id[-4:]}",
            tags={"sweep_id": sweep_id, "seed": str(seed), "dataset": "digits-c0",
                  "mlflow.parentRunId": parent.info.run_id},
        )
        params = {
            "scheme": "score_regression",
            "scheme.compression_ratio": str(ratio),
            "compression_ratio": str(measured),
            "mac_compression_ratio": str(measured * 2),
            "teacher_params": str(TEACHER_PARAMS),
            "student_params": str(round(TEACHER_PARAMS / measured)),
            "student_macs": "1000",
        }
        metrics = {"test/image_auroc": row["auroc"], "test/teacher_image_auroc": 0.95,
                   "duration_s": row.get("duration", 10.0)}
        if "latency" in row:
            metrics["test/latency_ms"] = row["latency"]
        now = int(time.time() * 1000)
        client.log_batch(
            child.info.run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag("scheme", "score_regression")],
        )
        client.set_terminated(child.info.run_id, status=row.get("status", "FINISHED"))
    return parent.info.run_id


@pytest.fixture(scope="module")
def module_store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating MLflow's tables takes seconds)."""
    uri = sqlite_store(tmp_path_factory.mktemp('store') / 'mlflow.db')
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


@pytest.fixture
def store(module_store_uri: str, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, str]:
    """The module's store, with a fresh experiment named ``sweeps`` (older ones renamed away)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store_uri)
    client = MlflowClient(tracking_uri=module_store_uri)
    old = client.get_experiment_by_name("sweeps")
    if old is not None:
        client.rename_experiment(old.experiment_id, f"sweeps-{uuid.uuid4().hex[:8]}")
    return client, client.create_experiment("sweeps")


# Quality by ratio (mean over seeds): x2 0.90, x8 0.95, x32 0.70, x128 0.72.
# Front (higher ratio and higher quality both better): x8 and x128.
MAIN_SWEEP = [
    {"ratio": 2, "seed": 0, "auroc": 0.88, "latency": 4.0},
    {"ratio": 2, "seed": 1, "auroc": 0.92, "latency": 4.2},
    {"ratio": 8, "seed": 0, "auroc": 0.94, "latency": 2.0},
    {"ratio": 8, "seed": 1, "auroc": 0.96, "latency": 2.2},
    {"ratio": 32, "seed": 0, "auroc": 0.70, "latency": 1.0},
    {"ratio": 32, "seed": 1, "auroc": 0.70, "latency": 1.1},
    {"ratio": 128, "seed": 0, "auroc": 0.70, "latency": 1.5},
    {"ratio": 128, "seed": 1, "auroc": 0.74, "latency": 1.5},
    {"ratio": 128, "seed": 2, "auroc": 0.10, "latency": 1.5, "status": "FAILED"},
]


def test_pareto_front() -> None:
    points = [(2, 0.9), (8, 0.95), (32, 0.7), (128, 0.72), (16, 0.6), (math.nan, 1.0), (8, 0.95)]
    # equal points do not dominate each other: both copies of (8, 0.95) stay
    assert report.pareto_front(points) == [1, 6, 3]
    # latency: smaller is better
    assert report.pareto_front([(4.0, 0.9), (2.0, 0.95), (1.0, 0.7), (1.5, 0.72)], maximize_x=False) == [2, 3, 1]
    assert report.pareto_front([]) == []


def test_report_of_a_sweep_writes_table_charts_and_logs_them_to_the_parent(
    store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, experiment_id = store
    _log_sweep(client, experiment_id, "older-sweep", [{"ratio": 4, "seed": 0, "auroc": 0.5}])
    parent_id = _log_sweep(client, experiment_id, "newer-sweep", MAIN_SWEEP)
    output = tmp_path / "out"

    assert report.main(["--experiment", "sweeps", "--sweep", "latest", "--output", str(output)]) == 0

    printed = capsys.readouterr().out
    assert "MLflow experiment 'sweeps': 9 runs" in printed and "By compression ratio" in printed
    for name in report.REPORT_FILES:
        assert (output / name).stat().st_size > 0, name
    for name in report.REPORT_FILES[1:]:
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.width > 300
    markdown = (output / "report.md").read_text()
    assert "sweep `newer-sweep`" in markdown and "older-sweep" not in markdown
    assert "runs: 9 (1 FAILED, 8 FINISHED)" in markdown
    assert "test/latency_ms (student inference latency, ms)" in markdown
    rows = {line.split("|")[3].strip(): line for line in markdown.splitlines() if line.startswith("| score_regression |")}
    assert set(rows) == {"2", "8", "32", "128"}
    # the FAILED seed of x128 is left out of the summary; Pareto (ratio) is the 10th column
    assert "0.7200 ± 0.0283" in rows["128"]
    assert [ratio for ratio, line in rows.items() if line.split("|")[10].strip() == "yes"] == ["8", "128"]
    assert markdown.count("FAILED") == 2  # the count and the run's row

    artifacts = {a.path for a in client.list_artifacts(parent_id, report.REPORT_ARTIFACT_DIR)}
    assert artifacts == {f"{report.REPORT_ARTIFACT_DIR}/{name}" for name in report.REPORT_FILES}
    # every child has ended, one FAILED: the parent is closed FAILED
    assert client.get_run(parent_id).info.status == "FAILED"


def test_summary_marks_both_fronts(store, tmp_path: Path) -> None:
    client, experiment_id = store
    _log_sweep(client, experiment_id, "s1", MAIN_SWEEP)
    result = report.make_report(experiment="sweeps", sweep_id="s1", output_dir=tmp_path, log_to_parent=False)
    by_ratio = {s.target_compression_ratio: s for s in result.summaries}
    assert result.quality == "test/image_auroc" and result.latency.metric == "test/latency_ms"
    assert [r for r, s in by_ratio.items() if s.on_compression_front] == [8, 128]
    # latency means: x2 4.1, x8 2.1, x32 1.05, x128 1.5 -> x8, x128 and x32 (fastest) are not dominated
    assert sorted(r for r, s in by_ratio.items() if s.on_latency_front) == [8, 32, 128]
    assert by_ratio[128].seeds == ["0", "1"]
    assert not result.logged_to_parent


def test_without_a_latency_metric_the_chart_says_it_shows_run_duration(store, tmp_path: Path) -> None:
    client, experiment_id = store
    rows = [{k: v for k, v in row.items() if k != "latency"} for row in MAIN_SWEEP[:4]]
    _log_sweep(client, experiment_id, "s2", rows)
    result = report.make_report(experiment="sweeps", sweep_id="s2", output_dir=tmp_path)
    assert result.latency.metric == "duration_s" and not result.latency.is_inference_latency
    assert "run wall-clock time" in (tmp_path / "report.md").read_text()
    assert result.logged_to_parent


def test_runs_of_several_sweeps_have_no_single_parent(store, tmp_path: Path) -> None:
    client, experiment_id = store
    first = _log_sweep(client, experiment_id, "a", MAIN_SWEEP[:2])
    _log_sweep(client, experiment_id, "b", MAIN_SWEEP[2:4])
    result = report.make_report(experiment="sweeps", output_dir=tmp_path)
    assert len(result.records) == 4 and result.parent_run_id is None and not result.logged_to_parent
    assert (tmp_path / "quality_vs_compression.png").exists()
    assert client.list_artifacts(first) == []


def test_unknown_experiment_and_empty_sweep_fail_in_one_line(
    store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert report.main(["--experiment", "nope", "--output", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("kd-report: error: no MLflow experiment named 'nope'") and "\n" not in error
    assert report.main(["--experiment", "sweeps", "--sweep", "latest", "--output", str(tmp_path)]) == 1
    assert "has no sweep" in capsys.readouterr().err


def test_default_output_folder_is_under_kd_log_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KD_LOG_DIR", str(tmp_path))
    assert report.default_output_dir("quick start", "s/1") == tmp_path / "reports" / "quick_start" / "s_1"
    assert report.default_output_dir("q", None) == tmp_path / "reports" / "q" / "all-runs"


# -- per-category tables ------------------------------------------------------------------------
def _log_category_sweep(client: MlflowClient, experiment_id: str, sweep_id: str, rows: list[dict]) -> str:
    """A sweep over ``data.category`` as kd-train tags it: category, image_size, dataset mvtec-<category>."""
    parent = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}",
                               tags={PARENT_TAG: "true", "sweep_id": sweep_id})
    now = int(time.time() * 1000)
    for row in rows:
        child = client.create_run(
            experiment_id,
            run_name=f"rd-{row['category']}-{row['size']}-cr{row['ratio']}-s{row['seed']}",
            tags={"sweep_id": sweep_id, "seed": str(row["seed"]), "dataset": f"mvtec-{row['category']}",
                  "category": row["category"], "image_size": str(row["size"]),
                  "mlflow.parentRunId": parent.info.run_id},
        )
        params = {"scheme": "reverse_distillation", "scheme.compression_ratio": str(row["ratio"]),
                  "compression_ratio": str(row["ratio"]), "teacher_params": "1000",
                  "student_params": str(4000 // row["ratio"])}
        metrics = {"test/image_auroc": row["image"], "test/pixel_auroc": row["pixel"], "duration_s": 5.0}
        client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        client.set_terminated(child.info.run_id, status=row.get("status", "FINISHED"))
    return parent.info.run_id


def _category_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under ``### <title>``, keyed by their first cell."""
    lines = markdown.splitlines()
    start = lines.index(f"### {title}")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_groups_runs_by_category_and_keeps_image_sizes_apart(store, tmp_path: Path) -> None:
    client, experiment_id = store
    rows = [
        # 256 px, ratio 1: bottle 0.99/0.97 (seeds 0, 1 -> mean 0.98), screw 0.90, transistor 0.80
        {"category": "bottle", "size": 256, "ratio": 1, "seed": 0, "image": 0.99, "pixel": 0.98},
        {"category": "bottle", "size": 256, "ratio": 1, "seed": 1, "image": 0.97, "pixel": 0.96},
        {"category": "screw", "size": 256, "ratio": 1, "seed": 0, "image": 0.90, "pixel": 0.95},
        {"category": "transistor", "size": 256, "ratio": 1, "seed": 0, "image": 0.80, "pixel": 0.91},
        {"category": "transistor", "size": 256, "ratio": 1, "seed": 1, "image": 0.10, "pixel": 0.10,
         "status": "FAILED"},
        # 256 px, ratio 16: two categories
        {"category": "bottle", "size": 256, "ratio": 16, "seed": 0, "image": 0.95, "pixel": 0.94},
        {"category": "screw", "size": 256, "ratio": 16, "seed": 0, "image": 0.85, "pixel": 0.92},
        # the fast setting at 128 px: never averaged with the 256 px rows
        {"category": "bottle", "size": 128, "ratio": 1, "seed": 0, "image": 0.50, "pixel": 0.50},
    ]
    parent_id = _log_category_sweep(client, experiment_id, "categories", rows)
    output = tmp_path / "out"
    built = report.make_report(experiment="sweeps", sweep_id="latest", output_dir=output)

    assert [(c.image_size, c.target_compression_ratio, c.categories) for c in built.categories] == [
        ("128", 1.0, ["bottle"]),
        ("256", 1.0, ["bottle", "screw", "transistor"]),
        ("256", 16.0, ["bottle", "screw"]),
    ]
    markdown = (output / "report.md").read_text()
    full = _category_rows(markdown, "reverse_distillation / mvtec @256px / ratio 1")
    assert full["bottle"] == ["2", "0.9800 ± 0.0141", "0.9700 ± 0.0141"]
    assert full["transistor"] == ["1", "0.8000 ± 0.0000", "0.9100 ± 0.0000"]  # the FAILED seed left out
    # the mean over categories of the per-category means: (0.98 + 0.90 + 0.80) / 3, (0.97 + 0.95 + 0.91) / 3
    assert full[f"**{report.MEAN_ROW}**"] == ["3", "0.8933", "0.9433"]
    small = _category_rows(markdown, "reverse_distillation / mvtec @256px / ratio 16")
    assert small[f"**{report.MEAN_ROW}**"] == ["2", "0.9000", "0.9300"]
    fast = _category_rows(markdown, "reverse_distillation / mvtec @128px / ratio 1")
    assert set(fast) == {"bottle", f"**{report.MEAN_ROW}**"} and fast["bottle"][1] == "0.5000 ± 0.0000"
    # the summary by ratio keeps the image sizes apart too
    assert {(s.dataset, s.image_size) for s in built.summaries if s.dataset == "mvtec-bottle"} == {
        ("mvtec-bottle", "128"), ("mvtec-bottle", "256")}
    assert "| reverse_distillation | mvtec-bottle @128px | 1 |" in markdown

    with Image.open(output / report.CATEGORY_CHART) as image:
        assert image.format == "PNG" and image.width > 600  # one panel per image size
    logged = {a.path for a in client.list_artifacts(parent_id, report.REPORT_ARTIFACT_DIR)}
    assert f"{report.REPORT_ARTIFACT_DIR}/{report.CATEGORY_CHART}" in logged


def test_runs_without_a_category_get_no_category_section(store, tmp_path: Path) -> None:
    client, experiment_id = store
    _log_sweep(client, experiment_id, "plain", MAIN_SWEEP[:2])
    built = report.make_report(experiment="sweeps", sweep_id="latest", output_dir=tmp_path)
    assert built.categories == []
    assert "## By category" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / report.CATEGORY_CHART).exists()


@pytest.mark.slow
def test_category_sweep_on_generated_mvtec_data_reports_each_category_and_the_mean(tmp_path: Path) -> None:
    """sweeps/mvtec_categories.yaml over three generated MVTec-style categories (tiny RD runs),
    then kd-report: a row per category, their mean, the category chart on the sweep's parent."""
    categories = ("alpha", "beta", "gamma")
    for category in categories:
        generate_mvtec_like(tmp_path / "data", category=category, n_train=12, n_test_good=4,
                            n_test_defect_per_type=2, image_size=32)
    uri = sqlite_store(tmp_path / 'mlruns.db')
    # the kd-train command line in this process (Hydra's basic launcher runs the jobs in turn)
    code, stderr = kd_train_cli(
        ["--config-dir", str(SWEEP_DIR), "--config-name", "mvtec_categories", f"data.root={tmp_path / 'data'}",
         f"data.category={','.join(categories)}", "data.image_size=32", "data.batch_size=4",
         "trainer.max_epochs=1", "scheme.compression_ratio=16", "deploy.measure=false", "deploy.log_model=false",
         "callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        {"MLFLOW_TRACKING_URI": uri, "KD_LOG_DIR": str(tmp_path / "logs"), "KD_CACHE_DIR": str(tmp_path / "cache")},
        tmp_path)
    assert code == 0, stderr[-4000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rd_mvtec")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) != "true"]
    assert sorted(r.data.tags["category"] for r in children) == list(categories)
    assert {r.data.tags["protocol"] for r in children} == {"fast-32"}
    assert {r.data.params["scheme.blur_sigma"] for r in children} == {"0.5"}  # sigma 4 at 256 px, scaled

    built = report.make_report(tracking_uri=uri, experiment="rd_mvtec", sweep_id="latest",
                               output_dir=tmp_path / "report")
    assert len(built.categories) == 1 and built.categories[0].categories == list(categories)
    summary = built.categories[0]
    for metric in ("test/image_auroc", "test/pixel_auroc", "test/aupro"):
        per_category = [r.data.metrics[metric] for r in sorted(children, key=lambda r: r.data.tags["category"])]
        assert summary.mean_over_categories(metric) == pytest.approx(sum(per_category) / 3)
    rows = _category_rows((tmp_path / "report" / "report.md").read_text(),
                          "reverse_distillation / mvtec @32px / ratio 16")
    assert set(rows) == {*categories, f"**{report.MEAN_ROW}**"}
    logged = {a.path for a in client.list_artifacts(built.parent_run_id, report.REPORT_ARTIFACT_DIR)}
    assert f"{report.REPORT_ARTIFACT_DIR}/{report.CATEGORY_CHART}" in logged
