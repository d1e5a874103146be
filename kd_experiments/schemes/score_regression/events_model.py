"""Dense networks of unsupervised-to-supervised compression for collision events.

Pol et al., "Knowledge Distillation for Anomaly Detection", arXiv 2310.06047 (2023),
compress an unsupervised teacher into a supervised student that regresses its score;
the same method runs in the CMS Level-1 trigger as CICADA (Princeton-AD/cicada).
The event representation is the one of the LHC anomaly-detection challenge ADC2021
(Govorkova et al., "LHC physics dataset for unsupervised New Physics detection at 40
MHz", Sci. Data 9, 118 (2022)): 19 objects x (pT, eta, phi) = 57 input features.

- :class:`MLPAutoencoder`: the dense autoencoder baseline of that challenge
  (57 -> 32 -> 16 -> latent -> 16 -> 32 -> 57, batch normalisation, LeakyReLU), about
  5k parameters with a 3-dimensional latent; its score is ``log(1 + MSE)`` as for the
  image teacher (:func:`~kd_experiments.schemes.score_regression.torch_model.reconstruction_score`
  works unchanged on ``(B, 57)`` tensors).
- :class:`MLPScoreRegressor`: the student, a small MLP to one output;
  :data:`MLP_STUDENT_WIDTHS` lists the widths ``student=auto`` chooses from.

Plain PyTorch: no Lightning, no files.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

NEGATIVE_SLOPE = 0.3


def _dense(in_features: int, out_features: int) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.LeakyReLU(NEGATIVE_SLOPE)]


class MLPAutoencoder(nn.Module):
    """Dense autoencoder teacher for ``(B, features)`` inputs (standardised features)."""

    def __init__(self, features: int = 57, hidden: Sequence[int] = (32, 16), latent_dim: int = 3) -> None:
        super().__init__()
        self.features = features
        self.latent_dim = latent_dim
        widths = [features, *hidden]
        encoder: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            encoder += _dense(width_in, width_out)
        encoder.append(nn.Linear(widths[-1], latent_dim))
        decoder: list[nn.Module] = []
        reverse = [latent_dim, *reversed(hidden)]
        for width_in, width_out in itertools.pairwise(reverse):
            decoder += _dense(width_in, width_out)
        decoder.append(nn.Linear(reverse[-1], features))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction of the (standardised) features, same shape as the input."""
        return self.decoder(self.encoder(features))


class MLPScoreRegressor(nn.Module):
    """Student for feature vectors: ``features -> hidden... -> 1`` (LeakyReLU), output ``(B,)``."""

    def __init__(self, features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for next_width in hidden:
            layers += [nn.Linear(width, int(next_width)), nn.LeakyReLU(NEGATIVE_SLOPE)]
            width = int(next_width)
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


#: Hidden widths of the MLP students ``student=auto`` chooses from on feature vectors: one
#: hidden layer of 1 to 64 units, two hidden layers of ``(w, w / 2)``.
MLP_STUDENT_WIDTHS: tuple[tuple[int, ...], ...] = (
    *((width,) for width in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)),
    *((width, max(1, width // 2)) for width in (8, 16, 32, 64)),
)
