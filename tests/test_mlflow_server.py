"""A team store: ``mlflow server`` on 127.0.0.1 as the tracking URI of a sweep, end to end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_experiments import report
from kd_experiments.tracking import PARENT_TAG, REQUIRED_PARAMS
from tests.conftest import sqlite_store

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@contextlib.contextmanager
def mlflow_server(
    folder: Path, backend_store_uri: str, artifacts_destination: Path | None = None, startup_timeout_s: float = 240
) -> Iterator[str]:
    """Run ``mlflow server`` on a free loopback port until the block ends; yields its URL.

    With ``artifacts_destination`` the server also proxies artifacts (``--serve-artifacts``):
    clients upload through HTTP and the files land in that folder. The server runs in its
    own process group, which is sent SIGTERM (then SIGKILL) in a ``finally``.
    """
    port = free_port()
    command = [MLFLOW, "server", "--backend-store-uri", backend_store_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts_destination is not None:
        command += ["--serve-artifacts", "--artifacts-destination", str(artifacts_destination)]
    else:
        command += ["--no-serve-artifacts"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its background job runners: unused, 6 processes
    log_path = folder / f"mlflow_server_{port}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if server.poll() is not None:
                    pytest.fail(f"mlflow server exited with {server.returncode}:\n{_log_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not answer /health in {startup_timeout_s} s:\n{_log_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(timeout=30)


@pytest.mark.slow
def test_sweep_against_an_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = tmp_path / "artifacts"
    with mlflow_server(tmp_path, sqlite_store(tmp_path / 'server.db'), artifacts_destination=artifacts) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "KD_LOG_DIR": str(tmp_path / "logs"),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(
            [*KD_TRAIN, "-m", "experiment=quickstart", "trainer.max_epochs=1", "scheme.compression_ratio=8,32", *QUIET,
             "deploy.measure=false"],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert sum(line.startswith("[kd-train] ") for line in result.stdout.splitlines()) == 2

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("quickstart")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "true"]
        children = [r for r in runs if r.data.tags.get(PARENT_TAG) != "true"]
        assert len(parents) == 1 and len(children) == 2
        parent_id = parents[0].info.run_id
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent_id}
        assert sorted(c.data.params["scheme.compression_ratio"] for c in children) == ["32", "8"]
        for child in children:
            assert child.info.status == "FINISHED"
            assert all(key in child.data.params for key in REQUIRED_PARAMS)
            assert {"test/image_auroc", "val/loss", "duration_s"} <= set(child.data.metrics)
            plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert {"plots/roc_curve.png", "plots/score_histograms.png"} <= plots
            config = Path(client.download_artifacts(child.info.run_id, "config/config.yaml", str(tmp_path)))
            assert "compression_ratio:" in config.read_text()
        # the artifacts went through the server into its destination folder
        assert len(list(artifacts.rglob("roc_curve.png"))) == 2

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        assert report.main(["--experiment", "quickstart", "--sweep", "latest", "--output", str(tmp_path / "report")]) == 0
        logged = {a.path for a in client.list_artifacts(parent_id, report.REPORT_ARTIFACT_DIR)}
        assert logged == {f"{report.REPORT_ARTIFACT_DIR}/{name}" for name in report.REPORT_FILES}
        assert list(artifacts.rglob("quality_vs_compression.png"))
        assert client.get_run(parent_id).info.status == "FINISHED"


def test_unreachable_server_fails_kd_report_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert report.main(["--experiment", "quickstart"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("kd-report: error:") and "cannot be reached" in error and "\n" not in error
