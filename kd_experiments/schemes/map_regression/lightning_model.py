"""Map regression: distil a whole map-producing detector into an encoder-free pixel student.

Pol et al. ("Knowledge Distillation for Anomaly Detection", arXiv 2310.06047) compress an
unsupervised detector into a small *supervised* student that regresses the detector's
anomaly score. This scheme applies the idea to anomaly *maps*: the teacher is any trained
map-producing run of this framework (reverse distillation, RD with Expert, PatchCore;
:mod:`.teachers`), frozen; the student (:class:`~.torch_model.MapStudent`) is a small
fully convolutional network with no pretrained encoder, of the size class of EfficientAD's
patch description network (Batzner et al., WACV 2024), that writes the map at stride 4.

What it learns from (computed once per run, cached on disk by teacher and data,
:class:`kd_experiments.cache.TensorCache`):

- the teacher's maps on the normal training images, and
- on ``synthetic_per_image`` synthetic anomalies made from each of them (Perlin-noise
  masks with procedural or in-set textures, the DRAEM recipe the RD-with-Expert scheme
  also uses: :mod:`kd_experiments.synthetic_anomalies`), so that the high teacher scores
  a defect causes are seen in training;
- with ``augment_per_image > 0`` (off by default), on that many random views of each
  training image too (a small rotation, shift, scale and brightness / contrast change,
  :func:`kd_experiments.augmentation.random_views`), labelled by the teacher: the
  student is not limited to the training images, since the teacher scores any image
  (Pol et al.'s point). A training step shows each image as the original or one of its
  views, drawn at random, beside one of its synthetic anomalies; synthetic copy ``j`` is
  made from view ``j mod (1 + augment_per_image)`` (view 0: the original);
- with ``feature_weight > 0`` (a switch, off by default), also the teacher's intermediate
  features: level ``feature_level`` of its pretrained encoder
  (:class:`~kd_experiments.backbones.FeatureEncoder`), or several levels (a list, e.g.
  ``[0, 1]``: the stride-4 and stride-8 features, as EfficientAD's patch network learns the
  concatenation of two levels of a pretrained network), each standardised per channel over
  the normal training images and regressed by a 1x1 head on the student's fused features
  pooled to that level's grid (mean squared error averaged over the levels, weight
  ``feature_weight``). The head only shapes training: it is not part of the deployed model.

A teacher scores the images it was built from unlike the images it will be tested on: a
PatchCore bank holds their patches, so their maps are near zero where every other image's are
not, and on MVTec *screw* the bank's own images even reverse the sign of the map's relation to the
object (``benchmarks/map_regression_shift.py``). With ``teacher_leave_one_out`` (a switch, off by
default), each training image, its views and its synthetic anomalies are scored against the bank
less that image's own patches (:meth:`PatchCoreScheme.score_leaving_out
<kd_experiments.schemes.patchcore.PatchCoreScheme.score_leaving_out>`, images recognised by
:func:`~kd_experiments.data.common.sample_id`), i.e. as images the teacher never saw.

Maps are compared at stride 4 (the teacher's final, smoothed map average-pooled) in units
of the teacher's normal-image scale (its ``map_scale_quantile`` quantile over the normal
training maps), with the loss of :mod:`.loss` (L1 by default, anomalous pixels weighted
``1 + anomaly_weight``). Validation uses held-out normal training images and fixed
synthetic anomalies made from them (``val/synthetic_pixel_auroc``,
``val/synthetic_image_auroc``, ``val/synthetic_aupro``, ``val/loss``; the teacher's own
figures on the same images are logged once as ``val/teacher_synthetic_*``): never the test
split.

Size: ``scheme.deployed_mac_ratio`` asks for a student whose *deployed* model (the whole
thing that ships: preprocessing, network, smoothing, scoring) has that many times fewer
multiply-accumulates than the teacher's deployed model (encoder included); the width is
found by search (``scheme.width`` sets it directly). ``compression_ratio`` is the
teacher's deployed parameters over the student's, and every run logs ``deployed_params``,
``deployed_macs`` and ``deployed_compression_ratio`` beside it.

Evaluation scores through :meth:`deployable_model` (raw images in, ``(scores, maps)``
out), so what is tested is what ships; the teacher is scored on the same test images
(``test/teacher_*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments import metrics as kd_metrics
from kd_experiments.anomaly_maps import upsample
from kd_experiments.augmentation import check_view_settings, random_views
from kd_experiments.cache import TensorCache, digest, module_digest, tensor_digest
from kd_experiments.compression import count_macs, count_parameters, size_summary
from kd_experiments.data.common import normalize, sample_id
from kd_experiments.deployable import DeployableModel, Preprocessing, deployed_sizes
from kd_experiments.errors import ConfigError
from kd_experiments.schedules import LR_SCHEDULES, cosine_decay
from kd_experiments.schemes.base import AnomalyScheme
from kd_experiments.schemes.map_regression.loss import LOSSES, downsample_mask, map_loss
from kd_experiments.schemes.map_regression.teachers import MapTeacher
from kd_experiments.schemes.map_regression.torch_model import (
    MAP_STRIDE,
    MapStudent,
    MapStudentDeployable,
    describe,
    fold_batch_norm,
    smooth_student_map,
    width_for_mac_ratio,
)
from kd_experiments.synthetic_anomalies import TEXTURE_SOURCES, SyntheticAnomalies


def feature_levels(feature_level: Any) -> tuple[int, ...]:
    """``scheme.feature_level`` (one level or a list of them) as a tuple of distinct levels >= 0."""
    levels = [feature_level] if isinstance(feature_level, int) else feature_level
    try:
        levels = list(levels)
    except TypeError:
        levels = None
    if (not levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in levels)
            or len(set(levels)) != len(levels)):
        raise ConfigError("scheme.feature_level must be an integer >= 0 or a non-empty list of distinct ones, "
                          f"got {feature_level!r}")
    return tuple(int(v) for v in levels)


class MapRegressionScheme(AnomalyScheme):
    """Teacher (any map-producing detector, frozen) -> encoder-free map student.

    Args:
        input_shape: ``(C, H, W)`` of the datamodule's images.
        teacher: the frozen map teacher (a :class:`~.teachers.MapTeacher`, or any
            map-producing deployable model); needed to fit and to choose the width by
            ratio, not to rebuild a trained student from its checkpoint.
        deployed_mac_ratio: teacher's deployed MACs / the student's deployed MACs.
        width: the student's width directly (wins over the ratio).
        depth: 3x3 convolutions of the student's context path at stride 16.
        context_multiplier: context-path width / ``width``.
        fusion: ``context`` | ``pyramid``: how the context path joins the stem's features
            (:class:`~.torch_model.MapStudent`).
        merge_depth: 3x3 convolutions of the pyramid's merge at stride 8 (``pyramid`` only).
        map_depth: residual depthwise-separable blocks at the map resolution, before the head.
        norm: ``none`` | ``batch``: batch normalisation between each convolution and its ReLU
            while training, folded into the convolutions in the deployable model (same MACs).
        loss: ``l1`` | ``mse`` on the normalised maps.
        anomaly_weight: extra weight of anomalous pixels (0: plain mean).
        synthetic_per_image: synthetic anomalies made from each training image.
        texture_source, anomaly_beta_max: the synthetic anomalies' textures and opacity.
        synthetic_seed: seed of the (cached) synthetic anomalies and views.
        augment_per_image: random views of each training image labelled by the teacher (0: none).
        augment_degrees, augment_translate, augment_scale, augment_colour: the views' largest
            rotation (degrees), shift and scale change (fractions of the side) and brightness /
            contrast change (fraction); see :func:`kd_experiments.augmentation.random_views`.
        learning_rate, weight_decay: AdamW.
        lr_schedule: ``constant`` (the rate throughout) or ``cosine`` (per-step cosine decay
            over the run to ``COSINE_FLOOR`` of the rate, so the final weights, the ones
            tested, are not those of a full-rate step).
        blur_sigma: the teacher's map smoothing in input pixels (the student smooths at
            stride 4 with ``blur_sigma / 4``).
        map_scale_quantile: quantile of the teacher's normal training maps that is the
            unit of the regressed maps.
        teacher_batch_size: images per teacher call when the targets are computed.
        cache_dir: folder of the teacher-map cache (``null``: no cache, always computed).
        measure_teacher: also score the test split with the teacher (``test/teacher_*``).
        feature_weight: weight of the teacher-feature target (0: off).
        feature_level: which level of the teacher encoder's outputs is the feature target, or
            a list of levels (each its own target; one 1x1 head writes their channels side by side).
        feature_channels: that level's channels, or the levels' total (set from the teacher; a
            checkpoint rebuilds the feature head without it).
        teacher_leave_one_out: score each training image (its views and synthetic anomalies too)
            with the teacher's memory bank less the patches of that image (a PatchCore teacher
            built by this version), so that the targets are the teacher's maps of images it has
            not memorised, as every test image is.
    """

    scheme_name = "map_regression"

    def __init__(
        self,
        input_shape: Sequence[int],
        teacher: nn.Module | None = None,
        deployed_mac_ratio: float = 30.0,
        width: int | None = None,
        depth: int = 2,
        context_multiplier: int = 2,
        fusion: str = "context",
        merge_depth: int = 1,
        map_depth: int = 0,
        norm: str = "none",
        loss: str = "l1",
        anomaly_weight: float = 4.0,
        synthetic_per_image: int = 2,
        texture_source: str = "mixed",
        anomaly_beta_max: float = 0.8,
        synthetic_seed: int = 0,
        augment_per_image: int = 0,
        augment_degrees: float = 10.0,
        augment_translate: float = 0.04,
        augment_scale: float = 0.08,
        augment_colour: float = 0.1,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-5,
        lr_schedule: str = "constant",
        blur_sigma: float = 4.0,
        map_scale_quantile: float = 0.99,
        teacher_batch_size: int = 8,
        cache_dir: str | None = None,
        measure_teacher: bool = True,
        feature_weight: float = 0.0,
        feature_level: int | Sequence[int] = 1,
        feature_channels: int | None = None,
        teacher_leave_one_out: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        self.input_shape = tuple(int(v) for v in input_shape)
        if len(self.input_shape) != 3:
            raise ConfigError(f"map_regression needs images (C, H, W), got input shape {self.input_shape}")
        if loss not in LOSSES:
            raise ConfigError(f"scheme.loss must be one of {LOSSES}, got {loss!r}")
        if texture_source not in TEXTURE_SOURCES:
            raise ConfigError(f"scheme.texture_source must be one of {TEXTURE_SOURCES}, got {texture_source!r}")
        if not isinstance(synthetic_per_image, int) or synthetic_per_image < 1:
            raise ConfigError(f"scheme.synthetic_per_image must be an integer >= 1, got {synthetic_per_image!r}")
        if not isinstance(augment_per_image, int) or augment_per_image < 0:
            raise ConfigError(f"scheme.augment_per_image must be an integer >= 0, got {augment_per_image!r}")
        check_view_settings(augment_degrees, augment_translate, augment_scale, augment_colour)
        if not 0.5 <= float(map_scale_quantile) < 1.0:
            raise ConfigError(f"scheme.map_scale_quantile must be in [0.5, 1), got {map_scale_quantile}")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"scheme.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if anomaly_weight < 0:
            raise ConfigError(f"scheme.anomaly_weight must be >= 0, got {anomaly_weight}")
        if not isinstance(teacher_leave_one_out, bool):
            raise ConfigError(f"scheme.teacher_leave_one_out must be true or false, got {teacher_leave_one_out!r}")
        if not float(feature_weight) >= 0:
            raise ConfigError(f"scheme.feature_weight must be >= 0 (0: off), got {feature_weight}")
        self._levels = feature_levels(feature_level)
        if not isinstance(feature_level, int):  # a plain list in the checkpoint and the cache key
            self.hparams["feature_level"] = list(self._levels)
        height, width_pixels = self.input_shape[1:]
        if height % (4 * MAP_STRIDE) or width_pixels % (4 * MAP_STRIDE):
            raise ConfigError(
                f"map_regression needs image sides divisible by {4 * MAP_STRIDE}, got {height}x{width_pixels} "
                "(data.image_size)"
            )
        if teacher is not None and not isinstance(teacher, MapTeacher):
            teacher = MapTeacher(teacher)
        # held, not registered: the teacher is neither trained, checkpointed nor shipped with the student
        self.__dict__["teacher"] = teacher
        self.register_buffer("map_scale", torch.tensor(1.0))
        if width is None:
            if teacher is None:
                raise ConfigError("scheme.width is needed when there is no scheme.teacher to take a ratio of")
            width = width_for_mac_ratio(deployed_mac_ratio, self.teacher_deployed_macs(),
                                        lambda candidate: self._deployed_macs_of(int(candidate)))
            self.hparams["width"] = int(width)  # a checkpoint rebuilds the same student without the teacher
        self.student = MapStudent(self.input_shape[0], int(width), depth, context_multiplier, fusion, merge_depth,
                                  map_depth, norm)
        self.feature_head: nn.Module | None = None
        if float(feature_weight) > 0:
            if feature_channels is None:
                if teacher is None:
                    raise ConfigError("scheme.feature_weight > 0 needs scheme.teacher (its encoder's features)")
                feature_channels = sum(self._teacher_level_channels())
                self.hparams["feature_channels"] = int(feature_channels)
            # trained beside the student, never shipped (deployable_model() holds the student alone)
            self.feature_head = nn.Conv2d(self.student.feature_channels, int(feature_channels), 1)
        self._targets: dict[str, torch.Tensor] = {}
        self._feature_targets: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(int(synthetic_seed))
        self._val: dict[str, list[torch.Tensor]] = {}
        self._summary: dict[str, Any] | None = None
        self.cache_status: str = "none"
        #: share of the training images the teacher's bank was built from (teacher_leave_one_out)
        self.teacher_bank_overlap: float | None = None

    # -- the teacher-feature target ------------------------------------------------------------
    def _teacher_encoder(self) -> nn.Module:
        """The teacher's pretrained encoder (the first :class:`FeatureEncoder` in its deployed model)."""
        from kd_experiments.backbones import FeatureEncoder

        assert self.teacher is not None
        encoder = next((m for m in self.teacher.model.modules() if isinstance(m, FeatureEncoder)), None)
        if encoder is None:
            raise ConfigError(
                f"scheme.feature_weight > 0 needs a teacher with a pretrained encoder (reverse distillation, RD "
                f"with Expert, PatchCore); {type(self.teacher.model).__name__} has none"
            )
        return encoder

    def _teacher_level_channels(self) -> list[int]:
        """The channels of each feature level, in ``feature_level``'s order."""
        channels = list(self._teacher_encoder().out_channels)
        for level in self._levels:
            if level >= len(channels):
                raise ConfigError(f"scheme.feature_level={self.hparams.feature_level}: the teacher's encoder has "
                                  f"{len(channels)} levels (0..{len(channels) - 1})")
        return [int(channels[level]) for level in self._levels]

    @property
    def uses_features(self) -> bool:
        return self.feature_head is not None

    def _feature_keys(self) -> list[str]:
        """The cache entry's keys of the feature targets (one level keeps the original key)."""
        if isinstance(self.hparams.feature_level, int):
            return ["train_features"]
        return [f"train_features_{level}" for level in self._levels]

    def _feature_loss(self, features: torch.Tensor, normal: torch.Tensor, synthetic: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the feature head against each level's standardised teacher features,
        averaged over the levels; ``normal`` / ``synthetic`` pick the rows (original or view, and the
        synthetic copy) of the batch's images. A 1x1 head commutes with average pooling, so the
        head reads the student's features pooled to each level's grid and that level's channels
        are its slice of the output."""
        losses, start = [], 0
        for targets in self._feature_targets:
            wanted = torch.cat([targets[normal, index], targets[synthetic, index]]).to(features.device)
            stop = start + wanted.shape[1]
            guessed = self.feature_head(F.adaptive_avg_pool2d(features, wanted.shape[-2:]))[:, start:stop]
            losses.append(F.mse_loss(guessed, wanted))
            start = stop
        return torch.stack(losses).mean()

    # -- sizes -----------------------------------------------------------------------------
    def _deployed_macs_of(self, width: int) -> int:
        deployable = MapStudentDeployable(
            Preprocessing.identity(self.input_shape),
            MapStudent(self.input_shape[0], width, self.hparams.depth, self.hparams.context_multiplier,
                       self.hparams.fusion, self.hparams.get("merge_depth", 1), self.hparams.get("map_depth", 0)),
            self.hparams.blur_sigma, torch.tensor(1.0),
        )
        return count_macs(deployable, deployable.example_input(1))

    def teacher_deployed_macs(self) -> int:
        assert self.teacher is not None
        example = torch.rand(1, self.teacher.input_channels, *self.teacher.input_size)
        return count_macs(self.teacher.model, example.to(self._teacher_device()))

    def _teacher_device(self) -> torch.device:
        assert self.teacher is not None
        tensors = [*self.teacher.model.parameters(), *self.teacher.model.buffers()]
        return tensors[0].device if tensors else torch.device("cpu")

    def _teacher_to_device(self) -> None:
        if self.teacher is not None and self._teacher_device() != self.device:
            self.teacher.to(self.device)

    def compression_summary(self) -> dict[str, Any]:
        if self._summary is None:
            student = self.deployable_model()
            example = student.example_input(1)
            student_params, student_macs = count_parameters(student.student), count_macs(student.student,
                                                                                          student.preprocess(example))
            if self.teacher is not None:
                teacher_params = count_parameters(self.teacher.model)
                teacher_macs = self.teacher_deployed_macs()
            else:
                teacher_params, teacher_macs = student_params, float("nan")
            summary = size_summary(teacher_params, student_params, teacher_macs, student_macs)
            summary.update(deployed_sizes(student, self.teacher.model if self.teacher is not None else None))
            summary.update(describe(self.student))
            self._summary = summary
        return dict(self._summary)

    # -- the deployed model ---------------------------------------------------------------
    def deployable_model(self) -> DeployableModel:
        # a norm="batch" student ships folded (fold_batch_norm): the plain student, what was counted
        return MapStudentDeployable(self.deployment_preprocessing(), fold_batch_norm(self.student),
                                    self.hparams.blur_sigma, self.map_scale).to(self.map_scale.device)

    def teacher_deployable_model(self) -> DeployableModel | None:
        return self.teacher.model if self.teacher is not None else None

    def default_preprocessing(self) -> Preprocessing:
        from kd_experiments.backbones import input_statistics

        mean, std = input_statistics("imagenet", self.input_shape[0])
        return Preprocessing(self.input_shape[1:], self.input_shape[0], tuple(mean), tuple(std))

    # -- targets -----------------------------------------------------------------------------
    @staticmethod
    def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dataset's images by ``index``, the indices, and each image's source id
        (:func:`~kd_experiments.data.common.sample_id` of its ``path``; -1 without one)."""
        images, indices, ids = [], [], []
        for position in range(len(dataset)):
            item = dataset[position]
            images.append(item["image"])
            indices.append(int(item.get("index", position)))
            ids.append(sample_id(item["path"]) if item.get("path") else -1)
        order = torch.as_tensor(indices)
        stacked = torch.zeros(int(order.max()) + 1, *images[0].shape)
        stacked[order] = torch.stack(images).float()
        stacked_ids = torch.full((len(stacked),), -1, dtype=torch.long)
        stacked_ids[order] = torch.as_tensor(ids, dtype=torch.long)
        return stacked, order, stacked_ids

    def _synthetic(self, bases: Sequence[torch.Tensor], copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``copies`` synthetic anomalies of each image, copy ``j`` made from ``bases[j % len(bases)]``."""
        preprocessing = self.deployment_preprocessing()
        maker = SyntheticAnomalies(preprocessing.mean, preprocessing.std, self.hparams.texture_source,
                                   self.hparams.anomaly_beta_max, seed=seed)
        anomalous, masks = [], []
        for copy in range(copies):
            images = bases[copy % len(bases)]
            parts = [maker(images[start:start + 16]) for start in range(0, len(images), 16)]
            anomalous.append(torch.cat([part[0] for part in parts]))
            masks.append(torch.cat([part[1] for part in parts]))
        return torch.stack(anomalous), torch.stack(masks)

    def _views(self, images: torch.Tensor) -> torch.Tensor:
        """``augment_per_image`` random views of the normalised ``images``, ``(k, N, C, H, W)``, normalised."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(hp.synthetic_seed) + 7919)
        preprocessing = self.deployment_preprocessing()
        raw = preprocessing.to_raw(images).clamp(0.0, 1.0)
        views = [normalize(torch.cat([
            random_views(raw[start:start + 64], generator, hp.augment_degrees, hp.augment_translate,
                         hp.augment_scale, hp.augment_colour) for start in range(0, len(raw), 64)]),
            preprocessing.mean, preprocessing.std)  # as the datamodule normalises
            for _ in range(int(hp.augment_per_image))]
        return torch.stack(views) if views else images.new_zeros(0, *images.shape)

    @torch.no_grad()
    def _teacher_maps(self, images: torch.Tensor, features: list[list[torch.Tensor]] | None = None,
                      ids: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's final maps ``(N, 1, H, W)`` at the data's size, on the CPU; with a list
        of lists (one per level of ``feature_level``) as ``features``, the encoder's levels of the
        same calls are appended to them. With the images' source ``ids`` ``(N,)``
        (``teacher_leave_one_out``), each image is scored leaving its own source image out of the
        teacher's memory bank."""
        assert self.teacher is not None
        device = self._teacher_device()
        captured: list[list[torch.Tensor]] = []
        hook = None
        if features is not None:
            levels = self._levels
            hook = self._teacher_encoder().register_forward_hook(
                lambda module, inputs, outputs: captured.append([outputs[level].float().cpu() for level in levels]))
        maps = []
        try:
            step = self.hparams.teacher_batch_size
            for start in range(0, len(images), step):
                raw = self.raw_images(images[start:start + step]).clamp(0.0, 1.0)
                _, batch_maps = self.teacher(raw.to(device), None if ids is None else ids[start:start + step])
                if tuple(batch_maps.shape[-2:]) != tuple(images.shape[-2:]):
                    batch_maps = upsample(batch_maps, images.shape[-2:])
                maps.append(batch_maps.float().cpu())
        finally:
            if hook is not None:
                hook.remove()
        if features is not None:
            if len(captured) != len(maps):
                raise ConfigError(f"the teacher's encoder ran {len(captured)} times for {len(maps)} batches; "
                                  "its features cannot be matched to its maps (scheme.feature_weight)")
            for position, level_features in enumerate(features):
                level_features.append(torch.cat([call[position] for call in captured]))
        return torch.cat(maps)

    def _prepare_targets(self) -> None:
        """Images, synthetic anomalies and the teacher's pooled maps for training and validation."""
        if self.teacher is None:
            raise ConfigError("map_regression needs scheme.teacher to fit (a map-producing detector)")
        datamodule = self.trainer.datamodule
        train, _, train_ids = self._stack(datamodule.train_dataset)
        val, _, val_ids = self._stack(datamodule.val_dataset)
        if self.hparams.teacher_leave_one_out:
            if not self.teacher.can_leave_out:
                raise ConfigError(
                    f"scheme.teacher_leave_one_out=true needs a PatchCore teacher whose memory bank records its "
                    f"source images; the {self.teacher.scheme_name} teacher cannot leave its training images out "
                    "(rebuild a PatchCore teacher with this version, or set scheme.teacher_leave_one_out=false)")
            if bool((train_ids < 0).any()) or bool((val_ids < 0).any()):
                raise ConfigError("scheme.teacher_leave_one_out=true needs the datamodule's items to carry their "
                                  "image 'path' (MVTec-style folders do)")
            self.teacher_bank_overlap = float(self.teacher.built_from(train_ids).float().mean())
            if self.teacher_bank_overlap == 0.0:
                raise ConfigError(
                    "scheme.teacher_leave_one_out=true: none of the training images is one the teacher's bank was "
                    "built from (another data set, renamed folders, or a bank built before image ids read "
                    "three path parts): leaving them out would change nothing; rebuild the teacher on this data")
        else:
            train_ids = val_ids = None
        copies = self.hparams.synthetic_per_image
        train_views = self._views(train)
        train_synthetic, train_masks = self._synthetic([train, *train_views], copies, self.hparams.synthetic_seed)
        val_synthetic, val_masks = self._synthetic([val], 1, self.hparams.synthetic_seed + 104729)
        parts = {
            "teacher": module_digest(self.teacher.model),
            "train": tensor_digest(train), "val": tensor_digest(val),
            "synthetic": [copies, self.hparams.texture_source, self.hparams.anomaly_beta_max,
                          self.hparams.synthetic_seed],
            "stride": MAP_STRIDE, "torch": torch.__version__,
        }
        if self.uses_features:  # an entry with the feature targets too (entries without them keep their keys)
            parts["feature_level"] = self.hparams.feature_level
        if self.hparams.teacher_leave_one_out:  # likewise for leave-one-image-out targets
            parts["leave_one_out"] = True
        if len(train_views):  # likewise for the views
            parts["views"] = [len(train_views), *(float(self.hparams[name]) for name in (
                "augment_degrees", "augment_translate", "augment_scale", "augment_colour"))]
        key = digest(parts)
        cache = TensorCache(self.hparams.cache_dir) if self.hparams.cache_dir else None
        entry = None
        if cache is not None:
            if self.trainer.is_global_zero:
                entry = cache.load(key)
                if entry is None:
                    entry = self._compute_targets(train, train_views, train_synthetic, val, val_synthetic, val_masks,
                                                  train_ids, val_ids)
                    cache.save(key, entry)
            self.trainer.strategy.barrier("map_regression_targets")
            if entry is None:  # other ranks read what rank 0 wrote
                entry = cache.load(key)
            self.cache_status = "hit" if cache.last == "hit" else "miss"
        if entry is None:
            entry = self._compute_targets(train, train_views, train_synthetic, val, val_synthetic, val_masks,
                                          train_ids, val_ids)
        self.map_scale.fill_(float(entry["map_scale"]))
        scale = self.map_scale.cpu()
        size = (self.input_shape[1] // MAP_STRIDE, self.input_shape[2] // MAP_STRIDE)
        self._targets = {
            "train_images": train, "train_views": train_views, "train_synthetic": train_synthetic,
            "train_masks": torch.stack([downsample_mask(m, size) for m in train_masks]),
            "train_targets": entry["train_targets"] / scale,
            "val_synthetic": val_synthetic[0], "val_masks": val_masks[0],
            "val_targets": entry["val_targets"] / scale,
        }
        if self.uses_features:
            self._feature_targets = []
            for key in self._feature_keys():
                features = entry[key]
                mean = features[0].mean(dim=(0, 2, 3), keepdim=True)
                std = features[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
                self._feature_targets.append((features - mean) / std)  # per channel, over the normal images
        self._teacher_val = {k: float(entry[k]) for k in ("teacher_synthetic_pixel_auroc",
                                                          "teacher_synthetic_image_auroc")}

    def _compute_targets(self, train, train_views, train_synthetic, val, val_synthetic, val_masks,
                         train_ids=None, val_ids=None) -> dict[str, torch.Tensor]:
        """The teacher's pooled maps (and features) on every training and validation image; with
        source ids, each image (or its view, or a synthetic anomaly made from it) is scored
        leaving its source image out of the teacher's bank."""
        pool = MAP_STRIDE
        features: list[list[torch.Tensor]] | None = [[] for _ in self._levels] if self.uses_features else None
        normal = F.avg_pool2d(self._teacher_maps(train, features, train_ids), pool)
        views = [F.avg_pool2d(self._teacher_maps(view, features, train_ids), pool) for view in train_views]
        synthetic = torch.stack([F.avg_pool2d(self._teacher_maps(copy, features, train_ids), pool)
                                 for copy in train_synthetic])
        val_normal_full = self._teacher_maps(val, ids=val_ids)
        val_synthetic_full = self._teacher_maps(val_synthetic[0], ids=val_ids)
        scale = torch.quantile(normal.flatten().double(), float(self.hparams.map_scale_quantile)).float()
        scale = scale if scale > 0 else torch.tensor(1.0)
        masks = torch.cat([torch.zeros_like(val_masks[0]), val_masks[0]]).squeeze(1) > 0.5
        maps = torch.cat([val_normal_full, val_synthetic_full]).squeeze(1)
        labels = masks.flatten(1).any(1).long()
        extra = ({key: torch.stack(level) for key, level in zip(self._feature_keys(), features)}
                 if features is not None else {})
        return {
            **extra,
            "train_targets": torch.cat([normal.unsqueeze(0), *(view.unsqueeze(0) for view in views), synthetic]),
            "val_targets": torch.stack([F.avg_pool2d(val_normal_full, pool), F.avg_pool2d(val_synthetic_full, pool)]),
            "map_scale": scale,
            "teacher_synthetic_pixel_auroc": torch.tensor(kd_metrics.pixel_auroc(maps, masks)),
            "teacher_synthetic_image_auroc": torch.tensor(
                kd_metrics.image_auroc(maps.flatten(1).amax(1), labels) if 0 < int(labels.sum()) < len(labels)
                else float("nan")),
        }

    def _check_weight_averaging(self) -> None:
        """``scheme.norm=batch`` refuses a weight average that averages the buffers too (``callbacks=ema``).

        The average of a batch-normalised student's weights and the average of its running
        statistics do not belong together: the statistics were measured for other weights (the
        convolutions before each normalisation drift in scale as they train), and on bottle
        (``synthetic_per_image=4``, 300-epoch cosine schedule) the averaged student's maps of the
        training images sat 0.75 normal-map units above the same weights' maps under their own batch
        statistics by epoch 74, its validation L1 rising every epoch while the training loss fell.
        """
        if self.student.norm != "batch" or self._trainer is None:
            return
        from lightning.pytorch.callbacks import WeightAveraging

        for callback in self.trainer.callbacks:
            if isinstance(callback, WeightAveraging):
                raise ConfigError(
                    f"scheme.norm=batch cannot train under {type(callback).__name__} (callbacks=ema): the average "
                    "of a batch-normalised student's weights does not match the average of its normalisation "
                    "statistics; use scheme.norm=none with callbacks=ema, or scheme.norm=batch without it"
                )

    def on_fit_start(self) -> None:
        self._check_weight_averaging()
        self._teacher_to_device()
        self._prepare_targets()
        if self.logger is not None and self.trainer.is_global_zero:
            overlap = {} if self.teacher_bank_overlap is None else {"teacher_bank_overlap": self.teacher_bank_overlap}
            self.logger.log_metrics({"map_scale": float(self.map_scale), **overlap,
                                     "teacher_map_cache_hit": float(self.cache_status == "hit"),
                                     **{f"val/{k}": v for k, v in self._teacher_val.items()}}, step=0)

    # -- training -----------------------------------------------------------------------------
    def configure_optimizers(self):
        parameters = [*self.student.parameters(), *(self.feature_head.parameters() if self.uses_features else [])]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine_decay(optimizer, steps), "interval": "step"}}

    def _student_maps(self, images: torch.Tensor) -> torch.Tensor:
        return smooth_student_map(self.student(images), self.hparams.blur_sigma)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        index = batch["index"].long().cpu()
        targets = self._targets
        copies = targets["train_synthetic"].shape[0]
        views = 1 + targets["train_views"].shape[0]  # the original and its views
        pick = torch.randint(copies, (len(index),), generator=self._generator)
        normal = batch["image"]
        view = torch.zeros_like(pick)
        if views > 1:
            view = torch.randint(views, (len(index),), generator=self._generator)
            shown = (view > 0).nonzero().flatten()
            if len(shown):
                normal = normal.clone()
                normal[shown] = targets["train_views"][view[shown] - 1, index[shown]].to(normal)
        synthetic = targets["train_synthetic"][pick, index].to(normal.device)
        target = torch.cat([targets["train_targets"][view, index], targets["train_targets"][views + pick, index]])
        masks = torch.cat([torch.zeros_like(targets["train_masks"][pick, index]), targets["train_masks"][pick, index]])
        images = torch.cat([normal, synthetic])
        features = self.student.features(images)
        predicted = smooth_student_map(self.student.head(features), self.hparams.blur_sigma)
        loss = map_loss(predicted, target.to(predicted.device), masks.to(predicted.device),
                        self.hparams.loss, self.hparams.anomaly_weight)
        if self.uses_features:
            feature_loss = self._feature_loss(features, view, views + pick, index)
            self.check_finite("train/feature_loss", feature_loss)
            self.log("train/feature_loss", feature_loss, on_step=False, on_epoch=True, batch_size=len(index))
            loss = loss + float(self.hparams.feature_weight) * feature_loss
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(index))
        return loss

    # -- validation ---------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val = {"maps": [], "masks": [], "scores": [], "labels": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._targets or "index" not in batch:
            return
        index = batch["index"].long().cpu()
        normal = batch["image"]
        synthetic = self._targets["val_synthetic"][index].to(normal.device)
        images = torch.cat([normal, synthetic])
        target = torch.cat([self._targets["val_targets"][0, index], self._targets["val_targets"][1, index]])
        predicted = self._student_maps(images)
        self.log("val/loss", map_loss(predicted, target.to(predicted.device), None, self.hparams.loss, 0.0),
                 on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(index))
        scores, maps = self.deployable_model()(self.raw_images(images))
        masks = torch.cat([torch.zeros_like(self._targets["val_masks"][index]), self._targets["val_masks"][index]])
        masks = masks.squeeze(1) > 0.5
        self._val["maps"].append(maps.squeeze(1).float().cpu())
        self._val["masks"].append(masks)
        self._val["scores"].append(scores.float().cpu())
        self._val["labels"].append(masks.flatten(1).any(1).long())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val.get("maps"):
            return
        self.log_synthetic_validation(*(torch.cat(self._val[key]) for key in ("maps", "masks", "scores", "labels")),
                                      aupro=True)  # the figure a map student most often falls short on
        self._val = {}

    # -- test --------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        self._teacher_to_device()

    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raw = self.raw_images(batch["image"])
        with torch.no_grad():
            scores, maps = self.deployable_model()(raw)  # what ships
            outputs = {"score": scores, "map": maps.squeeze(1)}
            if self.teacher is not None and self.hparams.measure_teacher:
                teacher_scores, teacher_maps = self.teacher(raw.clamp(0.0, 1.0))
                if tuple(teacher_maps.shape[-2:]) != tuple(maps.shape[-2:]):
                    teacher_maps = upsample(teacher_maps, maps.shape[-2:])
                    teacher_scores = teacher_maps.flatten(1).amax(1)
                outputs.update({"teacher_score": teacher_scores, "teacher_map": teacher_maps.squeeze(1)})
        return outputs

    @property
    def teacher_scores(self) -> bool:  # type: ignore[override]
        return self.teacher is not None and bool(self.hparams.measure_teacher)


__all__ = ["MapRegressionScheme"]
