"""Unsupervised-to-supervised compression as a LightningModule.

Pol, Govorkova, Ojalvo, Pierini, Chernyavskaya, Elmer, Harris, Gronroos,
"Knowledge Distillation for Anomaly Detection", arXiv 2310.06047 (2023).

An unsupervised teacher (the convolutional autoencoder of
:mod:`~kd_experiments.schemes.score_regression.torch_model`, optionally a VAE, or the
dense autoencoder of :mod:`~kd_experiments.schemes.score_regression.events_model` for
collision events) learns to reconstruct normal samples with an MSE loss; its anomaly
score is ``log(1 + per-sample MSE)``. A tiny supervised student learns to regress that
score with an L1 loss, so at deployment only the student runs.

Schedule (a fixed fraction of the training steps, so ``trainer.max_epochs`` and
``fast_dev_run`` both work): with ``co_learning=False`` (the paper's baseline) the
teacher trains alone for the first ``teacher_fraction`` of the steps, then is frozen
while the student learns from it; with ``co_learning=True`` every batch takes a
teacher step and then a student step on the current teacher's scores (the paper's
co-learning). The two optimisers are Adam, lr 1e-3, weight decay 1e-5, as in the
authors' code (AdrianAlan/kd4ad); the authors' ReduceLROnPlateau and 300 epochs are
left to the trainer config (a fixed schedule here).

Techniques, each a config switch, combinable (:mod:`.techniques`): pseudo outlier
exposure (``outlier_exposure.dataset``/``root``: the other IDX set's training images,
or ``dataset=photo_patches``: crops of scikit-learn's bundled photographs, no root;
read lazily at the start of fit through ``load_idx_split``; the data must be in
[0, 1], ``data.normalization=none``), noise exposure (``noise_exposure.std``), corruption exposure
(``corruption_exposure.copies``), tail
re-weighting (``tail_reweighting.strength``). Where the paper's code and the paper
differ, the docstring of :mod:`.techniques` says which one is followed.

Any trained model as teacher (:mod:`.teachers`): ``teacher_model`` (a callable or a
scheme checkpoint through :func:`.teachers.load_scheme_teacher`) replaces the
autoencoder; it is frozen and every batch trains the student only.

Deployment: :meth:`ScoreRegressionScheme.deployable_model` is the student alone behind the
datamodule's preprocessing (:mod:`.deploy`); the test step scores through it. The teacher
in the same form (:meth:`~ScoreRegressionScheme.teacher_deployable_model`) is the reference
of ``deployed_compression_ratio``.

Test metrics: the base class's (AUROC, TPR at FPR 1e-2/1e-3/1e-4 of student and
teacher, Wasserstein distance between their scores on anomalies) plus
``image_auroc_retention`` (student / teacher) and TPR at FPR 1e-5 (the event-data
operating point; meaningful only with >= 1e5 normal test samples).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kd_experiments import metrics as kd_metrics
from kd_experiments.compression import count_macs, count_parameters, size_summary
from kd_experiments.deployable import DeployableModel, deployed_sizes
from kd_experiments.errors import ConfigError
from kd_experiments.schemes.base import AnomalyScheme
from kd_experiments.schemes.score_regression.deploy import (
    ExternalTeacherDeployable,
    ReconstructionScoreDeployable,
    ScoreRegressionDeployable,
)
from kd_experiments.schemes.score_regression.teachers import ScoreTeacher
from kd_experiments.schemes.score_regression.techniques import (
    BUNDLED_OUTLIERS,
    OUTLIER_SETS,
    OutlierSampler,
    Techniques,
    load_outlier_images,
    student_batch,
    weighted_l1,
)
from kd_experiments.schemes.score_regression.torch_model import (
    VariationalAutoencoder,
    build_student,
    build_teacher,
    reconstruction_score,
    resolve_student_spec,
)

#: extra false positive rates reported beyond the base class's
EXTRA_FPRS: tuple[float, ...] = (1e-5,)
#: the student's learning-rate schedule over its steps: ``student_lr`` throughout, or a
#: cosine decay from ``student_lr`` to 0 over the steps in which the student trains
STUDENT_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: seed of the validation draws that rank the student restarts (the same set every epoch)
RESTART_VALIDATION_SEED = 20_231_006


def _options(value: dict | None, name: str, allowed: dict[str, Any]) -> dict[str, Any]:
    """A technique's sub-config merged over its defaults; unknown keys are refused."""
    merged = dict(allowed)
    for key, item in dict(value or {}).items():
        if key not in allowed:
            raise ConfigError(f"scheme.{name}.{key} is unknown; keys: {sorted(allowed)}")
        merged[key] = item
    return merged


class ScoreRegressionScheme(AnomalyScheme):
    """Autoencoder teacher -> small CNN student regressing the teacher's anomaly score.

    Args:
        input_shape: ``(C, H, W)`` of the images (from the datamodule; 28x28 for the
            paper's teacher) or ``(F,)`` of feature vectors (collision events).
        compression_ratio: target ``teacher_params / student_params`` when ``student=auto``.
        student: ``auto`` (closest to ``compression_ratio``), a paper name ``A``..``G``,
            or an explicit spec ``{form, channels, strides, final_pool}`` (``form=mlp``
            with hidden widths as ``channels`` for feature vectors).
        latent_dim: the teacher's latent size (20 in the paper; 3 for events).
        teacher_fraction: share of the training steps in which the teacher trains alone
            (baseline schedule); ignored with ``co_learning`` or an external teacher.
        co_learning: train teacher and student together, batch by batch.
        teacher_lr, student_lr, weight_decay: Adam settings.
        teacher: ``autoencoder`` (the paper's) or ``vae``.
        vae_beta: weight of the KL term (per input element) of the VAE teacher.
        outlier_exposure: ``{dataset, root, batch_size, max_images}``: pseudo outliers
            from ``dataset`` (``mnist`` | ``fashion_mnist`` in ``root``, or the bundled
            ``photo_patches``); off when
            ``dataset`` is null. ``batch_size`` defaults to the normal batch's size.
        noise_exposure: ``{std, clip}``: the student sees ``clip(x + std * N(0, 1))``
            labelled by the teacher; off when ``std`` is 0.
        tail_reweighting: ``{strength}``: per-sample L1 weights ``1 + strength * relu(z)``.
        corruption_exposure: ``{copies}``: the student also sees ``copies`` corrupted
            copies of each normal image (a stroke, an erased block or a blend with
            another normal image), labelled by the teacher; off when ``copies`` is 0.
            ``warp_copies``: also that many warped copies (random affine and elastic map).
        student_restarts: how many students of the chosen size train side by side from different
            initialisations, on the same batches; after the last epoch the one with the least
            validation loss (L1 to the teacher on held-out normal images, their corrupted copies
            and pseudo outliers, drawn the same way every epoch: no anomaly label is used) becomes
            ``student``. 1: a single student. Tiny students depend on their initialisation
            (one with a dead channel scores anomalies at random); restarts remove that lottery.
        student_schedule: ``constant`` (``student_lr`` throughout) or ``cosine`` (decayed
            from ``student_lr`` to 0 over the student's steps: the final weights are those
            of a small step size, so they vary less from seed to seed).
        student_average: decay of an exponential moving average of the student's weights
            (Polyak averaging, ``torch.optim.swa_utils.AveragedModel``), updated after every
            student step; the average is what validates, tests and ships, while the student
            keeps training at ``student_lr``. 0: off (the last step's weights). 0.99 averages
            over about the last 100 student steps, which smooths the step-to-step noise of a
            constant, high learning rate.
        teacher_seed: the seed of the teacher's initial weights, apart from the run's seed
            (``None``: the run's). With the data's order fixed too (``data.seed``), the
            autoencoder teacher of the baseline schedule is then the same network in every
            run of a sweep, and the seed varies the student alone (its initial weights and
            its draws of outliers and corruptions): a chart over compression ratios then shows
            what the student's size costs, not which teacher a seed happened to train. A VAE
            teacher's sampling noise still follows the run's seed.
        teacher_model: a trained detector as teacher (a callable ``images -> (B,)`` or a
            :class:`~kd_experiments.schemes.score_regression.teachers.ScoreTeacher`);
            replaces ``teacher``.
    """

    scheme_name = "score_regression"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        compression_ratio: float | None = 8.0,
        student: str | dict | None = "auto",
        latent_dim: int = 20,
        teacher_fraction: float = 0.5,
        co_learning: bool = False,
        teacher_lr: float = 1e-3,
        student_lr: float = 1e-3,
        weight_decay: float = 1e-5,
        teacher: str = "autoencoder",
        vae_beta: float = 1.0,
        outlier_exposure: dict | None = None,
        noise_exposure: dict | None = None,
        tail_reweighting: dict | None = None,
        teacher_model: Any = None,
        corruption_exposure: dict | None = None,
        student_schedule: str = "constant",
        student_restarts: int = 1,
        student_average: float = 0.0,
        teacher_seed: int | None = None,
    ) -> None:
        super().__init__()
        input_shape = tuple(int(v) for v in input_shape)
        if not 0.0 < teacher_fraction < 1.0:
            raise ConfigError(f"scheme.teacher_fraction must be in (0, 1), got {teacher_fraction}")
        if isinstance(student_restarts, bool) or int(student_restarts) != student_restarts or student_restarts < 1:
            raise ConfigError(f"scheme.student_restarts must be an integer >= 1, got {student_restarts!r}")
        if student_schedule not in STUDENT_SCHEDULES:
            raise ConfigError(f"scheme.student_schedule={student_schedule!r}: use one of {list(STUDENT_SCHEDULES)}")
        if isinstance(student_average, bool) or not 0.0 <= float(student_average) < 1.0:
            raise ConfigError(f"scheme.student_average is an average's decay in [0, 1) (0: off), got {student_average!r}")
        if teacher_seed is not None and (isinstance(teacher_seed, bool) or int(teacher_seed) != teacher_seed
                                         or teacher_seed < 0):
            raise ConfigError(f"scheme.teacher_seed must be a non-negative integer or null, got {teacher_seed!r}")
        if teacher_seed is not None and teacher_model is not None:
            raise ConfigError("scheme.teacher_seed seeds the teacher this run trains; an external "
                              "scheme.teacher_model is already trained: set teacher_seed to null")
        if float(student_average) > 0 and int(student_restarts) > 1:
            raise ConfigError("scheme.student_average and scheme.student_restarts > 1 do not combine: "
                              "the restarts are ranked by their own last weights; use one of them")
        self.save_hyperparameters(ignore=["teacher_model"])
        self.automatic_optimization = False
        self.input_shape = input_shape
        self.external_teacher = teacher_model is not None
        if self.external_teacher:
            if co_learning:
                raise ConfigError("scheme.co_learning needs a trainable teacher; an external teacher_model is frozen")
            self.teacher = teacher_model if isinstance(teacher_model, ScoreTeacher) else ScoreTeacher(teacher_model)
            teacher_params = self.teacher.num_parameters()
        else:
            # with teacher_seed, from a stream of its own: the run's stream is not advanced by it
            with torch.random.fork_rng(devices=[], enabled=teacher_seed is not None):
                if teacher_seed is not None:
                    torch.manual_seed(int(teacher_seed))
                self.teacher = build_teacher(teacher, input_shape, latent_dim)
            teacher_params = count_parameters(self.teacher)
        self.student_spec = resolve_student_spec(student, compression_ratio, teacher_params, input_shape)
        self.student = build_student(self.student_spec, input_shape)
        # restarts: more students of the same size from other initialisations, trained on the same
        # batches; the one of least validation loss is swapped into ``student`` after the last epoch
        self.student_restarts = nn.ModuleList(
            [build_student(self.student_spec, input_shape) for _ in range(int(student_restarts) - 1)])
        self._restart_losses: list[torch.Tensor] = []
        # the averaged student (a copy that no optimiser sees): validates, tests and ships
        self.student_averaged = (
            AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(float(student_average)), use_buffers=True)
            if float(student_average) > 0 else None)
        if self.student_averaged is not None:
            self.student_averaged.requires_grad_(False)

        noise = _options(noise_exposure, "noise_exposure", {"std": 0.0, "clip": [0.0, 1.0]})
        tail = _options(tail_reweighting, "tail_reweighting", {"strength": 0.0})
        corruption = _options(corruption_exposure, "corruption_exposure", {"copies": 0, "warp_copies": 0})
        self.techniques = Techniques(
            noise_std=float(noise["std"]),
            noise_clip=None if noise["clip"] is None else (float(noise["clip"][0]), float(noise["clip"][1])),
            tail_strength=float(tail["strength"]),
            corruption_copies=int(corruption["copies"]),
            warp_copies=int(corruption["warp_copies"]),
        )
        if (self.techniques.corruption_copies or self.techniques.warp_copies) and len(input_shape) != 3:
            raise ConfigError(f"scheme.corruption_exposure corrupts and warps images (C, H, W); the data gives "
                              f"feature vectors of shape {input_shape}: set its copies and warp_copies to 0")
        self.outlier_options = _options(
            outlier_exposure, "outlier_exposure", {"dataset": None, "root": None, "batch_size": None, "max_images": None}
        )
        if self.outlier_options["dataset"] is not None:
            if self.outlier_options["dataset"] not in OUTLIER_SETS:
                raise ConfigError(
                    f"scheme.outlier_exposure.dataset={self.outlier_options['dataset']!r}: "
                    f"use one of {list(OUTLIER_SETS)} or null"
                )
            if self.outlier_options["root"] is None and self.outlier_options["dataset"] not in BUNDLED_OUTLIERS:
                raise ConfigError("scheme.outlier_exposure.root is required when outlier_exposure.dataset is set")
            if len(input_shape) != 3 or input_shape[1:] != (28, 28) or input_shape[0] != 1:
                raise ConfigError(f"scheme.outlier_exposure takes 1x28x28 images, the data gives {input_shape}")
        self._outlier_sampler: OutlierSampler | None = None
        self._draw_seed: int | None = None  # base seed of the student steps' draws (step_generator)

    @property
    def teacher_kind(self) -> str:
        return "external" if self.external_teacher else str(self.hparams.teacher)

    def technique_name(self) -> str:
        """A short name of the switched-on techniques, e.g. ``co_learning+outlier_exposure``."""
        parts = ["co_learning" if self.hparams.co_learning else "baseline"]
        if self.outlier_options["dataset"] is not None:
            parts.append("outlier_exposure")
        if self.techniques.noise_std > 0:
            parts.append("noise_exposure")
        if self.techniques.corruption_copies > 0:
            parts.append("corruption_exposure")
        if self.techniques.warp_copies > 0:
            parts.append("warp_exposure")
        if self.techniques.tail_strength > 0:
            parts.append("tail_reweighting")
        return "+".join(parts)

    # -- sizes --------------------------------------------------------------------------
    def compression_summary(self) -> dict[str, float]:
        example = torch.zeros(1, *self.input_shape)
        teacher_params = self.teacher.num_parameters() if self.external_teacher else count_parameters(self.teacher)
        student_params = count_parameters(self.student)
        teacher_macs = _macs_or_nan(self.teacher, example)
        student_macs = count_macs(self.student, example)
        deployed = deployed_sizes(self.deployable_model(), self.teacher_deployable_model(), teacher_params)
        return {
            **size_summary(teacher_params, student_params, teacher_macs, student_macs),
            "deployed_params": deployed["deployed_params"],
            "deployed_macs": deployed["deployed_macs"],
            "deployed_compression_ratio": deployed["deployed_compression_ratio"],
            "student_spec": self.student_spec.describe(),
            "teacher_kind": self.teacher_kind,
            "technique": self.technique_name(),
        }

    # -- deployment -----------------------------------------------------------------------
    def scoring_student(self) -> nn.Module:
        """The student that validates, tests and ships: the averaged weights with
        ``student_average`` (once a student step has been averaged), else the student."""
        if self.student_averaged is not None and int(self.student_averaged.n_averaged) > 0:
            return self.student_averaged.module
        return self.student

    def deployable_model(self) -> DeployableModel:
        """The student behind the datamodule's preprocessing: raw images -> scores ``(N,)``."""
        return ScoreRegressionDeployable(self.deployment_preprocessing(), self.scoring_student()).to(self.device)

    def teacher_deployable_model(self) -> DeployableModel:
        """The teacher in the same form (its ``log(1 + MSE)``, or the external teacher's score)."""
        preprocessing = self.deployment_preprocessing()
        if self.external_teacher:
            return ExternalTeacherDeployable(preprocessing, self.teacher).to(self.device)
        return ReconstructionScoreDeployable(preprocessing, self.teacher).to(self.device)

    # -- scores -------------------------------------------------------------------------
    def teacher_score(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's anomaly score ``(B,)`` (``log(1 + MSE)`` for the autoencoders)."""
        if self.external_teacher:
            return self.teacher(images)
        return reconstruction_score(images, self.teacher(images))

    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        student_score = self.deployable_model()(self.raw_images(images))  # what ships
        return {"score": student_score, "teacher_score": self.teacher_score(images)}

    def compute_test_metrics(self, results: dict[str, torch.Tensor]) -> dict[str, float]:
        computed = super().compute_test_metrics(results)
        labels = results["label"].long()
        if labels.min() == labels.max():
            return computed
        sources = [("", results["score"])]
        if "teacher_score" in results:
            sources.append(("teacher_", results["teacher_score"]))
        for prefix, scores in sources:
            for fpr in EXTRA_FPRS:
                computed[f"{prefix}tpr_at_fpr_{kd_metrics.fpr_key(fpr)}"] = kd_metrics.tpr_at_fpr(scores, labels, fpr)
        if computed.get("teacher_image_auroc"):
            computed["image_auroc_retention"] = computed["image_auroc"] / computed["teacher_image_auroc"]
        return computed

    # -- training -----------------------------------------------------------------------
    def configure_optimizers(self):
        student_optimizer = torch.optim.Adam(
            [*self.student.parameters(), *self.student_restarts.parameters()], lr=self.hparams.student_lr,
            weight_decay=self.hparams.weight_decay
        )
        if self.external_teacher:
            return student_optimizer
        teacher_optimizer = torch.optim.Adam(
            self.teacher.parameters(), lr=self.hparams.teacher_lr, weight_decay=self.hparams.weight_decay
        )
        return [teacher_optimizer, student_optimizer]

    def on_fit_start(self) -> None:
        """Read the pseudo outliers once (outlier exposure), lazily, on every rank."""
        if len(self.student_restarts) and not (self.trainer.max_epochs or 0) > 0:
            raise ConfigError("scheme.student_restarts > 1 chooses its student at the last of trainer.max_epochs; "
                              f"set trainer.max_epochs (got {self.trainer.max_epochs})")
        options = self.outlier_options
        if options["dataset"] is not None and self._outlier_sampler is None:
            images = load_outlier_images(
                options["dataset"], options["root"], options["max_images"], seed=int(torch.initial_seed()) % 2**31
            )
            batch_size = options["batch_size"] or getattr(self.trainer.datamodule, "batch_size", 64)
            self._outlier_sampler = OutlierSampler(images, int(batch_size), seed=self.global_rank)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The random source of one student step, seeded by the run's seed, the rank, the epoch
        and the batch: a run resumed from a checkpoint draws the same outliers, noise and
        corruptions as an uninterrupted one (no random state to save)."""
        if self._draw_seed is None:
            self._draw_seed = int(torch.initial_seed()) % 2**31
        seed = (self._draw_seed * 1_000_003 + self.global_rank * 7_919 + self.batches_done(batch_idx)) % 2**63
        return torch.Generator().manual_seed(seed)

    def batches_done(self, batch_idx: int) -> int:
        """Training batches before this one in the run (counted in batches, since with two
        manual optimisers Lightning's ``global_step`` counts both)."""
        return self.current_epoch * self.trainer.num_training_batches + batch_idx

    def teacher_phase_batches(self) -> int:
        """Number of training batches in which only the teacher trains (baseline schedule)."""
        total = max(int(self.trainer.estimated_stepping_batches), 2)
        return max(1, min(total - 1, round(total * self.hparams.teacher_fraction)))

    def in_teacher_phase(self, batch_idx: int) -> bool:
        """Whether this batch belongs to the teacher-only phase."""
        return self.batches_done(batch_idx) < self.teacher_phase_batches()

    def student_lr_at(self, batch_idx: int) -> float:
        """The student's learning rate at this batch (``student_schedule``); a function of the
        batch count alone, so a resumed run follows the same schedule."""
        base = float(self.hparams.student_lr)
        if self.hparams.student_schedule == "constant":
            return base
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        first = 0 if (self.external_teacher or self.hparams.co_learning) else self.teacher_phase_batches()
        progress = (self.batches_done(batch_idx) - first) / max(total - first, 1)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def teacher_loss(self, images: torch.Tensor) -> torch.Tensor:
        return teacher_training_loss(self.teacher, images, self.hparams.vae_beta)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        if self.external_teacher:
            teacher_optimizer, student_optimizer = None, self.optimizers()
            train_teacher, train_student = False, True
        else:
            teacher_optimizer, student_optimizer = self.optimizers()
            train_teacher = self.hparams.co_learning or self.in_teacher_phase(batch_idx)
            train_student = self.hparams.co_learning or not train_teacher

        if train_teacher:
            self.teacher.train()
            teacher_loss = self.teacher_loss(images)
            teacher_optimizer.zero_grad()
            self.manual_backward(teacher_loss)
            teacher_optimizer.step()
            self.log("train/teacher_loss", teacher_loss, on_step=False, on_epoch=True, prog_bar=True)
        if train_student:
            self.teacher.eval()
            draws = self.step_generator(batch_idx)  # outliers, noise and corruptions of this step
            outliers = self._outlier_sampler.sample(generator=draws) if self._outlier_sampler is not None else None
            inputs, targets, weights = student_batch(images, self.teacher_score, self.techniques, outliers, draws)
            student_loss = weighted_l1(self.student(inputs), targets, weights)
            for restart in self.student_restarts:  # independent parameters: the sum trains each alone
                student_loss = student_loss + weighted_l1(restart(inputs), targets, weights)
            student_loss = student_loss / (1 + len(self.student_restarts))
            for group in student_optimizer.param_groups:
                group["lr"] = self.student_lr_at(batch_idx)
            student_optimizer.zero_grad()
            self.manual_backward(student_loss)
            student_optimizer.step()
            if self.student_averaged is not None:
                self.student_averaged.update_parameters(self.student)
            self.log("train/student_loss", student_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/teacher_phase", float(train_teacher and not train_student), on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = self.normal_only(batch)  # labelled anomalies are scored by the base class
        if len(images) == 0:
            return
        teacher_score = self.teacher_score(images)
        student_score = self.scoring_student()(images)
        student_loss = F.l1_loss(student_score, teacher_score)
        if self.external_teacher:
            teacher_loss = torch.zeros((), device=images.device)
        else:
            teacher_loss = F.mse_loss(self.teacher(images), images)
        self.log("val/teacher_loss", teacher_loss, on_epoch=True, sync_dist=True, batch_size=len(images))
        self.log("val/student_loss", student_loss, on_epoch=True, sync_dist=True, batch_size=len(images))
        self.log("val/loss", teacher_loss + student_loss, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(images))
        if len(self.student_restarts):
            self._record_restart_losses(images, batch_idx)

    # -- restarts ---------------------------------------------------------------------------
    def _record_restart_losses(self, images: torch.Tensor, batch_idx: int) -> None:
        """Sum of each candidate's L1 to the teacher on this validation batch's student inputs:
        the normal images, their corrupted copies and pseudo outliers (as in a training step),
        drawn from a generator seeded by the batch index alone, so every epoch sees the same set."""
        draws = torch.Generator().manual_seed(RESTART_VALIDATION_SEED + batch_idx)
        outliers = self._outlier_sampler.sample(generator=draws) if self._outlier_sampler is not None else None
        inputs, targets, _ = student_batch(images, self.teacher_score, self.techniques, outliers, draws)
        candidates = [self.student, *self.student_restarts]
        losses = torch.stack([(candidate(inputs) - targets).abs().sum() for candidate in candidates])
        self._restart_losses.append(torch.cat([losses, torch.tensor([float(len(targets))], device=losses.device)]))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not len(self.student_restarts):
            return
        # every rank takes part in the reduction, one that scored no normal image with zeros
        totals = (torch.stack(self._restart_losses).sum(0) if self._restart_losses
                  else torch.zeros(len(self.student_restarts) + 2, device=self.device))
        self._restart_losses = []
        if float(totals[-1]) == 0 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        losses = totals[:-1] / totals[-1].clamp_min(1)
        best = int(torch.argmin(losses))
        self.log("val/student_restart_loss_best", losses[best], sync_dist=False)
        self.log("val/student_restart_loss_first", losses[0], sync_dist=False)
        if self.trainer.sanity_checking or self.current_epoch + 1 < self.trainer.max_epochs:
            return
        # the last epoch: the best candidate becomes the student (a swap: nothing is lost)
        self.log("student_restart_chosen", float(best), sync_dist=False)
        if best > 0:  # load_state_dict copies in place: the optimiser keeps its parameters
            chosen = self.student_restarts[best - 1]
            previous = {name: value.clone() for name, value in self.student.state_dict().items()}
            self.student.load_state_dict(chosen.state_dict())
            chosen.load_state_dict(previous)


def teacher_training_loss(teacher: nn.Module, images: torch.Tensor, vae_beta: float = 1.0) -> torch.Tensor:
    """The teacher's loss: MSE reconstruction (the paper), plus ``vae_beta`` times the KL
    term per input element for the VAE teacher."""
    if isinstance(teacher, VariationalAutoencoder):
        reconstruction, kl = teacher.elbo_terms(images)
        return F.mse_loss(reconstruction, images) + vae_beta * kl.mean() / images[0].numel()
    return F.mse_loss(teacher(images), images)


def _macs_or_nan(module: nn.Module, example: torch.Tensor) -> float:
    """MACs of a teacher; NaN for an external scorer whose operations cannot be traced."""
    try:
        return float(count_macs(module, example))
    except Exception:  # noqa: BLE001 - an arbitrary callable may fail to trace
        return float("nan")
