"""The benchmark harness: one results writer, one argument-parser base, one compose, one data root.

Every benchmark is a module of this package, run from the checkout as
``python -m benchmarks.<name>``, and writes ``benchmarks/results/<name>.json``: ``{"runs":
[...]}``, one flat record per finished run. Usage::

    from benchmarks.harness import ResultsFile, base_parser, compose, data_root

    parser = base_parser(__doc__, output="deploy.json")      # --data-root, --output, --threads
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    results = ResultsFile(args.output)
    for ratio in args.ratios:
        key = {"scheme": "reverse_distillation", "compression_ratio": ratio, "seed": 0}
        if results.has(key):                      # resumable: records done are skipped
            continue
        cfg = compose(["experiment=rd_bottle", f"scheme.compression_ratio={ratio}",
                       f"data.root={args.data_root / 'mvtec_ad'}"], output_dir=run_dir)
        with results.record(key) as record:       # appended (under a file lock) on success
            record.update(measure(cfg))

:meth:`ResultsFile.record` (or :meth:`ResultsFile.append`) stamps each record with its own
provenance: ``git_commit`` (``-dirty`` when tracked files differ from it, taken when the
process started, i.e. the code it runs), ``command`` (``python -m benchmarks.<name> ...``),
``machine`` (CPU, cores, torch threads, versions, GPU), ``started_at`` (UTC, ISO 8601),
``wall_s`` and ``provenance: "record"``. Records written before records carried their own
provenance keep every field they had and are marked ``provenance: "file-level"``, with the
file's last ``command`` and ``commit`` (its last writer's, not necessarily theirs) copied in
as ``file_command`` and ``file_commit``.

A record may hold a run's per-epoch figures as arrays of equal length, its ``per_epoch`` field
naming them (the budget study of :mod:`benchmarks.map_regression`); :func:`epoch_rows` expands
such records into one flat row per epoch, which is what their readers take.

Writers append under an exclusive lock on ``<file>.lock`` and re-read the file inside it,
so several processes may run pieces of one plan into one file. Data: ``--data-root``,
default ``$KD_DATA_DIR`` or ``../shared/data`` beside the checkout (the rule of the
configs' ``paths.data_dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import fnmatch
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Where results files live (``$KD_BENCH_RESULTS`` moves them, e.g. for a trial run).
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
#: Result files name Fashion-MNIST ``fmnist``, as the issues and the pkd files do.
SHORT_NAMES = {"mnist": "mnist", "fashion_mnist": "fmnist"}
PROVENANCE_FIELDS = ("git_commit", "command", "machine", "started_at", "wall_s")
#: overrides that keep a benchmark's kd-train log to one line a run
QUIET = ("callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false")

_PROCESS_COMMIT: str | None = None


def data_root() -> Path:
    """The shared data folder: ``$KD_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("KD_DATA_DIR", ROOT.parent / "shared" / "data"))


def commit() -> str:
    """The project commit this process runs (``-dirty`` when tracked files differed), taken once,
    when the benchmark starts (:func:`base_parser`), so that commits made while it runs do not
    change the provenance of its later records. Results files and their pages (written by other
    benchmarks running beside this one) do not count: they are not the code that runs."""
    global _PROCESS_COMMIT
    if _PROCESS_COMMIT is None:
        from kd_experiments.tracking import git_commit

        _PROCESS_COMMIT = git_commit(ROOT, ignore=("benchmarks/results", "docs/results"))
    return _PROCESS_COMMIT


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and versions of the machine a record was measured on."""
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this process was started, as one would type it from the checkout."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        program = f"python -m {spec.name.removesuffix('.__main__')}"
    else:
        script = Path(argv[0]).resolve() if argv else Path("?")
        program = "python " + (script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else argv[0])
    return " ".join([program, *(shlex.quote(arg) for arg in argv[1:])])


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def provenance(started_at: str, wall_s: float) -> dict[str, Any]:
    """The provenance fields of one new record."""
    return {"git_commit": commit(), "command": command_line(), "machine": machine(), "started_at": started_at,
            "wall_s": wall_s, "provenance": "record"}


def mark_file_level(data: dict[str, Any]) -> int:
    """Mark the records that predate per-record provenance (no ``git_commit``) as ``file-level``.

    Their fields are kept; the file's ``command``/``commit`` (its last writer's) are copied in
    as ``file_command``/``file_commit``. Returns how many records were marked."""
    marked = 0
    for run in data.get("runs", []):
        if "git_commit" in run or "provenance" in run:
            continue
        run["provenance"] = "file-level"
        if "command" in data:
            run["file_command"] = data["command"]
        if "commit" in data:
            run["file_commit"] = data["commit"]
        marked += 1
    return marked


def epoch_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with each per-epoch record expanded into its flat rows, in order.

    A record whose ``per_epoch`` field names some of its fields holds those fields as arrays of
    equal length; row ``i`` has the ``i``-th element of each, every other field as it is, and no
    ``per_epoch``. Records without ``per_epoch`` are rows already and are kept as they are."""
    rows: list[dict[str, Any]] = []
    for record in records:
        names = record.get("per_epoch")
        if names is None:
            rows.append(record)
            continue
        lengths = {len(record[name]) for name in names}
        if len(lengths) != 1:
            raise ValueError(f"the per-epoch arrays {names} of a record differ in length (or none is named)")
        rows += [{field: value[i] if field in names else value for field, value in record.items()
                  if field != "per_epoch"} for i in range(lengths.pop())]
    return rows


def _indent_of(text: str) -> int:
    """The indent of an existing JSON file (so a rewrite changes only what changed)."""
    lines = text.splitlines()
    if len(lines) > 1:
        stripped = lines[1].lstrip(" ")
        return max(1, len(lines[1]) - len(stripped))
    return 1


class ResultsFile:
    """A JSON results file (``{"runs": [...]}``) that finished records are appended to one by one.

    ``key_fields``: when given, :meth:`has` and :meth:`find` compare only these fields of the
    record they are handed (so a whole record can be passed); otherwise every field of the key.
    """

    def __init__(self, path: str | Path, key_fields: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields) if key_fields else None
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.indent = 1
        self.data: dict[str, Any] = {"runs": []}
        self.reload()

    # ------------------------------------------------------------------ reading

    def reload(self) -> dict[str, Any]:
        """Re-read the file (other processes may have appended)."""
        if self.path.exists():
            text = self.path.read_text()
            self.indent = _indent_of(text)
            self.data = json.loads(text)
            self.data.setdefault("runs", [])
        return self.data

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def _key(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self.key_fields is None:
            return dict(fields)
        return {name: fields.get(name) for name in self.key_fields}

    def find(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The first record whose fields equal ``key``'s (a field a record lacks counts as ``None``; a
        record holding per-epoch arrays is searched as its rows, :func:`epoch_rows`)."""
        wanted = self._key(key)
        self.reload()
        return next((run for run in epoch_rows(self.runs) if all(run.get(k) == v for k, v in wanted.items())), None)

    def has(self, key: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Whether a record with these key fields is already there (resumable plans skip it)."""
        return self.find({**(key or {}), **fields}) is not None

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.reload()
                yield data
                mark_file_level(data)
                self._save(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, data: dict[str, Any]) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=self.indent) + "\n")
        temporary.replace(self.path)

    def append(self, record: dict[str, Any], *, started_at: str | None = None, wall_s: float | None = None,
               skip_if_present: bool = False) -> dict[str, Any]:
        """Append ``record`` stamped with its provenance (:func:`provenance`); returns it.

        ``started_at``/``wall_s``: when the run began and how long it took (default: now, and
        a ``wall_s`` the record already carries, else 0). ``skip_if_present``: do nothing when
        a record with the same key is there (checked inside the lock)."""
        wall = wall_s if wall_s is not None else float(record.get("wall_s", 0.0))
        stamped = {**record, **provenance(started_at or now_utc(), wall)}
        with self._locked() as data:
            wanted = self._key(record)
            if skip_if_present and any(all(run.get(k) == v for k, v in wanted.items()) for run in data["runs"]):
                return stamped
            data["runs"].append(stamped)
        return stamped

    @contextlib.contextmanager
    def record(self, key: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Time one run: fill the yielded dict; on success it is appended with ``key`` and provenance."""
        record: dict[str, Any] = dict(key)
        started_at, started = now_utc(), time.perf_counter()
        yield record
        self.append(record, started_at=started_at, wall_s=time.perf_counter() - started)

    @contextlib.contextmanager
    def rewrite(self) -> Iterator[dict[str, Any]]:
        """The file's data, re-read under its lock; what the block leaves in it is saved (maintenance
        that rewrites records, e.g. :func:`benchmarks.map_regression.migrate_budget`)."""
        with self._locked() as data:
            yield data

    def update(self, key: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """Add or change ``fields`` of the record matching ``key``; the change is logged in its ``updates``."""
        with self._locked() as data:
            wanted = self._key(key)
            run = next((r for r in data["runs"] if all(r.get(k) == v for k, v in wanted.items())), None)
            if run is None:
                raise KeyError(f"{self.path.name}: no record matches {wanted}")
            run.update(fields)
            run.setdefault("updates", []).append(
                {"fields": sorted(fields), "git_commit": commit(), "command": command_line(), "at": now_utc()})
        return run

    def set_section(self, name: str, value: dict[str, Any], *, started_at: str, wall_s: float) -> None:
        """Store a measurement that is not a run (e.g. a paired speed study) under ``name``, with provenance."""
        if name == "runs":
            raise ValueError("'runs' holds the records; use append()")
        with self._locked() as data:
            data[name] = {**value, **provenance(started_at, wall_s)}


# ---------------------------------------------------------------------------- config and CLI


def compose(overrides: Sequence[str], output_dir: str | Path | None = None):
    """The ``kd-train`` config with ``overrides``, composed by the package's own function
    (:func:`kd_experiments.search.compose_config`: Hydra's runtime set up as ``kd-train`` does),
    so ``kd_experiments.train.train(cfg)`` runs exactly what ``kd-train <overrides>`` would."""
    from kd_experiments.search import compose_config

    return compose_config(list(overrides), output_dir=output_dir)


def base_parser(doc: str | None, output: str | None = None, threads: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark shares: ``--data-root``, ``--output`` (when it writes one file,
    default ``benchmarks/results/<output>``) and ``--threads`` (torch threads, default 1)."""
    commit()  # taken as the benchmark starts: the code that runs, not the checkout at its first record
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name}" if spec is not None and spec.name else None,
                                     description=(doc or "").strip().split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=data_root(),
                        help="the shared data folder (default: $KD_DATA_DIR or ../shared/data beside the checkout)")
    if output is not None:
        parser.add_argument("--output", type=Path, default=RESULTS / output, help="results file")
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser


def select(entries: list[Any], patterns: Sequence[str] | None) -> list[Any]:
    """The plan entries whose ``name`` matches one of the shell patterns of ``--only`` (all when
    ``patterns`` is ``None``); patterns that match nothing stop the benchmark with one line, rather
    than a run that does nothing."""
    if patterns is None:
        return entries
    chosen = [e for e in entries if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"--only {' '.join(shlex.quote(p) for p in patterns)} matches no plan entry; see --plan")
    return chosen


def mark_all(paths: Sequence[Path]) -> None:
    """Mark the records of existing results files that predate per-record provenance."""
    for path in paths:
        results = ResultsFile(path)
        with results._locked() as data:
            marked = mark_file_level(data)
        print(f"{path.name}: {marked} records marked file-level")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Results-file maintenance.")
    parser.add_argument("--mark-file-level", nargs="*", type=Path, metavar="FILE",
                        help="mark records without their own provenance (default: every results file)")
    arguments = parser.parse_args()
    if arguments.mark_file_level is not None:
        mark_all(arguments.mark_file_level or sorted(RESULTS.glob("*.json")))
    else:
        parser.print_help()
