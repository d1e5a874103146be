"""Where a map student's AUPRO goes: per-region overlap and false positives, student beside teacher.

AUPRO (the MVTec AD per-region-overlap curve up to a pixel false-positive rate of 0.3) averages,
at each threshold, the share of every defect region the map covers, against the share of normal
pixels above the same threshold. An encoder-free map student
(:mod:`kd_experiments.schemes.map_regression`) can keep its teacher's pixel AUROC and still lose
AUPRO; this benchmark says where, for each test record of ``benchmarks/results/map_regression.json``
it is pointed at (a setting and a ratio, every seed whose MLflow run is in this checkout's store).
Both models score the category's test split through their deployable forward pass (raw images in,
``(scores, maps)`` out; maps compared at the input size): the student logged by the record's run,
the teacher rebuilt from the checkpoint the run distilled from. Figures per model:

- ``pixel_auroc``, ``aupro``: recomputed from these maps (they equal the record's figures; a
  check that the same models are read).
- ``pro_at_fpr_<f>``: the mean overlap of the defect regions (8-connected components of the
  masks) at the threshold where a share ``f`` of all normal test pixels lies above it, for ``f``
  in ``FPRS``: the points of the curve AUPRO integrates.
- at ``DIAGNOSTIC_FPR``: ``fp_share_good_images``, the share of the false-positive pixels that lie
  in defect-free test images, and ``fp_share_near_defect``, the share that lie in a defective
  image within ``NEAR_PX`` pixels of its defect (the rest lie farther away in a defective image);
  ``overlap_regions_<lo>_<hi>``, the mean overlap of the regions of ``lo`` to ``hi`` pixels
  (``REGION_BINS``), with their count in ``regions_<lo>_<hi>``.

One record per (record's MLflow run, model) in ``benchmarks/results/map_regression_regions.json``,
with the per-record provenance of :mod:`benchmarks.harness`; resumable. The test split is read
here, so nothing here selects a model or a setting: the figures explain test results already
recorded.

    python -m benchmarks.map_regression_regions --variant 'trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=0'
"""

from __future__ import annotations

from typing import Any

from benchmarks.map_regression import TEACHER_TARGETS, teacher_checkpoint
from benchmarks.map_regression_shift import diagnose_records

#: pixel false-positive rates at which the per-region overlap is read
FPRS = (0.005, 0.01, 0.03, 0.1, 0.3)
#: the false-positive rate at which false positives and region sizes are broken down
DIAGNOSTIC_FPR = 0.03
#: a false positive this close (pixels, Euclidean) to a defect counts as near it
NEAR_PX = 16
#: region-size bins (pixels at the input size) of the per-size overlap
REGION_BINS = ((0, 500), (500, 2000), (2000, 8000), (8000, None))
BATCH = 8


def _test_maps(model, images) -> Any:
    """``(N, H, W)`` maps of ``images`` at their own size, through the model's deployable forward."""
    import torch

    from kd_experiments.anomaly_maps import upsample

    out = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            maps = model(images[start:start + BATCH])[1].float()
            maps = maps.reshape(maps.shape[0], -1, *maps.shape[-2:])[:, :1]
            if tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
                maps = upsample(maps, images.shape[-2:])
            out.append(maps[:, 0])
    return torch.cat(out).numpy()


def region_figures(maps, masks) -> dict[str, float]:
    """The per-region-overlap and false-positive figures of the module docstring, from ``(N, H, W)``
    maps and binary masks (numpy arrays)."""
    import numpy as np
    from scipy import ndimage

    from kd_experiments import metrics

    defect = masks > 0.5
    normal_values = maps[~defect]
    regions = []  # (image, boolean region)
    for i in range(len(masks)):
        labelled, count = ndimage.label(defect[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    if not regions or normal_values.size == 0:
        raise SystemExit("map_regression_regions: the test split needs defect regions and normal pixels")

    def overlaps(threshold: float) -> list[float]:
        return [float((maps[i][region] > threshold).mean()) for i, region in regions]

    figures = {"pixel_auroc": metrics.pixel_auroc(maps, defect), "aupro": metrics.aupro(maps, defect),
               "regions": len(regions)}
    for fpr in FPRS:
        figures[f"pro_at_fpr_{fpr:g}"] = float(np.mean(overlaps(float(np.quantile(normal_values, 1.0 - fpr)))))
    threshold = float(np.quantile(normal_values, 1.0 - DIAGNOSTIC_FPR))
    false_positive = (maps > threshold) & ~defect
    good = ~defect.reshape(len(defect), -1).any(axis=1)
    near = 0
    for i in np.flatnonzero(~good):
        distance = ndimage.distance_transform_edt(~defect[i])
        near += int((false_positive[i] & (distance <= NEAR_PX)).sum())
    total = max(int(false_positive.sum()), 1)
    figures["fp_share_good_images"] = float(false_positive[good].sum()) / total
    figures["fp_share_near_defect"] = near / total
    sizes = np.array([int(region.sum()) for _, region in regions])
    at_threshold = np.array(overlaps(threshold))
    for low, high in REGION_BINS:
        chosen = (sizes >= low) & (sizes < (high if high is not None else np.inf))
        name = f"{low}_{high if high is not None else 'up'}"
        figures[f"regions_{name}"] = int(chosen.sum())
        figures[f"overlap_regions_{name}"] = float(at_threshold[chosen].mean()) if chosen.any() else None
    return figures


def measure(record: dict[str, Any], data_root) -> list[dict[str, Any]]:
    """The region figures of one map-regression test record, for its student and its teacher."""
    import torch

    from kd_experiments.deploy import raw_images
    from kd_experiments.export import load_run_student, run_datamodule
    from kd_experiments.schemes.map_regression.teachers import load_map_teacher

    run = load_run_student(record["mlflow_run_id"])
    config = run.config
    config.data.root = str(data_root / "mvtec_ad")  # the shared data, wherever this checkout sees it
    datamodule = run_datamodule(config)
    dataset = datamodule.test_dataset
    items = [dataset[i] for i in range(len(dataset))]
    images = raw_images(torch.stack([item["image"] for item in items]).float(), datamodule).clamp(0.0, 1.0)
    masks = torch.stack([item["mask"] for item in items]).float().reshape(len(items), *images.shape[-2:]).numpy()
    teacher = load_map_teacher(TEACHER_TARGETS[record["teacher_scheme"]],
                               teacher_checkpoint(record["teacher_scheme"], record["category"]))
    common = {"category": record["category"], "teacher_scheme": record["teacher_scheme"],
              "variant": record.get("variant"), "seed": record["seed"],
              "requested_mac_ratio": record["requested_mac_ratio"], "mlflow_run_id": record["mlflow_run_id"],
              "test_images": len(items)}
    return [{**common, "model": role, **region_figures(_test_maps(model.eval(), images), masks)}
            for role, model in (("student", run.module), ("teacher", teacher))]


def main() -> None:
    diagnose_records(__doc__, "map_regression_regions.json", "regions", measure, lambda row: (
        f"AUPRO {row['aupro']:.4f}, " + ", ".join(f"PRO@{f:g} {row[f'pro_at_fpr_{f:g}']:.3f}" for f in FPRS)))


if __name__ == "__main__":
    main()
