"""Safe checkpoint inspection: ``weights_only`` loading and one-line errors.

Every checkpoint is read with ``torch.load(..., weights_only=True)``, which refuses to
run pickled code. Before Lightning resumes from a checkpoint, :func:`check_resume_checkpoint`
checks that the file is readable, was written by the same scheme, and holds tensors of
the shapes the configured model expects, so a wrong file fails in one line instead of a
wall of ``size mismatch`` messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd_experiments.errors import CheckpointError, ConfigError

RUN_ID_KEY = "kd_mlflow_run_id"
SCHEME_KEY = "kd_scheme"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means corrupt/unsafe
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights-only checkpoint: {first_line}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict'; it is not a Lightning checkpoint")
    return checkpoint


def mlflow_run_id_of(path: str | Path) -> str | None:
    """The MLflow run id a checkpoint was written by (stored by :class:`TrackingCheckpointTags`)."""
    return load_checkpoint(path).get(RUN_ID_KEY)


def check_resume_checkpoint(path: str | Path, model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``path`` fits ``model`` (same scheme, same shapes)."""
    checkpoint = load_checkpoint(path)
    expected_scheme = getattr(model, "scheme_name", None)
    found_scheme = checkpoint.get(SCHEME_KEY)
    if found_scheme is not None and expected_scheme is not None and found_scheme != expected_scheme:
        raise CheckpointError(
            f"checkpoint {path} was written by scheme '{found_scheme}', the config builds '{expected_scheme}'"
        )
    state = checkpoint["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(
            f"checkpoint {path} does not match the configured model ({len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors, e.g. '{example}'): another scheme or architecture?"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} is of another width: '{key}' has shape {tuple(state[key].shape)}, "
                f"the configured model expects {tuple(tensor.shape)}"
            )


def load_scheme(scheme_target: str, checkpoint: str | Path, key: str = "scheme.teacher_model") -> Any:
    """A trained scheme (a LightningModule of ``kd_experiments.schemes``) rebuilt from its checkpoint.

    The class ``scheme_target`` (e.g. ``kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme``)
    is built from the checkpoint's saved hyper-parameters and loaded strictly; the datamodule's
    preprocessing kept in the checkpoint is restored, so the scheme's deployable model takes raw
    images. Returned in eval mode. ``key`` names the config entry in error messages.
    """
    from hydra.utils import get_class

    try:
        scheme_class = get_class(scheme_target)
    except Exception as error:  # noqa: BLE001 - hydra raises several types
        raise ConfigError(f"{key}.scheme_target={scheme_target!r} is not a class: {error}") from None
    state = load_checkpoint(checkpoint)
    hyper_parameters = dict(state.get("hyper_parameters") or {})
    try:
        scheme = scheme_class(**hyper_parameters)
        scheme.load_state_dict(state["state_dict"], strict=True)
        if hasattr(scheme, "on_load_checkpoint"):
            scheme.on_load_checkpoint(state)
    except (TypeError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint {checkpoint} does not build {scheme_target}: {first_line}") from None
    return scheme.eval()
