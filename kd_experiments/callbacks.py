"""Lightning callbacks of the framework.

- :class:`TrackingCheckpointTags` writes the scheme name and the MLflow run id into every
  checkpoint, so ``kd-train ... ckpt_path=<last.ckpt>`` resumes into the same MLflow run
  and a checkpoint of another scheme is refused in one line.
- :class:`ChannelsLast` puts the model in the ``channels_last`` memory format (faster
  convolutions with tensor cores on recent GPUs; ``channels_last=true`` in the config).
- :class:`InterruptCheckpoint` saves ``interrupted.ckpt`` when the user presses Ctrl-C
  (the run then ends KILLED); ``last.ckpt`` of the last finished epoch is kept as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from kd_experiments.checkpoints import RUN_ID_KEY, SCHEME_KEY


class TrackingCheckpointTags(L.Callback):
    """Store ``kd_scheme`` and ``kd_mlflow_run_id`` in each checkpoint."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[SCHEME_KEY] = getattr(pl_module, "scheme_name", type(pl_module).__name__)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger._run_id:
                checkpoint[RUN_ID_KEY] = logger._run_id


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C, save ``<dirpath>/interrupted.ckpt`` before Lightning shuts down."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.dirpath / "interrupted.ckpt")


class ChannelsLast(L.Callback):
    """Convert the LightningModule to ``torch.channels_last`` before fitting and testing.

    Convolutions then run in NHWC, which tensor cores prefer (GPU runs with
    ``precision=bf16-mixed`` or ``16-mixed``); inputs follow the weights' format.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch

        pl_module.to(memory_format=torch.channels_last)
