"""Anomaly maps of reverse distillation.

Deng & Li, CVPR 2022 (arXiv 2201.10703), Sec. 3.4, and RD4AD's ``cal_anomaly_map``:
the map of each level is ``1 - cos(student, teacher)`` along channels, up-sampled
bilinearly to the input size; the maps of the levels are *summed* (RD4AD's ``a``
mode; its ``mul`` mode is ``mode="multiply"``), smoothed with a Gaussian of sigma 4
(RD4AD uses ``scipy.ndimage.gaussian_filter``: truncate 4 sigma, reflected borders,
which :func:`gaussian_blur` reproduces on tensors), and the image score is the
maximum of the smoothed map. URD (Liu et al., AAAI 2025) scores the same way, with
its trained teacher in place of the frozen encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("add", "multiply")


def level_maps(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """``1 - cosine similarity`` of each level, ``(B, 1, H, W)`` at ``size``."""
    maps = []
    for student_features, teacher_features in zip(student, teacher, strict=True):
        distance = 1.0 - F.cosine_similarity(student_features, teacher_features, dim=1).unsqueeze(1)
        maps.append(F.interpolate(distance, size=tuple(size), mode="bilinear", align_corners=False))
    return maps


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
    maps = level_maps(student, teacher, size)
    if mode == "add":
        combined = torch.stack(maps).sum(dim=0)
    elif mode == "multiply":
        combined = torch.stack(maps).prod(dim=0)
    else:
        raise ValueError(f"anomaly map mode must be one of {MODES}, got {mode!r}")
    return gaussian_blur(combined, sigma).squeeze(1)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the (smoothed) map, ``(B,)``."""
    return maps.flatten(1).amax(dim=1)


__all__ = ["MODES", "anomaly_map", "gaussian_blur", "gaussian_kernel", "image_scores", "level_maps"]
