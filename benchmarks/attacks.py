"""Every attack on a fixed set of real images: time, throughput and reconstruction quality.

For each model (DLG's sigmoid LeNet, Inverting Gradients' ConvNet), batch size (1, 4) and attack,
a client step is observed on real 32 px images (scikit-image photographs), the attack runs, and
the canonical metric protocol scores it ("gain" is ``psnr_gain``: PSNR minus that of a flat
mid-grey image, as these observations are not normalised). FedSGD attacks (dlg, idlg,
inverting_gradients) see the gradient; FedAvg attacks (dlm, dlm_plus, inverting_gradients on
weights) see the weights after one local SGD step with lr 0.01 (DLM/DLM+ are not told the
learning rate).

    python benchmarks/attacks.py [--device auto] [--iterations N] [--models lenet convnet]
                                 [--batches 1 4] [--attacks idlg dlm_plus ...]
    python benchmarks/attacks.py --compare-reference [--width 64] [--iterations 200]
                                 [--tune-allocator]

``--compare-reference`` times our Inverting Gradients against the textbook loop
(``tests/_support/reference.py``, the paper's reference code's algorithm) on the same inputs:
ConvNet, 32 px, batch 1, untrained, labels known, same initial image; it prints both speeds,
their ratio and both PSNRs (median over ``--repeats`` alternating runs).

LPIPS uses OBSCURA_LPIPS_BACKBONE, or ../shared/weights/lpips_alexnet_features.pth when present.
Run on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import AttackerCapabilities, get_attack
from attacks.scoring.metrics import score
from fl import models
from fl.simulation import observe_client_step, resolve_device, tune_allocator
from fl.simulation.allocator import allocator_tuned
from tests._support.samples import sample_images

# (label, registered attack, message, default iterations, extra parameters)
CASES: list[tuple[str, str, str, int, dict[str, object]]] = [
    ("dlg", "dlg", "fedsgd", 100, {}),
    ("idlg", "idlg", "fedsgd", 100, {}),
    ("inverting_gradients", "inverting_gradients", "fedsgd", 1000, {"tv": 1e-4}),
    ("inverting_gradients_fedavg", "inverting_gradients", "fedavg", 1000, {"tv": 1e-4}),
    ("dlm", "dlm", "fedavg", 100, {}),
    ("dlm_plus", "dlm_plus", "fedavg", 100, {}),
]
BLIND = AttackerCapabilities(knows_lr=False, knows_local_steps=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="iterations for every attack (default: per attack, see CASES)",
    )
    parser.add_argument(
        "--lbfgs-iterations",
        type=int,
        default=None,
        help="L-BFGS steps of dlg, idlg, dlm, dlm_plus (overrides --iterations)",
    )
    parser.add_argument(
        "--adam-iterations",
        type=int,
        default=None,
        help="Adam iterations of inverting_gradients (overrides --iterations)",
    )
    parser.add_argument("--models", nargs="+", default=["lenet", "convnet"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--attacks", nargs="+", default=[c[0] for c in CASES])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument(
        "--width", type=int, default=None, help="ConvNet width (32; 64 with --compare-reference)"
    )
    parser.add_argument(
        "--compare-reference",
        action="store_true",
        help="Inverting Gradients: ours vs the textbook loop, side by side",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (compare mode)")
    parser.add_argument(
        "--tune-allocator",
        action="store_true",
        help="apply fl.simulation.tune_allocator() first (as every simulator and trial does); "
        "in compare mode it applies to both loops",
    )
    args = parser.parse_args(argv)
    if args.tune_allocator and not tune_allocator():
        print("note: tune_allocator() had no effect (not glibc)")
    shared = (
        Path(__file__).resolve().parents[1].parent / "shared/weights/lpips_alexnet_features.pth"
    )
    if "OBSCURA_LPIPS_BACKBONE" not in os.environ and shared.exists():
        os.environ["OBSCURA_LPIPS_BACKBONE"] = str(shared)
    if args.compare_reference:
        return compare_reference(
            resolve_device(args.device),
            width=args.width or 64,
            size=args.size,
            iterations=args.adam_iterations or args.iterations or 200,
            repeats=args.repeats,
        )
    args.width = args.width or 32
    device = resolve_device(args.device)
    images = sample_images(args.size, 8)
    labels = torch.tensor([3, 7, 1, 5, 0, 9, 2, 8])
    print(f"device={device} threads={torch.get_num_threads()} size={args.size}px")
    header = (
        f"| {'attack':<27}| {'model':<8}| {'B':>2} | {'iters':>5} | {'seconds':>8} | "
        f"{'it/s':>6} | {'PSNR mean/max':>13} | {'gain mean/max':>13} | "
        f"{'SSIM mean/max':>13} | "
        f"{'LPIPS mean/min':>14} | {'label acc':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for model_name in args.models:
        for batch in args.batches:
            for label, name, algorithm, default_iters, extra in CASES:
                if label not in args.attacks:
                    continue
                torch.manual_seed(0)
                opts = {"width": args.width} if model_name == "convnet" else {}
                model = models.build(
                    model_name, channels=3, classes=10, image_size=args.size, **opts
                ).to(device)
                obs, truth = observe_client_step(
                    model,
                    images[:batch].to(device),
                    labels[:batch].to(device),
                    algorithm=algorithm,
                    lr=0.01,
                    local_steps=1,
                )
                kind_iters = (
                    args.adam_iterations if name == "inverting_gradients" else args.lbfgs_iterations
                )
                iters = kind_iters or args.iterations or default_iters
                attack = get_attack(name, iterations=iters, seed=0, **extra)
                caps = BLIND if name in ("dlm", "dlm_plus") else None
                rec = attack.run(obs, caps)
                s = score(rec, truth, device=str(device))
                lp = (
                    f"{s['lpips_mean']:.3f}/{s['lpips_min']:.3f}"
                    if s["lpips_mean"] is not None
                    else "n/a"
                )
                acc = s["label_accuracy"]
                print(
                    f"| {label:<27}| {model_name:<8}| {batch:>2} | {rec.iterations:>5} | "
                    f"{rec.seconds:>8.1f} | {rec.iterations / rec.seconds:>6.2f} | "
                    f"{s['psnr_mean']:>6.2f}/{s['psnr_max']:>6.2f} | "
                    f"{s['psnr_gain_mean']:>6.2f}/{s['psnr_gain_max']:>6.2f} | "
                    f"{s['ssim_mean']:>6.3f}/{s['ssim_max']:>6.3f} | {lp:>14} | "
                    f"{'n/a' if acc is None else f'{acc:.2f}':>9} |"
                    + (" diverged" if rec.diverged else ""),
                    flush=True,
                )
    return 0


def compare_reference(
    device: torch.device, *, width: int, size: int, iterations: int, repeats: int
) -> int:
    """Ours vs the textbook Inverting Gradients loop on identical inputs (issue 8's target:
    at least 2x the textbook's iterations/s with the same PSNR within 0.1 dB)."""
    import copy
    import statistics
    import time

    from attacks._machinery.setup import InversionSetup
    from tests._support.reference import textbook_inverting_gradients

    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=10, image_size=size, width=width)
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    obs, truth = observe_client_step(
        model,
        sample_images(size, 1).to(device),
        torch.tensor([3], device=device),
        algorithm="fedsgd",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        reveal_labels=True,
    )
    tv = 1e-4
    print(
        f"device={device} threads={torch.get_num_threads()} ConvNet width {width} "
        f"({params / 1e6:.2f} M parameters), {size} px, batch 1, untrained, labels known, "
        f"{iterations} iterations, tv {tv}, allocator {'tuned' if allocator_tuned() else 'default'}"
    )
    setup = InversionSetup.from_observation(obs)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)  # the attack's first restart with seed 0 draws the same image
    x0 = setup.dummy(gen, "randn")
    times: dict[str, list[float]] = {"textbook": [], "ours": []}
    psnr: dict[str, list[float]] = {"textbook": [], "ours": []}
    for _ in range(repeats):
        ref_model = copy.deepcopy(obs.model).train()
        t0 = time.perf_counter()
        x, _ = textbook_inverting_gradients(
            ref_model,
            setup.target,
            obs.labels,
            x0,
            iterations=iterations,
            lr=0.1,
            tv=tv,
            lower=setup.lower,
            upper=setup.upper,
        )
        times["textbook"].append(time.perf_counter() - t0)
        rec = _as_reconstruction(x, obs)
        psnr["textbook"].append(score(rec, truth, device=str(device))["psnr_max"])
        attack = get_attack("inverting_gradients", iterations=iterations, tv=tv, seed=0)
        t0 = time.perf_counter()
        ours = attack.run(obs, AttackerCapabilities(knows_labels=True))
        times["ours"].append(time.perf_counter() - t0)
        psnr["ours"].append(score(ours, truth, device=str(device))["psnr_max"])
    print("| loop | seconds (median) | it/s | PSNR dB |")
    print("|---|---|---|---|")
    for key in ("textbook", "ours"):
        sec = statistics.median(times[key])
        print(
            f"| {key} | {sec:.2f} | {iterations / sec:.2f} | {statistics.median(psnr[key]):.3f} |"
        )
    ratio = statistics.median(times["textbook"]) / statistics.median(times["ours"])
    diff = abs(statistics.median(psnr["ours"]) - statistics.median(psnr["textbook"]))
    print(f"speed-up ours / textbook: {ratio:.2f}x; |PSNR difference| {diff:.3f} dB")
    return 0


def _as_reconstruction(x: torch.Tensor, obs: object) -> object:
    """Wrap a model-space image as a Reconstruction for the canonical scoring."""
    from attacks.base import Reconstruction
    from attacks.scoring.metrics import flat_value
    from fl.simulation.normalization import denormalize

    return Reconstruction(
        images=denormalize(x, obs.mean, obs.std).clamp(0, 1).cpu(),  # type: ignore[attr-defined]
        labels=obs.labels.cpu(),  # type: ignore[attr-defined]
        attack="textbook",
        loss=float("nan"),
        iterations=0,
        seconds=0.0,
        flat_value=flat_value(obs.mean, obs.std),  # type: ignore[attr-defined]
    )


if __name__ == "__main__":
    sys.exit(main())
