import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are flat files at the top of the repo

from utils import EOT  # noqa: E402

torch.set_num_threads(2)


def write_shard(path, tokens, dtype=np.uint16):
    np.save(path, np.asarray(tokens, dtype=dtype))


def make_docs(n_docs, seed=0, min_len=5, max_len=60, vocab=5000):
    """Documents of random token ids, each laid out as in the shards: EOT then its tokens."""
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([[EOT], rng.integers(0, vocab, rng.integers(min_len, max_len))]).astype(np.uint16)
        for _ in range(n_docs)
    ]


@pytest.fixture
def shard_dir(tmp_path):
    """Writes a token stream into <prefix>_<split>_NNNNNN.npy shards of the given sizes; returns the stream."""

    def make(split, sizes, seed=0, prefix="test"):
        stream = np.concatenate(make_docs(sum(sizes) // 20 + 10, seed=seed))[: sum(sizes)]
        assert len(stream) == sum(sizes)
        start = 0
        first = 0 if split == "val" else 1
        for i, size in enumerate(sizes):
            write_shard(tmp_path / f"{prefix}_{split}_{first + i:06d}.npy", stream[start : start + size])
            start += size
        return stream.astype(np.int64)

    make.dir = tmp_path
    return make


@pytest.fixture
def hf_gpt2_dir(tmp_path):
    """save_pretrained directory of a random transformers GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=300, seed=0):
        torch.manual_seed(seed)
        config = GPT2Config(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size
        )
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():  # random biases and LayerNorm gains, so that a mis-loaded one shows in the logits
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.1) if name.endswith("bias") else p.normal_(1.0, 0.1)
        d = tmp_path / f"hf_{n_layer}_{n_embd}_{seed}"
        model.save_pretrained(d)
        return model, d

    return make


# One math thread for the runs whose losses are compared bit for bit across processes. With two, MKL and OpenMP split
# the work by the threads they get, and the last bit of a loss has been seen to differ between two processes of the
# same run (2-core AMD EPYC, 1 run in about 15); with one thread nothing in the arithmetic depends on timing.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def one_thread_env():
    return {**os.environ, **ONE_THREAD}


def run_script(script, *args, env=None, timeout=300):
    """Run one of the repo's scripts in a fresh interpreter."""
    import subprocess

    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def torchrun(script, *args, nproc=2):
    """The command that runs one of the repo's scripts as nproc local processes under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*cmd, os.path.join(ROOT, script), *map(str, args)]


def torchrun_node(script, node_rank, port, *args):
    """The command for one of two loopback "nodes" (one process each) under torchrun; script is a path as given."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank)]
    cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*cmd, str(script), *map(str, args)]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Writes a checkpoint of a small random GPT (padded 50304 vocabulary) in train.py's format; returns its path."""
    from dataclasses import asdict

    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig

    def make(seed=0, block_size=256, **shape):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(block_size=block_size, **{**dict(n_layer=2, n_head=2, n_embd=32), **shape}))
        path = tmp_path / f"ckpt_{seed:06d}.pt"
        save_checkpoint(str(path), dict(model=model.state_dict(), model_config=asdict(model.config), step=seed))
        return path

    return make


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Token shards of random documents for train.py: a val shard and two train shards."""
    d = tmp_path_factory.mktemp("shards")
    stream = np.concatenate(make_docs(3000))
    np.save(d / "t_val_000000.npy", stream[:5000])
    np.save(d / "t_train_000001.npy", stream[5000:40000])
    np.save(d / "t_train_000002.npy", stream[40000:])
    return d


def tiny(data_dir, out_dir, *extra):
    """train.py's arguments for the tiny preset on the CPU."""
    return ["--preset", "tiny", "--device", "cpu", "--data-dir", data_dir, "--out-dir", out_dir, *map(str, extra)]


def train_losses(out_dir):
    from checkpoint import read_log

    return {r["step"]: r["train_loss"] for r in read_log(os.path.join(out_dir, "log.jsonl")) if "train_loss" in r}


def process_table():
    """pid -> (parent pid, session id) of every process on the machine, from /proc."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "pid (command name)"
        except (OSError, ValueError):
            continue  # not a process, or one that just ended
        if fields[0] != "Z":  # a zombie has ended: only its parent's wait is missing
            table[int(name)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(sid):
    """pid -> parent pid of the live processes in session sid."""
    return {pid: parent for pid, (parent, session) in process_table().items() if session == sid}


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite leaves no process of its own behind: at its end no process names this repo or runs multiprocessing in
    this session, but for this process's own fork server and resource tracker, which end with it."""
    yield
    me, my_session, deadline = os.getpid(), os.getsid(0), time.time() + 15
    while True:
        table = process_table()
        ancestors, p = set(), me
        while p in table and p not in ancestors:
            ancestors.add(p)
            p = table[p][0]
        left = []
        for pid, (parent, session) in table.items():
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            except OSError:
                continue
            own_helper = parent == me and ("multiprocessing.forkserver" in cmdline or "resource_tracker" in cmdline)
            ours = ROOT in cmdline or (session == my_session and "multiprocessing" in cmdline)
            if ours and pid not in ancestors and not own_helper:
                left.append(f"{pid}: {cmdline[:120]}")
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"the test suite left processes behind: {left}"


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A model of the hub on 127.0.0.1 (tests/loopback_http.py) serving 6 parquet files as /files/corpus/*, and as the
    dataset test-org/edu (config sample-tiny)."""
    from loopback_http import LoopbackServer, write_parquet_files

    root = tmp_path_factory.mktemp("www")
    texts = write_parquet_files(root / "corpus")
    shutil.copytree(root / "corpus", root / "hub" / "test-org" / "edu" / "sample" / "tiny")
    write_parquet_files(root / "hub" / "test-org" / "edu" / "data" / "other", n_files=1, seed=1)  # another config's
    server = LoopbackServer(root)
    server.texts = texts
    server.files = sorted(os.listdir(root / "corpus"))
    server.add_dataset(
        "test-org/edu",
        HUB_SHA,
        [
            dict(config_name="sample-tiny", data_files=[dict(split="train", path="sample/tiny/*")]),
            dict(config_name="default", data_files=[dict(split="train", path="data/*/*")]),
        ],
    )
    yield server
    server.close()


@pytest.fixture(autouse=True)
def clean_server(request):
    if "server" in request.fixturenames:
        server = request.getfixturevalue("server")
        server.reset()
