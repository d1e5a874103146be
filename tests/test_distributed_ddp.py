"""Two-node DDP on one machine: ``torchrun --nnodes=2 --nproc_per_node=1`` twice (node ranks 0
and 1, rendezvous on 127.0.0.1, gloo) with ``trainer=ddp_multinode``, as one job of a Hydra
multirun. Every test image is scored once, the test metrics equal a one-process run of the
same checkpoint, and only global rank 0 writes to MLflow (one parent, one child).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_experiments.tracking import PARENT_TAG
from tests.conftest import NO_DEPLOY, sqlite_store, train_in_process
from tests.test_mlflow_server import free_port

pytestmark = pytest.mark.cluster  # `make test` runs it, `make test-fast` leaves it out

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
KD_TRAIN = [sys.executable, "-m", "kd_experiments.train"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false",
         *NO_DEPLOY]
TINY_RD = ["data.image_size=32", "data.n_train=12", "data.n_test_good=4", "data.n_test_defect_per_type=2",
           "data.batch_size=4"]
#: experiment -> (overrides, metrics equal to a 1-process test of the checkpoint, metrics logged
#: by the DDP run). P-KDGAN validates on labelled anomalies, scored across both ranks.
CASES = {
    "pkd_smoke": (["experiment=pkd_smoke", "trainer.max_epochs=1", "data.val_anomalies=other_classes"],
                  ("test/image_auroc", "test/teacher_image_auroc"),
                  ("val/image_auroc", "train/student_discriminator_resets")),
    # RD with Expert: a trainable teacher and two parameter groups, the harder case of RD under DDP
    "rd_smoke": (["experiment=rd_smoke", "scheme=rd_expert", *TINY_RD, "trainer.max_epochs=1"],
                 ("test/image_auroc", "test/pixel_auroc", "test/aupro"), ("test/num_test_images",)),
}


def _node(node_rank: int, port: int, overrides: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "kd_experiments.train", "-m",
               *overrides, "trainer=ddp_multinode", "trainer.num_nodes=2",
               f"hydra.sweep.dir={tmp_path / f'node{node_rank}'}"]
    log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(CASES))
def test_two_torchrun_nodes_match_one_process_and_log_one_run(experiment: str, tmp_path: Path) -> None:
    overrides, metrics, logged = CASES[experiment]
    overrides = [*overrides, *QUIET]
    uri = sqlite_store(tmp_path / 'mlflow.db')
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "KD_CACHE_DIR": str(tmp_path / "cache"), "KD_LOG_DIR": str(tmp_path / "logs")}
    port = free_port()
    nodes = [_node(rank, port, overrides, tmp_path, env) for rank in (0, 1)]
    try:  # a node that fails leaves the other waiting in the rendezvous: stop both then
        deadline = time.monotonic() + 600
        while any(node.poll() is None for node in nodes) and time.monotonic() < deadline:
            if any(node.poll() not in (None, 0) for node in nodes):
                break
            time.sleep(0.5)
    finally:
        for node in nodes:
            if node.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)
    logs = [(tmp_path / f"node{rank}.log").read_text(errors="replace") for rank in (0, 1)]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum("[kd-train] " in log for log in logs) == 1, "only global rank 0 prints the run summary"

    checkpoints = list((tmp_path / "node0").rglob("checkpoints/last.ckpt"))
    assert len(checkpoints) == 1 and not list((tmp_path / "node1").rglob("*.ckpt")), "rank 0 saves"
    train_in_process([*overrides, "train=false", f"ckpt_path={checkpoints[0]}"], env, tmp_path / "single")

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 1 and len(runs) == 3, "rank 1 must not create a run or a parent"
    ddp_run = children[0]
    (single_run,) = [r for r in runs if r.info.run_id not in (parents[0].info.run_id, ddp_run.info.run_id)]
    assert ddp_run.data.params["trainer.num_nodes"] == "2"
    assert ddp_run.data.params["trainer.strategy"].startswith("ddp")
    assert ddp_run.info.status == single_run.info.status == parents[0].info.status == "FINISHED"
    assert ddp_run.data.metrics["test/num_test_images"] == single_run.data.metrics["test/num_test_images"]
    for key in metrics:
        assert ddp_run.data.metrics[key] == pytest.approx(single_run.data.metrics[key], abs=1e-5), key
    for key in logged:
        assert 0.0 <= ddp_run.data.metrics[key], key
    if experiment == "rd_smoke":  # every test image scored once, its maps drawn by rank 0
        assert ddp_run.data.metrics["test/num_test_images"] == 10
        plots = {a.path for a in client.list_artifacts(ddp_run.info.run_id, "plots")}
        assert "plots/anomaly_maps.png" in plots
