"""Every evaluation metric of kd-experiments, as pure functions over tensors.

Image level (``scores``: ``(N,)`` anomaly scores, higher = more anomalous;
``labels``: ``(N,)`` in {0, 1}, 1 = anomalous):
:func:`image_auroc`, :func:`f1_max`, :func:`tpr_at_fpr`, :func:`roc_curve`,
collected by :func:`evaluate_image_scores`.

Pixel level (``maps``: ``(N, H, W)`` or ``(N, 1, H, W)`` anomaly maps at the
masks' resolution; ``masks``: the same shape, values in {0, 1}):
:func:`pixel_auroc`, :func:`aupro`, collected by :func:`evaluate_maps`.

Distributions: :func:`wasserstein`.

Implementations (no hand-written copies):

- ROC, AUROC, precision-recall: scikit-learn (``roc_curve``, ``roc_auc_score``,
  ``precision_recall_curve``), exact (every distinct score is a threshold) and in
  float64. torchmetrics' functional binary metrics are deliberately *not* used
  for raw scores: when a score lies outside [0, 1] they apply a sigmoid first,
  which saturates to 1.0 for scores above ~17 (float32) and turns distinct
  anomaly scores into ties (an AUROC of 0.5 for scores in, say, [50, 150]).
- AUPRO: anomalib's ``AUPRO`` metric (``anomalib.metrics.AUPRO``, anomalib 2.7),
  which follows the MVTec AD evaluation code (Bergmann et al., "The MVTec Anomaly
  Detection Dataset", IJCV 2021): ground-truth regions are the 8-connected
  components of the masks (OpenCV); at each threshold the per-region overlap
  (the fraction of a region's pixels above the threshold) is averaged over all
  regions of all images, the global FPR is computed over all normal pixels;
  the PRO-vs-FPR curve is integrated (trapezoids, linear interpolation at the
  limit) up to ``fpr_limit`` and divided by it. Checked against an independent
  float64 MVTec-style implementation to ~1e-7 on 83x256x256 maps (~1.5 s on CPU).
- Wasserstein-1: ``scipy.stats.wasserstein_distance``.

Input handling: tensors (any device, any float dtype), NumPy arrays or sequences
are accepted and read on the CPU. Invalid input (mismatched shapes, labels not in
{0, 1}, NaN/inf scores) and degenerate input (one class only, where a metric
needs both) raise :class:`~kd_experiments.errors.DataError` (a ``ValueError``)
with a one-line message, never an error deep inside a library.

DDP: these functions are not distributed-aware and need not be. Schemes call them
on the complete, de-duplicated test set: the scheme base class all-gathers the
per-rank scores, labels, maps and masks, drops the duplicates that a
``DistributedSampler`` pads in (by the batch's ``index``), and only then
evaluates. The results are therefore exact under DDP, identical to a
single-process run.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as _sklearn_roc_curve

from kd_experiments.errors import DataError

__all__ = [
    "DEFAULT_FPRS",
    "aupro",
    "evaluate_image_scores",
    "evaluate_maps",
    "f1_max",
    "fpr_key",
    "image_auroc",
    "pixel_auroc",
    "roc_curve",
    "tpr_at_fpr",
    "wasserstein",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]

#: False positive rates at which :func:`evaluate_image_scores` reports the TPR.
DEFAULT_FPRS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)


# --------------------------------------------------------------------------- inputs


def _to_numpy(values: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """A CPU NumPy view/copy of a tensor, array or sequence."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # float16 / bfloat16 have no (or a lossy) NumPy type
        array = tensor.numpy()
    else:
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as error:
            raise DataError(f"{name} is not numeric: {error}") from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise DataError(f"{name} must be numeric, got dtype {array.dtype}")
    if dtype is np.float32 and array.dtype == np.float64:
        return array  # keep the caller's precision for maps
    return array.astype(dtype, copy=False)


def _check_finite(values: np.ndarray, name: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"{name} has {int((~finite).sum())} NaN or infinite values")


def _check_binary(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as uint8 after checking that they are all 0 or 1."""
    binary = values.astype(np.uint8, copy=False)
    if not np.array_equal(binary, values):
        raise DataError(
            f"{name} must hold only 0 and 1, got values such as "
            f"{np.unique(values[binary != values])[:3].tolist()}"
        )
    if binary.size and binary.max() > 1:
        raise DataError(f"{name} must hold only 0 and 1, got {np.unique(binary).tolist()[:5]}")
    return binary


def _check_both_classes(labels: np.ndarray, name: str, metric: str) -> None:
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        present = "anomalous (1)" if positives else "normal (0)"
        raise DataError(
            f"{metric} needs both normal (0) and anomalous (1) {name}, but all {labels.size} "
            f"are {present}; evaluate on a split with both classes"
        )


def _image_inputs(
    scores: ArrayLike, labels: ArrayLike, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores float64 (N,), labels uint8 (N,))``."""
    score_array = _to_numpy(scores, "scores")
    label_array = _to_numpy(labels, "labels")
    if score_array.ndim != 1 or label_array.ndim != 1:
        raise DataError(
            f"{metric} expects 1-D scores and labels, got shapes {score_array.shape} and "
            f"{label_array.shape}"
        )
    if score_array.shape != label_array.shape:
        raise DataError(f"{metric}: {score_array.size} scores but {label_array.size} labels")
    _check_finite(score_array, "scores")
    label_array = _check_binary(label_array, "labels")
    _check_both_classes(label_array, "labels", metric)
    return score_array, label_array


def _squeeze_channel(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 3:
        raise DataError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {array.shape}")
    return array


def _map_inputs(maps: ArrayLike, masks: ArrayLike, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(maps float32/64 (N, H, W), masks uint8 (N, H, W))``."""
    map_array = _squeeze_channel(_to_numpy(maps, "maps", np.float32), "maps")
    mask_array = _squeeze_channel(_to_numpy(masks, "masks", np.float32), "masks")
    if map_array.shape != mask_array.shape:
        raise DataError(
            f"{metric}: maps {map_array.shape} and masks {mask_array.shape} differ in shape; "
            "upsample the anomaly maps to the mask resolution first"
        )
    _check_finite(map_array, "maps")
    mask_array = _check_binary(mask_array, "masks")
    _check_both_classes(mask_array, "mask pixels", metric)
    return map_array, mask_array


def fpr_key(fpr: float) -> str:
    """The metric-key spelling of a false positive rate: ``0.01 -> "1e-2"``."""
    return np.format_float_scientific(fpr, trim="-", exp_digits=1)


# ----------------------------------------------------------------------- image level


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image scores (``sklearn.metrics.roc_auc_score``).

    Args:
        scores: ``(N,)`` anomaly scores, any real range; higher = more anomalous.
        labels: ``(N,)`` ground truth, 0 normal / 1 anomalous; both must occur.

    Returns:
        AUROC in [0, 1]; ties count one half (the Mann-Whitney U statistic).
    """
    score_array, label_array = _image_inputs(scores, labels, "image_auroc")
    return float(roc_auc_score(label_array, score_array))


def roc_curve(
    scores: ArrayLike, labels: ArrayLike, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve (``sklearn.metrics.roc_curve``), one point per distinct score.

    Args:
        scores: ``(N,)`` anomaly scores.
        labels: ``(N,)`` ground truth in {0, 1}; both must occur.
        drop_intermediate: Drop collinear points (lighter plots); keep the default
            ``False`` for anything computed from the curve.

    Returns:
        ``(fpr, tpr, thresholds)`` as float64 NumPy arrays, ``fpr`` and ``tpr``
        non-decreasing from (0, 0) to (1, 1); ``thresholds`` decreasing, the
        first one ``inf`` (scikit-learn's convention: nothing is flagged), and
        sample ``i`` is called anomalous at point ``k`` when
        ``scores[i] >= thresholds[k]``.
    """
    score_array, label_array = _image_inputs(scores, labels, "roc_curve")
    fpr, tpr, thresholds = _sklearn_roc_curve(
        label_array, score_array, drop_intermediate=drop_intermediate
    )
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float) -> float:
    """True positive rate at a given false positive rate, read off the ROC curve.

    The ROC curve here is the piecewise-linear curve through the operating points
    of every threshold (:func:`roc_curve`); a point between two operating points is
    reached by choosing randomly between their thresholds. Where the curve is
    vertical at ``fpr`` (several thresholds share that FPR) the highest TPR is
    returned, i.e. the best TPR whose FPR does not exceed ``fpr``; otherwise the
    value is linearly interpolated between the last operating point with a smaller
    FPR and the first with a larger one.

    With ``n`` normal images the FPR moves in steps of ``1 / n``: a target below
    that (1e-4 needs at least 10 000 normal images) is an interpolation inside the
    first step and says little; report it with that caveat.

    Args:
        scores: ``(N,)`` anomaly scores.
        labels: ``(N,)`` ground truth in {0, 1}; both must occur.
        fpr: The target false positive rate, in [0, 1].

    Returns:
        TPR in [0, 1].
    """
    if not 0.0 <= float(fpr) <= 1.0:
        raise DataError(f"tpr_at_fpr: fpr must lie in [0, 1], got {fpr}")
    curve_fpr, curve_tpr, _ = roc_curve(scores, labels)
    return _interpolate_tpr(curve_fpr, curve_tpr, float(fpr))


def _interpolate_tpr(curve_fpr: np.ndarray, curve_tpr: np.ndarray, fpr: float) -> float:
    after = int(np.searchsorted(curve_fpr, fpr, side="right"))  # first point with FPR > fpr
    left = after - 1  # last point with FPR <= fpr (the curve starts at FPR 0)
    if curve_fpr[left] == fpr or after == curve_fpr.size:
        return float(curve_tpr[left])
    weight = (fpr - curve_fpr[left]) / (curve_fpr[after] - curve_fpr[left])
    return float(curve_tpr[left] + weight * (curve_tpr[after] - curve_tpr[left]))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 score over all thresholds (``sklearn.metrics.precision_recall_curve``).

    The threshold-free F1 of anomalib's ``F1Max``: ``max 2PR / (P + R)`` over
    every distinct score as threshold (0 where P + R = 0).
    """
    score_array, label_array = _image_inputs(scores, labels, "f1_max")
    precision, recall, _ = precision_recall_curve(label_array, score_array)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return float(f1.max())


# ----------------------------------------------------------------------- pixel level


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """AUROC over all pixels of all images (``sklearn.metrics.roc_auc_score``).

    Args:
        maps: ``(N, H, W)`` or ``(N, 1, H, W)`` anomaly maps.
        masks: Ground truth of the same shape, values in {0, 1}; both must occur.

    Memory: about 40 bytes per pixel at peak (~220 MB for 83 x 256 x 256).
    """
    map_array, mask_array = _map_inputs(maps, masks, "pixel_auroc")
    return float(roc_auc_score(mask_array.ravel(), map_array.ravel()))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Computed with anomalib's ``AUPRO`` (MVTec AD definition; see the module
    docstring), on the CPU.

    Args:
        maps: ``(N, H, W)`` or ``(N, 1, H, W)`` anomaly maps.
        masks: Ground truth of the same shape, values in {0, 1}; at least one
            anomalous and one normal pixel.
        fpr_limit: Upper integration limit of the global pixel FPR, in (0, 1];
            0.3 is the MVTec AD convention.

    Returns:
        AUPRO in [0, 1]: 1.0 when every anomalous region is fully detected before
        any normal pixel.
    """
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise DataError(f"aupro: fpr_limit must lie in (0, 1], got {fpr_limit}")
    map_array, mask_array = _map_inputs(maps, masks, "aupro")
    return _anomalib_aupro(map_array, mask_array, float(fpr_limit))


def _anomalib_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    from anomalib.metrics import AUPRO  # heavy import, only when needed

    metric = AUPRO(fields=("anomaly_map", "gt_mask"), fpr_limit=fpr_limit)
    batch = types.SimpleNamespace(
        anomaly_map=torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)),
        gt_mask=torch.from_numpy(masks.astype(np.float32)),
    )
    metric.update(batch)
    return float(metric.compute())


# --------------------------------------------------------------------- distributions


def wasserstein(a: ArrayLike, b: ArrayLike) -> float:
    """1-Wasserstein (earth mover's) distance between two 1-D empirical distributions.

    ``scipy.stats.wasserstein_distance`` over all values of ``a`` and of ``b``
    (flattened; sizes may differ), e.g. the normal and anomalous score
    distributions of a model, or a teacher's and a student's scores.
    """
    arrays = []
    for name, values in (("a", a), ("b", b)):
        array = _to_numpy(values, name).ravel()
        if array.size == 0:
            raise DataError(f"wasserstein: {name} is empty")
        _check_finite(array, name)
        arrays.append(array)
    return float(wasserstein_distance(arrays[0], arrays[1]))


# -------------------------------------------------------------------------- bundles


def evaluate_image_scores(
    scores: ArrayLike,
    labels: ArrayLike,
    prefix: str = "",
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> dict[str, float]:
    """All image-level metrics, keyed for logging.

    Args:
        scores: ``(N,)`` anomaly scores.
        labels: ``(N,)`` ground truth in {0, 1}; both must occur.
        prefix: Prepended verbatim to every key, e.g. ``"test/"`` or
            ``"test/teacher_"`` (CONTRIBUTING.md: keys are ``stage/name``).
        fprs: The FPRs of the ``tpr_at_fpr_*`` entries.

    Returns:
        ``{prefix + "image_auroc", prefix + "image_f1_max",
        prefix + "tpr_at_fpr_1e-2", prefix + "tpr_at_fpr_1e-3",
        prefix + "tpr_at_fpr_1e-4"}`` (one ``tpr_at_fpr_<fpr_key(f)>`` per ``fprs``).
    """
    score_array, label_array = _image_inputs(scores, labels, "evaluate_image_scores")
    results = {
        f"{prefix}image_auroc": image_auroc(score_array, label_array),
        f"{prefix}image_f1_max": f1_max(score_array, label_array),
    }
    curve_fpr, curve_tpr, _ = roc_curve(score_array, label_array)
    for fpr in fprs:
        if not 0.0 <= float(fpr) <= 1.0:
            raise DataError(f"evaluate_image_scores: fprs must lie in [0, 1], got {fpr}")
        results[f"{prefix}tpr_at_fpr_{fpr_key(fpr)}"] = _interpolate_tpr(
            curve_fpr, curve_tpr, float(fpr)
        )
    return results


def evaluate_maps(
    maps: ArrayLike,
    masks: ArrayLike,
    prefix: str = "",
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All pixel-level metrics, keyed for logging.

    Args:
        maps: ``(N, H, W)`` or ``(N, 1, H, W)`` anomaly maps at mask resolution.
        masks: Ground truth of the same shape in {0, 1}; both classes must occur.
        prefix: Prepended verbatim to every key (see :func:`evaluate_image_scores`).
        fpr_limit: The AUPRO integration limit.

    Returns:
        ``{prefix + "pixel_auroc", prefix + "aupro"}``.
    """
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise DataError(f"evaluate_maps: fpr_limit must lie in (0, 1], got {fpr_limit}")
    map_array, mask_array = _map_inputs(maps, masks, "evaluate_maps")
    return {
        f"{prefix}pixel_auroc": float(roc_auc_score(mask_array.ravel(), map_array.ravel())),
        f"{prefix}aupro": _anomalib_aupro(map_array, mask_array, float(fpr_limit)),
    }
