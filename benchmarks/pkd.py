"""Benchmark: progressive GAN distillation (EDE-GAN teacher, GANomaly, P-KDGAN students).

One class normal, the nine others anomalous, the official test split (``protocol=all_others``)
of MNIST and Fashion-MNIST from ``../shared/data``. For every class and seed:

1. ``teacher`` (EDE-GAN) and ``ganomaly`` trained alone for ``--teacher-epochs``;
2. ``student_pkd``, ``student_one_step``, ``student_alone`` (the same student, same number of
   student batches) for ``--student-epochs``, starting from the saved teacher of step 1.

Optionally (``--batch-comparison-classes``) the teacher is also trained at batch size 1 and at
``--batch-size`` on the same number of images (``--batch-comparison-images``).

No model or epoch is selected on the test split. Two protocols (``--experiment``):

- ``main``: a fixed schedule, the last epoch is tested (validation is skipped);
- ``val_selected`` (``--select-on-validation``): after every epoch the run's score is measured
  on a *validation* set drawn from the training split only (the held-out normal images and as
  many training images of the other nine classes: ``data.val_anomalies=other_classes``), and the
  epoch with the highest validation AUROC is tested (and, for the teacher, distilled from).
  Every role gets the same rule, so the comparisons stay fair. GAN training is noisy from
  epoch to epoch (``benchmarks/results/pkd_budget.json``), which a fixed last epoch suffers
  from most.

Student settings (``--set scheme.KEY=VALUE``) give a protocol of their own (``--experiment``);
its students learn from the cached teacher of the protocol named by ``--teacher-experiment``,
whose teacher and GANomaly rows the summary then shows beside them (records carry
``settings`` and ``teacher_experiment``)::

    .venv/bin/python -m benchmarks.pkd --datasets mnist --classes 0-9 --train-samples 0 --teacher-epochs 8 \\
        --student-epochs 10 --batch-size 64 --select-on-validation --experiment val_selected_student_lr \\
        --teacher-experiment val_selected --roles student_pkd student_one_step student_alone \\
        --set scheme.student_learning_rate=1e-3

Resumable: every finished run is appended to ``benchmarks/results/pkd_<dataset>.json`` at once,
and runs already there are skipped; teachers are cached under ``benchmarks/results/.cache/``.

    nohup .venv/bin/python -m benchmarks.pkd --datasets mnist fashion_mnist --classes 0-9 \\
        > /tmp/pkd.log 2>&1 &
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS, ResultsFile, base_parser, now_utc
from benchmarks.harness import compose as compose_train

CACHE = RESULTS / ".cache" / "pkd"
FILE_NAMES = {"mnist": "pkd_mnist.json", "fashion_mnist": "pkd_fmnist.json"}
EXPERIMENTS = {"mnist": "pkd_mnist", "fashion_mnist": "pkd_fmnist"}
STUDENT_ROLES = ("student_pkd", "student_one_step", "student_alone")
ROLES = ("teacher", "ganomaly", *STUDENT_ROLES)


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": []}


def validation_auroc(module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of ``module.score_batch`` on the labelled validation split (the datamodule's, with
    ``data.val_anomalies=other_classes``: held-out normal training images and as many training
    images of the other classes; no test image). Leaves the module in train mode."""
    from kd_experiments import metrics as kd_metrics

    module.eval()
    with torch.no_grad():
        scores = torch.cat([module.score_batch({"image": chunk})["score"] for chunk in images.split(500)])
    module.train()
    return kd_metrics.image_auroc(scores, labels)


def scheme_settings(overrides: list[str]) -> str | None:
    """``--set`` overrides checked (``scheme.KEY=VALUE`` only), as the label records carry."""
    for override in overrides:
        if not override.startswith("scheme.") or "=" not in override:
            raise SystemExit(f"--set takes scheme.KEY=VALUE overrides, got {override!r}")
    return " ".join(sorted(overrides)) or None


def record_key(record: dict[str, Any]) -> tuple:
    return (record["experiment"], record["dataset"], record["normal_class"], record["role"],
            record["batch_size"], record["seed"], record["images_seen"])


# Settings the recorded protocols ran with, pinned here so that a later change of the
# experiment configs' defaults (e.g. configs/experiment/pkd_mnist.yaml's student learning
# rate) does not change what a protocol's command runs; ``--set`` overrides them.
PROTOCOL_PINS = {"scheme.student_learning_rate": "null"}


def compose(dataset: str, overrides: list[str]):
    """The ``kd-train`` config of ``experiment=pkd_<dataset>`` with the protocol pins and ``overrides``."""
    given = {override.split("=", 1)[0] for override in overrides}
    pins = [f"{key}={value}" for key, value in PROTOCOL_PINS.items() if key not in given]
    return compose_train([f"experiment={EXPERIMENTS[dataset]}", *pins, *overrides], output_dir=CACHE / "run")


def run_one(cfg, datamodule, epochs: int, save_teacher: Path | None = None,
            validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fit the scheme of ``cfg`` for ``epochs``, test it, return its figures.

    With ``validation`` (images, labels), the epoch of highest validation AUROC is restored
    before testing (and saving the teacher); otherwise the last epoch is tested."""
    import copy

    import lightning as L

    from kd_experiments import config as kd_config

    L.seed_everything(int(cfg.seed), workers=True)
    model = kd_config.instantiate(cfg.scheme, input_shape=tuple(datamodule.input_shape))
    summary = model.compression_summary()
    best: dict[str, Any] = {"epoch": 0, "auroc": float("-inf"), "state": None, "curve": []}

    class SelectOnValidation(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            auroc = validation_auroc(pl_module, *validation)
            best["curve"].append(round(auroc, 5))
            if auroc > best["auroc"]:
                best.update(epoch=trainer.current_epoch + 1, auroc=auroc,
                            state=copy.deepcopy(pl_module.state_dict()))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[SelectOnValidation()] if validation is not None else [])
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started
    selection = {}
    if validation is not None:
        model.load_state_dict(best["state"])
        selection = {"selection": "val_auroc", "selected_epoch": best["epoch"], "val_auroc": best["auroc"],
                     "val_curve": best["curve"], "val_images": int(validation[1].numel())}
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
        **selection,
    }


PROTOCOLS = {
    "val_selected": "all normal training images, the epoch of best validation AUROC tested",
    "val_selected_student_lr": "as val_selected, the students at Adam lr 1e-3 (chosen on validation data)",
    "main": "a fixed schedule, the last epoch tested",
}


TEACHER_TARGETS = {"mnist": 0.97, "fashion_mnist": 0.92}


def _targets(dataset: str, means: dict[str, float], per_class: dict[int, dict[str, float]]) -> list[str]:
    """The issue's acceptance points, measured on the complete classes of one table."""
    def wins(a: str, b: str) -> str:
        return f"{sum(row[a] > row[b] for row in per_class.values())}/{len(per_class)} classes"

    ratio = means["student_pkd"] / means["teacher"]
    rows = [
        (f"teacher mean AUROC >= {TEACHER_TARGETS[dataset]}", f"{means['teacher']:.4f}",
         means["teacher"] >= TEACHER_TARGETS[dataset]),
        ("teacher above GANomaly", f"{means['teacher']:.4f} vs {means['ganomaly']:.4f} (higher on "
         f"{wins('teacher', 'ganomaly')})", means["teacher"] > means["ganomaly"]),
        ("P-KD student >= 0.98 x teacher", f"{means['student_pkd']:.4f} / {means['teacher']:.4f} = {ratio:.4f}",
         ratio >= 0.98),
        ("P-KD student above student_one_step", f"{means['student_pkd']:.4f} vs {means['student_one_step']:.4f} "
         f"(higher on {wins('student_pkd', 'student_one_step')})", means["student_pkd"] > means["student_one_step"]),
        ("P-KD student above student_alone", f"{means['student_pkd']:.4f} vs {means['student_alone']:.4f} "
         f"(higher on {wins('student_pkd', 'student_alone')})", means["student_pkd"] > means["student_alone"]),
    ]
    return ["| target (means of the complete classes) | measured | met? |", "|---|---|---|",
            *[f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in rows]]


def _main_table(dataset: str, name: str, experiment: str, runs: list[dict[str, Any]],
                all_runs: list[dict[str, Any]] | None = None) -> list[str]:
    """One protocol's table: AUROC per class and role, the mean of complete classes, the sizes.

    Students trained from another protocol's teacher (``teacher_experiment``) are shown beside
    that protocol's teacher and GANomaly records."""
    by_class: dict[int, dict[str, dict[str, Any]]] = {}
    sizes: dict[str, tuple] = {}
    sources = {r["teacher_experiment"] for r in runs if r.get("teacher_experiment")}
    own_roles = {r["role"] for r in runs}
    borrowed = [r for r in (all_runs or []) if r["experiment"] in sources and r["role"] in ("teacher", "ganomaly")
                and r["role"] not in own_roles]
    for r in [*borrowed, *runs]:
        by_class.setdefault(r["normal_class"], {})[r["role"]] = r
        sizes[r["role"]] = (r["params"], r["macs"], r["mac_compression_ratio"], r["batch_size"], r["epochs"],
                            r["train_samples"])
    complete = sorted(c for c, found in by_class.items() if all(role in found for role in ROLES))
    selected = all("selected_epoch" in r for r in runs)

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{r['auroc']:.4f} (e{r['selected_epoch']})" if selected else f"{r['auroc']:.4f}"

    lines = [f"### {dataset}, {experiment}: {PROTOCOLS.get(experiment, experiment)} (`benchmarks/results/{name}`)", ""]
    if selected:
        lines += ["Test AUROC (the selected epoch in brackets).", ""]
    if borrowed:
        lines += [f"Teacher and GANomaly: the `{', '.join(sorted(sources))}` records (the students learn from that "
                  "teacher checkpoint).", ""]
    settings = sorted({r["settings"] for r in runs if r.get("settings")})
    if settings:
        lines += [f"Student settings: `{'`, `'.join(settings)}`.", ""]
    lines += ["| normal class | " + " | ".join(ROLES) + " |", "|---" * (len(ROLES) + 1) + "|"]
    for normal_class in sorted(by_class):
        lines.append(f"| {normal_class} | " + " | ".join(cell(by_class[normal_class].get(role)) for role in ROLES) + " |")
    if complete:
        means = [sum(by_class[c][role]["auroc"] for c in complete) / len(complete) for role in ROLES]
        lines.append(f"| **mean of {len(complete)} complete classes** | "
                     + " | ".join(f"**{m:.4f}**" for m in means) + " |")
        if selected:
            val_means = [sum(by_class[c][role]["val_auroc"] for c in complete) / len(complete) for role in ROLES]
            lines.append("| mean validation AUROC (training split) | "
                         + " | ".join(f"{m:.4f}" for m in val_means) + " |")
        lines += ["", *_targets(dataset, {role: means[i] for i, role in enumerate(ROLES)},
                                  {c: {role: by_class[c][role]["auroc"] for role in ROLES} for c in complete})]
    lines += ["", "| role | generator params | generator MACs | MAC ratio vs teacher | batch size | epochs | "
              "training images (one class) |", "|---|---|---|---|---|---|---|"]
    for role in ROLES:
        if role in sizes:
            params, macs, ratio, batch_size, epochs, samples = sizes[role]
            lines.append(f"| {role} | {params:,} | {macs:,} | {ratio:.1f} | {batch_size} | {epochs} | {samples} |")
    return [*lines, ""]


def summary() -> str:
    """Markdown tables of the results files: each protocol's table per set, then the batch comparison."""
    lines: list[str] = []
    for dataset, name in FILE_NAMES.items():
        runs = load_results(RESULTS / name)["runs"]
        found = [e for e in dict.fromkeys(r["experiment"] for r in runs) if e != "batch_comparison"]
        for experiment in sorted(found, key=lambda e: list(PROTOCOLS).index(e) if e in PROTOCOLS else len(PROTOCOLS)):
            lines += _main_table(dataset, name, experiment, [r for r in runs if r["experiment"] == experiment], runs)
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
    parser = base_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=list(FILE_NAMES))
    parser.add_argument("--classes", default="0-9", help="e.g. 0-9 or 0,3,5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=1000,
                        help="normal training images per class (0: all, less the validation hold-out)")
    parser.add_argument("--select-on-validation", action="store_true",
                        help="test the epoch of best validation AUROC (training split only), every role")
    parser.add_argument("--experiment", default=None,
                        help="record label (default: main, or val_selected with --select-on-validation)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--mac-compression-ratio", type=float, default=100.0)
    parser.add_argument("--roles", nargs="+", default=["teacher", "ganomaly", *STUDENT_ROLES])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="scheme.KEY=VALUE",
                        help="student settings (recorded as `settings`; give the runs their own --experiment)")
    parser.add_argument("--teacher-experiment", default=None,
                        help="the protocol whose cached teacher the students learn from and whose teacher and "
                             "GANomaly rows the summary shows beside them (student roles only)")
    parser.add_argument("--batch-comparison-classes", default="", help="MNIST classes for batch 1 vs --batch-size")
    parser.add_argument("--batch-comparison-images", type=int, default=1000, help="images seen by each teacher")
    parser.add_argument("--batch-comparison-first", action="store_true", help="run the comparison before the tables")
    parser.add_argument("--summary", action="store_true", help="print the Markdown tables of the results and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary())
        return

    experiment = args.experiment or ("val_selected" if args.select_on_validation else "main")
    settings = scheme_settings(args.overrides)
    if (args.overrides or args.teacher_experiment) and args.experiment in (None, "main", "val_selected"):
        raise SystemExit("--set / --teacher-experiment: name the runs' own protocol with --experiment")
    if args.teacher_experiment and set(args.roles) - set(STUDENT_ROLES):
        raise SystemExit("--teacher-experiment: the teacher and GANomaly are that protocol's; run student roles only")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from kd_experiments import config as kd_config

    data_dir = args.data_root
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
                f"data.batch_size={batch_size}", f"data.max_train_samples={args.train_samples or 'null'}",
                f"seed={args.seed}", f"scheme.mac_compression_ratio={args.mac_compression_ratio}",
                *(["data.val_anomalies=other_classes"] if args.select_on_validation else [])]

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    def tables() -> None:
        classes = parse_classes(args.classes)
        for normal_class in classes:  # interleave the sets, so both grow together
            for dataset in args.datasets:
                path = RESULTS / FILE_NAMES[dataset]
                done = done_keys(dataset)
                overrides = base_overrides(dataset, normal_class, args.batch_size)
                teacher_file = CACHE / (f"{dataset}_c{normal_class}_b{args.batch_size}_n{args.train_samples}"
                                        f"_e{args.teacher_epochs}_s{args.seed}{'_val' if args.select_on_validation else ''}.ckpt")
                datamodule = None
                validation = None
                train_samples = args.train_samples
                if not train_samples:  # all of them: their count (the validation hold-out is left out)
                    datamodule = datamodule_for(dataset, normal_class, compose(dataset, overrides))
                    train_samples = len(datamodule.train_dataset)
                for role in args.roles:
                    epochs = args.teacher_epochs if role in ("teacher", "ganomaly") else args.student_epochs
                    images_seen = epochs * train_samples
                    base = {"experiment": experiment, "dataset": dataset, "normal_class": normal_class, "role": role,
                            "batch_size": args.batch_size, "seed": args.seed, "images_seen": images_seen}
                    need_teacher = role in STUDENT_ROLES and not teacher_file.is_file()
                    if need_teacher and args.teacher_experiment:
                        raise SystemExit(f"{teacher_file} is missing: run {args.teacher_experiment}'s teacher first")
                    if record_key(base) in done and not (role == "teacher" and need_teacher):
                        continue
                    cfg = compose(dataset, overrides)
                    if datamodule is None:
                        datamodule = datamodule_for(dataset, normal_class, cfg)
                    if args.select_on_validation and validation is None:
                        validation = (datamodule.val_dataset.images, datamodule.val_dataset.labels)
                    if need_teacher:  # the teacher's record exists but its file is gone: retrain it
                        log(f"{dataset} c{normal_class}: retraining the cached teacher")
                        run_one(compose(dataset, [*overrides, "scheme.role=teacher"]), datamodule,
                                args.teacher_epochs, save_teacher=teacher_file, validation=validation)
                    extra = [f"scheme.role={role}", *(args.overrides if role in STUDENT_ROLES else [])]
                    if role in STUDENT_ROLES:
                        extra += [f"scheme.teacher_checkpoint={teacher_file}", "scheme.score_teacher_at_test=false"]
                    cfg = compose(dataset, [*overrides, *extra])
                    log(f"{dataset} c{normal_class} {role}: {epochs} epochs of {len(datamodule.train_dataset)} images")
                    started_at, started = now_utc(), time.perf_counter()
                    figures = run_one(cfg, datamodule, epochs,
                                      save_teacher=teacher_file if role == "teacher" else None, validation=validation)
                    if record_key(base) in done:
                        continue
                    record = {**base, **figures, "epochs": epochs, "train_samples": train_samples}
                    if settings and role in STUDENT_ROLES:
                        record["settings"] = settings
                    if args.teacher_experiment:
                        record["teacher_experiment"] = args.teacher_experiment
                    ResultsFile(path).append(record, started_at=started_at, wall_s=time.perf_counter() - started)
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
                started_at, started = now_utc(), time.perf_counter()
                figures = run_one(cfg, datamodule, epochs)
                ResultsFile(path).append({**base, **figures, "epochs": epochs, "train_samples": args.train_samples},
                                         started_at=started_at, wall_s=time.perf_counter() - started)
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
