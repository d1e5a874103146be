"""A labelled validation split from training data, val/image_auroc, and testing the best epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_experiments.data.one_class import OneClassDataModule, _digits_splits
from kd_experiments.errors import ConfigError
from kd_experiments.train import train
from tests.conftest import fast_overrides


def _digits(**kwargs) -> OneClassDataModule:
    datamodule = OneClassDataModule("digits", None, normal_class=3, image_size=16, normalization="none", **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_other_class_validation_anomalies_come_from_the_training_split_only() -> None:
    plain, labelled = _digits(), _digits(val_anomalies="other_classes")
    assert plain.val_has_anomalies is False and labelled.val_has_anomalies is True
    # training data and the normal validation images are unchanged
    assert torch.equal(plain.train_dataset.images, labelled.train_dataset.images)
    normal = labelled.val_dataset.labels == 0
    assert torch.equal(labelled.val_dataset.images[normal], plain.val_dataset.images)
    assert int((~normal).sum()) == int(normal.sum()) > 0
    # the anomalies are training images, of other classes, none of them a test image
    anomalies = labelled.val_dataset.images[~normal].flatten(1)
    train_images = plain.train_dataset.images.flatten(1)
    test_images = labelled.test_dataset.images.flatten(1)
    assert not (torch.cdist(anomalies, train_images).min(dim=1).values < 1e-6).any()
    assert not (torch.cdist(anomalies, test_images).min(dim=1).values < 1e-6).any()
    # seeded: the same draw twice, another draw with another seed
    again = _digits(val_anomalies="other_classes")
    assert torch.equal(again.val_dataset.images, labelled.val_dataset.images)
    other_seed = _digits(val_anomalies="other_classes", seed=1)
    assert not torch.equal(other_seed.val_dataset.images[other_seed.val_dataset.labels == 1], anomalies.view(-1, 1, 16, 16))
    # every other-class training image: the same normal images, all the others as anomalies
    every = _digits(val_anomalies="all_other_classes")
    assert torch.equal(every.val_dataset.images[every.val_dataset.labels == 0], plain.val_dataset.images)
    train_split, _ = _digits_splits(0)  # the training split of every class (split_seed 0)
    assert int((every.val_dataset.labels == 1).sum()) == int((train_split.class_ids != 3).sum())
    with pytest.raises(ConfigError, match="val_anomalies"):
        _digits(val_anomalies="test_split")


def test_val_auroc_is_logged_and_val_losses_use_normal_images_only(compose_cfg) -> None:
    overrides = fast_overrides("trainer.max_epochs=2", "logger=none")
    plain = train(compose_cfg("experiment=quickstart", *overrides))
    labelled = train(compose_cfg("experiment=quickstart", *overrides, "data.val_anomalies=other_classes"))
    assert "val/image_auroc" not in plain
    assert 0.0 <= labelled["val/image_auroc"] <= 1.0 and 0.0 <= labelled["val/teacher_image_auroc"] <= 1.0
    # the same training data and seed: identical weights, so identical normal-only val losses
    assert labelled["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-6)
    assert labelled["test/image_auroc"] == pytest.approx(plain["test/image_auroc"], rel=1e-6)


def test_select_on_validation_tests_the_best_epoch(compose_cfg, mlflow_uri: str, tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=pkd_smoke", "callbacks=select_on_validation", "data.val_anomalies=other_classes",
                      *fast_overrides("trainer.max_epochs=3"))
    metrics = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pkd_smoke").experiment_id])
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/image_auroc")]
    assert len(history) == 3
    best_epoch = max(range(3), key=lambda epoch: (history[epoch], -epoch))  # the first of equal maxima
    assert run.data.tags["tested_checkpoint"] == f"best-epoch{best_epoch:03d}.ckpt"
    assert run.data.metrics["selected_val_image_auroc"] == pytest.approx(max(history))
    assert (tmp_path / "run" / "checkpoints" / f"best-epoch{best_epoch:03d}.ckpt").is_file()
    assert 0.0 <= metrics["test/image_auroc"] <= 1.0


def test_selecting_on_val_auroc_without_labelled_anomalies_is_a_config_error(compose_cfg, mlflow_uri: str) -> None:
    cfg = compose_cfg("experiment=pkd_smoke", "callbacks=select_on_validation", *fast_overrides())
    with pytest.raises(ConfigError, match="data.val_anomalies=other_classes"):
        train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pkd_smoke").experiment_id])
    assert run.info.status == "FAILED"
