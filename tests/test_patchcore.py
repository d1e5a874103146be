"""PatchCore: the memory bank, the coreset, the scores, the deployed model and a tracked run."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_experiments.data.common import sample_id, sample_ids
from kd_experiments.errors import CheckpointError, ConfigError
from kd_experiments.schemes.patchcore import PatchCoreDeployable, PatchCoreScheme
from kd_experiments.schemes.patchcore import torch_model as patchcore_model
from kd_experiments.schemes.patchcore.lightning_model import greedy_coreset
from kd_experiments.train import train
from tests.conftest import fast_overrides


SIZE = 64  # lite0 levels at 16x16, 8x8, 4x4: patches on the 8x8 grid


def _textures(count: int, seed: int) -> torch.Tensor:
    """Normal images in [0, 1]: diagonal stripes with a random phase and a little noise."""
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.arange(SIZE, dtype=torch.float32) / SIZE
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    phase = torch.rand(count, 1, 1, generator=generator) * 2 * math.pi
    stripes = 0.5 + 0.4 * torch.sin(2 * math.pi * 6 * (x + y) + phase)
    colour = torch.tensor([0.8, 0.6, 0.3]).view(1, 3, 1, 1)
    images = stripes.unsqueeze(1) * colour + 0.01 * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return images.clamp(0, 1)


def _scheme(**overrides) -> PatchCoreScheme:
    settings = {"coreset_fraction": 1.0, "blur_sigma": 1.0, **overrides}
    model = PatchCoreScheme((3, SIZE, SIZE), **settings)
    model.log = model.log_dict = lambda *args, **kwargs: None  # no trainer attached
    return model


def _fit(model: PatchCoreScheme, images: torch.Tensor, batch_size: int = 4, paths: list[str] | None = None) -> None:
    """What one Lightning epoch does: every training batch embedded, then the bank built."""
    model.on_train_epoch_start()
    raw_to_data = model.deployment_preprocessing()
    mean = torch.tensor(raw_to_data.mean).view(1, -1, 1, 1)
    std = torch.tensor(raw_to_data.std).view(1, -1, 1, 1)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = {"image": (chunk - mean) / std, "index": torch.arange(start, start + len(chunk))}
        if paths is not None:
            batch["path"] = paths[start : start + batch_size]
        model.training_step(batch, start // batch_size)
    model.build_memory_bank()


@pytest.fixture(scope="module")
def normal_images() -> torch.Tensor:
    return _textures(12, seed=0)


# -- the bank -----------------------------------------------------------------------------------
def test_bank_holds_every_patch_of_the_normal_images(normal_images: torch.Tensor) -> None:
    model = _scheme()
    _fit(model, normal_images)
    bank = model.patchcore.memory_bank
    assert bank.shape == (12 * 8 * 8, 176)  # 12 images x an 8x8 grid, 24 + 40 + 112 channels
    deployable = model.deployable_model()
    expected = model.patchcore.patches(model.patchcore.embed(deployable.preprocess(normal_images)))
    assert torch.allclose(bank, expected, atol=1e-4)
    assert model.bank_metrics()["memory_bank_bytes"] == bank.numel() * 4
    # a training image scores (almost) zero: every one of its patches is in the bank
    scores, maps = deployable.eval()(normal_images[:2])
    assert scores.shape == (2,) and maps.shape == (2, 1, SIZE, SIZE)
    assert float(scores.max()) < 1e-2


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_coreset_size_is_the_fraction(normal_images: torch.Tensor, fraction: float) -> None:
    model = _scheme(coreset_fraction=fraction)
    _fit(model, normal_images)
    assert model.patchcore.memory_bank.shape[0] == int(12 * 64 * fraction)
    metrics = model.bank_metrics()
    assert metrics["memory_bank_full_patches"] == 12 * 64
    assert metrics["memory_bank_patches"] == int(12 * 64 * fraction)


def test_greedy_coreset_covers_every_cluster_first() -> None:
    """k-center greedy: with as many picks as clusters, one pick lands in each cluster
    (a uniform random subset of 6 of 600 points misses a cluster most of the time)."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 32, generator=generator) * 20
    features = (centres.repeat_interleave(100, dim=0) + torch.randn(600, 32, generator=generator) * 0.1)
    chosen = greedy_coreset(features, 6, seed=3)
    assert sorted((chosen // 100).tolist()) == [0, 1, 2, 3, 4, 5]
    assert len(set(greedy_coreset(features, 50, seed=3).tolist())) == 50
    assert torch.equal(greedy_coreset(features, 50, seed=3), greedy_coreset(features, 50, seed=3))


def test_greedy_coreset_prunes_without_changing_the_picks() -> None:
    """The triangle-inequality pruning picks exactly what the plain loop (every patch measured
    against every new coreset patch) picks."""
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(20, 32, generator=generator) * 3
    features = centres[torch.randint(20, (3000,), generator=generator)] + torch.randn(3000, 32, generator=generator)
    centred = features - features.mean(dim=0)
    index = int(torch.randint(3000, (1,), generator=torch.Generator().manual_seed(0)))
    plain, nearest = [index], torch.full((3000,), float("inf"))
    for _ in range(299):
        nearest = torch.minimum(nearest, (centred - centred[index]).norm(dim=1))
        index = int(nearest.argmax())
        plain.append(index)
    assert greedy_coreset(features, 300, seed=0).tolist() == plain


def test_greedy_coreset_stops_when_every_point_is_covered() -> None:
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert len(greedy_coreset(features, 4)) == 2
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(features, 5)


def test_chunked_search_is_the_exact_nearest_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _scheme()
    generator = torch.Generator().manual_seed(0)
    model.patchcore.set_memory_bank(torch.randn(500, 176, generator=generator))
    queries = torch.randn(37, 176, generator=generator)
    monkeypatch.setattr(patchcore_model, "SEARCH_ELEMENTS", 37 * 64)  # 8 chunks of the bank
    distance, index = model.patchcore.nearest(queries)
    exact = torch.cdist(queries, model.patchcore.memory_bank)
    assert torch.equal(index, exact.argmin(dim=1))
    assert torch.allclose(distance, exact.amin(dim=1), atol=1e-3)


# -- scores ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_score", ["max", "reweighted"])
def test_planted_anomaly_scores_above_normal_images(normal_images: torch.Tensor, image_score: str) -> None:
    model = _scheme(coreset_fraction=0.5, image_score=image_score)
    _fit(model, normal_images)
    deployable = model.deployable_model().eval()
    normal = _textures(4, seed=1)  # unseen normal images
    anomalous = normal.clone()
    anomalous[:, :, 36:50, 12:26] = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)  # a blue square
    with torch.no_grad():
        normal_scores, _ = deployable(normal)
        anomalous_scores, maps = deployable(anomalous)
    assert float(anomalous_scores.min()) > float(normal_scores.max())
    peak = maps.flatten(1).argmax(dim=1)
    rows, columns = peak // SIZE, peak % SIZE
    assert bool(((rows >= 30) & (rows < 56) & (columns >= 6) & (columns < 32)).all())  # near the square


def test_uint8_and_float_inputs_score_alike(normal_images: torch.Tensor) -> None:
    model = _scheme()
    _fit(model, normal_images)
    deployable = model.deployable_model().eval()
    pixels = (_textures(2, seed=5) * 255).round().to(torch.uint8)
    with torch.no_grad():
        from_uint8 = deployable(pixels)
        from_float = deployable(pixels.float() / 255)
    for a, b in zip(from_uint8, from_float, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# -- the deployed model -------------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_the_bank(normal_images: torch.Tensor) -> None:
    model = _scheme(coreset_fraction=0.25)
    _fit(model, normal_images)
    deployable = model.deployable_model().eval()
    buffer = io.BytesIO()
    torch.save(deployable.state_dict(), buffer)
    assert len(buffer.getvalue()) > model.patchcore.memory_bank_bytes  # the bank travels with the weights

    fresh = _scheme(coreset_fraction=0.25)  # an empty bank
    assert fresh.patchcore.memory_bank.shape[0] == 0
    restored = fresh.deployable_model().eval()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.patchcore.memory_bank, model.patchcore.memory_bank)
    test_images = _textures(3, seed=2)
    with torch.no_grad():
        for a, b in zip(deployable(test_images), restored(test_images), strict=True):
            assert torch.equal(a, b)
    assert isinstance(restored, PatchCoreDeployable) and restored.produces_map


# -- leave-one-image-out scoring (a map student's targets on the bank's own images) -------------
def _paths(count: int, folder: str = "good") -> list[str]:
    return [f"/data/bottle/train/{folder}/{i:03d}.png" for i in range(count)]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_leaving_an_image_out_scores_it_as_a_bank_built_without_it(normal_images: torch.Tensor,
                                                                   fraction: float) -> None:
    """A bank image scored leaving itself out gets the map a bank of the other images gives it
    (exactly, with the whole bank; with a coreset, the coreset's patches of the other images)."""
    paths = _paths(len(normal_images))
    model = _scheme(coreset_fraction=fraction)
    _fit(model, normal_images, paths=paths)
    assert model.knows_bank_sources
    sources = model.memory_bank_sources
    assert sources.shape == (model.patchcore.memory_bank.shape[0],)
    ids = sample_ids(paths, len(paths))
    assert set(sources.tolist()) <= set(ids.tolist())
    # the same image under another data root has the same id; another file has another
    assert sample_id("/elsewhere/train/good/003.png") == int(ids[3]) != int(ids[4])

    chosen = [2, 7]
    left_out = model.score_leaving_out(normal_images[chosen], ids[chosen])
    plain = model.deployable_model().eval()(normal_images[chosen])
    assert bool((plain[0] < left_out[0]).all())  # memorised images score lower than they do left out
    for position, image in enumerate(chosen):
        without = _scheme(coreset_fraction=1.0)
        keep = model.memory_bank_sources != ids[image]
        without.patchcore.set_memory_bank(model.patchcore.memory_bank[keep])
        expected = without.deployable_model().eval()(normal_images[image:image + 1])
        assert torch.allclose(left_out[1][position], expected[1][0], rtol=1e-4, atol=1e-4)
        assert torch.allclose(left_out[0][position], expected[0][0], rtol=1e-4, atol=1e-4)
    # an image that is not in the bank scores as usual
    other = _textures(1, seed=9)
    assert torch.allclose(model.score_leaving_out(other, torch.tensor([sample_id("/x/test/good/000.png")]))[1],
                          model.deployable_model().eval()(other)[1])


def test_a_bank_without_source_ids_scores_but_refuses_to_leave_images_out(normal_images: torch.Tensor) -> None:
    """Banks built from items without a path, and checkpoints written before banks recorded their
    sources (no ``memory_bank_sources``), still load and score; leaving images out is one error."""
    model = _scheme(coreset_fraction=0.5)
    _fit(model, normal_images)  # no paths
    assert not model.knows_bank_sources
    with pytest.raises(ConfigError, match="does not record its source images"):
        model.score_leaving_out(normal_images[:1], torch.tensor([1]))

    with_sources = _scheme(coreset_fraction=0.5)
    _fit(with_sources, normal_images, paths=_paths(len(normal_images)))
    state = with_sources.state_dict()
    old = {k: v for k, v in state.items() if k != "memory_bank_sources"}  # an older checkpoint
    restored = _scheme(coreset_fraction=0.5)
    restored.load_state_dict(old, strict=True)
    assert torch.equal(restored.patchcore.memory_bank, with_sources.patchcore.memory_bank)
    assert not restored.knows_bank_sources and bool((restored.memory_bank_sources == -1).all())
    again = _scheme(coreset_fraction=0.5)
    again.load_state_dict(state, strict=True)
    assert again.knows_bank_sources and torch.equal(again.memory_bank_sources, with_sources.memory_bank_sources)
    # what ships is unchanged: the deployed model's state holds no source ids
    assert not any("sources" in key for key in with_sources.deployable_model().state_dict())


def test_empty_bank_and_bad_settings_raise_one_clear_error() -> None:
    with pytest.raises(CheckpointError, match="memory bank is empty"):
        _scheme().deployable_model().eval()(torch.rand(1, 3, SIZE, SIZE))
    for settings, message in (
        ({"coreset_fraction": 0.0}, "coreset_fraction"),
        ({"coreset_fraction": 1.5}, "coreset_fraction"),
        ({"image_score": "mean"}, "image_score"),
        ({"grid_level": 3}, "grid_level"),
        ({"num_neighbors": 0}, "num_neighbors"),
    ):
        with pytest.raises(ConfigError, match=message):
            PatchCoreScheme((3, SIZE, SIZE), **settings)


def test_fitting_in_several_processes_is_refused_in_one_line() -> None:
    model = _scheme()
    model._trainer = SimpleNamespace(world_size=2, datamodule=None)  # what a 2-process DDP trainer reports
    with pytest.raises(ConfigError, match="one process"):
        model.setup("fit")


def test_compression_summary_is_one_model() -> None:
    summary = _scheme().compression_summary()
    assert summary["compression_ratio"] == 1.0
    assert summary["teacher_params"] == summary["student_params"] == summary["deployed_params"] > 0
    assert summary["deployed_macs"] == summary["student_macs"] > 0


# -- a run through kd-train ---------------------------------------------------------------------------------
def test_smoke_run_logs_metrics_and_bank_bytes(compose_cfg, mlflow_uri: str) -> None:
    # deployment figures and the MLflow Model are every scheme's contract, checked elsewhere
    cfg = compose_cfg("experiment=patchcore_smoke", *fast_overrides("deploy.measure=false", "deploy.log_model=false"))
    returned = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("patchcore_smoke").experiment_id])
    params, logged = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and params["scheme"] == "patchcore"
    assert returned["memory_bank_bytes"] == logged["memory_bank_bytes"]
    assert float(params["compression_ratio"]) == 1.0
    assert int(params["deployed_params"]) == int(params["teacher_params"]) == int(params["student_params"])
    for key in ("test/image_auroc", "test/pixel_auroc", "test/aupro", "memory_bank_bytes", "memory_bank_patches",
                "train/images_per_s", "test/images_per_s"):
        assert key in logged, key
    # 29 training images (32 less the 10% validation share) on an 8x8 grid, a 25% coreset, 176 float32 channels
    assert logged["memory_bank_full_patches"] == 29 * 64
    assert logged["memory_bank_patches"] == int(29 * 64 * 0.25)
    assert logged["memory_bank_bytes"] == logged["memory_bank_patches"] * 176 * 4
    assert logged["test/image_auroc"] > 0.9  # the generated defects are plain to see
