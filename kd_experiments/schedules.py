"""Learning-rate schedules shared by the schemes: the rate throughout, or a cosine decay over the run.

One definition of the schedule names and of where the cosine decay ends (``COSINE_FLOOR`` of the
rate), used by the score-regression loops (:mod:`kd_experiments.schemes.score_regression.family`)
and the map-regression scheme (``scheme.lr_schedule``).
"""

from __future__ import annotations

import math

import torch

#: learning-rate schedules: the rate throughout, or cosine decay over the run's steps
LR_SCHEDULES = ("constant", "cosine")
#: where the cosine schedule ends, as a fraction of the rate
COSINE_FLOOR = 0.02


def cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step cosine decay of every group's rate to ``COSINE_FLOOR`` of it after ``total_steps``
    (held there after)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (
        1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))
