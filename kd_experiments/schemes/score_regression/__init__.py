"""Unsupervised-to-supervised compression (Pol et al., arXiv 2310.06047)."""

from kd_experiments.schemes.score_regression.lightning_model import ScoreRegressionScheme
from kd_experiments.schemes.score_regression.teachers import ScoreTeacher, load_scheme_teacher

__all__ = ["ScoreRegressionScheme", "ScoreTeacher", "load_scheme_teacher"]
