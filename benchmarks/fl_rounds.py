"""Seconds per federated round and peak memory for a fixed FedAvg workload.

Workload (issue: foundation): 10 clients (all sampled each round), the Inverting-Gradients
ConvNet at width 32, PneumoniaMNIST at 28 px, FedAvg with one local epoch at batch 32, IID split
of the full training set, evaluation on the test split after every round.

    python benchmarks/fl_rounds.py --data-root ../shared/data [--rounds 5] [--device auto]
    python benchmarks/fl_rounds.py --compare-straightforward [--channels-last]
                                   [--parallel-clients 2] [--vectorize-clients on]
                                   [--no-tune-allocator] [--straightforward-again]

``--compare-straightforward`` first runs the same workload as the straightforward sequential
loop a FL tutorial writes (the model deep-copied for every client, a DataLoader over the
client's examples, ``optimizer.step()``, a state-dict average, evaluation with autograd on),
then the simulator, in the same process on the same data and seed, and prints the ratio of
their total times (issue 8's target: at most 0.8). The straightforward loop runs with glibc's
default allocator; the simulator tunes it (``federation.tune_allocator``, process-wide) unless
``--no-tune-allocator``; ``--straightforward-again`` times the straightforward loop once more
after that, so the ratio can also be read with both loops under the tuned allocator.

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
from fl.simulation.allocator import allocator_tuned


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
    parser.add_argument(
        "--compare-straightforward",
        action="store_true",
        help="also time the straightforward sequential loop and print the ratio",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="the simulator's channels-last option (federation.channels_last)",
    )
    parser.add_argument(
        "--parallel-clients",
        type=int,
        default=1,
        help="clients trained at the same time in threads (federation.parallel_clients)",
    )
    parser.add_argument(
        "--vectorize-clients",
        choices=["off", "on", "auto"],
        default="off",
        help="clients trained as one vmapped model (federation.vectorize_clients)",
    )
    parser.add_argument(
        "--no-tune-allocator",
        action="store_true",
        help="leave glibc's allocator at its defaults (federation.tune_allocator: false)",
    )
    parser.add_argument(
        "--straightforward-again",
        action="store_true",
        help="time the straightforward loop again after the simulator (tuned allocator)",
    )
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
        channels_last=args.channels_last,
        parallel_clients=args.parallel_clients,
        vectorize_clients=args.vectorize_clients,
        tune_allocator=not args.no_tune_allocator,
    )
    warm_up(model, train, args.batch_size, device)
    straightforward_total = None
    if args.compare_straightforward:
        straightforward_total = straightforward_loop(model, train, test, cfg, device)
    rss_before = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sim = Simulator(model, train, cfg, test=test, device=device, seed=0)
    print(
        f"device={device} threads={torch.get_num_threads()} clients={args.clients} "
        f"train={len(train)} test={len(test)} params={sum(p.numel() for p in model.parameters())}"
        f" channels_last={cfg.channels_last} parallel_clients={sim.workers} "
        f"vectorized={sim.vectorized} allocator={'tuned' if allocator_tuned() else 'default'}"
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
    sim.close()
    print(
        f"seconds per round: median {statistics.median(times):.2f}, "
        f"min {min(times):.2f}, max {max(times):.2f}; total {total:.1f} s for {args.rounds} rounds"
    )
    if straightforward_total is not None:
        print(
            f"simulator / straightforward loop (default allocator): {total:.1f} s / "
            f"{straightforward_total:.1f} s = {total / straightforward_total:.2f}"
        )
        if args.straightforward_again:
            again = straightforward_loop(model, train, test, cfg, device)
            print(
                f"simulator / straightforward loop, both with the "
                f"{'tuned' if allocator_tuned() else 'default'} allocator: {total:.1f} s / "
                f"{again:.1f} s = {total / again:.2f}"
            )
    print(f"peak RSS: {peak_rss_mb():.0f} MiB (before the run: {rss_before:.0f} MiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


def warm_up(
    model: torch.nn.Module, train: data.ImageData, batch_size: int, device: torch.device
) -> None:
    """A few untimed training steps in both memory formats, on one and on all threads, so that
    neither timed loop pays the process's one-time costs (oneDNN kernel generation, first-touch
    memory) that the other then skips."""
    import copy

    import torch.nn.functional as F

    x = train.float_images()[:batch_size].to(device)
    y = train.labels[:batch_size].to(device)
    threads = torch.get_num_threads()
    for fmt in (torch.contiguous_format, torch.channels_last):
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            local = copy.deepcopy(model).to(device).to(memory_format=fmt)
            xf = x.contiguous(memory_format=fmt)
            for _ in range(3):
                F.cross_entropy(local(xf), y).backward()
    torch.set_num_threads(threads)


def straightforward_loop(
    model: torch.nn.Module,
    train: data.ImageData,
    test: data.ImageData,
    cfg: FederationConfig,
    device: torch.device,
) -> float:
    """The workload as a plain FL tutorial loop; prints per-round times, returns the total."""
    import copy

    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from fl.simulation.normalization import normalize

    parts = data.partition(train.labels.numpy(), cfg.clients, scheme="iid", seed=0)
    x_train = normalize(train.float_images(), train.mean, train.std)
    x_test = normalize(test.float_images(), train.mean, train.std).to(device)
    y_test = test.labels.to(device)
    global_model = copy.deepcopy(model).to(device)
    generator = torch.Generator().manual_seed(0)
    print("straightforward loop:")
    times = []
    t_all = time.perf_counter()
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        states, sizes = [], []
        for part in parts:
            local = copy.deepcopy(global_model)
            local.train()
            opt = torch.optim.SGD(local.parameters(), lr=cfg.lr)
            idx = torch.as_tensor(part)
            loader = DataLoader(
                TensorDataset(x_train[idx], train.labels[idx]),
                batch_size=cfg.batch_size,
                shuffle=True,
                generator=generator,
            )
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(local(xb.to(device)), yb.to(device)).backward()
                opt.step()
            states.append(local.state_dict())
            sizes.append(len(part))
        weights = [n / sum(sizes) for n in sizes]
        averaged = {
            k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)).to(v.dtype)
            for k, v in states[0].items()
        }
        global_model.load_state_dict(averaged)
        global_model.eval()
        correct = 0
        for start in range(0, len(x_test), cfg.batch_size):  # autograd left on
            logits = global_model(x_test[start : start + cfg.batch_size])
            correct += int((logits.argmax(1) == y_test[start : start + cfg.batch_size]).sum())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        print(f"{rnd:>5} {times[-1]:>8.2f} {'':>10} {correct / len(x_test):>8.4f}")
    total = time.perf_counter() - t_all
    print(f"straightforward loop: {total:.1f} s for {cfg.rounds} rounds")
    return total


if __name__ == "__main__":
    sys.exit(main())
