"""download-fineweb-edu.py over HTTP, against a loopback server of our own: range requests, retries of transient
faults, one-line permanent errors, resume without re-fetching, the hub's file listing, and no fork under threads."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, run_script
from http_files import HTTPFile, Retry
from loopback_http import LoopbackServer
from utils import UserError, load_script

DOWNLOADER = "download-fineweb-edu.py"
WORDS = "the of and to in is was for on that with as by at from it an be this which or are have not had".split()
N_FILES = 6
SHA = "0123456789abcdef0123456789abcdef01234567"


def write_parquet_files(folder, n_files=N_FILES, docs_per_file=240, seed=0):
    """Parquet files of word-salad documents in row groups of 40, with a bulky second column the downloader must not
    fetch. Returns the texts in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    texts = []
    for i in range(n_files):
        part = [f"file {i} doc {j}: " + " ".join(rng.choice(WORDS, rng.integers(5, 200))) for j in range(docs_per_file)]
        part[7] = ""  # an empty document still gets its EOT
        noise = [rng.bytes(600).hex() for _ in part]
        table = pa.table({"text": part, "metadata": noise})
        pq.write_table(table, os.path.join(folder, f"{i:03d}_00000.parquet"), row_group_size=40)
        texts += part
    return texts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    texts = write_parquet_files(root / "corpus")
    shutil.copytree(root / "corpus", root / "hub" / "test-org" / "edu" / "sample" / "tiny")
    write_parquet_files(root / "hub" / "test-org" / "edu" / "data" / "other", n_files=1, seed=1)  # another config's
    server = LoopbackServer(root)
    server.texts = texts
    server.files = sorted(os.listdir(root / "corpus"))
    server.add_dataset(
        "test-org/edu",
        SHA,
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
        server.faults.clear()
        server.delay = 0.0
        server.ranges = True
        server.reset_counts()


def urls(server):
    return [f"{server.url}/files/corpus/{name}" for name in server.files]


def run(*args, env=None, timeout=300):
    return run_script(DOWNLOADER, *args, "--shard-size", 4000, "--workers", 2, env=env, timeout=timeout)


def shards(out_dir):
    return {n: (out_dir / n).read_bytes() for n in sorted(os.listdir(out_dir)) if n.endswith(".npy")}


@pytest.fixture(scope="module")
def local_reference(server, tmp_path_factory):
    """The same parquet files read from disk."""
    out = tmp_path_factory.mktemp("local") / "out"
    r = run("--data-files", os.path.join(server.root, "corpus", "*.parquet"), "--out-dir", out)
    assert r.returncode == 0, r.stderr
    return out


def test_shards_over_http_equal_shards_from_the_same_files_on_disk(server, local_reference, tmp_path):
    r = run("--data-files", *urls(server), "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "out") == shards(local_reference) and len(shards(local_reference)) > 10
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files"] == urls(server) and manifest["documents"] == len(server.texts)
    local = json.loads((local_reference / "manifest.json").read_text())
    assert [s["next_position"] for s in manifest["shards"]] == [s["next_position"] for s in local["shards"]]
    # range requests: the text column only, never the bulky metadata column
    total = sum(os.path.getsize(os.path.join(server.root, "corpus", f)) for f in server.files)
    assert sum(server.sent.values()) < total / 3, (sum(server.sent.values()), total)
    assert all(rng is not None for _, rng, _ in server.requests)


def test_transient_faults_are_retried_and_change_nothing(server, local_reference, tmp_path):
    server.fault(r"000_00000", status=503)  # the first request of a file
    server.fault(r"001_00000", status=429, retry_after=0)
    server.fault(r"002_00000", count=3)  # connections dropped mid-body
    server.fault(r"004_00000", status=500, count=2)
    server.fault(r"005_00000", status=502)
    r = run("--data-files", *urls(server), "--out-dir", tmp_path / "out", "--retry-wait", 0.01)
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "out") == shards(local_reference)
    retries = [line for line in r.stderr.splitlines() if line.startswith("retry ")]
    assert len(retries) == 8, r.stderr
    assert any("HTTP 503 Service Unavailable" in line for line in retries)
    assert any("HTTP 429" in line for line in retries)
    assert sum("connection closed" in line or "IncompleteRead" in line for line in retries) == 3
    assert all(f"{server.url}/files/corpus/" in line for line in retries)


def test_permanent_errors_stop_at_once_with_one_line_naming_the_url(server, tmp_path):
    missing = f"{server.url}/files/corpus/no-such-file.parquet"
    forbidden = urls(server)[2]
    server.fault(r"002_00000", status=403, count=100)
    for i, (data_files, message) in enumerate(
        [
            ([*urls(server)[:1], missing], f"error: cannot download {missing}: HTTP 404 Not Found"),
            (urls(server)[:3], f"error: cannot download {forbidden}: HTTP 403 Forbidden (private or gated"),
        ]
    ):
        t0 = time.time()
        r = run("--data-files", *data_files, "--out-dir", tmp_path / f"out{i}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
        assert "retry" not in r.stderr and time.time() - t0 < 30


def test_retries_are_bounded(server, tmp_path):
    url = urls(server)[0]
    server.fault(r"000_00000", status=503, count=100)
    r = run("--data-files", url, "--out-dir", tmp_path / "out", "--retries", 3, "--retry-wait", 0.01)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot download {url}: HTTP 503 Service Unavailable, 3 attempts; the finished shards are kept: "
        "run again to continue"
    )
    assert [line.split(" in ")[0] for line in r.stderr.splitlines() if line.startswith("retry ")] == [
        "retry 1/2",
        "retry 2/2",
    ]


def test_a_resume_after_kill_9_fetches_none_of_the_finished_files(server, local_reference, tmp_path):
    out = tmp_path / "out"
    server.delay = 0.03  # a slow network, so that the kill lands mid-run
    cmd = [sys.executable, os.path.join(ROOT, DOWNLOADER), "--data-files", *urls(server), "--out-dir", str(out)]
    proc = subprocess.Popen([*cmd, "--shard-size", "4000", "--workers", "2"], stderr=subprocess.PIPE, cwd=ROOT)
    position = [0, 0]
    deadline = time.time() + 120
    while position[0] < N_FILES - 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        try:
            position = json.loads((out / "manifest.json").read_text())["shards"][-1]["next_position"]
        except (OSError, ValueError, IndexError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    position = json.loads((out / "manifest.json").read_text())["shards"][-1]["next_position"]
    assert N_FILES - 2 <= position[0] < N_FILES
    server.delay = 0.0
    server.reset_counts()
    r = run("--data-files", *urls(server), "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_reference)
    fetched = {name: server.sent[f"corpus/{name}"] for name in server.files}
    assert all(fetched[name] == 0 for name in server.files[: position[0]]), fetched
    assert all(fetched[name] > 0 for name in server.files[position[0] + 1 :]), fetched


def test_ctrl_c_while_downloading_is_one_line_and_the_rerun_continues(server, local_reference, tmp_path):
    out = tmp_path / "out"
    server.delay = 0.2  # a slow network: the run is still going when Ctrl-C comes
    cmd = [sys.executable, os.path.join(ROOT, DOWNLOADER), "--data-files", *urls(server), "--out-dir", str(out)]
    # Ctrl-C as in a terminal: a shell that starts jobs in the background hands them SIGINT ignored
    proc = subprocess.Popen([*cmd, "--shard-size", "4000", "--workers", "1"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*_train_*.npy")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: what was finished is kept"), stderr
    server.delay = 0.0
    assert run("--data-files", *urls(server), "--out-dir", out).returncode == 0
    assert shards(out) == shards(local_reference)


def hub_env(server, **extra):
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_TOKEN="hf_loopbacktoken", **extra)
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_the_default_source_lists_the_configs_parquet_files_through_huggingface_hub(server, local_reference, tmp_path):
    server.fault(r"^/api/datasets/test-org/edu/tree/", status=503)  # the listing is retried too
    out = tmp_path / "out"
    args = ["--dataset", "test-org/edu", "--name", "sample-tiny", "--out-dir", out, "--retry-wait", 0.01]
    r = run(*args, env=hub_env(server))
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == [f"hf://datasets/test-org/edu@{SHA}/sample/tiny/{name}" for name in server.files]
    assert manifest["source"]["revision"] == "main"
    # the token goes to the hub's API and resolve URLs, never to where the files are redirected
    hub = [(path, auth) for path, _, auth in server.requests if "/test-org/edu/" in path]
    assert all(auth == "Bearer hf_loopbacktoken" for path, auth in hub if not path.startswith("/files")), hub
    assert all(auth is None for path, _, auth in server.requests if path.startswith("/files"))
    assert any(path.startswith("/files/hub/test-org/edu/sample/tiny/") for path, _, _ in server.requests)

    # a resume takes the file list from the manifest: the hub is not listed again
    manifest["shards"] = manifest["shards"][:5]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    server.reset_counts()
    r = run(*args, env=hub_env(server))
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_reference)
    assert not any(path.startswith("/api/datasets/") for path, _, _ in server.requests)


def test_hf_paths_with_globs_and_a_missing_config(server, local_reference, tmp_path):
    r = run("--data-files", "hf://datasets/test-org/edu/sample/tiny/*.parquet", "--out-dir", tmp_path / "glob",
            env=hub_env(server))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "glob") == shards(local_reference)
    one = f"hf://datasets/test-org/edu@{SHA}/sample/tiny/{server.files[0]}"  # a single file, pinned to a commit
    r = run("--data-files", one, "--out-dir", tmp_path / "one", env=hub_env(server))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["files"] == [one]
    r = run("--dataset", "test-org/edu", "--name", "sample-huge", "--out-dir", tmp_path / "x", env=hub_env(server))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: test-org/edu has no config 'sample-huge' (configs: sample-tiny, default)"
    )
    r = run("--dataset", "test-org/nothing", "--out-dir", tmp_path / "x", env=hub_env(server))
    assert r.returncode == 2 and "cannot download hf://datasets/test-org/nothing@main: HTTP 404" in r.stderr
    assert not (tmp_path / "x").exists()


def test_jsonl_gz_over_http_equals_the_local_file(server, tmp_path):
    path = os.path.join(server.root, "corpus-jsonl", "docs.jsonl.gz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt") as f:
        for text in server.texts[:500]:
            f.write(json.dumps(dict(text=text)) + "\n")
    assert run("--data-files", path, "--out-dir", tmp_path / "local").returncode == 0
    server.fault(r"docs.jsonl.gz", count=1)
    r = run("--data-files", f"{server.url}/files/corpus-jsonl/docs.jsonl.gz", "--out-dir", tmp_path / "http",
            "--retry-wait", 0.01)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "http") == shards(tmp_path / "local")


def test_tokenizer_workers_are_not_forked_from_the_downloading_process():
    """A fork copies the locks of the threads running here (the read-ahead thread, pyarrow's, an HTTP client's) in
    whatever state they are in; a child that then needs one waits forever. The workers come from a fork server."""
    downloader = load_script("download-fineweb-edu")
    with downloader.TokenizerPool(2) as pool:
        parents = {int(open(f"/proc/{p.pid}/stat").read().split(") ")[1].split()[1]) for p in pool.processes}
        for texts in (["hello world", ""], ["one"], ["two", "three"]):
            pool.submit(texts)
        results = [pool.result() for _ in range(3)]
    assert os.getpid() not in parents and len(parents) == 1  # both from the one fork server
    assert [lengths.tolist() for _, lengths in results] == [[3, 1], [2], [2, 2]]  # in the order submitted
    assert results[0][0].dtype == np.uint16


def test_http_file_reads_ranges_and_resumes_a_dropped_body(server):
    path = os.path.join(server.root, "corpus", server.files[0])
    data = open(path, "rb").read()
    server.fault(r"000_00000", count=2)
    with HTTPFile(urls(server)[0], Retry(wait=0.01)) as f:
        assert f.size == len(data)
        f.seek(1000)
        assert f.read(5000) == data[1000:6000]
        f.seek(-10, os.SEEK_END)
        assert f.read(100) == data[-10:] and f.read(10) == b""
    server.reset_counts()
    with HTTPFile(urls(server)[0], Retry(wait=0.01)) as f:
        assert f.read() == data  # the whole file in one request (after the one that asks for the size)
    assert len(server.requests) == 2
    server.ranges = False  # every answer is the whole file: the reader skips to the part it asked for
    with HTTPFile(urls(server)[0], Retry(wait=0.01)) as f:
        assert f.size == len(data)
        f.seek(7000)
        assert f.read(3000) == data[7000:10000]
    with pytest.raises(UserError, match="cannot download http://no-such-host.invalid/x: "):
        HTTPFile("http://no-such-host.invalid/x", Retry(wait=0.01))  # no such host: not retried


def test_a_stopped_retry_does_not_wait_out_its_backoff(server):
    """When the download is stopped (Ctrl-C, an error elsewhere), the reader thread is not left sleeping for a retry."""
    retry = Retry(wait=30)
    server.fault(r"000_00000", status=503)
    threading.Timer(0.5, retry.stop.set).start()
    t0 = time.time()
    with pytest.raises(UserError, match="stopped"):
        HTTPFile(urls(server)[0], retry)
    assert time.time() - t0 < 5
