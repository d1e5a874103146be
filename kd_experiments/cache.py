"""A content-addressed cache of tensors on disk (a teacher's outputs on a data set).

Distilling from a frozen teacher repeats the teacher's work on the same images in every
run of a sweep. :class:`TensorCache` keeps such outputs in files named by a digest of
everything they depend on, so a run whose teacher and data are unchanged reads them
back, and any change (another teacher checkpoint, other images, other settings) makes a
new key, which is a miss: nothing is ever invalidated in place. Keys come from
:func:`digest` over :func:`module_digest` (the teacher's class and every tensor of its
state), :func:`tensor_digest` (the images themselves) and plain settings.

Files are written to a temporary name and renamed (atomic on POSIX), so concurrent runs
of a sweep that miss together both write a complete file and readers never see half of
one; a corrupt or unreadable entry is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: bump when the layout of cached entries changes
CACHE_FORMAT = 1


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (CPU, contiguous)."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's class and every parameter and buffer (names, shapes, values)."""
    hasher = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        hasher.update(name.encode())
        hasher.update(tensor_digest(tensor).encode())
    return hasher.hexdigest()


def digest(parts: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-serialisable mapping (keys sorted): a cache key."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class TensorCache:
    """Tensors by key under ``root`` (one ``<key>.pt`` file per entry, weights-only)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        #: what the last :meth:`load` found: ``"hit"`` or ``"miss"`` (``None`` before any)
        self.last: str | None = None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry of ``key``, or ``None`` (a miss) when absent or unreadable."""
        path = self.path(key)
        entry = None
        if path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a corrupt entry is a miss; it is rewritten
                entry = None
            if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
                entry = None
        self.last = "miss" if entry is None else "hit"
        return entry

    def save(self, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write the entry of ``key`` atomically; returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        handle, temporary = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=self.root)
        os.close(handle)
        try:
            torch.save({name: value.detach().cpu() for name, value in tensors.items()}, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return path
