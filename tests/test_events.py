"""Collision events (ADC2021 HDF5 schema): the generator, the datamodule on written files,
its one-line errors, and a score-regression run on events. Tiny files, seconds."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kd_experiments.data.events import (
    NUM_FEATURES,
    SIGNATURES,
    EventsDataModule,
    generate_events,
    particles_to_features,
    read_particles,
    write_events,
)
from kd_experiments.errors import ConfigError, DataError
from kd_experiments.train import train
from tests.conftest import fast_overrides


def _files(folder: Path, background: int = 400, signal: int = 60) -> tuple[Path, dict[str, str]]:
    background_path = write_events(folder / "background.h5", generate_events(background, None, seed=1))
    signals = {name: str(write_events(folder / f"{name}.h5", generate_events(signal, name, seed=2 + i)))
               for i, name in enumerate(SIGNATURES[:2])}
    return background_path, signals


def test_generator_writes_the_adc2021_schema(tmp_path: Path) -> None:
    events = generate_events(500, None, seed=0)
    assert events.shape == (500, 19, 4) and events.dtype == np.float32
    assert (events[:, 0, 3] == 1).all()  # MET first, type 1
    types = events[:, :, 3]
    for first, count, type_id in ((1, 4, 2), (5, 4, 3), (9, 10, 4)):
        block = types[:, first : first + count]
        assert np.isin(block, (0, type_id)).all()
        pt = events[:, first : first + count, 0]
        assert (np.diff(pt, axis=1) <= 0).all()  # sorted by pT, zero padded at the end
    assert np.array_equal(generate_events(50, None, seed=3), generate_events(50, None, seed=3))
    high_met = generate_events(500, "high_met", seed=0)
    assert high_met[:, 0, 0].mean() > 4 * events[:, 0, 0].mean()
    path = write_events(tmp_path / "events.h5", events)
    with h5py.File(path) as handle:
        assert handle["Particles"].shape == (500, 19, 4)
    assert np.array_equal(read_particles(path), events)
    features = particles_to_features(events)
    assert features.shape == (500, NUM_FEATURES)
    assert np.allclose(features[:, 0], np.log1p(events[:, 0, 0]))


def test_datamodule_splits_standardises_and_labels(tmp_path: Path) -> None:
    background, signals = _files(tmp_path)
    data = EventsDataModule(background_path=background, signal_paths=signals, val_fraction=0.1,
                            test_fraction=0.25, batch_size=32, seed=0)
    data.setup("fit")
    assert data.input_shape == (57,)
    assert len(data.train_dataset) == 260 and len(data.val_dataset) == 40
    test = data.test_dataset
    assert len(test) == 100 + 120 and int(test.labels.sum()) == 120
    assert (data.train_dataset.labels == 0).all() and (data.val_dataset.labels == 0).all()
    assert torch.allclose(data.train_dataset.images.mean(0), torch.zeros(57), atol=1e-4)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (32, 57) and batch["image"].dtype == torch.float32
    assert set(batch) == {"image", "label", "index"}
    assert data.test_signal_names.count(SIGNATURES[0]) == 60


def test_training_order_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    """The epoch-seeded sampler of every datamodule: a module built afresh (a resumed run)
    draws epoch 3's batches exactly as one that has run epochs 0 to 2."""
    background, signals = _files(tmp_path)

    def order(data: EventsDataModule, epoch: int) -> list[int]:
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([batch["index"] for batch in loader]).tolist()

    ran = EventsDataModule(background_path=background, signal_paths=signals, batch_size=64, seed=5)
    epochs = [order(ran, epoch) for epoch in range(4)]
    resumed = EventsDataModule(background_path=background, signal_paths=signals, batch_size=64, seed=5)
    assert order(resumed, 3) == epochs[3]
    assert epochs[3] != epochs[2] and sorted(epochs[3]) == list(range(len(ran.train_dataset)))
    other_seed = EventsDataModule(background_path=background, signal_paths=signals, batch_size=64, seed=6)
    assert order(other_seed, 3) != epochs[3]


def test_datamodule_errors_are_one_line(tmp_path: Path) -> None:
    background, signals = _files(tmp_path, background=100, signal=10)
    with h5py.File(tmp_path / "wrong_key.h5", "w") as handle:
        handle["Jets"] = np.zeros((5, 19, 4), dtype=np.float32)
    with h5py.File(tmp_path / "wrong_shape.h5", "w") as handle:
        handle["Particles"] = np.zeros((5, 18, 4), dtype=np.float32)
    (tmp_path / "not_hdf5.h5").write_text("hello")
    nan = generate_events(5, None)
    nan[0, 0, 0] = np.nan
    write_events(tmp_path / "nan.h5", nan)
    for name, message in (("missing.h5", "does not exist"), ("wrong_key.h5", "no 'Particles'"),
                          ("wrong_shape.h5", "expected \\(N, 19, 4\\)"), ("not_hdf5.h5", "not a readable HDF5"),
                          ("nan.h5", "NaN")):
        with pytest.raises(DataError, match=message) as caught:
            EventsDataModule(background_path=tmp_path / name, signal_paths=signals).setup()
        assert "\n" not in str(caught.value) and name in str(caught.value)
    with pytest.raises(ConfigError, match="signal_paths"):
        EventsDataModule(background_path=background)
    with pytest.raises(ConfigError, match="val_fraction"):
        EventsDataModule(background_path=background, signal_paths=signals, val_fraction=0.6, test_fraction=0.5)


def test_synthetic_files_are_generated_once_into_the_cache(tmp_path: Path) -> None:
    data = EventsDataModule(synthetic=True, cache_dir=tmp_path, num_background=300, num_signal=20)
    data.setup()
    files = sorted(p.name for p in (tmp_path / "events_synthetic").iterdir())
    assert len(files) == 1 + len(SIGNATURES)
    assert int(data.test_dataset.labels.sum()) == 20 * len(SIGNATURES)
    stamp = (tmp_path / "events_synthetic" / files[0]).stat().st_mtime_ns
    EventsDataModule(synthetic=True, cache_dir=tmp_path, num_background=300, num_signal=20).setup()
    assert (tmp_path / "events_synthetic" / files[0]).stat().st_mtime_ns == stamp


def test_score_regression_on_events_reports_tpr_at_1e_5(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "experiment=score_regression_events", f"data.cache_dir={tmp_path}", "data.num_background=2000",
        "data.num_signal=100", "data.batch_size=256", "logger=none", *fast_overrides("trainer.max_epochs=2"),
    )
    metrics = train(cfg)
    for key in ("test/image_auroc", "test/teacher_image_auroc", "test/tpr_at_fpr_1e-5",
                "test/teacher_tpr_at_fpr_1e-5", "test/image_auroc_retention"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["test/teacher_image_auroc"] > 0.6  # the generated signatures are separable
