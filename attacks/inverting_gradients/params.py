"""Inverting Gradients' parameters, and its option of reconstructing a trial's victims in one
batched optimisation (``batch_victims``, set per attack in a study file)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from attacks._machinery.setup import START_INIT_DESCRIPTION, StartInit
from attacks.base import AttackParams
from attacks.labels.plans import LabelMode, labels_description
from attacks.learned.params import LearnedPull, LearnedStart

log = logging.getLogger(__name__)

BatchVictims = Literal["auto", "on", "off"]
"""Whether a trial reconstructs an attack's victims in one batched optimisation."""

BATCH_VICTIMS_DESCRIPTION = (
    "Reconstruct this attack's victims in one batched optimisation (Inverting "
    "Gradients on FedSGD): 'on', 'off', or 'auto' (on a GPU only; slower on CPUs). Equal "
    "to separate runs up to float rounding, which signed Adam can amplify on long runs. "
    "Not yet verified on CUDA (benchmarks/gpu_check.py checks it): an opt-in there."
)
"""What ``batch_victims`` means, for the study file's ``attacks[].batch_victims``."""


def batch_victims(mode: BatchVictims | str, device: torch.device) -> bool:
    """Whether an attack's victims go into one batched optimisation: ``on``, ``off``, or
    ``auto`` = on a GPU (on a CPU the batched loop measured slower than separate runs). Both
    are opt-ins (the default is ``off``); on CUDA the batched path is not yet verified against
    separate runs, which a warning says. Only Inverting Gradients has a batched path
    (:meth:`InvertingGradients.run_many`); other attacks run their victims one by one."""
    batched = mode == "on" or (mode == "auto" and device.type == "cuda")
    if batched and device.type == "cuda":
        log.warning(
            "batch_victims=%s on %s: not yet verified against separate runs on a GPU "
            "(benchmarks/gpu_check.py checks it); 'off' runs the victims one by one",
            mode,
            device,
        )
    return batched


class InvertingGradientsParams(AttackParams):
    """Defaults of inversefed's reconstruction config: 4,800 iterations, Adam lr 0.1 on signed
    gradients with step decay, TV 0.1, boxed images, N(0, 1) initialisation, one restart."""

    iterations: int = Field(4800, ge=1, description="Adam iterations per restart.")
    lr: float = Field(0.1, gt=0, description="Adam step size (before the step decay).")
    tv: float = Field(0.1, ge=0, description="Weight of the total-variation prior.")
    signed: bool = Field(True, description="Adam on the sign of the gradient (inversefed).")
    decay: bool = Field(
        True, description="Step decay by 0.1 at 3/8, 5/8 and 7/8 of the iterations."
    )
    boxed: bool = Field(
        True, description="Clamp the images to the valid pixel range after every step."
    )
    labels: LabelMode = Field("auto", description=labels_description("infer"))
    init: StartInit = Field("randn", description=START_INIT_DESCRIPTION)
    learned: LearnedStart
    learned_pull: LearnedPull = 0.0
    init_noise: float = Field(
        0.0,
        ge=0,
        description="Std of Gaussian noise (normalised pixel units) added to the initial dummy "
        "of every restart after the first (then boxed, if boxed), so that restarts from a "
        "fixed init ('mean', 'grey') differ; for restart_average (0: none).",
    )
    layer_weights: Literal["equal", "linear", "exp"] = Field(
        "equal",
        description="Per-tensor weights of the cosine (inversefed): 'equal', 'linear' "
        "(decreasing with depth) or 'exp' (softmax-decaying).",
    )
    layers: list[str] | None = Field(None, description="Only match these name prefixes.")
    ignore_layers: list[str] = Field(
        default_factory=list,
        description="Parameter-name prefixes left out of the matching (defense-aware attack).",
    )
    bn_prior: float = Field(
        0.0,
        ge=0,
        description="Weight of DeepInversion's BatchNorm-statistics term (Yin et al. 2021): "
        "the dummy batch's per-layer mean and variance matched to those the client's returned "
        "buffers reveal; > 0 requires knows_bn_stats (0: the plain attack).",
    )
    bn_first_multiplier: float = Field(
        10.0, ge=0, description="Multiplier of the first BatchNorm layer's term (GradInversion)."
    )
    bn_distance: Literal["absolute", "relative"] = Field(
        "absolute",
        description="The BatchNorm prior's distance: 'absolute' (DeepInversion's norms of the "
        "differences) or 'relative' (each channel in units of the revealed statistics, so one "
        "weight fits every layer's and dataset's scale; an extension, docs/batchnorm.md).",
    )
    feature_prior: float = Field(
        0.0,
        ge=0,
        description="Weight of the feature prior: the dummy's classifier input pulled toward the "
        "features the last layer's gradient reveals (dW_c / db_c; exact at batch 1, images "
        "with a label of their own at batch B; an extension, docs/batchnorm.md); 0: off.",
    )
    bn_project: bool = Field(
        False,
        description="After every step, shift each input channel so that the first BatchNorm "
        "layer's channel means are those the buffers reveal (an extension, docs/batchnorm.md); "
        "requires knows_bn_stats.",
    )

    @model_validator(mode="after")
    def _feature_prior_needs_fixed_labels(self) -> InvertingGradientsParams:
        if self.feature_prior > 0 and self.labels == "soft":
            raise ValueError(
                "feature_prior > 0 needs fixed labels: set labels to 'auto', 'known' or "
                "'infer', or feature_prior to 0"
            )
        return self
