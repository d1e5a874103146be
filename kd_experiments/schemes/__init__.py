"""Teacher-student schemes, each a LightningModule over a plain PyTorch network."""
