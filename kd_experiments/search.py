"""``kd-search``: an Optuna search over a scheme's hyper-parameters at a fixed compression ratio.

    kd-search hparams_search=score_regression_optuna experiment=quickstart
    kd-search hparams_search=score_regression_optuna experiment=quickstart search.n_trials=4 trainer.max_epochs=5

The arguments are Hydra overrides of the ``kd-train`` config (``configs/train.yaml``).
The ``hparams_search`` group (``configs/hparams_search/*.yaml``) adds a ``search`` node
(the space, the number of trials, the sampler) and fixes the compression ratio and the
metric to optimise (``optimized_metric``, a *validation* metric such as ``val/loss``;
``test/*`` metrics are refused, so no hyper-parameter is ever chosen on the test split).

Each trial is one :func:`kd_experiments.train.train` call on a config composed with
Hydra's compose API, set up as one job of a multirun: the trials are child runs of one
MLflow parent run (tagged ``kd.sweep_parent=true``, ``kd.search=optuna`` and a
``sweep_id``), so the UI shows the search as one expandable row and
``kd-report --sweep <sweep_id>`` reports on it. At the end the parent holds the best
trial's value (``best/<metric>``), its hyper-parameters (params ``best.<name>``), its run
id (tag ``best_run_id``), and ``search/best.yaml`` with the ``kd-train`` command that
reproduces it. A trial whose training diverges (NaN loss) is recorded as failed and the
search goes on; any other error stops the search.

hydra-optuna-sweeper pins ``optuna<3``, so Optuna (>= 4) is used directly. Trials run one
after another in this process (``train`` sets Hydra's global run config, which is not
thread safe); Optuna's ``TPESampler`` (Bergstra et al., NeurIPS 2011) is the default.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kd_experiments.config import CONFIG_DIR
from kd_experiments.errors import ConfigError, KDError, TrainingDivergedError

PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")


def compose_config(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path = CONFIG_DIR,
    config_name: str = "train",
    sweep_dir: str | Path | None = None,
    job_num: int = 0,
    output_dir: str | Path | None = None,
) -> DictConfig:
    """The ``kd-train`` config composed with ``overrides``, Hydra's runtime set as ``kd-train`` would.

    With ``sweep_dir`` the run is set up as job ``job_num`` of a multirun in that folder
    (so :func:`kd_experiments.train.train` makes it a child of the sweep's parent run);
    its output folder is ``<sweep_dir>/<job_num>`` unless ``output_dir`` is given. Without
    it, a single run whose output folder is ``output_dir`` (default: Hydra's ``run.dir``).
    Returns the task config (no ``hydra`` node), as a ``@hydra.main`` function sees it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve())):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        if sweep_dir is not None:
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(Path(sweep_dir).resolve())
            cfg.hydra.sweep.subdir = str(job_num)
            cfg.hydra.job.num = job_num
            run_dir = Path(output_dir) if output_dir else Path(sweep_dir) / str(job_num)
        else:
            cfg.hydra.mode = RunMode.RUN
            cfg.hydra.job.num = 0
            run_dir = Path(output_dir) if output_dir else Path(str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = str(run_dir.resolve())
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _leaves(space: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{scheme: {student_lr: {type: ...}}}`` -> ``[("scheme.student_lr", {type: ...})]``.

    The space mirrors the config's nesting, so a command line can change it like any
    other key: ``search.params.scheme.student_lr.high=0.1``, ``~search.params.scheme.teacher_lr``.
    A distribution is a mapping with a ``type``; anything else nests.
    """
    leaves = []
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "type" not in value:
            leaves.extend(_leaves(value, prefix=f"{name}."))
        else:
            leaves.append((name, value))
    return leaves


@dataclass
class ParamSpec:
    """One dimension of the search space: a config key and its distribution."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    @classmethod
    def from_config(cls, name: str, node: Any) -> ParamSpec:
        where = f"search.params.{name}"
        if not isinstance(node, dict):
            raise ConfigError(f"{where} must be a mapping with a type (float | int | categorical), got {node!r}")
        kind = str(node.get("type", ""))
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}.type must be one of {PARAM_TYPES}, got {kind!r}")
        if kind == "categorical":
            choices = node.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices must be a non-empty list, got {choices!r}")
            return cls(name, kind, choices=list(choices))
        low, high = node.get("low"), node.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(f"{where} needs numbers low < high, got low={low!r} high={high!r}")
        log = bool(node.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low!r}")
        return cls(name, kind, low=low, high=high, log=log, step=node.get("step"))

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=None if self.log else self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)


@dataclass
class SearchSpec:
    """What to search: the space, the budget, the sampler, and the metric to optimise."""

    params: list[ParamSpec]
    metric: str
    direction: str = "minimize"
    n_trials: int = 10
    sampler: str = "tpe"
    seed: int | None = 0
    storage: str | None = None
    study_name: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SearchSpec:
        search = cfg.get("search")
        if not search:
            raise ConfigError(
                "the config has no 'search' node; pick a search space, e.g. hparams_search=score_regression_optuna"
            )
        node = OmegaConf.to_container(search, resolve=True)
        metric = str(node.get("metric") or cfg.get("optimized_metric") or "")
        if not metric:
            raise ConfigError("set the metric to optimise: optimized_metric=val/loss (or search.metric)")
        if metric.startswith("test/"):
            raise ConfigError(
                f"search metric {metric!r} is a test metric; optimise a validation metric (e.g. val/loss) "
                "so that no hyper-parameter is chosen on the test split"
            )
        direction = str(node.get("direction", "minimize"))
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"search.direction must be minimize or maximize, got {direction!r}")
        n_trials = node.get("n_trials", 10)
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ConfigError(f"search.n_trials must be an integer >= 1, got {n_trials!r}")
        sampler = str(node.get("sampler", "tpe"))
        if sampler not in SAMPLERS:
            raise ConfigError(f"search.sampler must be one of {SAMPLERS}, got {sampler!r}")
        space = node.get("params") or {}
        if not isinstance(space, dict) or not space:
            raise ConfigError("search.params is empty: name at least one config key to search over")
        names = [name for name, _ in _leaves(space)]
        for fixed in ("scheme.compression_ratio", "seed"):
            if fixed in names:
                raise ConfigError(
                    f"search.params.{fixed}: the search runs at a fixed {fixed.split('.')[-1]}; "
                    f"set it with {fixed}=<value> instead"
                )
        params = [ParamSpec.from_config(name, value) for name, value in _leaves(space)]
        for spec in params:
            if OmegaConf.select(cfg, spec.name, default="__missing__") == "__missing__":
                raise ConfigError(f"search.params.{spec.name}: the config has no key {spec.name}")
        return cls(
            params=params, metric=metric, direction=direction, n_trials=n_trials, sampler=sampler,
            seed=node.get("seed", 0), storage=node.get("storage"), study_name=node.get("study_name"),
        )


@dataclass
class SearchResult:
    """The outcome of :func:`run_search`."""

    sweep_id: str
    parent_run_id: str
    experiment_name: str
    metric: str
    direction: str
    best_value: float
    best_params: dict[str, Any]
    best_run_id: str | None
    best_command: str
    trials: list[dict[str, Any]]
    search_dir: Path


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _make_sampler(spec: SearchSpec):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def run_search(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path = CONFIG_DIR,
    config_name: str = "train",
    echo=print,
) -> SearchResult:
    """Run the Optuna search the composed config describes; every trial a child MLflow run."""
    import optuna
    from mlflow.entities import Param

    from kd_experiments import config as kd_config
    from kd_experiments.tracking import (
        PARENT_TAG,
        get_or_create_experiment,
        git_commit,
        make_client,
        resolve_tracking_uri,
        sweep_id_from_dir,
    )
    from kd_experiments.train import train

    overrides = list(overrides)
    base = compose_config(overrides, config_dir=config_dir, config_name=config_name)
    spec = SearchSpec.from_config(base)
    logger_cfg = base.get("logger") or {}
    if not logger_cfg.get("mlflow"):
        raise ConfigError("kd-search tracks its trials in MLflow: use logger=mlflow (the default)")
    experiment_name = str(base.get("experiment_name") or "kd-experiments")
    search_dir = (
        Path(str(base.paths.log_dir)) / "search" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:6]}"
    ).resolve()
    search_dir.mkdir(parents=True, exist_ok=True)
    sweep_id = sweep_id_from_dir(search_dir)

    uri = resolve_tracking_uri(logger_cfg.mlflow.get("tracking_uri"))
    client = make_client(uri)
    experiment_id = get_or_create_experiment(client, experiment_name, uri)
    fixed_ratio = base.scheme.get("compression_ratio", None)
    parent = client.create_run(
        experiment_id,
        run_name=f"search-{sweep_id}",
        tags={
            PARENT_TAG: "true",
            "sweep_id": sweep_id,
            "sweep_dir": str(search_dir),
            "kd.search": "optuna",
            "scheme": kd_config.scheme_name(base.scheme),
            "dataset": kd_config.dataset_name(base.data),
            "git_commit": git_commit(),
        },
    )
    parent_id = parent.info.run_id
    space_yaml = OmegaConf.to_yaml(base.search, resolve=True)
    client.log_batch(parent_id, params=[
        Param("search.metric", spec.metric),
        Param("search.direction", spec.direction),
        Param("search.n_trials", str(spec.n_trials)),
        Param("search.sampler", spec.sampler),
        Param("search.seed", str(spec.seed)),
        Param("search.space", ", ".join(p.name for p in spec.params)),
        Param("compression_ratio_target", str(fixed_ratio)),
        Param("overrides", " ".join(overrides)[:6000]),
    ])
    client.log_text(parent_id, space_yaml, "search/space.yaml")
    echo(
        f"[kd-search] {spec.n_trials} trials, {spec.direction} {spec.metric}, compression_ratio={fixed_ratio}, "
        f"parent run {parent_id} (sweep_id {sweep_id}) in {uri}"
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=spec.direction,
        sampler=_make_sampler(spec),
        storage=spec.storage,
        study_name=spec.study_name or f"{experiment_name}-{sweep_id}",
        load_if_exists=bool(spec.storage),
    )
    trials: list[dict[str, Any]] = []

    def objective(trial) -> float:
        sampled = {p.name: p.suggest(trial) for p in spec.params}
        trial_overrides = [f"{name}={_override_value(value)}" for name, value in sampled.items()]
        cfg = compose_config(
            [*overrides, *trial_overrides], config_dir=config_dir, config_name=config_name,
            sweep_dir=search_dir, job_num=trial.number,
        )
        with open_dict(cfg):
            del cfg["search"]
            cfg.tags = {**(cfg.get("tags") or {}), "optuna_trial": str(trial.number)}
        record = {"number": trial.number, "params": sampled, "value": math.nan, "state": "FAIL", "run_id": None}
        trials.append(record)
        try:
            metrics = train(cfg)
        finally:
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.sweep_id = '{sweep_id}' and tags.optuna_trial = '{trial.number}'",
                max_results=1,
            )
            if found:
                record["run_id"] = found[0].info.run_id
                trial.set_user_attr("run_id", found[0].info.run_id)
        value = metrics.get(spec.metric)
        if value is None:
            raise ConfigError(
                f"the search metric {spec.metric!r} was not computed; available: {sorted(metrics)}"
            )
        record.update(value=float(value), state="COMPLETE" if math.isfinite(value) else "FAIL")
        return float(value)

    def report_trial(study_, trial) -> None:
        record = next((r for r in trials if r["number"] == trial.number), None)
        completed = [t for t in study_.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"best {study_.best_value:.4g} (trial {study_.best_trial.number})" if completed else "no trial completed"
        value = f"{trial.value:.4g}" if trial.value is not None else trial.state.name
        if record and trial.state != optuna.trial.TrialState.COMPLETE:
            record["state"] = trial.state.name
        params = " ".join(f"{k}={_override_value(v)}" for k, v in trial.params.items())
        echo(f"[kd-search] trial {trial.number + 1}/{spec.n_trials}: {spec.metric}={value}; {best}; {params}")

    status = "FAILED"
    try:
        study.optimize(objective, n_trials=spec.n_trials, catch=(TrainingDivergedError,), callbacks=[report_trial])
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise TrainingDivergedError(
                f"every trial of the search diverged (NaN loss or metric); see the runs under parent {parent_id}"
            )
        best = study.best_trial
        best_params = dict(best.params)
        best_overrides = [*overrides, *(f"{k}={_override_value(v)}" for k, v in best_params.items())]
        # kd-train without the search group: drop it and the search's own settings
        best_overrides = [
            o for o in best_overrides
            if not o.lstrip("+~").startswith(("hparams_search=", "hparams_search@", "search.", "search="))
        ]
        if fixed_ratio is not None and not any(o.startswith("scheme.compression_ratio=") for o in best_overrides):
            best_overrides.append(f"scheme.compression_ratio={_override_value(fixed_ratio)}")  # set by the search group
        best_command = "kd-train " + " ".join(best_overrides)
        client.log_batch(
            parent_id,
            params=[Param(f"best.{k}", _override_value(v)) for k, v in best_params.items()],
        )
        client.log_metric(parent_id, f"best/{spec.metric}", float(best.value))
        client.set_tag(parent_id, "best_run_id", str(best.user_attrs.get("run_id", "")))
        client.set_tag(parent_id, "best_trial", str(best.number))
        best_yaml = OmegaConf.to_yaml(OmegaConf.create({
            "metric": spec.metric, "direction": spec.direction, "value": float(best.value),
            "trial": best.number, "run_id": best.user_attrs.get("run_id"), "params": best_params,
            "command": best_command,
        }))
        client.log_text(parent_id, best_yaml, "search/best.yaml")
        (search_dir / "best.yaml").write_text(best_yaml)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)
    echo(f"[kd-search] best {spec.metric}={best.value:.4g} (trial {best.number}): {best_command}")
    return SearchResult(
        sweep_id=sweep_id, parent_run_id=parent_id, experiment_name=experiment_name, metric=spec.metric,
        direction=spec.direction, best_value=float(best.value), best_params=best_params,
        best_run_id=best.user_attrs.get("run_id"), best_command=best_command, trials=trials,
        search_dir=search_dir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-search",
        description=(
            "Optuna search over a scheme's hyper-parameters at a fixed compression ratio, optimising a "
            "validation metric; every trial is a kd-train run, a child of one MLflow parent run."
        ),
        epilog="Example: kd-search hparams_search=score_regression_optuna experiment=quickstart search.n_trials=8",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the kd-train config")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="config folder (default: %(default)s)")
    parser.add_argument("--config-name", default="train", help="primary config (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``kd-search``."""
    from kd_experiments.train import _quiet_third_party

    args = build_parser().parse_args(argv)
    _quiet_third_party()
    try:
        run_search(args.overrides, config_dir=args.config_dir, config_name=args.config_name)
    except KDError as error:
        print(f"kd-search: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("kd-search: interrupted; the search's parent run is KILLED", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
