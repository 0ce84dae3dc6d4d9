"""Checkpoints that cannot be written or should not be read: a full disk or a file-size limit is one line that says
so and keeps the older checkpoints; a damaged or crafted checkpoint is one line before anything is built from it."""

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import check_resumable, load_checkpoint
from conftest import ROOT, cli, copy_run, one_line_error, start_script, tiny
from utils import UserError
from weights import load_model


def test_a_file_size_limit_during_a_checkpoint_write_is_one_line_and_the_older_ones_stay(
    data_dir, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path / "out", checkpoints=(10,))
    older = (out / "ckpt_000010.pt").read_bytes()

    def limit_file_size():  # as `ulimit -f` does; SIGXFSZ ignored, so that the write fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(older) // 2, resource.RLIM_INFINITY))

    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *tiny(data_dir, out, "--max-steps", 20, "--resume")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    line = one_line_error(r, f"cannot write checkpoint {out / 'ckpt_000015.pt'}: a file-size limit (ulimit -f) stop")
    assert "MB needed); nothing of it is left, the checkpoints before it are intact (the newest: " in line
    assert [n for n in os.listdir(out) if n.startswith("ckpt_")] == ["ckpt_000010.pt"]  # no part of the new one
    assert (out / "ckpt_000010.pt").read_bytes() == older


def test_a_stop_signals_checkpoint_that_cannot_be_written_says_so_and_the_older_ones_stay(
    data_dir, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path / "out", checkpoints=(10,))
    older = (out / "ckpt_000010.pt").read_bytes()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(older) // 2, resource.RLIM_INFINITY))

    args = tiny(data_dir, out, "--max-steps", 10_000, "--checkpoint-interval", 0, "--eval-interval", 0,
                "--sample-interval", 0, "--resume")  # fmt: skip
    run = start_script("train.py", *args, preexec_fn=limit_file_size)
    run.wait_for_step(11)
    run.send_signal(signal.SIGTERM)
    line = one_line_error(run.finish(), "cannot write checkpoint ")
    assert "a file-size limit (ulimit -f) stop" in line and "the checkpoints before it are intact" in line
    assert [n for n in os.listdir(out) if n.startswith("ckpt_")] == ["ckpt_000010.pt"]
    assert (out / "ckpt_000010.pt").read_bytes() == older


def crafted(finished_run, tmp_path, change):
    checkpoint = torch.load(finished_run / "ckpt_000020.pt", weights_only=True)
    change(checkpoint)
    path = tmp_path / "ckpt_000020.pt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["train_loader"].pop("position"), "is damaged: train_loader.position missing or of the wrong type"),
        (lambda c: c["rng"].pop("numpy"), "is damaged: rng.numpy missing or of the wrong type"),
        (lambda c: c["rng"].update(torch="seed 1"), "is damaged: rng.torch missing or of the wrong type"),
        (lambda c: c.update(step="20"), "is damaged: step missing or of the wrong type"),
        (lambda c: c.update(optimizer=[1, 2]), "is damaged: optimizer missing or of the wrong type"),
        (lambda c: c["model_config"].update(n_head="two"), "its model shape cannot be built"),
        (
            lambda c: c["model_config"].update(block_size=2**27),
            "transformer.wpe.weight is (32, 64), its model shape needs (134217728, 64)",
        ),  # fmt: skip
    ],
)
def test_a_damaged_or_crafted_checkpoint_is_one_line_before_anything_is_built(finished_run, tmp_path, change, message):
    path = crafted(finished_run, tmp_path, change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_resumable(load_checkpoint(path), path)


def test_a_checkpoint_claiming_a_huge_model_allocates_nothing_before_it_is_refused(finished_run, tmp_path):
    path = crafted(finished_run, tmp_path, lambda c: c["model_config"].update(block_size=2**27))
    r = cli("sample.py", "--model", path, "--max-new-tokens", 1)  # a 2**27 x 64 wpe would be 34 GB of fp32
    one_line_error(r, "transformer.wpe.weight is (32, 64), its model shape needs (134217728, 64)")
    with pytest.raises(UserError, match="its model shape needs"):
        load_model(path)
    # a file of a few KB: no weights at all, and the same claim
    path = crafted(
        finished_run, tmp_path, lambda c: (c.update(model={}, optimizer={}), c["model_config"].update(block_size=2**27))
    )
    assert os.path.getsize(path) < 200_000
    r = cli("sample.py", "--model", path, "--max-new-tokens", 1)
    one_line_error(r, f"{path}: its weights lack transformer.wte.weight and ")
    with pytest.raises(UserError, match="its weights lack transformer.wte.weight and"):
        check_resumable(load_checkpoint(path), path)


def test_resuming_from_a_damaged_checkpoint_skips_it_with_a_warning_naming_what_is_wrong(
    data_dir, finished_run, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    crafted(finished_run, out, lambda c: c["train_loader"].pop("position"))
    r = cli("train.py", *tiny(data_dir, out, "--max-steps", 30, "--resume"))
    one_line_error(r, f"no checkpoint in {out} can be read (ckpt_000020.pt); nothing was deleted")
    assert (
        f"warning: skipping {out / 'ckpt_000020.pt'}: {out / 'ckpt_000020.pt'} is damaged: train_loader.position"
        in r.stderr
    )
