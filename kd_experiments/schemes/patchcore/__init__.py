"""PatchCore (Roth et al., CVPR 2022): a training-free memory-bank detector, the baseline and a teacher."""

from kd_experiments.schemes.patchcore.lightning_model import PatchCoreScheme
from kd_experiments.schemes.patchcore.torch_model import PatchCore, PatchCoreDeployable

__all__ = ["PatchCore", "PatchCoreDeployable", "PatchCoreScheme"]
