"""In-process federated simulation (FedSGD and FedAvg) with observation capture."""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from fl.simulation.aggregate import aggregate
from fl.simulation.allocator import tune_allocator
from fl.simulation.client import ClientResult, run_client
from fl.simulation.config import CaptureConfig, FederationConfig
from fl.simulation.device import resolve_device
from fl.simulation.evaluation import evaluate
from fl.simulation.hooks import ClientContext, ClientHooks
from fl.simulation.observation import MESSAGE_KIND, GroundTruth, Observation
from fl.simulation.vectorized import run_clients_vectorized, vectorization_obstacle

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """Metrics of one round: training loss over sampled clients and test metrics."""

    round: int
    clients: list[int]
    train_loss: float
    metrics: dict[str, float | None]
    seconds: float


@dataclass
class RunResult:
    """The outcome of a federated run."""

    history: list[RoundRecord]
    captures: list[tuple[Observation, GroundTruth]]
    model: nn.Module
    partition_sizes: list[int]
    final_metrics: dict[str, float | None] = field(default_factory=dict)


CHECKPOINT_VERSION = 1
"""Bumped whenever :meth:`Simulator.state_dict` changes shape."""


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through dicts and lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


def _capture_state(obs: Observation, truth: GroundTruth) -> dict[str, Any]:
    """A captured step as plain values (the observation's model is left out: it is the
    architecture with ``global_state`` loaded, rebuilt on restore)."""
    fields = {f.name: getattr(obs, f.name) for f in dataclasses.fields(obs) if f.name != "model"}
    for name in ("global_state", "message", "buffers"):
        fields[name] = _to_cpu(fields[name])
    if fields["labels"] is not None:
        fields["labels"] = fields["labels"].detach().cpu().clone()
    fields["image_shape"] = list(fields["image_shape"])
    fields["mean"], fields["std"] = list(fields["mean"]), list(fields["std"])
    truth_fields = {f.name: getattr(truth, f.name) for f in dataclasses.fields(truth)}
    return {"observation": fields, "truth": truth_fields}


def _seed_int(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def client_context(
    *,
    seed: int,
    rnd: int,
    rounds: int,
    client: int,
    lr: float,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    algorithm: str,
) -> ClientContext:
    """The context of one client step, its generator seeded from (seed, round, client)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_int(seed, 3, rnd, client))
    return ClientContext(
        round=rnd,
        rounds=rounds,
        client=client,
        lr=lr,
        device=device,
        generator=gen,
        mean=mean,
        std=std,
        kind=MESSAGE_KIND[algorithm],
    )


class _SplitInfo(Protocol):
    @property
    def num_classes(self) -> int: ...


class ImageSplit(Protocol):
    """What the simulator reads of a dataset split (:class:`fl.data.ImageData` has it all)."""

    @property
    def labels(self) -> torch.Tensor: ...
    @property
    def mean(self) -> Sequence[float]: ...
    @property
    def std(self) -> Sequence[float]: ...
    @property
    def info(self) -> _SplitInfo: ...
    def float_images(self) -> torch.Tensor: ...


def _image_attr(data: object, name: str) -> Any:
    """``data.name``, or a TypeError naming the split's type and the missing attribute."""
    if not hasattr(data, name):
        raise TypeError(f"dataset object {type(data).__name__} has no attribute {name!r}")
    return getattr(data, name)


class Simulator:
    """Runs a federated training with clients simulated one after another in this process.

    ``train`` and ``test`` are :class:`fl.data.ImageData` splits (or anything with ``images``
    (uint8 N,C,H,W), ``labels``, ``float_images()``, ``mean``, ``std`` and ``info.num_classes``).
    The run is deterministic for a seed on CPU: client sampling, the partition, batch order and
    the hooks' generators derive from it. The model must be built (and seeded) by the caller.
    """

    def __init__(
        self,
        model: nn.Module,
        train: ImageSplit,
        config: FederationConfig,
        *,
        test: ImageSplit | None = None,
        hooks: ClientHooks | None = None,
        capture: CaptureConfig | None = None,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        partition: Sequence[np.ndarray] | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        from fl import data as fl_data

        self.config = config
        if config.tune_allocator:
            tune_allocator()
        self.device = resolve_device(device)
        self.hooks = hooks or ClientHooks()
        self.capture = capture or CaptureConfig()
        self.seed = seed
        self.on_round = on_round
        self.mean = tuple(float(v) for v in _image_attr(train, "mean"))
        self.std = tuple(float(v) for v in _image_attr(train, "std"))
        self.num_classes = int(train.info.num_classes)
        labels = _image_attr(train, "labels")
        assert isinstance(labels, torch.Tensor)
        self.holdout = np.empty(0, dtype=np.int64)
        if partition is None:
            p = config.partition
            kept, self.holdout = fl_data.split_holdout(len(labels), p.holdout, seed)
            parts = fl_data.partition(
                labels.numpy()[kept],
                config.clients,
                scheme=p.scheme,
                alpha=p.alpha,
                shards_per_client=p.shards_per_client,
                max_per_client=p.max_per_client,
                seed=seed,
            )
            partition = [kept[part] for part in parts]  # positions in the whole train split
        if len(partition) != config.clients:
            raise ValueError(f"partition has {len(partition)} parts for {config.clients} clients")
        self.partition = [np.asarray(part, dtype=np.int64) for part in partition]
        self.train_images = train.float_images().to(self.device)
        self.train_labels = labels.to(self.device)
        self.test = test
        if test is not None:
            self.test_images = test.float_images()
            self.test_labels = _image_attr(test, "labels")
        self.global_model = self.hooks.prepare_model(model).to(self.device)
        if config.channels_last:
            self.global_model = self.global_model.to(memory_format=torch.channels_last)
            self.train_images = self.train_images.contiguous(memory_format=torch.channels_last)
        self.client_model = copy.deepcopy(self.global_model)
        self.vectorized = self._use_vectorized()
        self.workers = 1 if self.vectorized else self._worker_count()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.round = 0
        self.history: list[RoundRecord] = []
        self.captures: list[tuple[Observation, GroundTruth]] = []

    # --- how clients run ---------------------------------------------------------------------
    def _use_vectorized(self) -> bool:
        """Whether sampled clients train as one vectorised model (``vectorize_clients``)."""
        mode = self.config.vectorize_clients
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return False
        obstacle = vectorization_obstacle(self.global_model, self.hooks)
        if obstacle is not None:
            log.warning("vectorize_clients=%s: clients run one after another, %s", mode, obstacle)
            return False
        if self.device.type == "cuda":
            log.warning(
                "vectorize_clients=%s on %s: not yet verified against clients run one by one "
                "on a GPU (benchmarks/gpu_check.py checks it); 'off' runs them one by one",
                mode,
                self.device,
            )
        return True

    def _worker_count(self) -> int:
        """How many clients train at the same time (``parallel_clients``, where allowed)."""
        wanted = self.config.parallel_clients
        if wanted == 1:
            return 1
        if self.device.type != "cpu":
            log.warning(
                "parallel_clients=%d ignored on %s (threads share one device queue there; "
                "vectorize_clients is the GPU path)",
                wanted,
                self.device,
            )
            return 1
        if not type(self.hooks).concurrent_clients:
            log.warning(
                "parallel_clients=%d ignored: the hooks %r keep shared state or a global RNG "
                "(concurrent_clients is false), so clients run one after another",
                wanted,
                type(self.hooks).__name__,
            )
            return 1
        return wanted

    def _worker_model(self) -> nn.Module:
        """This thread's own copy of the model (created on first use)."""
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = copy.deepcopy(self.global_model)
        return model

    def _train_clients(
        self, rnd: int, clients: list[int], global_state: dict[str, torch.Tensor]
    ) -> list[tuple[ClientResult, torch.Tensor]]:
        """Every sampled client's local work, in sampling order."""
        if self.vectorized:
            return self._train_vectorized(rnd, clients, global_state)
        if self.workers == 1:
            return [self._client_step(rnd, c, global_state, self.client_model) for c in clients]
        if self._pool is None:
            threads = max(1, torch.get_num_threads() // self.workers)
            self._pool = ThreadPoolExecutor(
                self.workers,
                thread_name_prefix="fl-client",
                initializer=torch.set_num_threads,
                initargs=(threads,),
            )
        futures = [
            self._pool.submit(
                lambda c: self._client_step(rnd, c, global_state, self._worker_model()), c
            )
            for c in clients
        ]
        return [f.result() for f in futures]

    def _train_vectorized(
        self, rnd: int, clients: list[int], global_state: dict[str, torch.Tensor]
    ) -> list[tuple[ClientResult, torch.Tensor]]:
        idxs = [torch.as_tensor(self.partition[c], device=self.device) for c in clients]
        results = run_clients_vectorized(
            self.global_model,
            global_state,
            [self.train_images[i] for i in idxs],
            [self.train_labels[i] for i in idxs],
            contexts=[self._context(rnd, c) for c in clients],
            rngs=[self._batch_order(rnd, c) for c in clients],
            **self._local_training(),
        )
        return list(zip(results, idxs, strict=True))

    def close(self) -> None:
        """Stop the client threads (``parallel_clients``); the simulator stays usable."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- round mechanics -------------------------------------------------------------------
    def sample_clients(self, rnd: int) -> list[int]:
        """The clients sampled in round ``rnd`` (deterministic for the seed)."""
        rng = np.random.default_rng(_seed_int(self.seed, 1, rnd))
        chosen = rng.choice(self.config.clients, self.config.clients_per_round, replace=False)
        return [int(c) for c in chosen]

    def _captured(self, rnd: int, clients: list[int]) -> set[int]:
        out: set[int] = set()
        if rnd in self.capture.rounds:
            out.update(clients[: self.capture.victims])
        out.update(c for r, c in self.capture.pairs if r == rnd and c in clients)
        return out

    def _context(self, rnd: int, client: int) -> ClientContext:
        return client_context(
            seed=self.seed,
            rnd=rnd,
            rounds=self.config.rounds,
            client=client,
            lr=self.config.lr,
            device=self.device,
            mean=self.mean,
            std=self.std,
            algorithm=self.config.algorithm,
        )

    def _local_training(self) -> dict[str, Any]:
        """The local-training settings every client shares, one by one or vectorised."""
        cfg = self.config
        return {
            "algorithm": cfg.algorithm,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "mean": self.mean,
            "std": self.std,
            "hooks": self.hooks,
            "local_epochs": cfg.local_epochs,
            "local_steps": cfg.local_steps,
        }

    def _batch_order(self, rnd: int, client: int) -> np.random.Generator:
        """The generator of a client's batch order in a round (deterministic for the seed)."""
        return np.random.default_rng(_seed_int(self.seed, 2, rnd, client))

    def _client_step(
        self, rnd: int, client: int, global_state: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[ClientResult, torch.Tensor]:
        model.load_state_dict(global_state)
        idx = torch.as_tensor(self.partition[client], device=self.device)
        result = run_client(
            model,
            self.train_images[idx],
            self.train_labels[idx],
            ctx=self._context(rnd, client),
            rng=self._batch_order(rnd, client),
            **self._local_training(),
        )
        return result, idx

    @torch.no_grad()
    def _aggregate(self, results: list[ClientResult]) -> None:
        """Apply the clients' weighted mean (:func:`~fl.simulation.aggregate.aggregate`, weights
        = examples used) to the global model: FedSGD steps along the mean gradient, FedAvg moves
        towards the mean weights, both at the server's learning rate; buffers take the mean (an
        integer counter the largest)."""
        cfg = self.config
        weights = [r.num_examples for r in results]
        messages = aggregate([r.message for r in results], weights)
        for name, p in self.global_model.named_parameters():
            if name not in messages:
                continue
            if cfg.algorithm == "fedsgd":
                p.sub_(messages[name], alpha=cfg.lr * cfg.server_lr)
            else:
                p.add_(messages[name] - p, alpha=cfg.server_lr)
        buffers = aggregate([r.buffers for r in results], weights)
        for name, b in self.global_model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])

    def run_round(self) -> RoundRecord:
        """Run the next round: sample, train clients, capture, aggregate, evaluate."""
        rnd = self.round
        t0 = time.perf_counter()
        clients = self.sample_clients(rnd)
        captured = self._captured(rnd, clients)
        global_state = {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}
        results: list[ClientResult] = []
        for client, (result, idx) in zip(
            clients, self._train_clients(rnd, clients, global_state), strict=True
        ):
            results.append(result)
            if client in captured:
                self.captures.append(self._observe(rnd, client, result, idx, global_state))
        self._aggregate(results)
        weights = np.array([r.num_examples for r in results], dtype=np.float64)
        train_loss = float(np.average([r.loss for r in results], weights=weights))
        metrics: dict[str, float | None] = {}
        if self.test is not None:
            metrics = evaluate(
                self.global_model,
                self.test_images,
                self.test_labels,
                mean=self.mean,
                std=self.std,
                num_classes=self.num_classes,
                batch_size=self.config.eval_batch_size,
            )
        record = RoundRecord(rnd, clients, train_loss, metrics, time.perf_counter() - t0)
        self.history.append(record)
        self.round += 1
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _observe(
        self,
        rnd: int,
        client: int,
        result: ClientResult,
        idx: torch.Tensor,
        global_state: dict[str, torch.Tensor],
    ) -> tuple[Observation, GroundTruth]:
        used = idx[torch.as_tensor(result.used, device=idx.device)]
        return build_observation(
            self.global_model,
            global_state,
            result,
            images=self.train_images[used],
            labels=self.train_labels[used],
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
            reveal_labels=self.capture.reveal_labels,
            rnd=rnd,
            client=client,
        )

    # --- round-level checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run after the rounds done so far, on the CPU.

        Holds the global model, the round counter, the history, the captured observations
        (without their model copies, rebuilt on load) and ground truths, the hooks' state and
        torch's global random state. Only tensors and plain values, so it loads with
        ``torch.load(..., weights_only=True)``. A run restored with :meth:`load_state_dict` on a
        simulator built with the same arguments continues exactly as the uninterrupted run.
        """
        return {
            "version": CHECKPOINT_VERSION,
            "round": self.round,
            "model": _to_cpu(self.global_model.state_dict()),
            "history": [dataclasses.asdict(r) for r in self.history],
            "captures": [_capture_state(o, t) for o, t in self.captures],
            "hooks": self.hooks.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (see there); tensors move to this simulator's device."""
        version = state.get("version")
        if version != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint version {version!r} is not {CHECKPOINT_VERSION}; it was written by "
                "another version of Obscura and cannot be resumed"
            )
        if int(state["round"]) > self.config.rounds:
            raise ValueError(
                f"checkpoint is at round {state['round']} but the run has {self.config.rounds}"
            )
        dev = self.device
        self.global_model.load_state_dict(state["model"])
        self.round = int(state["round"])
        self.history = [RoundRecord(**r) for r in state["history"]]
        self.captures = []
        for entry in state["captures"]:
            obs = entry["observation"]
            global_state = _to(obs["global_state"], dev)
            model = server_view(self.global_model, global_state)
            labels = obs["labels"]
            self.captures.append(
                (
                    Observation(
                        **{
                            **obs,
                            "model": model,
                            "global_state": global_state,
                            "message": _to(obs["message"], dev),
                            "buffers": _to(obs["buffers"], dev),
                            "labels": None if labels is None else labels.to(dev),
                            "image_shape": tuple(obs["image_shape"]),
                            "mean": tuple(obs["mean"]),
                            "std": tuple(obs["std"]),
                        }
                    ),
                    GroundTruth(**entry["truth"]),
                )
            )
        self.hooks.load_state_dict(state["hooks"])  # each hook moves its tensors on use
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def run(self) -> RunResult:
        """Run all remaining rounds and return the history, captures and final model."""
        try:
            while self.round < self.config.rounds:
                self.run_round()
        finally:
            self.close()
        final = dict(self.history[-1].metrics) if self.history else {}
        return RunResult(
            history=self.history,
            captures=self.captures,
            model=self.global_model,
            partition_sizes=[len(p) for p in self.partition],
            final_metrics=final,
        )


def server_view(model: nn.Module, global_state: dict[str, torch.Tensor]) -> nn.Module:
    """The server's private copy of the architecture with ``global_state`` loaded, in the
    default memory format and training mode, every parameter differentiable (for attacks)."""
    seen = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    seen.load_state_dict(global_state)
    seen.train()
    for p in seen.parameters():
        p.requires_grad_(True)
    return seen


def build_observation(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    result: ClientResult,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    lr: float,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    reveal_labels: bool,
    rnd: int,
    client: int,
) -> tuple[Observation, GroundTruth]:
    """Split a client step into the server's :class:`Observation` and the :class:`GroundTruth`.

    The observation's model is a fresh copy of the architecture with ``global_state`` loaded;
    every tensor in it is a detached copy, so nothing the attack does can touch the run.
    """
    obs = Observation(
        model=server_view(model, global_state),
        global_state={k: v.detach().contiguous().clone() for k, v in global_state.items()},
        kind=result.kind,
        message={k: v.detach().contiguous().clone() for k, v in result.message.items()},
        buffers={k: v.detach().contiguous().clone() for k, v in result.buffers.items()},
        num_examples=result.num_examples,
        image_shape=cast(tuple[int, int, int], tuple(images.shape[1:])),  # (B, C, H, W) images
        num_classes=num_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        batch_size=min(batch_size, result.num_examples),
        local_steps=result.local_steps,
        lr=lr,
        labels=labels.detach().clone() if reveal_labels else None,
        round=rnd,
        client=client,
    )
    truth = GroundTruth(
        images=images.detach().cpu().clone(),
        labels=labels.detach().cpu().clone(),
        trained_images=result.trained_images,
        round=rnd,
        client=client,
    )
    return obs, truth


def observe_client_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    algorithm: str = "fedsgd",
    lr: float = 0.1,
    local_steps: int = 1,
    batch_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    hooks: ClientHooks | None = None,
    reveal_labels: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[Observation, GroundTruth]:
    """Run one client step on ``images`` (B, C, H, W in [0, 1]) and ``labels`` outside a full
    simulation, returning what the server observes and the ground truth.

    ``fedsgd``: the message is the gradient of the whole batch. ``fedavg``: ``local_steps`` SGD
    steps with ``lr`` over mini-batches of ``batch_size`` (default: the whole batch) taken in
    order, and the message is the new weights. ``mean``/``std`` default to no normalisation.
    The model is not modified; the run happens on a copy on ``device`` (default: the model's).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError("labels must be a 1-D tensor with one label per image")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must be in [0, 1]; pass mean= and std= for normalisation")
    channels = images.shape[1]
    mean_t = tuple(mean) if mean is not None else (0.0,) * channels
    std_t = tuple(std) if std is not None else (1.0,) * channels
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    hooks = hooks or ClientHooks()
    work = hooks.prepare_model(copy.deepcopy(model)).to(dev)
    global_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    num_classes = int(getattr(work, "num_classes", 0) or _infer_classes(work, images.to(dev)))
    ctx = client_context(
        seed=seed,
        rnd=0,
        rounds=1,
        client=0,
        lr=lr,
        device=dev,
        mean=mean_t,
        std=std_t,
        algorithm=algorithm,
    )
    images, labels = images.to(dev), labels.to(dev)
    result = run_client(
        work,
        images,
        labels,
        algorithm=algorithm,
        lr=lr,
        batch_size=batch_size or images.shape[0],
        mean=mean_t,
        std=std_t,
        hooks=hooks,
        ctx=ctx,
        local_steps=local_steps,
        rng=None,
    )
    used = torch.as_tensor(result.used, device=dev)
    return build_observation(
        work,
        global_state,
        result,
        images=images[used],
        labels=labels[used],
        batch_size=batch_size or images.shape[0],
        lr=lr,
        mean=mean_t,
        std=std_t,
        num_classes=num_classes,
        reveal_labels=reveal_labels,
        rnd=0,
        client=0,
    )


@torch.no_grad()
def _infer_classes(model: nn.Module, images: torch.Tensor) -> int:
    was = model.training
    model.eval()
    k = int(model(images[:1]).shape[1])
    model.train(was)
    return k
