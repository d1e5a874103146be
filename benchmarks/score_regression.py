"""Benchmark: Pol et al.'s unsupervised-to-supervised compression on MNIST / Fashion-MNIST.

Pol et al., "Knowledge Distillation for Anomaly Detection", arXiv 2310.06047: one class
normal, ``protocol=balanced`` (the normal class's test images plus as many drawn from
the other classes), the conv-autoencoder teacher and the seven students A-G trained in
one loop per (class, teacher), as the authors' scripts do
(:mod:`kd_experiments.schemes.score_regression.family`).

Techniques: ``co_learning`` and ``co_learning+outlier_exposure`` students train together
with the teacher; ``baseline``, ``outlier_exposure``, ``noise_exposure``,
``tail_reweighting`` students then learn from the trained, frozen teacher. One teacher per
class serves all (its training does not depend on the students).
No model selection: a fixed number of epochs with cosine decay; nothing is chosen on
the test split (nor on the validation split).

Resumable: every finished record is appended to the JSON at once; records already
present (same dataset, class, technique, student, seed) are skipped; inside a class the
training loops checkpoint every 10 epochs under ``.cache/score_regression/``, so a run
killed mid-class continues from its last checkpoint (to the same weights)::

    nohup .venv/bin/python -m benchmarks.score_regression --dataset mnist &
    .venv/bin/python -m benchmarks.score_regression --dataset fashion_mnist --classes 0 1 2
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, ROOT, SHORT_NAMES, ResultsFile, base_parser, now_utc
from kd_experiments import metrics as kd_metrics
from kd_experiments.compression import count_parameters
from kd_experiments.data.one_class import OneClassDataModule
from kd_experiments.schemes.score_regression.family import (
    StudentTrack,
    autoencoder_scorer,
    fit_students,
    predict,
)
from kd_experiments.schemes.score_regression.lightning_model import teacher_training_loss
from kd_experiments.schemes.score_regression.techniques import (
    OUTLIER_PARTNER,
    OutlierSampler,
    Techniques,
    load_outlier_images,
)
from kd_experiments.schemes.score_regression.torch_model import (
    PAPER_STUDENTS,
    ConvAutoencoder,
    build_student,
)

CHECKPOINTS = ROOT / ".cache" / "score_regression"

#: technique -> (group, student-side techniques, outlier exposure)
TECHNIQUES: dict[str, tuple[str, Techniques, bool]] = {
    "baseline": ("frozen", Techniques(), False),
    "outlier_exposure": ("frozen", Techniques(), True),
    "noise_exposure": ("frozen", Techniques(noise_std=0.1), False),
    "tail_reweighting": ("frozen", Techniques(tail_strength=1.0), False),
    "co_learning": ("co_learning", Techniques(), False),
    "co_learning+outlier_exposure": ("co_learning", Techniques(), True),
}


def evaluate(teacher_scores: torch.Tensor, student_scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    anomalous = labels == 1
    teacher_auroc = kd_metrics.image_auroc(teacher_scores, labels)
    student_auroc = kd_metrics.image_auroc(student_scores, labels)
    record = {
        "teacher_auroc": teacher_auroc,
        "student_auroc": student_auroc,
        "retention": student_auroc / teacher_auroc,
        "wasserstein": kd_metrics.wasserstein(student_scores[anomalous], teacher_scores[anomalous]),
    }
    for fpr in (1e-3, 1e-4):
        key = kd_metrics.fpr_key(fpr)
        record[f"teacher_tpr_at_fpr_{key}"] = kd_metrics.tpr_at_fpr(teacher_scores, labels, fpr)
        record[f"student_tpr_at_fpr_{key}"] = kd_metrics.tpr_at_fpr(student_scores, labels, fpr)
    return record


def run_class(args, results: ResultsFile, normal_class: int, outlier_images: torch.Tensor | None) -> None:
    techniques = [t for t in args.techniques if not all(
        results.has(dataset=args.dataset, normal_class=normal_class, technique=t, student=s, seed=args.seed,
                    teacher_epochs=args.teacher_epochs, lr_schedule=args.lr_schedule)
        for s in args.students
    )]
    if not techniques:
        print(f"[{args.dataset} class {normal_class}] all done, skipped", flush=True)
        return
    torch.manual_seed(args.seed)
    data = OneClassDataModule(
        dataset=args.dataset, root=args.data_root / args.dataset, normal_class=normal_class, protocol="balanced",
        val_fraction=0.1, batch_size=args.batch_size, normalization="none", seed=args.seed,
    )
    data.setup("fit")
    device = torch.device(args.device)
    train_images = data.train_dataset.images.to(device)
    test_images, labels = data.test_dataset.images.to(device), data.test_dataset.labels
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    train_images, test_images = (x.contiguous(memory_format=memory_format) for x in (train_images, test_images))
    loss_fn = functools.partial(teacher_training_loss, vae_beta=1.0)

    # One teacher per class: it trains with the co-learning students (if any), then the
    # baseline-schedule students learn from it, frozen (family.py explains why this is
    # the same teacher the baseline schedule would train alone).
    started_at, started = now_utc(), time.perf_counter()
    torch.manual_seed(args.seed)
    teacher = ConvAutoencoder().to(device, memory_format=memory_format)
    groups: dict[str, list[StudentTrack]] = {"co_learning": [], "frozen": []}
    for technique in techniques:
        group, student_techniques, outlier_exposure = TECHNIQUES[technique]
        for name in args.students:
            groups[group].append(StudentTrack(technique, name, build_student(PAPER_STUDENTS[name], (1, 28, 28)).to(device),
                                              student_techniques, outlier_exposure))
    common = {"batch_size": args.batch_size, "outlier_batch_size": args.outlier_batch_size, "lr": args.lr, "seed": args.seed,
                  "lr_schedule": args.lr_schedule}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sampler = None
    if any(track.outlier_exposure for tracks in groups.values() for track in tracks):
        sampler = OutlierSampler(outlier_images.to(device).contiguous(memory_format=memory_format),
                                 args.outlier_batch_size, seed=args.seed)
    teacher_params = count_parameters(teacher)

    def record_group(group: str, seconds: float) -> None:
        # Each group's records are appended as soon as it is trained, so a run cut short
        # (a time-limited GPU lease) keeps the groups it finished.
        teacher_scores = predict(autoencoder_scorer(teacher), test_images)
        for track in groups[group]:
            student_scores = predict(track.model, test_images)
            student_params = count_parameters(track.model)
            co_learning = group == "co_learning"
            record = {
                "dataset": args.dataset, "normal_class": normal_class, "technique": track.technique,
                "student": track.student, "student_params": student_params, "teacher_params": teacher_params,
                "compression_ratio": teacher_params / student_params,
                **evaluate(teacher_scores, student_scores, labels),
                "seed": args.seed, "protocol": "balanced", "test_images": int(labels.numel()),
                "teacher_epochs": args.teacher_epochs,
                "student_epochs": args.teacher_epochs if co_learning else args.student_epochs,
                "lr": args.lr, "lr_schedule": args.lr_schedule,
                "outlier_batch_size": args.outlier_batch_size if track.outlier_exposure else 0,
                "teacher_and_co_learning_seconds": round(teacher_seconds, 1), "class_train_seconds": round(seconds, 1),
                # resumed from a checkpoint: the seconds count only the part after the resume
                "resumed": resumed[group],
                "device": device_name,
            }
            results.append(record, started_at=started_at, wall_s=round(seconds, 1), skip_if_present=True)

    # Resumable within a class: the loops checkpoint every 10 epochs into .cache/ (a file per
    # class, group and setting), so a run killed mid-class (a time-limited job) goes on from there.
    def checkpoint(group: str) -> Path:
        tracks = "+".join(f"{t.technique}:{t.student}" for t in groups[group])
        digest = hashlib.sha1(f"{tracks}|{sorted(common.items())}|{args.channels_last}".encode()).hexdigest()[:10]
        return CHECKPOINTS / (f"{args.dataset}_c{normal_class}_{group}_e{args.teacher_epochs}-{args.student_epochs}"
                              f"_{args.device.replace(':', '')}_{digest}.pt")

    resumed = {group: checkpoint(group).is_file() for group in groups}
    fit_students(groups["co_learning"], teacher, train_images, args.teacher_epochs, teacher_loss_fn=loss_fn,
                 outliers=sampler, **common,
                 checkpoint=checkpoint("co_learning"))
    teacher_seconds = time.perf_counter() - started
    record_group("co_learning", teacher_seconds)
    checkpoint("co_learning").unlink(missing_ok=True)
    if groups["frozen"]:
        fit_students(groups["frozen"], teacher, train_images, args.student_epochs, teacher_loss_fn=None,
                     outliers=sampler, **common,
                     checkpoint=checkpoint("frozen"))
        record_group("frozen", time.perf_counter() - started)
        checkpoint("frozen").unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    teacher_scores = predict(autoencoder_scorer(teacher), test_images)
    smallest = {r["technique"]: round(r["student_auroc"], 4) for r in results.reload()["runs"]
                if r["dataset"] == args.dataset and r["normal_class"] == normal_class and r["student"] == args.students[-1]
                and r["teacher_epochs"] == args.teacher_epochs and r.get("lr_schedule") == args.lr_schedule}
    print(f"[{args.dataset} class {normal_class}] {len(groups['co_learning']) + len(groups['frozen'])} students "
          f"in {seconds:.0f} s, teacher AUROC {kd_metrics.image_auroc(teacher_scores, labels):.4f}, "
          f"student {args.students[-1]}: {smallest}", flush=True)


def main() -> None:
    parser = base_parser(__doc__, threads=False)
    parser.add_argument("--dataset", choices=sorted(OUTLIER_PARTNER), default="mnist")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--techniques", nargs="+", choices=list(TECHNIQUES), default=list(TECHNIQUES))
    parser.add_argument("--students", nargs="+", choices=list(PAPER_STUDENTS), default=list(PAPER_STUDENTS))
    parser.add_argument("--teacher-epochs", type=int, default=4, help="also the co-learning students' epochs")
    parser.add_argument("--student-epochs", type=int, default=4, help="baseline-schedule students, after the teacher")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam lr of teacher and students (cosine decay)")
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine decay to 2%% of --lr, or the authors' constant rate")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--outlier-batch-size", type=int, default=40,
                        help="pseudo outliers appended to each student batch (about the authors' 0.37 ratio)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outlier-images", type=int, default=20000, help="seeded subset of the other set's train split")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default: benchmarks/results/score_regression_<mnist|fmnist>.json)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC tensors and teacher weights (about 20%% faster teacher steps on CPU; same maths)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the loops run where the data is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    output = args.output or RESULTS / f"score_regression_{SHORT_NAMES[args.dataset]}.json"
    results = ResultsFile(output, ("dataset", "normal_class", "technique", "student", "seed", "teacher_epochs", "lr_schedule"))
    outlier_images = None
    if any(TECHNIQUES[t][2] for t in args.techniques):
        partner = OUTLIER_PARTNER[args.dataset]
        outlier_images = load_outlier_images(partner, args.data_root / partner, args.outlier_images, seed=args.seed)
    for normal_class in args.classes:
        run_class(args, results, normal_class, outlier_images)


if __name__ == "__main__":
    main()
