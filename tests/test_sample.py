"""sample.py: seeded, streamed, cached sampling; --top-k 1 is transformers' greedy decoding."""

import io
import json

import torch

import model as model_module
import sample
from conftest import cli, ok
from utils import EOT, get_tokenizer
from weights import load_model


def sample_json(ckpt, tmp_path, *args, name="out.json"):
    r = ok(cli("sample.py", "--model", ckpt, "--device", "cpu", "--out", tmp_path / name, *args))
    return json.loads((tmp_path / name).read_text()), r


def test_contract_json_streaming_and_determinism(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint()
    a, r = sample_json(ckpt, tmp_path, "--num-samples", 3, "--max-new-tokens", 12, "--seed", 7, name="a.json")
    assert len(a) == 3 and all(set(s) >= {"prompt", "text", "tokens"} for s in a)
    enc = get_tokenizer()
    for s in a:
        assert s["prompt"] == "Hello, I'm a language model," and len(s["tokens"]) == 12
        assert enc.decode(s["tokens"]) == s["text"]
        assert s["text"] in r.stdout  # streamed to the console
    b, _ = sample_json(ckpt, tmp_path, "--num-samples", 2, "--max-new-tokens", 12, "--seed", 7, name="b.json")
    assert b == a[:2]  # same seed, same samples, whatever the number drawn
    c, _ = sample_json(ckpt, tmp_path, "--num-samples", 2, "--max-new-tokens", 12, "--seed", 8, name="c.json")
    assert c != a[:2]


def test_top_k_1_is_transformers_greedy_generate(hf_gpt2_dir, tmp_path):
    hf_model, directory = hf_gpt2_dir(vocab_size=50257, n_positions=64, n_embd=32, n_head=2)
    out, _ = sample_json(
        directory, tmp_path, "--top-k", 1, "--num-samples", 2, "--max-new-tokens", 20, "--prompt", "The quick brown fox"
    )
    prompt = torch.tensor([get_tokenizer().encode("The quick brown fox")])
    expected = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=20,
        min_new_tokens=20,
        pad_token_id=EOT,
    )
    assert out[0]["tokens"] == expected[0, prompt.shape[1] :].tolist()
    assert out[1]["tokens"] == out[0]["tokens"]


def args_for(**kw):
    return sample.Config(**{**dict(max_new_tokens=10, num_samples=1), **kw})


def test_uses_the_kv_cache(tiny_checkpoint, monkeypatch):
    model = load_model(str(tiny_checkpoint()))
    caches = []
    real = model_module.KVCache
    monkeypatch.setattr(model_module, "KVCache", lambda *a, **kw: caches.append(real(*a, **kw)) or caches[-1])
    sample.generate_samples(model, get_tokenizer(), args_for(), "cpu")
    # one cache, allocated once: the prompt and 9 of the 10 new tokens are in it (the 10th is never fed back)
    written = caches[0].k[0].abs().sum(dim=(0, 1, 3)) != 0  # (block_size,)
    n = len(get_tokenizer().encode("Hello, I'm a language model,")) + 9
    assert len(caches) == 1 and written[:n].all() and not written[n:].any()


def test_compiled_step_decodes_like_the_eager_one_and_compiles_once(tiny_checkpoint):
    import torch._dynamo

    model = load_model(str(tiny_checkpoint(block_size=64)))  # 70 new tokens slide the window past the context
    eager = sample.generate_samples(model, get_tokenizer(), args_for(top_k=1, max_new_tokens=70), "cpu")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = sample.generate_samples(
        model, get_tokenizer(), args_for(top_k=1, max_new_tokens=70, num_samples=2, compile=True), "cpu"
    )
    assert compiled[0]["tokens"] == compiled[1]["tokens"] == eager[0]["tokens"]
    # the step's shapes are the same at every position: one graph for both samples, never a recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def boost_logits(model, ids):
    """Make the given token ids by far the most likely at every position."""

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., ids] += 100.0
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_never_emits_padded_ids_and_stops_at_eot(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint()))
    handle = boost_logits(model, list(range(50257, 50304)))  # the padding rows would win if they were allowed
    out = sample.generate_samples(model, get_tokenizer(), args_for(num_samples=3, max_new_tokens=30), "cpu")
    assert all(max(s["tokens"]) < 50257 for s in out)
    handle.remove()
    boost_logits(model, [EOT])
    out = sample.generate_samples(model, get_tokenizer(), args_for(stop_at_eot=True), "cpu")
    assert out[0]["tokens"] == [] and out[0]["text"] == ""
    out = sample.generate_samples(model, get_tokenizer(), args_for(), "cpu")
    assert out[0]["tokens"] == [EOT] * 10


def test_long_prompts_are_cropped_from_the_left_with_a_warning(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(block_size=16)
    out, r = sample_json(ckpt, tmp_path, "--prompt", ("one two three four " * 10).strip(), "--max-new-tokens", 20)
    assert (
        "warning: the prompt has 40 tokens, more than the model's context of 16: only its last 16 are read" in r.stderr
    )
    assert all(len(s["tokens"]) == 20 for s in out)


def test_streaming_holds_back_split_characters():
    enc = get_tokenizer()
    tokens = enc.encode("emoji 🙂 done")
    stream = io.StringIO()
    printer = sample.StreamPrinter(enc, stream)
    for i in range(1, len(tokens) + 1):
        printer.update(tokens[:i])
        assert "\ufffd" not in stream.getvalue()
    assert stream.getvalue() == "emoji 🙂 done"


def test_errors_are_one_line(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint()
    cases = [
        (["--model", tmp_path / "nope.pt"], f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"),
        (
            ["--model", ckpt, "--top-p", "0"],
            "error: --top-p must be in (0, 1], got 0.0",
        ),
        (["--model", ckpt, "--prompt", ""], "error: --prompt is empty"),
    ]
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    cases.append((["--model", tmp_path / "broken.pt"], f"error: cannot read checkpoint {tmp_path / 'broken.pt'}"))
    for args, message in cases:
        r = cli("sample.py", *args, "--device", "cpu")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in r.stderr, r.stderr
