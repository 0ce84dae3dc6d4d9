"""model.py: exactly GPT-2, weights in and out of transformers' format, cached generation, optimizer and MFU."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPT2_VOCAB_SIZE, MODEL_SIZES, GPTConfig, sample_next_token
from weights import export_model


def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=64), **kw})


def test_gpt2_124m_has_gpt2s_parameter_count():
    model = GPT(GPTConfig(vocab_size=GPT2_VOCAB_SIZE))
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, as counted by transformers
    assert GPT(GPTConfig()).num_params(non_embedding=False) == 124_475_904  # padded vocabulary 50304
    assert model.lm_head.weight is model.transformer.wte.weight
    assert set(MODEL_SIZES) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=256, vocab_size=2000))
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 300, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 300) and loss is None
    targets = torch.randint(0, 300, (3, 16))
    logits, loss = model(idx, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 300), targets.view(-1))
    assert torch.allclose(loss, expected)
    assert loss.item() == pytest.approx(math.log(300), rel=0.05)  # a fresh model is close to uniform


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 300, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 300
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize(
    "shape", [dict(n_layer=2, n_head=4, n_embd=64), dict(n_layer=3, n_head=6, n_embd=96, n_positions=48)]
)
def test_from_pretrained_matches_transformers(hf_gpt2_dir, shape):
    hf_model, directory = hf_gpt2_dir(**shape)
    model = GPT.from_pretrained(str(directory)).eval()
    T = shape.get("n_positions", 32)
    idx = torch.randint(0, 300, (2, T))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = model(idx)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_from_pretrained_reads_pytorch_bin_and_hub_style_names(hf_gpt2_dir, tmp_path):
    hf_model, directory = hf_gpt2_dir()
    # the hub's gpt2 files name weights without the "transformer." prefix and carry the old attn.bias mask buffers
    sd = {k.removeprefix("transformer."): v.clone() for k, v in load_file(directory / "model.safetensors").items()}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    for fmt in ("bin", "safetensors"):
        d = tmp_path / fmt
        d.mkdir()
        (d / "config.json").write_text((directory / "config.json").read_text())
        if fmt == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            save_file(sd, d / "model.safetensors")
        model = GPT.from_pretrained(str(d)).eval()
        idx = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4


def test_from_pretrained_errors(tmp_path, hf_gpt2_dir):
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        GPT.from_pretrained("gpt3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(
        json.dumps(dict(n_positions=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    )
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path / "empty"))
    _, directory = hf_gpt2_dir()
    sd = load_file(directory / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, directory / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights"):
        GPT.from_pretrained(str(directory))


def test_export_loads_in_transformers_with_padded_rows_dropped(tmp_path):
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304)).eval()  # padded vocabulary, as trained
    export_model(model, tmp_path / "export")
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf_model.config.vocab_size == GPT2_VOCAB_SIZE
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    assert theirs.shape[-1] == GPT2_VOCAB_SIZE
    assert (ours[..., :GPT2_VOCAB_SIZE] - theirs).abs().max().item() < 1e-4
    # the directory is self-contained: it carries GPT-2's tokenizer too, with the model's context as its limit
    tokenizer = GPT2Tokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer.encode("Hello world") == [15496, 995] and tokenizer.model_max_length == model.config.block_size
    # and our loader reads our own export back
    again = GPT.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.allclose(again(idx)[0], ours[..., :GPT2_VOCAB_SIZE], atol=1e-5)


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)]
)
def test_cached_generation_equals_uncached(sampling):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=24)).eval()
    prompt = torch.randint(0, 300, (3, 5))
    # 30 new tokens run past block_size: the window slides and the cache must be rebuilt
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(42)
        runs.append(model.generate(prompt, 30, generator=gen, use_cache=use_cache, **sampling))
    assert runs[0].shape == (3, 35)
    assert torch.equal(runs[0][:, :5], prompt)
    assert torch.equal(runs[0], runs[1])


def test_cached_logits_equal_full_forward():
    from model import KVCache

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 300, (2, 20))
    cache = KVCache(model.config, batch_size=2, length=20)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, :8], kv_cache=cache)[0], model(idx[:, 8:11], kv_cache=cache, pos=torch.arange(8, 11))[0]]
        parts += [model.decode_step(idx[:, t : t + 1], torch.tensor([t]), cache)[:, None] for t in range(11, 20)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_generation_is_seeded_and_never_emits_padding_ids():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304)).eval()

    def boost_padding(module, inputs, logits):  # make the padding rows the most likely by far
        logits = logits.clone()
        logits[..., GPT2_VOCAB_SIZE:] += 100.0
        return logits

    model.lm_head.register_forward_hook(boost_padding)
    prompt = torch.zeros(4, 3, dtype=torch.long)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.max().item() < GPT2_VOCAB_SIZE
    assert model.generate(prompt, 5, temperature=0).max().item() < GPT2_VOCAB_SIZE


def test_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    greedy = logits.argmax(-1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits.clone(), top_k=1, generator=gen), greedy)
    assert torch.equal(sample_next_token(logits.clone(), top_p=1e-6, generator=gen), greedy)
    # top_k=3 only ever picks among the 3 largest
    top3 = logits.topk(3).indices
    picks = torch.cat([sample_next_token(logits.clone(), top_k=3, generator=gen) for _ in range(50)], dim=1)
    assert all(set(picks[i].tolist()) <= set(top3[i].tolist()) for i in range(5))
    # top_p keeps the smallest set of most likely tokens that reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = {sample_next_token(probs.log(), top_p=0.7, generator=gen).item() for _ in range(200)}
    assert picks == {0, 1}


def test_configure_optimizers_decays_matrices_only():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.95)
