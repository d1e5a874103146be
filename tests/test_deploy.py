"""The student a run ships: an MLflow Model at ``student/`` that scores like the run's test step,
holds no teacher, carries a validation threshold, and serves a folder of images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_experiments import config as kd_config
from kd_experiments import deploy, export
from kd_experiments.errors import ConfigError
from kd_experiments.search import compose_config
from kd_experiments.train import train
from tests.conftest import fast_overrides, sqlite_store

QUICK = ("deploy.measure=false",)
#: the smoke run of each scheme (tests/test_scheme_contract.py checks the scheme contract on these
#: runs); score regression and P-KDGAN split their epochs between teacher and student: 2 train both
SMOKE_RUNS = {
    "quickstart": ["experiment=quickstart", "trainer.max_epochs=2"],
    "pkd_smoke": ["experiment=pkd_smoke", "trainer.max_epochs=2"],
    "rd_smoke": ["experiment=rd_smoke", "data.n_train=16", "data.n_test_good=4", "data.n_test_defect_per_type=2"],
    "patchcore_smoke": ["experiment=patchcore_smoke", "data.n_train=16", "data.n_test_good=4",
                        "data.n_test_defect_per_type=2"],
}


# -- threshold ---------------------------------------------------------------------------------
def test_threshold_is_f1_optimal_with_validation_anomalies() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    threshold = deploy.choose_threshold(scores, labels)
    assert threshold.rule == deploy.RULE_F1
    # brute force over every observed score: the best F1 of score >= t, lowest t on ties
    best = max(
        ((2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + labels.sum())), -t) for t in scores
    )
    assert threshold.value == pytest.approx(-best[1])
    assert threshold.f1 == pytest.approx(best[0])
    assert threshold.value == pytest.approx(0.35)  # 3 of 4 called anomalous are, F1 = 6 / 7


def test_threshold_without_anomalies_is_the_99th_percentile_of_normal_scores() -> None:
    scores = np.arange(1000, dtype=float)
    threshold = deploy.choose_threshold(scores, np.zeros(1000, dtype=int))
    assert threshold.rule == deploy.RULE_PERCENTILE
    assert threshold.value == pytest.approx(np.percentile(scores, 99))
    with pytest.raises(ConfigError, match="NaN"):
        deploy.choose_threshold([0.1, float("nan")], [0, 0])


# -- a run's Model -------------------------------------------------------------------------------
def _test_inputs(cfg, tmp_path: Path) -> tuple[list[str], pd.DataFrame]:
    """The run's test images as the user would hand them over: the files of a file-based set,
    ``.npy`` arrays of the raw (unnormalised) images of an in-memory set."""
    datamodule = kd_config.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    images, labels, paths = deploy.split_arrays(datamodule, "test")
    if all(paths):
        return list(paths), pd.DataFrame({"label": labels})
    folder = tmp_path / "test_images"
    folder.mkdir()
    files = []
    for index, image in enumerate(images):
        files.append(str(folder / f"{index:05d}.npy"))
        np.save(files[-1], image.numpy())
    return files, pd.DataFrame({"label": labels})


def _predict_in_fresh_process(requests: dict[str, tuple[str, list[str]]], folder: Path,
                              mlflow_uri: str) -> dict[str, pd.DataFrame]:
    """``mlflow.pyfunc.load_model(uri).predict(...)`` for each ``name -> (model URI, image paths)``,
    all in one new interpreter (no training code imported)."""
    request = folder / "request.json"
    request.write_text(json.dumps({name: [uri, paths, str(folder / f"{name}.csv")]
                                   for name, (uri, paths) in requests.items()}))
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({mlflow_uri!r})\n"
        f"for uri, paths, answer in json.load(open({str(request)!r})).values():\n"
        "    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({'path': paths}))\n"
        "    out.to_csv(answer, index=False, float_format='%.9g')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: pd.read_csv(folder / f"{name}.csv", keep_default_na=False) for name in requests}


@pytest.fixture(scope="module")
def smoke_students(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, SimpleNamespace]]:
    """The smoke run of every scheme in one store, and what each run's logged student answers on
    the run's test images, loaded in a fresh interpreter (one for all)."""
    folder = tmp_path_factory.mktemp("deploy")
    uri = sqlite_store(folder / "mlruns" / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    students = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for name in sorted(SMOKE_RUNS):
            cfg = compose_config([*SMOKE_RUNS[name], *fast_overrides(*QUICK), f"paths.log_dir={folder / 'logs'}",
                                  f"paths.cache_dir={folder / 'cache'}"], output_dir=folder / name)
            metrics = train(cfg)
            experiment = client.get_experiment_by_name(str(cfg.experiment_name))
            run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                     max_results=1)[0]
            assert run.info.status == "FINISHED"
            (folder / name).mkdir(exist_ok=True)
            paths, expected = _test_inputs(cfg, folder / name)
            students[name] = SimpleNamespace(cfg=cfg, run=run, paths=paths, expected=expected, metrics=metrics)
    answers = _predict_in_fresh_process(
        {name: (f"runs:/{student.run.info.run_id}/student", student.paths) for name, student in students.items()},
        folder, uri)
    for name, answer in answers.items():
        students[name].answer = answer
    return uri, students


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_logged_student_scores_like_the_run_in_a_fresh_process_and_holds_no_teacher(
    smoke_students, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    mlflow_uri, students = smoke_students
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run, paths, expected, answer = (students[name].run, students[name].paths, students[name].expected,
                                    students[name].answer)
    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = run.info.run_id
    logged = pd.read_csv(client.download_artifacts(run_id, deploy.TEST_SCORES_ARTIFACT, str(tmp_path)))
    assert len(paths) == len(logged) and (expected["label"].to_numpy() == logged["label"].to_numpy()).all()

    assert (answer["error"] == "").all(), answer["error"].tolist()
    np.testing.assert_allclose(answer["score"].to_numpy(), logged["score"].to_numpy(), atol=1e-5, rtol=0)

    # the threshold: chosen on validation data, its rule in the metadata, the labels it gives
    info = _model_metadata(client, run_id, tmp_path)
    assert info["threshold_rule"] in (deploy.RULE_F1, deploy.RULE_PERCENTILE)
    assert float(run.data.metrics["deploy/threshold"]) == pytest.approx(info["threshold"])
    assert (answer["is_anomaly"].astype(str) == (answer["score"] >= info["threshold"]).astype(str)).all()
    assert float(run.data.params["student_params"]) == info["size.student_params"]

    # no teacher inside: the parameters are the student's (plus the frozen encoder of RD and PatchCore)
    folder = Path(client.download_artifacts(run_id, "student", str(tmp_path / "model")))
    module = torch.load(next(folder.rglob(deploy.MODULE_FILE)), weights_only=False)
    params = sum(p.numel() for p in module.parameters())
    assert params == info["deployed_params"] == int(float(run.data.params["deployed_params"]))
    student_params = int(float(run.data.params["student_params"]))
    if name == "rd_smoke":
        encoder_params = sum(p.numel() for p in module.encoder.parameters())
        assert params == student_params + encoder_params
    elif name != "patchcore_smoke":  # PatchCore's student is its encoder with a smaller memory bank
        assert params == student_params < int(float(run.data.params["teacher_params"]))

    # kd-export on the same run: ONNX for every scheme, int8 for the score-regression and RD students
    onnx = export.export_run(run_id, "onnx", output_dir=tmp_path / "export")
    assert onnx.metrics["deploy/onnx_max_abs_diff"] <= 1e-4
    if name in ("quickstart", "rd_smoke"):
        int8 = export.export_run(run_id, "int8", output_dir=tmp_path / "export")
        assert np.isfinite(int8.metrics["deploy/int8_auroc_drop"])
    logged = client.get_run(run_id).data.metrics
    assert logged["deploy/onnx_max_abs_diff"] == pytest.approx(onnx.metrics["deploy/onnx_max_abs_diff"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_smoke_run_keeps_the_scheme_contract(smoke_students, name: str) -> None:
    """The scheme contract (tests/test_scheme_contract.py) on this module's smoke runs."""
    from tests.test_scheme_contract import check_contract

    mlflow_uri, students = smoke_students
    student = students[name]
    check_contract(MlflowClient(tracking_uri=mlflow_uri), student.cfg, student.run, student.metrics)


def _model_metadata(client: MlflowClient, run_id: str, tmp_path: Path) -> dict:
    import yaml

    local = Path(client.download_artifacts(run_id, "student/MLmodel", str(tmp_path / "mlmodel")))
    model = yaml.safe_load(local.read_text())
    assert model["signature"]["inputs"] and model["signature"]["outputs"]
    assert "saved_input_example_info" in model
    return model["metadata"]
