"""kd-experiments: knowledge distillation for anomaly detection.

Teacher -> student schemes as LightningModules, configured with Hydra and
tracked in MLflow, swept across compression ratios.
"""

__version__ = "0.1.0"
