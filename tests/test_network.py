"""download-fineweb-edu.py over HTTP, against a loopback server of our own: range requests, retries of transient
faults, one-line permanent errors, resume without re-fetching, the hub's file listing, and no fork under threads."""

import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DOWNLOADER, ROOT, SOAK, cli, wait_until
from conftest import HUB_SHA as SHA
from utils import load_script

N_FILES = 6


def urls(server):
    return [f"{server.url}/files/corpus/{name}" for name in server.files]


def run(*args):
    return cli(DOWNLOADER, *args, "--shard-size", 4000, "--workers", 2)


def last_position(out):
    """Where the shards written so far end, (file, row), as the manifest says."""
    try:
        return json.loads((out / "manifest.json").read_text())["shards"][-1]["next_position"]
    except (OSError, ValueError, IndexError):
        return [0, 0]


def shards(out_dir):
    return {n: (out_dir / n).read_bytes() for n in sorted(os.listdir(out_dir)) if n.endswith(".npy")}


@pytest.fixture(scope="session")
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
    assert all(request.range is not None for request in server.requests)


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
    wait_until(lambda: last_position(out)[0] >= N_FILES - 2 or proc.poll() is not None,
               f"the shards of {N_FILES - 2} files written", timeout=120)  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    position = last_position(out)
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
    wait_until(lambda: list(out.glob("*_train_*.npy")), "a train shard written", timeout=120)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: what was finished is kept"), stderr
    server.delay = 0.0
    assert run("--data-files", *urls(server), "--out-dir", out).returncode == 0
    assert shards(out) == shards(local_reference)


@pytest.fixture
def hub(server, monkeypatch):
    """The hub the downloader talks to is the loopback model, with a token: HF_ENDPOINT, which huggingface_hub also
    keeps in a constant from when it was imported."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_loopbacktoken")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return server


def test_the_default_source_lists_the_configs_parquet_files_through_huggingface_hub(hub, local_reference, tmp_path):
    server = hub
    server.fault(r"^/api/datasets/HuggingFaceFW/fineweb-edu/tree/", status=503)  # the listing is retried too
    out = tmp_path / "out"
    args = ["--out-dir", out, "--retry-wait", 0.01]  # FineWeb-Edu's sample-10BT: no --dataset, no --name
    r = run(*args)
    assert r.returncode == 0, r.stderr
    renamed = {name.replace("shard_", "edufineweb_"): data for name, data in shards(local_reference).items()}
    assert shards(out) == renamed  # the same shards, named as FineWeb-Edu's always were
    manifest = json.loads((out / "manifest.json").read_text())
    where = f"HuggingFaceFW/fineweb-edu@{SHA}/sample/10BT"
    assert manifest["files"] == [f"hf://datasets/{where}/{name}" for name in server.files]
    assert manifest["source"]["revision"] == "main"
    # the token goes to the hub's API and resolve URLs, never to where the files are redirected
    hub = [r for r in server.requests if r.host == "hub" and "/HuggingFaceFW/fineweb-edu/" in r.path]
    assert hub and all(r.authorization == "Bearer hf_loopbacktoken" for r in hub), hub
    cdn = [r for r in server.requests if r.host == "cdn"]
    files = "/files/hub/HuggingFaceFW/fineweb-edu/sample/10BT/"
    assert all(r.authorization is None and r.path.startswith(files) for r in cdn)
    assert len(cdn) > len(server.files)

    # a resume takes the file list from the manifest: the hub is not listed again
    manifest["shards"] = manifest["shards"][:5]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    server.reset_counts()
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert shards(out) == renamed
    assert not any(r.path.startswith("/api/datasets/") for r in server.requests)


def test_hf_paths_with_globs_and_a_missing_config(hub, local_reference, tmp_path):
    server = hub
    r = run("--data-files", "hf://datasets/test-org/edu/sample/tiny/*.parquet", "--out-dir", tmp_path / "glob")
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "glob") == shards(local_reference)
    one = f"hf://datasets/test-org/edu@{SHA}/sample/tiny/{server.files[0]}"  # a single file, pinned to a commit
    r = run("--data-files", one, "--out-dir", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["files"] == [one]
    r = run("--dataset", "test-org/edu", "--name", "sample-huge", "--out-dir", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: test-org/edu has no config 'sample-huge' (configs: sample-tiny, default)"
    )
    r = run("--dataset", "test-org/nothing", "--out-dir", tmp_path / "x")
    assert r.returncode == 2 and "cannot download hf://datasets/test-org/nothing@main: HTTP 404" in r.stderr
    assert not (tmp_path / "x").exists()


def test_jsonl_gz_over_http_equals_the_local_file(server, tmp_path):
    path = os.path.join(server.root, "corpus-jsonl", "docs.jsonl.gz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt") as f:
        for text in server.texts[:500]:
            f.write(json.dumps(dict(text=text)) + "\n")
    assert run("--data-files", path, "--out-dir", tmp_path / "local").returncode == 0
    open(os.path.join(server.root, "corpus-jsonl", "empty.jsonl"), "w").close()  # an empty file adds nothing
    server.fault(r"docs.jsonl.gz", count=1)
    empty, docs = (f"{server.url}/files/corpus-jsonl/{name}" for name in ("empty.jsonl", "docs.jsonl.gz"))
    r = run("--data-files", empty, docs, "--out-dir", tmp_path / "http", "--retry-wait", 0.01)
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "http") == shards(tmp_path / "local")
    assert f"warning: {empty} is empty: no documents from it" in r.stderr


def test_a_password_in_a_url_is_refused_and_never_printed(tmp_path):
    r = run("--data-files", "http://alice:s3cret@127.0.0.1:9/f.jsonl", "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --data-files http://alice:***@127.0.0.1:9/f.jsonl: a password in a URL")
    assert "s3cret" not in r.stdout + r.stderr and not (tmp_path / "out").exists()


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


def resolve_urls(server):
    return [f"{server.url}/datasets/test-org/edu/resolve/{SHA}/sample/tiny/{name}" for name in server.files]


@pytest.mark.parametrize("connections", [8, 1])
def test_over_a_wan_one_redirect_per_file_a_request_per_row_group_and_the_same_shards(
    server, local_reference, tmp_path, connections
):
    """However many requests are in flight, the documents come in order: the shards and the resume positions are the
    local run's."""
    server.wan(delay=0.02, connect_delay=0.06)
    out = tmp_path / "out"
    r = run("--data-files", *resolve_urls(server), "--out-dir", out, "--connections", connections)
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_reference)
    manifest, local = (json.loads((d / "manifest.json").read_text()) for d in (out, local_reference))
    assert [s["next_position"] for s in manifest["shards"]] == [s["next_position"] for s in local["shards"]]
    row_groups = 6 * len(server.files)
    assert len([r for r in server.requests if r.host == "hub"]) == len(server.files)  # one redirect per file
    assert len([r for r in server.requests if r.host == "cdn"]) == row_groups + len(server.files)  # + size, footer
    assert server.connections["cdn"] <= connections and server.connections["hub"] <= connections
    assert "retry" not in r.stderr


def test_a_download_stalled_by_a_dribbling_server_goes_on_after_the_stall_time(server, local_reference, tmp_path):
    server.fault(server.files[2], mode="dribble", every=0.2, count=2)
    out = tmp_path / "out"
    r = run("--data-files", *resolve_urls(server), "--out-dir", out, "--stall-seconds", 1, "--retry-wait", 0.01)
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_reference)
    assert r.stderr.count("the transfer stalled (") == 2, r.stderr


def test_no_moment_of_ctrl_c_hangs_a_download_over_a_bad_network(server, tmp_path):
    """Tries at random moments (SOAK of them) of a download over a WAN whose server dribbles, goes silent and drops
    connections: every one ends within seconds with the one-line message (or is done), and leaves no process."""
    from test_processes import assert_nothing_left, tokenizer_processes

    rng = random.Random(0)
    server.wan(delay=0.05, connect_delay=0.15, connection_rate=2e6, link_rate=6e6)
    for attempt in range(SOAK):
        server.faults.clear()
        server.fault(server.files[rng.randrange(6)], mode="dribble", every=1.0, count=50)
        server.fault(server.files[rng.randrange(6)], mode="silent", every=60, count=50)
        server.fault(server.files[rng.randrange(6)], mode="drop", count=3)
        out = str(tmp_path / f"out{attempt}")
        cmd = [sys.executable, os.path.join(ROOT, DOWNLOADER), "--data-files", *resolve_urls(server), "--out-dir", out,
               "--shard-size", "4000", "--workers", "2", "--retry-wait", "0.01"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        assert tokenizer_processes(proc), "the tokenizer processes never started"
        time.sleep(rng.uniform(0, 3.0))  # the moment
        with contextlib.suppress(ProcessLookupError):  # the run was over already
            os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"try {attempt}: still running 30 s after Ctrl-C")
        assert time.time() - t0 < 5, (attempt, time.time() - t0)
        assert proc.returncode in (130, 0, -2) and "Traceback" not in err, (attempt, err[-2000:])
        assert_nothing_left(proc)


def test_a_remote_input_that_changed_since_the_out_dir_was_started_is_refused(server, tmp_path):
    folder = os.path.join(server.root, "changing")
    os.makedirs(folder, exist_ok=True)
    for i in range(2):
        shutil.copy(os.path.join(server.root, "corpus", server.files[i]), os.path.join(folder, f"{i}.parquet"))
    files = [f"{server.url}/files/changing/{i}.parquet" for i in range(2)]
    out = tmp_path / "out"
    assert run("--data-files", *files, "--out-dir", out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["remote_inputs"][files[1]]["size"] == os.path.getsize(os.path.join(folder, "1.parquet"))
    manifest["shards"], manifest["complete"] = manifest["shards"][:3], False  # killed early in the first file
    (out / "manifest.json").write_text(json.dumps(manifest))
    time.sleep(0.01)
    shutil.copy(os.path.join(server.root, "corpus", server.files[2]), os.path.join(folder, "0.parquet"))  # replaced
    r = run("--data-files", *files, "--out-dir", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {files[0]} changed since the out dir was started (") and "--out-dir" in line, line
