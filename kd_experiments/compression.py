"""Every count of a model's size and cost, int8 quantisation and ONNX export.

One place for the numbers a compression sweep reports: parameters
(:func:`count_parameters`), multiply-accumulates (:func:`count_macs`), the
teacher/student ratio (:func:`compression_ratio`), bytes on disk
(:func:`serialized_size_bytes`), the search for a student of a requested ratio
(:func:`check_ratio`, :func:`width_for_ratio`, :func:`closest_to_ratio`: every scheme
checks a requested ratio and reports an unreachable one the same way), int8
quantisation, post-training
(:func:`quantize_int8_dynamic`, :func:`quantize_int8_static`) or quantisation-aware
(:func:`quantize_int8_qat`), ONNX export and
its numerical check (:func:`export_onnx`, :func:`onnx_parity`), and latency for
benchmarks (:func:`measure_latency`; tests never assert timings).

Conventions:

- MACs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``
  (an operator-level dispatch counter, so it sees functional calls too), which
  counts the FLOPs of matrix multiplications and convolutions (``2 * MACs`` each;
  bias adds, normalisation, activations and pooling are not counted, the usual
  convention of papers and of fvcore). ``MACs = FLOPs / 2``. The count is for one
  forward pass of ``example_input`` (its batch size included).
- Parameters are unique tensors (shared weights count once), buffers excluded.
- int8 uses PyTorch's ``torch.ao.quantization`` (x86 / fbgemm backend, CPU
  inference). In torch 2.14 it works but warns that it is deprecated in favour of
  ``torchao`` (the warning is left visible); a migration to torchao's PT2E flow
  is the path once torchao is a dependency.
- ONNX export uses the TorchScript-based exporter (``torch.onnx.export(...,
  dynamo=False)``): the torch.export-based default of torch >= 2.9 needs
  ``onnxscript``, which is not a dependency. Torch warns that this exporter is
  deprecated; the warning is silenced here, as it carries no action for callers.
"""

from __future__ import annotations

import copy
import io
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_experiments.errors import ConfigError

__all__ = [
    "check_ratio",
    "closest_to_ratio",
    "compression_ratio",
    "count_macs",
    "count_on_meta",
    "count_parameters",
    "export_onnx",
    "measure_latency",
    "onnx_parity",
    "quantize_int8_dynamic",
    "quantize_int8_qat",
    "quantize_int8_static",
    "serialized_size_bytes",
    "width_for_ratio",
]

ExampleInput = torch.Tensor | Sequence[torch.Tensor]


def _as_args(example_input: ExampleInput) -> tuple[Any, ...]:
    """Positional arguments for ``module(*args)``: a tensor is one argument."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    return tuple(example_input)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag afterwards.

    Restoring per submodule (not ``module.train(was_training)``) keeps deliberate
    mixtures intact, e.g. a frozen backbone that stays in eval inside a training
    student.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


# ---------------------------------------------------------------------------- counts


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor once; buffers excluded).

    Args:
        module: Any module.
        trainable_only: Count only parameters with ``requires_grad=True``.
    """
    return sum(
        parameter.numel()
        for parameter in module.parameters()
        if parameter.requires_grad or not trainable_only
    )


def count_macs(module: nn.Module, example_input: ExampleInput) -> int:
    """Multiply-accumulates of one forward pass on ``example_input``.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` under
    ``torch.no_grad()`` with the module in eval mode (its modes are restored
    afterwards); ``MACs = FLOPs / 2``. Only matrix multiplications and
    convolutions count (see the module docstring). The batch size of
    ``example_input`` scales the result: pass a batch of one for per-image MACs.

    Args:
        module: The model.
        example_input: A tensor, or a sequence of tensors passed positionally.

    Returns:
        The MAC count, an integer.
    """
    counter = FlopCounterMode(display=False)
    with _eval_mode(module), torch.no_grad(), counter:
        module(*_as_args(example_input))
    return counter.get_total_flops() // 2


def compression_ratio(reference: nn.Module | int, deployed: nn.Module | int) -> float:
    """Parameter ratio ``reference / deployed`` (e.g. teacher / student; 4.0 = 4x smaller).

    Args:
        reference: The reference model or its parameter count.
        deployed: The compressed model or its parameter count.

    Raises:
        ConfigError: A count is negative or ``deployed`` has no parameters.
    """
    counts = []
    for name, value in (("reference", reference), ("deployed", deployed)):
        count = count_parameters(value) if isinstance(value, nn.Module) else value
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(
                f"compression_ratio: {name} must be a module or a count >= 0, got {value!r}"
            )
        counts.append(count)
    if counts[1] == 0:
        raise ConfigError(
            "compression_ratio: the deployed model has 0 parameters; the ratio is undefined"
        )
    return counts[0] / counts[1]


def size_summary(
    teacher_params: int,
    student_params: int,
    teacher_macs: float,
    student_macs: float,
    reference_params: int | None = None,
    reference_macs: float | None = None,
) -> dict[str, float]:
    """The six size entries every scheme logs (``compression_summary``).

    ``compression_ratio`` is ``reference_params / student_params`` and
    ``mac_compression_ratio`` likewise for MACs, the reference being the teacher unless
    given (reverse distillation compares with its full-width student). MACs may be NaN
    (a teacher whose operations cannot be counted), and so is then their ratio.
    """
    reference_params = teacher_params if reference_params is None else reference_params
    reference_macs = teacher_macs if reference_macs is None else reference_macs
    return {
        "teacher_params": teacher_params,
        "student_params": student_params,
        "compression_ratio": compression_ratio(reference_params, student_params),
        "teacher_macs": teacher_macs,
        "student_macs": student_macs,
        "mac_compression_ratio": reference_macs / student_macs,
    }


# ---------------------------------------------------------------- a student for a ratio

Candidate = TypeVar("Candidate")


def check_ratio(value: object, name: str = "compression_ratio") -> float:
    """``value`` as a float if it is a finite number >= 1, else a :class:`ConfigError`
    naming ``scheme.<name>``: the one check of a requested compression ratio."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1):
        raise ConfigError(f"scheme.{name} must be a number >= 1, got {value!r}")
    return float(value)


def closest_to_ratio(
    target: float,
    candidates: Sequence[tuple[Candidate, float]],
    tolerance: float = 0.25,
    reachable: Callable[[], tuple[float, float]] | None = None,
    name: str = "compression_ratio",
) -> Candidate:
    """The candidate whose ratio is closest to ``target`` in log space (the first on a tie).

    Args:
        target: The requested ratio (checked with :func:`check_ratio`).
        candidates: ``(candidate, the ratio it achieves)`` pairs, at least one.
        tolerance: The largest accepted relative error, in log space
            (``|log(ratio / target)| <= log(1 + tolerance)``).
        reachable: ``(smallest, largest)`` ratio any candidate of the family reaches,
            for the message (computed only on failure); by default the span of ``candidates``.
        name: The config key, for the message.

    Raises:
        ConfigError: When no candidate is within ``tolerance`` of ``target``.
    """
    target = check_ratio(target, name)
    best, achieved = min(candidates, key=lambda item: abs(math.log(item[1] / target)))
    if abs(math.log(achieved / target)) > math.log1p(tolerance):
        low, high = reachable() if reachable is not None else (
            min(ratio for _, ratio in candidates), max(ratio for _, ratio in candidates)
        )
        raise ConfigError(
            f"scheme.{name}={target:g} cannot be reached by any student width "
            f"(closest {achieved:.1f}; the reachable ratios span {low:.1f} to {high:.1f})"
        )
    return best


def count_on_meta(build: Callable[[], nn.Module]) -> int:
    """Parameters of a module built on the meta device (no memory, no init cost, no RNG draw)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def width_for_ratio(
    compression_ratio: float,
    build_student: Callable[[float], nn.Module],
    tolerance: float = 0.25,
    min_width: float = 1e-3,
) -> float:
    """The width multiplier whose student is ``compression_ratio`` times smaller than at width 1.

    For a student family with a continuous width multiplier (``build_student(width)``,
    width 1 being the reference the ratio refers to). Student size grows monotonically
    with the width, so the multiplier is found by bisection in log space over
    ``[min_width, 1]`` (students counted on the meta device, :func:`count_on_meta`); of
    the two ends of the final bracket the closer one is kept (:func:`closest_to_ratio`).

    Raises:
        ConfigError: For a ratio that is not a number >= 1, or one that no width reaches
            within ``tolerance`` (relative).
    """
    compression_ratio = check_ratio(compression_ratio)
    full = count_on_meta(lambda: build_student(1.0))
    target = full / compression_ratio
    if compression_ratio == 1:
        return 1.0
    low, high = math.log(min_width), 0.0
    for _ in range(40):
        middle = (low + high) / 2
        width = math.exp(middle)
        if count_on_meta(lambda width=width: build_student(width)) > target:
            high = middle
        else:
            low = middle
    candidates = [math.exp(low), math.exp(high)]
    ratios = [full / count_on_meta(lambda w=w: build_student(w)) for w in candidates]
    return closest_to_ratio(
        compression_ratio,
        list(zip(candidates, ratios, strict=True)),
        tolerance,
        reachable=lambda: (1.0, full / count_on_meta(lambda: build_student(min_width))),
    )


def serialized_size_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: the size of the weights on disk.

    Includes buffers (BatchNorm statistics) and, for quantised models, the packed
    int8 weights with their scales; written to memory, not to a file.
    """
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# ------------------------------------------------------------------------------ int8


def quantize_int8_dynamic(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the ``nn.Linear`` layers (weights int8, activations
    quantised on the fly), via ``torch.ao.quantization.quantize_dynamic``.

    Convolutions are left in float: dynamic quantisation has no conv kernels; use
    :func:`quantize_int8_static` for conv nets. The input module is not changed;
    the result is a CPU model in eval mode.
    """
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(module).cpu().eval()
    engines = torch.backends.quantized.supported_engines
    with _quantized_engine("x86" if "x86" in engines else torch.backends.quantized.engine):
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _qconfig_mapping(backend: str, qat: bool, float_modules: Sequence[str]):
    """The default (QAT) qconfig mapping of ``backend`` with ``float_modules`` left in float."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    mapping = get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)
    for name in float_modules:
        mapping = mapping.set_module_name(name, None)
    return mapping


def _leaves(names: Sequence[str]):
    """FX prepare config that keeps the named submodules whole (not traced into)."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    return PrepareCustomConfig().set_non_traceable_module_names(list(names))


def _check_backend(function: str, backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"{function}: backend {backend!r} is not available here; supported: "
            f"{', '.join(torch.backends.quantized.supported_engines)}"
        )


def _check_float_modules(function: str, module: nn.Module, float_modules: Sequence[str]) -> None:
    names = dict(module.named_modules())
    missing = [name for name in float_modules if name not in names]
    if missing:
        raise ConfigError(f"{function}: float_modules {missing} are not submodules of {type(module).__name__}")


def _prepare(function: str, module: nn.Module, prepare: Callable[[], nn.Module]) -> nn.Module:
    try:
        return prepare()
    except Exception as error:  # torch.fx.proxy.TraceError and friends
        message = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"{function}: torch.fx cannot trace {type(module).__name__} ({type(error).__name__}: {message})"
        ) from None


def quantize_int8_static(
    module: nn.Module,
    calibration_batches: Iterable[ExampleInput],
    backend: str = "x86",
    float_modules: Sequence[str] = (),
    non_traceable: Sequence[str] = (),
) -> nn.Module:
    """Static post-training int8 quantisation (FX graph mode) for CPU inference.

    Follows PyTorch's FX graph mode PTQ recipe
    (https://pytorch.org/tutorials/prototype/fx_graph_mode_ptq_static.html):
    ``prepare_fx`` with ``get_default_qconfig_mapping(backend)`` (which fuses
    conv-bn-relu and inserts observers), a forward pass over every calibration
    batch under ``torch.no_grad()``, then ``convert_fx``. Weights are int8 per
    channel, activations uint8 per tensor.

    The model must be symbolically traceable by ``torch.fx`` (plain conv nets are;
    data-dependent Python control flow is not). The input module is not changed.

    Known limit: timm's ``tf_efficientnet_lite*`` (and every timm model with
    TF "SAME" padding) does not trace, because ``Conv2dSame`` computes its padding
    from the input size; that raises :class:`ConfigError`. Forcing it through
    (``Conv2dSame`` made static, timm's ``BatchNormAct2d`` split so that conv-BN
    folds) runs but, in a quick check with synthetic calibration images, left
    ~70 % relative RMS error in the lite0 features, so PyTorch's PTQ is not a
    ready answer for that backbone (QAT or another toolchain would be).

    Args:
        module: The float model.
        calibration_batches: Representative inputs (a few batches of real,
            normalised images), each a tensor or a sequence of positional tensors.
        backend: The quantised engine, ``"x86"`` (default) or ``"fbgemm"`` on x86
            CPUs, ``"qnnpack"`` on ARM.
        float_modules: Names of submodules left in float (for instance a
            one-output head, so that the score is not rounded to 256 levels).
        non_traceable: Names of submodules ``torch.fx`` does not trace into: kept
            whole (leaves of the graph) and in float, e.g. a frozen encoder with TF
            "SAME" padding or a preprocessing step with Python control flow.

    Returns:
        The quantised model (a ``torch.fx.GraphModule``) in eval mode, on the CPU;
        run it with ``torch.backends.quantized.engine`` set to ``backend``.

    Raises:
        ConfigError: No calibration batch, an unsupported backend, an unknown
            float module, or a model that ``torch.fx`` cannot trace.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _check_backend("quantize_int8_static", backend)
    float_modules = (*float_modules, *non_traceable)
    _check_float_modules("quantize_int8_static", module, float_modules)
    batches = iter(calibration_batches)
    first = next(batches, None)
    if first is None:
        raise ConfigError("quantize_int8_static: calibration_batches is empty")
    first_args = tuple(_cpu(arg) for arg in _as_args(first))

    model = copy.deepcopy(module).cpu().eval()
    with _quantized_engine(backend):
        mapping = _qconfig_mapping(backend, qat=False, float_modules=float_modules)
        prepared = _prepare("quantize_int8_static", module,
                            lambda: prepare_fx(model, mapping, example_inputs=first_args,
                                               prepare_custom_config=_leaves(non_traceable)))
        with torch.no_grad():
            prepared(*first_args)
            for batch in batches:
                prepared(*(_cpu(arg) for arg in _as_args(batch)))
        return convert_fx(prepared)


def quantize_int8_qat(
    module: nn.Module,
    train_batches: Sequence[tuple[ExampleInput, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int = 2,
    lr: float = 1e-4,
    backend: str = "x86",
    float_modules: Sequence[str] = (),
    non_traceable: Sequence[str] = (),
    freeze_observers_after: int | None = None,
    seed: int = 0,
    return_float: bool = False,
) -> nn.Module | tuple[nn.Module, nn.Module]:
    """Quantisation-aware training (FX graph mode), then conversion to int8 for the CPU.

    Follows PyTorch's FX QAT recipe: ``prepare_qat_fx`` with
    ``get_default_qat_qconfig_mapping(backend)`` inserts fake-quantise modules (int8
    per-channel weights, uint8 activations, the same numerics as
    :func:`quantize_int8_static`), the model is fine-tuned with ``loss_fn`` at a small
    learning rate (Adam) so that its weights adapt to the rounding, optionally with
    the observers frozen for the last epochs (``freeze_observers_after``; by default
    they keep tracking the moving-average ranges to the end: frozen too early, at a
    learning rate that still moves the weights, the activations leave the frozen
    ranges, clip, and the straight-through gradient vanishes), and ``convert_fx``
    produces the int8 model. The input module is not changed.

    Args:
        module: The trained float model (symbolically traceable by ``torch.fx``).
        train_batches: ``(inputs, targets)`` pairs, reused every epoch in a seeded
            random order; ``inputs`` a tensor or a sequence of positional tensors.
        loss_fn: ``loss_fn(outputs, targets)``: the model's own training loss.
        epochs: Passes over ``train_batches`` (>= 1).
        lr: Adam learning rate of the fine-tuning (a fraction of the training one).
        backend: The quantised engine (``"x86"``, ``"fbgemm"``, ``"qnnpack"``).
        float_modules: Names of submodules left in float (e.g. a one-output head,
            so the score is not rounded to 256 levels).
        non_traceable: Names of submodules not traced by ``torch.fx``, kept whole and
            in float (see :func:`quantize_int8_static`).
        freeze_observers_after: Epochs after which observers stop updating
            (default: never, they update in every epoch).
        seed: Seed of the batch order.
        return_float: Also return the *float twin*: the fine-tuned weights with fake
            quantisation switched off, i.e. the same network in fp32. Comparing the
            two isolates the cost of int8 from the effect of the fine-tuning itself.

    Returns:
        The int8 model (a ``torch.fx.GraphModule``) in eval mode, on the CPU; with
        ``return_float``, ``(int8_model, float_twin)``.

    Raises:
        ConfigError: No batch, ``epochs < 1``, an unsupported backend, an unknown
            float module, or a model that ``torch.fx`` cannot trace.
    """
    from torch.ao.quantization import disable_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    _check_backend("quantize_int8_qat", backend)
    float_modules = (*float_modules, *non_traceable)
    _check_float_modules("quantize_int8_qat", module, float_modules)
    if not train_batches:
        raise ConfigError("quantize_int8_qat: train_batches is empty")
    if epochs < 1:
        raise ConfigError(f"quantize_int8_qat: epochs must be >= 1, got {epochs}")
    if freeze_observers_after is None:
        freeze_observers_after = epochs
    first_args = tuple(_cpu(arg) for arg in _as_args(train_batches[0][0]))
    model = copy.deepcopy(module).cpu().train()
    generator = torch.Generator().manual_seed(seed)
    with _quantized_engine(backend):
        mapping = _qconfig_mapping(backend, qat=True, float_modules=float_modules)
        prepared = _prepare("quantize_int8_qat", module,
                            lambda: prepare_qat_fx(model, mapping, example_inputs=first_args,
                                                   prepare_custom_config=_leaves(non_traceable)))
        optimizer = torch.optim.Adam(prepared.parameters(), lr=lr)
        for epoch in range(epochs):
            if epoch == freeze_observers_after:
                prepared.apply(disable_observer)
            prepared.train()
            for index in torch.randperm(len(train_batches), generator=generator).tolist():
                inputs, targets = train_batches[index]
                loss = loss_fn(prepared(*(_cpu(arg) for arg in _as_args(inputs))), targets.cpu())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        prepared.eval()
        float_twin = None
        if return_float:
            from torch.ao.quantization import disable_fake_quant

            float_twin = copy.deepcopy(prepared)
            float_twin.apply(disable_fake_quant)
            float_twin.apply(disable_observer)
        quantised = convert_fx(prepared)
    return (quantised, float_twin) if return_float else quantised


def _cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


@contextmanager
def _quantized_engine(backend: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


# ------------------------------------------------------------------------------ ONNX


def export_onnx(
    module: nn.Module,
    example_input: ExampleInput,
    path: str | os.PathLike[str],
    dynamic_batch: bool = True,
    opset_version: int = 17,
) -> Path:
    """Export ``module`` (in eval mode) to an ONNX file.

    Uses the TorchScript-based exporter (``dynamo=False``; see the module
    docstring). Inputs are named ``input_0, input_1, ...`` and outputs
    ``output_0, ...`` (a model returning a list or tuple of tensors has one ONNX
    output per tensor). The module's train/eval modes are restored afterwards.

    Args:
        module: The model (float; a CPU copy is not made, so pass a CPU model).
        example_input: A tensor or sequence of positional tensors used for tracing.
        path: Destination ``.onnx`` file; parent folders are created.
        dynamic_batch: Make dimension 0 of every input and output dynamic.
        opset_version: ONNX opset.

    Returns:
        The path written.
    """
    args = _as_args(example_input)
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(module), torch.no_grad():
        outputs = _flatten_outputs(module(*args))
        input_names = [f"input_{index}" for index in range(len(args))]
        output_names = [f"output_{index}" for index in range(len(outputs))]
        dynamic_axes = (
            {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings(
                "ignore",
                message=".*legacy TorchScript-based ONNX export.*",
                category=DeprecationWarning,
            )
            torch.onnx.export(
                module,
                args,
                str(destination),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset_version,
                dynamo=False,
            )
    return destination


def _flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [tensor for value in outputs.values() for tensor in _flatten_outputs(value)]
    if isinstance(outputs, (list, tuple)):
        return [tensor for value in outputs for tensor in _flatten_outputs(value)]
    raise ConfigError(f"cannot compare model outputs of type {type(outputs).__name__}")


def onnx_parity(
    module: nn.Module, path: str | os.PathLike[str], example_input: ExampleInput
) -> float:
    """Largest absolute difference between ``module`` and its ONNX export.

    Runs the PyTorch model (eval mode, no grad, modes restored) and the ONNX file
    (onnxruntime, CPU execution provider) on ``example_input`` and compares every
    output element.

    Returns:
        ``max |torch - onnxruntime|`` over all outputs (float32 exports of small
        conv nets reach ~1e-6).
    """
    import onnxruntime

    args = _as_args(example_input)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        graph_input.name: arg.detach().cpu().numpy()
        for graph_input, arg in zip(session.get_inputs(), args, strict=True)
    }
    onnx_outputs = session.run(None, feeds)
    with _eval_mode(module), torch.no_grad():
        torch_outputs = _flatten_outputs(module(*args))
    if len(onnx_outputs) != len(torch_outputs):
        raise ConfigError(
            f"onnx_parity: {path} has {len(onnx_outputs)} outputs, the model {len(torch_outputs)}"
        )
    difference = 0.0
    for ours, theirs in zip(torch_outputs, onnx_outputs, strict=True):
        reference = ours.detach().cpu().double()
        exported = torch.from_numpy(theirs).double()
        if reference.shape != exported.shape:
            raise ConfigError(
                f"onnx_parity: output shapes differ: torch {tuple(reference.shape)}, "
                f"ONNX {tuple(exported.shape)}"
            )
        if reference.numel():
            difference = max(difference, (reference - exported).abs().max().item())
    return difference


# --------------------------------------------------------------------------- latency


def measure_latency(
    fn_or_module: Callable[..., Any],
    example_input: ExampleInput,
    repeats: int = 50,
    warmup: int = 5,
) -> float:
    """Median wall-clock seconds of one call, for benchmarks (never assert on it).

    Runs under ``torch.inference_mode()``; a module is put in eval mode (restored
    afterwards). CUDA work is synchronised before each clock read, so a GPU
    model's time is its real time, not its launch time.

    Args:
        fn_or_module: A module or any callable taking ``*example_input``.
        example_input: A tensor or sequence of positional tensors.
        repeats: Timed calls (>= 1).
        warmup: Untimed calls first (cuDNN autotuning, allocator, lazy init).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(
            f"measure_latency: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}"
        )
    args = _as_args(example_input)
    uses_cuda = any(isinstance(arg, torch.Tensor) and arg.is_cuda for arg in args)

    def synchronize() -> None:
        if uses_cuda:
            torch.cuda.synchronize()

    mode = _eval_mode(fn_or_module) if isinstance(fn_or_module, nn.Module) else _nothing()
    times = []
    with mode, torch.inference_mode():
        for _ in range(warmup):
            fn_or_module(*args)
        synchronize()
        for _ in range(repeats):
            start = time.perf_counter()
            fn_or_module(*args)
            synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
