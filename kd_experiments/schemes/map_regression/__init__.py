"""Map regression: any map-producing detector -> an encoder-free pixel student (see :mod:`.lightning_model`)."""

from kd_experiments.schemes.map_regression.lightning_model import MapRegressionScheme

__all__ = ["MapRegressionScheme"]
