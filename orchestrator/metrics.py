"""Trial metric names, their aggregation, and user-registered objectives.

Names used in ``objectives``, Parquet columns and MLflow:

- utility: ``test_accuracy``, ``test_balanced_accuracy``, ``test_macro_f1``, ``test_auroc``,
  ``test_loss``, and ``accuracy_drop`` (the control's accuracy minus the trial's, filled in once
  the ``none`` control has completed; not usable as a search objective);
- privacy per attack (``<attack>`` is the attack's ``label`` or name): ``<attack>_<statistic>``
  for every trial statistic of the metric table (:data:`attacks.scoring.table.TRIAL_STATISTICS`:
  ``psnr_mean``, ``psnr_max``, ``prior_gain_max`` (the headline: PSNR minus the PSNR of the
  population's mean image), ``identification_rate``, ``ssim_max``, ``lpips_min``, ...), and the
  same names with the prefix ``attack_`` for the worst case over attacks (each statistic's
  ``worst``: the maximum, the minimum for LPIPS), computed over every image of every attacked
  round and victim; the documentation's metric reference lists them all;
- ``epsilon`` (DP-SGD); cost: ``seconds_train``, ``seconds_attack`` (attacks with their
  scoring), ``<attack>_seconds`` (each attack's part of it, its scoring included),
  ``seconds_metrics`` (the scoring alone: PSNR, SSIM, LPIPS), ``peak_memory_mb``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from attacks.scoring.table import TRIAL_STATISTICS, summarise
from fl.registry import Registry

UTILITY = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_auroc", "test_loss")
DERIVED = ("accuracy_drop",)
PRIVACY: tuple[str, ...] = tuple(s.name for s in TRIAL_STATISTICS)
"""Per-attack privacy statistics, from the metric table (:mod:`attacks.scoring.table`)."""
#: Worst case = best for the attacker: which way each privacy statistic is worse for privacy.
WORST: dict[str, Literal["max", "min"]] = {s.name: s.worst for s in TRIAL_STATISTICS}
OTHER = ("epsilon", "seconds_train", "seconds_attack", "seconds_metrics", "peak_memory_mb")
#: Per-attack cost: ``<attack>_seconds``, that attack's share of ``seconds_attack``.
COST_PER_ATTACK = "seconds"
#: ``<attack>_public_images``: how many public images the attacker held (None: none granted).
PUBLIC_IMAGES = "public_images"


@dataclass(frozen=True)
class CustomObjective:
    """A user objective: a function of a trial's result returning a number."""

    name: str
    fn: Callable[[dict[str, Any]], float]
    description: str = ""


class UnknownObjectiveError(ValueError):
    """No custom objective is registered under that name; the message lists the known ones."""


OBJECTIVES: Registry[CustomObjective] = Registry("objective", UnknownObjectiveError)
"""Custom objective name -> objective (none ships with Obscura: the built-ins are metrics)."""
_CUSTOM = OBJECTIVES  # the name the metric code here uses


def register_objective(
    name: str,
    fn: Callable[[dict[str, Any]], float] | None = None,
    *,
    description: str = "",
    replace: bool = True,
) -> Any:
    """Register a custom objective usable by name in a study's ``objectives``.

    ``fn(result)`` receives a dict with ``metrics`` (every metric above), ``rounds`` (a list of
    per-round dicts) and ``attacks`` (a list of per-image attack records) and returns a float.
    Usable as ``register_objective("name", fn)`` or as a decorator ``@register_objective("name")``.
    Registering a taken name replaces its objective (as it always has: a notebook cell run again)
    unless ``replace=False``, which raises ``ValueError`` as the other registries do.
    """

    def deco(f: Callable[[dict[str, Any]], float]) -> Callable[[dict[str, Any]], float]:
        if name in builtin_names() and name not in _CUSTOM:
            raise ValueError(f"{name!r} is a built-in metric name; choose another name")
        current = _CUSTOM.get(name) if name in _CUSTOM else None
        if current is None or current.fn is not f or current.description != description:
            _CUSTOM.register(name, CustomObjective(name, f, description), replace=replace)
        return f

    return deco(fn) if fn is not None else deco


def unregister_objective(name: str) -> None:
    """Remove a custom objective (for tests and plugins); an unknown name is ignored."""
    if name in _CUSTOM:
        _CUSTOM.unregister(name)


def custom_objectives() -> dict[str, CustomObjective]:
    """The registered custom objectives by name."""
    return dict(_CUSTOM.items())


def builtin_names(attacks: Sequence[str] = ()) -> list[str]:
    """The built-in metric names for a study with these attack labels."""
    names = list(UTILITY) + list(DERIVED) + [f"attack_{p}" for p in PRIVACY] + list(OTHER)
    for a in attacks:
        names += [f"{a}_{p}" for p in PRIVACY] + [f"{a}_{COST_PER_ATTACK}", f"{a}_{PUBLIC_IMAGES}"]
    return names


def known_metrics(attacks: Sequence[str] = ()) -> list[str]:
    """Every metric name a trial reports: built-ins plus custom objectives."""
    return builtin_names(attacks) + sorted(_CUSTOM)


def validate_metric(name: str, attacks: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the known names when ``name`` cannot be an objective."""
    if name in DERIVED:
        raise ValueError(
            f"{name!r} is derived after the study (it needs the control); use 'test_accuracy'"
        )
    if name not in known_metrics(attacks):
        known = ", ".join(n for n in known_metrics(attacks) if n not in DERIVED)
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}")


def attack_summary(
    images: Iterable[Mapping[str, Any]], success_psnr: float
) -> dict[str, float | None]:
    """Per-attack statistics over every attacked image (all rounds and victims).

    ``images`` are per-image records (:func:`attacks.scoring.metrics.score`'s ``per_image`` or
    ``attacks.parquet`` rows); a statistic skips images without its value (``psnr_gain``,
    ``prior_gain``, ``identified``, ``id_rank_lpips``: None when none has one). Returns one value
    (or None) per name of :data:`PRIVACY` (:func:`attacks.scoring.table.summarise`).

    Example:
        >>> attack_summary([{"psnr": 22.0, "psnr_gain": 9.5, "ssim": 0.5}], 20.0)["psnr_gain_max"]
        9.5
    """
    return summarise(images, success_psnr, per_trial=True)


def worst_case(per_attack: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """``attack_*`` metrics: the worst case for privacy over the attacks."""
    out: dict[str, float | None] = {}
    for stat, direction in WORST.items():
        values = [x for v in per_attack.values() if (x := v.get(stat)) is not None]
        if not values:
            out[f"attack_{stat}"] = None
        else:
            out[f"attack_{stat}"] = max(values) if direction == "max" else min(values)
    return out
