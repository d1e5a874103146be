"""kd-export (ONNX, int8, TorchScript, parity logged to the run), kd-predict (a folder of images from a
run, a registered champion or an exported file), ``mlflow models predict`` on a folder, and
``kd-report --register``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from kd_experiments import deploy, export, predict, report
from kd_experiments.errors import ConfigError, DataError
from kd_experiments.search import compose_config
from kd_experiments.train import train
from tests.conftest import fast_overrides, shared_data, sqlite_store


MLFLOW = str(Path(sys.executable).with_name("mlflow"))
QUICK = ["deploy.measure=false"]


def _train(store: Path, overrides: list[str]) -> str:
    """One run into the SQLite store under ``store``; returns its run id."""
    uri = sqlite_store(store / 'mlflow.db')
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = compose_config([*fast_overrides(*QUICK), *overrides, f"paths.log_dir={store / 'logs'}",
                              f"paths.cache_dir={store / 'cache'}"], output_dir=store / "run")
        train(cfg)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(str(cfg.experiment_name)).experiment_id])
    assert run.info.status == "FINISHED"
    return run.info.run_id


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One quickstart run with labelled validation anomalies (so val/image_auroc is logged); 12 epochs,
    so that the teacher (its first 30 % of the steps) and then the student have learnt (after 8, the
    teacher's validation AUROC is still 0.65 and the student's ranking inverted)."""
    store = tmp_path_factory.mktemp("store")
    run_id = _train(store, ["experiment=quickstart", "data.val_anomalies=other_classes", "trainer.max_epochs=12"])
    uri = f"sqlite:///{store / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield SimpleNamespace(run_id=run_id, uri=uri, store=store)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _digit_folder(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(folder / f"{index:02d}.png")
    return folder


# -- kd-export ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_writes_checked_files_and_logs_them_to_the_run(quickstart_run, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=quickstart_run.uri)
    onnx = export.export_run(quickstart_run.run_id, "onnx", output_dir=tmp_path)
    assert onnx.path.is_file() and 0 <= onnx.metrics["deploy/onnx_max_abs_diff"] <= 1e-4
    script = export.export_run(quickstart_run.run_id, "torchscript", output_dir=tmp_path)
    assert script.metrics["deploy/torchscript_max_abs_diff"] <= 1e-5
    int8 = export.export_run(quickstart_run.run_id, "int8", output_dir=tmp_path)
    assert np.isfinite(int8.metrics["deploy/int8_auroc_drop"]) and int8.tags["deploy.int8_method"] == "ptq"
    run = client.get_run(quickstart_run.run_id)
    for key in ("deploy/onnx_max_abs_diff", "deploy/int8_auroc_drop", "deploy/torchscript_max_abs_diff"):
        assert key in run.data.metrics
    logged = {f.path for f in client.list_artifacts(quickstart_run.run_id, export.EXPORT_DIR)}
    assert logged == {f"{export.EXPORT_DIR}/{name}" for name in export.FILES.values()}
    # the exported files score like the logged Model (the int8 one approximately)
    images = _digit_folder(tmp_path / "digits")
    reference = predict.load_predictor(f"runs:/{quickstart_run.run_id}/student")
    batch = np.stack([deploy.read_input(p, 1, (28, 28)).numpy() for p in sorted(images.iterdir())])
    expected, _ = reference.run(torch.from_numpy(batch))
    for path, tolerance in ((onnx.path, 1e-4), (script.path, 1e-5), (int8.path, 0.5)):
        got, _ = predict.load_predictor(str(path)).run(torch.from_numpy(batch))
        np.testing.assert_allclose(got, expected, atol=tolerance * max(1.0, float(np.abs(expected).max())))
    assert predict.load_predictor(str(onnx.path)).threshold == pytest.approx(reference.threshold)


def test_export_refuses_a_missing_run_and_an_unknown_format(mlflow_uri: str) -> None:
    from kd_experiments.errors import TrackingError

    with pytest.raises(ConfigError, match="--format"):
        export.export_run("0" * 32, "tflite")
    with pytest.raises(TrackingError, match="no MLflow run"):
        export.export_run("0" * 32, "onnx")
    assert export.main(["0" * 32, "--format", "onnx"]) == 1


# -- kd-predict --------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_scores_a_folder_and_lists_unreadable_images(quickstart_run, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    images = _digit_folder(tmp_path / "images")
    (images / "nested").mkdir()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(images / "nested" / "colour.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (images / "notes.txt").write_text("ignored: not an image file")
    out = tmp_path / "out"
    status = predict.main([f"runs:/{quickstart_run.run_id}/student", str(images), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    assert "1 unreadable image(s)" in captured.err and "broken.png" in captured.err
    table = pd.read_csv(out / "scores.csv")
    assert sorted(table["path"]) == sorted([f"{i:02d}.png" for i in range(6)] + ["nested/colour.jpg"])
    threshold = float(table["threshold"].iloc[0])
    assert (table["label"] == (table["score"] >= threshold).astype(int)).all()
    assert not (out / "overlays").exists()  # a score-only model draws no overlay
    # the same scores through the pyfunc Model (one DataFrame of paths)
    import mlflow

    model = mlflow.pyfunc.load_model(f"runs:/{quickstart_run.run_id}/student")
    answer = model.predict(pd.DataFrame({"path": [str(images)]}))
    by_path = dict(zip(answer["path"], answer["score"], strict=True))
    for row in table.itertuples():
        assert by_path[str(images / row.path)] == pytest.approx(row.score, abs=1e-6)
    assert answer.loc[answer["path"].str.endswith("broken.png"), "error"].str.contains("unreadable").all()


def test_predict_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert predict.main(["no_such_model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "neither a file nor a model URI" in capsys.readouterr().err
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ConfigError, match="not a readable ONNX file"):
        predict.load_predictor(str(tmp_path / "model.onnx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image file"):
        predict.predict_folder(SimpleNamespace(channels=1, size=(28, 28)), tmp_path / "empty", tmp_path / "o")


@pytest.mark.slow
def test_mlflow_models_predict_scores_a_folder(quickstart_run, tmp_path: Path) -> None:
    """``mlflow models predict --env-manager local`` with a CSV whose ``path`` column names a folder."""
    images = _digit_folder(tmp_path / "images", count=3)
    request = tmp_path / "request.csv"
    pd.DataFrame({"path": [str(images)]}).to_csv(request, index=False)
    answer = tmp_path / "answer.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": quickstart_run.uri}
    result = subprocess.run(
        [MLFLOW, "models", "predict", "-m", f"runs:/{quickstart_run.run_id}/student", "-i", str(request),
         "-t", "csv", "-o", str(answer), "--env-manager", "local"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    rows = json.loads(answer.read_text())["predictions"]
    assert sorted(Path(r["path"]).name for r in rows) == ["00.png", "01.png", "02.png"]
    assert all(np.isfinite(r["score"]) and r["error"] == "" for r in rows)


# -- kd-report --register ------------------------------------------------------------------------
def _record(run_id: str, params: float, ratio: float, quality: float, teacher: float | None) -> report.RunRecord:
    metrics = {"val/image_auroc": quality}
    if teacher is not None:
        metrics["val/teacher_image_auroc"] = teacher
    return report.RunRecord(run_id=run_id, run_name=run_id, status="FINISHED", scheme="s", dataset="d", seed="0",
                            sweep_id="x", compression_ratio=ratio, mac_compression_ratio=ratio, teacher_params=1000,
                            student_params=params, student_macs=1, duration_s=1, metrics=metrics)


def test_champion_is_the_smallest_student_within_the_fraction_of_its_teacher() -> None:
    records = [_record("big", 500, 2, 0.90, 0.91), _record("mid", 100, 10, 0.895, 0.91),
               _record("small", 20, 50, 0.80, 0.91)]
    champion = deploy.choose_champion(records, within=0.02)
    assert champion.run_id == "mid" and champion.reference == pytest.approx(0.91)
    assert deploy.choose_champion(records, within=0.15).run_id == "small"
    # no teacher metric (RD): the reference is the lowest-ratio student
    no_teacher = [_record("r1", 400, 1, 0.95, None), _record("r16", 25, 16, 0.94, None),
                  _record("r64", 6, 64, 0.85, None)]
    champion = deploy.choose_champion(no_teacher, within=0.02)
    assert champion.run_id == "r16" and "compression ratio 1" in champion.reference_source
    with pytest.raises(ConfigError, match="val/"):
        deploy.choose_champion(records, within=0.02, metric="test/image_auroc")
    with pytest.raises(ConfigError, match="no FINISHED run logged"):
        deploy.choose_champion(records, within=0.02, metric="val/aupro")


@pytest.mark.slow
def test_report_registers_the_champion_with_its_alias(quickstart_run, tmp_path: Path) -> None:
    status = report.main(["--experiment", "quickstart", "--output", str(tmp_path / "report"), "--no-log",
                          "--register", "digits-student", "--within", "0.5"])
    assert status == 0
    client = MlflowClient(tracking_uri=quickstart_run.uri, registry_uri=quickstart_run.uri)
    version = client.get_model_version_by_alias("digits-student", "champion")
    assert version.run_id == quickstart_run.run_id
    assert "validation data only" in version.tags["kd.selection_rule"]
    loaded = predict.load_predictor("models:/digits-student@champion")
    assert loaded.threshold == pytest.approx(client.get_run(quickstart_run.run_id).data.metrics["deploy/threshold"])


# -- the real check: an RD student on MVTec AD bottle ----------------------------------------------
@pytest.mark.slow
@pytest.mark.real_data
def test_predict_scores_and_overlays_every_broken_large_bottle(tmp_path: Path) -> None:
    bottle = shared_data("mvtec_ad/bottle/test/broken_large")
    run_id = _train(tmp_path / "store", ["experiment=rd_bottle", "data.image_size=64", "data.batch_size=16",
                                         "scheme.compression_ratio=16",
                                         "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
                                         "scheme.val_synthetic_anomalies=false"])
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = tmp_path / "out"
    assert predict.main([f"runs:/{run_id}/student", str(bottle), "--out", str(out), "--tracking-uri", uri]) == 0
    files = sorted(p.name for p in bottle.iterdir() if p.suffix == ".png")
    table = pd.read_csv(out / "scores.csv")
    assert sorted(table["path"]) == files and table["score"].notna().all()
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == files
    with Image.open(out / "overlays" / files[0]) as picture:
        assert picture.size == (64, 64) and picture.mode == "RGB"


# -- int8 without a run: whole-graph (score regression) and part-by-part (RD) --------------------
@pytest.mark.parametrize(("experiment", "int8_part"), [("quickstart", "graph"), ("rd_smoke", "student")])
def test_int8_quantises_the_student_and_keeps_the_rest_in_float(experiment: str, int8_part: str) -> None:
    from kd_experiments import config as kd_config

    cfg = compose_config([f"experiment={experiment}"])
    shape = (1, 28, 28) if experiment == "quickstart" else (3, 64, 64)
    scheme = kd_config.instantiate(cfg.scheme, input_shape=shape)
    module = scheme.deployable_model().eval()
    images = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
    for qat in (False, True):
        quantised = export.quantize(module, images, qat=qat, epochs=1)
        parts = export.int8_parts(module, quantised).split(",")
        assert int8_part in parts or (int8_part == "graph" and "preprocess" not in parts), parts
        assert "preprocess" not in parts and "encoder" not in parts
        expected, _ = deploy.split_outputs(module(images))
        got, _ = deploy.split_outputs(quantised(images))
        assert got.shape == expected.shape and torch.isfinite(got).all()
