"""Federated simulation: FedSGD / FedAvg clients in-process, observation capture for attacks.

The honest-but-curious server's view of a client step is an :class:`Observation`; the private
data of that step is a :class:`GroundTruth`, kept apart and seen only by the evaluator.
"""

from fl.simulation.aggregate import aggregate
from fl.simulation.allocator import tune_allocator
from fl.simulation.client import ClientResult, run_client
from fl.simulation.config import CaptureConfig, FederationConfig, PartitionConfig
from fl.simulation.device import resolve_device
from fl.simulation.evaluation import classification_metrics, evaluate, predict
from fl.simulation.hooks import ClientContext, ClientHooks
from fl.simulation.normalization import denormalize, normalize
from fl.simulation.observation import GroundTruth, Observation
from fl.simulation.simulator import (
    RoundRecord,
    RunResult,
    Simulator,
    build_observation,
    observe_client_step,
)
from fl.simulation.vectorized import run_clients_vectorized, vectorization_obstacle

__all__ = [
    "CaptureConfig",
    "ClientContext",
    "ClientHooks",
    "ClientResult",
    "FederationConfig",
    "GroundTruth",
    "Observation",
    "PartitionConfig",
    "RoundRecord",
    "RunResult",
    "Simulator",
    "aggregate",
    "build_observation",
    "classification_metrics",
    "denormalize",
    "evaluate",
    "normalize",
    "observe_client_step",
    "predict",
    "resolve_device",
    "run_client",
    "run_clients_vectorized",
    "tune_allocator",
    "vectorization_obstacle",
]
