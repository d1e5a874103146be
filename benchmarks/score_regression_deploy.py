"""Benchmark: deploying Pol et al.'s students: int8, ONNX Runtime, CPU latency and throughput.

One normal class (MNIST digit 0 by default, ``protocol=balanced``): the conv-autoencoder
teacher and the seven students A-G are trained in one loop (co-learning, optionally with
pseudo outlier exposure, fixed epochs, :mod:`kd_experiments.schemes.score_regression.family`)
and cached; then, per model:

- fp32 AUROC (PyTorch) and int8 AUROC after static post-training quantisation
  (:func:`kd_experiments.compression.quantize_int8_static`: torch FX graph mode, x86
  backend, per-channel int8 weights, uint8 activations, calibrated on 500 *training*
  images of the normal class and 500 pseudo outliers from the other set's *training*
  split, so the output range covers anomalous scores; no test image is used);
- int8 after quantisation-aware training (:func:`kd_experiments.compression.quantize_int8_qat`:
  FX graph mode fake quantisation, 2 epochs of Adam at lr 1e-4 on the student's own
  objective, L1 to the trained teacher's score on the normal *training* images, moving-
  average observers updated throughout). Fine-tuning changes the network, so its int8 AUROC is
  compared with its *float twin* (the same fine-tuned weights without fake
  quantisation), which isolates what int8 costs; the twin's AUROC is recorded too;
- ONNX export (:func:`~kd_experiments.compression.export_onnx`) and the largest
  |PyTorch - ONNX Runtime| score difference over the whole test split
  (:func:`~kd_experiments.compression.onnx_parity`), plus the AUROC from ONNX Runtime;
- CPU latency at batch 1 and throughput at batch 1024 (median of repeated calls,
  :func:`~kd_experiments.compression.measure_latency`), one thread, for PyTorch fp32,
  PyTorch int8 and ONNX Runtime fp32. The teacher's timed function is its whole score
  (reconstruction + ``log(1 + MSE)``), the students' their forward pass.

Resumable: one record per model, appended at once; present records are skipped::

    .venv/bin/python -m benchmarks.score_regression_deploy
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import ROOT, ResultsFile, base_parser, now_utc
from kd_experiments import metrics as kd_metrics
from kd_experiments.compression import (
    count_macs,
    count_parameters,
    export_onnx,
    measure_latency,
    onnx_parity,
    quantize_int8_qat,
    quantize_int8_static,
)
from kd_experiments.data.one_class import OneClassDataModule
from kd_experiments.schemes.score_regression.family import StudentTrack, fit_students, predict
from kd_experiments.schemes.score_regression.lightning_model import teacher_training_loss
from kd_experiments.schemes.score_regression.techniques import (
    OUTLIER_PARTNER,
    OutlierSampler,
    load_outlier_images,
)
from kd_experiments.schemes.score_regression.torch_model import (
    PAPER_STUDENTS,
    ConvAutoencoder,
    ReconstructionScorer,
    build_student,
)


def trained_models(args, train_images: torch.Tensor, sampler: OutlierSampler | None) -> dict[str, nn.Module]:
    schedule = "" if args.lr_schedule == "cosine" else f"_{args.lr_schedule}{args.lr:g}"
    technique = "" if args.technique == "co_learning" else "_oe"
    cache = ROOT / ".cache" / "score_regression_deploy" / (
        f"{args.dataset}_c{args.normal_class}_e{args.epochs}{schedule}{technique}_s{args.seed}.pt")
    torch.manual_seed(args.seed)
    teacher = ConvAutoencoder()
    students = {name: build_student(spec, (1, 28, 28)) for name, spec in PAPER_STUDENTS.items()}
    if cache.is_file():
        state = torch.load(cache, weights_only=True)
        teacher.load_state_dict(state["teacher"])
        for name, student in students.items():
            student.load_state_dict(state[name])
    else:
        tracks = [StudentTrack(args.technique, name, model, outlier_exposure=sampler is not None)
                  for name, model in students.items()]
        started = time.perf_counter()
        fit_students(tracks, teacher, train_images, args.epochs, teacher_loss_fn=functools.partial(teacher_training_loss),
                     outliers=sampler,
                     outlier_batch_size=args.outlier_batch_size, lr=args.lr, seed=args.seed,
                     lr_schedule=args.lr_schedule)
        print(f"trained teacher + 7 students in {time.perf_counter() - started:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"teacher": teacher.state_dict(), **{n: s.state_dict() for n, s in students.items()}}, cache)
    models: dict[str, nn.Module] = {"teacher": ReconstructionScorer(teacher)}
    models.update(students)
    for model in models.values():
        model.eval()
    return models


def qat_record(model: nn.Module, batches, test_images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict:
    """int8 after quantisation-aware training, against its float twin (see the module docstring)."""
    quantised, twin = quantize_int8_qat(model, batches, nn.functional.l1_loss, epochs=2, lr=1e-4, seed=seed,
                                        return_float=True)
    int8_scores, float_scores = predict(quantised, test_images), predict(twin, test_images)
    record = {
        "qat_int8_auroc": kd_metrics.image_auroc(int8_scores, labels),
        "qat_float_auroc": kd_metrics.image_auroc(float_scores, labels),
        "qat_max_score_difference": float((int8_scores - float_scores).abs().max()),
        "qat_epochs": 2, "qat_lr": 1e-4,
    }
    record["qat_int8_auroc_difference"] = record["qat_int8_auroc"] - record["qat_float_auroc"]
    return record


def onnx_runner(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def main() -> None:
    parser = base_parser(__doc__, output="score_regression_deploy.json", threads=False)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--normal-class", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--technique", choices=["co_learning", "co_learning+outlier_exposure"], default="co_learning",
                        help="how teacher and students are trained (the students deployed)")
    parser.add_argument("--outlier-images", type=int, default=20000, help="pseudo outliers: seeded subset of the other set")
    parser.add_argument("--outlier-batch-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=200, help="timed batch-1 calls (median)")
    parser.add_argument("--large-repeats", type=int, default=5, help="timed large-batch calls (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "x86"
    results = ResultsFile(args.output, ("dataset", "normal_class", "model", "seed", "epochs", "lr_schedule", "technique"))

    data = OneClassDataModule(dataset=args.dataset, root=args.data_root / args.dataset, normal_class=args.normal_class,
                              protocol="balanced", normalization="none", seed=args.seed)
    data.setup("fit")
    train_images = data.train_dataset.images
    test_images, labels = data.test_dataset.images, data.test_dataset.labels
    partner = OUTLIER_PARTNER[args.dataset]
    sampler = None
    if args.technique == "co_learning+outlier_exposure":
        pool = load_outlier_images(partner, args.data_root / partner, max_images=args.outlier_images, seed=args.seed)
        sampler = OutlierSampler(pool, args.outlier_batch_size, seed=args.seed)
    models = trained_models(args, train_images, sampler)
    # Calibration: normal training images and pseudo outliers (the other set's training
    # split, as outlier exposure): the activation ranges must cover the high scores of
    # anomalies, or the int8 output clips them and ties them. No test image is used.
    outliers = load_outlier_images(partner, args.data_root / partner, max_images=500, seed=args.seed)
    calibration = [train_images[i : i + 100] for i in range(0, min(500, len(train_images)), 100)]
    calibration += [outliers[i : i + 100] for i in range(0, len(outliers), 100)]
    one, many = test_images[:1].contiguous(), test_images[: args.large_batch].contiguous()
    if len(many) < args.large_batch:
        many = test_images.repeat(-(-args.large_batch // len(test_images)), 1, 1, 1)[: args.large_batch].contiguous()

    # QAT data: the students' own training inputs (normal training images, plus a batch
    # of pseudo outliers each with outlier exposure), labelled by the trained teacher.
    qat_generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_images), generator=qat_generator)
    qat_batches = []
    for index in order.split(100):
        inputs = train_images[index]
        if sampler is not None:
            inputs = torch.cat([inputs, sampler.sample(args.outlier_batch_size)])
        qat_batches.append((inputs, predict(models["teacher"], inputs)))

    for name, model in models.items():
        key = {"dataset": args.dataset, "normal_class": args.normal_class, "model": name, "seed": args.seed, "epochs": args.epochs,
                   "lr_schedule": args.lr_schedule, "technique": args.technique}
        done = results.find(key)
        if done is not None:
            if name != "teacher" and "qat_int8_auroc" not in done:
                done = results.update(key, qat_record(model, qat_batches, test_images, labels, args.seed))
                print(f"{name}: QAT int8 {done['qat_int8_auroc']:.4f} vs float twin {done['qat_float_auroc']:.4f}",
                      flush=True)
            else:
                print(f"{name}: done, skipped", flush=True)
            continue
        started_at, started = now_utc(), time.perf_counter()
        record: dict[str, object] = {**key, "lr": args.lr, "params": count_parameters(model), "macs": count_macs(model, one)}
        fp32_scores = predict(model, test_images)
        record["fp32_auroc"] = kd_metrics.image_auroc(fp32_scores, labels)

        quantised = quantize_int8_static(model, calibration)
        int8_scores = predict(quantised, test_images)
        record["int8_auroc"] = kd_metrics.image_auroc(int8_scores, labels)
        record["int8_auroc_difference"] = record["int8_auroc"] - record["fp32_auroc"]
        record["int8_max_score_difference"] = float((int8_scores - fp32_scores).abs().max())
        if name != "teacher":
            record.update(qat_record(model, qat_batches, test_images, labels, args.seed))

        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, one, Path(folder) / f"{name}.onnx")
            record["onnx_bytes"] = path.stat().st_size
            record["onnx_max_abs_difference"] = onnx_parity(model, path, test_images)
            run_onnx = onnx_runner(path)
            record["onnx_auroc"] = kd_metrics.image_auroc(predict(run_onnx, test_images), labels)
            for runtime, function in (("torch_fp32", model), ("torch_int8", quantised), ("onnxruntime_fp32", run_onnx)):
                latency = measure_latency(function, one, repeats=args.repeats, warmup=10)
                batch_seconds = measure_latency(function, many, repeats=args.large_repeats, warmup=1)
                record[f"{runtime}_latency_batch1_ms"] = latency * 1e3
                record[f"{runtime}_throughput_per_s"] = args.large_batch / batch_seconds
        record["large_batch"] = args.large_batch
        results.append(record, started_at=started_at, wall_s=time.perf_counter() - started)
        print(f"{name}: params {record['params']}, AUROC fp32 {record['fp32_auroc']:.4f} int8 {record['int8_auroc']:.4f}, "
              f"ONNX diff {record['onnx_max_abs_difference']:.2e}, "
              f"throughput torch {record['torch_fp32_throughput_per_s']:.0f}/s "
              f"ORT {record['onnxruntime_fp32_throughput_per_s']:.0f}/s", flush=True)
    budget = (args.epochs, args.lr_schedule, args.technique)
    runs = [r for r in results.reload()["runs"] if (r["epochs"], r["lr_schedule"], r["technique"]) == budget
            and (r["dataset"], r["normal_class"], r["seed"]) == (args.dataset, args.normal_class, args.seed)]
    teacher = next(r for r in runs if r["model"] == "teacher")
    for record in runs:
        ratios = {f"{runtime}_throughput_vs_teacher":
                  record[f"{runtime}_throughput_per_s"] / teacher[f"{runtime}_throughput_per_s"]
                  for runtime in ("torch_fp32", "onnxruntime_fp32")}
        if any(record.get(name) != value for name, value in ratios.items()):
            results.update(record, ratios)


if __name__ == "__main__":
    main()
