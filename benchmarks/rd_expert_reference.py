"""What RD with Expert's map compares: the trained teacher (as deployed) or the frozen expert.

RD with Expert (Liu et al., AAAI 2025, "Unlocking the Potential of Reverse Distillation";
:mod:`kd_experiments.schemes.reverse_distillation`) trains its teacher encoder away from the
frozen expert on synthetic anomalies, and its student towards the *normal* features of both.
The deployed map, as in URD's code, is ``1 - cos`` between the student and the trained teacher.
Where the teacher has drifted from the expert on normal images, the student, which follows
both, cannot match it, and the map is high on normal pixels.

For each RD with Expert test record of ``benchmarks/results/mvtec.json`` whose checkpoint is in
this checkout (``logs/benchmarks/mvtec/<entry>/checkpoints/last.ckpt``), this benchmark scores
the category's test split three times with the same student: against the trained teacher (the
deployed map; its figures equal the record's), against the frozen expert, and through the
trained teacher given the expert's BatchNorm running statistics (``teacher_expert_bn``: its
weights as trained, its normalisation as the expert's; the student reads and is compared with
that teacher). The third separates the drift that training's batch statistics cause (the
teacher's BatchNorm layers update their running statistics on normal and synthetic-anomaly
batches, as in URD's code) from the drift of its weights. Per reference: ``image_auroc``,
``pixel_auroc``, ``aupro``; beside them the drift, the mean ``1 - cos`` between the reference
teacher's and the expert's features on the test split's good images, per encoder level (the
trained teacher's for the first two references).

One record per (record's MLflow run, reference) in ``benchmarks/results/rd_expert_reference.json``
with the per-record provenance of :mod:`benchmarks.harness`; resumable. It reads the test split
to explain recorded results: nothing here selects a model or a setting, and the deployed map
stays URD's.

    python -m benchmarks.rd_expert_reference
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, ResultsFile, base_parser, compose, now_utc

SCHEME_TARGET = "kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme"
REFERENCES = ("teacher", "expert", "teacher_expert_bn")
TITLES = {"teacher": "trained teacher (deployed)", "expert": "frozen expert",
          "teacher_expert_bn": "trained teacher, expert's BatchNorm statistics"}
BATCH = 8


def checkpoint_of(record: dict[str, Any]) -> Path:
    """The run folder's ``last.ckpt`` of an RD with Expert record (``benchmarks.mvtec`` names it)."""
    from benchmarks.mvtec import Entry

    entry = Entry(record["scheme"], record["category"], float(record["compression_ratio"]), int(record["seed"]),
                  foreground=record.get("synthetic_foreground"))
    return ROOT / "logs" / "benchmarks" / "mvtec" / entry.name.replace("/", "-") / "checkpoints" / "last.ckpt"


def measure(record: dict[str, Any], data_root: Path) -> list[dict[str, Any]]:
    """Every reference's figures on the record's test split, and each reference teacher's drift from the expert."""
    import torch
    import torch.nn.functional as F

    from kd_experiments import metrics
    from kd_experiments.anomaly_maps import anomaly_map, image_scores
    from kd_experiments.checkpoints import load_scheme
    from kd_experiments.export import run_datamodule

    scheme = load_scheme(SCHEME_TARGET, checkpoint_of(record))
    swapped = with_batchnorm_statistics_of(scheme.encoder, scheme.expert)
    config = compose(["experiment=rd_expert_mvtec", f"data.root={data_root / 'mvtec_ad'}",
                      f"data.category={record['category']}", f"data.image_size={record['image_size']}"])
    dataset = run_datamodule(config).test_dataset
    maps = {reference: [] for reference in REFERENCES}
    masks, labels = [], []
    drift: dict[str, list] = {"teacher": [], "teacher_expert_bn": []}

    def level_drift(features, expert, good):
        return torch.stack([(1 - F.cosine_similarity(t[good], e[good], dim=1)).flatten(1).mean(1)
                            for t, e in zip(features, expert, strict=True)], dim=1)

    with torch.no_grad():
        for start in range(0, len(dataset), BATCH):
            items = [dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]
            images = torch.stack([item["image"] for item in items]).float()
            teacher, expert, teacher_bn = scheme.encoder(images), scheme.expert(images), swapped(images)
            student = scheme.student(teacher)
            for reference, inputs, features in (("teacher", student, teacher), ("expert", student, expert),
                                                ("teacher_expert_bn", scheme.student(teacher_bn), teacher_bn)):
                maps[reference].append(anomaly_map(inputs, features, images.shape[-2:], scheme.hparams.blur_sigma,
                                                   scheme.hparams.map_mode))
            good = torch.tensor([int(item["label"]) == 0 for item in items])
            if good.any():
                drift["teacher"].append(level_drift(teacher, expert, good))
                drift["teacher_expert_bn"].append(level_drift(teacher_bn, expert, good))
            masks.append(torch.stack([item["mask"] for item in items]).float().reshape(len(items), *images.shape[-2:]))
            labels += [int(item["label"]) for item in items]
    masks_all = torch.cat(masks).numpy() > 0.5
    levels = {name: torch.cat(values).mean(0).tolist() if values else [] for name, values in drift.items()}
    common = {"scheme": record["scheme"], "category": record["category"], "image_size": record["image_size"],
              "compression_ratio": record["compression_ratio"], "seed": record["seed"],
              "synthetic_foreground": record.get("synthetic_foreground"), "mlflow_run_id": record["mlflow_run_id"],
              "epochs": record.get("epochs"), "test_images": len(labels),
              "teacher_expert_drift_per_level": levels["teacher"],
              "recorded": [record["image_auroc"], record.get("pixel_auroc"), record.get("aupro")]}
    rows = []
    for reference in REFERENCES:
        reference_maps = torch.cat(maps[reference])
        extra = ({"reference_expert_drift_per_level": levels["teacher_expert_bn"]}
                 if reference == "teacher_expert_bn" else {})
        rows.append({**common, **extra, "reference": reference,
                     "image_auroc": metrics.image_auroc(image_scores(reference_maps), labels),
                     "pixel_auroc": metrics.pixel_auroc(reference_maps.numpy(), masks_all),
                     "aupro": metrics.aupro(reference_maps.numpy(), masks_all)})
    return rows


def with_batchnorm_statistics_of(encoder, expert):
    """A copy of ``encoder`` whose BatchNorm running statistics are ``expert``'s (same architecture),
    in eval mode; its weights, BatchNorm affine parameters included, stay ``encoder``'s."""
    import copy

    import torch

    swapped = copy.deepcopy(encoder).eval()
    reference = dict(expert.named_modules())
    replaced = 0
    for name, module in swapped.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            source = reference[name]
            module.running_mean.copy_(source.running_mean)
            module.running_var.copy_(source.running_var)
            replaced += 1
    if replaced == 0:
        raise ValueError("the teacher encoder has no BatchNorm layer with running statistics to replace")
    return swapped


def table(path: Path) -> str:
    """Markdown: per record, every reference's figures and its teacher's drift from the expert."""
    runs = ResultsFile(path).runs if path.exists() else []
    lines = ["| category | ratio | seed | synthetic anomalies | map against | image AUROC | pixel AUROC | AUPRO "
             "| teacher-expert 1 - cos on good test images, levels 1-3 (the row's teacher) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["category"], float(r["compression_ratio"]), r["seed"],
                                           str(r.get("synthetic_foreground")), REFERENCES.index(r["reference"]))):
        drift = " / ".join(f"{value:.3f}" for value in run.get("reference_expert_drift_per_level",
                                                              run["teacher_expert_drift_per_level"]))
        reference = TITLES[run["reference"]]
        lines.append(f"| {run['category']} | {float(run['compression_ratio']):g} | {run['seed']} "
                     f"| {run.get('synthetic_foreground') or 'anywhere'} "
                     f"| {reference} | {run['image_auroc']:.4f} | {run['pixel_auroc']:.4f} | {run['aupro']:.4f} "
                     f"| {drift} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = base_parser(__doc__, output="rd_expert_reference.json")
    parser.add_argument("--categories", nargs="+", default=None, help="only these categories (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = ResultsFile(args.output, key_fields=("mlflow_run_id", "reference"))
    source = ResultsFile(RESULTS / "mvtec.json")
    targets = [r for r in source.runs if r.get("scheme") == "rd_expert" and r.get("device", "cpu") == "cpu"
               and (args.categories is None or r["category"] in args.categories)]
    for record in targets:
        name = f"{record['category']} ratio {record['compression_ratio']:g} seed {record['seed']}"
        if all(results.has(mlflow_run_id=record["mlflow_run_id"], reference=r) for r in REFERENCES):
            print(f"[rd_expert_reference] {name}: done", flush=True)
            continue
        if not checkpoint_of(record).is_file():
            print(f"[rd_expert_reference] {name}: skipped, no checkpoint {checkpoint_of(record)}", flush=True)
            continue
        started_at, started = now_utc(), time.perf_counter()
        rows = measure(record, args.data_root)
        wall = time.perf_counter() - started
        for row in rows:
            results.append(row, started_at=started_at, wall_s=wall, skip_if_present=True)
            print(f"[rd_expert_reference] {name} ({row['synthetic_foreground'] or 'anywhere'}) against the "
                  f"{row['reference']}: {row['image_auroc']:.4f} / {row['pixel_auroc']:.4f} / {row['aupro']:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
