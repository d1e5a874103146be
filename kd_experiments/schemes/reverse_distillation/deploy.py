"""Deployable model of reverse distillation and of RD with Expert.

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022
(arXiv 2201.10703); Liu, Wang, Leng, Zhang, "Unlocking the Potential of Reverse Distillation
for Anomaly Detection", AAAI 2025 (arXiv 2412.07579).

:class:`ReverseDistillationDeployable`: the deployed forward pass of both, as one module:
the datamodule's preprocessing, the encoder (RD's frozen pretrained encoder; RD with
Expert's trained teacher encoder), the student (one-class bottleneck, decoder and, with
skip fusion, the fusion blocks), the anomaly map (per-level ``1 - cos``, up-sampled,
combined, Gaussian-smoothed: :func:`kd_experiments.anomaly_maps.anomaly_map`) and the image
score (the map's maximum). Eval-mode output: ``(scores (N,), maps (N, 1, H, W))`` at the
input resolution. The expert of RD with Expert is needed for training only and is not in
it. The reference detector of ``deployed_compression_ratio`` and of the teacher's speed
figures is the same module with a full-width student (RD has no deployable teacher of its
own: the encoder alone does not score images).

See :mod:`kd_experiments.deployable` for the input and output contract.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_experiments.anomaly_maps import anomaly_map, image_scores
from kd_experiments.deployable import DeployableModel, Preprocessing


class ReverseDistillationDeployable(DeployableModel):
    """Raw images -> ``(scores (N,), anomaly maps (N, 1, H, W))`` of encoder + student."""

    produces_map = True

    def __init__(self, preprocessing: Preprocessing, encoder: nn.Module, student: nn.Module,
                 blur_sigma: float, map_mode: str) -> None:
        super().__init__(preprocessing)
        self.encoder = encoder
        self.student = student
        self.blur_sigma = float(blur_sigma)
        self.map_mode = str(map_mode)

    def score(self, normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.encoder(normalised)
        student = self.student(teacher)
        maps = anomaly_map(student, teacher, normalised.shape[-2:], self.blur_sigma, self.map_mode)
        return image_scores(maps), maps.unsqueeze(1)
