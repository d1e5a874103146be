"""The contract every scheme keeps, checked through its smoke experiment.

Each scheme has a small experiment config that runs in seconds (``quickstart`` for score
regression, ``<scheme>_smoke`` for the others). Fitting and testing it through
``kd_experiments.train`` must leave, in a temporary MLflow store, a FINISHED run with the
compression summary among its params, the test metrics, and the config and
plots as artifacts (:func:`check_contract`). A scheme added with its ``*_smoke.yaml`` is
checked automatically, here, or in tests/test_deploy.py on the run that module trains anyway
when its ``SMOKE_RUNS`` lists it; one without a smoke experiment fails
:func:`test_every_scheme_has_a_smoke_experiment`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kd_experiments.config import CONFIG_DIR
from kd_experiments.tracking import REQUIRED_PARAMS
from kd_experiments.train import train
from tests.conftest import fast_overrides

EXPERIMENTS = CONFIG_DIR / "experiment"
#: the smoke experiments of the schemes, plus any other ``*_smoke.yaml`` found
SMOKE = sorted(
    {"quickstart", "rd_smoke", "pkd_smoke", "patchcore_smoke"} | {p.stem for p in EXPERIMENTS.glob("*_smoke.yaml")}
)
#: smoke experiments that distil a trained run: the smoke experiment whose checkpoint is
#: their ``scheme.teacher.checkpoint``
TEACHERS = {"map_regression_smoke": "patchcore_smoke"}
#: the shortest run that still trains every part (score regression and P-KDGAN split
#: their epochs between teacher and student); other smoke experiments keep their own
EPOCHS = {"quickstart": 2, "pkd_smoke": 2, "rd_smoke": 1}


def _smoke(name: str):
    absent = [n for n in (name, TEACHERS.get(name)) if n and not (EXPERIMENTS / f"{n}.yaml").is_file()]
    return pytest.param(name, marks=pytest.mark.skipif(bool(absent), reason=f"no {absent} config yet"))


def _smoke_cfg(compose_cfg, experiment: str, *overrides: str):
    """The smoke run, short; deploy/* timing and the MLflow Model are left to test_deploy*.py
    (the test step already scores through each scheme's deployable model)."""
    epochs = EPOCHS.get(experiment) or compose_cfg(f"experiment={experiment}").trainer.max_epochs
    return compose_cfg(
        f"experiment={experiment}",
        *fast_overrides(f"trainer.max_epochs={epochs}", "deploy.measure=false", "deploy.log_model=false", *overrides),
    )


def _deploy_covered() -> set[str]:
    from tests.test_deploy import SMOKE_RUNS

    return set(SMOKE_RUNS)


#: smoke experiments whose run tests/test_deploy.py already trains (with the MLflow Model): the
#: contract is checked on those runs there (test_smoke_run_keeps_the_scheme_contract)
DEPLOY_COVERED = _deploy_covered()


@pytest.mark.parametrize("experiment", [_smoke(name) for name in SMOKE if name not in DEPLOY_COVERED])
def test_smoke_experiment_logs_the_contract(compose_cfg, mlflow_uri: str, tmp_path: Path, experiment: str) -> None:
    teacher = []
    if experiment in TEACHERS:  # train the teacher run first, keep its checkpoint apart
        train(_smoke_cfg(compose_cfg, TEACHERS[experiment]))
        checkpoint = tmp_path / "teacher.ckpt"
        shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", checkpoint)
        shutil.rmtree(tmp_path / "run")
        teacher = [f"scheme.teacher.checkpoint={checkpoint}"]
    cfg = _smoke_cfg(compose_cfg, experiment, *teacher)
    missing = sorted(OmegaConf.missing_keys(cfg.scheme))
    assert not missing, f"{experiment}: scheme values {missing} must be set (a teacher run? see TEACHERS)"
    metrics = train(cfg)

    client = MlflowClient(tracking_uri=mlflow_uri)
    found = client.get_experiment_by_name(str(cfg.experiment_name))
    assert found is not None, f"no MLflow experiment {cfg.experiment_name}"
    (run,) = client.search_runs([found.experiment_id])
    check_contract(client, cfg, run, metrics)


def check_contract(client: MlflowClient, cfg, run, metrics: dict) -> None:
    """What a scheme's finished run must have logged (``metrics``: what ``train`` returned)."""
    experiment = cfg.experiment_name
    assert run.info.status == "FINISHED"
    params, logged = run.data.params, run.data.metrics

    # the compression summary: sizes of teacher and student and their ratios
    for key in REQUIRED_PARAMS:
        assert key in params, f"{experiment}: param {key} missing"
    assert params["scheme"] == run.data.tags["scheme"]
    for key in ("teacher_params", "student_params"):
        assert int(float(params[key])) >= 0, (key, params[key])
    ratio = float(params["compression_ratio"])
    assert ratio > 0 and not math.isnan(ratio), params["compression_ratio"]
    assert any(key.startswith("scheme.") for key in params), "the flattened config is not logged"

    # metrics: test scores of the deployed model, in range, and the run's duration
    assert 0.0 <= logged["test/image_auroc"] <= 1.0
    assert logged["test/image_auroc"] == pytest.approx(metrics["test/image_auroc"])
    if "mvtec" in str(cfg.data._target_).lower():  # sets with masks: pixel-level metrics too
        assert 0.0 <= logged["test/pixel_auroc"] <= 1.0
    assert "duration_s" in logged
    assert all(math.isfinite(value) for key, value in logged.items() if key.startswith("test/image")), logged

    # artifacts: the resolved config and the base class's plots
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots"} <= artifacts, artifacts
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc_curve.png", "plots/score_histograms.png"} <= plots, plots


def test_every_scheme_has_a_smoke_experiment(compose_cfg) -> None:
    """Every scheme class of ``configs/scheme`` is run by one of the smoke experiments."""
    schemes = {  # a config without _target_ extends another scheme config (its defaults)
        str(target): path.stem
        for path in sorted((CONFIG_DIR / "scheme").glob("*.yaml"))
        if (target := OmegaConf.load(path).get("_target_")) is not None
    }
    assert len(schemes) >= 3, schemes
    covered = {
        str(compose_cfg(f"experiment={name}").scheme._target_)
        for name in SMOKE
        if (EXPERIMENTS / f"{name}.yaml").is_file()
    }
    missing = {target: config for target, config in schemes.items() if target not in covered}
    assert not missing, f"schemes without a smoke experiment (add configs/experiment/<name>_smoke.yaml): {missing}"
