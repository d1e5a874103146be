"""Progressive GAN distillation: EDE-GAN teacher, GANomaly baseline, P-KDGAN students
(Zhang et al., arXiv 2109.07295 and 2007.06963; Akcay et al., arXiv 1805.06725)."""

from kd_experiments.schemes.progressive_gan.lightning_model import ROLES, ProgressiveGANScheme

__all__ = ["ROLES", "ProgressiveGANScheme"]
