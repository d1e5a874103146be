"""Hydra/OmegaConf helpers: custom resolvers, config validation, dataset naming.

Resolvers (registered on import):

- ``${kd.project_root:}``: the folder that holds ``configs/`` (the repository root of
  an editable install), so data and log paths do not depend on the working directory;
- ``${kd.uid:}``: a short random id, fixed for one config object, that keeps run
  folders of jobs started in the same second apart;
- ``${kd.scaled:4.0,${data.image_size}}``: a value set for 256 px images scaled to the
  configured image size (the anomaly-map blur sigma: 4 at 256 px, 2 at 128 px);
- ``${kd.urd_foreground:${data.category}}``: where RD with Expert draws its synthetic
  anomalies on an MVTec AD category, as URD does (``dark`` for screw and capsule, else ``none``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
SWEEP_DIR = PROJECT_ROOT / "sweeps"

if not OmegaConf.has_resolver("kd.project_root"):
    OmegaConf.register_new_resolver("kd.project_root", lambda: str(PROJECT_ROOT))
if not OmegaConf.has_resolver("kd.uid"):
    OmegaConf.register_new_resolver("kd.uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def image_side(image_size: Any) -> int | None:
    """The side of a square image size, the shorter side of ``[height, width]``, or ``None``."""
    try:
        if image_size is None:
            return None
        if isinstance(image_size, int | float | str):
            return int(image_size)
        sides = [int(side) for side in image_size]
    except (TypeError, ValueError):
        return None  # the datamodule reports the bad value in one line
    return min(sides) if sides else None


def scaled_to_image(value: float, image_size: Any, reference: float = 256) -> float:
    """``value`` set for ``reference``-pixel images, scaled to ``image_size`` (its shorter side).

    ``${kd.scaled:4.0,${data.image_size}}`` is the papers' map blur sigma 4 at 256 px,
    2 at 128 px: the blur covers the same share of the image at any size.
    """
    side = image_side(image_size)
    return float(value) if side is None else float(value) * side / float(reference)


if not OmegaConf.has_resolver("kd.scaled"):
    OmegaConf.register_new_resolver("kd.scaled", scaled_to_image)


def _urd_foreground(category: Any) -> str:
    from kd_experiments.synthetic_anomalies import urd_foreground

    return urd_foreground(category)


if not OmegaConf.has_resolver("kd.urd_foreground"):
    OmegaConf.register_new_resolver("kd.urd_foreground", _urd_foreground)

#: image side of the papers' MVTec AD protocol (resize to 256, maps and metrics at 256)
PAPER_IMAGE_SIDE = 256


def dataset_name(data_cfg: DictConfig | dict[str, Any]) -> str:
    """A short name of the data a run used: ``mnist-c3``, ``mvtec-bottle``, ``events``."""
    data = dict(data_cfg)
    target = str(data.get("_target_", ""))
    if "category" in data:
        root = Path(str(data.get("root", "")))
        family = "synthetic" if "Synthetic" in target else "mvtec"
        return f"{family}-{data['category']}" if root else str(data["category"])
    if "dataset" in data:
        name = str(data["dataset"])
        if "normal_class" in data and data["normal_class"] is not None:
            name += f"-c{data['normal_class']}"
        return name
    return target.rsplit(".", 1)[-1].removesuffix("DataModule").lower() or "data"


def scheme_name(scheme_cfg: DictConfig | dict[str, Any]) -> str:
    """The scheme's short name from its ``_target_``: the package under ``schemes``
    (``kd_experiments.schemes.score_regression.ScoreRegressionScheme`` -> ``score_regression``)."""
    target = str(dict(scheme_cfg).get("_target_", "scheme"))
    parts = target.split(".")
    if "schemes" in parts and parts.index("schemes") + 1 < len(parts) - 1:
        return parts[parts.index("schemes") + 1]
    return parts[-1].removesuffix("Scheme").lower()


def data_tags(data_cfg: DictConfig | dict[str, Any]) -> dict[str, str]:
    """Tags of the data protocol: ``category`` (MVTec-style sets), ``image_size`` (its side) and
    ``protocol``: ``paper-256`` at the papers' 256 px, ``fast-<side>`` at any other size, so a
    report never mixes image sizes in one row."""
    data = dict(data_cfg)
    tags: dict[str, str] = {}
    side = image_side(data.get("image_size"))
    if side is not None:
        tags["image_size"] = str(side)
    if "category" in data:
        tags["category"] = str(data["category"])
        if side is not None:
            tags["protocol"] = f"paper-{side}" if side == PAPER_IMAGE_SIDE else f"fast-{side}"
    return tags


def experiment_label(cfg: DictConfig) -> dict[str, str]:
    """Tags that name what a run is: scheme, dataset, seed, and the data protocol (:func:`data_tags`)."""
    scheme_target = str(cfg.scheme.get("_target_", "scheme"))
    return {
        "scheme_class": scheme_target.rsplit(".", 1)[-1],
        "dataset": dataset_name(cfg.data),
        "seed": str(cfg.get("seed", 0)),
        **data_tags(cfg.data),
    }


def _group_choice(group: str) -> str | None:
    """The config-group option a Hydra run picked for ``group`` (``folder``), if known."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group)) if HydraConfig.initialized() else None
    except (KeyError, ValueError, AttributeError):
        return None


def _accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments ``target`` (a class or function path) accepts; ``None`` when it
    cannot be imported (instantiation reports that) or takes ``**kwargs``."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
        signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - an unimportable target is reported by instantiate, in one line
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name in signature.parameters if name != "self"}


def check_composition(cfg: DictConfig) -> None:
    """Check that the config's groups fit together, before any data is read or model built.

    - every key of ``data`` and ``scheme`` is a setting of its ``_target_`` (an experiment
      written for one data group may set a key another group lacks, e.g. ``cache_images``,
      a setting of the MVTec AD DataModule only);
    - a scheme with a pretrained encoder (``scheme.input_normalization``) gets images
      normalised as it can undo: ImageNet statistics or raw [0, 1] pixels.

    Raises:
        ConfigError: One line naming the conflicting key and how to resolve it.
    """
    from kd_experiments.errors import ConfigError

    for group in ("data", "scheme"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        accepted = _accepted_keys(str(node._target_))
        if accepted is None:
            continue
        unknown = [str(key) for key in node if not str(key).startswith("_") and key not in accepted]
        if unknown:
            choice = _group_choice(group)
            picked = f"{group}={choice}" if choice else f"the {group} group"
            key = unknown[0]
            raise ConfigError(
                f"{group}.{key} is not a setting of {picked} ({node._target_}); the experiment or an "
                f"override sets it for another {group} group: drop it with ~{group}.{key} or pick a "
                f"{group} group that has it"
            )
    scheme_normalization = cfg.scheme.get("input_normalization") if isinstance(cfg.get("scheme"), DictConfig) else None
    if scheme_normalization is not None:
        from kd_experiments.backbones import INPUT_NORMALIZATIONS

        if scheme_normalization not in INPUT_NORMALIZATIONS:
            data_normalization = cfg.data.get("normalization") if isinstance(cfg.get("data"), DictConfig) else None
            key = "data.normalization" if data_normalization == scheme_normalization else "scheme.input_normalization"
            raise ConfigError(
                f"{key}={scheme_normalization} does not suit scheme={_group_choice('scheme') or scheme_name(cfg.scheme)}: "
                "its pretrained encoder takes data.normalization=imagenet (ImageNet statistics) or none "
                "(pixels in [0, 1])"
            )


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a user error through unwrapped.

    Nested configs are passed as plain ``dict``/``list`` (``_convert_="all"``), so
    hyper-parameters saved in checkpoints load with ``torch.load(weights_only=True)``.

    Hydra wraps any exception raised by a ``_target_`` in ``InstantiationException``
    with the traceback text folded in; a :class:`~kd_experiments.errors.KDError` raised
    by a constructor (a missing folder, a value out of range) is re-raised as itself so
    that ``kd-train`` prints its one line.
    """
    import hydra
    from hydra.errors import InstantiationException

    from kd_experiments.errors import ConfigError, KDError

    kwargs.setdefault("_convert_", "all")  # plain dicts/lists: picklable, weights-only-safe hparams
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, KDError):
            cause = cause.__cause__
        if isinstance(cause, KDError):
            raise cause from None
        original = error.__cause__
        if isinstance(original, TypeError) and "argument" in str(original):
            target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
            raise ConfigError(f"invalid config for {target}: {original}") from None
        raise
