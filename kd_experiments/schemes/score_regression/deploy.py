"""Deployable models of unsupervised-to-supervised compression (Pol et al., arXiv 2310.06047).

- :class:`ScoreRegressionDeployable`: what a run ships, the supervised student alone
  (raw images -> the datamodule's preprocessing -> student -> predicted teacher score
  ``(N,)``); neither the teacher nor its decoder is in it.
- :class:`ReconstructionScoreDeployable`: the autoencoder teacher in the same form
  (``log(1 + MSE)`` of its reconstruction), for side-by-side speed and size figures.
- :class:`ExternalTeacherDeployable`: an external teacher (any trained detector) in the
  same form.

See :mod:`kd_experiments.deployable` for the input and output contract.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.schemes.score_regression.torch_model import reconstruction_score


class ScoreRegressionDeployable(DeployableModel):
    """Raw images (or event features) -> the student's predicted anomaly score ``(N,)``."""

    produces_map = False

    def __init__(self, preprocessing: Preprocessing, student: nn.Module) -> None:
        super().__init__(preprocessing)
        self.student = student

    def score(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.student(normalised)


class ReconstructionScoreDeployable(DeployableModel):
    """Raw images -> the autoencoder teacher's score ``log(1 + MSE)``, ``(N,)``."""

    produces_map = False

    def __init__(self, preprocessing: Preprocessing, autoencoder: nn.Module) -> None:
        super().__init__(preprocessing)
        self.autoencoder = autoencoder

    def score(self, normalised: torch.Tensor) -> torch.Tensor:
        return reconstruction_score(normalised, self.autoencoder(normalised))


class ExternalTeacherDeployable(DeployableModel):
    """Raw images -> an external teacher's score (a frozen ``ScoreTeacher``), ``(N,)``."""

    produces_map = False

    def __init__(self, preprocessing: Preprocessing, teacher: nn.Module) -> None:
        super().__init__(preprocessing)
        self.teacher = teacher

    def score(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.teacher(normalised)
