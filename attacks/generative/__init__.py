"""Attacks with a generative image prior trained on public data: ``gias`` (Jeon et al.,
NeurIPS 2021), and the DCGAN it trains."""

from attacks.generative.attack import GIAS
from attacks.generative.generator import Generator, GeneratorCache, TrainedGenerator
from attacks.generative.params import GeneratorParams, GIASParams

__all__ = [
    "GIAS",
    "GIASParams",
    "Generator",
    "GeneratorCache",
    "GeneratorParams",
    "TrainedGenerator",
]
