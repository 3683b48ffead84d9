"""End to end: a real study on local Ray, with Parquet, MLflow, the Pareto flag and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from defenses import Defense, DefenseParams, register_defense, unregister_defense
from orchestrator import Study
from orchestrator.config import load_study

ROOT = Path(__file__).resolve().parents[2]


def _children(uri: str, study: str) -> tuple[object, list]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_study_end_to_end_on_local_ray(completed_study) -> None:
    cfg, results = completed_study
    folder = cfg.folder
    trials = pd.read_parquet(folder / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "completed").all()
    # the first trials are the control and each defense at its defaults
    assert set(trials["defense"]) == {"none", "gradient_noise", "prune"}
    for metric in (
        "test_accuracy",
        "attack_psnr_max",
        "attack_psnr_gain_max",
        "attack_prior_gain_max",
        "attack_identification_rate",
        "attack_identification_rate_lpips",
    ):
        assert trials[metric].notna().all()
        assert all(math.isfinite(v) for v in trials[metric])
    assert (trials["attack_psnr_gain_max"] < trials["attack_psnr_max"]).all()
    assert trials["pareto"].any()
    assert set(results.front["trial_id"]) == set(trials.loc[trials["pareto"], "trial_id"])
    assert trials["accuracy_drop"].notna().all()
    rounds = pd.read_parquet(folder / "rounds.parquet")
    assert len(rounds) == 4 * 2 and set(rounds["round"]) == {0, 1}
    attacks = pd.read_parquet(folder / "attacks.parquet")
    assert len(attacks) == 4 * 2  # one victim of batch 2 per trial
    assert attacks["psnr"].notna().all() and attacks["lpips"].notna().all()
    for column in ("psnr_gain", "prior_psnr", "prior_ssim", "prior_gain", "id_rank"):
        assert attacks[column].notna().all(), column
    assert (attacks["prior_gain"] == attacks["psnr"] - attacks["prior_psnr"]).all()
    assert (attacks["identified"] == (attacks["id_rank"] == 1)).all()
    assert attacks["id_rank_lpips"].notna().all()  # LPIPS's backbone is given
    assert (folder / "pareto.png").stat().st_size > 0
    assert (folder / "optuna.db").exists()
    parents, children = _children(cfg.tracking.mlflow_uri, cfg.study)
    assert len(parents) == 1 and len(children) == 4
    assert {c.info.run_id for c in children} == set(trials["mlflow_run_id"])
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["defense"] in {"none", "gradient_noise", "prune"}
        assert "test_accuracy" in child.data.metrics
        row = trials.loc[trials["mlflow_run_id"] == child.info.run_id].iloc[0]
        for name in ("idlg_psnr_gain_mean", "attack_psnr_gain_max", "attack_prior_gain_max"):
            assert child.data.metrics[name] == pytest.approx(row[name]), name
        assert [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        history = client.get_metric_history(child.info.run_id, "test_accuracy")
        assert sorted(m.step for m in history) == [0, 1]  # step = round
        last = max(history, key=lambda m: m.step).value
        assert last == pytest.approx(child.data.metrics["test_accuracy"])
    assert parents[0].info.status == "FINISHED"


def test_fake_gpus_are_assigned_and_trials_fall_back_to_cpu(tiny_study) -> None:
    import ray

    ray.shutdown()
    ray.init(
        num_cpus=4,
        num_gpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        cfg = load_study(
            tiny_study({"resources": {"cpu": 0.5, "gpu": 0.5}, "search.concurrency": 4})
        )
        Study(cfg).run(verbose=0)
    finally:
        ray.shutdown()
    _, children = _children(cfg.tracking.mlflow_uri, cfg.study)
    ids = [json.loads(child.data.tags["gpu_ids"]) for child in children]
    assert all(len(i) == 1 for i in ids)
    counts: dict[str, int] = {}
    for (gpu,) in ids:
        counts[gpu] = counts.get(gpu, 0) + 1
    assert set(counts) == {"0", "1"} and max(counts.values()) <= 2
    expected = "cuda:0" if _cuda() else "cpu"
    assert {child.data.tags["device"] for child in children} == {expected}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_sigint() -> None:
    """In the driver's child process: SIGINT as in a terminal. A shell starts background jobs
    with SIGINT ignored, and a process inherits that (seen: pytest started with ``&`` made the
    driver ignore the test's Ctrl-C and finish the study)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_study(path: Path) -> tuple[subprocess.Popen, Path]:
    """Run ``python -m orchestrator study PATH`` in its own process group; its stderr goes to
    a file beside the study file (a pipe nobody reads could fill and block the driver)."""
    err = path.with_suffix(".stderr")
    with err.open("w") as stream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "study", str(path)],
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_default_sigint,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
    return proc, err


def _wait_for(trials_file: Path, ready, what: str) -> None:
    """Poll ``trials.parquet`` until ``ready(df)`` holds (5 minutes at most)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if trials_file.exists() and ready(pd.read_parquet(trials_file)):
            return
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen in time")


def _resume_to_completion(path: Path, trials_file: Path) -> None:
    """``--resume`` the study; it ends with exactly its 4 trials completed, none twice."""
    resumed = subprocess.run(
        [sys.executable, "-m", "orchestrator", "study", str(path), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    df = pd.read_parquet(trials_file)
    assert df["trial_id"].is_unique
    assert (df["status"] == "completed").sum() == 4 and len(df) == 4


@pytest.mark.slow
def test_killed_study_resumes_to_exactly_the_requested_trials(tiny_study) -> None:
    """SIGKILL the driver after its first completed trial; --resume finishes the study."""
    path = tiny_study({"search.concurrency": 1})
    cfg = load_study(path)
    proc, _ = _start_study(path)
    trials_file = cfg.folder / "trials.parquet"
    try:
        _wait_for(trials_file, lambda df: (df["status"] == "completed").sum() >= 1, "a first trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _resume_to_completion(path, trials_file)
    parents, children = _children(cfg.tracking.mlflow_uri, cfg.study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 4
    assert not [c for c in children if c.info.status == "RUNNING"]
    import optuna

    study = optuna.load_study(study_name=cfg.study, storage=f"sqlite:///{cfg.folder}/optuna.db")
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4


class _Exploding(Defense):
    """A user's defense that always fails: a trial that raises must be recorded as failed while
    the study goes on (and custom defenses must reach Ray's workers)."""

    def transform_batch(self, images, labels, model, ctx):
        raise RuntimeError("bug in a custom defense")


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tiny_study, local_ray_run) -> None:
    register_defense("exploding")(_Exploding)
    try:
        cfg = load_study(
            tiny_study(
                {
                    "defenses": {"none": {}, "exploding": {}},
                    "search.trials": 2,
                }
            )
        )
        local_ray_run(cfg)
    finally:
        unregister_defense("exploding")
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert len(trials) == 2
    failed = trials[trials["status"] == "failed"]
    assert len(failed) == 1 and failed["defense"].iloc[0] == "exploding"
    assert "bug in a custom defense" in failed["error"].iloc[0]
    assert (trials["status"] == "completed").sum() == 1
    _, children = _children(cfg.tracking.mlflow_uri, cfg.study)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]


def test_preflight_rejects_degenerate_settings_before_any_work(
    tiny_study, tmp_path, capsys
) -> None:
    import ray

    from orchestrator.cli import main

    too_many = tiny_study({"federation.clients": 5000}, name="many.yaml")
    assert main(["study", str(too_many)]) == 2
    assert "exceeds the 4708 training examples" in capsys.readouterr().err
    missing = tiny_study({"data.root": str(tmp_path / "nowhere")}, name="missing.yaml")
    assert main(["study", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "pneumoniamnist.npz" in err and "Traceback" not in err
    gpu = tiny_study({"resources": {"cpu": 1, "gpu": 1}}, name="gpu.yaml")
    ray.shutdown()
    ray.init(
        num_cpus=1,
        num_gpus=0,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        assert main(["study", str(gpu)]) == 2
    finally:
        ray.shutdown()
    assert "the Ray cluster has no GPU" in capsys.readouterr().err
    for path in (too_many, missing, gpu):
        cfg_folder = tmp_path / "results" / "tiny"
        assert not (cfg_folder / "trials.parquet").exists(), path


class _Slow(Defense):
    """A user's defense that only takes time (0.5 s a batch), so a test can hit a trial
    mid-run."""

    def transform_batch(self, images, labels, model, ctx):
        time.sleep(0.5)
        return images


@pytest.mark.slow
def test_losing_a_worker_node_reschedules_the_trial(tiny_study) -> None:
    """Remove the node a trial runs on; Ray Tune retries it (search.max_failures) on another."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    register_defense("slow")(_Slow)
    cfg = load_study(
        tiny_study(
            {
                "defenses": {"slow": {}},
                "search": {"sampler": "random", "trials": 1, "concurrency": 1, "max_failures": 2},
                "federation.rounds": 20,  # 40 batches of 0.5 s: long enough to be hit mid-trial
            }
        )
    )
    ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
    first = cluster.add_node(num_cpus=1)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["results"] = Study(cfg).run(verbose=0)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    try:
        thread.start()
        trials_file = cfg.folder / "trials.parquet"
        deadline = time.time() + 120
        while time.time() < deadline:
            if trials_file.exists() and (pd.read_parquet(trials_file)["status"] == "running").any():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the trial did not start")
        time.sleep(3)  # mid-trial
        now = pd.read_parquet(trials_file)
        assert (now["status"] == "running").all(), (
            cfg.defenses,
            cfg.federation.rounds,
            str(cfg.folder),
        )
        cluster.add_node(num_cpus=1)
        cluster.remove_node(first, allow_graceful=False)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the study did not finish after the node loss"
    finally:
        ray.shutdown()
        cluster.shutdown()
        unregister_defense("slow")
    assert "error" not in outcome, outcome.get("error")
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert len(trials) == 1 and trials["status"].iloc[0] == "completed"
    assert trials["test_accuracy"].notna().all()
    assert trials["retries"].iloc[0] >= 1  # the node loss hit the running trial


class _FlakyParams(DefenseParams):
    log: str = ""
    fail_at_round: int = 2


class _Flaky(Defense):
    """A user's defense that crashes once, at the first batch of ``fail_at_round`` (its first
    attempt only), and logs every (round, client) it trains, so a test can see which rounds
    the retry ran again."""

    Params = _FlakyParams

    def transform_batch(self, images, labels, model, ctx):
        log = Path(self.params.log)
        if ctx.step == 0:
            with log.open("a") as f:
                f.write(f"{ctx.round} {ctx.client}\n")
            crashed = log.with_suffix(".crashed")
            if ctx.round == self.params.fail_at_round and not crashed.exists():
                crashed.touch()
                raise RuntimeError("the node went away")
        return images


def test_a_retried_trial_resumes_from_its_round_checkpoint(tiny_study, tmp_path) -> None:
    """A trial that fails in round 2 of 4 is retried (search.max_failures) from its checkpoint
    after round 1: rounds 0 and 1 are not trained again, and the result equals a trial that
    never failed. The trial that never failed runs on one torch thread, as Ray's one-CPU
    worker does (OMP_NUM_THREADS=1): kernels may sum in another order on more threads, which
    iDLG's L-BFGS would amplify."""
    import ray
    import torch

    from orchestrator.trial import run_trial

    log = tmp_path / "rounds.log"
    register_defense("flaky")(_Flaky)
    try:
        cfg = load_study(
            tiny_study(
                {
                    "defenses": {"flaky": {"log": str(log)}},
                    "search": {"sampler": "random", "trials": 1, "max_failures": 1},
                    "federation.rounds": 4,
                    "attacks": [
                        {
                            "name": "idlg",
                            "rounds": [0, 3],
                            "victims": 1,
                            "params": {"iterations": 2},
                        }
                    ],
                }
            )
        )
        ray.shutdown()
        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            Study(cfg).run(verbose=0)
        finally:
            ray.shutdown()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            clean = run_trial(cfg, "none", {})
        finally:
            torch.set_num_threads(threads)
    finally:
        unregister_defense("flaky")
    trained = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    rounds = [r for r, _ in trained]
    per_round = cfg.federation.clients_per_round
    # first attempt: rounds 0, 1 and the crash at 2's first client; the retry: rounds 2 and 3
    assert rounds.count(0) == rounds.count(1) == per_round, trained
    assert rounds.count(2) == per_round + 1 and rounds.count(3) == per_round, trained
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert len(trials) == 1 and trials["status"].iloc[0] == "completed"
    assert trials["retries"].iloc[0] == 1
    for key in ("test_accuracy", "attack_psnr_max"):
        assert trials[key].iloc[0] == pytest.approx(clean.metrics[key], abs=1e-9), key
    rounds_table = pd.read_parquet(cfg.folder / "rounds.parquet")
    assert sorted(rounds_table["round"]) == [0, 1, 2, 3]
    attacks = pd.read_parquet(cfg.folder / "attacks.parquet")
    assert sorted(set(attacks["round"])) == [0, 3]
    # the checkpoints (captured updates, private images) are gone once the trial completed
    assert not list((cfg.folder / "ray").rglob("simulator.pt"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_tracking_server_and_ray_address_are_one_line_errors(
    tiny_study, tmp_path, capsys
) -> None:
    """Nothing listens on the port: exit 1 in seconds, a message naming the address and the
    fix, no traceback, nothing written (Ray alone would wait for minutes)."""
    import ray

    from orchestrator.cli import main

    ray.shutdown()
    port = _free_port()
    tracking = tiny_study({"tracking.mlflow_uri": f"http://127.0.0.1:{port}"}, name="tracking.yaml")
    started = time.perf_counter()
    assert main(["study", str(tracking)]) == 1
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "mlflow server" in err, err
    assert "Traceback" not in err
    study = tiny_study(name="ray.yaml")
    assert main(["study", str(study), "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "ray start --head" in err, err
    assert "Traceback" not in err
    assert time.perf_counter() - started < 60
    assert not ray.is_initialized()
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_study_cleanly_and_says_how_to_resume(tiny_study) -> None:
    """SIGINT to the driver's process group (what Ctrl-C does) mid-study: exit status 130, the
    resume command printed, no traceback; ``--resume`` then completes the study. Inverting
    Gradients with 3,000 iterations makes each trial last ~2 s: with reused workers the tiny
    study's own trials take ~0.2 s, too short to be caught mid-study."""
    slow_attack = [
        {
            "name": "inverting_gradients",
            "rounds": [0],
            "victims": 1,
            "params": {"iterations": 3000},
        }
    ]
    path = tiny_study({"search.concurrency": 1, "attacks": slow_attack})
    cfg = load_study(path)
    proc, err_file = _start_study(path)
    trials_file = cfg.folder / "trials.parquet"
    try:
        _wait_for(
            trials_file,
            lambda df: (
                (df["status"] == "completed").sum() >= 1 and (df["status"] == "running").any()
            ),
            "a second trial",
        )
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_file.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err, err[-3000:]
    df = pd.read_parquet(trials_file)
    assert (df["status"] == "completed").sum() < 4
    _resume_to_completion(path, trials_file)
    _, children = _children(cfg.tracking.mlflow_uri, cfg.study)
    assert not [c for c in children if c.info.status == "RUNNING"]
