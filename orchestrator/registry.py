"""Shipping users' custom defenses, attacks and objectives to Ray workers.

Registries live in each process; a Ray worker imports the built-ins but not what a user
registered in the driver. The driver captures what is not built in and the trial re-registers it.
Objects defined in ``__main__`` or in modules a worker cannot import travel by value.
"""

from __future__ import annotations

import sys
from typing import Any

from attacks import BUILTIN_ATTACKS, attack_class, available_attacks, register_attack
from defenses import BUILTIN_DEFENSES, available_defenses, defense_class, register_defense
from orchestrator.metrics import custom_objectives, register_objective


def _by_value(obj: Any) -> None:
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    # __main__ is pickled by value already; the package's own modules import in any worker.
    skip = {"__main__", "attacks", "defenses", "fl", "orchestrator", "builtins"}
    if module is None or module.__name__.split(".")[0] in skip:
        return
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def capture_customs() -> dict[str, dict[str, Any]]:
    """The custom defenses, attacks and objectives registered in this process."""
    out: dict[str, dict[str, Any]] = {
        "defenses": {
            n: defense_class(n) for n in available_defenses() if n not in BUILTIN_DEFENSES
        },
        "attacks": {n: attack_class(n) for n in available_attacks() if n not in BUILTIN_ATTACKS},
        "objectives": {n: o.fn for n, o in custom_objectives().items()},
    }
    for group in out.values():
        for obj in group.values():
            _by_value(obj)
    return out


def restore_customs(customs: dict[str, dict[str, Any]]) -> None:
    """Register in this process what :func:`capture_customs` captured elsewhere."""
    for name, cls in customs.get("defenses", {}).items():
        if name not in available_defenses():
            register_defense(name)(cls)
    for name, cls in customs.get("attacks", {}).items():
        if name not in available_attacks():
            register_attack(name)(cls)
    for name, fn in customs.get("objectives", {}).items():
        if name not in custom_objectives():
            register_objective(name, fn)
