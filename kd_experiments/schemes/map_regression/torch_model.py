"""An encoder-free pixel student that regresses a map-producing detector's anomaly map.

The idea is Pol et al.'s unsupervised-to-supervised compression ("Knowledge Distillation
for Anomaly Detection", arXiv 2310.06047): a small supervised network learns to reproduce
a trained detector's output, here the *anomaly map* rather than the image score. The
network is of the size class of the patch description network (PDN) of EfficientAD
(Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024): a few strided convolutions and no pretrained
encoder at inference.

:class:`MapStudent` (plain PyTorch):

- a stem of two 4x4 stride-2 convolutions brings the image to the map resolution
  (stride 4: 64 x 64 for 256 px, the resolution of the teachers' shallowest level);
- a context path of stride-2 3x3 convolutions (strides 8 and 16) followed by ``depth``
  3x3 convolutions at stride 16 gives the receptive field a defect needs (a scratch is
  judged against the object around it); it is up-sampled back and added to the stem's
  features;
- with ``fusion="pyramid"`` the context comes back in two steps, as in a feature pyramid
  network (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017): the
  stride-16 context is up-sampled to stride 8, added to a 1x1 lateral of the path's stride-8
  features and merged by a 3x3 convolution there before it joins the stem's features at
  stride 4. The default (``fusion="context"``) adds the stride-16 context to the stride-4
  features directly, so every map pixel reads context that was localised to 16-pixel cells;
  the pyramid gives a small defect mid-scale features localised to 8-pixel cells for about a
  tenth of the student's multiply-accumulates;
- ``map_depth`` residual depthwise-separable blocks (a 3x3 depthwise convolution, then a 1x1
  convolution, added to their input; the separable convolution of Howard et al., "MobileNets:
  Efficient Convolutional Neural Networks for Mobile Vision Applications", arXiv 1704.04861) may
  refine the fused features at the map resolution: each costs about a seventh of a full 3x3
  convolution there (``9c + c^2`` against ``9c^2`` multiply-accumulates per pixel for ``c``
  channels), so a student can spend depth where the map is written rather than at stride 8;
- a head (3x3 then 1x1 convolution) writes one channel: the anomaly map at stride 4,
  in units of the teacher's normal-image map scale (see :class:`MapStudentDeployable`);
- with ``norm="batch"`` every convolution followed by a ReLU (stem, context path, merge, head)
  is trained with batch normalisation between the two (Ioffe and Szegedy, "Batch
  Normalization", ICML 2015), which conditions a plain stack of convolutions far better than
  the default initialisation alone; at inference a normalisation is an affine map per channel,
  so :func:`fold_batch_norm` folds each into the weights and bias of its convolution and the
  student that ships is the plain one (``norm="none"``): same layers, same parameter count,
  same multiply-accumulates, same outputs up to rounding.

:class:`MapStudentDeployable` is what ships: raw images in, preprocessing inside, the
map smoothed at its own resolution (Gaussian of ``sigma / stride``: a blur of the
up-sampled map at sigma 4 costs more than the whole small student, and the two agree up
to the bilinear interpolation), up-sampled to the input size, multiplied back to the
teacher's units, and the image score is the map maximum (the teachers' rule).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kd_experiments.anomaly_maps import gaussian_blur, image_scores, upsample
from kd_experiments.compression import check_ratio, closest_to_ratio
from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.errors import ConfigError

#: the map's stride: the student's map is 1/4 of the input size
MAP_STRIDE = 4
#: how the context path's features join the stem's (see the module docstring)
FUSIONS = ("context", "pyramid")
#: the normalisation trained between a convolution and its ReLU (folded away at deployment)
NORMS = ("none", "batch")


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, norm: str = "none") -> nn.Sequential:
    """``Conv2d -> [BatchNorm2d] -> ReLU``: the convolution at index 0 whatever ``norm`` is (checkpoints
    of ``norm="none"`` students keep their keys; :func:`fold_batch_norm` finds the pairs by position)."""
    convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                            padding=(kernel_size - 1) // 2 if kernel_size % 2 else kernel_size // 2 - 1)
    if norm == "batch":
        return nn.Sequential(convolution, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
    return nn.Sequential(convolution, nn.ReLU(inplace=True))


class SeparableBlock(nn.Module):
    """``relu(x + pointwise(relu(depthwise(x))))``: a residual depthwise-separable 3x3 convolution
    (see the module docstring) that keeps the channels and the resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(features + self.pointwise(F.relu(self.depthwise(features))))


class MapStudent(nn.Module):
    """Encoder-free fully convolutional map regressor (see the module docstring).

    Args:
        in_channels: image channels (3 for RGB).
        width: channels of the stem; the map-resolution features have ``2 * width``,
            the context path ``context_multiplier * width``.
        depth: 3x3 convolutions at stride 16 in the context path (receptive field).
        context_multiplier: width of the context path relative to ``width``.
        fusion: ``context`` (the stride-16 context added at stride 4) or ``pyramid`` (added
            at stride 8 to the path's stride-8 features first; see the module docstring).
        merge_depth: 3x3 convolutions of the pyramid's merge at stride 8 (``pyramid`` only):
            each one costs about a quarter of a 3x3 convolution at the map resolution.
        map_depth: residual depthwise-separable blocks on the fused features at the map
            resolution, before the head (0: none, the student as it was).
        norm: ``none`` or ``batch`` (batch normalisation after each convolution of the stem,
            context path, merge and head while training; :func:`fold_batch_norm` gives the plain
            student it deploys as).
    """

    def __init__(self, in_channels: int = 3, width: int = 16, depth: int = 2, context_multiplier: int = 2,
                 fusion: str = "context", merge_depth: int = 1, map_depth: int = 0, norm: str = "none") -> None:
        super().__init__()
        if int(width) < 1 or int(depth) < 0 or int(context_multiplier) < 1:
            raise ConfigError(
                f"map student needs width >= 1, depth >= 0, context_multiplier >= 1; got width={width}, "
                f"depth={depth}, context_multiplier={context_multiplier}"
            )
        if fusion not in FUSIONS:
            raise ConfigError(f"scheme.fusion must be one of {FUSIONS}, got {fusion!r}")
        if isinstance(merge_depth, bool) or not isinstance(merge_depth, int) or merge_depth < 1:
            raise ConfigError(f"scheme.merge_depth must be an integer >= 1, got {merge_depth!r}")
        if merge_depth != 1 and fusion != "pyramid":
            raise ConfigError(f"scheme.merge_depth={merge_depth} needs scheme.fusion=pyramid (the context fusion "
                              "has no stride-8 merge)")
        if isinstance(map_depth, bool) or not isinstance(map_depth, int) or map_depth < 0:
            raise ConfigError(f"scheme.map_depth must be an integer >= 0, got {map_depth!r}")
        if norm not in NORMS:
            raise ConfigError(f"scheme.norm must be one of {NORMS}, got {norm!r}")
        self.width, self.depth, self.fusion, self.merge_depth = int(width), int(depth), fusion, merge_depth
        self.map_depth, self.norm = map_depth, norm
        self.in_channels, self.context_multiplier = int(in_channels), int(context_multiplier)
        features, context = 2 * self.width, int(context_multiplier) * self.width
        self.stem = nn.Sequential(_conv(in_channels, self.width, 4, 2, norm), _conv(self.width, features, 4, 2, norm))
        self.context = nn.Sequential(
            _conv(features, context, 3, 2, norm),
            _conv(context, context, 3, 2, norm),
            *[_conv(context, context, 3, norm=norm) for _ in range(self.depth)],
        )
        self.lateral = nn.Conv2d(context, features, 1)
        if fusion == "pyramid":  # the stride-8 step (context[0] is the path's stride-8 convolution)
            self.lateral8 = nn.Conv2d(context, features, 1)
            self.merge8 = _conv(features, features, 3, norm=norm)
            # the merge's further convolutions (a module of its own: merge_depth=1 checkpoints load as before)
            self.refine8 = nn.Sequential(*[_conv(features, features, 3, norm=norm) for _ in range(merge_depth - 1)])
        if map_depth:  # a module of its own only when used: map_depth=0 checkpoints load as before
            self.refine4 = nn.Sequential(*[SeparableBlock(features) for _ in range(map_depth)])
        self.head = nn.Sequential(_conv(features, self.width, 3, norm=norm), nn.Conv2d(self.width, 1, 1))

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`features` (the map-resolution features the head reads)."""
        return 2 * self.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the fused features at stride 4, ``(B, 2 * width, H / 4, W / 4)``."""
        local = self.stem(images)
        if self.fusion == "pyramid":
            middle = self.context[0](local)
            context = F.interpolate(self.lateral(self.context[1:](middle)), size=middle.shape[-2:], mode="bilinear",
                                    align_corners=False)
            context = self.refine8(self.merge8(self.lateral8(middle) + context))
        else:
            context = self.lateral(self.context(local))
        context = F.interpolate(context, size=local.shape[-2:], mode="bilinear", align_corners=False)
        fused = F.relu(local + context)
        return self.refine4(fused) if self.map_depth else fused

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, C, H, W)`` -> raw maps ``(B, 1, H / 4, W / 4)`` (normal-image units)."""
        return self.head(self.features(images))


def fold_batch_norm(student: MapStudent) -> MapStudent:
    """The plain (``norm="none"``) student that computes what ``student`` computes in eval mode.

    Each ``Conv2d -> BatchNorm2d`` pair of a ``norm="batch"`` student becomes one convolution
    whose weights and bias absorb the normalisation's running statistics and affine parameters
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); every other weight is copied. A
    ``norm="none"`` student is returned as it is. The result is a new module: ``student`` keeps
    training, and the folded copy is what is scored, exported and counted.
    """
    if student.norm == "none":
        return student
    plain = MapStudent(student.in_channels, student.width, student.depth, student.context_multiplier, student.fusion,
                       student.merge_depth, student.map_depth, norm="none").to(next(student.parameters()).device)
    normalisations = {name for name, module in student.named_modules() if isinstance(module, nn.BatchNorm2d)}
    state = {key: value.detach() for key, value in student.state_dict().items()
             if key.rsplit(".", 1)[0] not in normalisations}
    for name in normalisations:  # "<block>.1": its convolution is "<block>.0" (see _conv)
        block = name.rsplit(".", 1)[0]
        convolution, normalisation = student.get_submodule(f"{block}.0"), student.get_submodule(name)
        fused = fuse_conv_bn_eval(copy.deepcopy(convolution).eval(), copy.deepcopy(normalisation).eval())
        state[f"{block}.0.weight"], state[f"{block}.0.bias"] = fused.weight.detach(), fused.bias.detach()
    plain.load_state_dict(state, strict=True)
    return plain.train(student.training)


def smooth_student_map(raw: torch.Tensor, sigma: float) -> torch.Tensor:
    """The student's map smoothed at its own resolution (sigma in input pixels / the stride)."""
    return gaussian_blur(raw, sigma / MAP_STRIDE) if sigma > 0 else raw


class MapStudentDeployable(DeployableModel):
    """The deployed map student: raw images -> ``(scores (N,), maps (N, 1, H, W))``.

    ``map_scale`` (a buffer) is the teacher's normal-image map scale the student was
    trained in units of, so maps and scores come out in the teacher's units (its
    threshold keeps its meaning).
    """

    produces_map = True

    def __init__(self, preprocessing: Preprocessing, student: MapStudent, sigma: float, map_scale: torch.Tensor) -> None:
        super().__init__(preprocessing)
        self.student = student
        self.sigma = float(sigma)
        self.register_buffer("map_scale", map_scale.detach().clone().reshape(()).float())

    def score(self, normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = smooth_student_map(self.student(normalised), self.sigma)
        maps = upsample(raw, normalised.shape[-2:]) * self.map_scale
        return image_scores(maps), maps


def width_for_mac_ratio(
    ratio: float, reference_macs: float, macs_of: Callable[[int], int], max_width: int = 256,
    tolerance: float = 0.25,
) -> int:
    """The integer width whose deployed student has ``reference_macs / ratio`` MACs (closest in log space).

    ``macs_of(width)`` counts the deployed student of that width. MACs grow monotonically
    with the width, so ``1..max_width`` is searched by bisection; the closer end of the
    final bracket is checked against ``tolerance`` by
    :func:`kd_experiments.compression.closest_to_ratio` (one line naming
    ``scheme.deployed_mac_ratio`` and the reachable span when no width fits).
    """
    ratio = check_ratio(ratio, "deployed_mac_ratio")
    target = reference_macs / ratio
    low, high = 1, max_width
    while high - low > 1:
        middle = (low + high) // 2
        if macs_of(middle) > target:
            high = middle
        else:
            low = middle
    candidates = [(width, reference_macs / macs_of(width)) for width in (low, high)]
    return closest_to_ratio(
        ratio, candidates, tolerance=tolerance, name="deployed_mac_ratio",
        reachable=lambda: (reference_macs / macs_of(max_width), reference_macs / macs_of(1)),
    )


def describe(student: MapStudent) -> dict[str, Any]:
    """The student's architecture as loggable values."""
    return {"student_width": student.width, "student_depth": student.depth, "student_fusion": student.fusion,
            "student_merge_depth": student.merge_depth, "student_map_depth": student.map_depth,
            "student_norm": student.norm}
