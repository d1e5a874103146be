"""Anomaly maps shared by every map-producing scheme: per-level maps, up-sampling, blur, scores.

A feature-based scheme compares two sets of multi-level feature maps (a student's and a
teacher's, or an image's and its nearest normal neighbours') level by level, brings each
level's distance map to the input resolution, combines the levels, smooths the result
and takes an image score from it. The conventions are reverse distillation's:

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
CVPR 2022 (arXiv 2201.10703), Sec. 3.4, and RD4AD's ``cal_anomaly_map``: the map of each
level is ``1 - cos(student, teacher)`` along channels (:func:`level_maps`), up-sampled
bilinearly to the input size (:func:`upsample`); the maps of the levels are *summed*
(RD4AD's ``a`` mode; its ``mul`` mode is ``mode="multiply"``, :func:`combine`),
smoothed with a Gaussian of sigma 4 (RD4AD uses ``scipy.ndimage.gaussian_filter``:
truncate 4 sigma, reflected borders, which :func:`gaussian_blur` reproduces on tensors),
and the image score is the maximum of the smoothed map (:func:`image_scores`). URD (Liu
et al., AAAI 2025) scores the same way, with its trained teacher in place of the frozen
encoder; PatchCore (Roth et al., CVPR 2022) up-samples and smooths its patch distance
maps the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("add", "multiply")


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear up-sampling of ``(B, C, h, w)`` maps to ``size`` ``(H, W)``."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def level_maps(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """``1 - cosine similarity`` of each level, ``(B, 1, H, W)`` at ``size``."""
    maps = []
    for student_features, teacher_features in zip(student, teacher, strict=True):
        distance = 1.0 - F.cosine_similarity(student_features, teacher_features, dim=1).unsqueeze(1)
        maps.append(upsample(distance, size))
    return maps


def combine(maps: Sequence[torch.Tensor], mode: str = "add") -> torch.Tensor:
    """The per-level maps (same shape) summed (``add``) or multiplied (``multiply``)."""
    if mode == "add":
        return torch.stack(list(maps)).sum(dim=0)
    if mode == "multiply":
        return torch.stack(list(maps)).prod(dim=0)
    raise ValueError(f"anomaly map mode must be one of {MODES}, got {mode!r}")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian, radius ``int(4 sigma + 0.5)`` (scipy's default truncation), sum 1."""
    radius = int(4.0 * sigma + 0.5)
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, 1, H, W)`` maps with reflected borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    # scipy's "reflect" is torch's "symmetric"; torch offers "reflect" (no edge repeat) and
    # "replicate": reflect, limited to what the map's size allows (the difference is < 1 pixel).
    pad_y, pad_x = min(radius, height - 1), min(radius, width - 1)
    out = F.pad(maps, (0, 0, pad_y, pad_y), mode="reflect") if pad_y else maps
    out = F.conv2d(out, kernel[radius - pad_y : radius + pad_y + 1].view(1, 1, -1, 1))
    out = F.pad(out, (pad_x, pad_x, 0, 0), mode="reflect") if pad_x else out
    out = F.conv2d(out, kernel[radius - pad_x : radius + pad_x + 1].view(1, 1, 1, -1))
    return out


def anomaly_map(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    size: Sequence[int],
    sigma: float = 4.0,
    mode: str = "add",
) -> torch.Tensor:
    """Smoothed anomaly map ``(B, H, W)`` at ``size`` (the input resolution)."""
    return gaussian_blur(combine(level_maps(student, teacher, size), mode), sigma).squeeze(1)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the (smoothed) map, ``(B,)``."""
    return maps.flatten(1).amax(dim=1)


__all__ = [
    "MODES",
    "anomaly_map",
    "combine",
    "gaussian_blur",
    "gaussian_kernel",
    "image_scores",
    "level_maps",
    "upsample",
]
