"""Unsupervised-to-supervised compression (Pol et al.): networks, techniques, any-teacher
path, metrics, int8 and ONNX deployment of the student. Tiny data, CPU, seconds."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kd_experiments.compression import (
    count_parameters,
    export_onnx,
    onnx_parity,
    quantize_int8_static,
)
from kd_experiments.data.one_class import OneClassDataModule
from kd_experiments.errors import ConfigError
from kd_experiments.metrics import image_auroc
from kd_experiments.schemes.score_regression import (
    ScoreRegressionScheme,
    ScoreTeacher,
    load_scheme_teacher,
)
from kd_experiments.schemes.score_regression.events_model import MLPAutoencoder, MLPScoreRegressor
from kd_experiments.schemes.score_regression.family import (
    StudentTrack,
    fit_students,
    fit_teacher,
    predict,
)
from kd_experiments.schemes.score_regression.lightning_model import teacher_training_loss
from kd_experiments.schemes.score_regression.techniques import (
    OutlierSampler,
    Techniques,
    add_noise,
    corrupt_images,
    load_outlier_images,
    student_batch,
    tail_weights,
    warp_images,
    weighted_l1,
)
from kd_experiments.schemes.score_regression.torch_model import (
    PAPER_STUDENTS,
    ConvAutoencoder,
    VariationalAutoencoder,
    build_student,
    reconstruction_score,
)
from kd_experiments.train import train
from tests.conftest import fast_overrides

SHAPE = (1, 28, 28)


def _write_idx(folder: Path, count: int = 40, seed: int = 0) -> Path:
    """A tiny MNIST-format set (train split only) in the real IDX format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    header = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (count, 28, 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    header = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    return folder


def _digits(batch_size: int = 16, max_train: int = 64, max_test: int = 60) -> OneClassDataModule:
    return OneClassDataModule(
        dataset="digits", root=None, normal_class=0, image_size=28, normalization="none",
        batch_size=batch_size, max_train_samples=max_train, max_test_samples=max_test,
    )


def _trainer(max_steps: int = -1, max_epochs: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


# -- networks --------------------------------------------------------------------------------
def test_paper_sizes_and_the_vae_teacher() -> None:
    assert count_parameters(ConvAutoencoder()) == 19357
    sizes = {name: count_parameters(build_student(spec, SHAPE)) for name, spec in PAPER_STUDENTS.items()}
    assert sizes == {"A": 7177, "B": 2189, "C": 1057, "D": 409, "E": 225, "F": 133, "G": 77}
    vae = VariationalAutoencoder().eval()
    images = torch.rand(3, *SHAPE)
    assert torch.equal(vae(images), vae(images))  # deterministic score: the mean's reconstruction
    reconstruction, kl = vae.elbo_terms(images)
    assert reconstruction.shape == images.shape and kl.shape == (3,) and (kl >= 0).all()
    assert teacher_training_loss(vae, images) > torch.nn.functional.mse_loss(reconstruction, images) - 1e-6


# -- techniques ------------------------------------------------------------------------------
def test_technique_functions() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, *SHAPE)
    noisy = add_noise(images, 0.1, (0.0, 1.0), generator)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, images)
    targets = torch.tensor([0.1, 0.2, 0.3, 2.0])
    weights = tail_weights(targets, 2.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[-1] > weights[0] and torch.equal(tail_weights(targets, 0.0), torch.ones(4))
    assert weighted_l1(targets, targets + 1, weights).item() == pytest.approx(1.0)

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)

    outliers = torch.ones(3, *SHAPE)
    inputs, targets, weights = student_batch(images, score, Techniques(noise_std=0.1, tail_strength=1.0), outliers, generator)
    assert inputs.shape == (11, *SHAPE) and torch.equal(inputs[8:], outliers)
    assert torch.allclose(targets, score(inputs)) and not targets.requires_grad
    assert weights.argmax() >= 8  # the bright outliers get the largest weights
    with pytest.raises(ConfigError, match="noise_exposure.std"):
        Techniques(noise_std=-1)


def test_corruption_exposure_adds_corrupted_copies_of_the_normal_batch() -> None:
    images = torch.zeros(12, *SHAPE)
    images[:, :, 8:20, 8:20] = 0.8  # a bright square on black, as a digit on its background
    corrupted = corrupt_images(images, torch.Generator().manual_seed(1))
    assert corrupted.shape == images.shape and 0 <= corrupted.min() and corrupted.max() <= 1
    changed = (corrupted - images).flatten(1).abs().amax(1) > 0
    assert changed.sum() >= 6  # strokes and blends always change an image; an erased block may miss the square
    assert torch.equal(corrupted, corrupt_images(images, torch.Generator().manual_seed(1)))  # seeded
    assert not torch.equal(corrupted, corrupt_images(images, torch.Generator().manual_seed(2)))

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)

    inputs, targets, _ = student_batch(images, score, Techniques(corruption_copies=2), None,
                                       torch.Generator().manual_seed(1))
    assert inputs.shape == (36, *SHAPE) and torch.equal(inputs[:12], images)
    assert torch.allclose(targets, score(inputs))
    with pytest.raises(ConfigError, match="corruption_exposure.copies"):
        Techniques(corruption_copies=-1)


def test_warp_exposure_adds_warped_copies_that_keep_the_ink_and_move_it() -> None:
    images = torch.zeros(12, *SHAPE)
    images[:, :, 10:18, 6:22] = 0.9  # a bright bar: rotation, shear and elastic maps all move it
    warped = warp_images(images, torch.Generator().manual_seed(3))
    assert warped.shape == images.shape and 0 <= warped.min() and warped.max() <= 1
    moved = (warped - images).flatten(1).abs().amax(1) > 0.5
    assert moved.all()  # every copy is displaced, not left as it was
    ink, warped_ink = images.flatten(1).sum(1), warped.flatten(1).sum(1)
    assert ((warped_ink > 0.3 * ink) & (warped_ink < 2.5 * ink)).all()  # shaped like the data, not erased or flooded
    assert torch.equal(warped, warp_images(images, torch.Generator().manual_seed(3)))  # seeded
    assert not torch.equal(warped, warp_images(images, torch.Generator().manual_seed(4)))

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)

    inputs, targets, _ = student_batch(images, score, Techniques(corruption_copies=1, warp_copies=2), None,
                                       torch.Generator().manual_seed(1))
    assert inputs.shape == (48, *SHAPE) and torch.equal(inputs[:12], images)
    assert torch.allclose(targets, score(inputs))
    with pytest.raises(ConfigError, match="corruption_exposure.warp_copies"):
        Techniques(warp_copies=-1)


def test_outlier_images_load_lazily_from_idx(tmp_path: Path) -> None:
    root = _write_idx(tmp_path / "fashion_mnist", count=30)
    images = load_outlier_images("fashion_mnist", root, max_images=10)
    assert images.shape == (10, *SHAPE) and 0 <= images.min() and images.max() <= 1
    sampler = OutlierSampler(images, batch_size=4, seed=0)
    assert sampler.sample().shape == (4, *SHAPE)
    with pytest.raises(ConfigError, match="outlier_exposure.dataset"):
        load_outlier_images("cifar10", root)
    with pytest.raises(ConfigError, match="outlier_exposure.root"):
        ScoreRegressionScheme(SHAPE, outlier_exposure={"dataset": "fashion_mnist"})
    with pytest.raises(ConfigError, match="outlier_exposure.colour"):
        ScoreRegressionScheme(SHAPE, outlier_exposure={"colour": 1})


def test_bundled_photo_patches_are_offline_seeded_outliers() -> None:
    from kd_experiments.schemes.score_regression.techniques import photo_patches

    images = load_outlier_images("photo_patches", None, max_images=12, seed=3)
    assert images.shape == (12, *SHAPE) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert torch.equal(images, photo_patches(12, seed=3)) and not torch.equal(images, photo_patches(12, seed=4))
    scheme = ScoreRegressionScheme(SHAPE, student="G", outlier_exposure={"dataset": "photo_patches"})  # no root needed
    assert scheme.technique_name() == "baseline+outlier_exposure"
    with pytest.raises(ConfigError, match="photo_patches"):
        ScoreRegressionScheme(SHAPE, outlier_exposure={"dataset": "cifar10"})

TECHNIQUES = {
    "baseline": {},
    "co_learning": {"co_learning": True},
    "outlier_exposure": {"outlier_exposure": {"dataset": "fashion_mnist", "batch_size": 8}},
    "co_learning+outlier_exposure": {"co_learning": True, "outlier_exposure": {"dataset": "fashion_mnist"}},
    "noise_exposure": {"noise_exposure": {"std": 0.1}},
    "tail_reweighting": {"tail_reweighting": {"strength": 1.0}},
    "vae_teacher": {"teacher": "vae", "co_learning": True},
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_trains_teacher_and_student(technique: str, tmp_path: Path) -> None:
    options = dict(TECHNIQUES[technique])
    if "outlier_exposure" in options:
        options["outlier_exposure"] = {**options["outlier_exposure"], "root": str(_write_idx(tmp_path / "fmnist"))}
    torch.manual_seed(0)
    scheme = ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, **options)
    teacher_before, student_before = _snapshot(scheme.teacher), _snapshot(scheme.student)
    _trainer(max_epochs=1, limit_val_batches=1).fit(scheme, datamodule=_digits())
    assert _changed(teacher_before, scheme.teacher) and _changed(student_before, scheme.student)
    assert scheme.technique_name().startswith("co_learning" if options.get("co_learning") else "baseline")
    if "outlier_exposure" in options:
        assert scheme._outlier_sampler is not None and "outlier_exposure" in scheme.technique_name()
    summary = scheme.compression_summary()
    assert summary["student_params"] == 77 and summary["technique"] == scheme.technique_name()


def test_cosine_student_schedule_decays_from_student_lr_over_the_student_steps() -> None:
    """student_schedule=cosine: the student's first step at student_lr, then falling to near 0 at
    its last; the teacher's rate untouched; constant keeps student_lr; an unknown name is refused."""
    class RecordRates(L.Callback):
        def __init__(self) -> None:
            self.rates: list[tuple[bool, float, float]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            teacher_optimizer, student_optimizer = module.optimizers()
            teaching = module.in_teacher_phase(batch_idx)
            self.rates.append((teaching, teacher_optimizer.param_groups[0]["lr"],
                               student_optimizer.param_groups[0]["lr"]))

    for schedule in ("cosine", "constant"):
        torch.manual_seed(0)
        scheme = ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, student_lr=0.01,
                                       teacher_fraction=0.25, student_schedule=schedule)
        recorder = RecordRates()
        _trainer(max_epochs=2, limit_val_batches=0, callbacks=[recorder]).fit(scheme, datamodule=_digits(batch_size=8))
        student_rates = [rate for teaching, _, rate in recorder.rates if not teaching]
        assert len(student_rates) >= 8 and {teacher for _, teacher, _ in recorder.rates} == {1e-3}
        if schedule == "constant":
            assert set(student_rates) == {0.01}
        else:
            assert student_rates[0] == pytest.approx(0.01)
            assert all(a > b for a, b in zip(student_rates, student_rates[1:]))
            assert student_rates[-1] < 0.01 * 0.05
    with pytest.raises(ConfigError, match="student_schedule='step'"):
        ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, student_schedule="step")


def test_student_restarts_keep_the_candidate_of_least_validation_loss() -> None:
    """student_restarts=3: three students of one size train on the same batches; after the last
    epoch the student is the candidate whose L1 to the teacher on the validation draws is least
    (a swap: every candidate's weights are still there); 1 adds nothing; 0 is refused."""
    torch.manual_seed(0)
    scheme = ScoreRegressionScheme(SHAPE, student="A", compression_ratio=None, student_restarts=3,
                                   corruption_exposure={"copies": 1})
    assert len(scheme.student_restarts) == 2
    before = [_snapshot(candidate) for candidate in (scheme.student, *scheme.student_restarts)]
    datamodule = _digits(batch_size=8)
    _trainer(max_epochs=2).fit(scheme, datamodule=datamodule)
    candidates = (scheme.student, *scheme.student_restarts)
    assert all(_changed(weights, candidate) for weights, candidate in zip(before, candidates, strict=True))
    chosen = int(scheme.trainer.callback_metrics["student_restart_chosen"])
    scheme.eval()
    with torch.no_grad():
        for batch_idx, batch in enumerate(datamodule.val_dataloader()):
            scheme._record_restart_losses(scheme.normal_only(batch), batch_idx)
    totals = torch.stack(scheme._restart_losses).sum(0)
    losses = totals[:-1] / totals[-1]
    assert int(torch.argmin(losses)) == 0, (chosen, losses)  # the best now sits in `student`
    assert float(scheme.trainer.callback_metrics["val/student_restart_loss_best"]) == pytest.approx(
        float(losses[0]), rel=1e-5)
    assert len(ScoreRegressionScheme(SHAPE, student="A", compression_ratio=None).student_restarts) == 0
    with pytest.raises(ConfigError, match="set trainer.max_epochs"):  # no last epoch to choose at
        _trainer(max_epochs=-1, max_steps=2).fit(
            ScoreRegressionScheme(SHAPE, student="A", compression_ratio=None, student_restarts=2), datamodule=_digits())
    with pytest.raises(ConfigError, match="student_restarts must be an integer >= 1"):
        ScoreRegressionScheme(SHAPE, student="A", compression_ratio=None, student_restarts=0)


def test_student_average_is_the_moving_average_of_the_student_steps_and_ships() -> None:
    """student_average=0.8: after every student step the averaged copy moves to 0.8 * itself + 0.2 *
    the student (the first step copies); validation, test and the deployable score with the average
    while the student keeps its own weights; the average survives a state-dict round trip; a decay
    outside [0, 1) and a combination with restarts are refused in one line."""
    class RecordStudent(L.Callback):
        def __init__(self) -> None:
            self.steps: list[list[torch.Tensor]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if not module.in_teacher_phase(batch_idx):
                self.steps.append(_snapshot(module.student))

    torch.manual_seed(0)
    scheme = ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, student_lr=0.01,
                                   teacher_fraction=0.25, student_average=0.8)
    assert scheme.scoring_student() is scheme.student  # nothing averaged yet
    recorder = RecordStudent()
    _trainer(max_epochs=2, limit_val_batches=0, callbacks=[recorder]).fit(scheme, datamodule=_digits(batch_size=8))
    assert len(recorder.steps) >= 8 and int(scheme.student_averaged.n_averaged) == len(recorder.steps)
    expected = recorder.steps[0]
    for step in recorder.steps[1:]:
        expected = [0.8 * e + 0.2 * p for e, p in zip(expected, step, strict=True)]
    averaged = scheme.scoring_student()
    assert averaged is scheme.student_averaged.module and averaged is not scheme.student
    for want, got in zip(expected, averaged.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert _changed(recorder.steps[-1], averaged)  # the student's last weights are not what ships
    assert not _changed(recorder.steps[-1], scheme.student)
    assert not any(p.requires_grad for p in averaged.parameters())  # no optimiser or DDP sees the copy
    scheme.eval()
    images = torch.rand(5, *SHAPE)
    deployable = scheme.deployable_model()
    with torch.no_grad():
        torch.testing.assert_close(deployable(images), averaged(images))
        reloaded = ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, student_average=0.8)
        reloaded.load_state_dict(scheme.state_dict())
        reloaded.eval()
        torch.testing.assert_close(reloaded.deployable_model()(images), deployable(images))
    for bad in (1.0, -0.1, True):
        with pytest.raises(ConfigError, match="student_average is an average's decay in \\[0, 1\\)"):
            ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, student_average=bad)
    with pytest.raises(ConfigError, match="student_average and scheme.student_restarts > 1 do not combine"):
        ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, student_average=0.9, student_restarts=2)
    assert ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None).student_averaged is None


def test_teacher_seed_trains_one_teacher_for_every_run_seed_and_leaves_the_student_to_the_seed() -> None:
    """teacher_seed=5 with the data's order fixed: runs of seeds 0 and 1 train the same teacher
    (equal weights after the teacher phase) and different students; without it the teachers
    differ; a bad value, or a seed beside an external teacher, is one ConfigError."""
    def fit(seed: int, teacher_seed: int | None) -> ScoreRegressionScheme:
        L.seed_everything(seed, verbose=False)
        scheme = ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, teacher_fraction=0.5,
                                       teacher_seed=teacher_seed)
        _trainer(max_epochs=2, limit_val_batches=0).fit(scheme, datamodule=_digits(batch_size=16))
        return scheme

    first, second = fit(0, 5), fit(1, 5)
    assert not _changed(_snapshot(first.teacher), second.teacher)
    assert _changed(_snapshot(first.student), second.student)
    assert _changed(_snapshot(fit(0, None).teacher), fit(1, None).teacher)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="teacher_seed must be a non-negative integer or null"):
            ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, teacher_seed=bad)
    with pytest.raises(ConfigError, match="an external scheme.teacher_model is already trained"):
        ScoreRegressionScheme(SHAPE, student="B", compression_ratio=None, teacher_seed=0,
                              teacher_model=lambda images: images.mean(dim=(1, 2, 3)))


def test_family_loop_trains_all_students_with_the_scheme_scores() -> None:
    torch.manual_seed(0)
    images = torch.rand(40, *SHAPE)
    teacher = ConvAutoencoder()
    tracks = [
        StudentTrack("co_learning", "G", build_student(PAPER_STUDENTS["G"], SHAPE)),
        StudentTrack("co_learning+noise", "F", build_student(PAPER_STUDENTS["F"], SHAPE), Techniques(noise_std=0.1)),
        StudentTrack("co_learning+outlier_exposure", "G", build_student(PAPER_STUDENTS["G"], SHAPE),
                     outlier_exposure=True),
    ]
    before = [_snapshot(t.model) for t in tracks] + [_snapshot(teacher)]
    fit_students(tracks, teacher, images, epochs=1, teacher_loss_fn=teacher_training_loss,
                 outliers=OutlierSampler(torch.rand(10, *SHAPE), 4), batch_size=20)
    assert all(_changed(b, m) for b, m in zip(before, [t.model for t in tracks] + [teacher], strict=True))
    assert all(np.isfinite(t.last_loss) for t in tracks)
    scores = predict(lambda x: reconstruction_score(x, teacher(x)), images, batch_size=16)
    assert scores.shape == (40,)


def test_co_learning_teacher_follows_fit_teacher_and_lr_schedules() -> None:
    """The co-learning teacher takes the same steps as a teacher trained alone (the benchmark's
    one-teacher-per-class shortcut rests on it), under both learning-rate schedules."""
    images = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(3))
    for schedule in ("cosine", "constant"):
        torch.manual_seed(0)
        alone = ConvAutoencoder()
        fit_teacher(alone, images, epochs=2, loss_fn=teacher_training_loss, batch_size=20, lr_schedule=schedule)
        torch.manual_seed(0)
        joint = ConvAutoencoder()
        track = StudentTrack("co_learning", "G", build_student(PAPER_STUDENTS["G"], SHAPE))
        fit_students([track], joint, images, epochs=2, teacher_loss_fn=teacher_training_loss, batch_size=20,
                     lr_schedule=schedule)
        for a, b in zip(alone.state_dict().values(), joint.state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        fit_teacher(ConvAutoencoder(), images, epochs=1, loss_fn=teacher_training_loss, lr_schedule="step")


def test_family_loop_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    """A run killed after its last checkpoint and started again ends with the same weights."""
    from kd_experiments.schemes.score_regression import family

    images = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(5))
    outlier_images = torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(6))

    def run(checkpoint: Path | None = None):
        torch.manual_seed(0)
        teacher = ConvAutoencoder()
        tracks = [StudentTrack("co_learning+outlier_exposure", "G", build_student(PAPER_STUDENTS["G"], SHAPE),
                               Techniques(noise_std=0.1), outlier_exposure=True)]
        fit_students(tracks, teacher, images, epochs=4, teacher_loss_fn=teacher_training_loss,
                     outliers=OutlierSampler(outlier_images, 4, seed=1), batch_size=20, lr_schedule="cosine",
                     checkpoint=checkpoint, checkpoint_every=2)
        return teacher, tracks[0].model

    reference = run()
    checkpoint = tmp_path / "family.pt"
    batches, calls = family._batches, {"count": 0}

    def killed_in_epoch_three(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return batches(*args, **kwargs)

    monkeypatch.setattr(family, "_batches", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint)
    monkeypatch.setattr(family, "_batches", batches)
    assert torch.load(checkpoint, weights_only=True)["epochs_done"] == 2
    resumed = run(checkpoint)
    for expected, got in zip(reference, resumed, strict=True):
        for a, b in zip(expected.state_dict().values(), got.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="saved by another run"):
        fit_students([], ConvAutoencoder(), images, epochs=3, teacher_loss_fn=teacher_training_loss,
                     batch_size=20, checkpoint=checkpoint)


# -- any trained model as teacher --------------------------------------------------------------
def test_any_callable_or_scheme_checkpoint_is_a_teacher(tmp_path: Path) -> None:
    data = _digits()
    torch.manual_seed(0)
    source = ScoreRegressionScheme(SHAPE, student="E", compression_ratio=None, co_learning=True)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(source, datamodule=data)
    checkpoint = tmp_path / "source.ckpt"
    trainer.save_checkpoint(checkpoint)

    teacher = load_scheme_teacher("kd_experiments.schemes.score_regression.ScoreRegressionScheme", checkpoint)
    images = data.test_dataset.images[:8]
    source.eval()
    with torch.no_grad():
        assert torch.allclose(teacher(images), source.student(images), atol=1e-6)  # the deployed score
    scheme = ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, teacher_model=teacher)
    assert scheme.compression_summary()["teacher_params"] == count_parameters(source)
    teacher_before, student_before = _snapshot(scheme.teacher), _snapshot(scheme.student)
    _trainer(max_epochs=1, limit_val_batches=1).fit(scheme, datamodule=data)
    assert not _changed(teacher_before, scheme.teacher) and _changed(student_before, scheme.student)

    # any callable: a function of the image with a declared size
    brightness = ScoreTeacher(lambda x: x.flatten(1).mean(1), parameters_count=1000)
    scheme = ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, teacher_model=brightness)
    assert scheme.compression_summary()["compression_ratio"] == pytest.approx(1000 / 77)
    _trainer(max_epochs=1, limit_val_batches=1).test(scheme, datamodule=data, verbose=False)
    expected = image_auroc(data.test_dataset.images.flatten(1).mean(1), data.test_dataset.labels)
    assert scheme.test_metrics["teacher_image_auroc"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="co_learning"):
        ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, teacher_model=brightness, co_learning=True)
    with pytest.raises(ConfigError, match="no parameters"):
        ScoreRegressionScheme(SHAPE, student="G", compression_ratio=None, teacher_model=lambda x: x.mean((1, 2, 3)))


# -- metrics and the pipeline -------------------------------------------------------------------
def test_pipeline_run_with_all_techniques_logs_retention_and_tpr(compose_cfg, tmp_path: Path) -> None:
    root = _write_idx(tmp_path / "fmnist_idx")
    cfg = compose_cfg(
        "experiment=quickstart", "scheme=score_regression_co_learning_oe", "scheme.student=G",
        "scheme.compression_ratio=null", f"scheme.outlier_exposure.root={root}", "scheme.noise_exposure.std=0.1",
        "scheme.tail_reweighting.strength=1.0", "+data.max_train_samples=64",
        "logger=none", *fast_overrides("trainer.max_epochs=1"),
    )
    assert cfg.scheme.co_learning and cfg.scheme.outlier_exposure.dataset == "fashion_mnist"
    metrics = train(cfg)
    for key in ("test/image_auroc", "test/teacher_image_auroc", "test/image_auroc_retention",
                "test/wasserstein_anomalous", "test/tpr_at_fpr_1e-3", "test/tpr_at_fpr_1e-4",
                "test/tpr_at_fpr_1e-5", "test/teacher_tpr_at_fpr_1e-5"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["test/image_auroc_retention"] == pytest.approx(
        metrics["test/image_auroc"] / metrics["test/teacher_image_auroc"])


# -- deployment ------------------------------------------------------------------------------
@pytest.mark.parametrize("student", ["G", "mlp"])
def test_int8_and_onnx_students_match_fp32(student: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if student == "mlp":
        model, inputs = MLPScoreRegressor(57, (8,)).eval(), torch.randn(256, 57)
    else:
        # positive weights and images from dark to bright: scores spread like a trained one's
        brightness = torch.linspace(0.05, 1.0, 256).view(-1, 1, 1, 1)
        model, inputs = build_student(PAPER_STUDENTS["G"], SHAPE).eval(), torch.rand(256, *SHAPE) * brightness
        for parameter in model.parameters():
            torch.nn.init.uniform_(parameter, 0.0, 0.5)
    with torch.no_grad():
        reference = model(inputs)
    quantised = quantize_int8_static(model, [inputs[i : i + 64] for i in range(0, 256, 64)])
    with torch.no_grad():
        int8_scores = quantised(inputs)
    spread = (reference.max() - reference.min()).item()
    assert (int8_scores - reference).abs().max().item() < 0.05 * spread + 1e-3
    assert np.corrcoef(int8_scores.numpy(), reference.numpy())[0, 1] > 0.99
    path = export_onnx(model, inputs[:1], tmp_path / f"{student}.onnx")
    assert onnx_parity(model, path, inputs) <= 1e-4


def test_events_teacher_and_student_shapes() -> None:
    teacher, student = MLPAutoencoder(57, latent_dim=3).eval(), MLPScoreRegressor(57, (4,))
    features = torch.randn(5, 57)
    assert teacher(features).shape == (5, 57) and student(features).shape == (5,)
    assert 4000 < count_parameters(teacher) < 6000


def test_corruption_and_warp_exposure_refuse_feature_vectors() -> None:
    with pytest.raises(ConfigError, match="feature vectors of shape"):
        ScoreRegressionScheme(input_shape=(57,), student="auto", compression_ratio=4,
                              corruption_exposure={"warp_copies": 1})
