"""Reliability: crash and resume, Ctrl-C, wrong checkpoints, unreachable or read-only stores,
safe loading. Each failure gives one clear line and a FAILED (or KILLED) run; nothing
logged or checkpointed before it is lost."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_experiments.config import PROJECT_ROOT
from kd_experiments.errors import CheckpointError, TrackingError
from kd_experiments.train import train
from tests.conftest import NO_DEPLOY, fast_overrides, kd_train_cli, sqlite_store, train_in_process

KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
QUICK = ["experiment=quickstart", "callbacks.progress_bar=null", "callbacks.model_summary=null",
         "trainer.deterministic=true", *NO_DEPLOY]


class SignalAtEpoch(L.Callback):
    """Test helper: the process sends itself a signal at the start of an epoch."""

    def __init__(self, epoch: int, signal_number: int) -> None:
        self.epoch = epoch
        self.signal_number = signal_number

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signal_number)


def _kd_train(tmp_path: Path, *overrides: str, run_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / 'm.db'), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [*KD_TRAIN, *QUICK, *overrides, f"hydra.run.dir={tmp_path / run_dir}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=PROJECT_ROOT,
        # A shell's background job inherits SIGINT ignored, and Python keeps it so: give
        # the child the default disposition, so Ctrl-C reaches it as it does a user's run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _runs(tmp_path: Path) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    return {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    epochs = "trainer.max_epochs=4"
    # the uninterrupted reference needs no process of its own: this one, same store, same settings
    train_in_process([*QUICK, epochs], {"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "m.db")}, tmp_path / "whole")
    killer = ["+callbacks.kill._target_=tests.test_reliability.SignalAtEpoch", "+callbacks.kill.epoch=2",
              f"+callbacks.kill.signal_number={int(signal.SIGKILL)}"]
    killed = _kd_train(tmp_path, epochs, *killer, run_dir="killed")
    assert killed.returncode == -signal.SIGKILL
    runs = _runs(tmp_path)
    killed_run = next(r for r in runs.values() if r.info.status == "RUNNING")
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    # The one documented override: ckpt_path=<run folder>/checkpoints/last.ckpt, given to the
    # kd-train command line; in this process (what matters is the checkpoint the killed one left)
    code, stderr = kd_train_cli([*QUICK, epochs, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'resumed'}"],
                                {"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "m.db")}, tmp_path)
    assert code == 0, stderr[-2000:]
    runs = _runs(tmp_path)
    assert len(runs) == 2, "the resumed run continues the killed run's MLflow run"
    resumed_run = runs[killed_run.info.run_id]
    whole_run = next(r for r in runs.values() if r.info.run_id != killed_run.info.run_id)
    assert resumed_run.info.status == "FINISHED"
    assert resumed_run.data.tags.get("resumed") == "true"
    for metric in ("test/image_auroc", "test/teacher_image_auroc", "test/wasserstein_anomalous"):
        assert resumed_run.data.metrics[metric] == whole_run.data.metrics[metric], metric


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_with_a_checkpoint(tmp_path: Path) -> None:
    interrupt = ["+callbacks.kill._target_=tests.test_reliability.SignalAtEpoch", "+callbacks.kill.epoch=1",
                 f"+callbacks.kill.signal_number={int(signal.SIGINT)}"]
    result = _kd_train(tmp_path, "trainer.max_epochs=4", *interrupt, run_dir="interrupted")
    assert result.returncode == 130, result.stderr[-2000:]
    assert "kd-train: interrupted" in result.stderr
    (run,) = _runs(tmp_path).values()
    assert run.info.status == "KILLED"
    assert (tmp_path / "interrupted" / "checkpoints" / "interrupted.ckpt").is_file()
    assert (tmp_path / "interrupted" / "checkpoints" / "last.ckpt").is_file()


def test_checkpoint_of_another_width_or_scheme_is_refused(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    train(compose_cfg("experiment=quickstart", *fast_overrides()))  # one trained run, two wrong resumes
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("experiment=quickstart", *fast_overrides("scheme.compression_ratio=32", f"ckpt_path={checkpoint}"))
    with pytest.raises(CheckpointError, match="does not match|another width"):
        train(cfg)

    content = torch.load(checkpoint, weights_only=True)
    content["kd_scheme"] = "reverse_distillation"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(content, foreign)
    cfg = compose_cfg("experiment=quickstart", *fast_overrides(f"ckpt_path={foreign}"))
    with pytest.raises(CheckpointError, match="scheme 'reverse_distillation'"):
        train(cfg)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_fails_the_run_in_one_line(compose_cfg, mlflow_uri: str, tmp_path: Path,
                                                      content: bytes) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(content)
    cfg = compose_cfg("experiment=quickstart", *fast_overrides(f"ckpt_path={corrupt}"))
    with pytest.raises(CheckpointError, match="corrupt") as raised:
        train(cfg)
    assert "\n" not in str(raised.value)
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FAILED" and "corrupt" in run.data.tags["error"]


def test_pickled_code_in_a_checkpoint_is_never_run(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    malicious = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, malicious)
    cfg = compose_cfg("experiment=quickstart", *fast_overrides(f"ckpt_path={malicious}"))
    with pytest.raises(CheckpointError):
        train(cfg)
    assert not marker.exists()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training(compose_cfg, monkeypatch, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = compose_cfg("experiment=quickstart", *fast_overrides())
    with pytest.raises(TrackingError, match=re.escape(uri) + ".*cannot be reached"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists(), "no training before the store answers"


def test_store_under_a_file_is_a_clear_error(compose_cfg, monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not_a_folder' / 'mlruns' / 'm.db'}")
    cfg = compose_cfg("experiment=quickstart", *fast_overrides())
    with pytest.raises(TrackingError, match="cannot create the MLflow store folder"):
        train(cfg)


@contextlib.contextmanager
def _small_filesystem(mount_point: Path, options: str):
    """A tmpfs mounted with ``options`` (root in a sandbox with CAP_SYS_ADMIN), else skip."""
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _cli_error(tmp_path: Path, uri: str) -> str:
    code, stderr = kd_train_cli([*QUICK, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
                                {"MLFLOW_TRACKING_URI": uri}, tmp_path)
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("kd-train: error:")]
    return line


def test_read_only_store_is_a_clear_error(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        if os.geteuid() != 0:  # permission bits suffice for an ordinary user
            store = tmp_path / "ro"
            store.mkdir(mode=0o555)
        else:  # root ignores permission bits: a read-only filesystem
            store = stack.enter_context(_small_filesystem(tmp_path / "ro", "ro,size=1m"))
        line = _cli_error(tmp_path, f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    assert "read-only" in line.lower() or "Read-only" in line, line


def test_full_disk_store_is_a_clear_error(tmp_path: Path) -> None:
    with _small_filesystem(tmp_path / "full", "size=48k") as store:
        line = _cli_error(tmp_path, f"sqlite:///{store / 'mlflow.db'}")
    assert "cannot be written" in line and ("full" in line or "disk" in line), line


def test_every_torch_load_is_weights_only() -> None:
    """Safe loading: no torch.load in the project may unpickle code."""
    offenders = []
    for path in [*PROJECT_ROOT.joinpath("kd_experiments").rglob("*.py"), *PROJECT_ROOT.joinpath("benchmarks").rglob("*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}: {match.group(0)[:80]}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("experiment", "overrides", "message"),
    [
        ("quickstart", ["scheme.compression_ratio=0.5"], "compression_ratio"),
        ("quickstart", ["scheme.compression_ratio=1e9"], "cannot be reached"),
        ("quickstart", ["data.normal_class=42"], "normal_class"),
        ("rd_smoke", ["scheme.compression_ratio=0.5"], "compression_ratio"),
        ("rd_smoke", ["scheme.compression_ratio=1e12"], "compression_ratio"),
        ("rd_smoke", ["scheme.backbone=no_such_backbone"], "no_such_backbone"),
        ("rd_smoke", ["scheme.weights=nowhere"], "nowhere"),
        ("rd_smoke", ["scheme.weights=file", "scheme.weights_path=/nonexistent/w.pth"], "/nonexistent/w.pth"),
        ("pkd_smoke", ["scheme.mac_compression_ratio=0.5"], "compression_ratio"),
        ("pkd_smoke", ["scheme.mac_compression_ratio=1e12", "scheme.student_width=null"], "compression_ratio"),
        ("pkd_smoke", ["data=mnist", "data.root=/nonexistent/mnist"], "/nonexistent/mnist"),
        ("score_regression_events", ["data.synthetic=false"], "data.background_path"),
        ("score_regression_events", ["data.synthetic=false", "data.background_path=/nonexistent/bg.h5",
                                     "data.signal_paths={x:/nonexistent/x.h5}"], "/nonexistent/bg.h5"),
    ],
)
def test_bad_input_of_every_scheme_fails_its_run_in_one_line(
    compose_cfg, mlflow_uri: str, experiment: str, overrides: list[str], message: str
) -> None:
    from kd_experiments.errors import KDError

    cfg = compose_cfg(f"experiment={experiment}", *fast_overrides(*overrides))
    with pytest.raises(KDError, match=re.escape(message)) as raised:
        train(cfg)
    assert "\n" not in str(raised.value)
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FAILED"]
    assert message in runs[0].data.tags["error"]
