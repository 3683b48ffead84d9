"""Reproduce each paper's headline claim at a scale one GPU (or, with --small, a CPU) can run.

Prints a table: claim, the paper's figure, ours, the setting, and why they differ. Every number
uses Obscura's metric protocol ([0, 1] images, Hungarian matching, PSNR data_range 1, skimage
SSIM, LPIPS alex), not the papers' own (which differ: see ../shared/docs/methods.md).

    python benchmarks/reproduce.py --small [--device auto] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import AttackerCapabilities, get_attack
from attacks.scoring.metrics import score
from attacks.scoring.population import Reference
from defenses import get_defense
from defenses.precode import PRECODE_AWARE_IGNORE
from fl import data, models
from fl.simulation import (
    FederationConfig,
    PartitionConfig,
    Simulator,
    observe_client_step,
    resolve_device,
)
from tests._support.samples import sample_images

GRANTED = AttackerCapabilities(knows_labels=True)
BLIND = AttackerCapabilities(knows_lr=False, knows_local_steps=False)
ROWS: list[tuple[str, str, str, str, str]] = []


def row(claim: str, paper: str, ours: str, setting: str, why: str) -> None:
    """Record and print one line of the table."""
    ROWS.append((claim, paper, ours, setting, why))
    print(f"| {claim} | {paper} | {ours} | {setting} | {why} |", flush=True)


def idlg_claims(a: argparse.Namespace, dev: torch.device) -> None:
    size, n = (16, 12) if a.small else (32, 24)
    images = sample_images(size, n)
    labels = torch.arange(n) % 10
    correct, psnrs, dlg_psnrs = 0, [], []
    for i in range(n):
        torch.manual_seed(i)
        model = models.build("lenet", channels=3, classes=10, image_size=size).to(dev)
        obs, truth = observe_client_step(
            model, images[i : i + 1].to(dev), labels[i : i + 1].to(dev)
        )
        rec = get_attack("idlg", iterations=1 if i >= 4 else 300, seed=0).run(obs)
        s = score(rec, truth, lpips=False)
        correct += s["label_accuracy"] == 1.0
        if i < 4:
            psnrs.append(s["psnr_mean"])
            d = score(get_attack("dlg", iterations=300, seed=0).run(obs), truth, lpips=False)
            dlg_psnrs.append(d["psnr_mean"])
    row(
        "iDLG label accuracy, single images",
        "100 % (MNIST, CIFAR-100, LFW)",
        f"{correct / n:.0%} ({n} images)",
        f"sigmoid LeNet U(-0.5,0.5), {size} px, real photos",
        "same rule; real photographs instead of the paper's datasets",
    )
    row(
        "iDLG near-exact recovery",
        "visually exact (MSE ~1e-4..1e-3)",
        f"PSNR {statistics.mean(psnrs):.1f} dB (min {min(psnrs):.1f})",
        f"LeNet, {size} px, batch 1, 300 L-BFGS steps",
        "PSNR 30 dB = MSE 1e-3",
    )
    row(
        "DLG near-exact recovery (labels optimised)",
        "visually exact after 300 steps",
        f"PSNR {statistics.mean(dlg_psnrs):.1f} dB (min {min(dlg_psnrs):.1f})",
        f"LeNet, {size} px, batch 1, 300 L-BFGS steps",
        "DLG's joint label optimisation sometimes stalls; iDLG fixes the label first",
    )


def dlm_claims(a: argparse.Namespace, dev: torch.device) -> None:
    size = 16 if a.small else 32
    images = sample_images(size, 4)
    res: dict[str, list[float]] = {"idlg": [], "dlm": [], "dlm_plus": []}
    for i in range(4):
        torch.manual_seed(100 + i)
        model = models.build("lenet", channels=3, classes=10, image_size=size).to(dev)
        x, y = images[i : i + 1].to(dev), torch.tensor([i], device=dev)
        obs, truth = observe_client_step(model, x, y)
        res["idlg"].append(score(get_attack("idlg").run(obs), truth, lpips=False)["psnr_mean"])
        wobs, _ = observe_client_step(model, x, y, algorithm="fedavg", lr=0.01)
        for name in ("dlm", "dlm_plus"):
            rec = get_attack(name, iterations=200, seed=0).run(wobs, BLIND)
            res[name].append(score(rec, truth, lpips=False)["psnr_mean"])
    f = {k: statistics.mean(v) for k, v in res.items()}
    row(
        "DLM+ recovers from weights with an unknown lr",
        "close to DLG from gradients",
        f"DLM+ {f['dlm_plus']:.1f} dB vs iDLG {f['idlg']:.1f} dB",
        f"LeNet, {size} px, 1 SGD step lr 0.01 (hidden), 200 L-BFGS steps, 4 images",
        "paper tables not retrievable; target from its text",
    )
    row(
        "DLM (learnable scale k) recovers from weights",
        "close to DLG (k swept 60..240)",
        f"{f['dlm']:.1f} dB",
        "as above, one k0 = 200, one restart",
        "the reference sweeps k0 over 10 values x 10 repeats; DLM+ removes that need",
    )


def precode_claims(a: argparse.Namespace, dev: torch.device) -> None:
    size, hidden, iters, n = (16, (256, 256), 500, 3) if a.small else (32, (1024, 1024), 7000, 8)
    images = sample_images(size, n)
    out: dict[str, list[float]] = {"none": [], "precode": [], "aware": []}
    for i in range(n):
        for key, defense, ignore in (
            ("none", "none", []),
            ("precode", "precode", []),
            ("aware", "precode", list(PRECODE_AWARE_IGNORE)),
        ):
            torch.manual_seed(i)
            model = models.build("mlp", channels=3, classes=10, image_size=size, hidden=hidden).to(
                dev
            )
            obs, truth = observe_client_step(
                model,
                images[i : i + 1].to(dev),
                torch.tensor([i % 10], device=dev),
                hooks=get_defense(defense),
                reveal_labels=True,
            )
            rec = get_attack(
                "inverting_gradients",
                iterations=iters,
                lr=0.01,
                tv=1e-6,
                ignore_layers=ignore,
                seed=0,
            ).run(obs, GRANTED)
            out[key].append(score(rec, truth, lpips=False)["ssim_mean"])
    m = {k: statistics.mean(v) for k, v in out.items()}
    row(
        "PRECODE stops Inverting Gradients (SSIM)",
        "0.99969 without, 0.00450 with",
        f"{m['none']:.4f} without, {m['precode']:.4f} with",
        f"MLP {hidden}, {size} px, batch 1, IG {iters} it. lr 0.01 TV 1e-6, labels known, {n} "
        "real images",
        "paper: 128 CIFAR-10 victims, 32 px" if a.small else "real photos, not CIFAR-10",
    )
    row(
        "PRECODE-aware attack (authors' follow-up)",
        "breaks PRECODE",
        f"SSIM {m['aware']:.4f}",
        "as above, bottleneck and classifier gradients ignored",
        "as reported by arXiv 2208.04767 / 2309.04515",
    )


def _fl_utility(
    defense: str,
    train: data.ImageData,
    test: data.ImageData,
    rounds: int,
    dev: torch.device,
    **params: object,
) -> float:
    torch.manual_seed(0)
    model = models.build(
        "mlp",
        channels=train.channels,
        classes=train.info.num_classes,
        image_size=train.image_size[0],
        hidden=(256, 256),
    )
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=9,
        clients_per_round=9,
        rounds=rounds,
        batch_size=8,
        lr=0.01,
        partition=PartitionConfig(scheme="iid", max_per_client=120),
    )
    res = Simulator(
        model, train, cfg, test=test, hooks=get_defense(defense, **params), device=dev
    ).run()
    return float(res.final_metrics["macro_f1"])


def _attack_psnr(
    defense: str,
    train: data.ImageData,
    n: int,
    iters: int,
    dev: torch.device,
    metric: str = "psnr_mean",
    **params: object,
) -> float:
    vals = []
    for i in range(n):
        torch.manual_seed(i)
        model = models.build(
            "mlp",
            channels=train.channels,
            classes=train.info.num_classes,
            image_size=train.image_size[0],
            hidden=(256, 256),
        ).to(dev)
        x = train.float_images([i * 53]).to(dev)
        y = train.labels[[i * 53]].to(dev)
        obs, truth = observe_client_step(
            model,
            x,
            y,
            mean=train.mean,
            std=train.std,
            hooks=get_defense(defense, **params),
            reveal_labels=True,
        )
        rec = get_attack("inverting_gradients", iterations=iters, tv=1e-4, seed=0).run(obs, GRANTED)
        vals.append(score(rec, truth, lpips=False)[metric])
    return statistics.mean(vals)


def medical_claims(a: argparse.Namespace, dev: torch.device) -> None:
    rounds, n, iters = (5, 3, 300) if a.small else (20, 8, 2000)
    shadow_params = {"shadow_iterations": 20 if a.small else 50}
    for name, claim_db in (
        ("pneumoniamnist", "3.73 dB (ChestXRay)"),
        ("retinamnist", "2.78 dB (EyePACS)"),
    ):
        train = data.load(name, root=a.data_root, split="train")
        test = data.load(name, root=a.data_root, split="test")
        f1_none = _fl_utility("none", train, test, rounds, dev)
        f1_shadow = _fl_utility("shadow", train, test, rounds, dev, **shadow_params)
        p_none = _attack_psnr("none", train, n, iters, dev)
        p_shadow = _attack_psnr("shadow", train, n, iters, dev, **shadow_params)
        row(
            f"Shadow defense lowers attack PSNR ({name})",
            f"-{claim_db}, F1 loss < 1 %",
            f"-{p_none - p_shadow:.2f} dB ({p_none:.1f} -> {p_shadow:.1f}), macro-F1 "
            f"{f1_none:.3f} -> {f1_shadow:.3f}",
            f"MLP, 28 px, IG {iters} it. batch 1 labels known; FedAvg {rounds} rounds, 9 clients",
            "paper: ResNet-18 224 px, StyleGAN3 shadow, best match over the client's dataset",
        )
    train = data.load("pneumoniamnist", root=a.data_root, split="train")
    test = data.load("pneumoniamnist", root=a.data_root, split="test")
    acc_none = _fl_utility("none", train, test, rounds, dev)
    acc_obs = _fl_utility("obscure", train, test, rounds, dev)
    s_none = _attack_psnr("none", train, n, iters, dev, metric="ssim_mean")
    s_obs = _attack_psnr("obscure", train, n, iters, dev, metric="ssim_mean")
    row(
        "Obscuring: low attack similarity at high accuracy",
        "qualitative (no public numbers)",
        f"attack SSIM {s_none:.3f} -> {s_obs:.3f}, macro-F1 {acc_none:.3f} -> {acc_obs:.3f}",
        f"PneumoniaMNIST 28 px, MLP, IG {iters} it.; FedAvg {rounds} rounds",
        "our own design of the method (no public code)",
    )


#: The BatchNorm-aware Inverting Gradients of the Hatamizadeh et al. reproduction.
BN_IG = {"tv": 0.2, "bn_prior": 0.03, "init": "mean", "bn_project": True}
BN_GRANTED = AttackerCapabilities(knows_labels=True, knows_bn_stats=True)


def _bn_leak(
    train: data.ImageData,
    reference: Reference,
    a: argparse.Namespace,
    dev: torch.device,
    *,
    batch: int,
    steps: int = 1,
    noise: float = 0.0,
) -> float:
    """Mean PSNR gain over the population mean image (``reference``: the test split) of IG +
    BatchNorm statistics against one FedAvg client update (``batch`` training X-rays,
    ``steps`` local steps, Gaussian update noise ``noise``)."""
    width, iters, n = (8, 400, 2) if a.small else (16, 1500, 4)
    size = train.image_size[0]
    gains = []
    for i in range(n):
        torch.manual_seed(i)
        model = models.build(
            "convnet", channels=1, classes=2, image_size=size, width=width, norm="batch"
        ).to(dev)
        idx = [(i * 97 + 13 * k) % len(train.labels) for k in range(batch)]
        obs, truth = observe_client_step(
            model,
            train.float_images(idx).to(dev),
            train.labels[idx].to(dev),
            algorithm="fedavg",
            lr=0.01,
            local_steps=steps,
            mean=train.mean,
            std=train.std,
            hooks=get_defense("gradient_noise", scale=noise) if noise else None,
            reveal_labels=True,
            seed=i,
        )
        rec = get_attack("inverting_gradients", iterations=iters, seed=0, **BN_IG).run(
            obs, BN_GRANTED
        )
        gains.append(score(rec, truth, lpips=False, reference=reference)["prior_gain_mean"])
    return statistics.mean(gains)


def hatamizadeh_claims(a: argparse.Namespace, dev: torch.device) -> None:
    """Hatamizadeh et al. (IEEE TMI 2023): on chest X-rays in FedAvg, with BatchNorm statistics,
    leakage falls with batch size, local steps and update noise."""
    size = 16 if a.small else 32
    train = data.load("pneumoniamnist", root=a.data_root, split="train", image_size=size)
    test = data.load("pneumoniamnist", root=a.data_root, split="test", image_size=size)
    ref = Reference.from_images(test.images)  # disjoint from the training-split victims
    trends = {
        "batch size 1 / 2 / 4": [_bn_leak(train, ref, a, dev, batch=b) for b in (1, 2, 4)],
        "local steps 1 / 2 / 4 (batch 1)": [
            _bn_leak(train, ref, a, dev, batch=1, steps=k) for k in (1, 2, 4)
        ],
        "update noise std 0 / 1e-4 / 1e-3": [
            _bn_leak(train, ref, a, dev, batch=1, noise=s) for s in (0.0, 1e-4, 1e-3)
        ],
    }
    for what, gains in trends.items():
        falls = all(x >= y for x, y in itertools.pairwise(gains))
        row(
            f"Chest X-ray leakage falls with {what.split(' 1 ')[0].split(' 0 ')[0]}",
            "falls (Hatamizadeh et al. 2023, figs. 4-6)",
            f"gain over the mean image {' / '.join(f'{g:+.2f}' for g in gains)} dB ({what}): "
            + ("falls" if falls else "does not fall monotonically"),
            f"PneumoniaMNIST {size} px, BatchNorm ConvNet (train mode), FedAvg lr 0.01, IG + "
            "BatchNorm prior from the returned buffers, labels known",
            "paper: DenseNet-121 224 px, its own inversion (NVFlare), image-prior and "
            "mean-image initialisation; we use the PSNR gain over the population mean image, "
            "not their SSIM/NMI",
        )


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU scale (minutes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", type=Path, default=default_root)
    parser.add_argument(
        "--only",
        nargs="+",
        default=["idlg", "dlm", "precode", "medical", "hatamizadeh"],
        choices=["idlg", "dlm", "precode", "medical", "hatamizadeh"],
    )
    a = parser.parse_args(argv)
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    weights = shared / "weights" / "lpips_alexnet_features.pth"
    if "OBSCURA_LPIPS_BACKBONE" not in os.environ and weights.exists():
        os.environ["OBSCURA_LPIPS_BACKBONE"] = str(weights)
    dev = resolve_device(a.device)
    print(f"device={dev} small={a.small}")
    print("| claim | paper | ours | setting | why they differ |")
    print("|---|---|---|---|---|")
    steps: dict[str, Callable[[argparse.Namespace, torch.device], None]] = {
        "idlg": idlg_claims,
        "dlm": dlm_claims,
        "precode": precode_claims,
        "medical": medical_claims,
        "hatamizadeh": hatamizadeh_claims,
    }
    t0 = time.perf_counter()
    for key in a.only:
        steps[key](a, dev)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
