"""MVTec AD (and any folder in its layout) as a Lightning DataModule.

Expected layout, exactly as MVTec AD ships (Bergmann et al., CVPR 2019)::

    root/<category>/train/good/*.png
    root/<category>/test/<good | defect type>/*.png
    root/<category>/ground_truth/<defect type>/<stem>_mask.png

Training uses ``train/good`` minus a seeded validation fraction (validation
is drawn from ``train/good`` only, so it holds normal images alone); the test
set is the whole ``test`` split. Good images get all-zero masks. Images are
resized bilinearly (antialiased by PIL) and masks with nearest neighbour, so
masks stay binary.

Every file problem is found in :meth:`MVTecDataModule.setup` where it can be
found cheaply (headers and chunk checksums, mask/image size agreement, missing
masks) and otherwise when the image is decoded; both raise
:class:`~kd_experiments.errors.DataError` naming the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from kd_experiments.backbones import INPUT_NORMALIZATIONS, input_statistics
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
    read_image_size,
    require_dir,
    split_indices,
)
from kd_experiments.errors import ConfigError, DataError

NORMALIZATIONS: tuple[str, ...] = INPUT_NORMALIZATIONS
"""Allowed values of ``normalization``: ImageNet mean/std, or raw [0, 1] pixels."""

GOOD: str = "good"
"""Name of the folder holding normal images in ``train`` and ``test``."""


@dataclass(frozen=True)
class MVTecSample:
    """One image of an MVTec-style split.

    Attributes:
        image_path: The image file.
        label: 0 for a good image, 1 for a defective one.
        defect_type: ``"good"`` or the name of the defect folder.
        mask_path: The ground-truth mask file; ``None`` for good images.
    """

    image_path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def _size_mismatch(
    mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]
) -> DataError:
    """The error for a mask whose ``(width, height)`` differs from its image's."""
    return DataError(
        f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} "
        f"is {image_size[0]}x{image_size[1]}"
    )


class MVTecDataset(Dataset):
    """Images (and masks) of one MVTec-style split, yielding CONTRIBUTING.md batch dicts.

    Each item is ``{"image": float32 (C, H, W) normalised, "label": int,
    "index": int, "mask": float32 (1, H, W) in {0, 1}, "path": str}``.

    Args:
        samples: The split's samples; ``index`` is the position in this list.
        image_size: Output ``(height, width)``.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by after subtracting ``mean``.
        grayscale: Read images as one channel (``"L"``) instead of RGB.
        cache_images: Keep the resized ``uint8`` image and mask of every item
            in memory after its first read (per DataLoader worker).
    """

    def __init__(
        self,
        samples: Sequence[MVTecSample],
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        grayscale: bool = False,
        cache_images: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.grayscale = grayscale
        self.cache_images = cache_images
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode, check and resize item ``index``: ``uint8`` image, mask (``None`` if good)."""
        sample = self.samples[index]
        image = load_image(sample.image_path, "L" if self.grayscale else "RGB")
        height, width = self.image_size
        mask = None
        if sample.mask_path is not None:
            mask_image = load_image(sample.mask_path, "L")
            if mask_image.size != image.size:
                raise _size_mismatch(
                    sample.mask_path, mask_image.size, sample.image_path, image.size
                )
            if mask_image.size != (width, height):
                mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
            mask = (pil_to_uint8_tensor(mask_image) > 0).to(torch.uint8)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return pil_to_uint8_tensor(image), mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        if index in self._cache:
            image, mask = self._cache[index]
        else:
            image, mask = self._read(index)
            if self.cache_images:
                self._cache[index] = (image, mask)
        sample = self.samples[index]
        mask_float = (
            torch.zeros((1, *self.image_size), dtype=torch.float32)
            if mask is None
            else mask.to(torch.float32)
        )
        return {
            "image": normalize(image.to(torch.float32) / 255.0, self.mean, self.std),
            "label": sample.label,
            "index": index,
            "mask": mask_float,
            "path": str(sample.image_path),
        }


def _category_dir(root: str | Path, category: str) -> Path:
    """Return ``root/category`` after checking both exist; the error lists the categories found."""
    root_dir = require_dir(root, "MVTec AD root")
    category_dir = root_dir / category
    if not category_dir.is_dir():
        available = ", ".join(list_subdirs(root_dir)) or "none"
        raise DataError(
            f"MVTec AD category {category!r} not found in {root_dir}; available: {available}"
        )
    return category_dir


def mvtec_test_summary(root: str | Path, category: str) -> dict[str, int]:
    """Count the test images of ``root/category`` per folder (``"good"`` and each defect type).

    A quick look at a category without reading any image; keys are sorted.

    Raises:
        DataError: If the root, the category or its ``test`` folder is missing.
    """
    test_dir = require_dir(_category_dir(root, category) / "test", "MVTec AD test folder")
    return {
        defect_type: len(list_images(test_dir / defect_type))
        for defect_type in list_subdirs(test_dir)
    }


class MVTecDataModule(SplitDataModule):
    """MVTec AD category as train (good), validation (held-out good) and test (all) splits.

    Args:
        root: Folder holding the categories (e.g. ``.../mvtec_ad``).
        category: Category folder name (e.g. ``"bottle"``).
        image_size: Output size, an int (square) or ``(height, width)``.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        val_fraction: Fraction of ``train/good`` held out for validation, in
            (0, 1); at least one image is held out and one kept.
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split and of the training shuffle order.
        normalization: ``"imagenet"`` (mean/std of ImageNet; for grayscale the
            channel averages) or ``"none"`` (pixels in [0, 1]).
        grayscale: Read images as a single channel.
        cache_images: Keep decoded, resized images in memory after their first
            read; worthwhile for small categories, especially on CPU.
        refit: Train on every ``train/good`` image, the held-out ones too: the
            final fit of a setting whose budget was chosen on the validation
            split beforehand (a fixed schedule, refitted on all the normal
            training data). The validation split is still drawn and evaluated,
            but it is then in-sample (the student trains on it): its figures
            monitor the fit and choose nothing.

    Raises:
        ConfigError: For an invalid argument value.
        DataError: If ``root`` or ``root/category`` is missing (at construction)
            or any file problem (in :meth:`setup`).
    """

    load_on_access = False  # the splits exist after setup(stage): files are checked there

    def __init__(
        self,
        root: str | Path,
        category: str,
        image_size: int | Sequence[int] = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        normalization: str = "imagenet",
        grayscale: bool = False,
        cache_images: bool = False,
        refit: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = parse_image_size("image_size", image_size)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else check_positive_int("eval_batch_size", eval_batch_size)
        )
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.num_workers = check_positive_int("num_workers", num_workers, minimum=0)
        self.seed = seed
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.grayscale = grayscale
        self.cache_images = cache_images
        if not isinstance(refit, bool):
            raise ConfigError(f"refit={refit!r} must be true or false")
        self.refit = refit
        self.category = category
        self.category_dir = _category_dir(root, category)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (1 if self.grayscale else 3, *self.image_size)

    @property
    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` applied to pixels in [0, 1] (0 and 1 for ``"none"``)."""
        return input_statistics(self.normalization, self.input_shape[0])

    @property
    def test_summary(self) -> dict[str, int]:
        """Number of test images per type (``"good"`` and each defect) in the checked test split."""
        return dict(
            sorted(Counter(sample.defect_type for sample in self.test_dataset.samples).items())
        )

    def _load(self, stage: str | None) -> None:
        """Find and check the files of the splits ``stage`` needs (all when ``stage`` is ``None``).

        The splits: training (good images), validation (held-out good images), both after
        ``setup("fit")``; test (every test image) after ``setup("test")``.

        Raises:
            DataError: For an empty ``train/good``, no test images, a missing
                mask, a mask whose size differs from its image's, or an
                unreadable or truncated image.
        """
        if stage in (None, "fit", "validate") and self._train is None:
            train_samples = self._train_samples()
            kept, held_out = split_indices(len(train_samples), self.val_fraction, self.seed)
            self._train = self._dataset(train_samples if self.refit else [train_samples[i] for i in kept])
            self._val = self._dataset([train_samples[i] for i in held_out])
        if stage in (None, "test") and self._test is None:
            self._test = self._dataset(self._test_samples())

    def _dataset(self, samples: list[MVTecSample]) -> MVTecDataset:
        mean, std = self.normalization_stats
        return MVTecDataset(samples, self.image_size, mean, std, self.grayscale, self.cache_images)

    def _train_samples(self) -> list[MVTecSample]:
        good_dir = self.category_dir / "train" / GOOD
        image_paths = list_images(require_dir(good_dir, "MVTec AD training folder"))
        if not image_paths:
            raise DataError(f"no images in MVTec AD training folder {good_dir}")
        for path in image_paths:
            read_image_size(path)
        return [MVTecSample(path, 0, GOOD, None) for path in image_paths]

    def _test_samples(self) -> list[MVTecSample]:
        test_dir = require_dir(self.category_dir / "test", "MVTec AD test folder")
        samples = []
        for defect_type in list_subdirs(test_dir):
            for image_path in list_images(test_dir / defect_type):
                image_size = read_image_size(image_path)
                if defect_type == GOOD:
                    samples.append(MVTecSample(image_path, 0, GOOD, None))
                    continue
                mask_path = (
                    self.category_dir / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
                )
                if not mask_path.is_file():
                    raise DataError(
                        f"mask missing for defect image {image_path}: expected {mask_path}"
                    )
                mask_size = read_image_size(mask_path)
                if mask_size != image_size:
                    raise _size_mismatch(mask_path, mask_size, image_path, image_size)
                samples.append(MVTecSample(image_path, 1, defect_type, mask_path))
        if not samples:
            raise DataError(f"no images in MVTec AD test folder {test_dir}")
        return samples
