"""Hydra's Ray launcher (``hydra-ray-launcher``) with what a long sweep on a cluster needs.

:class:`KDRayLauncher` is the stock :class:`RayLauncher`, each job one Ray task on an
existing cluster, with three changes in how it waits for the jobs (Ray still schedules them):

- one job whose worker dies (SIGKILL, out of memory, a lost node) or that raises does not
  stop the gathering: every other job runs to its end; the dead job's MLflow run, left
  RUNNING by the killed process, is closed FAILED with Ray's error as its ``error`` tag,
  and the multirun exits with status 1 once all jobs have ended;
- ``timeout_min`` bounds each job's time on its worker (an alarm inside the job: the run
  ends FAILED with ``JobTimeoutError``); ``null``: no limit;
- every job gets the sweep folder as resolved on the launching machine, so the sweep's
  folders and its ``sweep_id`` do not depend on where a worker has the project.

Ray's own task retries are off in ``configs/hydra/launcher/ray.yaml`` (``max_retries: 0``):
a job that died is re-run by re-running the sweep, which skips the jobs already FINISHED.
"""

# No "from __future__ import annotations": Hydra execs plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations.

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra_plugins.hydra_ray_launcher._config as stock_config  # registers the stock "ray" first
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class KDRayLauncherConf:
    """The schema of ``hydra/launcher=ray`` (``configs/hydra/launcher/ray.yaml`` fills it in)."""

    _target_: str = "hydra_plugins.kd_experiments_launchers.ray_launcher.KDRayLauncher"
    timeout_min: Optional[float] = None
    ray: stock_config.RayConf = field(default_factory=stock_config.RayConf)


# Replaces the stock entry of the same name: Hydra validates configs/hydra/launcher/ray.yaml against it.
ConfigStore.instance().store(group="hydra/launcher", name="ray", node=KDRayLauncherConf, provider="kd_experiments")


class JobTimeoutError(TimeoutError):
    """A job ran longer than the launcher's ``timeout_min``."""


def _run_job_with_timeout(timeout_min: float | None, *args: Any, **kwargs: Any) -> JobReturn:
    """Hydra's job body on the Ray worker, under a SIGALRM deadline (Ray runs tasks in the main thread)."""
    from hydra_plugins.hydra_ray_launcher._launcher_util import _run_job

    if not timeout_min:
        return _run_job(*args, **kwargs)

    def _expire(signum: int, frame: Any) -> None:
        raise JobTimeoutError(f"the job ran longer than hydra.launcher.timeout_min={timeout_min:g}")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, float(timeout_min) * 60.0)
    try:
        return _run_job(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class KDRayLauncher(RayLauncher):
    """:class:`RayLauncher` that survives a dead job and bounds each job's time (module docstring)."""

    def __init__(self, ray: DictConfig, timeout_min: float | None = None) -> None:
        super().__init__(ray=ray)
        self.timeout_min = timeout_min

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Ray launcher: {len(job_overrides)} jobs, sweep folder {sweep_dir}")
        if not ray.is_initialized():
            ray.init(**self._init_arguments())
        remote_options = OmegaConf.to_container(self.ray_cfg.remote, resolve=True) if self.ray_cfg.remote else {}
        run_remote = ray.remote(**remote_options)(_run_job_with_timeout) if remote_options else ray.remote(
            _run_job_with_timeout
        )

        jobs = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
                sweep_config.hydra.sweep.dir = str(sweep_dir)
            reference = run_remote.remote(
                self.timeout_min,
                hydra_context=self.hydra_context,
                sweep_config=sweep_config,
                task_function=self.task_function,
                singleton_state=Singleton.get_state(),
            )
            jobs.append((reference, list(overrides), sweep_config))

        results = []
        for reference, overrides, sweep_config in jobs:
            try:
                results.append(ray.get(reference))
            except ray.exceptions.RayError as error:
                results.append(self._failed(overrides, sweep_config, error))
        return results

    def _init_arguments(self) -> dict[str, Any]:
        """``ray.init`` arguments; environment variables as strings, empty ones left out."""
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True) if self.ray_cfg.init else {}
        env_vars = (init.get("runtime_env") or {}).get("env_vars")
        if env_vars is not None:
            init["runtime_env"]["env_vars"] = {k: str(v) for k, v in env_vars.items() if v not in (None, "")}
        if not init.get("address"):  # a private local instance: keep its object store small
            init.setdefault("object_store_memory", 78643200)
        return init

    def _failed(self, overrides: list[str], sweep_config: DictConfig, error: BaseException) -> JobReturn:
        """A JobReturn for a job Ray lost, after closing its MLflow run FAILED with the error."""
        from kd_experiments.tracking import fail_unfinished_job_run

        text = str(error).strip().splitlines()
        message = f"{type(error).__name__}: {text[0] if text else 'the job ended without a result'}"
        log.error(f"job {' '.join(filter_overrides(overrides))} failed on Ray: {message}")
        try:
            fail_unfinished_job_run(sweep_config, overrides, message)
        except Exception as tracking_error:  # noqa: BLE001 - the Ray error is the one to report
            log.warning(f"could not mark the job's MLflow run FAILED: {tracking_error}")
        return JobReturn(overrides=overrides, hydra_cfg=sweep_config, status=JobStatus.FAILED, _return_value=error)
