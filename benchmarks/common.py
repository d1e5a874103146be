"""What every benchmark records beside its runs: the machine and the commit."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from kd_experiments.tracking import git_commit


# Result files name Fashion-MNIST `fmnist`, as the issues and the pkd files do.
SHORT_NAMES = {"mnist": "mnist", "fashion_mnist": "fmnist"}


def machine() -> dict[str, object]:
    """CPU model, cores, torch threads and versions of the machine a record was measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
    }


def commit() -> str:
    """The project commit (``-dirty`` when tracked files differ from it)."""
    return git_commit(Path(__file__).resolve().parents[1])
