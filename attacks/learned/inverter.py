"""The inversion network of a learned attack and its training (Wu, Chen, Guo, Weinberger,
"Learning to Invert", 2023: an MLP from the update to the batch, trained on simulated clients).

The MLP predicts a batch of ``B`` images in [0, 1] as a sigmoid around the public images' mean
(so an untrained or uninformed inverter outputs the average image). For ``B > 1`` the loss is a
set loss: each predicted batch is matched to its true batch by one Hungarian assignment on the
pixel MSE before the loss (the batch's order is not in the update).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from attacks.learned.params import InverterParams


class Inverter(nn.Module):
    """MLP ``code -> B images``: ``depth`` hidden ReLU layers of ``hidden`` units, then
    ``sigmoid(logit(prior) + out)`` with ``prior`` the public mean image."""

    def __init__(
        self,
        dim: int,
        shape: tuple[int, int, int, int],
        hidden: int,
        depth: int,
        prior: torch.Tensor,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        head = nn.Linear(width, int(np.prod(shape)))
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.body = nn.Sequential(*layers, head)
        self.shape = shape
        base = torch.logit(prior.clamp(0.01, 0.99)).expand(shape).clone()
        self.register_buffer("base", base)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.body(codes).view(-1, *self.shape)
        return torch.sigmoid(self.base + out)


def set_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean pixel MSE of predicted batches ``(N, B, C, H, W)`` against true ones, each batch's
    images paired by one Hungarian assignment (order-free; plain MSE for ``B = 1``)."""
    if pred.shape[1] == 1:
        return ((pred - true) ** 2).mean()
    with torch.no_grad():
        cost = ((pred[:, :, None] - true[:, None]) ** 2).flatten(3).mean(-1).cpu().numpy()
    order = torch.stack([torch.as_tensor(linear_sum_assignment(c)[1]) for c in cost]).to(
        true.device
    )
    matched = torch.gather(true, 1, order.view(*order.shape, 1, 1, 1).expand_as(true))
    return ((pred - matched) ** 2).mean()


@dataclass
class Training:
    """A trained inverter and how its training went (losses per epoch, the epoch kept)."""

    inverter: Inverter
    train_loss: list[float]
    validation_loss: list[float]
    best_epoch: int


def train_inverter(
    codes: torch.Tensor,
    images: torch.Tensor,
    params: InverterParams,
    generator: torch.Generator,
) -> Training:
    """Fit an :class:`Inverter` mapping ``codes`` (N, d) to ``images`` (N, B, C, H, W) in
    [0, 1] with Adam, keeping the epoch of the lowest loss on a held-out share of the examples
    (``params.validation``; the last epoch without one). Seeded by ``generator`` (torch's
    global RNG initialises the layers: seed it too)."""
    n = codes.shape[0]
    order = torch.randperm(n, generator=generator)
    held = round(params.validation * n) if n >= 20 else 0
    val, train = order[:held], order[held:]
    prior = images[train].mean(dim=(0, 1))
    b, c, h, w = images.shape[1:]
    net = Inverter(codes.shape[1], (b, c, h, w), params.hidden, params.depth, prior)
    optimiser = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    best_state, best_loss, best_epoch = copy.deepcopy(net.state_dict()), float("inf"), 0
    train_losses: list[float] = []
    val_losses: list[float] = []
    for epoch in range(params.epochs):
        net.train()
        losses = []
        shuffled = train[torch.randperm(train.numel(), generator=generator)]
        for chunk in torch.split(shuffled, params.minibatch):
            loss = set_loss(net(codes[chunk]), images[chunk])
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # = Tensor.backward(), which has no hints
            optimiser.step()
            losses.append(float(loss.detach()))
        train_losses.append(float(np.mean(losses)))
        if held:
            with torch.no_grad():
                net.eval()
                val_losses.append(float(set_loss(net(codes[val]), images[val])))
            if val_losses[-1] < best_loss:
                best_state, best_loss, best_epoch = (
                    copy.deepcopy(net.state_dict()),
                    val_losses[-1],
                    epoch,
                )
    if held:
        net.load_state_dict(best_state)
    else:
        best_epoch = params.epochs - 1
    net.eval()
    return Training(net, train_losses, val_losses, best_epoch)
