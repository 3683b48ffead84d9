"""Seconds per federated round and peak memory for a fixed FedAvg workload.

Workload (issue: foundation): 10 clients (all sampled each round), the Inverting-Gradients
ConvNet at width 32, PneumoniaMNIST at 28 px, FedAvg with one local epoch at batch 32, IID split
of the full training set, evaluation on the test split after every round.

    python benchmarks/fl_rounds.py --data-root ../shared/data [--rounds 5] [--device auto]

Run it on an idle machine: on 2 cores any other process slows torch many times over.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from fl import data, models
from fl.simulation import FederationConfig, PartitionConfig, Simulator, resolve_device


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=default_root,
        help="folder holding pneumoniamnist.npz (default: ../shared/data)",
    )
    parser.add_argument("--download", action="store_true", help="download the dataset if absent")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    train = data.load("pneumoniamnist", root=args.data_root, split="train", download=args.download)
    test = data.load("pneumoniamnist", root=args.data_root, split="test", download=args.download)
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=args.width)
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=args.clients,
        clients_per_round=args.clients,
        rounds=args.rounds,
        local_epochs=1,
        batch_size=args.batch_size,
        lr=0.01,
        partition=PartitionConfig(scheme="iid"),
    )
    rss_before = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sim = Simulator(model, train, cfg, test=test, device=device, seed=0)
    print(
        f"device={device} threads={torch.get_num_threads()} clients={args.clients} "
        f"train={len(train)} test={len(test)} params={sum(p.numel() for p in model.parameters())}"
    )
    print(f"{'round':>5} {'seconds':>8} {'train_loss':>10} {'test_acc':>8}")
    times = []
    t_all = time.perf_counter()
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        rec = sim.run_round()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        print(
            f"{rec.round:>5} {times[-1]:>8.2f} {rec.train_loss:>10.4f} "
            f"{rec.metrics['accuracy']:>8.4f}"
        )
    total = time.perf_counter() - t_all
    print(
        f"seconds per round: median {statistics.median(times):.2f}, "
        f"min {min(times):.2f}, max {max(times):.2f}; total {total:.1f} s for {args.rounds} rounds"
    )
    print(f"peak RSS: {peak_rss_mb():.0f} MiB (before the run: {rss_before:.0f} MiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
