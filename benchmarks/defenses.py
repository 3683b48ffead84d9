"""Utility and privacy of every defense at its defaults on PneumoniaMNIST (chest X-ray).

For no defense (the control) and each registered defense at its default hyperparameters:

- utility: test accuracy and macro-F1 after ``--rounds`` FedAvg rounds (``--clients`` clients,
  ``--per-round`` sampled, one local epoch at batch 8, lr 0.05, Dirichlet(0.5) split);
- privacy: on ``--images`` real training images attacked one at a time (batch 1), the PSNR / SSIM
  / LPIPS against the ORIGINAL images of Inverting Gradients and iDLG on the FedSGD gradient and
  of DLM+ on the FedAvg weights (one local step, lr 0.01 unknown to the attacker), plus the
  PRECODE-aware Inverting Gradients (bottleneck and classifier ignored) against PRECODE;
- epsilon at delta 1e-5 for DP-SGD.

Utility and attacks use the same model (default: an MLP 784-256-256-2, the PRECODE code's
architecture at 28 px, untrained for the attacks as in PRECODE's check). Labels are granted to
Inverting Gradients (as in PRECODE's evaluation); iDLG and DLM+ infer or optimise them.

    python benchmarks/defenses.py --data-root ../shared/data [--rounds 5] [--images 4]
           [--defenses none precode ...] [--ig-iterations 1500] [--model mlp|convnet]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import AttackerCapabilities, get_attack
from attacks.scoring.metrics import score
from defenses import available_defenses, get_defense
from defenses.precode import PRECODE_AWARE_IGNORE
from fl import data, models
from fl.simulation import (
    FederationConfig,
    PartitionConfig,
    Simulator,
    observe_client_step,
)

GRANTED = AttackerCapabilities(knows_labels=True)
BLIND = AttackerCapabilities(knows_lr=False, knows_local_steps=False)


def build_model(name: str, classes: int, size: int) -> torch.nn.Module:
    """The benchmark's model: the PRECODE MLP, or a norm-free ConvNet (DP-SGD needs no BN)."""
    if name == "mlp":
        return models.build("mlp", channels=1, classes=classes, image_size=size, hidden=(256, 256))
    return models.build(
        "convnet", channels=1, classes=classes, image_size=size, width=16, norm="group", groups=4
    )


def attack_row(defense_name: str, args: argparse.Namespace, train: data.ImageData) -> dict:
    """Attack ``args.images`` single images under the defense; returns mean metrics."""
    results: dict[str, list[dict]] = {}
    for i in range(args.images):
        x = train.float_images([i * 37])
        y = train.labels[[i * 37]]
        mean, std = train.mean, train.std
        runs = [
            (
                "inverting_gradients",
                "fedsgd",
                {"iterations": args.ig_iterations, "lr": 0.1, "tv": 1e-6},
                GRANTED,
            ),
            ("idlg", "fedsgd", {"iterations": args.idlg_iterations}, None),
            ("dlm_plus", "fedavg", {"iterations": args.dlm_iterations}, BLIND),
        ]
        if defense_name == "precode":
            runs.append(
                (
                    "inverting_gradients_aware",
                    "fedsgd",
                    {
                        "iterations": args.ig_iterations,
                        "lr": 0.1,
                        "tv": 1e-6,
                        "ignore_layers": list(PRECODE_AWARE_IGNORE),
                    },
                    GRANTED,
                )
            )
        for label, algorithm, params, caps in runs:
            torch.manual_seed(i)
            model = build_model(args.model, train.info.num_classes, args.size)
            defense = get_defense(defense_name, **_fast(defense_name, args))
            obs, truth = observe_client_step(
                model,
                x,
                y,
                algorithm=algorithm,
                lr=0.01,
                mean=mean,
                std=std,
                hooks=defense,
                reveal_labels=True,
                seed=i,
            )
            name = "inverting_gradients" if label.startswith("inverting") else label
            try:
                rec = get_attack(name, seed=0, **params).run(obs, caps or AttackerCapabilities())
            except ValueError as err:  # e.g. an attack that cannot run on this observation
                print(f"  {defense_name}/{label}: not applicable ({err})", flush=True)
                continue
            results.setdefault(label, []).append(score(rec, truth))
    return {
        label: {
            k: statistics.mean(s[k] for s in scores if s[k] is not None)
            if any(s[k] is not None for s in scores)
            else None
            for k in ("psnr_mean", "ssim_mean", "lpips_mean", "label_accuracy")
        }
        for label, scores in results.items()
    }


def _fast(name: str, args: argparse.Namespace) -> dict[str, object]:
    return {"shadow": {"shadow_iterations": args.shadow_iterations}}.get(name, {})


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_root)
    parser.add_argument("--model", choices=["mlp", "convnet"], default="mlp")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--max-per-client", type=int, default=200)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--ig-iterations", type=int, default=1500)
    parser.add_argument("--idlg-iterations", type=int, default=100)
    parser.add_argument("--dlm-iterations", type=int, default=100)
    parser.add_argument("--shadow-iterations", type=int, default=50)
    parser.add_argument("--defenses", nargs="+", default=None)
    args = parser.parse_args(argv)
    weights = (
        Path(__file__).resolve().parents[1].parent / "shared/weights/lpips_alexnet_features.pth"
    )
    if "OBSCURA_LPIPS_BACKBONE" not in os.environ and weights.exists():
        os.environ["OBSCURA_LPIPS_BACKBONE"] = str(weights)

    train = data.load("pneumoniamnist", root=args.data_root, split="train", image_size=args.size)
    test = data.load("pneumoniamnist", root=args.data_root, split="test", image_size=args.size)
    names = args.defenses or ["none"] + [d for d in available_defenses() if d != "none"]
    print(
        f"model={args.model} size={args.size} rounds={args.rounds} clients={args.clients} "
        f"per_round={args.per_round} images={args.images} ig_iterations={args.ig_iterations}"
    )
    cols = ["inverting_gradients", "inverting_gradients_aware", "idlg", "dlm_plus"]
    print(
        "| defense | acc | macro-F1 | epsilon | train s | "
        + " | ".join(f"{c} PSNR/SSIM/LPIPS" for c in cols)
        + " | attack s |"
    )
    print("|" + "---|" * (6 + len(cols)))
    for name in names:
        torch.manual_seed(0)
        model = build_model(args.model, train.info.num_classes, args.size)
        defense = get_defense(name, **_fast(name, args))
        cfg = FederationConfig(
            algorithm="fedavg",
            clients=args.clients,
            clients_per_round=args.per_round,
            rounds=args.rounds,
            batch_size=8,
            lr=0.05,
            partition=PartitionConfig(
                scheme="dirichlet", alpha=0.5, max_per_client=args.max_per_client
            ),
        )
        t0 = time.perf_counter()
        result = Simulator(model, train, cfg, test=test, hooks=defense, device="cpu").run()
        t_train = time.perf_counter() - t0
        eps = defense.epsilon(1e-5)
        t0 = time.perf_counter()
        privacy = attack_row(name, args, train)
        t_attack = time.perf_counter() - t0
        m = result.final_metrics
        cells = []
        for c in cols:
            r = privacy.get(c)
            if r is None:
                cells.append("–")
            else:
                lp = "n/a" if r["lpips_mean"] is None else f"{r['lpips_mean']:.3f}"
                cells.append(f"{r['psnr_mean']:.2f} / {r['ssim_mean']:.3f} / {lp}")
        print(
            f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
            f"{'–' if eps is None else f'{eps:.2f}'} | {t_train:.0f} | "
            + " | ".join(cells)
            + f" | {t_attack:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
