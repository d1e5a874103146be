"""Map regression: the teacher-map cache, the student family's MAC ratios, learning, runs, DDP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from kd_experiments.anomaly_maps import gaussian_blur
from kd_experiments.augmentation import random_views
from kd_experiments.cache import TensorCache, digest, module_digest, tensor_digest
from kd_experiments.checkpoints import load_scheme
from kd_experiments.compression import count_macs, export_onnx, onnx_parity
from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.errors import ConfigError
from kd_experiments.schedules import COSINE_FLOOR, cosine_decay
from kd_experiments.schemes.map_regression import MapRegressionScheme
from kd_experiments.schemes.map_regression.loss import map_loss
from kd_experiments.schemes.map_regression.teachers import MapTeacher
from kd_experiments.schemes.map_regression.torch_model import (
    FUSIONS,
    MapStudent,
    MapStudentDeployable,
    describe,
    fold_batch_norm,
    smooth_student_map,
    width_for_mac_ratio,
)
from tests.conftest import NO_DEPLOY, ddp_and_single_runs, sqlite_store, train_in_process


SIZE = 64


class BrightnessTeacher(DeployableModel):
    """A stand-in map teacher: the smoothed squared deviation of each pixel from mid-grey
    (a convolution, so it has a state to digest)."""

    produces_map = True

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(Preprocessing.identity((3, size, size)))
        self.mix = torch.nn.Conv2d(3, 1, 1, bias=False)
        torch.nn.init.constant_(self.mix.weight, 1.0 / 3.0)

    def score(self, normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = gaussian_blur((self.mix(normalised) - 0.5) ** 2, 1.0)
        return maps.flatten(1).amax(1), maps


def grey_images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + 0.05 * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)


# -- the cache -------------------------------------------------------------------------------
def test_cache_hit_miss_and_new_key_when_the_teacher_changes(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path / "cache")
    teacher = BrightnessTeacher()
    images = grey_images(4, 0)
    key = digest({"teacher": module_digest(teacher), "images": tensor_digest(images)})
    assert cache.load(key) is None and cache.last == "miss"
    maps = teacher(images)[1]
    cache.save(key, {"maps": maps})
    entry = cache.load(key)
    assert cache.last == "hit" and torch.equal(entry["maps"], maps)
    # another teacher (changed weights) or other images: another key, so a miss
    with torch.no_grad():
        teacher.mix.weight.mul_(1.01)
    changed = digest({"teacher": module_digest(teacher), "images": tensor_digest(images)})
    assert changed != key and cache.load(changed) is None and cache.last == "miss"
    other_images = digest({"teacher": module_digest(BrightnessTeacher()), "images": tensor_digest(grey_images(4, 1))})
    assert other_images != key
    # a corrupt entry is a miss, not a crash
    cache.path(key).write_bytes(b"not a tensor file")
    assert cache.load(key) is None and cache.last == "miss"


# -- the student family ------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("ratio", [10, 30, 100, 300])
def test_width_search_reaches_each_deployed_mac_ratio(ratio: int, fusion: str) -> None:
    """Against a 256 px reference of 1.3 GMACs (the order of RD's deployed model at 256 px)."""
    reference = 1.3e9
    preprocessing = Preprocessing.identity((3, 256, 256))

    def macs_of(width: int) -> int:
        model = MapStudentDeployable(preprocessing, MapStudent(3, width, 2, fusion=fusion), 4.0, torch.tensor(1.0))
        return count_macs(model, model.example_input(1))

    width = width_for_mac_ratio(ratio, reference, macs_of)
    achieved = reference / macs_of(width)
    assert abs(torch.log(torch.tensor(achieved / ratio))) <= torch.log(torch.tensor(1.25))
    assert macs_of(width) < macs_of(width + 1)  # the family is ordered by width


def test_an_unreachable_ratio_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="deployed_mac_ratio"):
        width_for_mac_ratio(1e6, 1e6, lambda width: 1000 * width, max_width=8)


def test_the_pyramid_fusion_adds_a_stride_8_step_and_keeps_the_default_student_as_it_was(tmp_path: Path) -> None:
    torch.manual_seed(0)
    context, pyramid = MapStudent(3, 4, 1), MapStudent(3, 4, 1, fusion="pyramid")
    # the default's parameters are unchanged (its checkpoints load); the pyramid adds its stride-8 step
    assert set(pyramid.state_dict()) - set(context.state_dict()) == {
        "lateral8.weight", "lateral8.bias", "merge8.0.weight", "merge8.0.bias"}
    pyramid.load_state_dict(context.state_dict(), strict=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    assert pyramid(images).shape == context(images).shape == (2, 1, SIZE // 4, SIZE // 4)
    # the stride-8 features reach the map: a change of the lateral changes the output
    before = pyramid(images)
    with torch.no_grad():
        pyramid.lateral8.weight.add_(0.5)
    assert not torch.allclose(before, pyramid(images))
    # it exports: ONNX Runtime gives the same scores and maps
    deployable = MapStudentDeployable(Preprocessing.identity((3, SIZE, SIZE)), pyramid.eval(), 4.0,
                                      torch.tensor(2.0)).eval()
    raw = (torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8)
    path = export_onnx(deployable, raw, tmp_path / "pyramid.onnx")
    assert onnx_parity(deployable, path, raw) < 1e-4
    with pytest.raises(ConfigError, match="scheme.fusion"):
        MapStudent(3, 4, 1, fusion="unet")
    with pytest.raises(ConfigError, match="scheme.fusion"):
        MapRegressionScheme((3, SIZE, SIZE), width=4, fusion="sum")


def test_the_pyramid_merge_depth_adds_stride_8_convolutions_that_reach_the_map_and_count() -> None:
    torch.manual_seed(0)
    one, three = MapStudent(3, 4, 1, fusion="pyramid"), MapStudent(3, 4, 1, fusion="pyramid", merge_depth=3)
    # merge_depth=1 is the pyramid as it was (its checkpoints load); each further step is one 3x3 conv at stride 8
    assert set(three.state_dict()) - set(one.state_dict()) == {
        f"refine8.{index}.0.{kind}" for index in (0, 1) for kind in ("weight", "bias")}
    three.load_state_dict(one.state_dict(), strict=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    before = three(images)
    assert before.shape == (2, 1, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        three.refine8[1][0].weight.add_(0.5)
    assert not torch.allclose(before, three(images))
    # the width search sees the extra multiply-accumulates: a 3x3 conv at stride 8 on 2 * width channels each
    preprocessing = Preprocessing.identity((3, 256, 256))

    def macs(student: MapStudent) -> int:
        model = MapStudentDeployable(preprocessing, student, 4.0, torch.tensor(1.0))
        return count_macs(model, model.example_input(1))

    width = 8
    deeper = macs(MapStudent(3, width, 2, fusion="pyramid", merge_depth=2))
    assert deeper - macs(MapStudent(3, width, 2, fusion="pyramid")) == (2 * width) ** 2 * 9 * (256 // 8) ** 2
    assert describe(three)["student_merge_depth"] == 3
    with pytest.raises(ConfigError, match="merge_depth"):
        MapStudent(3, 4, 1, fusion="pyramid", merge_depth=0)
    with pytest.raises(ConfigError, match="needs scheme.fusion=pyramid"):
        MapRegressionScheme((3, SIZE, SIZE), width=4, merge_depth=2)


def test_map_depth_adds_separable_blocks_at_the_map_resolution_that_reach_the_map_count_and_export(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, refined = MapStudent(3, 4, 1, fusion="pyramid"), MapStudent(3, 4, 1, fusion="pyramid", map_depth=2)
    # map_depth=0 is the student as it was (its checkpoints load); each block is a depthwise 3x3 and a 1x1
    assert set(refined.state_dict()) - set(plain.state_dict()) == {
        f"refine4.{index}.{conv}.{kind}" for index in (0, 1) for conv in ("depthwise", "pointwise")
        for kind in ("weight", "bias")}
    assert refined.refine4[0].depthwise.groups == 2 * 4
    refined.load_state_dict(plain.state_dict(), strict=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    before = refined(images)
    assert before.shape == (2, 1, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        refined.refine4[1].pointwise.weight.add_(0.5)
    assert not torch.allclose(before, refined(images))
    # the width search sees each block: 9c + c^2 multiply-accumulates per map pixel for c = 2 * width
    preprocessing = Preprocessing.identity((3, 256, 256))

    def macs(student: MapStudent) -> int:
        model = MapStudentDeployable(preprocessing, student, 4.0, torch.tensor(1.0))
        return count_macs(model, model.example_input(1))

    width, channels = 8, 16
    added = macs(MapStudent(3, width, 2, fusion="pyramid", map_depth=1)) - macs(MapStudent(3, width, 2, fusion="pyramid"))
    assert added == (9 * channels + channels ** 2) * (256 // 4) ** 2
    assert describe(refined)["student_map_depth"] == 2 and describe(plain)["student_map_depth"] == 0
    # it exports: ONNX Runtime gives the same scores and maps
    deployable = MapStudentDeployable(Preprocessing.identity((3, SIZE, SIZE)), refined.eval(), 4.0,
                                      torch.tensor(2.0)).eval()
    raw = (torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8)
    assert onnx_parity(deployable, export_onnx(deployable, raw, tmp_path / "refined.onnx"), raw) < 1e-4
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="scheme.map_depth"):
            MapStudent(3, 4, 1, map_depth=bad)
    scheme = MapRegressionScheme((3, SIZE, SIZE), width=4, fusion="pyramid", map_depth=1)
    assert scheme.student.map_depth == 1


def test_batch_norm_trains_between_each_convolution_and_its_relu_and_ships_folded(tmp_path: Path) -> None:
    """``norm="batch"``: a normalisation after each ReLU'd convolution while training; the deployed
    student is the plain one with each pair folded into its convolution: the same keys, parameters
    and MACs as a ``norm="none"`` student, the same maps as the trained student in eval mode."""
    torch.manual_seed(0)
    student = MapStudent(3, 4, 1, fusion="pyramid", merge_depth=2, norm="batch")
    plain = MapStudent(3, 4, 1, fusion="pyramid", merge_depth=2)
    norms = [name for name, module in student.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    # stem 2, context path 2 + depth 1, merge 1 + refine 1, head 1; no norm on the laterals or the last 1x1
    assert len(norms) == 8 and all(name.endswith(".1") for name in norms)
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(5):  # moves the running statistics and the affine parameters off their defaults
        loss = student(torch.randn(4, 3, SIZE, SIZE) * 2 + 1).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    student.eval()
    folded = fold_batch_norm(student)
    assert folded.norm == "none" and set(folded.state_dict()) == set(plain.state_dict())
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    images = torch.randn(2, 3, SIZE, SIZE) * 2 + 1
    with torch.no_grad():
        assert torch.allclose(folded(images), student(images), atol=1e-5, rtol=1e-4)
    assert fold_batch_norm(plain) is plain
    assert describe(student)["student_norm"] == "batch" and describe(folded)["student_norm"] == "none"
    # the scheme ships the folded student: same deployed size as the plain student's, ONNX parity
    scheme = MapRegressionScheme((3, SIZE, SIZE), width=4, depth=1, fusion="pyramid", merge_depth=2, norm="batch")
    scheme.student.load_state_dict(student.state_dict())
    scheme.eval()
    deployable = scheme.deployable_model().eval()
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in deployable.modules())
    reference = MapRegressionScheme((3, SIZE, SIZE), width=4, depth=1, fusion="pyramid",
                                   merge_depth=2).deployable_model()
    raw = (torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8)
    assert count_macs(deployable, raw) == count_macs(reference, raw)
    assert sum(p.numel() for p in deployable.parameters()) == sum(p.numel() for p in reference.parameters())
    assert scheme.compression_summary()["student_norm"] == "batch"
    unfolded = MapStudentDeployable(scheme.deployment_preprocessing(), student, 4.0, scheme.map_scale).eval()
    with torch.no_grad():
        assert torch.allclose(deployable(raw)[1], unfolded(raw)[1], atol=1e-4, rtol=1e-4)
    assert onnx_parity(deployable, export_onnx(deployable, raw, tmp_path / "folded.onnx"), raw) < 1e-4
    with pytest.raises(ConfigError, match="scheme.norm"):
        MapStudent(3, 4, 1, norm="layer")


def test_deployable_student_takes_raw_images_and_returns_scores_and_maps() -> None:
    model = MapStudentDeployable(Preprocessing.identity((3, SIZE, SIZE)), MapStudent(3, 4, 1), 4.0,
                                 torch.tensor(2.0)).eval()
    raw = (torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8)
    scores, maps = model(raw)
    assert scores.shape == (2,) and maps.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    assert model.produces_map and model.input_size == (SIZE, SIZE)


def test_the_cosine_schedule_decays_to_its_floor_and_a_wrong_schedule_is_one_config_error() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = cosine_decay(optimizer, total_steps=10)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1)
    assert all(later < earlier for earlier, later in zip(rates[:10], rates[1:10]))
    assert rates[10] == rates[11] == pytest.approx(0.1 * COSINE_FLOOR)  # held at the floor past the end
    with pytest.raises(ConfigError, match="scheme.lr_schedule"):
        MapRegressionScheme((3, SIZE, SIZE), width=4, lr_schedule="step")


@pytest.mark.parametrize("level", [-1, [], [0, 0], [0, "1"], True, "0"])
def test_a_wrong_feature_level_is_one_config_error(level) -> None:
    with pytest.raises(ConfigError, match="scheme.feature_level"):
        MapRegressionScheme((3, SIZE, SIZE), width=4, feature_level=level)


def test_one_feature_head_serves_several_levels_through_its_channel_slices() -> None:
    scheme = MapRegressionScheme((3, SIZE, SIZE), width=4, feature_weight=1.0, feature_level=[0, 2],
                                 feature_channels=5)
    assert scheme.hparams.feature_level == [0, 2] and scheme._feature_keys() == ["train_features_0",
                                                                                   "train_features_2"]
    # level 0: 2 channels on a 16x16 grid, level 2: 3 channels on 4x4; rows: [normal, synthetic copy] x 2 images
    generator = torch.Generator().manual_seed(0)
    scheme._feature_targets = [torch.randn(2, 2, 2, 16, 16, generator=generator),
                               torch.randn(2, 2, 3, 4, 4, generator=generator)]
    features = scheme.student.features(grey_images(4, 1))
    index, normal, synthetic = torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    loss = scheme._feature_loss(features, normal, synthetic, index)
    guessed = [scheme.feature_head(F.adaptive_avg_pool2d(features, size)) for size in (16, 4)]
    expected = (F.mse_loss(guessed[0][:, :2], torch.cat([scheme._feature_targets[0][0], scheme._feature_targets[0][1]]))
                + F.mse_loss(guessed[1][:, 2:], torch.cat([scheme._feature_targets[1][0],
                                                            scheme._feature_targets[1][1]]))) / 2
    assert torch.allclose(loss, expected)
    loss.backward()
    assert scheme.feature_head.weight.grad.abs().sum() > 0


def test_map_teacher_refuses_a_score_only_model() -> None:
    class ScoreOnly(torch.nn.Module):
        produces_map = False

    with pytest.raises(ConfigError, match="map-producing"):
        MapTeacher(ScoreOnly())


def test_leave_one_out_needs_a_teacher_that_can_and_a_boolean() -> None:
    """A teacher without a source-recording bank cannot score leaving images out: one error naming it."""
    teacher = MapTeacher(BrightnessTeacher())
    assert not teacher.can_leave_out
    with pytest.raises(ConfigError, match="cannot score leaving"):
        teacher(grey_images(2, 0), torch.tensor([1, 2]))
    assert not teacher.built_from(torch.tensor([1, 2])).any()  # no bank: built from nothing known
    known = MapTeacher(BrightnessTeacher(), leave_out=lambda images, ids: (images.mean((1, 2, 3)), images[:, :1]),
                       bank_ids=torch.tensor([5, 5, 9]))
    assert known.can_leave_out and known.built_from(torch.tensor([1, 5, 9])).tolist() == [False, True, True]
    with pytest.raises(ConfigError, match="teacher_leave_one_out must be true or false"):
        MapRegressionScheme((3, SIZE, SIZE), teacher=teacher, width=8, teacher_leave_one_out="yes")


def test_random_views_are_seeded_mild_and_a_bad_setting_is_one_config_error() -> None:
    images = torch.rand(3, 3, SIZE, SIZE)
    first = random_views(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, random_views(images, torch.Generator().manual_seed(0)))  # seeded
    assert not torch.equal(first, random_views(images, torch.Generator().manual_seed(1)))
    # reflection at the borders: a shifted bright image has no dark corners
    shifted = random_views(torch.full((1, 3, SIZE, SIZE), 0.8), torch.Generator().manual_seed(0), degrees=20.0,
                           translate=0.1, scale=0.1, colour=0.0)
    assert torch.allclose(shifted, torch.full_like(shifted, 0.8), atol=1e-5)
    # no change asked: the images come back
    same = random_views(images, torch.Generator().manual_seed(0), degrees=0.0, translate=0.0, scale=0.0, colour=0.0)
    assert torch.allclose(same, images, atol=1e-5)
    with pytest.raises(ConfigError, match="scheme.augment_degrees"):
        random_views(images, torch.Generator(), degrees=-1.0)
    with pytest.raises(ConfigError, match="scheme.augment_per_image"):
        MapRegressionScheme((3, SIZE, SIZE), width=4, augment_per_image=-1)


# -- learning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_loss_learns_and_a_planted_anomaly_scores_above_normal_pixels(fusion: str) -> None:
    """On grey images with a brighter square, the student learns the teacher's map: the loss
    falls, and a square at a place never seen in training scores above the normal pixels."""
    torch.manual_seed(0)
    teacher = MapTeacher(BrightnessTeacher())
    normal = grey_images(16, 0)
    anomalous = normal.clone()
    anomalous[:, :, 20:36, 20:36] += 0.12  # a brighter square in every image
    images = torch.cat([normal, anomalous])
    with torch.no_grad():
        target = F.avg_pool2d(teacher(images)[1], 4)
    scale = torch.quantile(target[:16].flatten(), 0.99)
    target = target / scale
    preprocessing = Preprocessing((SIZE, SIZE), 3, (0.5,) * 3, (0.05,) * 3)  # the data's normalisation
    normalised = (images - 0.5) / 0.05
    student = MapStudent(3, 8, 1, fusion=fusion)
    optimiser = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = map_loss(smooth_student_map(student(normalised), 4.0), target, None, "l1", 4.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    test_image = grey_images(1, 7)
    test_image[:, :, 36:52, 8:24] += 0.12  # a square elsewhere than in training
    deployable = MapStudentDeployable(preprocessing, student.eval(), 4.0, scale)
    with torch.no_grad():
        _, maps = deployable(test_image)
    inside = maps[0, 0, 36:52, 8:24].mean()
    outside = torch.cat([maps[0, 0, :28].flatten(), maps[0, 0, :, 32:].flatten()]).mean()
    assert inside > 3 * outside.clamp(min=0) and inside > 0


# -- whole runs ------------------------------------------------------------------------------------
SMOKE = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "data.n_train=16",
         "data.n_test_good=4", "data.n_test_defect_per_type=2", "deploy.latency_calls=2",
         "deploy.throughput_calls=1", "deploy.onnx=false"]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "kd_experiments.train", *args], capture_output=True, text=True,
                            timeout=400, env=env, cwd=cwd, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def patchcore_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A patchcore_smoke run (training-free) as the teacher checkpoint, with its environment."""
    root = tmp_path_factory.mktemp("map_regression")
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(root / 'm.db'), "OMP_NUM_THREADS": "1",
           "KD_CACHE_DIR": str(root / "cache")}
    train_in_process(["experiment=patchcore_smoke", *SMOKE], env, root / "teacher")
    return root / "teacher" / "checkpoints" / "last.ckpt", env


@pytest.mark.slow
def test_a_run_logs_quality_sizes_and_reuses_the_teacher_maps(patchcore_teacher) -> None:
    checkpoint, env = patchcore_teacher
    root = checkpoint.parents[2]
    common = ["experiment=map_regression_smoke", *SMOKE, "trainer.max_epochs=1",
              f"scheme.teacher.checkpoint={checkpoint}"]
    train_in_process(common, env, root / "first")
    # same data and teacher, another schedule and the pyramid student: the teacher's maps are reused
    train_in_process([*common, "scheme.learning_rate=0.001", "scheme.lr_schedule=cosine", "scheme.fusion=pyramid"],
                     env, root / "second")
    # the teacher-feature switch: more targets (two encoder levels), trained beside the student, never shipped
    train_in_process([*common, "scheme.feature_weight=1.0", "scheme.feature_level=[0,1]", *NO_DEPLOY], env,
                     root / "features")
    # teacher-labelled views beside the feature target: another entry, trained and tested
    train_in_process([*common, "scheme.feature_weight=1.0", "scheme.augment_per_image=2", *NO_DEPLOY], env,
                     root / "views")
    # targets scored leaving each training image out of the PatchCore teacher's bank: another entry
    train_in_process([*common, "scheme.teacher_leave_one_out=true", *NO_DEPLOY], env, root / "leave_out")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("map_regression_smoke").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [run.info.status for run in runs] == ["FINISHED"] * 5
    first, second, features, views, leave_out = runs
    assert leave_out.data.metrics["teacher_map_cache_hit"] == 0.0 and "test/pixel_auroc" in leave_out.data.metrics
    assert leave_out.data.metrics["teacher_bank_overlap"] == 1.0  # same data and seed: every image is in the bank
    # the bank's own images, scored as unseen ones, set a larger unit for the maps
    assert leave_out.data.metrics["map_scale"] > first.data.metrics["map_scale"]
    assert views.data.metrics["teacher_map_cache_hit"] == 0.0  # the views are in the key
    assert "test/pixel_auroc" in views.data.metrics and int(views.data.params["scheme.augment_per_image"]) == 2
    assert features.data.metrics["teacher_map_cache_hit"] == 0.0  # the maps plus the features: a new entry
    assert features.data.metrics["train/feature_loss"] > 0 and "test/pixel_auroc" in features.data.metrics
    assert features.data.params["deployed_params"] == first.data.params["deployed_params"]
    assert features.data.params["scheme.feature_level"] == "[0, 1]"
    assert int(views.data.params["scheme.feature_level"]) == 1  # the default: one level
    rebuilt = load_scheme("kd_experiments.schemes.map_regression.MapRegressionScheme",
                          root / "features" / "checkpoints" / "last.ckpt")  # strict: the head is rebuilt too
    assert rebuilt.feature_head is not None and rebuilt.teacher is None
    assert rebuilt.hparams.feature_level == [0, 1]  # one head writes both levels' channels
    assert rebuilt.feature_head.out_channels == rebuilt.hparams.feature_channels > 0
    assert "feature_head" not in dict(rebuilt.deployable_model().named_children())
    assert first.data.metrics["teacher_map_cache_hit"] == 0.0 and second.data.metrics["teacher_map_cache_hit"] == 1.0
    assert second.data.params["scheme.lr_schedule"] == "cosine" and second.info.status == "FINISHED"
    assert (first.data.params["student_fusion"], second.data.params["student_fusion"]) == ("context", "pyramid")
    # the ratio holds for either student: the width search counts the pyramid's stride-8 step
    assert float(second.data.params["deployed_mac_compression_ratio"]) == pytest.approx(10, rel=0.25)
    for key in ("test/image_auroc", "test/pixel_auroc", "test/aupro", "test/teacher_pixel_auroc",
                "val/synthetic_pixel_auroc", "val/synthetic_aupro", "val/teacher_synthetic_pixel_auroc"):
        assert key in first.data.metrics, key
    params = first.data.params
    assert float(params["deployed_mac_compression_ratio"]) == pytest.approx(10, rel=0.25)  # the smoke ratio
    assert float(params["deployed_compression_ratio"]) > 1
    assert int(params["deployed_params"]) == int(params["student_params"])  # no encoder ships


@pytest.mark.slow
def test_callbacks_ema_validates_checkpoints_and_tests_the_average(patchcore_teacher) -> None:
    """``callbacks=ema``: the checkpoint's state_dict is the moving average (the step's own weights
    beside it, for resuming), and the run tested that average: testing the checkpoint alone gives
    the run's test metrics, while the step's own weights give other maps."""
    checkpoint, env = patchcore_teacher
    root = checkpoint.parents[2]
    common = ["experiment=map_regression_smoke", *SMOKE, *NO_DEPLOY, "trainer.max_epochs=2",
              f"scheme.teacher.checkpoint={checkpoint}", "experiment_name=map_regression_ema"]
    trained = train_in_process(["callbacks=ema", *common], env, root / "ema")
    last = root / "ema" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == saved["global_step"] > 1  # every optimiser step
    average, current = saved["state_dict"], saved["current_model_state"]
    assert average.keys() == current.keys()
    assert any(not torch.equal(average[key], current[key]) for key in average if key.startswith("student."))
    tested = train_in_process([*common, "train=false", f"ckpt_path={last}"], env, root / "ema_test")
    for key in ("test/image_auroc", "test/pixel_auroc", "test/aupro"):
        assert tested[key] == pytest.approx(trained[key], abs=1e-6), key
    scheme = load_scheme("kd_experiments.schemes.map_regression.MapRegressionScheme", last)
    own = copy.deepcopy(scheme)
    own.load_state_dict(current)
    images = torch.rand(2, 3, scheme.input_shape[1], scheme.input_shape[2])
    with torch.no_grad():
        assert not torch.allclose(scheme.deployable_model().eval()(images)[1], own.deployable_model().eval()(images)[1])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("map_regression_ema").experiment_id],
                             order_by=["attributes.start_time ASC"])[0]
    assert run.info.status == "FINISHED"
    assert float(run.data.params["callbacks.weight_averaging.decay"]) == 0.999


@pytest.mark.slow
def test_a_batch_normalised_student_trains_without_ema_and_refuses_it_in_one_line(patchcore_teacher) -> None:
    """``scheme.norm=batch`` trains and tests the folded student; under ``callbacks=ema`` (an average
    of the weights and of the normalisation statistics, which do not belong together) the run
    stops before the teacher is called, with one line naming both settings, and ends FAILED."""
    checkpoint, env = patchcore_teacher
    root = checkpoint.parents[2] / "norm"
    common = ["experiment=map_regression_smoke", *SMOKE, *NO_DEPLOY, "trainer.max_epochs=2", "scheme.norm=batch",
              f"scheme.teacher.checkpoint={checkpoint}", "experiment_name=map_regression_norm"]
    tested = train_in_process(common, env, root / "plain")
    assert 0.0 <= tested["test/pixel_auroc"] <= 1.0
    scheme = load_scheme("kd_experiments.schemes.map_regression.MapRegressionScheme",
                         root / "plain" / "checkpoints" / "last.ckpt")
    assert scheme.student.norm == "batch"
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in scheme.deployable_model().modules())
    with pytest.raises(ConfigError, match=r"scheme.norm=batch cannot train under EMAWeightAveraging \(callbacks=ema\)"):
        train_in_process(["callbacks=ema", *common], env, root / "ema")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("map_regression_norm").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [run.info.status for run in runs] == ["FINISHED", "FAILED"]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(patchcore_teacher) -> None:
    checkpoint, env = patchcore_teacher
    root = checkpoint.parents[2]
    common = ["experiment=map_regression_smoke", *SMOKE, "trainer.max_epochs=1", *NO_DEPLOY,
              f"scheme.teacher.checkpoint={checkpoint}", "experiment_name=map_regression_ddp"]
    _run([*common, "trainer=ddp_cpu", f"hydra.run.dir={root / 'ddp'}"], env, root)
    train_in_process([*common, "train=false", f"ckpt_path={root / 'ddp' / 'checkpoints' / 'last.ckpt'}"], env,
                     root / "single")
    ddp_and_single_runs(env["MLFLOW_TRACKING_URI"], "map_regression_ddp",
                        ("test/image_auroc", "test/pixel_auroc", "test/aupro"))
