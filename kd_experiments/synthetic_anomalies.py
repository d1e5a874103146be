"""Synthetic anomalies for training: Perlin-noise masks blended with textures.

Follows the recipe of DRAEM (Zavrtanik et al., ICCV 2021), which URD (Liu et al.,
AAAI 2025, Sec. 3.2; ``utils/perlin.py`` in hito2448/URD) adopts: a 2-D Perlin noise
field with a random lattice resolution ``2**a x 2**b`` (``a, b`` uniform in
``[0, max_scale)``) is thresholded at 0.5 to give an anomaly mask ``M``; a texture
``A`` is blended in, ``I' = (1 - M) * I + M * ((1 - beta) * A + beta * I)`` with
``beta ~ U(0, beta_max)`` (0.8 in DRAEM).

Where DRAEM and URD read texture images from the DTD data set (a download), nothing is
downloaded here. Textures are

- ``procedural``: colour Perlin fields (two random colours mixed by multi-octave
  Perlin noise, plus an optional stripe pattern), or
- ``in_set``: another training image of the same batch, flipped / rotated by a
  multiple of 90 degrees, i.e. textures of the set itself,

chosen per image (``mixed``: half each). Everything runs on tensors on the
images' device, with an explicit ``torch.Generator`` (deterministic given the seed).
Shared by every scheme that trains on synthetic anomalies (RD with Expert, map regression).
``foreground`` restricts the masks to an estimate of the object, as URD does for object
categories (its ``get_forehead_mask``): ``dark`` keeps the pixels at or below the image's
Otsu threshold of grey intensity (URD's rule for screw and capsule, dark parts on a bright
background), ``bright`` those above it; ``none`` (the default) blends anywhere. URD's
GrabCut estimate for the other object categories is not offered; for bottle the object
fills the frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kd_experiments.errors import ConfigError

TEXTURE_SOURCES = ("procedural", "in_set", "mixed")
#: where masks may fall: anywhere, or on the pixels darker / brighter than the Otsu threshold
FOREGROUND_RULES = ("none", "dark", "bright")
#: URD's rule per MVTec AD category (its train.py): an Otsu foreground, dark on bright, for screw
#: and capsule; GrabCut for the other objects (not offered here), anywhere on the textures and
#: transistor. Categories not named here draw anywhere.
URD_FOREGROUND: dict[str, str] = {"screw": "dark", "capsule": "dark"}


def urd_foreground(category: str | None) -> str:
    """The foreground rule URD uses for an MVTec AD ``category`` (``none`` when it has none here);
    the config resolver ``${kd.urd_foreground:${data.category}}``."""
    return URD_FOREGROUND.get(str(category), "none")


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    height: int, width: int, resolution: tuple[int, int], generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A ``(height, width)`` Perlin noise field with ``resolution`` lattice cells, values ~[-1, 1]."""
    cells_y, cells_x = resolution
    angles = 2.0 * math.pi * torch.rand(cells_y + 1, cells_x + 1, generator=generator).to(device)
    gradient_x, gradient_y = torch.cos(angles), torch.sin(angles)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * cells_y / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * cells_x / width
    y0 = ys.floor().long().clamp(max=cells_y - 1)
    x0 = xs.floor().long().clamp(max=cells_x - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    y0, x0 = y0[:, None], x0[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        return gradient_x[y0 + dy, x0 + dx] * (fx - dx) + gradient_y[y0 + dy, x0 + dx] * (fy - dy)

    u, v = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), v)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), v)
    return math.sqrt(2.0) * torch.lerp(top, bottom, u)


def _random_resolution(max_scale: int, generator: torch.Generator) -> tuple[int, int]:
    exponents = torch.randint(0, max_scale, (2,), generator=generator)
    return int(2 ** exponents[0]), int(2 ** exponents[1])


def perlin_mask(
    height: int, width: int, generator: torch.Generator, max_scale: int = 6, threshold: float = 0.5,
    device: torch.device | str = "cpu", min_fraction: float = 0.002, attempts: int = 8,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """A binary ``(height, width)`` anomaly mask: thresholded Perlin noise, inside ``region`` (a
    ``(height, width)`` 0/1 tensor) when given; drawn again while it covers less than
    ``min_fraction`` of the image (at most ``attempts`` times)."""
    mask = torch.zeros(height, width, device=device)
    for _ in range(attempts):
        noise = perlin_noise(height, width, _random_resolution(max_scale, generator), generator, device)
        mask = (noise > threshold).float()
        if region is not None:
            mask = mask * region
        if mask.mean() >= min_fraction:
            break
    return mask


def otsu_threshold(grey: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (scikit-image's ``threshold_otsu`` on a ``bins``-bin
    histogram of [0, 1], taken on the values' device): the upper edge of the last bin of the low
    class, so values at or below it form that class."""
    import numpy as np
    from skimage.filters import threshold_otsu

    counts = torch.histc(grey.detach().float().flatten(), bins=bins, min=0.0, max=1.0).cpu().numpy()
    if np.count_nonzero(counts) < 2:  # one grey level: nothing to split, the first bin's edge
        return 1.0 / bins
    centres = (np.arange(bins) + 0.5) / bins
    return float(threshold_otsu(hist=(counts, centres))) + 0.5 / bins


def foreground_mask(pixels: torch.Tensor, rule: str) -> torch.Tensor | None:
    """The ``(height, width)`` 0/1 foreground estimate of one ``(C, H, W)`` image in [0, 1] by
    ``rule`` (see :data:`FOREGROUND_RULES`), or ``None`` for ``none`` (the whole image)."""
    if rule == "none":
        return None
    grey = pixels.mean(0)
    threshold = otsu_threshold(grey)
    return (grey <= threshold).float() if rule == "dark" else (grey > threshold).float()


def procedural_texture(
    channels: int, height: int, width: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A ``(channels, height, width)`` texture in [0, 1]: two colours mixed by multi-octave noise."""
    mix = torch.zeros(height, width, device=device)
    amplitude = 1.0
    for octave in range(3):
        cells = 2 ** (octave + int(torch.randint(1, 4, (1,), generator=generator)))
        mix = mix + amplitude * perlin_noise(height, width, (cells, cells), generator, device)
        amplitude *= 0.5
    if torch.rand(1, generator=generator).item() < 0.3:  # stripes, like woven or brushed surfaces
        angle = torch.rand(1, generator=generator).item() * math.pi
        frequency = 4 + 12 * torch.rand(1, generator=generator).item()
        ys = torch.linspace(0, 1, height, device=device)[:, None]
        xs = torch.linspace(0, 1, width, device=device)[None, :]
        mix = mix + torch.sin(2 * math.pi * frequency * (xs * math.cos(angle) + ys * math.sin(angle)))
    mix = torch.sigmoid(2.5 * mix)[None]
    colour_a = torch.rand(channels, 1, 1, generator=generator).to(device)
    colour_b = torch.rand(channels, 1, 1, generator=generator).to(device)
    return colour_a * (1 - mix) + colour_b * mix


class SyntheticAnomalies:
    """Make anomalous copies of a batch of normalised images, with their masks.

    Args:
        mean, std: the images' normalisation (blending happens on [0, 1] pixels).
        texture_source: ``procedural``, ``in_set`` or ``mixed``.
        beta_max: upper bound of the opacity of the original image inside the mask.
        max_scale: Perlin lattice resolutions are ``2**a``, ``a < max_scale``.
        seed: seed of the generator (each DDP rank should pass its own).
        foreground: where masks may fall, one of :data:`FOREGROUND_RULES` (see the module docstring).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        texture_source: str = "mixed",
        beta_max: float = 0.8,
        max_scale: int = 6,
        seed: int = 0,
        foreground: str = "none",
    ) -> None:
        if foreground not in FOREGROUND_RULES:
            raise ConfigError(f"scheme.synthetic_foreground must be one of {FOREGROUND_RULES}, got {foreground!r}")
        if texture_source not in TEXTURE_SOURCES:
            raise ConfigError(f"scheme.texture_source must be one of {TEXTURE_SOURCES}, got {texture_source!r}")
        if not 0.0 <= beta_max < 1.0:
            raise ConfigError(f"scheme.anomaly_beta_max must be in [0, 1), got {beta_max}")
        self.mean = torch.tensor(tuple(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(tuple(std)).view(1, -1, 1, 1)
        self.texture_source = texture_source
        self.beta_max = beta_max
        self.max_scale = max_scale
        self.foreground = foreground
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomalous images (B, C, H, W), masks (B, 1, H, W) in {0, 1})``."""
        batch, channels, height, width = images.shape
        device = images.device
        mean, std = self.mean.to(device), self.std.to(device)
        pixels = (images * std + mean).clamp(0.0, 1.0)
        masks = torch.stack(
            [perlin_mask(height, width, self.generator, self.max_scale, device=device,
                         region=foreground_mask(pixels[index], self.foreground)) for index in range(batch)]
        ).unsqueeze(1)
        textures = []
        for index in range(batch):
            source = self.texture_source
            if source == "mixed":
                source = "in_set" if torch.rand(1, generator=self.generator).item() < 0.5 else "procedural"
            if source == "in_set" and batch > 1:
                other = (index + int(torch.randint(1, batch, (1,), generator=self.generator))) % batch
                texture = torch.rot90(pixels[other], int(torch.randint(0, 4, (1,), generator=self.generator)), (1, 2))
                if texture.shape[-2:] != (height, width):  # non-square images: no odd rotations
                    texture = pixels[other]
                if torch.rand(1, generator=self.generator).item() < 0.5:
                    texture = texture.flip(-1)
            else:
                texture = procedural_texture(channels, height, width, self.generator, device)
            textures.append(texture)
        texture_batch = torch.stack(textures)
        beta = (torch.rand(batch, 1, 1, 1, generator=self.generator) * self.beta_max).to(device)
        blended = (1 - masks) * pixels + masks * ((1 - beta) * texture_batch + beta * pixels)
        return (blended - mean) / std, masks
