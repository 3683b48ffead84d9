"""Attacks that learn from public data (threat model "auxiliary data"): ``learned_inversion``
(Wu et al. 2023) and ``feature_inversion``, and the inverters behind ``init: learned``."""

from attacks.learned.attack import FeatureInversion, LearnedInversion
from attacks.learned.params import (
    FeatureInversionParams,
    InverterParams,
    LearnedInversionParams,
    LearnedStartParams,
)
from attacks.learned.trained import InverterCache, TrainedInverter, fit_inverter

__all__ = [
    "FeatureInversion",
    "FeatureInversionParams",
    "InverterCache",
    "InverterParams",
    "LearnedInversion",
    "LearnedInversionParams",
    "LearnedStartParams",
    "TrainedInverter",
    "fit_inverter",
]
