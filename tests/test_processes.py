"""No process the downloader starts outlives it, however it ends, and no way of ending it hangs: it finishes, fails,
is stopped by Ctrl-C or SIGTERM, is killed with kill -9, or loses a tokenizer process. Each run gets a session of its
own (as a scheduler, nohup or setsid start one), so that whatever it leaves behind can be found."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SOAK, session_processes, wait_gone, wait_until
from utils import load_script

WORDS = "the of and to in is was for on that with as by at from it an be this which or are have not had".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus that takes a few seconds to tokenize, and one with a bad line in its middle."""
    d = tmp_path_factory.mktemp("processes")
    rng = np.random.default_rng(0)
    lines = [json.dumps(dict(text=" ".join(rng.choice(WORDS, 300)))) + "\n" for _ in range(40_000)]
    (d / "big.jsonl").write_text("".join(lines))
    (d / "bad.jsonl").write_text("".join(lines[:20_000]) + "{not json\n" + "".join(lines[20_000:]))
    return d


def start(corpus_file, out_dir, *extra):
    # SIGINT as a terminal's job has it (a shell that starts jobs in the background hands them SIGINT ignored)
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "download-fineweb-edu.py"), "--data-files", corpus_file, "--out-dir",
         out_dir, "--shard-size", "1e6", "--workers", "2", *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def tokenizer_processes(proc, timeout=60):
    """The tokenizer processes of a running downloader (the children of its fork server), once both exist; [] if the
    downloader ended first."""

    def both():
        if proc.poll() is not None:
            return ["ended"]
        tree = session_processes(proc.pid)
        servers = [p for p, parent in tree.items() if parent == proc.pid and p != proc.pid]
        workers = [p for p, parent in tree.items() if parent in servers]
        return workers if len(workers) == 2 else None

    found = wait_until(both, "the tokenizer processes started", timeout, interval=0.05)
    return [] if found == ["ended"] else found


def assert_nothing_left(proc, timeout=10):
    """Within seconds of the downloader's end, no process of its session is left (each one's end is watched)."""
    left = wait_gone(list(session_processes(proc.pid)), timeout)
    assert not left, f"left behind: {[open(f'/proc/{p}/cmdline').read()[:100] for p in left]}"


def end(proc, how):
    if how == "ctrl_c":
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to every process of the job
    elif how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    elif how == "kill_9":
        os.kill(proc.pid, signal.SIGKILL)
    elif how == "worker_killed":
        os.kill(tokenizer_processes(proc)[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would


@pytest.mark.parametrize(
    "how, returncode, last_line",
    [
        ("finishes", 0, "done: "),
        ("fails", 2, "error: cannot read "),
        ("ctrl_c", 130, "interrupted: what was finished is kept"),
        ("sigterm", 143, "SIGTERM: stopped: what was finished is kept"),
        ("kill_9", -9, None),
        ("worker_killed", 2, "error: a tokenizer process died"),
    ],
)
def test_no_process_outlives_the_downloader_however_it_ends(corpus, tmp_path, how, returncode, last_line):
    proc = start(corpus / ("bad.jsonl" if how == "fails" else "big.jsonl"), tmp_path / "out")
    if how not in ("finishes", "fails"):
        assert tokenizer_processes(proc), "the tokenizer processes never started"
        end(proc, how)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == returncode, err[-2000:]
    if last_line:
        lines = (out if how == "finishes" else err).replace("\r", "\n").strip().splitlines()
        assert lines[-1].startswith(last_line), lines[-3:]
    assert_nothing_left(proc)


@pytest.mark.parametrize("how", ["ctrl_c", "worker_killed"])
def test_no_moment_of_ctrl_c_or_of_a_dying_worker_hangs_the_downloader(corpus, tmp_path, how):
    """Tries at random moments of the run (SOAK of them): every one ends within seconds, and leaves nothing."""
    rng = random.Random(0)
    for attempt in range(SOAK):
        proc = start(corpus / "big.jsonl", tmp_path / f"out{attempt}")
        workers = tokenizer_processes(proc)
        assert workers, "the tokenizer processes never started"
        time.sleep(rng.uniform(0, 1.0))  # the moment
        try:
            if how == "ctrl_c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(rng.choice(workers), signal.SIGKILL)
        except ProcessLookupError:  # the run was over already
            pass
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"try {attempt}: still running 30 s after {how}")
        # 0: the run was done; -2: Ctrl-C reached the interpreter as it exited, after everything was written
        assert proc.returncode in ((130, 0, -2) if how == "ctrl_c" else (2, 0)), (attempt, err[-2000:])
        assert_nothing_left(proc)


def test_a_stop_while_the_tokenizer_processes_start_stops_those_already_started(monkeypatch):
    """SIGTERM or Ctrl-C can come while the pool is still starting its processes: the ones started are stopped before
    the stop goes on, so that none is left to fail on what the downloader cleans up on its way out."""
    import multiprocessing.context

    downloader = load_script("download-fineweb-edu")
    started, real_start = [], multiprocessing.context.ForkServerProcess.start

    def start_then_stop(process):
        real_start(process)
        started.append(process)
        if len(started) == 2:
            raise KeyboardInterrupt  # the signal, just after the second process started

    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", start_then_stop)
    with pytest.raises(KeyboardInterrupt):
        downloader.TokenizerPool(3)
    assert len(started) == 2 and not any(p.is_alive() for p in started)
    assert all(p.exitcode is not None for p in started)  # waited for, not only signalled


def test_ctrl_c_while_the_downloader_is_still_importing_is_the_one_line_exit(corpus, tmp_path):
    for attempt, delay in enumerate([0.1, 0.25, 0.4]):  # within the imports (torch's alone takes most of a second)
        proc = start(corpus / "big.jsonl", tmp_path / f"out{attempt}")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, (delay, err[-2000:])
        assert_nothing_left(proc)
