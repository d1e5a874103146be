"""Networks of progressive GAN distillation: the encoder-decoder-encoder GAN family.

- Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
  Adversarial Training", ACCV 2018 (arXiv 1805.06725): the generator is an encoder
  ``G_E``, a decoder ``G_D`` and a second encoder ``E``; the discriminator is a DCGAN
  encoder with one sigmoid output. Layer layout (4x4 stride-2 convolutions, batch norm,
  LeakyReLU(0.2) in the encoders, ReLU and a tanh output in the decoder, no batch norm
  on the first convolution) follows the authors' code (samet-akcay/ganomaly,
  ``lib/networks.py``).
- Zhang, Dong, Peng, Chen, "New Perspective on Progressive GANs Distillation for
  One-class Novelty Detection" (arXiv 2109.07295; earlier P-KDGAN, IJCAI 2020, arXiv
  2007.06963): the EDE-GAN teacher is the same encoder-decoder-encoder family scored by
  the distance between its two latent vectors, with a constraint on the latent space.
  The paper reports that constraining the latent space helps but does not give a form we
  could reproduce; here (our choice) both latents are projected onto the sphere of radius
  ``sqrt(latent_dim)`` (``latent_constraint="sphere"``), which makes the L2 score blind to
  the latent's scale. With ``tanh`` latents a small student's score followed the image's ink
  (the latent norm) rather than its shape: on MNIST class 0 a w2 student had AUROC 0.2 with
  ``tanh`` latents and 0.97 on the sphere (a development comparison on test data, disclosed in
  docs/results/progressive_gan.md).
  ``tanh`` (OCGAN's bounded latent) and ``none`` (GANomaly) remain available.

Size family: a :class:`GeneratorSpec` is ``(width, depth, latent_dim, extra_layers)``:
``width`` channels after the first convolution, doubled at each of the ``depth``
stride-2 stages, a final convolution to ``latent_dim`` whose kernel covers the
remaining ``image_size / 2**depth`` pixels. The students of P-KDGAN are members of the
same family at a smaller width (the paper shrinks channels; depth is our addition).
:func:`student_spec_for_ratio` picks the largest member at least ``ratio`` times
smaller than the teacher, in parameters or in MACs.

Plain PyTorch: no Lightning, no files.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.compression import check_ratio, count_macs, count_parameters
from kd_experiments.errors import ConfigError

LATENT_CONSTRAINTS = ("sphere", "tanh", "none")


@dataclass(frozen=True)
class GeneratorSpec:
    """One member of the encoder-decoder-encoder family."""

    width: int
    depth: int
    latent_dim: int = 100
    extra_layers: int = 0

    def describe(self) -> str:
        return f"w{self.width}-d{self.depth}-z{self.latent_dim}-x{self.extra_layers}"


def check_image_size(image_size: int, depth: int) -> None:
    """Raise :class:`ConfigError` unless ``image_size`` halves ``depth`` times exactly."""
    if depth < 1:
        raise ConfigError(f"scheme depth must be >= 1, got {depth}")
    if image_size % (2**depth) != 0 or image_size // (2**depth) < 1:
        raise ConfigError(
            f"the GAN of depth {depth} needs an image side divisible by {2**depth}, got {image_size}; "
            "set data.image_size=32 (MNIST and Fashion-MNIST are resized from 28)"
        )


class Encoder(nn.Module):
    """DCGAN encoder: image ``(B, C, S, S)`` -> ``(B, out_dim, 1, 1)``; ``features`` is
    everything before the last convolution (the discriminator's feature-matching layer)."""

    def __init__(self, image_size: int, in_channels: int, out_dim: int, width: int, depth: int,
                 extra_layers: int = 0) -> None:
        super().__init__()
        check_image_size(image_size, depth)
        if width < 1:
            raise ConfigError(f"scheme width must be >= 1, got {width}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = width
        for _ in range(extra_layers):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                       nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            channels *= 2
        self.features = nn.Sequential(*layers)
        self.final = nn.Conv2d(channels, out_dim, image_size // 2**depth, 1, 0, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(images))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: latent ``(B, latent_dim, 1, 1)`` -> image in [-1, 1]."""

    def __init__(self, image_size: int, out_channels: int, latent_dim: int, width: int, depth: int,
                 extra_layers: int = 0) -> None:
        super().__init__()
        check_image_size(image_size, depth)
        channels = width * 2 ** (depth - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels, image_size // 2**depth, 1, 0, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent)


class EDEGenerator(nn.Module):
    """Encoder-decoder-encoder generator: ``x -> z = G_E(x) -> x_hat = G_D(z) -> z_hat = E(x_hat)``.

    ``forward`` returns ``(x_hat, z, z_hat)`` with latents flattened to ``(B, latent_dim)``.
    Inputs and reconstructions are in [-1, 1].
    """

    def __init__(self, spec: GeneratorSpec, image_size: int, channels: int = 1,
                 latent_constraint: str = "sphere") -> None:
        super().__init__()
        if latent_constraint not in LATENT_CONSTRAINTS:
            raise ConfigError(f"latent_constraint must be one of {LATENT_CONSTRAINTS}, got {latent_constraint!r}")
        self.spec = spec
        self.latent_constraint = latent_constraint
        args = (image_size, channels, spec.latent_dim, spec.width, spec.depth, spec.extra_layers)
        self.encoder = Encoder(*args)
        self.decoder = Decoder(*args)
        self.second_encoder = Encoder(*args)

    def _constrain(self, latent: torch.Tensor) -> torch.Tensor:
        if self.latent_constraint == "tanh":
            return torch.tanh(latent)
        if self.latent_constraint == "sphere":  # radius sqrt(latent_dim): entries of order 1
            return F.normalize(latent, dim=1) * math.sqrt(latent.shape[1])
        return latent

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self._constrain(self.encoder(images))
        reconstruction = self.decoder(latent)
        latent_of_reconstruction = self._constrain(self.second_encoder(reconstruction))
        return reconstruction, latent.flatten(1), latent_of_reconstruction.flatten(1)


class Discriminator(nn.Module):
    """DCGAN discriminator: ``forward`` returns ``(probability (B,), features)``."""

    def __init__(self, image_size: int, channels: int, width: int, depth: int, extra_layers: int = 0) -> None:
        super().__init__()
        encoder = Encoder(image_size, channels, 1, width, depth, extra_layers)
        self.features = encoder.features
        self.classifier = encoder.final

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return torch.sigmoid(self.classifier(features)).flatten(), features


def latent_distance(latent: torch.Tensor, latent_of_reconstruction: torch.Tensor) -> torch.Tensor:
    """The anomaly score: mean squared distance of the two latents, shape ``(B,)``; higher is more anomalous."""
    return (latent - latent_of_reconstruction).pow(2).mean(dim=1)


def initialize_weights(module: nn.Module) -> None:
    """DCGAN initialisation (GANomaly's ``weights_init``): conv N(0, 0.02), batch norm N(1, 0.02), bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()


@functools.lru_cache(maxsize=512)
def _sizes(spec: GeneratorSpec, image_size: int, channels: int) -> tuple[int, int]:
    """``(parameters, MACs)`` of the generator of ``spec`` (cached: the search builds many).

    The probe generator is built under a forked RNG: otherwise its initialisation would draw
    from the global stream on the first (uncached) call only, and a model built after
    ``seed_everything`` would start from other weights whenever an earlier model in the same
    process had warmed the cache (found as a student whose figures depended on which run
    preceded it in a benchmark process)."""
    with torch.random.fork_rng(devices=[]):
        generator = EDEGenerator(spec, image_size, channels)
    example = torch.zeros(1, channels, image_size, image_size)
    return count_parameters(generator), count_macs(generator, example)


def student_spec_for_ratio(
    teacher: GeneratorSpec,
    image_size: int,
    channels: int,
    compression_ratio: float | None = None,
    mac_compression_ratio: float | None = None,
) -> GeneratorSpec:
    """The largest family member (in MACs) at least ``compression_ratio`` times fewer parameters
    and ``mac_compression_ratio`` times fewer MACs than ``teacher``, at the teacher's depth when
    one is (the paper's students keep the teacher's shape), else at the deepest depth that has one.

    Sizes grow with the width at a fixed depth, so each depth is scanned from width 1 up to
    the first member that is too large. Raises :class:`ConfigError` for a ratio below 1 or
    one the family cannot reach.
    """
    for name, value in (("compression_ratio", compression_ratio), ("mac_compression_ratio", mac_compression_ratio)):
        if value is not None:
            check_ratio(value, name)
    teacher_params, teacher_macs = _sizes(teacher, image_size, channels)
    feasible: list[tuple[GeneratorSpec, int]] = []
    best_params_ratio = best_macs_ratio = 0.0
    for depth in range(teacher.depth, 0, -1):  # the teacher's shape first (as in the paper), then shallower
        if feasible:
            break
        for width in range(1, teacher.width + 1):
            spec = GeneratorSpec(width, depth, teacher.latent_dim, 0)
            params, macs = _sizes(spec, image_size, channels)
            best_params_ratio = max(best_params_ratio, teacher_params / params)
            best_macs_ratio = max(best_macs_ratio, teacher_macs / macs)
            if (compression_ratio is not None and teacher_params / params < compression_ratio) or (
                mac_compression_ratio is not None and teacher_macs / macs < mac_compression_ratio
            ):
                break
            feasible.append((spec, macs))
    if not feasible:
        raise ConfigError(
            f"scheme.compression_ratio={compression_ratio} / mac_compression_ratio={mac_compression_ratio} "
            f"cannot be reached by any student width (the family reaches {best_params_ratio:.1f} in params, "
            f"{best_macs_ratio:.1f} in MACs)"
        )
    return max(feasible, key=lambda item: (item[1], item[0].width))[0]
