"""Networks of unsupervised-to-supervised compression.

Pol, Govorkova, Ojalvo, Pierini, Chernyavskaya, Elmer, Harris, Gronroos,
"Knowledge Distillation for Anomaly Detection", arXiv 2310.06047 (2023).

- :class:`ConvAutoencoder`: the paper's convolutional autoencoder teacher for 28x28
  grey images (five valid convolutions, a 20-dimensional latent, a mirrored
  transposed-convolution decoder, LeakyReLU(0.3), sigmoid output; about 19.4k
  parameters). Layer widths follow the authors' code (AdrianAlan/kd4ad, ``models.py``).
- :class:`VariationalAutoencoder`: an optional VAE teacher with the same encoder and
  decoder (the encoder's last layer doubled for mean and log-variance); its score is
  the reconstruction error of the latent mean, so it is deterministic at test time.
- :class:`ScoreRegressor`: the supervised student that regresses the teacher's score.
  One parametric family covers the paper's students A to G (7,177 down to 77
  parameters): a ``deep`` form (valid convolutions with strides, then a linear head:
  students A, B) and a ``shallow`` form (convolution, average pooling, strided
  convolution, average pooling, linear head: students C to G, C with a third layer).
  :data:`PAPER_STUDENTS` names the paper's seven; :func:`student_spec_for_ratio`
  picks the member of the family closest to a requested compression ratio.
- :class:`ReconstructionScorer`: an autoencoder teacher's score as one module
  (images -> ``log(1 + MSE)``), what a benchmark times and exports for the teacher.
- :class:`PooledScoreRegressor`: a student on a smaller input than the teacher's
  (average pooling first) that predicts standardised teacher scores and maps them back
  to teacher units (the cross-scheme students of an image-level teacher).

Plain PyTorch: no Lightning, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kd_experiments.compression import check_ratio, closest_to_ratio
from kd_experiments.errors import ConfigError
from kd_experiments.schemes.score_regression.events_model import (
    MLP_STUDENT_WIDTHS,
    MLPAutoencoder,
    MLPScoreRegressor,
)

NEGATIVE_SLOPE = 0.3


def _activation() -> nn.Module:
    return nn.LeakyReLU(negative_slope=NEGATIVE_SLOPE)


class ConvAutoencoder(nn.Module):
    """The paper's convolutional autoencoder teacher (28x28 inputs, 20-d latent)."""

    image_size = 28

    def __init__(self, in_channels: int = 1, latent_dim: int = 20) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3), _activation(),  # 28 -> 26
            nn.Conv2d(8, 16, 3), _activation(),  # -> 24
            nn.Conv2d(16, 16, 3), _activation(),  # -> 22
            nn.Conv2d(16, 16, 3, stride=2), _activation(),  # -> 10
            nn.Conv2d(16, 8, 3, stride=2), _activation(),  # -> 4
            nn.Flatten(start_dim=1),
            nn.Linear(8 * 4 * 4, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 8 * 4 * 4), _activation(),
            nn.Unflatten(1, (8, 4, 4)),
            nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, output_padding=1), _activation(),  # 8
            nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1), _activation(),  # 16
            nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1), _activation(),  # 32
            nn.Conv2d(16, 8, 3), _activation(),  # 30
            nn.Conv2d(8, in_channels, 3),  # 28
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] (inputs are expected in [0, 1])."""
        return torch.sigmoid(self.decoder(self.encoder(images)))


class VariationalAutoencoder(ConvAutoencoder):
    """A VAE variant of the teacher (not in the paper; an optional teacher, ``teacher=vae``).

    ``forward`` returns the reconstruction of the latent mean (deterministic), so the
    anomaly score is computed exactly as for :class:`ConvAutoencoder`;
    :meth:`elbo_terms` gives the sampled reconstruction and the KL term for training.
    """

    def __init__(self, in_channels: int = 1, latent_dim: int = 20) -> None:
        super().__init__(in_channels, latent_dim)
        self.encoder[-1] = nn.Linear(8 * 4 * 4, 2 * latent_dim)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_variance = self.encoder(images).chunk(2, dim=1)
        return mean, log_variance.clamp(-10.0, 10.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, _ = self.encode(images)
        return torch.sigmoid(self.decoder(mean))

    def elbo_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction of a sampled latent, KL divergence per sample (B,))``."""
        mean, log_variance = self.encode(images)
        latent = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        kl = -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum(dim=1)
        return torch.sigmoid(self.decoder(latent)), kl


def reconstruction_score(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """The student's target: ``log(1 + per-sample mean squared error)``, shape ``(B,)``."""
    squared_error = (reconstructions - images).pow(2).flatten(1).mean(dim=1)
    return torch.log1p(squared_error)


class ReconstructionScorer(nn.Module):
    """An autoencoder teacher's score as one module: images -> ``log(1 + MSE)``, ``(B,)``."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return reconstruction_score(images, self.autoencoder(images))


class PooledScoreRegressor(nn.Module):
    """A score regressor on an average-pooled input, in teacher units.

    ``core`` (e.g. a :class:`ScoreRegressor` built for the pooled size) predicts the teacher
    score standardised with ``target_mean`` and ``target_std`` (the training targets'
    statistics); the module pools the image by ``factor`` first and maps the prediction
    back: ``core(pool(x)) * target_std + target_mean``. The statistics are buffers, so the
    module's parameters are the student's alone.
    """

    def __init__(self, core: nn.Module, factor: int, target_mean: float, target_std: float) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"the pooling factor must be an integer >= 1, got {factor!r}")
        self.pool = nn.AvgPool2d(factor) if factor > 1 else nn.Identity()
        self.core = core
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.core(self.pool(images)) * self.target_std + self.target_mean


@dataclass(frozen=True)
class StudentSpec:
    """One member of the student family.

    ``form="deep"``: valid 3x3 convolutions with the given ``channels`` and ``strides``.
    ``form="shallow"``: conv(``channels[0]``) -> avgpool(2) -> [conv(``channels[1]``), stride 1,
    when three channels are given] -> conv(last, stride 2) -> [avgpool(2) if ``final_pool``].
    Both end in a linear layer to one output (the predicted score).
    """

    form: str
    channels: tuple[int, ...]
    strides: tuple[int, ...] = field(default=())
    final_pool: bool = True

    def describe(self) -> str:
        return f"{self.form}{list(self.channels)}"


#: The seven students of the paper, A (largest) to G (smallest).
PAPER_STUDENTS: dict[str, StudentSpec] = {
    "A": StudentSpec("deep", (8, 16, 16, 16, 8), (1, 1, 1, 2, 2)),
    "B": StudentSpec("deep", (8, 8, 8, 8, 4), (1, 1, 1, 2, 2)),
    "C": StudentSpec("shallow", (8, 8, 4), final_pool=False),
    "D": StudentSpec("shallow", (4, 8)),
    "E": StudentSpec("shallow", (4, 4)),
    "F": StudentSpec("shallow", (2, 4)),
    "G": StudentSpec("shallow", (2, 2)),
}


class ScoreRegressor(nn.Module):
    """A small supervised student: image -> predicted teacher score, shape ``(B,)``."""

    def __init__(self, spec: StudentSpec, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.spec = spec
        in_channels = input_shape[0]
        layers: list[nn.Module] = []
        if spec.form == "deep":
            if len(spec.strides) != len(spec.channels):
                raise ConfigError(f"student spec {spec}: one stride per channel entry is required")
            for width, stride in zip(spec.channels, spec.strides, strict=True):
                layers += [nn.Conv2d(in_channels, width, 3, stride=stride), _activation()]
                in_channels = width
        elif spec.form == "shallow":
            if len(spec.channels) not in (2, 3):
                raise ConfigError(f"student spec {spec}: a shallow student has 2 or 3 conv layers")
            layers += [nn.Conv2d(in_channels, spec.channels[0], 3), _activation(), nn.AvgPool2d(2)]
            in_channels = spec.channels[0]
            if len(spec.channels) == 3:
                layers += [nn.Conv2d(in_channels, spec.channels[1], 3), _activation()]
                in_channels = spec.channels[1]
            layers += [nn.Conv2d(in_channels, spec.channels[-1], 3, stride=2), _activation()]
            if spec.final_pool:
                layers.append(nn.AvgPool2d(2))
        else:
            raise ConfigError(f"student form must be 'deep' or 'shallow', got {spec.form!r}")
        layers.append(nn.Flatten(start_dim=1))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        if flat < 1:
            raise ConfigError(f"student spec {spec} leaves no features for input {input_shape}")
        self.head = nn.Linear(flat, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


def build_student(spec: StudentSpec, input_shape: tuple[int, ...]) -> nn.Module:
    """The student network of ``spec``: a CNN for images, an MLP (``form="mlp"``) for
    feature vectors (collision events)."""
    if spec.form == "mlp":
        return MLPScoreRegressor(input_shape[0], spec.channels)
    if len(input_shape) != 3:
        raise ConfigError(f"a {spec.form} student takes (C, H, W) images, the data gives {input_shape}")
    return ScoreRegressor(spec, input_shape)


def build_teacher(kind: str, input_shape: tuple[int, ...], latent_dim: int) -> nn.Module:
    """The unsupervised teacher: ``autoencoder`` or ``vae`` (conv, 28x28 images), or the
    dense autoencoder of the events model for feature vectors (``autoencoder``)."""
    if len(input_shape) == 1:
        if kind != "autoencoder":
            raise ConfigError(f"scheme.teacher={kind!r}: feature-vector data takes teacher=autoencoder")
        return MLPAutoencoder(input_shape[0], latent_dim=latent_dim)
    if tuple(input_shape[1:]) != (ConvAutoencoder.image_size, ConvAutoencoder.image_size):
        raise ConfigError(
            f"the score-regression teacher takes 28x28 images, the data gives {tuple(input_shape[1:])}; "
            "set data.image_size=28 (or give an external teacher)"
        )
    if kind == "autoencoder":
        return ConvAutoencoder(in_channels=input_shape[0], latent_dim=latent_dim)
    if kind == "vae":
        return VariationalAutoencoder(in_channels=input_shape[0], latent_dim=latent_dim)
    raise ConfigError(f"scheme.teacher must be autoencoder, vae or external, got {kind!r}")


def _parameter_count(spec: StudentSpec, input_shape: tuple[int, ...]) -> int:
    return sum(p.numel() for p in build_student(spec, input_shape).parameters())


def student_family(input_shape: tuple[int, ...]) -> list[StudentSpec]:
    """Every member of the family valid for ``input_shape``: the paper's seven, widened
    and narrowed deep students, and shallow students of every small width pair; for
    feature vectors, MLPs of one or two hidden layers."""
    if len(input_shape) == 1:
        return [StudentSpec("mlp", widths) for widths in MLP_STUDENT_WIDTHS]
    specs = list(PAPER_STUDENTS.values())
    for multiplier in (0.25, 0.5, 0.75, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0):
        channels = tuple(max(1, round(c * multiplier)) for c in (8, 16, 16, 16, 8))
        specs.append(StudentSpec("deep", channels, (1, 1, 1, 2, 2)))
    for first in (1, 2, 3, 4, 6, 8):
        for second in (1, 2, 3, 4, 6, 8, 12, 16):
            specs.append(StudentSpec("shallow", (first, second)))
    valid = []
    for spec in specs:
        try:
            build_student(spec, input_shape)
        except (ConfigError, RuntimeError):
            continue
        valid.append(spec)
    return valid


def student_spec_for_ratio(
    compression_ratio: float,
    teacher_params: int,
    input_shape: tuple[int, int, int],
    tolerance: float = 0.25,
) -> StudentSpec:
    """The family member whose ``teacher_params / student_params`` is closest to the target.

    Raises :class:`ConfigError` for a ratio below 1 or one no member reaches within
    ``tolerance`` (relative, in log space).
    """
    check_ratio(compression_ratio)
    candidates = [(spec, teacher_params / _parameter_count(spec, input_shape)) for spec in student_family(input_shape)]
    return closest_to_ratio(compression_ratio, candidates, tolerance)


def resolve_student_spec(
    student: str | dict | None,
    compression_ratio: float | None,
    teacher_params: int,
    input_shape: tuple[int, int, int],
) -> StudentSpec:
    """A student from config: a paper name ``A``..``G``, an explicit spec, or ``auto`` (by ratio)."""
    if student in (None, "auto"):
        if compression_ratio is None:
            raise ConfigError("scheme.student=auto needs scheme.compression_ratio")
        return student_spec_for_ratio(compression_ratio, teacher_params, input_shape)
    if isinstance(student, str):
        if student not in PAPER_STUDENTS:
            raise ConfigError(
                f"scheme.student={student!r} is unknown; use auto, one of {sorted(PAPER_STUDENTS)}, or a spec"
            )
        return PAPER_STUDENTS[student]
    fields = dict(student)
    return StudentSpec(
        form=str(fields["form"]),
        channels=tuple(int(c) for c in fields["channels"]),
        strides=tuple(int(s) for s in fields.get("strides", ())),
        final_pool=bool(fields.get("final_pool", True)),
    )
