"""Markdown tables from the score-regression benchmark JSONs (mean and std over classes).

    .venv/bin/python benchmarks/score_regression_report.py
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STUDENTS = "ABCDEFG"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def training_tables(dataset: str) -> str:
    path = RESULTS / f"score_regression_{dataset}.json"
    if not path.exists():
        return f"({path.name} not written yet)\n"
    runs = json.loads(path.read_text())["runs"]
    teacher = {}
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    retention: dict[tuple[str, str], list[float]] = defaultdict(list)
    ratios = {}
    for run in runs:
        teacher[run["normal_class"]] = run["teacher_auroc"]
        cells[(run["technique"], run["student"])].append(run["student_auroc"])
        retention[(run["technique"], run["student"])].append(run["retention"])
        ratios[run["student"]] = (run["student_params"], run["compression_ratio"])
    techniques = sorted({t for t, _ in cells})
    classes = sorted(teacher)
    lines = [f"**{dataset}**: teacher AUROC {_mean_std(list(teacher.values()))} over classes {classes} "
             f"({len(runs)} records)", ""]
    lines.append("| student (params, ratio) | " + " | ".join(techniques) + " |")
    lines.append("|---|" + "---|" * len(techniques))
    for student in STUDENTS:
        if student not in ratios:
            continue
        params, ratio = ratios[student]
        row = [f"{student} ({params}, {ratio:.1f}x)"]
        for technique in techniques:
            values = cells.get((technique, student), [])
            row.append(f"{_mean_std(values)} (n={len(values)})" if values else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Retention (student / teacher AUROC), mean over classes:")
    lines.append("")
    lines.append("| student | " + " | ".join(techniques) + " |")
    lines.append("|---|" + "---|" * len(techniques))
    for student in STUDENTS:
        if student in ratios:
            lines.append(f"| {student} | " + " | ".join(
                f"{statistics.mean(retention[(t, student)]):.3f}" if retention.get((t, student)) else "-"
                for t in techniques) + " |")
    return "\n".join(lines) + "\n"


def deploy_table() -> str:
    path = RESULTS / "score_regression_deploy.json"
    if not path.exists():
        return "(score_regression_deploy.json not written yet)\n"
    runs = json.loads(path.read_text())["runs"]
    lines = ["| model | params | MACs | AUROC fp32 | AUROC int8 | int8 - fp32 | max abs ONNX-torch | "
             "batch-1 latency torch / ORT (ms) | throughput torch / ORT (img/s) | x teacher (torch / ORT) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run['model']} | {run['params']} | {run['macs']} | {run['fp32_auroc']:.4f} | {run['int8_auroc']:.4f} "
            f"| {run['int8_auroc_difference']:+.4f} | {run['onnx_max_abs_difference']:.1e} "
            f"| {run['torch_fp32_latency_batch1_ms']:.3f} / {run['onnxruntime_fp32_latency_batch1_ms']:.3f} "
            f"| {run['torch_fp32_throughput_per_s']:.0f} / {run['onnxruntime_fp32_throughput_per_s']:.0f} "
            f"| {run.get('torch_fp32_throughput_vs_teacher', float('nan')):.1f} / "
            f"{run.get('onnxruntime_fp32_throughput_vs_teacher', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    for dataset in ("mnist", "fashion_mnist"):
        print(training_tables(dataset))
    print(deploy_table())


if __name__ == "__main__":
    main()
