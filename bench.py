"""
Benchmarks that compare variants side by side in one run and print the ratios.

    python bench.py gpu --profile --out report.json   # the GPU path end to end, and where the step's time goes
    python bench.py gpu --device cpu --quick          # the same checks with small shapes, on a CPU
    python bench.py tokenize            # download-fineweb-edu.py vs the common nanoGPT-style tokenizing loop
    python bench.py download            # download-fineweb-edu.py over a model of the hub on a WAN vs local files
    python bench.py hellaswag           # hellaswag.py vs a plain one-example-per-forward scorer, small model on CPU
    python bench.py sample              # sample.py's compiled one-token step vs uncompiled, the KV cache vs none

What the GPU runs found so far, besides the README's table (one H200, torch 2.11.0 + CUDA 13.0, 2026-11-28): three
variants of the compiled micro-batch-64 reference step side by side gave 525,437 tokens/s untuned, 530,880 with
inductor's coordinate-descent tuning (1% more, for a 150 s compile) and 523,698 with cuDNN attention forced (SDPA picks
it there already); max-autotune found cuBLAS fastest for every matmul it tried. At batch 1, uncompiled sampling was
bound by kernel launches, not arithmetic: the KV cache did not speed up GPT-2 124M on the H100 and H200 (it pays with
long contexts and larger models, and on CPUs: 2.2x for --quick's 2-layer model on a 2-core CPU).
"""

import argparse
import contextlib
import datetime
import glob
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hellaswag
import sample
import train
from checkpoint import check_output_path, read_log, write_json
from misc.pydocs import write_corpus, write_parquet_corpus, write_pydocs_shards
from model import GPT, MODEL_SIZES, GPTConfig
from utils import (
    EOT,
    ROOT,
    ShardedDataLoader,
    UserError,
    check_flags,
    device_name,
    first_line,
    get_tokenizer,
    is_cuda,
    load_script,
    parse_count,
    pick_device,
    run_cli,
)
from weights import load_model

downloader = load_script("download-fineweb-edu")


@torch.no_grad()
def baseline_hellaswag(model, path, device):
    """The plain scorer (build-nanogpt's hellaswag.py): one example, 4 rows, full logits per forward pass;
    completion convention only. Returns acc_norm."""
    enc = get_tokenizer()
    correct = total = 0
    with open(path) as f:
        examples = [json.loads(line) for line in f]
    for example in examples:
        ctx_tokens = enc.encode(example["ctx"])
        tok_rows, mask_rows = [], []
        for end in example["endings"]:
            end_tokens = enc.encode(" " + end)
            tok_rows.append(ctx_tokens + end_tokens)
            mask_rows.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
        max_len = max(len(row) for row in tok_rows)
        tokens = torch.zeros((4, max_len), dtype=torch.long)
        mask = torch.zeros((4, max_len), dtype=torch.long)
        for i, (tok_row, mask_row) in enumerate(zip(tok_rows, mask_rows)):
            tokens[i, : len(tok_row)] = torch.tensor(tok_row)
            mask[i, : len(mask_row)] = torch.tensor(mask_row)
        tokens, mask = tokens.to(device), mask.to(device)
        logits, _ = model(tokens)
        shift_logits = logits[..., :-1, :].contiguous()
        shift_tokens = tokens[..., 1:].contiguous()
        losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1), reduction="none")
        losses = losses.view(tokens.size(0), -1)
        shift_mask = mask[..., 1:].contiguous()
        avg_loss = (losses * shift_mask).sum(dim=1) / shift_mask.sum(dim=1)
        correct += int(avg_loss.argmin().item() == example["label"])
        total += 1
    return correct / total


def bench_hellaswag(args):
    device = pick_device(args.device)
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hellaswag.jsonl")
        with open(path, "w") as f:
            for example in hellaswag.synthetic_examples(args.examples):
                f.write(json.dumps(example) + "\n")
        get_tokenizer()  # built once, outside the timings
        times = {"plain scorer": [], "hellaswag.py": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain_acc_norm = baseline_hellaswag(model, path, device)
            times["plain scorer"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            results = hellaswag.evaluate(model, hellaswag.load_examples(path), device, args.batch_size)
            times["hellaswag.py"].append(time.perf_counter() - t0)
    if not is_cuda(device):  # in bf16 a near-tie may break the other way
        assert results["acc_norm"] == plain_acc_norm, (results["acc_norm"], plain_acc_norm)
    best = {name: min(t) for name, t in times.items()}
    print(f"model: {config}, {model.num_params() / 1e6:.1f}M params; {args.examples} examples on {device_name(device)}")
    print(f"{'':>14} {'seconds':>8} {'examples/s':>11}  conventions")
    for name, conventions in (("plain scorer", "completion"), ("hellaswag.py", "completion + harness")):
        print(f"{name:>14} {best[name]:8.2f} {args.examples / best[name]:11.1f}  {conventions}")
    print(f"hellaswag speedup: {best['plain scorer'] / best['hellaswag.py']:.2f}x over the plain scorer "
          f"(acc_norm {results['acc_norm']:.4f}, plain scorer {plain_acc_norm:.4f})")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# tokenizing


def _baseline_tokenize(doc):
    tokens = [EOT]
    tokens.extend(get_tokenizer().encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all()
    return tokens_np.astype(np.uint16)


def baseline_tokenize(data_file, out_dir, shard_size):
    """The common loop (build-nanogpt's fineweb.py): per-document imap over half the cores, fixed-size shards."""
    import datasets  # only here: a GPU machine may run bench.py gpu without it

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
        ours = glob.glob(os.path.join(tmp, "ours", "*.npy"))
        n_tokens = sum(len(np.load(path, mmap_mode="r")) for path in ours)
    best = {name: min(t) for name, t in times.items()}
    print(f"{'':>10} {'seconds':>8} {'Mtok/s':>7}")
    for name, t in best.items():
        print(f"{name:>10} {t:8.2f} {n_tokens / t / 1e6:7.2f}")
    print(f"tokenize speedup: {best['baseline'] / best['ours']:.2f}x over the nanoGPT-style loop "
          f"({n_tokens:,} tokens, best of {args.repeats})")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# downloading


def run_downloader(*args):
    """One run in its own process, as a user starts it: (tokens/s it reports, seconds)."""
    cmd = [sys.executable, os.path.join(ROOT, "download-fineweb-edu.py"), *map(str, args)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the downloader failed: {first_line(r.stderr.strip().splitlines()[-1])}")
    return float(r.stdout.split(" s, ")[-1].split(" tokens/s")[0].replace(",", "")), time.perf_counter() - t0


def bench_download(args):
    import pyarrow.parquet as pq  # only here: a GPU machine may run bench.py gpu without it

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from loopback_http import LoopbackServer  # the model of the hub the tests use

    sha, rtt = "0" * 40, args.rtt_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "hub", "bench", "edu", "data")
        os.makedirs(folder)
        names = write_parquet_corpus(folder, args.tokens)
        server = LoopbackServer(tmp)
        server.add_dataset("bench/edu", sha, [])
        sources = {"local": [os.path.join(folder, n) for n in names],
                   "wan": [f"{server.url}/datasets/bench/edu/resolve/{sha}/data/{n}" for n in names]}  # fmt: skip
        rates, counts = {"local": [], "wan": []}, {}
        for attempt in range(args.repeats):
            for name, files in sources.items():
                server.reset()
                if name == "wan":
                    server.wan(rtt, 3 * rtt, args.connection_mb_s * 1e6, args.link_mb_s * 1e6)
                out = os.path.join(tmp, f"{name}{attempt}")
                rates[name].append(run_downloader("--data-files", *files, "--out-dir", out, "--shard-size", 10**7,
                                                  "--connections", args.connections)[0])  # fmt: skip
                counts[name] = (len(server.requests), sum(server.connections.values()), sum(server.sent.values()))
        with open(os.path.join(tmp, "wan0", "manifest.json")) as f:
            tokens = json.load(f)["tokens"]
        row_groups = sum(pq.ParquetFile(os.path.join(folder, n)).num_row_groups for n in names)
        server.close()
    local, wan = max(rates["local"]), max(rates["wan"])
    requests, connections, sent = counts["wan"]
    link = args.link_mb_s * 1e6 / (sent / tokens)  # tokens/s the link can carry, at the bytes fetched per token
    limit = min(local, link)
    print(f"corpus: {len(names)} parquet files, {row_groups} row groups, {tokens:,} tokens; {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"WAN model: {args.rtt_ms:g} ms round trip (3 more for a new connection), {args.connection_mb_s:g} MB/s "
          f"per connection, {args.link_mb_s:g} MB/s link; --connections {args.connections}")  # fmt: skip
    print(f"{'':>6} {'Mtok/s':>7}\n{'local':>6} {local / 1e6:7.2f}\n{'WAN':>6} {wan / 1e6:7.2f}")
    print(f"per row group over the WAN: {requests / row_groups:.2f} requests, {connections / row_groups:.3f} new "
          f"connections; {sent / tokens:.2f} bytes per token, so the link carries {link / 1e6:.1f} Mtok/s")  # fmt: skip
    print(f"download ratio: {wan / limit:.2f} of min(link, tokenizer) = {limit / 1e6:.2f} Mtok/s "
          f"(WAN {wan / local:.2f}x local, best of {args.repeats}; target 0.80)")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the GPU path, end to end: one prepared run that writes report.json

TARGET_TOKENS_PER_SEC = 600_000  # GPT-2 124M on one H100: about 52% MFU
PARITY_TOLERANCE = 0.05  # nats: the first 20 train losses in bf16 on the device against fp32 on the CPU
RESUME_TOLERANCE = 1e-3  # nats: resumed losses against the uninterrupted run's (CUDA kernels with atomics vary)
MEMORY_LIMIT_GIB = 76  # reserved by PyTorch: what an 80 GB card (79.6 GiB) leaves a process, with room to spare


def compile_backend(device, quick):
    """torch.compile's backend for the timed train steps and sampling's one-token step: inductor, as train.py and
    sample.py compile; for --quick on a CPU, aot_eager, which captures the same graphs (forward and backward) without
    a minute of C++ compilation: there --quick checks the report's wiring, and the figures come from a GPU."""
    return "aot_eager" if quick and not is_cuda(device) else "inductor"


def measure_train_steps(device, shape, seq_len, micro_batch, grad_accum_steps, compile_model, data_dir, steps, warmup,
                        profile_steps=0, backend="inductor"):  # fmt: skip
    """train.py's step (loader, bf16 autocast, accumulation, clipping, fused AdamW) on a fresh model: the time of each
    step, the losses, peak memory, and with profile_steps that many more steps under torch.profiler (the operators and
    kernels that took the most time). The first step includes compilation."""
    torch.manual_seed(0)
    if compile_model:
        torch._dynamo.reset()  # compile afresh for this shape, as a new run would
    with torch.device(device):  # built on the device: large models initialise in seconds, not minutes
        model = GPT(GPTConfig(block_size=seq_len, **shape))
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])
    run_model = torch.compile(model, backend=backend) if compile_model else model
    loader = ShardedDataLoader(data_dir, "train", micro_batch, seq_len)
    cuda = is_cuda(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []

    def step():
        t0 = time.perf_counter()
        loss, norm = train.train_step(run_model, optimizer, loader, grad_accum_steps, device, 6e-4, 1.0)
        losses.append(loss.item())  # the step's one sync, as in train.py
        times.append(time.perf_counter() - t0)

    for _ in range(warmup + steps):
        step()
    peak = dict(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30) if cuda else {}  # fmt: skip
    top = None
    if profile_steps:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(profile_steps):
                step()
        top = top_operators(prof, cuda, profile_steps)
        del times[-profile_steps:], losses[-profile_steps:]  # the profiler slows them: not timed
    model = optimizer = run_model = None  # their memory back before the next variant
    if cuda:
        torch.cuda.empty_cache()
    return times, losses, peak, top


def top_operators(prof, cuda, steps, n=25):
    """The operators and kernels with the most self time (on the GPU where there is one), per step, and their share
    of all the self time measured."""
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    top = [dict(name=e.key, calls=e.count // steps, self_ms_per_step=getattr(e, key) / 1000 / steps,
                share=getattr(e, key) / total) for e in events[:n] if getattr(e, key) > 0]  # fmt: skip
    return dict(sort_by=key, steps=steps, total_ms_per_step=total / 1000 / steps, top=top)


def check_reference_step(device, quick, data_dir, profile_steps=0):
    """GPT-2 124M, T=1024, bf16, compiled, micro-batch 64 and 32, against the same step uncompiled; with
    profile_steps, where the first variant's time goes."""
    shape, seq_len = (dict(n_layer=2, n_head=2, n_embd=64), 32) if quick else (MODEL_SIZES["gpt2"], 1024)
    micro_batches = (4, 2) if quick else (64, 32)
    total_batch = micro_batches[0] * seq_len * 4  # 4 micro-steps at the larger micro-batch
    steps, warmup = (2, 1) if quick else (5, 3)
    flops_model = GPT(GPTConfig(block_size=seq_len, **shape))
    variants, profiled = [], None
    for micro_batch, compile_model in [(micro_batches[0], True), (micro_batches[0], False), (micro_batches[1], True)]:
        grad_accum_steps = total_batch // (micro_batch * seq_len)
        times, losses, memory, top = measure_train_steps(
            device, shape, seq_len, micro_batch, grad_accum_steps, compile_model, data_dir, steps, warmup,
            profile_steps if not variants else 0, compile_backend(device, quick),
        )  # fmt: skip
        profiled = profiled or top
        step_s = float(np.median(times[warmup:]))
        tokens_per_sec = total_batch / step_s
        variants.append(
            dict(
                micro_batch=micro_batch,
                compiled=compile_model,
                step_ms=1000 * step_s,
                tokens_per_sec=tokens_per_sec,
                mfu=train.mfu(flops_model, seq_len, tokens_per_sec, device),
                first_step_s=times[0],
                compile_s=times[0] - step_s if compile_model else None,
                first_loss=losses[0],
                losses_finite=all(math.isfinite(x) for x in losses),
                **memory,
            )
        )
    best, eager = variants[0], variants[1]
    return dict(ok=all(v["losses_finite"] for v in variants) and abs(best["first_loss"] - eager["first_loss"]) < 0.01,
                tokens_per_sec=best["tokens_per_sec"], mfu=best["mfu"], target_tokens_per_sec=TARGET_TOKENS_PER_SEC,
                compile_speedup=best["tokens_per_sec"] / eager["tokens_per_sec"],
                meets_target=best["tokens_per_sec"] >= TARGET_TOKENS_PER_SEC,
                total_batch=total_batch, seq_len=seq_len, compile_backend=compile_backend(device, quick),
                variants=variants, **(dict(profile=profiled) if profiled else {}))  # fmt: skip


def run_train(argv, log_path, threads):
    """train.py's main in this process on this many math threads, its output into log_path."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train.main(argv)
    finally:
        torch.set_num_threads(before)


def train_losses(out_dir):
    return {r["step"]: r["train_loss"] for r in read_log(os.path.join(out_dir, "log.jsonl")) if "train_loss" in r}


def check_parity_and_resume(device, quick, data_dir, tmp):
    """The tiny preset through train.py on the device (compiled there, bf16 on CUDA) against fp32 on the CPU; then the
    same run killed with SIGKILL after a checkpoint and resumed; then the in-training HellaSwag against hellaswag.py.
    --quick: 6 steps instead of 20, and on a CPU one math thread, with which a CPU resume is bit for bit."""
    steps = 6 if quick else 20
    hellaswag_file = os.path.join(tmp, "hellaswag_small.jsonl")
    with open(hellaswag_file, "w") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in hellaswag.synthetic_examples(16 if quick else 256, seed=1))
    common = ["--preset", "tiny", "--data-dir", data_dir, "--max-steps", str(steps), "--hellaswag-interval", str(steps),
              "--checkpoint-interval", str(steps // 2), "--hellaswag-file", hellaswag_file]  # fmt: skip
    runs = {name: os.path.join(tmp, name) for name in ("device", "cpu", "killed")}
    threads = 1 if quick and not is_cuda(device) else torch.get_num_threads()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": "1"} if threads == 1 else {}))
    run_train([*common, "--device", device, "--out-dir", runs["device"]], os.path.join(tmp, "device.log"), threads)
    if is_cuda(device):
        run_train([*common, "--device", "cpu", "--out-dir", runs["cpu"]], os.path.join(tmp, "cpu.log"), threads)
    else:  # the same run: on a CPU, parity is with itself
        runs["cpu"] = runs["device"]
    on_device, on_cpu = train_losses(runs["device"]), train_losses(runs["cpu"])
    parity = max(abs(on_device[s] - on_cpu[s]) for s in on_cpu)
    checks = [dict(name="short_run_parity", max_abs_diff=parity, tolerance=PARITY_TOLERANCE,
                   ok=sorted(on_device) == sorted(on_cpu) == list(range(steps)) and parity <= PARITY_TOLERANCE,
                   device_losses=list(on_device.values()), cpu_losses=list(on_cpu.values()))]  # fmt: skip

    argv = [sys.executable, os.path.join(ROOT, "train.py"), *common, "--device", device, "--out-dir", runs["killed"]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_checkpoint = f"ckpt_{steps // 2:06d}.pt"
    with open(os.path.join(tmp, "killed.log"), "w") as log:
        for line in proc.stdout:  # killed the moment it reports its first checkpoint, as a crash would hit it
            log.write(line)
            if line.startswith("saved") and line.rstrip().endswith(first_checkpoint):
                break
    proc.kill()
    proc.wait()
    killed_at = max(train_losses(runs["killed"]), default=None)
    resume = [*common, "--device", device, "--out-dir", runs["killed"], "--resume"]
    run_train(resume, os.path.join(tmp, "killed.log"), threads)
    resumed = train_losses(runs["killed"])
    diffs = [abs(resumed[s] - on_device[s]) for s in on_device if s in resumed]
    killed_early = killed_at is not None and killed_at < steps - 1  # the resume had steps left to do
    checks.append(dict(name="kill_and_resume", killed_after_step=killed_at, max_abs_diff=max(diffs),
                       ok=sorted(resumed) == list(range(steps)) and killed_early and max(diffs) <= RESUME_TOLERANCE,
                       bitwise_equal=max(diffs) == 0.0, tolerance=RESUME_TOLERANCE))  # fmt: skip

    last = read_log(os.path.join(runs["device"], "log.jsonl"))[-1]
    in_training = {k.removeprefix("hellaswag_"): v for k, v in last.items() if k.startswith("hellaswag_")}
    model = load_model(os.path.join(runs["device"], f"ckpt_{steps:06d}.pt"), device)
    standalone = hellaswag.evaluate(model, hellaswag.load_examples(hellaswag_file), device, 32)
    checks.append(dict(name="hellaswag_in_training_equals_hellaswag_py", ok=in_training == standalone,
                       in_training=in_training, hellaswag_py=standalone))  # fmt: skip
    return checks


def check_hellaswag(device, quick, tmp):
    """A full 10,042-example HellaSwag pass of GPT-2 124M (random weights: synthetic examples need no network)."""
    n = 200 if quick else hellaswag.N_VAL_EXAMPLES
    shape = dict(n_layer=2, n_head=2, n_embd=64) if quick else MODEL_SIZES["gpt2"]
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(**shape)).eval()
    examples = hellaswag.synthetic_examples(n)
    get_tokenizer()
    t0 = time.perf_counter()
    results = hellaswag.evaluate(model, examples, device, 32)
    seconds = time.perf_counter() - t0
    ok = results["examples"] == n and all(0 <= v <= 1 for k, v in results.items() if "acc" in k)
    return dict(ok=ok, seconds=seconds, examples_per_sec=n / seconds, target_seconds=30, **results)


def sampling_speeds(model, device, new_tokens, samples=2, backend="inductor"):
    """sample.py's generation at batch 1 three ways, each after its own warm-up (which compiles): tokens/s of the
    compiled step on the KV cache, the same step uncompiled, and no cache (each token re-reads the whole context);
    and whether greedy decoding is the same compiled and uncompiled (at the timed length: no second compile)."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(sample.Config.prompt)], device=device)

    def draw(n, **kw):
        generator = torch.Generator(device).manual_seed(0)
        for new in model.generate_stream(idx, n, top_k=50, generator=generator, **kw):
            int(new[0, 0])  # each token to the host, as sample.py streams it

    def tokens_per_sec(what, **kw):
        print(f"measuring {what}: a warm-up, then {samples} x {new_tokens} tokens ...", flush=True)
        draw(new_tokens, **kw)  # warm-up at the timed length (the cache's shape): compiles, records the CUDA graph
        t0 = time.perf_counter()
        for _ in range(samples):
            draw(new_tokens, **kw)
        return samples * new_tokens / (time.perf_counter() - t0)

    speeds = dict(
        compiled_tokens_per_sec=tokens_per_sec(f"the compiled step ({backend}) on the KV cache", compile=backend),
        tokens_per_sec=tokens_per_sec("the uncompiled step on the KV cache", compile=False),
        uncached_tokens_per_sec=tokens_per_sec("no cache", use_cache=False),
    )
    greedy = [model.generate(idx, new_tokens, temperature=0, compile=c)[0].tolist() for c in (backend, False)]
    return dict(
        **speeds,
        compile_speedup=speeds["compiled_tokens_per_sec"] / speeds["tokens_per_sec"],
        cache_speedup=speeds["tokens_per_sec"] / speeds["uncached_tokens_per_sec"],
        greedy_equal=greedy[0] == greedy[1],
    )


def check_sampling(device, quick):
    """sample.py's generation with GPT-2 124M at batch 1: compiled against uncompiled, cache against no cache."""
    shape = dict(block_size=64, n_layer=2, n_head=2, n_embd=32) if quick else MODEL_SIZES["gpt2"]
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(**shape)).eval()
    backend = compile_backend(device, quick)
    speeds = sampling_speeds(model, device, 56 if quick else 256, backend=backend)
    return dict(ok=speeds["greedy_equal"], target_compiled_tokens_per_sec=1000, compile_backend=backend, **speeds)


def bench_sample(args):
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = load_model(args.model, device) if args.model else GPT(GPTConfig()).to(device).eval()
    what = args.model or "GPT-2 124M (random weights)"
    s = sampling_speeds(model, device, args.new_tokens)
    print(f"{what}, batch 1, {args.new_tokens} new tokens x 2 samples, top-k 50, on {device_name(device)}")
    print(f"{'compiled step, KV cache':>26} {s['compiled_tokens_per_sec']:10.1f} tokens/s")
    print(f"{'uncompiled, KV cache':>26} {s['tokens_per_sec']:10.1f} tokens/s")
    print(f"{'uncompiled, no cache':>26} {s['uncached_tokens_per_sec']:10.1f} tokens/s")
    print(f"compile speedup: {s['compile_speedup']:.2f}x; cache speedup: {s['cache_speedup']:.2f}x; "
          f"greedy tokens compiled = uncompiled: {s['greedy_equal']}")  # fmt: skip
    if not s["greedy_equal"]:
        raise UserError("greedy decoding differs between the compiled and the uncompiled step")


def check_larger_presets(device, quick, data_dir):
    """One optimizer step of each larger preset at its own micro-batch (uncompiled: compiled steps take less memory)."""
    results = []
    for preset in ("gpt2-350m", "gpt2-774m", "gpt2-1558m"):
        c = train.parse_config(["--preset", preset])
        shape = dict(n_layer=1 if quick else c.n_layer, n_head=c.n_head, n_embd=8 * c.n_head if quick else c.n_embd)
        micro_batch, seq_len = (1, 32) if quick else (c.micro_batch, c.seq_len)
        try:
            _, losses, memory, _ = measure_train_steps(device, shape, seq_len, micro_batch, 1, False, data_dir, 1, 0)
            fits = math.isfinite(losses[0]) and memory.get("reserved_gib", 0) <= MEMORY_LIMIT_GIB
            results.append(dict(preset=preset, micro_batch=micro_batch, ok=fits, loss=losses[0], **memory))
        except torch.OutOfMemoryError as e:
            error = f"out of memory: {first_line(e)}"
            results.append(dict(preset=preset, micro_batch=micro_batch, ok=False, error=error))
            torch.cuda.empty_cache()
    return dict(ok=all(r["ok"] for r in results), memory_limit_gib=MEMORY_LIMIT_GIB, presets=results)


def bench_gpu(args):
    device = pick_device(args.device)
    name = device_name(device)
    if not is_cuda(device) and not args.quick:
        print(f"note: no GPU here, {name}: the full-size checks take hours on a CPU; --quick checks the report's "
              "wiring with small shapes in seconds", flush=True)  # fmt: skip
    report = dict(device=name, device_arg=device, quick=args.quick, date=datetime.date.today().isoformat(),
                  torch=torch.__version__, cuda=torch.version.cuda, tokens_per_sec=None, mfu=None,
                  checks=[])  # fmt: skip
    t_start = time.time()

    def record(check):
        report["checks"].append(check)
        report["seconds"] = time.time() - t_start
        write_json(args.out, report)  # after every check: a run cut short still leaves what it measured
        figures = {k: v for k, v in check.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
        print(f"[{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {shown}", flush=True)

    def run(name, fn, *fn_args):
        t0 = time.time()
        try:
            out = fn(*fn_args)
        except Exception as e:  # one broken check must not cost the others: the report says what went wrong
            traceback.print_exc()
            out = dict(ok=False, error=f"{type(e).__name__}: {first_line(e)[:500]}")
        for check in out if isinstance(out, list) else [dict(name=name, **out)]:
            check.setdefault("seconds", time.time() - t0)
            record(check)

    with tempfile.TemporaryDirectory() as tmp:
        if args.work_dir:
            tmp = args.work_dir
            os.makedirs(tmp, exist_ok=True)
        data_dir = os.path.join(tmp, "data")
        write_pydocs_shards(data_dir, args.quick)
        run("reference_step", check_reference_step, device, args.quick, data_dir, 2 if args.profile else 0)
        ref = report["checks"][-1]
        report.update(tokens_per_sec=ref.get("tokens_per_sec"), mfu=ref.get("mfu"))
        run("parity_and_resume", check_parity_and_resume, device, args.quick, data_dir, tmp)
        run("hellaswag_full_pass", check_hellaswag, device, args.quick, tmp)
        run("sample_kv_cache", check_sampling, device, args.quick)
        run("larger_presets_fit", check_larger_presets, device, args.quick, data_dir)
    report["seconds"] = time.time() - t_start
    write_json(args.out, report)
    print(gpu_summary(report))
    if not all(c["ok"] for c in report["checks"]):
        raise UserError(f"{sum(not c['ok'] for c in report['checks'])} checks failed: see {args.out}")


def gpu_summary(report):
    lines = [f"{report['device']} ({report['date']}, torch {report['torch']}): {len(report['checks'])} checks in "
             f"{report['seconds']:.0f} s"]  # fmt: skip
    for c in report["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}" + (f": {c['error']}" if "error" in c else ""))
    ref = next((c for c in report["checks"] if c["name"] == "reference_step" and "variants" in c), None)
    if ref:
        lines.append(f"  {'micro':>5} {'compiled':>8} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'compile s':>9} "
                     f"{'peak GiB':>8}")  # fmt: skip
        for v in ref["variants"]:
            mfu = f"{100 * v['mfu']:5.1f}%" if v["mfu"] else "     -"
            compile_s = f"{v['compile_s']:9.1f}" if v["compile_s"] is not None else "        -"
            memory = v.get("peak_memory_gib", 0)
            lines.append(f"  {v['micro_batch']:>5} {str(v['compiled']):>8} {v['step_ms']:8.1f} "
                         f"{v['tokens_per_sec']:10,.0f} {mfu} {compile_s} {memory:8.1f}")  # fmt: skip
        if "profile" in ref:
            prof = ref["profile"]
            lines.append(f"  where a step's {prof['total_ms_per_step']:.1f} ms go ({prof['sort_by']}), the top 10:")
            for op in prof["top"][:10]:
                share, ms = 100 * op["share"], op["self_ms_per_step"]
                lines.append(f"  {share:5.1f}% {ms:8.2f} ms {op['calls']:5d}x  {op['name'][:80]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("tokenize", help="download-fineweb-edu.py against the nanoGPT-style loop on a local corpus")
    t.add_argument("--tokens", type=parse_count, default=10_000_000, help="corpus size in tokens (at least)")
    t.add_argument("--shard-size", type=parse_count, default=2_000_000)
    t.add_argument("--repeats", type=parse_count, default=2)
    d = sub.add_parser("download", help="download-fineweb-edu.py over a model of the hub on a WAN against local files")
    d.add_argument("--tokens", type=parse_count, default=20_000_000, help="corpus size in tokens (at least)")
    d.add_argument("--repeats", type=parse_count, default=2)
    d.add_argument("--connections", type=parse_count, default=8, help="the downloader's --connections")
    d.add_argument("--rtt-ms", type=float, default=50.0, help="the round trip, in milliseconds")
    d.add_argument("--connection-mb-s", type=float, default=10.0, help="the bandwidth of one connection, MB/s")
    d.add_argument("--link-mb-s", type=float, default=60.0, help="the bandwidth of the whole link, MB/s")
    h = sub.add_parser("hellaswag", help="hellaswag.py (both conventions) against a one-example-per-forward scorer")
    for name, default in dict(examples=300, n_layer=4, n_head=4, n_embd=128, batch_size=32, repeats=2).items():
        h.add_argument("--" + name.replace("_", "-"), type=parse_count, default=default)
    h.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    s = sub.add_parser("sample", help="sample.py's compiled step against uncompiled, KV cache against none")
    s.add_argument("--model", default="", help="a model for load_model (default: GPT-2 124M with random weights)")
    s.add_argument("--new-tokens", type=parse_count, default=256, help="tokens per sample")
    s.add_argument("--device", default="auto", help="cuda, cpu, mps or auto")
    g = sub.add_parser("gpu", help="the GPU path end to end: train step speed, parity, resume, HellaSwag, sampling, "
                       "large presets; writes a JSON report")  # fmt: skip
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    g.add_argument("--out", default="report.json", help="the JSON report (written after every check)")
    g.add_argument("--quick", action="store_true", help="the same checks with small shapes, in seconds on a CPU (where "
                   "the timed steps compile without inductor's code generator): the report's wiring")  # fmt: skip
    g.add_argument("--profile", action="store_true", help="also the reference step's top operators and kernels by time")
    g.add_argument("--work-dir", default="", help="keep the runs' logs, checkpoints and data here (default: temporary)")
    args = p.parse_args(argv)
    counts = [n for n in ("tokens", "shard_size", "repeats", "examples", "n_layer", "n_head", "n_embd", "batch_size",
                          "connections", "new_tokens") if hasattr(args, n)]  # fmt: skip
    check_flags(args, "at least 1", lambda v: v >= 1, *counts)
    rates = [n for n in ("rtt_ms", "connection_mb_s", "link_mb_s") if hasattr(args, n)]
    check_flags(args, "more than 0", lambda v: v > 0, *rates)
    if args.bench == "hellaswag" and args.n_embd % args.n_head:
        raise UserError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.bench == "gpu":
        check_output_path(args.out, "--out")
    benches = dict(tokenize=bench_tokenize, download=bench_download, hellaswag=bench_hellaswag, gpu=bench_gpu,
                   sample=bench_sample)  # fmt: skip
    benches[args.bench](args)


if __name__ == "__main__":
    run_cli(main)
