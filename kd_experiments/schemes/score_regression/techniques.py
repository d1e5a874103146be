"""Training techniques of unsupervised-to-supervised compression, as pure functions.

Pol, Govorkova, Ojalvo, Pierini, Chernyavskaya, Elmer, Harris, Gronroos,
"Knowledge Distillation for Anomaly Detection", arXiv 2310.06047 (2023), Sec. 3:
the student only ever sees normal training images, so it is asked to extrapolate the
teacher's score to anomalies it never saw. Their remedies, and one of ours:

- **pseudo outlier exposure**: the student also regresses the teacher's score on images
  of another data set (Fashion-MNIST for MNIST and the reverse). The paper's code
  (AdrianAlan/kd4ad, ``experiment-outlier-exposure.py``) takes the *test* split of the
  other set and runs the outlier batches after each epoch; here the other set's
  *training* split is used (no test image of any set is touched) and an outlier batch
  is concatenated to each normal batch of the student step. Where no second image set
  is at hand (the offline digits demo), ``photo_patches`` draws the outliers from
  scikit-learn's two bundled sample photographs instead: random square grey crops
  resized to 28x28, natural-image outliers in the spirit of Hendrycks et al.,
  "Deep Anomaly Detection with Outlier Exposure" (ICLR 2019).
- **noise exposure**: the student sees the normal batch with Gaussian noise added
  (std 0.1, clipped to [0, 1], as the authors' ``experiment-noise-exposure.py``),
  labelled by the teacher's score of the noisy images.
- **corruption exposure** (ours, not in the paper): the student also sees corrupted
  copies of the normal batch, labelled by the teacher's score of them: a stroke drawn
  across the image, a block erased, or the image blended with another normal image of
  the batch (:func:`corrupt_images`). Pseudo outliers from another set lie far from the
  normal class; these lie next to it, where the scores of real anomalies fall, so a
  small student learns the teacher's ranking where it decides (in the spirit of the
  synthetic anomalies of DRAEM, Zavrtanik et al., ICCV 2021, and CutPaste, Li et al.,
  CVPR 2021).
- **warp exposure** (ours, not in the paper): copies of the normal batch under a random
  affine map and a smooth elastic displacement (:func:`warp_images`, the distortions of
  Simard et al., ICDAR 2003), labelled by the teacher's score of them. Warped normal
  images are shaped like the data (strokes of the same width and intensity) but are no
  longer normal; a student trained on many of them learns the teacher's score on
  stroke images in general rather than on one class, so what it does on an unseen
  class depends less on its initialisation.
- **tail re-weighting** (ours, not in the paper): the per-sample L1 loss is weighted by
  ``1 + strength * relu(z)``, ``z`` the teacher score standardised within the batch,
  weights renormalised to mean 1; the student spends its few parameters on the high
  scores, where an anomaly threshold lies.

:func:`student_batch` assembles what a student step sees from these switches; the
Lightning scheme and the benchmark loops both call it, so they compute the same
targets with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_experiments.errors import ConfigError

#: the other data set of pseudo outlier exposure, as in the paper
OUTLIER_PARTNER: dict[str, str] = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
#: outlier sets that ship with the installed packages (no ``root``, no download)
BUNDLED_OUTLIERS: tuple[str, ...] = ("photo_patches",)
#: the outlier sets ``scheme.outlier_exposure.dataset`` accepts
OUTLIER_SETS: tuple[str, ...] = (*sorted(OUTLIER_PARTNER), *BUNDLED_OUTLIERS)


@dataclass(frozen=True)
class Techniques:
    """Which student-side techniques are on (co-learning is a schedule, see the scheme)."""

    noise_std: float = 0.0
    noise_clip: tuple[float, float] | None = (0.0, 1.0)
    tail_strength: float = 0.0
    corruption_copies: int = 0
    warp_copies: int = 0

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ConfigError(f"scheme.noise_exposure.std must be >= 0, got {self.noise_std}")
        if self.corruption_copies < 0:
            raise ConfigError(f"scheme.corruption_exposure.copies must be >= 0, got {self.corruption_copies}")
        if self.warp_copies < 0:
            raise ConfigError(f"scheme.corruption_exposure.warp_copies must be >= 0, got {self.warp_copies}")
        if self.tail_strength < 0:
            raise ConfigError(f"scheme.tail_reweighting.strength must be >= 0, got {self.tail_strength}")


def add_noise(
    images: torch.Tensor, std: float, clip: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``images + std * N(0, 1)``, clipped to ``clip`` (the authors' noise exposure)."""
    noise = torch.randn(images.shape, generator=generator, device="cpu").to(images)
    noisy = images + std * noise
    return noisy.clamp(*clip) if clip is not None else noisy


def corrupt_images(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One corrupted copy of each image ``(B, C, H, W)`` in [0, 1], each by one seeded
    random corruption (``generator``: the random source; ``None``: torch's global one):

    - **stroke**: a line segment between two random points, 1 to 3 pixels wide (per side,
      ``H / 28`` scaled), drawn at full intensity;
    - **erase**: a random block of 1/4 to 1/2 of each side set to 0;
    - **blend**: the mean of the image and another image of the batch, shifted by up to
      a quarter of the side.
    """
    count, _, height, width = images.shape
    draw = generator  # None: torch's global generator (seeded by the run's seed)

    def uniform(size: int) -> torch.Tensor:
        return torch.rand(size, generator=draw)

    kinds = torch.randint(3, (count,), generator=draw)
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    # stroke: distance of every pixel to a random segment (a, b)
    ay, ax, by, bx = uniform(count) * height, uniform(count) * width, uniform(count) * height, uniform(count) * width
    dy, dx = (by - ay).view(-1, 1, 1), (bx - ax).view(-1, 1, 1)
    along = (((ys - ay.view(-1, 1, 1)) * dy + (xs - ax.view(-1, 1, 1)) * dx) / (dy**2 + dx**2).clamp_min(1e-6)).clamp(0, 1)
    distance = torch.hypot(ys - ay.view(-1, 1, 1) - along * dy, xs - ax.view(-1, 1, 1) - along * dx)
    half_width = (0.5 + uniform(count) * 1.0).view(-1, 1, 1) * max(height, width) / 28
    stroke = (distance <= half_width).float().unsqueeze(1)
    # erase: a block of random size and place
    block_h, block_w = (height * (0.25 + 0.25 * uniform(count))).long(), (width * (0.25 + 0.25 * uniform(count))).long()
    top, left = (uniform(count) * (height - block_h + 1)).long(), (uniform(count) * (width - block_w + 1)).long()
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + block_h).view(-1, 1, 1)) & (xs >= left.view(-1, 1, 1))
              & (xs < (left + block_w).view(-1, 1, 1))).unsqueeze(1)
    # blend: another image of the batch, shifted
    partner = images[torch.randint(count, (count,), generator=draw)]
    shift_y, shift_x = int(torch.randint(-(height // 4), height // 4 + 1, (1,), generator=draw)), int(
        torch.randint(-(width // 4), width // 4 + 1, (1,), generator=draw))
    partner = torch.roll(partner, shifts=(shift_y, shift_x), dims=(-2, -1))
    kinds = kinds.view(-1, 1, 1, 1).to(images.device)
    stroked = torch.maximum(images, stroke.to(images))
    erased = images.masked_fill(inside.to(images.device), 0.0)
    blended = 0.5 * (images + partner)
    return torch.where(kinds == 0, stroked, torch.where(kinds == 1, erased, blended))


def warp_images(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One warped copy of each image ``(B, C, H, W)`` in [0, 1], seeded by ``generator``
    (``None``: torch's global one): a random affine map (rotation up to 45 degrees, scale
    0.7 to 1.3 per axis, shear up to 0.4, shift up to an eighth of the side) composed with
    an elastic displacement field (uniform noise smoothed by a Gaussian of sigma a sixth of
    the side, scaled to at most a sixth of the side; Simard, Steinkraus and Platt, ICDAR
    2003), sampled bilinearly with zeros outside.
    """
    count, _, height, width = images.shape

    def uniform(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator)

    angle = (2 * uniform(count) - 1) * math.pi / 4
    scale = 0.7 + 0.6 * uniform(count, 2)
    shear = (2 * uniform(count) - 1) * 0.4
    shift = (2 * uniform(count, 2) - 1) * 0.25  # normalised coordinates span 2: a quarter is an eighth
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.eye(2).repeat(count, 1, 1)
    shearing[:, 0, 1] = shear
    linear = rotation @ shearing @ torch.diag_embed(scale)
    theta = torch.cat([linear, shift.unsqueeze(-1)], -1)
    grid = F.affine_grid(theta, [count, 1, height, width], align_corners=False)
    # elastic part: smoothed noise, normalised per image to a random amplitude
    sigma = max(height, width) / 6
    radius = int(math.ceil(2 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    field = 2 * uniform(count, 2, height, width) - 1
    field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="circular"), taps.view(1, 1, 1, -1).repeat(2, 1, 1, 1), groups=2)
    field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="circular"), taps.view(1, 1, -1, 1).repeat(2, 1, 1, 1), groups=2)
    amplitude = uniform(count).view(-1, 1, 1, 1) * 2 / 6  # up to a sixth of the side (normalised span 2)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) * amplitude
    grid = grid + field.permute(0, 2, 3, 1)
    warped = F.grid_sample(images, grid.to(images), mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.clamp(0.0, 1.0)


def tail_weights(targets: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-sample weights ``1 + strength * relu(z)`` normalised to mean 1 (``z``: the
    batch-standardised target). ``strength=0`` gives ones."""
    if strength == 0 or targets.numel() < 2:
        return torch.ones_like(targets)
    z = (targets - targets.mean()) / targets.std().clamp_min(1e-8)
    weights = 1.0 + strength * torch.relu(z)
    return (weights / weights.mean()).detach()


def weighted_l1(predictions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The student's loss: L1 (as the paper), optionally weighted per sample."""
    if weights is None:
        return F.l1_loss(predictions, targets)
    return (weights * (predictions - targets).abs()).mean()


def student_batch(
    images: torch.Tensor,
    teacher_score: Callable[[torch.Tensor], torch.Tensor],
    techniques: Techniques,
    outliers: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs, targets and loss weights of one student step.

    Args:
        images: the normal batch.
        teacher_score: the (frozen, eval-mode) teacher's score function ``(B, ...) -> (B,)``.
        techniques: noise, corruption and warp exposure and tail re-weighting settings.
        outliers: a batch of pseudo outliers to append (outlier exposure), or ``None``.

    Returns:
        ``(inputs, targets, weights)``; targets and weights carry no gradient.
    """
    inputs = images
    if techniques.noise_std > 0:
        inputs = add_noise(images, techniques.noise_std, techniques.noise_clip, generator)
    if techniques.corruption_copies > 0:
        inputs = torch.cat([inputs, *[corrupt_images(images, generator) for _ in range(techniques.corruption_copies)]])
    if techniques.warp_copies > 0:
        inputs = torch.cat([inputs, *[warp_images(images, generator) for _ in range(techniques.warp_copies)]])
    if outliers is not None:
        inputs = torch.cat([inputs, outliers.to(inputs)])
    with torch.no_grad():
        targets = teacher_score(inputs).detach().float()
    return inputs, targets, tail_weights(targets, techniques.tail_strength)


def photo_patches(count: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    """``count`` grey crops of scikit-learn's bundled sample photographs, float
    ``(count, 1, size, size)`` in [0, 1]: square crops of a seeded random side
    (``size`` to 160 pixels) at seeded random places, resized with antialiasing."""
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(image, dtype=torch.float32).mean(dim=-1) / 255.0 for image in load_sample_images().images]
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(torch.randint(size, min(160, *photo.shape) + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[0] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        crop = photo[top : top + side, left : left + side][None, None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(crops).clamp(0.0, 1.0)


def load_outlier_images(
    dataset: str, root: str | Path | None, max_images: int | None = None, seed: int = 0
) -> torch.Tensor:
    """The pseudo outliers as float ``(N, 1, 28, 28)`` in [0, 1]: the *training* images of
    ``dataset`` (an IDX set in ``root``), or ``photo_patches`` (bundled; ``root`` unused,
    ``max_images`` crops, 2,000 by default).

    A seeded draw of ``max_images`` when given. IDX sets are read through
    :func:`kd_experiments.data.one_class.load_idx_split`, so a missing or corrupt file
    raises its one-line :class:`~kd_experiments.errors.DataError`.
    """
    from kd_experiments.data.one_class import load_idx_split

    if dataset not in OUTLIER_SETS:
        raise ConfigError(f"scheme.outlier_exposure.dataset={dataset!r}: use one of {list(OUTLIER_SETS)}")
    if dataset == "photo_patches":
        return photo_patches(2000 if max_images is None else int(max_images), seed)
    images, _ = load_idx_split(root, "train")
    if max_images is not None and max_images < len(images):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images[order[:max_images].sort().values]
    return images.unsqueeze(1).float() / 255.0


class OutlierSampler:
    """Draws seeded random batches from an in-memory outlier set (pseudo outlier exposure)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if len(images) == 0:
            raise ConfigError("scheme.outlier_exposure: the outlier set is empty")
        self.images = images
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch of outliers, drawn with ``generator`` when given (a generator seeded per
        training step makes the draw independent of what came before, so a resumed run draws
        as an uninterrupted one), else with the sampler's own."""
        count = min(batch_size or self.batch_size, len(self.images))
        index = torch.randint(len(self.images), (count,), generator=generator or self.generator)
        return self.images[index]
