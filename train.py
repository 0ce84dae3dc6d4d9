"""
Pretrain GPT-2 on token shards, on one device or many (DDP under torchrun).

    ./train.sh --preset quickstart              # a small GPT on generated stories: offline, CPU, a few minutes
    ./train.sh                                  # the reference run: GPT-2 124M on 5B tokens of FineWeb-Edu
    torchrun --standalone --nproc_per_node 8 train.py --preset gpt2-124m --out-dir log
    ./train.sh --resume --out-dir log           # continue a run from its newest checkpoint, bit for bit

Each optimizer step sees --total-batch tokens: --micro-batch x --seq-len per process per micro-step, accumulated over
total / (micro x seq x world size) micro-steps, so adding GPUs changes speed, not results. Everything a run logs goes
to <out-dir>/log.jsonl (one JSON object per line) and a plot, <out-dir>/loss.png.
"""

import argparse
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import sample
from model import GPT, MODEL_SIZES, GPTConfig
from utils import (
    ShardedDataLoader,
    UserError,
    all_ranks_agree,
    atomic_write,
    autocast,
    broadcast_from_rank0,
    config_parser,
    export_model,
    first_line,
    get_tokenizer,
    list_checkpoints,
    load_checkpoint,
    load_script,
    model_from_checkpoint,
    peak_flops,
    plot_log,
    read_jsonl,
    run_cli,
    save_checkpoint,
    setup_distributed,
    teardown_distributed,
)


@dataclass
class TrainConfig:
    preset: str = "gpt2-124m"  # gpt2-124m (the reference run), gpt2-350m, gpt2-774m, gpt2-1558m, tiny, quickstart
    data_dir: str = "edu_fineweb10B"  # token shards written by download-fineweb-edu.py
    out_dir: str = "log"  # log.jsonl, loss.png and checkpoints
    device: str = "auto"  # cuda, cpu, mps or auto
    resume: bool = False  # continue from the newest checkpoint in --out-dir
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # batch: tokens per optimizer step = micro_batch x seq_len x world size x gradient accumulation steps
    micro_batch: int = 64  # sequences per process per forward/backward
    seq_len: int = 1024  # tokens per sequence (the model's context)
    total_batch: int = 524_288  # tokens per optimizer step (2**19, about 0.5M as in GPT-3 small)
    # optimizer and schedule
    max_steps: int = 9_537  # 5B tokens / 524,288 tokens per step
    warmup_steps: int = 715  # linear warmup (GPT-3: 375M tokens)
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at max_lr x this
    weight_decay: float = 0.1  # on the matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    seed: int = 1337
    shuffle: bool = False  # a new order of the train shards and of the documents in them each epoch, from --seed
    compile: bool = None  # torch.compile the model (default: on for CUDA, off elsewhere)
    # evaluation, samples, checkpoints (intervals in steps; 0 turns one off)
    eval_interval: int = 250  # validation loss
    val_steps: int = 20  # batches of validation per evaluation
    hellaswag_interval: int = 250
    hellaswag_file: str = ""  # a local hellaswag_val.jsonl; without it the official file is downloaded once
    hellaswag_limit: int = 0  # first N examples only (0: all 10,042)
    sample_interval: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    num_samples: int = 4
    sample_tokens: int = 32
    checkpoint_interval: int = 1_000
    keep_checkpoints: int = 3  # the newest N are kept (0: all)
    export: str = ""  # at the end, write the model as a transformers directory here (lm-eval-harness can load it)


# fmt: off
PRESETS = {
    "gpt2-124m": dict(**MODEL_SIZES["gpt2"]),  # the defaults above
    # larger GPT-2 shapes, with GPT-3's learning rates for their sizes and micro-batches that fit an 80 GB GPU
    "gpt2-350m": dict(**MODEL_SIZES["gpt2-medium"], micro_batch=32, max_lr=3e-4),
    "gpt2-774m": dict(**MODEL_SIZES["gpt2-large"], micro_batch=16, max_lr=2.5e-4),
    "gpt2-1558m": dict(**MODEL_SIZES["gpt2-xl"], micro_batch=16, max_lr=2e-4),
    # for tests on a CPU: 4 micro-batches per step, so it splits over 1, 2 or 4 processes
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, micro_batch=4, seq_len=32, total_batch=512, max_steps=20,
                 warmup_steps=4, max_lr=1e-3, eval_interval=10, val_steps=2, hellaswag_interval=0, sample_interval=10,
                 num_samples=2, sample_tokens=8, checkpoint_interval=5),
    # offline first run: generated children's stories as the corpus, a small GPT, a few minutes on a laptop CPU
    "quickstart": dict(data_dir="data/quickstart-stories", out_dir="log/quickstart", n_layer=4, n_head=4, n_embd=128,
                       micro_batch=16, seq_len=128, total_batch=2048, max_steps=300, warmup_steps=30, max_lr=2e-3,
                       eval_interval=30, val_steps=4, hellaswag_interval=0, sample_interval=150, num_samples=2,
                       sample_tokens=48, sample_prompt="Once upon a time,", checkpoint_interval=150),
}
# fmt: on


def parse_config(argv=None):
    """The flags, with the chosen preset's values as their defaults: explicit flags win."""
    first = argparse.ArgumentParser(add_help=False)  # the preset first, so that --help shows its values
    first.add_argument("--preset", default=TrainConfig.preset)
    preset = first.parse_known_args(argv)[0].preset
    parser = config_parser(TrainConfig, __doc__)
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}: choose one of {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[preset])
    return TrainConfig(**vars(parser.parse_args(argv)))


def get_lr(step, config):
    """Linear warmup (lr > 0 at step 0), then cosine decay to min_lr_ratio x max_lr at max_steps."""
    min_lr = config.max_lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return min_lr
    decay_ratio = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
    return min_lr + coeff * (config.max_lr - min_lr)


def train_step(model, optimizer, next_batch, grad_accum_steps, device, lr, grad_clip, ddp_world_size=1):
    """One optimizer step over grad_accum_steps micro-batches; returns the loss averaged over all micro-batches of
    all ranks and the gradient norm, both as tensors (reading them is the caller's one sync per step)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        if device.startswith("cuda"):
            x, y = x.pin_memory(), y.pin_memory()  # page-locked, so the copy is asynchronous: the CPU runs ahead
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ddp_world_size > 1:
            # all-reduce the gradients only on the last micro-step; must be set before that micro-step's forward
            model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        with autocast(device):
            loss = model(x, y)[1]  # the logits are not kept: at micro-batch 64 they hold 6.6 GB until the next forward
        loss = loss / grad_accum_steps  # the gradients add up over micro-steps: scale each to get the mean
        loss_accum += loss.detach()
        loss.backward()
    if ddp_world_size > 1:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
        loss_accum /= ddp_world_size
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_accum, norm


@torch.no_grad()
def evaluate_loss(model, loader, steps, device, ddp_world_size=1):
    model.eval()
    loader.reset()  # the same validation tokens every time
    loss_accum = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast(device):
            loss = model(x.to(device), y.to(device))[1]
        loss_accum += loss.detach() / steps
    if ddp_world_size > 1:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
        loss_accum /= ddp_world_size
    return loss_accum.item()


def rng_states(device):
    np_state = np.random.get_state()
    states = dict(
        python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]), torch=torch.get_rng_state()
    )
    if device.startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(device)  # this GPU's only: a resume may see fewer or more GPUs
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state((states["numpy"][0], np.array(states["numpy"][1], dtype=np.uint32), *states["numpy"][2:]))
    torch.set_rng_state(states["torch"].cpu())
    if device.startswith("cuda") and "cuda" in states:
        cuda = states["cuda"]
        cuda = cuda[0] if isinstance(cuda, (list, tuple)) else cuda  # older checkpoints hold one state per GPU
        torch.cuda.set_rng_state(cuda.cpu(), device)


def append_jsonl(path, record):
    """One JSON object per line. A line cut short by a kill is ended first, so the new record starts a line of its own
    (read_log skips the torn one)."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


OWN_TEMPORARY = re.compile(r"^(ckpt_\d{6,}\.pt|loss\.png)\.\d+\.tmp$")  # what atomic_write leaves when killed


def take_out_dir(out_dir):
    """Lock out_dir for this run and clear what a killed run left half-written. A second train.py on the same
    directory is refused at once; the kernel drops the lock when its process ends, even by kill -9."""
    import fcntl
    import socket

    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, "train.lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.seek(0)
        owner = lock.read().strip() or "owner unknown"
        raise UserError(
            f"{out_dir} is in use by another train.py ({owner}): wait for it, or choose another --out-dir"
        ) from e
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    for name in os.listdir(out_dir):
        if OWN_TEMPORARY.match(name):  # a checkpoint or plot that a kill cut short: up to 1.5 GB each for 124M
            os.remove(os.path.join(out_dir, name))
    return lock


# settings a checkpoint cannot continue under; any other change on --resume is allowed and logged
FIXED_ON_RESUME = ("n_layer", "n_head", "n_embd", "seq_len", "total_batch")


RESUME_KEYS = ("model", "optimizer", "model_config", "config", "step", "train_loader", "rng")


def check_resumable(checkpoint, path):
    """A checkpoint of train.py's own, with everything a resume reads."""
    missing = [k for k in RESUME_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    return checkpoint


def find_start(config):
    """Where this run starts: dict(path, checkpoint, damaged, finished) from the newest checkpoint that loads.
    Damaged checkpoints are skipped with a warning, and never deleted; if none loads, the run is refused."""
    paths = list_checkpoints(config.out_dir)
    start = dict(path=None, checkpoint=None, damaged=[], finished=False)
    if paths and not config.resume:
        raise UserError(
            f"{config.out_dir} holds checkpoints of an earlier run: "
            "pass --resume to continue it, or choose another --out-dir"
        )
    if config.resume and not paths:
        print(f"note: --resume: {config.out_dir} holds no checkpoint yet, so this run starts at step 0")
    for path in reversed(paths):
        try:
            start.update(path=path, checkpoint=check_resumable(load_checkpoint(path), path))
            break
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            start["damaged"].append(os.path.basename(path))
    if paths and start["checkpoint"] is None:
        raise UserError(
            f"no checkpoint in {config.out_dir} can be read ({', '.join(start['damaged'])}); nothing was deleted: "
            "restore one, or start over in another --out-dir"
        )
    if start["checkpoint"] is not None:
        if start["checkpoint"]["step"] > config.max_steps:
            raise UserError(
                f"{start['path']} is at step {start['checkpoint']['step']}, past --max-steps {config.max_steps}: "
                "give a larger --max-steps to go on"
            )
        saved = start["checkpoint"]["config"]
        fixed = [k for k in FIXED_ON_RESUME if saved.get(k) != getattr(config, k)]
        if fixed:
            raise UserError(
                f"{start['path']} was trained with "
                + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in fixed)
                + "; this run asks for "
                + ", ".join(f"--{k.replace('_', '-')} {getattr(config, k)}" for k in fixed)
                + ": resume with the checkpoint's settings"
            )
        log_path = os.path.join(config.out_dir, "log.jsonl")
        start["finished"] = (
            os.path.exists(log_path)
            and start["checkpoint"]["step"] >= config.max_steps
            and any(r.get("event") == "finished" and r.get("step") == config.max_steps for r in read_jsonl(log_path))
        )
    return start


def prepare_quickstart_data(data_dir):
    """Generated children's stories as a jsonl corpus, tokenized into shards by the downloader's own code."""
    downloader = load_script("download-fineweb-edu")
    os.makedirs(data_dir, exist_ok=True)
    corpus = os.path.join(data_dir, "stories.jsonl")
    if not os.path.exists(corpus):
        with atomic_write(corpus, "w") as f:
            for text in downloader.simple_stories(5000):
                f.write(json.dumps(dict(text=text)) + "\n")
    downloader.main(["--data-files", corpus, "--out-dir", data_dir, "--prefix", "stories", "--shard-size", "50000"])


def check_weights(model, step, out_dir):
    """A step can leave NaN or infinite weights behind a finite loss (a huge learning rate): never save those."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        last = list_checkpoints(out_dir)
        raise UserError(
            f"step {step}: the update left NaN or infinite weights; not saved. The last good checkpoint is "
            f"{last[-1] if last else 'none'}: lower --max-lr, then --resume"
        )


def write_checkpoint(config, raw_model, optimizer, model_config, step, train_loader, val_loss, device, damaged):
    path = os.path.join(config.out_dir, f"ckpt_{step:06d}.pt")
    save_checkpoint(
        path,
        dict(
            model=raw_model.state_dict(),
            optimizer=optimizer.state_dict(),
            model_config=asdict(model_config),
            config=asdict(config),
            step=step,
            train_loader=train_loader.state_dict(),
            val_loss=val_loss,
            rng=rng_states(device),
        ),
    )
    damaged.discard(os.path.basename(path))  # replaced by a good one
    if config.keep_checkpoints > 0:  # pruned among the readable ones: a damaged file may sort newer than them all
        readable = [p for p in list_checkpoints(config.out_dir) if os.path.basename(p) not in damaged]
        for old in readable[: -config.keep_checkpoints]:
            os.remove(old)
    print(f"saved {path}")


def load_hellaswag(config, master_process, device):
    """HellaSwag's examples on every rank, read (and downloaded once) by rank 0 alone, so that nodes need no shared
    filesystem; None on every rank, with one warning, when the file cannot be had."""
    examples = None
    if master_process:
        try:
            path = config.hellaswag_file or hellaswag.download(hellaswag.Config.cache_dir)
            examples = hellaswag.load_examples(path, config.hellaswag_limit)
        except UserError as e:
            print(f"warning: HellaSwag is skipped: {e}", file=sys.stderr)
    return broadcast_from_rank0(examples, device)


def download_incomplete(data_dir):
    try:
        with open(os.path.join(data_dir, "manifest.json")) as f:
            return json.load(f).get("complete") is False
    except (OSError, ValueError, AttributeError):  # no manifest (shards made otherwise), or not ours
        return False


def fit_micro_batch(config, world_size):
    """The largest micro-batch up to --micro-batch that divides each process's share of a step into whole micro-steps:
    a preset then runs on any number of processes that splits --total-batch into whole sequences."""
    rows_per_process, rest = divmod(config.total_batch, config.seq_len * world_size)
    if rest or rows_per_process == 0:
        raise UserError(
            f"--total-batch {config.total_batch} is not divisible by --seq-len {config.seq_len} x "
            f"{world_size} processes = {config.seq_len * world_size}"
        )
    return max(b for b in range(1, min(config.micro_batch, rows_per_process) + 1) if rows_per_process % b == 0)


def check_config(config):
    """One-line errors for settings that would crash later or train on garbage."""

    def fail(name, rule):
        raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(config, name)}")

    for name in ("micro_batch", "seq_len", "total_batch", "n_layer", "n_head", "n_embd"):
        if getattr(config, name) < 1:
            fail(name, "at least 1")
    if config.n_embd % config.n_head != 0:
        raise UserError(f"--n-embd {config.n_embd} is not divisible by --n-head {config.n_head}")
    for name in (
        "max_steps",
        "keep_checkpoints",
        "eval_interval",
        "hellaswag_interval",
        "sample_interval",
        "checkpoint_interval",
        "val_steps",
        "warmup_steps",
        "num_samples",
        "sample_tokens",
        "hellaswag_limit",
    ):
        if getattr(config, name) < 0:
            fail(name, "0 or more")
    if not 0 < config.max_lr <= 1000:  # beyond, AdamW's float32 update overflows
        fail("max_lr", "a positive number up to 1000")
    for name, lo, hi in (("min_lr_ratio", 0, 1), ("beta1", 0, 0.999999), ("beta2", 0, 0.999999)):
        if not lo <= getattr(config, name) <= hi:
            fail(name, f"from {lo} to {hi}")
    for name in ("eps", "weight_decay", "grad_clip"):  # NaN fails every comparison, so it lands here too
        if not (0 <= getattr(config, name) < math.inf) or (name == "eps" and config.eps == 0):
            fail(name, "a finite number >= 0" + (", not 0" if name == "eps" else ""))
    if not 0 <= config.seed < 2**32:
        fail("seed", "from 0 to 2**32 - 1")
    if config.eval_interval > 0 and config.val_steps == 0:
        raise UserError("--val-steps 0 evaluates nothing: give --val-steps N, or --eval-interval 0 for no validation")
    if config.sample_interval > 0 and (not config.sample_prompt or config.num_samples == 0):
        raise UserError("--sample-prompt is empty or --num-samples 0: give both, or --sample-interval 0 for no samples")
    if config.export and os.path.exists(config.export) and not os.path.isdir(config.export):
        raise UserError(f"--export {config.export} is a file: the export is a directory")


class StopSignal:
    """SIGTERM (how SLURM and Kubernetes stop a job) or Ctrl-C: the run finishes its step, writes a checkpoint and
    exits; a second signal ends it at once."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # the second one is not caught
        name = signal.Signals(signum).name
        print(f"{name}: stopping after this step with a checkpoint (send it again to stop at once)", file=sys.stderr)

    def agreed(self, device):
        """The signal any rank received (0: none), the same on every rank, so that all stop after the same step."""
        signum = torch.tensor(self.signum or 0, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum.item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def finished_message(config):
    """Where the run's results are and what to try next."""
    out = shlex.quote(config.out_dir)
    return (
        f"\nfinished {config.max_steps} steps. In {config.out_dir}: log.jsonl (every step and evaluation), loss.png "
        f"(the curves), ckpt_NNNNNN.pt (checkpoints). Next:\n"
        f"  python sample.py --model {out} --prompt {shlex.quote(config.sample_prompt)}   # text from the newest\n"
        f"  python sample.py --model {out} --temperature 0.8 --max-new-tokens 200          # longer, less random\n"
        f"  python hellaswag.py --model {out} --data-file hellaswag_val.jsonl   # HellaSwag (without --data-file: "
        "downloaded once)\n"
        f"  python misc/plot_log.py {shlex.quote(os.path.join(config.out_dir, 'log.jsonl'))}   # redraw the plot"
    )


def generate_text(raw_model, enc, config, device):
    """The run's progress samples, drawn exactly as sample.py draws them."""
    args = sample.Config(
        prompt=config.sample_prompt, num_samples=config.num_samples, max_new_tokens=config.sample_tokens, top_k=50
    )
    return [s["text"] for s in sample.generate_samples(raw_model, enc, args, device)]


def main(argv=None):
    config = parse_config(argv)
    check_config(config)
    device, ddp_rank, ddp_local_rank, ddp_world_size = setup_distributed(config.device)
    ddp = ddp_world_size > 1
    master_process = ddp_rank == 0  # logs, plots, checkpoints, samples
    is_cuda = device.startswith("cuda")
    compile_model = config.compile if config.compile is not None else is_cuda

    micro_batch = fit_micro_batch(config, ddp_world_size)
    if micro_batch != config.micro_batch and master_process:
        print(
            f"note: --micro-batch {config.micro_batch} does not split {config.total_batch:,} tokens over "
            f"{ddp_world_size} processes x {config.seq_len} tokens: using micro-batch {micro_batch}"
        )
    requested_micro_batch, config.micro_batch = config.micro_batch, micro_batch
    tokens_per_micro_step = config.micro_batch * config.seq_len * ddp_world_size  # over all ranks
    grad_accum_steps = config.total_batch // tokens_per_micro_step

    if config.preset == "quickstart":  # on every node (one process each): nodes need no shared filesystem
        all_ranks_agree(lambda: prepare_quickstart_data(config.data_dir) if ddp_local_rank == 0 else None)

    def open_data():  # each node reads its own copy of the shards
        if not os.path.isdir(config.data_dir):
            what = "is not a directory" if os.path.exists(config.data_dir) else "does not exist"
            raise UserError(
                f"data directory {config.data_dir} {what}: "
                "run download-fineweb-edu.py first (or try --preset quickstart)"
            )
        if master_process and download_incomplete(config.data_dir):
            print(
                f"warning: {config.data_dir}/manifest.json says the download is not complete: training on the "
                "shards there so far"
            )
        train_loader = ShardedDataLoader(
            config.data_dir,
            "train",
            config.micro_batch,
            config.seq_len,
            ddp_rank,
            ddp_world_size,
            shuffle=config.shuffle,
            seed=config.seed,
        )
        val_loader = ShardedDataLoader(
            config.data_dir, "val", config.micro_batch, config.seq_len, ddp_rank, ddp_world_size
        )
        return train_loader, val_loader

    train_loader, val_loader = all_ranks_agree(open_data)
    val_batches = val_loader.epoch_tokens // tokens_per_micro_step
    if config.val_steps > val_batches:
        if master_process:
            print(f"note: the val split holds {val_batches} batches: --val-steps {config.val_steps} -> {val_batches}")
        config.val_steps = val_batches
    # rank 0 owns the out dir (log, plots, checkpoints) and decides where the run starts; every rank gets its
    # checkpoint from rank 0, so the other nodes need not see rank 0's disk
    lock = all_ranks_agree(lambda: take_out_dir(config.out_dir) if master_process else None)  # noqa: F841 (held)
    start = broadcast_from_rank0(all_ranks_agree(lambda: find_start(config) if master_process else None), device)
    if start["finished"]:
        if master_process:
            print(f"{config.out_dir} is finished: all {config.max_steps} steps are done (a larger --max-steps goes on)")
            if config.export:
                export_model(model_from_checkpoint(start["checkpoint"], start["path"]), config.export)
                print(f"exported {start['path']} to {config.export} (transformers GPT2LMHeadModel format)")
        teardown_distributed()
        return

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    if is_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls outside autocast (not in evaluation)
    model_config = GPTConfig(
        block_size=config.seq_len, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd
    )
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizers(
        config.weight_decay, config.max_lr, (config.beta1, config.beta2), "cuda" if is_cuda else device, config.eps
    )

    start_step, changes = 0, {}
    if start["checkpoint"] is not None:
        checkpoint = start["checkpoint"]
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{start['path']}: its weights do not fit this model ({first_line(e)[:200]})") from e
        all_ranks_agree(lambda: train_loader.load_state_dict(checkpoint["train_loader"]))
        set_rng_states(checkpoint["rng"], device)
        start_step = checkpoint["step"]
        changes = {k: [checkpoint["config"].get(k), v] for k, v in asdict(config).items() if k != "resume"}
        changes = {k: old_new for k, old_new in changes.items() if old_new[0] != old_new[1]}
        del checkpoint, start["checkpoint"]
    raw_model = model  # evaluation, sampling and checkpoints use the plain module
    if compile_model:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if is_cuda else None)

    log_path = os.path.join(config.out_dir, "log.jsonl")
    peak = peak_flops(device)
    if master_process:
        run = dict(world_size=ddp_world_size, grad_accum_steps=grad_accum_steps)
        if start_step == 0:
            resolved = dict(asdict(config), device=device, compile=compile_model)
            append_jsonl(
                log_path,
                dict(
                    event="config",
                    **resolved,
                    micro_batch_requested=requested_micro_batch,
                    **run,
                    n_params=raw_model.num_params(),
                ),
            )
        else:
            append_jsonl(
                log_path, dict(event="resume", step=start_step, checkpoint=start["path"], **run, changes=changes)
            )
            if changes:
                print(
                    "note: settings changed since the checkpoint: "
                    + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changes.items())
                )
        print(
            f"{raw_model.num_params():,} parameters | {ddp_world_size} x {device} | {config.total_batch:,} tokens/step "
            f"= {config.micro_batch} x {config.seq_len} x {ddp_world_size} x {grad_accum_steps} grad accum "
            f"| steps {start_step}..{config.max_steps}"
        )

    hellaswag_examples = load_hellaswag(config, master_process, device) if config.hellaswag_interval > 0 else None
    enc = get_tokenizer()
    damaged = set(start["damaged"])  # never pruned; replaced when this run writes the same step
    val_loss = None
    stop = StopSignal()
    try:
        for step in range(start_step, config.max_steps + 1):
            last_step = step == config.max_steps
            record = dict(step=step)
            if config.eval_interval > 0 and (step % config.eval_interval == 0 or last_step):
                val_loss = record["val_loss"] = evaluate_loss(
                    raw_model, val_loader, config.val_steps, device, ddp_world_size
                )
            if hellaswag_examples and (step % config.hellaswag_interval == 0 or last_step):
                results = hellaswag.evaluate(raw_model, hellaswag_examples, device, 32, ddp_rank, ddp_world_size)
                record.update({f"hellaswag_{k}": v for k, v in results.items()})
            if master_process and len(record) > 1:
                append_jsonl(log_path, record)
                print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                plot_log(log_path, os.path.join(config.out_dir, "loss.png"))
            sample_due = config.sample_interval > 0 and (step % config.sample_interval == 0 or last_step)
            if master_process and sample_due and step > 0:
                samples = generate_text(raw_model, enc, config, device)
                append_jsonl(log_path, dict(step=step, samples=samples))
                for text in samples:
                    print(f"sample: {text!r}")
            if last_step:
                break

            t0 = time.time()
            lr = get_lr(step, config)
            loss, norm = train_step(
                model,
                optimizer,
                train_loader.next_batch,
                grad_accum_steps,
                device,
                lr,
                config.grad_clip,
                ddp_world_size,
            )
            loss, norm = loss.item(), norm.item()  # waits for the GPU: the step's one sync
            if not (math.isfinite(loss) and math.isfinite(norm)):
                last = list_checkpoints(config.out_dir)
                raise UserError(
                    f"step {step}: the train loss is {loss}, the gradient norm {norm}; stopped. "
                    "The last good checkpoint is "
                    f"{last[-1] if last else 'none'}: lower --max-lr or check the data, then --resume (if it fails "
                    "again, that checkpoint was already diverging: move it away to resume from the one before)"
                )
            dt = time.time() - t0
            tokens_per_sec = config.total_batch / dt
            if master_process:
                entry = dict(
                    step=step, train_loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000, tokens_per_sec=tokens_per_sec
                )
                if peak:
                    entry["mfu"] = raw_model.estimate_mfu(tokens_per_sec / ddp_world_size, config.seq_len, peak)
                append_jsonl(log_path, entry)
                mfu = f" | mfu {100 * entry['mfu']:.1f}%" if peak else ""
                print(
                    f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {dt * 1000:.1f}ms "
                    f"| tok/sec {tokens_per_sec:,.0f}{mfu}"
                )
            signum = stop.agreed(device)
            checkpoint_due = config.checkpoint_interval > 0 and (step + 1) % config.checkpoint_interval == 0
            if checkpoint_due or step + 1 == config.max_steps or signum:
                check_weights(raw_model, step, config.out_dir)  # on every rank: they hold the same weights
            if master_process and (checkpoint_due or step + 1 == config.max_steps or signum):
                write_checkpoint(
                    config, raw_model, optimizer, model_config, step + 1, train_loader, val_loss, device, damaged
                )
            if signum:
                name = signal.Signals(signum).name
                if master_process:
                    append_jsonl(log_path, dict(event="stopped", step=step + 1, signal=name))
                    print(f"stopped by {name} after step {step}: continue with --resume --out-dir {config.out_dir}")
                teardown_distributed()
                raise SystemExit(128 + signum)  # the shell's code for "ended by this signal": the run is not done
    finally:
        stop.restore()

    if master_process:
        if config.export:
            export_model(raw_model, config.export)
            print(f"exported the model to {config.export} (transformers GPT2LMHeadModel format)")
        append_jsonl(log_path, dict(event="finished", step=config.max_steps))
        print(finished_message(config))
    teardown_distributed()


if __name__ == "__main__":
    run_cli(main)
