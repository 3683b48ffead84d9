"""Every attack on a fixed set of real images: time, throughput and reconstruction quality.

For each model (DLG's sigmoid LeNet, Inverting Gradients' ConvNet), batch size (1, 4) and attack,
a client step is observed on real 32 px images (scikit-image photographs), the attack runs, and
the canonical metric protocol scores it. FedSGD attacks (dlg, idlg, inverting_gradients) see the
gradient; FedAvg attacks (dlm, dlm_plus, inverting_gradients on weights) see the weights after
one local SGD step with lr 0.01 (DLM/DLM+ are not told the learning rate).

    python benchmarks/attacks.py [--device auto] [--iterations N] [--models lenet convnet]
                                 [--batches 1 4] [--attacks idlg dlm_plus ...]

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
from attacks.metrics import score
from attacks.samples import sample_images
from fl import models
from fl.simulation import observe_client_step, resolve_device

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
    parser.add_argument("--width", type=int, default=32, help="ConvNet width")
    args = parser.parse_args(argv)
    shared = (
        Path(__file__).resolve().parents[1].parent / "shared/weights/lpips_alexnet_features.pth"
    )
    if "OBSCURA_LPIPS_BACKBONE" not in os.environ and shared.exists():
        os.environ["OBSCURA_LPIPS_BACKBONE"] = str(shared)
    device = resolve_device(args.device)
    images = sample_images(args.size, 8)
    labels = torch.tensor([3, 7, 1, 5, 0, 9, 2, 8])
    print(f"device={device} threads={torch.get_num_threads()} size={args.size}px")
    header = (
        f"| {'attack':<27}| {'model':<8}| {'B':>2} | {'iters':>5} | {'seconds':>8} | "
        f"{'it/s':>6} | {'PSNR mean/max':>13} | {'SSIM mean/max':>13} | "
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
                    f"{s['ssim_mean']:>6.3f}/{s['ssim_max']:>6.3f} | {lp:>14} | "
                    f"{'n/a' if acc is None else f'{acc:.2f}':>9} |"
                    + (" diverged" if rec.diverged else ""),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
