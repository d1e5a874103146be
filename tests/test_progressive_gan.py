"""Progressive GAN distillation: size family, the schedule's steps, guards, score direction, DDP."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset

from kd_experiments.compression import count_macs
from kd_experiments.errors import CheckpointError, ConfigError, TrainingDivergedError
from kd_experiments.metrics import image_auroc
from kd_experiments.schemes.progressive_gan import ProgressiveGANScheme
from kd_experiments.schemes.progressive_gan import torch_model as pg_torch_model
from kd_experiments.schemes.progressive_gan.torch_model import (
    EDEGenerator,
    GeneratorSpec,
    student_spec_for_ratio,
)
from kd_experiments.train import train
from tests.conftest import fast_overrides

SIDE = 16
TINY = {"teacher_width": 4, "teacher_depth": 2, "latent_dim": 8, "student_width": 1,
        "student_discriminator_width": 2, "mac_compression_ratio": None}


class _Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index]), "index": index}


def _squares(count: int, generator: torch.Generator) -> torch.Tensor:
    """Normal images in [0, 1]: a bright centred square on a dark, slightly noisy background."""
    images = torch.rand(count, 1, SIDE, SIDE, generator=generator) * 0.1
    images[:, :, 5:11, 5:11] = 0.9
    return images


def _loader(images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 8) -> DataLoader:
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    return DataLoader(_Images(images, labels), batch_size=batch_size, shuffle=False)


def _trainer(max_epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks or [])


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


class _PhaseRecorder(L.Callback):
    """Per batch: the phase, and whether the teacher / student generators changed."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._phase = pl_module.current_phase(batch_idx)
        self._teacher = _flat(pl_module.teacher_generator)
        self._student = _flat(pl_module.student_generator)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        teacher_changed = not torch.equal(self._teacher, _flat(pl_module.teacher_generator))
        student_changed = not torch.equal(self._student, _flat(pl_module.student_generator))
        self.rows.append((self._phase, teacher_changed, student_changed))


# -- size family ------------------------------------------------------------------------------
def test_student_family_reaches_300_to_1_in_macs() -> None:
    teacher = GeneratorSpec(32, 3)
    example = torch.zeros(1, 1, 32, 32)
    teacher_macs = count_macs(EDEGenerator(teacher, 32), example)
    student = student_spec_for_ratio(teacher, 32, 1, mac_compression_ratio=300)
    assert teacher_macs / count_macs(EDEGenerator(student, 32), example) >= 300
    with pytest.raises(ConfigError, match="cannot be reached"):
        student_spec_for_ratio(teacher, 32, 1, mac_compression_ratio=10_000)
    scheme = ProgressiveGANScheme(input_shape=(1, 32, 32), role="student_pkd", mac_compression_ratio=100)
    summary = scheme.compression_summary()
    assert summary["mac_compression_ratio"] >= 100
    assert summary["teacher_macs"] == teacher_macs
    assert summary["compression_ratio"] == pytest.approx(summary["teacher_params"] / summary["student_params"])
    with pytest.raises(ConfigError, match="data.image_size=32"):
        ProgressiveGANScheme(input_shape=(1, 28, 28))


def test_same_seed_same_student_whatever_ran_before_in_the_process() -> None:
    """The student-size search builds (and caches) probe generators; they must not draw from
    the global RNG, or a seeded model would differ between a cold and a warm cache."""
    settings = {**TINY, "student_width": None, "mac_compression_ratio": 5.0}

    def student_weights() -> torch.Tensor:
        torch.manual_seed(0)
        scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_alone", **settings)
        return _flat(scheme.student_generator)

    pg_torch_model._sizes.cache_clear()
    cold = student_weights()
    warm = student_weights()
    assert torch.equal(cold, warm)


def test_student_learning_rate_applies_to_the_student_networks_only() -> None:
    scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_pkd", student_learning_rate=1e-3, **TINY)
    rates = [optimizer.param_groups[0]["lr"] for optimizer in scheme.configure_optimizers()]
    assert rates == [2e-4, 2e-4, 1e-3, 1e-3]  # teacher G, teacher D, student G, student D
    default = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_pkd", **TINY)
    assert [optimizer.param_groups[0]["lr"] for optimizer in default.configure_optimizers()] == [2e-4] * 4
    with pytest.raises(ConfigError, match="student_learning_rate"):
        ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_pkd", student_learning_rate=0.0, **TINY)


# -- the schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "phases"),
    [("student_pkd", ["teacher", "distill", "joint"]),
     ("student_one_step", ["teacher", "distill"]),
     ("student_alone", ["teacher", "alone"])],
)
def test_schedule_runs_teacher_then_each_step(role: str, phases: list[str]) -> None:
    torch.manual_seed(0)
    images = _squares(32, torch.Generator().manual_seed(0))
    scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role=role, **TINY)
    recorder = _PhaseRecorder()
    _trainer(3, [recorder]).fit(scheme, train_dataloaders=_loader(images))
    seen = [phase for phase, _, _ in recorder.rows]
    assert len(seen) == 12
    assert sorted(set(seen), key=seen.index) == phases  # in this order, each phase present
    assert seen == sorted(seen, key=phases.index)  # no phase comes back
    for phase, teacher_changed, student_changed in recorder.rows:
        if phase == "teacher":
            assert teacher_changed and not student_changed
        elif phase in ("distill", "alone"):  # step 1: the teacher is fixed
            assert student_changed and not teacher_changed
        else:  # step 2: both fine-tuned jointly
            assert student_changed and teacher_changed


def test_teacher_checkpoint_skips_the_teacher_phase(tmp_path: Path) -> None:
    teacher = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="teacher", **TINY)
    state = {k: v for k, v in teacher.state_dict().items() if k.startswith("teacher_")}
    torch.save({"state_dict": state}, tmp_path / "teacher.ckpt")
    scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_pkd",
                                  teacher_checkpoint=str(tmp_path / "teacher.ckpt"), **TINY)
    assert torch.equal(_flat(scheme.teacher_generator), _flat(teacher.teacher_generator))
    recorder = _PhaseRecorder()
    _trainer(1, [recorder]).fit(scheme, train_dataloaders=_loader(_squares(32, torch.Generator().manual_seed(1))))
    assert [phase for phase, _, _ in recorder.rows] == ["distill", "distill", "distill", "joint"]
    with pytest.raises(CheckpointError, match="does not exist"):
        ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), teacher_checkpoint=str(tmp_path / "none.ckpt"), **TINY)
    wider = {**TINY, "teacher_width": 8}
    with pytest.raises(CheckpointError, match="does not fit"):
        ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), teacher_checkpoint=str(tmp_path / "teacher.ckpt"), **wider)


# -- score direction --------------------------------------------------------------------------
def test_anomalies_score_higher_for_teacher_and_student() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="student_pkd", **{**TINY, "student_width": 2})
    _trainer(6).fit(scheme, train_dataloaders=_loader(_squares(64, generator), batch_size=8))
    normal = _squares(16, generator)
    anomalous = 1.0 - _squares(16, generator)  # inverted: a dark square on a bright background
    labels = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    scheme.eval()
    with torch.no_grad():
        scores = scheme.score_batch({"image": torch.cat([normal, anomalous])})
    assert image_auroc(scores["teacher_score"], labels) > 0.9
    assert image_auroc(scores["score"], labels) > 0.9


# -- guards -----------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [1e9, 1e-5])
def test_discriminator_collapse_reinitialises_and_is_logged(threshold: float) -> None:
    scheme = ProgressiveGANScheme(input_shape=(1, SIDE, SIDE), role="teacher", collapse_threshold=threshold, **TINY)
    trainer = _trainer(1)
    trainer.fit(scheme, train_dataloaders=_loader(_squares(16, torch.Generator().manual_seed(0))))
    resets = scheme.discriminator_resets["teacher"]
    assert float(trainer.callback_metrics["train/teacher_discriminator_resets"]) == resets
    batch_norm = next(m for m in scheme.teacher_discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if threshold > 1:  # every discriminator loss is "collapsed": re-initialised after each step
        assert resets == 2
        assert torch.equal(batch_norm.running_mean, torch.zeros_like(batch_norm.running_mean))
    else:
        assert resets == 0
        assert not torch.equal(batch_norm.running_mean, torch.zeros_like(batch_norm.running_mean))


def test_smoke_run_logs_artifacts_and_nan_fails_keeping_the_checkpoint(
    compose_cfg, mlflow_uri: str, tmp_path: Path
) -> None:
    cfg = compose_cfg("experiment=pkd_smoke", *fast_overrides("trainer.max_epochs=2"))
    metrics = train(cfg)
    assert 0.0 <= metrics["test/image_auroc"] <= 1.0 and "test/teacher_image_auroc" in metrics
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("pkd_smoke")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["mac_compression_ratio"]) > 1
    assert run.data.params["role"] == "student_pkd"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc_curve.png", "plots/score_histograms.png", "plots/reconstructions.png"} <= plots

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = checkpoint.stat().st_mtime_ns
    cfg = compose_cfg("experiment=pkd_smoke", *fast_overrides("trainer.max_epochs=4", f"ckpt_path={checkpoint}",
                                                               "scheme.latent_weight=nan"))
    with pytest.raises(TrainingDivergedError, match="became"):
        train(cfg)
    assert checkpoint.stat().st_mtime_ns == before
    (resumed,) = client.search_runs([experiment.experiment_id])  # resuming continues the same run
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FAILED"
    assert "became" in resumed.data.tags["error"]
