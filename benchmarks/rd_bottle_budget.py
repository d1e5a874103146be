"""Epoch budget of RD and RD with Expert on MVTec AD bottle, chosen on validation data only.

Writes ``benchmarks/results/rd_bottle_budget.json``: one record per (scheme, ratio, seed,
epoch) with the validation figures of that epoch and its provenance
(:mod:`benchmarks.harness`). The validation split is the 10 % of *training* images that
``MVTecDataModule`` holds out (all normal); the scheme pastes the same synthetic
anomalies (Perlin masks, procedural and in-set textures, see
``kd_experiments.schemes.reverse_distillation.synthetic_anomalies``) into them every
epoch and logs ``val/synthetic_pixel_auroc`` and ``val/synthetic_image_auroc``. The
test split is never scored (``test=false``), so the budget chosen from this file is
not selected on test data.

Same setting as ``benchmarks.rd_bottle`` (128 px, batch 8, sigma 2, lite0 with
package weights, one thread), longer runs (``--epochs``, 40 by default); resumable
(one (scheme, ratio, seed) run at a time; runs already in the file are skipped)::

    nohup .venv/bin/python -m benchmarks.rd_bottle_budget > logs/benchmarks/rd_bottle_budget.log 2>&1 &
    .venv/bin/python -m benchmarks.rd_bottle_budget --table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import ROOT, ResultsFile, base_parser, compose, now_utc
from benchmarks.rd_bottle import (
    LEGACY_MIN_CHANNELS,
    add_mvtec_arguments,
    experiment_of,
    floor_key,
    floor_suffix,
    rd_overrides,
    use_project_mlflow_store,
)

METRICS = ("val/synthetic_pixel_auroc", "val/synthetic_image_auroc", "val/loss", "train/loss", "val/pixel_loss",
           "val/pixel_loss_level0", "val/pixel_loss_level1", "val/pixel_loss_level2")


def history(tag_value: str, experiment_name: str) -> dict[int, dict[str, float]]:
    """Per-epoch values of :data:`METRICS` of the MLflow run tagged ``benchmark_run``."""
    from kd_experiments.tracking import make_client, resolve_tracking_uri

    client = make_client(resolve_tracking_uri(None, ROOT))
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.benchmark_run = '{tag_value}'")
    if not runs:
        raise RuntimeError(f"no MLflow run tagged benchmark_run={tag_value}")
    run_id = runs[0].info.run_id
    epochs: dict[int, dict[str, float]] = {}
    steps: dict[int, int] = {}
    for point in client.get_metric_history(run_id, "epoch"):
        steps[point.step] = int(point.value)
    for name in METRICS:
        for point in client.get_metric_history(run_id, name):
            epoch = steps.get(point.step)
            if epoch is None:
                continue
            epochs.setdefault(epoch + 1, {})[name] = point.value
    return epochs


def run_one(scheme: str, ratio: float, seed: int, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    from kd_experiments.train import train

    run_dir = ROOT / "logs" / "benchmarks" / f"budget-{experiment_of(scheme)}-cr{ratio:g}-s{seed}{floor_suffix(args)}"
    tag = f"{run_dir.name}-{os.getpid()}-{time.time_ns()}"
    extra = ("++scheme.val_synthetic_anomalies=true", "test=false", "trainer.num_sanity_val_steps=0")
    train(compose(rd_overrides(scheme, ratio, seed, args, tag, "budget", extra), output_dir=run_dir))
    return history(tag, experiment_of(scheme))


def table(path: Path) -> str:
    runs = json.loads(path.read_text())["runs"]
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for run in runs:
        group = (run["scheme"], run["compression_ratio"], run.get("min_channels", LEGACY_MIN_CHANNELS),
                 run["max_epochs"])
        groups.setdefault(group, {}).setdefault(run["epoch"], []).append(run)
    lines = ["| scheme | ratio | min channels | run of | epoch | seeds | val synthetic pixel AUROC "
             "| val synthetic image AUROC | val loss | val pixel loss (levels 0 / 1 / 2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (scheme, ratio, floor, max_epochs), by_epoch in sorted(groups.items()):
        for epoch in sorted(by_epoch):
            if epoch not in (1, 5, 10, 15, 20, 25, 30, 35, 40) and epoch != max(by_epoch):
                continue
            rows = by_epoch[epoch]

            def mean(key: str, rows=rows) -> str:
                values = [r[key] for r in rows if r.get(key) is not None]
                return f"{statistics.mean(values):.4f}" if values else "-"

            levels = " / ".join(mean(f"val_pixel_loss_level{level}") for level in range(3))
            pixel = "-" if mean("val_pixel_loss") == "-" else f"{mean('val_pixel_loss')} ({levels})"
            lines.append(f"| {scheme} | {ratio:g} | {floor} | {max_epochs} | {epoch} | {','.join(str(r['seed']) for r in rows)} "
                         f"| {mean('val_synthetic_pixel_auroc')} | {mean('val_synthetic_image_auroc')} "
                         f"| {mean('val_loss')} | {pixel} |")
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__, output="rd_bottle_budget.json")
    add_mvtec_arguments(parser)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--runs", nargs="+", default=["rd:1:0", "rd:64:0", "rd_expert:1:0", "rd_expert:64:0"],
                        help="scheme:ratio:seed entries")
    parser.add_argument("--min-channels", type=int, default=LEGACY_MIN_CHANNELS,
                        help=f"scheme.min_channels (default {LEGACY_MIN_CHANNELS}, the floor of the epoch-budget "
                             "study; the floor study passed 2, 8 and 12)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(args.output))
        return
    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    results = ResultsFile(args.output)
    for entry in args.runs:
        scheme, ratio_text, seed_text = entry.split(":")
        ratio, seed = float(ratio_text), int(seed_text)
        key = {"scheme": scheme, "compression_ratio": ratio, "seed": seed, "image_size": args.image_size,
               "max_epochs": args.epochs, **floor_key(args)}
        if results.has(key):
            print(f"[rd_bottle_budget] skip {key} (done)", flush=True)
            continue
        print(f"[rd_bottle_budget] run {key}", flush=True)
        started_at, started = now_utc(), time.perf_counter()
        epochs = run_one(scheme, ratio, seed, args)
        wall = time.perf_counter() - started
        for epoch, values in sorted(epochs.items()):
            results.append({**key, "epoch": epoch, **{k.replace("/", "_"): v for k, v in values.items()},
                            "run_wall_s": wall, "device": "cpu", "torch_threads": torch.get_num_threads()},
                           started_at=started_at, wall_s=wall)
        print(f"[rd_bottle_budget] done {key}: {len(epochs)} epochs in {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
