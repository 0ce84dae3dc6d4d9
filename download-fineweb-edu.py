"""
Download FineWeb-Edu (sample-10BT) and tokenize it into GPT-2 token shards for pretraining.
https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu

    python download-fineweb-edu.py                          # the reference run's 5B train tokens (+ 100M val)
    python download-fineweb-edu.py --data-files corpus.jsonl --out-dir data --shard-size 1e6   # any local corpus
    python download-fineweb-edu.py --verify                 # check every shard against the manifest

The documents are streamed, so only what is needed is fetched. Each document becomes <|endoftext|> followed by its
tokens; the token stream is cut into uint16 shards of --shard-size tokens: first the val shard <prefix>_val_000000.npy
(whole documents only), then train shards <prefix>_train_000001.npy, ... until --max-tokens train tokens.
Shards are written atomically and recorded in manifest.json; a killed run started again with the same arguments
continues after the last finished shard and ends with byte-identical files.
"""

import collections
import errno
import glob
import gzip
import json
import multiprocessing as mp
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from utils import (
    EOT,
    UserError,
    atomic_write,
    check_token_ids,
    config_parser,
    first_line,
    get_tokenizer,
    run_cli,
    sha256_file,
)

MANIFEST = "manifest.json"
EOT_ARRAY = np.array([EOT], dtype=np.uint32)


@dataclass
class Config:
    out_dir: str = "edu_fineweb10B"  # where the shards and manifest.json go
    prefix: str = "edufineweb"  # shard names: <prefix>_<split>_<NNNNNN>.npy
    dataset: str = "HuggingFaceFW/fineweb-edu"  # Hugging Face dataset, read in streaming mode
    name: str = "sample-10BT"  # the dataset's config
    split: str = "train"  # the dataset's split
    data_files: list = field(default_factory=list)  # local jsonl/json/parquet/txt files or globs, instead of the hub
    text_field: str = "text"  # the field that holds each document's text
    max_tokens: int = 5_000_000_000  # train tokens to write, after the val shard
    shard_size: int = 100_000_000  # tokens per shard
    workers: int = os.cpu_count() or 1  # tokenizer processes
    verify: bool = False  # only check every shard against the manifest


def parse_args(argv=None):
    parser = config_parser(Config, __doc__)
    args = Config(**vars(parser.parse_args(argv)))
    if args.shard_size < 1 or args.max_tokens < 1:
        parser.error("--shard-size and --max-tokens must be positive")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.prefix or "/" in args.prefix or args.prefix.startswith("."):
        parser.error(f"--prefix must be a plain file-name part, got {args.prefix!r}")
    if not args.out_dir:
        parser.error("--out-dir must not be empty")
    if args.workers > (os.cpu_count() or 1):  # more processes than cores only costs memory and forks
        args.workers = os.cpu_count() or 1
    return args


# ----------------------------------------------------------------------------------------------------------------
# reading documents


def resolve_data_files(patterns):
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            bad = next((m for m in matches if not os.path.isfile(m)), pattern)
            what = (
                "a directory: give the files in it (a glob like dir/*.jsonl)" if os.path.isdir(bad) else "no such file"
            )
            raise UserError(f"cannot read --data-files {bad}: {what}")
        files += [os.path.abspath(m) for m in matches]
    return files


def file_format(files):
    formats = set()
    for f in files:
        name = f[:-3] if f.endswith(".gz") else f
        ext = os.path.splitext(name)[1]
        formats.add({".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}.get(ext, ext))
    if len(formats) != 1 or not formats <= {"json", "parquet", "text"}:
        raise UserError(f"--data-files must all be .jsonl/.json, .parquet or .txt (one kind), got {sorted(formats)}")
    return formats.pop()


def open_dataset(args, files):
    """A streaming datasets.IterableDataset: the same code path for the hub and for local files."""
    import datasets

    if files:
        fmt = file_format(files)
        extra = dict(sample_by="document") if fmt == "text" else dict()  # a .txt file is one document
        try:
            return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **extra)
        except Exception as e:  # it reads the first rows to learn the columns
            raise UserError(
                f"cannot read {', '.join(files)}: {explain_read_error(files[0], args.text_field, e)}"
            ) from e
    try:
        check_hub_reachable()
        return datasets.load_dataset(args.dataset, name=args.name, split=args.split, streaming=True)
    except Exception as e:  # offline: ConnectionError; the hub client raises several other kinds too
        raise UserError(
            f"cannot open {args.dataset} ({args.name}) on the Hugging Face hub: {first_line(e)}; "
            "with no network, tokenize local files with --data-files"
        ) from e


def check_hub_reachable():
    """One quick request first: offline, the hub client would retry for half a minute before it gives up. Skipped
    in the hub's offline mode, where the local cache serves."""
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=15).close()
    except urllib.error.HTTPError:
        pass  # it answered: reachable
    except OSError as e:
        raise ConnectionError(f"cannot reach {endpoint} ({getattr(e, 'reason', e)})") from e


def first_bad_line(path, text_field):
    """Where a jsonl file goes wrong, as 'line N ...' (datasets counts rows per chunk, not lines), or None."""
    if file_format([path]) != "json":
        return None
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                return f"line {n} is not UTF-8 (byte {e.start + 1} of the line)"
            except json.JSONDecodeError as e:
                return f"line {n} is not JSON ({e.msg})"
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                return f"line {n}: field {text_field!r} is {describe_text(text)}"
    return None


def describe_text(text):
    return "missing" if text is None else f"{type(text).__name__}, not a string"


def explain_read_error(path, text_field, e):
    return first_bad_line(path, text_field) or first_line(e)


def document_batches(args, files, skip, batch_size=1024):
    """Lists of document texts, in order, leaving out the first `skip` documents. Local files are read one at a
    time, so that a bad document is reported by file and row."""
    sources = (
        [([f], f) for f in files if os.path.getsize(f) > 0] if files else [(None, f"{args.dataset} ({args.name})")]
    )
    seen = 0
    for source_files, name in sources:
        batches = iter(open_dataset(args, source_files).iter(batch_size=batch_size))
        row = 0  # rows of this source read so far
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # datasets wraps bad JSON, bad parquet and I/O errors in many exception types
                where = explain_read_error(name, args.text_field, e) if files else first_line(e)
                raise UserError(f"cannot read {name}: {where}") from e
            if args.text_field not in batch:
                fields = ", ".join(batch)
                raise UserError(f"{name} has no field {args.text_field!r} (fields: {fields}); set --text-field")
            texts = batch[args.text_field]
            for i, text in enumerate(texts):
                if not isinstance(text, str):  # never written as an empty document: the shards would not say so
                    where = first_bad_line(name, args.text_field) if files else None
                    where = where or f"row {row + i + 1}: field {args.text_field!r} is {describe_text(text)}"
                    raise UserError(f"{name}: {where}")
            row += len(texts)
            start = min(max(skip - seen, 0), len(texts))
            seen += len(texts)
            if start < len(texts):
                yield texts[start:]


def tokenize_batch(texts):
    """Worker: the texts as one uint16 array, each document as EOT + its tokens, plus each document's length."""
    enc = get_tokenizer()
    # encode_to_numpy skips building a Python list per document; disallowed_special=() reads "<|endoftext|>"
    # inside a text as plain text, exactly like encode_ordinary
    encoded = [enc.encode_to_numpy(text, disallowed_special=()) for text in texts]
    tokens = np.concatenate([part for doc in encoded for part in (EOT_ARRAY, doc)])
    lengths = np.array([len(doc) + 1 for doc in encoded], dtype=np.int64)
    return tokens.astype(np.uint16), lengths  # GPT-2's 50,257 ids fit in uint16


def tokenized_documents(batches, workers):
    """Token arrays of the documents, in input order, tokenized in parallel. At most 2 batches per worker are in
    flight, so memory stays bounded however fast the input arrives; the order makes the output deterministic."""
    get_tokenizer()  # built once here; the forked workers inherit it
    # unlike multiprocessing.Pool, the executor notices a worker that dies (killed, out of memory): no hang
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        pending = collections.deque()
        try:
            for texts in batches:
                pending.append(pool.submit(tokenize_batch, texts))
                while len(pending) >= 2 * workers or (pending and pending[0].done()):
                    yield from split_documents(*pending.popleft().result())
            while pending:
                yield from split_documents(*pending.popleft().result())
        except BrokenProcessPool as e:
            raise UserError(
                "a tokenizer process died (killed, or out of memory?): the finished shards are kept; run again to "
                "continue, with fewer --workers if memory is short"
            ) from e


def split_documents(tokens, lengths):
    ends = np.cumsum(lengths)
    for end, n in zip(ends.tolist(), lengths.tolist()):
        yield tokens[end - n : end]


def python_docs_corpus():
    """English text that ships with Python itself, no download: the reference manual's topics (pydoc_data) and every
    long docstring of the standard library's modules, classes and functions (read with ast, nothing imported).
    About 2,500 documents and 500k GPT-2 tokens."""
    import ast
    import glob
    import pydoc_data.topics
    import sysconfig

    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, stdlib)
        if rel.startswith(("site-packages", "test", "idlelib", "lib2to3")):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# writing shards


def source_settings(args, files):
    source = dict(
        text_field=args.text_field, shard_size=args.shard_size, max_tokens=args.max_tokens, prefix=args.prefix
    )
    if files:
        source["data_files"] = files
    else:
        source.update(dataset=args.dataset, name=args.name, split=args.split)
    return source


def describe_write_error(e, out_dir, needed_bytes):
    """What went wrong in a write, in words; a full disk (numpy reports it as "N requested and M written") with how
    much room is left and needed."""
    free = shutil.disk_usage(out_dir).free if os.path.isdir(out_dir) else None
    if e.errno == errno.ENOSPC or (free is not None and free < needed_bytes):
        return f"the disk holding {out_dir} is full ({free / 1e6:,.1f} MB free, {needed_bytes / 1e6:,.1f} MB needed)"
    return first_line(e)


def check_out_dir(out_dir):
    """Fail before any downloading or tokenizing if the shards could not be written; create nothing yet."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create --out-dir {out_dir}: {existing} is a file")
    probe = os.path.join(existing, f".write-test.{os.getpid()}.tmp")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror} ({existing})") from e


def write_json_atomic(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest["source"], dict) or not isinstance(manifest["complete"], bool):
            raise TypeError("source or complete of the wrong type")
        for shard in manifest["shards"]:
            types = dict(file=str, split=str, tokens=int, next=list, sha256=str)
            if not all(isinstance(shard[key], t) for key, t in types.items()) or len(shard["next"]) != 2:
                raise TypeError(f"shard entry {shard!r:.80} is incomplete")
        return manifest
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is damaged ({first_line(e)}): the shards cannot be checked or continued without it; "
            "restore it, or start over in another --out-dir"
        ) from e


def input_fingerprint(files):
    """Size and modification time of each local input: a corpus edited between a kill and the rerun is noticed."""
    return [dict(file=f, size=os.path.getsize(f), mtime_ns=os.stat(f).st_mtime_ns) for f in files]


def load_manifest(out_dir, source, files):
    """The manifest of an earlier run with the same settings, or a fresh one; refuses an out dir made otherwise."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        manifest = read_manifest(out_dir)
        for key in sorted(set(source) | set(manifest["source"])):
            if manifest["source"].get(key) != source.get(key):
                raise UserError(
                    f"{out_dir} holds shards made with {key}={manifest['source'].get(key)!r}, not {source.get(key)!r}: "
                    "use another --out-dir, or delete this one to start over"
                )
        for shard in manifest["shards"] if not manifest["complete"] else []:
            path = os.path.join(out_dir, shard["file"])
            if not os.path.isfile(path) or os.path.getsize(path) < 2 * shard["tokens"]:
                raise UserError(
                    f"{path}, a finished shard, is missing or cut short: continuing would leave a gap; "
                    "restore it, or start over in another --out-dir"
                )
        for was, now in zip(manifest.get("inputs", []), input_fingerprint(files)):
            if was != now and not manifest["complete"]:
                raise UserError(
                    f"{now['file']} changed since {out_dir} was started (size {was['size']:,} -> "
                    f"{now['size']:,} bytes, or its modification time): the shards so far hold the old text; "
                    "restore the file, or start over in another --out-dir"
                )
        return manifest
    if os.path.isdir(out_dir) and any(n.endswith(".npy") for n in os.listdir(out_dir)):
        raise UserError(f"{out_dir} holds .npy files but no {MANIFEST}: use an empty --out-dir")
    return dict(source=source, inputs=input_fingerprint(files), shards=[], complete=False)


class ShardWriter:
    """Fills shards from the document stream. Every finished shard is written to a temporary file, renamed into
    place, then recorded in the manifest together with where the next shard starts (document, token offset)."""

    def __init__(self, out_dir, manifest):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size = manifest["source"]["shard_size"]
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0
        self.first_document = None

    @property
    def split(self):
        return "val" if len(self.manifest["shards"]) == 0 else "train"

    def flush(self, next_document, next_offset, last_document):
        index = len(self.manifest["shards"])
        name = f"{self.manifest['source']['prefix']}_{self.split}_{index:06d}.npy"
        path = os.path.join(self.out_dir, name)
        try:
            os.makedirs(self.out_dir, exist_ok=True)  # only now: a run that never gets data leaves no empty folder
            with atomic_write(path) as f:
                np.save(f, self.buffer[: self.fill])
        except OSError as e:
            raise UserError(
                f"{describe_write_error(e, self.out_dir, 2 * self.shard_size)} while writing {path}: the partial shard "
                f"was removed, the {index} finished shards and {MANIFEST} are intact; run again to continue"
            ) from e
        self.manifest["shards"].append(
            dict(
                file=name,
                split=self.split,
                tokens=self.fill,
                first_document=self.first_document,
                last_document=last_document,
                next=[next_document, next_offset],
                sha256=sha256_file(path),
            )
        )
        try:
            write_json_atomic(os.path.join(self.out_dir, MANIFEST), self.manifest)
        except OSError as e:
            raise UserError(
                f"{describe_write_error(e, self.out_dir, 1_000_000)} while writing {MANIFEST} in {self.out_dir}: "
                f"it still lists the {index} shards before {name}; run again to continue (that shard is rewritten)"
            ) from e
        self.fill = 0
        self.first_document = None


def tokenize_to_shards(args, files, manifest, progress):
    """Write shards until max_tokens train tokens or the end of the corpus; returns the documents read."""
    writer = ShardWriter(args.out_dir, manifest)
    doc_index, offset = manifest["shards"][-1]["next"] if manifest["shards"] else (0, 0)
    train_written = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    source = ", ".join(files) if files else f"{args.dataset} ({args.name})"
    batches = document_batches(args, files, skip=doc_index)
    for doc in tokenized_documents(batches, args.workers):
        pos = offset  # a resumed run skips what the previous shard already holds of this document
        offset = 0
        while pos < len(doc):
            if writer.split == "val" and writer.fill > 0 and writer.fill + len(doc) > writer.shard_size:
                writer.flush(doc_index, 0, doc_index - 1)  # the val shard holds whole documents only
                continue
            if writer.first_document is None:
                writer.first_document = doc_index
            take = min(len(doc) - pos, writer.shard_size - writer.fill)
            if writer.split == "train":
                take = min(take, args.max_tokens - train_written)
                train_written += take
            writer.buffer[writer.fill : writer.fill + take] = doc[pos : pos + take]
            writer.fill += take
            pos += take
            progress.update(take)
            if train_written == args.max_tokens:
                writer.flush(doc_index, pos, doc_index)
                return doc_index + 1
            if writer.fill == writer.shard_size:
                done = pos == len(doc)
                writer.flush(doc_index + done, 0 if done else pos, doc_index)
        doc_index += 1
        if doc_index % 1000 == 0:
            docs_per_sec = doc_index / max(progress.format_dict["elapsed"], 1e-9)
            progress.set_postfix(docs=f"{doc_index:,}", docs_per_s=f"{docs_per_sec:,.0f}", refresh=False)
    if writer.fill > 0:
        writer.flush(doc_index, 0, doc_index - 1)
    if not manifest["shards"]:
        raise UserError(f"empty corpus: {source} holds no documents")
    return doc_index


def verify(out_dir):
    """Check every shard against the manifest; returns the number of shards, or raises naming the first bad file."""
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise UserError(f"no {MANIFEST} in {out_dir}: nothing to verify")
    manifest = read_manifest(out_dir)
    for shard in manifest["shards"]:
        file = os.path.join(out_dir, shard["file"])
        if not os.path.exists(file):
            raise UserError(f"verify failed: {file} is missing")
        try:
            tokens = np.load(file, mmap_mode="r")
        except Exception as e:
            raise UserError(f"verify failed: {file} is not a readable .npy file ({first_line(e)})") from e
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"verify failed: {file} holds {tokens.dtype} {tokens.shape}, expected uint16 (N,)")
        if len(tokens) != shard["tokens"]:
            raise UserError(
                f"verify failed: {file} holds {len(tokens):,} tokens, the manifest says {shard['tokens']:,}"
            )
        if sha256_file(file) != shard["sha256"]:
            raise UserError(f"verify failed: {file} does not match its sha256 in the manifest")
        try:
            check_token_ids(tokens, file)
        except UserError as e:
            raise UserError(f"verify failed: {e}") from e
    return manifest


def main(argv=None):
    args = parse_args(argv)
    if args.verify:
        manifest = verify(args.out_dir)
        tokens = sum(s["tokens"] for s in manifest["shards"])
        state = "complete" if manifest["complete"] else "incomplete: run again to continue"
        print(f"ok: {len(manifest['shards'])} shards, {tokens:,} tokens match {MANIFEST} ({state})")
        return
    check_out_dir(args.out_dir)
    files = resolve_data_files(args.data_files) if args.data_files else []
    source = source_settings(args, files)
    manifest = load_manifest(args.out_dir, source, files)
    if manifest["complete"]:
        print(f"{args.out_dir} is complete ({len(manifest['shards'])} shards); --verify checks it")
        return
    for name in os.listdir(args.out_dir) if os.path.isdir(args.out_dir) else []:
        if re.match(rf"^({re.escape(args.prefix)}_(val|train)_\d{{6}}\.npy|{re.escape(MANIFEST)})\.\d+\.tmp$", name):
            # a shard or manifest left half-written by a killed run (atomic_write's name for it)
            os.remove(os.path.join(args.out_dir, name))

    t0 = time.time()
    done = sum(s["tokens"] for s in manifest["shards"])
    with tqdm(initial=done, unit="tok", unit_scale=True, smoothing=0.1, desc="tokenizing") as progress:
        documents = tokenize_to_shards(args, files, manifest, progress)
    manifest["complete"] = True
    manifest["documents"] = documents
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    write_json_atomic(os.path.join(args.out_dir, MANIFEST), manifest)
    seconds = time.time() - t0
    n_train = sum(s["split"] == "train" for s in manifest["shards"])
    print(
        f"done: {documents:,} documents, {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards "
        f"(1 val, {n_train} train) under {args.out_dir}, {seconds:.1f} s, "
        f"{(manifest['tokens'] - done) / seconds:,.0f} tokens/s"
    )
    if n_train == 0:
        print(
            "warning: the corpus ended inside the val shard, so there are no train shards: use a smaller --shard-size"
        )


if __name__ == "__main__":
    run_cli(main)
