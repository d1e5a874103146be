"""Losses of reverse distillation and of RD with an expert.

- :func:`distillation_loss`: RD's knowledge-distillation loss (Deng & Li, CVPR 2022,
  Eq. 2-3), ``sum_k mean_b (1 - cos(vec(s_k), vec(t_k)))``: each level's feature map is
  flattened *per image* before the cosine, as in RD4AD's ``loss_fucntion`` (the paper
  writes a per-pixel cosine averaged over the map; the authors' code, which we follow,
  and URD's ``loss_distil`` use the flattened form).
- :func:`pixel_cosine_loss`: the per-pixel form, ``sum_k mean(1 - cos)`` over pixels
  (URD's ``loss_distil_p``), used for the teacher on normal images.
- :func:`anomaly_separation_loss`: URD's teacher term on synthetic anomalies
  (``loss_distil_aug_p``): the per-pixel distance ``1 - cos(t(aug), e(normal))`` is
  regressed (L1) onto the binary synthetic mask resized to each level, so the teacher
  keeps the expert's features on normal pixels and moves away on anomalous ones.
- :func:`teacher_loss` and :func:`student_loss`: the totals of URD's ``Teacher.loss``
  and ``Student.loss`` (Liu et al., AAAI 2025, Sec. 3.2, Eq. 4-7): the student learns
  the *normal* teacher and expert features from both the clean and the anomalous
  input, so it cannot copy anomalies through the skip connections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Features = Sequence[torch.Tensor]


def distillation_loss(student: Features, target: Features) -> torch.Tensor:
    """RD4AD's loss: per level, ``1 - cos`` of the flattened maps, averaged over the batch; summed."""
    total = student[0].new_zeros(())
    for student_features, target_features in zip(student, target, strict=True):
        cosine = F.cosine_similarity(student_features.flatten(1), target_features.flatten(1), dim=1)
        total = total + (1.0 - cosine).mean()
    return total


def pixel_cosine_loss(features: Features, target: Features) -> torch.Tensor:
    """Per-pixel ``1 - cos`` along channels, averaged over pixels; summed over levels."""
    total = features[0].new_zeros(())
    for feature, target_feature in zip(features, target, strict=True):
        total = total + (1.0 - F.cosine_similarity(feature, target_feature, dim=1)).mean()
    return total


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Binary ``(B, 1, h, w)`` mask at a feature level's size (bilinear, then >= 0.5)."""
    resized = F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False)
    return (resized >= 0.5).to(mask.dtype)


def anomaly_separation_loss(features: Features, normal_target: Features, mask: torch.Tensor) -> torch.Tensor:
    """L1 between the per-pixel distance ``1 - cos(features, normal_target)`` and the mask."""
    total = features[0].new_zeros(())
    for feature, target_feature in zip(features, normal_target, strict=True):
        distance = 1.0 - F.cosine_similarity(feature, target_feature, dim=1).unsqueeze(1)
        total = total + F.l1_loss(distance, resize_mask(mask, feature.shape[-2:]))
    return total


def teacher_loss(
    teacher_normal: Features,
    expert_normal: Features,
    teacher_anomalous: Features | None = None,
    expert_anomalous: Features | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """URD's teacher objective: follow the expert on normal images; on synthetic anomalies
    separate anomalous pixels from the expert's normal features and keep the image-level
    agreement with the expert's view of the anomalous image."""
    loss = pixel_cosine_loss(teacher_normal, expert_normal)
    if teacher_anomalous is not None:
        assert expert_anomalous is not None and mask is not None
        loss = loss + anomaly_separation_loss(teacher_anomalous, expert_normal, mask)
        loss = loss + distillation_loss(teacher_anomalous, expert_anomalous)
    return loss


def student_loss(
    student_normal: Features,
    teacher_normal: Features,
    student_anomalous: Features | None = None,
    expert_normal: Features | None = None,
) -> torch.Tensor:
    """Student objective: RD's loss towards the teacher's normal features; with synthetic
    anomalies also from the anomalous input; with an expert the same terms towards the
    expert's normal features (URD's ``Student.loss``)."""
    loss = distillation_loss(student_normal, teacher_normal)
    if student_anomalous is not None:
        loss = loss + distillation_loss(student_anomalous, teacher_normal)
    if expert_normal is not None:
        loss = loss + distillation_loss(student_normal, expert_normal)
        if student_anomalous is not None:
            loss = loss + distillation_loss(student_anomalous, expert_normal)
    return loss
