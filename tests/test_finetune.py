"""Fine-tuning (train.py --init-from) and experiment tracking (--wandb-project, with wandb for real in offline mode)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import read_log
from conftest import cli, ok, one_line_error, one_thread_env, run_script, tiny, train_losses
from test_checkpoints import write_nanogpt_checkpoint
from utils import ShardedDataLoader
from weights import load_model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A small GPT-2 written by transformers' save_pretrained, its embeddings scaled so that its loss is nothing like
    a new model's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


def first_step_loss(spec, data_dir):
    """The loss train.py's tiny preset logs at step 0, computed here: 4 micro-batches of 4 x 32, the mean."""
    model = load_model(str(spec))
    loader = ShardedDataLoader(str(data_dir), "train", 4, 32, 0, 1)
    with torch.no_grad():
        return sum(model(*loader.next_batch())[1] / 4 for _ in range(4)).item()


def test_init_from_a_transformers_directory_starts_from_its_weights(data_dir, hf_dir, finished_run, tmp_path):
    ok(cli("train.py", *tiny(data_dir, tmp_path / "ft", "--init-from", hf_dir, "--max-steps", 4)))
    losses = train_losses(tmp_path / "ft")
    assert losses[0] == pytest.approx(first_step_loss(hf_dir, data_dir), rel=1e-6)  # the loaded model's loss
    assert abs(losses[0] - train_losses(finished_run)[0]) > 1.0  # a new GPT logs another loss
    config = json.loads((tmp_path / "ft" / "log.jsonl").read_text().splitlines()[0])
    assert (config["init_from"], config["n_layer"], config["n_embd"]) == (str(hf_dir), 2, 32)  # the weights' shape
    ckpt = torch.load(tmp_path / "ft" / "ckpt_000004.pt", weights_only=False)
    assert ckpt["model_config"]["vocab_size"] == 50257 and ckpt["model_config"]["block_size"] == 64


def test_init_from_a_nanogpt_checkpoint_trains(data_dir, tmp_path):
    write_nanogpt_checkpoint(tmp_path / "nanogpt", bias=False, compiled=True)
    ok(cli("train.py", *tiny(data_dir, tmp_path / "ft", "--init-from", tmp_path / "nanogpt", "--max-steps", 3)))
    assert train_losses(tmp_path / "ft")[0] == pytest.approx(first_step_loss(tmp_path / "nanogpt", data_dir), rel=1e-6)
    ckpt = torch.load(tmp_path / "ft" / "ckpt_000003.pt", weights_only=False)
    assert (ckpt["model_config"]["bias"], ckpt["model_config"]["gelu"], ckpt["config"]["n_head"]) == (False, "exact", 4)


def test_a_resumed_fine_tune_continues_from_its_own_checkpoint_exactly(data_dir, hf_dir, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(hf_dir, init)
    args = ["--init-from", init, "--max-steps", 6, "--checkpoint-interval", 3, "--sample-interval", 0]
    ok(cli("train.py", *tiny(data_dir, tmp_path / "straight", *args), threads=1))
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt_000003.pt", tmp_path / "resumed")
    shutil.rmtree(init)  # the resume reads its checkpoint, never the init weights again
    ok(cli("train.py", *tiny(data_dir, tmp_path / "resumed", *args, "--resume"), threads=1))
    straight = train_losses(tmp_path / "straight")
    assert train_losses(tmp_path / "resumed") == {step: straight[step] for step in range(3, 6)}


def test_a_bad_init_spec_or_a_contradicting_flag_is_one_line(data_dir, hf_dir, tmp_path, monkeypatch):
    r = cli("train.py", *tiny(data_dir, tmp_path / "a", "--init-from", "no-such-model"))
    one_line_error(r, "no model 'no-such-model': give a checkpoint .pt, an out dir, a transformers directory")
    r = cli("train.py", *tiny(data_dir, tmp_path / "b", "--init-from", hf_dir, "--n-layer", 3))
    one_line_error(r, f"--n-layer 3 contradicts --init-from {hf_dir}, whose weights have --n-layer 2")
    # GPT-2 from the hub with no network: one line at once, not the hub client's half minute of retries
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0, env = time.time(), dict(HF_HUB_OFFLINE=None, HF_ENDPOINT="http://no-such-host.invalid")
    r = cli("train.py", *tiny(data_dir, tmp_path / "g", "--init-from", "gpt2"), env=env)
    one_line_error(r, "cannot fetch 'gpt2' from the Hugging Face hub: cannot reach http://no-such-host.invalid (")
    assert len(r.stderr.strip().splitlines()) == 1 and time.time() - t0 < 10
    r = cli("train.py", *tiny(data_dir, tmp_path / "c", "--init-from", hf_dir, "--seq-len", 128))
    one_line_error(r, f"--seq-len 128 is longer than the context of --init-from {hf_dir} (64 tokens)")


# ----------------------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_records(run_dir):
    """The records of an offline wandb run, read back with wandb's own reader (wandb leet inspect --json)."""
    wandb = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([wandb, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def wandb_services():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found += [pid] if b"wandb-core" in f.read() else []
        except OSError:
            continue
    return found


def wandb_runs(out_dir):
    return sorted((out_dir / "wandb").glob("offline-run-*"))


def test_wandb_gets_the_config_every_step_evaluations_and_samples_and_a_resume_continues_its_run(data_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(one_thread_env(), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-files"))  # where the user says
    args = ["--wandb-project", "gpt2-tests", "--wandb-run-name", "tiny", "--eval-interval", 2, "--sample-interval", 2]
    r = run_script("train.py", *tiny(data_dir, out, *args, "--max-steps", 4), env=env)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *tiny(data_dir, out, *args, "--max-steps", 6, "--resume"), env=env)
    assert r.returncode == 0, r.stderr
    assert not wandb_services()  # the service wandb started ended with the run
    assert not (out / "wandb").exists()

    first, second = (wandb_records(d) for d in wandb_runs(tmp_path / "wandb-files"))
    runs = [next(rec["run"] for rec in records if rec["type"] == "run") for records in (first, second)]
    assert runs[0]["run_id"] == runs[1]["run_id"] and runs[0]["display_name"] == "tiny"  # one run, continued
    config = runs[0]["config"]["update"]
    assert (config["preset"], config["n_layer"], config["max_steps"], config["world_size"]) == ("tiny", 2, 4, 1)

    history = {}
    for records in (first, second):
        for rec in records:
            if rec["type"] == "history":
                history.setdefault(rec["history"]["step"]["num"], {}).update(rec["history"]["item"])
    logged = {rec["step"]: rec for rec in read_log(out / "log.jsonl")}
    assert sorted(history) == sorted(logged) == list(range(7))
    for step, rec in logged.items():
        for key in ("train_loss", "lr", "grad_norm", "val_loss"):
            if key in rec:
                assert history[step][key] == rec[key], (step, key)
    assert "val_loss" in history[6] and history[4]["samples.nrows"] == 2  # evaluations; samples as a table
    table = json.loads((wandb_runs(tmp_path / "wandb-files")[1] / "files" / history[6]["samples.path"]).read_text())
    assert [row[1] for row in table["data"]] == logged[6]["samples"]


def test_wandb_failing_during_a_run_is_a_warning_and_log_jsonl_goes_on(tmp_path, capsys):
    from checkpoint import Start
    from misc.plot_log import RunLog

    class GoneForGood:  # a wandb run whose network went away after the start
        def log(self, metrics, step):
            raise ConnectionError("wandb.ai: connection refused")

    run_log = RunLog(str(tmp_path), Start())
    run_log.wandb_run = GoneForGood()
    for step in range(3):
        run_log.write(dict(step=step, train_loss=1.0))
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [0, 1, 2] and run_log.failed is None
    warning = "warning: Weights & Biases stopped taking records (wandb.ai: connection refused); log.jsonl goes on"
    assert capsys.readouterr().err.splitlines() == [warning]  # once, and the records went on without it


def test_wandb_not_installed_is_one_line_that_says_how_to_install_it(data_dir, tmp_path):
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = run_script("train.py", *tiny(data_dir, tmp_path / "run", "--wandb-project", "p", "--max-steps", 1), env=env)
    one_line_error(r, "--wandb-project needs the wandb package (No module named 'wandb'): pip install wandb")


def test_wandb_with_no_login_or_no_network_is_one_line_before_the_first_step(data_dir, tmp_path):
    """Not wandb's traceback at once, nor its minute and a half of retries: what to do, in one line, quickly."""
    from conftest import free_port

    home = tmp_path / "home"  # no ~/.netrc, no wandb settings
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_MODE="online", WANDB_CONFIG_DIR=str(home / ".config" / "wandb"))
    args = tiny(data_dir, tmp_path / "run", "--wandb-project", "p", "--max-steps", 1)
    r = run_script("train.py", *args, env=env)
    one_line_error(r, "--wandb-project: no Weights & Biases login here: run `wandb login`, set WANDB_API_KEY, or log")
    t0 = time.time()
    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    r = run_script("train.py", *args, env=env)
    one_line_error(r, "--wandb-project: cannot start a Weights & Biases run (cannot reach http://127.0.0.1:")
    assert "WANDB_MODE=offline" in r.stderr and time.time() - t0 < 30 and "step " not in r.stdout


def test_a_checkpoint_whose_shape_cannot_be_read_is_one_line(data_dir, finished_run, tmp_path):
    from test_checkpoints import SHAPE

    ckpt = torch.load(finished_run / "ckpt_000020.pt", weights_only=True)
    ckpt["model_config"]["dropout"] = 0.1  # a key this GPT does not know
    torch.save(ckpt, tmp_path / "extra.pt")
    write_nanogpt_checkpoint(tmp_path / "nanogpt", bias=True, compiled=False)
    nanogpt = torch.load(tmp_path / "nanogpt" / "ckpt.pt", weights_only=False)
    del nanogpt["model_args"]["n_head"]
    torch.save(nanogpt, tmp_path / "nanogpt" / "ckpt.pt")
    for spec, what in [(tmp_path / "extra.pt", "TypeError"), (tmp_path / "nanogpt", "KeyError: 'n_head'")]:
        r = cli("train.py", *tiny(data_dir, tmp_path / "run", "--init-from", spec))
        one_line_error(r, f"its model shape cannot be read ({what}")
        one_line_error(cli("sample.py", "--model", spec), "its model shape cannot be read")
    assert SHAPE["n_head"] == 4
