"""Hydra launcher plugins of kd-experiments (``configs/hydra/launcher/``); see docs/distributed.md."""
