"""train.py under the launchers of GPU boxes and clusters: torchrun or train.sh killed with kill -9, SIGTERM to train.sh
alone (Kubernetes) or to every process (SLURM) with a step longer than the grace, and train.sh's settings."""

import os
import signal
import subprocess
import time

from checkpoint import read_jsonl
from conftest import (
    ROOT,
    Started,
    cli,
    descendants,
    ok,
    one_thread_env,
    process_table,
    tiny,
    torchrun,
    train_losses,
    wait_gone,
)


def test_ranks_whose_torchrun_is_killed_stop_within_seconds_with_a_checkpoint_and_free_the_out_dir(data_dir, tmp_path):
    out = tmp_path / "run"

    def args(max_steps, *extra):
        return tiny(data_dir, out, "--max-steps", max_steps, "--checkpoint-interval", 0, "--eval-interval", 0,
                    "--sample-interval", 0, *extra)  # fmt: skip

    run = Started(torchrun("train.py", *args(10_000)), start_new_session=True)
    run.wait_for_step(2)
    ranks = [pid for pid, (parent, _) in process_table().items() if parent == run.pid]  # in sessions of their own
    assert len(ranks) == 2
    os.kill(run.pid, signal.SIGKILL)  # the launcher only: its ranks are left with no one to supervise them
    assert not wait_gone(ranks, timeout=60), "ranks still running a minute after torchrun was killed"
    r = run.finish()
    last = max(train_losses(out))
    assert f"stopped by SIGTERM after step {last}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"]  # as if preempted
    ok(cli("train.py", *args(last + 3, "--resume")))  # the lock went with the ranks (on one process: a checkpoint
    assert max(train_losses(out)) > last  # does not depend on the number of processes)


def start_train_sh(data_dir, out, total_batch=8192, **env):
    """train.sh with two ranks under torchrun on the CPU; a step is total_batch / 512 micro-steps of accumulation."""
    args = tiny(data_dir, out, "--max-steps", 10_000, "--total-batch", total_batch, "--checkpoint-interval", 0,
                "--eval-interval", 0, "--sample-interval", 0)  # fmt: skip
    return Started([os.path.join(ROOT, "train.sh"), *args], env=dict(os.environ, NGPU="2", **env))


def check_stopped(run, out, signum, since, within):
    """train.sh exited with the signal's status, after the ranks wrote the checkpoint of the steps they finished."""
    r = run.finish(timeout=300)
    elapsed, last = time.time() - since, max(train_losses(out))
    assert r.returncode == 128 + signum, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "forcefully exiting" not in r.stderr, r.stderr[-3000:]  # torchrun's word for ranks killed at the grace's end
    assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"], r.stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name} after step {last}" in r.stdout
    assert read_jsonl(out / "log.jsonl")[-1]["event"] == "stopped"
    assert elapsed < within, elapsed
    return elapsed


def slowest_step_s(out):
    return max(r["dt_ms"] for r in read_jsonl(out / "log.jsonl") if "dt_ms" in r) / 1000


def test_sigterm_to_train_sh_stops_the_ranks_inside_a_step_longer_than_the_grace_and_exits_143(data_dir, tmp_path):
    """Kubernetes signals only the container's first process. Steps of about 8 s (128 micro-steps), torchrun's grace
    4 s: the ranks stop at the next micro-step, so they have written the checkpoint and ended before it is over."""
    out = tmp_path / "run"
    run = start_train_sh(data_dir, out, total_batch=32768, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="4")
    run.wait_for_step(0, timeout=300)  # the next step has begun
    t0 = time.time()
    run.send_signal(signal.SIGTERM)  # to train.sh alone
    elapsed = check_stopped(run, out, signal.SIGTERM, t0, within=30)
    assert slowest_step_s(out) > 4  # the steps are longer than the grace: a stop at the step's end would be killed
    print(f"SIGTERM inside {slowest_step_s(out):.1f} s steps with a 4 s grace: the checkpoint written, train.sh "
          f"exited 143 {elapsed:.1f} s later")  # fmt: skip


def test_a_signal_to_every_process_at_once_as_slurm_sends_it_is_one_stop(data_dir, tmp_path):
    """SLURM signals every process of the job: train.sh, torchrun and the ranks, which then get it again from
    torchrun. Before the ranks took a repeat as the same stop, the second one killed them without a checkpoint."""
    out = tmp_path / "run"
    run = start_train_sh(data_dir, out, total_batch=32768, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="4")
    run.wait_for_step(0, timeout=300)  # the next step has begun
    t0 = time.time()
    for pid in [run.pid, *descendants(run.pid)]:
        os.kill(pid, signal.SIGTERM)
    check_stopped(run, out, signal.SIGTERM, t0, within=30)
    assert slowest_step_s(out) > 4


def test_train_sh_killed_with_kill_9_stops_torchrun_and_the_ranks_with_a_checkpoint(data_dir, tmp_path):
    """torchrun runs under train.sh with a parent-death signal: train.sh gone, torchrun stops the ranks gracefully."""
    out = tmp_path / "run"
    run = start_train_sh(data_dir, out, total_batch=2048)
    run.wait_for_step(1, timeout=300)
    below = descendants(run.pid)
    assert len(below) == 3  # torchrun and two ranks
    run.proc.kill()
    t0 = time.time()
    r = run.finish()  # until the last of them, which share its pipes, has ended
    assert not wait_gone(below, timeout=10), "torchrun or a rank outlived train.sh"
    last = max(train_losses(out))
    assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"], r.stderr[-3000:]
    assert f"stopped by SIGTERM after step {last}" in r.stdout
    assert time.time() - t0 < 60


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return {k.decode(): v.decode() for k, _, v in (e.partition(b"=") for e in f.read().split(b"\0") if b"=" in e)}


def rank_of(pid):
    return int(environ_of(pid)["RANK"])


def test_a_rank_killed_under_max_restarts_is_started_again_and_the_job_ends_as_unbroken_runs_do(data_dir, tmp_path):
    def args(out):
        return tiny(data_dir, out, "--max-steps", 12, "--checkpoint-interval", 4, "--eval-interval", 0,
                    "--sample-interval", 0)  # fmt: skip

    env = dict(one_thread_env(), NGPU="2", MAX_RESTARTS="1")
    train_sh = os.path.join(ROOT, "train.sh")
    straight = Started([train_sh, *args(tmp_path / "straight")], env=env)
    out = tmp_path / "run"
    run = Started([train_sh, *args(out)], env=env, start_new_session=True)  # side by side: 2 ranks on 2 cores each
    run.wait_for_step(5)  # past the checkpoint written after step 3
    ranks = {rank_of(pid): pid for pid in descendants(run.pid) if "RANK" in environ_of(pid)}
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[0], signal.SIGKILL)  # the rank that logs and writes the checkpoints
    t0 = time.time()
    r = run.finish(timeout=300)
    assert r.returncode == 0, r.stderr[-9000:]  # the job finished on its own
    assert straight.finish(timeout=300).returncode == 0
    resumes = [r for r in read_jsonl(out / "log.jsonl") if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] in (4, 8), resumes
    assert train_losses(out) == train_losses(tmp_path / "straight")  # every step, as if never killed
    print(f"rank 0 killed after step 5: resumed at step {resumes[0]['step']}, done {time.time() - t0:.1f} s later")


def test_train_sh_under_slurm_finds_the_nodes_itself_and_passes_max_restarts(tmp_path, monkeypatch):
    for key in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(  # SLURM's own: the hosts of a node list, one a line
        f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1 $2" = "show hostnames" ] || exit 1\necho gpu-07\necho gpu-08\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu-[07-08]")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TRAIN_SH_DRY_RUN="1", NGPU="8", **slurm)

    def command(**extra):
        r = subprocess.run([os.path.join(ROOT, "train.sh"), "--preset", "gpt2-124m"], capture_output=True, text=True,
                           env=dict(env, **extra))  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().replace(f"{ROOT}/train.py", "train.py")  # the repo's train.py, by its full path

    rdzv = "--rdzv-backend c10d --rdzv-endpoint gpu-07:29500 --rdzv-id 4242"
    assert command() == f"torchrun --nnodes 2 --nproc_per_node 8 {rdzv} train.py --preset gpt2-124m"
    assert calls.read_text() == "show hostnames gpu-[07-08]\n"
    assert command(MAX_RESTARTS="3") == f"torchrun --nnodes 2 --nproc_per_node 8 {rdzv} --max-restarts 3 train.py " \
        "--preset gpt2-124m"  # fmt: skip
    assert "--rdzv-endpoint 10.1.1.1:29400" in command(MASTER_ADDR="10.1.1.1", MASTER_PORT="29400")  # ours win
    one = command(SLURM_NNODES="1", SLURM_NODEID="0")
    assert one == "torchrun --standalone --nproc_per_node 8 train.py --preset gpt2-124m"  # one node: no rendezvous
    r = subprocess.run([os.path.join(ROOT, "train.sh")], capture_output=True, text=True,
                       env=dict(env, PATH=os.environ["PATH"]))  # fmt: skip
    assert r.returncode == 2 and "error: " in r.stderr.strip().splitlines()[-1], r.stderr
