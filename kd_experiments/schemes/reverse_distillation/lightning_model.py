"""Reverse distillation, and reverse distillation with an expert, as one LightningModule.

Papers:

- **RD**: Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
  Embedding", CVPR 2022 (arXiv 2201.10703); authors' code hq-deng/RD4AD.
- **RD with Expert** (URD): Liu, Wang, Leng, Zhang, "Unlocking the Potential of
  Reverse Distillation for Anomaly Detection", AAAI 2025 (arXiv 2412.07579);
  authors' code hito2448/URD.

Switches (RD baseline = all off; RD with Expert = all on, ``configs/scheme/rd_expert.yaml``):

``expert``
    A frozen pretrained *expert* (same backbone and weights as the encoder) and a
    *trainable* teacher encoder, distilled from the expert on normal images
    (per-pixel cosine) and, with ``synthetic_anomalies``, trained to move away from
    the expert's normal features inside the synthetic mask (URD's ``Teacher.loss``).
    The student additionally learns the expert's normal features. Off: RD's frozen
    encoder is the teacher.
``skip_fusion``
    Teacher features of each level (with the next-shallower one) are fused into the
    decoder's input of the next level (URD Sec. 3.3).
``guided_injection``
    The skip features are gated per pixel by their cosine similarity with the
    decoder's output (GII); needs ``skip_fusion``. We clamp the similarity at 0 so
    the gate is a convex mix (URD uses the raw cosine).
``synthetic_anomalies``
    Every training batch gets an anomalous copy (Perlin masks, procedural or in-set
    textures, :mod:`kd_experiments.synthetic_anomalies`); the student must reproduce the *normal*
    teacher (and expert) features from it (URD's ``Student.loss``).

Optimisation follows the authors' code: Adam with betas (0.5, 0.999), student lr
0.005 (RD4AD and URD), teacher lr 1e-4 (URD). URD alternates a teacher step and a
student step on each batch, the student seeing the just-updated teacher in eval
mode. Here both are updated from one backward pass per batch (the two parameter
sets are disjoint: the student's inputs are teacher features computed in eval mode
and detached), so the student sees the teacher *before* this batch's update: a lag
of one step, which keeps one backward per forward and so works under DDP. The
schedule is a fixed number of epochs; the validation loss (student distillation
loss on held-out normal images) is logged for inspection, never used for selection.

Evaluation: RD's anomaly map (sum over levels of ``1 - cos``, Gaussian sigma 4),
image score = its maximum (:mod:`kd_experiments.anomaly_maps`). The deployed model is the
(trained) encoder plus the student; the expert is needed only for training.
:meth:`ReverseDistillationScheme.deployable_model` is that model as one module, with the
datamodule's preprocessing inside (:mod:`.deploy`): the test step scores through it. Its
reference (``teacher_deployable_model``, the reference of ``deployed_compression_ratio``
and of the teacher's speed figures) is the same module with a full-width student.

Compression: the student (bottleneck, decoder, skip fusion) has a width
multiplier, given directly (``width_multiplier``) or found from
``compression_ratio`` = params of the full-width student (same encoder, same
switches) / params of this student. ``mac_compression_ratio`` is the same ratio of
student MACs. The encoder (the "teacher" of the summary) is not compressed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from kd_experiments import metrics as kd_metrics
from kd_experiments.anomaly_maps import MODES, anomaly_map, image_scores
from kd_experiments.backbones import FeatureEncoder, input_statistics
from kd_experiments.compression import count_macs, count_parameters, size_summary, width_for_ratio
from kd_experiments.errors import ConfigError
from kd_experiments.deployable import DeployableModel, Preprocessing, deployed_sizes
from kd_experiments.schemes.base import AnomalyScheme
from kd_experiments.schemes.reverse_distillation import loss as rd_loss
from kd_experiments.schemes.reverse_distillation.deploy import ReverseDistillationDeployable
from kd_experiments.schemes.reverse_distillation.torch_model import DEFAULT_MIN_CHANNELS, UPSAMPLING, ReverseStudent
from kd_experiments.synthetic_anomalies import SyntheticAnomalies
from kd_experiments.tracking import log_figure_from_module

#: Seed of the validation split's synthetic anomalies (fixed: comparable across epochs).
VAL_ANOMALY_SEED = 2_147_483_629


class ReverseDistillationScheme(AnomalyScheme):
    """Encoder (teacher) -> one-class bottleneck -> reversed decoder (student).

    Args:
        input_shape: ``(C, H, W)`` from the datamodule.
        backbone, layers, weights, weights_path: the encoder (any timm ``features_only``
            model; three levels in the papers).
        compression_ratio: target full-width / this student params (ignored when
            ``width_multiplier`` is given).
        width_multiplier: explicit student width (1.0 = full width).
        expert, skip_fusion, guided_injection, synthetic_anomalies: see the module docstring.
        bottleneck_blocks, decoder_blocks: residual blocks in the OCE and per decoder stage
            (``decoder_blocks``: one count, or one per encoder level, shallowest first).
        block: the residual block family of OCBE and decoder, ``basic`` (two 3x3
            convolutions; default) or ``bottleneck`` (1x1, 3x3, 1x1: RD4AD's form for
            ResNet-50 encoders); ``block_base_width``: torchvision's ``width_per_group``
            of the bottleneck blocks (64 ResNet-50, 128 Wide ResNet-50-2).
        min_channels: the floor of every student width (12 by default, chosen on
            validation images; see :mod:`.torch_model`): a compressed student keeps at
            least this many channels per level, and the width multiplier found for a
            ratio shrinks the rest.
        decoder_upsampling: ``bilinear`` (default) or ``transposed`` (RD4AD's 2x2
            stride-2 transposed convolutions; see :class:`DecoderStage`).
        decoder_expansion: decoder width / encoder channels at full width (2 by
            default; 1 mirrors the encoder as RD4AD does).
        decoder_projection: end each decoder stage with a 1x1 projection to the
            encoder's channels (default); ``false`` compares the blocks' (post-ReLU)
            outputs directly, as RD4AD does with ResNet encoders.
        init: the student's initialisation, ``torch`` (PyTorch defaults) or
            ``resnet`` (RD4AD's Kaiming fan-out).
        student_lr, teacher_lr, betas: Adam settings.
        blur_sigma: Gaussian smoothing of the anomaly map (4 in RD).
        map_mode: ``add`` (RD's sum over levels) or ``multiply``.
        input_normalization: how the data was normalised (``imagenet`` or ``none``).
        texture_source, anomaly_beta_max: synthetic anomaly settings.
        synthetic_foreground: where synthetic anomalies fall, in training and in validation:
            ``none`` (anywhere), ``dark`` / ``bright`` (the pixels below / above the image's
            Otsu threshold: URD's foreground rule for objects on a plain background, e.g.
            ``dark`` for screw); see :mod:`kd_experiments.synthetic_anomalies`.
        val_synthetic_anomalies: also score the validation images with synthetic
            anomalies pasted in (the same anomalies every epoch) and log
            ``val/synthetic_pixel_auroc`` and ``val/synthetic_image_auroc``: a quality
            signal for early stopping or budget choice that never touches the test split.
    """

    teacher_scores = False  # the encoder alone does not score images

    def __init__(
        self,
        input_shape: Sequence[int],
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "package",
        weights_path: str | None = None,
        compression_ratio: float | None = 1.0,
        width_multiplier: float | None = None,
        expert: bool = False,
        skip_fusion: bool = False,
        guided_injection: bool = False,
        synthetic_anomalies: bool = False,
        bottleneck_blocks: int = 2,
        decoder_blocks: int = 1,
        decoder_upsampling: str = "bilinear",
        decoder_expansion: float = 2.0,
        decoder_projection: bool = True,
        init: str = "torch",
        block: str = "basic",
        block_base_width: int = 64,
        min_channels: int = DEFAULT_MIN_CHANNELS,
        student_lr: float = 0.005,
        teacher_lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        blur_sigma: float = 4.0,
        map_mode: str = "add",
        input_normalization: str = "imagenet",
        texture_source: str = "mixed",
        anomaly_beta_max: float = 0.8,
        val_synthetic_anomalies: bool = True,
        synthetic_foreground: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.input_shape = tuple(int(v) for v in input_shape)
        if map_mode not in MODES:
            raise ConfigError(f"scheme.map_mode must be one of {MODES}, got {map_mode!r}")
        if guided_injection and not skip_fusion:
            raise ConfigError("scheme.guided_injection=true needs scheme.skip_fusion=true (it gates the skip features)")
        if not isinstance(bottleneck_blocks, int) or bottleneck_blocks < 1:
            raise ConfigError(f"scheme.bottleneck_blocks must be an integer >= 1, got {bottleneck_blocks!r}")
        if not isinstance(decoder_blocks, int):  # one count per level (a Hydra list)
            if isinstance(decoder_blocks, str | bytes) or not isinstance(decoder_blocks, Sequence):
                raise ConfigError(f"scheme.decoder_blocks must be an integer >= 1 or a list of them, got {decoder_blocks!r}")
            decoder_blocks = [int(b) if isinstance(b, int) else b for b in decoder_blocks]
            if not all(isinstance(b, int) and b >= 1 for b in decoder_blocks):
                raise ConfigError(f"scheme.decoder_blocks must be integers >= 1, got {decoder_blocks!r}")
        elif decoder_blocks < 1:
            raise ConfigError(f"scheme.decoder_blocks must be an integer >= 1, got {decoder_blocks!r}")
        if decoder_upsampling not in UPSAMPLING:
            raise ConfigError(f"scheme.decoder_upsampling must be one of {UPSAMPLING}, got {decoder_upsampling!r}")
        self.scheme_name = "rd_expert" if expert else "reverse_distillation"
        channels = self.input_shape[0]
        self.input_mean, self.input_std = input_statistics(input_normalization, channels)
        encoder_args = {
            "backbone": backbone, "layers": layers, "weights": weights, "weights_path": weights_path,
            "input_mean": self.input_mean, "input_std": self.input_std, "in_channels": channels,
        }
        self.encoder = FeatureEncoder(frozen=not expert, **encoder_args)
        self.expert = FeatureEncoder(frozen=True, **encoder_args) if expert else None
        encoder_channels = self.encoder.out_channels

        def build_student(width: float) -> ReverseStudent:
            return ReverseStudent(
                encoder_channels, width, bottleneck_blocks, decoder_blocks, skip_fusion, guided_injection,
                decoder_upsampling, decoder_expansion, decoder_projection, init, block, block_base_width, min_channels,
            )

        if width_multiplier is None:
            if compression_ratio is None:
                raise ConfigError("set scheme.compression_ratio or scheme.width_multiplier")
            width_multiplier = width_for_ratio(float(compression_ratio), build_student)
        elif not (isinstance(width_multiplier, int | float) and 0 < width_multiplier <= 1):
            raise ConfigError(f"scheme.width_multiplier must be in (0, 1], got {width_multiplier!r}")
        self.width_multiplier = float(width_multiplier)
        self._build_student = build_student
        self.student = build_student(self.width_multiplier)
        self.anomalies = (
            SyntheticAnomalies(self.input_mean, self.input_std, texture_source, anomaly_beta_max,
                               foreground=synthetic_foreground)
            if synthetic_anomalies else None
        )
        self.val_anomalies = (
            SyntheticAnomalies(self.input_mean, self.input_std, texture_source, anomaly_beta_max,
                               foreground=synthetic_foreground)
            if val_synthetic_anomalies else None
        )
        self._val: dict[str, list[torch.Tensor]] = {}
        self._summary: dict[str, Any] | None = None
        self._train_seconds = 0.0
        self._train_images = 0
        self._batch_started = 0.0
        self._infer_seconds = 0.0
        self._infer_images = 0
        self._examples: dict[str, tuple[int, torch.Tensor]] = {}
        self._paths: dict[int, str] = {}

    # -- sizes ---------------------------------------------------------------------------
    def compression_summary(self) -> dict[str, Any]:
        if self._summary is None:
            example = torch.zeros(1, *self.input_shape, device=self.device)
            with torch.no_grad():
                self.encoder.eval()
                features = self.encoder(example)
            full_student = self._build_student(1.0).to(self.device)
            teacher_params = count_parameters(self.encoder)
            student_params = count_parameters(self.student)
            full_params = count_parameters(full_student)
            teacher_macs = count_macs(self.encoder, example)
            student_macs = count_macs(self.student, (features,))
            full_macs = count_macs(full_student, (features,))
            deployed = deployed_sizes(self.deployable_model(), self._deployable(full_student))
            self._summary = {
                **size_summary(teacher_params, student_params, teacher_macs, student_macs,
                               reference_params=full_params, reference_macs=full_macs),
                "full_student_params": full_params,
                "full_student_macs": full_macs,
                # the deployable model's counts (encoder + student; MACs include the map's blur)
                "deployed_params": deployed["deployed_params"],
                "deployed_macs": deployed["deployed_macs"],
                "deployed_compression_ratio": deployed["deployed_compression_ratio"],
                "width_multiplier": self.width_multiplier,
                "min_channels": self.student.min_channels,
                "expert_params": count_parameters(self.expert) if self.expert is not None else 0,
            }
        return dict(self._summary)

    # -- deployment ------------------------------------------------------------------------
    def default_preprocessing(self) -> Preprocessing:
        """Before a datamodule says otherwise: the scheme's ``input_normalization`` at ``input_shape``."""
        channels, *size = self.input_shape
        return Preprocessing(tuple(size), channels, tuple(self.input_mean), tuple(self.input_std))

    def _deployable(self, student: torch.nn.Module) -> DeployableModel:
        return ReverseDistillationDeployable(
            self.deployment_preprocessing(), self.encoder, student, self.hparams.blur_sigma, self.hparams.map_mode
        ).to(self.device)

    def deployable_model(self) -> DeployableModel:
        """Encoder + student + map + score behind the datamodule's preprocessing: raw images ->
        ``(scores (N,), maps (N, 1, H, W))``; the expert is not in it."""
        return self._deployable(self.student)

    def teacher_deployable_model(self) -> DeployableModel:
        """The reference detector: the same encoder with a full-width student (freshly built, so
        untrained unless this student is full width; for sizes and speed, not for scores)."""
        if self.width_multiplier == 1.0:
            return self._deployable(self.student)
        with torch.random.fork_rng(devices=[]):  # no draw from the run's random stream
            return self._deployable(self._build_student(1.0))

    # -- forward ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.anomalies is not None:  # a different anomaly stream per rank and seed
            seed = torch.initial_seed() % (2**31) + 7919 * self.global_rank
            self.anomalies.generator.manual_seed(int(seed))

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The deployed encoder's features in eval mode (no gradient)."""
        was_training = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            features = self.encoder(images)
        self.encoder.train(was_training)
        return [f.detach() for f in features]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Smoothed anomaly maps ``(B, H, W)`` of the deployed model."""
        teacher = self.teacher_features(images)
        student = self.student(teacher)
        return anomaly_map(student, teacher, images.shape[-2:], self.hparams.blur_sigma, self.hparams.map_mode)

    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        started = time.perf_counter()
        scores, maps = self.deployable_model()(self.raw_images(images))  # what ships
        maps = maps.squeeze(1)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self._infer_seconds += time.perf_counter() - started
        self._infer_images += images.shape[0]
        return {"score": scores, "map": maps}

    # -- training ----------------------------------------------------------------------------
    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": self.hparams.student_lr}]
        if self.expert is not None:
            groups.append({"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": self.hparams.teacher_lr})
        return torch.optim.Adam(groups, betas=betas)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        anomalous, mask = (None, None)
        if self.anomalies is not None:
            anomalous, mask = self.anomalies(images)
        loss = images.new_zeros(())
        expert_normal = None
        if self.expert is not None:
            with torch.no_grad():
                expert_normal = self.expert(images)
                expert_anomalous = self.expert(anomalous) if anomalous is not None else None
            self.encoder.train()
            teacher_train_normal = self.encoder(images)
            teacher_train_anomalous = self.encoder(anomalous) if anomalous is not None else None
            teacher_loss = rd_loss.teacher_loss(
                teacher_train_normal, expert_normal, teacher_train_anomalous, expert_anomalous, mask
            )
            self.log("train/teacher_loss", teacher_loss, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=images.shape[0])
            loss = loss + teacher_loss
        teacher_normal = self.teacher_features(images)
        student_normal = self.student(teacher_normal)
        student_anomalous = self.student(self.teacher_features(anomalous)) if anomalous is not None else None
        student_loss = rd_loss.student_loss(student_normal, teacher_normal, student_anomalous, expert_normal)
        self.log("train/student_loss", student_loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=images.shape[0])
        loss = loss + student_loss
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_seconds, self._train_images = 0.0, 0

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["image"].is_cuda:
            torch.cuda.synchronize(batch["image"].device)
        self._train_seconds += time.perf_counter() - self._batch_started
        self._train_images += batch["image"].shape[0]

    def on_train_epoch_end(self) -> None:
        if self._train_seconds > 0:
            # images per second of one process (forward, backward and optimiser step)
            self.log("train/images_per_s", self._train_images / self._train_seconds, on_epoch=True,
                     sync_dist=False, batch_size=1)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.val_anomalies is not None:  # the same synthetic anomalies every epoch
            self.val_anomalies.generator.manual_seed(VAL_ANOMALY_SEED + 7919 * self.global_rank)
        self._val = {"maps": [], "masks": [], "scores": [], "labels": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = self.normal_only(batch)  # labelled anomalies are scored by the base class
        if len(images) == 0:
            return
        teacher = self.teacher_features(images)
        student = self.student(teacher)
        self.log("val/loss", rd_loss.distillation_loss(student, teacher), on_epoch=True, prog_bar=True,
                 sync_dist=True, batch_size=images.shape[0])
        # per-pixel 1 - cos on held-out normal images: the unsmoothed anomaly map's mean, per level
        # and summed (what a student that reproduces normal features badly raises everywhere)
        levels = [rd_loss.pixel_cosine_loss([s], [t]) for s, t in zip(student, teacher, strict=True)]
        for level, value in enumerate(levels):
            self.log(f"val/pixel_loss_level{level}", value, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        self.log("val/pixel_loss", torch.stack(levels).sum(), on_epoch=True, sync_dist=True,
                 batch_size=images.shape[0])
        if self.val_anomalies is None:
            return
        anomalous, masks = self.val_anomalies(images)
        clean_maps = anomaly_map(student, teacher, images.shape[-2:], self.hparams.blur_sigma, self.hparams.map_mode)
        anomalous_maps = self(anomalous)
        masks = masks.squeeze(1) > 0.5
        self._val["maps"] += [clean_maps.detach().float().cpu(), anomalous_maps.detach().float().cpu()]
        self._val["masks"] += [torch.zeros_like(masks).cpu(), masks.cpu()]
        self._val["scores"] += [image_scores(clean_maps).float().cpu(), image_scores(anomalous_maps).float().cpu()]
        self._val["labels"] += [torch.zeros(len(images), dtype=torch.long),
                                masks.flatten(1).any(1).long().cpu()]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val.get("maps"):
            return
        masks, labels = torch.cat(self._val["masks"]), torch.cat(self._val["labels"])
        if masks.any():
            pixel = kd_metrics.pixel_auroc(torch.cat(self._val["maps"]), masks)
            self.log("val/synthetic_pixel_auroc", pixel, sync_dist=True, batch_size=1)
        if 0 < int(labels.sum()) < len(labels):
            image = kd_metrics.image_auroc(torch.cat(self._val["scores"]), labels)
            self.log("val/synthetic_image_auroc", image, sync_dist=True, batch_size=1)
        self._val = {}

    # -- test ----------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._infer_seconds, self._infer_images = 0.0, 0
        self._examples, self._paths = {}, {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        paths = batch.get("path")
        if paths is None:
            return
        for position, (index, path) in enumerate(zip(batch["index"].tolist(), paths, strict=True)):
            self._paths[int(index)] = str(path)
            kind = defect_type_of(str(path))
            if kind not in self._examples or index < self._examples[kind][0]:
                pixels = batch["image"][position].detach().float().cpu()
                mean = torch.tensor(self.input_mean).view(-1, 1, 1)
                std = torch.tensor(self.input_std).view(-1, 1, 1)
                self._examples[kind] = (int(index), (pixels * std + mean).clamp(0, 1))

    def on_test_epoch_end(self) -> None:
        if self._infer_images:
            self.log("test/images_per_s", self._infer_images / max(self._infer_seconds, 1e-9), sync_dist=False,
                     batch_size=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._examples)
            merged: dict[str, tuple[int, torch.Tensor]] = {}
            for part in gathered:
                for kind, (index, image) in (part or {}).items():
                    if kind not in merged or index < merged[kind][0]:
                        merged[kind] = (index, image)
            self._examples = merged
        super().on_test_epoch_end()

    def plot_test_results(self, results: dict[str, torch.Tensor]) -> None:
        """Anomaly-map overlays of one fixed test image per type (good + each defect)."""
        if "map" not in results or not self._examples:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        position_of = {int(index): row for row, index in enumerate(results["index"].tolist())}
        kinds = sorted(self._examples, key=lambda kind: (kind != "good", kind))
        maps = results["map"]
        low, high = float(maps.min()), float(maps.max())
        figure, axes = plt.subplots(2, len(kinds), figsize=(3.0 * len(kinds), 6.2), squeeze=False)
        for column, kind in enumerate(kinds):
            index, image = self._examples[kind]
            row = position_of[index]
            picture = image.permute(1, 2, 0).numpy()
            if picture.shape[2] == 1:
                picture = picture[:, :, 0]
            axes[0, column].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            axes[0, column].set_title(f"{kind} (score {float(results['score'][row]):.3f})", fontsize=9)
            axes[1, column].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            shown = axes[1, column].imshow(maps[row].numpy(), cmap="jet", alpha=0.5, vmin=low, vmax=high)
            if "mask" in results and results["mask"][row].any():
                axes[1, column].contour(results["mask"][row].float().numpy(), levels=[0.5], colors="white", linewidths=1.2)
            for axis in axes[:, column]:
                axis.set_axis_off()
        figure.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02, label="anomaly map")
        figure.suptitle(f"{self.scheme_name}: anomaly maps (ground truth in white)")
        log_figure_from_module(self, figure, "plots/anomaly_maps.png")


def defect_type_of(path: str) -> str:
    """The test folder of an MVTec-style image path (``good`` or the defect type)."""
    from pathlib import Path

    return Path(path).parent.name or "unknown"


__all__ = ["ReverseDistillationScheme", "defect_type_of"]
