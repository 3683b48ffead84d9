"""Label inference from the last layer's update (no ground truth involved).

With softmax cross-entropy the last layer's bias gradient of a batch of B images is
``db_c = (1/B) sum_n (p_nc - y_nc)``, so the label counts are ``n_c = B (pbar_c - db_c)`` where
``pbar`` is the batch's mean softmax output. The rules here differ in how they estimate
``pbar``:

* ``idlg`` -- one image (Zhao et al. 2020): the only row of dL/dW with a negative sum. Exact.
* ``yin_llg`` -- :func:`batch_labels`: classes ranked by their weight-gradient row minimum (Yin
  et al. 2021), extra images shared out by magnitude (LLG-style, Wainakh et al. 2022).
* ``bias_corrected`` -- Geng et al. 2021 ("Towards general deep leakage in FL"): ``pbar`` is the
  model's mean prediction on the attacker's own dummy batches (deterministic seed). Without a
  last-layer bias the same count rule runs on the weight gradient summed over features, divided
  by the dummy batches' mean feature sum (Geng's weight-based estimate).
* ``ilrg`` -- instance-wise label restoration (Wang et al., ICLR 2023, mankasto/iLRG): the mean
  embedding of the images behind class c's row is ``dW_c / db_c``; the classifier maps it to the
  class's mean posterior ``p_c``, and the counts solve ``B db = sum_j k_j (p_j - e_j)``,
  ``sum_j k_j = B`` in least squares.
* ``bn_matched`` -- ``bias_corrected`` with ``pbar`` from one dummy batch first optimised on
  DeepInversion's BatchNorm distance (Yin et al., CVPR 2020) to the statistics the returned
  buffers reveal (:func:`batchnorm_matched_statistics`); ``bias_corrected`` without buffers.
* ``running_matched`` -- the same with the dummies fitted to the running statistics of the
  model the server sent (:func:`attacks.priors.bn_stats.running_targets`), which needs no returned
  buffers; ``guarded_ilrg`` while no batch has been tracked.
* ``feature_posterior`` -- the iLRG embedding of an absent class's row is an exact convex
  combination of the batch's features (every per-image weight is ``p_nc > 0``); absent classes
  have ``pbar_c = db_c``, and the rest of the mass goes to the present classes as the model's
  posterior at those embeddings weights them; iterated from ``guarded_ilrg``'s counts
  (:func:`feature_posterior_counts`).

:func:`infer_labels` picks a rule by name; ``auto`` (:func:`auto_rule`) uses iDLG for one image
and, for a batch's gradient or one-step FedAvg update with known ``lr``: ``bn_matched`` when
the BatchNorm buffers are granted, ``feature_posterior`` for models without BatchNorm and
for BatchNorm models without buffers ``running_matched`` once the sent model has tracked
batches, else ``guarded_ilrg`` (iLRG whose untrustworthy posteriors, :func:`mixed_rows`, are
replaced by the dummy estimate); ``running_matched`` for a hidden lr or step count when it
applies; ``yin_llg`` otherwise. Measured (benchmarks/label_inference.py, 20 batches of 8
RetinaMNIST images at 32 px, multiset accuracy): after 5 FedAvg rounds the BatchNorm ConvNet
gets 0.99 with ``bn_matched`` and 0.96 with ``running_matched`` without buffers (0.81
``guarded_ilrg``, 0.76 ``feature_posterior``: a trained model classifies some images confidently
and right, which leaves no trace in the gradient) and the LeNet 0.975 with
``feature_posterior`` (0.875 ``guarded_ilrg``); untrained models 0.975-1.0 with each default.

FedAvg weight updates ``W_t - W_{t+1}`` are ``lr`` times the sum of the local steps' gradients:
with ``lr`` and ``local_steps`` known the update is divided by ``lr * local_steps``. For several
steps this gives the trajectory-averaged gradient, whose counts are wrong once the model has
fitted the batch (within one or two steps on batches of 8), hence ``yin_llg`` there. Without
them the unknown scale is fitted (:func:`fit_scale`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.priors.bn_stats import (
    BatchNormRecorder,
    BatchNormTarget,
    batchnorm_layers,
    batchnorm_targets,
    has_running_statistics,
    running_targets,
)
from fl.simulation.observation import Observation

DUMMY_BATCHES = 4
"""Dummy batches the ``bias_corrected`` rule averages the model's predictions over."""


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


@dataclass
class LastLayer:
    """The last layer's observed update, brought to the scale of one batch-mean gradient.

    ``weight`` (C, F) and ``bias`` (C,) or None. ``scaled`` is False for a FedAvg update whose
    learning rate or step count is hidden: the tensors are then a positive multiple of the
    gradient. ``layer`` is the model's final ``nn.Linear`` (with the global weights).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scaled: bool
    layer: nn.Linear
    batch: int


def last_layer_of(model: nn.Module) -> nn.Linear:
    """The model's final linear layer: ``SplitModel.last_layer()`` or its last ``nn.Linear``.

    Raises:
        ValueError: if the model has no ``nn.Linear``.
    """
    find = getattr(model, "last_layer", None)  # SplitModel's, or a model's of the same name
    last: nn.Linear | None = None if find is None else find()
    if last is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("label inference needs a final nn.Linear layer")
        last = linears[-1]
    return last


def _parameter_name(model: nn.Module, tensor: torch.Tensor | None) -> str | None:
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    return None


def last_layer_update(obs: Observation) -> LastLayer:
    """The last layer's gradient (FedSGD) or update / (lr * local_steps) (FedAvg), per batch mean.

    Raises:
        ValueError: if the message lacks the last layer's weight.
    """
    layer = last_layer_of(obs.model)
    w_name = _parameter_name(obs.model, layer.weight)
    b_name = _parameter_name(obs.model, layer.bias)
    if w_name is None or w_name not in obs.message:
        raise ValueError("the message does not carry the last layer's weight")
    full = dict(obs.message) if obs.kind == "gradient" else obs.weight_update()
    scale, scaled = 1.0, True
    if obs.kind == "weights":
        if obs.lr is not None and obs.local_steps is not None:
            scale = float(obs.lr) * int(obs.local_steps)
        else:
            scaled = False
    weight = full[w_name].detach().cpu().double() / scale
    bias = full[b_name].detach().cpu().double() / scale if b_name in full else None
    return LastLayer(weight, bias, scaled, layer, obs.num_examples)


def round_counts(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts >= 0 summing to ``total`` nearest to real-valued ``counts``: negatives
    clipped to 0, then floors plus the largest remainders (Hamilton's method).

    Example: ``round_counts(torch.tensor([2.6, 1.3, -0.2, 4.1]), 8) -> [3, 1, 0, 4]``.
    """
    c = counts.double().clamp_min(0)
    if float(c.sum()) <= 0:
        c = torch.ones_like(c)
    c = c * (total / float(c.sum()))
    out = torch.floor(c).long()
    remainder = total - int(out.sum())
    out[torch.argsort(c - out, descending=True)[:remainder]] += 1
    return out


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """Sorted labels from per-class counts: ``[2, 0, 1] -> [0, 0, 2]``."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.long().cpu())


def dummy_images(
    count: int, shape: tuple[int, int, int], generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """Smooth random images in [0, 1]: uniform noise on a grid of 1/8 the side, upsampled
    bicubically. Their predictions match real photographs' better than pixel noise does
    (measured in benchmarks/label_inference.py's development: mean-posterior L1 error 0.12-0.16
    against 0.19-0.21 on the BatchNorm ConvNet)."""
    c, h, w = shape
    low = torch.rand((count, c, max(2, h // 8), max(2, w // 8)), generator=generator, dtype=dtype)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def dummy_statistics(
    obs: Observation, batches: int = DUMMY_BATCHES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's mean softmax output (C,) and mean last-layer input sum over features, on
    ``batches`` dummy batches (:func:`dummy_images`) of the client's batch size, normalised as
    the model expects, drawn from a generator seeded with ``seed``. The model runs in training
    mode (as the client ran it: BatchNorm on batch statistics) on a copy, so the observation's
    running statistics are untouched."""
    model = copy.deepcopy(obs.model).train()
    layer = last_layer_of(model)
    p = next(iter(layer.parameters()))
    g = torch.Generator().manual_seed(seed)
    size = max(int(obs.batch_size or obs.num_examples), 2)
    mean = torch.tensor(obs.mean, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    std = torch.tensor(obs.std, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    probs = []
    try:
        with torch.no_grad():
            for _ in range(batches):
                x = dummy_images(size, obs.image_shape, g, p.dtype).to(p.device)
                probs.append(torch.softmax(model((x - mean) / std).double(), dim=-1))
    finally:
        handle.remove()
    feature = torch.cat(feats).double()
    return torch.cat(probs).mean(dim=0).cpu(), feature.sum(dim=1).mean().cpu()


def bias_corrected_counts(
    last: LastLayer, mean_probs: torch.Tensor, feature_sum: torch.Tensor
) -> torch.Tensor:
    """Geng et al.'s count rule ``n_c = B (pbar_c - db_c)`` (real-valued). Without a bias,
    ``db_c`` is estimated as ``sum_j dW_cj / mean feature sum`` (their weight-based variant)."""
    if last.bias is not None:
        grad_b = last.bias
    else:
        grad_b = last.weight.sum(dim=1) / feature_sum.clamp_min(1e-12)
    return last.batch * (mean_probs.to(grad_b) - grad_b)


def class_posteriors(last: LastLayer) -> torch.Tensor:
    """iLRG's posteriors (C, C): row c is the softmax of the classifier at ``dW_c / db_c``, the
    gradient-weighted mean embedding of the batch as seen by class c's row (Wang et al. 2023,
    sec. 4.1). Rows with a vanishing bias gradient fall back to the mean posterior of the rest."""
    assert last.bias is not None
    b = last.bias
    tiny = b.abs() < 1e-12 * max(float(b.abs().max()), 1e-30)
    denom = torch.where(tiny, torch.ones_like(b), b)
    emb = last.weight / denom[:, None]
    w = last.layer.weight.detach().cpu().double()
    bias = last.layer.bias.detach().cpu().double() if last.layer.bias is not None else 0.0
    probs = torch.softmax(emb @ w.T + bias, dim=-1)
    if bool(tiny.any()) and not bool(tiny.all()):
        probs[tiny] = probs[~tiny].mean(dim=0)
    return probs


def ilrg_counts(last: LastLayer, probs: torch.Tensor) -> torch.Tensor:
    """iLRG's counts (real-valued): least squares on ``[1 ... 1; P^T - I] k = [B; B db]``
    with the class posteriors ``P`` of :func:`class_posteriors` (Moore-Penrose, as the
    reference's ``iLRG``)."""
    assert last.bias is not None
    c, dt = probs.shape[0], probs.dtype
    coefs = torch.cat([torch.ones(1, c, dtype=dt), probs.T - torch.eye(c, dtype=dt)])
    values = torch.cat([torch.tensor([float(last.batch)], dtype=dt), last.batch * last.bias])
    pinv: torch.Tensor = torch.linalg.pinv(coefs)
    return pinv @ values


MIXED_ROW = 0.01
"""A class row is "mixed" when more than this share of its weight-gradient mass has the sign
opposite to its bias gradient (see :func:`mixed_rows`)."""


def mixed_rows(last: LastLayer, threshold: float = MIXED_ROW) -> torch.Tensor:
    """Rows (C,) whose images pull in both directions. With non-negative last-layer inputs (ReLU,
    sigmoid, max-pool) a row whose per-image weights ``p_nc - y_nc`` share one sign has every
    entry of that sign, and iLRG's embedding ``dW_c / db_c`` is a convex mean. Rows with both
    signs (a present class the model already predicts for other images) make ``db_c`` a small
    difference and the embedding an extrapolation: their posteriors are not trusted."""
    assert last.bias is not None
    w = last.weight * torch.sign(last.bias)[:, None]
    pos, neg = w.clamp_min(0).sum(dim=1), (-w).clamp_min(0).sum(dim=1)
    return neg > threshold * (pos + neg).clamp_min(1e-300)


def fit_scale(bias_update: torch.Tensor, mean_probs: torch.Tensor) -> float:
    """The unknown factor between a FedAvg update and the batch-mean gradient (``1 / (lr *
    steps)``), without the learning rate: the largest factor that keeps every count of the
    bias-corrected rule ``B (pbar_c - s u_c)`` non-negative, which an absent class meets with
    equality (``u_c = pbar_c / s``). Counts sum to B for any factor (the update's bias sums to
    0), so only this bound fixes it; errors in ``pbar`` become errors in the scale."""
    u = bias_update
    ratios = mean_probs.to(u)[u > 0] / u[u > 0]
    return float(ratios.min()) if ratios.numel() else 1.0


def _rescaled(last: LastLayer, mean_probs: torch.Tensor, feature_sum: torch.Tensor) -> LastLayer:
    """``last`` at the scale of one batch-mean gradient (a fitted scale when it is unknown)."""
    if last.scaled:
        return last
    if last.bias is not None:
        s = fit_scale(last.bias, mean_probs)
    else:
        s = fit_scale(last.weight.sum(dim=1) / feature_sum.clamp_min(1e-12), mean_probs)
    bias = last.bias * s if last.bias is not None else None
    return LastLayer(last.weight * s, bias, True, last.layer, last.batch)


def _counts_bias_corrected(obs: Observation, last: LastLayer) -> torch.Tensor:
    pbar, feature_sum = dummy_statistics(obs)
    return bias_corrected_counts(_rescaled(last, pbar, feature_sum), pbar, feature_sum)


def _counts_ilrg(obs: Observation, last: LastLayer) -> torch.Tensor:
    if last.bias is None:
        return _counts_bias_corrected(obs, last)
    pbar, feature_sum = dummy_statistics(obs)
    return ilrg_counts(_rescaled(last, pbar, feature_sum), class_posteriors(last))


def _counts_guarded_ilrg(obs: Observation, last: LastLayer) -> torch.Tensor:
    if last.bias is None:
        return _counts_bias_corrected(obs, last)
    pbar, feature_sum = dummy_statistics(obs)
    probs = class_posteriors(last)
    probs[mixed_rows(last)] = pbar.to(probs)
    return ilrg_counts(_rescaled(last, pbar, feature_sum), probs)


BN_STEPS = 20
"""Adam steps of :func:`batchnorm_matched_statistics` (DeepInversion's BN distance alone)."""
BN_LR = 0.05
"""Adam step size of :func:`batchnorm_matched_statistics`, in normalised pixel units."""


def has_batchnorm_buffers(obs: Observation) -> bool:
    """Whether the model has tracked BatchNorm layers whose returned buffers the observation
    carries (``knows_bn_stats``) and, for FedAvg, whose number of local steps is known."""
    layers = batchnorm_layers(obs.model)
    if not layers or (obs.kind == "weights" and obs.local_steps is None):
        return False
    return all(f"{n}.running_mean" in obs.buffers for n, _ in layers)


def batchnorm_matched_statistics(
    obs: Observation,
    steps: int = BN_STEPS,
    seed: int = 0,
    targets: dict[str, BatchNormTarget] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`dummy_statistics`, on one dummy batch of the client's batch size optimised
    first for ``steps`` Adam steps on DeepInversion's BatchNorm distance alone (Yin et al.,
    CVPR 2020, eq. 7; :class:`attacks.priors.bn_stats.BatchNormRecorder`) to the statistics the
    returned buffers reveal (:func:`attacks.priors.bn_stats.batchnorm_targets`). A batch with the
    real batch's feature statistics gets the model's predictions on it: on the BatchNorm ConvNet
    after 5 FedAvg rounds the mean-posterior L1 error falls from 0.45 (smooth dummies) to 0.07.

    Args:
        obs: a client step with BatchNorm buffers (:func:`has_batchnorm_buffers`).
        steps: Adam steps; seed: the dummies' generator seed.
        targets: statistics to match instead of the revealed ones (e.g.
            :func:`attacks.priors.bn_stats.running_targets`).

    Raises:
        ValueError: the buffers are missing (from
            :func:`attacks.priors.bn_stats.batchnorm_targets`).

    Example:
        >>> pbar, feature_sum = batchnorm_matched_statistics(obs)  # doctest: +SKIP
    """
    targets = batchnorm_targets(obs) if targets is None else targets
    model = copy.deepcopy(obs.model).train()
    for param in model.parameters():
        param.requires_grad_(False)
    layer = last_layer_of(model)
    p = layer.weight
    forwards = max(len(t.weights) for t in targets.values())
    size = max(int(obs.batch_size or obs.num_examples), 2)
    mean = torch.tensor(obs.mean, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    std = torch.tensor(obs.std, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    x0 = dummy_images(size, obs.image_shape, g, p.dtype).to(p.device)
    x = ((x0 - mean) / std).requires_grad_(True)
    recorder = BatchNormRecorder(model, targets)
    opt = torch.optim.Adam([x], lr=BN_LR)
    for _ in range(steps):
        opt.zero_grad()
        with recorder.recording():
            for _ in range(forwards):  # a mixture of K forwards: the same batch K times
                model(x)
        torch.autograd.backward(recorder.loss())  # = Tensor.backward(), which has no hints
        opt.step()
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    try:
        with torch.no_grad():
            probs = torch.softmax(model(x).double(), dim=-1)
    finally:
        handle.remove()
    return probs.mean(dim=0).cpu(), feats[0].double().sum(dim=1).mean().cpu()


def _counts_bn_matched(obs: Observation, last: LastLayer) -> torch.Tensor:
    if not has_batchnorm_buffers(obs):
        return _counts_bias_corrected(obs, last)
    return _matched_counts(obs, last, None)


def _counts_running_matched(obs: Observation, last: LastLayer) -> torch.Tensor:
    if not has_running_statistics(obs):
        return _counts_guarded_ilrg(obs, last)
    return _matched_counts(obs, last, running_targets(obs))


def _matched_counts(
    obs: Observation, last: LastLayer, targets: dict[str, BatchNormTarget] | None
) -> torch.Tensor:
    """Bias-corrected counts with ``pbar`` from dummies fitted to ``targets`` (None: the
    revealed batch statistics), :func:`batchnorm_matched_statistics`."""
    pbar, feature_sum = batchnorm_matched_statistics(obs, targets=targets)
    return bias_corrected_counts(_rescaled(last, pbar, feature_sum), pbar, feature_sum)


FEATURE_ROUNDS = 3
"""Rounds of :func:`feature_posterior_counts`' counts -> absent classes -> posterior loop."""


def absent_posterior(last: LastLayer, absent: torch.Tensor) -> torch.Tensor:
    """The model's posterior (C,) at the batch's features as the absent classes' rows see them.

    For a class c without images every per-image weight of ``dW_c = (1/B) sum_n (p_nc - y_nc)
    h_n`` is ``p_nc > 0``, so ``dW_c / db_c`` is a convex combination of the batch's last-layer
    features (iLRG's embedding, Wang et al. 2023, sec. 4.1, at a row where it is exact). The
    classifier's softmax there, averaged over the absent classes weighted by ``db_c``."""
    assert last.bias is not None
    w = last.layer.weight.detach().cpu().double()
    bias = last.layer.bias.detach().cpu().double() if last.layer.bias is not None else 0.0
    emb = last.weight[absent] / last.bias[absent, None]
    probs = torch.softmax(emb @ w.T + bias, dim=-1)
    weights = last.bias[absent] / last.bias[absent].sum()
    return weights @ probs


def feature_posterior_counts(last: LastLayer, start: torch.Tensor) -> torch.Tensor:
    """Counts from the absent classes' feature posterior, iterated from integer ``start``
    counts: absent classes (count 0) have ``pbar_c = db_c`` exactly; the rest of the mass,
    ``1 - sum_absent db_c``, is shared over the present classes as :func:`absent_posterior`
    weights them; then ``n_c = B (pbar_c - db_c)``, rounded, and again (``FEATURE_ROUNDS``).
    With no absent class the ``start`` counts are returned."""
    assert last.bias is not None
    counts = start.double()
    for _ in range(FEATURE_ROUNDS):
        absent = round_counts(counts, last.batch) == 0
        absent_bias = last.bias[absent]
        if not bool(absent.any()) or not bool((absent_bias > 0).all()):
            break
        post = absent_posterior(last, absent)
        pbar = last.bias.clone()
        share = post[~absent].clamp_min(1e-12)
        pbar[~absent] = share / share.sum() * (1 - absent_bias.sum())
        new = last.batch * (pbar - last.bias)
        if torch.equal(round_counts(new, last.batch), round_counts(counts, last.batch)):
            return new
        counts = new
    return counts


def _counts_feature_posterior(obs: Observation, last: LastLayer) -> torch.Tensor:
    if last.bias is None:
        return _counts_bias_corrected(obs, last)
    pbar, feature_sum = dummy_statistics(obs)
    scaled = _rescaled(last, pbar, feature_sum)
    return feature_posterior_counts(scaled, _counts_guarded_ilrg(obs, scaled))


def _counts_yin_llg(obs: Observation, last: LastLayer) -> torch.Tensor:
    labels = batch_labels(last.weight, last.batch)
    return torch.bincount(labels, minlength=last.weight.shape[0]).double()


def _counts_idlg(obs: Observation, last: LastLayer) -> torch.Tensor:
    counts = torch.zeros(last.weight.shape[0], dtype=torch.float64)
    counts[idlg_label(last.weight)] = float(last.batch)
    return counts


LABEL_RULES: dict[str, Callable[[Observation, LastLayer], torch.Tensor]] = {
    "idlg": _counts_idlg,
    "yin_llg": _counts_yin_llg,
    "bias_corrected": _counts_bias_corrected,
    "ilrg": _counts_ilrg,
    "guarded_ilrg": _counts_guarded_ilrg,
    "bn_matched": _counts_bn_matched,
    "running_matched": _counts_running_matched,
    "feature_posterior": _counts_feature_posterior,
}
"""Label-count rules by name: real-valued counts per class from an observation's last layer."""


def auto_rule(obs: Observation) -> str:
    """The rule ``auto`` picks (measured in benchmarks/label_inference.py): iDLG for one image;
    for a batch's gradient or one-step FedAvg update with a known learning rate,
    ``bn_matched`` when the BatchNorm buffers are granted, ``feature_posterior`` for a model
    without BatchNorm; for a BatchNorm model without its buffers ``running_matched`` when the
    sent model's running statistics have tracked batches (a trained model classifies some
    images confidently: they leave no trace in the gradient, and only dummies with the data's
    statistics predict like the batch), else ``guarded_ilrg``; for a hidden lr or step count
    ``running_matched`` when it applies (its scale is fitted); ``yin_llg`` otherwise, whose
    signs survive several local steps (the model fits a batch of 8 within a step or two) and an
    unknown scale."""
    if obs.num_examples == 1:
        return "idlg"
    one_step = obs.kind == "gradient" or (obs.lr is not None and obs.local_steps == 1)
    if not one_step:
        hidden = obs.lr is None or obs.local_steps is None
        return "running_matched" if hidden and has_running_statistics(obs) else "yin_llg"
    if has_batchnorm_buffers(obs):
        return "bn_matched"
    if not batchnorm_layers(obs.model):
        return "feature_posterior"
    return "running_matched" if has_running_statistics(obs) else "guarded_ilrg"


def infer_labels(obs: Observation, method: str = "auto") -> torch.Tensor:
    """The labels of an observed client step, sorted, one per image (``obs.num_examples``).

    ``auto``: :func:`auto_rule` (iDLG's exact rule for one image; for a batch's gradient or
    one-step FedAvg update ``bn_matched`` with BatchNorm buffers, ``feature_posterior``
    without BatchNorm, ``running_matched`` (tracked running statistics) or ``guarded_ilrg``
    for BatchNorm without buffers; ``yin_llg`` otherwise, or ``running_matched`` when the lr
    or the step count is hidden and the running statistics apply).
    Rules (:data:`LABEL_RULES`): ``idlg`` (every image gets iDLG's label), ``yin_llg``
    (:func:`batch_labels`), ``bias_corrected`` (Geng et al. 2021: ``n_c = B (pbar_c - db_c)``,
    ``pbar`` from dummy batches; weight-based without a bias), ``ilrg`` (Wang et al. 2023 as in
    mankasto/iLRG), ``guarded_ilrg`` (iLRG whose posteriors of mixed rows,
    :func:`mixed_rows`, are replaced by the dummy batches' mean posterior), ``bn_matched``
    (``pbar`` from BatchNorm-matched dummies, :func:`batchnorm_matched_statistics`),
    ``running_matched`` (the same, matched to the sent model's running statistics,
    :func:`attacks.priors.bn_stats.running_targets`: needs no returned buffers) and
    ``feature_posterior`` (:func:`feature_posterior_counts`). Real-valued counts are rounded to
    non-negative integers summing to the batch (:func:`round_counts`).

    FedAvg weights: divided by ``lr * local_steps`` when both are known; several local steps
    then give counts from the trajectory-averaged gradient, with posteriors read at the global
    weights (an approximation that degrades as the steps move the model). Hidden ``lr`` or
    steps: the scale is fitted (:func:`fit_scale`). A non-finite update falls back to
    ``yin_llg``.

    Args:
        obs: the server's observation (FedSGD gradient or FedAvg weights).
        method: ``"auto"`` or a key of :data:`LABEL_RULES`.

    Raises:
        ValueError: for an unknown method, or a message without the last layer's weight.

    Example:
        >>> labels = infer_labels(obs)            # doctest: +SKIP
        >>> labels.tolist()                       # doctest: +SKIP
        [0, 0, 2, 3, 3, 3, 4, 4]
    """
    if method != "auto" and method not in LABEL_RULES:
        raise ValueError(f"unknown label method {method!r}; use auto or {', '.join(LABEL_RULES)}")
    last = last_layer_update(obs)
    if method == "auto":
        method = auto_rule(obs)
    finite = bool(torch.isfinite(last.weight).all())
    if last.bias is not None:
        finite = finite and bool(torch.isfinite(last.bias).all())
    if not finite:  # a diverged or broken message: only the sign rule copes with inf/nan
        method = "yin_llg"
    counts = LABEL_RULES[method](obs, last)
    return counts_to_labels(round_counts(counts, obs.num_examples))
