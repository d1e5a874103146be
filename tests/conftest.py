"""Shared fixtures: composed Hydra configs, temporary MLflow stores, the real data folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from kd_experiments.config import CONFIG_DIR, PROJECT_ROOT

torch.set_num_threads(1)
# one thread per process, subprocesses included: `make test` runs 2 pytest-xdist workers on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
# deploy/* figures are logged, not timed seriously, in tests (kd-train subprocesses inherit these)
os.environ.setdefault("KD_DEPLOY_LATENCY_CALLS", "2")
os.environ.setdefault("KD_DEPLOY_THROUGHPUT_CALLS", "1")

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``cluster`` modules first (a stable sort keeps every other order): each runs for
    minutes on processes and services of its own, and `make test` hands modules to its workers in
    collection order (``--no-loadscope-reorder``), so they start first and the short modules fill
    in beside them instead of leaving one worker alone with a long module at the end."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cluster") else 1)


SHARED_DATA = Path(os.environ.get("KD_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data"))


_STORE_TEMPLATE: list[Path] = []


def sqlite_store(db_path: Path) -> str:
    """The URI of the SQLite MLflow store at ``db_path``: a new, empty one if it does not exist yet.

    MLflow creates a store by running its ~60 schema migrations (about 2 s on 2 cores); this
    copies a store migrated once per test process instead. The copy is the same empty store:
    only its "Default" experiment names the template's folder, and runs here always name their
    experiment.
    """
    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="kd-store-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = folder / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _STORE_TEMPLATE.append(template)
    if not db_path.exists():
        db_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE[0], db_path)
    return f"sqlite:///{db_path}"


def sweep_runs(client, experiment_name: str) -> tuple[list, list]:
    """The parent runs and the child runs of an experiment's sweeps (the ``kd.sweep_parent`` tag)."""
    from kd_experiments.tracking import PARENT_TAG

    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"experiment {experiment_name} missing"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "true"]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) != "true"]
    return parents, children


def train_in_process(overrides: list[str], env: dict[str, str], output_dir: Path) -> dict:
    """``kd-train <overrides>`` in this process (no new interpreter to start), with the tracking
    store and folders that ``env`` gives a ``kd-train`` subprocess; returns the test metrics."""
    from kd_experiments.search import compose_config
    from kd_experiments.train import train

    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_URI", "KD_CACHE_DIR", "KD_LOG_DIR"):
            if key in env:
                patch.setenv(key, env[key])
        return train(compose_config(overrides, output_dir=output_dir))


def kd_train_cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """``kd-train <args>`` as the console entry point runs it (Hydra's command line, the one-line
    error handling, the exit code), in this process: no interpreter to start, which is most of a
    failing run's cost. Returns ``(exit code, stderr)``; the process's logging, warnings filters,
    working directory and Hydra state are as they were before."""
    import contextlib
    import io
    import logging
    import sys
    import warnings

    from kd_experiments import train as train_module

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stderr = io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["kd-train", *args])
        try:
            GlobalHydra.instance().clear()
            train_module.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
    return code, stderr.getvalue()


def ddp_and_single_runs(tracking_uri: str, experiment_name: str, metrics: tuple[str, ...], abs_tol: float = 1e-5):
    """The two runs of a DDP test (a 2-process ``trainer=ddp_cpu`` run, then one process testing
    its checkpoint): only rank 0 made a run, both FINISHED, every test image scored once, and the
    ``metrics`` equal. Returns ``(ddp_run, single_run)``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    assert len(runs) == 2, "only rank 0 may create a run"
    by_mode = {("single" if r.data.params.get("ckpt_path", "None") not in ("None", "") else "ddp"): r for r in runs}
    ddp_run, single_run = by_mode["ddp"], by_mode["single"]
    assert ddp_run.data.params.get("trainer.devices") == "2", {
        k: v for k, v in ddp_run.data.params.items() if k.startswith("trainer.")}
    assert ddp_run.info.status == single_run.info.status == "FINISHED"
    assert ddp_run.data.metrics["test/num_test_images"] == single_run.data.metrics["test/num_test_images"]
    for key in metrics:
        assert ddp_run.data.metrics[key] == pytest.approx(single_run.data.metrics[key], abs=abs_tol), key
    return ddp_run, single_run


def shared_data(relative: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set KD_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for the test, exported as MLFLOW_TRACKING_URI."""
    uri = sqlite_store(tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose the train config with overrides, Hydra's runtime set as in a real run."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # a task function never sees the hydra node
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


#: a run that neither times its deployed model nor logs it as an MLflow Model (tests of other things)
NO_DEPLOY = ("deploy.measure=false", "deploy.log_model=false")


def fast_overrides(*extra: str) -> list[str]:
    """Overrides that keep a run to a few seconds on one CPU core."""
    return [
        "trainer.max_epochs=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "deploy.latency_calls=2",  # deploy/* figures are logged, not timed seriously, in tests
        "deploy.throughput_calls=1",
        *extra,
    ]
