"""
Sample text from a GPT-2: one of our checkpoints, a Hugging Face name or a local transformers directory.

    python sample.py --model gpt2 --prompt "Hello, I'm a language model," --num-samples 3
    python sample.py --model log/ --top-k 1 --max-new-tokens 100        # greedy decoding from our newest checkpoint
    python sample.py --model gpt2 --no-compile                          # eager, when compiling is not worth it

Text is streamed to the console as it is generated. Sample i is drawn with its own generator seeded from
(--seed, i), so a sample does not depend on how many others are drawn and the same seed gives the same samples.
Each new token is one step of the model over one position, reading the others from a KV cache of fixed shape; on a
GPU that step is compiled into a CUDA graph (--compile), so a token costs one graph launch, not hundreds of kernels.
"""

import sys
from dataclasses import dataclass

import torch

from checkpoint import check_output_path, write_json
from utils import (
    EOT,
    UserError,
    check_flags,
    config_parser,
    get_tokenizer,
    is_cuda,
    pick_device,
    run_cli,
)
from weights import load_model


@dataclass
class Config:
    model: str = "gpt2"  # our checkpoint (.pt), an out dir (its newest one), a transformers dir, or gpt2 ... gpt2-xl
    prompt: str = "Hello, I'm a language model,"  # the text to continue
    num_samples: int = 4  # how many continuations
    max_new_tokens: int = 64  # tokens per continuation
    temperature: float = 1.0  # below 1 sharper, above 1 flatter; 0 is greedy
    top_k: int = 50  # sample among the k most likely tokens (0: all); 1 is greedy
    top_p: float = 1.0  # sample among the most likely tokens whose probabilities add up to p (1: all)
    seed: int = 42  # same seed, same samples
    device: str = "auto"  # cuda, cpu, mps or auto
    out: str = ""  # write the samples as a JSON list here
    stop_at_eot: bool = False  # end a sample at <|endoftext|>
    compile: bool = None  # torch.compile the one-token step, as CUDA graphs on a GPU (default: on for CUDA only)


class StreamPrinter:
    """Prints the text of a growing token list, holding back a character until its UTF-8 bytes are complete."""

    def __init__(self, enc, out=sys.stdout):
        self.enc, self.out, self.printed = enc, out, ""

    def update(self, tokens):
        text = self.enc.decode(tokens)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text


def generate_samples(model, enc, args, device, stream=None):
    """A list of {prompt, text, tokens} dicts, one per sample."""
    prompt_tokens = enc.encode(args.prompt, allowed_special="all")
    if not prompt_tokens:
        raise UserError("--prompt is empty: give at least one character of text")
    if len(prompt_tokens) > model.config.block_size:
        print(
            f"warning: the prompt has {len(prompt_tokens)} tokens, more than the model's context of "
            f"{model.config.block_size}: only its last {model.config.block_size} are read",
            file=sys.stderr,
        )
        prompt_tokens = prompt_tokens[-model.config.block_size :]
    idx = torch.tensor([prompt_tokens], dtype=torch.long, device=device)  # (1, T)
    compile_step = args.compile if args.compile is not None else is_cuda(device)
    samples = []
    for i in range(args.num_samples):
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + i)
        printer = StreamPrinter(enc, stream) if stream else None
        if stream:
            stream.write(f"\n--- sample {i} ---\n{args.prompt}")
        tokens = []
        for new in model.generate_stream(
            idx,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            generator=generator,
            compile=compile_step,
        ):
            token = int(new[0, 0])
            if args.stop_at_eot and token == EOT:
                break
            tokens.append(token)
            if printer:
                printer.update(tokens)
        if stream:
            stream.write("\n")
        samples.append(dict(prompt=args.prompt, text=enc.decode(tokens), tokens=tokens))
    return samples


def texts(model, prompt, num_samples, max_new_tokens, device):
    """A training run's progress samples (top-k 50), drawn exactly as this script draws them."""
    args = Config(prompt=prompt, num_samples=num_samples, max_new_tokens=max_new_tokens, top_k=50, compile=False)
    return [s["text"] for s in generate_samples(model, get_tokenizer(), args, device)]


def main(argv=None):
    args = Config(**vars(config_parser(Config, __doc__).parse_args(argv)))
    check_flags(args, "at least 1", lambda v: v >= 1, "num_samples", "max_new_tokens")
    # below 0.001 the scaled logits overflow; 0 is greedy
    check_flags(args, "0 (greedy) or from 0.001 to 100", lambda v: v == 0 or 1e-3 <= v <= 100, "temperature")
    check_flags(args, "0 or more", lambda v: v >= 0, "top_k")
    check_flags(args, "in (0, 1]", lambda v: 0 < v <= 1, "top_p")
    check_flags(args, "below 2**40 in size", lambda v: abs(v) < 2**40, "seed")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError("--prompt is not valid UTF-8 text") from e
    if args.out:
        check_output_path(args.out, "--out")
    device = pick_device(args.device)
    model = load_model(args.model, device)
    samples = generate_samples(model, get_tokenizer(), args, device, stream=sys.stdout)
    if args.out:
        write_json(args.out, samples)


if __name__ == "__main__":
    run_cli(main)
