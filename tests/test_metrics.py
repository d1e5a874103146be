"""Tests of kd_experiments.metrics against scikit-learn, brute force and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from kd_experiments.errors import DataError
from kd_experiments.metrics import (
    aupro,
    evaluate_image_scores,
    evaluate_maps,
    f1_max,
    fpr_key,
    image_auroc,
    pixel_auroc,
    roc_curve,
    tpr_at_fpr,
    wasserstein,
)


@pytest.fixture
def random_scores() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(300, generator=generator) < 0.3).long()
    # Rounded: plenty of ties, within and across classes.
    scores = torch.round((torch.rand(300, generator=generator) + 0.4 * labels) * 20) / 20
    return scores, labels


# ----------------------------------------------------------------------- image level


def test_image_auroc_hand_value() -> None:
    # Pairs (anomalous, normal): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3/4.
    assert image_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75


def test_image_auroc_matches_sklearn(random_scores) -> None:
    scores, labels = random_scores
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # NumPy arrays and lists are accepted too.
    assert image_auroc(scores.numpy(), labels.tolist()) == image_auroc(scores, labels)


def test_image_auroc_is_invariant_to_score_range(random_scores) -> None:
    # Regression test: a sigmoid applied to raw scores (torchmetrics' binary metrics do
    # that outside [0, 1]) saturates large scores into ties and gives 0.5 here.
    scores, labels = random_scores
    expected = image_auroc(scores, labels)
    assert expected > 0.7
    assert image_auroc(scores * 1000 + 50, labels) == pytest.approx(expected, abs=1e-12)
    assert image_auroc(scores.half(), labels) == pytest.approx(expected, abs=1e-12)


def test_f1_max_hand_value() -> None:
    # Thresholds 0.8: F1 2/3; 0.4: 1/2; 0.35: P=2/3, R=1 -> 0.8; 0.1: 2/3.
    value = f1_max(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert value == pytest.approx(0.8)


def test_f1_max_matches_brute_force(random_scores) -> None:
    scores, labels = random_scores
    best = 0.0
    for threshold in torch.unique(scores):
        predicted = scores >= threshold
        true_positives = (predicted & (labels == 1)).sum().item()
        if true_positives:
            precision = true_positives / predicted.sum().item()
            recall = true_positives / (labels == 1).sum().item()
            best = max(best, 2 * precision * recall / (precision + recall))
    assert f1_max(scores, labels) == pytest.approx(best, abs=1e-12)


def test_roc_curve_matches_sklearn(random_scores) -> None:
    scores, labels = random_scores
    fpr, tpr, thresholds = roc_curve(scores, labels)
    expected = sklearn_roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    for ours, theirs in zip((fpr, tpr, thresholds), expected, strict=True):
        np.testing.assert_allclose(ours, theirs)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.isinf(thresholds[0])


# Normal scores 0, 1, 2, 3; anomalous 3 (tied with a normal one), 2.5, 1.5, 0.5.
# ROC points: (0,0) -(tie, diagonal)- (.25,.25) (.25,.5) (.5,.5) (.5,.75) (.75,.75) (.75,1) (1,1)
HAND_SCORES = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 2.5, 1.5, 0.5])
HAND_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize(
    ("fpr", "expected"),
    [
        (0.0, 0.0),
        (1e-2, 1e-2),  # on the diagonal made by the tie
        (0.125, 0.125),
        (0.25, 0.5),  # vertical at 0.25: the best TPR there
        (0.3, 0.5),  # flat between (.25, .5) and (.5, .5)
        (0.5, 0.75),
        (0.6, 0.75),
        (1.0, 1.0),
    ],
)
def test_tpr_at_fpr_hand_values(fpr: float, expected: float) -> None:
    assert tpr_at_fpr(HAND_SCORES, HAND_LABELS, fpr) == pytest.approx(expected, abs=1e-12)


def test_evaluate_image_scores_keys_and_values(random_scores) -> None:
    scores, labels = random_scores
    results = evaluate_image_scores(scores, labels, prefix="test/teacher_")
    assert set(results) == {
        "test/teacher_image_auroc",
        "test/teacher_image_f1_max",
        "test/teacher_tpr_at_fpr_1e-2",
        "test/teacher_tpr_at_fpr_1e-3",
        "test/teacher_tpr_at_fpr_1e-4",
    }
    assert results["test/teacher_image_auroc"] == image_auroc(scores, labels)
    assert results["test/teacher_image_f1_max"] == f1_max(scores, labels)
    assert results["test/teacher_tpr_at_fpr_1e-2"] == tpr_at_fpr(scores, labels, 1e-2)
    assert all(isinstance(value, float) for value in results.values())
    assert fpr_key(0.015) == "1.5e-2"


# ----------------------------------------------------------------------- pixel level


def test_pixel_auroc_matches_sklearn() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = (torch.rand(3, 1, 16, 16, generator=generator) < 0.2).float()
    maps = torch.rand(3, 1, 16, 16, generator=generator) + 0.5 * masks
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    # (N, H, W) maps against (N, 1, H, W) masks.
    assert pixel_auroc(maps[:, 0], masks) == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_map_is_one() -> None:
    masks = torch.zeros(2, 1, 12, 12)
    masks[0, 0, 2:5, 2:6] = 1
    masks[1, 0, 7:11, 1:3] = 1
    assert aupro(masks * 3.0, masks) == pytest.approx(1.0)


def test_aupro_averages_over_regions_not_pixels() -> None:
    # Region A: 1 pixel, fully detected. Region B: 9 pixels, scored like normal pixels.
    masks = torch.zeros(1, 10, 10)
    masks[0, 1, 1] = 1
    masks[0, 5:8, 5:8] = 1
    maps = torch.zeros(1, 10, 10)
    maps[0, 1, 1] = 1.0
    # PRO curve: (0, 0) -> (0, 0.5) -> (1, 1); up to FPR 0.3: (0.5 + 0.65) / 2.
    assert aupro(maps, masks) == pytest.approx(0.575)


def test_aupro_partially_covered_region() -> None:
    # Region A (2x2) fully above the threshold, region B (2x2) half: PRO 0.75 at FPR 0.
    masks = torch.zeros(1, 1, 10, 10)
    masks[..., 1:3, 1:3] = 1
    masks[..., 6:8, 6:8] = 1
    maps = masks.clone()
    maps[..., 7, 6:8] = 0.0
    # (0, 0.75) -> (1, 1): PRO at FPR 0.3 is 0.825; area 0.3 * (0.75 + 0.825) / 2 / 0.3.
    assert aupro(maps, masks) == pytest.approx(0.7875)


def test_aupro_regions_are_8_connected() -> None:
    # Diagonal neighbours form one region (MVTec convention): PRO at FPR 0 is
    # (1/2 + 0) / 2 = 0.25, not (1 + 0 + 0) / 3 as with 4-connectivity.
    masks = torch.zeros(1, 10, 10)
    masks[0, 2, 2] = masks[0, 3, 3] = masks[0, 7, 7] = 1
    maps = torch.zeros(1, 10, 10)
    maps[0, 2, 2] = 1.0
    assert aupro(maps, masks) == pytest.approx((0.25 + 0.25 + 0.75 * 0.3) / 2)


def test_aupro_integrates_only_up_to_the_fpr_limit() -> None:
    # 10 normal pixels (one scored 1.0) and one anomalous pixel scored 0.5:
    # PRO curve (0, 0) -> (0.1, 0) -> (0.1, 1) -> (1, 1).
    maps = torch.tensor([[[1.0] + [0.0] * 9 + [0.5]]])
    masks = torch.tensor([[[0.0] * 10 + [1.0]]])
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.2 / 0.3)
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(0.0)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.9)


def _mvtec_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Independent float64 re-statement of the MVTec AD evaluation code."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    regions = 0
    for index, mask in enumerate(masks):
        image_labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[index] = np.where(image_labels > 0, image_labels + regions, 0)
        regions += count
    sizes = np.bincount(labels.ravel())
    pro_step = np.where(labels > 0, 1.0 / sizes[labels], 0.0).ravel() / regions
    fpr_step = (labels == 0).ravel() / (labels == 0).sum()
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    fprs = np.concatenate([[0.0], np.cumsum(fpr_step[order])[last_of_tie]])
    pros = np.concatenate([[0.0], np.cumsum(pro_step[order])[last_of_tie]])
    inside = fprs <= fpr_limit
    x, y = fprs[inside], pros[inside]
    if x[-1] < fpr_limit:
        nxt = np.argmax(~inside)
        y_limit = y[-1] + (pros[nxt] - y[-1]) * (fpr_limit - x[-1]) / (fprs[nxt] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def test_aupro_matches_mvtec_definition_on_random_maps() -> None:
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 32, 32))
    for index in range(3):
        for _ in range(2):
            row, col = rng.integers(0, 26, size=2)
            masks[index, row : row + rng.integers(2, 7), col : col + rng.integers(2, 7)] = 1
    maps = np.round(rng.random(masks.shape) + 0.6 * ndimage.uniform_filter(masks, 3), 2)
    expected = _mvtec_aupro(maps, masks, 0.3)
    assert 0.05 < expected < 0.95
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        expected, abs=1e-5
    )


def test_evaluate_maps_keys() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:4, 2:4] = 1
    maps = masks + 0.1 * torch.rand(2, 1, 8, 8)
    results = evaluate_maps(maps, masks, prefix="test/")
    assert set(results) == {"test/pixel_auroc", "test/aupro"}
    assert results["test/pixel_auroc"] == pytest.approx(1.0)
    assert results["test/aupro"] == pytest.approx(1.0)


# ------------------------------------------------------------------------ wasserstein


def test_wasserstein_hand_values() -> None:
    assert wasserstein(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([5.0, 6.0, 8.0])) == 5.0
    # CDFs differ by 1/3 on [0, 1).
    assert wasserstein([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("metric", [image_auroc, f1_max, evaluate_image_scores])
def test_one_class_only_is_a_clear_error(metric) -> None:
    with pytest.raises(
        DataError,
        match=r"needs both normal \(0\) and anomalous \(1\).*all 3 "
        r"are normal",
    ):
        metric(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="are anomalous"):  # DataError is a ValueError
        metric(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, 1]))


@pytest.mark.parametrize("metric", [pixel_auroc, aupro, evaluate_maps])
def test_masks_without_anomalous_pixels_are_a_clear_error(metric) -> None:
    with pytest.raises(DataError, match="mask pixels"):
        metric(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, float("nan"), 0.3], [0, 1, 1], "1 NaN or infinite"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "only 0 and 1"),
        ([0.1, 0.2, 0.3], [0, 0.5, 1], "only 0 and 1"),
        ([0.1, 0.2], [0, 1, 1], "2 scores but 3 labels"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
    ],
)
def test_invalid_image_inputs(scores, labels, message) -> None:
    with pytest.raises(DataError, match=message):
        image_auroc(scores, labels)


def test_invalid_map_inputs() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :2] = 1
    with pytest.raises(DataError, match="upsample"):
        pixel_auroc(torch.rand(2, 1, 4, 4), masks)
    with pytest.raises(DataError, match=r"\(N, H, W\) or \(N, 1, H, W\)"):
        aupro(torch.rand(8, 8), masks[0, 0])
    with pytest.raises(DataError, match="fpr_limit"):
        aupro(torch.rand(2, 1, 8, 8), masks, fpr_limit=0.0)
    with pytest.raises(DataError, match="fpr must lie in"):
        tpr_at_fpr(HAND_SCORES, HAND_LABELS, 1.5)
    with pytest.raises(DataError, match="empty"):
        wasserstein([], [1.0])
