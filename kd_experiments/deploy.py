"""The student a run ships: an MLflow Model at ``student/`` with its threshold and sizes.

Every finished ``kd-train`` run logs the scheme's deployable model
(``scheme.deployable_model()``: raw images in, scores, and maps for map schemes, out;
the student only, plus the frozen encoder where the deployed model needs it) as an
MLflow Model (``mlflow.pyfunc`` with the :class:`StudentModel` wrapper), with

- a **signature** and an **input example**: the input is a table (pandas DataFrame)
  with a column ``path`` (image files, or folders whose images are all scored) and/or a
  column ``image`` (encoded image bytes: PNG, JPEG, BMP, TIFF, or NumPy ``.npy`` arrays
  ``(C, H, W)`` / ``(H, W)`` of ``uint8`` or floats in [0, 1]); the output a table with
  ``path``, ``score``, ``is_anomaly`` (score >= threshold) and ``error`` (why an input
  could not be scored; empty otherwise). Files are decoded like the training data
  (converted to the model's channels, resized bilinearly to its resolution);
- the **score threshold** chosen on the validation split, never on the test split
  (:func:`choose_threshold`): F1-optimal on the validation anomalies when the split
  has them, else the 99th percentile of the normal validation scores; the rule is
  written in the model's metadata (``threshold_rule``);
- the run's **size summary** (``teacher_params``, ``student_params``, ratios, MACs) and
  the deployed model's own parameter count, in the metadata too.

The Model is logged from code (MLflow's models-from-code: a three-line script that
builds :class:`StudentModel`, no pickled class), holds the module saved with
``torch.save`` and the ``kd_experiments`` package as its code (``code_paths``), and pins
its requirements to this environment, so ``mlflow.pyfunc.load_model(...)`` works in a
fresh process, and ``mlflow models predict --env-manager local`` on a CSV
whose ``path`` column names a folder scores the folder. The run also logs its test
scores (``predictions/test_scores.csv``) as the test step computed them, so a loaded
model can be checked against the run.
"""

from __future__ import annotations

import base64
import io
import importlib
import json
import logging
import math
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "student"
TEST_SCORES_ARTIFACT = "predictions/test_scores.csv"
MODULE_FILE = "student_module.pt"
DEPLOY_FILE = "deploy.json"
RULE_F1 = "f1_optimal_on_validation_anomalies"
RULE_PERCENTILE = "p99_of_normal_validation_scores"
NPY_MAGIC = b"\x93NUMPY"
BATCH_SIZE = 32
#: distributions the pyfunc model needs at load time (versions pinned to this environment)
RUNTIME_REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "mlflow", "timm", "scipy")


# -- threshold ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Threshold:
    """The operating point of a deployed model: ``is_anomaly = score >= value``."""

    value: float
    rule: str
    description: str
    num_normal: int
    num_anomalous: int
    f1: float | None = None


def choose_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> Threshold:
    """The score threshold chosen on validation scores (never test scores).

    With labelled anomalies among ``labels`` (1), the threshold maximising F1 of
    ``score >= threshold`` on them (ties: the lowest such threshold); otherwise the
    99th percentile (linear interpolation) of the normal scores.

    Raises:
        ConfigError: No score, or non-finite scores.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(labels, dtype=np.int64).reshape(-1)
    if values.size == 0 or values.size != targets.size:
        raise ConfigError(f"choose_threshold: need one label per score, got {values.size} scores, {targets.size} labels")
    if not np.isfinite(values).all():
        raise ConfigError("choose_threshold: the validation scores hold NaN or inf")
    normal, anomalous = int((targets == 0).sum()), int((targets == 1).sum())
    if anomalous and normal:
        order = np.argsort(-values, kind="stable")
        sorted_values, sorted_targets = values[order], targets[order]
        true_positives = np.cumsum(sorted_targets == 1)
        # candidate k: the top k+1 scores are called anomalous; only the last of equal scores counts
        last_of_ties = np.r_[sorted_values[1:] != sorted_values[:-1], True]
        predicted = np.arange(1, values.size + 1)
        f1 = 2 * true_positives / (predicted + anomalous)
        f1 = np.where(last_of_ties, f1, -1.0)
        best = int(np.argmax(f1[::-1]))  # the lowest threshold among the best
        best = values.size - 1 - best
        return Threshold(
            value=float(sorted_values[best]),
            rule=RULE_F1,
            description=f"the threshold of best F1 ({f1[best]:.4f}) on {anomalous} labelled validation "
                        f"anomalies and {normal} normal validation images (score >= threshold is anomalous)",
            num_normal=normal,
            num_anomalous=anomalous,
            f1=float(f1[best]),
        )
    normal_scores = values[targets == 0] if normal else values
    return Threshold(
        value=float(np.percentile(normal_scores, 99)),
        rule=RULE_PERCENTILE,
        description=f"the 99th percentile of the scores of {normal_scores.size} normal validation images "
                    "(the validation split has no labelled anomaly; score >= threshold is anomalous)",
        num_normal=int(normal_scores.size),
        num_anomalous=0,
    )


# -- scoring with a deployable module -------------------------------------------------------
def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scores (N,), maps (N, 1, H, W) or None)`` from a deployable module's eval output."""
    if isinstance(outputs, torch.Tensor):
        return outputs.reshape(-1), None
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        return outputs[0].reshape(-1), outputs[1]
    raise ConfigError(f"a deployable model returns scores or (scores, maps), got {type(outputs).__name__}")


@torch.inference_mode()
def run_module(
    module: nn.Module, images: torch.Tensor, batch_size: int = BATCH_SIZE, keep_maps: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (and maps when ``keep_maps``) of raw images ``(N, C, H, W)`` through ``module``."""
    module.eval()
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        batch_scores, batch_maps = split_outputs(module(images[start : start + batch_size]))
        scores.append(batch_scores.float().cpu().numpy())
        if keep_maps and batch_maps is not None:
            maps.append(batch_maps.float().cpu().numpy())
    score_array = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    return score_array, (np.concatenate(maps) if maps else None)


def raw_images(images: torch.Tensor, datamodule: Any) -> torch.Tensor:
    """Undo the datamodule's normalisation: float images in [0, 1], as a user has them."""
    mean, std = datamodule.normalization_stats
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype).view(shape)
    std_t = torch.tensor(std, dtype=images.dtype).view(shape)
    return images * std_t + mean_t


def split_arrays(datamodule: Any, split: str) -> tuple[torch.Tensor, np.ndarray, list[str | None]]:
    """Raw images ``(N, C, H, W)`` in [0, 1], labels and file paths of one split, in index order."""
    dataset = getattr(datamodule, f"{split}_dataset")
    images, labels, paths = [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        images.append(item["image"])
        labels.append(int(item["label"]))
        paths.append(item.get("path"))
    stacked = raw_images(torch.stack(images), datamodule) if images else torch.zeros(0)
    return stacked, np.asarray(labels, dtype=np.int64), paths


# -- reading inputs the way the training data is read ---------------------------------------
def _image_extensions() -> tuple[str, ...]:
    from kd_experiments.data.common import IMAGE_EXTENSIONS

    return (*IMAGE_EXTENSIONS, ".npy")


def list_inputs(folder: str | Path) -> list[Path]:
    """The image files (and ``.npy`` arrays) inside ``folder`` and its sub-folders, sorted."""
    root = Path(folder)
    extensions = _image_extensions()
    return sorted(
        path for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")
    )


def decode_image(data: bytes, channels: int, size: tuple[int, int], name: str = "image") -> torch.Tensor:
    """Encoded bytes -> float ``(C, H, W)`` in [0, 1] at the model's resolution.

    Image files are converted to ``L`` (1 channel) or ``RGB`` (3) and resized with PIL's
    bilinear filter, as the datamodules read them; ``.npy`` arrays must already have the
    model's resolution (``uint8``, or floats in [0, 1]).

    Raises:
        DataError: Bytes that are not a readable image, or an array of the wrong shape.
    """
    height, width = size
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as error:
            raise DataError(f"unreadable .npy array {name}: {error}") from None
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape != (channels, height, width):
            raise DataError(f"{name}: array of shape {array.shape}, the model takes ({channels}, {height}, {width})")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.dtype == torch.uint8:
            return tensor.to(torch.float32) / 255.0
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise DataError(f"{name}: float arrays must hold values in [0, 1]")
        return tensor
    from PIL import Image

    from kd_experiments.data.common import pil_to_uint8_tensor

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(error))
        raise DataError(f"unreadable or truncated image {name}: {reason}") from None
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    return pil_to_uint8_tensor(converted).to(torch.float32) / 255.0


def read_input(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One image file (or ``.npy`` array) as float ``(C, H, W)`` in [0, 1]; :class:`DataError` if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    return decode_image(data, channels, size, str(path))


# -- the pyfunc wrapper ---------------------------------------------------------------------
def deployment_info(module: nn.Module) -> dict[str, Any]:
    """What a deployable module says about its input and output."""
    size = getattr(module, "input_size", None)
    channels = getattr(module, "input_channels", None)
    if size is None or channels is None:
        raise ConfigError(f"{type(module).__name__} lacks input_size / input_channels: not a deployable model")
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    return {
        "input_channels": int(channels),
        "input_size": list(size),
        "produces_map": bool(getattr(module, "produces_map", False)),
    }


#: packages whose classes a saved deployable model may name (never functions)
SAFE_CLASS_PACKAGES = ("kd_experiments.", "torch.", "timm.")


def _safe_class(name: str) -> type:
    """The class ``name`` (``module.Qualified``) if it lives in an allowed package, else :class:`ConfigError`."""
    module_name, _, attribute = name.rpartition(".")
    if not module_name.startswith(SAFE_CLASS_PACKAGES):
        raise ConfigError(f"a deployable model may only hold classes of {SAFE_CLASS_PACKAGES}, it names {name}")
    value = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not isinstance(value, type):
        raise ConfigError(f"a deployable model may only name classes, {name} is a {type(value).__name__}")
    return value


def module_classes(path: str | Path) -> list[str]:
    """The classes a ``torch.save``-d module needs beyond what ``torch.load(weights_only=True)`` allows.

    Found by loading it back with the weights-only unpickler and allowing, one by one, each
    class it names, provided the class is one of :data:`SAFE_CLASS_PACKAGES` (a function or
    anything else is refused). The list is kept with the model, so :func:`load_module` loads
    it weights-only: no pickled code runs.
    """
    names: list[str] = []
    for _ in range(500):
        try:
            load_module(path, names)
            return names
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            if found is None or found.group(1) in names:
                raise
            _safe_class(found.group(1))
            names.append(found.group(1))
    raise ConfigError(f"{path}: the deployable model names too many classes")


def load_module(path: str | Path, classes: list[str]) -> nn.Module:
    """A saved deployable model, loaded weights-only with ``classes`` (checked) allowed."""
    allowed = [_safe_class(name) for name in classes]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


class StudentModel(mlflow.pyfunc.PythonModel):
    """A deployable anomaly detector as an MLflow pyfunc: a table of images in, scores out.

    ``predict`` takes a DataFrame (or a dict of columns) with ``path`` and/or ``image``
    (see the module docstring) and returns one row per image: ``path``, ``score``,
    ``is_anomaly`` and ``error``. An unreadable image gets a NaN score and its reason in
    ``error``; the other rows are scored. :attr:`module` is the torch module itself
    (maps included), for callers that want them (``kd-predict``).
    """

    def load_context(self, context) -> None:
        self.info: dict[str, Any] = json.loads(Path(context.artifacts["deploy"]).read_text())
        self.module: nn.Module = load_module(context.artifacts["module"], self.info.get("module_classes", []))
        self.module.eval()

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    def images_of(self, model_input: Any) -> list[tuple[str, torch.Tensor | None, str]]:
        """``(name, image or None, error)`` for every input row, folders expanded."""
        channels = int(self.info["input_channels"])
        size = (int(self.info["input_size"][0]), int(self.info["input_size"][1]))
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        entries: list[tuple[str, torch.Tensor | None, str]] = []
        for row_number, row in enumerate(frame.to_dict("records")):
            data, path = row.get("image"), row.get("path")
            has_data = isinstance(data, (bytes, bytearray, memoryview, str)) and len(data) > 0
            has_path = isinstance(path, str) and path != ""
            if has_data:
                if isinstance(data, str):  # base64 text, as JSON requests carry bytes
                    data = base64.b64decode(data)
                name = path if has_path else f"row {row_number}"
                try:
                    entries.append((name, decode_image(bytes(data), channels, size, name), ""))
                except DataError as error:
                    entries.append((name, None, str(error)))
            elif has_path:
                files = list_inputs(path) if Path(path).is_dir() else [Path(path)]
                if not files:
                    entries.append((path, None, f"no image in folder {path}"))
                for file in files:
                    try:
                        entries.append((str(file), read_input(file, channels, size), ""))
                    except DataError as error:
                        entries.append((str(file), None, str(error)))
            else:
                entries.append((f"row {row_number}", None, "the row has neither a 'path' nor an 'image'"))
        return entries

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        entries = self.images_of(model_input)
        readable = [i for i, (_, image, _) in enumerate(entries) if image is not None]
        scores = np.full(len(entries), np.nan)
        if readable:
            values, _ = run_module(self.module, torch.stack([entries[i][1] for i in readable]))
            scores[readable] = values
        return pd.DataFrame({
            "path": [name for name, _, _ in entries],
            "score": scores,
            "is_anomaly": [bool(s >= self.threshold) if math.isfinite(s) else False for s in scores],
            "error": [error for _, _, error in entries],
        })


# -- logging a run's student ------------------------------------------------------------------
def model_signature():
    """Input: ``path`` and/or ``image`` columns; output: ``path``, ``score``, ``is_anomaly``, ``error``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([
            ColSpec("string", "path"), ColSpec("double", "score"),
            ColSpec("boolean", "is_anomaly"), ColSpec("string", "error"),
        ]),
    )


def png_bytes(image: torch.Tensor) -> bytes:
    """A float ``(C, H, W)`` image in [0, 1] as PNG bytes (8 bits per channel)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(image: torch.Tensor) -> bytes:
    """A float ``(C, H, W)`` image in [0, 1] as ``.npy`` bytes (exact: no 8-bit rounding)."""
    buffer = io.BytesIO()
    np.save(buffer, image.detach().cpu().to(torch.float32).numpy(), allow_pickle=False)
    return buffer.getvalue()


def runtime_requirements() -> list[str]:
    """``name==version`` of the distributions the model needs, as installed here."""
    requirements = []
    for name in (*RUNTIME_REQUIREMENTS, "lightning", "torchmetrics", "hydra-core", "omegaconf", "scikit-learn"):
        try:
            requirements.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return requirements


def _metadata_value(value: Any) -> Any:
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.floating, np.integer)):
        return _metadata_value(value.item())
    if isinstance(value, (list, tuple)):
        return [_metadata_value(v) for v in value]
    return str(value)


def log_student(
    run_id: str,
    tracking_uri: str,
    module: nn.Module,
    threshold: Threshold,
    size_summary: dict[str, Any],
    scheme: str,
    example_image: torch.Tensor,
    artifact_path: str = MODEL_ARTIFACT_PATH,
) -> str:
    """Log ``module`` as the MLflow Model ``runs:/<run_id>/<artifact_path>``; returns that URI.

    ``example_image`` (float ``(C, H, W)`` in [0, 1], a validation image) becomes the
    input example (PNG bytes in the ``image`` column).
    """
    import mlflow
    from mlflow.models import Model

    import kd_experiments

    from kd_experiments.compression import count_parameters

    module = module.cpu().eval()
    info = {
        "scheme": scheme,
        **deployment_info(module),
        "threshold": float(threshold.value),
        "threshold_rule": threshold.rule,
        "threshold_description": threshold.description,
        "threshold_f1": threshold.f1,
        "deployed_params": count_parameters(module),
        **{f"size.{key}": _metadata_value(value) for key, value in size_summary.items()},
        "input_format": "DataFrame: column 'path' (image files or folders) and/or 'image' (PNG/JPEG/BMP/TIFF "
                        "or .npy bytes); output: path, score, is_anomaly (score >= threshold), error",
    }
    info = {key: _metadata_value(value) for key, value in info.items()}
    previous_uri = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as folder:
        module_path = Path(folder) / MODULE_FILE
        torch.save(module, module_path)
        info["module_classes"] = module_classes(module_path)
        deploy_path = Path(folder) / DEPLOY_FILE
        deploy_path.write_text(json.dumps(info, indent=2))
        code_file = Path(folder) / "student_model.py"  # MLflow's models-from-code: no pickled class
        code_file.write_text(
            "import mlflow.models\n\nfrom kd_experiments.deploy import StudentModel\n\n"
            "mlflow.models.set_model(StudentModel())\n"
        )
        mlflow.set_tracking_uri(tracking_uri)
        # the Model entity belongs to the run's experiment (MLflow takes it from the environment)
        experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        previous_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
        previous_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            with warnings.catch_warnings():  # MLflow's schema hints concern inferred signatures
                warnings.simplefilter("ignore", UserWarning)
                Model.log(
                    artifact_path=None,
                    name=artifact_path,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    python_model=str(code_file),
                    artifacts={"module": str(module_path), "deploy": str(deploy_path)},
                    code_paths=[str(Path(kd_experiments.__file__).parent)],
                    signature=model_signature(),
                    input_example=pd.DataFrame({"image": [png_bytes(example_image)]}),
                    pip_requirements=runtime_requirements(),
                    metadata=info,
                )
        finally:
            mlflow.set_tracking_uri(previous_uri)
            for name, value in (("MLFLOW_EXPERIMENT_ID", previous_experiment),
                                ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", previous_bar)):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return f"runs:/{run_id}/{artifact_path}"


def _sample_paths(dataset: Any) -> list[str]:
    """File of each sample of a dataset, without decoding images ('' where in memory)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [str(getattr(sample, "image_path", "")) for sample in samples]
    paths = getattr(dataset, "paths", None)
    return [str(p) for p in paths] if paths is not None else [""] * len(dataset)


def test_scores_csv(results: dict[str, torch.Tensor], paths: Sequence[str]) -> str:
    """The test step's scores as CSV text: ``index, path, label, score`` (in index order)."""
    frame = pd.DataFrame({
        "index": results["index"].long().numpy(),
        "label": results["label"].long().numpy(),
        "score": results["score"].double().numpy(),
    })
    frame.insert(1, "path", [paths[i] if i < len(paths) else "" for i in frame["index"]])
    return frame.to_csv(index=False, float_format="%.9g")


def log_run_student(tracker: Any, scheme: Any, datamodule: Any) -> str | None:
    """After the test of a ``kd-train`` run: threshold on validation, test scores, the Model.

    Returns the model URI (``None`` outside the tracking process).
    """
    if not getattr(tracker, "active", False) or tracker.run_id is None:
        return None
    import copy

    build = getattr(scheme, "deployable_model", None)
    try:
        if build is None:
            raise NotImplementedError
        module = copy.deepcopy(build()).cpu().eval()
    except NotImplementedError:
        log.warning("%s has no deployable model: no MLflow Model is logged", type(scheme).__name__)
        return None
    val_images, val_labels, _ = split_arrays(datamodule, "val")
    val_scores, _ = run_module(module, val_images)
    threshold = choose_threshold(val_scores, val_labels)
    results = getattr(scheme, "test_results", None) or {}
    if "score" in results:
        tracker.log_text(test_scores_csv(results, _sample_paths(datamodule.test_dataset)), TEST_SCORES_ARTIFACT)
    uri = log_student(
        tracker.run_id, tracker.tracking_uri, module, threshold, dict(scheme.compression_summary()),
        str(getattr(scheme, "scheme_name", type(scheme).__name__)), val_images[0],
    )
    tracker.log_metrics({"deploy/threshold": threshold.value})
    tracker.set_tags({"deploy.threshold_rule": threshold.rule, "deploy.model_uri": uri})
    return uri


def log_run_outputs(tracker: Any, scheme: Any, datamodule: Any, dataset_name: str, tested: bool = True,
                    log_model: bool = True) -> str | None:
    """What a finished ``kd-train`` run logs last: its data sets as MLflow dataset inputs
    (training split, and the test split when tested) and, when tested, its student as an
    MLflow Model (:func:`log_run_student`). Returns the model URI, if one was logged."""
    from kd_experiments.tracking import log_dataset_inputs

    if not getattr(tracker, "active", False) or tracker.run_id is None:
        return None
    log_dataset_inputs(tracker.client, tracker.run_id, datamodule, dataset_name,
                       ["train", "test"] if tested else ["train"])
    if not (tested and log_model):
        return None
    return log_run_student(tracker, scheme, datamodule)


# -- the Model Registry: a sweep's champion -------------------------------------------------------
CHAMPION_ALIAS = "champion"
DEFAULT_SELECTION_METRIC = "val/image_auroc"


@dataclass(frozen=True)
class Champion:
    """The student a sweep registers, and why."""

    run_id: str
    run_name: str
    student_params: float
    quality: float
    reference: float
    reference_source: str
    metric: str
    within: float
    version: str = ""

    @property
    def rule(self) -> str:
        return (f"the smallest student (student_params) whose {self.metric} >= (1 - {self.within:g}) x "
                f"the {self.reference_source}'s; validation data only, never the test split")


def choose_champion(records: Sequence[Any], within: float, metric: str = DEFAULT_SELECTION_METRIC) -> Champion:
    """The smallest student whose *validation* quality is within ``within`` (a fraction) of the teacher's.

    ``records`` are :class:`kd_experiments.report.RunRecord`; only FINISHED runs count. The
    teacher's quality is the run's ``val/teacher_*`` counterpart of ``metric`` (the teacher
    trained in the same run); for schemes whose teacher does not score on its own (reverse
    distillation: the ratio's reference is the full-width student), it is the mean
    ``metric`` of the runs at the sweep's lowest compression ratio. Ties: the higher quality.

    Raises:
        ConfigError: ``within`` outside [0, 1), a metric no run logged, or no student within reach.
    """
    if not 0 <= within < 1:
        raise ConfigError(f"--within must be a fraction in [0, 1), got {within}")
    if not metric.startswith("val/"):
        raise ConfigError(f"the champion is chosen on validation data: --register-metric must be a val/ metric, "
                          f"got {metric!r}")
    finished = [r for r in records if r.status == "FINISHED" and math.isfinite(r.metrics.get(metric, math.nan))]
    if not finished:
        logged = sorted({m for r in records for m in r.metrics if m.startswith("val/")})
        raise ConfigError(f"no FINISHED run logged {metric}; validation metrics logged: {logged or 'none'}")
    teacher_metric = metric.replace("val/", "val/teacher_", 1)
    candidates = []
    lowest = min(r.compression_ratio for r in finished)
    reference_runs = [r for r in finished if math.isclose(r.compression_ratio, lowest, rel_tol=1e-6)]
    fallback = float(np.mean([r.metrics[metric] for r in reference_runs]))
    for record in finished:
        teacher = record.metrics.get(teacher_metric, math.nan)
        if math.isfinite(teacher):
            reference, source = teacher, f"teacher ({teacher_metric}, same run)"
        else:
            reference, source = fallback, f"reference student at compression ratio {lowest:.3g} (mean {metric})"
        if record.metrics[metric] >= (1 - within) * reference:
            candidates.append((record, reference, source))
    if not candidates:
        raise ConfigError(f"no student's {metric} is within {within:g} of its reference; raise --within")
    record, reference, source = min(candidates, key=lambda c: (c[0].student_params, -c[0].metrics[metric]))
    return Champion(record.run_id, record.run_name, record.student_params, record.metrics[metric], reference,
                    source, metric, within)


def register_champion(tracking_uri: str, champion: Champion, name: str) -> Champion:
    """Register ``runs:/<run>/student`` as a version of ``name`` with alias ``champion``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from kd_experiments.errors import TrackingError

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        version = mlflow.register_model(f"runs:/{champion.run_id}/{MODEL_ARTIFACT_PATH}", name,
                                         tags={"kd.selection_rule": champion.rule})
    except Exception as error:  # noqa: BLE001 - MLflow's own exception types per store
        raise TrackingError(f"cannot register run {champion.run_id}'s student as {name!r}: "
                            f"{str(error).splitlines()[0][:300]}") from None
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    for key, value in {"kd.selection_metric": champion.metric, "kd.selection_quality": f"{champion.quality:.6g}",
                       "kd.selection_reference": f"{champion.reference:.6g} ({champion.reference_source})",
                       "kd.selection_within": f"{champion.within:g}",
                       "kd.student_params": f"{champion.student_params:.0f}"}.items():
        client.set_model_version_tag(name, version.version, key, value)
    return Champion(**{**asdict(champion), "version": str(version.version)})
