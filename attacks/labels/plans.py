"""How an attack obtains the labels of the batch it reconstructs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from attacks._machinery.setup import InversionSetup
from fl.simulation.observation import Observation

LabelMode = Literal["auto", "known", "infer", "soft"]


def labels_description(default: Literal["infer", "soft"]) -> str:
    """The description of an attack's ``labels`` parameter whose ``auto`` falls back to
    ``default`` when the labels are not granted."""
    return (
        "How the attack obtains the batch's labels: 'known' (granted: knows_labels), 'infer' "
        "(read off the last layer's update, attacks.infer_labels), 'soft' (dummy logits "
        f"optimised jointly, DLG) or 'auto' (known when granted, else '{default}')."
    )


@dataclass
class LabelPlan:
    """Targets for the dummy loss and, for soft labels, the logits being optimised."""

    targets: Callable[[], torch.Tensor]
    variables: list[torch.Tensor]
    source: str
    fixed: torch.Tensor | None

    def final_labels(self) -> torch.Tensor:
        """The labels the attack reports."""
        if self.fixed is not None:
            return self.fixed
        return self.variables[0].detach().argmax(dim=1)


def plan_labels(
    mode: LabelMode,
    default: Literal["infer", "soft"],
    obs: Observation,
    setup: InversionSetup,
    generator: torch.Generator,
) -> LabelPlan:
    """Resolve ``mode``: ``known`` uses the granted labels, ``infer`` reads them off the last
    layer's update, ``soft`` optimises dummy logits jointly (DLG), and ``auto`` uses known labels
    when granted and the attack's ``default`` otherwise."""
    if mode == "auto":
        mode = "known" if obs.labels is not None else default
    if mode == "known":
        if obs.labels is None:
            raise ValueError("labels='known' needs an observation with labels")
        fixed = obs.labels.to(setup.lower.device)
        return LabelPlan(lambda: fixed, [], "known", fixed)
    if mode == "infer":
        fixed = setup.inferred_labels()
        return LabelPlan(lambda: fixed, [], "inferred", fixed)
    if mode == "soft":
        b, k = setup.shape[0], obs.num_classes
        logits = torch.randn((b, k), generator=generator, device=setup.lower.device)
        logits.requires_grad_(True)
        return LabelPlan(lambda: F.softmax(logits, dim=-1), [logits], "optimised", None)
    raise ValueError(f"unknown label mode {mode!r}; use auto, known, infer or soft")
