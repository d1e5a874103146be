"""``kd-report``: read a sweep back from MLflow and show quality against size.

    kd-report                                   # the most recent experiment
    kd-report --experiment quickstart           # every run of one experiment
    kd-report --experiment quickstart --sweep <sweep_id>   # or --sweep latest

Prints a Rich table (one row per run: scheme, dataset, seed, compression ratio,
sizes, key metrics, status). Works on any tracking URI (``--tracking-uri`` or
``MLFLOW_TRACKING_URI``; default ``./mlruns/mlflow.db``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kd_experiments.errors import KDError, TrackingError
from kd_experiments.tracking import PARENT_TAG, make_client, resolve_tracking_uri

DEFAULT_METRICS = (
    "test/image_auroc",
    "test/teacher_image_auroc",
    "test/pixel_auroc",
    "test/aupro",
)


@dataclass
class RunRecord:
    """One run as the report sees it."""

    run_id: str
    run_name: str
    status: str
    scheme: str
    dataset: str
    seed: str
    sweep_id: str
    compression_ratio: float
    mac_compression_ratio: float
    teacher_params: float
    student_params: float
    student_macs: float
    duration_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    sweep_id: str | None = None,
) -> tuple[str, list[RunRecord]]:
    """The runs (not sweep parents) of an experiment, optionally of one sweep.

    Returns the experiment name and the records sorted by scheme, ratio and seed.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    if experiment is None:
        experiments = [e for e in client.search_experiments() if e.name != "Default"]
        if not experiments:
            raise TrackingError(f"no experiment with runs in {uri}; run kd-train first")
        chosen = max(experiments, key=lambda e: e.last_update_time or e.creation_time or 0)
    else:
        chosen = client.get_experiment_by_name(experiment)
        if chosen is None:
            names = sorted(e.name for e in client.search_experiments())
            raise TrackingError(f"no MLflow experiment named {experiment!r} in {uri}; found {names}")
    runs = client.search_runs([chosen.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
    if sweep_id == "latest":
        sweep_id = next((r.data.tags["sweep_id"] for r in runs if r.data.tags.get("sweep_id")), None)
        if sweep_id is None:
            raise TrackingError(f"experiment {chosen.name!r} has no sweep (runs with a sweep_id tag)")
    records = []
    for run in runs:
        tags = run.data.tags
        if tags.get(PARENT_TAG) == "true":
            continue
        if sweep_id and tags.get("sweep_id") != sweep_id:
            continue
        params = run.data.params
        duration = run.data.metrics.get("duration_s", math.nan)
        records.append(
            RunRecord(
                run_id=run.info.run_id,
                run_name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                scheme=params.get("scheme", tags.get("scheme", "?")),
                dataset=tags.get("dataset", "?"),
                seed=tags.get("seed", params.get("seed", "?")),
                sweep_id=tags.get("sweep_id", ""),
                compression_ratio=_float(params.get("compression_ratio")),
                mac_compression_ratio=_float(params.get("mac_compression_ratio")),
                teacher_params=_float(params.get("teacher_params")),
                student_params=_float(params.get("student_params")),
                student_macs=_float(params.get("student_macs")),
                duration_s=_float(duration),
                metrics=dict(run.data.metrics),
            )
        )
    records.sort(key=lambda r: (r.scheme, r.dataset, r.compression_ratio, r.seed, r.run_name))
    return chosen.name, records


def metric_columns(records: Sequence[RunRecord], wanted: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    """The wanted metrics that at least one run has."""
    return [name for name in wanted if any(name in r.metrics for r in records)]


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:g}"


def render_table(experiment: str, records: Sequence[RunRecord], columns: Sequence[str]):
    """A Rich table of the runs."""
    from rich.table import Table

    table = Table(title=f"MLflow experiment '{experiment}': {len(records)} runs", show_lines=False)
    for header in ("run", "status", "scheme", "dataset", "seed", "ratio", "MAC ratio", "student params", "teacher params"):
        table.add_column(header, justify="right" if header not in ("run", "status", "scheme", "dataset") else "left")
    for column in columns:
        table.add_column(column.removeprefix("test/"), justify="right")
    table.add_column("time (s)", justify="right")
    for record in records:
        table.add_row(
            record.run_name,
            record.status,
            record.scheme,
            record.dataset,
            str(record.seed),
            _fmt(record.compression_ratio, 1),
            _fmt(record.mac_compression_ratio, 1),
            _fmt(record.student_params, 0),
            _fmt(record.teacher_params, 0),
            *[_fmt(record.metrics.get(c, math.nan)) for c in columns],
            _fmt(record.duration_s, 1),
        )
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-report", description="Tables of the runs of an MLflow experiment, by compression ratio."
    )
    parser.add_argument("--experiment", "-e", help="MLflow experiment name (default: the most recent)")
    parser.add_argument("--sweep", help="only the runs of this sweep_id ('latest': the most recent sweep)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric columns (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``kd-report``."""
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console()
    try:
        experiment, records = load_runs(args.tracking_uri, args.experiment, args.sweep)
    except KDError as error:
        print(f"kd-report: error: {error}", file=sys.stderr)
        return 1
    if not records:
        print(f"kd-report: experiment {experiment!r} has no runs" + (f" in sweep {args.sweep}" if args.sweep else ""))
        return 1
    console.print(render_table(experiment, records, metric_columns(records, args.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
