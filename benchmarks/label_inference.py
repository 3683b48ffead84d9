"""How many labels of a batch each inference rule gets right, as a multiset.

Accuracy of one batch: ``sum_c min(predicted count_c, true count_c) / B`` (order-free). Batches
of 8 real images at 32 px: RetinaMNIST test images with their labels (5 classes, imbalanced:
45 % class 0), and scikit-image photographs (``tests._support.samples``) with labels drawn at random
over 10 classes (fixed seed). Models: the Inverting-Gradients ConvNet (width 16, BatchNorm in
training mode) and DLG's sigmoid LeNet, each freshly initialised per batch (seed = batch index)
or, on RetinaMNIST, trained first for 5 FedAvg rounds with fl.simulation (5 clients, IID, one
local epoch at batch 32, lr 0.05; one trained model, the batches vary). Messages: the FedSGD
gradient; one-step FedAvg weights (lr 0.05) with the learning rate known or hidden; four local
full-batch FedAvg steps (lr known). The messages carry the returned BatchNorm buffers (as with
``knows_bn_stats``; the FedSGD gradient also without them), which only ``bn_matched`` (and
``auto`` through it) reads. The ``auto`` rows name the rule(s)
:func:`attacks.labels.inference.auto_rule` picked and score that rule's labels.

    python benchmarks/label_inference.py [--batches 20] [--data-root ../shared/data]

Runs on the CPU with one thread; slow (``bn_matched`` optimises a dummy batch per message, four
forwards per step on the 4-step FedAvg rows): well over 15 minutes on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks.labels import LABEL_RULES, auto_rule, infer_labels
from fl import data, models
from fl.simulation import FederationConfig, PartitionConfig, Simulator, observe_client_step
from fl.simulation.observation import Observation
from tests._support.samples import sample_images

METHODS = (
    "yin_llg",
    "bias_corrected",
    "ilrg",
    "guarded_ilrg",
    "feature_posterior",
    "bn_matched",
    "running_matched",
)
"""Rules measured one by one; ``auto`` is scored as the rule :func:`auto_rule` picks."""
STEPS: dict[str, dict[str, object]] = {
    "fedsgd": {"algorithm": "fedsgd"},
    "fedsgd, no buffers": {"algorithm": "fedsgd"},
    "fedavg-1": {"algorithm": "fedavg", "lr": 0.05},
    "fedavg-1, lr hidden": {"algorithm": "fedavg", "lr": 0.05},
    "fedavg-4": {"algorithm": "fedavg", "lr": 0.05, "local_steps": 4},
}
BATCH = 8
SIZE = 32


def multiset_accuracy(predicted: torch.Tensor, true: torch.Tensor, classes: int) -> float:
    """``sum_c min(#predicted c, #true c) / B``: the share of labels right, order ignored."""
    p = torch.bincount(predicted.cpu(), minlength=classes)
    t = torch.bincount(true.cpu(), minlength=classes)
    return float(torch.minimum(p, t).sum()) / int(true.numel())


def build(arch: str, classes: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model at 32 px, 3 channels."""
    torch.manual_seed(seed)
    opts = {"width": 16, "norm": "batch"} if arch == "convnet" else {}
    return models.build(arch, channels=3, classes=classes, image_size=SIZE, **opts)


def trained(arch: str, train: data.ImageData) -> torch.nn.Module:
    """The model after 5 FedAvg rounds on RetinaMNIST's training split."""
    model = build(arch, 5, 0)
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=5,
        clients_per_round=5,
        rounds=5,
        local_epochs=1,
        batch_size=32,
        lr=0.05,
        partition=PartitionConfig(scheme="iid"),
    )
    return Simulator(model, train, cfg, device="cpu", seed=0).run().model


def batches(
    dataset: str, n: int, retina: data.ImageData
) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[float, ...], tuple[float, ...]]]:
    """``n`` batches (images in [0, 1], labels, mean, std) drawn with a fixed seed."""
    g = torch.Generator().manual_seed(0)
    photos = sample_images(SIZE, 30)
    for _ in range(n):
        if dataset == "retina":
            idx = torch.randperm(len(retina.labels), generator=g)[:BATCH]
            yield retina.float_images(idx), retina.labels[idx].long(), retina.mean, retina.std
        else:
            idx = torch.randperm(len(photos), generator=g)[:BATCH]
            labels = torch.randint(0, 10, (BATCH,), generator=g)
            yield photos[idx], labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def observe(
    model: torch.nn.Module, step: str, x: torch.Tensor, y: torch.Tensor, mean: tuple, std: tuple
) -> Observation:
    """One client step; the learning rate and step count hidden for the "lr hidden" case, the
    BatchNorm buffers for the "no buffers" one."""
    obs, _ = observe_client_step(model, x, y, mean=mean, std=std, **STEPS[step])  # type: ignore[arg-type]
    if "no buffers" in step:
        return obs.replace(buffers={})
    return obs.replace(lr=None, local_steps=None) if "hidden" in step else obs


def measure(
    arch: str, state: str, dataset: str, n: int, retina: data.ImageData, train: data.ImageData
) -> list[tuple[str, str, list[float]]]:
    """Accuracy per (algorithm, method) over ``n`` batches for one model state and dataset."""
    classes = 5 if dataset == "retina" else 10
    fixed = trained(arch, train) if state == "trained" else None
    scores: dict[tuple[str, str], list[float]] = {}
    picked: dict[str, set[str]] = {}
    for i, (x, y, mean, std) in enumerate(batches(dataset, n, retina)):
        model = fixed if fixed is not None else build(arch, classes, i)
        for step in STEPS:
            obs = observe(model, step, x, y, mean, std)
            for method in METHODS:
                acc = multiset_accuracy(infer_labels(obs, method), y, classes)
                scores.setdefault((step, method), []).append(acc)
            rule = auto_rule(obs)  # auto is that rule: its score, not a second run
            picked.setdefault(step, set()).add(rule)
            auto = scores[(step, rule)][-1] if rule in METHODS else None
            if auto is None:
                auto = multiset_accuracy(infer_labels(obs, "auto"), y, classes)
            scores.setdefault((step, "auto"), []).append(auto)
    return [
        (step, f"auto={'/'.join(sorted(picked[step]))}" if method == "auto" else method, v)
        for (step, method), v in scores.items()
    ]


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_root)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    assert set(METHODS) <= set(LABEL_RULES)
    retina = data.load("retinamnist", root=args.data_root, split="test", image_size=SIZE)
    train = data.load("retinamnist", root=args.data_root, split="train", image_size=SIZE)
    configs = [
        ("convnet", "untrained", "retina"),
        ("convnet", "untrained", "photos"),
        ("convnet", "trained", "retina"),
        ("lenet", "untrained", "retina"),
        ("lenet", "untrained", "photos"),
        ("lenet", "trained", "retina"),
    ]
    start = time.perf_counter()
    print(f"multiset label accuracy, batches of {BATCH} at {SIZE} px, {args.batches} batches each")
    print(
        f"{'model':8} {'state':10} {'data':7} {'algorithm':20} {'method':22} {'mean':>6} "
        f"{'median':>6} {'min':>6}"
    )
    for arch, state, dataset in configs:
        for step, method, v in measure(arch, state, dataset, args.batches, retina, train):
            print(
                f"{arch:8} {state:10} {dataset:7} {step:20} {method:22} "
                f"{statistics.fmean(v):6.3f} {statistics.median(v):6.3f} {min(v):6.3f}"
            )
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
