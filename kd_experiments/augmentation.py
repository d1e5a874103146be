"""Mild random views of images, for students that learn from a teacher's labels of them.

A supervised student of an unsupervised detector (Pol et al., "Knowledge Distillation for
Anomaly Detection", arXiv 2310.06047) is not limited to the teacher's training images:
the teacher labels any image it is shown. :func:`random_views` makes the images such a
student can be shown beyond the training set: each a small random similarity transform
(rotation, shift, isotropic scale; reflection at the borders, so no black corners appear
that the teacher would flag) and a small brightness and contrast change. The *teacher*
scores every view, so a view that is no longer normal for it (a transistor turned too
far) is labelled as such: nothing is assumed about which transformations keep an image
normal.

Used by the map-regression scheme (``scheme.augment_per_image``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_experiments.errors import ConfigError


def check_view_settings(degrees: float, translate: float, scale: float, colour: float) -> None:
    """One :class:`ConfigError` naming the first out-of-range setting of :func:`random_views`."""
    for name, value, high in (("augment_degrees", degrees, 180.0), ("augment_translate", translate, 0.5),
                              ("augment_scale", scale, 0.5), ("augment_colour", colour, 1.0)):
        if not 0.0 <= float(value) <= high:
            raise ConfigError(f"scheme.{name} must be in [0, {high:g}], got {value}")


def random_views(
    images: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, translate: float = 0.04,
    scale: float = 0.08, colour: float = 0.1,
) -> torch.Tensor:
    """One random view of each image ``(B, C, H, W)`` in [0, 1] (same shape, in [0, 1]).

    Rotation uniform in ``[-degrees, degrees]``, shift uniform in ``[-translate, translate]``
    of the side per axis, scale uniform in ``[1 - scale, 1 + scale]``, sampled bilinearly
    with reflection at the borders; then brightness and contrast factors uniform in
    ``[1 - colour, 1 + colour]`` (contrast about each image's mean). Deterministic given
    ``generator``.
    """
    check_view_settings(degrees, translate, scale, colour)
    count = images.shape[0]

    def uniform(*size: int) -> torch.Tensor:  # in [-1, 1]
        return 2.0 * torch.rand(*size, generator=generator) - 1.0

    angle = uniform(count) * math.radians(float(degrees))
    zoom = 1.0 + uniform(count) * float(scale)
    shift = uniform(count, 2) * 2.0 * float(translate)  # normalised coordinates span 2
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], -2)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (1.0 + uniform(count) * float(colour)).view(-1, 1, 1, 1).to(images)
    contrast = (1.0 + uniform(count) * float(colour)).view(-1, 1, 1, 1).to(images)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return (((views - mean) * contrast + mean) * brightness).clamp(0.0, 1.0)


__all__ = ["check_view_settings", "random_views"]
