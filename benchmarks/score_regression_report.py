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
    """One table per training budget (teacher epochs, lr schedule) found in the file."""
    path = RESULTS / f"score_regression_{dataset}.json"
    if not path.exists():
        return f"({path.name} not written yet)\n"
    runs = json.loads(path.read_text())["runs"]
    budgets: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for run in runs:
        budgets[(run["teacher_epochs"], run.get("lr_schedule", "cosine"))].append(run)
    return "\n".join(_budget_tables(dataset, epochs, schedule, budget_runs)
                     for (epochs, schedule), budget_runs in sorted(budgets.items()))


def _budget_tables(dataset: str, epochs: int, schedule: str, runs: list[dict]) -> str:
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
    lr = runs[0]["lr"]
    lines = [(f"**{dataset}, teacher {epochs} epochs, lr {lr:g} {schedule}**: teacher AUROC "
             f"{_mean_std(list(teacher.values()))} over classes {classes} ({len(runs)} records)"), ""]
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


def _number(run: dict, key: str, form: str = ".4f") -> str:
    return format(run[key], form) if key in run else "-"


def teacher_budget_table() -> str:
    """Validation AUROC of the teacher per epoch (score_regression_teacher_budget.py), mean over classes."""
    lines = []
    for dataset in ("mnist", "fashion_mnist"):
        path = RESULTS / f"score_regression_teacher_budget_{dataset}.json"
        if not path.exists():
            continue
        runs = json.loads(path.read_text())["runs"]
        by_class: dict[int, dict[int, float]] = defaultdict(dict)
        for run in runs:
            by_class[run["normal_class"]][run["epoch"]] = run["val_auroc"]
        epochs = [e for e in (1, 3, 5, 10, 15, 20, 25, 30) if any(e in v for v in by_class.values())]
        if not lines:
            lines += ["| set | class | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                      "|---|---|" + "---|" * len(epochs)]
        for normal_class, values in sorted(by_class.items()):
            lines.append(f"| {dataset} | {normal_class} | "
                         + " | ".join(f"{values[e]:.3f}" if e in values else "-" for e in epochs) + " |")
    return "\n".join(lines) + "\n"


def deploy_table() -> str:
    path = RESULTS / "score_regression_deploy.json"
    if not path.exists():
        return "(score_regression_deploy.json not written yet)\n"
    runs = json.loads(path.read_text())["runs"]
    lines = [("| training | model | params | MACs | AUROC fp32 | AUROC int8 PTQ | PTQ - fp32 | AUROC QAT float twin | "
             "AUROC QAT int8 | QAT int8 - twin | max abs ONNX-torch | "
             "batch-1 latency torch / ORT (ms) | throughput torch / ORT (img/s) | x teacher (torch / ORT) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run.get('technique', 'co_learning')}, {run['epochs']} ep, lr {run.get('lr', 3e-3):g} {run.get('lr_schedule', 'cosine')} "
            f"| {run['model']} | {run['params']} | {run['macs']} | {run['fp32_auroc']:.4f} | {run['int8_auroc']:.4f} "
            f"| {run['int8_auroc_difference']:+.4f} | {_number(run, 'qat_float_auroc')} "
            f"| {_number(run, 'qat_int8_auroc')} | {_number(run, 'qat_int8_auroc_difference', '+.4f')} "
            f"| {run['onnx_max_abs_difference']:.1e} "
            f"| {run['torch_fp32_latency_batch1_ms']:.3f} / {run['onnxruntime_fp32_latency_batch1_ms']:.3f} "
            f"| {run['torch_fp32_throughput_per_s']:.0f} / {run['onnxruntime_fp32_throughput_per_s']:.0f} "
            f"| {run.get('torch_fp32_throughput_vs_teacher', float('nan')):.1f} / "
            f"{run.get('onnxruntime_fp32_throughput_vs_teacher', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    for dataset in ("mnist", "fashion_mnist"):
        print(training_tables(dataset))
    print(teacher_budget_table())
    print(deploy_table())


if __name__ == "__main__":
    main()
