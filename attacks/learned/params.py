"""Parameters of the learned attacks (:mod:`attacks.learned`) and of learned starts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from attacks.base import AttackParams

Encoding = Literal["sketch", "classifier_input"]
"""What the inverter reads of an update: a CountSketch of all of it (Wu et al. 2023), or the
classifier input the last layer's rows reveal (``dW_c / db_c``, a feature decoder)."""


class InverterParams(BaseModel):
    """How an inversion network is trained on public data (Wu, Chen, Guo, Weinberger 2023)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    examples: int = Field(
        4000,
        ge=16,
        le=200_000,
        description="Simulated client updates to train on (public batches drawn with "
        "replacement, each run through the client's algorithm and defense).",
    )
    epochs: int = Field(40, ge=1, le=10_000, description="Training epochs over those examples.")
    hidden: int = Field(1024, ge=8, le=16_384, description="Width of the MLP's hidden layers.")
    depth: int = Field(2, ge=1, le=8, description="Hidden layers of the MLP.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam's learning rate.")
    minibatch: int = Field(64, ge=1, le=65_536, description="Training examples per Adam step.")
    augment: Literal["none", "flip"] = Field(
        "none",
        description="Augmentation of the public images before simulation: 'flip' mirrors each "
        "drawn image horizontally with probability 1/2.",
    )
    adaptive: bool = Field(
        True,
        description="Simulate clients with the trial's defense applied exactly as a client "
        "applies it (the adaptive attack); false: without it (to measure what adaptivity adds).",
    )
    ablation: Literal["none", "prior_only"] = Field(
        "none",
        description="'prior_only': the inverter reads Gaussian noise instead of the update, in "
        "training and attack; it can learn only the public images' average (the baseline every "
        "learned attack's gain is measured over).",
    )
    validation: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the simulated examples held out to pick the epoch with the lowest "
        "loss (0: keep the last epoch).",
    )


SKETCH_DESCRIPTION = "Dimension of the CountSketch of the whole update (encoding 'sketch')."


class LearnedInversionParams(InverterParams, AttackParams):
    """``learned_inversion``: an MLP from a CountSketch of the update to the batch."""

    sketch: int = Field(4096, ge=16, le=1_000_000, description=SKETCH_DESCRIPTION)

    iterations: int = Field(1, ge=1, description="Unused (the inverter is trained, not run).")


class FeatureInversionParams(InverterParams, AttackParams):
    """``feature_inversion``: a decoder from the classifier input the last layer reveals."""

    iterations: int = Field(1, ge=1, description="Unused (the inverter is trained, not run).")


class LearnedStartParams(InverterParams):
    """The inverter behind ``init: learned`` of gradient-matching attacks."""

    encoding: Encoding = Field(
        "sketch",
        description="What the inverter reads: 'sketch' (learned_inversion) or "
        "'classifier_input' (feature_inversion; needs a last Linear layer with a bias).",
    )
    sketch: int = Field(4096, ge=16, le=1_000_000, description=SKETCH_DESCRIPTION)


LearnedStart = Annotated[
    LearnedStartParams,
    Field(
        default_factory=LearnedStartParams,
        description="The inverter behind init: learned (examples, epochs, encoding, ...).",
    ),
]
"""The ``learned`` parameter of attacks with a learned start."""

LearnedPull = Annotated[
    float,
    Field(
        ge=0,
        description="Weight of a pull toward the learned start (mean squared distance, "
        "normalised pixels; init: learned only; 0: none).",
    ),
]
"""The ``learned_pull`` parameter of attacks with a learned start."""
