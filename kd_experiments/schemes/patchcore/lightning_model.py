"""PatchCore as a LightningModule: a training-free memory-bank detector, the baseline and teacher.

Paper: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv 2106.08265).

Fitting is one epoch without an optimiser (``automatic_optimization = False``, no
optimiser), in one process (DDP refuses a model with nothing to train): every training
batch's locally aware patch features (:meth:`~.torch_model.PatchCore.embed`) are kept
with their dataset index; before the validation of that epoch (or at its end when there
is none) they are put in index order (:func:`~kd_experiments.schemes.base.gather_and_deduplicate`)
and the memory bank is built from them: all of them (``coreset_fraction=1``) or a greedy coreset of
``coreset_fraction`` of them (:func:`greedy_coreset`, the paper's Algorithm 1: k-center
greedy, each step adding the patch farthest from the coreset so far). The bank is a
buffer of the deployed model, so checkpoints and exports carry it.

Algorithm 1 projects the features to a lower dimension first (anomalib's
``KCenterGreedy``: a sparse random projection to the Johnson-Lindenstrauss dimension at
``eps = 0.9``, about 300 for 190 k patches). The encoder's 176 channels are fewer than
that, so the greedy search runs on the features themselves, and a step measures only the
patches the new coreset patch can come nearer to (triangle inequality, see
:func:`greedy_coreset`; anomalib's step, ``linalg.norm(features - center)`` over the whole
bank, was 5.6x slower than even a plain matrix-vector step, measured on 192 k x 176
patches, one CPU thread).

Evaluation scores through :meth:`deployable_model` (raw images in, preprocessing inside,
``(scores, maps)`` out), so what is tested is what ships. Logged besides the common test
metrics: ``memory_bank_bytes``, ``memory_bank_patches`` (after the coreset),
``memory_bank_full_patches`` (before it), ``coreset_seconds``, ``train/images_per_s`` (the
feature pass, one process), ``nearest_neighbour_macs`` (multiply-accumulates of the bank
search for one image) and ``test/images_per_s``.

Compression summary: PatchCore is not distilled; teacher, student and deployed model
are the same encoder (``compression_ratio`` 1, ``deployed_params`` = the encoder's
parameters, ``deployed_macs`` = its MACs; the search's MACs depend on the bank and are
logged as ``nearest_neighbour_macs`` once it exists).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from kd_experiments.backbones import FeatureEncoder, input_statistics
from kd_experiments.compression import count_macs, count_parameters, size_summary
from kd_experiments.data.common import sample_ids
from kd_experiments.deployable import DeployableModel, Preprocessing, Preprocessor
from kd_experiments.errors import ConfigError
from kd_experiments.schemes.base import AnomalyScheme, gather_and_deduplicate
from kd_experiments.schemes.patchcore.torch_model import PatchCore, PatchCoreDeployable


def greedy_coreset(features: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices ``(count,)`` of a greedy k-center coreset of ``features`` ``(M, D)`` (PatchCore, Alg. 1).

    Starts from one patch drawn with ``seed``; each step adds the patch whose distance to
    the coreset so far is largest. Stops early (fewer indices) only when every patch
    already coincides with a coreset patch.

    Same picks as the plain loop (which measures every patch against every new coreset
    patch), found faster with the triangle inequality: each patch remembers the coreset
    patch it is nearest to (its *owner*) and each coreset patch the largest distance among
    the patches it owns (its *radius*); a new coreset patch ``c`` can only come nearer to
    the patches of an owner ``a`` when ``d(a, c) < 2 radius(a)``, so only those patches are
    measured. Distances are taken on mean-centred features (smaller norms, less float32
    cancellation in ``|x|^2 - 2 x.c + |c|^2``).
    """
    total = features.shape[0]
    if not 1 <= count <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {count}")
    features = features - features.mean(dim=0)
    norms = features.pow(2).sum(dim=1)
    generator = torch.Generator().manual_seed(int(seed))
    index = int(torch.randint(total, (1,), generator=generator))
    chosen: list[int] = []
    centres = features.new_empty(count, features.shape[1])
    centre_norms = features.new_empty(count)
    nearest = torch.full((total,), float("inf"), dtype=features.dtype, device=features.device)
    owner = torch.zeros(total, dtype=torch.long, device=features.device)
    radius = features.new_zeros(count)
    everyone = torch.arange(total, device=features.device)
    for step in range(count):
        chosen.append(index)
        centre = features[index]
        centres[step], centre_norms[step] = centre, norms[index]
        if step == 0:
            candidates, open_groups = everyone, None
        else:
            between = (centre_norms[:step] - 2.0 * (centres[:step] @ centre) + norms[index]).clamp_min(0).sqrt()
            open_groups = between < 2.0 * radius[:step] * (1.0 + 1e-5) + 1e-6  # rounding slack: measure more
            candidates = everyone[open_groups[owner]]
        if 2 * candidates.numel() > total:  # a gather would cost more than it saves
            distance = (norms - 2.0 * (features @ centre) + norms[index]).clamp_min(0).sqrt()[candidates]
        else:
            distance = (norms[candidates] - 2.0 * (features[candidates] @ centre) + norms[index]).clamp_min(0).sqrt()
        closer = distance < nearest[candidates]
        improved = candidates[closer]
        nearest[improved] = distance[closer]
        owner[improved] = step
        nearest[index], owner[index] = 0.0, step
        # the radius of every group that lost or gained patches: all their patches are candidates
        if open_groups is not None:
            radius[:step][open_groups] = 0.0
        radius.scatter_reduce_(0, owner[candidates], nearest[candidates], reduce="amax")
        if step + 1 == count:
            break
        index = int(torch.argmax(nearest))
        if nearest[index] <= 0:
            break
    return torch.tensor(chosen, dtype=torch.long)


class PatchCoreScheme(AnomalyScheme):
    """Frozen pretrained encoder + memory bank of normal patch features (no training).

    Args:
        input_shape: ``(C, H, W)`` from the datamodule.
        coreset_fraction: share of the training patches kept in the bank (1.0: all).
        coreset_seed: seed of the coreset's first patch.
        backbone, layers, weights, weights_path: the frozen encoder
            (:class:`~kd_experiments.backbones.FeatureEncoder`).
        grid_level: the position in ``layers`` whose grid the patches live on (1: the
            middle of three levels, stride 8 for EfficientNet-Lite0).
        blur_sigma: Gaussian smoothing of the anomaly map (4 in the paper at 256 px).
        image_score: ``max`` (the smoothed map's maximum) or ``reweighted`` (the paper's Eq. 7).
        num_neighbors: neighbourhood of the re-weighting.
        input_normalization: how the datamodule normalised (``imagenet`` or ``none``).
    """

    scheme_name = "patchcore"
    teacher_scores = False  # teacher and student are one model

    def __init__(
        self,
        input_shape: Sequence[int],
        coreset_fraction: float = 0.1,
        coreset_seed: int = 0,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "package",
        weights_path: str | None = None,
        grid_level: int = 1,
        blur_sigma: float = 4.0,
        image_score: str = "max",
        num_neighbors: int = 9,
        input_normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # nothing is optimised: one pass builds the bank
        if isinstance(coreset_fraction, bool) or not (
            isinstance(coreset_fraction, int | float) and 0 < coreset_fraction <= 1
        ):
            raise ConfigError(f"scheme.coreset_fraction must be in (0, 1], got {coreset_fraction!r}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.input_mean, self.input_std = input_statistics(input_normalization, self.input_shape[0])
        encoder = FeatureEncoder(
            backbone, layers, weights, weights_path, frozen=True, input_mean=self.input_mean,
            input_std=self.input_std, in_channels=self.input_shape[0],
        )
        self.patchcore = PatchCore(encoder, grid_level, blur_sigma, image_score, num_neighbors)
        # the source image of each bank patch (kd_experiments.data.common.sample_id; -1: unknown), kept
        # in the checkpoint, not in the deployed model: it serves leave-one-image-out scoring
        # (score_leaving_out), which a map student's targets on the bank's own images need
        self.memory_bank_sources: torch.Tensor
        self.register_buffer("memory_bank_sources", torch.empty(0, dtype=torch.long))
        self._features: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._bank_metrics: dict[str, float] = {}
        self._summary: dict[str, Any] | None = None
        self._embed_seconds = 0.0
        self._embed_images = 0
        self._infer_seconds = 0.0
        self._infer_images = 0

    # -- deployment ----------------------------------------------------------------------------
    def default_preprocessing(self) -> Preprocessing:
        channels = self.input_shape[0]
        return Preprocessing(self.input_shape[1:], channels, tuple(self.input_mean), tuple(self.input_std))

    def deployable_model(self) -> DeployableModel:
        """Raw images -> ``(scores (N,), maps (N, 1, H, W))``: encoder and memory bank (shared with the scheme)."""
        return PatchCoreDeployable(self.deployment_preprocessing(), self.patchcore).to(self.device)

    # -- sizes -------------------------------------------------------------------------------------
    def compression_summary(self) -> dict[str, Any]:
        if self._summary is None:
            encoder = self.patchcore.encoder
            params = count_parameters(encoder)
            macs = count_macs(encoder, torch.zeros(1, *self.input_shape, device=self.device))
            self._summary = {
                **size_summary(params, params, macs, macs),
                "deployed_params": params,
                "deployed_macs": macs,
                "embedding_dim": self.patchcore.embedding_dim,
            }
        return dict(self._summary)

    # -- building the bank ---------------------------------------------------------------------------
    def configure_optimizers(self) -> None:
        return None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer.world_size > 1:
            raise ConfigError(
                f"patchcore builds its memory bank in one process, got {self.trainer.world_size} "
                "(DDP refuses a model with nothing to train): use trainer=cpu or trainer=gpu"
            )

    def on_fit_start(self) -> None:
        if self.trainer.max_epochs not in (1, None):
            rank_zero_warn(
                f"patchcore builds its memory bank in one pass; trainer.max_epochs={self.trainer.max_epochs} "
                "only rebuilds the same bank (use trainer.max_epochs=1)"
            )

    def on_train_epoch_start(self) -> None:
        self._features = defaultdict(list)
        self._embed_seconds, self._embed_images = 0.0, 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        started = time.perf_counter()
        embedding = self.patchcore.embed(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self._embed_seconds += time.perf_counter() - started
        self._embed_images += images.shape[0]
        count, dims = embedding.shape[:2]
        self._features["index"].append(batch["index"].detach().cpu())
        self._features["source"].append(sample_ids(batch.get("path"), count))
        self._features["patches"].append(self.patchcore.patches(embedding).view(count, -1, dims).cpu())

    def build_memory_bank(self) -> None:
        """Make the bank from this epoch's patch features, in index order (no-op when none are pending)."""
        if not self._features:
            return
        records = gather_and_deduplicate(self._features)
        self._features = defaultdict(list)
        patches = records["patches"]
        per_image = patches.shape[1]
        bank = patches.reshape(-1, patches.shape[2])
        sources = records["source"].long().repeat_interleave(per_image)
        started = time.perf_counter()
        fraction = float(self.hparams.coreset_fraction)
        if fraction < 1:
            count = max(1, int(bank.shape[0] * fraction))
            chosen = greedy_coreset(bank.to(self.device), count, self.hparams.coreset_seed).cpu()
            bank, sources = bank[chosen], sources[chosen]
        coreset_seconds = time.perf_counter() - started
        self.patchcore.set_memory_bank(bank)
        self.memory_bank_sources = sources.to(self.memory_bank_sources.device)
        self._bank_metrics = {
            "memory_bank_bytes": float(self.patchcore.memory_bank_bytes),
            "memory_bank_patches": float(bank.shape[0]),
            "memory_bank_full_patches": float(records["patches"].shape[0] * per_image),
            "coreset_seconds": coreset_seconds,
            "nearest_neighbour_macs": float(per_image * bank.shape[0] * bank.shape[1]),
        }

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take a bank's source ids of any length; a checkpoint written before banks recorded them
        loads with every source unknown (-1), so it still scores, but not leaving images out."""
        key = prefix + "memory_bank_sources"
        if key not in state_dict:
            bank = state_dict.get(prefix + "patchcore.memory_bank")
            state_dict[key] = torch.full((0 if bank is None else bank.shape[0],), -1, dtype=torch.long)
        self.memory_bank_sources = torch.empty(state_dict[key].shape, dtype=torch.long,
                                               device=self.memory_bank_sources.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def knows_bank_sources(self) -> bool:
        """Whether the bank records the source image of its patches (banks built from items with a ``path``)."""
        sources = self.memory_bank_sources
        return sources.numel() == self.patchcore.memory_bank.shape[0] > 0 and bool((sources >= 0).all())

    @torch.no_grad()
    def score_leaving_out(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`deployable_model` gives for raw ``images`` ``(N, C, H, W)``, each scored against
        the bank without the patches of its own source image (``ids`` ``(N,)``, :func:`sample_id`):
        on an image the bank was built from, the map of an image it never saw rather than the
        near-zero one of a memorised image. Images not in the bank score as usual."""
        if not self.knows_bank_sources:
            raise ConfigError(
                "this PatchCore bank does not record its source images (a checkpoint written before banks "
                "did, or training items without a 'path'): rebuild it to score leaving images out"
            )
        preprocess = Preprocessor(self.deployment_preprocessing()).to(images.device)  # as the deployed model's
        return self.patchcore(preprocess(images), ids, self.memory_bank_sources)

    def bank_metrics(self) -> dict[str, float]:
        """The bank's size figures (those of a loaded bank when it was not built in this process)."""
        if not self._bank_metrics and self.patchcore.memory_bank.shape[0]:
            bank = self.patchcore.memory_bank
            with torch.no_grad():
                grid = self.patchcore.embed(torch.zeros(1, *self.input_shape, device=self.device)).shape[-2:]
            return {
                "memory_bank_bytes": float(self.patchcore.memory_bank_bytes),
                "memory_bank_patches": float(bank.shape[0]),
                "nearest_neighbour_macs": float(grid[0] * grid[1] * bank.shape[0] * bank.shape[1]),
            }
        return dict(self._bank_metrics)

    def on_train_epoch_end(self) -> None:
        self.build_memory_bank()  # when no validation loop built it already
        metrics = dict(self._bank_metrics)
        if self._embed_seconds > 0:
            metrics["train/images_per_s"] = self._embed_images / self._embed_seconds
        self.log_dict(metrics, on_epoch=True, sync_dist=False, batch_size=1)

    # -- validation ------------------------------------------------------------------------------------
    def validation_scored(self) -> bool:
        """Labelled validation anomalies are scored once the bank exists (not in the sanity check)."""
        return self.patchcore.memory_bank.shape[0] > 0 and super().validation_scored()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.build_memory_bank()  # Lightning validates before on_train_epoch_end
        super().on_validation_epoch_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing to learn or monitor on normal images; labelled anomalies are scored by the base class."""

    # -- test ----------------------------------------------------------------------------------------------
    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        started = time.perf_counter()
        with torch.no_grad():
            scores, maps = self.deployable_model()(self.raw_images(images))  # what ships
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self._infer_seconds += time.perf_counter() - started
        self._infer_images += images.shape[0]
        return {"score": scores, "map": maps.squeeze(1)}

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._infer_seconds, self._infer_images = 0.0, 0

    def on_test_epoch_end(self) -> None:
        metrics = self.bank_metrics()
        if self._infer_images:
            metrics["test/images_per_s"] = self._infer_images / max(self._infer_seconds, 1e-9)
        self.log_dict(metrics, sync_dist=False, batch_size=1)
        super().on_test_epoch_end()


__all__ = ["PatchCoreScheme", "greedy_coreset"]
