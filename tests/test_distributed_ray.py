"""Hydra's Ray launcher on this machine (docs/distributed.md): a Ray head on 127.0.0.1 with 2
worker processes runs the quickstart sweep, one of its Ray workers is killed mid-sweep and the
sweep re-run to completion, and a job past ``hydra.launcher.timeout_min`` raises inside the job. The head and the ``mlflow
server`` it reports to are started once for the module and stopped by it.
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

from kd_experiments import report
from kd_experiments.tracking import JOB_TAG, PARENT_TAG, SUPERSEDED_TAG
from tests.conftest import sweep_runs
from tests.test_distributed import (
    FAST,
    GRID,
    KD_TRAIN,
    SWEEP_FILE,
    assert_complete_sweep,
    base_env,
    kd_train,
    served_store,
    stop_group,
)
from tests.test_mlflow_server import free_port

pytestmark = pytest.mark.cluster  # `make test` runs it, `make test-fast` leaves it out

RAY = str(Path(sys.executable).with_name("ray"))
# Ray on one machine: loopback addresses only (Ray otherwise advertises the host's interface).
# RAY_DEDUP_LOGS=0: the driver prints every worker line (Ray otherwise folds lines that look
# alike into "[repeated 2x across cluster]", and the tests count the jobs' summary lines).
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                 "RAY_DEDUP_LOGS": "0"}


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
            stop_group(head, grace_s=10)
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
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One ``mlflow server`` and one 2-CPU Ray head, shared by the Ray tests of the module."""
    folder = tmp_path_factory.mktemp("services")
    with served_store(folder) as url, ray_head(folder, base_env(folder, url)) as ray_env:
        yield {"url": url, "ray_env": ray_env, "artifacts": folder / "artifacts"}


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker_and_its_rerun_finishes_under_one_parent(
    services: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep file (at 2 grid points) for hydra/launcher=ray, one Ray worker SIGKILLed mid-job:
    its run ends FAILED with Ray's error, the other FINISHED on the server; the same command into the
    same sweep folder (same sweep_id) runs only the killed job, in a Ray worker, under the same
    parent. Artifacts go through the server; kd-report against the server logs to the parent."""
    client = MlflowClient(tracking_uri=services["url"])
    env = {**services["ray_env"], "KD_LOG_DIR": str(tmp_path / "logs")}
    args = [*SWEEP_FILE, "hydra/launcher=ray", f"hydra.sweep.dir={tmp_path / 'sweep'}", "experiment_name=ray_sweep",
            *FAST]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        driver = subprocess.Popen([*KD_TRAIN, *args], stdout=out, stderr=err, env=env, cwd=tmp_path,
                                  start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 600
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("ray_sweep")
            running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
            victim = next((r for r in running if r.data.tags.get(PARENT_TAG) != "true" and "pid" in r.data.tags), None)
            time.sleep(0.2)
        assert victim is not None, (tmp_path / "first.err").read_text()[-3000:]
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)
        driver.wait(timeout=600)
    finally:
        stop_group(driver, grace_s=5)
    assert driver.returncode == 1, "a failed job makes the multirun fail once every job has ended"

    parents, children = sweep_runs(client, "ray_sweep")
    assert len(parents) == 1 and len(children) == len(GRID)
    failed = client.get_run(victim.info.run_id)
    assert failed.info.status == "FAILED"
    assert "WorkerCrashedError" in failed.data.tags["error"] or "died" in failed.data.tags["error"], failed.data.tags
    others = [c for c in children if c.info.run_id != victim.info.run_id]
    assert [c.info.status for c in others] == ["FINISHED"]

    rerun = kd_train(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    summaries = [line for line in rerun.stdout.splitlines() if "[kd-train] " in line]
    assert sum("skipped" in line for line in summaries) == 1, rerun.stdout[-3000:]
    ran = [line for line in summaries if "skipped" not in line]
    assert len(ran) == 1 and "_run_job_with_timeout pid=" in ran[0], "the job must run in a Ray worker"
    parent, children = assert_complete_sweep(client, "ray_sweep", GRID)
    assert len(children) == len(GRID) + 1  # the FINISHED one was not run again; the killed job once more
    retried = [c for c in children if c.info.run_id != victim.info.run_id and c.data.tags[JOB_TAG] == victim.data.tags[JOB_TAG]]
    assert len(retried) == 1 and retried[0].info.status == "FINISHED"
    assert client.get_run(victim.info.run_id).data.tags[SUPERSEDED_TAG] == retried[0].info.run_id
    assert parent.info.run_id == parents[0].info.run_id  # the same parent, re-opened
    assert all(JOB_TAG in c.data.tags for c in children)

    # artifacts go through the server (mlflow-artifacts:) into its destination folder
    assert client.get_experiment_by_name("ray_sweep").artifact_location.startswith("mlflow-artifacts:")
    assert len(list(services["artifacts"].rglob("roc_curve.png"))) >= len(GRID)
    config = Path(client.download_artifacts(retried[0].info.run_id, "config/config.yaml", str(tmp_path)))
    assert "compression_ratio:" in config.read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services["url"])
    assert report.main(["--experiment", "ray_sweep", "--sweep", "latest", "--output", str(tmp_path / "report")]) == 0
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, report.REPORT_ARTIFACT_DIR)}
    assert logged == {f"{report.REPORT_ARTIFACT_DIR}/{name}" for name in report.REPORT_FILES}
    assert list(services["artifacts"].rglob("quality_vs_compression.png"))
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


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
