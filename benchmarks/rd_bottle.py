"""RD, RD with Expert and the PatchCore-style scheme on MVTec AD bottle (CPU, package weights).

Writes ``benchmarks/results/rd_bottle.json``: ``runs``, one flat record per finished
run with its own provenance (:mod:`benchmarks.harness`). Resumable: every finished record is
appended at once, and records already in the file (same scheme, ratio, seed, image
size, epochs, width floor; coreset fraction for the memory bank) are skipped, so the
script can run in pieces, in the background::

    nohup .venv/bin/python -m benchmarks.rd_bottle > logs/benchmarks/rd_bottle.log 2>&1 &

Runs, most important first: the PatchCore-style scheme, RD and RD with Expert at full
width (seed 0), both at ratio 16, then ratios 4 and 64, then seeds 1 and 2. Every run goes
through ``kd_experiments.train.train`` (the ``kd-train`` code path, logged to MLflow) with
a config composed from ``experiment=rd_bottle`` / ``rd_expert_bottle`` /
``patchcore_bottle`` and this benchmark's settings; RD runs have a fixed epoch budget and
their final weights are tested, nothing is selected on the test split. The student width
floor is ``--min-channels`` (12, chosen on validation images by
``benchmarks.rd_bottle_budget``); records without a ``min_channels`` field were made at
floor 2, before the floor was a setting, and are kept apart in the table.

``patchcore`` rows are ``scheme=patchcore`` (Roth et al., CVPR 2022: a memory bank of the
same encoder's patch features, ``--knn-coreset`` of them kept by greedy coreset
selection, nearest-neighbour distance maps smoothed like RD's). ``knn`` rows are the
records of the same method as this benchmark ran it before the scheme existed (three
levels 3x3 average-pooled, resized to the middle level, every training patch, no MLflow
run); they stay in the file and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.harness import ROOT, ResultsFile, base_parser, compose
from kd_experiments.schemes.reverse_distillation.torch_model import DEFAULT_MIN_CHANNELS

#: ``scheme.min_channels`` of the records without the field (made before the floor was a setting).
LEGACY_MIN_CHANNELS = 2
#: Memory-bank schemes: ``patchcore`` (the scheme) and ``knn`` (the records of the probe this
#: benchmark ran before the scheme existed: same method, without its MLflow run).
NEAREST_NEIGHBOUR = ("knn", "patchcore")


def mvtec_root(args: argparse.Namespace) -> Path:
    """The folder holding ``bottle/``: ``--data``, else ``<data root>/mvtec_ad``."""
    return args.data if getattr(args, "data", None) is not None else args.data_root / "mvtec_ad"


def add_mvtec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="folder holding bottle/ (default: <data root>/mvtec_ad)")


# ----------------------------------------------------------------------------- RD runs


def logged_metrics(tag_value: str, experiment_name: str) -> dict:
    """The last logged value of every metric of the MLflow run tagged ``benchmark_run``.

    ``train()`` returns the metrics Lightning still holds after testing (``test/*``);
    training throughput and losses are read back from the run itself.
    """
    from kd_experiments.tracking import make_client, resolve_tracking_uri

    client = make_client(resolve_tracking_uri(None, ROOT))
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.benchmark_run = '{tag_value}'")
    if not runs:
        return {}
    return {**runs[0].data.metrics, "run_id": runs[0].info.run_id}


def experiment_of(scheme: str) -> str:
    return "rd_bottle" if scheme == "rd" else "rd_expert_bottle"


def rd_overrides(scheme: str, ratio: float, seed: int, args: argparse.Namespace, tag: str, purpose: str,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """The ``kd-train`` overrides of one benchmark run (the setting of this file's docstring)."""
    blur_sigma = getattr(args, "blur_sigma", None)
    min_channels = getattr(args, "min_channels", None)
    floor = (f"scheme.min_channels={min_channels}",) if min_channels is not None else ()
    return [
        f"experiment={experiment_of(scheme)}",
        f"data.root={mvtec_root(args)}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"scheme.compression_ratio={ratio}",
        f"scheme.blur_sigma={blur_sigma if blur_sigma is not None else 4.0 * args.image_size / 256}",
        f"seed={seed}",
        *floor,
        *extra,
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_model_summary=false",
        f"+tags.purpose={purpose}",
        f"+tags.benchmark_run={tag}",
    ]


def _new_floor(args: argparse.Namespace) -> int | None:
    """``--min-channels`` unless it is the legacy floor (whose records carry no field)."""
    min_channels = getattr(args, "min_channels", None)
    return None if min_channels in (None, LEGACY_MIN_CHANNELS) else min_channels


def floor_suffix(args: argparse.Namespace) -> str:
    """Run-folder suffix of a floor other than the legacy one (``-min12``)."""
    floor = _new_floor(args)
    return "" if floor is None else f"-min{floor}"


def floor_key(args: argparse.Namespace) -> dict:
    """The results-key part of the width floor: absent for the legacy floor (older records have none)."""
    floor = _new_floor(args)
    return {} if floor is None else {"min_channels": floor}


def run_rd(scheme: str, ratio: float, seed: int, args: argparse.Namespace, extra: tuple[str, ...] = (),
           name_suffix: str = "") -> dict:
    """Train and test one RD run through ``kd-train``'s code path; ``extra``: more overrides."""
    from kd_experiments import config as kd_config
    from kd_experiments.train import train

    name_suffix = floor_suffix(args) + name_suffix
    run_dir = ROOT / "logs" / "benchmarks" / f"{experiment_of(scheme)}-cr{ratio:g}-s{seed}-{args.image_size}px{name_suffix}"
    tag = f"{run_dir.name}-{os.getpid()}-{time.time_ns()}"
    cfg = compose(rd_overrides(scheme, ratio, seed, args, tag, "benchmark", extra), output_dir=run_dir)
    started = time.perf_counter()
    metrics = train(cfg)
    train_test_s = time.perf_counter() - started
    logged = logged_metrics(cfg.tags.benchmark_run, str(cfg.experiment_name))
    scheme_module = kd_config.instantiate(cfg.scheme, input_shape=(3, args.image_size, args.image_size))
    summary = scheme_module.compression_summary()
    return {
        "image_auroc": metrics["test/image_auroc"],
        "pixel_auroc": metrics["test/pixel_auroc"],
        "aupro": metrics["test/aupro"],
        "student_params": int(summary["student_params"]),
        "deployed_params": int(summary["deployed_params"]),
        "student_macs": int(summary["student_macs"]),
        "deployed_macs": int(summary["deployed_macs"]),
        "measured_compression_ratio": summary["compression_ratio"],
        "width_multiplier": summary["width_multiplier"],
        "min_channels": int(summary["min_channels"]),
        "train_images_per_s": logged.get("train/images_per_s"),
        "infer_images_per_s": metrics.get("test/images_per_s"),
        "final_train_loss": logged.get("train/loss"),
        "final_val_loss": logged.get("val/loss"),
        "final_val_pixel_loss": logged.get("val/pixel_loss"),
        "mlflow_run_id": logged.get("run_id"),
        "blur_sigma": float(cfg.scheme.blur_sigma),
        "train_test_s": train_test_s,
    }


# ---------------------------------------------------------------------- PatchCore-style scheme


def run_patchcore(args: argparse.Namespace) -> dict:
    """Build and test ``scheme=patchcore`` (``experiment=patchcore_bottle``) through ``kd-train``'s code path
    at this benchmark's size and smoothing; ``--knn-coreset`` is its ``scheme.coreset_fraction``."""
    from kd_experiments import config as kd_config
    from kd_experiments.train import train

    run_dir = ROOT / "logs" / "benchmarks" / f"patchcore_bottle-c{args.knn_coreset:g}-{args.image_size}px"
    tag = f"{run_dir.name}-{os.getpid()}-{time.time_ns()}"
    blur_sigma = args.blur_sigma if args.blur_sigma is not None else 4.0 * args.image_size / 256
    cfg = compose([
        "experiment=patchcore_bottle",
        f"data.root={mvtec_root(args)}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"scheme.coreset_fraction={args.knn_coreset}",
        f"scheme.blur_sigma={blur_sigma}",
        "seed=0",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_model_summary=false",
        "+tags.purpose=benchmark",
        f"+tags.benchmark_run={tag}",
    ], output_dir=run_dir)
    metrics = train(cfg)
    logged = logged_metrics(tag, str(cfg.experiment_name))
    summary = kd_config.instantiate(cfg.scheme, input_shape=(3, args.image_size, args.image_size)).compression_summary()
    bank_bytes = logged.get("memory_bank_bytes")
    return {
        "image_auroc": metrics["test/image_auroc"],
        "pixel_auroc": metrics["test/pixel_auroc"],
        "aupro": metrics["test/aupro"],
        "student_params": 0,
        "deployed_params": int(summary["deployed_params"]),
        "deployed_macs": int(summary["deployed_macs"]),
        "memory_bank_patches": int(logged["memory_bank_patches"]) if "memory_bank_patches" in logged else None,
        "memory_bank_dims": int(summary["embedding_dim"]),
        "memory_bank_bytes": int(bank_bytes) if bank_bytes is not None else None,
        "coreset_fraction": args.knn_coreset,
        "blur_sigma": float(cfg.scheme.blur_sigma),
        "train_images_per_s": logged.get("train/images_per_s"),
        "infer_images_per_s": metrics.get("test/images_per_s"),
        "mlflow_run_id": logged.get("run_id"),
    }


# ----------------------------------------------------------------------------------- plan

PLAN: list[tuple[str, float | None, int]] = [
    ("patchcore", None, 0),
    ("rd", 1, 0),
    ("rd_expert", 1, 0),
    ("rd", 16, 0),
    ("rd_expert", 16, 0),
    ("rd", 4, 0),
    ("rd", 64, 0),
    ("rd", 1, 1),
    ("rd", 1, 2),
    ("rd_expert", 4, 0),
    ("rd_expert", 64, 0),
    ("rd_expert", 1, 1),
    ("rd_expert", 1, 2),
    # seeds 1 and 2 at the other ratios too (one seed left the ratio-64 comparison inside
    # seed noise), so every group is a 3-seed mean.
    *[(scheme, ratio, seed) for ratio in (64, 16, 4) for scheme in ("rd", "rd_expert") for seed in (1, 2)],
]


def markdown_table(path: Path) -> str:
    """The records of a results file as a Markdown table; full-width seeds as mean +- std."""
    import statistics

    runs = json.loads(path.read_text())["runs"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        bank = run["scheme"] in NEAREST_NEIGHBOUR
        key = (run["scheme"], run.get("compression_ratio"), run.get("image_size"), run.get("epochs"),
               None if bank else run.get("min_channels", LEGACY_MIN_CHANNELS),
               run.get("coreset_fraction", 1.0) if bank else None)
        groups.setdefault(key, []).append(run)

    def cell(values: list[float], digits: int = 4) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"

    lines = [
        ("| scheme | ratio (measured) | px | epochs | min channels | seeds | image AUROC | pixel AUROC | AUPRO "
         "| student params | deployed params | deployed MMACs | train img/s | infer img/s | memory bank |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"knn": 0, "patchcore": 1, "rd": 2, "rd_expert": 3}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k[1] or 0, k[2] or 0, k[3] or 0, k[4] or 0,
                                            -(k[5] or 0))):
        rows = groups[key]
        scheme, ratio, size, epochs, floor, coreset = key
        measured = rows[0].get("measured_compression_ratio")
        ratio_text = "-" if ratio is None else f"{ratio:g} ({measured:.1f})" if measured else f"{ratio:g}"
        if coreset not in (None, 1.0):
            ratio_text = f"coreset {coreset:g}"
        bank = rows[0].get("memory_bank_bytes")
        lines.append(
            f"| {scheme} | {ratio_text} | {size} | {epochs or '-'} | {floor or '-'} "
            f"| {','.join(str(r['seed']) for r in rows)} "
            f"| {cell([r['image_auroc'] for r in rows])} | {cell([r['pixel_auroc'] for r in rows])} "
            f"| {cell([r['aupro'] for r in rows])} | {rows[0]['student_params']:,} | {rows[0]['deployed_params']:,} "
            f"| {rows[0].get('deployed_macs', 0) / 1e6:.0f} "
            f"| {cell([r['train_images_per_s'] for r in rows if r.get('train_images_per_s')], 1)} "
            f"| {cell([r['infer_images_per_s'] for r in rows if r.get('infer_images_per_s')], 1)} "
            f"| {f'{bank / 2**20:.1f} MiB' if bank else '-'} |"
        )
    return "\n".join(lines)


def use_project_mlflow_store() -> None:
    """Log benchmark runs to the project's store (``./mlruns/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` says otherwise."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    (ROOT / "mlruns").mkdir(exist_ok=True)


def main() -> None:
    parser = base_parser(__doc__, output="rd_bottle.json")
    add_mvtec_arguments(parser)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=35,
                        help="fixed budget (35: chosen on validation by benchmarks.rd_bottle_budget; "
                             "the earliest records used 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blur-sigma", type=float, default=None,
                        help="map smoothing; default: the paper's 4 at 256 px, scaled to the image size")
    parser.add_argument("--min-channels", type=int, default=DEFAULT_MIN_CHANNELS,
                        help=f"scheme.min_channels, the floor of every student width (default {DEFAULT_MIN_CHANNELS}; "
                             f"records without the field used {LEGACY_MIN_CHANNELS})")
    parser.add_argument("--knn-coreset", type=float, default=1.0,
                        help="scheme.coreset_fraction of the PatchCore-style memory bank (1 = all patches)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these plan entries, as scheme:ratio:seed (e.g. rd:16:0 patchcore::0; "
                             "knn::0 is patchcore::0)")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    results = ResultsFile(args.output)
    plan = PLAN
    if args.only is not None:
        wanted = {entry.replace("knn::", "patchcore::") for entry in args.only}
        plan = [entry for entry in PLAN if f"{entry[0]}:{'' if entry[1] is None else f'{entry[1]:g}'}:{entry[2]}" in wanted]
    for scheme, ratio, seed in plan:
        key = {"scheme": scheme, "compression_ratio": ratio, "seed": seed, "image_size": args.image_size}
        if scheme in NEAREST_NEIGHBOUR:
            key["coreset_fraction"] = args.knn_coreset
        else:
            key["epochs"] = args.epochs
            key.update(floor_key(args))
        if results.has(key):
            print(f"[rd_bottle] skip {key} (done)", flush=True)
            continue
        print(f"[rd_bottle] run {key}", flush=True)
        with results.record(key) as record:
            record.update(run_patchcore(args) if scheme in NEAREST_NEIGHBOUR else run_rd(scheme, float(ratio), seed, args))
            record.update({"device": "cpu", "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
                           "backbone": "tf_efficientnet_lite0", "weights": "package"})
        print(f"[rd_bottle] done {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    main()
