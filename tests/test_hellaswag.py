"""hellaswag.py: both published conventions, exactly, batched and distributed."""

import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import Started, cli, ok, process_table, torchrun, wait_gone
from hellaswag import synthetic_examples
from utils import UserError, get_tokenizer
from weights import load_model


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "hellaswag.jsonl"
    with open(path, "w") as f:
        for ex in synthetic_examples(40, seed=3):
            f.write(json.dumps(ex) + "\n")
    return path


def reference_logprob(model, context_tokens, continuation_tokens):
    """Slow and plain: one row, one forward pass, log-softmax over the real vocabulary, summed over the continuation."""
    # a row longer than the context keeps its end (the continuation, then as much context as fits)
    tokens = torch.tensor([(context_tokens + continuation_tokens)[-(model.config.block_size + 1) :]])
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    logprobs = F.log_softmax(logits[0, :, :50257].double(), dim=-1)
    targets = tokens[0, 1:]
    n = min(len(continuation_tokens), len(targets))
    return sum(logprobs[t, targets[t]].item() for t in range(len(targets) - n, len(targets))), n


def reference_scores(model, example):
    enc = get_tokenizer()
    # completion convention: encode(ctx), encode(" " + ending); acc by summed loss, acc_norm by loss per token
    ctx = enc.encode_ordinary(example["ctx"])
    ends = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    completion, n_scored = zip(*[reference_logprob(model, ctx, end) for end in ends])
    acc = max(range(4), key=lambda i: (completion[i], -i))
    acc_norm = max(range(4), key=lambda i: (completion[i] / n_scored[i], -i))

    # harness convention, written out from lm-eval-harness's hellaswag task
    def prep(text):
        text = text.strip().replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        return text.replace("  ", " ")

    query = prep(example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize())
    choices = [prep(e) for e in example["endings"]]
    harness = []
    for choice in choices:
        whole = enc.encode_ordinary(query + " " + choice)
        n_query = len(enc.encode_ordinary(query))
        harness.append(reference_logprob(model, whole[:n_query], whole[n_query:])[0])
    harness_acc = max(range(4), key=lambda i: (harness[i], -i))
    harness_acc_norm = max(range(4), key=lambda i: (harness[i] / len(choices[i]), -i))
    return (acc, acc_norm, harness_acc, harness_acc_norm), list(completion) + harness


@pytest.mark.parametrize("block_size", [256, 24])  # 24: long rows must be cut to the context
def test_both_conventions_match_a_slow_reference(tiny_checkpoint, data_file, block_size):
    model = load_model(str(tiny_checkpoint(n_layer=2, n_embd=64, n_head=4, block_size=block_size)))
    examples = hellaswag.load_examples(data_file)
    enc = get_tokenizer()
    rows = [row for ex in examples for row in hellaswag.build_rows(ex, enc)]
    sums, n_tokens = hellaswag.score_rows(model, rows, "cpu", rows_per_batch=24)
    counts = [0, 0, 0, 0]
    for i, ex in enumerate(examples):
        predictions, reference = reference_scores(model, ex)
        assert sums[8 * i : 8 * i + 8].tolist() == pytest.approx(reference, abs=2e-3)
        assert hellaswag.predict(ex, sums[8 * i : 8 * i + 8], n_tokens[8 * i : 8 * i + 4]) == predictions
        counts = [c + (p == ex["label"]) for c, p in zip(counts, predictions)]
    results = hellaswag.evaluate(model, examples, "cpu", batch_size=5)
    n = len(examples)
    assert (results["acc"], results["acc_norm"], results["harness_acc"], results["harness_acc_norm"]) == tuple(
        c / n for c in counts
    )
    assert results["examples"] == n


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  Making a cake [title] Mix the flour.  ", "Making a cake. Mix the flour."),
        ("Then he [step] stirs it.", "Then he stirs it."),
        ("A [header] B [substeps] C", "A B C"),
        ("word  word", "word word"),
        ("[title] Start", " Start"),
    ],
)
def test_harness_preprocessing(raw, clean):
    assert hellaswag.preprocess(raw) == clean


def test_harness_rows_score_the_continuation_after_the_query():
    enc = get_tokenizer()
    example = dict(
        activity_label="Baking",
        ctx_a="A man mixes flour.",
        ctx_b="then he",
        ctx="A man mixes flour. then he",
        endings=["bakes it [title] well.", "runs.", "sits.", "eats."],
        label=0,
    )
    rows = hellaswag.build_rows(example, enc)
    query = "Baking: A man mixes flour. Then he"
    tokens, n = rows[4]
    assert tokens == enc.encode_ordinary(query + " bakes it. well.")
    assert enc.decode(tokens[-n:]) == " bakes it. well."
    tokens, n = rows[0]
    assert tokens == enc.encode_ordinary("A man mixes flour. then he") + enc.encode_ordinary(" bakes it [title] well.")


def test_results_do_not_depend_on_batch_size(tiny_checkpoint, data_file):
    model = load_model(str(tiny_checkpoint()))
    examples = hellaswag.load_examples(data_file)
    results = [hellaswag.evaluate(model, examples, "cpu", batch_size=b) for b in (1, 3, 64)]
    assert results[0] == results[1] == results[2]


def test_script_writes_the_contract_json_and_a_table(tiny_checkpoint, data_file, tmp_path):
    ckpt = tiny_checkpoint()
    r = ok(cli("hellaswag.py", "--model", ckpt.parent, "--data-file", data_file, "--limit", 25, "--out",
               tmp_path / "r.json", "--device", "cpu"))  # fmt: skip
    results = json.loads((tmp_path / "r.json").read_text())
    assert {"examples", "acc", "acc_norm", "harness_acc", "harness_acc_norm"} <= set(results)
    assert results["examples"] == 25
    assert "completion acc / acc_norm" in r.stdout and "GPT-2 124M" in r.stdout and "28.92 /  31.14" in r.stdout
    model = load_model(str(ckpt))
    direct = hellaswag.evaluate(model, hellaswag.load_examples(data_file, limit=25), "cpu")
    assert all(results[k] == direct[k] for k in direct)


def test_two_processes_equal_one(tiny_checkpoint, data_file, tmp_path):
    ckpt = tiny_checkpoint()
    args = ["--model", ckpt, "--data-file", data_file, "--device", "cpu", "--limit", 31]
    ok(cli("hellaswag.py", *args, "--out", tmp_path / "one.json"))
    cmd = torchrun("hellaswag.py", *args, "--out", tmp_path / "two.json")
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["world_size"] == 2 and a["examples"] == b["examples"] == 31
    assert all(a[k] == b[k] for k in ("acc", "acc_norm", "harness_acc", "harness_acc_norm"))


def test_ranks_whose_torchrun_is_killed_stop_at_once_instead_of_scoring_on(tiny_checkpoint, tmp_path):
    path = tmp_path / "many.jsonl"  # a minute and a half of scoring for two 2-core CPU processes
    path.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(10_000)))
    args = ["--model", tiny_checkpoint(), "--data-file", path, "--device", "cpu", "--out", tmp_path / "r.json"]
    run = Started(torchrun("hellaswag.py", *args), start_new_session=True)
    run.wait_for(r"^scoring 10,000 examples on 2 x cpu")
    ranks = [pid for pid, (parent, _) in process_table().items() if parent == run.pid]
    assert len(ranks) == 2
    os.kill(run.pid, signal.SIGKILL)  # the launcher only
    assert not wait_gone(ranks, timeout=20), "ranks still scoring 20 s after torchrun was killed"
    assert run.finish().returncode == -signal.SIGKILL and not (tmp_path / "r.json").exists()


def test_bad_data_files_name_line_and_field(tmp_path):
    good = json.dumps(synthetic_examples(1)[0])
    cases = [
        ("{not json", "line 2: not JSON"),
        (
            json.dumps({**json.loads(good), "endings": ["a", "b"]}),
            "line 2: field 'endings' must be a list of 4 strings",
        ),
        (
            json.dumps({k: v for k, v in json.loads(good).items() if k != "ctx_b"}),
            "line 2: field 'ctx_b' is missing or not a string",
        ),
        (json.dumps({**json.loads(good), "label": 7}), "line 2: field 'label' must be 0, 1, 2 or 3, got 7"),
    ]
    for bad, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(UserError, match=re.escape(f"{path} {message}")):
            hellaswag.load_examples(path)
    with pytest.raises(UserError, match="does not exist"):
        hellaswag.load_examples(tmp_path / "nope.jsonl")


def test_script_errors_are_one_line(tmp_path, data_file, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, as huggingface_hub read it at import
    cases = [
        (["--model", tmp_path / "missing.pt"], f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"),
        (["--model", tmp_path], f"error: {tmp_path} holds no checkpoint (ckpt_NNNNNN.pt, nanoGPT's ckpt.pt"),
        (["--model", "gpt2-xxl"], "error: no model 'gpt2-xxl'"),
        (["--model", "gpt2"], "error: could not fetch 'gpt2' from the Hugging Face hub"),
    ]
    for args, message in cases:
        r = cli("hellaswag.py", *args, "--data-file", data_file, "--device", "cpu", env=dict(HF_HUB_OFFLINE="1"))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_download_once_retrying_faults_and_offline_message(tmp_path, data_file):
    from http_files import Retry
    from loopback_http import LoopbackServer

    (tmp_path / "www").mkdir()
    shutil.copy(data_file, tmp_path / "www" / "hellaswag_val.jsonl")
    server = LoopbackServer(tmp_path / "www")
    try:
        url = f"{server.url}/files/hellaswag_val.jsonl"
        server.fault("hellaswag_val", status=503)
        server.fault("hellaswag_val", count=2)  # connections dropped mid-body: the rest is asked for
        path = hellaswag.download(str(tmp_path / "cache"), url, Retry(wait=0.01))
        assert open(path, "rb").read() == data_file.read_bytes()
        requests = len(server.requests)
        assert hellaswag.download(str(tmp_path / "cache"), url) == path and len(server.requests) == requests  # cached
        with pytest.raises(UserError, match="HTTP 404 Not Found: with no network, pass a local copy"):
            hellaswag.download(str(tmp_path / "other"), url + ".missing")
    finally:
        server.close()
    with pytest.raises(UserError, match="with no network, pass a local copy of HellaSwag with --data-file"):
        hellaswag.download(str(tmp_path / "other"), "https://no-such-host.invalid/hellaswag_val.jsonl")
    assert not os.path.exists(tmp_path / "other")
