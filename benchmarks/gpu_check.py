"""Every CUDA path of Obscura checked against PyTorch's plain path on one GPU, with its speed.

Until this script has passed on a GPU, the exact convolution mode is off on CUDA by default
(attacks' ``exact_convolutions: auto``) and batched victims and vectorised clients are opt-ins
there. Run it once on a machine with a GPU; all checks together take at most 8 minutes:

    python benchmarks/gpu_check.py [--data-root ../shared/data] [--json gpu_check.json]

1. **Exact convolutions** (``attacks/_machinery/convolution.py``): with deterministic cuDNN, the
   dummy gradient and the image gradient of the Inverting Gradients objective (ConvNet, BatchNorm in
   train mode) and a whole short Inverting Gradients run must equal PyTorch's own double
   backward bit for bit; then the speed of Inverting Gradients (mode on and off) against the
   textbook loop (``tests/_support/reference.py``), ConvNet width 64, 32 px, batch 1.
2. **Batched victims** at 4 and 16 victims: a float64 run of the batched optimisation must give
   each victim's separate run to 1e-9; then float32 speed, separate vs batched.
3. **Vectorised clients**: two FedAvg rounds in float64, vectorised vs one by one, to 1e-9;
   then the float32 time of a round each way.
4. **Two trials on one GPU through Ray** (``resources.gpu: 0.5``, two at once): both complete
   on CUDA, overlap in time, and report their peak GPU memory.

Each check prints PASS or FAIL; the exit code is 0 only when all pass, 1 when one fails or no GPU
is visible, 2 for bad options. Figures are medians where repeated. ``--device cpu`` runs the same
checks on the CPU with fake Ray GPUs (figures mean nothing there: it is how the test suite
exercises this script; ``--quick`` shrinks every size).

PneumoniaMNIST (``pneumoniamnist.npz``) is read from ``--data-root``; LPIPS from
``OBSCURA_LPIPS_BACKBONE`` or ``../shared/weights`` when present (otherwise trials assign by MSE).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import AttackerCapabilities

ROOT = Path(__file__).resolve().parents[1]
LABELS_KNOWN = AttackerCapabilities(knows_labels=True)  # the checks' observations reveal them


@dataclass
class Check:
    """One check's verdict, what it compared, and the figures it measured."""

    name: str
    passed: bool
    detail: str
    figures: dict[str, float | str] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Check every CUDA path of Obscura against PyTorch's plain path on one GPU "
        "and print its speed (at most 8 minutes).",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        help="the GPU to check (default: cuda, the first visible one); 'cpu' runs the same "
        "checks on the CPU to test this script (figures meaningless)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="folder holding pneumoniamnist.npz (default: ../shared/data)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=200,
        help="Inverting Gradients iterations of the speed runs (default 200)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["exact", "batched", "vectorized", "ray"],
        help="checks to leave out",
    )
    parser.add_argument("--json", type=Path, help="also write the verdicts and figures here")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeats < 1:
        parser.error("--iterations and --repeats must be at least 1")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = "unknown"
    if kind not in ("cuda", "cpu"):
        parser.error(f"--device must be 'cuda', 'cuda:N' or 'cpu', not {args.device!r}")
    return args


def gpu_or_message(requested: str) -> tuple[torch.device | None, str]:
    """The device to check, or None and the reason it cannot be used."""
    device = torch.device(requested)
    if device.type == "cpu":
        return device, ""
    if not torch.cuda.is_available():
        return None, (
            "no CUDA GPU is visible to this process (torch.cuda.is_available() is False): "
            "run this on a machine with a GPU, check CUDA_VISIBLE_DEVICES, or pass --device cpu "
            "to test the script itself"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        return None, f"{requested} does not exist: {torch.cuda.device_count()} GPU(s) visible"
    return (device if device.index is not None else torch.device("cuda:0")), ""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings include GPU work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, GPU work included."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN picks deterministic algorithms, the same for the same call: what a bit-for-bit
    comparison of two paths calling the same kernels needs."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Models, images and dummy data built inside have ``dtype``."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference over paired tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def convnet_observation(
    device: torch.device, *, width: int, size: int, batch: int, seed: int = 0, index: int = 0
) -> tuple[Any, Any]:
    """A FedSGD client step of ``batch`` real images on an untrained IG ConvNet (labels
    granted), in the default dtype, on ``device``."""
    from fl import models
    from fl.simulation import observe_client_step
    from tests._support.samples import sample_images

    torch.manual_seed(seed)
    dtype = torch.get_default_dtype()
    model = models.build("convnet", channels=3, classes=10, image_size=size, width=width)
    images = sample_images(size, (index + 1) * batch)[index * batch :].to(dtype)
    labels = (torch.arange(batch) + index) % 10
    return observe_client_step(
        model.to(device), images.to(device), labels.to(device), reveal_labels=True
    )


def check_exact_gradients(device: torch.device, width: int, size: int) -> tuple[bool, str]:
    """The exact mode's dummy gradient and image gradient vs PyTorch's path, bit for bit."""
    from attacks._machinery.convolution import exact_convolutions
    from attacks._machinery.objectives import cosine_distance, dummy_gradients

    obs, _ = convnet_observation(device, width=width, size=size, batch=2)
    model = obs.model.train()
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    target = [torch.randn(p.shape, generator=gen, device=device) for p in params]
    x = torch.randn(2, 3, size, size, generator=gen, device=device, requires_grad=True)
    labels = torch.tensor([1, 0], device=device)
    results = {}
    with deterministic_cudnn():
        for mode in ("on", "off"):
            with exact_convolutions(mode):
                grads = list(dummy_gradients(model, params, x, labels))
            (gx,) = torch.autograd.grad(cosine_distance(grads, target), [x])
            results[mode] = [g.detach() for g in grads] + [gx]
    same = all(torch.equal(a, b) for a, b in zip(results["on"], results["off"], strict=True))
    diff = max_difference(results["on"], results["off"])
    return same, f"objective gradients bit-identical: {same} (max |difference| {diff:.1e})"


def check_exact_convolutions(device: torch.device, args: argparse.Namespace) -> Check:
    """Check 1: values bit for bit, then Inverting Gradients (mode on, off) vs the textbook."""
    from attacks import get_attack
    from attacks._machinery.setup import InversionSetup
    from tests._support.reference import textbook_inverting_gradients

    width, size = (8, 16) if args.quick else (64, 32)
    same_grad, grad_detail = check_exact_gradients(device, width, size)
    obs, _ = convnet_observation(device, width=width, size=size, batch=1)
    short = min(args.iterations, 50)
    with deterministic_cudnn():
        runs = {
            m: get_attack("inverting_gradients", iterations=short, tv=1e-4, exact_convolutions=m)
            .run(obs, LABELS_KNOWN)
            .images
            for m in ("on", "off")
        }
    same_run = torch.equal(runs["on"], runs["off"])
    setup = InversionSetup.from_observation(obs)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = setup.dummy(gen, "randn")
    seconds: dict[str, list[float]] = {"textbook": [], "exact on": [], "exact off": []}
    for _ in range(args.repeats):
        _, s = timed(
            lambda: textbook_inverting_gradients(
                copy.deepcopy(obs.model).train(),
                setup.target,
                obs.labels,
                x0,
                iterations=args.iterations,
                lr=0.1,
                tv=1e-4,
                lower=setup.lower,
                upper=setup.upper,
            ),
            device,
        )
        seconds["textbook"].append(s)
        for mode in ("on", "off"):
            attack = get_attack(
                "inverting_gradients", iterations=args.iterations, tv=1e-4, exact_convolutions=mode
            )
            seconds[f"exact {mode}"].append(
                timed(lambda a=attack: a.run(obs, LABELS_KNOWN), device)[1]
            )
    speed = {k: args.iterations / statistics.median(v) for k, v in seconds.items()}
    figures: dict[str, float | str] = {f"IG it/s ({k})": round(v, 2) for k, v in speed.items()}
    figures["IG vs textbook (exact on)"] = round(speed["exact on"] / speed["textbook"], 3)
    figures["IG vs textbook (exact off)"] = round(speed["exact off"] / speed["textbook"], 3)
    detail = (
        f"{grad_detail}; {short}-iteration IG run with the mode on equals off: {same_run}; "
        f"ConvNet width {width}, {size} px, {args.iterations} iterations"
    )
    return Check("exact convolutions", same_grad and same_run, detail, figures)


def check_batched_victims(device: torch.device, args: argparse.Namespace) -> Check:
    """Check 2: batched victims equal separate runs in float64; float32 speed at 4 and 16."""
    from attacks import get_attack

    granted = LABELS_KNOWN

    width, size = (8, 16) if args.quick else (64, 32)
    counts = (2, 3) if args.quick else (4, 16)
    figures: dict[str, float | str] = {}
    passed, details = True, []
    for count in counts:
        with default_dtype(torch.float64):
            victims = [
                convnet_observation(device, width=width, size=size, batch=1, index=v)[0]
                for v in range(count)
            ]
            attack = get_attack("inverting_gradients", iterations=30, tv=1e-4)
            separate = [attack.run(o, granted).images for o in victims]
            batched = [r.images for r in attack.run_many(victims, granted, batched=True)]
        diff = max_difference(separate, batched)
        passed &= diff <= 1e-9
        details.append(f"{count} victims: float64 max |difference| {diff:.1e}")
        victims = [
            convnet_observation(device, width=width, size=size, batch=1, index=v)[0]
            for v in range(count)
        ]
        attack = get_attack("inverting_gradients", iterations=args.iterations, tv=1e-4)
        get_attack("inverting_gradients", iterations=2).run_many(victims, granted, batched=True)

        def separate_runs(attack: Any = attack, victims: list[Any] = victims) -> list[Any]:
            return [attack.run(o, granted) for o in victims]

        def batched_run(attack: Any = attack, victims: list[Any] = victims) -> list[Any]:
            return attack.run_many(victims, granted, batched=True)

        t_sep = statistics.median(timed(separate_runs, device)[1] for _ in range(args.repeats))
        t_bat = statistics.median(timed(batched_run, device)[1] for _ in range(args.repeats))
        figures[f"{count} victims: separate s"] = round(t_sep, 2)
        figures[f"{count} victims: batched s"] = round(t_bat, 2)
        figures[f"{count} victims: speed-up"] = round(t_sep / t_bat, 2)
    detail = "; ".join(details) + f" (bound 1e-9); speed at {args.iterations} iterations, float32"
    return Check("batched victims", passed, detail, figures)


def pneumonia(root: Path, split: str, count: int) -> Any:
    """The first ``count`` examples of a PneumoniaMNIST split (real chest X-rays)."""
    from fl import data

    return data.load("pneumoniamnist", root=root, split=split).subset(range(count))


def federated_run(
    device: torch.device, train: Any, mode: str, dtype: torch.dtype, rounds: int, width: int
) -> tuple[Any, float]:
    """A FedAvg run of a BatchNorm ConvNet with clients vectorised (``mode``) or not."""
    from fl import models
    from fl.simulation import FederationConfig, PartitionConfig, Simulator

    with default_dtype(dtype):
        torch.manual_seed(0)
        model = models.build("convnet", channels=1, classes=2, image_size=28, width=width)
        cfg = FederationConfig(
            algorithm="fedavg",
            clients=4,
            clients_per_round=4,
            rounds=rounds,
            batch_size=16,
            lr=0.05,
            partition=PartitionConfig(scheme="iid"),
            vectorize_clients=mode,
        )
        sim = Simulator(model, train, cfg, device=device, seed=3)
        sim.train_images = sim.train_images.to(dtype)
        if mode == "on" and not sim.vectorized:
            raise RuntimeError("the simulator did not vectorise the clients")
        return timed(sim.run, device)


def check_vectorized_clients(device: torch.device, args: argparse.Namespace) -> Check:
    """Check 3: vectorised clients equal clients one by one in float64; float32 round time."""
    width = 4 if args.quick else 32
    train = pneumonia(args.data_root, "train", 90 if args.quick else 400)
    runs = [federated_run(device, train, m, torch.float64, 2, width)[0] for m in ("off", "on")]
    weights = [list(r.model.state_dict().values()) for r in runs]
    diff = max_difference([w.double() for w in weights[0]], [w.double() for w in weights[1]])
    seconds = {
        m: statistics.median(
            federated_run(device, train, m, torch.float32, 1, width)[1] for _ in range(args.repeats)
        )
        for m in ("off", "on")
    }
    figures: dict[str, float | str] = {
        "round s (one by one)": round(seconds["off"], 2),
        "round s (vectorised)": round(seconds["on"], 2),
        "speed-up": round(seconds["off"] / seconds["on"], 2),
    }
    detail = (
        f"float64 max |weight difference| after 2 rounds {diff:.1e} (bound 1e-9); 4 clients, "
        f"ConvNet width {width}, {len(train.labels)} X-rays"
    )
    return Check("vectorised clients", diff <= 1e-9, detail, figures)


def tiny_gpu_study(folder: Path, data_root: Path, quick: bool) -> dict[str, Any]:
    """Two trials of a small BatchNorm-ConvNet study sharing one GPU (``resources.gpu 0.5``)."""
    backbone = ROOT.parent / "shared" / "weights" / "lpips_alexnet_features.pth"
    study: dict[str, Any] = {
        "study": "gpu-check",
        "seed": 0,
        "data": {"dataset": "pneumoniamnist", "root": str(data_root), "image_size": 28},
        "model": {"name": "convnet", "width": 8 if quick else 32},
        "federation": {
            "algorithm": "fedsgd",
            "clients": 4,
            "clients_per_round": 4,
            "rounds": 2,
            "batch_size": 4,
            "lr": 0.1,
            "partition": {"scheme": "iid", "max_per_client": 32},
        },
        "defenses": {"none": {}, "gradient_noise": {"scale": 0.01}},
        "attacks": [
            {
                "name": "inverting_gradients",
                "rounds": [0],
                "victims": 2,
                "params": {"iterations": 20 if quick else 200, "tv": 1e-4},
            }
        ],
        "objectives": [
            {"metric": "test_accuracy", "mode": "max"},
            {"metric": "attack_psnr_max", "mode": "min"},
        ],
        "search": {"sampler": "random", "trials": 2, "concurrency": 2},
        "resources": {"cpu": 1, "gpu": 0.5},
        "tracking": {"mlflow_uri": f"sqlite:///{folder}/mlflow.db", "log_images": "none"},
        "output": str(folder / "results"),
    }
    if backbone.exists():
        study["lpips_backbone"] = str(backbone)
    return study


def check_ray_sharing(device: torch.device, args: argparse.Namespace) -> Check:
    """Check 4: two trials at once on one GPU through Ray, each on CUDA, with peak memory."""
    import pandas as pd
    import ray
    import yaml

    from orchestrator import Study
    from orchestrator.config import load_study

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "study.yaml"
        path.write_text(yaml.safe_dump(tiny_gpu_study(folder, args.data_root, args.quick)))
        cfg = load_study(path)
        ray.shutdown()
        ray.init(
            num_cpus=2,
            num_gpus=1,  # one GPU (on --device cpu: a fake one, trials fall back to the CPU)
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        try:
            _, seconds = timed(lambda: Study(cfg).run(verbose=0), device)
        finally:
            ray.shutdown()
        trials = pd.read_parquet(cfg.folder / "trials.parquet")
    done = trials[trials["status"] == "completed"]
    expected = "cuda" if device.type == "cuda" else "cpu"
    devices = sorted(set(done["device"].fillna("")))
    on_device = len(done) == 2 and all(d.startswith(expected) for d in devices)
    ordered = done.sort_values("started_at")
    overlap = len(done) == 2 and bool(
        ordered["started_at"].iloc[1] < ordered["finished_at"].iloc[0]
    )
    peaks = [round(float(v), 1) for v in done["peak_memory_mb"]]
    figures: dict[str, float | str] = {
        "study s": round(seconds, 1),
        "peak memory MiB per trial": ", ".join(map(str, peaks)),
    }
    detail = (
        f"{len(done)} of 2 trials completed on {devices}; ran at the same time: {overlap}; "
        "resources.gpu 0.5, concurrency 2"
    )
    return Check("two trials on one GPU (Ray)", on_device and overlap, detail, figures)


CHECKS: dict[str, Callable[[torch.device, argparse.Namespace], Check]] = {
    "exact": check_exact_convolutions,
    "batched": check_batched_victims,
    "vectorized": check_vectorized_clients,
    "ray": check_ray_sharing,
}


def describe(device: torch.device) -> str:
    """The device and software this run measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"device {device} ({name}), torch {torch.__version__}, cuDNN "
        f"{torch.backends.cudnn.version() if device.type == 'cuda' else '-'}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print a verdict and figures per check; 0 only when all pass."""
    args = parse_args(argv)
    device, reason = gpu_or_message(args.device)
    if device is None:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 1
    needs_data = "vectorized" not in args.skip or "ray" not in args.skip
    if needs_data and not (args.data_root / "pneumoniamnist.npz").exists():
        print(
            f"gpu_check: {args.data_root / 'pneumoniamnist.npz'} not found: pass --data-root "
            "with the MedMNIST file, or --skip vectorized ray",
            file=sys.stderr,
        )
        return 1
    print(describe(device), flush=True)
    results: list[Check] = []
    t0 = time.perf_counter()
    for key, check in CHECKS.items():
        if key in args.skip:
            continue
        started = time.perf_counter()
        result = check(device, args)
        results.append(result)
        verdict = "PASS" if result.passed else "FAIL"
        print(f"[{verdict}] {result.name}: {result.detail} ({time.perf_counter() - started:.0f} s)")
        for name, value in result.figures.items():
            print(f"    {name}: {value}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s; {describe(device)}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"device": describe(device), "checks": [r.__dict__ for r in results]}, indent=2
            )
        )
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
