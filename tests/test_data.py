"""Tests of the DataModules: MVTec-style folders, one-class sets, the synthetic generator.

Most tests run on tiny generated data. Tests of the real sets read
``../shared/data`` beside the checkout (or ``$KD_DATA_DIR``) and are skipped,
with the reason, where that folder is absent.
"""

from __future__ import annotations

import gzip
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_experiments.backbones import IMAGENET_MEAN, IMAGENET_STD
from kd_experiments.data.common import split_indices
from kd_experiments.data.mvtec import MVTecDataModule, mvtec_test_summary
from kd_experiments.data.one_class import OneClassDataModule, load_idx_split
from kd_experiments.data.synthetic import (
    DEFECT_TYPES,
    SyntheticMVTecDataModule,
    generate_mvtec_like,
)
from kd_experiments.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA


DATA_DIR = SHARED_DATA


def requires_data(subfolder: str) -> Callable[[Callable], Callable]:
    """Mark a test ``real_data`` and skip it unless ``DATA_DIR/subfolder`` exists."""
    skip = pytest.mark.skipif(
        not (DATA_DIR / subfolder).is_dir(),
        reason=f"real data not found at {DATA_DIR / subfolder} (set KD_DATA_DIR to its folder)",
    )
    return lambda test: skip(pytest.mark.real_data(test))


# Small enough to generate in well under a second.
N_TRAIN, N_TEST_GOOD, N_DEFECT, SIZE = 10, 4, 3, 32
N_TEST = N_TEST_GOOD + N_DEFECT * len(DEFECT_TYPES)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder holding one generated category ``synthetic`` (shared, never modified)."""
    root = tmp_path_factory.mktemp("mvtec")
    generate_mvtec_like(root, "synthetic", N_TRAIN, N_TEST_GOOD, N_DEFECT, image_size=SIZE, seed=0)
    return root


@pytest.fixture
def synthetic_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the generated category: its folder ``root/synthetic``."""
    category_dir = tmp_path / "root" / "synthetic"
    shutil.copytree(synthetic_root / "synthetic", category_dir)
    return category_dir


def _esc(path: object) -> str:
    """``path`` as a regular expression matching itself, for ``pytest.raises(match=...)``."""
    return re.escape(str(path))


def _array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _full_batch(loader: torch.utils.data.DataLoader) -> dict:
    batches = list(loader)
    assert len(batches) == 1
    return batches[0]


# --- synthetic generator


def test_generate_writes_mvtec_layout_with_binary_masks(synthetic_root: Path) -> None:
    category_dir = synthetic_root / "synthetic"
    assert len(list((category_dir / "train" / "good").glob("*.png"))) == N_TRAIN
    assert len(list((category_dir / "test" / "good").glob("*.png"))) == N_TEST_GOOD
    for defect_type in DEFECT_TYPES:
        images = sorted((category_dir / "test" / defect_type).glob("*.png"))
        assert len(images) == N_DEFECT
        for image_path in images:
            mask = _array(
                category_dir / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
            )
            image = _array(image_path)
            assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert (category_dir / "meta.json").is_file()


def test_generate_is_deterministic_and_depends_on_seed(tmp_path: Path) -> None:
    first = generate_mvtec_like(
        tmp_path / "a", n_train=2, n_test_good=1, n_test_defect_per_type=1, image_size=16
    )
    second = generate_mvtec_like(
        tmp_path / "b", n_train=2, n_test_good=1, n_test_defect_per_type=1, image_size=16
    )
    other = generate_mvtec_like(
        tmp_path / "c", n_train=2, n_test_good=1, n_test_defect_per_type=1, image_size=16, seed=1
    )
    files = sorted(path.relative_to(first) for path in first.rglob("*.png"))
    assert files == sorted(path.relative_to(second) for path in second.rglob("*.png"))
    for relative in files:
        np.testing.assert_array_equal(_array(first / relative), _array(second / relative))
    train_image = Path("train/good/000.png")
    assert not np.array_equal(_array(first / train_image), _array(other / train_image))


def test_generate_reuses_matching_set_and_regenerates_changed_one(tmp_path: Path) -> None:
    arguments = {"n_train": 2, "n_test_good": 1, "n_test_defect_per_type": 1, "image_size": 16}
    category_dir = generate_mvtec_like(tmp_path, **arguments)
    marker = category_dir / "train" / "good" / "000.png"
    modified = marker.stat().st_mtime_ns
    assert generate_mvtec_like(tmp_path, **arguments) == category_dir
    assert marker.stat().st_mtime_ns == modified
    generate_mvtec_like(tmp_path, **{**arguments, "n_train": 3})
    assert len(list((category_dir / "train" / "good").glob("*.png"))) == 3
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")], (
        "staging folder left behind"
    )


def test_generate_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate_mvtec_like(tmp_path, n_train=2, image_size=16)
    assert (tmp_path / "synthetic" / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize(
    ("arguments", "key"),
    [
        ({"n_train": 1}, "n_train"),
        ({"image_size": 8}, "image_size"),
        ({"defect_types": ["crack"]}, "defect_types"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path: Path, arguments: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        generate_mvtec_like(tmp_path, **arguments)


# --- MVTec on generated data


def test_mvtec_splits_batches_and_masks(synthetic_root: Path) -> None:
    datamodule = MVTecDataModule(
        synthetic_root, "synthetic", image_size=SIZE, batch_size=4, eval_batch_size=N_TEST
    )
    datamodule.setup()
    train_paths = {sample.image_path for sample in datamodule.train_dataset.samples}
    val_paths = {sample.image_path for sample in datamodule.val_dataset.samples}
    train_good = set((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    assert len(val_paths) == 1 and len(train_paths) == N_TRAIN - 1
    assert train_paths | val_paths == train_good and not train_paths & val_paths
    assert datamodule.test_summary == {
        "good": N_TEST_GOOD,
        **{defect: N_DEFECT for defect in DEFECT_TYPES},
    }
    assert datamodule.input_shape == (3, SIZE, SIZE)

    batch = _full_batch(datamodule.test_dataloader())
    assert batch["image"].shape == (N_TEST, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (N_TEST, 1, SIZE, SIZE) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["index"].tolist() == list(range(N_TEST))
    good = torch.tensor(["/good/" in path for path in batch["path"]])
    assert batch["label"].tolist() == (~good).long().tolist()
    mask_area = batch["mask"].sum(dim=(1, 2, 3))
    assert (mask_area[good] == 0).all() and (mask_area[~good] > 0).all()

    val_batch = _full_batch(datamodule.val_dataloader())
    assert val_batch["label"].tolist() == [0] and val_batch["mask"].sum() == 0


def test_mvtec_normalization_resize_and_grayscale(synthetic_root: Path) -> None:
    raw = MVTecDataModule(synthetic_root, "synthetic", image_size=(16, 24), normalization="none")
    imagenet = MVTecDataModule(synthetic_root, "synthetic", image_size=(16, 24))
    gray = MVTecDataModule(
        synthetic_root, "synthetic", image_size=16, grayscale=True, normalization="none"
    )
    for datamodule in (raw, imagenet, gray):
        datamodule.setup("test")
    defect_index = next(i for i, s in enumerate(raw.test_dataset.samples) if s.label == 1)
    raw_item, imagenet_item = raw.test_dataset[defect_index], imagenet.test_dataset[defect_index]
    assert raw_item["image"].shape == (3, 16, 24) and raw_item["mask"].shape == (1, 16, 24)
    assert raw_item["image"].min() >= 0.0 and raw_item["image"].max() <= 1.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(imagenet_item["image"] * std + mean, raw_item["image"])
    assert set(raw_item["mask"].unique().tolist()) == {0.0, 1.0}
    assert gray.test_dataset[defect_index]["image"].shape == (1, 16, 16) and gray.input_shape == (
        1,
        16,
        16,
    )


def test_mvtec_split_and_shuffle_are_seeded(synthetic_root: Path) -> None:
    def val_paths(seed: int) -> list[Path]:
        datamodule = MVTecDataModule(
            synthetic_root, "synthetic", image_size=SIZE, val_fraction=0.3, seed=seed
        )
        datamodule.setup("fit")
        return [sample.image_path for sample in datamodule.val_dataset.samples]

    assert val_paths(0) == val_paths(0)
    assert len({tuple(val_paths(seed)) for seed in range(4)}) > 1

    def train_order(seed: int) -> list[int]:
        datamodule = MVTecDataModule(
            synthetic_root, "synthetic", image_size=8, batch_size=3, seed=seed
        )
        datamodule.setup("fit")
        return [
            index for batch in datamodule.train_dataloader() for index in batch["index"].tolist()
        ]

    assert train_order(0) == train_order(0)
    assert sorted(train_order(0)) == list(range(N_TRAIN - 1))


def test_mvtec_refit_trains_on_every_good_image_and_keeps_the_seeded_validation_split(
    synthetic_root: Path,
) -> None:
    def splits(refit: bool) -> tuple[set[Path], list[Path]]:
        datamodule = MVTecDataModule(
            synthetic_root, "synthetic", image_size=SIZE, val_fraction=0.3, seed=1, refit=refit
        )
        datamodule.setup("fit")
        return (
            {sample.image_path for sample in datamodule.train_dataset.samples},
            [sample.image_path for sample in datamodule.val_dataset.samples],
        )

    (held_train, held_val), (refit_train, refit_val) = splits(False), splits(True)
    train_good = set((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    assert refit_train == train_good and held_train < train_good
    assert refit_val == held_val and set(refit_val) <= refit_train  # in-sample validation
    with pytest.raises(ConfigError, match="refit"):
        MVTecDataModule(synthetic_root, "synthetic", refit="yes")


def test_mvtec_cache_keeps_decoded_images(synthetic_copy: Path) -> None:
    root = synthetic_copy.parent
    cached = MVTecDataModule(root, "synthetic", image_size=SIZE, cache_images=True)
    uncached = MVTecDataModule(root, "synthetic", image_size=SIZE)
    cached.setup("test")
    uncached.setup("test")
    first = cached.test_dataset[0]
    torch.testing.assert_close(first["image"], uncached.test_dataset[0]["image"])
    _truncate(Path(first["path"]))  # damaged after setup: only the cache can still serve it
    torch.testing.assert_close(cached.test_dataset[0]["image"], first["image"])
    with pytest.raises(DataError, match=f"truncated image {_esc(first['path'])}"):
        uncached.test_dataset[0]


def test_mvtec_runs_under_a_lightning_trainer(synthetic_root: Path) -> None:
    from lightning.pytorch import LightningModule, Trainer

    class MeanScore(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen_labels: list[int] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return ((batch["image"].mean() - self.weight) ** 2).sum()

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            loss = (batch["image"].mean() - self.weight).abs().sum()
            self.log("val/loss", loss, batch_size=len(batch["label"]))

        def test_step(self, batch: dict, batch_idx: int) -> None:
            self.seen_labels += batch["label"].tolist()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = MeanScore()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = MVTecDataModule(synthetic_root, "synthetic", image_size=16, batch_size=4)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert Counter(model.seen_labels) == {0: N_TEST_GOOD, 1: N_TEST - N_TEST_GOOD}


def test_synthetic_datamodule_generates_and_reads(tmp_path: Path) -> None:
    datamodule = SyntheticMVTecDataModule(
        tmp_path, n_train=4, n_test_good=2, n_test_defect_per_type=1, image_size=16, seed=3
    )
    datamodule.setup()
    assert (tmp_path / "synthetic" / "meta.json").is_file()
    assert len(datamodule.train_dataset) == 3 and len(datamodule.val_dataset) == 1
    assert datamodule.test_summary == {"good": 2, **{defect: 1 for defect in DEFECT_TYPES}}
    assert datamodule.test_dataset[0]["image"].shape == (3, 16, 16)


# --- MVTec errors


def test_mvtec_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"MVTec AD root not found: {_esc(tmp_path / 'nowhere')}"):
        MVTecDataModule(tmp_path / "nowhere", "bottle")


def test_mvtec_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"MVTec AD root is empty: {_esc(tmp_path)}"):
        MVTecDataModule(tmp_path, "bottle")


def test_mvtec_unknown_category_lists_available(synthetic_root: Path) -> None:
    with pytest.raises(DataError, match=r"category 'bottle' not found .*available: synthetic"):
        MVTecDataModule(synthetic_root, "bottle")


def test_mvtec_empty_train_folder(synthetic_copy: Path) -> None:
    good_dir = synthetic_copy / "train" / "good"
    for path in good_dir.glob("*.png"):
        path.unlink()
    (good_dir / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"no images in MVTec AD training folder {_esc(good_dir)}"):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("fit")


def test_mvtec_no_test_images(synthetic_copy: Path) -> None:
    for path in (synthetic_copy / "test").rglob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match="no images in MVTec AD test folder"):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("test")


def test_mvtec_missing_mask(synthetic_copy: Path) -> None:
    mask_path = synthetic_copy / "ground_truth" / "hole" / "001_mask.png"
    mask_path.unlink()
    expected = f"mask missing for defect image .*hole/001\\.png: expected {_esc(mask_path)}"
    with pytest.raises(DataError, match=expected):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("test")


def test_mvtec_mask_size_mismatch(synthetic_copy: Path) -> None:
    mask_path = synthetic_copy / "ground_truth" / "blob" / "000_mask.png"
    Image.open(mask_path).resize((SIZE // 2, SIZE // 2)).save(mask_path)
    with pytest.raises(
        DataError, match=f"mask {_esc(mask_path)} is 16x16 but its image .*blob/000\\.png is 32x32"
    ):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("test")


def test_mvtec_truncated_image_found_in_setup(synthetic_copy: Path) -> None:
    image_path = synthetic_copy / "test" / "scratch" / "002.png"
    _truncate(image_path)
    with pytest.raises(DataError, match=f"truncated image {_esc(image_path)}"):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("test")


def test_mvtec_corrupt_image_found_in_setup(synthetic_copy: Path) -> None:
    image_path = synthetic_copy / "train" / "good" / "003.png"
    image_path.write_bytes(b"\x89PNG but not really an image")
    with pytest.raises(DataError, match=f"unreadable or truncated image {_esc(image_path)}"):
        MVTecDataModule(synthetic_copy.parent, "synthetic").setup("fit")


def test_mvtec_truncated_image_found_when_loaded(synthetic_copy: Path) -> None:
    datamodule = MVTecDataModule(synthetic_copy.parent, "synthetic", image_size=SIZE)
    datamodule.setup("fit")
    image_path = datamodule.train_dataset.samples[0].image_path
    _truncate(image_path)
    with pytest.raises(DataError, match=f"truncated image {_esc(image_path)}"):
        next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize(
    ("arguments", "key"),
    [
        ({"normalization": "cifar"}, "normalization"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_mvtec_bad_config(synthetic_root: Path, arguments: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MVTecDataModule(synthetic_root, "synthetic", **arguments)


# --- MVTec AD bottle (real)


@requires_data("mvtec_ad/bottle")
def test_real_bottle_counts_and_masks() -> None:
    root = DATA_DIR / "mvtec_ad"
    summary = mvtec_test_summary(root, "bottle")
    assert summary == {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}
    datamodule = MVTecDataModule(root, "bottle", image_size=64, eval_batch_size=4)
    datamodule.setup()
    assert len(datamodule.train_dataset) + len(datamodule.val_dataset) == 209
    assert len(datamodule.val_dataset) == 21
    assert len(datamodule.test_dataset) == 83 and datamodule.test_summary == summary
    defects = [sample for sample in datamodule.test_dataset.samples if sample.label == 1]
    assert len(defects) == 63
    for sample in defects:
        assert sample.mask_path is not None
        assert Image.open(sample.mask_path).size == Image.open(sample.image_path).size
    defect_index = datamodule.test_dataset.samples.index(defects[0])
    item = datamodule.test_dataset[defect_index]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["mask"].sum() > 0 and set(item["mask"].unique().tolist()) == {0.0, 1.0}


# --- IDX files


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(
    root: Path, per_class_train: int = 10, per_class_test: int = 5, gz: bool = True
) -> Path:
    """Write MNIST-format IDX files: 10 classes, class c drawn as pixel value 20 * c + noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.clip(
            20 * labels[:, None, None] + rng.integers(0, 10, size=(len(labels), 28, 28)), 0, 255
        )
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_split_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    root = _fake_mnist(tmp_path, gz=gz)
    images, labels = load_idx_split(root, "train")
    assert images.shape == (100, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and Counter(labels.tolist()) == {c: 10 for c in range(10)}
    assert load_idx_split(root, "test")[0].shape == (50, 28, 28)


def test_load_idx_bad_magic(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    bad = root / "t10k-labels-idx1-ubyte.gz"
    _write_idx(bad, 2051, np.zeros(50))
    with pytest.raises(
        DataError, match=f"IDX file {_esc(bad)} has magic number 2051, expected 2049"
    ):
        load_idx_split(root, "test")


def test_load_idx_size_disagrees_with_header(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path, gz=False)
    bad = root / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-28])
    with pytest.raises(DataError, match=f"IDX file {_esc(bad)} is .* bytes, its header"):
        load_idx_split(root, "train")


def test_idx_labels_beyond_the_class_names(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", 2049, np.full(50, 12))
    with pytest.raises(
        DataError, match=f"IDX labels in {_esc(root)} go up to 12, but mnist has 10"
    ):
        OneClassDataModule("mnist", root, 0).setup()


def test_load_idx_missing_file_and_count_mismatch(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(7))
    with pytest.raises(
        DataError, match=r"holds 50 images but .*t10k-labels-idx1-ubyte\.gz holds 7 labels"
    ):
        load_idx_split(root, "test")
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"IDX file not found: .*train-labels-idx1-ubyte"):
        load_idx_split(root, "train")


# --- one-class protocols


def test_one_class_protocols_on_idx_files(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    all_others = OneClassDataModule("mnist", root, 3, batch_size=4, eval_batch_size=50)
    all_others.setup()
    assert len(all_others.train_dataset) == 9 and len(all_others.val_dataset) == 1
    assert all_others.train_dataset.labels.sum() == 0 and all_others.val_dataset.labels.sum() == 0
    batch = _full_batch(all_others.test_dataloader())
    assert batch["image"].shape == (50, 1, 28, 28) and set(batch) == {"image", "label", "index"}
    assert Counter(batch["label"].tolist()) == {0: 5, 1: 45}
    # Class 3 pixels are 60..69: the normal test images, once the MNIST normalisation is undone.
    pixels = batch["image"][batch["label"] == 0] * 0.3081 + 0.1307
    assert ((pixels * 255).round() >= 60).all() and ((pixels * 255).round() < 70).all()

    balanced = OneClassDataModule(
        "mnist", root, 3, protocol="balanced", image_size=14, normalization="none"
    )
    assert Counter(balanced.test_dataset.labels.tolist()) == {0: 5, 1: 5}
    assert balanced.input_shape == (1, 14, 14)
    assert balanced.test_dataset.images.min() >= 0.0 and balanced.test_dataset.images.max() <= 1.0

    capped = OneClassDataModule("mnist", root, 3, max_train_samples=4, max_test_samples=10)
    assert len(capped.train_dataset) == 4
    assert Counter(capped.test_dataset.labels.tolist()) == {0: 1, 1: 9}


def test_one_class_balanced_draw_is_seeded(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)

    def anomalous_images(seed: int) -> torch.Tensor:
        test_dataset = OneClassDataModule(
            "mnist", root, 0, protocol="balanced", seed=seed
        ).test_dataset
        return test_dataset.images[test_dataset.labels == 1]

    torch.testing.assert_close(anomalous_images(0), anomalous_images(0))
    assert not torch.equal(anomalous_images(0), anomalous_images(1))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"dataset": "cifar10"},
            "dataset='cifar10' is not one of 'mnist', 'fashion_mnist', 'folder', 'digits'",
        ),
        (
            {"protocol": "leave_one_out"},
            "protocol='leave_one_out' is not one of 'all_others', 'balanced'",
        ),
        ({"normal_class": 10}, r"normal_class=10 is out of range for digits \(valid: 0..9"),
        ({"normal_class": -1}, r"normal_class=-1 is out of range"),
        ({"normal_class": "cat"}, "normal_class='cat' is not a class of digits"),
        ({"normal_class": True}, "normal_class=True must be an int index or a class name"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 must lie strictly between 0 and 1"),
        ({"normalization": "cifar"}, "normalization='cifar' is not one of 'dataset', 'imagenet', 'none'"),
        ({"dataset": "mnist", "root": None}, "root is required for dataset='mnist'"),
    ],
)
def test_one_class_bad_config(arguments: dict, message: str) -> None:
    config = {"dataset": "digits", "root": None, "normal_class": 0, **arguments}
    with pytest.raises(ConfigError, match=message):
        OneClassDataModule(**config)


def test_one_class_missing_idx_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"mnist data folder not found: {_esc(tmp_path / 'mnist')}"):
        OneClassDataModule("mnist", tmp_path / "mnist", 0)


# --- digits (offline demo set)


def test_digits_split_shapes_and_normalization() -> None:
    from sklearn.datasets import load_digits

    class_counts = Counter(load_digits().target.tolist())
    datamodule = OneClassDataModule("digits", None, 7, protocol="all_others", batch_size=16)
    datamodule.setup()
    test_counts = {c: len(split_indices(n, 0.3, 0)[1]) for c, n in class_counts.items()}
    assert len(datamodule.test_dataset) == sum(test_counts.values())
    assert (
        len(datamodule.train_dataset) + len(datamodule.val_dataset)
        == class_counts[7] - test_counts[7]
    )
    assert int((datamodule.test_dataset.labels == 0).sum()) == test_counts[7]
    assert datamodule.input_shape == (1, 8, 8) and datamodule.num_classes == 10
    (mean,), (std,) = datamodule.normalization_stats
    assert 0.1 < mean < 0.5 and 0.2 < std < 0.5
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["label"].sum() == 0

    upsampled = OneClassDataModule("digits", None, "7", image_size=28, protocol="balanced")
    assert upsampled.input_shape == (1, 28, 28) and upsampled.normal_class == 7
    assert Counter(upsampled.test_dataset.labels.tolist()) == {0: test_counts[7], 1: test_counts[7]}


def test_digits_split_seed_fixes_the_test_images_across_seeds() -> None:
    """split_seed set: every seed is tested on the same images (the seed spread is the training's);
    unset: the train/test split follows the seed."""
    def test_images(seed: int, split_seed: int | None) -> torch.Tensor:
        datamodule = OneClassDataModule("digits", None, 0, seed=seed, split_seed=split_seed)
        datamodule.setup()
        return datamodule.test_dataset.images

    assert torch.equal(test_images(0, 0), test_images(1, 0))
    assert not torch.equal(test_images(0, None), test_images(1, None))
    assert torch.equal(test_images(1, None), test_images(5, 1))


# --- folder sets


def _write_class_folders(root: Path, classes: dict[str, int], size: int = 10) -> None:
    for class_id, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.full((size, size), 40 * class_id + index, dtype=np.uint8)
            Image.fromarray(pixels).convert("RGB").save(root / name / f"{index:02d}.png")


def test_folder_seeded_split_and_class_names(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, {"cat": 6, "dog": 6, "fox": 6})
    datamodule = OneClassDataModule("folder", tmp_path, "dog", val_fraction=0.2, eval_batch_size=3)
    assert datamodule.class_names == ("cat", "dog", "fox") and datamodule.normal_class == 1
    datamodule.setup()
    assert (
        len(datamodule.train_dataset) == 4 and len(datamodule.val_dataset) == 1
    )  # 5 of 6 dogs train, 1 test
    batch = _full_batch(datamodule.test_dataloader())
    assert batch["image"].shape == (3, 1, 10, 10) and datamodule.input_shape == (1, 10, 10)
    assert [Path(path).parent.name for path in batch["path"]] == ["cat", "dog", "fox"]
    assert batch["label"].tolist() == [1, 0, 1]
    assert all("/dog/" in path for path in datamodule.train_dataset.paths)
    again = OneClassDataModule("folder", tmp_path, 1, val_fraction=0.2)
    assert again.test_dataset.paths == datamodule.test_dataset.paths


def test_folder_with_train_and_test_subfolders(tmp_path: Path) -> None:
    _write_class_folders(tmp_path / "train", {"ok": 5, "bad": 3})
    _write_class_folders(tmp_path / "test", {"ok": 2, "bad": 4})
    datamodule = OneClassDataModule("folder", tmp_path, "ok", image_size=6)
    assert datamodule.class_names == ("bad", "ok")
    assert Counter(datamodule.test_dataset.labels.tolist()) == {0: 2, 1: 4}
    assert len(datamodule.train_dataset) + len(datamodule.val_dataset) == 5
    assert datamodule.input_shape == (1, 6, 6)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"folder data folder is empty: {_esc(tmp_path)}"):
        OneClassDataModule("folder", tmp_path, 0)
    _write_class_folders(tmp_path, {"only": 3})
    with pytest.raises(DataError, match="needs at least 2 class folders, found 1"):
        OneClassDataModule("folder", tmp_path, 0)
    _write_class_folders(tmp_path, {"other": 3})
    with pytest.raises(
        ConfigError, match=r"normal_class=2 is out of range for folder \(valid: 0..1"
    ):
        OneClassDataModule("folder", tmp_path, 2)
    odd = tmp_path / "other" / "02.png"
    Image.new("L", (12, 10)).save(odd)
    with pytest.raises(DataError, match=f"image {_esc(odd)} is 12x10, unlike .* set image_size"):
        OneClassDataModule("folder", tmp_path, 0).setup()
    assert OneClassDataModule("folder", tmp_path, 0, image_size=10).input_shape == (1, 10, 10)
    _truncate(odd)
    with pytest.raises(DataError, match=f"truncated image {_esc(odd)}"):
        OneClassDataModule("folder", tmp_path, 0, image_size=10).setup()


# --- MNIST / Fashion-MNIST (real)


@requires_data("mnist")
def test_real_mnist_counts_and_protocols() -> None:
    root = DATA_DIR / "mnist"
    train_images, train_labels = load_idx_split(root, "train")
    test_images, test_labels = load_idx_split(root, "test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert int((train_labels == 0).sum()) == 5923 and int((test_labels == 0).sum()) == 980
    assert abs(train_images.float().mean().item() / 255 - 0.1307) < 1e-3

    balanced = OneClassDataModule("mnist", root, 0, protocol="balanced")
    balanced.setup()
    assert len(balanced.test_dataset) == 2 * 980 and int(balanced.test_dataset.labels.sum()) == 980
    assert len(balanced.train_dataset) + len(balanced.val_dataset) == 5923
    all_others = OneClassDataModule("mnist", root, 0, protocol="all_others", max_train_samples=100)
    assert (
        len(all_others.test_dataset) == 10000
        and int((all_others.test_dataset.labels == 0).sum()) == 980
    )
    assert len(all_others.train_dataset) == 100


@requires_data("fashion_mnist")
def test_real_fashion_mnist_counts_and_class_names() -> None:
    root = DATA_DIR / "fashion_mnist"
    assert load_idx_split(root, "train")[0].shape == (60000, 28, 28)
    datamodule = OneClassDataModule("fashion_mnist", root, "Trouser", protocol="balanced")
    assert datamodule.normal_class == 1 and datamodule.class_names[9] == "Ankle boot"
    assert len(datamodule.test_dataset) == 2000 and datamodule.normalization_stats == (
        (0.2860,),
        (0.3530,),
    )


# --- colour class folders (channels=3) and the pretrained-encoder schemes on them

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def _write_colour_folders(root: Path, count: int = 10, size: int = 24) -> None:
    """One folder per colour: noisy images of that colour (seeded), as RGB PNG."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            noise = rng.integers(-30, 31, (size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")


def test_colour_folder_reads_rgb_with_the_encoder_normalisation(tmp_path: Path) -> None:
    _write_colour_folders(tmp_path)
    colour = OneClassDataModule("folder", tmp_path, "red", channels=3, normalization="imagenet", image_size=16)
    assert colour.input_shape == (3, 16, 16)
    assert colour.normalization_stats == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for path, image in zip(colour.test_dataset.paths, colour.test_dataset.images, strict=True):
        pixels = (image * std + mean).mean((1, 2))  # back to [0, 1]: the colour of the folder
        expected = torch.tensor(COLOURS[Path(path).parent.name], dtype=torch.float32) / 255
        assert torch.allclose(pixels, expected, atol=0.03), (path, pixels)
    # the same folders read grey (the default) lose the colour: one channel
    grey = OneClassDataModule("folder", tmp_path, "red", image_size=16)
    assert grey.input_shape == (1, 16, 16)
    # per-channel statistics of the training split for normalization="dataset"
    per_channel = OneClassDataModule("folder", tmp_path, "red", channels=3, normalization="dataset")
    means, stds = per_channel.normalization_stats
    assert len(means) == 3 and len(stds) == 3 and means[0] != pytest.approx(means[1])
    normalised = torch.cat([per_channel.train_dataset.images, per_channel.val_dataset.images])
    assert normalised.shape[1] == 3


def test_grey_set_with_three_channels_repeats_the_channel() -> None:
    datamodule = OneClassDataModule("digits", None, 0, channels=3, normalization="imagenet", image_size=16)
    images = datamodule.test_dataset.images
    assert images.shape[1:] == (3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = images * std + mean
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)


@pytest.mark.parametrize("channels", [2, 0, True])
def test_channels_must_be_one_or_three(channels: object) -> None:
    with pytest.raises(ConfigError, match="channels must be 1 \\(grey\\) or 3 \\(RGB\\)"):
        OneClassDataModule("digits", None, 0, channels=channels)


DEPLOY_OFF = ("deploy.measure=false", "deploy.log_model=false")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["rd_bottle", "rd_expert_bottle", "patchcore_bottle"])
def test_pretrained_encoder_experiment_on_colour_folders_logs_image_auroc(
    experiment: str, compose_cfg, mlflow_uri: str, tmp_path: Path
) -> None:
    """``kd-train experiment=rd_bottle data=folder data.root=... data.normal_class=red data.channels=3``
    (one epoch, 32 px): image-level metrics, no pixel metrics (class folders have no masks)."""
    from mlflow.tracking import MlflowClient

    from kd_experiments.train import train
    from tests.conftest import fast_overrides

    _write_colour_folders(tmp_path / "colours")
    cfg = compose_cfg(f"experiment={experiment}", "data=folder", f"data.root={tmp_path / 'colours'}",
                      "data.normal_class=red", "data.channels=3", "data.image_size=32",
                      *fast_overrides(*DEPLOY_OFF))
    metrics = train(cfg)
    assert 0.0 <= metrics["test/image_auroc"] <= 1.0
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data
    assert "test/image_auroc" in logged.metrics
    assert not any(name in logged.metrics for name in ("test/pixel_auroc", "test/aupro"))
    assert logged.tags["dataset"] == "folder-cred" and logged.params["data.channels"] == "3"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("experiment=rd_smoke", "data=folder"), r"^data\.n_train is not a setting of .*OneClassDataModule.*~data\.n_train"),
        (("experiment=quickstart", "data=mvtec"), r"^data\.normal_class is not a setting of .*MVTecDataModule"),
        (("experiment=rd_bottle", "data=folder", "data.normalization=dataset"),
         r"^data\.normalization=dataset does not suit scheme=.*: its pretrained encoder takes data\.normalization=imagenet"),
    ],
)
def test_conflicting_experiment_and_data_group_fail_before_reading_data(
    overrides: tuple[str, ...], message: str, compose_cfg, mlflow_uri: str, tmp_path: Path
) -> None:
    from kd_experiments.train import train

    missing = tmp_path / "never_read"  # the check runs before any data is looked at
    cfg = compose_cfg(*overrides, f"data.root={missing}")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "size", "sigma", "protocol"),
    [
        (("experiment=rd_mvtec",), 256, 4.0, "paper-256"),
        (("experiment=rd_expert_mvtec", "data.category=screw"), 256, 4.0, "paper-256"),
        (("experiment=rd_mvtec", "data.image_size=128", "data.category=transistor"), 128, 2.0, "fast-128"),
        (("experiment=rd_bottle",), 128, 2.0, "fast-128"),
    ],
)
def test_mvtec_protocol_settings_and_tags(overrides: tuple[str, ...], size: int, sigma: float, protocol: str,
                                          compose_cfg) -> None:
    """256 px is the papers' protocol (blur sigma 4, scaled with the image size); every run is
    tagged with its category, image size and protocol, so reports never mix sizes."""
    from kd_experiments.config import check_composition, experiment_label

    cfg = compose_cfg(*overrides)
    check_composition(cfg)
    category = next((o.split("=")[1] for o in overrides if o.startswith("data.category=")), "bottle")
    assert cfg.data._target_.endswith("MVTecDataModule") and cfg.data.root.endswith("mvtec_ad")
    assert (cfg.data.category, cfg.data.image_size, cfg.scheme.blur_sigma) == (category, size, sigma)
    tags = experiment_label(cfg)
    assert (tags["category"], tags["image_size"], tags["protocol"]) == (category, str(size), protocol)
    assert tags["dataset"] == f"mvtec-{category}"
