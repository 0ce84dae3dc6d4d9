"""download-fineweb-edu.py: local corpora through the datasets code path into verified, resumable uint16 shards."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DOWNLOADER, ROOT, cli, make_corpus, ok, wait_until
from utils import EOT, get_tokenizer

SCRIPT = os.path.join(ROOT, DOWNLOADER)


def run(*args, env=None):
    return cli(DOWNLOADER, *args, env=env)


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".npy"))


def read_stream(out_dir):
    """All shards in order (val first), concatenated."""
    names = shard_files(out_dir)
    names.sort(key=lambda n: int(n.rsplit("_", 1)[1][:6]))
    return np.concatenate([np.load(os.path.join(out_dir, n)) for n in names])


def split_at_eot(stream):
    starts = np.flatnonzero(stream == EOT)
    assert starts[0] == 0
    return [stream[s + 1 : e] for s, e in zip(starts, [*starts[1:], len(stream)])]


@pytest.fixture(scope="session")
def reference(downloaded):
    """An uninterrupted run with 1 worker."""
    return downloaded[2]


@pytest.fixture(scope="session")
def corpus(downloaded):
    return downloaded[:2]


def test_every_document_exactly_once_with_eot_layout(corpus, reference):
    _, texts = corpus
    enc = get_tokenizer()
    docs = split_at_eot(read_stream(reference))
    assert len(docs) == len(texts)
    for doc, text in zip(docs, texts):
        assert enc.decode(doc.tolist()) == text
    assert docs[5].tolist() == enc.encode_ordinary(texts[5])  # "<|endoftext|>" inside a text is plain text


def test_shard_names_sizes_and_split(reference):
    names = shard_files(reference)
    assert names[0] == "shard_train_000001.npy" and names[-1] == "shard_val_000000.npy"
    train = [n for n in names if "_train_" in n]
    assert train == [f"shard_train_{i:06d}.npy" for i in range(1, len(train) + 1)]
    sizes = [len(np.load(reference / n)) for n in train]
    assert all(s == 3000 for s in sizes[:-1]) and 0 < sizes[-1] <= 3000
    val = np.load(reference / "shard_val_000000.npy")
    assert val.dtype == np.uint16 and 0 < len(val) <= 3000
    # the val shard holds whole documents: the train split starts with a document's EOT
    assert val[0] == EOT and np.load(reference / train[0])[0] == EOT
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard_val_000000.npy", *train]
    assert manifest["shards"][0]["first_document"] == 0 and manifest["documents"] == 400


def test_shards_of_your_own_files_are_named_shard_and_an_out_dir_keeps_the_names_it_began_with(corpus, tmp_path):
    out = tmp_path / "out"
    ok(run("--data-files", corpus[0], "--out-dir", out, "--shard-size", 3000, "--max-tokens", 3000))
    assert shard_files(out) == ["shard_train_000001.npy", "shard_val_000000.npy"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"]["prefix"], manifest["complete"] = "edufineweb", False  # begun before shard was the default
    for shard in manifest["shards"]:
        os.rename(out / shard["file"], out / shard["file"].replace("shard_", "edufineweb_"))
        shard["file"] = shard["file"].replace("shard_", "edufineweb_")
    (out / "manifest.json").write_text(json.dumps(manifest))
    ok(run("--data-files", corpus[0], "--out-dir", out, "--shard-size", 3000, "--max-tokens", 3000))
    assert shard_files(out) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy"]


def test_output_does_not_depend_on_worker_count(corpus, reference, tmp_path):
    r = run("--data-files", corpus[0], "--out-dir", tmp_path / "two", "--shard-size", 3000, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "done: 400 documents" in r.stdout
    for name in shard_files(reference):
        assert (tmp_path / "two" / name).read_bytes() == (reference / name).read_bytes()


def test_max_tokens_counts_train_tokens_after_val(corpus, reference, tmp_path):
    r = run("--data-files", corpus[0], "--out-dir", tmp_path / "out", "--shard-size", 3000, "--max-tokens", 7500)
    assert r.returncode == 0, r.stderr
    names = shard_files(tmp_path / "out")
    assert names == [
        "shard_train_000001.npy",
        "shard_train_000002.npy",
        "shard_train_000003.npy",
        "shard_val_000000.npy",
    ]
    assert sum(len(np.load(tmp_path / "out" / n)) for n in names[:3]) == 7500
    full = read_stream(reference)
    assert np.array_equal(
        read_stream(tmp_path / "out"),
        full[: len(full) - len(read_stream(reference)) + len(np.load(reference / names[3])) + 7500],
    )


def test_resume_after_a_kill_mid_shard_is_byte_identical(corpus, reference, tmp_path):
    """The state a kill -9 leaves while a shard is half written, and one between its rename and the manifest update."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    done, rest = manifest["shards"][:3], manifest["shards"][3:]
    manifest.update(shards=done, complete=False)
    for key in ("documents", "tokens"):
        manifest.pop(key)
    (out / "manifest.json").write_text(json.dumps(manifest))
    # half written, under the name atomic_write gives it (<file>.<pid>.tmp)
    (out / f"{rest[0]['file']}.4242.tmp").write_bytes((out / rest[0]["file"]).read_bytes()[:1000])
    (out / rest[0]["file"]).write_bytes(b"renamed, never recorded")
    for shard in rest[1:]:
        os.remove(out / shard["file"])
    r = run("--data-files", corpus[0], "--out-dir", out, "--shard-size", 3000)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the temporary file is gone
    for name in shard_files(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_a_run_killed_after_its_last_shard_but_before_complete_finishes_without_an_empty_shard(corpus, tmp_path):
    out = tmp_path / "out"
    args = ("--data-files", corpus[0], "--out-dir", out, "--shard-size", 3000, "--max-tokens", 7500)
    assert run(*args).returncode == 0
    before = {n: (out / n).read_bytes() for n in shard_files(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    documents = manifest.pop("documents")
    manifest.pop("tokens")
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert {n: (out / n).read_bytes() for n in shard_files(out)} == before
    assert json.loads((out / "manifest.json").read_text())["documents"] == documents


def test_a_json_array_file_reads_like_json_lines(corpus, reference, tmp_path):
    records = [json.loads(line) for line in open(corpus[0])]
    (tmp_path / "docs.json").write_text(json.dumps(records, indent=1))
    r = run("--data-files", tmp_path / "docs.json", "--out-dir", tmp_path / "out", "--shard-size", 3000)
    assert r.returncode == 0, r.stderr
    for name in shard_files(reference):
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes()


def test_a_damaged_gzip_file_is_one_line(corpus, tmp_path):
    import gzip

    data = gzip.compress(open(corpus[0], "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(open(corpus[0], "rb").read())
    for name in ("cut.jsonl.gz", "plain.jsonl.gz"):
        r = run("--data-files", tmp_path / name, "--out-dir", tmp_path / f"out-{name}", "--shard-size", 3000)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {tmp_path / name}: "), r.stderr


def test_resume_after_real_sigkills(tmp_path):
    corpus = tmp_path / "big.jsonl"
    make_corpus(corpus, 6000, seed=1, min_words=100, max_words=600)  # about 2M tokens
    args = ["--data-files", corpus, "--shard-size", 50_000, "--workers", 1]
    ref = tmp_path / "ref"
    assert run(*args, "--out-dir", ref).returncode == 0
    out = tmp_path / "out"

    def shards_written():
        try:
            return len(json.loads((out / "manifest.json").read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    for wait_for_shards in (2, 8, 20):
        proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args), "--out-dir", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until(lambda n=wait_for_shards, p=proc: shards_written() >= n or p.poll() is not None,
                   f"{wait_for_shards} shards written", timeout=120, interval=0.005)  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    r = run(*args, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert shard_files(out) == shard_files(ref)
    for name in shard_files(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((ref / "manifest.json").read_text())["shards"]
    )


def test_refuses_other_settings_on_a_used_out_dir(corpus, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    r = run("--data-files", corpus[0], "--out-dir", out, "--shard-size", 4000)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {out} holds shards made with shard_size=3000, not 4000: "
        "use another --out-dir, or delete this one to start over"
    ]
    r = run("--data-files", corpus[0], "--out-dir", out, "--shard-size", 3000)  # same settings: nothing to do
    assert r.returncode == 0 and "is complete" in r.stdout
    many = [tmp_path / f"doc{i:03d}.txt" for i in range(300)]
    for path in many:
        path.write_text("a document of its own\n")
    r = run("--data-files", *many, "--out-dir", out, "--shard-size", 3000)  # a long list is named by its first few
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and f"not ['{many[0]}', '{many[1]}', '{many[2]}', ... 297 more]: use another" in line
    assert len(line) < 600


def test_verify_catches_a_flipped_byte_and_a_truncated_shard(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    r = run("--verify", "--out-dir", out)
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {len(shard_files(out))} shards")
    shard = out / "shard_train_000002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    r = run("--verify", "--out-dir", out)
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: verify failed: {shard} does not match its sha256 in the manifest"
    )
    shutil.copy(reference / shard.name, shard)
    other = out / "shard_train_000001.npy"
    np.save(other, np.load(other)[:-10])
    r = run("--verify", "--out-dir", out)
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: verify failed: {other} holds 2,990 tokens, the manifest says 3,000"
    )


def test_txt_and_parquet_go_through_the_same_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["First document, in a text file.", "Second document.\n\nWith two paragraphs."]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    enc = get_tokenizer()
    for args in (
        ["--data-files", tmp_path / "doc*.txt"],
        ["--data-files", tmp_path / "docs.parquet", "--text-field", "body"],
    ):
        out = tmp_path / ("out" + args[1].suffix)
        r = run(*args, "--out-dir", out, "--shard-size", 12)
        assert r.returncode == 0, r.stderr
        assert [enc.decode(d.tolist()) for d in split_at_eot(read_stream(out))] == texts


def test_errors_are_one_line(tmp_path, corpus):
    cases = []
    cases.append(
        (
            ["--data-files", tmp_path / "missing.jsonl"],
            f"error: cannot read --data-files {tmp_path / 'missing.jsonl'}: no such file",
        )
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    cases.append((["--data-files", tmp_path / "bad.jsonl"], f"error: cannot read {tmp_path / 'bad.jsonl'}: "))
    cases.append(
        (
            ["--data-files", corpus[0], "--text-field", "content"],
            "error: " + str(corpus[0]) + " has no field 'content' (fields: id, text); set --text-field",
        )
    )
    (tmp_path / "empty.jsonl").write_text("")
    cases.append(
        (
            ["--data-files", tmp_path / "empty.jsonl"],
            f"error: empty corpus: {tmp_path / 'empty.jsonl'} holds no documents",
        )
    )
    (tmp_path / "data.csv").write_text("text\nhello\n")
    cases.append(
        (
            ["--data-files", tmp_path / "data.csv"],
            "error: --data-files must all be .jsonl/.json, .parquet or .txt (one kind), got ['.csv']",
        )
    )
    for i, (args, message) in enumerate(cases):
        r = run(*args, "--out-dir", tmp_path / f"out{i}")
        assert r.returncode == 2, (args, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == errors[0]
        assert errors[0].startswith(message), (errors[0], message)
    r = run("--max-tokens", "0")
    assert r.returncode == 2 and "error: --max-tokens must be at least 1, got 0" in r.stderr


def test_no_network_for_the_default_source_says_to_use_data_files_at_once_and_creates_nothing(tmp_path):
    for env in (dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), dict(HF_HUB_OFFLINE=None)):  # no network here
        t0 = time.time()
        r = run("--out-dir", tmp_path / "out", env=env)
        assert r.returncode == 2
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: cannot open HuggingFaceFW/fineweb-edu (sample-10BT) on the Hugging Face hub:")
        assert line.endswith("with no network, tokenize local files with --data-files")
        assert time.time() - t0 < 20 and not (tmp_path / "out").exists()


def test_hub_reachability_is_asked_once_through_the_proxy_settings(monkeypatch):
    import urllib.error
    import urllib.request

    import http_files

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    asked = []

    def answer_404(request, timeout):
        asked.append(request.full_url)
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", answer_404)
    http_files.check_hub_reachable()  # any HTTP answer means the hub is there
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    http_files.check_hub_reachable()
    assert asked == ["https://huggingface.co", "https://hf-mirror.example"]


def test_disk_full_removes_the_partial_shard_and_keeps_the_manifest_valid(corpus, reference, tmp_path, monkeypatch):
    from utils import load_script

    downloader = load_script("download-fineweb-edu")
    real_save = np.save
    calls = []

    def save_until_disk_full(f, arr):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr)

    monkeypatch.setattr(downloader.np, "save", save_until_disk_full)
    out = tmp_path / "out"
    args = ["--data-files", str(corpus[0]), "--out-dir", str(out), "--shard-size", "3000", "--workers", "1"]
    with pytest.raises(
        downloader.UserError,
        match=r"the disk holding .*out is full \(.* MB free, 0.0 MB needed\) while writing "
        ".*shard_train_000002.npy: the partial shard was removed, the 2 finished shards",
    ):
        downloader.main(args)
    assert sorted(os.listdir(out)) == [
        "download-fineweb-edu.lock",
        "manifest.json",
        "shard_train_000001.npy",
        "shard_val_000000.npy",
    ]
    assert run("--verify", "--out-dir", out).returncode == 0
    monkeypatch.setattr(downloader.np, "save", real_save)
    downloader.main(args)  # space freed: it continues where it stopped
    for name in shard_files(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_a_short_write_on_a_full_disk_and_a_failed_manifest_write_say_the_disk_is_full(corpus, tmp_path, monkeypatch):
    import checkpoint
    from utils import load_script

    downloader = load_script("download-fineweb-edu")
    real_save, real_usage = np.save, checkpoint.shutil.disk_usage
    out = tmp_path / "out"
    args = ["--data-files", str(corpus[0]), "--out-dir", str(out), "--shard-size", "3000", "--workers", "1"]

    def short_write(f, arr):  # what numpy raises when the disk fills: no errno, only counts
        raise OSError("200000 requested and 81856 written")

    monkeypatch.setattr(downloader.np, "save", short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(downloader.UserError, match=r"is full \(0.0 MB free, 0.0 MB needed\) while writing"):
        downloader.main(args)
    monkeypatch.setattr(downloader.np, "save", real_save)

    def manifest_fails(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(downloader, "write_json", manifest_fails)
    with pytest.raises(
        downloader.UserError, match="is full .* while writing manifest.json in .*: it still lists the 0"
    ):
        downloader.main(args)


def test_the_downloader_loaded_twice_in_one_process_still_tokenizes(corpus, tmp_path):
    from utils import load_script

    first = load_script("download-fineweb-edu")
    assert load_script("download-fineweb-edu") is first  # one module: its functions pickle by name for the workers
    first.main(["--data-files", str(corpus[0]), "--out-dir", str(tmp_path / "out"), "--shard-size", "3000"])
    assert (tmp_path / "out" / "manifest.json").exists()
