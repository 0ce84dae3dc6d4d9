"""train.py under the launchers of GPU boxes and clusters: torchrun killed with kill -9, SIGTERM through torchrun
with a step longer than its grace, and train.sh's settings for both."""

import os
import signal
import subprocess
import time

from conftest import ROOT, process_table, tiny, torchrun, train_losses
from test_faults import wait_for_step


def test_ranks_whose_torchrun_is_killed_stop_within_seconds_with_a_checkpoint_and_free_the_out_dir(data_dir, tmp_path):
    out = tmp_path / "run"

    def args(max_steps, *extra):
        return tiny(data_dir, out, "--max-steps", max_steps, "--checkpoint-interval", 0, "--eval-interval", 0,
                    "--sample-interval", 0, *extra)  # fmt: skip

    proc = subprocess.Popen(torchrun("train.py", *args(10_000)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    wait_for_step(out, 3, proc)
    ranks = [pid for pid, (parent, _) in process_table().items() if parent == proc.pid]  # in sessions of their own
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its ranks are left with no one to supervise them
    t0 = time.time()
    while any(pid in process_table() for pid in ranks) and time.time() - t0 < 60:
        time.sleep(0.2)
    assert not any(pid in process_table() for pid in ranks), "ranks still running a minute after torchrun was killed"
    stdout, stderr = proc.communicate()
    last = max(train_losses(out))
    assert f"stopped by SIGTERM after step {last}" in stdout, stdout[-2000:] + stderr[-2000:]
    assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"]  # as if preempted
    r = subprocess.run(torchrun("train.py", *args(last + 3, "--resume")), capture_output=True, text=True, timeout=300,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]  # the lock went with the ranks
    assert max(train_losses(out)) > last


def start_train_sh(data_dir, out, **env):
    """train.sh with two ranks under torchrun on the CPU, each step about 3 s (32 micro-steps of accumulation)."""
    args = tiny(data_dir, out, "--max-steps", 10_000, "--total-batch", 8192, "--checkpoint-interval", 0,
                "--eval-interval", 0, "--sample-interval", 0)  # fmt: skip
    return subprocess.Popen([os.path.join(ROOT, "train.sh"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, NGPU="2", PYTHONUNBUFFERED="1", **env))  # fmt: skip


def test_sigterm_through_train_sh_gives_the_ranks_time_for_a_step_longer_than_torchruns_own_grace(data_dir, tmp_path):
    """With torchrun's own grace (here 1 s) a step longer than it is killed and the checkpoint lost; train.sh gives
    the ranks 300 s, and they finish the step and write the checkpoint."""
    for grace, checkpointed in (("1", False), (None, True)):
        out = tmp_path / f"grace{grace}"
        proc = start_train_sh(data_dir, out, **({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": grace} if grace else {}))
        wait_for_step(out, 1, proc, timeout=300)
        time.sleep(0.5)  # inside the next step
        proc.send_signal(signal.SIGTERM)  # to torchrun: train.sh execs it
        stdout, stderr = proc.communicate(timeout=300)
        last = max(train_losses(out))
        assert bool(list(out.glob("ckpt_*.pt"))) == checkpointed, (grace, stdout[-2000:], stderr[-3000:])
        if checkpointed:
            assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"]
            assert f"stopped by SIGTERM after step {last}" in stdout
            assert proc.returncode != 0  # torchrun's own status after a signal (1), whatever its ranks did
        else:
            assert "forcefully exiting via 9" in stderr or proc.returncode != 0, stderr[-3000:]
