"""Study: how many epochs do the EDE-GAN teacher and the P-KDGAN students need? (validation only)

``benchmarks.pkd`` runs fixed schedules; this script chooses them without looking at any
test image. Per epoch it measures the AUROC of a role's score on a *validation* set built
from the training split only:

- normal: the normal class's training images the datamodule holds out (``val_fraction``),
  never trained on;
- anomalous: as many training images of the other nine classes (seeded draw), prepared by
  the datamodule's own resize and scaling (``data.val_anomalies=other_classes``).

Roles: ``teacher`` and ``ganomaly`` trained alone, and the students (``student_one_step``,
``student_alone``, ``student_pkd``) from a teacher checkpoint this script saved
(``--teacher-epochs-for-students``). A P-KD student's two steps are fractions of its whole
schedule, so its per-epoch figures are those of *that* schedule, not of shorter ones.

Resumable: one record per (dataset, class, role, seed, epoch, ...), appended at once to
``benchmarks/results/pkd_budget.json``; a (role, class) whose last epoch is recorded is
skipped::

    .venv/bin/python -m benchmarks.pkd_budget --dataset mnist --classes 3 8 --roles teacher --epochs 12
    .venv/bin/python -m benchmarks.pkd_budget --dataset mnist --classes 3 --roles student_one_step \\
        --epochs 20 --teacher-epochs-for-students 8

Student settings (``--set scheme.KEY=VALUE``, recorded as ``variant``) are compared the same
way, from the teacher ``benchmarks.pkd --select-on-validation`` selected and cached
(``--teacher selected``), so a student recipe is chosen on validation data too::

    .venv/bin/python -m benchmarks.pkd_budget --dataset mnist --classes 0 1 2 3 4 5 6 7 8 9 \\
        --roles student_pkd --epochs 10 --teacher selected --set scheme.distillation_latent_weight=50
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from benchmarks.harness import ResultsFile, base_parser, now_utc
from benchmarks.pkd import CACHE, FILE_NAMES, RESULTS, STUDENT_ROLES, compose, scheme_settings, validation_auroc


def settings_summary(path: Path) -> str:
    """Markdown: each student setting studied from the selected teachers (``--teacher selected``),
    best validation AUROC per class over its epochs, beside the same role's validation AUROC in
    ``benchmarks.pkd``'s ``val_selected`` records (default settings) and the teacher's."""
    import json

    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    lines: list[str] = []
    for dataset, name in FILE_NAMES.items():
        reference = {(r["normal_class"], r["role"]): r["val_auroc"]
                     for r in (json.loads((RESULTS / name).read_text())["runs"] if (RESULTS / name).exists() else [])
                     if r["experiment"] == "val_selected"}
        curves: dict[tuple, dict[int, dict[int, float]]] = {}
        for r in runs:
            if r["dataset"] == dataset and r.get("teacher") == "selected":
                curves.setdefault((r["role"], r.get("variant") or "defaults"), {}).setdefault(
                    r["normal_class"], {})[r["epoch"]] = r["val_auroc"]
        for (role, variant), per_class in sorted(curves.items()):
            best = {c: max(epochs.values()) for c, epochs in sorted(per_class.items())}
            if not all((c, role) in reference and (c, "teacher") in reference for c in best):
                continue
            lines += [f"**{dataset}, {role}, `{variant}`** (best validation AUROC over "
                      f"{max(len(e) for e in per_class.values())} epochs; no test image):", "",
                      "| normal class | teacher | " + role + " (benchmarks.pkd val_selected, defaults) | this setting |",
                      "|---|---|---|---|"]
            for c, value in best.items():
                lines.append(f"| {c} | {reference[(c, 'teacher')]:.4f} | {reference[(c, role)]:.4f} | {value:.4f} |")
            n = len(best)
            teacher = sum(reference[(c, "teacher")] for c in best) / n
            default = sum(reference[(c, role)] for c in best) / n
            mean = sum(best.values()) / n
            lines += [f"| **mean of {n}** | **{teacher:.4f}** | **{default:.4f}** ({default / teacher:.3f}x) | "
                      f"**{mean:.4f}** ({mean / teacher:.3f}x) |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__, output="pkd_budget.json", threads=False)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--roles", nargs="+", default=["teacher"],
                        choices=["teacher", "ganomaly", *STUDENT_ROLES])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-samples", type=int, default=0, help="normal training images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs-for-students", type=int, default=8,
                        help="the students learn from the teacher checkpoint of this epoch")
    parser.add_argument("--teacher", choices=["budget", "selected"], default="budget",
                        help="students learn from this script's teacher checkpoint of epoch "
                             "--teacher-epochs-for-students (budget) or from the validation-selected "
                             "teacher benchmarks.pkd cached (selected: 8 epochs, all images, batch 64)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="scheme.KEY=VALUE",
                        help="student settings to compare (recorded as the record's variant)")
    parser.add_argument("--mac-compression-ratio", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", action="store_true",
                        help="print the student-settings comparison (validation only) and exit")
    args = parser.parse_args()
    if args.summary:
        print(settings_summary(args.output))
        return

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import lightning as L

    from kd_experiments import config as kd_config

    data_dir = args.data_root
    variant = scheme_settings(args.overrides)
    if args.teacher == "selected" and (args.batch_size != 64 or args.train_samples):
        raise SystemExit("--teacher selected: the cached teachers were trained on all images at batch 64")
    results = ResultsFile(args.output, ("dataset", "normal_class", "role", "seed", "epoch", "batch_size", "train_samples",
                                    "teacher_epochs", "teacher", "variant"))

    for normal_class in args.classes:
        overrides = [f"data.root={data_dir / args.dataset}", f"data.normal_class={normal_class}",
                     f"data.batch_size={args.batch_size}", f"seed={args.seed}",
                     f"data.max_train_samples={args.train_samples or 'null'}",
                     f"scheme.mac_compression_ratio={args.mac_compression_ratio}", "data.val_anomalies=other_classes"]
        teacher_dir = CACHE / "budget" / f"{args.dataset}_c{normal_class}_b{args.batch_size}_n{args.train_samples}_s{args.seed}"
        for role in args.roles:
            student = role in STUDENT_ROLES
            selected = student and args.teacher == "selected"
            teacher_epochs = (8 if selected else args.teacher_epochs_for_students) if student else 0
            key = {"dataset": args.dataset, "normal_class": normal_class, "role": role, "seed": args.seed,
                   "batch_size": args.batch_size, "train_samples": args.train_samples, "teacher_epochs": teacher_epochs,
                   "teacher": "selected" if selected else None, "variant": variant}
            if results.has(**key, epoch=args.epochs):
                print(f"[{args.dataset} {normal_class} {role} {variant or ''}] done, skipped", flush=True)
                continue
            extra = [f"scheme.role={role}", *args.overrides]
            if selected:
                teacher_file = CACHE / f"{args.dataset}_c{normal_class}_b64_n0_e8_s{args.seed}_val.ckpt"
                if not teacher_file.is_file():
                    raise SystemExit(f"{teacher_file} is missing: run benchmarks.pkd --select-on-validation "
                                     "--train-samples 0 --teacher-epochs 8 --roles teacher for this class")
                extra += [f"scheme.teacher_checkpoint={teacher_file}", "scheme.score_teacher_at_test=false"]
            elif student:
                teacher_file = teacher_dir / f"teacher_e{teacher_epochs}.ckpt"
                if not teacher_file.is_file():
                    raise SystemExit(f"{teacher_file} is missing: run --roles teacher with --epochs >= {teacher_epochs}")
                extra += [f"scheme.teacher_checkpoint={teacher_file}", "scheme.score_teacher_at_test=false"]
            cfg = compose(args.dataset, [*overrides, *extra])
            datamodule = kd_config.instantiate(cfg.data)
            datamodule.prepare_data()
            datamodule.setup("fit")
            val_images, labels = datamodule.val_dataset.images, datamodule.val_dataset.labels
            L.seed_everything(int(cfg.seed), workers=True)
            model = kd_config.instantiate(cfg.scheme, input_shape=tuple(datamodule.input_shape))
            started_at, started = now_utc(), time.perf_counter()

            class Measure(L.Callback):
                def on_train_epoch_end(self, trainer, pl_module) -> None:
                    epoch = trainer.current_epoch + 1
                    record = {**key, "epoch": epoch, "images_seen": epoch * len(datamodule.train_dataset),
                              "val_auroc": validation_auroc(pl_module, val_images, labels),
                              "val_images": int(labels.numel()),
                              "seconds": round(time.perf_counter() - started, 1),
                              "discriminator_resets": dict(pl_module.discriminator_resets)}
                    results.append(record, started_at=started_at, wall_s=record["seconds"], skip_if_present=True)
                    if role == "teacher":
                        state = {k: v for k, v in pl_module.state_dict().items() if k.startswith("teacher_")}
                        teacher_dir.mkdir(parents=True, exist_ok=True)
                        torch.save({"state_dict": state}, teacher_dir / f"teacher_e{epoch}.ckpt")
                    print(f"[{args.dataset} {normal_class} {role} {variant or ''}] epoch {epoch}: val AUROC {record['val_auroc']:.4f} "
                          f"({record['seconds']} s)", flush=True)

            trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Measure()])
            trainer.fit(model, datamodule=datamodule)


if __name__ == "__main__":
    main()
