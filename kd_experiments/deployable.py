"""The deployable model of a run: raw images in, scores (and maps) out, and what it costs.

Every scheme hands the user one ``nn.Module`` (``AnomalyScheme.deployable_model()``):

- **input**: a batch of raw images as the user has them, ``(N, C, H, W)`` (``(N, H, W)``
  for one channel), ``uint8`` in 0..255 or floating point in [0, 1], at the training
  resolution (other sizes are resized, see below), grey or RGB as trained; feature-vector
  data (collision events) takes ``(N, F)`` features as the datamodule reads them, before
  standardisation;
- **preprocessing inside** (:class:`Preprocessor`): ``uint8 / 255`` (the datamodules'
  conversion), a bilinear antialiased resize to ``input_size`` when the input has another
  size (exactly :class:`~kd_experiments.data.one_class.OneClassDataModule`'s resize; the
  MVTec datamodules resize ``uint8`` images with PIL, which this approximates, so give
  them images at the training size), and the datamodule's normalisation
  ``(x - mean) / std``; a grey image given to an RGB model is repeated over the three
  channels (PIL's ``L -> RGB``), an RGB image given to a grey model is converted with
  ITU-R 601-2 luma weights (PIL's ``RGB -> L``, up to its integer rounding);
- **output** in eval mode: image scores ``(N,)`` (higher is more anomalous), or
  ``(scores (N,), maps (N, 1, H, W))`` for map-producing schemes (``produces_map``);
- **attributes**: ``produces_map``, ``input_size`` (``(H, W)``; ``()`` for feature
  vectors), ``input_channels`` (``F`` for feature vectors), :meth:`DeployableModel.example_input`.

It holds the student only (plus the frozen encoder where the scheme's deployed model
needs one); teacher, discriminators, expert and optimiser state stay in the
LightningModule. The scheme's test step scores through it (the datamodules hand
normalised tensors to the scheme; the test step maps them back to [0, 1] with
:meth:`Preprocessing.to_raw` and calls the deployable model, so what is tested is what
ships, up to float rounding of ``(x * std + mean - mean) / std``).

:func:`measure_deployment` measures what ships: latency at batch 1 (median of
``latency_calls`` calls after warm-up, one thread), throughput at batch 32, bytes,
parameters and MACs, in PyTorch and ONNX Runtime, for the student and the teacher; it
reuses :mod:`kd_experiments.compression` for every count, the export and the clock.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.compression import (
    count_macs,
    count_parameters,
    export_onnx,
    measure_latency,
    serialized_size_bytes,
)
from kd_experiments.errors import ConfigError, DataError

#: ITU-R 601-2 luma weights (PIL's ``RGB -> L``)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: the batch size of ``deploy/images_per_s_b32``
THROUGHPUT_BATCH = 32


@dataclass(frozen=True)
class Preprocessing:
    """What the datamodule does to a raw image before the scheme sees it.

    ``input_size``: ``(H, W)`` of the training images (``()`` for feature vectors);
    ``input_channels``: ``C`` (``F`` features for feature vectors); ``mean`` and ``std``:
    per channel (per feature), applied to pixels in [0, 1] as ``(x - mean) / std``.
    """

    input_size: tuple[int, ...]
    input_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear_antialias"
    source: str = field(default="scheme", compare=False)

    def __post_init__(self) -> None:
        assert len(self.mean) == len(self.std) == self.input_channels, (
            f"one mean/std per channel: {len(self.mean)}, {len(self.std)} for {self.input_channels}"
        )
        assert len(self.input_size) in (0, 2), f"input_size is (H, W) or (), got {self.input_size}"

    @classmethod
    def identity(cls, input_shape: Sequence[int], source: str = "scheme") -> Preprocessing:
        """Data in [0, 1] (``normalization: none``) of shape ``(C, H, W)`` or ``(F,)``."""
        channels, size = int(input_shape[0]), tuple(int(v) for v in input_shape[1:])
        return cls(size, channels, (0.0,) * channels, (1.0,) * channels, source=source)

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> Preprocessing | None:
        """The preprocessing of one of the project's datamodules (``None`` if it says nothing).

        Reads ``input_shape`` and ``normalization_stats`` (one-class and MVTec-style
        datamodules) or ``feature_mean`` / ``feature_std`` (collision events).
        """
        shape = getattr(datamodule, "input_shape", None)
        if shape is None:
            return None
        shape = tuple(int(v) for v in shape)
        name = type(datamodule).__name__
        if len(shape) == 1:
            mean, std = getattr(datamodule, "feature_mean", None), getattr(datamodule, "feature_std", None)
            if mean is None or std is None:
                return None
            return cls((), shape[0], tuple(float(v) for v in mean), tuple(float(v) for v in std), source=name)
        stats = getattr(datamodule, "normalization_stats", None)
        if stats is None:
            return None
        mean, std = (tuple(float(v) for v in values) for values in stats)
        if len(mean) == 1 and shape[0] > 1:
            mean, std = mean * shape[0], std * shape[0]
        return cls(shape[1:], shape[0], mean, std, source=name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(
            tuple(int(v) for v in values["input_size"]), int(values["input_channels"]),
            tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]),
            str(values.get("resize", "bilinear_antialias")), str(values.get("source", "checkpoint")),
        )

    def _view(self, values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) if not self.input_size else (1, -1, 1, 1)
        return torch.tensor(tuple(values), dtype=like.dtype, device=like.device).view(shape)

    def to_raw(self, normalised: torch.Tensor) -> torch.Tensor:
        """The datamodule's normalised tensor back in [0, 1] (``x * std + mean``)."""
        return normalised * self._view(self.std, normalised) + self._view(self.mean, normalised)


class Preprocessor(nn.Module):
    """Raw images (``uint8`` or [0, 1]) -> the normalised tensor the networks were trained on."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.input_size = tuple(preprocessing.input_size)
        self.input_channels = int(preprocessing.input_channels)
        shape = (1, -1) if not self.input_size else (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(shape))

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not self.input_size:  # feature vectors
            if images.dim() != 2 or images.shape[1] != self.input_channels:
                raise DataError(
                    f"the model takes (N, {self.input_channels}) feature vectors, got shape {tuple(images.shape)}"
                )
            return images
        if images.dim() == 3:  # (N, H, W): one channel
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise DataError(
                f"the model takes a batch of images (N, C, H, W), got shape {tuple(images.shape)}"
            )
        channels = images.shape[1]
        if channels != self.input_channels and not (channels == 1 and self.input_channels == 3) and not (
            channels == 3 and self.input_channels == 1
        ):
            raise DataError(
                f"the model takes {self.input_channels}-channel images, got {channels} channels "
                f"(shape {tuple(images.shape)}; NCHW expected)"
            )
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        if images.dtype == torch.uint8:
            images = images.to(torch.float32) / 255.0
        elif not images.is_floating_point():
            raise DataError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
        else:
            images = images.to(self.mean.dtype)
        if self.input_size:
            channels = images.shape[1]
            if channels == 1 and self.input_channels == 3:
                images = images.expand(-1, 3, -1, -1)
            elif channels == 3 and self.input_channels == 1:
                weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
                images = (images * weights).sum(dim=1, keepdim=True)
            if tuple(images.shape[-2:]) != self.input_size:
                images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False,
                                       antialias=True)
        return (images - self.mean) / self.std


class DeployableModel(nn.Module):
    """Base of every scheme's deployable model: :class:`Preprocessor`, then :meth:`score`.

    Subclasses set :attr:`produces_map` and implement :meth:`score` on the normalised
    tensor; ``forward`` takes raw images (see the module docstring).
    """

    produces_map: bool = False

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.preprocess = Preprocessor(preprocessing)
        self.preprocessing = preprocessing
        self.input_size: tuple[int, ...] = tuple(preprocessing.input_size)
        self.input_channels: int = int(preprocessing.input_channels)

    def score(self, normalised: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.preprocess(images))

    def example_input(self, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        """A seeded random float batch in [0, 1] of the model's input shape (on the model's device)."""
        generator = torch.Generator().manual_seed(seed)
        device = self.preprocess.mean.device
        return torch.rand((batch_size, self.input_channels, *self.input_size), generator=generator).to(device)


# ------------------------------------------------------------------------- measuring


@contextmanager
def single_thread() -> Iterator[None]:
    """PyTorch intra-op parallelism limited to one thread (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _measure_one(model: nn.Module, prefix: str, latency_calls: int, throughput_calls: int, onnx: bool,
                 folder: Path) -> dict[str, float]:
    model = copy.deepcopy(model).cpu().eval()
    single = model.example_input(1)
    batch = model.example_input(THROUGHPUT_BATCH)
    warmup = max(1, min(5, latency_calls))
    with single_thread():
        figures = {
            f"deploy/{prefix}params": float(count_parameters(model)),
            f"deploy/{prefix}macs": float(count_macs(model, single)),
            f"deploy/{prefix}model_bytes": float(serialized_size_bytes(model)),
            f"deploy/{prefix}latency_ms_b1": 1000.0 * measure_latency(model, single, latency_calls, warmup),
            f"deploy/{prefix}images_per_s_b32": THROUGHPUT_BATCH / measure_latency(model, batch, throughput_calls, 1),
        }
        if not onnx:
            return figures
        path = folder / f"{prefix or 'student_'}model.onnx"
        try:
            with warnings.catch_warnings():  # shape checks are fixed at export: the ONNX model takes input_size
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", module=r"torch\.onnx")  # exporter notes, no action for users
                export_onnx(model, single, path)
            session = _onnx_session(path)
        except Exception as error:  # noqa: BLE001 - an exporter or runtime limit is reported, not fatal
            warnings.warn(f"deploy: the {prefix or 'student'} model does not export to ONNX ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:160]}); ONNX Runtime figures skipped", stacklevel=2)
            return figures
        name = session.get_inputs()[0].name

        def run(array):
            return session.run(None, {name: array})

        figures[f"deploy/{prefix}onnx_model_bytes"] = float(path.stat().st_size)
        figures[f"deploy/{prefix}onnx_latency_ms_b1"] = 1000.0 * measure_latency(
            run, (single.numpy(),), latency_calls, warmup)
        figures[f"deploy/{prefix}onnx_images_per_s_b32"] = THROUGHPUT_BATCH / measure_latency(
            run, (batch.numpy(),), throughput_calls, 1)
    return figures


def measure_deployment(
    student: nn.Module,
    teacher: nn.Module | None = None,
    latency_calls: int = 50,
    throughput_calls: int = 5,
    onnx: bool = True,
) -> dict[str, float]:
    """Speed and size of the deployable student (and teacher), on the CPU, one thread.

    Keys (``teacher_`` after ``deploy/`` for the teacher): ``deploy/latency_ms_b1`` (median
    of ``latency_calls`` batch-1 calls after up to 5 warm-up calls), ``deploy/images_per_s_b32``
    (32 / median of ``throughput_calls`` batch-32 calls), ``deploy/model_bytes``
    (``torch.save`` of the state dict), ``deploy/params``, ``deploy/macs`` (per image), and
    with ``onnx`` the ONNX Runtime figures ``deploy/onnx_latency_ms_b1``,
    ``deploy/onnx_images_per_s_b32``, ``deploy/onnx_model_bytes`` (a model that does not
    export is warned about and has none). The models are copied to the CPU; the inputs
    are seeded random floats in [0, 1] (:meth:`DeployableModel.example_input`).
    Figures for reports and benchmarks: tests never assert on timings.
    """
    if latency_calls < 1 or throughput_calls < 1:
        raise ConfigError(
            f"deploy.latency_calls and deploy.throughput_calls must be >= 1, got {latency_calls}, {throughput_calls}"
        )
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kd-deploy-") as folder:
        figures.update(_measure_one(student, "", latency_calls, throughput_calls, onnx, Path(folder)))
        if teacher is not None:
            try:
                figures.update(_measure_one(teacher, "teacher_", latency_calls, throughput_calls, onnx, Path(folder)))
            except Exception as error:  # noqa: BLE001 - an external teacher may not run on a random batch
                warnings.warn(f"deploy: the teacher could not be measured ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:160]})", stacklevel=2)
    return figures


def measure_scheme_deployment(scheme: Any, options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """:func:`measure_deployment` of a scheme's deployable student and teacher, with the
    run config's ``deploy`` options (``latency_calls``, ``throughput_calls``, ``onnx``);
    a scheme without a deployable model is warned about and gives no figures."""
    options = dict(options or {})
    try:
        student = scheme.deployable_model()
    except NotImplementedError:
        warnings.warn(f"deploy: {type(scheme).__name__} has no deployable_model(); deploy/* figures skipped",
                      stacklevel=2)
        return {}
    return measure_deployment(
        student,
        scheme.teacher_deployable_model(),
        latency_calls=int(options.get("latency_calls", 50)),
        throughput_calls=int(options.get("throughput_calls", 5)),
        onnx=bool(options.get("onnx", True)),
    )


def deployed_sizes(
    student: nn.Module, reference: nn.Module | None, reference_params: int | None = None
) -> dict[str, float]:
    """``deployed_params``, ``deployed_macs`` of the student's deployable model and
    ``deployed_compression_ratio`` (reference detector's deployed params / the student's),
    with ``deployed_mac_compression_ratio`` likewise for MACs; NaN where the reference
    cannot be counted. ``reference_params`` overrides the count of ``reference`` (an
    external scorer whose size is declared, not held)."""
    example = student.example_input(1)
    params, macs = count_parameters(student), count_macs(student, example)
    sizes = {"deployed_params": params, "deployed_macs": macs}
    reference_macs = float("nan")
    if reference is None and reference_params is None:
        reference_params = float("nan")
    if reference is not None:
        reference_params = count_parameters(reference) if reference_params is None else reference_params
        try:
            reference_macs = count_macs(reference, reference.example_input(1))
        except Exception:  # noqa: BLE001 - an external scorer may not be countable
            reference_macs = float("nan")
    sizes["reference_deployed_params"] = reference_params
    sizes["reference_deployed_macs"] = reference_macs
    sizes["deployed_compression_ratio"] = reference_params / params if params else float("nan")
    sizes["deployed_mac_compression_ratio"] = reference_macs / macs if macs and not math.isnan(reference_macs) else float("nan")
    return sizes
