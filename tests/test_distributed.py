"""Sweeps beyond one process, on this machine only (docs/distributed.md): the quickstart sweep
through Hydra's submitit launcher, its parallel jobs reporting to a PostgreSQL-backed ``mlflow
server``. The Ray launcher's tests are in ``test_distributed_ray.py`` (a module of their own, so
that `make test`'s two pytest-xdist workers can run them beside these). Every service is started
by the test on 127.0.0.1 and stopped by it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_experiments.config import PROJECT_ROOT
from kd_experiments.tracking import REQUIRED_PARAMS, SUPERSEDED_TAG
from tests.conftest import NO_DEPLOY, kd_train_cli, sqlite_store, sweep_runs
from tests.test_mlflow_server import free_port, mlflow_server

pytestmark = pytest.mark.cluster  # `make test` runs it, `make test-fast` leaves it out

KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
# The demo sweep file at its smallest and largest ratio x 1 seed (the file itself sweeps 4 ratios
# x 3 seeds): 2 jobs, one per worker slot; every job costs a process start and its imports, so a
# larger grid tests nothing more and only takes longer.
SWEEP_FILE = ["--config-dir", str(PROJECT_ROOT / "sweeps"), "--config-name", "quickstart_compression",
              "scheme.compression_ratio=2,128", "seed=0"]  # command-line sweeps win over the file's
FAST = ["trainer.max_epochs=1", "callbacks.progress_bar=null", "callbacks.model_summary=null",
        *NO_DEPLOY,  # the launchers are tested here, not the deploy step
        "trainer.enable_model_summary=false"]
GRID = [(2, 0), (128, 0)]  # the grid of SWEEP_FILE
RUN_METRICS = {"test/image_auroc", "test/teacher_image_auroc", "val/loss", "train/teacher_loss", "duration_s"}


def base_env(tmp: Path, tracking_uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "KD_LOG_DIR": str(tmp / "logs"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process (it stops its children), then SIGKILL its whole session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def served_store(folder: Path) -> Iterator[str]:
    """A SQLite-backed ``mlflow server`` that serves artifacts; yields its URL."""
    with mlflow_server(folder, sqlite_store(folder / "server.db"), artifacts_destination=folder / "artifacts") as url:
        yield url


def kd_train(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*KD_TRAIN, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd)


def _grid(children) -> list[tuple[int, int]]:
    return sorted((int(c.data.params["scheme.compression_ratio"]), int(c.data.tags["seed"])) for c in children)


def assert_complete_sweep(client: MlflowClient, experiment_name: str, grid: list[tuple[int, int]]):
    """One FINISHED parent; one FINISHED child per grid point under it, with every param and metric."""
    parents, children = sweep_runs(client, experiment_name)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    current = [c for c in children if not c.data.tags.get(SUPERSEDED_TAG)]
    assert [c.info.status for c in current] == ["FINISHED"] * len(grid), [(c.info.run_name, c.info.status) for c in current]
    assert _grid(current) == grid
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]}
    for child in current:
        missing = [k for k in REQUIRED_PARAMS if k not in child.data.params]
        missing += sorted(RUN_METRICS - set(child.data.metrics))
        assert not missing, (child.info.run_name, missing)
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 1  # one epoch: one point
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    return parent, children


# -- PostgreSQL -------------------------------------------------------------------------------------
def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def postgres_server(startup_timeout_s: float = 120) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (Debian's binaries, trust auth); yields a DB URI.

    As root, the cluster runs as the ``postgres`` system user (``initdb`` refuses root).
    """
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="kdpg", dir="/tmp"))
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(data, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    cluster = data / "cluster"
    try:
        subprocess.run([*as_user, initdb, "-D", str(cluster), "-U", "kd", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=startup_timeout_s)
        subprocess.run([*as_user, pg_ctl, "-D", str(cluster), "-l", str(data / "postgres.log"), "-w",
                        "-t", str(int(startup_timeout_s)), "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=startup_timeout_s + 10)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="kd", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        yield f"postgresql://kd@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(cluster), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_submitit_jobs_against_a_postgresql_backed_server_lose_nothing(tmp_path: Path) -> None:
    """The sweep file (2 grid points) through Hydra's submitit launcher: 2 job processes at once (one
    per core) writing metrics, params and artifacts through one ``mlflow server`` whose backend store
    is a throw-away PostgreSQL database (SQLite, with a warning, where PostgreSQL is not installed)."""
    with contextlib.ExitStack() as services:
        if _postgres_bin("initdb") and _postgres_bin("pg_ctl"):
            database = services.enter_context(postgres_server())
        else:
            warnings.warn("PostgreSQL is not installed (apt-get install postgresql; .ci/run does): the submitit "
                          "sweep reports to a SQLite-backed server instead", stacklevel=1)
            database = sqlite_store(tmp_path / "server.db")
        url = services.enter_context(mlflow_server(tmp_path, database, artifacts_destination=tmp_path / "artifacts"))
        env = base_env(tmp_path, url)
        # the sweep's own process is this one (kd-train's command line); submitit starts the jobs'
        code, stderr = kd_train_cli([*SWEEP_FILE, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                                     "experiment_name=submitit_sweep", *FAST], env, tmp_path)
        assert code == 0, stderr[-4000:]
        client = MlflowClient(tracking_uri=url)
        _, children = assert_complete_sweep(client, "submitit_sweep", GRID)
        assert len(children) == len(GRID)
        assert len(list((tmp_path / "logs").rglob(".submitit/*/*_result.pkl"))) == len(GRID)  # submitit ran each job
        metric_keys = {frozenset(c.data.metrics) for c in children}
        assert len(metric_keys) == 1, "every job logged the same metrics"
        for child in children:  # every per-epoch point of every metric made it to the database
            history = client.get_metric_history(child.info.run_id, "train/teacher_loss")
            assert len(history) >= 1 and len({point.step for point in history}) == len(history)
            plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/roc_curve.png" in plots
