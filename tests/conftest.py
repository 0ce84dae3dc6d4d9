"""What the tests share: the scripts run as their command lines run them (in this process, or in a new one where the
process is the point), data and runs built once per session, waits that end on the event itself, and the process
table."""

import contextlib
import ctypes
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are flat files at the top of the repo

from utils import EOT, load_script, run_cli  # noqa: E402

torch.set_num_threads(2)
# glibc hands every large freed tensor (the logits over 50,304 tokens, their gradients) back to the OS and page-faults
# it in again at the next step; kept in the heap, a tiny training step is about 1.3x faster. train.sh does the same
# for a CPU run, with the same values for the children of this process (mallopt takes an int: 2 GB here).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "4294967296")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")
with contextlib.suppress(OSError):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 2**31 - 1), libc.mallopt(-1, 2**31 - 1)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

# The random-moment tests (Ctrl-C, a worker killed, a bad network) try this many moments each; SOAK=20 tries 20.
SOAK = int(os.environ.get("SOAK") or 3)
DOWNLOADER = "download-fineweb-edu.py"

# ----------------------------------------------------------------------------------------------------------------
# running the scripts


@contextlib.contextmanager
def environment(changes):
    """os.environ with these changes (None removes a variable), as a child process started with them would see it."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, str(v))
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def math_threads(n):
    """torch's math on n threads (None: as it is). One thread for the runs whose losses are compared bit for bit: with
    two, MKL and OpenMP split the work by the threads they get, and the last bit of a loss has been seen to differ
    between two processes of the same run (2-core AMD EPYC, 1 run in about 15)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same for a new process


def one_thread_env():
    return {**os.environ, **ONE_THREAD}


def script_module(script):
    if script == "misc/plot_log.py":
        import misc.plot_log

        return misc.plot_log
    return load_script(script.removesuffix(".py"))


def cli(script, *args, env=None, threads=None):
    """`python <script> <args>` run in this process: the script's main under run_cli, as its command line runs it (a
    UserError is one line on stderr and exit status 2), without the seconds a new interpreter takes to import torch.
    env: changes to the environment for the run. Returns a CompletedProcess."""
    argv = [str(a) for a in args]
    module = script_module(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    program, sys.argv = sys.argv, [os.path.join(ROOT, script), *argv]  # argparse names the script in its errors
    code = 0
    try:
        with environment(env or {}), math_threads(threads):
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                run_cli(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = program
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess([script, *argv], code, stdout.getvalue(), stderr.getvalue())


def ok(r):
    """The run succeeded; returns it."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def one_line_error(r, message):
    """The run failed with exit status 2 and this message in its last line, without a traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines and message in lines[-1], r.stderr
    return lines[-1]


def run_script(script, *args, env=None, timeout=300, **kw):
    """`python <script> <args>` in a new interpreter: for what only a process shows (signals, kill -9, what is left
    running, the imports)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, **kw)


class Started:
    """A process whose output is read as it comes, line by line (stdout and stderr each), so that a test can wait for
    a line it prints: the event itself, not a guess at how long it takes."""

    def __init__(self, cmd, env=None, **kw):
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(env or os.environ, PYTHONUNBUFFERED="1"), **kw)  # fmt: skip
        self.pid, self.args = self.proc.pid, cmd
        self.lines = {"stdout": [], "stderr": []}
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _read(self, name):
        for line in getattr(self.proc, name):
            with self.changed:
                self.lines[name].append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines[name].append(None)  # the end of the stream
            self.changed.notify_all()

    def wait_for(self, pattern, stream="stdout", timeout=120):
        """The first line of the stream that matches the regex pattern, as it is printed; fails the test if the process
        ends or the timeout passes first."""
        deadline, seen = time.monotonic() + timeout, 0
        with self.changed:
            while True:
                for line in self.lines[stream][seen:]:
                    if line is None:
                        pytest.fail(f"{self.args[1]} ended (exit {self.proc.wait()}) before printing /{pattern}/:\n"
                                    f"{self.stderr()[-3000:]}")  # fmt: skip
                    if re.search(pattern, line):
                        return line
                seen = len(self.lines[stream])
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{self.args[1]} printed no line like /{pattern}/ within {timeout} s")
                self.changed.wait(left)

    def wait_for_step(self, step, timeout=120):
        """Until train.py prints the line of this optimizer step (the step is done and logged)."""
        return self.wait_for(rf"^step\s+{step}/", timeout=timeout)

    def send_signal(self, signum):
        self.proc.send_signal(signum)

    def finish(self, timeout=120):
        """Waits for the end; returns a CompletedProcess with everything it printed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.args[1]} still running {timeout} s later:\n{self.stderr()[-3000:]}")
        for reader in self.readers:
            reader.join(timeout)
        return subprocess.CompletedProcess(self.args, self.proc.returncode, self.stdout(), self.stderr())

    def stdout(self):
        with self.changed:
            return "".join(line for line in self.lines["stdout"] if line)

    def stderr(self):
        with self.changed:
            return "".join(line for line in self.lines["stderr"] if line)


def start_script(script, *args, env=None, **kw):
    return Started([sys.executable, os.path.join(ROOT, script), *args], env=env, **kw)


def wait_until(condition, what, timeout=60, interval=0.02):
    """condition() is true, or the test fails naming what did not happen: for what no event announces (a process
    table entry, a file another process writes)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(interval)
    return result


def torchrun(script, *args, nproc=2):
    """The command that runs one of the repo's scripts as nproc local processes under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*cmd, os.path.join(ROOT, script), *map(str, args)]


def torchrun_node(script, node_rank, port, *args):
    """The command for one of two loopback "nodes" (one process each) under torchrun; script is a path as given."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank)]
    cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*cmd, str(script), *map(str, args)]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# data, models and runs, built once per session: read-only by convention, copied where a test changes them


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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def finished_run(data_dir, tmp_path_factory):
    """A finished run of the tiny preset as it comes: 20 steps, evaluations and samples every 10, checkpoints every 5
    (the newest 3 kept: after steps 10, 15 and 20), trained with one math thread, so that a run stopped and resumed
    with these settings must log the same loss at every step, bit for bit."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(cli("train.py", *tiny(data_dir, out), threads=1))
    return out


def copy_run(run, to, checkpoints=()):
    """A copy of a run's out dir to change: its log and the checkpoints named (steps), no others."""
    to.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "log.jsonl", to)
    for step in checkpoints:
        shutil.copy(run / f"ckpt_{step:06d}.pt", to)
    return to


def train_losses(out_dir):
    from checkpoint import read_log

    return {r["step"]: r["train_loss"] for r in read_log(os.path.join(out_dir, "log.jsonl")) if "train_loss" in r}


WORDS = "the of and to in is was for on that with as by at from it an be this which or are have not had".split()


def make_corpus(path, n_docs, seed=0, min_words=10, max_words=300):
    """A jsonl corpus of word-salad documents, with an empty one and one of odd characters; returns the texts."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n_docs):
        words = rng.choice(WORDS, rng.integers(min_words, max_words))
        texts.append(f"Document {i}: " + " ".join(words) + ".")
    texts[3] = ""  # an empty document still gets its EOT
    texts[5] = "Ünïcödé, emoji 🙂 and a literal <|endoftext|> inside the text."
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps(dict(id=len(t), text=t)) + "\n")
    return texts


@pytest.fixture(scope="session")
def downloaded(tmp_path_factory):
    """A corpus of 400 documents tokenized by an uninterrupted downloader run with one tokenizer process, in shards of
    3,000 tokens: (the corpus, its texts, the out dir)."""
    corpus = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    texts = make_corpus(corpus, 400)
    out = tmp_path_factory.mktemp("downloaded") / "out"
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 3000, "--workers", 1))
    return corpus, texts, out


def quickstart_sh(data, out, *args):
    """./train.sh --preset quickstart, as the README runs it on a machine without a GPU."""
    args = ["--preset", "quickstart", "--data-dir", data, "--out-dir", out, "--eval-interval", 15, "--val-steps", 2,
            "--sample-interval", 15, "--checkpoint-interval", 15, *args]  # fmt: skip
    return ok(subprocess.run([os.path.join(ROOT, "train.sh"), *map(str, args)], capture_output=True, text=True,
                             env=dict(os.environ, NGPU="0"), timeout=600))  # fmt: skip


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory):
    """The quick start's first 15 steps: the stories generated and tokenized into data/, and trained on. Returns (data
    dir, out dir, the run)."""
    d = tmp_path_factory.mktemp("quickstart")
    return d / "data", d / "out", quickstart_sh(d / "data", d / "out", "--max-steps", 15)


@pytest.fixture(scope="session")
def quickstart(quickstart_data):
    """The quick start continued to step 30, where it has learned: the warmup of its learning rate lasts 30 steps, so
    the steps are those of one run of 30. Returns (data dir, out dir, the first run, the second)."""
    data, out, first = quickstart_data
    return data, out, first, quickstart_sh(data, out, "--max-steps", 30, "--resume")


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory):
    """12 HellaSwag-format examples (synthetic: no network)."""
    from hellaswag import synthetic_examples

    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(12)))
    return path


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


# ----------------------------------------------------------------------------------------------------------------
# processes


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


def descendants(pid):
    """The processes under pid (children, theirs, ...)."""
    table, found = process_table(), [pid]
    for p in found:
        found += [child for child, (parent, _) in table.items() if parent == p]
    return found[1:]


def wait_gone(pids, timeout):
    """Until every one of these processes has ended (each watched through a pidfd: its end is the event); returns
    those still running at the timeout."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            import select

            ready, _, _ = select.select(list(fds.values()), [], [], left)
            for pid in [p for p, fd in fds.items() if fd in ready]:
                os.close(fds.pop(pid))
        return [pid for pid in fds if pid in process_table()]  # a zombie has ended too
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite leaves no process of its own behind: at its end no process names this repo or runs multiprocessing in
    this session, but for this process's own fork server and resource tracker, which end with it, and the processes
    of another pytest running beside this one (another checkout's suite, started from the same shell)."""
    yield
    me, my_session = os.getpid(), os.getsid(0)

    def cmdline_of(pid):
        try:
            return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        except OSError:
            return None

    def left():
        table = process_table()
        ancestors, p = set(), me
        while p in table and p not in ancestors:
            ancestors.add(p)
            p = table[p][0]

        def under_another_pytest(pid):  # a process we leave behind is ours or init's child, never another pytest's
            seen = set()
            while (pid := table.get(pid, (0,))[0]) > 1 and pid not in seen and pid not in ancestors:
                seen.add(pid)
                argv = (cmdline_of(pid) or "").split()
                if any(os.path.basename(a) in ("pytest", "py.test") for a in argv[:3]):  # pytest, or python -m pytest
                    return True
            return False

        found = []
        for pid, (parent, session) in table.items():
            if (cmdline := cmdline_of(pid)) is None:
                continue
            own_helper = parent == me and ("multiprocessing.forkserver" in cmdline or "resource_tracker" in cmdline)
            ours = ROOT in cmdline or (session == my_session and "multiprocessing" in cmdline)
            if ours and pid not in ancestors and not own_helper and not under_another_pytest(pid):
                found.append((pid, cmdline[:120]))
        return found

    still = wait_gone([pid for pid, _ in left()], timeout=15)
    assert not still, f"the test suite left processes behind: {[c for p, c in left() if p in still]}"


# ----------------------------------------------------------------------------------------------------------------
# the network: a model of the hub on 127.0.0.1

HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A model of the hub on 127.0.0.1 (tests/loopback_http.py) serving 6 parquet files as /files/corpus/*, as the
    dataset test-org/edu (config sample-tiny), and as FineWeb-Edu's sample-10BT, the downloader's default."""
    from loopback_http import LoopbackServer, write_parquet_files

    root = tmp_path_factory.mktemp("www")
    texts = write_parquet_files(root / "corpus")
    shutil.copytree(root / "corpus", root / "hub" / "test-org" / "edu" / "sample" / "tiny")
    shutil.copytree(root / "corpus", root / "hub" / "HuggingFaceFW" / "fineweb-edu" / "sample" / "10BT")  # the default
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
    sample_10bt = dict(config_name="sample-10BT", data_files=[dict(split="train", path="sample/10BT/*")])
    server.add_dataset("HuggingFaceFW/fineweb-edu", HUB_SHA, [sample_10bt])
    yield server
    server.close()


@pytest.fixture(autouse=True)
def clean_server(request):
    if "server" in request.fixturenames:
        server = request.getfixturevalue("server")
        server.reset()
