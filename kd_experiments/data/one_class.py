"""One-class anomaly detection on labelled image sets: one class is normal, the others anomalous.

The setting of Pol et al., "Knowledge Distillation for Anomaly Detection"
(arXiv 2310.06047): train on the training images of a single *normal* class,
test on the official test split. Two test protocols:

- ``all_others``: the whole test split; the normal class is label 0, every
  other class label 1 (about 10% normal on MNIST).
- ``balanced``: the normal class's test images plus as many images drawn
  (seeded, uniformly, without replacement) from the other classes' test
  images, as in Pol et al.

Validation holds out a seeded fraction of the normal class's training images
(label 0). With ``val_anomalies="other_classes"`` it also holds as many training
images of the other classes (label 1, a seeded draw), with
``"all_other_classes"`` every one of them (a finer validation AUROC where the
normal class is small, e.g. digits), so that a scheme can be
scored on validation (``val/image_auroc``) and an epoch selected without
looking at the test split; the training split itself is unchanged (normal images
only). Sets, all loaded into memory as tensors:

- ``mnist`` / ``fashion_mnist``: the four standard IDX files in ``root``
  (gzipped or not), see :func:`load_idx_split`.
- ``folder``: ``root/<class>/*.png|jpg|jpeg``, read as grayscale, or as RGB
  with ``channels=3`` (colour class folders for the pretrained-encoder schemes,
  normalised with ImageNet statistics by ``normalization="imagenet"``); with
  ``root/train/<class>`` and ``root/test/<class>`` those are the splits,
  otherwise each class is split 80/20 (seeded).

``channels=3`` on a grey set (MNIST, Fashion-MNIST, digits) repeats the grey
channel three times, so any set can feed an RGB encoder.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download),
  split 70/30 per class (seeded): the offline demo set.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate
from torch.utils.data import Dataset

from kd_experiments.backbones import input_statistics
from kd_experiments.data.common import (
    SplitDataModule,
    check_choice,
    check_fraction,
    check_positive_int,
    list_images,
    list_subdirs,
    load_image,
    normalize,
    parse_image_size,
    pil_to_uint8_tensor,
    require_dir,
    seeded_subset,
    split_indices,
)
from kd_experiments.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "folder", "digits")
PROTOCOLS: tuple[str, ...] = ("all_others", "balanced")
NORMALIZATIONS: tuple[str, ...] = ("dataset", "imagenet", "none")
CHANNELS: tuple[int, ...] = (1, 3)
VAL_ANOMALIES: tuple[str, ...] = ("none", "other_classes", "all_other_classes")

MNIST_CLASS_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASET_STATS: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion_mnist": (0.2860, 0.3530),
}
"""Published training-set pixel ``(mean, std)`` of the IDX sets, pixels scaled to [0, 1]."""

IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
_IDX_PREFIXES: dict[str, str] = {"train": "train", "test": "t10k"}
_FOLDER_TEST_FRACTION = 0.2
_DIGITS_TEST_FRACTION = 0.3


def _find_idx_file(root: Path, name: str) -> Path:
    """Return ``root/name`` or ``root/name.gz``, whichever exists (plain first)."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"IDX file not found: {root / name} (or {name}.gz)")


def _read_idx(path: Path, magic: int, dimensions: int) -> np.ndarray:
    """Read an unsigned-byte IDX file, checking its magic number and its size against the header."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path}: {error}") from error
    header_size = 4 * (1 + dimensions)
    if len(data) < header_size:
        raise DataError(
            f"IDX file {path} is {len(data)} bytes, shorter than its {header_size}-byte header"
        )
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise DataError(f"IDX file {path} has magic number {found_magic}, expected {magic}")
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, dimensions + 1))
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        raise DataError(
            f"IDX file {path} is {len(data)} bytes, its header {shape} implies {expected_size}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_idx_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of an MNIST-format set (MNIST, Fashion-MNIST) from its IDX files.

    Reads ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``split="train"``)
    or ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (``split="test"``),
    each plain or gzipped (``.gz``).

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``(N, H, W)`` (28x28 for MNIST)
        and ``int64`` tensor ``(N,)``.

    Raises:
        ConfigError: If ``split`` is not ``"train"`` or ``"test"``.
        DataError: If a file is missing, unreadable, has the wrong magic number
            or a size that disagrees with its header, or if the image and
            label counts differ.
    """
    prefix = _IDX_PREFIXES[check_choice("split", split, tuple(_IDX_PREFIXES))]
    root = require_dir(root, "IDX data folder")
    images_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class _RawSplit:
    """One split as read: ``uint8`` images ``(N, H, W)`` (grey) or ``(N, 3, H, W)`` (colour folders),
    class ids ``(N,)``, files or ``None``."""

    images: torch.Tensor
    class_ids: torch.Tensor
    paths: list[str] | None


class OneClassDataset(Dataset):
    """In-memory images with anomaly labels, yielding CONTRIBUTING.md batch dicts.

    Each item is ``{"image": float32 (C, H, W), "label": int, "index": int}``
    plus ``"path": str`` when ``paths`` is given.

    Args:
        images: Float tensor ``(N, C, H, W)``, already normalised.
        labels: ``int64`` tensor ``(N,)``: 0 normal, 1 anomalous.
        paths: Source file of each image, if the images come from files.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, paths: Sequence[str] | None = None
    ) -> None:
        assert len(images) == len(labels), "one label per image"
        assert paths is None or len(paths) == len(images), "one path per image"
        self.images = images
        self.labels = labels
        self.paths = None if paths is None else list(paths)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        item: dict[str, torch.Tensor | int | str] = {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "index": index,
        }
        if self.paths is not None:
            item["path"] = self.paths[index]
        return item


def _class_ids(files: list[tuple[Path, int]]) -> torch.Tensor:
    """The class ids of ``(path, class_id)`` pairs as an ``int64`` tensor."""
    return torch.tensor([class_id for _, class_id in files], dtype=torch.int64)


def _per_channel_stats(images: torch.Tensor, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(means, stds)`` of ``uint8`` images: ``(N, H, W)`` (grey: the one value on
    every channel) or ``(N, C, H, W)``."""
    if images.dim() == 3:
        mean, std = _pixel_stats(images)
        return (mean,) * channels, (std,) * channels
    stats = [_pixel_stats(images[:, channel]) for channel in range(images.shape[1])]
    return tuple(m for m, _ in stats), tuple(s for _, s in stats)


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Exact mean and std of ``uint8`` pixels scaled to [0, 1], from their 256-bin histogram."""
    counts = torch.bincount(images.reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    variance = float((counts * (values - mean) ** 2).sum() / counts.sum())
    return mean, variance**0.5


def _digits_splits(seed: int) -> tuple[_RawSplit, _RawSplit]:
    """scikit-learn's 8x8 digits as ``uint8`` images, split 70/30 per class (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))
    class_ids = torch.from_numpy(digits.target.astype(np.int64))
    train_positions, test_positions = [], []
    for class_id in range(len(MNIST_CLASS_NAMES)):
        members = torch.nonzero(class_ids == class_id).flatten().tolist()
        kept, held_out = split_indices(len(members), _DIGITS_TEST_FRACTION, seed)
        train_positions += [members[i] for i in kept]
        test_positions += [members[i] for i in held_out]
    train_positions.sort()
    test_positions.sort()
    return (
        _RawSplit(images[train_positions], class_ids[train_positions], None),
        _RawSplit(images[test_positions], class_ids[test_positions], None),
    )


class OneClassDataModule(SplitDataModule):
    """One normal class of a labelled image set against the others.

    Args:
        dataset: One of ``"mnist"``, ``"fashion_mnist"``, ``"folder"``, ``"digits"``.
        root: Folder of the IDX files or of the class folders; ignored (may be
            ``None``) for ``"digits"``.
        normal_class: The normal class, by index (into :attr:`class_names`) or name.
        protocol: ``"all_others"`` or ``"balanced"`` (see the module docstring).
        val_fraction: Fraction of the normal training images held out for
            validation, in (0, 1); at least one is held out and one kept.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (0 is best for in-memory tensors).
        seed: Seed of every split, draw and of the training shuffle order, except the
            train/test split of ``"digits"`` and ``"folder"`` when ``split_seed`` is set.
        split_seed: Seed of the train/test split of ``"digits"`` and of ``"folder"``
            sets without ``train``/``test`` folders; ``None``: ``seed``. Fixed, every seed
            of a sweep is tested on the same images, so the seed spread is the training's.
        image_size: Resize every image to this size (int: square; or
            ``(height, width)``), bilinear; ``None`` keeps the native size (a
            ``"folder"`` set then needs images of one size).
        normalization: ``"dataset"`` (MNIST 0.1307/0.3081, Fashion-MNIST
            0.2860/0.3530; for ``"folder"`` and ``"digits"`` the mean and std
            of the whole training split, all classes, per channel),
            ``"imagenet"`` (ImageNet mean/std, what a pretrained encoder
            expects; :func:`kd_experiments.backbones.input_statistics`) or
            ``"none"`` ([0, 1]).
        max_train_samples: Keep at most this many training images (seeded draw).
        max_test_samples: Keep at most this many test images, drawn (seeded)
            per label in the protocol's normal/anomalous proportion.
        val_anomalies: ``"none"`` (validation: held-out normal images only),
            ``"other_classes"`` (plus as many training images of the other
            classes, label 1: a labelled validation split from training data) or
            ``"all_other_classes"`` (plus every training image of the other classes).
        channels: 1 (grey) or 3 (RGB: colour folders are read in colour, grey
            sets get their channel repeated).

    Raises:
        ConfigError: For an unknown dataset, protocol or normalisation, a
            ``normal_class`` out of range or not a class name, or another
            invalid value.
        DataError: For a missing root or class folder (at construction) or
            missing, corrupt or inconsistent files (in :meth:`setup`).
    """

    def __init__(
        self,
        dataset: str,
        root: str | Path | None,
        normal_class: int | str,
        protocol: str = "all_others",
        val_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
        normalization: str = "dataset",
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        val_anomalies: str = "none",
        channels: int = 1,
        split_seed: int | None = None,
    ) -> None:
        super().__init__()
        if channels not in CHANNELS or isinstance(channels, bool):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.channels = int(channels)
        self.val_anomalies = check_choice("val_anomalies", val_anomalies, VAL_ANOMALIES)
        self.dataset = check_choice("dataset", dataset, DATASETS)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else check_positive_int("eval_batch_size", eval_batch_size)
        )
        self.num_workers = check_positive_int("num_workers", num_workers, minimum=0)
        self.seed = seed
        self.split_seed = seed if split_seed is None else int(split_seed)
        self.image_size = None if image_size is None else parse_image_size("image_size", image_size)
        self.max_train_samples = (
            None
            if max_train_samples is None
            else check_positive_int("max_train_samples", max_train_samples)
        )
        self.max_test_samples = (
            None
            if max_test_samples is None
            else check_positive_int("max_test_samples", max_test_samples, minimum=2)
        )
        if self.dataset == "digits":
            self.root = None
        elif root is None:
            raise ConfigError(f"root is required for dataset={self.dataset!r}")
        else:
            self.root = require_dir(root, f"{self.dataset} data folder")
        self._class_names = self._discover_class_names()
        self.normal_class = self._resolve_normal_class(normal_class)
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of every class of the set, in class-index order."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes of the set (normal one included)."""
        return len(self._class_names)

    @property
    def normal_class_name(self) -> str:
        """Name of the normal class."""
        return self._class_names[self.normal_class]

    def _discover_class_names(self) -> tuple[str, ...]:
        if self.dataset == "fashion_mnist":
            return FASHION_MNIST_CLASS_NAMES
        if self.dataset in ("mnist", "digits"):
            return MNIST_CLASS_NAMES
        assert self.root is not None
        class_root = self.root / "train" if self._folder_has_splits() else self.root
        names = tuple(list_subdirs(class_root))
        if len(names) < 2:
            raise DataError(
                f"folder data set {class_root} needs at least 2 class folders, found {len(names)}"
            )
        return names

    def _folder_has_splits(self) -> bool:
        assert self.root is not None
        return (self.root / "train").is_dir() and (self.root / "test").is_dir()

    def _resolve_normal_class(self, normal_class: int | str) -> int:
        valid = f"valid: 0..{self.num_classes - 1} or a name in {list(self._class_names)}"
        if isinstance(normal_class, str):
            if normal_class not in self._class_names:
                raise ConfigError(
                    f"normal_class={normal_class!r} is not a class of {self.dataset} ({valid})"
                )
            return self._class_names.index(normal_class)
        if isinstance(normal_class, bool) or not isinstance(normal_class, int):
            raise ConfigError(
                f"normal_class={normal_class!r} must be an int index or a class name ({valid})"
            )
        if not 0 <= normal_class < self.num_classes:
            raise ConfigError(
                f"normal_class={normal_class} is out of range for {self.dataset} ({valid})"
            )
        return normal_class

    def _folder_splits(self) -> tuple[_RawSplit, _RawSplit]:
        """Read class folders as ``uint8`` grey (or RGB with ``channels=3``): ``train/``, ``test/``
        or 80/20 per class."""
        assert self.root is not None
        has_splits = self._folder_has_splits()
        if has_splits:
            unknown = sorted(set(list_subdirs(self.root / "test")) - set(self._class_names))
            if unknown:
                raise DataError(
                    f"test class folder(s) {unknown} in {self.root / 'test'} "
                    "have no training folder"
                )
        train_files: list[tuple[Path, int]] = []
        test_files: list[tuple[Path, int]] = []
        for class_id, name in enumerate(self._class_names):
            if has_splits:
                class_train = list_images(self.root / "train" / name)
                if not class_train:
                    raise DataError(f"no images in class folder {self.root / 'train' / name}")
                train_files += [(path, class_id) for path in class_train]
                test_files += [(path, class_id) for path in list_images(self.root / "test" / name)]
                continue
            files = list_images(self.root / name)
            if len(files) < 2:
                raise DataError(
                    f"class folder {self.root / name} needs at least 2 images to split, "
                    f"found {len(files)}"
                )
            kept, held_out = split_indices(len(files), _FOLDER_TEST_FRACTION, self.split_seed)
            train_files += [(files[i], class_id) for i in kept]
            test_files += [(files[i], class_id) for i in held_out]
        if not test_files:
            raise DataError(f"no test images in {self.root / 'test'}")
        train_images, test_images = self._read_files(train_files), self._read_files(test_files)
        if self.image_size is None:
            reference_path, reference = train_files[0][0], train_images[0]
            all_files, all_images = train_files + test_files, train_images + test_images
            for (path, _), image in zip(all_files, all_images, strict=True):
                if image.shape != reference.shape:
                    raise DataError(
                        f"image {path} is {image.shape[-1]}x{image.shape[-2]}, unlike "
                        f"{reference_path} ({reference.shape[-1]}x{reference.shape[-2]}); "
                        "set image_size to resize all images"
                    )
        return (
            _RawSplit(
                torch.stack(train_images),
                _class_ids(train_files),
                [str(path) for path, _ in train_files],
            ),
            _RawSplit(
                torch.stack(test_images),
                _class_ids(test_files),
                [str(path) for path, _ in test_files],
            ),
        )

    def _read_files(self, files: list[tuple[Path, int]]) -> list[torch.Tensor]:
        """Decode ``files`` as grey ``uint8`` ``(H, W)`` (or RGB ``(3, H, W)`` with ``channels=3``),
        resized to ``image_size`` if set."""
        colour = self.channels == 3
        images = []
        for path, _ in files:
            image = load_image(path, "RGB" if colour else "L")
            if self.image_size is not None and image.size != self.image_size[::-1]:
                image = image.resize(self.image_size[::-1], Image.Resampling.BILINEAR)
            pixels = pil_to_uint8_tensor(image)
            images.append(pixels if colour else pixels[0])
        return images

    def _load_raw(self) -> tuple[_RawSplit, _RawSplit]:
        if self.dataset == "digits":
            return _digits_splits(self.split_seed)
        if self.dataset == "folder":
            return self._folder_splits()
        assert self.root is not None
        train_images, train_class_ids = load_idx_split(self.root, "train")
        test_images, test_class_ids = load_idx_split(self.root, "test")
        largest = int(max(train_class_ids.max(), test_class_ids.max()))
        if largest >= self.num_classes:
            raise DataError(
                f"IDX labels in {self.root} go up to {largest}, "
                f"but {self.dataset} has {self.num_classes} classes"
            )
        train = _RawSplit(train_images, train_class_ids, None)
        return train, _RawSplit(test_images, test_class_ids, None)

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` ``(N, H, W)`` or ``(N, 3, H, W)`` to normalised float ``(N, channels, h, w)``,
        at ``image_size`` (a grey image's channel repeated when ``channels=3``)."""
        floats = (images.unsqueeze(1) if images.dim() == 3 else images).to(torch.float32) / 255.0
        if floats.shape[1] != self.channels:
            floats = floats.expand(-1, self.channels, -1, -1)
        if self.image_size is not None and tuple(floats.shape[-2:]) != self.image_size:
            floats = interpolate(
                floats, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )
        mean, std = self.normalization_stats
        return normalize(floats, mean, std)

    def _test_positions(self, class_ids: torch.Tensor) -> list[int]:
        """Positions of the test split that the protocol uses, in their original order."""
        normal = torch.nonzero(class_ids == self.normal_class).flatten().tolist()
        others = torch.nonzero(class_ids != self.normal_class).flatten().tolist()
        if not normal or not others:
            missing = "normal" if not normal else "anomalous"
            raise DataError(
                f"the {self.dataset} test split has no {missing} image "
                f"for normal_class={self.normal_class}"
            )
        if self.protocol == "balanced":
            others = seeded_subset(others, len(normal), self.seed)
        if self.max_test_samples is not None and len(normal) + len(others) > self.max_test_samples:
            normal_count = round(self.max_test_samples * len(normal) / (len(normal) + len(others)))
            normal_count = min(max(1, normal_count), self.max_test_samples - 1)
            normal = seeded_subset(normal, normal_count, self.seed)
            others = seeded_subset(others, self.max_test_samples - normal_count, self.seed)
        return sorted(normal + others)

    def _subset(
        self, raw: _RawSplit, positions: list[int], labels: torch.Tensor
    ) -> OneClassDataset:
        paths = None if raw.paths is None else [raw.paths[i] for i in positions]
        return OneClassDataset(self._to_float(raw.images[positions]), labels, paths)

    def _ensure_loaded(self) -> None:
        """Load, split and normalise every split once."""
        if self._test is not None:
            return
        train_raw, test_raw = self._load_raw()
        if self.normalization in ("none", "imagenet"):
            self._stats = input_statistics(self.normalization, self.channels)
        elif self.dataset in DATASET_STATS:
            mean, std = DATASET_STATS[self.dataset]
            self._stats = (mean,) * self.channels, (std,) * self.channels
        else:
            self._stats = _per_channel_stats(train_raw.images, self.channels)

        normal_positions = (
            torch.nonzero(train_raw.class_ids == self.normal_class).flatten().tolist()
        )
        if len(normal_positions) < 2:
            raise DataError(
                f"normal_class={self.normal_class} ({self.normal_class_name!r}) has "
                f"{len(normal_positions)} training image(s) in the {self.dataset} set; "
                "at least 2 are needed (train + validation)"
            )
        kept, held_out = split_indices(len(normal_positions), self.val_fraction, self.seed)
        train_positions = [normal_positions[i] for i in kept]
        if self.max_train_samples is not None:
            train_positions = seeded_subset(train_positions, self.max_train_samples, self.seed)
        val_positions = [normal_positions[i] for i in held_out]
        test_positions = self._test_positions(test_raw.class_ids)

        self._train = self._subset(
            train_raw, train_positions, torch.zeros(len(train_positions), dtype=torch.int64)
        )
        val_labels = torch.zeros(len(val_positions), dtype=torch.int64)
        if self.val_anomalies != "none":
            others = torch.nonzero(train_raw.class_ids != self.normal_class).flatten()
            if len(others) == 0:
                raise DataError(f"val_anomalies={self.val_anomalies}: the {self.dataset} training split has no "
                                "image of another class")
            generator = torch.Generator().manual_seed(self.seed + 7)
            count = len(val_positions) if self.val_anomalies == "other_classes" else len(others)
            chosen = others[torch.randperm(len(others), generator=generator)[:count]]
            val_positions = val_positions + chosen.tolist()
            val_labels = torch.cat([val_labels, torch.ones(len(chosen), dtype=torch.int64)])
        self._val = self._subset(train_raw, val_positions, val_labels)
        test_labels = (test_raw.class_ids[test_positions] != self.normal_class).to(torch.int64)
        self._test = self._subset(test_raw, test_positions, test_labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image (loads the data on first use)."""
        self._ensure_loaded()
        assert self._test is not None
        channels, height, width = self._test.images.shape[1:]
        return channels, height, width

    @property
    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(means, stds)`` applied to pixels in [0, 1] (loads the data on first use)."""
        if self._stats is None:
            self._ensure_loaded()
        assert self._stats is not None
        return self._stats

    @property
    def val_has_anomalies(self) -> bool:
        """Whether the validation split holds labelled anomalies (schemes then log ``val/image_auroc``)."""
        return self.val_anomalies != "none"

    def _load(self, stage: str | None) -> None:
        """Load, check, split and normalise the data (all splits at once, whatever ``stage``).

        The splits: normal training images minus the validation hold-out; held-out normal
        training images (label 0), plus other-class training images (label 1) with
        ``val_anomalies="other_classes"``; the test images chosen by the protocol.

        Raises:
            DataError: For missing, corrupt or inconsistent files, or a split
                with too few images of the normal class.
        """
        self._ensure_loaded()
