"""Behaviour shared by every teacher-student scheme.

:class:`AnomalyScheme` is the LightningModule every scheme extends. A scheme provides

- ``score_batch(batch)``: the deployed model's anomaly scores for a batch (``score``,
  shape ``(B,)``; higher means more anomalous), and where it has them the teacher's
  scores (``teacher_score``) and pixel maps (``map``, ``teacher_map``, ``(B, H, W)``);
- ``compression_summary()``: teacher and student sizes (params, MACs) and their ratios;
- ``deployable_model()``: the :class:`~kd_experiments.deployable.DeployableModel` a run
  ships (raw images in, preprocessing inside, scores and maps out, student only), and
  ``teacher_deployable_model()``: the teacher (or reference detector) in the same form,
  for speed and size comparisons.

Preprocessing: the datamodules hand normalised tensors to the scheme. At ``setup`` the
base class reads the datamodule's preprocessing (:meth:`Preprocessing.from_datamodule`:
size, channels, mean and std), keeps it in checkpoints (``checkpoint["preprocessing"]``)
and builds it into the deployable model; a scheme's ``score_batch`` scores through
``self.deployable_model()(self.raw_images(images))``, so the test step runs the model
that ships.

The base class turns those into test metrics that are exact under DDP: every rank
keeps its samples' scores with their dataset ``index``; at the end of the test epoch
the ranks exchange them, drop the duplicates the distributed sampler pads with, and
compute every metric once on the whole split (``kd_experiments.metrics``). The same
values are logged on every rank, so no further reduction is needed. It also logs the
ROC curve and the score histograms as PNG artifacts, and guards training against
NaN/inf losses (the run fails with a clear message; the last checkpoint is kept).

When the datamodule's validation split holds labelled anomalies (``val_has_anomalies``,
e.g. ``OneClassDataModule(val_anomalies="other_classes")``: training images of the other
classes), every validation epoch also scores it the same way and logs ``val/image_auroc``
(and ``val/teacher_image_auroc``), exact under DDP; ``callbacks=select_on_validation``
then keeps the epoch of best validation AUROC and tests it. Schemes compute their
validation losses on the normal images (label 0) only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from kd_experiments import metrics as kd_metrics
from kd_experiments.deployable import DeployableModel, Preprocessing
from kd_experiments.errors import TrainingDivergedError
from kd_experiments.tracking import is_global_zero, log_figure_from_module


def gather_and_deduplicate(records: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-batch tensors, gather them from all ranks, keep one row per index.

    ``records`` maps a field name to the list of per-batch CPU tensors; it must hold
    ``index``. Rows are returned sorted by ``index``, so the result is identical whatever
    the number of processes.
    """
    local = {key: torch.cat(values) for key, values in records.items() if values}
    if not local:
        return {}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged = {key: torch.cat([part[key] for part in gathered if part]) for key in local}
    else:
        merged = local
    index = merged["index"].long()
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    selected = order[keep]
    return {key: value[selected] for key, value in merged.items()}


class AnomalyScheme(L.LightningModule):
    """Base LightningModule of a teacher-student anomaly-detection scheme."""

    #: short name used in tags, run names and the ``scheme`` param
    scheme_name: str = "base"
    #: whether the teacher can score images on its own (then ``test/teacher_*`` is logged)
    teacher_scores: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._test_records: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._val_records: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.test_results: dict[str, torch.Tensor] = {}
        self.test_metrics: dict[str, float] = {}
        #: the datamodule's preprocessing (set at ``setup`` or from a checkpoint; see the module docstring)
        self.preprocessing: Preprocessing | None = None

    # -- what a scheme implements --------------------------------------------------------
    def score_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Scores of the deployed model (``score``) and optionally ``teacher_score``, ``map``."""
        raise NotImplementedError

    def compression_summary(self) -> dict[str, float]:
        """``teacher_params``, ``student_params``, ``compression_ratio``, MACs and their ratio."""
        raise NotImplementedError

    def plot_test_results(self, results: dict[str, torch.Tensor]) -> None:
        """Scheme-specific artifacts (maps, reconstructions); rank 0 only. Default: none."""

    def deployable_model(self) -> DeployableModel:
        """The model a run ships: raw images in, scores (``(scores, maps)``) out; student only.

        It shares the scheme's (student) modules, so it always scores with the current
        weights; it is built on the scheme's device and never registered as a submodule.
        """
        raise NotImplementedError

    def teacher_deployable_model(self) -> DeployableModel | None:
        """The reference detector in deployable form (for speed and size figures), or ``None``."""
        return None

    # -- preprocessing -----------------------------------------------------------------------
    def default_preprocessing(self) -> Preprocessing:
        """The preprocessing assumed before a datamodule says otherwise: [0, 1] data of
        ``self.input_shape`` (schemes whose data has a known normalisation override it)."""
        return Preprocessing.identity(self.input_shape)

    def deployment_preprocessing(self) -> Preprocessing:
        """The datamodule's preprocessing when known, else :meth:`default_preprocessing`."""
        return self.preprocessing if self.preprocessing is not None else self.default_preprocessing()

    def raw_images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of the datamodule's normalised images back in [0, 1] (the deployable model's input)."""
        return self.deployment_preprocessing().to_raw(images)

    def setup(self, stage: str) -> None:
        if self.preprocessing is None and self._trainer is not None:
            datamodule = getattr(self._trainer, "datamodule", None)
            if datamodule is not None:
                self.preprocessing = Preprocessing.from_datamodule(datamodule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.preprocessing is not None:
            checkpoint["preprocessing"] = self.preprocessing.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("preprocessing"):
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    # -- NaN guard -------------------------------------------------------------------------
    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise TrainingDivergedError(
                f"{self.scheme_name}: training loss became {loss.detach().float().item()} at "
                f"epoch {self.current_epoch}, step {self.global_step}; lower the learning rate "
                "or check the data (the last good checkpoint is kept)"
            )

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        """Raise :class:`TrainingDivergedError` if a logged quantity is NaN/inf."""
        if not torch.isfinite(value).all():
            raise TrainingDivergedError(
                f"{self.scheme_name}: {name} became {value.detach().float().mean().item()} at "
                f"epoch {self.current_epoch}, step {self.global_step} (the last good checkpoint is kept)"
            )

    # -- validation on labelled anomalies ---------------------------------------------------
    def validation_scored(self) -> bool:
        """Whether the validation split holds labelled anomalies to score (see the module docstring)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return bool(getattr(datamodule, "val_has_anomalies", False))

    def on_validation_epoch_start(self) -> None:
        self._val_records = defaultdict(list)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (self.validation_scored() and isinstance(batch, dict) and "label" in batch and "index" in batch):
            return
        with torch.no_grad():
            scores = self.score_batch(batch)
        self._val_records["index"].append(batch["index"].detach().cpu())
        self._val_records["label"].append(batch["label"].detach().cpu())
        self._val_records["score"].append(scores["score"].detach().float().cpu())
        if "teacher_score" in scores and self.teacher_scores:
            self._val_records["teacher_score"].append(scores["teacher_score"].detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self.validation_scored():
            return
        results = gather_and_deduplicate(self._val_records)  # every rank takes part (DDP)
        self._val_records = defaultdict(list)
        if not results or results["label"].min() == results["label"].max():
            return  # a truncated loop (sanity check, limit_val_batches) scored one class only
        labels = results["label"].long()
        metrics = {"val/image_auroc": kd_metrics.image_auroc(results["score"], labels)}
        if "teacher_score" in results:
            metrics["val/teacher_image_auroc"] = kd_metrics.image_auroc(results["teacher_score"], labels)
        self.log_dict(metrics, sync_dist=False)  # the same value on every rank

    def log_synthetic_validation(self, maps: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor,
                                 labels: torch.Tensor, aupro: bool = False) -> None:
        """``val/synthetic_pixel_auroc`` and ``val/synthetic_image_auroc`` of validation images
        with synthetic anomalies pasted in (maps ``(N, H, W)``, boolean masks, image scores and
        labels), and with ``aupro`` ``val/synthetic_aupro`` (about a second per epoch for 40
        images at 256 px on a CPU); a metric whose classes are not both present is skipped."""
        if masks.any():
            self.log("val/synthetic_pixel_auroc", kd_metrics.pixel_auroc(maps, masks), sync_dist=True, batch_size=1)
            if aupro and not masks.all():
                self.log("val/synthetic_aupro", kd_metrics.aupro(maps, masks), sync_dist=True, batch_size=1)
        if 0 < int(labels.sum()) < len(labels):
            self.log("val/synthetic_image_auroc", kd_metrics.image_auroc(scores, labels), sync_dist=True,
                     batch_size=1)

    @staticmethod
    def normal_only(batch: dict[str, Any]) -> torch.Tensor:
        """The images of a validation batch with label 0 (all of them when unlabelled)."""
        images = batch["image"]
        labels = batch.get("label")
        return images if labels is None else images[labels == 0]

    # -- test ------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test_records = defaultdict(list)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self.score_batch(batch)
        assert "score" in outputs, f"{type(self).__name__}.score_batch must return 'score'"
        self._test_records["index"].append(batch["index"].detach().cpu())
        self._test_records["label"].append(batch["label"].detach().cpu())
        if "mask" in batch and "map" in outputs:
            self._test_records["mask"].append(batch["mask"].detach().cpu().flatten(0, 1) > 0.5)
        for key, value in outputs.items():
            self._test_records[key].append(value.detach().float().cpu())

    def on_test_epoch_end(self) -> None:
        results = gather_and_deduplicate(self._test_records)
        self._test_records = defaultdict(list)
        computed = self.compute_test_metrics(results)
        self.test_results = results
        self.test_metrics = computed
        self.log_dict({f"test/{k}": v for k, v in computed.items()}, sync_dist=False)
        if is_global_zero() and self.logger is not None:
            self.plot_score_distributions(results)
            self.plot_test_results(results)

    def compute_test_metrics(self, results: dict[str, torch.Tensor]) -> dict[str, float]:
        """Every test metric of the split, from the de-duplicated results."""
        labels = results["label"].long()
        computed: dict[str, float] = {
            "num_test_images": float(labels.numel()),
            "num_test_anomalous": float(labels.sum().item()),
        }
        if labels.min() == labels.max():
            # Only reachable with a truncated test loop (fast_dev_run, limit_test_batches):
            # the datamodules refuse test splits without both classes.
            rank_zero_warn(
                f"{self.scheme_name}: the scored test samples hold one class only "
                f"({labels.numel()} samples); ranking metrics are skipped"
            )
            return computed
        computed.update(kd_metrics.evaluate_image_scores(results["score"], labels))
        if "teacher_score" in results and self.teacher_scores:
            teacher = kd_metrics.evaluate_image_scores(results["teacher_score"], labels)
            computed.update({f"teacher_{k}": v for k, v in teacher.items()})
            anomalous = labels == 1
            if anomalous.any():
                computed["wasserstein_anomalous"] = kd_metrics.wasserstein(
                    results["score"][anomalous], results["teacher_score"][anomalous]
                )
        if "map" in results and "mask" in results:
            computed.update(kd_metrics.evaluate_maps(results["map"], results["mask"]))
        if "teacher_map" in results and "mask" in results and self.teacher_scores:
            teacher_maps = kd_metrics.evaluate_maps(results["teacher_map"], results["mask"])
            computed.update({f"teacher_{k}": v for k, v in teacher_maps.items()})
        return computed

    # -- artifacts ---------------------------------------------------------------------------
    def plot_score_distributions(self, results: dict[str, torch.Tensor]) -> None:
        """ROC curve and score histograms (normal vs anomalous) as PNG artifacts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = results["label"].long()
        if labels.min() == labels.max():
            return
        sources = [("student", results["score"])]
        if "teacher_score" in results and self.teacher_scores:
            sources.append(("teacher", results["teacher_score"]))

        figure, axis = plt.subplots(figsize=(4.5, 4))
        for name, scores in sources:
            fpr, tpr, _ = kd_metrics.roc_curve(scores, labels)
            auroc = kd_metrics.image_auroc(scores, labels)
            axis.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.set_title(f"{self.scheme_name}: image-level ROC")
        axis.legend(loc="lower right")
        log_figure_from_module(self, figure, "plots/roc_curve.png")

        figure, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.5), squeeze=False)
        for axis, (name, scores) in zip(axes[0], sources, strict=True):
            values = scores.numpy()
            bins = 40
            axis.hist(values[labels.numpy() == 0], bins=bins, alpha=0.6, label="normal", density=True)
            axis.hist(values[labels.numpy() == 1], bins=bins, alpha=0.6, label="anomalous", density=True)
            axis.set_xlabel(f"{name} anomaly score")
            axis.set_ylabel("density")
            axis.legend()
        figure.suptitle(f"{self.scheme_name}: score distributions")
        log_figure_from_module(self, figure, "plots/score_histograms.png")
