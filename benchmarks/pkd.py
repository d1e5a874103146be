"""Benchmark: progressive GAN distillation (EDE-GAN teacher, GANomaly, P-KDGAN students).

One class normal, the nine others anomalous, the official test split (``protocol=all_others``)
of MNIST and Fashion-MNIST from ``../shared/data``. For every class and seed:

1. ``teacher`` (EDE-GAN) and ``ganomaly`` trained alone for ``--teacher-epochs``;
2. ``student_pkd``, ``student_one_step``, ``student_alone`` (the same student, same number of
   student batches) for ``--student-epochs``, starting from the saved teacher of step 1.

Optionally (``--batch-comparison-classes``) the teacher is also trained at batch size 1 and at
``--batch-size`` on the same number of images (``--batch-comparison-images``).

Fixed schedules only: no model or epoch is selected on the test split (validation is skipped).
Resumable: every finished run is appended to ``benchmarks/results/pkd_<dataset>.json`` at once,
and runs already there are skipped; teachers are cached under ``benchmarks/results/.cache/``.

    nohup .venv/bin/python benchmarks/pkd.py --datasets mnist fashion_mnist --classes 0-9 \\
        > /tmp/pkd.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import commit, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / ".cache" / "pkd"
FILE_NAMES = {"mnist": "pkd_mnist.json", "fashion_mnist": "pkd_fmnist.json"}
EXPERIMENTS = {"mnist": "pkd_mnist", "fashion_mnist": "pkd_fmnist"}
STUDENT_ROLES = ("student_pkd", "student_one_step", "student_alone")


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": []}


def append_record(path: Path, record: dict[str, Any], command: str) -> None:
    results = load_results(path)
    results["runs"].append(record)
    results["command"] = command
    results["commit"] = commit()
    results["machine"] = machine()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def record_key(record: dict[str, Any]) -> tuple:
    return (record["experiment"], record["dataset"], record["normal_class"], record["role"],
            record["batch_size"], record["seed"], record["images_seen"])


def compose(dataset: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from kd_experiments.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose(config_name="train", overrides=[f"experiment={EXPERIMENTS[dataset]}", *overrides],
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(CACHE / "run")
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_one(cfg, datamodule, epochs: int, save_teacher: Path | None = None) -> dict[str, Any]:
    """Fit the scheme of ``cfg`` for a fixed number of epochs, test it, return its figures."""
    import lightning as L

    from kd_experiments import config as kd_config

    L.seed_everything(int(cfg.seed), workers=True)
    model = kd_config.instantiate(cfg.scheme, input_shape=tuple(datamodule.input_shape))
    summary = model.compression_summary()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started
    if save_teacher is not None:
        state = {key: value for key, value in model.state_dict().items() if key.startswith("teacher_")}
        save_teacher.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state}, save_teacher)
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - started
    metrics = model.test_metrics
    return {
        "auroc": metrics["image_auroc"],
        "teacher_auroc": metrics.get("teacher_image_auroc"),
        "num_test_images": int(metrics["num_test_images"]),
        "params": int(summary["student_params"]),
        "macs": int(summary["student_macs"]),
        "teacher_params": int(summary["teacher_params"]),
        "teacher_macs": int(summary["teacher_macs"]),
        "compression_ratio": float(summary["compression_ratio"]),
        "mac_compression_ratio": float(summary["mac_compression_ratio"]),
        "student_spec": summary["student_spec"],
        "discriminator_resets": dict(model.discriminator_resets),
        "train_seconds": round(train_seconds, 1),
        "test_seconds": round(test_seconds, 1),
    }


def summary() -> str:
    """Markdown tables of the results files: the main table per set, then the batch comparison."""
    lines: list[str] = []
    roles = ("teacher", "ganomaly", "student_pkd", "student_one_step", "student_alone")
    for dataset, name in FILE_NAMES.items():
        runs = load_results(RESULTS / name)["runs"]
        main_runs = [r for r in runs if r["experiment"] == "main"]
        if not main_runs:
            continue
        by_class: dict[int, dict[str, float]] = {}
        sizes: dict[str, tuple] = {}
        for r in main_runs:
            by_class.setdefault(r["normal_class"], {})[r["role"]] = r["auroc"]
            sizes[r["role"]] = (r["params"], r["macs"], r["mac_compression_ratio"], r["batch_size"])
        complete = sorted(c for c, found in by_class.items() if all(role in found for role in roles))
        lines += [f"### {dataset} (`benchmarks/results/{name}`)", "",
                  "| normal class | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
        for normal_class in sorted(by_class):
            cells = [f"{by_class[normal_class][role]:.4f}" if role in by_class[normal_class] else "-" for role in roles]
            lines.append(f"| {normal_class} | " + " | ".join(cells) + " |")
        if complete:
            means = [sum(by_class[c][role] for c in complete) / len(complete) for role in roles]
            lines.append(f"| **mean of {len(complete)} complete classes** | "
                         + " | ".join(f"**{m:.4f}**" for m in means) + " |")
        lines += ["", "| role | generator params | generator MACs | MAC ratio vs teacher | batch size |",
                  "|---|---|---|---|---|"]
        for role in roles:
            if role in sizes:
                params, macs, ratio, batch_size = sizes[role]
                lines.append(f"| {role} | {params:,} | {macs:,} | {ratio:.1f} | {batch_size} |")
        lines.append("")
        comparison = [r for r in runs if r["experiment"] == "batch_comparison"]
        if comparison:
            lines += ["Batch size comparison (teacher, same images seen):", "",
                      "| normal class | batch size | images seen | optimiser steps | AUROC | train s |",
                      "|---|---|---|---|---|---|"]
            for r in sorted(comparison, key=lambda r: (r["normal_class"], r["batch_size"])):
                steps = r["epochs"] * -(-r["train_samples"] // r["batch_size"])
                lines.append(f"| {r['normal_class']} | {r['batch_size']} | {r['images_seen']} | {steps} | "
                             f"{r['auroc']:.4f} | {r['train_seconds']} |")
            lines.append("")
    return "\n".join(lines)


def parse_classes(text: str) -> list[int]:
    classes: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            classes += list(range(int(low), int(high) + 1))
        else:
            classes.append(int(part))
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=list(FILE_NAMES))
    parser.add_argument("--classes", default="0-9", help="e.g. 0-9 or 0,3,5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=1000, help="normal training images per class")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--mac-compression-ratio", type=float, default=100.0)
    parser.add_argument("--roles", nargs="+", default=["teacher", "ganomaly", *STUDENT_ROLES])
    parser.add_argument("--batch-comparison-classes", default="", help="MNIST classes for batch 1 vs --batch-size")
    parser.add_argument("--batch-comparison-images", type=int, default=1000, help="images seen by each teacher")
    parser.add_argument("--batch-comparison-first", action="store_true", help="run the comparison before the tables")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="print the Markdown tables of the results and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary())
        return

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    sys.path.insert(0, str(ROOT))
    from kd_experiments import config as kd_config

    script = Path(sys.argv[0]).resolve()
    command = "python " + " ".join([script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT)
                                    else sys.argv[0], *sys.argv[1:]])
    data_dir = Path(os.environ.get("KD_DATA_DIR", ROOT.parent / "shared" / "data"))
    RESULTS.mkdir(parents=True, exist_ok=True)

    def done_keys(dataset: str) -> set[tuple]:
        return {record_key(r) for r in load_results(RESULTS / FILE_NAMES[dataset])["runs"]}

    def datamodule_for(dataset: str, normal_class: int, cfg):
        datamodule = kd_config.instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule

    def base_overrides(dataset: str, normal_class: int, batch_size: int) -> list[str]:
        folder = "mnist" if dataset == "mnist" else "fashion_mnist"
        return [f"data.root={data_dir / folder}", f"data.normal_class={normal_class}",
                f"data.batch_size={batch_size}", f"data.max_train_samples={args.train_samples}",
                f"seed={args.seed}", f"scheme.mac_compression_ratio={args.mac_compression_ratio}"]

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    def tables() -> None:
        classes = parse_classes(args.classes)
        for normal_class in classes:  # interleave the sets, so both grow together
            for dataset in args.datasets:
                path = RESULTS / FILE_NAMES[dataset]
                done = done_keys(dataset)
                overrides = base_overrides(dataset, normal_class, args.batch_size)
                teacher_file = CACHE / f"{dataset}_c{normal_class}_b{args.batch_size}_n{args.train_samples}_e{args.teacher_epochs}_s{args.seed}.ckpt"
                datamodule = None
                for role in args.roles:
                    epochs = args.teacher_epochs if role in ("teacher", "ganomaly") else args.student_epochs
                    images_seen = epochs * args.train_samples
                    base = {"experiment": "main", "dataset": dataset, "normal_class": normal_class, "role": role,
                            "batch_size": args.batch_size, "seed": args.seed, "images_seen": images_seen}
                    need_teacher = role in STUDENT_ROLES and not teacher_file.is_file()
                    if record_key(base) in done and not (role == "teacher" and need_teacher):
                        continue
                    cfg = compose(dataset, overrides)
                    if datamodule is None:
                        datamodule = datamodule_for(dataset, normal_class, cfg)
                    if need_teacher:  # the teacher's record exists but its file is gone: retrain it
                        log(f"{dataset} c{normal_class}: retraining the cached teacher")
                        run_one(compose(dataset, [*overrides, "scheme.role=teacher"]), datamodule,
                                args.teacher_epochs, save_teacher=teacher_file)
                    extra = [f"scheme.role={role}"]
                    if role in STUDENT_ROLES:
                        extra += [f"scheme.teacher_checkpoint={teacher_file}", "scheme.score_teacher_at_test=false"]
                    cfg = compose(dataset, [*overrides, *extra])
                    log(f"{dataset} c{normal_class} {role}: {epochs} epochs of {args.train_samples} images")
                    figures = run_one(cfg, datamodule, epochs,
                                      save_teacher=teacher_file if role == "teacher" else None)
                    if record_key(base) in done:
                        continue
                    record = {**base, **figures, "epochs": epochs, "train_samples": args.train_samples}
                    append_record(path, record, command)
                    log(f"  auroc={record['auroc']:.4f} macs={record['macs']} "
                        f"mac_ratio={record['mac_compression_ratio']:.1f} ({record['train_seconds']} s train)")

    def batch_comparison() -> None:
        classes = parse_classes(args.batch_comparison_classes) if args.batch_comparison_classes else []
        dataset = "mnist"
        path = RESULTS / FILE_NAMES[dataset]
        for normal_class in classes:
            for batch_size in (1, args.batch_size):
                images = args.batch_comparison_images
                epochs = max(1, round(images / args.train_samples))
                base = {"experiment": "batch_comparison", "dataset": dataset, "normal_class": normal_class,
                        "role": "teacher", "batch_size": batch_size, "seed": args.seed,
                        "images_seen": epochs * args.train_samples}
                if record_key(base) in done_keys(dataset):
                    continue
                overrides = base_overrides(dataset, normal_class, batch_size)
                cfg = compose(dataset, [*overrides, "scheme.role=teacher", "data.eval_batch_size=500"])
                datamodule = datamodule_for(dataset, normal_class, cfg)
                log(f"batch comparison {dataset} c{normal_class} batch {batch_size}: {epochs} epochs")
                figures = run_one(cfg, datamodule, epochs)
                append_record(path, {**base, **figures, "epochs": epochs, "train_samples": args.train_samples},
                              command)
                log(f"  auroc={figures['auroc']:.4f} ({figures['train_seconds']} s train)")

    if args.batch_comparison_first:
        batch_comparison()
        tables()
    else:
        tables()
        batch_comparison()
    log("done")


if __name__ == "__main__":
    main()
