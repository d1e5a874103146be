"""Deployable model of progressive GAN distillation (P-KDGAN, Zhang et al., arXiv 2109.07295).

:class:`LatentDistanceDeployable`: one encoder-decoder-encoder generator behind the
datamodule's preprocessing; the score is the generator's own rule, the mean squared
distance between the latent of the image and the latent of its reconstruction
(:func:`~kd_experiments.schemes.progressive_gan.torch_model.latent_distance`). For a
student role it holds the student generator only (its E-D-E: all three parts are needed
for the score); discriminators and the teacher are not in it. The teacher's generator in
the same form is the reference of ``deployed_compression_ratio``.

The scheme maps the data's ``input_range`` to the generator's tanh range [-1, 1]; the
deployable model applies the same affine map after the datamodule's normalisation.
See :mod:`kd_experiments.deployable` for the input and output contract.
"""

from __future__ import annotations

import torch

from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.schemes.progressive_gan.torch_model import EDEGenerator, latent_distance


class LatentDistanceDeployable(DeployableModel):
    """Raw images -> latent distance of one E-D-E generator, ``(N,)``."""

    produces_map = False

    def __init__(self, preprocessing: Preprocessing, generator: EDEGenerator, input_range: tuple[float, float]) -> None:
        super().__init__(preprocessing)
        self.generator = generator
        self.input_low, self.input_high = (float(v) for v in input_range)

    def score(self, normalised: torch.Tensor) -> torch.Tensor:
        images = (normalised - self.input_low) * (2.0 / (self.input_high - self.input_low)) - 1.0
        _, latent, latent_of_reconstruction = self.generator(images)
        return latent_distance(latent, latent_of_reconstruction)
