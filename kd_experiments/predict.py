"""``kd-predict``: score a folder of images with a shipped student.

    kd-predict runs:/<run_id>/student  IMAGES_DIR --out DIR   # a run's MLflow Model
    kd-predict models:/NAME@champion   IMAGES_DIR --out DIR   # the registered champion (kd-report --register)
    kd-predict student.onnx            IMAGES_DIR --out DIR   # a kd-export file (.onnx, or .pt: int8 / TorchScript)

Every image file under ``IMAGES_DIR`` (sub-folders included; PNG, JPEG, BMP, TIFF, or
``.npy`` arrays) is read as the training data were (converted to the model's channels,
resized bilinearly to its resolution) and scored in batches, with a progress bar. Written
to ``--out``:

- ``scores.csv``: ``path`` (relative to ``IMAGES_DIR``), ``score``, ``label`` (1 when
  ``score >= threshold``: the threshold the run chose on validation data and stored with
  the model, its rule in ``threshold_rule``);
- ``overlays/<path>.png`` for models that produce anomaly maps: the image with its map
  over it (one colour scale for the whole folder: the smallest and largest map value).

Unreadable images do not stop the others: they are all scored and written, then one
error lists every unreadable file and why, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_experiments import deploy
from kd_experiments.errors import ConfigError, DataError, KDError, TrackingError
from kd_experiments.tracking import quiet_mlflow

log = logging.getLogger(__name__)
BATCH = 16
OVERLAY_ALPHA = 0.5


@dataclass
class Predictor:
    """A loaded model: ``run(images float (N, C, H, W) in [0, 1]) -> (scores (N,), maps or None)``."""

    run: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
    info: dict[str, Any]
    source: str

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def channels(self) -> int:
        return int(self.info["input_channels"])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.info["input_size"][0]), int(self.info["input_size"][1])


def _torch_runner(module: torch.nn.Module) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]:
    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            scores, maps = deploy.split_outputs(module(images))
        return scores.float().numpy(), None if maps is None else maps.float().numpy()

    return run


def load_predictor(model: str, tracking_uri: str | None = None) -> Predictor:
    """A run or registry URI (``runs:/...``, ``models:/...``) or a ``kd-export`` file."""
    from kd_experiments.export import METADATA_FILE, load_torchscript

    path = Path(model)
    if path.is_file():
        if path.suffix == ".onnx":
            import onnxruntime

            try:
                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
                raise ConfigError(f"{path} is not a readable ONNX file: {str(error).splitlines()[0][:200]}") from None
            meta = session.get_modelmeta().custom_metadata_map.get(METADATA_FILE)
            if not meta:
                raise ConfigError(f"{path} has no '{METADATA_FILE}' metadata: export it with kd-export")
            name = session.get_inputs()[0].name

            def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
                outputs = session.run(None, {name: images.numpy().astype(np.float32)})
                return outputs[0].reshape(-1), (outputs[1] if len(outputs) > 1 else None)

            import json

            return Predictor(run, json.loads(meta), str(path))
        if path.suffix in (".pt", ".pth"):
            try:
                module, info = load_torchscript(path)
            except (RuntimeError, ValueError) as error:
                raise ConfigError(f"{path} is not a TorchScript file written by kd-export: "
                                  f"{str(error).splitlines()[0][:200]}") from None
            if not info:
                raise ConfigError(f"{path} has no '{METADATA_FILE}' inside: export it with kd-export")
            return Predictor(_torch_runner(module), info, str(path))
        raise ConfigError(f"{path}: kd-predict reads .onnx and .pt files, or runs:/ and models:/ URIs")
    if ":/" not in model:
        raise ConfigError(
            f"MODEL {model!r} is neither a file nor a model URI (runs:/<run_id>/student, models:/NAME@champion)"
        )
    import mlflow

    from kd_experiments.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except Exception as error:  # noqa: BLE001 - MLflow raises its own types per store
        raise TrackingError(f"cannot load model {model}: {str(error).splitlines()[0][:300]}") from None
    wrapper = loaded.unwrap_python_model()
    if not isinstance(wrapper, deploy.StudentModel):
        raise ConfigError(f"{model} is not a kd-experiments student Model (kd-train logs them at student/)")
    return Predictor(_torch_runner(wrapper.module.eval()), dict(wrapper.info), model)


def overlay(image: torch.Tensor, anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """``uint8 (H, W, 3)``: the image (``(C, H, W)`` in [0, 1]) with its map in the jet colours over it."""
    from matplotlib import colormaps

    picture = image.permute(1, 2, 0).numpy()
    if picture.shape[2] == 1:
        picture = np.repeat(picture, 3, axis=2)
    values = np.squeeze(anomaly_map)
    if values.shape != picture.shape[:2]:
        resized = torch.nn.functional.interpolate(torch.from_numpy(values)[None, None].float(),
                                                  size=picture.shape[:2], mode="bilinear", align_corners=False)
        values = resized[0, 0].numpy()
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    colours = colormaps["jet"](scaled)[:, :, :3]
    blended = (1 - OVERLAY_ALPHA) * picture + OVERLAY_ALPHA * colours
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class PredictResult:
    scores_csv: Path
    overlays: list[Path]
    scored: int
    unreadable: list[tuple[Path, str]]


def predict_folder(predictor: Predictor, images_dir: str | Path, out_dir: str | Path, batch_size: int = BATCH,
                   progress: bool | None = None) -> PredictResult:
    """Score every image under ``images_dir`` into ``out_dir`` (see the module docstring).

    Unreadable images are returned in ``unreadable`` (the rest are scored and written).
    """
    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"IMAGES_DIR {root} is not a folder")
    files = deploy.list_inputs(root)
    if not files:
        raise DataError(f"no image file (png, jpg, jpeg, bmp, tif, tiff, npy) under {root}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    rows: list[tuple[Path, float]] = []
    kept_images: list[torch.Tensor] = []
    kept_maps: list[np.ndarray] = []
    unreadable: list[tuple[Path, str]] = []
    with Progress(TextColumn("[kd-predict] scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show, transient=False) as bar:
        task = bar.add_task("images", total=len(files))
        for start in range(0, len(files), batch_size):
            batch_files = files[start : start + batch_size]
            images, names = [], []
            for file in batch_files:
                try:
                    images.append(deploy.read_input(file, predictor.channels, predictor.size))
                    names.append(file)
                except DataError as error:
                    unreadable.append((file, str(error)))
            if images:
                stacked = torch.stack(images)
                scores, maps = predictor.run(stacked)
                rows.extend(zip(names, (float(s) for s in scores), strict=True))
                if maps is not None:
                    kept_images.extend(stacked)
                    kept_maps.extend(maps)
            bar.advance(task, len(batch_files))
    scores_csv = out / "scores.csv"
    with open(scores_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "label", "threshold", "threshold_rule"])
        for file, score in rows:
            writer.writerow([file.relative_to(root).as_posix(), f"{score:.9g}", int(score >= predictor.threshold),
                             f"{predictor.threshold:.9g}", predictor.info.get("threshold_rule", "")])
    overlays = []
    if kept_maps:
        low = float(min(m.min() for m in kept_maps))
        high = float(max(m.max() for m in kept_maps))
        for (file, _), image, anomaly_map in zip(rows, kept_images, kept_maps, strict=True):
            target = (out / "overlays" / file.relative_to(root)).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(image, anomaly_map, low, high)).save(target)
            overlays.append(target)
    return PredictResult(scores_csv, overlays, len(rows), unreadable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-predict",
        description="Score a folder of images with a student: scores.csv (score, label at the stored "
                    "threshold) and, for map models, overlays/*.png.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="runs:/<run_id>/student, models:/NAME@champion, or a kd-export .onnx / .pt file")
    parser.add_argument("images_dir", metavar="IMAGES_DIR", type=Path, help="folder of images (sub-folders included)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="folder for scores.csv and overlays/")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ (default: "
                                                "MLFLOW_TRACKING_URI or ./mlruns)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``kd-predict``."""
    args = build_parser().parse_args(argv)
    quiet_mlflow()
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        predictor = load_predictor(args.model, args.tracking_uri)
        result = predict_folder(predictor, args.images_dir, args.out, args.batch_size)
    except KDError as error:
        print(f"kd-predict: error: {error}", file=sys.stderr)
        return 1
    anomalous = sum(1 for _ in _labels(result.scores_csv) if _ == "1")
    print(f"[kd-predict] {result.scored} images scored ({anomalous} at or above the threshold "
          f"{predictor.threshold:.6g}, {predictor.info.get('threshold_rule', '?')}) -> {result.scores_csv}"
          + (f"; {len(result.overlays)} overlays in {result.scores_csv.parent / 'overlays'}" if result.overlays else ""))
    if result.unreadable:
        listed = "; ".join(reason for _, reason in result.unreadable)  # each reason names its file
        print(f"kd-predict: error: {len(result.unreadable)} unreadable image(s), not scored (the other "
              f"{result.scored} are in {result.scores_csv}): {listed}", file=sys.stderr)
        return 1
    return 0


def _labels(scores_csv: Path) -> list[str]:
    with open(scores_csv, newline="") as handle:
        return [row["label"] for row in csv.DictReader(handle)]


if __name__ == "__main__":
    sys.exit(main())
