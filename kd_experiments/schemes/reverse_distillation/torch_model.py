"""Networks of reverse distillation (RD) and of RD with an expert (plain PyTorch).

Papers:

- Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
  CVPR 2022 (arXiv 2201.10703); authors' code hq-deng/RD4AD.
- Liu, Wang, Leng, Zhang, "Unlocking the Potential of Reverse Distillation for
  Anomaly Detection", AAAI 2025 (arXiv 2412.07579); authors' code hito2448/URD.

The encoder (RD's frozen teacher; in RD with Expert the trainable teacher, and a frozen
copy of it is the expert) is the shared :class:`kd_experiments.backbones.FeatureEncoder`;
the width search for a compression ratio is :func:`kd_experiments.compression.width_for_ratio`.
Modules of the student:

- :class:`OneClassBottleneck`: RD's OCBE. Multi-scale feature fusion (MFF: every
  shallower level is brought to the deepest level's resolution by stride-2 3x3
  convolutions and concatenated with the deepest level, as in RD4AD's
  ``BN_layer``), then the one-class embedding block (OCE: a stride-2 residual stage).
  Paper and code agree. Blocks (``block``): ``basic`` residual blocks (two 3x3
  convolutions) by default, so that one family serves every backbone; ``bottleneck``
  (1x1, 3x3, 1x1, inner width ``out / 4 * block_base_width / 64``) is RD4AD's form for
  ResNet-50 encoders, where each shallower level steps through the next levels'
  channels (``BN_layer``'s 256 -> 512 -> 1024). With three OCBE blocks and decoder
  blocks ``[6, 4, 3]`` it has exactly the parameters of anomalib's
  ``ReverseDistillationModel`` for resnet50 (the unused ``conv4``/``bn4`` of its OCBE
  aside; a test checks it module by module); for wide_resnet50_2 RD4AD's code passes
  ``width_per_group=128`` to the OCBE too, where anomalib keeps 64.
- :class:`DecoderStage`: the reversed student's stages, one per encoder level, deepest
  first, each ending in a 1x1 projection to the encoder's channels (the features
  compared with the teacher's). Two up-sampling forms (``decoder_upsampling``):
  ``bilinear`` (our default: bilinear up-sampling to the level's size, a 3x3 conv,
  then ``decoder_blocks`` residual blocks) and ``transposed``, RD4AD's form
  (``de_resnet.py``): the first residual block of the stage up-samples by a 2x2
  stride-2 transposed convolution on both its main path and its shortcut, followed by
  ``decoder_blocks - 1`` plain residual blocks (``decoder_blocks=2`` at width 0.5
  mirrors RD4AD's ``de_resnet18``: decoder widths equal to the encoder's channels,
  two basic blocks per stage). RD4AD compares the raw block outputs (post-ReLU, like
  ResNet features); we keep the linear 1x1 projection in both forms because other
  encoders' features (EfficientNet's linear bottlenecks) take negative values. Both are
  generic so that any backbone works and a width multiplier scales them.
- :class:`SkipFusion`: URD's skip connection from teacher features into the decoder,
  optionally with *guided information injection* (GII): the fused teacher features
  are gated per pixel by their cosine similarity to the decoder's output at that
  level, ``f * sim + s * (1 - sim)`` (similarity computed without gradient), as the
  paper (Sec. 3.3) and ``Student.forward_decoder_gii`` in hito2448/URD describe; we
  clamp the similarity at 0 so the gate stays a convex mix (URD uses the raw cosine).
  The teacher branch follows URD's code: the teacher feature of this level plus the
  next-shallower teacher feature down-sampled by 2 and projected by a 1x1 conv, then
  a 3x3 conv; the result is concatenated with the decoder output and fused by a 3x3
  conv. (Note: URD's released ``train.py`` calls the student with ``attn=True``,
  which routes to ``forward_decoder_wogii``, i.e. skip fusion *without* the gating;
  here ``guided_injection`` switches the gating on and off explicitly.)
- :class:`ReverseStudent`: bottleneck + decoder (+ skip fusion): the part that a
  width multiplier compresses. The deployed model is encoder + student.

Width: every internal width of the student is ``max(min_channels, round(w * base))``
where ``base`` is derived from the encoder's channels ``C_i`` (fusion ``C_last``,
embedding ``2 * C_last``, decoder stage ``i``: ``e * C_i`` with ``decoder_expansion``
``e`` (2 by default; 1 is RD4AD's mirror of the encoder, so that ``w = 1, e = 1`` with
the transposed decoder and two blocks per stage is the architecture of anomalib's
``de_resnet18`` behind RD4AD's OCBE), skip-fusion hidden ``C_i``); the projections back
to ``C_i`` are present at every width. ``w = 1`` is the full-width student the
compression ratio refers to. ``min_channels`` (12 by default) is the floor: it keeps
the shallow levels of a strongly compressed student from collapsing to a few channels
(with EfficientNet-Lite0 at ratio 64 and a floor of 2, the stride-4 decoder stage is 4
channels wide, so its output spans a 4-dimensional subspace of the encoder's 24), paid
for by a smaller multiplier on the wide parts. It does not change the full-width student
while it is below every full-width base (24 for Lite0). The value 12 was chosen on
validation images only (``benchmarks/rd_bottle_budget.py``: per-pixel ``1 - cos`` on
held-out normal images, RD at ratio 64, floors 2, 8 and 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.errors import ConfigError

#: The floor of every student width (``scheme.min_channels``; see the module docstring).
DEFAULT_MIN_CHANNELS = 12


# ----------------------------------------------------------------------------- blocks


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convolutions), optionally strided / widening."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


#: Residual block families of the student: basic (two 3x3 convolutions, ResNet-18/34 and
#: the generic default) or bottleneck (1x1 -> 3x3 -> 1x1, ResNet-50 family, RD4AD's form there).
BLOCKS = ("basic", "bottleneck")


class BottleneckBlock(nn.Module):
    """ResNet's bottleneck block: 1x1 to ``width``, 3x3 (strided) at ``width``, 1x1 to ``out_channels``.

    ``upsample=True`` is RD4AD's de-convolutional bottleneck (``deBottleneck``): the 3x3
    becomes a 2x2 stride-2 transposed convolution and the shortcut a 2x2 stride-2
    transposed convolution, so the block doubles the resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if upsample:
            self.conv2: nn.Module = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if upsample:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False), nn.BatchNorm2d(out_channels)
            )
        elif stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def bottleneck_width(out_channels: int, base_width: int) -> int:
    """The inner width of a bottleneck block with ``out_channels`` outputs: torchvision's
    ``planes * base_width / 64`` with ``planes = out_channels / 4`` (64: ResNet-50; 128:
    Wide ResNet-50-2)."""
    return max(1, round(out_channels / 4 * base_width / 64))


def residual_block(block: str, in_channels: int, out_channels: int, stride: int = 1, base_width: int = 64) -> nn.Module:
    """A residual block of the family ``block`` (:data:`BLOCKS`)."""
    if block == "basic":
        return ResidualBlock(in_channels, out_channels, stride)
    return BottleneckBlock(in_channels, out_channels, bottleneck_width(out_channels, base_width), stride)


def _check_block(block: str, base_width: int) -> None:
    if block not in BLOCKS:
        raise ConfigError(f"scheme.block must be one of {BLOCKS}, got {block!r}")
    if not (isinstance(base_width, int) and base_width > 0):
        raise ConfigError(f"scheme.block_base_width must be a positive integer, got {base_width!r}")


# ---------------------------------------------------------------------------- student


@dataclass(frozen=True)
class StudentWidths:
    """Internal widths of a student (see the module docstring)."""

    fusion: int
    embedding: int
    decoder: tuple[int, ...]
    skip: tuple[int, ...]

    @classmethod
    def from_multiplier(
        cls, encoder_channels: Sequence[int], width_multiplier: float, min_channels: int = DEFAULT_MIN_CHANNELS,
        decoder_expansion: float = 2.0,
    ) -> StudentWidths:
        def scaled(base: int) -> int:
            return max(min_channels, round(width_multiplier * base))

        last = encoder_channels[-1]
        return cls(
            fusion=scaled(last),
            embedding=scaled(2 * last),
            decoder=tuple(scaled(decoder_expansion * c) for c in encoder_channels),
            skip=tuple(scaled(c) for c in encoder_channels),
        )


class OneClassBottleneck(nn.Module):
    """RD's OCBE: multi-scale feature fusion, then the one-class embedding (stride 2).

    ``block="basic"``: every shallower level is brought down by stride-2 3x3
    convolutions at ``fusion_channels``; the embedding is ``blocks`` basic blocks.
    ``block="bottleneck"`` (RD4AD's ``BN_layer`` for ResNet-50 encoders): level ``l``
    steps through the next levels' widths (``fusion_widths``, e.g. 256 -> 512 -> 1024),
    and the embedding is ``blocks`` bottleneck blocks of inner width
    ``out / 4 * base_width / 64``.
    """

    def __init__(
        self, encoder_channels: Sequence[int], fusion_channels: int, embedding_channels: int, blocks: int,
        block: str = "basic", base_width: int = 64, fusion_widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_block(block, base_width)
        levels = len(encoder_channels)
        if block == "basic" or fusion_widths is None:
            fusion_widths = [fusion_channels] * levels
        self.branches = nn.ModuleList()
        for level, channels in enumerate(encoder_channels[:-1]):
            layers: list[nn.Module] = []
            in_channels = channels
            for step in range(level + 1, levels):
                out_channels = fusion_widths[step] if block == "bottleneck" else fusion_channels
                layers.append(conv_bn_relu(in_channels, out_channels, 3, 2))
                in_channels = out_channels
            self.branches.append(nn.Sequential(*layers))
        branch_out = fusion_widths[-1] if block == "bottleneck" else fusion_channels
        fused = branch_out * (levels - 1) + encoder_channels[-1]
        self.embedding = nn.Sequential(
            residual_block(block, fused, embedding_channels, 2, base_width),
            *[residual_block(block, embedding_channels, embedding_channels, 1, base_width) for _ in range(blocks - 1)],
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        deepest = features[-1]
        parts = []
        for branch, feature in zip(self.branches, features[:-1], strict=True):
            part = branch(feature)
            if part.shape[-2:] != deepest.shape[-2:]:  # odd sizes (TF "SAME" padding rounds up)
                part = F.interpolate(part, size=deepest.shape[-2:], mode="bilinear", align_corners=False)
            parts.append(part)
        return self.embedding(torch.cat([*parts, deepest], dim=1))


class UpsamplingBlock(nn.Module):
    """RD4AD's up-sampling residual block: 2x2 stride-2 transposed convs on both paths."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


#: Weight initialisations of the student: PyTorch's defaults, or ResNet's (RD4AD's code).
INITS = ("torch", "resnet")


def resnet_init(module: nn.Module) -> None:
    """torchvision ResNet's initialisation, as RD4AD's OCBE and decoder use it: Kaiming-normal
    (fan-out, ReLU) convolutions, BatchNorm weight 1 and bias 0 (transposed convolutions
    keep PyTorch's default, as in RD4AD, whose loop only matches ``nn.Conv2d``)."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(child, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(child.weight, 1)
            nn.init.constant_(child.bias, 0)


#: The decoder's up-sampling forms (see the module docstring).
UPSAMPLING = ("bilinear", "transposed")


class DecoderStage(nn.Module):
    """Up-sample to a level's size, convolve at ``width``, project to the encoder's channels.

    ``upsampling="bilinear"``: bilinear resize, 3x3 conv, ``blocks`` residual blocks.
    ``upsampling="transposed"`` (RD4AD): an :class:`UpsamplingBlock` (x2; with
    ``block="bottleneck"`` RD4AD's de-convolutional :class:`BottleneckBlock`), then
    ``blocks - 1`` residual blocks of the family ``block``; a level whose size is not twice the input's (odd
    sizes under TF "SAME" padding) is resized bilinearly after the up-sampling block.
    """

    def __init__(
        self, in_channels: int, width: int, out_channels: int, blocks: int, upsampling: str = "bilinear",
        projection: bool = True, block: str = "basic", base_width: int = 64,
    ) -> None:
        super().__init__()
        _check_block(block, base_width)
        if not projection and width != out_channels:
            raise ConfigError(
                f"scheme.decoder_projection=false needs decoder widths equal to the encoder's channels "
                f"(got {width} for {out_channels}: use decoder_expansion=1 at width_multiplier=1)"
            )
        if upsampling not in UPSAMPLING:
            raise ConfigError(f"scheme.decoder_upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        self.upsampling = upsampling
        if upsampling == "bilinear":
            self.entry: nn.Module = conv_bn_relu(in_channels, width, 3, 1)
            remaining = blocks
        elif block == "basic":
            self.entry = UpsamplingBlock(in_channels, width)
            remaining = blocks - 1
        else:
            self.entry = BottleneckBlock(in_channels, width, bottleneck_width(width, base_width), upsample=True)
            remaining = blocks - 1
        self.blocks = nn.Sequential(*[residual_block(block, width, width, 1, base_width) for _ in range(remaining)])
        self.project: nn.Module = nn.Conv2d(width, out_channels, 1) if projection else nn.Identity()

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        size = tuple(size)
        if self.upsampling == "bilinear":
            x = self.entry(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        else:
            x = self.entry(x)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.project(self.blocks(x))


class SkipFusion(nn.Module):
    """URD's skip connection at one decoder level, with optional guided information injection.

    Inputs: the decoder output ``student`` at level ``i`` (``C_i`` channels), the teacher
    features of level ``i`` and of the next-shallower level ``i - 1``. Output: the next
    decoder stage's input (``hidden`` channels).
    """

    def __init__(self, channels: int, shallower_channels: int, hidden: int, guided_injection: bool) -> None:
        super().__init__()
        self.guided_injection = guided_injection
        self.project_teacher = nn.Conv2d(channels, hidden, 1, bias=False)
        self.project_shallower = nn.Sequential(
            nn.Conv2d(shallower_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.fuse_teacher = conv_bn_relu(hidden, hidden, 3)
        if guided_injection:
            self.project_student = nn.Conv2d(channels, hidden, 1, bias=False)
            self.inject = conv_bn_relu(hidden, hidden, 3)
        self.fuse = conv_bn_relu(channels + hidden, hidden, 3)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, shallower: torch.Tensor) -> torch.Tensor:
        shallower = F.interpolate(shallower, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        encoded = self.fuse_teacher(self.project_teacher(teacher) + self.project_shallower(shallower))
        if self.guided_injection:
            with torch.no_grad():
                similarity = F.cosine_similarity(student.detach(), teacher, dim=1).unsqueeze(1).clamp(min=0.0)
            encoded = self.inject(encoded * similarity + self.project_student(student) * (1.0 - similarity))
        return self.fuse(torch.cat([student, encoded], dim=1))


class ReverseStudent(nn.Module):
    """Bottleneck + reversed decoder (+ skip fusion): teacher features -> student features.

    ``forward(teacher_features)`` returns one map per encoder level, shallowest first,
    each with the teacher's shape.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        width_multiplier: float = 1.0,
        bottleneck_blocks: int = 2,
        decoder_blocks: int = 1,
        skip_fusion: bool = False,
        guided_injection: bool = False,
        decoder_upsampling: str = "bilinear",
        decoder_expansion: float = 2.0,
        decoder_projection: bool = True,
        init: str = "torch",
        block: str = "basic",
        block_base_width: int = 64,
        min_channels: int = DEFAULT_MIN_CHANNELS,
    ) -> None:
        super().__init__()
        _check_block(block, block_base_width)
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            raise ConfigError(f"scheme.min_channels must be an integer >= 1, got {min_channels!r}")
        if guided_injection and not skip_fusion:
            raise ConfigError("scheme.guided_injection=true needs scheme.skip_fusion=true (it gates the skip features)")
        if not width_multiplier > 0:
            raise ConfigError(f"scheme.width_multiplier must be > 0, got {width_multiplier}")
        channels = [int(c) for c in encoder_channels]
        if len(channels) < 2:
            raise ConfigError(f"reverse distillation needs at least two encoder levels, got layers for {channels}")
        self.encoder_channels = channels
        self.width_multiplier = float(width_multiplier)
        if not decoder_expansion > 0:
            raise ConfigError(f"scheme.decoder_expansion must be > 0, got {decoder_expansion}")
        self.min_channels = min_channels
        self.widths = StudentWidths.from_multiplier(
            channels, width_multiplier, min_channels=min_channels, decoder_expansion=decoder_expansion
        )
        self.skip_fusion = skip_fusion
        levels = len(channels)
        stage_blocks = _per_level(decoder_blocks, levels)
        self.block = block
        self.bottleneck = OneClassBottleneck(
            channels, self.widths.fusion, self.widths.embedding, bottleneck_blocks, block, block_base_width,
            fusion_widths=self.widths.skip,
        )
        self.stages = nn.ModuleList()
        self.fusions = nn.ModuleList()
        in_channels = self.widths.embedding
        for level in reversed(range(levels)):  # deepest first
            self.stages.append(
                DecoderStage(
                    in_channels, self.widths.decoder[level], channels[level], stage_blocks[level], decoder_upsampling,
                    decoder_projection, block, block_base_width,
                )
            )
            in_channels = channels[level]
            if skip_fusion and level > 0:
                hidden = self.widths.skip[level]
                self.fusions.append(SkipFusion(channels[level], channels[level - 1], hidden, guided_injection))
                in_channels = hidden
        if init not in INITS:
            raise ConfigError(f"scheme.init must be one of {INITS}, got {init!r}")
        if init == "resnet":
            resnet_init(self)

    def forward(self, teacher_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = self.bottleneck(teacher_features)
        levels = len(teacher_features)
        outputs: list[torch.Tensor] = [None] * levels  # type: ignore[list-item]
        for position, level in enumerate(reversed(range(levels))):
            student = self.stages[position](x, teacher_features[level].shape[-2:])
            outputs[level] = student
            x = student
            if self.skip_fusion and level > 0:
                x = self.fusions[position](student, teacher_features[level], teacher_features[level - 1])
        return outputs


def _per_level(blocks: int | Sequence[int], levels: int) -> list[int]:
    """``decoder_blocks`` as one count per encoder level (shallowest first)."""
    counts = [int(blocks)] * levels if isinstance(blocks, int) else [int(b) for b in blocks]
    if len(counts) != levels or any(c < 1 for c in counts):
        raise ConfigError(
            f"scheme.decoder_blocks must be an integer >= 1 or one such integer per encoder level "
            f"({levels}, shallowest first), got {blocks!r}"
        )
    return counts
