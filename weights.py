"""
Weights in and out. In: a GPT from a checkpoint of this repo, of nanoGPT or of build-nanogpt, from a directory written
by transformers' save_pretrained, or from the Hugging Face hub (gpt2 ... gpt2-xl), for sample.py, hellaswag.py and
train.py --init-from. Out: a model as a transformers directory (train.py --export) that GPT2LMHeadModel and
lm-eval-harness load.

lm-eval-harness on an export: pip install "lm-eval[hf]" (plain lm-eval no longer brings transformers), then lm_eval
--model hf --model_args pretrained=DIR --tasks hellaswag; offline it needs HellaSwag in its own cache. Other programs'
checkpoints are read without running any of their code: nanoGPT's ckpt.pt (model_args; exact GELU,
perhaps no biases; a compiled model's keys carry an _orig_mod. prefix) and build-nanogpt's model_NNNNN.pt (its config
pickled as __main__.GPTConfig, a GPT-2 shape with tanh GELU).
"""

import json
import os
import re
import shutil
from dataclasses import asdict

import torch

from checkpoint import check_out_dir, check_shapes, describe_write_error, list_checkpoints, load_checkpoint, write_json
from http_files import check_hub_reachable
from model import CONV1D_WEIGHTS, GPT, GPT2_VOCAB_SIZE, MODEL_SIZES, GPTConfig
from utils import UserError, first_line, gpt2_bpe_files

SHAPE_FLAGS = ("n_layer", "n_head", "n_embd")  # train.py flags that the weights of --init-from decide


class ForeignConfig:
    """Stands in for build-nanogpt's GPTConfig dataclass, which its checkpoints pickle as __main__.GPTConfig: while
    unpickling, its fields land here and none of that script's code runs."""


def load_model(spec, device="cpu"):
    """A GPT in eval mode from: a checkpoint file of ours, nanoGPT's or build-nanogpt's (.pt), a directory holding
    them (the newest), a directory written by transformers' save_pretrained, or a Hugging Face name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl)."""
    if os.path.isdir(spec) and (list_checkpoints(spec) or not os.path.exists(os.path.join(spec, "config.json"))):
        spec = newest_checkpoint_in(spec)  # an out dir means its newest checkpoint, even beside an export
    if spec.endswith(".pt"):
        checkpoint = load_checkpoint(spec, foreign=[(ForeignConfig, "__main__.GPTConfig")])
        model = model_from_checkpoint(checkpoint, spec)
    elif os.path.isdir(spec) or spec in MODEL_SIZES:
        if not os.path.isdir(spec) and not hub_offline():  # no network: one line at once, not the hub client's retries
            try:
                check_hub_reachable()
            except ConnectionError as e:
                raise UserError(f"cannot fetch {spec!r} from the Hugging Face hub: {first_line(e)}; with no network, "
                                "pass a local directory written by transformers' save_pretrained") from e  # fmt: skip
        try:
            model = GPT.from_pretrained(spec)
        except (RuntimeError, ValueError, OSError) as e:  # said in words by from_pretrained
            raise UserError(str(e)) from e
        except Exception as e:  # a damaged config.json or weights file fails in many ways
            raise UserError(f"cannot load {spec}: {type(e).__name__}: {first_line(e)[:300]}") from e
    else:
        raise UserError(
            f"no model {spec!r}: give a checkpoint .pt, an out dir, a transformers directory "
            f"or one of {', '.join(MODEL_SIZES)}"
        )
    return model.to(device).eval()


def hub_offline():
    """HF_HUB_OFFLINE: the hub client reads only its cache (it read the variable when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE"))


def newest_checkpoint_in(directory):
    """The checkpoint a directory holds: ours (ckpt_NNNNNN.pt, the newest), nanoGPT's ckpt.pt, or build-nanogpt's
    model_NNNNN.pt (the newest)."""
    ours = list_checkpoints(directory)
    if ours:
        return ours[-1]
    if os.path.isfile(os.path.join(directory, "ckpt.pt")):
        return os.path.join(directory, "ckpt.pt")
    build_nanogpt = sorted((int(m[1]), m[0]) for n in os.listdir(directory) if (m := re.match(r"^model_(\d+)\.pt$", n)))
    if build_nanogpt:
        return os.path.join(directory, build_nanogpt[-1][1])
    raise UserError(
        f"{directory} holds no checkpoint (ckpt_NNNNNN.pt, nanoGPT's ckpt.pt, build-nanogpt's model_NNNNN.pt) "
        "and no config.json"
    )


def model_from_checkpoint(checkpoint, path):
    """A GPT from one of our checkpoints, nanoGPT's or build-nanogpt's, its shape checked before it is built."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{path} is not a model checkpoint: it has no 'model' weights")
    shape_keys = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
    try:
        if "model_config" in checkpoint:  # ours
            config = GPTConfig(**checkpoint["model_config"])
        elif "model_args" in checkpoint:  # nanoGPT
            args = checkpoint["model_args"]
            config = GPTConfig(**{k: args[k] for k in shape_keys}, bias=bool(args.get("bias", True)), gelu="exact")
        elif "config" in checkpoint and hasattr(checkpoint["config"], "n_layer"):  # build-nanogpt
            config = GPTConfig(**{k: vars(checkpoint["config"])[k] for k in shape_keys})
        else:
            raise UserError(f"{path}: not a checkpoint of this repo, nanoGPT or build-nanogpt (no model shape in it)")
    except (TypeError, KeyError) as e:  # a key this GPT does not know, or one missing
        raise UserError(f"{path}: its model shape cannot be read ({type(e).__name__}: {first_line(e)[:200]})") from e
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    # nanoGPT without flash attention keeps its causal mask as a buffer: not a weight
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias") or v.dim() != 4}
    check_shapes(asdict(config), state, path)
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit the model shape it names ({first_line(e)[:200]})") from e
    return model


def pretrained_for_run(config):
    """The weights of --init-from for train.py, in training mode. A shape flag given that contradicts them, or a
    --seq-len longer than their context, is refused."""
    model = load_model(config.init_from).train()
    for k in SHAPE_FLAGS:
        if getattr(config, k) not in (None, getattr(model.config, k)):
            flag = f"--{k.replace('_', '-')}"
            raise UserError(f"{flag} {getattr(config, k)} contradicts --init-from {config.init_from}, "
                            f"whose weights have {flag} {getattr(model.config, k)}: leave {flag} out")  # fmt: skip
    if config.seq_len > model.config.block_size:
        raise UserError(
            f"--seq-len {config.seq_len} is longer than the context of --init-from {config.init_from} "
            f"({model.config.block_size} tokens)"
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# out: a transformers directory


def check_export(config, model_config):
    """--export, checked before the first step rather than after hours of training, and again before it is written:
    not the out dir, where its config.json would stand for the newest checkpoint, and what export_model needs."""
    if not config.export:
        return
    if os.path.abspath(config.export) == os.path.abspath(config.out_dir):
        raise UserError(f"--export {config.export} is the out dir: an out dir stands for its newest checkpoint; export "
                        f"beside it, to {os.path.join(config.out_dir, 'hf')} say")  # fmt: skip
    check_exportable(model_config, config.export)


def check_exportable(model_config, export_dir):
    """What an export needs, checked before anything is written: a model with biases, and a directory that is new or
    holds an earlier export only (an export replaces its directory whole, and nothing else may go with it)."""
    if not model_config.bias:
        raise UserError("this model has no biases and transformers' GPT-2 always has them: it cannot be exported; "
                        "leave --export out")  # fmt: skip
    others = sorted(set(os.listdir(export_dir)) - EXPORT_FILES) if os.path.isdir(export_dir) else []
    if others:
        raise UserError(f"--export {export_dir} holds other files than an export ({', '.join(others[:3])}): "
                        "choose a new directory")  # fmt: skip
    check_out_dir(export_dir, "--export")


EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"}


def export_model(model, out_dir, what="the model"):
    """config.json and model.safetensors as transformers' GPT2LMHeadModel.from_pretrained reads them (the rows of the
    padded vocabulary dropped, the head tied to the token embedding), and GPT-2's tokenizer files: a self-contained
    directory that lm-eval-harness can load. Written beside out_dir and renamed into place: never half an export."""
    from safetensors.torch import save_file

    c = model.config
    check_exportable(c, out_dir)
    vocab_size = min(c.vocab_size, GPT2_VOCAB_SIZE)
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab_size,
                     n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                     n_head=c.n_head, n_inner=None, activation_function="gelu_new" if c.gelu == "tanh" else "gelu",
                     layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     initializer_range=0.02, tie_word_embeddings=True)  # fmt: skip
    if vocab_size == GPT2_VOCAB_SIZE:
        hf_config.update(bos_token_id=GPT2_VOCAB_SIZE - 1, eos_token_id=GPT2_VOCAB_SIZE - 1)  # <|endoftext|>
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte: transformers re-ties it on load
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        if name.endswith(CONV1D_WEIGHTS):  # Hugging Face's Conv1D stores (in, out)
            tensor = tensor.t()
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    out_dir = os.path.normpath(out_dir)
    new, old = f"{out_dir}.{os.getpid()}.tmp", f"{out_dir}.{os.getpid()}.old"
    try:
        os.makedirs(new)
        with open(os.path.join(new, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        save_file(tensors, os.path.join(new, "model.safetensors"), metadata={"format": "pt"})
        save_hf_tokenizer(new, c.block_size)
        if os.path.isdir(out_dir):  # an earlier export: replaced whole, or kept if this one cannot take its place
            os.rename(out_dir, old)
        try:
            os.rename(new, out_dir)
        except OSError:
            if os.path.isdir(old):
                os.rename(old, out_dir)
            raise
    except OSError as e:
        why = describe_write_error(e, os.path.dirname(new) or ".", sum(t.numel() * 4 for t in tensors.values()))
        raise UserError(f"cannot write the export {out_dir}: {why}; nothing of it is left (the checkpoints are "
                        "intact: export again with --resume --export)") from e  # fmt: skip
    finally:
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
    print(f"exported {what} to {out_dir} (transformers GPT2LMHeadModel format)")


def save_hf_tokenizer(out_dir, context):
    """GPT-2's tokenizer files under transformers' names (vocab.json, merges.txt) in a model directory."""
    files = gpt2_bpe_files()
    if files is None:
        return
    shutil.copyfile(files["encoder.json"], os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(files["vocab.bpe"], os.path.join(out_dir, "merges.txt"))
    special = "<|endoftext|>"
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=context, **dict.fromkeys(
        ("bos_token", "eos_token", "unk_token"), special))  # fmt: skip
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
