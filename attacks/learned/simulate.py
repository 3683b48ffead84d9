"""Simulated clients on public data: the training examples of a learned attack.

At the attacked round's global weights the attacker runs the client's own algorithm
(:func:`fl.simulation.client.run_client`: FedSGD's gradient or FedAvg's local SGD, with the
known batch size, learning rate and local steps) on public batches, with the trial's defense's
hooks applied exactly as a client applies them (Wu et al. 2023, "adaptive" attack). The
defense's private randomness and state are the attacker's own: a fresh instance, its own seed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from attacks.public import PublicData
from fl.simulation.client import run_client
from fl.simulation.config import MAX_CLIENTS
from fl.simulation.hooks import ClientContext, ClientHooks
from fl.simulation.observation import ALGORITHM_OF, Observation

SURROGATE_CLIENT = 10 * MAX_CLIENTS
"""The client id of the attacker's simulated clients: no real client has it (ids are below
``MAX_CLIENTS``), and defenses that seed per client accept it (non-negative)."""


@dataclass(frozen=True)
class SimulatedStep:
    """One simulated client step: its update (the gradient, or ``W_t - W_{t+1}`` for FedAvg,
    per parameter) and the public images it used (B, C, H, W) in [0, 1]."""

    update: dict[str, torch.Tensor]
    images: torch.Tensor


def draw_batch(
    public: PublicData, size: int, generator: torch.Generator, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` distinct public images (and labels), each mirrored with probability 1/2 when
    ``flip``."""
    if size > len(public):
        raise ValueError(
            f"a simulated batch needs {size} distinct public images but the attacker holds "
            f"{len(public)}; raise public_data.count"
        )
    index = torch.randperm(len(public), generator=generator)[:size]
    images, labels = public.images[index], public.labels[index]
    if flip:
        mirror = torch.rand(size, generator=generator) < 0.5
        images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)
    return images, labels


class ClientSimulator:
    """Runs the observed client's step on public batches at the observation's global weights.

    Args:
        obs: the (restricted) observation: architecture, global weights, message kind, and the
            batch size, learning rate and local steps as far as they are granted.
        hooks: the defense's hooks (a fresh instance: the attacker's own private state); the
            model is the architecture the server sent, so ``prepare_model`` is not run again.
        rounds: the federation's number of rounds (public; some defenses schedule by it).
    """

    def __init__(self, obs: Observation, hooks: ClientHooks, rounds: int | None = None) -> None:
        self.obs = obs
        self.hooks = hooks
        self.rounds = rounds if rounds is not None else obs.round + 1
        self.model: nn.Module = copy.deepcopy(obs.model)
        self.state = {k: v.detach().clone() for k, v in obs.global_state.items()}
        self.algorithm = ALGORITHM_OF[obs.kind]
        self.size = obs.num_examples

    def _context(self, seed: int) -> ClientContext:
        generator = torch.Generator(device=self.obs.device)
        generator.manual_seed(seed)
        return ClientContext(
            round=self.obs.round,
            rounds=self.rounds,
            client=SURROGATE_CLIENT,
            lr=float(self.obs.lr or 0.0),
            device=self.obs.device,
            generator=generator,
            mean=self.obs.mean,
            std=self.obs.std,
            kind=self.obs.kind,
        )

    def step(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> SimulatedStep:
        """The update a client would send for ``images`` (in [0, 1]) and ``labels``."""
        obs = self.obs
        self.model.load_state_dict(self.state)
        dev = obs.device
        result = run_client(
            self.model,
            images.to(dev),
            labels.to(dev),
            algorithm=self.algorithm,
            lr=float(obs.lr or 0.0),
            batch_size=obs.batch_size or images.shape[0],
            mean=obs.mean,
            std=obs.std,
            hooks=self.hooks,
            ctx=self._context(seed),
            local_steps=obs.local_steps if obs.kind == "weights" else None,
            rng=None,
        )
        if obs.kind == "gradient":
            update = result.message
        else:
            update = {k: self.state[k] - w for k, w in result.message.items()}
        used = torch.as_tensor(result.used)
        return SimulatedStep(update, images[used].cpu())

    def steps(
        self,
        public: PublicData,
        count: int,
        generator: torch.Generator,
        *,
        flip: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[SimulatedStep]:
        """``count`` simulated steps on public batches drawn by ``generator``."""
        for i in range(count):
            images, labels = draw_batch(public, self.size, generator, flip)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            yield self.step(images, labels, seed)
            if progress is not None:
                progress(i + 1)
