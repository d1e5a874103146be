"""MLflow conventions: one place for every MLflow call of the framework.

What every run carries (the contract users and ``kd-report`` rely on):

- **params**: the resolved Hydra config flattened with dots (``scheme.compression_ratio``),
  plus the measured ``scheme``, ``teacher_params``, ``student_params``,
  ``compression_ratio``, ``teacher_macs``, ``student_macs``, ``mac_compression_ratio``;
- **tags**: ``scheme``, ``dataset``, ``seed``, ``git_commit``, ``torch_version``,
  ``cuda_version``, ``sweep_id`` (shared by the runs of one ``-m`` sweep), and
  ``error`` when the run failed;
- **artifacts**: ``config/config.yaml`` (the resolved config), plots under ``plots/``;
- **metrics**: per-epoch ``train/*`` and ``val/*``, final ``test/*``.

Runs of one Hydra multirun are children (``mlflow.parentRunId``) of one parent run, so
the MLflow UI shows a sweep as one expandable row. The launching process creates the
parent when the multirun starts (:class:`CloseSweepParentCallback`) and hands its id to
every job, on every machine and node, in ``KD_SWEEP_PARENT_RUN_ID``; a job without it
(a compose-API run) finds or creates the parent under a file lock in the sweep folder.
Each job run carries its overrides (tag ``kd.job_overrides``): re-running a sweep into
the same sweep folder (same ``sweep_id``) skips the jobs already FINISHED, and a re-run
job marks its earlier unfinished attempts ``kd.superseded_by``. Run names are
``<scheme>-<dataset>-cr<ratio>-s<seed>-<id>`` (the ratio the scheme sweeps): readable, and unique
across seeds and repeats.

The default store is ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts in
``<cwd>/mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` overrides it (a server, another
database, a ``file:`` store). Only global rank 0 talks to MLflow.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import platform
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_experiments.errors import TrackingError

if TYPE_CHECKING:  # Lightning loads only where a run trains (kd-report and kd-export start without it)
    from kd_experiments.loggers import KDMLFlowLogger

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"
PARENT_TAG = "kd.sweep_parent"
#: the MLflow UI's experiment kind (MLflow 3): model training, so it opens on the runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
JOB_TAG = "kd.job_overrides"
SUPERSEDED_TAG = "kd.superseded_by"
PARENT_RUN_ENV = "KD_SWEEP_PARENT_RUN_ID"
REQUIRED_PARAMS = (
    "scheme",
    "teacher_params",
    "student_params",
    "compression_ratio",
    "teacher_macs",
    "student_macs",
    "mac_compression_ratio",
)
MAX_PARAM_LENGTH = 6000


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` comes from writing to the tracking store (full, read-only, gone)."""
    if isinstance(error, TrackingError):
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        return True
    module = type(error).__module__
    return module.startswith(("sqlalchemy", "mlflow", "sqlite3"))


@contextmanager
def storage_errors(tracking_uri: str) -> Iterator[None]:
    """Turn a failure to write the tracking store into one :class:`TrackingError` line."""
    try:
        yield
    except Exception as error:
        if is_storage_error(error):
            raise TrackingError(f"the MLflow store {tracking_uri} cannot be written: {_first_line(error)}") from None
        raise


def quiet_mlflow() -> None:
    """For command-line tools: no artifact progress bars, MLflow's own log at ERROR only."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.ERROR)


#: the variables Lightning reads a process's global rank from before its strategy sets it
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_global_zero() -> bool:
    """True in the process that owns tracking (global rank 0, or no distributed run).

    Reads Lightning's ``rank_zero_only.rank`` (the object lives in ``lightning_utilities``;
    Lightning sets it on import and its strategies when they start), or, where Lightning is
    not loaded, the rank variables Lightning would read."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        rank = next((int(os.environ[name]) for name in RANK_VARIABLES if os.environ.get(name)), 0)
    return rank == 0


def resolve_tracking_uri(tracking_uri: str | None = None, root: str | Path | None = None) -> str:
    """The tracking URI: ``tracking_uri`` if given (a ``--tracking-uri`` flag, the config's
    ``logger.mlflow.tracking_uri``), else ``MLFLOW_TRACKING_URI`` if set, else the local store.

    An explicit value wins over the environment, as a command-line flag should. The local store
    is an SQLite database plus an artifact folder under ``<root>/mlruns`` (``root`` defaults to
    the current working directory).
    """
    if tracking_uri:
        return str(tracking_uri)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    store = Path(root or os.getcwd()).resolve() / DEFAULT_STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifact folder for a new experiment in a local SQLite store (beside the database).

    Other stores (servers, ``file:``) keep their own default and get ``None``.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name)
    return (db_path.parent / "artifacts" / safe_name).resolve().as_uri()


def _prepare_local_store(tracking_uri: str) -> None:
    """Create the folder of a local SQLite store, or fail with one clear line."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrackingError(
            f"cannot create the MLflow store folder {db_path.parent}: {error.strerror}"
        ) from None
    if db_path.exists() and not os.access(db_path, os.W_OK):
        raise TrackingError(f"the MLflow store {db_path} is read-only")
    if not os.access(db_path.parent, os.W_OK):
        raise TrackingError(f"the MLflow store folder {db_path.parent} is read-only")


def _check_server_answers(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (one request, no retries) when an HTTP tracking server does not answer.

    MLflow's own client retries a refused connection for minutes with back-off; a user
    with a typo in the URI should learn it at once, before any training starts.
    """
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may not expose /health)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"the MLflow tracking server {tracking_uri} cannot be reached: {reason}") from None


@contextmanager
def _local_store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (no-op for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(tracking_uri.removeprefix("sqlite:///")).with_suffix(".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def make_client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``, checked to answer (raises TrackingError)."""
    from mlflow.tracking import MlflowClient

    _prepare_local_store(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        _check_server_answers(tracking_uri)
    try:
        # The first use of an SQLite store creates and migrates its tables; parallel jobs
        # of a sweep must not do that at once ("duplicate column name"), so serialise it.
        with _local_store_lock(tracking_uri):
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any transport or store error means unusable
        if tracking_uri.startswith("sqlite:"):
            raise TrackingError(
                f"the MLflow store {tracking_uri} cannot be written or opened: {_first_line(error)}"
            ) from None
        raise TrackingError(
            f"the MLflow tracking store {tracking_uri} cannot be reached: {_first_line(error)}"
        ) from None
    return client


def get_or_create_experiment(client, experiment_name: str, tracking_uri: str) -> str:
    """Experiment id for ``experiment_name``, created if needed (safe under parallel jobs).

    Experiments are model-training experiments (tag :data:`EXPERIMENT_KIND_TAG`), so the
    MLflow UI opens them on the runs table rather than the GenAI overview; an existing
    experiment without the tag gets it.
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            experiment_name,
            artifact_location=default_artifact_location(tracking_uri, experiment_name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except Exception:  # another job created it in between
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into ``{"a.b.c": "value"}`` with string values.

    Lists become their string form; values longer than MLflow's limit are cut with a
    marker (the full config is always logged as the YAML artifact).
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = str(value)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 12] + "...[truncated]"
            flat[name] = text
    return flat


def git_commit(cwd: str | Path | None = None, ignore: Sequence[str] = ()) -> str:
    """The current git commit of the project checkout (``unknown`` outside a checkout), with
    ``-dirty`` when tracked files differ from it (files under the folders ``ignore`` names,
    relative to the checkout's root, aside).

    ``KD_EXPERIMENTS_COMMIT``, when set, is returned as is: for copies of the code
    without their ``.git`` (a container image, a remote GPU machine).
    """
    if os.environ.get("KD_EXPERIMENTS_COMMIT"):
        return os.environ["KD_EXPERIMENTS_COMMIT"]
    search = Path(cwd) if cwd else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=search, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
         *(f":(top,exclude){path}" for path in ignore)],
        cwd=search,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def environment_tags() -> dict[str, str]:
    """Versions a result depends on (torch, CUDA, Python) and where it ran (host, process id)."""
    import torch

    return {
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda) if torch.cuda.is_available() else "none",
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python_version": platform.python_version(),
        "host": platform.node(),
        "pid": str(os.getpid()),
    }


def sweep_id_from_dir(sweep_dir: str | Path) -> str:
    """A short stable id for a Hydra multirun, derived from its sweep folder."""
    resolved = str(Path(sweep_dir).resolve())
    return Path(resolved).name.replace(os.sep, "_") + "-" + hashlib.sha1(resolved.encode()).hexdigest()[:6]


def job_key(overrides: Sequence[str]) -> str:
    """The identity of one job of a sweep: its task overrides, sorted (``hydra.*`` ones left out)."""
    return " ".join(sorted(str(o) for o in overrides if not str(o).startswith("hydra.")))


def _env_parent(client, experiment_id: str):
    """The parent run handed down by the launching process (``KD_SWEEP_PARENT_RUN_ID``), if usable.

    Usable: it exists, is a sweep parent of this experiment and is RUNNING (a stale value
    left in an environment is ignored).
    """
    run_id = os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a stale or foreign id: fall back to the sweep folder
        return None
    if (
        run.info.experiment_id != experiment_id
        or run.data.tags.get(PARENT_TAG) != "true"
        or run.info.status != "RUNNING"
    ):
        return None
    return run


def find_sweep_parent(client, experiment_id: str, sweep_id: str):
    """The parent run of a sweep (tag ``kd.sweep_parent=true`` and ``sweep_id``), or ``None``."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_id = '{sweep_id}' and tags.`{PARENT_TAG}` = 'true'",
        max_results=1,
    )
    return runs[0] if runs else None


def open_sweep_parent(client, experiment_id: str, sweep_id: str, sweep_dir: str | Path, tags: Mapping[str, str]) -> str:
    """The parent run of sweep ``sweep_id``: created if absent, set RUNNING again if a re-run."""
    existing = find_sweep_parent(client, experiment_id, sweep_id)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    parent_tags = {PARENT_TAG: "true", "sweep_id": sweep_id, "sweep_dir": str(Path(sweep_dir).resolve()), **tags}
    return client.create_run(experiment_id, run_name=f"sweep-{sweep_id}", tags=parent_tags).info.run_id


def job_runs(client, experiment_id: str, parent_run_id: str, key: str, status: str | None = None) -> list:
    """The child runs of a sweep parent made by the job with overrides ``key`` (newest first)."""
    filter_string = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if status:
        filter_string += f" and attributes.status = '{status}'"
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=5000,
                              order_by=["attributes.start_time DESC"])
    return [run for run in runs if run.data.tags.get(JOB_TAG) == key]


def format_ratio(ratio: float) -> str:
    """``4.0 -> '4'``, ``2.7 -> '2.7'``: compact ratio text for run names."""
    return f"{ratio:g}"


def make_run_name(scheme: str, dataset: str, compression_ratio: float, seed: int) -> str:
    """Readable, collision-free run name."""
    return f"{scheme}-{dataset}-cr{format_ratio(compression_ratio)}-s{seed}-{uuid.uuid4().hex[:6]}"


class RunTracker:
    """The life of one MLflow run: start, params, tags, artifacts, and its final status.

    Use as a context manager::

        with RunTracker(...) as tracker:
            tracker.log_params({...})
            trainer = Trainer(logger=tracker.lightning_logger())
            ...

    An exception inside the block ends the run FAILED with the message as tag ``error``
    (KeyboardInterrupt: KILLED), and is re-raised. Every method is a no-op outside
    global rank 0, so DDP workers never write to MLflow.
    """

    def __init__(
        self,
        experiment_name: str,
        run_name: str,
        tracking_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
        sweep_dir: str | Path | None = None,
        run_id: str | None = None,
        log_model_checkpoints: bool = False,
        enabled: bool = True,
        job_overrides: Sequence[str] | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.tags = dict(tags or {})
        self.sweep_dir = Path(sweep_dir) if sweep_dir else None
        self.resume_run_id = run_id
        self.log_model_checkpoints = log_model_checkpoints
        self.enabled = enabled
        self.job_key = job_key(job_overrides) if (job_overrides is not None and self.sweep_dir) else None
        self.active = enabled and is_global_zero()
        self.client = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._logger: KDMLFlowLogger | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED", error="interrupted by the user (SIGINT)")
        else:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc_type.__name__
            self.end("FAILED", error=f"{exc_type.__name__}: {message}")
        return False

    def start(self) -> str | None:
        """Create (or re-open, when resuming) the run; returns its id on rank 0."""
        if not self.active:
            return None
        with storage_errors(self.tracking_uri):
            return self._start()

    def _start(self) -> str | None:
        self.client = make_client(self.tracking_uri)
        self.experiment_id = get_or_create_experiment(
            self.client, self.experiment_name, self.tracking_uri
        )
        if self.resume_run_id:
            try:
                run = self.client.get_run(self.resume_run_id)
            except Exception:
                raise TrackingError(
                    f"cannot resume MLflow run {self.resume_run_id}: no such run in {self.tracking_uri}"
                ) from None
            self.run_id = run.info.run_id
            self.run_name = run.info.run_name
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            return self.run_id
        tags = dict(self.tags)
        if self.sweep_dir is not None:
            parent = _env_parent(self.client, self.experiment_id)
            if parent is not None:  # created by the launching process: same parent on every machine
                sweep_id = parent.data.tags.get("sweep_id") or sweep_id_from_dir(self.sweep_dir)
                self.parent_run_id = parent.info.run_id
            else:
                sweep_id = sweep_id_from_dir(self.sweep_dir)
                self.parent_run_id = self._get_or_create_parent(sweep_id)
            tags["sweep_id"] = sweep_id
            tags["mlflow.parentRunId"] = self.parent_run_id
            if self.job_key is not None:
                tags[JOB_TAG] = self.job_key
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        if self.job_key is not None:
            for earlier in job_runs(self.client, self.experiment_id, self.parent_run_id, self.job_key):
                if earlier.info.run_id != self.run_id and earlier.info.status != "FINISHED":
                    self.client.set_tag(earlier.info.run_id, SUPERSEDED_TAG, self.run_id)
        return self.run_id

    def finished_job_run(self):
        """The FINISHED run of this same job in this sweep, when the sweep is a re-run; else ``None``.

        Only in a Hydra multirun whose launching process handed down the parent
        (``KD_SWEEP_PARENT_RUN_ID``). Read-only, so every DDP rank asks and all of them
        take the same decision (skip, or train together).
        """
        if not self.enabled or self.job_key is None or self.resume_run_id or not os.environ.get(PARENT_RUN_ENV):
            return None
        with storage_errors(self.tracking_uri):
            client = make_client(self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment_name)
            parent = _env_parent(client, experiment.experiment_id) if experiment is not None else None
            if parent is None:
                return None
            done = job_runs(client, experiment.experiment_id, parent.info.run_id, self.job_key, status="FINISHED")
        return done[0] if done else None

    def end(self, status: str, error: str | None = None) -> None:
        """Close the run with ``status`` (FINISHED, FAILED, KILLED), keeping what was logged."""
        if not self.active or self.run_id is None:
            return
        try:
            if error:
                self.client.set_tag(self.run_id, "error", error[:5000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as tracking_error:  # noqa: BLE001 - never hide the original error
            log.error("could not close MLflow run %s as %s: %s", self.run_id, status, tracking_error)

    def _get_or_create_parent(self, sweep_id: str) -> str:
        """The parent run of a sweep; a file lock in the sweep folder stops parallel jobs racing."""
        assert self.sweep_dir is not None
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.sweep_dir / ".mlflow_parent.lock"
        with open(lock_path, "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                existing = find_sweep_parent(self.client, self.experiment_id, sweep_id)
                if existing is not None:
                    return existing.info.run_id
                tags = {k: v for k, v in self.tags.items() if k in ("scheme", "dataset", "git_commit")}
                return open_sweep_parent(self.client, self.experiment_id, sweep_id, self.sweep_dir, tags)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    # -- logging -----------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches of 100 (MLflow's limit); values become strings."""
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            from mlflow.entities import Param

            items = [Param(str(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
            if self.resume_run_id:  # params of a resumed run exist already and are immutable
                existing = self.client.get_run(self.run_id).data.params
                items = [p for p in items if p.key not in existing]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            items = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
            for start in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        with storage_errors(self.tracking_uri):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def lightning_logger(self) -> KDMLFlowLogger | None:
        """A Lightning logger writing per-epoch metrics into this run (``None`` if disabled)."""
        if not self.enabled:
            return None
        if not self.active:
            # Other DDP ranks get none: an MlflowClient opens the store when it is made (and
            # creates an SQLite store's tables), and only global rank 0 may touch the store.
            return None
        if self._logger is None:
            from kd_experiments.loggers import KDMLFlowLogger

            self._logger = KDMLFlowLogger(
                experiment_name=self.experiment_name,
                tracking_uri=self.tracking_uri,
                run_id=self.run_id,
                log_model=self.log_model_checkpoints,
            )
        return self._logger


def log_figure_from_module(module, figure, artifact_file: str) -> None:
    """Log a matplotlib figure from inside a LightningModule into its MLflow run, if any.

    Works from any rank (only rank 0's MLflow logger writes); closes the figure.
    """
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import MLFlowLogger  # loaded already: a LightningModule calls this

    try:
        for logger in getattr(module, "loggers", []) or []:
            if isinstance(logger, MLFlowLogger) and is_global_zero() and logger.run_id:
                logger.experiment.log_figure(logger.run_id, figure, artifact_file)
    finally:
        plt.close(figure)


def close_sweep_parent(tracking_uri: str | None, sweep_dir: str | Path) -> str | None:
    """End a sweep's parent run once its children have ended: FAILED if any child failed,
    else FINISHED. Returns the status set, or ``None`` when there was nothing to close."""
    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    sweep_id = sweep_id_from_dir(sweep_dir)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.sweep_id = '{sweep_id}' and tags.`{PARENT_TAG}` = 'true'",
    )
    if not parents or parents[0].info.status != "RUNNING":
        return None
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    statuses = {child.info.status for child in children if not child.data.tags.get(SUPERSEDED_TAG)}
    if "RUNNING" in statuses:
        return None
    status = "FAILED" if statuses & {"FAILED", "KILLED"} else "FINISHED"
    client.set_terminated(parent.info.run_id, status=status)
    return status


try:  # Hydra's callback API: close the parent run when a multirun ends
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


def fail_unfinished_job_run(job_config, overrides: Sequence[str], error: str) -> str | None:
    """Close FAILED, with ``error``, the run a sweep job left RUNNING (its process was killed).

    Called by the launching process (``hydra_plugins.kd_experiments_launchers``) with the
    job's config. Returns the run id closed, or ``None`` when the job had no RUNNING run.
    """
    mlflow_cfg = (job_config.get("logger") or {}).get("mlflow") if job_config.get("logger") else None
    if mlflow_cfg is None:
        return None
    uri = resolve_tracking_uri(mlflow_cfg.get("tracking_uri"))
    client = make_client(uri)
    experiment = client.get_experiment_by_name(str(job_config.get("experiment_name") or "kd-experiments"))
    if experiment is None:
        return None
    parent = _env_parent(client, experiment.experiment_id) or find_sweep_parent(
        client, experiment.experiment_id, sweep_id_from_dir(job_config.hydra.sweep.dir)
    )
    if parent is None:
        return None
    running = job_runs(client, experiment.experiment_id, parent.info.run_id, job_key(overrides), status="RUNNING")
    if not running:
        return None
    run_id = running[0].info.run_id
    client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status="FAILED")
    return run_id


class CloseSweepParentCallback(_HydraCallback):
    """Hydra callback (``hydra.callbacks``) owning a multirun's MLflow parent run.

    ``on_multirun_start`` (in the launching process, global rank 0 only) creates the
    parent, or sets it RUNNING again when the sweep is re-run into the same folder, and
    exports ``KD_SWEEP_PARENT_RUN_ID`` and the resolved ``MLFLOW_TRACKING_URI`` so that
    every job, wherever a launcher runs it, logs under it; ``on_multirun_end`` ends it.
    """

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        mlflow_cfg = (config.get("logger") or {}).get("mlflow") if config.get("logger") else None
        if mlflow_cfg is None or not is_global_zero():
            return
        tags = {"git_commit": git_commit()}
        try:
            from kd_experiments.config import dataset_name

            tags["dataset"] = dataset_name(config.data)
        except Exception:  # noqa: BLE001 - a label only; the jobs validate the data config
            pass
        try:
            uri = resolve_tracking_uri(mlflow_cfg.get("tracking_uri"))
            client = make_client(uri)
            experiment_id = get_or_create_experiment(client, str(config.get("experiment_name") or "kd-experiments"), uri)
            sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
            with _local_store_lock(uri):
                parent_id = open_sweep_parent(client, experiment_id, sweep_id_from_dir(sweep_dir), sweep_dir, tags)
        except Exception as error:  # noqa: BLE001 - the jobs report an unusable store themselves
            log.warning("could not open the sweep's parent run: %s", error)
            return
        os.environ[PARENT_RUN_ENV] = parent_id
        os.environ["MLFLOW_TRACKING_URI"] = uri

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        mlflow_cfg = (config.get("logger") or {}).get("mlflow") if config.get("logger") else None
        if mlflow_cfg is None or not is_global_zero():
            return
        try:
            close_sweep_parent(mlflow_cfg.get("tracking_uri"), config.hydra.sweep.dir)
        except Exception as error:  # noqa: BLE001 - never fail a finished sweep over its parent row
            log.warning("could not close the sweep's parent run: %s", error)
        os.environ.pop(PARENT_RUN_ENV, None)


# -- datasets as run inputs (the UI's "Dataset" column) ----------------------------------------
def split_dataset(datamodule: Any, split: str, name: str):
    """One split of a datamodule as an MLflow dataset (``mlflow.data`` pandas dataset).

    Its table lists the samples (``path`` relative to the data root, or ``#<index>`` for
    sets held in memory) with their ``label``; ``source`` is the data root (or the set's
    name), ``name`` is ``<name>-<split>``, and the digest is a SHA-256 of the file list
    and labels (of the pixels for in-memory sets), so two runs on the same files share it.
    """
    import mlflow.data
    import pandas as pd

    dataset = getattr(datamodule, f"{split}_dataset")
    root = getattr(datamodule, "category_dir", None) or getattr(datamodule, "root", None)
    samples = getattr(dataset, "samples", None)
    digest = hashlib.sha256()
    if samples is not None:
        base = Path(str(root)) if root else None
        paths = []
        for sample in samples:
            path = Path(str(sample.image_path))
            paths.append(str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path))
        labels = [int(sample.label) for sample in samples]
        for path, label in zip(paths, labels, strict=True):
            digest.update(f"{path}\t{label}\n".encode())
    else:
        labels = [int(v) for v in getattr(dataset, "labels", [])]
        file_paths = getattr(dataset, "paths", None)
        paths = [str(p) for p in file_paths] if file_paths is not None else [f"#{i}" for i in range(len(labels))]
        images = getattr(dataset, "images", None)
        if file_paths is None and images is not None:
            digest.update(images.detach().cpu().contiguous().numpy().tobytes())
        for path, label in zip(paths, labels, strict=True):
            digest.update(f"{path}\t{label}\n".encode())
    frame = pd.DataFrame({"path": paths, "label": labels})
    category = getattr(datamodule, "category", None)
    if category is None and getattr(datamodule, "normal_class", None) is not None:
        category = f"normal_class={datamodule.normal_class}"
    if category is not None:
        frame["category"] = str(category)
    source = str(root) if root else str(getattr(datamodule, "dataset", name))
    # MLflow's hints (integer columns, a local path that several source types accept) concern
    # model schemas and remote sources, not this description of a split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(frame, source=source, targets="label", name=f"{name}-{split}",
                                       digest=digest.hexdigest()[:16])


#: tries of logging a run's dataset inputs (see :func:`log_dataset_inputs`)
DATASET_LOG_ATTEMPTS = 4


def log_dataset_inputs(client, run_id: str, datamodule: Any, name: str, splits: Sequence[str]) -> None:
    """Log splits of ``datamodule`` as the run's dataset inputs (context tag = the split's role)."""
    from mlflow.entities import DatasetInput, InputTag

    contexts = {"train": "training", "val": "validation", "test": "test"}
    inputs = []
    for split in splits:
        dataset = split_dataset(datamodule, split, name)
        with warnings.catch_warnings():  # the schema is inferred here; see split_dataset
            warnings.simplefilter("ignore", UserWarning)
            entity = dataset._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", contexts.get(split, split))]))
    # The SQL store looks a dataset up, then inserts it: two jobs of a parallel sweep logging the
    # same split at once (seeds that share the train/test split) can both miss it, and the second
    # insert breaks the unique constraint (its transaction is rolled back). Again, it finds the row.
    for attempt in range(DATASET_LOG_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as error:  # noqa: BLE001 - MLflow wraps the database's error in its own
            if attempt + 1 == DATASET_LOG_ATTEMPTS or "unique constraint" not in str(error).lower():
                raise
            time.sleep(0.2 * (attempt + 1))
