"""Shift sensitivity of encoder-free map students and their teachers, on normal images only.

A map-regression student (:mod:`kd_experiments.schemes.map_regression`) learns its teacher's maps
on the normal training images and synthetic anomalies made from them; with no pretrained encoder
it has only what those images showed it. When a student fails on a category's test split, one
question is whether the test split's *normal* images already look anomalous to it (a shift in
lighting or pose that carries no defect), and whether its teacher reacts to the same shift. This
benchmark measures it, for each test record of ``benchmarks/results/map_regression.json`` it is
pointed at (a setting and a ratio, every seed whose MLflow run is in this checkout's store), on
normal images only (no anomaly label or mask is read):

- ``test_normal_auroc``: the image AUROC of the test split's normal images (positives) against
  the normal training images the model never trained on (negatives: the validation split of
  the student's run seed; for the teacher, of the seed it was built with, ``TEACHER_SEED``, so a
  PatchCore teacher is not scored on its own memory bank). 0.5: the model
  scores both alike; 1.0: every test normal image scores above every held-out training image, so
  that the test split's normal images look anomalous to it before any defect is seen.
- ``brightness_auroc_<f>``: the image AUROC of those held-out normal training images with every
  pixel multiplied by ``f`` (clamped to [0, 1]) against the same images unchanged, for ``f`` in
  ``BRIGHTNESS``: the same question asked of a controlled global brightness change.
- ``map_grey_correlation``: the median, over the test split's normal images, of the Pearson
  correlation between the model's map and the image's grey level (channels averaged), pixel by
  pixel: near 0, the map does not follow the image's brightness; strongly negative or positive,
  the map draws the object (dark object, bright background or the reverse) rather than its
  defects, and a defect on the object scores like the object.
- ``train_map_grey_correlation``: the same on the first ``TRAIN_IMAGES`` images the model trained
  on (its own split's training images: for a PatchCore teacher, images of its memory bank), i.e.
  what a map student sees as its targets.
- ``train_map_grey_correlation_leave_one_out`` (a PatchCore teacher whose bank records its
  source images): the same training images scored against the bank less each image's own
  patches (what ``scheme.teacher_leave_one_out`` gives a map student as targets).
- ``val_mean_grey`` / ``test_normal_mean_grey``: the mean pixel value (0..255, channels
  averaged) of the two sets of normal images, a fact of the data.

Both models score through their deployable forward pass (raw images in, ``(scores, maps)``
out): the student logged by the record's MLflow run, the teacher rebuilt from the checkpoint the
run distilled from (``logs/benchmarks/map_regression/teacher-<scheme>-<category>``). One record
per (record's MLflow run, model), in ``benchmarks/results/map_regression_shift.json``, with the
per-record provenance of :mod:`benchmarks.harness`; resumable. Nothing here selects a model or a
setting: the figures explain test results already recorded.

    python -m benchmarks.map_regression_shift --variant 'trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=0'
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ResultsFile, base_parser, now_utc
from benchmarks.map_regression import TEACHER_TARGETS, teacher_checkpoint, use_project_mlflow_store

#: global brightness factors applied to the held-out normal training images
BRIGHTNESS = (0.9, 1.1)
BATCH = 8
#: training images the training-image correlation reads
TRAIN_IMAGES = 32
#: the seed the map_regression benchmark builds its teachers with (their train / validation split)
TEACHER_SEED = 0


def _normal_images(dataset, datamodule) -> Any:
    """The normal images of ``dataset`` in [0, 1] (the deployable models' input), stacked."""
    import torch

    from kd_experiments.deploy import raw_images

    images = [item["image"] for item in (dataset[i] for i in range(len(dataset))) if int(item.get("label", 0)) == 0]
    if not images:
        raise SystemExit(f"{type(dataset).__name__}: no normal image to score")
    return raw_images(torch.stack(images).float(), datamodule).clamp(0.0, 1.0)


def _scores(model, images) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([model(images[start:start + BATCH])[0].flatten().float()
                          for start in range(0, len(images), BATCH)])


def _map_grey_correlation(model, images) -> float:
    """The median over ``images`` of the pixel-wise Pearson correlation of map and grey level."""
    import torch

    from kd_experiments.anomaly_maps import upsample

    values = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            batch = images[start:start + BATCH]
            maps = model(batch)[1].float()
            maps = maps.reshape(len(batch), -1, *maps.shape[-2:])[:, :1]
            grey = batch.mean(dim=1, keepdim=True)
            if tuple(maps.shape[-2:]) != tuple(grey.shape[-2:]):
                maps = upsample(maps, grey.shape[-2:])
            a = maps.flatten(1) - maps.flatten(1).mean(1, keepdim=True)
            b = grey.flatten(1) - grey.flatten(1).mean(1, keepdim=True)
            values.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12))
    return float(torch.cat(values).median())


class _LeavingOut:
    """A map teacher called on consecutive batches of known images, each scored leaving itself out."""

    def __init__(self, teacher, ids) -> None:
        self.teacher, self.ids, self.done = teacher, ids, 0

    def __call__(self, images):
        ids = self.ids[self.done:self.done + len(images)]
        self.done += len(images)
        return self.teacher(images, ids)


def _auroc(positives, negatives) -> float:
    import torch

    from kd_experiments import metrics

    scores = torch.cat([negatives, positives])
    labels = torch.cat([torch.zeros(len(negatives)), torch.ones(len(positives))]).long()
    return float(metrics.image_auroc(scores, labels))


def measure(record: dict[str, Any], data_root: Path) -> list[dict[str, Any]]:
    """The shift figures of one map-regression test record, for its student and its teacher.

    Each model's held-out images are those it never trained on: the student's run holds out the
    split of its own seed, the teacher (built with ``TEACHER_SEED``) the split of that seed, so a
    PatchCore teacher is never scored on images of its own memory bank."""
    import copy

    from torch.utils.data import Subset

    from kd_experiments.data.common import sample_ids
    from kd_experiments.export import load_run_student, run_datamodule
    from kd_experiments.schemes.map_regression.teachers import load_map_teacher

    run = load_run_student(record["mlflow_run_id"])
    config = run.config
    config.data.root = str(data_root / "mvtec_ad")  # the shared data, wherever this checkout sees it
    teacher_config = copy.deepcopy(config)
    teacher_config.data.seed = TEACHER_SEED
    teacher = load_map_teacher(TEACHER_TARGETS[record["teacher_scheme"]],
                               teacher_checkpoint(record["teacher_scheme"], record["category"]))
    common = {"category": record["category"], "teacher_scheme": record["teacher_scheme"],
              "variant": record.get("variant"), "seed": record["seed"],
              "requested_mac_ratio": record["requested_mac_ratio"], "mlflow_run_id": record["mlflow_run_id"]}
    out = []
    for role, model, data_config in (("student", run.module.eval(), config),
                                     ("teacher", teacher.eval(), teacher_config)):
        datamodule = run_datamodule(data_config)
        held_out = _normal_images(datamodule.val_dataset, datamodule)
        test_normal = _normal_images(datamodule.test_dataset, datamodule)
        trained_on = Subset(datamodule.train_dataset, range(min(TRAIN_IMAGES, len(datamodule.train_dataset))))
        base = _scores(model, held_out)
        figures = {"model": role, "split_seed": int(data_config.data.seed), "val_images": len(held_out),
                   "test_normal_images": len(test_normal), "val_mean_grey": float(held_out.mean() * 255),
                   "test_normal_mean_grey": float(test_normal.mean() * 255),
                   "test_normal_auroc": _auroc(_scores(model, test_normal), base),
                   "map_grey_correlation": _map_grey_correlation(model, test_normal),
                   "train_map_grey_correlation": _map_grey_correlation(model, _normal_images(trained_on, datamodule))}
        if role == "teacher" and model.can_leave_out:
            ids = sample_ids([trained_on[i]["path"] for i in range(len(trained_on))], len(trained_on))
            figures["train_map_grey_correlation_leave_one_out"] = _map_grey_correlation(
                _LeavingOut(model, ids), _normal_images(trained_on, datamodule))
        for factor in BRIGHTNESS:
            figures[f"brightness_auroc_{factor:g}"] = _auroc(_scores(model, (held_out * factor).clamp(0.0, 1.0)), base)
        figures["test_image_auroc"] = record["image_auroc"] if role == "student" else record["teacher_image_auroc"]
        figures["test_pixel_auroc"] = record["pixel_auroc"] if role == "student" else record["teacher_pixel_auroc"]
        out.append({**common, **figures})
    return out


def diagnose_records(doc: str, output: str, label: str, measure_one, describe) -> None:
    """The command line shared by the map-regression diagnostics: the ratio-``--ratio`` test
    records of ``--variant`` in ``--categories``, each measured once by ``measure_one(record,
    data_root)`` (rows keyed by MLflow run and model, appended to ``output``), each row printed
    with ``describe(row)``; records whose MLflow run is not in this checkout's store are skipped."""
    import torch

    from benchmarks import map_regression
    from kd_experiments.errors import TrackingError

    parser = base_parser(doc, output=output)
    parser.add_argument("--variant", default=None, help="the map_regression setting whose records to diagnose "
                                                         "(its overrides, as in its records' 'variant')")
    parser.add_argument("--ratio", type=int, default=map_regression.SEED_RATIO, help="requested deployed MAC ratio")
    parser.add_argument("--categories", nargs="+", default=list(map_regression.CATEGORIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    source = ResultsFile(RESULTS / "map_regression.json")
    results = ResultsFile(args.output, key_fields=("mlflow_run_id", "model"))
    targets = [r for r in source.runs if map_regression.is_map_student(r) and r.get("variant") == args.variant
               and r.get("requested_mac_ratio") == args.ratio and r.get("category") in args.categories]
    if not targets:
        raise SystemExit(f"no map_regression record at ratio {args.ratio} with variant {args.variant!r}")
    for record in targets:
        if all(results.has(mlflow_run_id=record["mlflow_run_id"], model=m) for m in ("student", "teacher")):
            print(f"[{label}] {record['category']} seed {record['seed']}: done")
            continue
        started_at, started = now_utc(), time.perf_counter()
        try:
            rows = measure_one(record, args.data_root)
        except TrackingError as error:  # a run logged to another machine's store
            print(f"[{label}] {record['category']} seed {record['seed']}: skipped, {error}")
            continue
        wall = time.perf_counter() - started
        for row in rows:
            results.append(row, started_at=started_at, wall_s=wall, skip_if_present=True)
            print(f"[{label}] {row['category']} seed {row['seed']} {row['model']}: {describe(row)}", flush=True)


def main() -> None:
    diagnose_records(__doc__, "map_regression_shift.json", "shift", measure, lambda row: (
        f"test-normal AUROC {row['test_normal_auroc']:.3f}, "
        + ", ".join(f"x{f:g} {row[f'brightness_auroc_{f:g}']:.3f}" for f in BRIGHTNESS)))


if __name__ == "__main__":
    main()
