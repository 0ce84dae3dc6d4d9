"""
What keeps a run alive: files written whole or not at all (atomic_write: checkpoints, shards, manifests, reports),
checkpoints (pruned, checked before anything is built from them), where a run starts (the newest checkpoint that
loads, read by rank 0 and sent to every rank) and how it resumes, the out dir's lock, stopping (a signal, a launcher
gone, an error on one rank: every rank stops together, with a checkpoint where one can be written), and the random
generators' state.

A checkpoint holds everything the next step depends on: the weights, the optimizer's moments, the loader's position
and the fingerprints of the shards it reads, every random generator's state. A resumed run goes on with the very
next batch, on any number of GPUs. On a CPU it logs the same loss at every step as a run never stopped: utils.py turns
on MKL's reproducible mode (MKL_CBWR=AUTO,STRICT unless set), and the tests that compare losses bit for bit across
processes run with one math thread (with two, the last bit has been seen to differ between two processes of the same
run: 2-core AMD EPYC, about 1 run in 15). On CUDA some kernels accumulate with atomics (the embedding's backward, for
one), so two runs, resumed or not, agree to rounding, not bit for bit (bench.py gpu's kill_and_resume: within 0.0002
nats over 10 steps on an H100 and an H200, 2026-11-28). Rank 0 alone reads a checkpoint, memory-mapped, and sends it
to the others.
"""

import contextlib
import errno
import json
import math
import os
import random
import re
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from utils import UserError, first_line, is_cuda

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{6,})\.pt$")
# settings a checkpoint cannot continue under; any other change on --resume is allowed and logged
FIXED_ON_RESUME = ("n_layer", "n_head", "n_embd", "seq_len", "total_batch")
RESUME_KEYS = ("model", "optimizer", "model_config", "config", "step", "train_loader", "rng")

# ----------------------------------------------------------------------------------------------------------------
# where a run starts


@dataclass
class Start:
    """Where a run begins: at step 0 (checkpoint None) or from the newest checkpoint that loads."""

    path: str = None  # the checkpoint's file
    checkpoint: dict = None  # its contents
    damaged: list = field(default_factory=list)  # names of checkpoints that did not load
    finished: bool = False  # the checkpoint is at --max-steps and the log says the run finished

    @property
    def step(self):
        return self.checkpoint["step"] if self.checkpoint else 0


def find_start(config):
    """Where this run starts, from the checkpoints in config.out_dir. Damaged checkpoints are skipped with a warning
    and never deleted; if none loads, the run is refused."""
    paths = list_checkpoints(config.out_dir)
    if paths and not config.resume:
        raise UserError(
            f"{config.out_dir} holds checkpoints of an earlier run: "
            "pass --resume to continue it, or choose another --out-dir"
        )
    if config.resume and not paths:
        print(f"note: --resume: {config.out_dir} holds no checkpoint yet, so this run starts at step 0")
    start = Start()
    for path in reversed(paths):  # the newest first
        try:
            start.checkpoint, start.path = check_resumable(load_checkpoint(path), path), path
            break
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            start.damaged.append(os.path.basename(path))
    if paths and start.checkpoint is None:
        raise UserError(
            f"no checkpoint in {config.out_dir} can be read ({', '.join(start.damaged)}); nothing was deleted: "
            "restore one, or start over in another --out-dir"
        )
    if start.checkpoint is not None:
        step, saved = start.step, start.checkpoint["config"]
        if step > config.max_steps:
            raise UserError(
                f"{start.path} is at step {step}, past --max-steps {config.max_steps}: "
                "give a larger --max-steps to go on"
            )
        fixed = [k for k in FIXED_ON_RESUME if getattr(config, k) is not None and saved.get(k) != getattr(config, k)]
        if fixed:
            was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in fixed)
            now = ", ".join(f"--{k.replace('_', '-')} {getattr(config, k)}" for k in fixed)
            raise UserError(
                f"{start.path} was trained with {was}; this run asks for {now}: resume with the checkpoint's settings"
            )
        log_path = os.path.join(config.out_dir, "log.jsonl")
        if step >= config.max_steps and os.path.exists(log_path):
            ends = [r for r in read_jsonl(log_path) if r.get("event") in ("finished", "stopped")]  # the last one says
            start.finished = bool(ends) and ends[-1]["event"] == "finished" and ends[-1].get("step") == step
        print(f"resuming from {start.path} (step {step})")
    return start


def find_start_on_every_rank(config, master_process, device):
    """Rank 0 decides where the run starts and sends the checkpoint to every rank: other nodes need not see its disk."""
    start = Start(**broadcast_from_rank0(fail_together(lambda: vars(find_start(config)) if master_process else None),
                                         device))  # fmt: skip
    start.damaged = set(start.damaged)  # never pruned; a good checkpoint written under the same name replaces one
    return start


def check_resumable(checkpoint, path):
    """A checkpoint of train.py's own, with everything a resume reads, of the types it reads: checked before any of
    it is used, so that a damaged or crafted file is one line, not a traceback halfway through the resume."""
    missing = [k for k in RESUME_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    wrong = [k for k in RESUME_KEYS if not isinstance(checkpoint[k], dict) and k != "step"]
    if type(checkpoint["step"]) is not int or checkpoint["step"] < 0:
        wrong.append("step")
    if not wrong and type(checkpoint["train_loader"].get("position")) is not int:
        wrong.append("train_loader.position")
    if not wrong:
        kinds = dict(python=tuple, numpy=(tuple, list), torch=torch.Tensor)
        wrong += [f"rng.{k}" for k, kind in kinds.items() if not isinstance(checkpoint["rng"].get(k), kind)]
    if wrong:
        raise UserError(f"{path} is damaged: {', '.join(wrong)} missing or of the wrong type")
    check_shapes(checkpoint["model_config"], checkpoint["model"], path)
    return checkpoint


def check_shapes(model_config, state, path):
    """The weights must have the shapes their model config names, checked on the meta device, which allocates
    nothing: a crafted file of a few KB may claim a model of any size."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**model_config)).state_dict().items()}
        missing = [k for k in expected if k not in state]
        wrong = next((k for k in expected if k in state and tuple(state[k].shape) != expected[k]), None)
    except (TypeError, ValueError, AttributeError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise UserError(f"{path}: its model shape cannot be built ({first_line(e)[:200]})") from e
    if missing:  # else the model would be built (allocated) before loading the weights found them missing
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{path}: its weights lack {missing[0]}{more} that its model shape has")
    if wrong is not None:
        raise UserError(f"{path}: {wrong} is {tuple(state[wrong].shape)}, its model shape needs {expected[wrong]}")


def restore(start, model, optimizer, train_loader, device):
    """Put the checkpoint's weights, optimizer state, data position and RNG states in place, on every rank; returns the
    val loss last measured. The loader must be reading the data the checkpoint was trained on."""
    checkpoint = start.checkpoint
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{start.path}: its weights do not fit this model ({first_line(e)[:200]})") from e
    fail_together(lambda: train_loader.load_state_dict(checkpoint["train_loader"]))  # each rank its own copy
    set_rng_states(checkpoint["rng"], device)
    return checkpoint.get("val_loss")


# ----------------------------------------------------------------------------------------------------------------
# the run's log, read back: whether a run finished, and a resumed run's steps


def read_jsonl(path):
    """The records of a .jsonl file; a line that does not parse (the last one, cut short by a kill) is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_log(path):
    """log.jsonl's step records merged per step; where a resumed run logged a step again, its record wins."""
    steps = {}
    for record in read_jsonl(path):
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:
            steps.setdefault(record["step"], {}).update(record)
    return [steps[s] for s in sorted(steps)]


# ----------------------------------------------------------------------------------------------------------------
# writing: whole files or none, the out dir checked first, one run at a time, and what a kill left half-written


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write path through a temporary file beside it (<path>.<pid>.tmp): flushed to disk and renamed into place on
    success, removed on failure. A reader, or a run started after a crash, never sees a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def check_out_dir(out_dir, flag="--out-dir"):
    """Fail before any work if a directory could not be made or written (the downloader's shards, an export); create
    nothing yet."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{flag} {out_dir} is a file, not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create {flag} {out_dir}: {existing} is a file")
    probe = os.path.join(existing, f".write-test.{os.getpid()}.tmp")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {out_dir}: {e.strerror} ({existing})") from e


def check_output_path(path, flag):
    """Fail before any work if a result could not be written at path (a file, not a directory)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: the directory {parent} does not exist")


def take_out_dir(out_dir, script="train.py", leftovers=r"ckpt_\d{6,}\.pt|loss\.png"):
    """Lock out_dir for this run of script and clear what a killed run left half-written (the files named like the
    regex leftovers; a checkpoint cut short holds up to 1.5 GB for 124M). A second run of script on the same directory
    is refused at once; the kernel drops the lock when its process ends, even by kill -9."""
    import fcntl
    import socket

    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, script.removesuffix(".py") + ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.seek(0)
        owner = lock.read().strip() or "owner unknown"
        raise UserError(
            f"{out_dir} is in use by another {script} ({owner}): wait for it, or choose another --out-dir"
        ) from e
    except OSError as e:  # a file system without flock (Lustre mounted without -o flock, some NFS setups)
        raise UserError(f"cannot lock {lock.name}: {e.strerror}; its file system has no flock: choose another "
                        "--out-dir, or mount it with locking (Lustre: -o flock)") from e  # fmt: skip
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    remove_leftovers(out_dir, leftovers)
    return lock


def remove_leftovers(directory, names):
    """Delete what atomic_write left in directory when a kill cut it short, for the files named like the regex names."""
    leftover = re.compile(rf"^({names})\.\d+\.tmp$")
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if leftover.match(name):
            os.remove(os.path.join(directory, name))


def describe_write_error(e, out_dir, needed_bytes):
    """What went wrong in a write, in words; a full disk (numpy reports it as "N requested and M written") with how
    much room is left and needed."""
    free = shutil.disk_usage(out_dir).free if os.path.isdir(out_dir) else None
    if e.errno == errno.EFBIG:
        return f"a file-size limit (ulimit -f) stopped it ({needed_bytes / 1e6:,.1f} MB needed)"
    if e.errno == errno.ENOSPC or (free is not None and free < needed_bytes):
        return f"the disk holding {out_dir} is full ({free / 1e6:,.1f} MB free, {needed_bytes / 1e6:,.1f} MB needed)"
    return first_line(e)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir (ckpt_<step>.pt), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = sorted((int(m[1]), name) for name in os.listdir(out_dir) if (m := CHECKPOINT_NAME.match(name)))
    return [os.path.join(out_dir, name) for _, name in found]


def last_good_checkpoint(out_dir):
    """What an error tells the user to resume from."""
    paths = list_checkpoints(out_dir)
    return paths[-1] if paths else "none"


def save_checkpoint(path, state):
    """torch.save through atomic_write: a crash mid-write leaves the previous checkpoints untouched."""
    with atomic_write(path) as f:
        torch.save(state, f)


def write_checkpoint(out_dir, state, keep, damaged):
    """ckpt_<step>.pt, then the oldest readable ones pruned down to the newest keep (0: all). Damaged files are never
    pruned: they may sort newer than them all, and the user decides what to do with them."""
    path = os.path.join(out_dir, f"ckpt_{state['step']:06d}.pt")
    try:
        save_checkpoint(path, state)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos", the OSError inside
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(
            f"cannot write checkpoint {path}: {describe_write_error(cause, out_dir, tensor_bytes(state))}; nothing "
            f"of it is left, the checkpoints before it are intact (the newest: {last_good_checkpoint(out_dir)})"
        ) from e
    damaged.discard(os.path.basename(path))  # replaced by a good one
    if keep > 0:
        readable = [p for p in list_checkpoints(out_dir) if os.path.basename(p) not in damaged]
        for old in readable[:-keep]:
            os.remove(old)
    print(f"saved {path}")


def save_run(out_dir, step, model, optimizer, train_loader, device, keep, damaged, master_process, **extra):
    """ckpt_<step>.pt: everything the next step depends on, so that a resumed run continues exactly where this one
    stopped. Its weights are checked on every rank (they hold the same ones); rank 0 writes it."""
    check_weights(model, step, out_dir)
    if master_process:
        state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     model_config=asdict(model.config), train_loader=train_loader.state_dict(), rng=rng_states(device),
                     **extra)  # fmt: skip
        write_checkpoint(out_dir, state, keep, damaged)


def tensor_bytes(obj):
    """About what a checkpoint of obj takes on disk: the bytes of the tensors in it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


def load_checkpoint(path, foreign=()):
    """A checkpoint's contents, unpickled with weights_only: no code runs. foreign: classes another program pickled
    in its checkpoints, as (stand-in, name), allowed too."""
    try:
        with torch.serialization.safe_globals(list(foreign)):
            # memory-mapped: pages are read as needed and shared by the processes of a node
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated or foreign files fail in the unpickler with many exception types
        raise UserError(
            f"cannot read checkpoint {path}: not a complete checkpoint ({type(e).__name__}: {first_line(e)[:200]})"
        ) from e


def check_loss(loss, norm, step, out_dir):
    """A NaN or infinite loss or gradient norm stops the run, pointing at the last good checkpoint."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise UserError(
            f"step {step}: the train loss is {loss}, the gradient norm {norm}; stopped. The last good checkpoint is "
            f"{last_good_checkpoint(out_dir)}: lower --max-lr or check the data, then --resume (if it fails again, "
            "that checkpoint was already diverging: move it away to resume from the one before)"
        )


def check_weights(model, step, out_dir):
    """A step can leave NaN or infinite weights behind a finite loss (a huge learning rate): never save those."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(
            f"step {step}: the update left NaN or infinite weights; not saved. The last good checkpoint is "
            f"{last_good_checkpoint(out_dir)}: lower --max-lr, then --resume"
        )


# ----------------------------------------------------------------------------------------------------------------
# stopping: a signal, the launcher gone, or an error on one rank; every rank together


class StopSignal:
    """SIGTERM (how SLURM and Kubernetes stop a job), Ctrl-C or a hang-up (a closed terminal): the run stops at the
    next micro-step or evaluation batch, writes a checkpoint and exits. One stop may arrive more than once (SLURM
    signals every process, torchrun passes it on): a signal within REPEAT_S of the first is that one again; a later one
    ends the run at once. Caught in a with block."""

    REPEAT_S = 2.0

    def __init__(self):
        self.signum, self.since, self.previous = None, None, {}

    def handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.since = signum, time.monotonic()
            print(f"{signal.Signals(signum).name}: stopping at the next micro-step with a checkpoint (a signal "
                  f"more than {self.REPEAT_S:.0f} s later stops at once)", file=sys.stderr)  # fmt: skip
        elif time.monotonic() - self.since > self.REPEAT_S:  # a second stop: at once, as the signal does uncaught
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def fail(self):
        """Stop as a signal would, for a reason of the run's own (its log cannot be written): at the next micro-step,
        with a checkpoint if one can be written."""
        if self.signum is None:
            self.signum, self.since = signal.SIGTERM, time.monotonic()

    def arrived(self):
        """Whether this rank got a stop signal: a check between evaluation batches, without a collective (the ranks
        may have different numbers of batches); requested() then makes every rank agree."""
        return self.signum is not None

    def requested(self, device):
        """The signal any rank received (0: none), the same on every rank, so that all stop at the same point."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum or 0  # one process: no collective, no wait for the GPU
        signum = torch.tensor(self.signum or 0, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum.item())

    def __enter__(self):
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal closed (an SSH session dropped)
        self.previous = {sig: signal.signal(sig, self.handle) for sig in stops}
        return self

    def __exit__(self, *exc):  # the handlers from before
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def fail_together(fn):
    """fn() on every rank. A UserError on any rank is raised on every rank (naming the rank it came from): a rank that
    stopped alone would leave the others waiting in their next collective."""
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, e = failed[0]
            raise UserError(e if rank == dist.get_rank() or error == e else f"rank {rank}: {e}")
    elif error is not None:
        raise UserError(error)
    return result


def watch_launcher(master_process):
    """The launcher gone (torchrun killed by kill -9, or out of memory): stop as if preempted, with a checkpoint at the
    next micro-step, and free the out dir for the next run. Restarts on (torchrun --max-restarts) without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as train.sh sets it: restarted ranks may read a peer's address from the
    attempt before and fail or hang (pytorch#135712); rank 0 says so, once."""
    when_gone(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if master_process and restarts > 0 and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0:
            print("note: with --max-restarts, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (train.sh does): else restarted "
                  "ranks can read a peer's old address and fail or hang (pytorch#135712)")  # fmt: skip


def when_gone(pid, then):
    """Call then() in a daemon thread as soon as process pid has ended, however it ended (kill -9 included)."""

    def watch():
        try:
            select.select([os.pidfd_open(pid)], [], [])  # Linux: readable when the process has ended
        except (AttributeError, OSError):  # another system, or pid has already gone
            with contextlib.suppress(ProcessLookupError):
                while not os.kill(pid, 0):  # None while pid lives
                    time.sleep(0.5)
        then()

    threading.Thread(target=watch, daemon=True, name="when-gone").start()


# ----------------------------------------------------------------------------------------------------------------
# random generators, and what rank 0 read sent to every rank


def rng_states(device):
    """Every random generator's state, so that a resumed run draws what the uninterrupted one would have."""
    np_state = np.random.get_state()  # its array as a list: checkpoints load with weights_only, which has no numpy
    states = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
                  torch=torch.get_rng_state())  # fmt: skip
    if is_cuda(device):
        states["cuda"] = torch.cuda.get_rng_state(device)  # this GPU's only: a resume may see fewer or more GPUs
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state((states["numpy"][0], np.array(states["numpy"][1], dtype=np.uint32), *states["numpy"][2:]))
    torch.set_rng_state(states["torch"].cpu())
    if is_cuda(device) and "cuda" in states:  # a checkpoint written on a CPU has none
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def broadcast_from_rank0(obj, device):
    """Rank 0's obj (nested dicts, lists and tuples of tensors and plain values) on every rank, so that nothing rank 0
    read from its disk has to be on the others'. The structure travels pickled; each tensor on its own through the
    process group, onto device: no rank builds a second copy of a checkpoint in RAM."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    tensors = []

    def skeleton(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return ("__tensor__", len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: skeleton(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(skeleton(v) for v in x)
        return x

    holder = [skeleton(obj) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0, device=torch.device(device) if is_cuda(device) else None)
    comm_device = device if dist.get_backend() == "nccl" else "cpu"

    def fill(x):
        if isinstance(x, tuple) and len(x) == 4 and x[0] == "__tensor__":
            _, i, shape, dtype = x
            if dist.get_rank() == 0:
                t = tensors[i].to(comm_device).contiguous()  # a collective needs dense memory
            else:
                t = torch.empty(shape, dtype=dtype, device=comm_device)
            dist.broadcast(t, src=0)
            return t
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(holder[0])
