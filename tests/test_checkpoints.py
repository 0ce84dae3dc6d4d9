"""Checkpoints of nanoGPT and build-nanogpt load everywhere a model is taken (weights.load_model: sample.py,
hellaswag.py), built here from their documented formats, and compute what those models compute."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import cli, ok
from utils import UserError
from weights import load_model

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304)


def random_state_dict(bias, seed=0):
    """Weights in the layout nanoGPT and build-nanogpt share (nn.Linear (out, in), head tied to wte), all random."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = SHAPE["n_embd"], SHAPE["vocab_size"], SHAPE["block_size"]

    def rand(*shape, mean=0.0):
        return mean + 0.1 * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": rand(V, C), "transformer.wpe.weight": rand(T, C)}
    for layer in range(SHAPE["n_layer"]):
        p = f"transformer.h.{layer}."
        shapes = {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
        for name, (out_features, in_features) in shapes.items():
            sd[p + name + ".weight"] = rand(out_features, in_features)
            if bias:
                sd[p + name + ".bias"] = rand(out_features)
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = rand(C, mean=1.0)
            if bias:
                sd[p + ln + ".bias"] = rand(C)
    sd["transformer.ln_f.weight"] = rand(C, mean=1.0)
    if bias:
        sd["transformer.ln_f.bias"] = rand(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def reference_logits(sd, idx, gelu):
    """GPT-2's forward pass written out from the weights alone, attention by explicit softmax: no code shared with
    model.py."""
    C, H = SHAPE["n_embd"], SHAPE["n_head"]
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(SHAPE["n_layer"]):
        p = f"transformer.h.{layer}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd.get(p + "ln_1.bias"))
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], sd.get(p + "attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], sd.get(p + "attn.c_proj.bias"))
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd.get(p + "ln_2.bias"))
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd.get(p + "mlp.c_fc.bias")), approximate=gelu)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd.get(p + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias"))
    return x @ sd["lm_head.weight"].T


def write_nanogpt_checkpoint(out_dir, bias, compiled):
    """nanoGPT's train.py format: model (with torch.compile's _orig_mod. prefix when compiled, and the causal-mask
    buffers of its non-flash attention), model_args, iter_num, best_val_loss, config."""
    sd = random_state_dict(bias)
    T = SHAPE["block_size"]
    for layer in range(SHAPE["n_layer"]):
        sd[f"transformer.h.{layer}.attn.bias"] = torch.ones(T, T).tril().view(1, 1, T, T)
    prefix = "_orig_mod." if compiled else ""
    model_args = dict(SHAPE, bias=bias, dropout=0.0)
    ckpt = dict(
        model={prefix + k: v for k, v in sd.items()},
        model_args=model_args,
        iter_num=2000,
        best_val_loss=torch.tensor(3.25),
        config=dict(model_args, learning_rate=6e-4, dataset="openwebtext"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out_dir / "ckpt.pt")
    return {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}


BUILD_NANOGPT_SAVER = """
import sys
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:  # build-nanogpt's train_gpt2.py, run as a script: pickled as __main__.GPTConfig
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

sd = torch.load(sys.argv[1])
for step in (50, 100):
    checkpoint = {"model": sd, "config": GPTConfig(**SHAPE), "step": step, "val_loss": 3.5}
    torch.save(checkpoint, f"{sys.argv[2]}/model_{step:05d}.pt")
"""


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_checkpoints_compute_what_nanogpt_computes(tmp_path, bias, compiled):
    sd = write_nanogpt_checkpoint(tmp_path / "out", bias, compiled)
    idx = torch.randint(0, 50257, (2, 40))
    expected = reference_logits(sd, idx, gelu="none")  # nanoGPT's MLP: nn.GELU(), the exact one
    for spec in (tmp_path / "out", tmp_path / "out" / "ckpt.pt"):
        model = load_model(str(spec))
        assert model.config.bias == bias and model.config.gelu == "exact"
        with torch.no_grad():
            assert (model(idx)[0] - expected).abs().max().item() <= 1e-4


def test_build_nanogpt_checkpoints_load_without_running_its_code(tmp_path):
    sd = random_state_dict(bias=True, seed=1)
    torch.save(sd, tmp_path / "weights.pt")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    shape = {k: SHAPE[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    script = tmp_path / "save_like_build_nanogpt.py"
    script.write_text(BUILD_NANOGPT_SAVER.replace("SHAPE", repr(shape)))
    subprocess.run([sys.executable, script, tmp_path / "weights.pt", log_dir], check=True)
    model = load_model(str(log_dir))  # the newest: model_00100.pt
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (model(idx)[0] - reference_logits(sd, idx, gelu="tanh")).abs().max().item() <= 1e-4
    assert model.config.gelu == "tanh" and model.config.bias
    assert load_model(str(log_dir / "model_00050.pt")).config.n_layer == 2


def test_sample_and_hellaswag_run_on_nanogpt_and_build_nanogpt_checkpoints(tmp_path):
    from hellaswag import synthetic_examples

    write_nanogpt_checkpoint(tmp_path / "nanogpt", bias=False, compiled=True)
    torch.save(random_state_dict(bias=True), tmp_path / "weights.pt")
    (tmp_path / "build").mkdir()
    script = tmp_path / "saver.py"
    shape = {k: SHAPE[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    script.write_text(BUILD_NANOGPT_SAVER.replace("SHAPE", repr(shape)))
    subprocess.run([sys.executable, script, tmp_path / "weights.pt", tmp_path / "build"], check=True)
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(6)))
    for model_dir in (tmp_path / "nanogpt", tmp_path / "build"):
        ok(cli("sample.py", "--model", model_dir, "--num-samples", 1, "--max-new-tokens", 8, "--device", "cpu"))
        out = tmp_path / "r.json"
        ok(cli("hellaswag.py", "--model", model_dir, "--data-file", data, "--device", "cpu", "--out", out))
        assert json.loads(out.read_text())["examples"] == 6


def test_a_checkpoint_of_another_program_is_a_one_line_error(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a model checkpoint: it has no 'model' weights"):
        load_model(str(tmp_path / "other.pt"))
    torch.save({"model": {"w": torch.ones(3)}, "step": 3}, tmp_path / "shapeless.pt")
    with pytest.raises(UserError, match="not a checkpoint of this repo, nanoGPT or build-nanogpt"):
        load_model(str(tmp_path / "shapeless.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model(str(tmp_path / "empty"))


def test_an_out_dir_means_its_newest_checkpoint_even_beside_a_config_json(tiny_checkpoint, tmp_path):
    tiny_checkpoint(seed=5)
    newest = tiny_checkpoint(seed=7)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))  # an export put there
    model = load_model(str(tmp_path))
    assert model.config.n_layer == 2
    assert torch.equal(model.transformer.wte.weight, load_model(str(newest)).transformer.wte.weight)
