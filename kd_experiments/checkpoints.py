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

from kd_experiments.errors import CheckpointError

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
