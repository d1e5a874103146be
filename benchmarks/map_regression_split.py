"""Which half of a run's seed moves a map student's test figures: its data split or the rest.

In :mod:`benchmarks.map_regression` a run's ``seed`` sets two things at once:

- ``data.seed``: which tenth of ``train/good`` the MVTec datamodule holds out for validation
  (so which images the student trains on) and the order it reads them in;
- everything else a seed draws, which for this scheme is the student's initialisation: the
  synthetic anomalies, the views and the per-step choice among them are drawn from
  ``scheme.synthetic_seed`` and do not change with the seed.

The ratio-30 records of a setting are its *diagonal* (seed ``s`` on split ``s``). This benchmark
runs the two crossed cells of seeds 0 and 1 (seed 1 on seed 0's split, seed 0 on seed 1's split)
at the setting's own budget (rule 2 of :mod:`benchmarks.map_regression`, from its study), trained
and tested exactly as that benchmark's runs are, with ``data.seed`` overridden. With the diagonal
this gives a 2 x 2 table: when the two runs on one split agree and the splits differ, the spread
between seeds is the spread between which tenth of bottle's 209 training images the student did
not train on (and the order it read the rest in); when the two runs of one seed agree, it is the
initialisation.

One record per crossed cell in ``benchmarks/results/map_regression_split.json`` (fields
``category``, ``teacher_scheme``, ``requested_mac_ratio``, ``seed``, ``data_seed``, ``variant``
(the setting, without the ``data.seed`` override), the test figures of a
:mod:`benchmarks.map_regression` record and the per-record provenance of
:mod:`benchmarks.harness`); resumable. Nothing here selects a model, a seed, a split or a
setting: the figures explain test results already recorded.

    python -m benchmarks.map_regression_split --variant trainer.max_epochs=400 scheme.feature_weight=4.0 ...
    python -m benchmarks.map_regression_split --variant ... --only 's1/d0'     # one cell
"""

from __future__ import annotations

import fnmatch
from typing import Any

from benchmarks.harness import ResultsFile, base_parser, epoch_rows
from benchmarks.map_regression import (
    SEED_RATIO,
    Entry,
    budget_path,
    choose_teacher,
    run_student,
    use_project_mlflow_store,
    variant_budget,
)

#: the crossed cells (seed, data.seed); the diagonal (s, s) are the setting's own records
CROSSED = ((1, 0), (0, 1))
CATEGORY = "bottle"


def cell_name(seed: int, data_seed: int) -> str:
    return f"s{seed}/d{data_seed}"


def cell_entry(teacher: str, variant: str, seed: int, data_seed: int) -> Entry:
    """The :mod:`benchmarks.map_regression` entry of a cell: its setting with ``data.seed`` overridden
    (the override comes after ``seed=``, so it wins over ``data.seed: ${seed}``)."""
    if "data.seed=" in variant:
        raise SystemExit("--variant names the setting; the benchmark sets data.seed itself")
    return Entry(CATEGORY, teacher, SEED_RATIO, seed, f"{variant} data.seed={data_seed}")


def split_table(records: list[dict[str, Any]], crossed: list[dict[str, Any]]) -> str:
    """The 2 x 2 table of each setting with crossed records: seeds 0 and 1 on splits 0 and 1, the
    diagonal from ``map_regression.json`` (``records``: the setting's own ratio-30 runs), the crossed
    cells from this benchmark's file; Markdown, empty when there is no crossed record."""
    rows = []
    for variant in dict.fromkeys(run.get("variant") for run in crossed):
        cells = {(run["seed"], run["data_seed"]): (run, "map_regression_split.json") for run in crossed
                 if run.get("variant") == variant}
        teacher = next(iter(cells.values()))[0]["teacher_scheme"]
        for run in records:  # the last record of each diagonal cell
            if (run.get("variant") == variant and run.get("category") == CATEGORY
                    and run.get("teacher_scheme") == teacher and run.get("requested_mac_ratio") == SEED_RATIO
                    and run.get("student", "map_regression") == "map_regression" and run.get("seed") in (0, 1)):
                cells[(run["seed"], run["seed"])] = (run, "map_regression.json")
        for seed, data_seed in sorted(cells, key=lambda cell: (cell[1], cell[0])):
            run, source = cells[(seed, data_seed)]
            figures = " | ".join("-" if run.get(k) is None else f"{run[k]:.4f}"
                                 for k in ("image_auroc", "pixel_auroc", "aupro"))
            rows.append(f"| `{variant}` | {data_seed} | {seed} | {figures} | {source} | {run.get('git_commit', '')[:7]} |")
    if not rows:
        return ""
    return "\n".join(["| setting | data split (data.seed) | seed (initialisation) | image AUROC | "
                      "pixel AUROC | AUPRO | record file | commit |", "|---|---|---|---|---|---|---|---|", *rows])


def main() -> None:
    parser = base_parser(__doc__, output="map_regression_split.json")
    parser.add_argument("--variant", nargs="+", required=True, metavar="OVERRIDE",
                        help="the studied setting (the --variant of benchmarks.map_regression)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="cells to run, e.g. s1/d0")
    args = parser.parse_args()
    args.retrain = True  # a crossed cell is never a study's own run: it always trains
    args.teacher_epochs = None
    variant = " ".join(args.variant)
    results = ResultsFile(args.output, key_fields=("category", "teacher_scheme", "requested_mac_ratio", "seed",
                                                   "data_seed", "variant"))
    import torch

    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    studies = epoch_rows(ResultsFile(budget_path(args.output.with_name("map_regression.json"))).runs)
    teacher = choose_teacher(studies)
    if teacher is None:
        raise SystemExit("no teacher chosen yet: run `python -m benchmarks.map_regression --budget` first")
    epochs, study_done = variant_budget(studies, teacher, variant)
    if epochs is None or not study_done:
        raise SystemExit(f"the setting {variant!r} has no finished study: run benchmarks.map_regression "
                         "--budget --variant first")
    for seed, data_seed in CROSSED:
        name = cell_name(seed, data_seed)
        if args.only and not any(fnmatch.fnmatch(name, pattern) for pattern in args.only):
            continue
        key = {"category": CATEGORY, "teacher_scheme": teacher, "requested_mac_ratio": SEED_RATIO, "seed": seed,
               "data_seed": data_seed, "variant": variant}
        if results.has(key):
            continue
        print(f"[map_regression_split] {name}: running ({epochs} epochs)", flush=True)
        with results.record(key) as record:
            record.update(run_student(cell_entry(teacher, variant, seed, data_seed), args, epochs))
            record["budget_rule"] = "validation"


if __name__ == "__main__":
    main()
