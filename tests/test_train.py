"""train.py and train.sh: the reference configuration, DDP equivalence, exact resume, logs, checkpoints, quick start."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess

import pytest
import torch

import train
from checkpoint import load_checkpoint, read_log, save_checkpoint
from conftest import (
    ONE_THREAD,
    ROOT,
    cli,
    copy_run,
    ok,
    one_line_error,
    start_script,
    tiny,
    torchrun,
    train_losses,
)


def test_reference_run_configuration():
    c = train.parse_config([])
    assert (c.n_layer, c.n_head, c.n_embd, c.micro_batch, c.seq_len, c.total_batch) == (12, 12, 768, 64, 1024, 524_288)
    assert (c.max_steps, c.warmup_steps, c.max_lr, c.max_lr * c.min_lr_ratio) == (9537, 715, 6e-4, pytest.approx(6e-5))
    assert (c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (c.eval_interval, c.hellaswag_interval, c.sample_interval, c.checkpoint_interval) == (250, 250, 250, 1000)
    assert 5e9 / c.total_batch == pytest.approx(c.max_steps, abs=1)
    big = train.parse_config(["--preset", "gpt2-1558m", "--micro-batch", "4"])
    assert (big.n_layer, big.n_head, big.n_embd, big.micro_batch) == (48, 25, 1600, 4)  # a flag beats the preset
    assert train.parse_config(["--preset", "gpt2-350m"]).n_embd == 1024
    assert train.parse_config(["--preset", "gpt2-774m"]).n_layer == 36
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
    r = ok(cli("train.py", *tiny(data_dir, out, "--keep-checkpoints", 2, "--export", tmp_path / "hf")))
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the plan at the start; each step's line says where the run is and how long the rest takes; samples with prompt
    assert "plan: 20 steps x 512 tokens = 10,240 tokens (steps 0..20) on 1 x CPU (" in r.stdout
    assert re.search(r"^step +19/20 \| loss [0-9.]+ .* \| eta 0s$", r.stdout, re.M), r.stdout
    assert (
        re.search(r"^sample: ['\"]Hello, I'm a language model,", r.stdout, re.M) and "finished 20 steps in " in r.stdout
    )
    first = lines[0]
    assert (first["event"], first["world_size"], first["grad_accum_steps"]) == ("config", 1, 4)
    assert first["total_batch"] == 512
    steps = [r for r in lines if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(20))
    assert {"step", "train_loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec"} <= set(steps[0])
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    samples = [r for r in lines if "samples" in r]
    assert [r["step"] for r in samples] == [10, 20] and all(isinstance(t, str) for t in samples[0]["samples"])
    assert sorted(os.listdir(out)) == [
        "ckpt_000015.pt", "ckpt_000020.pt", "log.jsonl", "loss.png", "report.md", "train.lock"]  # fmt: skip
    ckpt = load_checkpoint(str(out / "ckpt_000020.pt"))
    assert {"model", "optimizer", "model_config", "config", "step", "train_loader", "rng", "val_loss"} <= set(ckpt)
    assert ckpt["step"] == 20 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # report.md: the one file to share, from the log alone
    report = (out / "report.md").read_text()
    assert report.startswith(f"# tiny: 10,240 tokens of {data_dir}\n")
    assert f"| final val loss | {evals[-1]['val_loss']:.4f} |" in report
    assert "| machine | 1 x CPU (" in report and f", torch {torch.__version__} |" in report
    assert "| speed | " in report and " tokens/s (median step)" in report
    assert "![train and val loss](loss.png)" in report
    assert f"> Hello, I'm a language model,{samples[-1]['samples'][0]}".replace("\n", " ") in report
    ok(cli("misc/plot_log.py", out / "log.jsonl", tmp_path / "again.png"))
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").read_text() == report

    from transformers import GPT2LMHeadModel

    from weights import load_model

    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(str(out / "ckpt_000020.pt"))
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (hf_model(idx).logits - ours(idx)[0][..., :50257]).abs().max().item() < 1e-4


def test_two_processes_give_the_same_losses_as_one(data_dir, tmp_path):
    ok(cli("train.py", *tiny(data_dir, tmp_path / "one", "--max-steps", 8)))
    r = subprocess.run(torchrun("train.py", *tiny(data_dir, tmp_path / "two", "--max-steps", 8)), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    ok(r)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(8))
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one)
    config = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert config["world_size"] == 2 and config["grad_accum_steps"] == 2


def test_gradient_accumulation_equals_one_big_micro_batch(data_dir, tmp_path):
    ok(cli("train.py", *tiny(data_dir, tmp_path / "accum", "--max-steps", 6, "--micro-batch", 4)))  # 4 micro-steps
    ok(cli("train.py", *tiny(data_dir, tmp_path / "big", "--max-steps", 6, "--micro-batch", 16)))  # 1 micro-step of 16
    a, b = train_losses(tmp_path / "accum"), train_losses(tmp_path / "big")
    assert sorted(a) == sorted(b) == list(range(6)) and all(abs(a[s] - b[s]) < 1e-4 for s in a)


def test_resume_after_sigkill_is_bit_exact(data_dir, finished_run, tmp_path):
    """kill -9 of the process in the middle of the run: the resume logs the loss of every step that the run never
    stopped (finished_run, the same settings) logged, bit for bit."""
    out = tmp_path / "killed"
    run = start_script("train.py", *tiny(data_dir, out), env={**os.environ, **ONE_THREAD})
    run.wait_for_step(12)
    run.send_signal(signal.SIGKILL)
    assert run.finish().returncode == -signal.SIGKILL
    before = (out / "log.jsonl").read_text()
    assert 12 in train_losses(out) and 19 not in train_losses(out)
    ok(cli("train.py", *tiny(data_dir, out, "--resume"), threads=1))
    after = (out / "log.jsonl").read_text()
    assert after.startswith(before)  # appended, never truncated
    resume = [json.loads(line) for line in after[len(before) :].splitlines()][0]
    assert resume["event"] == "resume" and resume["step"] in (10, 15)
    assert train_losses(out) == train_losses(finished_run)  # every step, bit for bit


def test_a_shuffled_run_resumes_its_document_order_exactly(data_dir, finished_run, tmp_path):
    args = ["--shuffle", "--seed", 3, "--max-steps", 10, "--checkpoint-interval", 5, "--sample-interval", 0]
    ok(cli("train.py", *tiny(data_dir, tmp_path / "straight", *args), threads=1))
    straight, plain = train_losses(tmp_path / "straight"), train_losses(finished_run)
    assert [straight[s] for s in range(6)] != [plain[s] for s in range(6)]  # the same lr there: another order of data
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt_000005.pt", tmp_path / "resumed")
    ok(cli("train.py", *tiny(data_dir, tmp_path / "resumed", *args, "--resume"), threads=1))
    assert train_losses(tmp_path / "resumed") == {step: straight[step] for step in range(5, 10)}


def test_a_resume_puts_every_random_generator_where_the_checkpoint_left_it(data_dir, finished_run):
    """Nothing in the tiny run draws from them (no dropout; samples have their own generators), so the losses cannot
    show it: a dropout or any random choice added to the step must draw after a resume what it drew before."""
    import random

    import numpy as np

    from checkpoint import Start, restore, set_rng_states
    from model import GPT, GPTConfig
    from utils import ShardedDataLoader

    path = str(finished_run / "ckpt_000015.pt")
    checkpoint = load_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    loader = ShardedDataLoader(data_dir, "train", 4, 32, seed=train.TrainConfig.seed)
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # this process's generators, elsewhere
    restore(Start(path=path, checkpoint=checkpoint), model, optimizer, loader, "cpu")
    after_resume = draws()
    set_rng_states(checkpoint["rng"], "cpu")
    assert draws() == after_resume and loader.position == checkpoint["train_loader"]["position"] > 0


def test_refuses_to_overwrite_a_run_and_resumes_past_a_damaged_checkpoint(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15, 20))
    r = cli("train.py", *tiny(data_dir, out))
    one_line_error(r, f"{out} holds checkpoints of an earlier run: pass --resume")
    (out / "ckpt_000020.pt").write_bytes((out / "ckpt_000020.pt").read_bytes()[:1000])  # damaged
    r = ok(cli("train.py", *tiny(data_dir, out, "--resume")))
    assert "warning: skipping" in r.stderr and "ckpt_000020.pt" in r.stderr
    assert f"resuming from {out / 'ckpt_000015.pt'} (step 15)" in r.stdout  # which checkpoint it loaded
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 20
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [15]


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


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(10,))
    r = cli("train.py", *tiny(data_dir, out, "--resume", "--max-lr", 1000, "--grad-clip", 0))
    one_line_error(r, "stopped. The last good checkpoint is")
    assert "ckpt_000010.pt" in r.stderr
    assert load_checkpoint(str(out / "ckpt_000010.pt"))["step"] == 10


def test_help_says_every_default_once():
    for script in ("train.py", "download-fineweb-edu.py", "sample.py", "hellaswag.py"):
        r = cli(script, "--help")
        assert r.returncode == 0 and "--out" in r.stdout, r.stderr
        flags = " ".join(r.stdout.split()).split(" --")  # the help folds lines: one piece per flag
        assert not [f for f in flags if f.count("(default") > 1], script


def test_errors_are_one_line(data_dir, tmp_path):
    cases = [
        (tiny(data_dir, tmp_path / "a", "--total-batch", 500),
         "error: --total-batch 500 is not divisible by --seq-len 32 x 1 processes = 32"),
        (tiny(data_dir, tmp_path / "e", "--micro-batch", 0), "error: --micro-batch must be at least 1, got 0"),
        (tiny(data_dir, tmp_path / "f", "--seq-len", -5), "error: --seq-len must be at least 1, got -5"),
        (tiny(data_dir, tmp_path / "g", "--n-head", 0), "error: --n-head must be at least 1, got 0"),
        (tiny(data_dir, tmp_path / "h", "--device", "cuda"), "error: device 'cuda': no CUDA GPU is visible"),
        (tiny(data_dir, tmp_path / "i", "--device", "tpu"),
         "error: unknown device 'tpu': use cpu, cuda, cuda:N, mps or auto"),
        (tiny(tmp_path / "nowhere", tmp_path / "b"),
         f"error: data directory {tmp_path / 'nowhere'} does not exist: run download-fineweb-edu.py first"),
        (tiny(data_dir, tmp_path / "c", "--n-embd", 100, "--n-head", 3),
         "error: --n-embd 100 is not divisible by --n-head 3"),
        (["--preset", "huge"], "train.py: error: unknown --preset 'huge'"),
        (tiny(data_dir, tmp_path / "d", "--micro-batch", "x"),
         "train.py: error: argument --micro-batch: not a number: 'x'"),
    ]  # fmt: skip
    for args, message in cases:
        r = cli("train.py", *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_quickstart_builds_its_data(quickstart_data):
    data, out, first = quickstart_data
    assert "tokenizing" in first.stderr and any(n.startswith("stories_val_") for n in os.listdir(data))
    assert json.loads((data / "manifest.json").read_text())["complete"]
    assert {"ckpt_000015.pt", "loss.png"} <= set(os.listdir(out))


def test_quickstart_learns_and_says_what_to_run_next(quickstart):
    data, out, first, second = quickstart
    assert "note: settings changed since the checkpoint: --max-steps 15 -> 30" in second.stdout  # resumed, not redone
    records = read_log(out / "log.jsonl")
    assert sorted(r["step"] for r in records if "train_loss" in r) == list(range(30))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[0] > 10 and val[-1] < 5.0  # from about ln(50304) = 10.8
    assert any("samples" in r for r in records)
    assert {"ckpt_000015.pt", "ckpt_000030.pt", "loss.png"} <= set(os.listdir(out))
    # it ends by saying where everything is and what to run next
    assert f"python sample.py --model {out}" in second.stdout and "loss.png" in second.stdout.splitlines()[-5]
    assert png_width(out / "loss.png") == 700  # one panel: no HellaSwag in the quick start


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


def test_the_report_gives_the_median_speed_and_mfu_of_a_run_on_a_known_gpu(tmp_path):
    from misc.plot_log import write_report

    config = dict(event="config", preset="gpt2", data_dir="edu_fineweb10B", max_steps=4, total_batch=524288,
                  world_size=8, device_name="NVIDIA H100 80GB HBM3", torch="2.13.0")  # fmt: skip
    speeds = [(1.0e6, 0.40), (1.2e6, 0.48), (1.1e6, 0.44), (0.9e6, 0.36)]
    steps = [dict(step=s, train_loss=3.0, dt_ms=400.0, tokens_per_sec=t, mfu=m) for s, (t, m) in enumerate(speeds)]
    records = [config, *steps, dict(step=4, val_loss=3.1), dict(event="finished", step=4, seconds=3725)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(tmp_path / "log.jsonl", tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# gpt2: 2.1M tokens of edu_fineweb10B\n")
    assert "| machine | 8 x NVIDIA H100 80GB HBM3, torch 2.13.0 |" in report
    assert "| speed | 1,100,000 tokens/s (median step), 44.0% MFU |" in report
    assert "| final val loss | 3.1000 |" in report and "HellaSwag" not in report


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
    return r.returncode, r.stdout.strip().replace(f"{ROOT}/train.py", "train.py"), r.stderr.strip()


def test_train_sh_command_lines(fake_nvidia_smi, monkeypatch):
    for key in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS", "SLURM_JOB_NODELIST",
                "SLURM_NNODES", "SLURM_JOB_ID"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    assert train_sh(fake_nvidia_smi(0), "--preset", "quickstart")[1] == "python train.py --preset quickstart"
    one_gpu = train_sh(fake_nvidia_smi(1), "--max-steps", "5")[1]
    assert one_gpu == "torchrun --standalone --nproc_per_node 1 train.py --max-steps 5"
    eight = train_sh(fake_nvidia_smi(8), "--out-dir", "my log")[1]
    assert eight == "torchrun --standalone --nproc_per_node 8 train.py --out-dir my\\ log"
    env = dict(fake_nvidia_smi(8), NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    # several nodes meet through c10d rendezvous at node 0's address, so NODE_RANK may be left out
    c10d = "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:1234 --rdzv-id gpt2"
    assert train_sh(env)[1] == c10d + " train.py"
    assert train_sh(dict(env, NODE_RANK=""))[1] == c10d + " train.py"
    rc, _, err = train_sh(dict(env, MASTER_ADDR=""))
    assert rc != 0 and "set MASTER_ADDR" in err
    rc, _, err = train_sh(dict(env, NODE_RANK="2"))
    assert rc != 0 and "NODE_RANK=2 must be below NNODES=2" in err


def test_train_sh_called_from_another_directory_reads_relative_paths_there(data_dir, fake_nvidia_smi, tmp_path):
    (tmp_path / "data").symlink_to(data_dir)
    env = {**fake_nvidia_smi(0), "TRAIN_SH_DRY_RUN": ""}  # no GPU: python train.py, run for real
    args = tiny("data", "run", "--max-steps", 1, "--eval-interval", 0, "--sample-interval", 0)
    r = subprocess.run([os.path.join(ROOT, "train.sh"), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "log.jsonl").exists() and not os.path.exists(os.path.join(ROOT, "run"))


def test_compiled_training_evaluates_samples_and_saves_plain_weights(data_dir, finished_run, tmp_path):
    args = ["--max-steps", 4, "--eval-interval", 2, "--sample-interval", 4]
    ok(cli("train.py", *tiny(data_dir, tmp_path / "compiled", *args, "--compile")))
    records = read_log(tmp_path / "compiled" / "log.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4] and any("samples" in r for r in records)
    # the first steps have the same learning rates as finished_run's (warmup: 4 steps), so the same losses
    plain, compiled = train_losses(finished_run), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [0, 1, 2, 3] and all(abs(plain[s] - compiled[s]) < 1e-3 for s in compiled)
    ckpt = load_checkpoint(str(tmp_path / "compiled" / "ckpt_000004.pt"))
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_hellaswag_runs_inside_training_or_is_skipped_with_one_warning(data_dir, hellaswag_file, tmp_path):
    args = ["--max-steps", 4, "--hellaswag-interval", 2]
    ok(cli("train.py", *tiny(data_dir, tmp_path / "with", *args, "--hellaswag-file", hellaswag_file)))
    evals = [r for r in read_log(tmp_path / "with" / "log.jsonl") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["hellaswag_examples"] == 12 for r in evals)
    assert all(0 <= r["hellaswag_acc_norm"] <= 1 for r in evals)
    last = [100 * evals[-1][f"hellaswag_{k}"] for k in ("acc", "acc_norm", "harness_acc", "harness_acc_norm")]
    report = (tmp_path / "with" / "report.md").read_text()
    assert "HellaSwag (12 examples), acc / acc_norm in percent:" in report
    assert "| this run | {:.2f} / {:.2f} | {:.2f} / {:.2f} |".format(*last) in report
    assert "| GPT-2 124M (published) | 28.59 / 29.55 | 28.92 / 31.14 |" in report
    r = ok(cli("train.py", *tiny(data_dir, tmp_path / "without", *args, "--hellaswag-file", tmp_path / "none.jsonl")))
    assert r.stderr.count("warning: HellaSwag is skipped") == 1
    assert not any("hellaswag_acc_norm" in rec for rec in read_log(tmp_path / "without" / "log.jsonl"))
