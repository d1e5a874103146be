"""Reverse distillation and RD with Expert: networks, maps, losses, switches, runs (DDP: RD with
Expert on two torchrun nodes, tests/test_distributed_ddp.py)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_experiments.anomaly_maps import anomaly_map, gaussian_blur, image_scores
from kd_experiments.compression import count_on_meta, width_for_ratio
from kd_experiments.errors import ConfigError
from kd_experiments.schemes.reverse_distillation import ReverseDistillationScheme
from kd_experiments.schemes.reverse_distillation import loss as rd_loss
from kd_experiments.schemes.reverse_distillation.lightning_model import defect_type_of
from kd_experiments.synthetic_anomalies import (
    SyntheticAnomalies,
    otsu_threshold,
    perlin_noise,
)
from kd_experiments.schemes.reverse_distillation.torch_model import BottleneckBlock, ReverseStudent
from kd_experiments.train import train
from tests.conftest import fast_overrides

LITE0_CHANNELS = [24, 40, 112]
SIZE = 32  # lite0 levels at 8x8, 4x4, 2x2: the smallest useful input
SWITCHES = ("expert", "skip_fusion", "guided_injection", "synthetic_anomalies")
TINY_DATA = ("data.image_size=32", "data.n_train=12", "data.n_test_good=4", "data.n_test_defect_per_type=2",
             "data.batch_size=4")


def _features(batch: int = 2, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(LITE0_CHANNELS, (4, 8, 16), strict=True)]


def _scheme(**overrides) -> ReverseDistillationScheme:
    model = ReverseDistillationScheme((3, SIZE, SIZE), **overrides)
    model.log = lambda *args, **kwargs: None  # no trainer attached
    return model


# -- networks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("skip_fusion", "guided_injection"), [(False, False), (True, False), (True, True)])
def test_student_reproduces_every_teacher_shape(skip_fusion: bool, guided_injection: bool) -> None:
    student = ReverseStudent(LITE0_CHANNELS, 0.25, skip_fusion=skip_fusion, guided_injection=guided_injection)
    teacher = _features()
    outputs = student(teacher)
    assert [o.shape for o in outputs] == [t.shape for t in teacher]
    assert len(student.fusions) == (2 if skip_fusion else 0)
    assert hasattr(student.fusions[0], "inject") == guided_injection if skip_fusion else True


def test_guided_injection_needs_skip_fusion() -> None:
    with pytest.raises(ConfigError, match="skip_fusion"):
        ReverseStudent(LITE0_CHANNELS, 1.0, skip_fusion=False, guided_injection=True)


def test_odd_feature_sizes_are_handled() -> None:
    student = ReverseStudent(LITE0_CHANNELS, 0.1)
    teacher = [torch.randn(2, 24, 13, 13), torch.randn(2, 40, 7, 7), torch.randn(2, 112, 4, 4)]
    assert [o.shape for o in student(teacher)] == [t.shape for t in teacher]


def test_transposed_decoder_is_rd4ad_shaped_and_handles_odd_sizes() -> None:
    # decoder_blocks=2 at width 0.5: an up-sampling block (transposed convs on both paths)
    # then one residual block per stage, decoder widths equal to the encoder's channels.
    student = ReverseStudent(LITE0_CHANNELS, 0.5, decoder_blocks=2, decoder_upsampling="transposed")
    for stage, channels in zip(student.stages, reversed(LITE0_CHANNELS), strict=True):
        transposed = [m for m in stage.entry.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        assert [(m.kernel_size, m.stride, m.out_channels) for m in transposed] == [((2, 2), (2, 2), channels)] * 2
        assert len(stage.blocks) == 1
    assert [o.shape for o in student(_features())] == [t.shape for t in _features()]
    teacher = [torch.randn(2, 24, 13, 13), torch.randn(2, 40, 7, 7), torch.randn(2, 112, 4, 4)]
    assert [o.shape for o in student(teacher)] == [t.shape for t in teacher]
    bilinear = ReverseStudent(LITE0_CHANNELS, 0.5, decoder_blocks=2)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in bilinear.modules())
    with pytest.raises(ConfigError, match="decoder_upsampling"):
        ReverseStudent(LITE0_CHANNELS, 0.5, decoder_upsampling="nearest")


def test_rd4ad_mirror_compares_block_outputs_and_uses_resnet_init() -> None:
    # decoder_expansion=1, no projection: decoder widths = encoder channels, outputs are
    # the residual blocks' post-ReLU features, as in RD4AD's de_resnet.
    torch.manual_seed(0)
    student = ReverseStudent(LITE0_CHANNELS, 1.0, decoder_blocks=2, decoder_upsampling="transposed",
                             decoder_expansion=1.0, decoder_projection=False, init="resnet")
    assert all(isinstance(stage.project, torch.nn.Identity) for stage in student.stages)
    outputs = student(_features())
    assert [o.shape for o in outputs] == [t.shape for t in _features()]
    assert all(bool((o >= 0).all()) for o in outputs)
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.15)
    with pytest.raises(ConfigError, match="decoder_projection"):
        ReverseStudent(LITE0_CHANNELS, 1.0, decoder_projection=False)  # widths 2 x C_i
    with pytest.raises(ConfigError, match="init"):
        ReverseStudent(LITE0_CHANNELS, 1.0, init="xavier")


RESNET50_CHANNELS = [256, 512, 1024]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("backbone", "base_width"), [("resnet50", 64), ("wide_resnet50_2", 128)])
def test_bottleneck_student_has_anomalibs_rd4ad_architecture(backbone: str, base_width: int) -> None:
    # RD4AD for ResNet-50 encoders: OCBE of three bottleneck blocks, decoder of
    # de-convolutional bottleneck blocks, 3/4/6 per stage from the deepest. Compared with
    # anomalib's ReverseDistillationModel, built here (no weights) module by module.
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    reference = ReverseDistillationModel(
        backbone=backbone, input_size=(64, 64), layers=["layer1", "layer2", "layer3"],
        anomaly_map_mode=AnomalyMapGenerationMode.ADD, pre_trained=False,
    )
    with torch.device("meta"):
        ours = ReverseStudent(RESNET50_CHANNELS, 1.0, bottleneck_blocks=3, decoder_blocks=[6, 4, 3],
                              decoder_upsampling="transposed", decoder_expansion=1.0, decoder_projection=False,
                              init="resnet", block="bottleneck", block_base_width=base_width)
        oc_64 = ReverseStudent(RESNET50_CHANNELS, 1.0, bottleneck_blocks=3, decoder_blocks=[6, 4, 3],
                               decoder_upsampling="transposed", decoder_expansion=1.0, decoder_projection=False,
                               block="bottleneck", block_base_width=64).bottleneck
    assert _count(ours.stages) == _count(reference.decoder)
    # anomalib's OCBE always uses width 64 (RD4AD's code passes 128 for the wide model) and
    # holds a conv4/bn4 that its forward never calls.
    unused = _count(reference.bottleneck.conv4) + _count(reference.bottleneck.bn4)
    assert _count(oc_64) == _count(reference.bottleneck) - unused
    if base_width == 128:
        assert _count(ours.bottleneck) > _count(oc_64)


def test_bottleneck_student_shapes_blocks_and_errors() -> None:
    student = ReverseStudent(RESNET50_CHANNELS, 0.25, bottleneck_blocks=3, decoder_blocks=[3, 2, 1],
                             decoder_upsampling="transposed", decoder_expansion=1.0, block="bottleneck")
    teacher = [torch.randn(2, 256, 16, 16), torch.randn(2, 512, 8, 8), torch.randn(2, 1024, 4, 4)]
    assert [o.shape for o in student(teacher)] == [t.shape for t in teacher]
    # stages run deepest first; the counts are per level, shallowest first
    assert [1 + len(stage.blocks) for stage in student.stages] == [1, 2, 3]
    assert isinstance(student.stages[0].entry, BottleneckBlock)
    assert len(student.bottleneck.embedding) == 3
    odd = [torch.randn(1, 256, 13, 13), torch.randn(1, 512, 7, 7), torch.randn(1, 1024, 4, 4)]
    assert [o.shape for o in student(odd)] == [t.shape for t in odd]
    with pytest.raises(ConfigError, match="scheme.block "):
        ReverseStudent(RESNET50_CHANNELS, 1.0, block="inverted")
    with pytest.raises(ConfigError, match="block_base_width"):
        ReverseStudent(RESNET50_CHANNELS, 1.0, block="bottleneck", block_base_width=0)
    with pytest.raises(ConfigError, match="decoder_blocks"):
        ReverseStudent(RESNET50_CHANNELS, 1.0, decoder_blocks=[2, 2])


@pytest.mark.parametrize("ratio", [4, 64])
def test_width_search_reaches_the_ratio_with_bottleneck_blocks(ratio: int) -> None:
    def build(width: float) -> ReverseStudent:
        return ReverseStudent(RESNET50_CHANNELS, width, bottleneck_blocks=3, decoder_blocks=[6, 4, 3],
                              decoder_upsampling="transposed", block="bottleneck", block_base_width=128)

    width = width_for_ratio(ratio, build)
    measured = count_on_meta(lambda: build(1.0)) / count_on_meta(lambda: build(width))
    assert ratio / 1.25 <= measured <= ratio * 1.25


def test_papers_experiment_builds_rd4ads_student(compose_cfg) -> None:
    cfg = compose_cfg("experiment=rd_paper_bottle", "scheme.weights=none")
    assert cfg.trainer.accelerator == "gpu" and cfg.data.image_size == 256 and cfg.data.batch_size == 16
    from kd_experiments import config as kd_config

    scheme = kd_config.instantiate(cfg.scheme, input_shape=(3, 64, 64))
    assert scheme.student.block == "bottleneck"
    assert [1 + len(stage.blocks) for stage in scheme.student.stages] == [3, 4, 6]


@pytest.mark.parametrize("ratio", [4, 16, 64])
def test_width_search_reaches_the_ratio(ratio: int) -> None:
    def build(width: float) -> ReverseStudent:
        return ReverseStudent(LITE0_CHANNELS, width)

    width = width_for_ratio(ratio, build)
    measured = count_on_meta(lambda: build(1.0)) / count_on_meta(lambda: build(width))
    assert ratio / 1.25 <= measured <= ratio * 1.25
    assert width < 1


def test_min_channels_floors_every_width_and_leaves_full_width_alone() -> None:
    full, full_floored = ReverseStudent(LITE0_CHANNELS, 1.0), ReverseStudent(LITE0_CHANNELS, 1.0, min_channels=8)
    assert full.widths == full_floored.widths  # every full-width base is above 8
    assert count_on_meta(lambda: ReverseStudent(LITE0_CHANNELS, 1.0)) == count_on_meta(
        lambda: ReverseStudent(LITE0_CHANNELS, 1.0, min_channels=8))

    def build(floor: int):
        return lambda width: ReverseStudent(LITE0_CHANNELS, width, skip_fusion=True, min_channels=floor)

    plain, floored = width_for_ratio(64, build(2)), width_for_ratio(64, build(8))
    plain_widths, floored_widths = build(2)(plain).widths, build(8)(floored).widths
    assert min(plain_widths.decoder + plain_widths.skip) < 8
    assert min(floored_widths.decoder + floored_widths.skip + (floored_widths.fusion, floored_widths.embedding)) >= 8
    assert floored < plain  # the floor is paid for by the wide parts
    measured = count_on_meta(lambda: build(8)(1.0)) / count_on_meta(lambda: build(8)(floored))
    assert 64 / 1.25 <= measured <= 64 * 1.25
    student = build(8)(floored)
    outputs = student(_features())
    assert [tuple(o.shape) for o in outputs] == [tuple(f.shape) for f in _features()]
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="min_channels"):
            ReverseStudent(LITE0_CHANNELS, 0.5, min_channels=bad)
    assert _scheme(compression_ratio=64, min_channels=8).compression_summary()["min_channels"] == 8


@pytest.mark.parametrize(("ratio", "message"), [(0.5, ">= 1"), (1e7, "cannot be reached"), (float("nan"), ">= 1")])
def test_bad_ratios_raise_one_config_error(ratio: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        width_for_ratio(ratio, lambda width: ReverseStudent(LITE0_CHANNELS, width))
    assert "\n" not in str(raised.value)


# -- maps ---------------------------------------------------------------------------------------
def test_anomaly_map_is_at_input_resolution_and_zero_for_a_perfect_student() -> None:
    teacher = _features(batch=3)
    maps = anomaly_map(teacher, teacher, (SIZE, SIZE))
    assert maps.shape == (3, SIZE, SIZE)
    assert maps.abs().max() < 1e-5
    noisy = anomaly_map([t + torch.randn_like(t) for t in teacher], teacher, (SIZE, SIZE))
    assert noisy.min() > 0
    assert torch.equal(image_scores(noisy), noisy.flatten(1).amax(1))


def test_gaussian_blur_keeps_constants_and_spreads_a_peak() -> None:
    constant = torch.full((1, 1, 40, 40), 2.5)
    assert torch.allclose(gaussian_blur(constant, 4.0), constant, atol=1e-5)
    peak = torch.zeros(1, 1, 41, 41)
    peak[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(peak, 4.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 0, 20, 20] < 0.02 and blurred[0, 0, 20, 24] > 0


# -- losses and synthetic anomalies --------------------------------------------------------------------
def test_losses_vanish_on_identical_features_and_follow_the_mask() -> None:
    features = _features()
    assert rd_loss.distillation_loss(features, features) == pytest.approx(0.0, abs=1e-5)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    assert rd_loss.teacher_loss(features, features, features, features, mask) == pytest.approx(0.0, abs=1e-5)
    mask[:, :, :16, :16] = 1  # the teacher matches the expert everywhere: the mask is missed
    assert rd_loss.anomaly_separation_loss(features, features, mask) > 0.5


def test_synthetic_anomalies_change_only_the_masked_pixels() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = (torch.rand(6, 3, 48, 48) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    first, masks = SyntheticAnomalies(mean, std, seed=3)(images)
    again, masks_again = SyntheticAnomalies(mean, std, seed=3)(images)
    assert torch.equal(first, again) and torch.equal(masks, masks_again)  # seeded
    assert masks.shape == (6, 1, 48, 48) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all()
    outside = (masks == 0).expand_as(images)
    assert torch.allclose(first[outside], images[outside], atol=1e-5)
    assert (first - images).abs()[~outside].mean() > 0.05
    for source in ("procedural", "in_set"):
        changed, _ = SyntheticAnomalies(mean, std, texture_source=source)(images)
        assert changed.shape == images.shape and torch.isfinite(changed).all()
    with pytest.raises(ConfigError, match="texture_source"):
        SyntheticAnomalies(mean, std, texture_source="dtd")


def test_synthetic_anomalies_fall_on_the_foreground_when_asked() -> None:
    """URD's rule for an object on a plain background: masks only on the pixels darker than the
    image's Otsu threshold (a dark disc on a bright, noisy ground here); bright: the ground only."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (((ys - 32) ** 2 + (xs - 28) ** 2) < 15**2).float()
    pixels = (0.85 - 0.6 * disc + 0.05 * torch.rand(4, 1, 64, 64)).clamp(0, 1).expand(4, 3, 64, 64)
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert 0.3 < otsu_threshold(pixels[0].mean(0)) < 0.75
    _, anywhere = SyntheticAnomalies(mean, std, seed=1)(images)
    _, on_object = SyntheticAnomalies(mean, std, seed=1, foreground="dark")(images)
    _, on_ground = SyntheticAnomalies(mean, std, seed=1, foreground="bright")(images)
    assert (anywhere * (1 - disc)).sum() > 0  # without the rule masks also cover the ground
    assert (on_object.flatten(1).sum(1) > 0).all() and (on_object * (1 - disc)).sum() == 0
    assert (on_ground * disc).sum() == 0 and on_ground.sum() > 0
    with pytest.raises(ConfigError, match="synthetic_foreground"):
        SyntheticAnomalies(mean, std, foreground="grabcut")
    scheme = _scheme(expert=True, synthetic_anomalies=True, synthetic_foreground="dark")
    assert scheme.anomalies.foreground == "dark" and scheme.val_anomalies.foreground == "dark"
    with pytest.raises(ConfigError, match="synthetic_foreground"):
        _scheme(synthetic_foreground="otsu")


def test_rd_expert_mvtec_draws_anomalies_where_urd_does_per_category(tmp_path) -> None:
    from kd_experiments.search import compose_config

    def rule(*overrides: str) -> str:
        return str(compose_config(list(overrides), output_dir=tmp_path).scheme.synthetic_foreground)

    assert rule("experiment=rd_expert_mvtec", "data.category=screw") == "dark"
    assert rule("experiment=rd_expert_mvtec", "data.category=transistor") == "none"
    assert rule("experiment=rd_expert_mvtec", "data.category=screw", "scheme.synthetic_foreground=none") == "none"
    assert rule("experiment=rd_mvtec", "data.category=screw") == "none"  # RD draws no anomalies to place


def test_perlin_noise_is_smooth_and_bounded() -> None:
    noise = perlin_noise(64, 64, (4, 4), torch.Generator().manual_seed(0))
    assert noise.shape == (64, 64) and noise.abs().max() <= 1.5
    assert (noise[1:] - noise[:-1]).abs().max() < 0.3  # neighbours are close: smooth


# -- the scheme: training step, switches, summary ------------------------------------------------------------
@pytest.mark.parametrize(
    "switches",
    [{}, {"expert": True, "skip_fusion": True, "guided_injection": True, "synthetic_anomalies": True},
     {"expert": True}, {"synthetic_anomalies": True}, {"skip_fusion": True},
     {"decoder_upsampling": "transposed", "decoder_blocks": 2}],
    ids=["rd", "rd_expert", "expert-only", "anomalies-only", "skip-only", "transposed-decoder"],
)
def test_training_step_trains_exactly_the_right_parameters(switches: dict) -> None:
    torch.manual_seed(0)
    model = _scheme(compression_ratio=16, **switches)
    model.train()
    optimizer = model.configure_optimizers()
    batch = {"image": torch.randn(4, 3, SIZE, SIZE)}
    loss = model.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.student.parameters())
    encoder_grads = [p.grad is not None for p in model.encoder.parameters()]
    assert all(encoder_grads) if switches.get("expert") else not any(encoder_grads)
    if model.expert is not None:
        assert not any(p.requires_grad or p.grad is not None for p in model.expert.parameters())
    before = [p.detach().clone() for p in model.student.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters(), strict=True))
    assert model.scheme_name == ("rd_expert" if switches.get("expert") else "reverse_distillation")
    assert (model.anomalies is not None) == switches.get("synthetic_anomalies", False)


def test_score_batch_gives_scores_and_maps_at_input_resolution() -> None:
    model = _scheme(width_multiplier=0.1).eval()
    outputs = model.score_batch({"image": torch.randn(3, 3, SIZE, SIZE)})
    assert outputs["score"].shape == (3,)
    assert outputs["map"].shape == (3, SIZE, SIZE)
    assert torch.allclose(outputs["score"], outputs["map"].flatten(1).amax(1))


def test_compression_summary_and_ratio() -> None:
    full = _scheme(compression_ratio=1).compression_summary()
    small = _scheme(compression_ratio=16, expert=True, skip_fusion=True, guided_injection=True).compression_summary()
    for summary in (full, small):
        for key in ("teacher_params", "student_params", "compression_ratio", "teacher_macs", "student_macs",
                    "mac_compression_ratio", "deployed_params", "deployed_macs"):
            assert summary[key] > 0, key
        assert summary["deployed_params"] == summary["teacher_params"] + summary["student_params"]
        assert summary["compression_ratio"] == pytest.approx(summary["full_student_params"] / summary["student_params"])
    assert full["compression_ratio"] == 1.0 and full["width_multiplier"] == 1.0
    assert 16 / 1.25 <= small["compression_ratio"] <= 16 * 1.25
    assert small["mac_compression_ratio"] > 4
    assert small["expert_params"] == small["teacher_params"]  # the expert is a frozen copy, not deployed
    assert full["teacher_params"] < 1_000_000  # lite0 pruned after the third level


def test_bad_scheme_values_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="guided_injection"):
        _scheme(guided_injection=True)
    with pytest.raises(ConfigError, match="width_multiplier"):
        _scheme(width_multiplier=1.5)
    with pytest.raises(ConfigError, match="input_normalization"):
        _scheme(input_normalization="zscore")
    with pytest.raises(ConfigError, match="map_mode"):
        _scheme(map_mode="max")
    with pytest.raises(ConfigError, match="decoder_upsampling"):
        _scheme(decoder_upsampling="pixelshuffle")


def test_validation_scores_fixed_synthetic_anomalies_without_test_data() -> None:
    torch.manual_seed(0)
    model = _scheme(width_multiplier=0.1, blur_sigma=1.0)
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model.eval()
    images = torch.randn(6, 3, SIZE, SIZE)
    runs = []
    for _epoch in range(2):
        model.on_validation_epoch_start()
        with torch.no_grad():
            model.validation_step({"image": images}, 0)
        masks = torch.cat(model._val["masks"]).clone()
        model.on_validation_epoch_end()
        runs.append((masks, dict(logged)))
    assert torch.equal(runs[0][0], runs[1][0])  # the same anomalies every epoch
    assert runs[0][1] == runs[1][1]  # same weights, same anomalies: same figures
    for key in ("val/loss", "val/synthetic_pixel_auroc", "val/synthetic_image_auroc"):
        assert 0.0 <= logged[key] <= 1.0 or key == "val/loss", key
    levels = [logged[f"val/pixel_loss_level{level}"] for level in range(3)]
    assert all(0.0 < value <= 2.0 for value in levels)
    assert logged["val/pixel_loss"] == pytest.approx(sum(levels), rel=1e-5)
    # a student that copies the teacher everywhere leaves no signal: chance level
    model.student.forward = lambda features: [f.clone() for f in features]
    model.on_validation_epoch_start()
    with torch.no_grad():
        model.validation_step({"image": images}, 0)
    model.on_validation_epoch_end()
    assert logged["val/synthetic_pixel_auroc"] == pytest.approx(0.5, abs=0.05)
    assert logged["val/pixel_loss"] == pytest.approx(0.0, abs=1e-5)
    assert not _scheme(width_multiplier=0.1, val_synthetic_anomalies=False).val_anomalies


def test_defect_type_is_the_test_folder() -> None:
    assert defect_type_of("/data/bottle/test/broken_large/003.png") == "broken_large"
    assert defect_type_of("/data/bottle/test/good/000.png") == "good"


# -- runs through kd-train ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["reverse_distillation", "rd_expert"])
def test_smoke_run_logs_metrics_and_map_overlays(compose_cfg, mlflow_uri: str, scheme: str) -> None:
    cfg = compose_cfg("experiment=rd_smoke", f"scheme={scheme}", *TINY_DATA, *fast_overrides())
    metrics = train(cfg)
    for key in ("test/image_auroc", "test/pixel_auroc", "test/aupro", "test/images_per_s"):
        assert key in metrics, key
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rd_smoke").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/images_per_s", "train/student_loss", "val/loss", "test/pixel_auroc"):
        assert key in run.data.metrics, key
    assert ("train/teacher_loss" in run.data.metrics) == (scheme == "rd_expert")
    assert run.data.params["scheme"] == ("rd_expert" if scheme == "rd_expert" else "reverse_distillation")
    assert 3 <= float(run.data.params["compression_ratio"]) <= 5  # rd_smoke asks for 4
    assert int(run.data.params["deployed_params"]) > int(run.data.params["student_params"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/anomaly_maps.png", "plots/roc_curve.png", "plots/score_histograms.png"} <= plots
