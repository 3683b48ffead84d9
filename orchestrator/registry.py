"""Shipping users' own attacks, defenses, models, datasets and objectives to Ray workers.

Registries (:class:`fl.registry.Registry`) live in each process. A Ray worker imports Obscura's
built-ins, but not the study's ``plugins`` nor anything a user registered in the driver before
``Study.run``. So the driver captures the custom entries of all five registries
(:func:`capture_customs`) and each trial restores them (:func:`restore_customs`) before it
validates the study. The worker does not import the ``plugins`` modules itself: they may exist
only on the driver's path (a file beside the study, a folder not installed on the cluster's
nodes), and what was registered outside any plugin would still be missing. Objects defined
outside Obscura's packages (``__main__``, a plugin module) travel by value.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from attacks import ATTACKS
from defenses import DEFENSES
from fl.data import base as data_base
from fl.models import MODELS
from fl.registry import Registry
from orchestrator.metrics import OBJECTIVES

#: Top-level packages every worker imports by name: their objects never travel by value.
_IMPORTABLE = frozenset({"attacks", "defenses", "fl", "orchestrator", "builtins"})


def registries() -> dict[str, Registry[Any]]:
    """The five registries a study can use, by the key they travel under."""
    return {
        "attacks": ATTACKS,
        "defenses": DEFENSES,
        "models": MODELS,
        "datasets": data_base.DATASETS,
        "objectives": OBJECTIVES,
    }


def _by_value(obj: Any) -> None:
    """Have cloudpickle send the module defining ``obj`` by value when a worker may not be able
    to import it (anything outside Obscura's packages); a registry entry that is a dataclass
    (a dataset's loader entry, an objective) is looked into, one level."""
    values = [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values += [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    for value in values:
        module = sys.modules.get(getattr(value, "__module__", None) or "", None)
        # __main__ is pickled by value already; the package's own modules import in any worker.
        if module is None or module.__name__ == "__main__":
            continue
        if module.__name__.split(".")[0] in _IMPORTABLE:
            continue
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)


def capture_customs() -> dict[str, dict[str, Any]]:
    """The custom (not built-in) entries of every registry in this process, by registry."""
    out = {kind: registry.customs() for kind, registry in registries().items()}
    for entries in out.values():
        for obj in entries.values():
            _by_value(obj)
    return out


def restore_customs(customs: dict[str, dict[str, Any]]) -> None:
    """Register in this process what :func:`capture_customs` captured elsewhere (an entry of
    the same name is replaced: a reused worker restores the same entries trial after trial)."""
    known = registries()
    for kind, entries in customs.items():
        known[kind].restore(entries)
