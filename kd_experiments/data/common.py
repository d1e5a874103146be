"""Pieces shared by every DataModule: safe image reading, normalisation, seeded splits,
epoch-seeded loaders and the :class:`SplitDataModule` base.

Normalisation statistics (ImageNet mean/std, the rule for grey inputs) live in
:func:`kd_experiments.backbones.input_statistics`, next to the encoder that undoes them.

Every helper here turns a user-caused problem (a missing folder, a corrupt or
truncated image) into a one-line :class:`~kd_experiments.errors.DataError`
naming the path, as CONTRIBUTING.md requires. Truncated images are *not*
silently padded: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from kd_experiments.errors import ConfigError, DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes (lower case) treated as images when listing a folder."""

# PIL reports broken files through several exception types: OSError (truncated
# data, UnidentifiedImageError), SyntaxError (bad PNG chunk checksums in
# ``verify``), ValueError (bad header fields), DecompressionBombError (absurd size).
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path` after checking it is an existing, non-empty folder.

    Args:
        path: The folder to check.
        what: What the folder is, for the message (e.g. ``"MVTec AD root"``).

    Raises:
        DataError: If ``path`` does not exist, is not a folder, or is empty.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"{what} not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{what} is not a folder: {folder}")
    if not any(folder.iterdir()):
        raise DataError(f"{what} is empty: {folder}")
    return folder


def list_images(folder: str | Path) -> list[Path]:
    """Return the image files directly inside ``folder``, sorted by name.

    Hidden files (names starting with ``.``) are skipped. A missing folder
    yields an empty list; callers decide whether that is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file()
        and not entry.name.startswith(".")
        and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_subdirs(folder: str | Path) -> list[str]:
    """Return the names of the non-hidden sub-folders of ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Check an image file's structure without decoding its pixels; return its ``(width, height)``.

    Uses :meth:`PIL.Image.Image.verify`, which walks the file's chunks and
    checksums (PNG) without decompressing them. This catches files that are
    not images, bad headers and most truncations cheaply; a file whose
    compressed data is damaged is caught by :func:`load_image` when decoded.

    Raises:
        DataError: If the file is missing or not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _PIL_ERRORS as error:
        raise DataError(f"unreadable or truncated image {path}: {error}") from error
    return size


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image file completely and convert it to ``mode``.

    The pixel data is fully read (``load``) so that a truncated or corrupt
    file fails here, with its name, rather than later inside a transform.

    Args:
        path: The image file.
        mode: The PIL mode to convert to (``"RGB"``, ``"L"``, ...).

    Raises:
        DataError: If the file is missing, not an image, truncated or corrupt.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _PIL_ERRORS as error:
        raise DataError(f"unreadable or truncated image {path}: {error}") from error


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a ``uint8`` tensor of shape ``(C, H, W)``."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def sample_id(path: str | Path) -> int:
    """A stable 63-bit id of an image file: a digest of its last three path parts
    (``train/good/000.png``, unlike ``test/good/000.png``), so the same image has the same id
    whatever the data root, the split or the seed (e.g. a PatchCore bank's source images,
    recognised again by a map student); renaming those folders changes it."""
    import hashlib

    name = "/".join(Path(path).parts[-3:])
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") & (2**63 - 1)


def sample_ids(paths: Sequence[str | Path] | None, count: int) -> torch.Tensor:
    """The :func:`sample_id` of each of ``count`` items as a long tensor (-1 each when the
    items carry no ``path``)."""
    if paths is None:
        return torch.full((count,), -1, dtype=torch.long)
    return torch.tensor([sample_id(path) for path in paths], dtype=torch.long)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Return ``(images - mean) / std`` per channel.

    Args:
        images: Float tensor ``(C, H, W)`` or ``(N, C, H, W)``, values in [0, 1].
        mean: One value per channel.
        std: One value per channel (positive).
    """
    assert len(mean) == len(std) == images.shape[-3], "one mean/std value per channel"
    shape = (len(mean), 1, 1)
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_tensor) / std_tensor


def check_choice(key: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ConfigError listing them."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return str(value)


def check_fraction(key: str, value: float) -> float:
    """Return ``value`` if it lies strictly between 0 and 1; otherwise raise a ConfigError."""
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{key}={value!r} must lie strictly between 0 and 1")
    return float(value)


def check_positive_int(key: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (not a bool); else raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def parse_image_size(key: str, value: int | Sequence[int]) -> tuple[int, int]:
    """Return an image size as ``(height, width)``; an int means a square image.

    Raises:
        ConfigError: Unless ``value`` is a positive int or a pair of positive ints.
    """
    sizes = (value, value) if isinstance(value, int) else tuple(value)
    if len(sizes) != 2 or any(
        isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes
    ):
        raise ConfigError(
            f"{key}={value!r} must be a positive int or a (height, width) pair of them"
        )
    return sizes[0], sizes[1]


def split_indices(count: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(count)`` into seeded ``(kept, held_out)`` lists of indices, each sorted.

    ``held_out`` has ``round(held_out_fraction * count)`` elements, but at least
    one; ``kept`` keeps at least one. The split depends only on ``count``,
    ``held_out_fraction`` and ``seed``, never on global random state.

    Raises:
        DataError: If ``count < 2`` (no split leaves both parts non-empty).
    """
    assert 0.0 < held_out_fraction < 1.0, "held_out_fraction must lie in (0, 1)"
    if count < 2:
        raise DataError(
            f"cannot split {count} sample(s) into two non-empty parts; at least 2 are needed"
        )
    held_out_count = min(max(1, round(held_out_fraction * count)), count - 1)
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(permutation[held_out_count:]), sorted(permutation[:held_out_count])


def seeded_subset(indices: Sequence[int], size: int, seed: int) -> list[int]:
    """Return ``size`` elements drawn uniformly, without replacement, from ``indices``.

    The drawn elements keep their order in ``indices``.

    Returns ``indices`` unchanged (as a list) when ``size >= len(indices)``.
    """
    if size >= len(indices):
        return list(indices)
    chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:size]
    return [indices[position] for position in sorted(chosen.tolist())]


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` alone.

    Lightning calls :meth:`set_epoch` before every epoch (as for a
    ``DistributedSampler``), so the order of epoch ``e`` does not depend on how many
    epochs ran in this process: a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """The DataLoader of every datamodule: epoch-seeded shuffling, persistent workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSeededSampler(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class SplitDataModule(LightningDataModule):
    """Base of every DataModule: train / validation / test splits and their loaders.

    A subclass sets ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed`` and
    implements :meth:`_load`, which builds ``self._train``, ``self._val`` and
    ``self._test`` (the datasets ``stage`` needs, or all of them). :meth:`setup` calls
    it; with ``load_on_access = True`` (sets held in memory) the split properties call
    it too, so the data loads on first use, otherwise a split read before ``setup``
    fails with the stage to set up. Loaders come from :func:`make_loader`: training
    batches shuffled by an :class:`EpochSeededSampler` (so a resumed run sees the
    batches an uninterrupted one would), evaluation batches in a fixed order.
    """

    #: whether the split properties load the data on first use (else ``setup`` must run first)
    load_on_access: bool = True
    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: int
    #: stage -> (the attribute holding its dataset, what to call before reading it)
    _SPLITS = {
        "fit": ("_train", "setup('fit')"),
        "validate": ("_val", "setup('fit') or setup('validate')"),
        "test": ("_test", "setup('test')"),
    }

    def __init__(self) -> None:
        super().__init__()
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._test: Dataset | None = None

    def _load(self, stage: str | None) -> None:
        """Build the datasets of ``stage`` (``None``: every split)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build (and check) the splits ``stage`` needs; every split when ``stage`` is ``None``."""
        self._load(stage)

    def _split(self, stage: str) -> Dataset:
        attribute, hint = self._SPLITS[stage]
        if getattr(self, attribute) is None and self.load_on_access:
            self._load(stage)
        dataset = getattr(self, attribute)
        assert dataset is not None, f"call {hint} first"
        return dataset

    @property
    def train_dataset(self) -> Dataset:
        """The training split (normal samples only)."""
        return self._split("fit")

    @property
    def val_dataset(self) -> Dataset:
        """The validation split, drawn from training data (never from the test split)."""
        return self._split("validate")

    @property
    def test_dataset(self) -> Dataset:
        """The test split."""
        return self._split("test")

    @property
    def val_has_anomalies(self) -> bool:
        """Whether the validation split holds labelled anomalies (schemes then log ``val/image_auroc``)."""
        return False

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return make_loader(dataset, batch_size, shuffle, self.seed, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (an order per epoch, seeded by ``seed`` and the epoch)."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)
