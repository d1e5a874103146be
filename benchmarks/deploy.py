"""Speed and size of what ships: each scheme's deployable student beside its teacher, one thread.

For every point of the plan the scheme is built exactly as its experiment config builds it
(``kd_experiments.train`` composes the same config; no training: latency does not depend on
the weights), with the datamodule's preprocessing, and
:func:`kd_experiments.deployable.measure_deployment` measures the deployable student
(``scheme.deployable_model()``) and the teacher in the same form
(``scheme.teacher_deployable_model()``; for RD the encoder with a full-width student) side
by side in one process, one thread, in PyTorch and in ONNX Runtime: latency at batch 1
(median of ``--latency-calls`` calls after warm-up), images per second at batch 32
(``--throughput-calls`` calls), parameters, MACs (per image) and bytes (the state dict; the
ONNX file for ONNX Runtime). Plan:

- ``reverse_distillation`` at compression ratios 1, 16, 64 (``experiment=rd_mvtec``, bottle,
  256 px: EfficientNet-Lite0 encoder + student);
- ``progressive_gan``: the P-KDGAN student (``experiment=pkd_mnist``: MNIST 32 px, the
  student at least 100x fewer MACs than the EDE-GAN teacher generator);
- ``score_regression``: the paper's smallest student G (``experiment=score_regression_mnist``,
  28 px) against its autoencoder teacher.

One record per (scheme, compression ratio, role, runtime) in ``benchmarks/results/deploy.json``
(``runs``: ``scheme``, ``compression_ratio``, ``role`` (student | teacher), ``runtime``
(torch | onnxruntime), ``latency_ms_b1``, ``images_per_s_b32``, ``params``, ``macs``,
``model_bytes``, and the per-record provenance of :mod:`benchmarks.harness`); the four
records of a point share ``started_at`` (measured together). Resumable: a point whose four
records are there is skipped. Timings depend on the machine and its load (``machine`` in
each record); compare student and teacher within a point.

    python -m benchmarks.deploy                       # the whole plan (about 5 minutes)
    python -m benchmarks.deploy --only rd             # RD points only
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.harness import ResultsFile, base_parser, compose, now_utc

#: (scheme label, compression ratio label, experiment overrides)
PLAN: tuple[tuple[str, float | None, tuple[str, ...]], ...] = (
    ("reverse_distillation", 1, ("experiment=rd_mvtec", "data.category=bottle", "scheme.compression_ratio=1")),
    ("reverse_distillation", 16, ("experiment=rd_mvtec", "data.category=bottle", "scheme.compression_ratio=16")),
    ("reverse_distillation", 64, ("experiment=rd_mvtec", "data.category=bottle", "scheme.compression_ratio=64")),
    ("progressive_gan", None, ("experiment=pkd_mnist",)),
    ("score_regression", None, ("experiment=score_regression_mnist",)),
)
ROLES = (("student", ""), ("teacher", "teacher_"))
RUNTIMES = (("torch", ""), ("onnxruntime", "onnx_"))


def build_scheme(overrides: list[str]):
    """The scheme of a composed ``kd-train`` config, as ``kd_experiments.train`` builds it, with
    its datamodule's preprocessing; returns ``(scheme, cfg)``."""
    import lightning as L

    from kd_experiments import config as kd_config
    from kd_experiments.deployable import Preprocessing

    cfg = compose(overrides)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = kd_config.instantiate(cfg.data)
    scheme = kd_config.instantiate(cfg.scheme, input_shape=tuple(datamodule.input_shape))
    scheme.preprocessing = Preprocessing.from_datamodule(datamodule)
    return scheme.eval(), cfg


def records_of(figures: dict[str, float], common: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per (role, runtime) from :func:`measure_deployment`'s figures."""
    records = []
    for role, prefix in ROLES:
        for runtime, engine in RUNTIMES:
            latency = figures.get(f"deploy/{prefix}{engine}latency_ms_b1")
            if latency is None:
                continue
            records.append({
                **common,
                "role": role,
                "runtime": runtime,
                "latency_ms_b1": latency,
                "images_per_s_b32": figures[f"deploy/{prefix}{engine}images_per_s_b32"],
                "params": int(figures[f"deploy/{prefix}params"]),
                "macs": int(figures[f"deploy/{prefix}macs"]),
                "model_bytes": int(figures[f"deploy/{prefix}{engine}model_bytes"]),
            })
    return records


def main() -> None:
    parser = base_parser(__doc__, output="deploy.json")
    parser.add_argument("--latency-calls", type=int, default=100, help="timed batch-1 calls (median; >= 50)")
    parser.add_argument("--throughput-calls", type=int, default=10, help="timed batch-32 calls")
    parser.add_argument("--only", nargs="*", default=None,
                        help="scheme name prefixes to measure (rd, progressive_gan, score_regression)")
    args = parser.parse_args()
    if args.threads != 1:
        parser.error("deploy figures are measured on one thread (--threads 1)")
    torch.set_num_threads(1)
    from kd_experiments.deployable import measure_deployment

    results = ResultsFile(args.output, key_fields=("scheme", "compression_ratio", "role", "runtime"))
    for scheme_name, ratio, overrides in PLAN:
        short = "rd" if scheme_name == "reverse_distillation" else scheme_name
        if args.only and not any(short.startswith(p) or scheme_name.startswith(p) for p in args.only):
            continue
        overrides = [*overrides, f"data.root={args.data_root / ('mvtec_ad' if short == 'rd' else 'mnist')}"]
        scheme, cfg = build_scheme(overrides)
        summary = scheme.compression_summary()
        label = float(ratio) if ratio is not None else round(float(summary["compression_ratio"]), 2)
        wanted = [{"scheme": scheme_name, "compression_ratio": label, "role": r, "runtime": t}
                  for r, _ in ROLES for t, _ in RUNTIMES]
        if all(results.has(key) for key in wanted):
            print(f"{scheme_name} ratio {label}: done before, skipped", flush=True)
            continue
        started_at, started = now_utc(), time.perf_counter()
        figures = measure_deployment(scheme.deployable_model(), scheme.teacher_deployable_model(),
                                     latency_calls=args.latency_calls, throughput_calls=args.throughput_calls)
        wall = time.perf_counter() - started
        common = {
            "scheme": scheme.scheme_name if scheme_name != "reverse_distillation" else scheme_name,
            "compression_ratio": label,
            "measured_compression_ratio": float(summary["compression_ratio"]),
            "mac_compression_ratio": float(summary["mac_compression_ratio"]),
            "deployed_compression_ratio": float(summary["deployed_compression_ratio"]),
            "student_spec": str(summary.get("student_spec", summary.get("width_multiplier", ""))),
            "experiment": str(cfg.experiment_name),
            "dataset": str(cfg.data.get("category") or cfg.data.get("dataset")),
            "image_size": list(scheme.deployable_model().input_size),
            "threads": 1,
            "latency_calls": args.latency_calls,
            "throughput_calls": args.throughput_calls,
            "weights": "untrained (latency does not depend on them); built as the experiment config builds them",
        }
        for record in records_of(figures, common):
            results.append(record, started_at=started_at, wall_s=wall, skip_if_present=True)
            print(f"{record['scheme']:>20} ratio {label:>7} {record['role']:>7} {record['runtime']:>11}: "
                  f"{record['latency_ms_b1']:8.2f} ms (b1) {record['images_per_s_b32']:8.1f} img/s (b32) "
                  f"{record['params']:>9} params {record['macs']:>11} MACs", flush=True)


if __name__ == "__main__":
    main()
