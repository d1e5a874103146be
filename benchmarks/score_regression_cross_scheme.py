"""Cross-scheme compression: a trained reverse-distillation teacher -> a tiny supervised student.

Pol et al., "Knowledge Distillation for Anomaly Detection", arXiv 2310.06047, compress an
unsupervised detector into a small supervised network that regresses the detector's
per-image anomaly score. Here the teacher is not their autoencoder but reverse
distillation (Deng & Li, CVPR 2022) trained on MVTec AD bottle, loaded through
:func:`kd_experiments.schemes.score_regression.teachers.load_scheme_teacher`.

End to end, resumably:

1. **Teacher.** RD trained through ``kd_experiments.train.train`` (the ``kd-train`` path)
   exactly as ``benchmarks.rd_bottle`` runs ``scheme=rd``: ``experiment=rd_bottle``,
   full width (compression ratio 1), seed 0, 128x128, 10 epochs, package
   ``tf_efficientnet_lite0`` weights, blur sigma 4 * 128 / 256. Its run folder (Hydra
   output dir, so ``checkpoints/last.ckpt``) is under ``.cache/cross_scheme/`` (git-ignored);
   its MLflow run goes to a throwaway store ``sqlite:///.cache/cross_scheme/mlflow.db``
   unless ``MLFLOW_TRACKING_URI`` is set. A finished teacher (``last.ckpt`` plus
   ``teacher_run.json``) is not trained again.
2. **Teacher as a scorer.** ``load_scheme_teacher(ReverseDistillationScheme, last.ckpt)``:
   a frozen module images -> score (max of the blurred anomaly map).
3. **Data.** The teacher run's own data config (``cfg.data``, the framework's MVTec
   datamodule: same size, ImageNet normalisation), so the teacher sees exactly the inputs
   RD saw. Normal training images: all of ``train/good`` (RD's training split and its
   held-out validation split, both normal training images). Pseudo outliers: synthetic
   anomalies of those training images
   (:class:`~kd_experiments.synthetic_anomalies.SyntheticAnomalies`,
   Perlin masks blended with procedural or in-set textures, seeded),
   ``--synthetic-per-image`` variants per image. No test image is used for training or
   for any choice. The teacher scores every training and synthetic image once (cached in
   ``.cache/cross_scheme/``).
4. **Students.** The package's ``ScoreRegressor`` family (paper students ``D``, a shallow
   [4, 8] of 801 parameters, and ``A``, the deep [8, 16, 16, 16, 8] of 8,545 parameters at
   64x64), wrapped in :class:`~kd_experiments.schemes.score_regression.torch_model.PooledScoreRegressor`:
   average pooling 128 -> 64 as its first op, the
   regressor, and an affine map back to teacher units. Targets are standardised with the
   mean and std of the technique's own training targets (training images only); the loss
   is L1 on the standardised score. Adam, lr 1e-3, cosine decay to 0, batch 32, a fixed
   number of epochs, seed 0; the final weights are tested (no selection on any split).
   Techniques: ``baseline`` (normal images only) and ``synthetic_outlier_exposure``
   (normal + synthetic images, shuffled together).
5. **Evaluation** on the bottle test split: teacher and student image AUROC, retention =
   student / teacher AUROC, the Wasserstein distance between student and teacher scores on
   the anomalous test images, Spearman's rho of student vs teacher scores on the whole
   test split; parameters, MACs (one 128x128 image, whole scoring path) and CPU
   throughput at batch 32 (one thread) of both.

Writes ``benchmarks/results/score_regression_cross_scheme.json`` (``runs``, each record with
its provenance, :mod:`benchmarks.harness`); records already present (same key) are skipped::

    nohup .venv/bin/python -m benchmarks.score_regression_cross_scheme \\
        > logs/benchmarks/cross_scheme.log 2>&1 &
    .venv/bin/python -m benchmarks.score_regression_cross_scheme --table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from benchmarks.harness import ROOT, ResultsFile, base_parser, compose, now_utc
from benchmarks.rd_bottle import add_mvtec_arguments, mvtec_root
from kd_experiments import metrics as kd_metrics
from kd_experiments.compression import count_macs, count_parameters, measure_latency
from kd_experiments.synthetic_anomalies import SyntheticAnomalies
from kd_experiments.schemes.score_regression.family import predict
from kd_experiments.schemes.score_regression.teachers import load_scheme_teacher
from kd_experiments.schemes.score_regression.torch_model import PAPER_STUDENTS, PooledScoreRegressor, build_student

CACHE = ROOT / ".cache" / "cross_scheme"
RD_SCHEME = "kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme"
TECHNIQUES = ("baseline", "synthetic_outlier_exposure")
KEY_FIELDS = ("dataset", "teacher", "student", "technique", "seed", "epochs", "image_size",
              "student_input_size", "synthetic_per_image", "teacher_epochs")


# ------------------------------------------------------------------------------- teacher


def teacher_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """``benchmarks.rd_bottle``'s overrides for ``scheme=rd``, full width."""
    return [
        "experiment=rd_bottle",
        f"data.root={mvtec_root(args)}",
        f"data.image_size={args.image_size}",
        "data.batch_size=8",
        f"trainer.max_epochs={args.teacher_epochs}",
        "scheme.compression_ratio=1.0",
        f"scheme.blur_sigma={4.0 * args.image_size / 256}",
        f"seed={args.seed}",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_model_summary=false",
        "+tags.purpose=benchmark",
        f"+tags.benchmark_run={run_dir.name}-{os.getpid()}-{time.time_ns()}",
    ]


def teacher_run_dir(args: argparse.Namespace) -> Path:
    return args.cache / f"rd_bottle-cr1-s{args.seed}-{args.image_size}px-{args.teacher_epochs}ep"


def train_teacher(args: argparse.Namespace) -> tuple[Path, dict]:
    """The RD run's ``last.ckpt`` and its summary; trained only when not finished before."""
    from kd_experiments.train import train

    run_dir = teacher_run_dir(args)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    summary_path = run_dir / "teacher_run.json"
    if checkpoint.exists() and summary_path.exists():
        print(f"[cross_scheme] teacher found: {checkpoint}", flush=True)
        return checkpoint, json.loads(summary_path.read_text())
    # An unfinished run's checkpoints would make Lightning write last-v1.ckpt beside them.
    for stale in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        print(f"[cross_scheme] removing checkpoint of an unfinished run: {stale}", flush=True)
        stale.unlink()
    print(f"[cross_scheme] training the RD teacher into {run_dir}", flush=True)
    cfg = compose(teacher_overrides(args, run_dir), output_dir=run_dir)
    started = time.perf_counter()
    metrics = train(cfg)
    summary = {
        "run_dir": str(run_dir.relative_to(ROOT)),
        "test_image_auroc": metrics.get("test/image_auroc"),
        "test_pixel_auroc": metrics.get("test/pixel_auroc"),
        "train_seconds": time.perf_counter() - started,
        "blur_sigma": float(cfg.scheme.blur_sigma),
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
    }
    if not checkpoint.exists():
        raise RuntimeError(f"the RD run finished without writing {checkpoint}")
    summary_path.write_text(json.dumps(summary, indent=1))
    return checkpoint, summary


# ---------------------------------------------------------------------------------- data


def stack_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[index] for index in range(len(dataset))]
    return torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items])


def synthetic_images(images: torch.Tensor, per_image: int, mean, std, seed: int, batch_size: int = 16) -> torch.Tensor:
    """``per_image`` seeded synthetic-anomaly copies of every image (variant-major order)."""
    anomalies = SyntheticAnomalies(mean, std, texture_source="mixed", seed=seed)
    batches = []
    for _ in range(per_image):
        for start in range(0, len(images), batch_size):
            batches.append(anomalies(images[start:start + batch_size])[0])
    return torch.cat(batches) if batches else images[:0]


def score(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``model``'s scores of ``images`` in eval mode, in batches (:func:`family.predict`)."""
    model.eval()
    return predict(model, images, batch_size)


def load_data(args: argparse.Namespace, teacher: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Training, synthetic and test images with the teacher's scores (scores cached on disk)."""
    from kd_experiments import config as kd_config

    run_dir = teacher_run_dir(args)
    cfg = compose(teacher_overrides(args, run_dir), output_dir=run_dir)  # the teacher run's data config
    datamodule = kd_config.instantiate(cfg.data)
    datamodule.setup("fit")
    datamodule.setup("test")
    train_images = torch.cat([stack_images(datamodule.train_dataset)[0], stack_images(datamodule.val_dataset)[0]])
    test_images, test_labels = stack_images(datamodule.test_dataset)
    mean, std = datamodule.normalization_stats
    started = time.perf_counter()
    synthetic = synthetic_images(train_images, args.synthetic_per_image, mean, std, args.seed)
    print(f"[cross_scheme] {len(train_images)} normal training images, {len(synthetic)} synthetic "
          f"({time.perf_counter() - started:.0f} s), {len(test_images)} test images", flush=True)

    cache = args.cache / (f"teacher_scores-s{args.seed}-{args.image_size}px-{args.teacher_epochs}ep"
                          f"-syn{args.synthetic_per_image}.pt")
    stamp = checkpoint.stat().st_mtime_ns
    scores = torch.load(cache, weights_only=True) if cache.exists() else None
    if scores is None or int(scores["checkpoint_mtime_ns"]) != stamp:
        started = time.perf_counter()
        scores = {
            "train": score(teacher, train_images),
            "synthetic": score(teacher, synthetic),
            "test": score(teacher, test_images),
            "checkpoint_mtime_ns": torch.tensor(stamp),
        }
        scores["seconds"] = torch.tensor(time.perf_counter() - started)
        torch.save(scores, cache)
        print(f"[cross_scheme] teacher scored {len(train_images) + len(synthetic) + len(test_images)} images "
              f"in {float(scores['seconds']):.0f} s", flush=True)
    return {
        "train_images": train_images, "train_scores": scores["train"],
        "synthetic_images": synthetic, "synthetic_scores": scores["synthetic"],
        "test_images": test_images, "test_scores": scores["test"], "test_labels": test_labels,
        "teacher_scoring_seconds": float(scores["seconds"]),
    }


# ------------------------------------------------------------------------------ students


def fit_student(core: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace) -> float:
    """L1 regression of standardised ``targets`` from pooled ``inputs``; returns the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(core.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(inputs) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    core.train()
    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), args.batch_size):
            index = order[start:start + args.batch_size]
            loss = (core(inputs[index]) - targets[index]).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        epoch_loss = total / len(inputs)
        if epoch % 20 == 0 or epoch == args.epochs - 1:
            print(f"[cross_scheme]   epoch {epoch + 1}/{args.epochs} L1 (standardised) {epoch_loss:.4f}", flush=True)
    core.eval()
    return epoch_loss


def compare_scores(teacher_scores: torch.Tensor, student_scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUROCs, retention, Wasserstein (anomalous images) and Spearman (all images)."""
    anomalous = labels == 1
    teacher_auroc = kd_metrics.image_auroc(teacher_scores, labels)
    student_auroc = kd_metrics.image_auroc(student_scores, labels)
    return {
        "teacher_auroc": teacher_auroc,
        "student_auroc": student_auroc,
        "retention": student_auroc / teacher_auroc,
        "wasserstein": kd_metrics.wasserstein(student_scores[anomalous], teacher_scores[anomalous]),
        "spearman": float(spearmanr(student_scores.numpy(), teacher_scores.numpy()).statistic),
    }


def images_per_second(model: nn.Module, images: torch.Tensor, repeats: int) -> float:
    return len(images) / measure_latency(model, images, repeats=repeats, warmup=1)


# ---------------------------------------------------------------------------------- table


def markdown_table(path: Path) -> str:
    runs = json.loads(path.read_text())["runs"]
    lines = [
        ("| student | technique | student params | param ratio | MAC ratio | teacher AUROC | student AUROC "
        "| retention | Wasserstein (anomalous) | Spearman (test) | train s | teacher img/s | student img/s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: index for index, name in enumerate(PAPER_STUDENTS)}
    for run in sorted(runs, key=lambda r: (-order.get(r["student"], 0), r["technique"] != "baseline")):
        lines.append(
            f"| {run['student']} {run['student_spec']} | {run['technique']} | {run['student_params']:,} "
            f"| {run['compression_ratio']:,.0f} | {run['mac_compression_ratio']:,.0f} | {run['teacher_auroc']:.4f} "
            f"| {run['student_auroc']:.4f} | {run['retention']:.3f} | {run['wasserstein']:.4f} "
            f"| {run['spearman']:.3f} | {run['train_seconds']:.0f} | {run['teacher_images_per_s']:.1f} "
            f"| {run['student_images_per_s']:,.0f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def main() -> None:
    parser = base_parser(__doc__, output="score_regression_cross_scheme.json", threads=False)
    add_mvtec_arguments(parser)
    parser.add_argument("--image-size", type=int, default=128, help="RD's input size")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-input-size", type=int, default=64, help="the student's average-pooled input")
    parser.add_argument("--students", nargs="+", choices=list(PAPER_STUDENTS), default=["D", "A"])
    parser.add_argument("--techniques", nargs="+", choices=TECHNIQUES, default=list(TECHNIQUES))
    parser.add_argument("--synthetic-per-image", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=80, help="student epochs (fixed, cosine decay)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE, help="teacher run folder, MLflow store, score cache")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    if args.image_size % args.student_input_size:
        parser.error("--image-size must be a multiple of --student-input-size")
    torch.set_num_threads(1)
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.cache / 'mlflow.db'}")
    results = ResultsFile(args.output)

    def key(student: str, technique: str) -> dict:
        return {
            "dataset": "mvtec_bottle", "teacher": "reverse_distillation", "student": student, "technique": technique,
            "seed": args.seed, "epochs": args.epochs, "image_size": args.image_size,
            "student_input_size": args.student_input_size,
            "synthetic_per_image": args.synthetic_per_image if technique != "baseline" else 0,
            "teacher_epochs": args.teacher_epochs,
        }

    todo = [(s, t) for s in args.students for t in args.techniques if not results.has(key(s, t))]
    if not todo:
        print("[cross_scheme] every run is done", flush=True)
        return

    checkpoint, teacher_run = train_teacher(args)
    teacher = load_scheme_teacher(RD_SCHEME, checkpoint)
    scheme = teacher.model.scheme
    teacher_params = count_parameters(scheme.encoder) + count_parameters(scheme.student)
    one_image = torch.zeros(1, 3, args.image_size, args.image_size)
    teacher_macs = count_macs(teacher, one_image)
    data = load_data(args, teacher, checkpoint)
    test_batch = data["test_images"][:32]
    teacher_throughput = images_per_second(teacher, test_batch, repeats=3)
    factor = args.image_size // args.student_input_size
    pooled = {name: F.avg_pool2d(data[f"{name}_images"], factor) if factor > 1 else data[f"{name}_images"]
              for name in ("train", "synthetic")}
    input_shape = (3, args.student_input_size, args.student_input_size)

    for student_name, technique in todo:
        spec = PAPER_STUDENTS[student_name]
        print(f"[cross_scheme] run {key(student_name, technique)}", flush=True)
        started_at, run_started = now_utc(), time.perf_counter()
        if technique == "baseline":
            inputs, targets = pooled["train"], data["train_scores"]
        else:
            inputs = torch.cat([pooled["train"], pooled["synthetic"]])
            targets = torch.cat([data["train_scores"], data["synthetic_scores"]])
        target_mean, target_std = float(targets.mean()), float(targets.std())
        torch.manual_seed(args.seed)
        core = build_student(spec, input_shape)
        started = time.perf_counter()
        final_loss = fit_student(core, inputs, (targets - target_mean) / target_std, args)
        train_seconds = time.perf_counter() - started
        student = PooledScoreRegressor(core, factor, target_mean, target_std).eval()
        student_scores = score(student, data["test_images"])
        train_fit = spearmanr(score(core, inputs).numpy(), targets.numpy()).statistic
        student_params = count_parameters(student)
        student_macs = count_macs(student, one_image)
        record = {
            **key(student_name, technique),
            "student_spec": spec.describe(),
            "teacher_params": teacher_params, "teacher_macs": teacher_macs,
            "student_params": student_params, "student_macs": student_macs,
            "compression_ratio": teacher_params / student_params,
            "mac_compression_ratio": teacher_macs / student_macs,
            **compare_scores(data["test_scores"], student_scores, data["test_labels"]),
            "train_spearman": float(train_fit),
            "final_train_l1_standardised": final_loss,
            "target_mean": target_mean, "target_std": target_std,
            "train_images": len(inputs), "normal_train_images": len(pooled["train"]),
            "test_images": len(data["test_labels"]),
            "lr": args.lr, "batch_size": args.batch_size,
            "train_seconds": train_seconds,
            "teacher_train_seconds": teacher_run.get("train_seconds"),
            "teacher_scoring_seconds": data["teacher_scoring_seconds"],
            "teacher_run_test_auroc": teacher_run.get("test_image_auroc"),
            "teacher_checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT) else str(checkpoint),
            "teacher_images_per_s": teacher_throughput,
            "student_images_per_s": images_per_second(student, test_batch, repeats=20),
            "inference_batch_size": len(test_batch), "device": "cpu", "torch_threads": torch.get_num_threads(),
            "backbone": "tf_efficientnet_lite0", "weights": "package",
        }
        results.append(record, started_at=started_at, wall_s=time.perf_counter() - run_started)
        print(f"[cross_scheme] done {student_name} {technique}: teacher AUROC {record['teacher_auroc']:.4f} "
              f"student AUROC {record['student_auroc']:.4f} retention {record['retention']:.3f} "
              f"spearman {record['spearman']:.3f} ({train_seconds:.0f} s)", flush=True)
    print(markdown_table(args.output), flush=True)


if __name__ == "__main__":
    main()
