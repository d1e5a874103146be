"""The map-regression loss: the student's map against the teacher's, weighted toward anomalies.

Maps are compared at the student's resolution (stride 4), in units of the teacher's
normal-image map scale (both divided by it), so one loss scale fits every teacher
(reverse distillation's ``1 - cos`` sums and PatchCore's nearest-neighbour distances
differ by an order of magnitude). ``l1`` is the mean absolute error, ``mse`` the mean
squared error. With ``anomaly_weight > 0`` a pixel counts ``1 + anomaly_weight`` times
when it lies in a synthetic anomaly's mask or the teacher's map exceeds the normal scale
(``target > 1``): anomalous pixels are a few percent of the training pixels, and a
student that flattens them loses exactly what it is for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("l1", "mse")


def anomaly_weights(target: torch.Tensor, masks: torch.Tensor | None, anomaly_weight: float) -> torch.Tensor:
    """Per-pixel weights ``1 + anomaly_weight * [in a mask or target > 1]`` (shape of ``target``)."""
    anomalous = target > 1.0
    if masks is not None:
        anomalous = anomalous | (masks > 0.5)
    return 1.0 + float(anomaly_weight) * anomalous.float()


def map_loss(
    student: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None,
    loss: str = "l1", anomaly_weight: float = 0.0,
) -> torch.Tensor:
    """Weighted mean of the per-pixel error between ``student`` and ``target`` ``(B, 1, h, w)``."""
    if loss == "l1":
        error = (student - target).abs()
    elif loss == "mse":
        error = (student - target) ** 2
    else:
        raise ValueError(f"map loss must be one of {LOSSES}, got {loss!r}")
    if anomaly_weight <= 0:
        return error.mean()
    weights = anomaly_weights(target, masks, anomaly_weight)
    return (weights * error).sum() / weights.sum()


def downsample_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks ``(B, 1, H, W)`` in {0, 1} to ``size``: the fraction of anomalous pixels per cell."""
    return F.adaptive_avg_pool2d(masks.float(), size)
