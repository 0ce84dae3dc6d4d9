"""
Pretrain GPT-2 on token shards, on one device or many (DDP under torchrun).

    ./train.sh --preset quickstart              # a small GPT on generated stories: offline, CPU, a few minutes
    ./train.sh                                  # the reference run: GPT-2 124M on 5B tokens of FineWeb-Edu
    torchrun --standalone --nproc_per_node 8 train.py --preset gpt2-124m --out-dir log
    ./train.sh --resume --out-dir log           # continue a run from its newest checkpoint (on a CPU, bit for bit)
    ./train.sh --init-from gpt2 --data-dir data/mine --max-lr 3e-5 --max-steps 200   # fine-tune GPT-2's weights

Each optimizer step sees --total-batch tokens: --micro-batch x --seq-len per process per micro-step, accumulated over
total / (micro x seq x world size) micro-steps: more GPUs change speed, not results. A run logs to <out-dir>/log.jsonl
(one JSON object per line), plots <out-dir>/loss.png and ends with <out-dir>/report.md. Read top to bottom: the
config, the learning rate, one optimizer step, the evaluation, then main (the process group, the data, the model, the
optimizer, the loop). The model is model.py, the batches utils.py's ShardedDataLoader; checkpoint.py keeps a run alive.
"""

import argparse
import contextlib
import datetime
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import hellaswag
import sample
from checkpoint import fail_together
from misc.plot_log import RunLog
from misc.stories import prepare_quickstart
from model import GPT, MODEL_SIZES, GPTConfig
from utils import (
    ShardedDataLoader,
    UserError,
    check_flags,
    config_parser,
    device_name,
    is_cuda,
    pick_device,
    run_cli,
)
from weights import SHAPE_FLAGS, check_export, export_model, model_from_checkpoint, pretrained_for_run


@dataclass
class TrainConfig:
    preset: str = "gpt2-124m"  # gpt2-124m (the reference run), gpt2-350m, gpt2-774m, gpt2-1558m, tiny, quickstart
    data_dir: str = "edu_fineweb10B"  # token shards written by download-fineweb-edu.py
    out_dir: str = "log"  # log.jsonl, loss.png, report.md and checkpoints
    device: str = "auto"  # cuda, cpu, mps or auto
    resume: bool = False  # continue from the newest checkpoint in --out-dir
    init_from: str = ""  # fine-tune these weights (gpt2 .. gpt2-xl, a transformers dir, a checkpoint or out dir)
    # model (with --init-from, its weights give the shape)
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
    wandb_project: str = ""  # also log to this Weights & Biases project (pip install wandb; WANDB_MODE=offline)
    wandb_run_name: str = ""  # the wandb run's name (default: wandb's)
    export: str = ""  # at the end, write the model as a transformers directory here (lm-eval-harness can load it)


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
}  # fmt: skip


def get_lr(step, config):
    """Linear warmup (lr > 0 at step 0), then cosine decay to min_lr_ratio x max_lr at max_steps."""
    min_lr = config.max_lr * config.min_lr_ratio
    # warmup: the first updates of a random network are large and noisy; a small learning rate keeps them stable
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return min_lr
    # cosine decay: big steps while the loss falls fast, ever smaller ones as the model settles
    decay_ratio = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
    return min_lr + coeff * (config.max_lr - min_lr)


def train_step(model, optimizer, loader, grad_accum_steps, device, lr, grad_clip, ddp_world_size=1, stop=None):
    """One optimizer step over grad_accum_steps micro-batches. Returns the mean loss over all micro-batches of all
    ranks and the gradient norm, both as tensors: reading them is the caller's one sync with the GPU per step.
    Returns None if stop() (asked before each micro-step) says so: the step is dropped, the weights are unchanged and
    the loader is back where the step began, so that a resume does the step again."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    step_begins_at = loader.position
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()  # (B, T) each: the targets y are the inputs x shifted by one token
        if is_cuda(device):
            x, y = x.pin_memory(), y.pin_memory()  # page-locked, so the copy is asynchronous: the CPU runs ahead
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if stop is not None and stop():  # a stop signal: a step of many micro-steps may outlast the grace it has
            optimizer.zero_grad(set_to_none=True)
            loader.position = step_begins_at
            return None
        if ddp_world_size > 1:
            # DDP all-reduces the gradients in every backward; with accumulation only the last micro-step needs it,
            # the others would send every gradient over the network for nothing. Set before that micro-step's forward.
            model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        # bf16 autocast on CUDA: matmuls run in bfloat16 on the tensor cores, the weights and the optimizer stay
        # fp32. bf16 has fp32's exponent range, so unlike fp16 it needs no loss scaling.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=is_cuda(device)):
            loss = model(x, y)[1]  # the logits are not kept: at micro-batch 64 they hold 6.6 GB until the next forward
        # backward() adds each micro-step's gradients to the ones before: dividing every loss by grad_accum_steps
        # makes the sum the gradient of the mean loss over the whole batch, as one big forward would give
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    if ddp_world_size > 1:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
        loss_accum /= ddp_world_size
    # clipping the global gradient norm (at 1.0, as GPT-3) keeps one unlucky batch from throwing the weights far
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_accum, norm


@torch.no_grad()
def evaluate_loss(model, loader, steps, device, ddp_world_size=1, stop=lambda: False):
    model.eval()
    loader.reset()  # the same validation tokens every time, so evaluations compare
    loss_accum = torch.zeros((), device=device)
    for _ in range(steps):
        if stop():  # a stop signal: the run ends after this evaluation, which is not recorded
            break
        x, y = loader.next_batch()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=is_cuda(device)):
            loss = model(x.to(device), y.to(device))[1]
        loss_accum += loss.detach() / steps
    if ddp_world_size > 1:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # every rank read other rows: the mean over all of them
        loss_accum /= ddp_world_size
    return loss_accum.item()


def main(argv=None):
    config = parse_config(argv)  # TrainConfig's defaults, then the preset's, then the flags; checked

    # DDP: torchrun starts one process per GPU and tells each its RANK (among all), LOCAL_RANK (on this node) and the
    # WORLD_SIZE; started without torchrun, this is the only process
    device = pick_device(config.device)  # cuda, mps or cpu: as asked, or the best there is
    ddp = "RANK" in os.environ
    if ddp:
        ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if is_cuda(device):
            device = f"cuda:{ddp_local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        # NCCL between GPUs, gloo between CPUs. The other ranks wait at the next collective while rank 0 writes a
        # checkpoint (19 GB for gpt2-1558m): a long timeout
        dist.init_process_group(backend="nccl" if is_cuda(device) else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=torch.device(device) if is_cuda(device) else None)  # fmt: skip
        checkpoint.watch_launcher(ddp_rank == 0)  # torchrun killed: stop as if preempted, with a checkpoint
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
    master_process = ddp_rank == 0  # this process logs, plots, checkpoints and samples
    compile_model = config.compile if config.compile is not None else is_cuda(device)

    # the batch: total_batch tokens per optimizer step whatever the number of GPUs, through gradient accumulation.
    # From here on config holds the values in effect (micro_batch, val_steps): the log and checkpoints record those.
    requested_micro_batch = config.micro_batch
    config.micro_batch = fit_micro_batch(config, ddp_world_size, master_process)
    grad_accum_steps = config.total_batch // (config.micro_batch * config.seq_len * ddp_world_size)

    # the data: every node reads its own copy of the shards (no shared filesystem needed)
    if config.preset == "quickstart":  # generated stories, tokenized on every node by one process; the rest wait
        fail_together(lambda: prepare_quickstart(config.data_dir) if ddp_local_rank == 0 else None)
    train_loader, val_loader = fail_together(lambda: open_loaders(config, ddp_rank, ddp_world_size, master_process))

    # rank 0 owns the out dir (log, plots, checkpoints) until the run ends, however it ends; it finds where the run
    # starts (on --resume, the newest checkpoint) and sends the checkpoint to every rank
    lock = fail_together(lambda: checkpoint.take_out_dir(config.out_dir) if master_process else
                         contextlib.nullcontext())  # fmt: skip
    with lock, checkpoint.StopSignal() as stop:  # a stop signal (SIGTERM, Ctrl-C) ends the run with a checkpoint
        start = checkpoint.find_start_on_every_rank(config, master_process, device)
        run_log = RunLog(config.out_dir, start, stop)  # log.jsonl, and wandb with --wandb-project (on rank 0)
        if start.finished:  # started again after the last step: nothing to train, perhaps something to --export
            fail_together(lambda: finish(run_log, config, start) if master_process else None)
            return teardown(ddp)

        # the model: a new GPT-2 of the flags' shape, or pretrained weights to fine-tune (--init-from); a resume
        # builds the shape its checkpoint names, and restore() puts its weights in
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        if start.checkpoint is not None:
            model = GPT(GPTConfig(**start.checkpoint["model_config"]))
        elif config.init_from:
            model = fail_together(lambda: pretrained_for_run(config))
        else:
            model = GPT(GPTConfig(block_size=config.seq_len, **{k: getattr(config, k) for k in SHAPE_FLAGS}))
        vars(config).update({k: getattr(model.config, k) for k in SHAPE_FLAGS})  # the shape as built, for the log
        fail_together(lambda: check_export(config, model.config) if master_process else None)  # now, not at the end
        model.to(device)
        # AdamW, with weight decay on the matrices only
        optimizer = model.configure_optimizers(config.weight_decay, config.max_lr, (config.beta1, config.beta2),
                                               device.split(":")[0], config.eps)  # fmt: skip
        val_loss = checkpoint.restore(start, model, optimizer, train_loader, device) if start.checkpoint else None
        raw_model = model  # evaluation, sampling and checkpoints use the plain module
        if compile_model:
            model = torch.compile(model)  # fuses the many small kernels of a step into few; compiles on the first step
        if ddp:
            model = DDP(model, device_ids=[ddp_local_rank] if is_cuda(device) else None)  # averages gradients
        if master_process:
            setup = dict(device=device, device_name=device_name(device), torch=torch.__version__, compile=compile_model,
                         micro_batch_requested=requested_micro_batch, world_size=ddp_world_size,
                         grad_accum_steps=grad_accum_steps)  # fmt: skip
            run_log.start(config, start, raw_model.num_params(), setup)
        # HellaSwag's examples, read (downloaded once) by rank 0 and sent to the others
        hellaswag_examples = config.hellaswag_interval > 0 and hellaswag.examples_on_every_rank(
            config.hellaswag_file, config.hellaswag_limit, master_process)  # fmt: skip

        # max_steps optimizer steps, then one more pass that only evaluates: the loss at step s is measured after s
        # updates, and a checkpoint written after step s is ckpt_<s+1>: what a resume starts with
        signum, t_run, resume_step = 0, time.time(), start.step
        start.checkpoint = None  # its memory back: everything in it is in place now

        def save(at):  # every rank takes part (its loader's position), rank 0 writes ckpt_<at>.pt
            checkpoint.save_run(config.out_dir, at, raw_model, optimizer, train_loader, device, config.keep_checkpoints,
                                start.damaged, master_process, config=asdict(config), val_loss=val_loss,
                                wandb_run_id=run_log.wandb_id)  # fmt: skip

        for step in range(resume_step, config.max_steps + 1):
            last_step = step == config.max_steps
            # evaluation, on the raw model: the compiled one would compile again for other shapes, and DDP is for
            # gradients; every rank takes part, each on its own rows, and the results are averaged. A stop signal
            # ends it between two batches: the run stops here, and a resume evaluates again
            record = dict(step=step)
            if config.eval_interval > 0 and (step % config.eval_interval == 0 or last_step):
                record["val_loss"] = evaluate_loss(raw_model, val_loader, config.val_steps, device, ddp_world_size,
                                                   stop.arrived)  # fmt: skip
            if hellaswag_examples and (step % config.hellaswag_interval == 0 or last_step):
                results = hellaswag.evaluate(raw_model, hellaswag_examples, device, hellaswag.Config.batch_size,
                                             ddp_rank, ddp_world_size, stop.arrived)  # fmt: skip
                record.update({f"hellaswag_{k}": v for k, v in results.items()})
            signum = stop.requested(device) if len(record) > 1 else 0  # after an evaluation, all ranks stop or none
            if signum:
                if not last_step:  # after the last step, its checkpoint is there already
                    save(step)
                break
            val_loss = record.get("val_loss", val_loss)
            if master_process and len(record) > 1:
                run_log.write(record)
                print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                run_log.plot(os.path.join(config.out_dir, "loss.png"))
            sample_due = config.sample_interval > 0 and (step % config.sample_interval == 0 or last_step)
            if master_process and sample_due and step > 0:
                texts = sample.texts(raw_model, config.sample_prompt, config.num_samples, config.sample_tokens, device)
                run_log.write(dict(step=step, samples=texts))
                print("\n".join(f"sample: {config.sample_prompt + text!r}" for text in texts))
            if last_step:
                break

            # ---------------------------------------- training section begin
            t0 = time.time()
            lr = get_lr(step, config)
            result = train_step(model, optimizer, train_loader, grad_accum_steps, device, lr, config.grad_clip,
                                ddp_world_size, stop=lambda: stop.requested(device) > 0)  # fmt: skip
            if result is not None:  # None: a stop signal came inside the step, which is dropped
                loss, norm = (t.item() for t in result)  # waits for the GPU: until here the CPU ran ahead of it
                dt = time.time() - t0
                # ---------------------------------------- training section end
                checkpoint.check_loss(loss, norm, step, config.out_dir)  # a NaN stops the run, on every rank
                if master_process:
                    tokens_per_sec = config.total_batch / dt
                    run_log.step(step, config.max_steps, loss, lr, norm, dt, tokens_per_sec,
                                 mfu(raw_model, config.seq_len, tokens_per_sec / ddp_world_size, device))  # fmt: skip

            # a checkpoint every checkpoint_interval steps, after the last step, and when a stop signal came
            resume_step = step + 1 if result is not None else step  # where a resume of this state starts
            signum = stop.requested(device)
            every = config.checkpoint_interval > 0 and resume_step % config.checkpoint_interval == 0
            if every or resume_step == config.max_steps or signum:
                save(resume_step)
            if signum:
                break

        # rank 0's last words (the run's last record, report.md, the export): an error there is every rank's
        seconds = time.time() - t_run
        fail_together(lambda: finish(run_log, config, start, raw_model, seconds, signum, resume_step)
                      if master_process else None)  # fmt: skip
    teardown(ddp)
    if master_process and run_log.failed:  # the log could not be written: the run stopped with a checkpoint
        raise UserError(f"{run_log.failed}; stopped at step {resume_step}, the newest checkpoint is "
                        f"{checkpoint.last_good_checkpoint(config.out_dir)}: make room, then --resume")  # fmt: skip
    if signum:
        raise SystemExit(128 + signum)  # the shell's code for "ended by this signal": the run is not done


def teardown(ddp):
    """Leave the process group, after a barrier: a rank gone while rank 0 still writes would abort the others."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# what main calls: the config, the loaders, the export


def parse_config(argv=None):
    """The flags, with the chosen preset's values as their defaults: explicit flags win. Checked."""
    first = argparse.ArgumentParser(add_help=False)  # the preset first, so that --help shows its values
    first.add_argument("--preset", default=TrainConfig.preset)
    preset = first.parse_known_args(argv)[0].preset
    parser = config_parser(TrainConfig, __doc__)
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}: choose one of {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(SHAPE_FLAGS)))  # None: not given
    if not args.init_from:  # the preset's shape where no flag gave one; with --init-from, the weights' shape
        vars(args).update({k: parser.get_default(k) for k in SHAPE_FLAGS if getattr(args, k) is None})
    config = TrainConfig(**vars(args))
    # a worker that torchrun started again (train.sh's MAX_RESTARTS) continues from the newest checkpoint by itself
    config.resume = config.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0
    check_config(config)
    return config


def check_config(config):
    """One-line errors for settings that would crash later or train on garbage (NaN fails every comparison)."""
    sizes = ("micro_batch", "seq_len", "total_batch")
    check_flags(config, "at least 1", lambda v: v is None or v >= 1, *sizes, "n_layer", "n_head", "n_embd")
    check_flags(config, "at most 2**40", lambda v: v <= 2**40, *sizes)
    if config.n_embd and config.n_head and config.n_embd % config.n_head != 0:
        raise UserError(f"--n-embd {config.n_embd} is not divisible by --n-head {config.n_head}")
    check_flags(config, "0 or more", lambda v: v >= 0, "max_steps", "keep_checkpoints", "eval_interval",
                "hellaswag_interval", "sample_interval", "checkpoint_interval", "val_steps", "warmup_steps",
                "num_samples", "sample_tokens", "hellaswag_limit")  # fmt: skip
    check_flags(config, "a positive number up to 1000", lambda v: 0 < v <= 1000, "max_lr")  # beyond, AdamW overflows
    check_flags(config, "from 0 to 1", lambda v: 0 <= v <= 1, "min_lr_ratio")
    check_flags(config, "from 0 to 0.999999", lambda v: 0 <= v <= 0.999999, "beta1", "beta2")
    check_flags(config, "a finite number >= 0", lambda v: 0 <= v < math.inf, "weight_decay", "grad_clip")
    check_flags(config, "a finite number >= 0, not 0", lambda v: 0 < v < math.inf, "eps")
    check_flags(config, "from 0 to 2**32 - 1", lambda v: 0 <= v < 2**32, "seed")
    if config.eval_interval > 0 and config.val_steps == 0:
        raise UserError("--val-steps 0 evaluates nothing: give --val-steps N, or --eval-interval 0 for no validation")
    if config.sample_interval > 0 and (not config.sample_prompt or config.num_samples == 0):
        raise UserError("--sample-prompt is empty or --num-samples 0: give both, or --sample-interval 0 for no samples")
    if config.export and os.path.exists(config.export) and not os.path.isdir(config.export):
        raise UserError(f"--export {config.export} is a file: the export is a directory")


def fit_micro_batch(config, world_size, verbose=False):
    """The largest micro-batch up to --micro-batch that splits each process's rows of a step into whole micro-steps."""
    rows_per_process, rest = divmod(config.total_batch, config.seq_len * world_size)
    if rest or rows_per_process == 0:
        raise UserError(f"--total-batch {config.total_batch} is not divisible by --seq-len {config.seq_len} x "
                        f"{world_size} processes = {config.seq_len * world_size}")  # fmt: skip
    fit = max(b for b in range(1, min(config.micro_batch, rows_per_process) + 1) if rows_per_process % b == 0)
    if fit != config.micro_batch and verbose:
        print(f"note: --micro-batch {config.micro_batch} does not split {config.total_batch:,} tokens over "
              f"{world_size} processes x {config.seq_len} tokens: using micro-batch {fit}")  # fmt: skip
    return fit


def open_loaders(config, ddp_rank, ddp_world_size, master_process):
    """This rank's train and val loaders; --val-steps capped at the val split's batches (read again at every eval)."""
    shape = (config.micro_batch, config.seq_len, ddp_rank, ddp_world_size)
    train_loader = ShardedDataLoader(config.data_dir, "train", *shape, shuffle=config.shuffle, seed=config.seed)
    val_loader = ShardedDataLoader(config.data_dir, "val", *shape)
    val_batches = val_loader.epoch_tokens // (config.micro_batch * config.seq_len * ddp_world_size)
    if config.val_steps > val_batches:
        if master_process:
            print(f"note: the val split holds {val_batches} batches: --val-steps {config.val_steps} -> {val_batches}")
        config.val_steps = val_batches
    return train_loader, val_loader


def finish(run_log, config, start, model=None, seconds=0.0, signum=0, resume_step=None):
    """Rank 0's last words: the run's last record (stopped, or finished with report.md and what to run next), then
    --export of the model (a finished run started again: its checkpoint's) for a finished run."""
    run_log.end(config, start, seconds, signum, resume_step)
    if config.export and not signum and not run_log.failed:
        model = model if model is not None else model_from_checkpoint(start.checkpoint, start.path)
        check_export(config, model.config)  # again: the directory may have changed since the first step, if any ran
        export_model(model, config.export, start.path if start.finished else "the model")


# ----------------------------------------------------------------------------------------------------------------
# MFU: the model's FLOPs per second as a share of the GPU's peak

# Dense bf16 tensor-core peak (no sparsity) per GPU, from the vendors' datasheets; the first name that the device's name
# contains wins, so the specific variants come before the general ones. Unknown cards get no MFU.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100 80GB HBM3", 989e12), ("H100 SXM", 989e12),
                   ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("RTX 4090", 165e12)]  # fmt: skip


def peak_flops(device):
    """The GPU's dense bf16 peak (FLOP/s) for MFU, or None on a CPU or a card not in PEAK_BF16_FLOPS."""
    return next((flops for gpu, flops in PEAK_BF16_FLOPS if gpu in device_name(device)), None)


def mfu(model, seq_len, tokens_per_sec, device):
    """Model FLOPs utilisation of one GPU: the model's FLOPs per second as a share of its peak; None where unknown."""
    peak = peak_flops(device)
    return None if peak is None else model.flops_per_token(seq_len) * tokens_per_sec / peak


if __name__ == "__main__":
    run_cli(main)
