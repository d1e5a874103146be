"""A procedural MVTec-style data set: download-free data for tests, demos and CI.

:func:`generate_mvtec_like` writes RGB PNG textures in the exact MVTec AD
layout, readable by :class:`~kd_experiments.data.mvtec.MVTecDataModule`::

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect type>/000.png ...
    root/<category>/ground_truth/<defect type>/000_mask.png ...   (0/255)
    root/<category>/meta.json                                     (parameters)

Normal images of a category share one texture family: two colours mixed by
oriented stripes (angle and frequency fixed per category), modulated by a
smooth low-frequency random field and pixel noise that vary per image. Test
defects are drawn on fresh normal images:

- ``scratch``: a thin bright polyline,
- ``blob``: a filled ellipse in the complementary colour,
- ``hole``: a dark filled disc.

Output is a pure function of the arguments: every image is drawn from its own
generator seeded by ``(seed, category, split, defect type, index)``. A call
whose ``meta.json`` matches returns at once; a set is written to a temporary
folder and renamed into place, so a half-written set is never reused (and
processes generating the same set at once, e.g. DDP ranks, do not collide).

:class:`SyntheticMVTecDataModule` generates a set and reads it, in one config.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kd_experiments.data.common import check_positive_int
from kd_experiments.data.mvtec import MVTecDataModule
from kd_experiments.errors import ConfigError, DataError

DEFECT_TYPES: tuple[str, ...] = ("scratch", "blob", "hole")
"""Defect types :func:`generate_mvtec_like` can draw."""

GENERATOR_NAME = "kd_experiments.data.synthetic.generate_mvtec_like"
GENERATOR_VERSION = 1
"""Bumped whenever the pixels produced for given arguments change, so old sets are regenerated."""

_MIN_IMAGE_SIZE = 16


def _texture(
    size: int, style: dict[str, np.ndarray | float], rng: np.random.Generator
) -> np.ndarray:
    """Return a normal ``(size, size, 3)`` image in [0, 1] of the category's texture family."""
    coordinates = np.arange(size, dtype=np.float64) / size
    y_grid, x_grid = np.meshgrid(coordinates, coordinates, indexing="ij")
    angle = float(style["angle"]) + rng.normal(0.0, 0.05)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(
        2.0 * np.pi * float(style["frequency"]) * (x_grid * np.cos(angle) + y_grid * np.sin(angle))
        + phase
    )
    coarse = rng.normal(0.0, 1.0, size=(4, 4)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    mix = np.clip(stripes + 0.15 * field, 0.0, 1.0)[:, :, None]
    image = style["colour_low"] + (style["colour_high"] - style["colour_low"]) * mix
    return np.clip(image + rng.normal(0.0, 0.02, size=image.shape), 0.0, 1.0)


def _draw_defect(
    image: Image.Image,
    defect_type: str,
    style: dict[str, np.ndarray | float],
    rng: np.random.Generator,
) -> Image.Image:
    """Draw one ``defect_type`` on ``image`` in place; return its ``"L"`` mask (0/255)."""
    size = image.size[0]
    mask = Image.new("L", image.size, 0)
    image_draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    margin = size // 6
    centre = rng.integers(margin, size - margin, size=2)
    if defect_type == "scratch":
        points = [tuple(int(v) for v in centre)]
        for _ in range(2):
            step = rng.integers(-size // 4, size // 4 + 1, size=2)
            points.append(
                tuple(int(v) for v in np.clip(np.asarray(points[-1]) + step, 0, size - 1))
            )
        width = max(1, size // 32)
        image_draw.line(points, fill=(245, 245, 245), width=width)
        mask_draw.line(points, fill=255, width=width)
    elif defect_type == "blob":
        radii = rng.integers(max(2, size // 12), max(3, size // 6) + 1, size=2)
        box = [int(v) for v in (*(centre - radii), *(centre + radii))]
        colour = tuple(int(v) for v in np.round(255 * (1.0 - np.asarray(style["colour_high"]))))
        image_draw.ellipse(box, fill=colour)
        mask_draw.ellipse(box, fill=255)
    else:
        assert defect_type == "hole", f"unknown defect type {defect_type}"
        radius = int(rng.integers(max(2, size // 14), max(3, size // 8) + 1))
        box = [int(v) for v in (*(centre - radius), *(centre + radius))]
        image_draw.ellipse(box, fill=(15, 12, 10))
        mask_draw.ellipse(box, fill=255)
    return mask


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(image * 255.0).astype(np.uint8))


def _write_set(target: Path, meta: dict[str, object]) -> None:
    """Write the images, masks and ``meta.json`` of the set ``meta`` describes into ``target``."""
    size = int(meta["image_size"])  # type: ignore[arg-type]
    category_key = zlib.crc32(str(meta["category"]).encode())
    seed = int(meta["seed"])  # type: ignore[arg-type]
    style_rng = np.random.default_rng([seed, category_key])
    style: dict[str, np.ndarray | float] = {
        "colour_low": style_rng.uniform(0.1, 0.45, size=3),
        "colour_high": style_rng.uniform(0.55, 0.9, size=3),
        "angle": style_rng.uniform(0.0, np.pi),
        "frequency": style_rng.uniform(3.0, 6.0),
    }

    def image_rng(split_code: int, type_code: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, category_key, split_code, type_code, index])

    good_folders = (
        (0, target / "train" / "good", int(meta["n_train"])),  # type: ignore[arg-type]
        (1, target / "test" / "good", int(meta["n_test_good"])),  # type: ignore[arg-type]
    )
    for split_code, folder, count in good_folders:
        folder.mkdir(parents=True)
        for index in range(count):
            _to_pil(_texture(size, style, image_rng(split_code, 0, index))).save(
                folder / f"{index:03d}.png"
            )
    for type_code, defect_type in enumerate(meta["defect_types"], start=1):  # type: ignore[arg-type]
        image_folder = target / "test" / defect_type
        mask_folder = target / "ground_truth" / defect_type
        image_folder.mkdir(parents=True)
        mask_folder.mkdir(parents=True)
        for index in range(int(meta["n_test_defect_per_type"])):  # type: ignore[arg-type]
            rng = image_rng(2, type_code, index)
            image = _to_pil(_texture(size, style, rng))
            mask = _draw_defect(image, defect_type, style, rng)
            image.save(image_folder / f"{index:03d}.png")
            mask.save(mask_folder / f"{index:03d}_mask.png")
    (target / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _read_meta(category_dir: Path) -> dict[str, object] | None:
    """Return the parsed ``meta.json`` of ``category_dir``, or ``None`` if absent or unreadable."""
    try:
        meta = json.loads((category_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def generate_mvtec_like(
    root: str | Path,
    category: str = "synthetic",
    n_train: int = 64,
    n_test_good: int = 16,
    n_test_defect_per_type: int = 8,
    image_size: int = 64,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write (or reuse) a procedural MVTec-style category under ``root`` and return its folder.

    Args:
        root: Folder that receives the category folder; created if missing.
        category: Name of the category folder.
        n_train: Number of normal training images (at least 2, so a
            validation image can be held out).
        n_test_good: Number of normal test images.
        n_test_defect_per_type: Number of defective test images per defect type.
        image_size: Side of the square images in pixels (at least 16).
        seed: Seed of every texture and defect.
        defect_types: Defect types to draw, a non-empty subset of :data:`DEFECT_TYPES`.

    Returns:
        ``root/category``, to be read with ``MVTecDataModule(root, category)``.

    Raises:
        ConfigError: For an invalid argument value.
        DataError: If ``root/category`` exists but was not written by this
            function (it is never overwritten), or cannot be written.
    """
    check_positive_int("n_train", n_train, minimum=2)
    check_positive_int("n_test_good", n_test_good)
    check_positive_int("n_test_defect_per_type", n_test_defect_per_type)
    check_positive_int("image_size", image_size, minimum=_MIN_IMAGE_SIZE)
    defect_types = list(defect_types)
    unknown = sorted(set(defect_types) - set(DEFECT_TYPES))
    if not defect_types or unknown or len(set(defect_types)) != len(defect_types):
        raise ConfigError(
            f"defect_types={defect_types!r} must be a non-empty list of distinct values "
            f"from {', '.join(DEFECT_TYPES)}"
        )
    if not category or Path(category).name != category or category.startswith("."):
        raise ConfigError(f"category={category!r} must be a plain folder name")

    meta: dict[str, object] = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "category": category,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_test_defect_per_type,
        "image_size": image_size,
        "seed": seed,
        "defect_types": defect_types,
    }
    root_dir = Path(root).expanduser()
    category_dir = root_dir / category
    if category_dir.exists():
        existing = _read_meta(category_dir)
        if existing == meta:
            return category_dir
        if existing is None or existing.get("generator") != GENERATOR_NAME:
            raise DataError(
                f"{category_dir} exists and was not written by generate_mvtec_like; "
                "refusing to overwrite it"
            )
        shutil.rmtree(category_dir, ignore_errors=True)

    try:
        root_dir.mkdir(parents=True, exist_ok=True)
        staging_dir = Path(tempfile.mkdtemp(prefix=f".{category}.", dir=root_dir))
    except OSError as error:
        raise DataError(f"cannot write the synthetic set to {root_dir}: {error}") from error
    try:
        _write_set(staging_dir, meta)
        staging_dir.rename(category_dir)
    except OSError as error:
        # Another process may have finished the same set first: reuse it.
        if _read_meta(category_dir) == meta:
            return category_dir
        raise DataError(f"cannot write the synthetic set to {category_dir}: {error}") from error
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return category_dir


class SyntheticMVTecDataModule(MVTecDataModule):
    """:class:`~kd_experiments.data.mvtec.MVTecDataModule` over a generated category.

    The set is generated (or reused) under ``root`` at construction, at
    ``image_size``, so images are read without resizing. ``generator_seed``
    fixes the data and is separate from ``seed`` (validation split and
    shuffling), so runs with different seeds see the same images.

    Args:
        root: Folder receiving the generated category (e.g. a cache folder).
        category: Name of the generated category folder.
        n_train: Normal training images (validation is held out from them).
        n_test_good: Normal test images.
        n_test_defect_per_type: Defective test images per defect type.
        image_size: Side of the generated square images in pixels.
        generator_seed: Seed of the generated textures and defects.
        batch_size, eval_batch_size, val_fraction, num_workers, seed,
        normalization, grayscale, cache_images, refit: As for ``MVTecDataModule``
            (``cache_images`` defaults to ``True``: generated sets are small).
    """

    def __init__(
        self,
        root: str | Path,
        category: str = "synthetic",
        n_train: int = 64,
        n_test_good: int = 16,
        n_test_defect_per_type: int = 8,
        image_size: int = 64,
        generator_seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        normalization: str = "imagenet",
        grayscale: bool = False,
        cache_images: bool = True,
        refit: bool = False,
    ) -> None:
        generate_mvtec_like(
            root, category, n_train, n_test_good, n_test_defect_per_type, image_size, generator_seed
        )
        super().__init__(
            root,
            category,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
            num_workers=num_workers,
            seed=seed,
            normalization=normalization,
            grayscale=grayscale,
            cache_images=cache_images,
            refit=refit,
        )
