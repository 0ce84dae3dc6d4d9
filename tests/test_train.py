"""train.py and train.sh: the reference configuration, DDP equivalence, exact resume, logs, checkpoints, quick start."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoint import load_checkpoint, read_log, save_checkpoint
from conftest import ROOT, free_port, one_thread_env, run_script, tiny, torchrun, torchrun_node, train_losses


def run_train(*args, **kw):
    r = run_script("train.py", *args, **kw)
    assert r.returncode == 0, r.stderr
    return r


def test_reference_run_configuration():
    c = train.parse_config([])
    assert (c.n_layer, c.n_head, c.n_embd, c.micro_batch, c.seq_len, c.total_batch) == (12, 12, 768, 64, 1024, 524_288)
    assert (c.max_steps, c.warmup_steps, c.max_lr, c.max_lr * c.min_lr_ratio) == (9537, 715, 6e-4, pytest.approx(6e-5))
    assert (c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (c.eval_interval, c.hellaswag_interval, c.sample_interval, c.checkpoint_interval) == (250, 250, 250, 1000)
    assert 5e9 / c.total_batch == pytest.approx(c.max_steps, abs=1)
    big = train.parse_config(["--preset", "gpt2-1558m", "--micro-batch", "4"])
    assert (big.n_layer, big.n_head, big.n_embd, big.micro_batch) == (
        48,
        25,
        1600,
        4,
    )  # an explicit flag beats the preset
    assert (
        train.parse_config(["--preset", "gpt2-350m"]).n_embd == 1024
        and train.parse_config(["--preset", "gpt2-774m"]).n_layer == 36
    )
    assert train.parse_config(["--no-compile"]).compile is False and train.parse_config([]).compile is None


def test_lr_schedule():
    c = train.parse_config([])
    lrs = [train.get_lr(s, c) for s in range(c.max_steps + 1)]
    assert lrs[0] == pytest.approx(6e-4 / 715) and lrs[0] > 0
    assert lrs[714] == pytest.approx(6e-4)
    assert all(a < b for a, b in zip(lrs[:714], lrs[1:715]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[715:], lrs[716:]))  # then only down
    middle = 715 + (c.max_steps - 715) // 2
    assert lrs[middle] == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)  # cosine: half way at half time
    assert lrs[-1] == pytest.approx(6e-5) and train.get_lr(10**6, c) == pytest.approx(6e-5)


def test_log_checkpoints_samples_plot_and_export(data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny(data_dir, out, "--keep-checkpoints", 2, "--export", tmp_path / "hf"))
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = lines[0]
    assert (
        first["event"] == "config"
        and first["world_size"] == 1
        and first["grad_accum_steps"] == 4
        and first["total_batch"] == 512
    )
    steps = [r for r in lines if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(20))
    assert {"step", "train_loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec"} <= set(steps[0])
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    samples = [r for r in lines if "samples" in r]
    assert [r["step"] for r in samples] == [10, 20] and all(isinstance(t, str) for t in samples[0]["samples"])
    assert sorted(os.listdir(out)) == ["ckpt_000015.pt", "ckpt_000020.pt", "log.jsonl", "loss.png", "train.lock"]
    ckpt = load_checkpoint(str(out / "ckpt_000020.pt"))
    assert {"model", "optimizer", "model_config", "config", "step", "train_loader", "rng", "val_loss"} <= set(ckpt)
    assert ckpt["step"] == 20 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "misc", "plot_log.py"), out / "log.jsonl", tmp_path / "again.png"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and (tmp_path / "again.png").exists()

    from transformers import GPT2LMHeadModel

    from checkpoint import load_model

    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(str(out / "ckpt_000020.pt"))
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (hf_model(idx).logits - ours(idx)[0][..., :50257]).abs().max().item() < 1e-4


def test_two_processes_give_the_same_losses_as_one(data_dir, tmp_path):
    run_train(*tiny(data_dir, tmp_path / "one", "--max-steps", 8))
    cmd = torchrun("train.py", *tiny(data_dir, tmp_path / "two", "--max-steps", 8))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(8))
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one)
    config = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert config["world_size"] == 2 and config["grad_accum_steps"] == 2


def test_two_nodes_on_loopback_give_the_same_losses_as_one(data_dir, tmp_path):
    run_train(*tiny(data_dir, tmp_path / "one", "--max-steps", 6))
    port = free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        cmd = torchrun_node(
            os.path.join(ROOT, "train.py"), node_rank, port, *tiny(data_dir, tmp_path / "two", "--max-steps", 6)
        )
        logs.append(open(tmp_path / f"node{node_rank}.log", "w"))
        procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.time() + 120
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    output = "".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))
    assert [p.wait() for p in procs] == [0, 0], output
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) and all(abs(one[s] - two[s]) < 1e-4 for s in one)


def test_gradient_accumulation_equals_one_big_micro_batch(data_dir, tmp_path):
    run_train(*tiny(data_dir, tmp_path / "accum", "--max-steps", 6, "--micro-batch", 4))  # 4 micro-steps of 4
    run_train(*tiny(data_dir, tmp_path / "big", "--max-steps", 6, "--micro-batch", 16))  # 1 micro-step of 16
    a, b = train_losses(tmp_path / "accum"), train_losses(tmp_path / "big")
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-4 for s in a)


def test_resume_after_sigkill_is_bit_exact(data_dir, tmp_path):
    args = ["--max-steps", 80, "--checkpoint-interval", 10, "--eval-interval", 40, "--sample-interval", 0]
    run_train(*tiny(data_dir, tmp_path / "straight", *args), env=one_thread_env())
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *tiny(data_dir, out, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=one_thread_env(),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").exists() and 37 in train_losses(out):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = (out / "log.jsonl").read_text()
    assert 37 in train_losses(out) and 79 not in train_losses(out)
    run_train(*tiny(data_dir, out, *args, "--resume"), env=one_thread_env())
    after = (out / "log.jsonl").read_text()
    assert after.startswith(before)  # appended, never truncated
    resume = [json.loads(line) for line in after[len(before) :].splitlines()][0]
    assert resume["event"] == "resume" and resume["step"] in (30, 40)
    assert train_losses(out) == train_losses(tmp_path / "straight")  # every step, bit for bit


def test_a_shuffled_run_resumes_its_document_order_exactly(data_dir, tmp_path):
    args = ["--shuffle", "--seed", 3, "--max-steps", 20, "--checkpoint-interval", 10, "--sample-interval", 0]
    run_train(*tiny(data_dir, tmp_path / "straight", *args), env=one_thread_env())
    run_train(*tiny(data_dir, tmp_path / "plain", "--max-steps", 20, "--sample-interval", 0))
    assert train_losses(tmp_path / "straight") != train_losses(tmp_path / "plain")  # another order of the data
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt_000010.pt", tmp_path / "resumed")
    run_train(*tiny(data_dir, tmp_path / "resumed", *args, "--resume"), env=one_thread_env())
    straight = train_losses(tmp_path / "straight")
    assert train_losses(tmp_path / "resumed") == {step: straight[step] for step in range(10, 20)}


def test_refuses_to_overwrite_a_run_and_resumes_past_a_damaged_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny(data_dir, out, "--max-steps", 10))
    r = run_script("train.py", *tiny(data_dir, out, "--max-steps", 10))
    assert r.returncode == 2 and f"{out} holds checkpoints of an earlier run: pass --resume" in r.stderr
    (out / "ckpt_000010.pt").write_bytes((out / "ckpt_000010.pt").read_bytes()[:1000])  # damaged
    r = run_train(*tiny(data_dir, out, "--max-steps", 10, "--resume"))
    assert "warning: skipping" in r.stderr and "ckpt_000010.pt" in r.stderr
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 10
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [5]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    good = str(tmp_path / "ckpt_000005.pt")
    save_checkpoint(good, dict(step=5, weights=torch.ones(3)))

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "ckpt_000010.pt"), dict(step=10))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000005.pt"]
    assert load_checkpoint(good)["step"] == 5


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny(data_dir, out, "--max-steps", 5))
    r = run_script("train.py", *tiny(data_dir, out, "--max-steps", 20, "--resume", "--max-lr", 1000, "--grad-clip", 0))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stopped. The last good checkpoint is" in r.stderr and "ckpt_000005.pt" in r.stderr
    assert load_checkpoint(str(out / "ckpt_000005.pt"))["step"] == 5


def test_errors_are_one_line(data_dir, tmp_path):
    cases = [
        (
            tiny(data_dir, tmp_path / "a", "--total-batch", 500),
            "error: --total-batch 500 is not divisible by --seq-len 32 x 1 processes = 32",
        ),
        (tiny(data_dir, tmp_path / "e", "--micro-batch", 0), "error: --micro-batch must be at least 1, got 0"),
        (tiny(data_dir, tmp_path / "f", "--seq-len", -5), "error: --seq-len must be at least 1, got -5"),
        (tiny(data_dir, tmp_path / "g", "--n-head", 0), "error: --n-head must be at least 1, got 0"),
        (tiny(data_dir, tmp_path / "h", "--device", "cuda"), "error: device 'cuda': no CUDA GPU is visible"),
        (
            tiny(data_dir, tmp_path / "i", "--device", "tpu"),
            "error: unknown device 'tpu': use cpu, cuda, cuda:N, mps or auto",
        ),
        (
            tiny(tmp_path / "nowhere", tmp_path / "b"),
            f"error: data directory {tmp_path / 'nowhere'} does not exist: run download-fineweb-edu.py first",
        ),
        (
            tiny(data_dir, tmp_path / "c", "--n-embd", 100, "--n-head", 3),
            "error: --n-embd 100 is not divisible by --n-head 3",
        ),
        (["--preset", "huge"], "train.py: error: unknown --preset 'huge'"),
        (
            tiny(data_dir, tmp_path / "d", "--micro-batch", "x"),
            "train.py: error: argument --micro-batch: not a number: 'x'",
        ),
    ]
    for args, message in cases:
        r = run_script("train.py", *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_quickstart_smoke_run_builds_data_and_learns(tmp_path):
    env = dict(os.environ, NGPU="0")
    args = [
        "--preset",
        "quickstart",
        "--data-dir",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "out",
        "--max-steps",
        40,
        "--eval-interval",
        20,
        "--sample-interval",
        40,
        "--checkpoint-interval",
        20,
    ]
    r = subprocess.run(
        [os.path.join(ROOT, "train.sh"), *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert any(n.startswith("stories_val_") for n in os.listdir(tmp_path / "data"))
    records = read_log(tmp_path / "out" / "log.jsonl")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[0] > 10 and val[-1] < 5.0  # from about ln(50304) = 10.8
    assert any("samples" in r for r in records)
    assert {"ckpt_000020.pt", "ckpt_000040.pt", "loss.png"} <= set(os.listdir(tmp_path / "out"))
    # it ends by saying where everything is and what to run next
    assert f"python sample.py --model {tmp_path / 'out'}" in r.stdout and "loss.png" in r.stdout.splitlines()[-5]
    assert png_width(tmp_path / "out" / "loss.png") == 700  # one panel: no HellaSwag in the quick start


def test_the_quickstart_corpus_is_generated_the_same_for_a_seed():

    from misc.stories import simple_stories as stories

    first = stories(200, seed=0)
    assert first == stories(200, seed=0) and first != stories(200, seed=1)
    assert len(set(first)) == 200 and all(s.endswith((".", '"')) for s in first)
    assert not any(" a a" in s or " a o" in s or " a e" in s for s in first)  # "an old", "an apple"


def png_width(path):
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_the_plot_draws_hellaswag_only_when_evaluated_and_gpt2s_val_loss_only_on_fineweb(tmp_path, monkeypatch):
    import matplotlib.axes

    from misc.plot_log import plot_log

    lines = []
    real_axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: lines.append(kw["label"]) or real_axhline(ax, y, **kw)
    )
    steps = [dict(step=s, train_loss=5.0 - s / 10) for s in range(5)]
    for data_dir, hellaswag, width, labels in [
        ("data/quickstart-stories", False, 700, []),
        ("edu_fineweb10B", False, 700, ["GPT-2 124M val loss (3.2924)"]),
        ("edu_fineweb10B", True, 1400, ["GPT-2 124M val loss (3.2924)", "GPT-2 124M (0.2955)", "GPT-3 124M (0.337)"]),
    ]:
        records = [dict(event="config", data_dir=data_dir), *steps, dict(step=4, val_loss=4.8)]
        if hellaswag:
            records.append(dict(step=4, hellaswag_acc_norm=0.26))
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        lines.clear()
        plot_log(tmp_path / "log.jsonl", tmp_path / "p.png")
        assert png_width(tmp_path / "p.png") == width and lines == labels


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    def make(n_gpus):
        bin_dir = tmp_path / f"bin{n_gpus}"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "nvidia-smi"
        lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(n_gpus))
        script.write_text("#!/bin/sh\n" + (lines if n_gpus else "exit 9\n"))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TRAIN_SH_DRY_RUN="1")

    return make


def train_sh(env, *args):
    r = subprocess.run([os.path.join(ROOT, "train.sh"), *args], capture_output=True, text=True, env=env)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def test_train_sh_command_lines(fake_nvidia_smi, monkeypatch):
    for key in (
        "NGPU",
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MAX_RESTARTS",
        "SLURM_JOB_NODELIST",
        "SLURM_NNODES",
        "SLURM_JOB_ID",
    ):
        monkeypatch.delenv(key, raising=False)
    assert train_sh(fake_nvidia_smi(0), "--preset", "quickstart")[1] == "python train.py --preset quickstart"
    assert (
        train_sh(fake_nvidia_smi(1), "--max-steps", "5")[1]
        == "torchrun --standalone --nproc_per_node 1 train.py --max-steps 5"
    )
    assert (
        train_sh(fake_nvidia_smi(8), "--out-dir", "my log")[1]
        == "torchrun --standalone --nproc_per_node 8 train.py --out-dir my\\ log"
    )
    env = dict(fake_nvidia_smi(8), NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    # several nodes meet through c10d rendezvous at node 0's address, so NODE_RANK may be left out
    c10d = "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:1234 --rdzv-id gpt2"
    assert train_sh(env)[1] == c10d + " train.py"
    assert train_sh(dict(env, NODE_RANK=""))[1] == c10d + " train.py"
    rc, _, err = train_sh(dict(env, MASTER_ADDR=""))
    assert rc != 0 and "set MASTER_ADDR" in err
    rc, _, err = train_sh(dict(env, NODE_RANK="2"))
    assert rc != 0 and "NODE_RANK=2 must be below NNODES=2" in err


def test_compiled_training_evaluates_samples_and_saves_plain_weights(data_dir, tmp_path):
    run_train(*tiny(data_dir, tmp_path / "plain", "--max-steps", 4, "--eval-interval", 2, "--sample-interval", 4))
    run_train(
        *tiny(
            data_dir, tmp_path / "compiled", "--max-steps", 4, "--eval-interval", 2, "--sample-interval", 4, "--compile"
        )
    )
    records = read_log(tmp_path / "compiled" / "log.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4] and any("samples" in r for r in records)
    plain, compiled = train_losses(tmp_path / "plain"), train_losses(tmp_path / "compiled")
    assert sorted(plain) == sorted(compiled) and all(abs(plain[s] - compiled[s]) < 1e-3 for s in plain)
    ckpt = load_checkpoint(str(tmp_path / "compiled" / "ckpt_000004.pt"))
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_hellaswag_runs_inside_training_or_is_skipped_with_one_warning(data_dir, tmp_path):
    from hellaswag import synthetic_examples

    hs = tmp_path / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(12)))
    run_train(*tiny(data_dir, tmp_path / "with", "--max-steps", 4, "--hellaswag-interval", 2, "--hellaswag-file", hs))
    evals = [r for r in read_log(tmp_path / "with" / "log.jsonl") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["hellaswag_examples"] == 12 for r in evals)
    assert all(0 <= r["hellaswag_acc_norm"] <= 1 for r in evals)
    r = run_train(
        *tiny(
            data_dir,
            tmp_path / "without",
            "--max-steps",
            4,
            "--hellaswag-interval",
            2,
            "--hellaswag-file",
            tmp_path / "none.jsonl",
        )
    )
    assert r.stderr.count("warning: HellaSwag is skipped") == 1
    assert not any("hellaswag_acc_norm" in rec for rec in read_log(tmp_path / "without" / "log.jsonl"))
