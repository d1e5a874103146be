"""``mlflow server`` on 127.0.0.1 for the tests (:func:`mlflow_server`), and kd-report's one-line
error when the server named by ``MLFLOW_TRACKING_URI`` cannot be reached. Sweeps against a
server: ``test_distributed_ray.py`` (artifacts proxied, the report logged to the parent),
``test_distributed.py`` (submitit, PostgreSQL)."""

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

from kd_experiments import report

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


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


def test_unreachable_server_fails_kd_report_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert report.main(["--experiment", "quickstart"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("kd-report: error:") and "cannot be reached" in error and "\n" not in error
