"""Reverse distillation (Deng & Li, CVPR 2022) and RD with an expert (Liu et al., AAAI 2025)."""

from kd_experiments.schemes.reverse_distillation.lightning_model import ReverseDistillationScheme

__all__ = ["ReverseDistillationScheme"]
