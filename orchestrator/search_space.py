"""The Optuna side of a study: samplers, the define-by-run space, the first points."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from defenses import ParamSpec, defense_class
from orchestrator.config import StudyConfig

TUNE_TRIAL_ID = "tune_trial_id"
"""Optuna user attribute holding the Ray Tune trial id of an Optuna trial (set by
:class:`orchestrator.tune_searcher.RecordedFirstOptunaSearch`)."""

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a study, seeded with the study seed."""
    return SAMPLERS[name](seed)


def suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
    """Ask ``trial`` for one value of ``spec``."""
    if spec.type == "categorical":
        return trial.suggest_categorical(name, list(spec.choices or ()))
    assert spec.low is not None and spec.high is not None  # ParamSpec checked a range has both
    if spec.type == "float":
        return trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)
    return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)


class DefineByRun:
    """The conditional space: the defense is a categorical choice and its hyperparameters are
    asked for only when it is chosen (named ``<defense>.<hyperparameter>``). A picklable
    callable, since Ray Tune checkpoints the searcher."""

    def __init__(self, names: list[str], ranges: dict[str, dict[str, ParamSpec]]) -> None:
        self.names = names
        self.ranges = ranges

    def __call__(self, trial: Any) -> None:
        defense = trial.suggest_categorical("defense", self.names)
        for key, spec in self.ranges[defense].items():
            suggest(trial, f"{defense}.{key}", spec)


def define_by_run(config: StudyConfig) -> DefineByRun:
    """The study's define-by-run space (see :class:`DefineByRun`)."""
    return DefineByRun(list(config.defenses), config.search_ranges())


def _clip(spec: ParamSpec, value: Any) -> Any:
    if spec.type == "categorical":
        return value if value in (spec.choices or ()) else (spec.choices or (value,))[0]
    assert spec.low is not None and spec.high is not None  # ParamSpec checked a range has both
    lo, hi = float(spec.low), float(spec.high)
    v = min(max(float(value), lo), hi)
    return round(v) if spec.type == "int" else v


def default_point(config: StudyConfig, defense: str) -> dict[str, Any]:
    """The searched hyperparameters of ``defense`` at its defaults, clipped into the study's
    range where a default lies outside it."""
    defaults = defense_class(defense).defaults()
    return {
        key: _clip(spec, defaults[key]) for key, spec in config.search_ranges()[defense].items()
    }


def initial_points(config: StudyConfig) -> list[dict[str, Any]]:
    """The first trials: the ``none`` control (when listed) and every defense at its defaults
    (:func:`default_point`)."""
    order = sorted(config.defenses, key=lambda d: (d != "none", list(config.defenses).index(d)))
    points = []
    for defense in order:
        searched = default_point(config, defense)
        points.append({"defense": defense, **{f"{defense}.{k}": v for k, v in searched.items()}})
    return points[: config.search.trials]


def defense_params(
    config: StudyConfig,
    defense: str,
    searched: dict[str, Any] | None = None,
    *,
    with_defaults: bool = False,
) -> dict[str, Any]:
    """A trial's hyperparameters for ``defense``: the study's constants, then the ``searched``
    values (by hyperparameter name); over every default of the defense when ``with_defaults``
    (what is recorded), else only what the study sets (what the defense is built with)."""
    base = defense_class(defense).defaults() if with_defaults else {}
    return {**base, **config.constants(defense), **(searched or {})}


def trial_params(config: StudyConfig, tune_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The defense and its hyperparameters (study constants + searched values) of a Ray Tune
    trial's configuration (``defense`` and ``<defense>.<hyperparameter>`` keys)."""
    defense = str(tune_config["defense"])
    prefix = defense + "."
    searched = {k[len(prefix) :]: v for k, v in tune_config.items() if k.startswith(prefix)}
    return defense, defense_params(config, defense, searched)
