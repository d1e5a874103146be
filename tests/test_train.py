"""The pipeline end to end: configs compose, runs train and test, MLflow holds the contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from kd_experiments.config import CONFIG_DIR, SWEEP_DIR
from kd_experiments.errors import ConfigError, DataError, KDError, TrainingDivergedError
from kd_experiments.search import compose_config
from kd_experiments.tracking import REQUIRED_PARAMS, resolve_tracking_uri
from kd_experiments.train import train
from tests.conftest import (
    NO_DEPLOY,
    ddp_and_single_runs,
    fast_overrides,
    kd_train_cli,
    shared_data,
    sqlite_store,
    train_in_process,
)

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]


def _only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} missing"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


# -- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.data._target_ and cfg.scheme._target_ and cfg.trainer._target_


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_file_composes(sweep: str) -> None:
    """As ``kd-train --config-dir sweeps --config-name <sweep>`` composes it: a multirun whose
    sweeper values all parse as Hydra sweep overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config([f"hydra.searchpath=[file://{CONFIG_DIR}]"], config_dir=SWEEP_DIR, config_name=sweep)
    assert cfg.data._target_ and cfg.scheme._target_ and cfg.trainer._target_
    sweeper = OmegaConf.load(SWEEP_DIR / f"{sweep}.yaml").hydra.sweeper.params
    assert sweeper, f"{sweep} sweeps nothing"
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in sweeper.items()])
    assert all(override.is_sweep_override() or override.value() is not None for override in parsed)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu"])
@pytest.mark.parametrize("logger", ["mlflow", "csv", "none"])
def test_every_trainer_and_logger_composes(compose_cfg, trainer: str, logger: str) -> None:
    cfg = compose_cfg(f"trainer={trainer}", f"logger={logger}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_unknown_experiment_and_key_are_refused(compose_cfg) -> None:
    with pytest.raises(MissingConfigException, match="no_such_experiment"):
        compose_cfg("experiment=no_such_experiment")
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_cfg("scheme.no_such_key=1")


# -- one tracked run -------------------------------------------------------------------------
def test_quickstart_run_logs_the_contract(compose_cfg, mlflow_uri: str) -> None:
    cfg = compose_cfg("experiment=quickstart", *fast_overrides("trainer.max_epochs=2", "+tags.purpose=test"))
    metrics = train(cfg)
    assert 0.0 <= metrics["test/image_auroc"] <= 1.0
    client, run = _only_run(mlflow_uri, "quickstart")
    assert run.info.status == "FINISHED"
    for key in REQUIRED_PARAMS:
        assert key in run.data.params, key
    assert run.data.params["scheme"] == "score_regression"
    ratio = float(run.data.params["compression_ratio"])
    assert ratio == pytest.approx(float(run.data.params["teacher_params"]) / float(run.data.params["student_params"]))
    assert 6 <= ratio <= 10  # the config asks for 8
    assert run.data.params["scheme.compression_ratio"] == "8"  # the flattened config
    for tag in ("git_commit", "scheme", "dataset", "torch_version", "cuda_version", "seed"):
        assert run.data.tags.get(tag), tag
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["dataset"] == "digits-c6"
    for metric in ("test/image_auroc", "test/teacher_image_auroc", "train/teacher_loss", "val/loss"):
        assert metric in run.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config" in artifacts and "plots" in artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc_curve.png", "plots/score_histograms.png"} <= plots
    config_text = Path(client.download_artifacts(run.info.run_id, "config/config.yaml")).read_text()
    assert "compression_ratio: 8" in config_text
    # every epoch's validation loss is a separate point of the metric's history
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2


def test_run_names_do_not_collide_across_seeds(compose_cfg, mlflow_uri: str) -> None:
    names = set()
    for seed in (0, 0, 1):
        cfg = compose_cfg("experiment=quickstart", *fast_overrides(f"seed={seed}", "test=false"))
        train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    names = {r.info.run_name for r in runs}
    assert len(names) == 3
    assert sum("-s1-" in name for name in names) == 1


@pytest.mark.parametrize(("scheme", "expected"), [
    ({"_target_": "kd_experiments.schemes.score_regression.ScoreRegressionScheme", "compression_ratio": 64}, "cr64"),
    ({"_target_": "kd_experiments.schemes.map_regression.MapRegressionScheme", "deployed_mac_ratio": 30}, "cr30"),
    ({"_target_": "kd_experiments.schemes.patchcore.PatchCoreScheme"}, "cr1"),
])
def test_run_names_carry_the_ratio_the_scheme_sweeps(scheme: dict, expected: str) -> None:
    from kd_experiments.train import _run_name

    cfg = OmegaConf.create({"scheme": scheme, "seed": 2, "run_name": None})
    name = _run_name(cfg, "mvtec-bottle")
    assert name.split("-")[:4] == [name.split("-")[0], "mvtec", "bottle", expected] and "-s2-" in name


def test_csv_logger_makes_no_mlflow_run(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=quickstart", "logger=csv", *fast_overrides())
    metrics = train(cfg)
    assert "test/image_auroc" in metrics
    assert MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name("quickstart") is None
    assert list((tmp_path / "run").rglob("metrics.csv"))


def test_deterministic_runs_give_identical_metrics(compose_cfg, mlflow_uri: str) -> None:
    results = []
    for _ in range(2):
        cfg = compose_cfg("experiment=quickstart", *fast_overrides("trainer.deterministic=true"))
        results.append(train(cfg)["test/image_auroc"])
    assert results[0] == results[1]


# -- every datamodule with the scheme ----------------------------------------------------------
def _write_folder_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for class_name in ("circle", "square", "noise"):
        folder = root / class_name
        folder.mkdir(parents=True)
        for i in range(12):
            image = (rng.random((28, 28)) * 60).astype(np.uint8)
            if class_name == "circle":
                yy, xx = np.mgrid[:28, :28]
                image[(yy - 14) ** 2 + (xx - 14) ** 2 < 64] = 255
            elif class_name == "square":
                image[8:20, 8:20] = 255
            Image.fromarray(image).save(folder / f"{i:03d}.png")


def test_fast_dev_run_digits(compose_cfg, mlflow_uri: str) -> None:
    cfg = compose_cfg("experiment=quickstart", *fast_overrides("+trainer.fast_dev_run=true"))
    assert "test/image_auroc" in train(cfg)


def test_fast_dev_run_folder(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    _write_folder_dataset(tmp_path / "shapes")
    cfg = compose_cfg("data=folder", f"data.root={tmp_path / 'shapes'}", "data.normal_class=circle",
                      *fast_overrides("+trainer.fast_dev_run=true"))
    assert "test/image_auroc" in train(cfg)


@pytest.mark.real_data
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_fast_dev_run_idx(compose_cfg, mlflow_uri: str, dataset: str) -> None:
    root = shared_data(dataset)
    cfg = compose_cfg(f"data={dataset}", f"data.root={root}", "data.normal_class=3", "data.protocol=balanced",
                      *fast_overrides("+trainer.fast_dev_run=true"))
    assert "test/image_auroc" in train(cfg)


def test_fast_dev_run_synthetic_mvtec(compose_cfg, mlflow_uri: str) -> None:
    cfg = compose_cfg("data=synthetic_mvtec", "data.image_size=28", "data.grayscale=true",
                      "data.normalization=none", "data.eval_batch_size=64",
                      *fast_overrides("+trainer.fast_dev_run=true"))
    assert "test/image_auroc" in train(cfg)


@pytest.mark.real_data
def test_fast_dev_run_mvtec_bottle(compose_cfg, mlflow_uri: str) -> None:
    root = shared_data("mvtec_ad")
    cfg = compose_cfg("data=mvtec_bottle", f"data.root={root}", "data.image_size=28", "data.grayscale=true",
                      "data.normalization=none", "data.eval_batch_size=100",
                      *fast_overrides("+trainer.fast_dev_run=true"))
    assert "test/image_auroc" in train(cfg)


# -- bad input: one clear error, a FAILED run, nothing lost -------------------------------------
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["data=mnist", "data.root=/nonexistent/mnist"], DataError, "/nonexistent/mnist"),
        (["data.normal_class=12"], ConfigError, "normal_class"),
        (["scheme.compression_ratio=0.5"], ConfigError, "compression_ratio"),
        (["scheme.compression_ratio=100000"], ConfigError, "cannot be reached"),
        (["scheme.teacher_lr=1e30", "scheme.co_learning=true"], TrainingDivergedError, "became"),
    ],
    ids=["missing-folder", "normal-class", "ratio-below-1", "ratio-unreachable", "nan-loss"],
)
def test_bad_input_fails_the_run_with_one_clear_error(
    compose_cfg, mlflow_uri: str, overrides: list[str], error: type[KDError], message: str
) -> None:
    cfg = compose_cfg("experiment=quickstart", *fast_overrides("trainer.max_epochs=3", *overrides))
    with pytest.raises(error, match=message) as raised:
        train(cfg)
    assert "\n" not in str(raised.value)
    client, run = _only_run(mlflow_uri, "quickstart")
    assert run.info.status == "FAILED"
    assert message in run.data.tags["error"]
    # what was logged before the failure is kept
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/config.yaml"]
    assert "scheme.compression_ratio" in run.data.params


class PoisonWeightsAtEpoch(L.Callback):
    """Test helper: turn the weights NaN at the start of a given epoch (a divergence)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


def test_nan_loss_keeps_the_last_good_checkpoint(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=quickstart", *fast_overrides(
        "trainer.max_epochs=4", "+callbacks.poison._target_=tests.test_train.PoisonWeightsAtEpoch",
        "+callbacks.poison.epoch=2"))
    with pytest.raises(TrainingDivergedError, match="epoch 2"):
        train(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1  # the last epoch that finished with finite weights
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    _, run = _only_run(mlflow_uri, "quickstart")
    assert run.info.status == "FAILED"
    assert len(MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run.info.run_id, "val/loss")) == 2


def test_cli_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / 'm.db'), "KD_LOG_DIR": str(tmp_path)}
    code, stderr = kd_train_cli(["experiment=quickstart", "data=mnist", "data.root=/nonexistent/mnist"], env, tmp_path)
    assert code == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("kd-train: error:")]
    assert len(error_lines) == 1 and "/nonexistent/mnist" in error_lines[0]
    assert "Traceback" not in stderr
    runs = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
        [MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("quickstart").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]


# -- DDP ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_cpu_test_metric_equals_one_process(tmp_path: Path) -> None:
    """2 CPU processes (gloo): every test image scored once, the same metric as 1 process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / 'm.db'), "OMP_NUM_THREADS": "1"}
    common = ["experiment=quickstart", "trainer.max_epochs=2", "callbacks.progress_bar=null",
              "data.batch_size=16", *NO_DEPLOY]
    ddp_dir = tmp_path / "ddp"
    result = subprocess.run(
        [*KD_TRAIN, *common, "trainer=ddp_cpu", f"hydra.run.dir={ddp_dir}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = ddp_dir / "checkpoints" / "last.ckpt"
    train_in_process([*common, "train=false", f"ckpt_path={checkpoint}"], env, tmp_path / "single")
    # digits class 6 test split: every image scored exactly once under DDP, the same metrics
    ddp_and_single_runs(env["MLFLOW_TRACKING_URI"], "quickstart", ("test/image_auroc", "test/teacher_image_auroc"),
                        abs_tol=1e-6)


def test_an_explicit_tracking_uri_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--tracking-uri / logger.mlflow.tracking_uri first, then MLFLOW_TRACKING_URI, then ./mlruns."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/m.db")
    assert resolve_tracking_uri("sqlite:////flag/m.db") == "sqlite:////flag/m.db"
    assert resolve_tracking_uri(None) == "sqlite:////env/m.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"


def test_a_dataset_logged_by_two_jobs_at_once_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parallel jobs logging the same split can both insert it; the loser's unique-constraint
    error is retried (the row is there then); any other storage error is raised at once."""
    from kd_experiments import tracking
    from kd_experiments.data.one_class import OneClassDataModule

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    datamodule = OneClassDataModule("digits", None, 0, split_seed=0)
    datamodule.setup()

    class Client:
        def __init__(self, errors: list[Exception]) -> None:
            self.errors, self.calls = errors, 0

        def log_inputs(self, run_id: str, datasets: list) -> None:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)

    race = Client([RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")])
    tracking.log_dataset_inputs(race, "run", datamodule, "digits-c0", ["train", "test"])
    assert race.calls == 2
    other = Client([RuntimeError("database is locked")])
    with pytest.raises(RuntimeError, match="locked"):
        tracking.log_dataset_inputs(other, "run", datamodule, "digits-c0", ["train"])
    assert other.calls == 1
    endless = Client([RuntimeError("duplicate key value violates unique constraint")] * 9)
    with pytest.raises(RuntimeError, match="unique constraint"):
        tracking.log_dataset_inputs(endless, "run", datamodule, "digits-c0", ["train"])
    assert endless.calls == tracking.DATASET_LOG_ATTEMPTS
