"""Label inference from the last layer's update (no ground truth involved)."""

from __future__ import annotations

import torch


def idlg_label(last_weight_grad: torch.Tensor) -> int:
    """iDLG's rule for a single image (Zhao et al. 2020, sec. 3.2): with non-negative inputs to
    the last layer, only the true class's row of dL/dW has a negative sum, so the label is
    ``argmin_i sum_j dL/dW[i, j]``. Works on a FedAvg weight update W_t - W_{t+1} too, which is
    a positive multiple of the gradient for one local step."""
    return int(torch.argmin(last_weight_grad.sum(dim=1)))


def batch_labels(last_weight_grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Labels of a batch from the last layer's weight gradient (or a FedAvg update).

    One image: :func:`idlg_label`. Several: with non-negative inputs to the last layer, the row
    of an absent class is ``sum_b p_bc h_b >= 0`` in every entry, while a present class's row has
    negative entries, so classes are ranked by their row minimum ``min_j dL/dW[i, j]`` (the rule
    of Yin et al. 2021, GradInversion, sec. 3.2). If at least ``batch_size`` rows have a negative
    minimum, the ``batch_size`` most negative are taken (one image each). Otherwise every such
    class gets one image and the remaining slots are shared out in proportion to the magnitude
    of the negative minima, largest first (an LLG-style count estimate, Wainakh et al. 2022).
    Returned sorted, since the order of a batch is not recoverable.
    """
    if batch_size == 1:
        return torch.tensor([idlg_label(last_weight_grad)], dtype=torch.long)
    mins = last_weight_grad.min(dim=1).values
    order = torch.argsort(mins)
    negative = [int(c) for c in order if mins[c] < 0]
    if not negative:
        negative = [int(order[0])]
    if len(negative) >= batch_size:
        chosen = negative[:batch_size]
    else:
        chosen = list(negative)
        mags = torch.stack([-mins[c] for c in negative]).clamp_min(0)
        share = mags / mags.sum() if float(mags.sum()) > 0 else torch.ones_like(mags) / len(mags)
        extra = batch_size - len(chosen)
        counts = torch.floor(share * extra).long()
        remainder = extra - int(counts.sum())
        for i in torch.argsort(share * extra - counts, descending=True)[:remainder]:
            counts[i] += 1
        for c, k in zip(negative, counts.tolist(), strict=True):
            chosen.extend([c] * k)
    return torch.tensor(sorted(chosen), dtype=torch.long)
