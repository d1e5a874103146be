"""PatchCore's networks (plain PyTorch): a frozen pretrained encoder and a memory bank of patch features.

Paper: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv 2106.08265); authors' code
amazon-science/patchcore-inspection; anomalib's ``PatchcoreModel`` is the reference this
module was checked against.

- :class:`PatchCore`: the detector. Locally aware patch features (Sec. 3.1): every encoder
  level is averaged over its 3x3 neighbourhood (``AvgPool2d(3, 1, 1)``, the paper's patch
  size ``p = 3``), the levels are resized bilinearly to the grid of one level
  (``grid_level``) and concatenated along channels: one feature vector per patch. The
  memory bank (a registered buffer ``memory_bank``, ``(M, D)``, so it is saved and loaded
  with the weights; its size follows the state dict) holds the patches of the normal
  training images, reduced by greedy coreset selection (Sec. 3.2, done by the
  LightningModule). A test patch scores its Euclidean distance to the nearest bank patch
  (Sec. 3.3); the patch map is up-sampled bilinearly to the input size and smoothed by a
  Gaussian of sigma 4 (:mod:`kd_experiments.anomaly_maps`, as the paper and anomalib's
  ``AnomalyMapGenerator``). Image score (``image_score``): ``max``, the maximum of the
  smoothed map (every map scheme of the project scores so), or ``reweighted``, the
  paper's Eq. 7: the largest patch distance ``s*`` times ``1 - softmax`` weight of its
  distance to its nearest bank patch ``m*`` among its distances to the ``num_neighbors``
  bank neighbours of ``m*`` (anomalib's ``compute_anomaly_score``).
- :class:`PatchCoreDeployable`: what a run ships: the datamodule's preprocessing
  (:class:`~kd_experiments.deployable.DeployableModel`), then :class:`PatchCore`; raw
  images in (``uint8`` or [0, 1], ``NCHW``), ``(scores (N,), maps (N, 1, H, W))`` out.

Where it differs from the paper: the encoder is the project's EfficientNet-Lite0 with
offline package weights (:class:`~kd_experiments.backbones.FeatureEncoder`), levels
``(1, 2, 3)`` (strides 4, 8, 16, the levels reverse distillation uses) on the stride-8 grid
of the middle level (the paper: WideResNet-50 layers 2 and 3 on layer 2's stride-8
grid); the 176 concatenated channels are kept as they are (the paper reduces 1536 to
1024 by adaptive average pooling). The nearest-neighbour search is exact and brute force,
in chunks of the bank (``y^2 - 2 x.y`` by one fused matrix product, the ranking part of
anomalib's ``euclidean_dist``, which keeps the model exportable to ONNX), so memory stays bounded
for any batch; the distance to the nearest patch found is then measured directly, free of
that form's float32 cancellation. anomalib itself is not imported: importing any part of it loads all of
``anomalib.models`` (tens of seconds), which a deployed model loaded in a fresh process
should not pay.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.anomaly_maps import gaussian_blur, image_scores, upsample
from kd_experiments.backbones import FeatureEncoder
from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.errors import CheckpointError, ConfigError

#: How an image score is taken (see the module docstring).
IMAGE_SCORES = ("max", "reweighted")
#: Elements of one (queries x bank chunk) distance matrix: bounds the search's memory (64 MiB in float32).
SEARCH_ELEMENTS = 1 << 24


def ranking_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``|b|^2 - 2 q.b`` for every query ``q`` of ``(Q, D)`` and bank row ``b`` of ``(M, D)``: ``(Q, M)``.

    The squared Euclidean distance less the query's own ``|q|^2``, which is the same along a
    row, so it ranks the bank for each query as the distance does; one fused matrix product
    (``addmm``: fast, exportable). Its float32 rounding grows with the features' norms, so
    :meth:`PatchCore.nearest` uses it to find the nearest patch and then measures that
    distance directly.
    """
    return torch.addmm(bank.pow(2).sum(dim=1).unsqueeze(0), queries, bank.transpose(0, 1), alpha=-2.0)


class PatchCore(nn.Module):
    """Encoder + memory bank: data-normalised images -> ``(scores (N,), maps (N, 1, H, W))``.

    Args:
        encoder: the frozen multi-level feature encoder (it maps the data's normalisation
            to the backbone's; see :class:`~kd_experiments.backbones.FeatureEncoder`).
        grid_level: the position in the encoder's levels whose grid the patches live on.
        blur_sigma: Gaussian smoothing of the up-sampled map (4 in the paper, at 256 px).
        image_score: ``max`` or ``reweighted`` (see the module docstring).
        num_neighbors: ``b`` of the re-weighting (9, as anomalib).
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        grid_level: int = 1,
        blur_sigma: float = 4.0,
        image_score: str = "max",
        num_neighbors: int = 9,
    ) -> None:
        super().__init__()
        levels = len(encoder.out_channels)
        if isinstance(grid_level, bool) or not (isinstance(grid_level, int) and 0 <= grid_level < levels):
            raise ConfigError(f"scheme.grid_level must index scheme.layers (0..{levels - 1}), got {grid_level!r}")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"scheme.image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        if isinstance(num_neighbors, bool) or not (isinstance(num_neighbors, int) and num_neighbors >= 1):
            raise ConfigError(f"scheme.num_neighbors must be an integer >= 1, got {num_neighbors!r}")
        if not (isinstance(blur_sigma, int | float) and blur_sigma >= 0):
            raise ConfigError(f"scheme.blur_sigma must be a number >= 0, got {blur_sigma!r}")
        if not encoder.frozen:
            raise ConfigError("PatchCore needs a frozen encoder (its bank holds the encoder's features)")
        self.encoder = encoder
        self.grid_level = grid_level
        self.blur_sigma = float(blur_sigma)
        self.image_score = image_score
        self.num_neighbors = num_neighbors
        self.feature_pooler = nn.AvgPool2d(3, 1, 1)
        self.embedding_dim = sum(self.encoder.out_channels)
        self.memory_bank: torch.Tensor
        self.register_buffer("memory_bank", torch.empty(0, self.embedding_dim))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Let a state dict bring a bank of any size (the bank is built after construction).

        An override rather than a registered hook, so a pickled model holds no bound method."""
        bank = state_dict.get(prefix + "memory_bank")
        if bank is not None and bank.shape != self.memory_bank.shape:
            self.memory_bank = torch.empty(bank.shape, device=self.memory_bank.device, dtype=self.memory_bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Replace the bank with ``bank`` ``(M, D)``."""
        if bank.dim() != 2 or bank.shape[1] != self.embedding_dim:
            raise ValueError(f"memory bank must be (M, {self.embedding_dim}), got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().to(self.memory_bank.device, self.memory_bank.dtype).contiguous()

    @property
    def memory_bank_bytes(self) -> int:
        return self.memory_bank.numel() * self.memory_bank.element_size()

    # -- features ----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(N, D, h, w)`` on the grid of ``layers[grid_level]``."""
        with torch.no_grad():
            features = [self.feature_pooler(f) for f in self.encoder(images)]
        size = features[self.grid_level].shape[-2:]
        resized = [f if f.shape[-2:] == size else upsample(f, size) for f in features]
        return torch.cat(resized, dim=1)

    @staticmethod
    def patches(embedding: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` -> one row per patch ``(N * h * w, D)``, image-major, row-major."""
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    # -- search --------------------------------------------------------------------------------
    def nearest(self, queries: torch.Tensor, exclude: torch.Tensor | None = None,
                bank_sources: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance to, and index of, the nearest bank patch of every query ``(Q, D)``.

        Exact and brute force, in chunks of the bank so that one distance matrix holds at
        most :data:`SEARCH_ELEMENTS` elements whatever the batch. With ``exclude`` ``(Q,)``
        and ``bank_sources`` ``(M,)`` (the source image id of each bank patch), a query never
        matches a bank patch of its own source image (leave-one-image-out scoring).
        """
        bank = self.memory_bank
        if bank.shape[0] == 0:
            raise CheckpointError(
                "the PatchCore memory bank is empty: build it with kd-train (one pass over the training "
                "images) or load a state dict that holds one"
            )
        chunk = max(1, SEARCH_ELEMENTS // max(1, queries.shape[0]))
        best = best_index = None
        leave_out = exclude is not None and bank_sources is not None
        if leave_out:
            exclude = exclude.to(queries.device).view(-1, 1)
            bank_sources = bank_sources.to(queries.device)
        for start in range(0, bank.shape[0], chunk):
            ranking = ranking_distances(queries, bank[start:start + chunk])
            if leave_out:
                ranking = ranking.masked_fill(bank_sources[start:start + chunk].view(1, -1) == exclude, float("inf"))
            distance, index = ranking.min(dim=1)
            index = index + start
            if best is None:
                best, best_index = distance, index
            else:
                closer = distance < best
                best = torch.where(closer, distance, best)
                best_index = torch.where(closer, index, best_index)
        if leave_out and bool(torch.isinf(best).any()):
            raise ConfigError("leave-one-image-out scoring left a query no bank patch: every patch of the bank "
                              "comes from the query's own image")
        return (queries - bank[best_index]).norm(dim=1), best_index

    def reweighted_scores(self, patch_scores: torch.Tensor, locations: torch.Tensor,
                          embedding: torch.Tensor) -> torch.Tensor:
        """The paper's Eq. 7 on ``patch_scores``, ``locations`` ``(N, P)`` and ``embedding`` ``(N, P, D)``."""
        batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)  # m^test,*
        score = patch_scores[batch, worst]  # s*
        test_features = embedding[batch, worst]  # (N, D)
        nearest_bank = self.memory_bank[locations[batch, worst]]  # m*
        neighbours = min(self.num_neighbors, self.memory_bank.shape[0])
        # N_b(m*): the bank patches nearest to m* (m* itself first, at distance 0)
        support = ranking_distances(nearest_bank, self.memory_bank).topk(neighbours, dim=1, largest=False).indices
        distances = (test_features.unsqueeze(1) - self.memory_bank[support]).norm(dim=2)  # (N, b)
        weights = 1.0 - F.softmax(distances, dim=1)[:, 0]
        return weights * score

    def forward(self, images: torch.Tensor, exclude: torch.Tensor | None = None,
                bank_sources: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(N,)`` and smoothed anomaly maps ``(N, 1, H, W)`` at the images' size.

        ``exclude`` ``(N,)`` with ``bank_sources`` ``(M,)``: each image is scored against the bank
        without the patches of its own source image (see :meth:`nearest`); the re-weighted image
        score still reads the whole bank."""
        embedding = self.embed(images)
        count, _, height, width = embedding.shape
        patches = self.patches(embedding)
        if exclude is not None:
            exclude = exclude.to(patches.device).repeat_interleave(height * width)
        distances, locations = self.nearest(patches, exclude, bank_sources)
        patch_map = distances.view(count, 1, height, width)
        maps = gaussian_blur(upsample(patch_map, images.shape[-2:]), self.blur_sigma)
        if self.image_score == "max":
            scores = image_scores(maps)
        else:
            scores = self.reweighted_scores(
                distances.view(count, -1), locations.view(count, -1), patches.view(count, height * width, -1)
            )
        return scores, maps


class PatchCoreDeployable(DeployableModel):
    """Raw images -> the datamodule's preprocessing -> :class:`PatchCore` -> ``(scores, maps)``.

    ``state_dict`` holds the encoder's weights, the preprocessing statistics and the
    memory bank; a freshly built model (empty bank) loads any bank size.
    """

    produces_map = True

    def __init__(self, preprocessing: Preprocessing, patchcore: PatchCore) -> None:
        super().__init__(preprocessing)
        self.patchcore = patchcore

    def score(self, normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.patchcore(normalised)


__all__ = ["IMAGE_SCORES", "PatchCore", "PatchCoreDeployable", "ranking_distances"]
