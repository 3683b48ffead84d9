"""Inverting Gradients on V victims: V separate ``attack.run`` calls vs one batched optimisation.

A trial reconstructs several captured client steps. This times them one after another
(``attack.run`` per observation) against ``attack.run_many(observations, batched=True)``
(:mod:`attacks.inverting_gradients.batched`: one ``torch.func`` optimisation over all
victims, Geiping et al. 2020 eq. 4 per victim), on the same observations: the
Inverting-Gradients ConvNet (untrained, BatchNorm), real 32 px images, FedSGD, labels known,
same seed. It prints both wall times and victim-iterations per second, the speed ratio, and
the largest |PSNR difference| between a victim's two reconstructions (which should be ~0: the
batched run reproduces the separate ones up to float rounding).

    python benchmarks/batched_victims.py [--victims 4] [--width 64] [--size 32] [--batch 1]
                                         [--iterations 200] [--device auto] [--distinct-weights]

``--distinct-weights`` gives every victim its own weights (victims from different rounds);
by default they share the global model (clients of one round). Both paths are warmed up with 2
iterations first. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import AttackerCapabilities, Reconstruction, get_attack
from attacks.inverting_gradients import batching_obstacle
from attacks.scoring.metrics import score
from fl import models
from fl.simulation import observe_client_step, resolve_device
from fl.simulation.observation import GroundTruth, Observation
from tests._support.samples import sample_images

GRANTED = AttackerCapabilities(knows_labels=True)  # the benchmark's labels are known


def victims(
    count: int, *, width: int, size: int, batch: int, distinct: bool, device: torch.device
) -> tuple[list[Observation], list[GroundTruth]]:
    """``count`` FedSGD client steps of ``batch`` different real images each, labels granted,
    on one shared untrained ConvNet (or one per victim with ``distinct``)."""
    images = sample_images(size, count * batch)
    labels = torch.arange(count * batch) % 10
    observations, truths = [], []
    for v in range(count):
        torch.manual_seed(v if distinct else 0)
        model = models.build("convnet", channels=3, classes=10, image_size=size, width=width)
        part = slice(v * batch, (v + 1) * batch)
        obs, truth = observe_client_step(
            model.to(device),
            images[part].to(device),
            labels[part].to(device),
            reveal_labels=True,
        )
        observations.append(obs)
        truths.append(truth)
    return observations, truths


def timed(
    fn: Callable[[], list[Reconstruction]], device: torch.device
) -> tuple[list[Reconstruction], float]:
    """Run ``fn()`` and return its reconstructions and wall seconds (GPU work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run both ways and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="ConvNet width")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="images per victim")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--distinct-weights", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    observations, truths = victims(
        args.victims,
        width=args.width,
        size=args.size,
        batch=args.batch,
        distinct=args.distinct_weights,
        device=device,
    )
    attack = get_attack("inverting_gradients", iterations=args.iterations, seed=0)
    obstacle = batching_obstacle(attack, observations)
    if obstacle is not None:
        print(f"not batched ({obstacle}): both paths would be separate runs")
        return 1
    warm = get_attack("inverting_gradients", iterations=2, seed=0)
    for o in observations:
        warm.run(o, GRANTED)
    warm.run_many(observations, GRANTED, batched=True)

    separate, t_sep = timed(lambda: [attack.run(o, GRANTED) for o in observations], device)
    batched, t_bat = timed(lambda: attack.run_many(observations, GRANTED, batched=True), device)
    work = args.victims * args.iterations
    psnr_diff = max(
        abs(score(s, t, lpips=False)["psnr_mean"] - score(b, t, lpips=False)["psnr_mean"])
        for s, b, t in zip(separate, batched, truths, strict=True)
    )
    image_diff = max(
        float((s.images - b.images).abs().max()) for s, b in zip(separate, batched, strict=True)
    )
    print(
        f"device={device} threads={torch.get_num_threads()} victims={args.victims} "
        f"convnet width={args.width} size={args.size}px B={args.batch} "
        f"iterations={args.iterations} weights={'distinct' if args.distinct_weights else 'shared'}"
    )
    print(f"separate runs: {t_sep:8.2f} s  {work / t_sep:8.1f} victim-it/s")
    print(f"batched run:   {t_bat:8.2f} s  {work / t_bat:8.1f} victim-it/s")
    print(f"speed ratio (separate / batched): {t_sep / t_bat:.2f}x")
    print(f"max |PSNR difference|: {psnr_diff:.2e} dB  (max |pixel difference| {image_diff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
