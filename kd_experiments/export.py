"""``kd-export``: a run's student as ONNX, int8 or TorchScript, checked and logged beside its Model.

    kd-export RUN_ID --format onnx           # export/student.onnx, deploy/onnx_max_abs_diff
    kd-export RUN_ID --format int8           # export/student_int8.pt, deploy/int8_auroc_drop
    kd-export RUN_ID --format int8 --qat     # quantisation-aware fine-tuning when PTQ loses > 0.005 AUROC
    kd-export RUN_ID --format torchscript    # export/student_torchscript.pt, deploy/torchscript_max_abs_diff

The student is the run's MLflow Model (``runs:/RUN_ID/student``, see :mod:`kd_experiments.deploy`);
the data are the run's own splits, rebuilt from its logged config (``config/config.yaml``):
calibration and fine-tuning use training images only; the parity and AUROC-drop figures
are measured on the test split and only *reported* (metrics of the run), never used to
choose anything. Every file carries the model's deployment facts (threshold and its rule,
input size and channels, whether it produces maps): ONNX in its ``metadata_props``,
TorchScript in the extra file ``deploy.json``; ``kd-predict`` reads them.

- **onnx**: :func:`kd_experiments.compression.export_onnx` (batch dimension dynamic); the
  figure is the largest absolute difference between PyTorch and ONNX Runtime over every
  output (scores and maps) of the test images.
- **int8**: static post-training quantisation with PyTorch's own FX flow
  (:func:`kd_experiments.compression.quantize_int8_static`, x86 backend), calibrated on
  training images; submodules ``torch.fx`` cannot trace (the preprocessing, with its
  Python checks; RD's EfficientNet encoder, whose TF "SAME" padding depends on the input
  size) stay whole and in float, so the student's own layers are what turns int8. With
  ``--qat`` and a drop above 0.005, quantisation-aware fine-tuning
  (:func:`kd_experiments.compression.quantize_int8_qat`) on training images, the float
  model's outputs as targets (scores, or maps for map schemes), replaces it. Saved as
  TorchScript (traced): float images in [0, 1] at the training resolution.
- **torchscript**: ``torch.jit.trace`` of the float model (float images in [0, 1] at the
  training resolution; the ``uint8`` branch of the preprocessing is not in the trace).

Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (the int8 scheme and its fine-tuning).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments import deploy
from kd_experiments.errors import ConfigError, KDError, TrackingError
from kd_experiments.tracking import quiet_mlflow

log = logging.getLogger(__name__)

FORMATS = ("onnx", "int8", "torchscript")
EXPORT_DIR = "export"
FILES = {"onnx": "student.onnx", "int8": "student_int8.pt", "torchscript": "student_torchscript.pt"}
METADATA_FILE = "deploy.json"
QAT_TRIGGER = 0.005
CALIBRATION_IMAGES = 64
BATCH = 16


@dataclass
class RunStudent:
    """A run's logged student: the torch module, its deployment facts, the run's config."""

    run_id: str
    module: nn.Module
    info: dict[str, Any]
    config: Any


# -- reading the run ----------------------------------------------------------------------
def load_run_student(run_id: str, tracking_uri: str | None = None) -> RunStudent:
    """The student Model and config of run ``run_id`` (:class:`TrackingError` if absent)."""
    import mlflow
    from omegaconf import OmegaConf

    from kd_experiments.tracking import make_client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types per store
        raise TrackingError(f"no MLflow run {run_id!r} in {uri}") from None
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/{deploy.MODEL_ARTIFACT_PATH}")
    except Exception as error:  # noqa: BLE001
        raise TrackingError(
            f"run {run_id} has no student Model at {deploy.MODEL_ARTIFACT_PATH}/ "
            f"(runs log one when they finish their test): {str(error).splitlines()[0][:200]}"
        ) from None
    wrapper = loaded.unwrap_python_model()
    with tempfile.TemporaryDirectory() as folder:
        try:
            config_path = client.download_artifacts(run_id, "config/config.yaml", folder)
        except Exception:  # noqa: BLE001
            raise TrackingError(f"run {run_id} has no config/config.yaml artifact") from None
        config = OmegaConf.load(config_path)
    return RunStudent(run_id, wrapper.module.eval(), dict(wrapper.info), config)


def run_datamodule(config: Any):
    """The run's datamodule, rebuilt from its logged (resolved) config, with every split set up."""
    from kd_experiments import config as kd_config

    datamodule = kd_config.instantiate(config.data)
    datamodule.prepare_data()
    datamodule.setup(None)
    return datamodule


# -- the three formats ----------------------------------------------------------------------
def _batches(images: torch.Tensor, size: int = BATCH) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def _float_leaves(module: nn.Module) -> list[str]:
    """Top-level submodules ``torch.fx`` cannot trace (kept whole and in float), the preprocessing first."""
    leaves = []
    for name, child in module.named_children():
        if name == "preprocess":
            leaves.append(name)
            continue
        try:
            torch.fx.symbolic_trace(copy.deepcopy(child))
        except Exception:  # noqa: BLE001 - any tracing failure: this child stays a float leaf
            leaves.append(name)
    return leaves


def _outputs(module: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        scores, maps = deploy.split_outputs(module(images))
    return [scores] if maps is None else [scores, maps]


def max_abs_diff(reference: nn.Module, candidate, images: torch.Tensor) -> float:
    """Largest ``|reference - candidate|`` over every output of every image (``candidate`` may be ONNX)."""
    worst = 0.0
    for batch in _batches(images):
        expected = _outputs(reference, batch)
        got = candidate(batch)
        for ours, theirs in zip(expected, got, strict=True):
            worst = max(worst, (ours.double() - torch.as_tensor(theirs).double().reshape(ours.shape)).abs().max().item())
    return worst


def _deploy_json(info: dict[str, Any], **extra: Any) -> str:
    return json.dumps({**info, **extra}, indent=2, default=str)


def export_onnx_file(module: nn.Module, info: dict[str, Any], path: Path) -> Path:
    """The ONNX file with the deployment facts in its ``metadata_props``."""
    import onnx

    from kd_experiments.compression import export_onnx

    example = torch.rand(2, int(info["input_channels"]), *[int(v) for v in info["input_size"]],
                         generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # tracer notes on the preprocessing's shape checks (constant per model)
        warnings.simplefilter("ignore")
        export_onnx(module, example, path)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_FILE: _deploy_json(info, format="onnx")})
    onnx.save(model, str(path))
    return path


def onnx_runner(path: Path):
    """A callable ``images -> [outputs]`` running the ONNX file in ONNX Runtime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: [torch.from_numpy(o) for o in session.run(None, {name: images.numpy().astype(np.float32)})]


def save_torchscript(module: nn.Module, info: dict[str, Any], path: Path, fmt: str) -> Path:
    """``torch.jit.trace`` of ``module`` on float images, saved with ``deploy.json`` inside."""
    example = torch.rand(2, int(info["input_channels"]), *[int(v) for v in info["input_size"]],
                         generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer warnings
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: _deploy_json(info, format=fmt)})
    return path


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A file saved by :func:`save_torchscript` and its deployment facts."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[METADATA_FILE] or "{}")


def image_auroc(module, images: torch.Tensor, labels: np.ndarray) -> float:
    """Image AUROC of ``module`` (any callable returning scores or (scores, maps)) on ``images``."""
    from kd_experiments.metrics import image_auroc as auroc

    scores = []
    with torch.inference_mode():
        for batch in _batches(images):
            scores.append(deploy.split_outputs(module(batch))[0].float())
    return float(auroc(torch.cat(scores), torch.as_tensor(labels)))


def _flat(outputs: Any) -> torch.Tensor:
    tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def _capture(root: nn.Module, modules: Sequence[nn.Module], images: torch.Tensor) -> dict[int, list[tuple]]:
    """The ``(args, output)`` of every call of ``modules`` while ``root`` scores ``images``."""
    captured: dict[int, list[tuple]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.setdefault(id(mod), []).append((args, out)))
             for m in modules]
    try:
        with torch.inference_mode():
            for batch in _batches(images):
                root(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _quantize_parts(module: nn.Module, train_images: torch.Tensor, qat: bool, epochs: int, lr: float) -> nn.Module:
    """int8 part by part, for models ``torch.fx`` cannot trace as a whole (RD: features flow as
    lists, shapes steer control flow): from the top, every submodule called with tensors only
    that traces is quantised on its own, on the inputs it receives while the model scores the
    calibration images; one that does not is split into its children. The preprocessing and
    the encoder (a frozen pretrained network whose TF "SAME" padding does not trace) stay in
    float, and so does the glue between parts (maps, scores)."""
    from kd_experiments.compression import quantize_int8_qat, quantize_int8_static

    result = copy.deepcopy(module).eval()
    calibration = train_images[:CALIBRATION_IMAGES]
    pending = [(result, name, child) for name, child in result.named_children() if name not in ("preprocess", "encoder")]
    while pending:
        captured = _capture(result, [child for _, _, child in pending], calibration)
        following = []
        for parent, name, child in pending:
            calls = captured.get(id(child), [])
            if not calls or not any(True for _ in child.parameters()):
                continue  # unused, or nothing to quantise
            args = calls[0][0]
            if args and all(isinstance(a, torch.Tensor) for a in args):
                inputs = [tuple(a.clone() for a in call_args) for call_args, _ in calls]
                try:
                    if qat:
                        pairs = [(x, _flat(out).clone()) for x, (_, out) in zip(inputs, calls, strict=True)]
                        quantised = quantize_int8_qat(child, pairs, lambda o, t: F.mse_loss(_flat(o), t),
                                                      epochs=epochs, lr=lr)
                    else:
                        quantised = quantize_int8_static(child, inputs)
                    setattr(parent, name, quantised)
                    continue
                except ConfigError:
                    pass  # does not trace: try its children
            following += [(child, n, c) for n, c in child.named_children()]
        pending = following
    return result


def quantize(module: nn.Module, train_images: torch.Tensor, qat: bool = False, epochs: int = 2,
             lr: float = 1e-4) -> nn.Module:
    """int8 model of ``module``: static PTQ calibrated on ``train_images``, or QAT (``qat=True``)
    fine-tuned on them towards the float model's outputs (scores; maps for map schemes).

    The whole model is quantised in one FX graph when it traces (submodules that do not
    trace kept whole and in float); otherwise part by part (:func:`_quantize_parts`).
    """
    from kd_experiments.compression import quantize_int8_qat, quantize_int8_static

    leaves = _float_leaves(module)
    calibration = train_images[:CALIBRATION_IMAGES]
    try:
        if not qat:
            return quantize_int8_static(module, list(_batches(calibration)), non_traceable=leaves)
        pairs = []
        for batch in _batches(train_images):
            outputs = _outputs(module, batch)
            pairs.append((batch, outputs[-1].detach().clone()))

        def loss_fn(outputs, targets: torch.Tensor) -> torch.Tensor:
            scores, maps = deploy.split_outputs(outputs)
            return F.mse_loss((maps if maps is not None else scores).reshape(targets.shape), targets)

        return quantize_int8_qat(module, pairs, loss_fn, epochs=epochs, lr=lr, non_traceable=leaves)
    except ConfigError:
        return _quantize_parts(module, train_images, qat, epochs, lr)


def int8_parts(original: nn.Module, quantised: nn.Module) -> str:
    """The top-level parts of ``quantised`` that hold int8 layers (for the run's tag)."""
    def has_int8(module: nn.Module) -> bool:
        return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())

    names = [name for name, child in quantised.named_children() if has_int8(child)]
    if not names and has_int8(quantised):
        names = ["graph"]
    return ",".join(names) or "none"


# -- the command ------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    artifact: str
    metrics: dict[str, float]
    tags: dict[str, str]


def export_run(run_id: str, fmt: str, tracking_uri: str | None = None, qat: bool = False,
               output_dir: str | Path | None = None, log: bool = True) -> ExportResult:
    """Export run ``run_id``'s student to ``fmt``, check it, log file and figures to the run."""
    from kd_experiments.tracking import make_client, resolve_tracking_uri

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    student = load_run_student(run_id, tracking_uri)
    module, info = student.module, student.info
    datamodule = run_datamodule(student.config)
    test_images, test_labels, _ = deploy.split_arrays(datamodule, "test")
    folder = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="kd-export-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[fmt]
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    if fmt == "onnx":
        export_onnx_file(module, info, path)
        metrics["deploy/onnx_max_abs_diff"] = max_abs_diff(module, onnx_runner(path), test_images)
    elif fmt == "torchscript":
        save_torchscript(module, info, path, fmt)
        traced, _ = load_torchscript(path)
        metrics["deploy/torchscript_max_abs_diff"] = max_abs_diff(module, lambda x: _outputs(traced, x), test_images)
    else:
        train_images, _, _ = deploy.split_arrays(datamodule, "train")
        float_auroc = image_auroc(module, test_images, test_labels)
        quantised = quantize(module, train_images)
        int8_auroc = image_auroc(quantised, test_images, test_labels)
        metrics["deploy/int8_ptq_auroc_drop"] = float_auroc - int8_auroc
        tags["deploy.int8_method"] = "ptq"
        if qat and float_auroc - int8_auroc > QAT_TRIGGER:
            quantised = quantize(module, train_images, qat=True)
            int8_auroc = image_auroc(quantised, test_images, test_labels)
            tags["deploy.int8_method"] = "qat"
        metrics.update({
            "deploy/int8_auroc_drop": float_auroc - int8_auroc,
            "deploy/int8_test_image_auroc": int8_auroc,
        })
        tags["deploy.int8_parts"] = int8_parts(module, quantised)
        save_torchscript(quantised, info, path, "int8")
    artifact = f"{EXPORT_DIR}/{path.name}"
    if log:
        client = make_client(resolve_tracking_uri(tracking_uri))
        client.log_artifact(run_id, str(path), EXPORT_DIR)
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    return ExportResult(path, artifact, metrics, tags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-export",
        description="Export a run's student (its MLflow Model student/) to ONNX, int8 or TorchScript, "
                    "check it on the run's test split and log file and figures to the run.",
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow run whose student to export")
    parser.add_argument("--format", "-f", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--qat", action="store_true",
                        help=f"int8: quantisation-aware fine-tuning when post-training int8 loses > {QAT_TRIGGER} AUROC")
    parser.add_argument("--output", "-o", type=Path, help="folder for the file (default: a temporary folder)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument("--no-log", action="store_true", help="write the file only; log nothing to the run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``kd-export``."""
    args = build_parser().parse_args(argv)
    quiet_mlflow()
    try:
        result = export_run(args.run_id, args.format, args.tracking_uri, qat=args.qat, output_dir=args.output,
                            log=not args.no_log)
    except KDError as error:
        print(f"kd-export: error: {error}", file=sys.stderr)
        return 1
    figures = ", ".join(f"{key}={value:.6g}" for key, value in result.metrics.items())
    print(f"[kd-export] {result.path} ({figures})")
    if not args.no_log:
        print(f"[kd-export] logged to run {args.run_id} as {result.artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
