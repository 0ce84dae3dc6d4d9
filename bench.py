"""
Benchmarks that compare variants side by side in one run and print the ratios.

    python bench.py tokenize            # download-fineweb-edu.py vs the common nanoGPT-style tokenizing loop
"""

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

from utils import EOT, get_tokenizer, python_docs_corpus, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_script(name):
    """Import one of the repo's hyphenated scripts as a module."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), os.path.join(ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes find its functions by module name
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# tokenizing

def write_corpus(path, min_tokens, seed=0):
    """A jsonl corpus of at least min_tokens GPT-2 tokens: Python's own docs, paragraphs reshuffled in each copy."""
    docs = python_docs_corpus()
    tokens_per_copy = sum(len(t) for t in get_tokenizer().encode_ordinary_batch(docs))
    rng = random.Random(seed)
    with open(path, "w") as f:
        for copy in range(-(-min_tokens // tokens_per_copy)):
            for doc in docs:
                paragraphs = doc.split("\n\n")
                rng.shuffle(paragraphs)
                f.write(json.dumps(dict(id=copy, text="\n\n".join(paragraphs))) + "\n")


def _baseline_tokenize(doc):
    tokens = [EOT]
    tokens.extend(get_tokenizer().encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all()
    return tokens_np.astype(np.uint16)


def baseline_tokenize(data_file, out_dir, shard_size):
    """The common loop (build-nanogpt's fineweb.py): per-document imap over half the cores, fixed-size shards."""
    import datasets

    fw = datasets.load_dataset("json", data_files=data_file, split="train", streaming=True)
    nprocs = max(1, os.cpu_count() // 2)
    with mp.Pool(nprocs) as pool:
        shard_index = 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
        token_count = 0
        for tokens in pool.imap(_baseline_tokenize, fw, chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count : token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                remainder = shard_size - token_count
                all_tokens_np[token_count : token_count + remainder] = tokens[:remainder]
                np.save(os.path.join(out_dir, f"baseline_{split}_{shard_index:06d}"), all_tokens_np)
                shard_index += 1
                all_tokens_np[0 : len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            np.save(os.path.join(out_dir, f"baseline_{split}_{shard_index:06d}"), all_tokens_np[:token_count])


def bench_tokenize(args):
    downloader = load_script("download-fineweb-edu")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        write_corpus(corpus, args.tokens)
        print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB of jsonl, {os.cpu_count()} cores")
        times = {"baseline": [], "ours": []}
        for _ in range(args.repeats):
            for name in times:
                out = os.path.join(tmp, name)
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                t0 = time.perf_counter()
                if name == "baseline":
                    baseline_tokenize(corpus, out, args.shard_size)
                else:
                    downloader.main(["--data-files", corpus, "--out-dir", out, "--shard-size", str(args.shard_size)])
                times[name].append(time.perf_counter() - t0)
        n_tokens = sum(len(np.load(os.path.join(tmp, "ours", f), mmap_mode="r")) for f in os.listdir(os.path.join(tmp, "ours")) if f.endswith(".npy"))
    best = {name: min(t) for name, t in times.items()}
    print(f"{'':>10} {'seconds':>8} {'Mtok/s':>7}")
    for name, t in best.items():
        print(f"{name:>10} {t:8.2f} {n_tokens / t / 1e6:7.2f}")
    print(f"tokenize speedup: {best['baseline'] / best['ours']:.2f}x over the nanoGPT-style loop ({n_tokens:,} tokens, best of {args.repeats})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("tokenize", help="download-fineweb-edu.py against the nanoGPT-style loop on a local corpus")
    t.add_argument("--tokens", type=lambda s: int(float(s)), default=10_000_000, help="corpus size in tokens (at least)")
    t.add_argument("--shard-size", type=lambda s: int(float(s)), default=2_000_000)
    t.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    {"tokenize": bench_tokenize}[args.bench](args)


if __name__ == "__main__":
    run_cli(main)
