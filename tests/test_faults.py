"""Faults and bad input: every case ends in a one-line error (exit 2, no traceback) or a clean recovery, and nothing
already written is lost."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from checkpoint import check_weights, read_jsonl, read_log
from conftest import (
    DOWNLOADER,
    ONE_THREAD,
    ROOT,
    Started,
    cli,
    copy_run,
    make_docs,
    ok,
    one_line_error,
    run_script,
    start_script,
    tiny,
    torchrun,
    train_losses,
)
from utils import UserError


def test_every_script_ends_a_bad_command_line_with_one_line_in_a_new_process(tmp_path):
    """The other tests run the scripts' command lines in the test's process; here each script runs as a user starts
    it, all at once: nothing printed at start-up comes before the one line."""
    missing = tmp_path / "missing"
    cases = [
        ("train.py", tiny(missing, tmp_path / "out"), f"error: data directory {missing} does not exist"),
        ("sample.py", ["--model", missing / "x.pt"], f"error: checkpoint {missing / 'x.pt'} does not exist"),
        ("hellaswag.py", ["--model", "gpt2-xxl", "--data-file", missing], f"error: HellaSwag file {missing} does not"),
        (DOWNLOADER, ["--data-files", missing / "c.jsonl", "--out-dir", tmp_path / "o"], "error: cannot read --data"),
        ("misc/plot_log.py", [missing / "log.jsonl"], f"error: {missing / 'log.jsonl'} does not exist"),
        ("bench.py", ["hellaswag", "--examples", 0], "error: --examples must be at least 1, got 0"),
    ]
    runs = [(start_script(script, *args), message) for script, args, message in cases]
    for run, message in runs:
        one_line_error(run.finish(), message)


# ----------------------------------------------------------------------------------------------------------------
# train.py: runs that must not damage each other or themselves


def test_a_second_run_on_the_same_out_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(data_dir, tmp_path):
    out = tmp_path / "run"
    first = start_script("train.py", *tiny(data_dir, out, "--max-steps", 10_000, "--checkpoint-interval", 0,
                                            "--eval-interval", 0, "--sample-interval", 0))  # fmt: skip
    try:
        first.wait_for_step(0)
        r = cli("train.py", *tiny(data_dir, out, "--resume"))
        one_line_error(r, f"{out} is in use by another train.py (pid {first.pid} on ")
    finally:
        first.proc.kill()
        first.finish()
    before = train_losses(out)
    ok(cli("train.py", *tiny(data_dir, out, "--max-steps", 2, "--resume")))  # the lock died with its process
    assert len(train_losses(out)) >= len(before) >= 1


def test_a_log_line_cut_by_a_kill_is_skipped_and_the_next_record_starts_a_new_line(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15,))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 15, "train_loss": 3.1, "lr": 0.0')  # a kill in the middle of a write
    ok(cli("train.py", *tiny(data_dir, out, "--resume")))
    lines = (out / "log.jsonl").read_text().splitlines()
    torn = [n for n, line in enumerate(lines) if line.startswith('{"step": 15, "train_loss": 3.1, "lr": 0.0')]
    assert torn and lines[torn[0]] == '{"step": 15, "train_loss": 3.1, "lr": 0.0'  # left alone, on its own line
    assert sorted(train_losses(out)) == list(range(20)) and train_losses(out)[15] != 3.1
    ok(cli("misc/plot_log.py", out / "log.jsonl", tmp_path / "p.png"))
    assert (tmp_path / "p.png").exists()


def test_when_no_checkpoint_can_be_read_resume_is_refused_and_nothing_is_deleted(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15, 20))
    for name in ("ckpt_000015.pt", "ckpt_000020.pt"):
        (out / name).write_bytes(b"not a checkpoint")
    r = cli("train.py", *tiny(data_dir, out, "--max-steps", 30, "--resume"))
    one_line_error(r, f"no checkpoint in {out} can be read (ckpt_000020.pt, ckpt_000015.pt); nothing was deleted")
    assert (out / "ckpt_000015.pt").read_bytes() == b"not a checkpoint"


def test_pruning_keeps_the_newest_readable_checkpoints_and_never_deletes_a_damaged_one(
    data_dir, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(10,))
    (out / "ckpt_000099.pt").write_bytes(b"damaged")  # sorts newest of all
    r = ok(cli("train.py", *tiny(data_dir, out, "--resume", "--keep-checkpoints", 2)))
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_000015.pt", "ckpt_000020.pt", "ckpt_000099.pt"]
    assert "warning: skipping" in r.stderr and "ckpt_000099.pt" in r.stderr


def test_keep_checkpoints_0_keeps_every_checkpoint(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(10,))
    ok(cli("train.py", *tiny(data_dir, out, "--resume", "--keep-checkpoints", 0, "--checkpoint-interval", 2)))
    assert sorted(p.name for p in out.glob("ckpt_*")) == [f"ckpt_{s:06d}.pt" for s in (10, 12, 14, 16, 18, 20)]


def test_temporary_files_left_by_a_kill_are_removed_on_the_next_run(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15,))
    for name in ("ckpt_000016.pt.4242.tmp", "loss.png.4242.tmp"):
        (out / name).write_bytes(b"x" * 1000)
    ok(cli("train.py", *tiny(data_dir, out, "--max-steps", 16, "--resume")))
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("bad_id", [50257, 50303, 60000])
def test_token_ids_outside_gpt2s_vocabulary_are_named_with_their_shard(tmp_path, bad_id):
    stream = np.concatenate(make_docs(2000)).astype(np.int64)
    np.save(tmp_path / "t_val_000000.npy", stream[:5000].astype(np.uint16))
    stream[20_000] = bad_id
    np.save(tmp_path / "t_train_000001.npy", stream[5000:].astype(np.uint16))
    r = cli("train.py", *tiny(tmp_path, tmp_path / "out", "--max-steps", 2))
    one_line_error(r, f"shard {tmp_path / 't_train_000001.npy'} holds token id {bad_id} at position 15,000")


def test_resume_on_a_fresh_out_dir_says_it_starts_at_step_0(data_dir, tmp_path):
    r = ok(cli("train.py", *tiny(data_dir, tmp_path / "new", "--max-steps", 2, "--resume")))
    assert f"note: --resume: {tmp_path / 'new'} holds no checkpoint yet, so this run starts at step 0" in r.stdout


def test_resuming_a_finished_run_says_so_and_changes_nothing(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(20,))
    log = (out / "log.jsonl").read_text()
    r = ok(cli("train.py", *tiny(data_dir, out, "--resume")))
    assert f"{out} is finished: all 20 steps are done" in r.stdout
    assert (out / "log.jsonl").read_text() == log
    r = ok(cli("train.py", *tiny(data_dir, out, "--max-steps", 22, "--resume")))  # a larger --max-steps goes on
    assert sorted(train_losses(out)) == list(range(22))


def test_resume_names_the_settings_it_cannot_continue_under_and_logs_the_ones_it_can(data_dir, tmp_path):
    out = tmp_path / "run"
    ok(cli("train.py", *tiny(data_dir, out, "--max-steps", 2, "--sample-interval", 0)))
    r = cli("train.py", *tiny(data_dir, out, "--max-steps", 4, "--resume", "--n-layer", 3, "--seq-len", 16))
    one_line_error(
        r, "ckpt_000002.pt was trained with --n-layer 2, --seq-len 32; this run asks for --n-layer 3, --seq-len 16"
    )
    r = ok(
        cli("train.py", *tiny(data_dir, out, "--max-steps", 4, "--resume", "--max-lr", 3e-4, "--sample-interval", 0))
    )
    assert "note: settings changed since the checkpoint: --max-steps 2 -> 4, --max-lr 0.001 -> 0.0003" in r.stdout
    resume = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"resume"' in line][-1]
    assert resume["changes"] == {"max_steps": [2, 4], "max_lr": [0.001, 0.0003]}


def test_sigterm_inside_a_step_drops_it_writes_a_checkpoint_and_resume_does_it_again_exactly(data_dir, tmp_path):
    """A step of 8 micro-steps: the run stops at the next micro-step, not at the end of the step. The signal comes
    twice, as under SLURM and torchrun, and is one stop."""
    args = ["--max-steps", 6, "--total-batch", 1024, "--checkpoint-interval", 0, "--eval-interval", 0,
            "--sample-interval", 0]  # fmt: skip
    ok(cli("train.py", *tiny(data_dir, tmp_path / "straight", *args), threads=1))
    out = tmp_path / "preempted"
    run = start_script("train.py", *tiny(data_dir, out, *args), env={**os.environ, **ONE_THREAD})
    run.wait_for_step(3)
    run.send_signal(signal.SIGTERM)  # at the start of step 4: a stop at its end would log step 4
    run.wait_for("SIGTERM: stopping at the next micro-step with a checkpoint", stream="stderr")
    run.send_signal(signal.SIGTERM)  # the same stop again, as torchrun passes it on
    r = run.finish()
    assert r.returncode == 128 + signal.SIGTERM and "Traceback" not in r.stderr, r.stderr
    assert max(train_losses(out)) == 3
    assert "stopped by SIGTERM after step 3: continue with --resume" in r.stdout
    assert [p.name for p in out.glob("ckpt_*")] == ["ckpt_000004.pt"]
    assert read_jsonl(out / "log.jsonl")[-1] == dict(event="stopped", step=4, signal="SIGTERM")
    ok(cli("train.py", *tiny(data_dir, out, *args, "--resume"), threads=1))
    assert train_losses(out) == train_losses(tmp_path / "straight")  # every step, bit for bit


def test_a_repeated_stop_signal_is_the_same_stop_and_a_later_one_ends_the_run_at_once():
    code = f"""if True:
        import os, signal, sys, time
        sys.path.insert(0, {ROOT!r})
        from checkpoint import StopSignal
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM's
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # torchrun passing on another
            time.sleep(0.2)
            print("stopping", stop.signum, flush=True)
            time.sleep(StopSignal.REPEAT_S)
            os.kill(os.getpid(), signal.SIGINT)  # a person who will not wait
            time.sleep(1)
            print("still running")
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == f"stopping {int(signal.SIGTERM)}\n" and r.returncode == -signal.SIGINT, (r.stdout, r.stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal of an SSH session closed
def test_a_stop_signal_under_torchrun_stops_every_rank_after_the_same_step(data_dir, tmp_path, signum):
    out = tmp_path / "run"
    run = Started(torchrun("train.py", *tiny(data_dir, out, "--max-steps", 10_000, "--checkpoint-interval", 0,
                                             "--eval-interval", 0, "--sample-interval", 0)))  # fmt: skip
    run.wait_for_step(2)
    run.send_signal(signum)  # torchrun passes it on to both ranks
    r = run.finish()
    last, name = max(train_losses(out)), signal.Signals(signum).name
    assert f"stopped by {name} after step {last}" in r.stdout, r.stderr
    assert [p.name for p in out.glob("ckpt_*")] == [f"ckpt_{last + 1:06d}.pt"]
    assert read_jsonl(out / "log.jsonl")[-1] == dict(event="stopped", step=last + 1, signal=name)


def test_a_stop_signal_during_the_final_evaluation_is_answered_within_seconds(data_dir, finished_run, tmp_path):
    """The evaluation checks for a stop between batches: a run stopped there has no finished record and exits 143;
    --resume evaluates again and finishes."""
    from hellaswag import synthetic_examples

    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(3000)))  # half a minute to evaluate
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15,))
    args = tiny(data_dir, out, "--resume", "--hellaswag-interval", 100, "--hellaswag-file", hs)  # only the final one
    run = start_script("train.py", *args)
    run.wait_for_step(19)  # the last step: the final evaluation comes next
    t0 = time.time()
    run.send_signal(signal.SIGTERM)
    r = run.finish()
    assert r.returncode == 143 and time.time() - t0 < 10, (r.returncode, r.stderr[-2000:])
    assert read_jsonl(out / "log.jsonl")[-1] == dict(event="stopped", step=20, signal="SIGTERM")
    assert "finished 20 steps" not in r.stdout
    r = ok(cli("train.py", *args, "--hellaswag-limit", 40))
    assert "finished 20 steps" in r.stdout
    assert read_log(out / "log.jsonl")[-1]["hellaswag_examples"] == 40


def test_bad_training_flags_are_one_line_errors(data_dir, tmp_path):
    for extra, message in [
        (("--keep-checkpoints", -1), "--keep-checkpoints must be 0 or more, got -1"),
        (("--max-lr", "nan"), "--max-lr must be a positive number up to 1000, got nan"),
        (("--max-steps", -3), "--max-steps must be 0 or more, got -3"),
    ]:
        one_line_error(cli("train.py", *tiny(data_dir, tmp_path / "x", *extra)), message)


# ----------------------------------------------------------------------------------------------------------------
# hellaswag.py and sample.py


@pytest.mark.parametrize("batch_size", [-1, 0])
def test_hellaswag_refuses_a_batch_size_below_1_instead_of_reporting_unscored_examples(
    tiny_checkpoint, hellaswag_file, batch_size
):
    r = cli("hellaswag.py", "--model", tiny_checkpoint(), "--data-file", hellaswag_file, "--batch-size", batch_size)
    one_line_error(r, f"--batch-size must be at least 1, got {batch_size}")


def test_sample_refuses_a_nan_temperature_and_prints_to_an_ascii_terminal(tiny_checkpoint):
    one_line_error(cli("sample.py", "--model", tiny_checkpoint(), "--temperature", "nan"),
                   "--temperature must be 0 (greedy) or from 0.001 to 100")  # fmt: skip
    env = dict(os.environ, PYTHONIOENCODING="ascii")  # the terminal's encoding: only a new process has its own
    r = run_script("sample.py", "--model", tiny_checkpoint(), "--prompt", "Caf\u00e9 \u2615 na\u00efve",
                   "--num-samples", 1, "--max-new-tokens", 5, env=env)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "Caf\\xe9 \\u2615" in r.stdout


# ----------------------------------------------------------------------------------------------------------------
# download-fineweb-edu.py


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_downloader_checks_the_out_dir_before_reading_anything(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text="hello world")] * 3)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in [
        (a_file, f"--out-dir {a_file} is a file, not a directory"),
        (a_file / "sub", f"cannot create --out-dir {a_file / 'sub'}: {a_file} is a file"),
        ("/proc/gpt2-fineweb-test", "cannot write to --out-dir /proc/gpt2-fineweb-test"),
    ]:
        one_line_error(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out), message)


def test_downloader_names_the_line_of_bad_json_bad_utf8_and_a_missing_or_non_string_text(tmp_path):
    good = [dict(text=f"document {i} " * 20) for i in range(1500)]
    cases = [
        ([*good, "{not json", *good[:5]], "line 1501 is not JSON"),
        ([*good[:10], dict(title="no text"), *good[:5]], "line 11: field 'text' is missing"),
        ([*good[:10], dict(text=12345), *good[:5]], "line 11: field 'text' is int, not a string"),
    ]
    for i, (rows, message) in enumerate(cases):
        corpus = write_jsonl(tmp_path / f"c{i}.jsonl", rows)
        r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", tmp_path / f"out{i}", "--shard-size", 10_000)
        one_line_error(r, f"{corpus}: " if "JSON" not in message else str(corpus))
        assert message in r.stderr, r.stderr
    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    one_line_error(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", tmp_path / "out_utf8"), "line 2 is not UTF-8")


def test_downloader_refuses_to_continue_on_an_edited_corpus(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text=f"document {i} " * 30) for i in range(400)])
    out = tmp_path / "out"
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 5000))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False  # as if killed before the end
    (out / "manifest.json").write_text(json.dumps(manifest))
    write_jsonl(corpus, [dict(text=f"edited {i} " * 30) for i in range(400)])
    r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 5000)
    one_line_error(r, f"{corpus} changed since {out} was started")


def test_downloader_reports_a_damaged_manifest_in_one_line(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text=f"document {i} " * 30) for i in range(200)])
    out = tmp_path / "out"
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 5000))
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    for args in (["--data-files", corpus], ["--verify"]):
        r = cli(DOWNLOADER, *args, "--out-dir", out, "--shard-size", 5000)
        one_line_error(r, f"{out / 'manifest.json'} is damaged")


def test_verify_catches_token_ids_outside_the_vocabulary(tmp_path):
    from utils import sha256_file

    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text=f"document {i} " * 30) for i in range(200)])
    out = tmp_path / "out"
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", out, "--shard-size", 5000))
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][1]["file"]
    tokens = np.load(shard)
    tokens[7] = 50300
    np.save(shard, tokens)
    manifest["shards"][1]["sha256"] = sha256_file(shard)  # even a manifest that vouches for the file
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = cli(DOWNLOADER, "--verify", "--out-dir", out)
    one_line_error(r, f"verify failed: shard {shard} holds token id 50300 at position 7")


def test_gpt2_traceback_shows_the_whole_traceback_for_a_bug_report(tmp_path):
    args = tiny(tmp_path / "missing", tmp_path / "out")
    one_line_error(cli("train.py", *args), "data directory")
    with pytest.raises(UserError, match="data directory"):  # not caught: Python prints its traceback
        cli("train.py", *args, env={"GPT2_TRACEBACK": "1"})


# ----------------------------------------------------------------------------------------------------------------
# more cases, found by trying every flag and file with odd values


def test_more_bad_training_settings_are_one_line_errors_before_any_work(data_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for extra, message in [
        (("--beta1", 2), "--beta1 must be from 0 to 0.999999, got 2.0"),
        (("--eps", -1), "--eps must be a finite number >= 0, not 0, got -1.0"),
        (("--weight-decay", -1), "--weight-decay must be a finite number >= 0, got -1.0"),
        (("--grad-clip", "nan"), "--grad-clip must be a finite number >= 0, got nan"),
        (("--min-lr-ratio", "nan"), "--min-lr-ratio must be from 0 to 1, got nan"),
        (("--seed", -1), "--seed must be from 0 to 2**32 - 1, got -1"),
        (("--seed", "1e30"), "--seed must be from 0 to 2**32 - 1"),
        (("--val-steps", 0), "--val-steps 0 evaluates nothing"),
        (("--sample-prompt", ""), "--sample-prompt is empty or --num-samples 0"),
        (("--export", tmp_path / "a_file"), f"--export {tmp_path / 'a_file'} is a file"),
        (("--total-batch", "1e30"), "--total-batch must be at most 2**40, got 1000000000000000019884624838656"),
    ]:
        one_line_error(cli("train.py", *tiny(data_dir, tmp_path / "x", *extra)), message)
        assert not (tmp_path / "x").exists()  # refused before the out dir was made
    one_line_error(cli("train.py", *tiny(tmp_path / "a_file", tmp_path / "x")), "is not a directory")


def test_val_steps_beyond_the_val_split_are_capped_with_a_note(data_dir, tmp_path):
    r = ok(cli("train.py", *tiny(data_dir, tmp_path / "out", "--max-steps", 1, "--val-steps", "1e12")))
    assert "note: the val split holds 39 batches: --val-steps 1000000000000 -> 39" in r.stdout


def test_weights_that_overflowed_are_never_saved(data_dir, tmp_path):
    import torch

    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    check_weights(model, 3, str(tmp_path))  # finite: fine
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="step 3: the update left NaN or infinite weights; not saved"):
        check_weights(model, 3, str(tmp_path))
    one_line_error(cli("train.py", *tiny(data_dir, tmp_path / "x", "--max-lr", "1e300")), "up to 1000")


def test_only_files_this_program_writes_are_cleaned_up(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    (out / "ckpt_000005.pt.77.tmp").write_text("a kill left this")
    ok(cli("train.py", *tiny(data_dir, out, "--max-steps", 1)))
    assert (out / "notes.tmp").read_text() == "mine" and not (out / "ckpt_000005.pt.77.tmp").exists()
    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text=f"document {i} " * 30) for i in range(50)])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "notes.tmp").write_text("mine")
    ok(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", shards))
    assert (shards / "notes.tmp").read_text() == "mine"


def test_an_export_that_cannot_be_made_is_refused_before_the_first_step(data_dir, tmp_path):
    from test_checkpoints import write_nanogpt_checkpoint

    write_nanogpt_checkpoint(tmp_path / "nanogpt", bias=False, compiled=False)
    args = ["--init-from", tmp_path / "nanogpt", "--export", tmp_path / "hf"]
    r = cli("train.py", *tiny(data_dir, tmp_path / "run", *args))
    one_line_error(r, "this model has no biases and transformers' GPT-2 always has them: it cannot be exported")
    assert "step " not in r.stdout  # not one step was trained for nothing
    out = tmp_path / "run2"  # the out dir itself: its config.json would stand for its newest checkpoint
    one_line_error(cli("train.py", *tiny(data_dir, out, "--export", out)), f"--export {out} is the out dir")
    one_line_error(cli("train.py", *tiny(data_dir, out, "--export", "/proc/x/hf")), "cannot write to --export /proc/x")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "notes.txt").write_text("mine")  # an export replaces its directory whole: not this one
    r = cli("train.py", *tiny(data_dir, out, "--export", tmp_path / "models"))
    one_line_error(r, f"--export {tmp_path / 'models'} holds other files than an export (notes.txt)")
    assert (tmp_path / "models" / "notes.txt").read_text() == "mine"


def test_an_export_that_fails_at_the_end_is_one_line_and_the_run_is_recorded_as_finished(
    data_dir, finished_run, tmp_path, monkeypatch
):
    import errno

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(15,))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("an earlier export")
    r = cli("train.py", *tiny(data_dir, out, "--resume", "--export", tmp_path / "hf"))
    one_line_error(r, f"cannot write the export {tmp_path / 'hf'}: the disk holding ")
    assert "nothing of it is left" in r.stderr
    assert read_jsonl(out / "log.jsonl")[-1]["event"] == "finished" and (out / "ckpt_000020.pt").exists()
    assert os.listdir(tmp_path / "hf") == ["config.json"] and sorted(os.listdir(tmp_path))[-1] == "run"  # no leftovers


def test_a_full_disk_stops_the_run_with_a_checkpoint_and_one_line_and_a_plot_that_fails_is_a_warning(
    data_dir, tmp_path, monkeypatch
):
    import errno

    import misc.plot_log

    real_append, real_plot = misc.plot_log.append_jsonl, misc.plot_log.plot_log

    def append_until_full(path, record):
        if record.get("step", 0) >= 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(path, record)

    def no_room_for_the_plot(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(misc.plot_log, "plot_log", no_room_for_the_plot)
    r = ok(cli("train.py", *tiny(data_dir, tmp_path / "plotless", "--max-steps", 2, "--eval-interval", 1)))
    assert r.stderr.count("warning: cannot draw") == 3 and "finished 2 steps" in r.stdout
    monkeypatch.setattr(misc.plot_log, "plot_log", real_plot)
    monkeypatch.setattr(misc.plot_log, "append_jsonl", append_until_full)
    out = tmp_path / "full"
    r = cli("train.py", *tiny(data_dir, out, "--checkpoint-interval", 0))
    one_line_error(r, f"cannot write {out / 'log.jsonl'}: the disk holding {out} is full (")
    assert f"stopped at step 8, the newest checkpoint is {out / 'ckpt_000008.pt'}: make room, then --resume" in r.stderr
    monkeypatch.setattr(misc.plot_log, "append_jsonl", real_append)
    ok(cli("train.py", *tiny(data_dir, out, "--resume")))  # room again: it goes on


def test_export_is_checked_first_and_a_finished_run_can_still_export(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(20,))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    # a finished run started again checks --export as a new one does: an export replaces its directory whole
    one_line_error(cli("train.py", *tiny(data_dir, out, "--resume", "--export", out)), f"--export {out} is the out dir")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "notes.txt").write_text("mine")
    r = cli("train.py", *tiny(data_dir, out, "--resume", "--export", tmp_path / "models"))
    one_line_error(r, f"--export {tmp_path / 'models'} holds other files than an export (notes.txt)")
    assert {name: (out / name).read_bytes() for name in before} == before  # the run is untouched
    assert os.listdir(tmp_path / "models") == ["notes.txt"]
    r = ok(cli("train.py", *tiny(data_dir, out, "--resume", "--export", tmp_path / "hf")))
    assert "is finished" in r.stdout
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_a_checkpoint_past_max_steps_or_from_another_program_is_refused(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", checkpoints=(20,))
    r = cli("train.py", *tiny(data_dir, out, "--max-steps", 3, "--resume"))
    one_line_error(r, "ckpt_000020.pt is at step 20, past --max-steps 3: give a larger --max-steps")
    import torch

    torch.save({"a": 1}, out / "ckpt_000020.pt")
    r = cli("train.py", *tiny(data_dir, out, "--max-steps", 25, "--resume"))
    assert "ckpt_000020.pt is not a train.py checkpoint (no model, optimizer" in r.stderr
    one_line_error(r, "no checkpoint in")


def test_training_on_an_unfinished_download_warns(data_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(data_dir, partial)
    names = sorted(p.name for p in partial.glob("*.npy"))
    shards = [dict(file=n, split=n.split("_")[1], tokens=len(np.load(partial / n))) for n in names]
    (partial / "manifest.json").write_text(json.dumps(dict(source={}, shards=shards, complete=False)))
    r = ok(cli("train.py", *tiny(partial, tmp_path / "out", "--max-steps", 1)))
    assert "manifest.json says the download is not complete" in r.stderr


def test_downloader_refuses_a_gap_a_bad_prefix_and_a_damaged_shard_list(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [dict(text=f"document {i} " * 30) for i in range(300)])
    out = tmp_path / "out"
    args = ["--data-files", corpus, "--out-dir", out, "--shard-size", 3000]
    ok(cli(DOWNLOADER, *args))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    (out / manifest["shards"][2]["file"]).unlink()
    one_line_error(cli(DOWNLOADER, *args), "a finished shard, is missing or cut short")
    (out / "manifest.json").write_text(json.dumps(dict(manifest, shards=[1, 2])))
    one_line_error(cli(DOWNLOADER, *args), "manifest.json is damaged")
    r = cli(DOWNLOADER, "--data-files", corpus, "--out-dir", tmp_path / "o2", "--prefix", "")
    assert r.returncode == 2 and "--prefix must be a plain file-name part, got ''" in r.stderr
    r = cli(DOWNLOADER, "--data-files", tmp_path, "--out-dir", tmp_path / "o3")
    one_line_error(r, f"cannot read --data-files {tmp_path}: a directory")


def test_downloader_names_the_line_of_a_bad_gzipped_jsonl(tmp_path):
    import gzip

    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        f.write('{"text": "one"}\n{"text": "two"}\n{"text": \n')
    one_line_error(cli(DOWNLOADER, "--data-files", corpus, "--out-dir", tmp_path / "out"), "line 3 is not JSON")


def test_hellaswag_files_that_are_damaged_are_one_line_errors_or_skipped_in_training(
    data_dir, tmp_path, tiny_checkpoint
):
    cases = {"a_dir": None, "binary.jsonl": b"\xff\xfe\n", "list.jsonl": b"[1, 2]\n"}
    messages = {"a_dir": "is not a file", "binary.jsonl": "line 1: not UTF-8 text", "list.jsonl": "not a JSON object"}
    for name, content in cases.items():
        path = tmp_path / name
        path.mkdir() if content is None else path.write_bytes(content)
        one_line_error(cli("hellaswag.py", "--model", tiny_checkpoint(), "--data-file", path), messages[name])
    args = ["--max-steps", 1, "--hellaswag-interval", 1, "--hellaswag-file", tmp_path / "binary.jsonl"]
    r = ok(cli("train.py", *tiny(data_dir, tmp_path / "out", *args)))
    assert "warning: HellaSwag is skipped" in r.stderr


def test_output_paths_are_checked_before_the_work(tiny_checkpoint, hellaswag_file, tmp_path):
    model = tiny_checkpoint()
    for script, args, message in [
        ("hellaswag.py", ["--model", model, "--data-file", hellaswag_file, "--out", tmp_path], "is a directory"),
        ("sample.py", ["--model", model, "--out", tmp_path / "no" / "s.json"], "does not exist"),
        ("misc/plot_log.py", [tmp_path], "is not a file"),
        ("bench.py", ["gpu", "--out", tmp_path], "is a directory"),
    ]:
        one_line_error(cli(script, *args), message)


def test_sample_refuses_temperatures_that_overflow_and_prompts_that_are_not_utf8(tiny_checkpoint):
    for temperature in ("1e-45", "1e300"):
        r = cli("sample.py", "--model", tiny_checkpoint(), "--temperature", temperature)
        one_line_error(r, "--temperature must be 0 (greedy) or from 0.001 to 100")
    # the bytes \xff\xfe in the command line, as Python hands them to the script (surrogate escapes)
    r = cli("sample.py", "--model", tiny_checkpoint(), "--prompt", os.fsdecode(b"\xff\xfe"))
    one_line_error(r, "--prompt is not valid UTF-8 text")


def test_a_damaged_transformers_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    one_line_error(cli("sample.py", "--model", tmp_path / "hf"), f"cannot load {tmp_path / 'hf'}: KeyError")


def test_train_sh_refuses_bad_counts_in_one_line(monkeypatch):
    for key in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for env, message in [
        (dict(NGPU="abc"), "error: NGPU must be a whole number >= 0, got 'abc'"),
        (dict(NGPU="1.5"), "error: NGPU must be a whole number >= 0, got '1.5'"),
        (dict(NGPU="0", NNODES="2"), "error: NNODES=2, but this machine has no GPU"),
        (dict(NGPU="2", NNODES="2", NODE_RANK="5", MASTER_ADDR="h"), "error: NODE_RANK=5 must be below NNODES=2"),
    ]:
        r = subprocess.run([os.path.join(ROOT, "train.sh")], capture_output=True, text=True,
                           env=dict(os.environ, TRAIN_SH_DRY_RUN="1", **env))  # fmt: skip
        assert r.returncode == 2 and r.stderr.strip().startswith(message), r.stderr


def test_the_plot_skips_records_whose_step_is_not_a_number(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "train_loss": 3.0}\n{"step": "a", "train_loss": 2.0}\n{"step": 2, "train_loss": 2.5}\n')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    ok(cli("misc/plot_log.py", log, tmp_path / "p.png"))
    assert (tmp_path / "p.png").exists()
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(cli("misc/plot_log.py", tmp_path / "empty.jsonl"), "holds no step records to plot")


def test_bench_flags_are_checked():
    for args, message in [
        (["hellaswag", "--examples", 0], "--examples must be at least 1, got 0"),
        (["tokenize", "--repeats", 0], "--repeats must be at least 1, got 0"),
        (["hellaswag", "--n-head", 3], "--n-embd 128 is not divisible by --n-head 3"),
    ]:
        one_line_error(cli("bench.py", *args), message)


def test_running_out_of_memory_is_one_line(capsys):
    from utils import run_cli

    def allocate():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 201216000000 bytes.")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(allocate)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory (DefaultCPUAllocator: can't allocate")

    def other_bug():
        raise RuntimeError("a bug, not a user error")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        run_cli(other_bug)
