"""Map regression on MVTec AD at 256 px: encoder-free pixel students of a map-producing teacher.

Writes ``benchmarks/results/map_regression.json`` (``runs``: one flat record per student run, with
its teacher's test figures and both latencies from the same run, and the per-record provenance of
:mod:`benchmarks.harness`) and ``benchmarks/results/map_regression_budget.json`` (the validation
study: one record per study run, its per-epoch figures as arrays; see *The budget file* below).

Protocol (every record): images resized to 256x256, maps and metrics at 256x256, blur sigma 4,
one torch thread; the student (``scheme=map_regression``, ``experiment=map_regression_bottle``
with ``data.category``) regresses the teacher's maps on the normal training images and two
synthetic anomalies made from each (Perlin masks, procedural and in-set textures); the final
weights of a fixed epoch budget are tested; latency is ONNX Runtime, batch 1, one thread, the
student and the teacher measured side by side in the student's run (``deploy/onnx_latency_ms_b1``,
``deploy/teacher_onnx_latency_ms_b1``). Nothing is selected on the test split. Bottle's seed-0
ratio-30 student at its study's whole length is the study run's student (same seed, data and
settings; CPU training is deterministic): its test run tests the study's final weights
(:func:`study_weights`; the record says ``weights: "study"`` and names that run) instead of training
it a second time; ``--retrain`` trains it again. A run that trains its student (not a refit) records
``val_loss_last``: rule 6's figure for that run (the mean ``val/loss`` of its last ``REFERENCE_EPOCHS``
epochs, :func:`last_epochs_val_loss`), so the seeds' spread of rule 6's figure is on record beside that of
their test figures; the seed-0 run that tests the study's weights has its study's figure in the budget file.

Teachers (built once per category, seed 0, checkpoints under ``logs/benchmarks/map_regression``):
``patchcore`` (``experiment=patchcore_bottle``, 10 % coreset) and ``rd`` (``experiment=rd_mvtec``,
full width, the epoch budget :func:`benchmarks.mvtec.choose_budget` gives the category; run the
MVTec budget study first, or pass ``--teacher-epochs N``, recorded as ``teacher_budget_rule:
fixed``).

The rule, fixed in this file before any map-regression test figure exists:

1. **Teacher** (bottle): the teacher whose maps score the validation images better, by the mean
   of ``val/teacher_synthetic_pixel_auroc`` and ``val/teacher_synthetic_image_auroc`` (held-out
   normal training images and the same images with fixed synthetic anomalies, logged by the
   study runs of step 2). The other categories use a teacher of the same kind.
2. **Budget** (bottle, the chosen teacher, deployed MAC ratio 30, seed 0, ``test=false``): trained
   ``STUDY_EPOCHS`` (60) epochs; reference = the mean of the last 5 epochs of
   ``val/synthetic_pixel_auroc`` and ``val/synthetic_image_auroc``; the budget is the smallest of
   ``BUDGET_CANDIDATES`` at which both are at least the reference minus ``BUDGET_TOLERANCE``
   (0.01). It is used for every ratio, seed and category.
3. **Plan**: bottle at deployed MAC ratios 10, 30, 100 and 300 (seed 0) and seeds 1 and 2 at
   ratio 30; every other category at ratio 30, seed 0, with its own teacher. A setting that fixes
   the student's width (``scheme.width=N`` wins over the requested ratio) is one student size and
   plans bottle at ratio 30 only (:func:`plan`).

4. **Comparison** (``--comparison``, what pixel supervision buys): per category, a score-regression
   student (Pol et al.'s image-score student, :mod:`kd_experiments.schemes.score_regression`) of
   the same teacher at the same deployed size: the member of the score-regression family (at 256,
   128 or 64 px average-pooled input) whose deployed MACs are closest to the seed-0 ratio-30 map
   student's. It learns from the same images as the map student (the normal training images of
   its split and ``synthetic_per_image`` synthetic anomalies made from each, same generator and
   texture source), regressing the teacher's image score (L1 on the standardised score, Adam
   ``COMPARISON_LR``, cosine decay to 0, batch ``COMPARISON_BATCH``, ``COMPARISON_EPOCHS``
   epochs, the final weights tested: the protocol of
   :mod:`benchmarks.score_regression_cross_scheme`). Its record has ``student:
   "score_regression"``, image AUROC only (it writes no map).

Settings other than the default are studied on validation data only (``--budget --variant
scheme.feature_weight=1.0``: the study run of rule 2 with those overrides, the chosen teacher; its
records carry ``variant``); rules 1 and 2 read the default's records alone. A studied variant is
tested with ``--variant`` (without ``--budget``) at its own budget, rule 2 applied to its own study;
its records carry ``variant`` too and never stand for the default's. A variant whose learning rate
decays over the run (``scheme.lr_schedule=cosine``) is tested at the study's length
(``STUDY_EPOCHS``, or its own, below): its study curve at an earlier epoch is not what a run of that many epochs gives.
That budget does not depend on what the study shows, so such a variant's test runs may start once its study
has (its run folder exists) rather than once it has ended (``study_done_before_test: false`` in their
records); whether its records stand for the preferred setting is still rules 5 and 6's call on the
study alone, and bottle's seed-0 ratio-30 run, which tests the study's own weights (:func:`study_weights`),
waits for them (it is skipped until the study has ended).
A longer schedule is studied as a variant too (``--budget --variant trainer.max_epochs=120
scheme.feature_weight=4.0``): its study runs that many epochs, rule 2 reads its own curve with
candidates every ``LONG_CANDIDATE_STEP`` epochs beyond ``STUDY_EPOCHS``, and rule 5 compares the
last ``REFERENCE_EPOCHS`` epochs of each study, whatever its length.

A studied setting is *refitted* with ``--variant <setting> data.refit=true``: the student trains on
every ``train/good`` image, the tenth its study held out too (:class:`~kd_experiments.data.mvtec.MVTecDataModule`'s
``refit``), for the setting's own budget (rule 2 on the setting's study, without the refit override), and
the final weights are tested. A refit is never studied (its validation images are training images: the
validation figures of its run are in-sample, so it validates every ``REFIT_VAL_EVERY`` epochs only, as a
monitor) and always trains (its study's weights never saw the held-out tenth). Its records carry the
variant with ``data.refit=true`` and ``val_every_n_epochs``.

5. **Setting** (which studied setting the results stand for): per setting studied with the chosen
   teacher (the default and each variant), the mean of ``val/synthetic_pixel_auroc`` and
   ``val/synthetic_image_auroc`` over the last ``REFERENCE_EPOCHS`` epochs of its study; the
   setting with the highest mean is the one validation prefers, and the headline figures (the
   retention line of the results page) are those of that setting. The other settings' test
   records stay in the file, named by their overrides.

6. **Fidelity** (a forward rule): per studied setting, the mean of ``val/loss``
   (the unweighted L1 distance of the student's maps to the teacher's on the held-out normal images
   and their synthetic anomalies) over the last ``REFERENCE_EPOCHS`` epochs of its study; the lowest
   is the setting rule 6 prefers. Distillation asks the student to reproduce the teacher, and the
   teacher's maps score the test split far better than the synthetic anomalies measure (bottle:
   teacher validation synthetic pixel AUROC 0.79, test 0.986). Rule 6 was written after the test
   figures of the settings studied up to then were known (``STUDIED_BEFORE_RULE_6``; the criteria
   table below); its preference among those is no test of it, a setting studied after it is. Rule 5
   still names the setting of the headline figures; the page gives rule 6's beside it.

7. **Fidelity over seeds** (a forward rule): rule 6's figure averaged over seeds 0, 1 and 2, each seed
   validating on its own held-out tenth of ``train/good``: seed 0's is rule 6's (its study), seeds 1
   and 2's are the ``val_loss_last`` of their trained bottle ratio-30 test runs (:func:`seed_fidelity_figures`);
   the lowest mean is the setting rule 7 prefers. The three splits are not alike (the teachers are built
   with seed 0, so most of seeds 1 and 2's validation images are images a PatchCore teacher's bank holds),
   but each is the same for every setting. Rule 6 reads one validation split, and the seeds of one
   setting differ on it by more than settings do (bottle, the ``synthetic_per_image=4`` setting: 0.0729 on
   seed 0's split, 0.0700 and 0.0696 on seeds 1 and 2's, against a gap of 0.0006 between rule 6's first two
   settings). Rule 7 ranks only the settings whose three figures are on record; the runs that trained
   before the field existed get it with ``--backfill-val-loss`` (read from their MLflow runs where the
   store still holds them, the change logged in each record's ``updates``); where the store does not, the
   setting's seeds 1 and 2 are trained again for validation only (``--seed-validation --variant <setting>``:
   its study at that seed, ``test=false``, one per-run record each in
   ``benchmarks/results/map_regression_seed_validation.json``, the budget file's layout), and rule 7 reads
   their last ``REFERENCE_EPOCHS`` epochs. It was written when the test
   figures of the settings in ``STUDIED_BEFORE_RULE_7`` were known: its preference among those is no
   test of it, a setting studied after it is.

After the fact, :func:`criteria_table` sets each studied setting's validation criteria (rule 5's
score, ``val/loss``: the unweighted L1 distance of the student's maps to the teacher's on the
held-out images, and ``val/synthetic_aupro`` where logged) beside its bottle ratio-30 test figures,
with each criterion's rank correlation with test AUPRO. It reads the test split and selects
nothing; it says which criterion a future rule should trust.

The budget file: one record per study run (:func:`record_study`), holding once the run's key
(``category``, ``teacher_scheme``, ``requested_mac_ratio``, ``seed``, ``image_size``, ``variant``,
``max_epochs``), the teacher's validation figures (``val_teacher_synthetic_pixel_auroc``,
``val_teacher_synthetic_image_auroc``: one value per run), ``teacher_epochs``,
``teacher_budget_rule`` and the run's provenance, and its per-epoch figures (``EPOCH_FIELDS``) as
arrays of equal length, which its ``per_epoch`` field names: ``epoch`` (1 to ``max_epochs``),
``val_synthetic_pixel_auroc``, ``val_synthetic_image_auroc``, ``val_synthetic_aupro`` (in the
studies that logged it), ``val_loss`` and ``train_loss``; null where an epoch did not log a figure::

    {"category": "bottle", "teacher_scheme": "patchcore", ..., "max_epochs": 60,
     "per_epoch": ["epoch", "val_synthetic_pixel_auroc", ..., "train_loss"], "epoch": [1, 2, ..., 60],
     "val_synthetic_pixel_auroc": [0.398, 0.487, ...], ..., "val_teacher_synthetic_pixel_auroc": 0.792, ...,
     "git_commit": "...", "command": "...", "machine": {...}, "started_at": "...", "wall_s": 2623.8, ...}

The rules read flat per-epoch rows: every reader takes :func:`~benchmarks.harness.epoch_rows` of the
records (one row per epoch, the run's fields in each). Records of the earlier layout (one flat record
per studied epoch, each repeating its run's fields and provenance) are rows already and are read as
they are, beside per-run records; ``--migrate-budget [FILE]`` rewrites them in the per-run layout
(:func:`migrate_budget`; idempotent).

Entries are named ``<category>/<teacher>/m<ratio>/s<seed>``; ``--only`` takes shell patterns.
Resumable: a record already in the file is skipped::

    nohup .venv/bin/python -m benchmarks.map_regression --budget > logs/benchmarks/map_regression_budget.log 2>&1 &
    nohup .venv/bin/python -m benchmarks.map_regression > logs/benchmarks/map_regression.log 2>&1 &
    nohup .venv/bin/python -m benchmarks.map_regression --comparison > logs/benchmarks/map_regression_comparison.log 2>&1 &
    .venv/bin/python -m benchmarks.map_regression --table
    .venv/bin/python -m benchmarks.map_regression --migrate-budget   # the budget file, per-epoch records -> per-run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import QUIET, ROOT, ResultsFile, base_parser, compose, epoch_rows, now_utc, select
from benchmarks.mvtec import budget_path, choose_budget, mlflow_run, resumable_run, use_project_mlflow_store

CATEGORIES = ("bottle", "screw", "transistor")
TEACHERS = ("patchcore", "rd")
TEACHER_EXPERIMENTS = {"patchcore": "patchcore_bottle", "rd": "rd_mvtec"}
TEACHER_TARGETS = {"patchcore": "kd_experiments.schemes.patchcore.PatchCoreScheme",
                   "rd": "kd_experiments.schemes.reverse_distillation.ReverseDistillationScheme"}
IMAGE_SIZE = 256
BOTTLE_RATIOS = (10, 30, 100, 300)
SEED_RATIO = 30
EXTRA_SEEDS = (1, 2)
# -- the rule (fixed before any test run; see the module docstring) ------------------------------
STUDY_EPOCHS = 60
BUDGET_CANDIDATES = (10, 15, 20, 25, 30, 40, 50, 60)
#: a variant studied for longer (``trainer.max_epochs=N`` among its overrides, N > ``STUDY_EPOCHS``)
#: adds candidates every ``LONG_CANDIDATE_STEP`` epochs after ``STUDY_EPOCHS``, and N itself
LONG_CANDIDATE_STEP = 20
BUDGET_TOLERANCE = 0.01
REFERENCE_EPOCHS = 5
BUDGET_METRICS = ("val_synthetic_pixel_auroc", "val_synthetic_image_auroc")
TEACHER_METRICS = ("val/teacher_synthetic_pixel_auroc", "val/teacher_synthetic_image_auroc")
#: the student's figures a study logs per epoch, and their budget-file fields (``epoch`` first)
STUDY_METRICS = ("val/synthetic_pixel_auroc", "val/synthetic_image_auroc", "val/synthetic_aupro", "val/loss",
                 "train/loss")
EPOCH_FIELDS = ("epoch", *(name.replace("/", "_") for name in STUDY_METRICS))
# -- the comparison row (rule 4) -----------------------------------------------------------------------
COMPARISON_EPOCHS = 80
COMPARISON_LR = 1e-3
COMPARISON_BATCH = 32
COMPARISON_POOL_FACTORS = (1, 2, 4)  # the score student's input: 256, 128 or 64 px


#: the longest run-folder name an entry gets (:attr:`Entry.folder`), below the 255-byte file-name limit
#: with room for the run folders' prefixes (``budget-``)
FOLDER_MAX = 200


@dataclass(frozen=True)
class Entry:
    category: str
    teacher: str
    ratio: float
    seed: int
    variant: str | None = None  # a setting studied on validation (space-separated overrides), None: the default

    @property
    def name(self) -> str:
        return f"{self.category}/{self.teacher}/m{self.ratio:g}/s{self.seed}" + (f"/{self.variant}" if self.variant
                                                                                 else "")

    @property
    def folder(self) -> str:
        """The entry's name as a folder name and Hydra tag value. A name longer than ``FOLDER_MAX`` characters
        (a variant of many overrides: a file name has at most 255 bytes, and the run folders get prefixes)
        keeps its first characters and ends with a digest of the whole name, so distinct entries keep
        distinct folders; shorter names are kept whole, as their existing folders are named."""
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", self.name.replace("/", "-"))
        if len(folder) <= FOLDER_MAX:
            return folder
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        return f"{folder[:FOLDER_MAX - len(digest) - 1]}-{digest}"

    def key(self) -> dict[str, Any]:
        return {"category": self.category, "teacher_scheme": self.teacher, "requested_mac_ratio": self.ratio,
                "seed": self.seed, "image_size": IMAGE_SIZE, "variant": self.variant}


def plan(teacher: str, categories: tuple[str, ...] = CATEGORIES, variant: str | None = None) -> list[Entry]:
    """The runs of a setting: bottle at every ratio of ``BOTTLE_RATIOS`` (seed 0), bottle at ``SEED_RATIO``
    with ``EXTRA_SEEDS``, and every other category at ``SEED_RATIO`` (seed 0). A setting that fixes the
    student's width (``scheme.width=N``, which wins over the requested ratio) is one student size, the
    one it was studied at: it has no ratio family, so its bottle runs are at ``SEED_RATIO`` only
    (requested ratios 10, 100 and 300 would train that same student again under another name)."""
    ratios = (SEED_RATIO,) if variant_value(variant, "scheme.width") is not None else BOTTLE_RATIOS
    entries = [Entry("bottle", teacher, ratio, 0, variant) for ratio in ratios]
    entries += [Entry("bottle", teacher, SEED_RATIO, seed, variant) for seed in EXTRA_SEEDS]
    entries += [Entry(category, teacher, SEED_RATIO, 0, variant) for category in categories if category != "bottle"]
    return entries


def study_entry(teacher: str, variant: str | None = None) -> Entry:
    """The entry a setting's study runs (rule 2): bottle, seed 0, ``SEED_RATIO``, ``teacher``."""
    return Entry("bottle", teacher, SEED_RATIO, 0, variant)


# -- teachers ----------------------------------------------------------------------------------------
def teacher_checkpoint(teacher: str, category: str) -> Path:
    return ROOT / "logs" / "benchmarks" / "map_regression" / f"teacher-{teacher}-{category}" / "checkpoints" / "last.ckpt"


def teacher_budget(teacher: str, category: str, args: argparse.Namespace) -> dict[str, Any]:
    """How the teacher's training budget was set: ``teacher_epochs`` and ``teacher_budget_rule``
    (``validation``: the MVTec study's budget; ``fixed``: ``--teacher-epochs``; PatchCore: none)."""
    if teacher == "patchcore":
        return {"teacher_epochs": None, "teacher_budget_rule": None}
    if args.teacher_epochs is not None:
        return {"teacher_epochs": args.teacher_epochs, "teacher_budget_rule": "fixed"}
    epochs = choose_budget(ResultsFile(budget_path(ROOT / "benchmarks" / "results" / "mvtec.json")).runs,
                           category, IMAGE_SIZE)
    if epochs is None:
        raise SystemExit(f"the RD teacher of {category} needs the MVTec epoch budget: run "
                         "`python -m benchmarks.mvtec --budget` first, or pass --teacher-epochs N")
    return {"teacher_epochs": epochs, "teacher_budget_rule": "validation"}


def _bank_records_sources(checkpoint: Path, category: str, args: argparse.Namespace) -> bool:
    """Whether a PatchCore checkpoint's bank records its source images by the current
    :func:`~kd_experiments.data.common.sample_id` rule (one of the category's training images is
    among them)."""
    import torch

    from kd_experiments.checkpoints import load_checkpoint
    from kd_experiments.data.common import list_images, sample_id

    sources = load_checkpoint(checkpoint).get("state_dict", {}).get("memory_bank_sources")
    if sources is None:
        return False
    wanted = torch.tensor([sample_id(p) for p in list_images(args.data_root / "mvtec_ad" / category / "train" / "good")])
    return bool(torch.isin(wanted, sources).any())


def build_teacher(teacher: str, category: str, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Train (RD) or build (PatchCore) the teacher of a category once: its checkpoint and its
    budget (kept beside the checkpoint, so later records name the budget it was built with)."""
    checkpoint = teacher_checkpoint(teacher, category)
    info = checkpoint.parents[1] / "teacher_budget.json"
    if teacher == "patchcore" and checkpoint.is_file() and not _bank_records_sources(checkpoint, category, args):
        # built before banks recorded their source images (or by an older id rule): the same bank
        # is built again (the coreset is seeded), now with them (scheme.teacher_leave_one_out needs them)
        kept = checkpoint.parent.with_name("checkpoints-without-bank-sources")
        if kept.exists():
            shutil.rmtree(kept)
        checkpoint.parent.rename(kept)
    if checkpoint.is_file():
        budget = json.loads(info.read_text()) if info.is_file() else teacher_budget(teacher, category, args)
        return checkpoint, budget
    from kd_experiments.train import train

    budget = teacher_budget(teacher, category, args)
    chosen = [f"experiment={TEACHER_EXPERIMENTS[teacher]}", f"data.root={args.data_root / 'mvtec_ad'}",
              f"data.category={category}", f"data.image_size={IMAGE_SIZE}", "seed=0", *QUIET,
              "+tags.purpose=map_regression_teacher", "deploy.measure=false",
              "test=false"]  # the student runs score the teacher on the test split, beside the student
    if teacher == "patchcore":
        chosen += ["scheme.coreset_fraction=0.1"]
    else:
        chosen += ["scheme.compression_ratio=1", f"trainer.max_epochs={budget['teacher_epochs']}"]
    print(f"[map_regression] teacher {teacher}/{category}: building", flush=True)
    train(compose(chosen, output_dir=checkpoint.parents[1]))
    info.write_text(json.dumps(budget))
    return checkpoint, budget


# -- students ----------------------------------------------------------------------------------------
def student_overrides(entry: Entry, checkpoint: Path, args: argparse.Namespace, epochs: int, tag: str,
                      purpose: str) -> list[str]:
    return [
        "experiment=map_regression_bottle", f"data.root={args.data_root / 'mvtec_ad'}",
        f"data.category={entry.category}", f"data.image_size={IMAGE_SIZE}", f"seed={entry.seed}",
        f"scheme.teacher.scheme_target={TEACHER_TARGETS[entry.teacher]}", f"scheme.teacher.checkpoint={checkpoint}",
        f"scheme.deployed_mac_ratio={entry.ratio:g}", f"trainer.max_epochs={epochs}", *QUIET,
        f"+tags.purpose={purpose}", f"+tags.benchmark_run={tag}", *variant_overrides(entry.variant),
    ]


def variant_value(variant: str | None, key: str) -> str | None:
    """The value a variant (space-separated ``key=value`` overrides) gives ``key``, if any."""
    values = dict(override.partition("=")[::2] for override in (variant or "").split())
    return values.get(key)


def study_epochs(variant: str | None) -> int:
    """The length of a setting's study: ``STUDY_EPOCHS``, or the ``trainer.max_epochs=N`` of a
    variant studied for longer (a longer schedule is a setting like any other: rule 5 compares
    the last epochs of each study, rule 2 picks its budget from its own curve)."""
    length = variant_value(variant, "trainer.max_epochs")
    return STUDY_EPOCHS if length is None else int(length)


def variant_overrides(variant: str | None) -> list[str]:
    """A variant's overrides without its study length (the runs set ``trainer.max_epochs``)."""
    return [o for o in (variant or "").split() if o.partition("=")[0] != "trainer.max_epochs"]


def budget_candidates(variant: str | None) -> tuple[int, ...]:
    """Rule 2's candidate budgets for a setting: ``BUDGET_CANDIDATES``, and for a longer study
    one every ``LONG_CANDIDATE_STEP`` epochs up to its length."""
    length = study_epochs(variant)
    longer = range(STUDY_EPOCHS + LONG_CANDIDATE_STEP, length, LONG_CANDIDATE_STEP)
    return tuple(sorted({*(c for c in BUDGET_CANDIDATES if c <= length), *longer, length}))


def study_run_dir(entry: Entry) -> Path:
    """The folder of ``entry``'s study run (:func:`study`)."""
    return ROOT / "logs" / "benchmarks" / "map_regression" / f"budget-{entry.folder}"


#: scheme settings that do not change what a student learns (where it caches, what else its test scores)
_UNLEARNED_SETTINGS = frozenset({"input_shape", "cache_dir", "measure_teacher", "teacher_batch_size"})


def study_weights(entry: Entry, epochs: int, scheme: Any, teacher_checkpoint_path: Path) -> Path | None:
    """The final checkpoint of ``entry``'s own study run when a test run of ``entry`` would train it
    again, else None.

    A study is bottle, seed 0, ``SEED_RATIO``, the chosen teacher, ``test=false``, trained the whole
    study length; a test run of the same entry at that budget (a setting whose learning rate decays
    over the run always is) trains the same student with the same seed and data, and training on
    the CPU is deterministic: a test-only run of the study's ``last.ckpt`` gives the test figures a
    retrained one does, bit for bit (checked with ``kd-train ... train=false ckpt_path=<study>/last.ckpt``
    on the 200-epoch width 17 / ``scheme.merge_depth=3`` study: the three test figures of that
    setting's seed-0 record in ``map_regression.json``, which trained its own student). It is used only when the checkpoint
    finished all ``epochs``, its scheme settings (``hyper_parameters``) equal ``scheme``'s (the
    composed config, less ``_UNLEARNED_SETTINGS``), and it is newer than the teacher's checkpoint
    (a teacher built again means a student trained again)."""
    from kd_experiments.checkpoints import load_checkpoint

    if entry != study_entry(entry.teacher, entry.variant) or epochs != study_epochs(entry.variant):
        return None
    path = study_run_dir(entry) / "checkpoints" / "last.ckpt"
    if not path.is_file() or path.stat().st_mtime <= teacher_checkpoint_path.stat().st_mtime:
        return None
    saved = load_checkpoint(path)
    processed = saved.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("total", {}).get("processed")
    if processed != epochs:
        return None
    settings = {key: value for key, value in (saved.get("hyper_parameters") or {}).items()
                if key not in _UNLEARNED_SETTINGS and key in scheme}
    if not settings or any(scheme[key] != value for key, value in settings.items()):
        return None
    return path


def run_student(entry: Entry, args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """Train and test ``entry``'s student (or test its study run's, :func:`study_weights`) and
    measure it beside its teacher: its record's figures."""
    from kd_experiments.checkpoints import mlflow_run_id_of
    from kd_experiments.train import train

    checkpoint, teacher_budget_used = build_teacher(entry.teacher, entry.category, args)
    tag = f"map-regression-{entry.folder}-{os.getpid()}-{time.time_ns()}"
    run_dir = ROOT / "logs" / "benchmarks" / "map_regression" / entry.folder
    overrides = student_overrides(entry, checkpoint, args, epochs, tag, "benchmark")
    refit = is_refit(entry.variant)
    if refit:  # its validation images are training images: an in-sample monitor, run now and then
        overrides.append(f"trainer.check_val_every_n_epoch={REFIT_VAL_EVERY}")
    cfg = compose(overrides, output_dir=run_dir)
    weights = (None if getattr(args, "retrain", False) or refit
               else study_weights(entry, epochs, cfg.scheme, checkpoint))
    if weights is not None:
        print(f"[map_regression] {entry.name}: testing the study run's final weights ({weights})", flush=True)
        cfg = compose([*overrides, "train=false", f"ckpt_path={weights}"], output_dir=run_dir)
    metrics = train(cfg)
    client, run = mlflow_run(tag, str(cfg.experiment_name))
    logged, params = run.data.metrics, run.data.params
    trained_here = weights is None and not refit

    def number(name: str) -> float | None:
        value = params.get(name)
        return None if value is None else float(value)

    return {
        "deployed_mac_ratio": number("deployed_mac_compression_ratio"),
        "deployed_param_ratio": number("deployed_compression_ratio"),
        "image_auroc": metrics["test/image_auroc"], "pixel_auroc": metrics.get("test/pixel_auroc"),
        "aupro": metrics.get("test/aupro"),
        "teacher_image_auroc": metrics.get("test/teacher_image_auroc"),
        "teacher_pixel_auroc": metrics.get("test/teacher_pixel_auroc"),
        "teacher_aupro": metrics.get("test/teacher_aupro"),
        "student_latency_ms_b1": logged.get("deploy/onnx_latency_ms_b1"),
        "teacher_latency_ms_b1": logged.get("deploy/teacher_onnx_latency_ms_b1"),
        "student_torch_latency_ms_b1": logged.get("deploy/latency_ms_b1"),
        "teacher_torch_latency_ms_b1": logged.get("deploy/teacher_latency_ms_b1"),
        "deployed_params": number("deployed_params"), "deployed_macs": number("deployed_macs"),
        "student_width": number("student_width"), "epochs": int(cfg.trainer.max_epochs),
        "mlflow_run_id": run.info.run_id, **teacher_budget_used,
        "weights": "trained" if weights is None else "study",
        **({} if weights is None else {"weights_mlflow_run_id": mlflow_run_id_of(weights)}),
        **({"val_every_n_epochs": REFIT_VAL_EVERY} if refit else {}),
        **({"val_loss_last": last_epochs_val_loss(client, run.info.run_id)} if trained_here else {}),
    }


def last_epochs_val_loss(client: Any, run_id: str) -> float | None:
    """The mean of a trained run's ``val/loss`` (rule 6's ``FIDELITY_METRIC``: the L1 distance of the student's
    maps to the teacher's on the held-out normal images and their synthetic anomalies) over its last
    ``REFERENCE_EPOCHS`` validated epochs: rule 6's figure for this seed's run, so the spread of rule 6's figure
    between seeds is on record beside the spread of the test figures (None: fewer epochs validated)."""
    history = sorted(client.get_metric_history(run_id, "val/loss"), key=lambda point: point.step)
    if len(history) < REFERENCE_EPOCHS:
        return None
    return statistics.fmean(point.value for point in history[-REFERENCE_EPOCHS:])


def backfill_val_loss(results: ResultsFile, client: Any = None) -> str:
    """Rule 7's field for the trained, non-refit test records that lack it: ``val_loss_last`` of their MLflow
    run (:func:`last_epochs_val_loss`), added with :meth:`ResultsFile.update` (logged in the record's
    ``updates``); a run the store no longer holds is left as it is. Returns one line per record looked at."""
    if client is None:
        from kd_experiments.tracking import make_client, resolve_tracking_uri

        client = make_client(resolve_tracking_uri(None, ROOT))
    from mlflow.exceptions import MlflowException

    lines = []
    for run in list(results.reload()["runs"]):
        if (not is_map_student(run) or run.get("weights") != "trained" or is_refit(run.get("variant"))
                or SEED_FIDELITY_METRIC in run or not run.get("mlflow_run_id")):
            continue
        run_id = run["mlflow_run_id"]
        try:
            figure = last_epochs_val_loss(client, run_id)
        except MlflowException as error:  # a store that says it does not hold the run: nothing to add
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            figure = None
        if figure is None:  # the SQL store answers an empty history for a run it does not hold
            lines.append(f"{run_id}: fewer than {REFERENCE_EPOCHS} validated epochs of val/loss in the store "
                         "(or not the run at all), left as it is")
            continue
        results.update({"mlflow_run_id": run_id}, {SEED_FIDELITY_METRIC: figure})
        lines.append(f"{run_id}: {SEED_FIDELITY_METRIC} {figure:.4f} ({run['category']}, seed {run['seed']}, "
                     f"{setting_name(run.get('variant'))})")
    return "\n".join(lines) or "nothing to backfill"


def study(entry: Entry, args: argparse.Namespace) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """The budget study of one teacher (with the entry's variant, a setting studied on validation
    data): per-epoch validation figures, and the teacher's own with the student's deployed size.

    A study is hours of CPU: one stopped part-way (a process killed, a session's end) continues from
    its run folder's ``last.ckpt`` into the same MLflow run (:func:`benchmarks.mvtec.resumable_run`,
    ``kd-train``'s exact resume: optimiser, schedule and the EMA average are in the checkpoint), when
    its teacher is the same build and its length the same; its record then says ``resumed: true``."""
    from kd_experiments.train import train

    checkpoint, teacher_budget_used = build_teacher(entry.teacher, entry.category, args)
    run_dir = study_run_dir(entry)
    length = study_epochs(entry.variant)
    tag, resume_from = resumable_run(run_dir, f"map-regression-budget-{entry.folder}",
                                     f"teacher={checkpoint} built={checkpoint.stat().st_mtime_ns} epochs={length}")
    chosen = [*student_overrides(entry, checkpoint, args, length, tag, "budget"), "test=false",
              "trainer.num_sanity_val_steps=0", "deploy.measure=false", "deploy.log_model=false"]
    if resume_from is not None:
        chosen.append(f"ckpt_path={resume_from}")
        print(f"[map_regression] study {entry.name}: continues from {resume_from}", flush=True)
    train(compose(chosen, output_dir=run_dir))
    client, run = mlflow_run(tag, "map_regression_bottle")
    steps = {point.step: int(point.value) for point in client.get_metric_history(run.info.run_id, "epoch")}
    epochs: dict[int, dict[str, float]] = {}
    for name in STUDY_METRICS:
        for point in client.get_metric_history(run.info.run_id, name):
            if point.step in steps:
                epochs.setdefault(steps[point.step] + 1, {})[name.replace("/", "_")] = point.value
    teacher = {name.replace("/", "_"): run.data.metrics[name] for name in TEACHER_METRICS if name in run.data.metrics}
    return epochs, {**teacher, **teacher_budget_used, **student_size(run.data.params),
                    **({"resumed": True} if resume_from is not None else {})}


def student_size(params: dict[str, str]) -> dict[str, Any]:
    """The studied student's deployed size from its run's parameters (``deployed_macs`` and
    ``deployed_mac_ratio``: the teacher's deployed MACs over the student's), known before it trains,
    so a rule may hold a setting to a size floor without reading any test figure."""
    if "deployed_mac_compression_ratio" not in params:
        return {}
    return {"deployed_macs": int(params["deployed_macs"]),
            "deployed_mac_ratio": float(params["deployed_mac_compression_ratio"])}


def study_record(key: dict[str, Any], epochs: dict[int, dict[str, float]],
                 run_figures: dict[str, Any]) -> dict[str, Any]:
    """One study run's budget record (the layout of the module docstring): ``key``, the per-epoch
    figures :func:`study` returned as arrays in epoch order (``per_epoch`` names them; a figure
    some epoch logged and another did not is null there), then the run's own figures (the teacher's,
    its budget, the student's deployed size)."""
    order = sorted(epochs)
    logged = [name for name in EPOCH_FIELDS[1:] if any(name in epochs[epoch] for epoch in order)]
    return {**key, "per_epoch": ["epoch", *logged], "epoch": order,
            **{name: [epochs[epoch].get(name) for epoch in order] for name in logged}, **run_figures}


def record_study(entry: Entry, args: argparse.Namespace, budgets: ResultsFile) -> None:
    """Run the study of ``entry`` unless its last epoch is in the file (in either layout); one record
    for the run (:func:`study_record`). With ``--plan``, say whether it is done and run nothing."""
    length = study_epochs(entry.variant)
    key = {**entry.key(), "max_epochs": length}
    done = budgets.has({**key, "epoch": length})
    if getattr(args, "plan", False):
        print(f"{'done ' if done else 'to do'}  study {entry.name} ({length} epochs)", flush=True)
        return
    if done:
        return
    started_at, started = now_utc(), time.perf_counter()
    epochs, run_figures = study(entry, args)
    budgets.append(study_record(key, epochs, run_figures), started_at=started_at,
                   wall_s=time.perf_counter() - started)


def _run_fields(row: dict[str, Any]) -> str:
    """A per-epoch row's run: every field but ``EPOCH_FIELDS`` (key, teacher figures, provenance)."""
    return json.dumps({field: value for field, value in row.items() if field not in EPOCH_FIELDS}, sort_keys=True)


def _per_run_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of one run (epochs in order, the same fields in the same order) as one record whose
    ``EPOCH_FIELDS`` are arrays, fields in the rows' order, ``per_epoch`` before the first array."""
    names = [field for field in rows[0] if field in EPOCH_FIELDS]
    record: dict[str, Any] = {}
    for field, value in rows[0].items():
        if field == names[0]:
            record["per_epoch"] = names
        record[field] = [row[field] for row in rows] if field in names else value
    return record


def compact_study_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The budget file's records with the flat per-epoch rows of each complete study run (the
    earlier layout) made one per-run record; per-run records are kept as they are.

    A run's rows are those whose fields other than ``EPOCH_FIELDS`` (key, teacher figures,
    provenance) are all equal. They are compacted when their epochs are 1 to ``max_epochs``, each
    once, and every row has the same fields in the same order, so that
    :func:`~benchmarks.harness.epoch_rows` gives them back exactly; the record stands where the
    run's first row stood. The rows of any other run (a gap or a repeated epoch, a run whose rows
    are still being appended) are kept as they are, where they are."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "per_epoch" not in record:
            runs.setdefault(_run_fields(record), []).append(record)
    compacted: dict[str, dict[str, Any]] = {}
    for fields, rows in runs.items():
        complete = ({row.get("epoch") for row in rows} == set(range(1, len(rows) + 1))  # 1..N, each once
                    and rows[0].get("max_epochs", len(rows)) == len(rows))
        if complete and len({tuple(row) for row in rows}) == 1:
            compacted[fields] = _per_run_record(sorted(rows, key=lambda row: row["epoch"]))
    result: list[dict[str, Any]] = []
    placed: set[str] = set()
    for record in records:
        fields = None if "per_epoch" in record else _run_fields(record)
        if fields not in compacted:
            result.append(record)
        elif fields not in placed:
            placed.add(fields)
            result.append(compacted[fields])
    return result


def migrate_budget(path: Path) -> str:
    """Rewrite the budget file at ``path`` in the per-run layout (:func:`compact_study_rows`), under
    its lock (a study may be appending); idempotent. It checks that the rewritten file expands to
    exactly the rows it held (else it raises and leaves the file as it was). Returns what it did."""
    if not path.is_file():
        raise SystemExit(f"{path}: no budget file to migrate")

    def rows(records: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(row, sort_keys=True) for row in epoch_rows(records))

    with ResultsFile(path).rewrite() as data:
        before = data["runs"]
        after = compact_study_rows(before)
        if rows(after) != rows(before):
            raise RuntimeError(f"{path}: the per-run records would not expand to the rows the file holds")
        data["runs"] = after
    per_run = sum("per_epoch" in record for record in after)
    return (f"{path.name}: {len(before)} records -> {len(after)} ({per_run} per-run records, "
            f"{len(after) - per_run} per-epoch rows kept as they are)")


def choose_teacher(records: list[dict[str, Any]]) -> str | None:
    """Rule 1: the teacher with the higher mean validation synthetic AUROC (``None`` until both are studied)."""
    scores = {}
    for teacher in TEACHERS:
        rows = [r for r in records if r.get("teacher_scheme") == teacher and r.get("epoch") == STUDY_EPOCHS
                and r.get("variant") is None]
        if not rows:
            return None
        scores[teacher] = statistics.fmean(rows[0][name.replace("/", "_")] for name in TEACHER_METRICS)
    return max(TEACHERS, key=lambda teacher: scores[teacher])


def _last_epochs(records: list[dict[str, Any]], teacher: str, variant: str | None) -> list[dict[str, Any]] | None:
    """The records of the last ``REFERENCE_EPOCHS`` epochs of one setting's study with ``teacher``
    (None: the study is not complete)."""
    length = study_epochs(variant)
    rows = {r["epoch"]: r for r in records if r.get("teacher_scheme") == teacher and r.get("variant") == variant}
    last = range(length - REFERENCE_EPOCHS + 1, length + 1)
    return [rows[e] for e in last] if all(e in rows for e in last) else None


def _studied_settings(records: list[dict[str, Any]], teacher: str) -> list[str | None]:
    """The settings studied with ``teacher`` (None: the default), in the order first studied, so that
    a tie in rules 5 and 6 goes to the earlier setting in every process (a set's order of strings
    changes with the interpreter's hash seed)."""
    return list(dict.fromkeys(r.get("variant") for r in records if r.get("teacher_scheme") == teacher))


def _scored_epochs(records: list[dict[str, Any]], teacher: str) -> dict[str | None, list[float]]:
    """Per setting studied with ``teacher`` (None: the default) whose study is complete, the
    per-epoch score (mean of the budget metrics) over its last ``REFERENCE_EPOCHS`` epochs."""
    scored = {}
    for variant in _studied_settings(records, teacher):
        last = _last_epochs(records, teacher, variant)
        if last is not None:
            scored[variant] = [statistics.fmean(row[metric] for metric in BUDGET_METRICS) for row in last]
    return scored


def setting_scores(records: list[dict[str, Any]], teacher: str) -> dict[str | None, float]:
    """Rule 5: per setting studied with ``teacher`` (None: the default), the mean of the budget
    metrics over the last ``REFERENCE_EPOCHS`` epochs of its (complete) study."""
    return {variant: statistics.fmean(per_epoch) for variant, per_epoch in _scored_epochs(records, teacher).items()}


def setting_spreads(records: list[dict[str, Any]], teacher: str) -> dict[str | None, float]:
    """Beside rule 5: per setting, the standard error of its score, from the epoch-to-epoch spread
    of the per-epoch score over the same last epochs. It says how far apart two settings must be
    before the ranking means more than which epochs were noisy; it does not count the spread
    between seeds, which one study per setting cannot measure."""
    return {variant: statistics.stdev(per_epoch) / len(per_epoch) ** 0.5 if len(per_epoch) > 1 else 0.0
            for variant, per_epoch in _scored_epochs(records, teacher).items()}


def preferred_setting(records: list[dict[str, Any]], teacher: str) -> str | None:
    """Rule 5: the studied setting with the highest validation mean (None: the default)."""
    scores = setting_scores(records, teacher)
    return max(scores, key=lambda variant: scores[variant]) if scores else None


def preferred_in(records: list[dict[str, Any]]) -> str | None:
    """Rule 5 on a budget file's records: the preferred setting of the teacher rule 1 chose."""
    teacher = choose_teacher(records)
    return preferred_setting(records, teacher) if teacher else None


def _last_epochs_mean(records: list[dict[str, Any]], teacher: str, variant: str | None, metric: str) -> float | None:
    """The mean of ``metric`` over the last ``REFERENCE_EPOCHS`` epochs of a complete study (None: the
    study is not complete or did not log ``metric``)."""
    last = _last_epochs(records, teacher, variant)
    if last is None or any(row.get(metric) is None for row in last):
        return None
    return statistics.fmean(row[metric] for row in last)


#: rule 6 reads this budget-record field, lower is better: ``val/loss``, the unweighted L1 distance of the
#: student's maps to the teacher's on the held-out normal images and their synthetic anomalies
FIDELITY_METRIC = "val_loss"
#: the settings studied before rule 6 was written (None: the default). Their test figures were known when it
#: was (the criteria table of the results page), so rule 6 preferring one of them is no test of rule 6
STUDIED_BEFORE_RULE_6 = frozenset({
    None, "scheme.feature_weight=1.0", "scheme.feature_weight=1.0 scheme.anomaly_weight=16.0",
    "scheme.feature_weight=1.0 scheme.lr_schedule=cosine", "scheme.feature_weight=16.0", "scheme.feature_weight=4.0",
    "scheme.feature_weight=4.0 scheme.synthetic_per_image=6", "trainer.max_epochs=120 scheme.feature_weight=4.0",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.augment_per_image=4",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.depth=4",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=0",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=0 scheme.teacher_leave_one_out=true",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=2",
    "trainer.max_epochs=120 scheme.feature_weight=4.0 scheme.feature_level=[0,1]",
    "trainer.max_epochs=200 scheme.feature_weight=4.0 scheme.feature_level=0",
    "trainer.max_epochs=200 scheme.feature_weight=4.0 scheme.feature_level=0 scheme.anomaly_weight=1.0",
})


def fidelity_scores(records: list[dict[str, Any]], teacher: str) -> dict[str | None, float]:
    """Rule 6: per setting studied with ``teacher`` whose study is complete, the mean of ``FIDELITY_METRIC``
    over the last ``REFERENCE_EPOCHS`` epochs (lower: the student's maps are closer to the teacher's)."""
    scores = {variant: _last_epochs_mean(records, teacher, variant, FIDELITY_METRIC)
              for variant in _studied_settings(records, teacher)}
    return {variant: score for variant, score in scores.items() if score is not None}


def fidelity_preferred(records: list[dict[str, Any]], teacher: str) -> str | None:
    """Rule 6: the studied setting closest to the teacher on validation (None: the default)."""
    scores = fidelity_scores(records, teacher)
    return min(scores, key=lambda variant: scores[variant]) if scores else None


def rule_6_line(records: list[dict[str, Any]], teacher: str) -> str:
    """Rule 6's ranking, its preference, and whether that preference is a forward test of it."""
    scores = fidelity_scores(records, teacher)
    if not scores:
        return ""
    ranked = sorted(scores, key=lambda variant: scores[variant])
    preferred = ranked[0]
    standing = ("studied before rule 6 was written, its test figures known: not a test of rule 6"
                if preferred in STUDIED_BEFORE_RULE_6 else
                "studied after rule 6 was written: its test runs are a forward test of rule 6")
    return ("- Rule 6 (fidelity; mean validation L1 of the student's maps to the teacher's over the last "
            f"{REFERENCE_EPOCHS} epochs of each study, lower first): "
            + "; ".join(f"{setting_name(v)} {scores[v]:.4f}" for v in ranked)
            + f". Preferred: {setting_name(preferred)} ({standing}).")


#: rule 7 reads this field of the seed runs' test records: rule 6's figure for that run (:func:`last_epochs_val_loss`)
SEED_FIDELITY_METRIC = "val_loss_last"
_CHOSEN = ("scheme.feature_weight=4.0 scheme.feature_level=0 scheme.teacher_leave_one_out=true scheme.lr_schedule=cosine "
           "scheme.fusion=pyramid")
_CHOSEN_17 = f"{_CHOSEN} scheme.width=17 scheme.merge_depth=3"
#: the settings whose bottle test figures were known when rule 7 was written (None: the default); rule 7
#: preferring one of them is no test of rule 7, a setting studied after it is
STUDIED_BEFORE_RULE_7 = STUDIED_BEFORE_RULE_6 | frozenset({
    f"trainer.max_epochs=200 {_CHOSEN.removesuffix(' scheme.fusion=pyramid')}", f"trainer.max_epochs=200 {_CHOSEN}",
    f"trainer.max_epochs=200 {_CHOSEN_17}", f"trainer.max_epochs=200 {_CHOSEN} scheme.width=18",
    f"trainer.max_epochs=300 {_CHOSEN_17}", f"trainer.max_epochs=400 {_CHOSEN_17}",
    f"trainer.max_epochs=600 {_CHOSEN_17} callbacks=ema",
    *(f"trainer.max_epochs=400 {_CHOSEN_17} callbacks=ema{extra}"
      for extra in ("", " scheme.augment_per_image=1", " scheme.learning_rate=1.0e-3", " scheme.learning_rate=4.0e-3",
                    " scheme.synthetic_per_image=4", " scheme.weight_decay=5.0e-2")),
})


def seed_validation_path(output: Path) -> Path:
    """The validation-only seed runs' file beside the results file (``map_regression.json`` ->
    ``map_regression_seed_validation.json``)."""
    return output.with_name(f"{output.stem}_seed_validation{output.suffix}")


def seed_study_entries(teacher: str, variant: str) -> list[Entry]:
    """The validation-only runs of a setting's seeds 1 and 2 (``--seed-validation``): its study at another seed."""
    return [Entry("bottle", teacher, SEED_RATIO, seed, variant) for seed in EXTRA_SEEDS]


def _seed_figure(runs: list[dict[str, Any]], seed_studies: list[dict[str, Any]], teacher: str,
                 variant: str | None, seed: int) -> float | None:
    """Rule 6's figure for one seed of a setting: its trained test record's ``SEED_FIDELITY_METRIC``, else
    the mean ``val_loss`` of the last ``REFERENCE_EPOCHS`` epochs of its complete validation-only run."""
    for run in runs:
        if (is_map_student(run) and run.get("variant") == variant and run["category"] == "bottle"
                and run["teacher_scheme"] == teacher and run.get("requested_mac_ratio") == SEED_RATIO
                and run["seed"] == seed and run.get(SEED_FIDELITY_METRIC) is not None):
            return run[SEED_FIDELITY_METRIC]
    return _last_epochs_mean([row for row in seed_studies if row.get("seed") == seed and row.get("category") == "bottle"
                              and row.get("requested_mac_ratio") == SEED_RATIO], teacher, variant, FIDELITY_METRIC)


def seed_fidelity_figures(records: list[dict[str, Any]], runs: list[dict[str, Any]], teacher: str,
                          seed_studies: list[dict[str, Any]] = ()) -> dict[str | None, list[float]]:
    """Rule 7: per setting with rule 6's figure (its complete study, the seed-0 run) and a figure for every
    seed of ``EXTRA_SEEDS`` (:func:`_seed_figure`: its trained bottle test record at ``SEED_RATIO``, else its
    validation-only run, ``seed_studies``' per-epoch rows): rule 6's figure per seed, seed 0 first. Each seed
    holds out its own tenth of ``train/good`` for validation, so every setting is measured on the same
    three validation sets."""
    figures: dict[str | None, list[float]] = {}
    for variant, seed_0 in fidelity_scores(records, teacher).items():
        per_seed = [seed_0, *(_seed_figure(runs, list(seed_studies), teacher, variant, seed) for seed in EXTRA_SEEDS)]
        if None not in per_seed:
            figures[variant] = per_seed
    return figures


def seed_fidelity_preferred(records: list[dict[str, Any]], runs: list[dict[str, Any]], teacher: str,
                            seed_studies: list[dict[str, Any]] = ()) -> str | None:
    """Rule 7: the setting with the lowest mean of rule 6's figure over seeds 0, 1, 2 (None: the default, or
    no setting has all three)."""
    figures = seed_fidelity_figures(records, runs, teacher, seed_studies)
    return min(figures, key=lambda variant: statistics.fmean(figures[variant])) if figures else None


def rule_7_line(records: list[dict[str, Any]], runs: list[dict[str, Any]], teacher: str,
                seed_studies: list[dict[str, Any]] = ()) -> str:
    """Rule 7's ranking (each setting's mean and its three seeds), its preference and whether that is a
    forward test of it, and how many studied settings it cannot rank yet."""
    figures = seed_fidelity_figures(records, runs, teacher, seed_studies)
    if not figures:
        return ""
    means = {variant: statistics.fmean(per_seed) for variant, per_seed in figures.items()}
    ranked = sorted(means, key=lambda variant: means[variant])
    preferred = ranked[0]
    standing = ("its test figures were known when rule 7 was written: not a test of rule 7"
                if preferred in STUDIED_BEFORE_RULE_7 else
                "studied after rule 7 was written: its test runs are a forward test of rule 7")
    unranked = len(fidelity_scores(records, teacher)) - len(figures)
    return ("- Rule 7 (fidelity over seeds; rule 6's figure averaged over seeds 0, 1 and 2, each on its own "
            "held-out tenth: seed 0 from the study, seeds 1 and 2 from their test runs' last "
            f"{REFERENCE_EPOCHS} epochs or their validation-only runs'; lower first; in brackets the three seeds): "
            + "; ".join(f"{setting_name(v)} {means[v]:.4f} ({' / '.join(f'{x:.4f}' for x in figures[v])})"
                        for v in ranked)
            + f". Preferred: {setting_name(preferred)} ({standing}). Not ranked: {unranked} studied "
            "setting(s) whose seed runs' validation figures are not on record.")


def decays_over_the_run(variant: str) -> bool:
    """Whether a variant's learning rate decays over the run's length (``scheme.lr_schedule=cosine``)."""
    return variant_value(variant, "scheme.lr_schedule") == "cosine"


def choose_epochs(records: list[dict[str, Any]], teacher: str, variant: str | None = None) -> int | None:
    """Rule 2: the smallest candidate epoch within the tolerance of the last epochs' mean (of the
    default's study, or of ``variant``'s)."""
    rows = {r["epoch"]: r for r in records if r.get("teacher_scheme") == teacher and r.get("variant") == variant}
    length = study_epochs(variant)
    if length not in rows:
        return None
    if variant is not None and decays_over_the_run(variant):
        return length
    last = range(length - REFERENCE_EPOCHS + 1, length + 1)
    reference = {metric: statistics.fmean(rows[e][metric] for e in last) for metric in BUDGET_METRICS}
    for candidate in budget_candidates(variant):
        if all(rows[candidate][metric] >= reference[metric] - BUDGET_TOLERANCE for metric in BUDGET_METRICS):
            return candidate
    return length


REFIT = "data.refit=true"
#: a refit's validation (in-sample, a monitor) runs every this many epochs
REFIT_VAL_EVERY = 50


def is_refit(variant: str | None) -> bool:
    """Whether a variant refits a studied setting on every training image (``data.refit=true``)."""
    return variant_value(variant, "data.refit") in ("true", "True")


def refitted_setting(variant: str) -> str:
    """The studied setting a refit variant refits: the variant without its ``data.refit`` override."""
    return " ".join(o for o in variant.split() if o.partition("=")[0] != "data.refit")


def variant_budget(records: list[dict[str, Any]], teacher: str, variant: str) -> tuple[int | None, bool]:
    """A studied variant's test budget (rule 2 on its own study; None: not yet known) and whether its
    study has ended. A variant whose learning rate decays over the run has its study's length
    whatever the study shows, so its budget is known once its study has begun (its run folder exists).
    A refit (:func:`is_refit`) has the budget of the setting it refits, and only once that study has ended."""
    if is_refit(variant):
        setting = refitted_setting(variant)
        if not setting:
            return None, False
        epochs = choose_epochs(records, teacher, setting)
        return epochs, epochs is not None
    epochs = choose_epochs(records, teacher, variant)
    if epochs is not None:
        return epochs, True
    if decays_over_the_run(variant) and study_run_dir(study_entry(teacher, variant)).is_dir():
        return study_epochs(variant), False
    return None, False


def waits_for_study(entry: Entry, study_done: bool) -> bool:
    """Whether ``entry``'s test run waits for its study to end: the study's own entry (bottle, seed 0,
    ``SEED_RATIO``), which tests the study's final weights (:func:`study_weights`)."""
    return not study_done and entry == study_entry(entry.teacher, entry.variant)


# -- the comparison: a score-regression student of the same teacher at the same deployed size ---------
def is_map_student(run: dict[str, Any]) -> bool:
    """A map student's record (records written before the comparison existed have no ``student``)."""
    return run.get("student", "map_regression") == "map_regression"


def map_run_done(results: ResultsFile, entry: Entry) -> bool:
    key = entry.key()
    return any(is_map_student(run) and all(run.get(k) == v for k, v in key.items()) for run in results.reload()["runs"])


def matched_map_run(runs: list[dict[str, Any]], category: str, teacher: str) -> dict[str, Any] | None:
    """The seed-0 map student at the requested ratio ``SEED_RATIO`` the comparison is sized to."""
    return next((r for r in runs if is_map_student(r) and r.get("variant") is None and r["category"] == category
                 and r["teacher_scheme"] == teacher and r["requested_mac_ratio"] == SEED_RATIO and r["seed"] == 0),
                None)


def comparison_key(category: str, teacher: str, seed: int = 0) -> dict[str, Any]:
    return {"category": category, "teacher_scheme": teacher, "requested_mac_ratio": SEED_RATIO, "seed": seed,
            "image_size": IMAGE_SIZE, "student": "score_regression"}


def closest_score_student(target_macs: float, preprocessing: Any) -> tuple[Any, int, int]:
    """The score-regression family member and pooling factor whose deployed MACs (preprocessing
    included) are closest to ``target_macs`` in log space: ``(spec, factor, macs)``."""
    import math

    import torch

    from kd_experiments.compression import count_macs
    from kd_experiments.schemes.score_regression.deploy import ScoreRegressionDeployable
    from kd_experiments.schemes.score_regression.torch_model import (
        PooledScoreRegressor,
        build_student,
        student_family,
    )

    best = None
    for factor in COMPARISON_POOL_FACTORS:
        shape = (preprocessing.input_channels, IMAGE_SIZE // factor, IMAGE_SIZE // factor)
        for spec in student_family(shape):
            deployable = ScoreRegressionDeployable(preprocessing,
                                                   PooledScoreRegressor(build_student(spec, shape), factor, 0.0, 1.0))
            macs = count_macs(deployable, torch.zeros(1, preprocessing.input_channels, IMAGE_SIZE, IMAGE_SIZE))
            distance = abs(math.log(macs / target_macs))
            if best is None or distance < best[0]:
                best = (distance, spec, factor, macs)
    assert best is not None
    return best[1], best[2], best[3]


def run_comparison(category: str, teacher: str, args: argparse.Namespace, results: ResultsFile) -> dict[str, Any]:
    """Rule 4 of the module docstring, for one category: the record's fields."""
    from types import SimpleNamespace

    import torch

    from benchmarks.score_regression_cross_scheme import fit_student, score, stack_images, synthetic_images
    from kd_experiments import config as kd_config
    from kd_experiments import metrics as kd_metrics
    from kd_experiments.cache import TensorCache, digest, tensor_digest
    from kd_experiments.deployable import Preprocessing, measure_deployment
    from kd_experiments.schemes.score_regression.deploy import ScoreRegressionDeployable
    from kd_experiments.schemes.score_regression.teachers import load_scheme_teacher
    from kd_experiments.schemes.score_regression.torch_model import PooledScoreRegressor, build_student

    matched = matched_map_run(results.reload()["runs"], category, teacher)
    if matched is None:
        raise SystemExit(f"the comparison of {category} is sized to its seed-0 map student at ratio {SEED_RATIO}: "
                         f"run `python -m benchmarks.map_regression --only {category}/{teacher}/m{SEED_RATIO}/s0` first")
    checkpoint, _ = build_teacher(teacher, category, args)
    entry = Entry(category, teacher, SEED_RATIO, 0)
    cfg = compose(student_overrides(entry, checkpoint, args, int(matched["epochs"]), "comparison", "comparison"))
    datamodule = kd_config.instantiate(cfg.data)
    datamodule.setup("fit")
    datamodule.setup("test")
    train_images, _ = stack_images(datamodule.train_dataset)  # the map student's training split
    test_images, test_labels = stack_images(datamodule.test_dataset)
    mean, std = datamodule.normalization_stats
    per_image = int(cfg.scheme.synthetic_per_image)
    synthetic = synthetic_images(train_images, per_image, mean, std, int(cfg.scheme.synthetic_seed))

    scorer = load_scheme_teacher(TEACHER_TARGETS[teacher], checkpoint)
    cache = TensorCache(ROOT / ".cache" / "map_regression_comparison")
    key = digest({"teacher": str(checkpoint), "teacher_mtime_ns": checkpoint.stat().st_mtime_ns,
                  "images": tensor_digest(train_images, synthetic, test_images)})
    scores = cache.load(key)
    if scores is None:
        started = time.perf_counter()
        scores = {"train": score(scorer, train_images), "synthetic": score(scorer, synthetic),
                  "test": score(scorer, test_images)}
        scores["seconds"] = torch.tensor(time.perf_counter() - started)
        cache.save(key, scores)
    print(f"[map_regression] comparison {category}: teacher scores {cache.last} "
          f"({float(scores['seconds']):.0f} s to compute)", flush=True)

    preprocessing = Preprocessing.from_datamodule(datamodule)
    spec, factor, _ = closest_score_student(float(matched["deployed_macs"]), preprocessing)
    shape = (preprocessing.input_channels, IMAGE_SIZE // factor, IMAGE_SIZE // factor)
    inputs = torch.cat([train_images, synthetic])
    inputs = torch.nn.functional.avg_pool2d(inputs, factor) if factor > 1 else inputs
    targets = torch.cat([scores["train"], scores["synthetic"]])
    target_mean, target_std = float(targets.mean()), float(targets.std())
    torch.manual_seed(0)
    core = build_student(spec, shape)
    protocol = SimpleNamespace(seed=0, lr=COMPARISON_LR, batch_size=COMPARISON_BATCH, epochs=COMPARISON_EPOCHS)
    started = time.perf_counter()
    final_loss = fit_student(core, inputs, (targets - target_mean) / target_std, protocol)
    train_seconds = time.perf_counter() - started
    student = PooledScoreRegressor(core, factor, target_mean, target_std).eval()
    deployable = ScoreRegressionDeployable(preprocessing, student).eval()
    student_scores = score(deployable, preprocessing.to_raw(test_images))  # what ships: raw images in
    figures = measure_deployment(deployable)
    teacher_macs = float(matched["deployed_macs"]) * float(matched["deployed_mac_ratio"])
    teacher_params = float(matched["deployed_params"]) * float(matched["deployed_param_ratio"])
    image_auroc = kd_metrics.image_auroc(student_scores, test_labels)
    teacher_auroc = kd_metrics.image_auroc(scores["test"], test_labels)
    return {
        "student_spec": spec.describe(), "pool_factor": factor, "student_input_size": IMAGE_SIZE // factor,
        "deployed_params": figures["deploy/params"], "deployed_macs": figures["deploy/macs"],
        "deployed_mac_ratio": teacher_macs / figures["deploy/macs"],
        "deployed_param_ratio": teacher_params / figures["deploy/params"],
        "image_auroc": image_auroc, "pixel_auroc": None, "aupro": None,
        "teacher_image_auroc": teacher_auroc, "image_auroc_retention": image_auroc / teacher_auroc,
        "matched_map_image_auroc": matched["image_auroc"], "matched_map_deployed_macs": matched["deployed_macs"],
        "matched_map_mlflow_run_id": matched.get("mlflow_run_id"),
        "student_latency_ms_b1": figures.get("deploy/onnx_latency_ms_b1"),
        "student_torch_latency_ms_b1": figures["deploy/latency_ms_b1"],
        "teacher_latency_ms_b1": matched.get("teacher_latency_ms_b1"),
        "epochs": COMPARISON_EPOCHS, "lr": COMPARISON_LR, "batch_size": COMPARISON_BATCH,
        "synthetic_per_image": per_image, "normal_train_images": len(train_images), "train_images": len(inputs),
        "test_images": len(test_labels), "final_train_l1_standardised": final_loss,
        "train_seconds": train_seconds, "teacher_scoring_seconds": float(scores["seconds"]),
        "budget_rule": "fixed",
    }


# -- tables --------------------------------------------------------------------------------------------
def setting_name(variant: str | None) -> str:
    """A setting as a table cell: ``default`` or the variant's overrides."""
    return f"`{variant}`" if variant else "default"


def setting_of(record: dict[str, Any]) -> str:
    """A record's setting as a table cell."""
    return setting_name(record.get("variant"))


def results_table(path: Path, preferred: str | None = None, fidelity: str | None = None,
                  seeded: str | None = None) -> str:
    """The map students' test records; then the seed and retention lines of the setting validation
    prefers (rule 5, ``preferred``), of rule 6's (``fidelity``), of rule 7's (``seeded``) and of the default,
    when they differ."""
    runs = [run for run in (ResultsFile(path).runs if path.exists() else []) if is_map_student(run)]
    lines = ["| category | teacher | MAC ratio | param ratio | seed | image AUROC | pixel AUROC | AUPRO "
             "| teacher image / pixel / AUPRO | pixel retention | latency student / teacher (ms) | setting |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["category"], r["teacher_scheme"], r.get("variant") or "",
                                           r["requested_mac_ratio"], r["seed"])):
        retention = run["pixel_auroc"] / run["teacher_pixel_auroc"] if run.get("teacher_pixel_auroc") else None
        setting = setting_of(run)
        lines.append(
            f"| {run['category']} | {run['teacher_scheme']} | {run['deployed_mac_ratio']:.1f} "
            f"| {run['deployed_param_ratio']:.1f} | {run['seed']} | {run['image_auroc']:.4f} | {run['pixel_auroc']:.4f} "
            f"| {run['aupro']:.4f} | {run['teacher_image_auroc']:.4f} / {run['teacher_pixel_auroc']:.4f} / "
            f"{run['teacher_aupro']:.4f} | {retention:.4f} | {run['student_latency_ms_b1']:.2f} / "
            f"{run['teacher_latency_ms_b1']:.2f} | {setting} |")
    rules = (("rule 5", preferred), ("rule 6", fidelity), ("rule 7", seeded))
    labels = {variant: ", ".join(role for role, chosen in rules if chosen == variant)
              for variant in (preferred, fidelity, seeded, None)}
    labels = {variant: f"**Preferred by {roles}.** " if roles else "" for variant, roles in labels.items()}
    labels.update({f"{chosen} {REFIT}": f"**{role.capitalize()}'s setting, refitted on every training image.** "
                   for role, chosen in rules if chosen})  # the refit of each preferred setting, its own line
    summaries = [(variant, seed_summary(runs, variant)) for variant in labels]
    summaries += [(variant, retention_summary(runs, variant)) for variant in labels]
    for variant, summary in summaries:
        if summary:
            lines += ["", labels[variant] + summary]
    return "\n".join(lines)


def seeds_of(rows: list[dict[str, Any]]) -> str:
    """The seeds of some records, in order, as ``0, 1, 2``."""
    return ", ".join(str(seed) for seed in sorted(run["seed"] for run in rows))


def labelled_setting(variant: str | None, preferred: str | None, studied: bool) -> str:
    """A setting as a table cell, marked when it is rule 5's (``studied``: a study exists to prefer it)."""
    return setting_name(variant) + (" (rule 5 prefers it)" if studied and variant == preferred else "")


def seed_summary(runs: list[dict], variant: str | None = None) -> str:
    """Bottle at the requested deployed MAC ratio ``SEED_RATIO``, one setting: mean and sample
    standard deviation over its seeds (when there are at least two)."""
    rows = [run for run in filter(is_map_student, runs) if run.get("variant") == variant
            and run["category"] == "bottle" and run.get("requested_mac_ratio") == SEED_RATIO]
    if len({run["seed"] for run in rows}) < 2:
        return ""
    figures = []
    for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
        values = [run[key] for run in rows]
        figures.append(f"{name} {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}")
    retention = [run["pixel_auroc"] / run["teacher_pixel_auroc"] for run in rows]
    figures.append(f"pixel retention {statistics.fmean(retention):.4f} ± {statistics.stdev(retention):.4f}")
    seeds = seeds_of(rows)
    return (f"Bottle, setting {setting_name(variant)}, requested deployed MAC ratio "
            f"{SEED_RATIO}, seeds {seeds} (mean ± sample std): {'; '.join(figures)}.")


def retention_summary(runs: list[dict], variant: str | None = None) -> str:
    """The generalisation line of the plan: per category, the seed-0 student of one setting
    (``variant``, None: the default) at the requested deployed MAC ratio ``SEED_RATIO`` against
    its own teacher, and the mean over categories."""
    rows = {}
    for run in filter(is_map_student, runs):
        if (run.get("variant") == variant and run.get("requested_mac_ratio") == SEED_RATIO and run.get("seed") == 0
                and run.get("teacher_pixel_auroc")):
            rows[run["category"]] = (run["pixel_auroc"] / run["teacher_pixel_auroc"],
                                     run["aupro"] / run["teacher_aupro"] if run.get("teacher_aupro") else float("nan"))
    if not rows:
        return ""
    parts = ", ".join(f"{category} {pixel:.4f} / {aupro:.4f}" for category, (pixel, aupro) in sorted(rows.items()))
    mean_pixel = statistics.fmean(pixel for pixel, _ in rows.values())
    mean_aupro = statistics.fmean(aupro for _, aupro in rows.values())
    return (f"Retention, setting {setting_name(variant)}, at requested deployed MAC ratio "
            f"{SEED_RATIO}, seed 0 (student / its own teacher, pixel AUROC "
            f"/ AUPRO): {parts}; mean over the {len(rows)} categor{'y' if len(rows) == 1 else 'ies'} "
            f"{mean_pixel:.4f} / {mean_aupro:.4f}.")


#: the issue's floors for a bottle student at deployed MAC ratio >= 30: (record field, lowest value, name); the
#: deployed ratio itself is one (the width search lands near the requested ratio, on either side of it)
FLOORS = (("deployed_mac_ratio", 30.0, "deployed MAC ratio"), ("image_auroc", 0.98, "image AUROC"),
          ("pixel_auroc", 0.97, "pixel AUROC"), ("aupro", 0.90, "AUPRO"),
          ("pixel_retention", 0.98, "pixel retention"), ("latency_ratio", 10.0, "latency ratio"))
#: floors written as ratios (``30x``) and with one decimal
RATIO_FLOORS = ("deployed_mac_ratio", "latency_ratio")


def floor_figures(run: dict[str, Any]) -> dict[str, float]:
    """A map student's record as the figures the floors read (retention and the teacher / student latency
    ratio derived from the same record)."""
    return {"deployed_mac_ratio": run["deployed_mac_ratio"], "image_auroc": run["image_auroc"],
            "pixel_auroc": run["pixel_auroc"], "aupro": run["aupro"],
            "pixel_retention": run["pixel_auroc"] / run["teacher_pixel_auroc"],
            "latency_ratio": run["teacher_latency_ms_b1"] / run["student_latency_ms_b1"]}


def floors_table(runs: list[dict[str, Any]], preferred: str | None = None, studied: bool = True) -> str:
    """The floors of a bottle student at deployed MAC ratio >= 30 (the deployed ratio one of them), per setting
    and requested ratio: the mean (± sample std over seeds when there are several) of each figure, how many
    records meet every floor, and which floors some record misses. Read from the records; nothing is selected by it.
    ``preferred`` is rule 5's setting (None: the default), named as such when ``studied`` (a study exists)."""
    groups: dict[tuple[str | None, int], list[dict[str, Any]]] = {}
    for run in filter(is_map_student, runs):
        if run["category"] == "bottle" and run.get("requested_mac_ratio", 0) >= SEED_RATIO:
            groups.setdefault((run.get("variant"), run["requested_mac_ratio"]), []).append(run)
    if not groups:
        return ""
    lines = ["| setting | MAC ratio | seeds | " + " | ".join(
                 f"{name} (floor {f'{low:g}x' if key in RATIO_FLOORS else f'{low:.2f}'})" for key, low, name in FLOORS)
             + " | records meeting every floor | floors missed |",
             "|---|---|---|" + "---|" * len(FLOORS) + "---|---|"]
    order = lambda item: (item[0][0] != preferred, item[0][0] or "", item[0][1])  # noqa: E731
    for (variant, ratio), rows in sorted(groups.items(), key=order):
        figures = [floor_figures(run) for run in sorted(rows, key=lambda r: r["seed"])]
        cells = []
        for key, _, _ in FLOORS:
            values = [f[key] for f in figures]
            digits = 1 if key in RATIO_FLOORS else 4
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.{digits}f}{spread}")
        meeting = sum(all(f[key] >= low for key, low, _ in FLOORS) for f in figures)
        missed = [name for key, low, name in FLOORS if any(f[key] < low for f in figures)]
        lines.append(f"| {labelled_setting(variant, preferred, studied)} | {ratio} | {seeds_of(rows)} "
                     f"| {' | '.join(cells)} | {meeting} of {len(figures)} | {', '.join(missed) or 'none'} |")
    return "\n".join(lines)


def same_size_map_students(runs: list[dict[str, Any]], preferred: str | None = None, studied: bool = True) -> str:
    """Beside the comparison: every setting's seed-0 map student at the requested ratio the comparison
    is sized to (same width, so the same deployed MACs), with its image AUROC and its maps' figures
    (``preferred`` and ``studied`` as in :func:`floors_table`)."""
    categories = {run["category"] for run in runs if not is_map_student(run)}
    rows = [run for run in filter(is_map_student, runs) if run["category"] in categories
            and run.get("requested_mac_ratio") == SEED_RATIO and run.get("seed") == 0]
    if not rows:
        return ""
    lines = ["| category | teacher | setting | deployed MACs | image AUROC | pixel AUROC | AUPRO | latency (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    order = lambda r: (r["category"], r["teacher_scheme"], r.get("variant") != preferred, r.get("variant") or "")  # noqa: E731
    for run in sorted(rows, key=order):
        name = labelled_setting(run.get("variant"), preferred, studied)
        macs = f"{run['deployed_macs'] / 1e6:.1f} M" if run.get("deployed_macs") else "-"
        lines.append(f"| {run['category']} | {run['teacher_scheme']} | {name} | {macs} "
                     f"| {run['image_auroc']:.4f} | {run['pixel_auroc']:.4f} | {run['aupro']:.4f} "
                     f"| {run['student_latency_ms_b1']:.2f} |")
    return "\n".join(lines)


#: validation criteria set beside test AUPRO: (name, budget-record field or None for rule 5's score, sign)
CRITERIA = (("rule 5 score", None, 1.0), ("val L1 to the teacher", "val_loss", -1.0),
            ("val synthetic AUPRO", "val_synthetic_aupro", 1.0))


def criteria_table(budget: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """After the fact: each studied setting's validation criteria beside its bottle ratio-30 test
    figures (mean over the seeds run), and each criterion's Spearman rank correlation with test
    AUPRO over the settings that have both. It reads the test split to say which validation
    criterion tracks the test figures; it selects nothing (rule 5 stays the rule)."""
    from scipy.stats import spearmanr

    teacher = choose_teacher(budget)
    if teacher is None:
        return ""
    scores = setting_scores(budget, teacher)
    tested: dict[str | None, list[dict[str, Any]]] = {}
    for run in filter(is_map_student, runs):
        if run["category"] == "bottle" and run.get("requested_mac_ratio") == SEED_RATIO \
                and run.get("teacher_scheme") == teacher:
            tested.setdefault(run.get("variant"), []).append(run)
    lines = ["| setting | " + " | ".join(name for name, _, _ in CRITERIA)
             + " | test AUPRO (seeds) | test pixel AUROC |", "|---|" + "---|" * (len(CRITERIA) + 2)]
    columns: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in CRITERIA}
    for variant in sorted(scores, key=lambda v: -scores[v]):
        values = {name: scores[variant] if field is None else _last_epochs_mean(budget, teacher, variant, field)
                  for name, field, _ in CRITERIA}
        rows = tested.get(variant, [])
        aupro = statistics.fmean(r["aupro"] for r in rows) if rows else None
        pixel = statistics.fmean(r["pixel_auroc"] for r in rows) if rows else None
        for name, _, _ in CRITERIA:
            if values[name] is not None and aupro is not None:
                columns[name].append((values[name], aupro))
        cells = " | ".join("-" if values[name] is None else f"{values[name]:.4f}" for name, _, _ in CRITERIA)
        lines.append(f"| {setting_name(variant)} | {cells} | "
                     + (f"{aupro:.4f} ({seeds_of(rows)})"
                        f" | {pixel:.4f} |" if rows else "- | - |"))
    correlations = []
    for name, _, sign in CRITERIA:
        pairs = columns[name]
        if len(pairs) >= 3:
            rho = spearmanr([sign * v for v, _ in pairs], [a for _, a in pairs]).statistic
            correlations.append(f"{name} {rho:.2f} (n={len(pairs)})")
    if correlations:
        lines += ["", "Spearman rank correlation with test AUPRO over the tested settings (each criterion "
                  "oriented so that higher means better on validation): " + "; ".join(correlations) + "."]
    return "\n".join(lines)


def comparison_table(path: Path) -> str:
    """Rule 4: the score-regression student beside the map student it is sized to (image AUROC)."""
    runs = [run for run in (ResultsFile(path).runs if path.exists() else []) if not is_map_student(run)]
    if not runs:
        return ""
    lines = ["| category | teacher | score student | deployed MACs | MAC ratio | param ratio | image AUROC "
             "| teacher image AUROC | map student at ratio 30: MACs / image AUROC | latency (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["category"], r["teacher_scheme"], r["seed"])):
        latency = run.get("student_latency_ms_b1")
        lines.append(
            f"| {run['category']} | {run['teacher_scheme']} | {run['student_spec']} at {run['student_input_size']} px "
            f"| {run['deployed_macs'] / 1e6:.1f} M | {run['deployed_mac_ratio']:.1f} | {run['deployed_param_ratio']:.0f} "
            f"| {run['image_auroc']:.4f} | {run['teacher_image_auroc']:.4f} "
            f"| {run['matched_map_deployed_macs'] / 1e6:.1f} M / {run['matched_map_image_auroc']:.4f} "
            f"| {'-' if latency is None else f'{latency:.2f}'} |")
    return "\n".join(lines)


def budget_rows(path: Path) -> list[dict[str, Any]]:
    """The budget file's per-epoch rows (:func:`~benchmarks.harness.epoch_rows`; none when it is absent)."""
    return epoch_rows(ResultsFile(path).runs) if path.exists() else []


def budget_table(path: Path, runs: list[dict[str, Any]] | None = None,
                 seed_studies: list[dict[str, Any]] | None = None) -> str:
    """The study (rules 1 and 2): per studied teacher, its validation figures, the student's at the
    candidate budgets, and what the rules give (or that the study is incomplete)."""
    records = budget_rows(path)
    with_aupro = any("val_synthetic_aupro" in record for record in records)  # logged by later studies
    lines = ["| teacher | setting | teacher val synthetic pixel / image AUROC | epoch "
             "| student val synthetic pixel AUROC | student val synthetic image AUROC "
             + ("| student val synthetic AUPRO " if with_aupro else "") + "| val loss |",
             "|---|---|---|---|---|---|" + ("---|" if with_aupro else "") + "---|"]
    for record in sorted(records, key=lambda r: (r["teacher_scheme"], r.get("variant") or "", r["epoch"])):
        if record["epoch"] in budget_candidates(record.get("variant")):
            teacher = " / ".join(f"{record[name.replace('/', '_')]:.4f}" if name.replace("/", "_") in record else "-"
                                 for name in TEACHER_METRICS)
            setting = setting_of(record)
            aupro = record.get("val_synthetic_aupro")
            aupro_cell = (f"| {'-' if aupro is None else f'{aupro:.4f}'} " if with_aupro else "")
            lines.append(f"| {record['teacher_scheme']} | {setting} | {teacher} | {record['epoch']} "
                         f"| {record['val_synthetic_pixel_auroc']:.4f} | {record['val_synthetic_image_auroc']:.4f} "
                         f"{aupro_cell}| {record['val_loss']:.4f} |")
    teacher = choose_teacher(records)
    epochs = choose_epochs(records, teacher) if teacher else None
    studied = sorted({r["teacher_scheme"] for r in records})
    lines += ["", f"- Studied teachers: {', '.join(studied) or 'none'} (of {', '.join(TEACHERS)}).",
              f"- Rule 1 (teacher): {teacher or 'study incomplete'}; rule 2 (budget): "
              f"{f'{epochs} epochs' if epochs else 'study incomplete'}."]
    if teacher:
        scores = setting_scores(records, teacher)
        ranked = sorted(scores, key=lambda variant: -scores[variant])
        preferred = ranked[0] if ranked else None
        spreads = setting_spreads(records, teacher)
        lines.append("- Rule 5 (setting; mean of the two student figures over the last "
                     f"{REFERENCE_EPOCHS} epochs of each study, ± its standard error from the epoch-to-epoch "
                     "spread over those epochs): "
                     + "; ".join(f"{setting_name(v)} {scores[v]:.4f} ± {spreads[v]:.4f}"
                                 + (f", budget {choose_epochs(records, teacher, v)} epochs" if v else "")
                                 for v in ranked)
                     + f". Preferred: {setting_name(preferred)}.")
        rule_6 = rule_6_line(records, teacher)
        if rule_6:
            lines.append(rule_6)
        rule_7 = rule_7_line(records, runs or [], teacher, seed_studies or [])
        if rule_7:
            lines.append(rule_7)
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__, output="map_regression.json")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--budget", action="store_true", help="run the teacher choice and budget study (rule 1, 2)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="fixed RD teacher budget (trial runs)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="plan entries to run")
    parser.add_argument("--plan", action="store_true", help="list the plan and what is done")
    parser.add_argument("--table", action="store_true", help="print the results as Markdown")
    parser.add_argument("--variant", nargs="+", default=None, metavar="OVERRIDE",
                        help="scheme overrides, e.g. scheme.feature_weight=1.0: with --budget, studied on "
                             "validation data beside the default; without, the plan run at the variant's own budget")
    parser.add_argument("--retrain", action="store_true",
                        help="train bottle's seed-0 ratio-30 student again even where its study run's final weights "
                             "are what a test run would train (by default those are tested, test-only)")
    parser.add_argument("--comparison", action="store_true",
                        help="the score-regression student at the ratio-30 map student's size (rule 4)")
    parser.add_argument("--seed-validation", action="store_true",
                        help="rule 7: train --variant's bottle ratio-30 seeds 1 and 2 as its study is trained "
                             "(test=false, validation every epoch) into map_regression_seed_validation.json, for a "
                             "setting whose seed test runs predate val_loss_last; --only picks a seed")
    parser.add_argument("--backfill-val-loss", action="store_true",
                        help="add val_loss_last (rule 7) to the trained test records that lack it, from their MLflow "
                             "runs where the store holds them, and stop")
    parser.add_argument("--migrate-budget", nargs="?", const="", default=None, metavar="FILE",
                        help="rewrite the budget file (default: the one beside --output) from one record per "
                             "epoch to one per study run, and stop")
    args = parser.parse_args()
    if args.budget and args.variant and is_refit(" ".join(args.variant)):
        raise SystemExit("a refit (data.refit=true) is not studied: its validation images are training images; "
                         "study the setting without it, then test --variant <setting> data.refit=true")
    if args.migrate_budget is not None:
        print(migrate_budget(Path(args.migrate_budget) if args.migrate_budget else budget_path(args.output)))
        return
    if args.backfill_val_loss:
        use_project_mlflow_store()
        print(backfill_val_loss(ResultsFile(args.output)))
        return
    if args.table:
        print(results_table(args.output, preferred_in(budget_rows(budget_path(args.output)))))
        print(comparison_table(args.output))
        return
    results, budgets = ResultsFile(args.output), ResultsFile(budget_path(args.output))
    seeds = ResultsFile(seed_validation_path(args.output))
    import torch

    torch.set_num_threads(args.threads)
    use_project_mlflow_store()
    if args.seed_validation:
        teacher = choose_teacher(epoch_rows(budgets.runs))
        if teacher is None or not args.variant:
            raise SystemExit("--seed-validation runs a studied setting's seeds 1 and 2 for rule 7: pass --variant, "
                             "and run --budget first")
        for entry in select(seed_study_entries(teacher, " ".join(args.variant)), args.only):
            record_study(entry, args, seeds)
        if not args.plan:
            print(budget_table(budget_path(args.output), results.runs, epoch_rows(seeds.runs)), flush=True)
        return
    if args.budget and args.variant:
        teacher = choose_teacher(epoch_rows(budgets.runs))
        if teacher is None:
            raise SystemExit("a variant is studied with the chosen teacher: run --budget first")
        record_study(study_entry(teacher, " ".join(args.variant)), args, budgets)
        print(budget_table(budget_path(args.output), results.runs, epoch_rows(seeds.runs)), flush=True)
        return
    if args.budget:
        for teacher in TEACHERS:
            record_study(study_entry(teacher), args, budgets)
    records = epoch_rows(budgets.reload()["runs"])
    teacher = choose_teacher(records)
    epochs = choose_epochs(records, teacher) if teacher else None
    print(f"[map_regression] teacher: {teacher or 'study incomplete'}, budget: {epochs or '-'}", flush=True)
    if args.budget or teacher is None or epochs is None:
        return
    if args.comparison:
        for category in args.categories:
            key = comparison_key(category, teacher)
            if results.has(key):
                continue
            print(f"[map_regression] comparison {category}: running", flush=True)
            with results.record(key) as record:
                record.update(run_comparison(category, teacher, args, results))
        return
    variant = " ".join(args.variant) if args.variant else None
    study_done = True
    if variant is not None:
        epochs, study_done = variant_budget(records, teacher, variant)
        if epochs is None:
            raise SystemExit(f"the variant {variant!r} is tested at its own budget: run --budget --variant first")
        print(f"[map_regression] variant {variant}: budget {epochs}", flush=True)
    entries = plan(teacher, tuple(args.categories), variant)
    entries = select(entries, args.only)
    for entry in entries:
        done = map_run_done(results, entry)
        if args.plan:
            print(f"{'done ' if done else 'to do'}  {entry.name}")
            continue
        if done:
            continue
        if waits_for_study(entry, study_done):
            print(f"[map_regression] {entry.name}: waits for its study's final weights (run it again when the "
                  "study has ended)", flush=True)
            continue
        print(f"[map_regression] {entry.name}: running ({epochs} epochs)", flush=True)
        with results.record({**entry.key(), "student": "map_regression"}) as record:
            record.update(run_student(entry, args, epochs))
            record["budget_rule"] = "validation"
            record["study_done_before_test"] = study_done


if __name__ == "__main__":
    main()
