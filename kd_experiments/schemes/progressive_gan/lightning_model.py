"""Progressive GAN distillation (EDE-GAN teacher -> P-KDGAN student) as a LightningModule.

Papers:

- Zhang, Dong, Peng, Chen, "New Perspective on Progressive GANs Distillation for
  One-class Novelty Detection", arXiv 2109.07295 (EDE-GAN, P-KDGAN), and the earlier
  Zhang, Chen, Shen, "P-KDGAN: Progressive Knowledge Distillation with GANs for One-class
  Novelty Detection", IJCAI 2020, arXiv 2007.06963.
- Akcay, Atapour-Abarghouei, Breckon, "GANomaly", ACCV 2018, arXiv 1805.06725 (the
  baseline and the source of the layer layout, losses and optimiser settings).

Roles (``role``), all one code path:

- ``teacher``: the EDE-GAN alone (latents constrained to a sphere, see ``torch_model``);
  ``score`` is its latent distance.
- ``ganomaly``: the same family with GANomaly's settings (unbounded latents, weights
  1/50/1), trained alone: the baseline the teacher's gain is measured against.
- ``student_pkd``: the paper's two steps. The teacher is trained first (the first
  ``teacher_fraction`` of the training batches) or loaded (``teacher_checkpoint``); step 1,
  teacher fixed, the student learns from the teacher's latents (L2) and reconstructions
  (L1) plus its own GAN loss; step 2 (the last ``joint_fraction`` of the student's
  batches), teacher and student are fine-tuned jointly, both with their GAN losses and
  the distillation loss.
- ``student_one_step``: step 1 only, for all the student's batches (the paper's single-step
  baseline).
- ``student_alone``: the same student trained with its own GAN loss only (no teacher).

Every student role runs the same number of student batches, so the comparison is fair.
``score`` is the student's latent distance, ``teacher_score`` the teacher's (the base class
logs ``test/image_auroc`` and ``test/teacher_image_auroc``).

Where this follows the paper: the E-D-E generator, latent-distance score, two-step
schedule, distillation between latents (L2) and reconstructions (L1), student = same
architecture at a smaller width, batch size as a config value (the paper's best is 1).
Where it follows GANomaly's code: DCGAN layers and initialisation, feature-matching
adversarial loss, Adam(lr 2e-4, betas 0.5/0.999), one generator then one discriminator
update per batch, and re-initialising the discriminator when its loss falls below
``1e-5`` (``collapse_threshold``; logged as ``train/*_discriminator_resets``).
Our choices (not in either): the schedule by fractions of the training batches, the
sphere projection as the EDE-GAN's latent constraint, the depth axis of the size family,
the EDE-GAN loss weights (GANomaly's 1/50/1 by default; configurable), and a separate
student learning rate (``student_learning_rate``; the MNIST / Fashion-MNIST experiments use
1e-3, chosen on validation data: ``docs/results/progressive_gan.md``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kd_experiments.checkpoints import load_checkpoint
from kd_experiments.compression import count_macs, count_parameters, size_summary
from kd_experiments.deployable import DeployableModel, deployed_sizes
from kd_experiments.errors import CheckpointError, ConfigError
from kd_experiments.schemes.base import AnomalyScheme
from kd_experiments.schemes.progressive_gan.deploy import LatentDistanceDeployable
from kd_experiments.schemes.progressive_gan.loss import (
    GANOutputs,
    discriminator_loss,
    distillation_loss,
    generator_loss,
)
from kd_experiments.schemes.progressive_gan.torch_model import (
    Discriminator,
    EDEGenerator,
    GeneratorSpec,
    check_image_size,
    initialize_weights,
    latent_distance,
    student_spec_for_ratio,
)

ROLES = ("teacher", "ganomaly", "student_pkd", "student_one_step", "student_alone")
STUDENT_ROLES = ("student_pkd", "student_one_step", "student_alone")
GANOMALY_WEIGHTS = (1.0, 50.0, 1.0)  # adversarial, contextual, latent (Akcay et al.)
PHASES = {"teacher": 0, "distill": 1, "joint": 2, "alone": 3}


class ProgressiveGANScheme(AnomalyScheme):
    """EDE-GAN teacher, GANomaly baseline and P-KDGAN students (see the module docstring).

    Args:
        input_shape: ``(C, H, W)``; square, the side divisible by ``2**teacher_depth`` (32).
        role: one of :data:`ROLES`.
        teacher_width, teacher_depth, latent_dim, extra_layers: the teacher generator (and
            the GANomaly baseline): channels after the first convolution, stride-2 stages,
            latent size, extra 3x3 layers.
        discriminator_width: the teacher's discriminator width (default ``teacher_width``).
        student_width, student_depth: an explicit student; else chosen from the ratios.
        compression_ratio, mac_compression_ratio: the student is the largest family member
            at least this many times smaller than the teacher generator (params, MACs).
        student_discriminator_width: the student GAN's discriminator width.
        latent_constraint: ``sphere`` (our form of EDE-GAN's latent constraint), ``tanh`` or ``none``
            (the ``ganomaly`` role always uses ``none``).
        adversarial_weight, contextual_weight, latent_weight: the EDE-GAN generator loss weights.
        distillation_latent_weight, distillation_image_weight: the distillation loss weights.
        teacher_fraction: share of the training batches that train the teacher (student
            roles without ``teacher_checkpoint``).
        joint_fraction: share of the student's batches in step 2 (``student_pkd``).
        teacher_checkpoint: a Lightning checkpoint holding ``teacher_generator.*`` and
            ``teacher_discriminator.*`` (e.g. ``last.ckpt`` of a ``role=teacher`` run); skips the
            teacher phase.
        learning_rate, beta1: Adam settings of every network.
        student_learning_rate: Adam learning rate of the student generator and discriminator
            (``None``: ``learning_rate``); a tiny student may need a larger step than the teacher.
        collapse_threshold: a discriminator whose loss falls below this is re-initialised.
        input_range: ``(low, high)`` of the data's pixel values, mapped to [-1, 1].
        score_teacher_at_test: also score the teacher at test time (student roles).
    """

    scheme_name = "progressive_gan"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        role: str = "student_pkd",
        teacher_width: int = 32,
        teacher_depth: int = 3,
        latent_dim: int = 100,
        extra_layers: int = 0,
        discriminator_width: int | None = None,
        student_width: int | None = None,
        student_depth: int | None = None,
        compression_ratio: float | None = None,
        mac_compression_ratio: float | None = 100.0,
        student_discriminator_width: int = 8,
        latent_constraint: str = "sphere",
        adversarial_weight: float = 1.0,
        contextual_weight: float = 50.0,
        latent_weight: float = 1.0,
        distillation_latent_weight: float = 1.0,
        distillation_image_weight: float = 50.0,
        teacher_fraction: float = 0.5,
        joint_fraction: float = 0.3,
        teacher_checkpoint: str | None = None,
        learning_rate: float = 2e-4,
        student_learning_rate: float | None = None,
        beta1: float = 0.5,
        collapse_threshold: float = 1e-5,
        input_range: tuple[float, float] | list[float] = (0.0, 1.0),
        score_teacher_at_test: bool = True,
    ) -> None:
        super().__init__()
        if role not in ROLES:
            raise ConfigError(f"scheme.role={role!r} is unknown; use one of {list(ROLES)}")
        channels, height, width = (int(v) for v in input_shape)
        if height != width:
            raise ConfigError(f"the GAN takes square images, the data gives {height}x{width}; set data.image_size=32")
        check_image_size(height, teacher_depth)
        if not 0.0 < teacher_fraction < 1.0:
            raise ConfigError(f"scheme.teacher_fraction must be in (0, 1), got {teacher_fraction}")
        if not 0.0 <= joint_fraction < 1.0:
            raise ConfigError(f"scheme.joint_fraction must be in [0, 1), got {joint_fraction}")
        for name, value in (("learning_rate", learning_rate), ("student_learning_rate", student_learning_rate)):
            if value is not None and not float(value) > 0.0:
                raise ConfigError(f"scheme.{name} must be > 0, got {value}")
        low, high = (float(v) for v in input_range)
        if not high > low:
            raise ConfigError(f"scheme.input_range must be (low, high) with high > low, got {input_range}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.role = role
        self.input_shape = (channels, height, width)
        self.image_size = height
        self.input_low, self.input_high = low, high
        if role == "ganomaly":
            latent_constraint = "none"
            self.generator_weights = GANOMALY_WEIGHTS
        else:
            self.generator_weights = (float(adversarial_weight), float(contextual_weight), float(latent_weight))

        self.teacher_spec = GeneratorSpec(teacher_width, teacher_depth, latent_dim, extra_layers)
        self.teacher_generator = EDEGenerator(self.teacher_spec, height, channels, latent_constraint)
        self.teacher_discriminator = Discriminator(
            height, channels, discriminator_width or teacher_width, teacher_depth, extra_layers
        )
        self.student_spec: GeneratorSpec | None = None
        self.student_generator: EDEGenerator | None = None
        self.student_discriminator: Discriminator | None = None
        if role in STUDENT_ROLES:
            if student_width is not None:
                self.student_spec = GeneratorSpec(int(student_width), int(student_depth or teacher_depth), latent_dim, 0)
                check_image_size(height, self.student_spec.depth)
            else:
                if compression_ratio is None and mac_compression_ratio is None:
                    raise ConfigError(
                        "a student role needs scheme.student_width, scheme.compression_ratio or "
                        "scheme.mac_compression_ratio"
                    )
                self.student_spec = student_spec_for_ratio(
                    self.teacher_spec, height, channels, compression_ratio, mac_compression_ratio
                )
            self.student_generator = EDEGenerator(self.student_spec, height, channels, latent_constraint)
            self.student_discriminator = Discriminator(
                height, channels, student_discriminator_width, self.student_spec.depth
            )
        for network in self._networks():
            initialize_weights(network)
        self.teacher_loaded = False
        if teacher_checkpoint:
            self.load_teacher(teacher_checkpoint)
        self.teacher_scores = role != "ganomaly"
        self.discriminator_resets = {"teacher": 0, "student": 0}
        self._example_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- construction helpers -------------------------------------------------------------
    def _networks(self) -> list[torch.nn.Module]:
        networks = [self.teacher_generator, self.teacher_discriminator]
        if self.student_generator is not None:
            networks += [self.student_generator, self.student_discriminator]
        return networks

    def load_teacher(self, path: str) -> None:
        """Load the teacher's generator and discriminator from a Lightning checkpoint."""
        state = load_checkpoint(path)["state_dict"]
        for prefix, network in (("teacher_generator.", self.teacher_generator),
                                ("teacher_discriminator.", self.teacher_discriminator)):
            part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            if not part:
                raise CheckpointError(f"teacher_checkpoint {path} holds no '{prefix}*' tensors; is it a progressive_gan run?")
            try:
                network.load_state_dict(part)
            except RuntimeError as error:
                raise CheckpointError(
                    f"teacher_checkpoint {path} does not fit the configured teacher "
                    f"({self.teacher_spec.describe()}): {str(error).splitlines()[0][:160]}"
                ) from None
        self.teacher_loaded = True

    # -- sizes ----------------------------------------------------------------------------
    def deployed_generator(self) -> EDEGenerator:
        return self.student_generator if self.student_generator is not None else self.teacher_generator

    def compression_summary(self) -> dict[str, float]:
        example = torch.zeros(1, *self.input_shape)
        teacher_params = count_parameters(self.teacher_generator)
        teacher_macs = count_macs(self.teacher_generator, example)
        deployed = self.deployed_generator()
        student_params = count_parameters(deployed)
        student_macs = count_macs(deployed, example)
        sizes = deployed_sizes(self.deployable_model(), self.teacher_deployable_model())
        return {
            **size_summary(teacher_params, student_params, teacher_macs, student_macs),
            "deployed_params": sizes["deployed_params"],
            "deployed_macs": sizes["deployed_macs"],
            "deployed_compression_ratio": sizes["deployed_compression_ratio"],
            "student_spec": (self.student_spec or self.teacher_spec).describe(),
            "role": self.role,
        }

    # -- deployment -----------------------------------------------------------------------
    def deployable_model(self) -> DeployableModel:
        """The deployed generator (the student's for student roles) behind the datamodule's
        preprocessing: raw images -> latent distance ``(N,)``."""
        return LatentDistanceDeployable(
            self.deployment_preprocessing(), self.deployed_generator(), (self.input_low, self.input_high)
        ).to(self.device)

    def teacher_deployable_model(self) -> DeployableModel:
        """The teacher generator in the same form."""
        return LatentDistanceDeployable(
            self.deployment_preprocessing(), self.teacher_generator, (self.input_low, self.input_high)
        ).to(self.device)

    # -- scores ---------------------------------------------------------------------------
    def to_gan_range(self, images: torch.Tensor) -> torch.Tensor:
        """Map the data's ``input_range`` to the tanh range [-1, 1]."""
        return (images - self.input_low) * (2.0 / (self.input_high - self.input_low)) - 1.0

    @staticmethod
    def _run(generator: EDEGenerator, images: torch.Tensor) -> GANOutputs:
        return GANOutputs(*generator(images))

    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        score = self.deployable_model()(self.raw_images(batch["image"]))  # what ships
        if self.student_generator is None:
            return {"score": score, "teacher_score": score} if self.teacher_scores else {"score": score}
        outputs = {"score": score}
        if self.hparams.score_teacher_at_test:
            teacher = self._run(self.teacher_generator, self.to_gan_range(batch["image"]))
            outputs["teacher_score"] = latent_distance(teacher.latent, teacher.latent_of_reconstruction)
        return outputs

    # -- schedule -------------------------------------------------------------------------
    def phase_boundaries(self) -> tuple[int, int, int]:
        """``(teacher_batches, distill_end, total)``: batches ``[0, teacher_batches)`` train the teacher,
        ``[teacher_batches, distill_end)`` are step 1 (or the student alone), ``[distill_end, total)`` step 2."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.role in ("teacher", "ganomaly"):
            return total, total, total
        teacher_batches = 0
        if not self.teacher_loaded:
            teacher_batches = min(total - 1, max(1, round(total * self.hparams.teacher_fraction)))
        student_batches = total - teacher_batches
        joint_batches = 0
        if self.role == "student_pkd" and self.hparams.joint_fraction > 0 and student_batches >= 2:
            joint_batches = min(student_batches - 1, max(1, round(student_batches * self.hparams.joint_fraction)))
        return teacher_batches, total - joint_batches, total

    def current_phase(self, batch_idx: int) -> str:
        batches_done = self.current_epoch * self.trainer.num_training_batches + batch_idx
        teacher_batches, distill_end, _ = self.phase_boundaries()
        if batches_done < teacher_batches:
            return "teacher"
        if self.role == "student_alone":
            return "alone"
        return "distill" if batches_done < distill_end else "joint"

    # -- training -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Under DDP, let the reducer skip unused parameters: each phase updates only some of the
        four networks (e.g. the student's are idle while the teacher trains), which plain
        ``strategy=ddp`` refuses. Same effect as ``trainer.strategy=ddp_find_unused_parameters_true``;
        this runs before Lightning wraps the model."""
        super().setup(stage)  # the datamodule's preprocessing (deployable model)
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if stage == "fit" and isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters"):
            ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self):
        teacher_lr = float(self.hparams.learning_rate)
        student_lr = float(self.hparams.student_learning_rate or teacher_lr)

        def adam(network: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(network.parameters(), lr=lr, betas=(self.hparams.beta1, 0.999))

        networks = self._networks()  # teacher G, teacher D[, student G, student D]
        return [adam(network, teacher_lr if index < 2 else student_lr) for index, network in enumerate(networks)]

    def _generator_terms(self, generator, discriminator, images) -> tuple[GANOutputs, dict[str, torch.Tensor]]:
        outputs = self._run(generator, images)
        _, real_features = discriminator(images)
        _, fake_features = discriminator(outputs.reconstruction)
        weights = self.generator_weights
        return outputs, generator_loss(images, outputs, real_features, fake_features, *weights)

    def _discriminator_step(self, name: str, discriminator, optimizer, images, reconstruction) -> None:
        real_probability, _ = discriminator(images)
        fake_probability, _ = discriminator(reconstruction.detach())
        loss = discriminator_loss(real_probability, fake_probability)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log(f"train/{name}_discriminator_loss", loss, on_step=False, on_epoch=True)
        self._check_collapse(name, discriminator, loss)

    def _check_collapse(self, name: str, discriminator: Discriminator, loss: torch.Tensor) -> None:
        """GANomaly's guard: a discriminator whose loss collapses below the threshold is re-initialised.
        Under DDP the decision uses the mean loss of all ranks and rank 0's new weights."""
        value = loss.detach().clone()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        if float(value) < self.hparams.collapse_threshold:
            initialize_weights(discriminator)
            if distributed:
                for tensor in discriminator.state_dict().values():
                    dist.broadcast(tensor, src=0)
            self.discriminator_resets[name] += 1
        self.log(f"train/{name}_discriminator_resets", float(self.discriminator_resets[name]),
                 on_step=False, on_epoch=True, reduce_fx="max")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = self.to_gan_range(batch["image"])
        optimizers = self.optimizers()
        teacher_g, teacher_d = optimizers[0], optimizers[1]
        phase = self.current_phase(batch_idx)
        self.log("train/phase", float(PHASES[phase]), on_step=False, on_epoch=True, reduce_fx="max")

        if phase == "teacher":
            self.teacher_generator.train()
            outputs, terms = self._generator_terms(self.teacher_generator, self.teacher_discriminator, images)
            teacher_g.zero_grad()
            self.manual_backward(terms["loss"])
            teacher_g.step()
            self._log_terms("teacher", terms)
            self._discriminator_step("teacher", self.teacher_discriminator, teacher_d, images, outputs.reconstruction)
            return

        student_g, student_d = optimizers[2], optimizers[3]
        self.student_generator.train()
        student, student_terms = self._generator_terms(self.student_generator, self.student_discriminator, images)
        loss = student_terms["loss"]
        teacher = None
        if phase == "distill":
            self.teacher_generator.eval()
            with torch.no_grad():
                teacher = self._run(self.teacher_generator, images)
        elif phase == "joint":
            self.teacher_generator.train()
            teacher, teacher_terms = self._generator_terms(self.teacher_generator, self.teacher_discriminator, images)
            loss = loss + teacher_terms["loss"]
            self._log_terms("teacher", teacher_terms)
        if teacher is not None:
            distill = distillation_loss(teacher, student, self.hparams.distillation_latent_weight,
                                        self.hparams.distillation_image_weight)
            loss = loss + distill["loss"]
            self.log("train/distillation_loss", distill["loss"], on_step=False, on_epoch=True, prog_bar=True)
        student_g.zero_grad()
        if phase == "joint":
            teacher_g.zero_grad()
        self.manual_backward(loss)
        student_g.step()
        if phase == "joint":
            teacher_g.step()
        self._log_terms("student", student_terms)
        self._discriminator_step("student", self.student_discriminator, student_d, images, student.reconstruction)
        if phase == "joint":
            self._discriminator_step("teacher", self.teacher_discriminator, teacher_d, images, teacher.reconstruction)

    def _log_terms(self, name: str, terms: dict[str, torch.Tensor]) -> None:
        self.log(f"train/{name}_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True)
        for key in ("adversarial", "contextual", "latent"):
            self.log(f"train/{name}_{key}_loss", terms[key], on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruction and latent losses on the held-out normal images (labelled anomalies,
        when the split has them, are scored by the base class: ``val/image_auroc``)."""
        normal = self.normal_only(batch)
        if len(normal) == 0:
            return
        images = self.to_gan_range(normal)
        teacher = self._run(self.teacher_generator, images)
        teacher_loss = 50.0 * (teacher.reconstruction - images).abs().mean() + latent_distance(
            teacher.latent, teacher.latent_of_reconstruction).mean()
        self.log("val/teacher_loss", teacher_loss, on_epoch=True, sync_dist=True, batch_size=len(images))
        total = teacher_loss
        if self.student_generator is not None:
            student = self._run(self.student_generator, images)
            student_loss = 50.0 * (student.reconstruction - images).abs().mean() + latent_distance(
                student.latent, student.latent_of_reconstruction).mean()
            self.log("val/student_loss", student_loss, on_epoch=True, sync_dist=True, batch_size=len(images))
            total = student_loss
        self.log("val/loss", total, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(images))

    # -- artifacts ------------------------------------------------------------------------
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self._example_batch is None:
            self._example_batch = (batch["image"][:12].detach().cpu(), batch["label"][:12].detach().cpu())

    def plot_test_results(self, results: dict[str, torch.Tensor]) -> None:
        """A grid of test inputs with the teacher's and the student's reconstructions."""
        if self._example_batch is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from kd_experiments.tracking import log_figure_from_module

        images, labels = self._example_batch
        images = images.to(self.device)
        rows = [("input", self.to_gan_range(images))]
        with torch.no_grad():
            rows.append(("teacher" if self.role != "ganomaly" else "ganomaly",
                         self._run(self.teacher_generator, self.to_gan_range(images)).reconstruction))
            if self.student_generator is not None:
                rows.append(("student", self._run(self.student_generator, self.to_gan_range(images)).reconstruction))
        figure, axes = plt.subplots(len(rows), len(images), figsize=(1.2 * len(images), 1.3 * len(rows)), squeeze=False)
        for row, (name, tensors) in enumerate(rows):
            for column in range(len(images)):
                axis = axes[row][column]
                axis.imshow(tensors[column, 0].float().cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
                if column == 0:
                    axis.set_ylabel(name)
                if row == 0:
                    axis.set_title("anomalous" if int(labels[column]) else "normal", fontsize=7)
        figure.suptitle(f"{self.scheme_name} ({self.role}): inputs and reconstructions")
        log_figure_from_module(self, figure, "plots/reconstructions.png")
        self._example_batch = None
