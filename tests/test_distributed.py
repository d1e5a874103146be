"""Sweeps beyond one process, on this machine only (docs/distributed.md): the quickstart sweep
through Hydra's Ray launcher (a Ray head on 127.0.0.1 with 2 worker processes) and through
submitit, a Ray worker killed mid-sweep and the sweep re-run, and 4 parallel jobs against a
PostgreSQL-backed ``mlflow server``. Every service is started by the test on 127.0.0.1 and
stopped by it; one SQLite-backed ``mlflow server`` and one Ray head serve the whole module.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_experiments.config import PROJECT_ROOT
from kd_experiments.tracking import JOB_TAG, PARENT_TAG, REQUIRED_PARAMS, SUPERSEDED_TAG
from tests.conftest import sqlite_store, sweep_runs
from tests.test_mlflow_server import free_port, mlflow_server

# the Ray tests share one Ray head and one mlflow server (module-scoped): one pytest-xdist worker
# runs them; the submitit and PostgreSQL tests start their own server and may run on the other
RAY_GROUP = pytest.mark.xdist_group("ray")

KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
RAY = str(Path(sys.executable).with_name("ray"))
# The demo sweep file at 4 ratios x 2 seeds (the file itself sweeps 3 seeds).
SWEEP_FILE = ["--config-dir", str(PROJECT_ROOT / "sweeps"), "--config-name", "quickstart_compression",
              "hydra.sweeper.params.seed='0,1'"]
FAST = ["trainer.max_epochs=1", "callbacks.progress_bar=null", "callbacks.model_summary=null",
        "deploy.measure=false", "deploy.log_model=false",  # the launchers are tested here, not the deploy step
        "trainer.enable_model_summary=false"]
GRID = sorted((ratio, seed) for ratio in (2, 8, 32, 128) for seed in (0, 1))  # the sweep file's grid
RUN_METRICS = {"test/image_auroc", "test/teacher_image_auroc", "val/loss", "train/teacher_loss", "duration_s"}
# Ray on one machine: loopback addresses only (Ray otherwise advertises the host's interface).
# RAY_DEDUP_LOGS=0: the driver prints every worker line (Ray otherwise folds lines that look
# alike into "[repeated 2x across cluster]", and the tests count the jobs' summary lines).
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                 "RAY_DEDUP_LOGS": "0"}


def _base_env(tmp: Path, tracking_uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "KD_LOG_DIR": str(tmp / "logs"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
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


def _start_ray_head(folder: Path, ray_env: dict[str, str], num_cpus: int, attempt: int, startup_timeout_s: float):
    """One ``ray start --head --block``; returns (process, temp dir, port), or None if it gave up."""
    temp_dir = Path(tempfile.mkdtemp(prefix="kdray", dir="/tmp"))  # Ray's socket paths must be short
    port = free_port()
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
               "--object-store-memory=100000000", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    log_path = folder / f"ray_head_{attempt}.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ray_env, cwd=folder,
                                start_new_session=True)
    deadline = time.monotonic() + startup_timeout_s
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            _stop_group(head, grace_s=10)
            shutil.rmtree(temp_dir, ignore_errors=True)
            return None
        time.sleep(0.5)
    return head, temp_dir, port


@contextlib.contextmanager
def ray_head(folder: Path, env: dict[str, str], num_cpus: int = 2, startup_timeout_s: float = 240) -> Iterator[dict]:
    """``ray start --head --block`` on 127.0.0.1 with ``num_cpus`` worker slots (token auth).

    Yields the environment a driver needs (``RAY_ADDRESS``, the token) merged into ``env``.
    Ray gives its raylet a fixed 30 s to register; on a busy machine a start can miss it, so
    up to 3 starts are tried.
    """
    ray_env = {**env, **RAY_LOCAL_ENV, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    started = None
    for attempt in range(3):
        started = _start_ray_head(folder, ray_env, num_cpus, attempt, startup_timeout_s)
        if started is not None:
            break
    if started is None:
        pytest.fail(f"the Ray head did not start:\n{(folder / 'ray_head_2.log').read_text(errors='replace')[-3000:]}")
    head, temp_dir, port = started
    try:
        yield {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _no_server_job_runners() -> Iterator[None]:
    """MLflow servers of this module run without their background job runners (unused here;
    six extra processes on a 2-core machine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        yield


@contextlib.contextmanager
def _served_store(folder: Path) -> Iterator[str]:
    """A SQLite-backed ``mlflow server`` that serves artifacts; yields its URL."""
    with mlflow_server(folder, sqlite_store(folder / "server.db"), artifacts_destination=folder / "artifacts") as url:
        yield url


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One ``mlflow server`` and one 2-CPU Ray head, shared by the Ray tests of the module."""
    folder = tmp_path_factory.mktemp("services")
    with _served_store(folder) as url, ray_head(folder, _base_env(folder, url)) as ray_env:
        yield {"url": url, "ray_env": ray_env}


def _kd_train(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*KD_TRAIN, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd)


def _grid(children) -> list[tuple[int, int]]:
    return sorted((int(c.data.params["scheme.compression_ratio"]), int(c.data.tags["seed"])) for c in children)


def _assert_complete_sweep(client: MlflowClient, experiment_name: str, grid: list[tuple[int, int]]):
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


@pytest.mark.slow
@RAY_GROUP
def test_ray_launcher_runs_the_quickstart_sweep_under_one_parent(services: dict, tmp_path: Path) -> None:
    """The sweep file unchanged but for hydra/launcher=ray: 8 FINISHED children on the server."""
    env = {**services["ray_env"], "KD_LOG_DIR": str(tmp_path / "logs")}
    result = _kd_train([*SWEEP_FILE, "hydra/launcher=ray", "experiment_name=ray_sweep", *FAST], env, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summaries = [line for line in result.stdout.splitlines() if "[kd-train] " in line]
    assert len(summaries) == 8, result.stdout[-3000:]
    assert all("_run_job_with_timeout pid=" in line for line in summaries), "jobs must run in Ray workers"
    client = MlflowClient(tracking_uri=services["url"])
    _, children = _assert_complete_sweep(client, "ray_sweep", GRID)
    assert len(children) == 8
    assert all(JOB_TAG in c.data.tags for c in children)


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_quickstart_sweep(tmp_path: Path) -> None:
    with _served_store(tmp_path) as url:
        env = _base_env(tmp_path, url)
        result = _kd_train([*SWEEP_FILE, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                            "experiment_name=submitit_sweep", *FAST], env, tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        _, children = _assert_complete_sweep(MlflowClient(tracking_uri=url), "submitit_sweep", GRID)
    assert len(children) == 8
    assert len(list((tmp_path / "logs").rglob(".submitit/*/*_result.pkl"))) == 8  # submitit ran each job


@pytest.mark.slow
@RAY_GROUP
def test_killed_ray_worker_fails_its_run_and_the_rerun_finishes_only_the_rest(services: dict, tmp_path: Path) -> None:
    """SIGKILL one Ray worker mid-job: its run ends FAILED with Ray's error, the others FINISHED;
    the same command into the same sweep folder (same sweep_id) runs only the killed job."""
    client = MlflowClient(tracking_uri=services["url"])
    env = {**services["ray_env"], "KD_LOG_DIR": str(tmp_path / "logs")}
    grid = sorted((ratio, seed) for ratio in (8, 32) for seed in (0, 1))
    args = ["-m", "experiment=quickstart", "scheme.compression_ratio=8,32", "seed=0,1", "hydra/launcher=ray",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "experiment_name=ray_kill", *FAST]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        driver = subprocess.Popen([*KD_TRAIN, *args], stdout=out, stderr=err, env=env, cwd=tmp_path,
                                  start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 600
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("ray_kill")
            running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
            victim = next((r for r in running if r.data.tags.get(PARENT_TAG) != "true" and "pid" in r.data.tags), None)
            time.sleep(0.2)
        assert victim is not None, (tmp_path / "first.err").read_text()[-3000:]
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)
        driver.wait(timeout=600)
    finally:
        _stop_group(driver, grace_s=5)
    assert driver.returncode == 1, "a failed job makes the multirun fail once every job has ended"

    parents, children = sweep_runs(client, "ray_kill")
    assert len(parents) == 1 and len(children) == 4
    failed = client.get_run(victim.info.run_id)
    assert failed.info.status == "FAILED"
    assert "WorkerCrashedError" in failed.data.tags["error"] or "died" in failed.data.tags["error"], failed.data.tags
    others = [c for c in children if c.info.run_id != victim.info.run_id]
    assert [c.info.status for c in others] == ["FINISHED"] * 3

    rerun = _kd_train(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert sum("skipped" in line and "[kd-train] " in line for line in rerun.stdout.splitlines()) == 3
    parent, children = _assert_complete_sweep(client, "ray_kill", grid)
    assert len(children) == 5  # the 3 FINISHED ones were not run again; the killed job once more
    retried = [c for c in children if c.info.run_id != victim.info.run_id and c.data.tags[JOB_TAG] == victim.data.tags[JOB_TAG]]
    assert len(retried) == 1 and retried[0].info.status == "FINISHED"
    assert client.get_run(victim.info.run_id).data.tags[SUPERSEDED_TAG] == retried[0].info.run_id
    assert parent.info.run_id == parents[0].info.run_id  # the same parent, re-opened


def test_ray_job_past_timeout_min_raises_in_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra.launcher.timeout_min: an alarm inside the job raises JobTimeoutError (the run ends FAILED)."""
    from hydra_plugins.hydra_ray_launcher import _launcher_util
    from hydra_plugins.kd_experiments_launchers.ray_launcher import JobTimeoutError, _run_job_with_timeout

    def slow_job(**kwargs):
        time.sleep(30)
        return "finished"

    monkeypatch.setattr(_launcher_util, "_run_job", slow_job)
    with pytest.raises(JobTimeoutError, match="timeout_min=0.005"):
        _run_job_with_timeout(0.005)  # 0.3 s
    monkeypatch.setattr(_launcher_util, "_run_job", lambda **kwargs: "finished")
    assert _run_job_with_timeout(None) == "finished" and _run_job_with_timeout(1.0) == "finished"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the alarm is cleared after the job


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
def test_four_parallel_jobs_against_a_postgresql_backed_server_lose_nothing(tmp_path: Path) -> None:
    with postgres_server() as database, mlflow_server(tmp_path, database, artifacts_destination=tmp_path / "artifacts") as url:
        env = _base_env(tmp_path, url)
        result = _kd_train(["-m", "experiment=quickstart", "scheme.compression_ratio=2,8,32,128", "seed=0",
                            "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *FAST], env, tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        client = MlflowClient(tracking_uri=url)
        _, children = _assert_complete_sweep(client, "quickstart", [(r, 0) for r in (2, 8, 32, 128)])
        assert len(children) == 4
        metric_keys = {frozenset(c.data.metrics) for c in children}
        assert len(metric_keys) == 1, "every job logged the same metrics"
        for child in children:  # every per-epoch point of every metric made it to the database
            history = client.get_metric_history(child.info.run_id, "train/teacher_loss")
            assert len(history) >= 1 and len({point.step for point in history}) == len(history)
            plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/roc_curve.png" in plots
