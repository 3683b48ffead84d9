"""Trial metric names, their aggregation, and user-registered objectives.

Names used in ``objectives``, Parquet columns and MLflow:

- utility: ``test_accuracy``, ``test_balanced_accuracy``, ``test_macro_f1``, ``test_auroc``,
  ``test_loss``, and ``accuracy_drop`` (the control's accuracy minus the trial's, filled in once
  the ``none`` control has completed; not usable as a search objective);
- privacy per attack (``<attack>`` is the attack's ``label`` or name): ``<attack>_psnr_mean``,
  ``_psnr_max``, ``_prior_gain_mean``, ``_prior_gain_max`` (the headline: PSNR minus the PSNR of
  the population's mean image, what is known without any client; see
  :mod:`attacks.scoring.metrics`),
  ``_identification_rate`` (share of images whose victim is the reconstruction's nearest
  neighbour among the reference pool, pixel space) and ``_identification_rate_lpips`` (LPIPS),
  ``_psnr_gain_mean``, ``_psnr_gain_max`` (PSNR minus the PSNR of a flat image at the dataset
  mean: a weak baseline, kept for comparison), ``_ssim_mean``, ``_ssim_max``, ``_lpips_mean``,
  ``_lpips_min``, ``_label_accuracy``, ``_success_rate``; and the same names with the prefix
  ``attack_`` for the worst case over attacks (the maximum of all but LPIPS, the minimum of
  LPIPS), computed over every image of every attacked round and victim;
- ``epsilon`` (DP-SGD); cost: ``seconds_train``, ``seconds_attack`` (attacks with their
  scoring), ``<attack>_seconds`` (each attack's part of it, its scoring included),
  ``seconds_metrics`` (the scoring alone: PSNR, SSIM, LPIPS), ``peak_memory_mb``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fl.registry import Registry
from orchestrator.values import finite_or_none

UTILITY = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_auroc", "test_loss")
DERIVED = ("accuracy_drop",)
PRIVACY = (
    "psnr_mean",
    "psnr_max",
    "prior_gain_mean",
    "prior_gain_max",
    "identification_rate",
    "identification_rate_lpips",
    "psnr_gain_mean",
    "psnr_gain_max",
    "ssim_mean",
    "ssim_max",
    "lpips_mean",
    "lpips_min",
    "label_accuracy",
    "success_rate",
)
#: Worst case = best for the attacker: which way each privacy statistic is worse for privacy.
WORST: dict[str, Literal["max", "min"]] = {
    "psnr_mean": "max",
    "psnr_max": "max",
    "prior_gain_mean": "max",
    "prior_gain_max": "max",
    "identification_rate": "max",
    "identification_rate_lpips": "max",
    "psnr_gain_mean": "max",
    "psnr_gain_max": "max",
    "ssim_mean": "max",
    "ssim_max": "max",
    "lpips_mean": "min",
    "lpips_min": "min",
    "label_accuracy": "max",
    "success_rate": "max",
}
OTHER = ("epsilon", "seconds_train", "seconds_attack", "seconds_metrics", "peak_memory_mb")
#: Per-attack cost: ``<attack>_seconds``, that attack's share of ``seconds_attack``.
COST_PER_ATTACK = "seconds"


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
        names += [f"{a}_{p}" for p in PRIVACY] + [f"{a}_{COST_PER_ATTACK}"]
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
    images: Iterable[dict[str, Any]], success_psnr: float
) -> dict[str, float | None]:
    """Per-attack statistics over every attacked image (all rounds and victims).

    ``images`` are per-image records (:func:`attacks.scoring.metrics.score`'s ``per_image`` or
    ``attacks.parquet`` rows); a statistic skips images without its value (``psnr_gain``,
    ``prior_gain``, ``identified``, ``id_rank_lpips``: None when none has one). Returns one value
    (or None) per name of :data:`PRIVACY`.

    Example:
        >>> attack_summary([{"psnr": 22.0, "psnr_gain": 9.5, "ssim": 0.5}], 20.0)["psnr_gain_max"]
        9.5
    """
    rows = list(images)
    if not rows:
        return {p: None for p in PRIVACY}
    psnr = [r["psnr"] for r in rows]
    gain = _present(rows, "psnr_gain")
    prior = _present(rows, "prior_gain")
    ssim = [r["ssim"] for r in rows]
    lpips = _present(rows, "lpips")
    labels = [bool(r["label_correct"]) for r in rows if r.get("label_correct") is not None]
    identified = [bool(v) for v in _present(rows, "identified")]
    identified_lpips = [v == 1 for v in _present(rows, "id_rank_lpips")]
    return {
        "psnr_mean": finite_or_none(sum(psnr) / len(psnr)),
        "psnr_max": finite_or_none(max(psnr)),
        "prior_gain_mean": finite_or_none(sum(prior) / len(prior)) if prior else None,
        "prior_gain_max": finite_or_none(max(prior)) if prior else None,
        "identification_rate": _share(identified),
        "identification_rate_lpips": _share(identified_lpips),
        "psnr_gain_mean": finite_or_none(sum(gain) / len(gain)) if gain else None,
        "psnr_gain_max": finite_or_none(max(gain)) if gain else None,
        "ssim_mean": finite_or_none(sum(ssim) / len(ssim)),
        "ssim_max": finite_or_none(max(ssim)),
        "lpips_mean": finite_or_none(sum(lpips) / len(lpips)) if lpips else None,
        "lpips_min": finite_or_none(min(lpips)) if lpips else None,
        "label_accuracy": (sum(labels) / len(labels)) if labels else None,
        "success_rate": sum(p >= success_psnr for p in psnr) / len(psnr),
    }


def _present(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """The rows' values of ``key`` that are present (not missing, not None)."""
    return [r[key] for r in rows if r.get(key) is not None]


def _share(flags: list[bool]) -> float | None:
    """The share of True among ``flags``, None without any."""
    return sum(flags) / len(flags) if flags else None


def worst_case(per_attack: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """``attack_*`` metrics: the worst case for privacy over the attacks."""
    out: dict[str, float | None] = {}
    for stat, direction in WORST.items():
        values = [v[stat] for v in per_attack.values() if v.get(stat) is not None]
        if not values:
            out[f"attack_{stat}"] = None
        else:
            out[f"attack_{stat}"] = max(values) if direction == "max" else min(values)  # type: ignore[type-var]
    return out
