"""Losses of the encoder-decoder-encoder GAN and of progressive knowledge distillation.

- Generator loss (GANomaly, Akcay et al., ACCV 2018, arXiv 1805.06725):
  ``w_adv * L_adv + w_con * L_con + w_lat * L_lat`` with ``L_adv`` the L2 distance of the
  discriminator's features of real and reconstructed images (feature matching, as in the
  authors' code samet-akcay/ganomaly ``lib/model.py``), ``L_con`` the L1 distance of the
  image and its reconstruction (contextual loss) and ``L_lat`` the L2 distance of the two
  latents. GANomaly's weights are 1 / 50 / 1.
- Discriminator loss: binary cross-entropy of real (1) against reconstructed (0) images.
- Distillation loss (P-KDGAN, Zhang et al., IJCAI 2020, arXiv 2007.06963; arXiv
  2109.07295): the student's latents follow the teacher's (L2, both latents) and its
  reconstructions follow the teacher's (L1).

Pure functions over tensors: no modules, no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GANOutputs:
    """One generator pass: reconstruction and the two latents."""

    reconstruction: torch.Tensor
    latent: torch.Tensor
    latent_of_reconstruction: torch.Tensor


def generator_loss(
    images: torch.Tensor,
    outputs: GANOutputs,
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    adversarial_weight: float,
    contextual_weight: float,
    latent_weight: float,
) -> dict[str, torch.Tensor]:
    """The generator's weighted loss (``loss``) and its three terms."""
    adversarial = F.mse_loss(fake_features, real_features.detach())
    contextual = F.l1_loss(outputs.reconstruction, images)
    latent = F.mse_loss(outputs.latent_of_reconstruction, outputs.latent)
    loss = adversarial_weight * adversarial + contextual_weight * contextual + latent_weight * latent
    return {"loss": loss, "adversarial": adversarial, "contextual": contextual, "latent": latent}


def discriminator_loss(real_probability: torch.Tensor, fake_probability: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: real images are 1, reconstructions 0 (mean of the two terms' sum)."""
    real = F.binary_cross_entropy(real_probability, torch.ones_like(real_probability))
    fake = F.binary_cross_entropy(fake_probability, torch.zeros_like(fake_probability))
    return real + fake


def distillation_loss(
    teacher: GANOutputs,
    student: GANOutputs,
    latent_weight: float,
    image_weight: float,
) -> dict[str, torch.Tensor]:
    """P-KDGAN's distillation loss: L2 between teacher and student latents (both encoders),
    L1 between their reconstructions. Gradients reach whichever side is not detached."""
    latent = F.mse_loss(student.latent, teacher.latent) + F.mse_loss(
        student.latent_of_reconstruction, teacher.latent_of_reconstruction
    )
    image = F.l1_loss(student.reconstruction, teacher.reconstruction)
    return {"loss": latent_weight * latent + image_weight * image, "latent": latent, "image": image}
