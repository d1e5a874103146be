"""The demo's settings, chosen on validation data: candidates x compression ratios x seeds.

``make demo`` sweeps the quickstart experiment (score regression, Pol et al., arXiv
2310.06047, on scikit-learn's bundled digits) over compression ratios and seeds. Its
settings are chosen here, on a labelled validation split drawn from *training* data
(``data.val_anomalies=other_classes``: held-out normal training images and as many
training images of the other digits); the test split is never scored (``test=false``).

Each record is one run: ``candidate`` (the overrides it adds to ``experiment=quickstart``),
``normal_class``, ``compression_ratio``, ``seed``, the last epoch's ``val_image_auroc`` and
``val_teacher_image_auroc``, the student's parameters and the run's seconds.
``--summary`` prints, per candidate, the mean and standard deviation over seeds per ratio,
and the rule the demo is chosen by: the validation means fall with the ratio, and every
ratio's standard deviation is smaller than the gap between its mean and its neighbours'
(a trade-off a reader can see through the seed spread); among candidates that meet it, the
one with the highest mean over ratios; when none does, the one with the most ratios
separated. The rule reads the ratios of ``RATIOS`` only; a candidate explored at more
ratios shows them in the table, but they do not count. The demo sweeps the chosen candidate's
ratios less those whose student does not measurably beat the next smaller student
(:func:`demo_ratios`: from the smallest student up, a ratio is kept when its validation mean
exceeds the last kept one's by more than both standard deviations): a larger student that ties
with a smaller one on validation adds a point whose place on the chart is the data's noise, and
the smaller student is the one the framework looks for. It reads the records of the finer
validation set (``--val-anomalies all_other_classes``, ``RULE_VAL_ANOMALIES``: every
other-digit training image, about 1,100, beside the held-out normal ones); the records with
as many other-digit images as normal ones (about 33 and 33), where one misranked pair moves
the AUROC by 0.001 and seed spreads of 0.01 were mostly the validation set's own noise, stay
in the table as what was explored.

    python -m benchmarks.quickstart_selection                 # resumable: done records are skipped
    python -m benchmarks.quickstart_selection --summary
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.harness import QUIET, ResultsFile, base_parser, compose, now_utc

#: candidate settings, each a list of overrides on top of ``experiment=quickstart``
CANDIDATES: dict[str, list[str]] = {
    "quickstart": [],
    "student_schedule=cosine": ["scheme.student_schedule=cosine"],
    "student_restarts=4": ["scheme.student_restarts=4"],
    "student_schedule=cosine,student_restarts=4": ["scheme.student_schedule=cosine", "scheme.student_restarts=4"],
    "warp_copies=1": ["scheme.corruption_exposure.warp_copies=1"],
    "warp_copies=2": ["scheme.corruption_exposure.warp_copies=2"],
    "warp_copies=2,student_schedule=cosine": ["scheme.corruption_exposure.warp_copies=2",
                                              "scheme.student_schedule=cosine"],
    "warp_copies=2,student_average=0.95": ["scheme.corruption_exposure.warp_copies=2",
                                           "scheme.student_average=0.95"],
    "warp_copies=2,student_average=0.99": ["scheme.corruption_exposure.warp_copies=2",
                                           "scheme.student_average=0.99"],
    # students from other initialisations trained side by side, the one of least validation
    # regression loss (normal images, their corrupted copies, pseudo outliers) kept
    "warp_copies=2,student_restarts=2": ["scheme.corruption_exposure.warp_copies=2", "scheme.student_restarts=2"],
    "warp_copies=2,student_restarts=4": ["scheme.corruption_exposure.warp_copies=2", "scheme.student_restarts=4"],
    # one teacher and one data order for every seed: the seed varies the student alone
    "warp_copies=2,teacher_seed=0,data.seed=0": ["scheme.corruption_exposure.warp_copies=2",
                                                 "scheme.teacher_seed=0", "data.seed=0"],
}
#: the settings the candidates vary, pinned to their defaults under every candidate, so that a
#: candidate names the same runs whatever ``configs/experiment/quickstart.yaml`` holds now (it
#: takes the chosen candidate's settings)
PINNED: list[str] = ["scheme.corruption_exposure.warp_copies=0", "scheme.student_restarts=1"]
#: the ratios the rule reads; the demo sweeps those of them :func:`demo_ratios` keeps
#: (sweeps/quickstart_compression.yaml; a test keeps the two equal)
RATIOS = (8, 32, 128, 640)
SEEDS = (0, 1, 2)
KEY_FIELDS = ("candidate", "normal_class", "compression_ratio", "seed", "val_fraction", "val_anomalies")
#: the validation anomalies of a record without the field: as many other-digit images as normal ones
DEFAULT_VAL_ANOMALIES = "other_classes"
VAL_ANOMALY_TITLES = {"other_classes": "as many other-digit training images as held-out normal ones",
                      "all_other_classes": "every other-digit training image"}
#: the validation set the rule reads
RULE_VAL_ANOMALIES = "all_other_classes"


def run_one(candidate: str, overrides: list[str], normal_class: int, ratio: float, seed: int,
            val_fraction: float, threads: int, val_anomalies: str = DEFAULT_VAL_ANOMALIES) -> dict:
    import torch

    from kd_experiments.train import train

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="kd-quickstart-selection-") as folder:
        cfg = compose(["experiment=quickstart", *PINNED, *overrides, f"data.normal_class={normal_class}",
                       f"scheme.compression_ratio={ratio}", f"seed={seed}", f"data.val_anomalies={val_anomalies}",
                       f"data.val_fraction={val_fraction}", "test=false", "deploy.measure=false",
                       "deploy.log_model=false", "logger=none", *QUIET], output_dir=folder)
        started = time.perf_counter()
        metrics = train(cfg)
        seconds = time.perf_counter() - started
    return {"val_image_auroc": metrics.get("val/image_auroc"),
            "val_teacher_image_auroc": metrics.get("val/teacher_image_auroc"),
            "run_s": seconds}


def summarise(runs: list[dict], val_anomalies: str = DEFAULT_VAL_ANOMALIES) -> list[dict]:
    """Per (candidate, normal class, val_fraction), records of one validation set (``val_anomalies``):
    mean and std per ratio, and the rule."""
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.get("val_image_auroc") is None or (run.get("val_anomalies") or DEFAULT_VAL_ANOMALIES) != val_anomalies:
            continue
        key = (run["candidate"], run["normal_class"], run["val_fraction"])
        groups[key][float(run["compression_ratio"])].append(float(run["val_image_auroc"]))
    rows = []
    for (candidate, normal_class, val_fraction), by_ratio in sorted(groups.items()):
        ratios = sorted(by_ratio)
        means = [statistics.fmean(by_ratio[r]) for r in ratios]
        stds = [statistics.stdev(by_ratio[r]) if len(by_ratio[r]) > 1 else 0.0 for r in ratios]
        # the rule looks at the demo's ratios only, so candidates explored at more ratios compete on equal terms
        rule = [i for i, r in enumerate(ratios) if r in RATIOS]
        separated = 0
        for k, i in enumerate(rule):
            gaps = [means[j] - means[i] if j < i else means[i] - means[j]
                    for j in (rule[k - 1] if k > 0 else None, rule[k + 1] if k + 1 < len(rule) else None) if j is not None]
            if gaps and all(gap > stds[i] for gap in gaps):
                separated += 1
        rows.append({"candidate": candidate, "normal_class": normal_class, "val_fraction": val_fraction,
                     "val_anomalies": val_anomalies,
                     "ratios": ratios, "means": means, "stds": stds,
                     "seeds": min(len(by_ratio[ratios[i]]) for i in rule) if rule else 0,
                     "rule_ratios": [ratios[i] for i in rule], "separated": separated,
                     "meets_rule": bool(rule) and separated == len(rule),
                     "mean_over_ratios": statistics.fmean(means[i] for i in rule) if rule else float("nan")})
    return rows


def chosen(rows: list[dict]) -> dict | None:
    """The candidate the rule picks (see the module docstring), among those with every seed of
    ``SEEDS`` at every ratio of ``RATIOS`` (partial explorations do not compete)."""
    complete = [r for r in rows if r["seeds"] >= len(SEEDS) and len(r["rule_ratios"]) == len(RATIOS)]
    return max(complete, key=lambda r: (r["meets_rule"], r["separated"], r["mean_over_ratios"])) if complete else None


def demo_ratios(row: dict) -> list[float]:
    """The ratios the demo sweeps for the chosen candidate ``row`` (a :func:`summarise` row).

    From the smallest student (the largest ratio of ``RATIOS``) up, a ratio is kept when its
    validation mean exceeds the last kept ratio's by more than both their standard deviations;
    a ratio that does not is dropped, and the next larger student is compared with the same
    kept one. So each kept step down in size costs more validation AUROC than either seed
    spread, and of two students that tie the smaller one is shown.
    """
    cells = {r: (m, s) for r, m, s in zip(row["ratios"], row["means"], row["stds"]) if r in row["rule_ratios"]}
    kept: list[float] = []
    for ratio in sorted(cells, reverse=True):
        if kept:
            (mean, std), (kept_mean, kept_std) = cells[ratio], cells[kept[-1]]
            if mean - kept_mean <= max(std, kept_std):
                continue
        kept.append(ratio)
    return sorted(kept)


def markdown_table(path: Path) -> str:
    """The selection as Markdown: per validation set, one row per candidate, validation AUROC per
    ratio; the rule's choice reads the records of :data:`RULE_VAL_ANOMALIES`."""
    runs = ResultsFile(path).runs
    present = sorted({run.get("val_anomalies") or DEFAULT_VAL_ANOMALIES for run in runs},
                     key=lambda name: name != RULE_VAL_ANOMALIES)
    if not present:
        return "No records yet."
    parts = []
    for val_anomalies in present:
        title = VAL_ANOMALY_TITLES.get(val_anomalies, val_anomalies)
        parts += [f"Validation anomalies `{val_anomalies}` ({title}):", "",
                  _table(summarise(runs, val_anomalies), val_anomalies == RULE_VAL_ANOMALIES), ""]
    return "\n".join(parts).rstrip("\n")


def _table(rows: list[dict], rule: bool) -> str:
    ratios = sorted({r for row in rows for r in row["ratios"]})
    head = ["candidate", "normal digit", "seeds", *[f"ratio {r:g}" for r in ratios],
            f"separated (ratios {', '.join(f'{r:g}' for r in RATIOS)})", "mean (same ratios)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = dict(zip(row["ratios"], zip(row["means"], row["stds"])))
        lines.append("| " + " | ".join([
            f"`{row['candidate']}`", str(row["normal_class"]), str(row["seeds"]),
            *[f"{cells[r][0]:.4f} ± {cells[r][1]:.4f}" if r in cells else "" for r in ratios],
            f"{row['separated']}/{len(row['rule_ratios'])}", f"{row['mean_over_ratios']:.4f}"]) + " |")
    best = chosen(rows) if rule else None
    if best is not None:
        lines += ["", f"Chosen by the rule: `{best['candidate']}`, digit {best['normal_class']}; the demo sweeps "
                  f"ratios {', '.join(f'{r:g}' for r in demo_ratios(best))} (`demo_ratios`: of two ratios whose "
                  "validation means are not apart by more than both spreads, the smaller student is kept)."]
    return "\n".join(lines)


def print_summary(rows: list[dict]) -> None:
    for row in rows:
        cells = "  ".join(f"{r:g}: {m:.4f}±{s:.4f}" for r, m, s in zip(row["ratios"], row["means"], row["stds"]))
        print(f"{row['candidate']:<40} class {row['normal_class']} val {row['val_fraction']}  {cells}  "
              f"separated {row['separated']}/{len(row['rule_ratios'])}  mean {row['mean_over_ratios']:.4f}")
    best = chosen(rows)
    if best is not None:
        print(f"chosen by the rule: {best['candidate']} (class {best['normal_class']}); "
              f"demo ratios {', '.join(f'{r:g}' for r in demo_ratios(best))}")


def main() -> None:
    parser = base_parser(__doc__, output="quickstart_selection.json")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--normal-classes", type=int, nargs="+", default=[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--val-fraction", type=float, default=0.3,
                        help="share of the normal training images held out (default 0.3: 33 normal and 33 "
                             "other-digit images for digit 0, enough to tell AUROCs apart)")
    parser.add_argument("--val-anomalies", choices=sorted(VAL_ANOMALY_TITLES), default=RULE_VAL_ANOMALIES,
                        help="the validation set's anomalies (data.val_anomalies)")
    parser.add_argument("--summary", action="store_true", help="print the summary and the rule's choice, run nothing")
    args = parser.parse_args()
    results = ResultsFile(args.output, key_fields=KEY_FIELDS)
    if args.summary:
        print_summary(summarise(results.runs, args.val_anomalies))
        return
    for candidate in args.candidates:
        for normal_class in args.normal_classes:
            for ratio in args.ratios:
                for seed in args.seeds:
                    key = {"candidate": candidate, "normal_class": normal_class, "compression_ratio": ratio,
                           "seed": seed, "val_fraction": args.val_fraction,
                           "val_anomalies": None if args.val_anomalies == DEFAULT_VAL_ANOMALIES else args.val_anomalies}
                    if results.has(key):
                        continue
                    started_at, started = now_utc(), time.perf_counter()
                    record = {**key, "overrides": ["experiment=quickstart", *PINNED, *CANDIDATES[candidate]],
                              **run_one(candidate, CANDIDATES[candidate], normal_class, ratio, seed,
                                        args.val_fraction, args.threads, args.val_anomalies)}
                    results.append(record, started_at=started_at, wall_s=time.perf_counter() - started)
                    print(f"{candidate} class {normal_class} ratio {ratio:g} seed {seed}: "
                          f"val AUROC {record['val_image_auroc']}", flush=True)
    print_summary(summarise(results.runs, args.val_anomalies))


if __name__ == "__main__":
    main()
