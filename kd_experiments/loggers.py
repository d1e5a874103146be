"""The Lightning logger of a kd-experiments run (:class:`KDMLFlowLogger`).

Apart from :mod:`kd_experiments.tracking`, which owns the MLflow run and is imported by
tools that never train (``kd-report``, ``kd-export``): those start without loading Lightning.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger


class KDMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into a run whose life
    :class:`kd_experiments.tracking.RunTracker` owns.

    Two differences from the stock logger: hyper-parameters are not logged (the whole
    resolved config already is, flattened, by the tracker; logging them twice with other
    names makes MLflow's immutable params collide), and ``finalize`` does not close the
    run (Lightning calls it after ``fit``, before ``test``; the tracker closes the run
    once, with the true final status).
    """

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        return None

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
