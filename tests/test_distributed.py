"""GPU boxes and clusters, simulated on the CPU: any world size, resume on other GPU counts, nodes without a shared
filesystem, train.sh's GPU count, memory on resume, evaluation precision, process-group hygiene."""

import datetime
import json
import os
import shutil
import subprocess
import time
import weakref
from unittest.mock import ANY

import pytest
import torch

import train
from checkpoint import load_checkpoint, read_jsonl, read_log, rng_states, save_checkpoint, set_rng_states
from conftest import ROOT, Started, cli, free_port, ok, one_thread_env, torchrun, torchrun_node, train_losses
from utils import UserError


def log_records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# any world size


def test_quickstart_on_two_processes_shrinks_the_micro_batch_and_logs_the_losses_of_one(quickstart_data, tmp_path):
    # the quick start's 2,048-token step is 16 rows: 16 x 128 x 2 processes does not divide it, 8 x 128 x 2 does
    data, one, _ = quickstart_data
    shutil.copytree(data, tmp_path / "data")
    args = ["--preset", "quickstart", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "two", "--max-steps", 3,
            "--eval-interval", 0, "--sample-interval", 0, "--checkpoint-interval", 0]  # fmt: skip
    r = ok(subprocess.run(torchrun("train.py", *args), capture_output=True, text=True, timeout=600))
    assert (
        "note: --micro-batch 16 does not split 2,048 tokens over 2 processes x 128 tokens: using micro-batch 8"
        in r.stdout
    )
    config = log_records(tmp_path / "two")[0]
    assert (config["micro_batch"], config["micro_batch_requested"], config["grad_accum_steps"], config["world_size"]) \
        == (8, 16, 1, 2)  # fmt: skip
    # the quick start's first 30 steps are its warmup: their learning rates do not depend on --max-steps
    one, two = train_losses(one), train_losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2] and all(abs(one[s] - two[s]) < 1e-4 for s in two)


def test_the_micro_batch_fits_every_world_size_that_splits_the_batch_into_whole_sequences():
    config = train.parse_config(["--preset", "gpt2-124m"])  # 512 rows of 1024 tokens per step, micro-batch 64
    assert [train.fit_micro_batch(config, w) for w in (1, 2, 4, 8, 16, 64)] == [64, 64, 64, 64, 32, 8]
    assert (
        train.fit_micro_batch(train.parse_config(["--preset", "gpt2-124m", "--micro-batch", "48"]), 1) == 32
    )  # divides 512
    with pytest.raises(UserError, match="--total-batch 524288 is not divisible by --seq-len 1024 x 3 processes"):
        train.fit_micro_batch(config, 3)


# ----------------------------------------------------------------------------------------------------------------
# resume on another number of GPUs


def test_resume_restores_this_gpus_rng_state_whatever_the_number_of_gpus(monkeypatch):
    restored = {}
    monkeypatch.setattr(
        torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), int(str(device)[-1]), dtype=torch.uint8)
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": restored.update({str(device): state.clone()})
    )
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves a state for every GPU of the box"))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: pytest.fail("needs as many GPUs as at save time")
    )
    states = rng_states("cuda:3")  # rank 0 of a box, on GPU 3
    assert torch.equal(states["cuda"], torch.full((8,), 3, dtype=torch.uint8))
    set_rng_states(states, "cuda:0")  # resumed under CUDA_VISIBLE_DEVICES=0
    assert list(restored) == ["cuda:0"] and torch.equal(restored["cuda:0"], states["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# nodes without a shared filesystem: two "nodes" on loopback, each in its own copy of the repo


def node_copies(tmp_path, data_dir, with_data=(True, True)):
    """Two copies of the repo's scripts (and misc/), each with its own data (or none) and nothing else in common."""
    nodes = []
    for rank, has_data in enumerate(with_data):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        for name in os.listdir(ROOT):
            if name.endswith(".py") or name == "train.sh":
                shutil.copy(os.path.join(ROOT, name), node / name)
        shutil.copytree(os.path.join(ROOT, "misc"), node / "misc", ignore=shutil.ignore_patterns("__pycache__"))
        if has_data:
            shutil.copytree(data_dir, node / "data")
        nodes.append(node)
    return nodes


def run_two_nodes(nodes, *args, timeout=180, env=None):
    """torchrun on each node (one process each), run from the node's own copy; returns (exit codes, seconds, output)."""
    port = free_port()
    procs, logs = [], []
    t0 = time.time()
    for rank, node in enumerate(nodes):
        cmd = torchrun_node("train.py", rank, port, *args)
        logs.append(open(node / "node.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=node, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    while time.time() - t0 < timeout and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    return codes, time.time() - t0, "".join((node / "node.log").read_text() for node in nodes)


def tiny(data, out, *extra):
    return [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--out-dir",
        out,
        "--max-steps",
        8,
        "--checkpoint-interval",
        4,
        "--eval-interval",
        4,
        "--sample-interval",
        0,
        *extra,
    ]


def test_two_nodes_without_a_shared_filesystem_evaluate_hellaswag_and_resume(data_dir, hellaswag_file, tmp_path):
    nodes = node_copies(tmp_path, data_dir)
    shutil.copy(hellaswag_file, nodes[0] / "hellaswag.jsonl")  # node 0 alone has the HellaSwag file
    args = tiny("data", "out", "--hellaswag-interval", 4, "--hellaswag-file", "hellaswag.jsonl")
    codes, _, output = run_two_nodes(nodes, *args, env=one_thread_env())
    assert codes == [0, 0], output
    assert "HellaSwag is skipped" not in output
    one = tmp_path / "one"
    ok(cli("train.py", *tiny(data_dir, one, "--hellaswag-interval", 4, "--hellaswag-file", hellaswag_file)))
    two, alone = train_losses(nodes[0] / "out"), train_losses(one)
    assert sorted(two) == sorted(alone) == list(range(8)) and all(abs(two[s] - alone[s]) < 1e-4 for s in alone)
    evals = [rec for rec in read_log(nodes[0] / "out" / "log.jsonl") if "hellaswag_acc" in rec]
    alone = [rec for rec in read_log(one / "log.jsonl") if "hellaswag_acc" in rec]
    assert [e["step"] for e in evals] == [0, 4, 8] and all(e["hellaswag_examples"] == 12 for e in evals)
    keys = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_harness_acc", "hellaswag_harness_acc_norm")
    assert [[e[k] for k in keys] for e in evals] == [[e[k] for k in keys] for e in alone]  # examples split over nodes
    straight = train_losses(nodes[0] / "out")
    assert sorted(straight) == list(range(8)) and not list((nodes[1] / "out").glob("ckpt_*"))

    # a crash after the step-4 checkpoint: node 0 holds it, node 1 holds nothing; both must resume at step 4
    (nodes[0] / "out" / "ckpt_000008.pt").unlink()
    codes, _, output = run_two_nodes(nodes, *args, "--resume", env=one_thread_env())
    assert codes == [0, 0], output
    resumes = [rec for rec in log_records(nodes[0] / "out") if rec.get("event") == "resume"]
    assert [rec["step"] for rec in resumes] == [4]
    assert train_losses(nodes[0] / "out") == straight  # steps 4-7 again, the same losses


def test_two_nodes_through_train_sh_meet_by_c10d_rendezvous_and_log_the_losses_of_one_process(data_dir, tmp_path):
    nodes = node_copies(tmp_path, data_dir)
    args = tiny("data", "out", "--max-steps", 6)
    env = dict(os.environ, NGPU="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([node / "train.sh", *map(str, args)], cwd=node, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for node in nodes]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    dry = subprocess.run([nodes[0] / "train.sh"], capture_output=True, text=True, env=dict(env, TRAIN_SH_DRY_RUN="1"))
    assert f"--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{env['MASTER_PORT']}" in dry.stdout
    logged = [node for node in nodes if (node / "out" / "log.jsonl").exists()]
    assert len(logged) == 1  # rank 0's node alone holds the log and the checkpoints
    one = tmp_path / "one"
    ok(cli("train.py", *tiny(data_dir, one, "--max-steps", 6)))
    two, alone = train_losses(logged[0] / "out"), train_losses(one)
    assert sorted(two) == sorted(alone) == list(range(6)) and all(abs(two[s] - alone[s]) < 1e-4 for s in alone)


def test_an_error_on_one_node_stops_every_node_at_once(data_dir, finished_run, tmp_path):
    nodes = node_copies(tmp_path, data_dir, with_data=(True, False))  # node 1 was never given the shards
    codes, seconds, output = run_two_nodes(nodes, *tiny("data", "out"))
    assert codes[0] != 0 and codes[1] != 0, output
    assert "error: rank 1: data directory data does not exist" in (nodes[0] / "node.log").read_text(), output
    assert seconds < 60  # not the 30-minute collective timeout

    shutil.copytree(data_dir, nodes[1] / "data")
    (nodes[0] / "out").mkdir()
    shutil.copy(finished_run / "ckpt_000010.pt", nodes[0] / "out")  # node 0's out dir holds a run: refused
    codes, seconds, output = run_two_nodes(nodes, *tiny("data", "out", "--max-steps", 4))
    assert codes[0] != 0 and codes[1] != 0 and seconds < 60, output
    assert "holds checkpoints of an earlier run: pass --resume" in (nodes[1] / "node.log").read_text()


# ----------------------------------------------------------------------------------------------------------------
# train.sh counts the GPUs this process may use


def test_train_sh_counts_only_the_gpus_cuda_visible_devices_shows(tmp_path, monkeypatch):
    for key in ("NGPU", "NNODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3"\n' for i in range(8))
    )
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TRAIN_SH_DRY_RUN="1")

    def command(**extra):
        r = subprocess.run([os.path.join(ROOT, "train.sh")], capture_output=True, text=True, env=dict(env, **extra))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().replace(f"{ROOT}/train.py", "train.py")  # the repo's train.py, by its full path

    assert command() == "torchrun --standalone --nproc_per_node 8 train.py"
    assert command(CUDA_VISIBLE_DEVICES="0,1") == "torchrun --standalone --nproc_per_node 2 train.py"
    assert command(CUDA_VISIBLE_DEVICES="6") == "torchrun --standalone --nproc_per_node 1 train.py"
    assert (
        command(CUDA_VISIBLE_DEVICES="0,3,-1,5") == "torchrun --standalone --nproc_per_node 2 train.py"
    )  # CUDA stops at -1
    assert command(CUDA_VISIBLE_DEVICES="") == "python train.py"
    assert command(CUDA_VISIBLE_DEVICES="-1") == "python train.py"
    assert command(CUDA_VISIBLE_DEVICES="0,1", NGPU="4") == "torchrun --standalone --nproc_per_node 4 train.py"


# ----------------------------------------------------------------------------------------------------------------
# memory and precision


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_loading_a_checkpoint_maps_the_file_instead_of_reading_it_into_memory(tmp_path):
    path = str(tmp_path / "ckpt_000001.pt")
    save_checkpoint(path, dict(model={"w": torch.arange(64 * 2**20, dtype=torch.int32)}, step=1))  # 256 MiB
    before = resident_bytes()
    checkpoint = load_checkpoint(path)
    grown = resident_bytes() - before
    assert grown < 32 * 2**20, f"loading grew resident memory by {grown / 2**20:.0f} MiB"
    assert checkpoint["step"] == 1 and checkpoint["model"]["w"][-1].item() == 64 * 2**20 - 1  # pages read on demand


def test_training_leaves_fp32_matmuls_at_full_precision_for_evaluation_and_sampling(data_dir, tmp_path, monkeypatch):
    """Training's matmuls run in bf16 under autocast; fp32 ones (HellaSwag's scores, the samples) stay exact, so that
    they are the same inside a run as from hellaswag.py and sample.py: train.py does not lower the precision (it once
    set TF32 on CUDA, and had to undo it around both)."""
    import hellaswag
    from model import GPT

    seen, real_score_rows, real_stream = [], hellaswag.score_rows, GPT.generate_stream
    lowered = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: lowered.append(p))
    monkeypatch.setattr(hellaswag, "score_rows", lambda *a, **k: seen.append(torch.get_float32_matmul_precision()) or
                        real_score_rows(*a, **k))  # fmt: skip

    def generate_stream(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        yield from real_stream(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate_stream", generate_stream)
    from hellaswag import synthetic_examples

    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(4)))
    ok(cli("train.py", *tiny(data_dir, tmp_path / "run", "--max-steps", 2, "--hellaswag-interval", 2,
                             "--hellaswag-file", hs, "--sample-interval", 2)))  # fmt: skip
    assert lowered == [] and torch.get_float32_matmul_precision() == "highest"
    assert seen and set(seen) == {"highest"}


def test_a_micro_step_lets_go_of_the_previous_logits_before_the_next_forward():
    alive_at_forward, logits_refs = [], []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            alive_at_forward.append(any(ref() is not None for ref in logits_refs))
            logits = x.float() * self.w  # (B, T): its backward keeps x, not the logits
            logits_refs.append(weakref.ref(logits))
            return logits, logits.mean()

    class Loader:
        position = 0

        def next_batch(self):
            return torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)

    model = Model()
    train.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), Loader(), 3, "cpu", 0.1, 1.0)
    assert alive_at_forward == [False, False, False]


# ----------------------------------------------------------------------------------------------------------------
# process groups and MFU


def test_under_torchrun_nccl_is_bound_to_the_ranks_gpu_with_a_long_timeout(monkeypatch):
    import torch.distributed as dist

    class Joined(Exception):
        pass

    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))

    def init_process_group(**kw):
        calls.update(init=kw)
        raise Joined  # what comes after needs the real GPUs

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Joined):
        train.main(["--preset", "tiny"])
    assert calls["set_device"] == "cuda:1"
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda:1")
    assert calls["init"]["timeout"] >= datetime.timedelta(minutes=30)  # rank 0 may be writing a 19 GB checkpoint


def test_a_one_process_torchrun_run_leaves_no_process_group_behind_and_says_what_restarts_need(data_dir, tmp_path):
    import torch.distributed as dist

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = ["--preset", "tiny", "--device", "cpu", "--data-dir", data_dir, "--max-steps", 2, "--sample-interval", 0]
    r = ok(cli("train.py", *args, "--out-dir", tmp_path / "out", env=env))
    assert not dist.is_initialized() and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in r.stdout
    # torchrun --max-restarts called directly, without what train.sh sets: rank 0 says, once, what to set
    restarts = dict(env, TORCHELASTIC_MAX_RESTARTS="2", MASTER_PORT=str(free_port()))
    r = ok(cli("train.py", *args, "--out-dir", tmp_path / "out2", env=restarts))
    assert r.stdout.count("note: with --max-restarts, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (train.sh does)") == 1
    restarts.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", MASTER_PORT=str(free_port()))
    r = ok(cli("train.py", *args, "--out-dir", tmp_path / "out3", env=restarts))
    assert "note: with --max-restarts" not in r.stdout


def test_a_rank_that_fails_alone_at_the_end_stops_every_rank_with_one_line(data_dir, tmp_path):
    """The export at the end is rank 0's alone: when it fails (here its directory's name was taken by a file during
    training), every rank ends with the one line, none waits for rank 0 at the last barrier."""
    target = tmp_path / "hf"
    args = tiny(data_dir, tmp_path / "run", "--max-steps", 6, "--eval-interval", 0, "--export", target)
    run = Started(torchrun("train.py", *args))
    run.wait_for_step(1)
    target.write_text("not a directory")
    r = run.finish(timeout=120)
    assert r.returncode != 0 and "forcefully" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    why = f"--export {target} is a file, not a directory"  # checked again before it is written
    assert len(errors) == 2 and all(e.endswith(why) for e in errors), r.stderr[-3000:]
    assert f"error: rank 0: {why}" in r.stderr  # the other rank names where it came from
    assert read_jsonl(tmp_path / "run" / "log.jsonl")[-1] == {"event": "finished", "step": 6, "seconds": ANY}


def test_mfu_uses_each_cards_own_peak_and_none_for_unknown_cards(monkeypatch):
    from model import GPT, GPTConfig
    from train import mfu, peak_flops

    cards = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA GH200 480GB": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA GeForce RTX 4090": 165e12,
        "NVIDIA GeForce RTX 3060": None,
        "Tesla T4": None,
    }
    for name, peak in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops("cuda") == peak, name
    assert peak_flops("cpu") is None and mfu(GPT(GPTConfig()), 1024, 600_000, "cpu") is None
    # the reference figure: 124M at 600k tokens/s on an H100 is about 52% of the bf16 peak: 6N per token for the
    # matmuls (N without the position embeddings) and 12 x layers x heads x head size x T for the attention scores
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    N = 124_475_904 - 1024 * 768
    assert mfu(GPT(GPTConfig()), 1024, 600_000, "cuda") == pytest.approx(
        (6 * N + 12 * 12 * 12 * 64 * 1024) * 6e5 / 989e12
    )
    assert mfu(GPT(GPTConfig()), 1024, 600_000, "cuda") == pytest.approx(0.519, abs=0.001)
