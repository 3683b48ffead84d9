"""Typed configuration of a federated run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CLIENTS = 100_000
"""Most clients of a federation (``clients``, ``clients_per_round``)."""
MAX_ROUNDS = 100_000
"""Most rounds of a federated run."""
MAX_STEPS = 1_000_000
"""Most local epochs, local steps, and examples per batch."""


class PartitionConfig(BaseModel):
    """How the training split is divided among clients (see :func:`fl.data.partition`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scheme: Literal["iid", "dirichlet", "shards"] = Field(
        "iid",
        description="iid, dirichlet (label skew set by alpha) or shards (shards_per_client "
        "label shards per client).",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skew).")
    shards_per_client: int = Field(
        2, ge=1, le=10_000, description="Label shards (~classes) per client (at most 10000)."
    )
    max_per_client: int | None = Field(None, ge=1, description="Cap on examples per client.")
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the train split no client receives (seeded): the images an "
        "attacker's public_data may take with split: holdout.",
    )


class FederationConfig(BaseModel):
    """One federated training run.

    ``fedsgd``: each sampled client sends the gradient of one local batch of ``batch_size``;
    the server applies ``lr * server_lr`` times the weighted mean gradient.
    ``fedavg``: each sampled client runs plain SGD (no momentum) with ``lr`` for ``local_epochs``
    epochs -- or exactly ``local_steps`` steps when that is set -- and sends its new weights; the
    server moves the global weights by ``server_lr`` times the weighted mean update. Aggregation
    weights are the clients' numbers of training examples. BatchNorm buffers are averaged with the
    same weights.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    algorithm: Literal["fedsgd", "fedavg"] = Field(
        "fedavg",
        description="'fedsgd' (clients send a batch's gradient) or 'fedavg' (clients send their "
        "new weights after local SGD).",
    )
    clients: int = Field(
        10, ge=1, le=MAX_CLIENTS, description=f"Clients in the federation (at most {MAX_CLIENTS})."
    )
    clients_per_round: int = Field(
        10, ge=1, le=MAX_CLIENTS, description="Clients sampled each round (at most clients)."
    )
    rounds: int = Field(
        5, ge=1, le=MAX_ROUNDS, description=f"Rounds of training (at most {MAX_ROUNDS})."
    )
    local_epochs: int = Field(
        1,
        ge=1,
        le=MAX_STEPS,
        description=f"FedAvg local epochs per round; local_steps overrides them (at most "
        f"{MAX_STEPS}).",
    )
    local_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description=f"FedAvg: exactly this many local SGD steps per round (at most {MAX_STEPS}).",
    )
    batch_size: int = Field(
        32, ge=1, le=MAX_STEPS, description=f"Client batch size (at most {MAX_STEPS})."
    )
    lr: float = Field(0.01, gt=0, description="Clients' SGD learning rate.")
    server_lr: float = Field(
        1.0, gt=0, description="Server step: the global model moves by it times the mean update."
    )
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig,
        description="How the training split is divided among the clients.",
    )
    eval_batch_size: int = Field(
        64,
        ge=1,
        le=MAX_STEPS,
        description="Batch of the test-split evaluation after each round. Small batches keep "
        "activations in the CPU's caches: the ConvNet (width 32) evaluates PneumoniaMNIST's 624 "
        "test images in 1.2 s at 64 and 2.5 s at 512 on 2 cores; raise it on a GPU.",
    )
    channels_last: bool = Field(
        False,
        description="Train and evaluate in the channels-last memory format (faster convolutions "
        "with oneDNN on CPUs and with cuDNN on recent GPUs; same results up to float rounding).",
    )

    parallel_clients: int = Field(
        1,
        ge=1,
        le=MAX_CLIENTS,
        description="Train up to this many sampled clients at the same time, in threads that "
        "share the process's CPU threads (CPU only; each client gets its own model copy). Used "
        "only with hooks that declare concurrent_clients (none, gradient_noise, prune, weight_dp); "
        "otherwise clients run one after another. Same results up to float rounding.",
    )
    vectorize_clients: Literal["off", "on", "auto"] = Field(
        "off",
        description="Train the sampled clients as one vectorised model (torch.func.vmap over "
        "stacked weights; steps whose batches differ in size run in groups). Exact up to float "
        "rounding; used only where possible (hooks that change nothing but the outgoing update, "
        "no dropout), otherwise clients run one after another. 'auto': on for CUDA devices. "
        "Slower on CPUs (grouped convolutions), meant for GPUs; not yet verified on CUDA "
        "(benchmarks/gpu_check.py checks it): an opt-in there.",
    )

    tune_allocator: bool = Field(
        True,
        description="Set glibc's malloc to keep freed tensor memory for reuse (mallopt; "
        "process-wide, see fl.simulation.allocator): fewer page faults, 10-20 % faster training "
        "and attacks on CPUs, same results; the process's resident memory does not shrink after "
        "a peak. No effect outside glibc.",
    )

    @model_validator(mode="after")
    def _check_sampling(self) -> FederationConfig:
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) cannot exceed clients "
                f"({self.clients}); lower clients_per_round or raise clients"
            )
        return self


class CaptureConfig(BaseModel):
    """Which client steps the honest-but-curious server records for attacks.

    ``rounds`` lists 0-based round indices; in each of them the first ``victims`` clients in
    sampling order are captured. ``pairs`` adds explicit ``(round, client_id)`` pairs (captured
    only if that client is sampled in that round). ``reveal_labels`` models an attacker who knows
    the private labels; by default labels stay in the ground truth only.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rounds: list[int] = Field(
        default_factory=list, description="0-based rounds in which client steps are captured."
    )
    victims: int = Field(
        1, ge=0, description="Clients captured in each listed round, the first in sampling order."
    )
    pairs: list[tuple[int, int]] = Field(
        default_factory=list,
        description="Extra (round, client_id) steps, captured if that client is sampled then.",
    )
    reveal_labels: bool = Field(
        False,
        description="Put the private labels in the observation (an attacker who knows them); "
        "otherwise they stay in the ground truth.",
    )
