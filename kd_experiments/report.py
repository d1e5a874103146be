"""``kd-report``: read a sweep back from MLflow and show quality against size and speed.

    kd-report                                              # the most recent experiment
    kd-report --experiment quickstart                      # every run of one experiment
    kd-report --experiment quickstart --sweep latest       # the most recent sweep (or a sweep_id)
    kd-report -e quickstart --sweep latest --output reports/quickstart   # where the files go

It prints a Rich table (one row per run: scheme, dataset, seed, compression ratio,
sizes, key metrics, status) and a summary by compression ratio, and writes into
``--output`` (default ``$KD_LOG_DIR/reports/<experiment>/<sweep>``, i.e. ``./logs/...``):

- ``report.md``: the summary by compression ratio (mean +- std over seeds, the Pareto
  front marked) and the table of every run, with the charts embedded;
- ``quality_vs_compression.png``: the quality metric against the measured compression
  ratio (teacher params / student params), every seed a faint point, the mean over seeds
  a marker with its standard deviation, the Pareto front (higher quality and higher
  compression are both better) drawn and circled, the teacher's quality as a line;
- ``quality_vs_latency.png``: the quality metric against latency. The latency is the
  runs' inference-latency metric when they logged one (``deploy/latency_ms_b1``, the
  deployable student at batch 1 on one CPU thread, which every run logs; or
  ``test/latency_ms`` or another ``*latency_ms`` metric that is not the teacher's), else the run's wall-clock
  ``duration_s`` (training + test): the axis label says which;
- ``spread_by_ratio.png``: per compression ratio, the spread of the quality metric over
  seeds (box plot with every seed as a point);
- ``quality_by_category.png`` (runs tagged with a ``category``, e.g. a sweep over
  ``data.category``): the quality metric against the compression ratio, one line per
  category and one for the mean over categories, a panel per scheme and image size.

Runs tagged with a ``category`` also get per-category tables (one per scheme, data family,
image size and compression ratio: a row per category, mean +- std over seeds of every
metric, and the mean over categories), as the papers' per-category tables. Runs at
different image sizes (tag ``image_size``) are never summarised together.

The files are logged as artifacts (under ``report/``) of the sweep's parent run (the run
tagged ``kd.sweep_parent=true`` with the sweep's ``sweep_id``); when the report covers
runs of several sweeps, or none, there is no single parent and the files are only
written to disk. A parent still RUNNING whose children have all ended is closed
(FINISHED, or FAILED when a child failed): nothing else ends a sweep's parent run.
Works on any tracking URI (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``; default
``./mlruns/mlflow.db``): SQLite, ``file:`` stores, an ``mlflow server``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kd_experiments.errors import KDError, TrackingError
from kd_experiments.tracking import PARENT_TAG, find_sweep_parent, make_client, resolve_tracking_uri

DEFAULT_METRICS = (
    "test/image_auroc",
    "test/teacher_image_auroc",
    "test/pixel_auroc",
    "test/aupro",
)
DEFAULT_QUALITY = "test/image_auroc"
#: inference-latency metrics, in order of preference (the first one the runs have wins)
LATENCY_METRICS = ("deploy/latency_ms_b1", "test/latency_ms", "test/student_latency_ms", "latency_ms")
DURATION_METRIC = "duration_s"
REPORT_ARTIFACT_DIR = "report"
REPORT_FILES = (
    "report.md",
    "quality_vs_compression.png",
    "quality_vs_latency.png",
    "spread_by_ratio.png",
)
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: written (and logged) besides REPORT_FILES when the runs are tagged with a category
CATEGORY_CHART = "quality_by_category.png"
MEAN_ROW = "mean over categories"


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
    #: the ratio the config asked for (``scheme.compression_ratio``); NaN if absent
    target_compression_ratio: float = math.nan
    parent_run_id: str = ""
    #: the data category (tag ``category``, e.g. an MVTec AD category); "" if none
    category: str = ""
    #: the image side in pixels (tag ``image_size``); "" if the data has none
    image_size: str = ""

    @property
    def data_label(self) -> str:
        """The dataset, with its image size for category-tagged (MVTec-style) runs, whose protocol
        it is: ``mvtec-screw @256px``."""
        return f"{self.dataset} @{self.image_size}px" if self.image_size and self.category else self.dataset


@dataclass
class RatioSummary:
    """The runs of one scheme, dataset and compression ratio, summarised over seeds."""

    scheme: str
    dataset: str
    target_compression_ratio: float
    compression_ratio: float  # mean measured ratio over the runs
    student_params: float
    quality: list[float]
    teacher_quality: list[float]
    latency: list[float]
    seeds: list[str]
    on_compression_front: bool = False
    on_latency_front: bool = False
    image_size: str = ""

    @property
    def data_label(self) -> str:
        return f"{self.dataset} @{self.image_size}px" if self.image_size else self.dataset

    @property
    def label(self) -> str:
        return f"{self.scheme} / {self.data_label}"

    @property
    def quality_mean(self) -> float:
        return _mean(self.quality)

    @property
    def quality_std(self) -> float:
        return _std(self.quality)

    @property
    def latency_mean(self) -> float:
        return _mean(self.latency)

    @property
    def latency_std(self) -> float:
        return _std(self.latency)


@dataclass
class LatencySource:
    """Which metric the latency axis shows, and how to say so."""

    metric: str
    label: str
    is_inference_latency: bool


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    finite = _finite(values)
    return statistics.fmean(finite) if finite else math.nan


def _std(values: Sequence[float]) -> float:
    finite = _finite(values)
    return statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else math.nan


def _side(image_size: str) -> float:
    """An ``image_size`` tag as a number for sorting (NaN-free: absent sorts first)."""
    value = _float(image_size)
    return value if math.isfinite(value) else -1.0


# -- reading MLflow -------------------------------------------------------------------------
def _find_experiment(client, uri: str, experiment: str | None):
    if experiment is None:
        experiments = [e for e in client.search_experiments() if e.name != "Default"]
        if not experiments:
            raise TrackingError(f"no experiment with runs in {uri}; run kd-train first")
        return max(experiments, key=lambda e: e.last_update_time or e.creation_time or 0)
    chosen = client.get_experiment_by_name(experiment)
    if chosen is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment named {experiment!r} in {uri}; found {names}")
    return chosen


def _search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment matching the filter, following MLflow's pages."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    sweep_id: str | None = None,
) -> tuple[str, list[RunRecord]]:
    """The runs (not sweep parents) of an experiment, optionally of one sweep.

    ``sweep_id="latest"`` picks the sweep of the most recently started run that has one.
    Returns the experiment name and the records sorted by scheme, dataset, ratio and seed.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    chosen = _find_experiment(client, uri, experiment)
    runs = _search_all_runs(client, chosen.experiment_id)
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
                duration_s=_float(run.data.metrics.get(DURATION_METRIC, math.nan)),
                metrics=dict(run.data.metrics),
                target_compression_ratio=_float(params.get("scheme.compression_ratio")),
                parent_run_id=tags.get("mlflow.parentRunId", ""),
                category=tags.get("category", params.get("data.category", "")),
                image_size=tags.get("image_size", ""),
            )
        )
    records.sort(key=lambda r: (r.scheme, r.dataset, _side(r.image_size), r.compression_ratio, r.seed, r.run_name))
    return chosen.name, records


def metric_columns(records: Sequence[RunRecord], wanted: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    """The wanted metrics that at least one run has."""
    return [name for name in wanted if any(name in r.metrics for r in records)]


def choose_quality_metric(records: Sequence[RunRecord], wanted: str | None = None) -> str:
    """``wanted`` if given, else the first of :data:`DEFAULT_METRICS` a run has (student metrics)."""
    if wanted:
        return wanted
    for name in DEFAULT_METRICS:
        if "teacher" not in name and any(name in r.metrics for r in records):
            return name
    return DEFAULT_QUALITY


def choose_latency(records: Sequence[RunRecord]) -> LatencySource:
    """The inference-latency metric the runs logged, else the runs' wall-clock duration."""
    names = {name for r in records for name in r.metrics}
    candidates = [m for m in LATENCY_METRICS if m in names]
    candidates += sorted(n for n in names if n.endswith("latency_ms") and "teacher" not in n and n not in candidates)
    if candidates:
        metric = candidates[0]
        return LatencySource(metric, f"{metric} (student inference latency, ms)", True)
    return LatencySource(
        DURATION_METRIC,
        "duration_s: run wall-clock time, training + test (s); no inference-latency metric was logged",
        False,
    )


# -- summarising ----------------------------------------------------------------------------
def pareto_front(
    points: Sequence[tuple[float, float]], maximize_x: bool = True, maximize_y: bool = True
) -> list[int]:
    """Indices of the non-dominated points (NaN points are never on the front).

    A point dominates another when it is at least as good on both axes and better on
    one; "good" is larger or smaller per axis as the flags say. Returned sorted by x.
    """
    sign_x = 1.0 if maximize_x else -1.0
    sign_y = 1.0 if maximize_y else -1.0
    scored = [
        (index, sign_x * x, sign_y * y)
        for index, (x, y) in enumerate(points)
        if math.isfinite(x) and math.isfinite(y)
    ]
    front = []
    for index, x, y in scored:
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for other, ox, oy in scored if other != index
        )
        if not dominated:
            front.append(index)
    return sorted(front, key=lambda i: points[i][0])


def _ratio_key(record: RunRecord) -> float:
    """The ratio a run is grouped under: the one asked for, else the measured one (1 decimal)."""
    if math.isfinite(record.target_compression_ratio):
        return record.target_compression_ratio
    return round(record.compression_ratio, 1)


def summarize_by_ratio(
    records: Sequence[RunRecord], quality: str, latency: LatencySource
) -> list[RatioSummary]:
    """One :class:`RatioSummary` per scheme, dataset and compression ratio (FINISHED runs only),
    with both Pareto fronts marked (quality vs compression ratio, quality vs latency)."""
    teacher_quality = quality.replace("test/", "test/teacher_", 1) if quality.startswith("test/") else ""
    groups: dict[tuple[str, str, str, float], list[RunRecord]] = {}
    for record in records:
        if record.status != "FINISHED":
            continue
        groups.setdefault((record.scheme, record.dataset, record.image_size, _ratio_key(record)), []).append(record)
    summaries = [
        RatioSummary(
            scheme=scheme,
            dataset=dataset,
            target_compression_ratio=ratio_key,
            compression_ratio=_mean([r.compression_ratio for r in members]),
            student_params=_mean([r.student_params for r in members]),
            quality=[r.metrics.get(quality, math.nan) for r in members],
            teacher_quality=[r.metrics.get(teacher_quality, math.nan) for r in members],
            latency=[r.metrics.get(latency.metric, math.nan) for r in members],
            seeds=[str(r.seed) for r in members],
            image_size=image_size if any(r.category for r in members) else "",
        )
        for (scheme, dataset, image_size, ratio_key), members in groups.items()
    ]
    summaries.sort(key=lambda s: (s.scheme, s.dataset, _side(s.image_size), s.compression_ratio))
    for index in pareto_front([(s.compression_ratio, s.quality_mean) for s in summaries]):
        summaries[index].on_compression_front = True
    for index in pareto_front([(s.latency_mean, s.quality_mean) for s in summaries], maximize_x=False):
        summaries[index].on_latency_front = True
    return summaries


@dataclass
class CategorySummary:
    """The runs of one scheme, data family, image size and ratio: a row per category.

    ``values[category][metric]`` holds the metric of every seed of that category;
    :meth:`mean_over_categories` is the mean over categories of their means over seeds
    (the papers' "mean" row), over the categories that have the metric.
    """

    scheme: str
    family: str
    image_size: str
    target_compression_ratio: float
    values: dict[str, dict[str, list[float]]]
    seeds: dict[str, list[str]]

    @property
    def categories(self) -> list[str]:
        return sorted(self.values)

    @property
    def title(self) -> str:
        size = f" @{self.image_size}px" if self.image_size else ""
        return f"{self.scheme} / {self.family}{size} / ratio {_fmt(self.target_compression_ratio, 1)}"

    @property
    def panel(self) -> str:
        """The chart panel of this summary: scheme, data family and image size (ratios share one)."""
        size = f" @{self.image_size}px" if self.image_size else ""
        return f"{self.scheme} / {self.family}{size}"

    def category_mean(self, category: str, metric: str) -> float:
        return _mean(self.values[category].get(metric, []))

    def category_std(self, category: str, metric: str) -> float:
        return _std(self.values[category].get(metric, []))

    def categories_with(self, metric: str) -> list[str]:
        return [c for c in self.categories if math.isfinite(self.category_mean(c, metric))]

    def mean_over_categories(self, metric: str) -> float:
        return _mean([self.category_mean(c, metric) for c in self.categories_with(metric)])


def _family(record: RunRecord) -> str:
    """The data set without its category: ``mvtec-screw`` -> ``mvtec``."""
    suffix = f"-{record.category}"
    return record.dataset[: -len(suffix)] if record.dataset.endswith(suffix) else record.dataset


def summarize_by_category(records: Sequence[RunRecord], metrics: Sequence[str]) -> list[CategorySummary]:
    """One :class:`CategorySummary` per scheme, data family, image size and compression ratio,
    from the FINISHED runs tagged with a category (none when no run has one)."""
    groups: dict[tuple[str, str, str, float], list[RunRecord]] = {}
    for record in records:
        if record.status == "FINISHED" and record.category:
            key = (record.scheme, _family(record), record.image_size, _ratio_key(record))
            groups.setdefault(key, []).append(record)
    summaries = []
    for (scheme, family, image_size, ratio), members in groups.items():
        values: dict[str, dict[str, list[float]]] = {}
        seeds: dict[str, list[str]] = {}
        for record in members:
            per_metric = values.setdefault(record.category, {})
            for metric in metrics:
                per_metric.setdefault(metric, []).append(record.metrics.get(metric, math.nan))
            seeds.setdefault(record.category, []).append(str(record.seed))
        summaries.append(CategorySummary(scheme, family, image_size, ratio, values, seeds))
    summaries.sort(key=lambda c: (c.scheme, c.family, _side(c.image_size), c.target_compression_ratio))
    return summaries


# -- tables -----------------------------------------------------------------------------------
def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:g}"


def _fmt_spread(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _run_row(record: RunRecord, columns: Sequence[str]) -> list[str]:
    """One run's cells, as both the Rich table and the Markdown report show them."""
    return [
        record.run_name,
        record.status,
        record.scheme,
        record.data_label,
        str(record.seed),
        _fmt(record.compression_ratio, 1),
        _fmt(record.mac_compression_ratio, 1),
        _fmt(record.student_params, 0),
        _fmt(record.teacher_params, 0),
        *[_fmt(record.metrics.get(c, math.nan)) for c in columns],
        _fmt(record.duration_s, 1),
    ]


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
        table.add_row(*_run_row(record, columns))
    return table


def _summary_rows(summaries: Sequence[RatioSummary], latency: LatencySource) -> list[list[str]]:
    latency_digits = 2 if latency.is_inference_latency else 1
    return [
        [
            s.scheme,
            s.data_label,
            _fmt(s.target_compression_ratio, 1),
            _fmt(s.compression_ratio, 1),
            _fmt(s.student_params, 0),
            str(len(s.quality)),
            _fmt_spread(s.quality_mean, s.quality_std),
            _fmt(_mean(s.teacher_quality)),
            _fmt_spread(s.latency_mean, s.latency_std, latency_digits),
            "yes" if s.on_compression_front else "",
            "yes" if s.on_latency_front else "",
        ]
        for s in summaries
    ]


def _summary_headers(quality: str, latency: LatencySource) -> list[str]:
    return [
        "scheme",
        "dataset",
        "target ratio",
        "measured ratio",
        "student params",
        "seeds",
        f"{quality} (mean ± std)",
        "teacher",
        f"{latency.metric} (mean ± std)",
        "Pareto (ratio)",
        "Pareto (latency)",
    ]


def render_summary_table(summaries: Sequence[RatioSummary], quality: str, latency: LatencySource):
    """A Rich table of the summary by compression ratio."""
    from rich.table import Table

    table = Table(title=f"By compression ratio: {quality}, mean ± std over seeds (FINISHED runs)")
    headers = _summary_headers(quality, latency)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < 2 else "right")
    for row in _summary_rows(summaries, latency):
        table.add_row(*row)
    return table


def _category_headers(metrics: Sequence[str]) -> list[str]:
    return ["category", "seeds", *[f"{m.removeprefix('test/')} (mean ± std)" for m in metrics]]


def _category_rows(summary: CategorySummary, metrics: Sequence[str]) -> list[list[str]]:
    """A row per category (mean ± std over seeds), then the mean over categories."""
    rows = [
        [category, str(len(summary.seeds[category])),
         *[_fmt_spread(summary.category_mean(category, m), summary.category_std(category, m)) for m in metrics]]
        for category in summary.categories
    ]
    mean_cells = []
    for metric in metrics:
        mean = summary.mean_over_categories(metric)
        counted = len(summary.categories_with(metric))
        partial = f" ({counted} of {len(summary.categories)})" if 0 < counted < len(summary.categories) else ""
        mean_cells.append("-" if math.isnan(mean) else f"{mean:.4f}{partial}")
    rows.append([f"**{MEAN_ROW}**", str(len(summary.categories)), *mean_cells])
    return rows


def render_category_tables(summaries: Sequence[CategorySummary], metrics: Sequence[str]) -> list:
    """Rich tables of :func:`summarize_by_category`: per-category rows and their mean."""
    from rich.table import Table

    tables = []
    for summary in summaries:
        table = Table(title=f"By category: {summary.title} (FINISHED runs, mean ± std over seeds)")
        for index, header in enumerate(_category_headers(metrics)):
            table.add_column(header, justify="left" if index == 0 else "right")
        for row in _category_rows(summary, metrics):
            table.add_row(*[cell.replace("**", "") for cell in row])
        tables.append(table)
    return tables


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_categories(categories: Sequence[CategorySummary], columns: Sequence[str]) -> list[str]:
    """The "By category" section: one table per scheme, data family, image size and ratio."""
    if not categories:
        return []
    lines = [
        "## By category",
        "",
        ("One table per scheme, data family, image size and compression ratio (image sizes are never "
         "mixed): a row per category with the mean ± standard deviation over its seeds, then the mean "
         "over categories of those means (the number of categories that have the metric is given when "
         "not all do)."),
        "",
    ]
    for summary in categories:
        lines += [f"### {summary.title}", "", _markdown_table(_category_headers(columns), _category_rows(summary, columns)), ""]
    lines += [f"![quality by category]({CATEGORY_CHART})", ""]
    return lines


def markdown_report(
    experiment: str,
    records: Sequence[RunRecord],
    summaries: Sequence[RatioSummary],
    quality: str,
    latency: LatencySource,
    columns: Sequence[str],
    sweep_id: str | None = None,
    tracking_uri: str = "",
    parent_run_id: str | None = None,
    categories: Sequence[CategorySummary] = (),
) -> str:
    """The Markdown report: context, the per-category tables (runs tagged with a category),
    the summary by ratio, the runs, the charts."""
    finished = sum(r.status == "FINISHED" for r in records)
    statuses = ", ".join(
        f"{sum(r.status == s for r in records)} {s}" for s in sorted({r.status for r in records})
    )
    lines = [
        f"# kd-report: experiment `{experiment}`" + (f", sweep `{sweep_id}`" if sweep_id else ""),
        "",
        f"- runs: {len(records)} ({statuses})",
        f"- tracking URI: `{tracking_uri}`" if tracking_uri else "",
        f"- sweep parent run: `{parent_run_id}`" if parent_run_id else "",
        f"- quality metric: `{quality}` (higher is better); compression ratio = teacher params / student params",
        f"- latency: {latency.label}",
        f"- generated: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        *_markdown_categories(categories, columns),
        "## By compression ratio",
        "",
        (f"Mean ± standard deviation over seeds of the {finished} FINISHED runs. *Pareto (ratio)*: no "
        "other row has both a higher compression ratio and a higher mean quality; *Pareto (latency)*: "
        "no other row is both faster and better."),
        "",
        _markdown_table(_summary_headers(quality, latency), _summary_rows(summaries, latency)),
        "",
        "![quality against compression ratio](quality_vs_compression.png)",
        "",
        "![quality against latency](quality_vs_latency.png)",
        "",
        "![spread over seeds per compression ratio](spread_by_ratio.png)",
        "",
        "## Every run",
        "",
    ]
    headers = ["run", "status", "scheme", "dataset", "seed", "ratio", "MAC ratio", "student params",
               "teacher params", *[c.removeprefix("test/") for c in columns], "time (s)"]
    rows = [[f"`{r.run_name}`", *_run_row(r, columns)[1:]] for r in records]
    lines += [_markdown_table(headers, rows), ""]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


# -- charts -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(summaries: Sequence[RatioSummary]) -> dict[str, Any]:
    plt = _pyplot()
    labels = sorted({s.label for s in summaries})
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def _no_data(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, wrap=True)


def plot_quality_vs_compression(
    records: Sequence[RunRecord], summaries: Sequence[RatioSummary], quality: str, title: str
):
    """Quality against the measured compression ratio, the Pareto front marked."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colors = _colors(summaries)
    plotted = [s for s in summaries if math.isfinite(s.quality_mean) and math.isfinite(s.compression_ratio)]
    if not plotted:
        _no_data(axis, f"no FINISHED run has {quality}")
    for label in sorted({s.label for s in plotted}):
        group = [s for s in plotted if s.label == label]
        color = colors[label]
        seeds = [
            (r.compression_ratio, r.metrics[quality])
            for r in records
            if r.status == "FINISHED" and f"{r.scheme} / {r.data_label}" == label and quality in r.metrics
        ]
        if seeds:
            axis.scatter(*zip(*seeds, strict=True), color=color, alpha=0.35, s=18, label=f"{label}: each seed")
        axis.errorbar(
            [s.compression_ratio for s in group],
            [s.quality_mean for s in group],
            yerr=[s.quality_std for s in group],
            color=color, marker="o", linestyle="-", linewidth=1, capsize=3, label=f"{label}: mean ± std",
        )
        teacher = _mean([v for s in group for v in s.teacher_quality])
        if math.isfinite(teacher):
            axis.axhline(teacher, color=color, linestyle="--", linewidth=1, label=f"{label}: teacher")
    front = [s for s in plotted if s.on_compression_front]
    if front:
        front.sort(key=lambda s: s.compression_ratio)
        # the attainment staircase: every point below and left of it is dominated
        axis.plot(
            [s.compression_ratio for s in front], [s.quality_mean for s in front],
            color="black", linewidth=1.5, linestyle="--", alpha=0.7, drawstyle="steps-pre", zorder=1,
        )
        axis.scatter(
            [s.compression_ratio for s in front], [s.quality_mean for s in front],
            s=160, facecolors="none", edgecolors="black", linewidths=1.8, zorder=5, label="Pareto front",
        )
    _finish_ratio_axis(axis, [s.compression_ratio for s in plotted],
                       "compression ratio (teacher params / student params, measured)", quality, title, 10)
    figure.tight_layout()
    return figure


def _finish_ratio_axis(axis, ratios: list[float], xlabel: str, quality: str, title: str, title_size: int) -> None:
    """Labels, grid and legend of a quality-vs-compression-ratio panel; a log2 ratio axis when
    the ratios span more than 8x."""
    finite = [r for r in ratios if math.isfinite(r) and r > 0]
    if finite and max(finite) / min(finite) > 8:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f"{quality} (higher is better)")
    axis.set_title(title, fontsize=title_size)
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="best")


def plot_quality_vs_latency(
    summaries: Sequence[RatioSummary], quality: str, latency: LatencySource, title: str
):
    """Quality against latency (mean ± std over seeds), the Pareto front marked."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colors = _colors(summaries)
    plotted = [s for s in summaries if math.isfinite(s.quality_mean) and math.isfinite(s.latency_mean)]
    if not plotted:
        _no_data(axis, f"no FINISHED run has both {quality} and {latency.metric}")
    for label in sorted({s.label for s in plotted}):
        group = [s for s in plotted if s.label == label]
        axis.errorbar(
            [s.latency_mean for s in group], [s.quality_mean for s in group],
            xerr=[s.latency_std for s in group], yerr=[s.quality_std for s in group],
            color=colors[label], marker="o", linestyle="none", capsize=3, label=label,
        )
        for s in group:
            axis.annotate(f"×{_fmt(s.compression_ratio, 1)}", (s.latency_mean, s.quality_mean),
                          textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = sorted((s for s in plotted if s.on_latency_front), key=lambda s: s.latency_mean)
    if front:
        axis.plot([s.latency_mean for s in front], [s.quality_mean for s in front],
                  color="black", linewidth=1.5, linestyle="--", alpha=0.7, drawstyle="steps-post", zorder=1)
        axis.scatter([s.latency_mean for s in front], [s.quality_mean for s in front], s=160,
                     facecolors="none", edgecolors="black", linewidths=1.8, zorder=5, label="Pareto front")
    axis.set_xlabel(latency.label, fontsize=8 if not latency.is_inference_latency else 10)
    axis.set_ylabel(f"{quality} (higher is better)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    if plotted:
        axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def plot_spread_by_ratio(summaries: Sequence[RatioSummary], quality: str, title: str):
    """Per compression ratio, the quality of every seed: a box plot and the points."""
    plt = _pyplot()
    labels = sorted({s.label for s in summaries}) or ["-"]
    per_panel = max(6.0, 1.1 * max((sum(s.label == label for s in summaries) for label in labels), default=1))
    figure, axes = plt.subplots(1, len(labels), figsize=(per_panel * len(labels), 4.5), squeeze=False)
    for axis, label in zip(axes[0], labels, strict=True):
        group = [s for s in summaries if s.label == label]
        data = [_finite(s.quality) for s in group]
        positions = list(range(1, len(group) + 1))
        shown = [(p, d) for p, d in zip(positions, data, strict=True) if d]
        if shown:
            axis.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5, showfliers=False)
            for position, (summary, values) in zip(positions, zip(group, data, strict=True), strict=True):
                if not values:
                    continue
                offsets = [0.0] if len(values) == 1 else [-0.12 + 0.24 * i / (len(values) - 1) for i in range(len(values))]
                axis.scatter([position + o for o in offsets], values, s=22, zorder=3, alpha=0.8)
                for offset, value, seed in zip(offsets, values, summary.seeds, strict=False):
                    axis.annotate(f"s{seed}", (position + offset, value), textcoords="offset points",
                                  xytext=(4, 0), fontsize=6)
        else:
            _no_data(axis, f"no FINISHED run has {quality}")
        axis.set_xticks(positions, [f"×{_fmt(s.target_compression_ratio, 1)}\n(n={len(_finite(s.quality))})" for s in group])
        axis.set_xlabel("compression ratio asked for (seeds per ratio)")
        axis.set_ylabel(quality)
        axis.set_title(label, fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _plot_metrics_by_category(axis, summary: CategorySummary, metrics: Sequence[str], colors: dict) -> bool:
    """One ratio: every metric on the x axis, a line per category and one for their mean."""
    shown = [m for m in metrics if summary.categories_with(m)]
    positions = list(range(len(shown)))
    for name in summary.categories:
        points = [(x, summary.category_mean(name, m), summary.category_std(name, m))
                  for x, m in zip(positions, shown, strict=True) if math.isfinite(summary.category_mean(name, m))]
        if points:
            x, y, err = zip(*points, strict=True)
            axis.errorbar(x, y, yerr=err, color=colors[name], marker="o", linewidth=1, capsize=3,
                          label=f"{name} (mean ± std over seeds)")
    if shown:
        axis.plot(positions, [summary.mean_over_categories(m) for m in shown], color="black", linestyle="--",
                  linewidth=2, marker="D", label=MEAN_ROW)
    axis.set_xticks(positions, [m.removeprefix("test/") for m in shown])
    axis.set_xlabel(f"metric (one compression ratio: {_fmt(summary.target_compression_ratio, 1)})")
    axis.set_ylabel("metric value (higher is better)")
    return bool(shown)


def plot_quality_by_category(
    categories: Sequence[CategorySummary], quality: str, title: str, metrics: Sequence[str] = ()
):
    """Per scheme, data family and image size, the quality against the compression ratio:
    one line per category (mean ± std over seeds) and one for the mean over categories.
    A panel with a single compression ratio shows every metric of ``metrics`` on its x axis
    instead (still a line per category and their mean)."""
    plt = _pyplot()
    panels = sorted({c.panel for c in categories}, key=lambda p: next(
        (c.scheme, c.family, _side(c.image_size)) for c in categories if c.panel == p)) or ["-"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    names = sorted({name for c in categories for name in c.categories})
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    for axis, panel in zip(axes[0], panels, strict=True):
        group = sorted((c for c in categories if c.panel == panel), key=lambda c: c.target_compression_ratio)
        ratios = [c.target_compression_ratio for c in group]
        if len(group) == 1 and len(metrics) > 1:
            if _plot_metrics_by_category(axis, group[0], metrics, colors):
                axis.legend(fontsize=7, loc="best")
            else:
                _no_data(axis, "no FINISHED run with a category has any of the metrics")
            axis.set_title(panel, fontsize=9)
            axis.grid(True, alpha=0.3)
            continue
        plotted = False
        for name in names:
            points = [(c.target_compression_ratio, c.category_mean(name, quality), c.category_std(name, quality))
                      for c in group if name in c.values and math.isfinite(c.category_mean(name, quality))]
            if points:
                x, y, err = zip(*points, strict=True)
                axis.errorbar(x, y, yerr=err, color=colors[name], marker="o", linewidth=1, capsize=3,
                              label=f"{name} (mean ± std over seeds)")
                plotted = True
        means = [(c.target_compression_ratio, c.mean_over_categories(quality)) for c in group]
        means = [(x, y) for x, y in means if math.isfinite(y)]
        if means:
            axis.plot(*zip(*means, strict=True), color="black", linestyle="--", linewidth=2, marker="D",
                      label=MEAN_ROW)
        if not plotted:
            _no_data(axis, f"no FINISHED run with a category has {quality}")
        _finish_ratio_axis(axis, list(ratios), "compression ratio asked for (teacher params / student params)",
                           quality, panel, 9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# -- the report -----------------------------------------------------------------------------------
@dataclass
class Report:
    """What :func:`make_report` produced."""

    experiment: str
    sweep_id: str | None
    records: list[RunRecord]
    summaries: list[RatioSummary]
    quality: str
    latency: LatencySource
    output_dir: Path
    files: list[Path]
    parent_run_id: str | None = None
    logged_to_parent: bool = False
    categories: list[CategorySummary] = field(default_factory=list)


def default_output_dir(experiment: str, sweep_id: str | None) -> Path:
    """``$KD_LOG_DIR/reports/<experiment>/<sweep or all-runs>`` (``KD_LOG_DIR`` defaults to ./logs)."""
    safe = lambda text: "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    root = Path(os.environ.get("KD_LOG_DIR") or "logs")
    return root / "reports" / safe(experiment) / safe(sweep_id or "all-runs")


def _close_finished_parent(client, parent, children: Sequence[RunRecord]) -> None:
    """End a sweep parent left RUNNING once every child has ended (nothing else ends it)."""
    if parent.info.status != "RUNNING" or not children:
        return
    if any(r.status not in TERMINAL_STATUSES for r in children):
        return
    status = "FINISHED" if all(r.status == "FINISHED" for r in children) else "FAILED"
    end_time = max(
        (client.get_run(r.run_id).info.end_time or 0) for r in children
    ) or None
    client.set_terminated(parent.info.run_id, status=status, end_time=end_time)


def make_report(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    sweep_id: str | None = None,
    output_dir: str | Path | None = None,
    quality: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    log_to_parent: bool = True,
) -> Report:
    """Read the runs, write ``report.md`` and the three charts, log them to the sweep's parent.

    Raises :class:`TrackingError` when the store, experiment or sweep cannot be found, or
    the selection holds no run.
    """
    uri = resolve_tracking_uri(tracking_uri)
    experiment_name, records = load_runs(uri, experiment, sweep_id)
    if not records:
        raise TrackingError(
            f"experiment {experiment_name!r} has no runs" + (f" in sweep {sweep_id}" if sweep_id else "")
        )
    sweeps = sorted({r.sweep_id for r in records if r.sweep_id})
    resolved_sweep = sweeps[0] if sweep_id and sweeps else None
    quality_metric = choose_quality_metric(records, quality)
    latency = choose_latency(records)
    summaries = summarize_by_ratio(records, quality_metric, latency)
    columns = metric_columns(records, metrics)
    categories = summarize_by_category(records, list(dict.fromkeys([*columns, quality_metric])))

    client = make_client(uri)
    parent = None
    if len(sweeps) == 1 and all(r.sweep_id == sweeps[0] for r in records):
        experiment_id = client.get_experiment_by_name(experiment_name).experiment_id
        parent = find_sweep_parent(client, experiment_id, sweeps[0])
        resolved_sweep = sweeps[0]

    out = Path(output_dir) if output_dir else default_output_dir(experiment_name, resolved_sweep)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{experiment_name}" + (f", sweep {resolved_sweep}" if resolved_sweep else "")
    plt = _pyplot()
    figures = {
        "quality_vs_compression.png": plot_quality_vs_compression(
            records, summaries, quality_metric, f"{quality_metric} vs compression ratio\n{title}"
        ),
        "quality_vs_latency.png": plot_quality_vs_latency(
            summaries, quality_metric, latency, f"{quality_metric} vs {latency.metric}\n{title}"
        ),
        "spread_by_ratio.png": plot_spread_by_ratio(
            summaries, quality_metric, f"spread of {quality_metric} over seeds\n{title}"
        ),
    }
    if categories:
        figures[CATEGORY_CHART] = plot_quality_by_category(
            categories, quality_metric, f"per category and the mean over categories\n{title}",
            metrics=[c for c in columns if "teacher" not in c] or [quality_metric],
        )
    files = []
    for name, figure in figures.items():
        path = out / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        files.append(path)
    markdown = markdown_report(
        experiment_name, records, summaries, quality_metric, latency, columns,
        sweep_id=resolved_sweep, tracking_uri=uri, parent_run_id=parent.info.run_id if parent else None,
        categories=categories,
    )
    (out / "report.md").write_text(markdown, encoding="utf-8")
    files.insert(0, out / "report.md")

    logged = False
    if parent is not None and log_to_parent:
        for path in files:
            client.log_artifact(parent.info.run_id, str(path), REPORT_ARTIFACT_DIR)
        _close_finished_parent(client, parent, records)
        logged = True
    return Report(
        experiment=experiment_name, sweep_id=resolved_sweep, records=records, summaries=summaries,
        quality=quality_metric, latency=latency, output_dir=out, files=files,
        parent_run_id=parent.info.run_id if parent else None, logged_to_parent=logged,
        categories=categories,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-report",
        description="Tables, Markdown and charts of the runs of an MLflow experiment, by compression ratio.",
    )
    parser.add_argument("--experiment", "-e", help="MLflow experiment name (default: the most recent)")
    parser.add_argument("--sweep", help="only the runs of this sweep_id ('latest': the most recent sweep)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument(
        "--output", "-o", type=Path,
        help="folder for report.md and the PNG charts (default: $KD_LOG_DIR/reports/<experiment>/<sweep>)",
    )
    parser.add_argument(
        "--quality", help="the quality metric of the charts (default: test/image_auroc, else the first present)"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric columns (default: %(default)s)"
    )
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the files as artifacts of the sweep's parent run"
    )
    parser.add_argument(
        "--register", metavar="NAME",
        help="register the sweep's champion in the Model Registry as NAME (alias 'champion'): the smallest "
             "student whose validation quality is within --within of the teacher's",
    )
    parser.add_argument("--within", type=float, default=0.02,
                        help="--register: largest relative validation-quality loss accepted (default: %(default)s)")
    parser.add_argument("--register-metric", default="val/image_auroc",
                        help="--register: the validation metric compared (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``kd-report``."""
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets the whole table
    try:
        report = make_report(
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            sweep_id=args.sweep,
            output_dir=args.output,
            quality=args.quality,
            metrics=args.metrics,
            log_to_parent=not args.no_log,
        )
    except KDError as error:
        print(f"kd-report: error: {error}", file=sys.stderr)
        return 1
    console.print(render_table(report.experiment, report.records, metric_columns(report.records, args.metrics)))
    for table in render_category_tables(report.categories, metric_columns(report.records, args.metrics)):
        console.print(table)
    console.print(render_summary_table(report.summaries, report.quality, report.latency))
    console.print(f"[kd-report] wrote {', '.join(p.name for p in report.files)} to {report.output_dir}")
    if report.logged_to_parent:
        console.print(
            f"[kd-report] logged them as artifacts '{REPORT_ARTIFACT_DIR}/' of the sweep's parent run "
            f"{report.parent_run_id}"
        )
    elif report.parent_run_id is None:
        console.print("[kd-report] no single sweep parent for these runs (use --sweep): files written to disk only")
    if args.register:
        from kd_experiments.deploy import choose_champion, register_champion

        try:
            champion = choose_champion(report.records, args.within, args.register_metric)
            champion = register_champion(resolve_tracking_uri(args.tracking_uri), champion, args.register)
        except KDError as error:
            print(f"kd-report: error: {error}", file=sys.stderr)
            return 1
        console.print(f"[kd-report] registered {champion.run_name} (student_params={champion.student_params:.0f}, "
                      f"{champion.metric}={champion.quality:.4f} vs {champion.reference:.4f}) as "
                      f"models:/{args.register}@champion (version {champion.version}): {champion.rule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
