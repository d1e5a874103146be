"""``kd-train``: the Hydra application that trains, tests and tracks one run.

Flow: config -> datamodule + scheme -> Lightning Trainer -> metrics and artifacts ->
MLflow. Every object comes from the config (``_target_``), so sweeping a width, a
ratio or a seed needs no code change::

    kd-train experiment=quickstart                         # one run
    kd-train experiment=quickstart scheme.compression_ratio=32 seed=1
    kd-train -m experiment=quickstart scheme.compression_ratio=2,8,32 seed=0,1
    kd-train --config-dir sweeps --config-name quickstart_compression   # a sweep file
    kd-train experiment=quickstart ckpt_path=<run folder>/checkpoints/last.ckpt  # resume

A user error (bad path, bad value, corrupt file, NaN loss, unreachable store) prints
one line, ``kd-train: error: ...``, ends the MLflow run FAILED with that message as its
``error`` tag, and exits with status 1; checkpoints and logged metrics are kept.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kd_experiments import config as kd_config
from kd_experiments.errors import ConfigError, KDError
from kd_experiments.tracking import (
    REQUIRED_PARAMS,
    RunTracker,
    environment_tags,
    flatten_config,
    git_commit,
    is_global_zero,
    make_run_name,
    storage_errors,
)

log = logging.getLogger("kd_experiments.train")


def _hydra_sweep_dir() -> Path | None:
    """The sweep folder when running inside a Hydra multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir)


def _hydra_job_overrides() -> list[str] | None:
    """This job's overrides inside a Hydra multirun (what identifies it in its sweep), else ``None``."""
    from hydra.core.hydra_config import HydraConfig

    if _hydra_sweep_dir() is None:
        return None
    return [str(o) for o in HydraConfig.get().overrides.task]


def _instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Any]:
    if not callbacks_cfg:
        return []
    callbacks = []
    for name, callback_cfg in callbacks_cfg.items():
        if callback_cfg is None:
            continue
        if not isinstance(callback_cfg, DictConfig) or "_target_" not in callback_cfg:
            raise ConfigError(f"callbacks.{name} must be a config with a _target_")
        callbacks.append(kd_config.instantiate(callback_cfg))
    return callbacks


def _instantiate_extra_loggers(logger_cfg: DictConfig | None) -> list[Any]:
    """Lightning loggers other than MLflow (the tracker makes that one)."""
    if not logger_cfg:
        return []
    return [
        kd_config.instantiate(cfg)
        for name, cfg in logger_cfg.items()
        if name != "mlflow" and cfg is not None and "_target_" in cfg
    ]


def _run_name(cfg: DictConfig, dataset: str) -> str:
    # the ratio the scheme sweeps: the student's parameter or MAC ratio to its teacher, or (map regression)
    # the deployed MAC ratio of the teacher's deployed model to the student's
    names = ("compression_ratio", "mac_compression_ratio", "deployed_mac_ratio")
    ratio = next((cfg.scheme.get(n) for n in names if cfg.scheme.get(n, None) is not None), None)
    try:
        ratio = float(ratio) if ratio is not None else 1.0
    except (TypeError, ValueError):
        ratio = 1.0  # validate_config reports the bad value inside the run
    base = str(cfg.get("run_name") or "") or None
    if base:
        return f"{base}-s{cfg.seed}-{os.urandom(3).hex()}"
    return make_run_name(kd_config.scheme_name(cfg.scheme), dataset, ratio, int(cfg.seed))


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no data or model: raise :class:`ConfigError` early, in one line."""
    for group in ("data", "scheme", "trainer"):
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"the config has no '{group}' group; pick one, e.g. {group}=<name>")
    from kd_experiments.compression import check_ratio

    for name in ("compression_ratio", "mac_compression_ratio"):
        ratio = cfg.scheme.get(name, None)
        if ratio is not None:
            check_ratio(ratio, name)
    if not isinstance(cfg.get("seed", 0), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    monitor = checkpoint.get("monitor")
    if monitor in ("val/image_auroc", "val/teacher_image_auroc") and cfg.data.get("val_anomalies", "none") in (None, "none"):
        raise ConfigError(
            f"callbacks.model_checkpoint.monitor={monitor} needs labelled anomalies in the validation split: "
            "set data.val_anomalies=other_classes (one-class sets); for MVTec-style sets with "
            "scheme.val_synthetic_anomalies=true monitor val/synthetic_image_auroc instead"
        )
    kd_config.check_composition(cfg)  # the groups fit together (any experiment with any data group)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test and track one run; returns the final metrics (``test/*`` and the last ``val/*``)."""
    import lightning as L
    import torch

    from kd_experiments.callbacks import ChannelsLast
    from kd_experiments.checkpoints import check_resume_checkpoint, mlflow_run_id_of

    started = time.perf_counter()
    dataset = kd_config.dataset_name(cfg.data)
    logger_cfg = cfg.get("logger") or {}
    mlflow_cfg = logger_cfg.get("mlflow") if logger_cfg else None
    ckpt_path = cfg.get("ckpt_path")
    resuming = bool(ckpt_path) and bool(cfg.get("train", True))
    resume_run_id = cfg.get("resume_run_id")
    if resuming and not resume_run_id:
        try:
            resume_run_id = mlflow_run_id_of(ckpt_path)
        except KDError:
            resume_run_id = None  # reported inside the run by check_resume_checkpoint

    tags = {
        **kd_config.experiment_label(cfg),
        "git_commit": git_commit(),
        **environment_tags(),
        **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
    }
    tracker = RunTracker(
        experiment_name=str(cfg.get("experiment_name") or "kd-experiments"),
        run_name=_run_name(cfg, dataset),
        tracking_uri=(mlflow_cfg or {}).get("tracking_uri"),
        tags=tags,
        sweep_dir=_hydra_sweep_dir(),
        run_id=resume_run_id,
        log_model_checkpoints=bool((mlflow_cfg or {}).get("log_model_checkpoints", False)),
        enabled=mlflow_cfg is not None,
        job_overrides=_hydra_job_overrides(),
    )
    done = tracker.finished_job_run()  # a re-run sweep skips the jobs that FINISHED before
    if done is not None:
        if is_global_zero():
            print(f"[kd-train] {done.info.run_name}: FINISHED before in this sweep (run {done.info.run_id}), "
                  "skipped", flush=True)
        return {key: float(value) for key, value in done.data.metrics.items()}
    with tracker, storage_errors(tracker.tracking_uri):
        tracker.log_params(flatten_config(OmegaConf.to_container(cfg, resolve=True)))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        validate_config(cfg)

        L.seed_everything(int(cfg.seed), workers=True)
        datamodule = kd_config.instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = kd_config.instantiate(cfg.scheme, input_shape=tuple(datamodule.input_shape))
        summary = model.compression_summary()
        tracker.log_params({"scheme": model.scheme_name, **summary})
        tracker.set_tags({"scheme": model.scheme_name})
        missing = [key for key in REQUIRED_PARAMS if key != "scheme" and key not in summary]
        assert not missing, f"{type(model).__name__}.compression_summary lacks {missing}"

        if ckpt_path:
            check_resume_checkpoint(ckpt_path, model)

        callbacks = _instantiate_callbacks(cfg.get("callbacks"))
        if cfg.get("channels_last", False):
            callbacks.append(ChannelsLast())
        loggers = [lg for lg in [tracker.lightning_logger()] if lg is not None]
        loggers += _instantiate_extra_loggers(logger_cfg)
        trainer: L.Trainer = kd_config.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

        if cfg.get("train", True):
            try:
                trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path if resuming else None)
            except SystemExit:
                # Lightning turns Ctrl-C into a graceful shutdown then sys.exit(1).
                if trainer.interrupted:
                    raise KeyboardInterrupt from None
                raise
            if trainer.interrupted:
                raise KeyboardInterrupt
        # trainer.test() resets callback_metrics: keep the last train/ and val/ values.
        metrics: dict[str, float] = {
            key: float(value.item() if isinstance(value, torch.Tensor) else value)
            for key, value in trainer.callback_metrics.items()
        }
        if cfg.get("test", True):
            # The final weights of the fixed schedule (or of ckpt_path when test-only), or,
            # with a monitored checkpoint (callbacks=select_on_validation), the epoch of best
            # validation metric: the validation split is drawn from training data, so no
            # model is ever selected on the test split.
            test_ckpt = ckpt_path if (ckpt_path and not cfg.get("train", True)) else None
            selector = trainer.checkpoint_callback
            if cfg.get("train", True) and getattr(selector, "monitor", None) and getattr(selector, "best_model_path", ""):
                test_ckpt = selector.best_model_path
                tracker.set_tags({"tested_checkpoint": Path(test_ckpt).name,
                                  "selected_on": str(selector.monitor)})
                if selector.best_model_score is not None:
                    tracker.log_metrics({"selected_" + str(selector.monitor).replace("/", "_"):
                                         float(selector.best_model_score)})
            trainer.test(model=model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
        for key, value in trainer.callback_metrics.items():
            metrics[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
        deploy_cfg = cfg.get("deploy") or {}
        if deploy_cfg.get("measure", True) and is_global_zero():
            from kd_experiments.deployable import measure_scheme_deployment

            deployment = measure_scheme_deployment(model, deploy_cfg)  # speed and size of what ships
            tracker.log_metrics(deployment)
            metrics.update(deployment)
        if tracker.active:  # data sets as run inputs; the student as an MLflow Model with its threshold
            from kd_experiments.deploy import log_run_outputs

            log_run_outputs(tracker, model, datamodule, dataset, tested=bool(cfg.get("test", True)),
                            log_model=bool((cfg.get("deploy") or {}).get("log_model", True)))
        duration = time.perf_counter() - started
        tracker.log_metrics({"duration_s": duration})
        if is_global_zero():
            key_metric = str(cfg.get("optimized_metric") or "test/image_auroc")
            value = metrics.get(key_metric, float("nan"))
            print(
                f"[kd-train] {tracker.run_name}: compression_ratio={summary['compression_ratio']:.1f} "
                f"student_params={int(summary['student_params'])} {key_metric}={value:.4f} "
                f"({duration:.1f} s)",
                flush=True,
            )
    return metrics


@hydra.main(version_base="1.3", config_path=str(kd_config.CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except KDError as error:
        print(f"kd-train: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(
            "kd-train: interrupted; the MLflow run is KILLED and checkpoints/interrupted.ckpt "
            "is in the run folder (resume from checkpoints/last.ckpt with ckpt_path=...)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    metric_name = cfg.get("optimized_metric")
    if metric_name:
        if metric_name not in metrics:
            raise ConfigError(
                f"optimized_metric={metric_name!r} was not computed; available: {sorted(metrics)}"
            )
        return metrics[metric_name]
    return None


def _quiet_third_party() -> None:
    """Keep the console to what a user acts on: progress, the run summary, errors."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.trainer.connectors.logger_connector.logger_connector").setLevel(
        logging.WARNING
    )
    for pattern in (
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*smaller than the logging interval.*",
        r".*does not have many workers.*",
        r".*Consider setting `persistent_workers=True`.*",
        r"(?s).*is validated against ConfigStore schema with the same name.*",  # configs/hydra/launcher/*.yaml
    ):
        warnings.filterwarnings("ignore", message=pattern)


def main() -> None:
    """Console entry point of ``kd-train``."""
    _quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
