"""Train a teacher and a whole family of students in one loop (plain PyTorch).

Pol et al., "Knowledge Distillation for Anomaly Detection" (arXiv 2310.06047): the
authors' scripts (AdrianAlan/kd4ad, ``experiment-*.py``) train the teacher and the seven
students A-G of a technique together, batch by batch, which keeps the cost of a
(class, technique) run close to that of one teacher. This module does the same for
benchmarks, with the scheme's own pieces (:func:`.torch_model.reconstruction_score`,
:func:`.techniques.student_batch`, :func:`.techniques.weighted_l1`,
:func:`.lightning_model.teacher_training_loss`), so a benchmark's scores are the
framework's scores. The Lightning scheme remains the way to train one student with
tracking; this is the way to train forty of them on one CPU core. The loops run on the
device of the images and models they are given (a GPU too) and never synchronise with
the host inside an epoch.

Differences from the authors' code, all for a CPU budget and a clean protocol: a fixed
number of epochs with a cosine learning-rate decay or a constant rate (theirs: 300
epochs, constant lr 1e-3 under ReduceLROnPlateau; their checkpoint-on-validation-loss
never updates its best loss, so it keeps the last epoch, as here); no test-split image anywhere in
training (their outlier exposure read the other set's test split).

Every technique of a class shares one teacher: :func:`fit_students` with
``teacher_loss_fn`` trains the teacher together with the co-learning students (with no
track it is :func:`fit_teacher`: same batch order, same trajectory), then the
baseline-schedule students learn from the now frozen teacher. Every input variant a batch needs (clean,
noisy, with outliers) is scored by the teacher once and reused by every student track.

Long runs (the authors' 300 epochs take about half an hour per class on one CPU core) can
be resumed: with ``checkpoint``, :func:`fit_students` saves every model, optimiser,
scheduler and random-number generator every ``checkpoint_every`` epochs, and a later call
with the same arguments continues from there, to exactly the weights an uninterrupted run
reaches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kd_experiments.schedules import COSINE_FLOOR, LR_SCHEDULES
from kd_experiments.schemes.score_regression.techniques import (
    OutlierSampler,
    Techniques,
    student_batch,
    tail_weights,
    weighted_l1,
)
from kd_experiments.schemes.score_regression.torch_model import ReconstructionScorer


@dataclass
class StudentTrack:
    """One student trained under one technique."""

    technique: str
    student: str
    model: nn.Module
    techniques: Techniques = field(default_factory=Techniques)
    outlier_exposure: bool = False
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    last_loss: float = float("nan")

    @property
    def variant(self) -> tuple[float, bool]:
        """The student input variant: (noise std, with outliers)."""
        return (self.techniques.noise_std, self.outlier_exposure)


def _adam(module: nn.Module, lr: float, weight_decay: float, total_steps: int, schedule: str = "cosine"):
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    eta_min = lr * COSINE_FLOOR if schedule == "cosine" else lr  # cosine: to 2 % of lr; constant: the authors' lr
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=eta_min)
    return optimizer, scheduler


def _batches(count: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """A seeded shuffled split into batches: drawn on the CPU (the same order on any
    device), then moved to the images' device."""
    order = torch.randperm(count, generator=generator).to(device)
    return list(order.split(batch_size))


def autoencoder_scorer(teacher: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's anomaly score function (``log(1 + MSE)``), as in the scheme."""
    return ReconstructionScorer(teacher)


def fit_teacher(
    teacher: nn.Module,
    images: torch.Tensor,
    epochs: int,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    lr_schedule: str = "cosine",
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the teacher alone (the baseline schedule's first phase); returns epoch losses.

    ``on_epoch_end(epoch, mean_loss)`` (epochs counted from 1) is called after every
    epoch with the teacher in eval mode, e.g. to measure it on validation data.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(images) // batch_size)
    optimizer, scheduler = _adam(teacher, lr, weight_decay, steps, lr_schedule)
    history = []
    for _ in range(epochs):
        teacher.train()
        losses = []
        for index in _batches(len(images), batch_size, generator, images.device):
            loss = loss_fn(teacher, images[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())  # no host sync per step (GPU)
        history.append(float(torch.stack(losses).mean()) if losses else float("nan"))
        if on_epoch_end is not None:
            teacher.eval()
            on_epoch_end(len(history), history[-1])
    teacher.eval()
    return history


def fit_students(
    tracks: list[StudentTrack],
    teacher: nn.Module,
    images: torch.Tensor,
    epochs: int,
    teacher_loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    outliers: OutlierSampler | None = None,
    batch_size: int = 100,
    outlier_batch_size: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    teacher_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lr_schedule: str = "cosine",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
) -> None:
    """Train every track's student on ``images`` for ``epochs``, all in one loop.

    With ``teacher_loss_fn`` the teacher takes a step on each batch first (co-learning);
    without, it stays frozen. ``teacher_score`` defaults to the autoencoder score.
    ``lr_schedule``: ``cosine`` (decay to 2% of ``lr``) or ``constant`` (the authors').
    ``checkpoint``: a file to save the whole state to every ``checkpoint_every`` epochs and
    to resume from when it exists (it must come from a call with the same tracks and
    epochs); it is left in place at the end, for the caller to remove.
    """
    generator = torch.Generator().manual_seed(seed)  # the same batch order as fit_teacher
    noise_generator = torch.Generator().manual_seed(seed + 2)
    steps = epochs * -(-len(images) // batch_size)
    for track in tracks:
        track.optimizer, track.scheduler = _adam(track.model, lr, weight_decay, steps, lr_schedule)
    co_learning = teacher_loss_fn is not None
    if co_learning:
        teacher_optimizer, teacher_scheduler = _adam(teacher, lr, weight_decay, steps, lr_schedule)
    else:
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    score = teacher_score or autoencoder_scorer(teacher)
    if any(track.outlier_exposure for track in tracks) and outliers is None:
        raise ValueError("a track uses outlier exposure but no outlier sampler is given")

    state = _ResumeState(checkpoint, tracks, teacher, epochs, generator, noise_generator, outliers,
                         (teacher_optimizer, teacher_scheduler) if co_learning else None)
    start_epoch = state.load()
    last_losses: dict[int, torch.Tensor] = {}
    for epoch in range(start_epoch, epochs):
        for track in tracks:
            track.model.train()
        for index in _batches(len(images), batch_size, generator, images.device):
            batch = images[index]
            if co_learning:
                teacher.train()
                loss = teacher_loss_fn(teacher, batch)
                teacher_optimizer.zero_grad()
                loss.backward()
                teacher_optimizer.step()
                teacher_scheduler.step()
            teacher.eval()
            outlier_batch = outliers.sample(outlier_batch_size or len(batch)) if outliers is not None else None
            variants: dict[tuple[float, bool], tuple[torch.Tensor, torch.Tensor]] = {}
            for track in tracks:
                if track.variant not in variants:
                    plain = Techniques(noise_std=track.techniques.noise_std, noise_clip=track.techniques.noise_clip)
                    inputs, targets, _ = student_batch(
                        batch, score, plain, outlier_batch if track.outlier_exposure else None, noise_generator
                    )
                    variants[track.variant] = (inputs, targets)
                inputs, targets = variants[track.variant]
                weights = tail_weights(targets, track.techniques.tail_strength)
                loss = weighted_l1(track.model(inputs), targets, weights)
                track.optimizer.zero_grad()
                loss.backward()
                track.optimizer.step()
                track.scheduler.step()
                last_losses[id(track)] = loss.detach()  # read once per epoch: no host sync per step
        for track in tracks:
            if id(track) in last_losses:
                track.last_loss = float(last_losses[id(track)])
        if checkpoint is not None and (epoch + 1) % max(1, checkpoint_every) == 0 and epoch + 1 < epochs:
            state.save(epoch + 1)
    teacher.eval()
    for track in tracks:
        track.model.eval()


class _ResumeState:
    """Save and restore everything :func:`fit_students` changes (see the module docstring)."""

    def __init__(self, path, tracks, teacher, epochs, generator, noise_generator, outliers, teacher_opt) -> None:
        self.path = None if path is None else Path(path)
        self.tracks, self.teacher, self.teacher_opt = tracks, teacher, teacher_opt
        self.generators = {"batches": generator, "noise": noise_generator}
        if outliers is not None:
            self.generators["outliers"] = outliers.generator
        self.signature = {"epochs": epochs, "co_learning": teacher_opt is not None,
                          "tracks": [(t.technique, t.student) for t in tracks]}

    def save(self, epochs_done: int) -> None:
        state = {
            "signature": self.signature,
            "epochs_done": epochs_done,
            "teacher": self.teacher.state_dict(),
            "tracks": [{"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                        "scheduler": t.scheduler.state_dict(), "last_loss": t.last_loss} for t in self.tracks],
            "generators": {name: g.get_state() for name, g in self.generators.items()},
        }
        if self.teacher_opt is not None:
            state["teacher_optimizer"] = self.teacher_opt[0].state_dict()
            state["teacher_scheduler"] = self.teacher_opt[1].state_dict()
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, temporary)
        temporary.replace(self.path)  # atomic: a kill leaves the previous checkpoint intact

    def load(self) -> int:
        """Restore the checkpoint if there is one; returns the number of epochs it holds."""
        if self.path is None or not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        signature = {**state["signature"], "tracks": [tuple(t) for t in state["signature"]["tracks"]]}
        if signature != self.signature:
            raise ValueError(f"{self.path} was saved by another run ({signature}), not {self.signature}: "
                             "delete it or pass another checkpoint path")
        self.teacher.load_state_dict(state["teacher"])
        for track, saved in zip(self.tracks, state["tracks"], strict=True):
            track.model.load_state_dict(saved["model"])
            track.optimizer.load_state_dict(saved["optimizer"])
            track.scheduler.load_state_dict(saved["scheduler"])
            track.last_loss = saved["last_loss"]
        if self.teacher_opt is not None:
            self.teacher_opt[0].load_state_dict(state["teacher_optimizer"])
            self.teacher_opt[1].load_state_dict(state["teacher_scheduler"])
        for name, generator in self.generators.items():
            generator.set_state(state["generators"][name])
        return int(state["epochs_done"])


@torch.no_grad()
def predict(score_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Scores of ``images`` in batches, ``(N,)``, on the CPU (whatever device the model and images are on)."""
    return torch.cat([score_fn(images[start : start + batch_size]).float().cpu()
                      for start in range(0, len(images), batch_size)])
