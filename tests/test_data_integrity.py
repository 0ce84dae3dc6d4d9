"""What protects the data between the downloader and training: one downloader per directory, training reads the
shards the manifest lists and no others, a replaced shard is noticed at open, the val split shares no document with
train, and a manifest cannot point outside its directory."""

import json
import os
import shutil

import numpy as np
import pytest

from checkpoint import take_out_dir
from conftest import DOWNLOADER, cli, ok, one_line_error, tiny, train_losses
from utils import EOT, ShardedDataLoader, UserError, get_tokenizer


@pytest.fixture(scope="session")
def shards_dir(downloaded):
    corpus, _, out = downloaded
    return corpus, out


def copy_of(out, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes((out / name).read_bytes())
    return copy


def shard_names(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".npy"))


def test_an_out_dir_on_a_file_system_without_flock_is_one_line_and_touches_nothing(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):  # what Lustre mounted without -o flock answers
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    (tmp_path / "ckpt_000005.pt.77.tmp").write_bytes(b"what a killed run left")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(UserError, match=f"cannot lock {tmp_path / 'train.lock'}: .*its file system has no flock"):
        take_out_dir(str(tmp_path))
    assert (tmp_path / "ckpt_000005.pt.77.tmp").exists()  # the lock decides who may remove leftovers: nobody here


def test_a_second_downloader_on_the_same_out_dir_is_refused_and_touches_nothing(shards_dir, tmp_path):
    corpus, out = shards_dir
    data = copy_of(out, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:3], False  # a run still going
    (data / "manifest.json").write_text(json.dumps(manifest))
    (data / "shard_train_000003.npy.4242.tmp").write_bytes(b"the first run's shard, being written")
    with take_out_dir(str(data), DOWNLOADER, "nothing"):  # the first run holds the directory
        r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", data, "--shard-size", 3000)
        one_line_error(r, f"{data} is in use by another {DOWNLOADER} (pid {os.getpid()} on ")
        r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", data, "--shard-size", 5000)
        one_line_error(r, f"{data} holds shards made with shard_size=3000, not 5000")
    assert (data / "shard_train_000003.npy.4242.tmp").exists()
    assert shard_names(data) == shard_names(out)
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", data, "--shard-size", 3000))  # the lock is gone
    assert not (data / "shard_train_000003.npy.4242.tmp").exists()  # now it is a leftover
    assert all((data / n).read_bytes() == (out / n).read_bytes() for n in shard_names(out))


def test_training_reads_the_shards_the_manifest_lists_and_names_the_strays(shards_dir, tmp_path, capsys):
    _, out = shards_dir
    data = copy_of(out, tmp_path)
    (data / "other_train_000001.npy").write_bytes((data / "shard_train_000001.npy").read_bytes())
    (data / "shard_train_000099.npy").write_bytes((data / "shard_train_000002.npy").read_bytes())
    loader = ShardedDataLoader(str(data), "train", 2, 16)
    manifest = json.loads((data / "manifest.json").read_text())
    assert [os.path.basename(p) for p in loader.paths] == [s["file"] for s in manifest["shards"][1:]]
    err = capsys.readouterr().err
    assert "warning: 2 train shards in" in err and "other_train_000001.npy, shard_train_000099.npy" in err
    ShardedDataLoader(str(data), "train", 2, 16, process_rank=1, num_processes=2)
    assert capsys.readouterr().err == ""  # said once, by rank 0


def test_a_replaced_or_cut_shard_is_noticed_when_training_opens_it(shards_dir, tmp_path):
    _, out = shards_dir
    data = copy_of(out, tmp_path)
    path = data / "shard_train_000002.npy"
    tokens = np.load(path)
    np.save(path, tokens[::-1].copy())  # other tokens, the same size
    with pytest.raises(UserError, match=f"shard {path} is not the one manifest.json lists: it changed since"):
        ShardedDataLoader(str(data), "train", 2, 16)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["fingerprint"]  # a manifest from before fingerprints: the token count is still checked
    (data / "manifest.json").write_text(json.dumps(manifest))
    np.save(path, tokens[:-10])
    with pytest.raises(UserError, match=f"shard {path} holds 2,990 tokens, manifest.json says 3,000"):
        ShardedDataLoader(str(data), "train", 2, 16)


def test_a_first_document_longer_than_the_val_shard_is_cut_and_not_continued_in_train(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    texts = ["word " * 5000, "the second document", "the third one"]
    corpus.write_text("".join(json.dumps(dict(text=t)) + "\n" for t in texts))
    out = tmp_path / "out"
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 3000, "--workers", 1))
    enc = get_tokenizer()
    first = [EOT, *enc.encode_ordinary(texts[0])]
    assert np.load(out / "shard_val_000000.npy").tolist() == first[:3000]
    rest = [t for text in texts[1:] for t in (EOT, *enc.encode_ordinary(text))]
    assert np.load(out / "shard_train_000001.npy").tolist() == rest  # starts with the next document
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][0]["next"] == [1, 0] and manifest["shards"][0]["last_document"] == 0
    ok(cli(DOWNLOADER, "--verify", "--out-dir", out))


@pytest.mark.parametrize("name", ["../shard_train_000001.npy", "/etc/shard_train_000001.npy", "x.npy"])
def test_a_manifest_that_names_a_file_outside_its_directory_is_refused(shards_dir, tmp_path, name):
    corpus, out = shards_dir
    data = copy_of(out, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][1]["file"], manifest["complete"] = name, False
    (data / "manifest.json").write_text(json.dumps(manifest))
    r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", data, "--shard-size", 3000)
    one_line_error(r, "is damaged")
    with pytest.raises(UserError, match="manifest.json is damaged"):
        ShardedDataLoader(str(data), "train", 2, 16)


def test_a_run_begun_on_an_unfinished_download_resumes_on_its_shards_when_more_have_arrived(data_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("t_val_000000.npy", "t_train_000001.npy"):
        (partial / name).write_bytes((data_dir / name).read_bytes())
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = ["--max-steps", 10, "--sample-interval", 0]
    ok(cli("train.py", *tiny(partial, reference, *args), threads=1))
    (out).mkdir()
    (out / "ckpt_000005.pt").write_bytes((reference / "ckpt_000005.pt").read_bytes())  # a run stopped after step 4
    (partial / "t_train_000002.npy").write_bytes((data_dir / "t_train_000002.npy").read_bytes())  # the download went on
    r = ok(cli("train.py", *tiny(partial, out, *args, "--resume"), threads=1))
    assert "note: the run goes on with the 1 shards it began with (t_train_000002.npy and the others added" in r.stdout
    resumed = train_losses(out)
    assert resumed == {s: loss for s, loss in train_losses(reference).items() if s >= 5}  # the same tokens, bit for bit
    (partial / "t_train_000001.npy").unlink()  # a shard it was reading is gone: that cannot go on
    r = cli("train.py", *tiny(partial, out, "--max-steps", 15, "--resume"))
    one_line_error(r, "does not match this data: shard 1 of the 1 it read was t_train_000001.npy, here it is "
                      "t_train_000002.npy")  # fmt: skip


def test_a_resume_on_shards_with_other_tokens_is_refused_naming_the_first(data_dir, finished_run, tmp_path):
    """The checkpoint records a fingerprint of every shard the run reads (its size, first and last MB), with or without
    a manifest: another corpus under the same names, or one shard replaced in place, is refused, not trained on."""
    from conftest import copy_run

    for replaced in (["t_train_000002.npy"], ["t_train_000001.npy", "t_train_000002.npy"]):
        data = tmp_path / f"data{len(replaced)}"
        shutil.copytree(data_dir, data)
        for name in replaced:  # other tokens, the same count: the names and sizes say nothing
            tokens = np.load(data / name)
            np.save(data / name, np.roll(tokens, 7))
        out = copy_run(finished_run, tmp_path / f"run{len(replaced)}", checkpoints=(10,))
        r = cli("train.py", *tiny(data, out, "--resume"))
        one_line_error(r, f"shard {replaced[0]} holds other tokens than the run read")
