"""Tests of kd_experiments.compression: counts against hand values, int8, ONNX."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_experiments.compression import (
    check_ratio,
    closest_to_ratio,
    compression_ratio,
    count_macs,
    count_parameters,
    export_onnx,
    measure_latency,
    onnx_parity,
    quantize_int8_dynamic,
    quantize_int8_qat,
    quantize_int8_static,
    serialized_size_bytes,
    width_for_ratio,
)
from kd_experiments.errors import ConfigError


class TinyNet(nn.Module):
    """conv 3->8 k3 (216 + 8), BN(8) (8 + 8), linear 8->4 (32 + 4): 276 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.bn(self.conv(images)))
        return self.head(features.mean(dim=(2, 3)))


class TinyConvNet(nn.Module):
    """A small fully convolutional net returning two feature maps (like a backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stem = self.stem(images)
        return [stem, self.out(self.down(stem))]


def _trained_bn(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that eval-mode outputs are not an identity."""
    generator = torch.Generator().manual_seed(0)
    for submodule in module.modules():
        if isinstance(submodule, nn.BatchNorm2d):
            submodule.running_mean.uniform_(-0.5, 0.5, generator=generator)
            submodule.running_var.uniform_(0.5, 2.0, generator=generator)
    return module.eval()


# ---------------------------------------------------------------------------- counts


def test_count_parameters_hand_values() -> None:
    net = TinyNet()
    assert count_parameters(net) == 216 + 8 + 8 + 8 + 32 + 4
    net.conv.requires_grad_(False)
    assert count_parameters(net) == 276
    assert count_parameters(net, trainable_only=True) == 276 - 224


def test_count_parameters_counts_shared_weights_once() -> None:
    shared = nn.Linear(5, 5)
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 30


def test_count_macs_linear() -> None:
    assert count_macs(nn.Linear(10, 20), torch.randn(1, 10)) == 200
    assert count_macs(nn.Linear(10, 20), torch.randn(3, 10)) == 600


def test_count_macs_conv() -> None:
    # Output 8 x 8 positions x 8 output channels x (3 input channels x 3 x 3) each.
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 8, 8)) == 64 * 8 * 27
    # Strided, grouped: 4 x 4 positions x 8 channels x (4 / 2 groups x 3 x 3).
    grouped = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    assert count_macs(grouped, torch.randn(1, 4, 8, 8)) == 16 * 8 * 2 * 9


def test_count_macs_whole_net_and_modes_restored() -> None:
    net = TinyNet().train()
    net.bn.eval()  # a deliberate mixture that must survive
    assert count_macs(net, torch.randn(1, 3, 8, 8)) == 64 * 8 * 27 + 8 * 4
    assert net.training and net.conv.training and not net.bn.training
    assert torch.is_grad_enabled()


def test_compression_ratio() -> None:
    teacher = nn.Linear(100, 100)  # 10 100 parameters
    student = nn.Linear(100, 25)  # 2 525 parameters
    assert compression_ratio(teacher, student) == pytest.approx(4.0)
    assert compression_ratio(10_100, student) == pytest.approx(4.0)
    assert compression_ratio(300, 100) == 3.0
    with pytest.raises(ConfigError, match="0 parameters"):
        compression_ratio(teacher, 0)
    with pytest.raises(ConfigError, match="0 parameters"):
        compression_ratio(teacher, nn.ReLU())
    with pytest.raises(ConfigError, match="count >= 0"):
        compression_ratio(-5, 1)


def test_serialized_size_bytes() -> None:
    layer = nn.Linear(500, 500)
    size = serialized_size_bytes(layer)
    raw = (500 * 500 + 500) * 4
    assert raw < size < raw + 4096  # the float32 payload plus a small zip header
    quantized = quantize_int8_dynamic(nn.Sequential(layer))
    assert serialized_size_bytes(quantized) < size / 3


# ------------------------------------------------------------------------------ int8


def test_quantize_int8_dynamic_converts_linear_layers() -> None:
    net = TinyNet().eval()
    quantized = quantize_int8_dynamic(net)
    assert isinstance(quantized.head, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(net.head, nn.Linear) and not isinstance(
        net.head, torch.ao.nn.quantized.dynamic.Linear
    )  # the input is not modified
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(quantized(images), net(images), atol=0.05, rtol=0)


def test_quantize_int8_static_runs_and_stays_close() -> None:
    torch.manual_seed(0)
    net = _trained_bn(TinyConvNet())
    calibration = [torch.randn(4, 3, 16, 16) for _ in range(8)]
    quantized = quantize_int8_static(net, calibration)

    quantized_types = {type(module).__module__ for module in quantized.modules()}
    assert any(name.startswith("torch.ao.nn.intrinsic.quantized") for name in quantized_types)
    assert isinstance(net.stem[0], nn.Conv2d)  # the input is not modified
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for reference, output in zip(net(images), quantized(images), strict=True):
            assert output.shape == reference.shape
            relative_rms = (output - reference).pow(2).mean().sqrt() / reference.pow(
                2
            ).mean().sqrt()
            assert relative_rms < 0.1
    assert serialized_size_bytes(quantized) < serialized_size_bytes(net)


def test_quantize_int8_static_errors() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.conv(images) if images.sum() > 0 else images

    with pytest.raises(ConfigError, match=r"torch\.fx cannot trace DataDependent"):
        quantize_int8_static(DataDependent(), [torch.randn(1, 3, 4, 4)])
    with pytest.raises(ConfigError, match="calibration_batches is empty"):
        quantize_int8_static(TinyConvNet(), [])
    with pytest.raises(ConfigError, match="backend 'tpu' is not available"):
        quantize_int8_static(TinyConvNet(), [torch.randn(1, 3, 4, 4)], backend="tpu")


class TinyRegressor(nn.Module):
    """conv -> LeakyReLU -> pool -> linear head: a score-regression student in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


def _regression_batches(count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        images = torch.rand(16, 1, 8, 8, generator=generator)
        batches.append((images, images.mean(dim=(1, 2, 3)) * 3.0))
    return batches


def test_quantize_int8_qat_converts_keeps_float_modules_and_returns_a_twin() -> None:
    torch.manual_seed(0)
    net = TinyRegressor()
    batches = _regression_batches()
    before = [parameter.clone() for parameter in net.parameters()]
    quantised, twin = quantize_int8_qat(net, batches, nn.functional.l1_loss, epochs=2, lr=1e-2,
                                        float_modules=["head"], return_float=True)
    for parameter, original in zip(net.parameters(), before, strict=True):  # the input is not modified
        assert torch.equal(parameter, original)
    kinds = {type(module).__module__ for module in quantised.modules()}
    assert any(kind.startswith("torch.ao.nn.quantized") for kind in kinds)
    assert isinstance(quantised.head, nn.Linear)  # left in float, as asked
    images, targets = batches[0]
    with torch.no_grad():
        int8, float_ = quantised(images), twin(images)
    assert int8.shape == float_.shape == targets.shape
    # the twin runs the fine-tuned weights without fake quantisation: close to int8, not equal
    assert (int8 - float_).abs().max() < 0.1 * targets.abs().max()
    assert not torch.equal(int8, float_)
    # fine-tuning moved the weights away from the input model's
    with torch.no_grad():
        assert not torch.allclose(twin(images), net(images))


def test_quantize_int8_qat_fine_tuning_lowers_the_loss() -> None:
    torch.manual_seed(0)
    net = TinyRegressor()
    batches = _regression_batches()

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(nn.functional.l1_loss(model(x), y)) for x, y in batches) / len(batches)

    quantised = quantize_int8_qat(net, batches, nn.functional.l1_loss, epochs=10, lr=1e-2)
    assert loss(quantised) < 0.75 * loss(net)  # the int8 model learnt: no-op training would stay at 1x


def test_quantize_int8_qat_errors() -> None:
    batches = _regression_batches(1)
    with pytest.raises(ConfigError, match="train_batches is empty"):
        quantize_int8_qat(TinyRegressor(), [], nn.functional.l1_loss)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        quantize_int8_qat(TinyRegressor(), batches, nn.functional.l1_loss, epochs=0)
    with pytest.raises(ConfigError, match=r"float_modules \['tail'\] are not submodules"):
        quantize_int8_qat(TinyRegressor(), batches, nn.functional.l1_loss, float_modules=["tail"])
    with pytest.raises(ConfigError, match="backend 'tpu' is not available"):
        quantize_int8_qat(TinyRegressor(), batches, nn.functional.l1_loss, backend="tpu")


# ------------------------------------------------------------------------------ ONNX


def test_onnx_export_and_parity_with_dynamic_batch(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = _trained_bn(TinyConvNet())
    path = export_onnx(net, torch.randn(2, 3, 16, 16), tmp_path / "sub" / "tiny.onnx")
    assert path.is_file()
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    assert [output.name for output in graph.output] == ["output_0", "output_1"]
    # Another batch size than the one exported with: the batch dimension is dynamic.
    difference = onnx_parity(net, path, torch.randn(5, 3, 16, 16))
    assert difference < 1e-5


def test_onnx_parity_detects_a_different_model(tmp_path) -> None:
    torch.manual_seed(0)
    net = _trained_bn(TinyConvNet())
    path = export_onnx(net, torch.randn(1, 3, 16, 16), tmp_path / "tiny.onnx")
    with torch.no_grad():
        net.out.bias.add_(1.0)
    assert onnx_parity(net, path, torch.randn(1, 3, 16, 16)) == pytest.approx(1.0, abs=1e-4)


def test_onnx_export_restores_training_mode(tmp_path) -> None:
    net = TinyConvNet().train()
    export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "tiny.onnx", dynamic_batch=False)
    assert all(module.training for module in net.modules())


# --------------------------------------------------------------------------- latency


def test_measure_latency_returns_seconds_and_restores_mode() -> None:
    net = TinyNet().train()
    seconds = measure_latency(net, torch.randn(1, 3, 8, 8), repeats=3, warmup=1)
    assert seconds > 0.0  # a value, never a timing assertion
    assert net.training
    calls = []
    measure_latency(
        lambda images: calls.append(images.shape), torch.randn(2, 3), repeats=2, warmup=1
    )
    assert len(calls) == 3
    with pytest.raises(ConfigError, match="repeats >= 1"):
        measure_latency(net, torch.randn(1, 3, 8, 8), repeats=0)


# ------------------------------------------------------------------ a student for a ratio


@pytest.mark.parametrize("value", [0.5, 0, -2, float("nan"), float("inf"), "8", None])
def test_check_ratio_refuses_what_is_not_a_number_at_least_one(value) -> None:
    with pytest.raises(ConfigError, match=r"scheme.mac_compression_ratio must be a number >= 1"):
        check_ratio(value, "mac_compression_ratio")
    assert check_ratio(8) == 8.0 and isinstance(check_ratio(8), float)


def test_closest_to_ratio_picks_in_log_space_and_names_the_reachable_span() -> None:
    candidates = [("a", 2.0), ("b", 7.0), ("c", 30.0)]
    assert closest_to_ratio(8, candidates) == "b"  # |log 7/8| < |log 30/8|
    assert closest_to_ratio(14, candidates, tolerance=1.5) == "b"  # 14/7 = 2 < 30/14 = 2.14
    with pytest.raises(ConfigError, match=r"compression_ratio=4 cannot be reached .*closest 7.0.* 2.0 to 30.0"):
        closest_to_ratio(4, candidates)  # 7 is the closest, 1.75x off


def test_width_for_ratio_finds_a_width_of_a_linear_family() -> None:
    def build(width: float) -> nn.Module:
        return nn.Linear(64, max(1, round(256 * width)), bias=False)  # params = 64 * round(256 w)

    width = width_for_ratio(16, build)
    assert round(256 * width) == 16
    assert width_for_ratio(1, build) == 1.0
    with pytest.raises(ConfigError, match="cannot be reached"):
        width_for_ratio(1000, build)  # the smallest member is 256x smaller
