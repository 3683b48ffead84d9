"""``--smoke``: any study shrunk to a few minutes on a CPU, with the same structure.

Every defense, attack, objective and output of the study is kept; what shrinks is the work: at
most 4 clients (2 per round), 2 rounds, 2 local steps, 16 examples per client, images of at most
16 px, attacks at round 0 on one victim with at most 10 iterations, one trial per defense, the
expensive inner loops of defenses (shadow's inversion, obscure's generator steps) cut short, and
the results go to ``<study>-smoke`` so the real study's folder is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

SMOKE_ATTACK_ITERATIONS = 10
SMOKE_DEFENSE_CAPS = {"shadow": {"shadow_iterations": 3}, "obscure": {"steps": 1}}


def smoke(raw: dict[str, Any]) -> dict[str, Any]:
    """A shrunk copy of a raw (not yet validated) study mapping."""
    out = copy.deepcopy(raw)
    if isinstance(out.get("study"), str):
        out["study"] = out["study"] + "-smoke"
    fed = out.setdefault("federation", {})
    if isinstance(fed, dict):
        clients = min(int(fed.get("clients", 10) or 10), 4)
        fed["clients"] = clients
        fed["clients_per_round"] = min(int(fed.get("clients_per_round", clients) or 1), 2, clients)
        fed["rounds"] = min(int(fed.get("rounds", 2) or 2), 2)
        if fed.get("local_steps") is not None:
            fed["local_steps"] = min(int(fed["local_steps"]), 2)
        fed["local_epochs"] = 1
        part = fed.setdefault("partition", {})
        if isinstance(part, dict):
            part["max_per_client"] = min(int(part.get("max_per_client") or 16), 16)
        fed["batch_size"] = min(int(fed.get("batch_size", 8) or 8), 8)
    data = out.get("data")
    if isinstance(data, dict):
        size = data.get("image_size")
        data["image_size"] = 16 if size is None else min(int(size), 16)
    for attack in out.get("attacks") or []:
        if isinstance(attack, dict):
            attack["rounds"] = [0]
            attack["victims"] = 1
            params = attack.setdefault("params", {})
            if isinstance(params, dict):
                params["iterations"] = min(
                    int(params.get("iterations", SMOKE_ATTACK_ITERATIONS)), SMOKE_ATTACK_ITERATIONS
                )
                params["restarts"] = 1
    defenses = out.get("defenses")
    if isinstance(defenses, dict):
        for name, caps in SMOKE_DEFENSE_CAPS.items():
            if isinstance(defenses.get(name), dict):
                defenses[name].update(caps)
            elif name in defenses and defenses[name] is None:
                defenses[name] = dict(caps)
        search = out.setdefault("search", {})
        if isinstance(search, dict):
            search["trials"] = len(defenses)
            search["concurrency"] = min(2, len(defenses))
    resources = out.setdefault("resources", {})
    if isinstance(resources, dict):
        resources["gpu"] = 0
        resources["cpu"] = 1
    return out
