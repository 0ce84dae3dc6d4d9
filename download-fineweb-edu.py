"""
Download FineWeb-Edu (sample-10BT) and tokenize it into GPT-2 token shards for pretraining.
https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu

    python download-fineweb-edu.py                          # the reference run's 5B train tokens (+ 100M val)
    python download-fineweb-edu.py --data-files corpus.jsonl --out-dir data --shard-size 1e6   # any local corpus
    python download-fineweb-edu.py --data-files 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/00*.parquet'
    python download-fineweb-edu.py --verify                 # check every shard against the manifest

The dataset is read as its files in a fixed order (listed once through huggingface_hub, pinned to the dataset's
commit); parquet files are read with HTTP range requests, only the text column of the row groups needed (http_files.py
says how). Each document becomes <|endoftext|> and its tokens; the stream is cut into uint16 shards of --shard-size
tokens: the val shard <prefix>_val_000000.npy (whole documents only), then <prefix>_train_000001.npy, ... until
--max-tokens train tokens. Each shard is written atomically, then recorded in manifest.json (tokens, first and last
document, sha256, fingerprint, and where the next one starts: document and offset, `next`, and file and row,
`next_position`): a killed run started again with the same arguments opens that file at that row, fetches nothing
before it, and ends with byte-identical files. A full disk removes the partial shard and leaves the manifest valid.

Tokenizer processes come from a fork server, never forked while threads download (a fork copies their locks as they
are). Batches go out at most two per process and come back in order: the shards do not depend on --workers. None
outlives this process however it ends (Ctrl-C, SIGTERM: exit 130, 143, finished shards kept), even by kill -9; one
that dies is a one-line error at once. Below: Config, main, the shards loop, writer and manifest, the readers, the pool.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load (torch takes seconds): out at once, quietly
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))  # nothing is started or written yet

import collections
import contextlib
import glob
import gzip
import io
import json
import multiprocessing as mp
import multiprocessing.forkserver
import re
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np
from tqdm import tqdm

from checkpoint import atomic_write, check_out_dir, describe_write_error, take_out_dir, when_gone, write_json
from http_files import HTTPClient, HTTPFile, Retry, hub_files, is_remote, list_files, open_source, read_ahead
from utils import (
    EOT,
    SHARD_NAME,
    UserError,
    call_in_script,
    check_flags,
    check_token_ids,
    config_parser,
    first_line,
    get_tokenizer,
    run_cli,
    sha256_file,
    shard_fingerprint,
)

MANIFEST = "manifest.json"
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Config:
    out_dir: str = "edu_fineweb10B"  # where the shards and manifest.json go
    prefix: str = None  # shard names <prefix>_<split>_<NNNNNN>.npy (default: edufineweb for FineWeb-Edu, else shard)
    dataset: str = "HuggingFaceFW/fineweb-edu"  # Hugging Face dataset
    name: str = "sample-10BT"  # the dataset's config
    split: str = "train"  # the dataset's split
    revision: str = "main"  # the dataset's branch, tag or commit; the manifest pins the commit it resolved to
    data_files: list = field(default_factory=list)  # jsonl/parquet/txt files instead: paths, globs, URLs, hf:// paths
    text_field: str = "text"  # the field that holds each document's text
    max_tokens: int = 5_000_000_000  # train tokens to write, after the val shard
    shard_size: int = 100_000_000  # tokens per shard
    workers: int = os.cpu_count() or 1  # tokenizer processes
    connections: int = 8  # HTTP requests in flight at once, on kept-alive connections
    stall_seconds: float = 30.0  # a response silent, or slower than 10 KB/s, this long is dropped and retried
    retries: int = 8  # attempts of a network request that fails with a transient error
    retry_wait: float = 1.0  # seconds before the first retry; doubled after each (with jitter), at most 60
    verify: bool = False  # only check every shard against the manifest


def parse_args(argv=None):
    args = Config(**vars(config_parser(Config, __doc__).parse_args(argv)))
    check_flags(args, "at least 1", lambda v: v >= 1, "shard_size", "max_tokens", "workers", "retries", "connections")
    check_flags(args, "0 or more", lambda v: v >= 0, "retry_wait")
    check_flags(args, "more than 0", lambda v: v > 0, "stall_seconds")
    check_flags(args, "a plain file-name part", lambda p: p is None or p and "/" not in p and p[0] != ".", "prefix")
    check_flags(args, "a directory name", bool, "out_dir")
    args.workers = min(args.workers, os.cpu_count() or 1)  # more processes than cores only costs memory
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.verify:
        manifest = verify(args.out_dir)
        tokens = sum(s["tokens"] for s in manifest["shards"])
        state = "complete" if manifest["complete"] else "incomplete: run again to continue"
        print(f"ok: {len(manifest['shards'])} shards, {tokens:,} tokens match {MANIFEST} ({state})")
        return
    check_out_dir(args.out_dir)
    if args.prefix is None:  # an out dir goes on with the names it began with
        manifest = read_manifest(args.out_dir) if os.path.exists(os.path.join(args.out_dir, MANIFEST)) else {}
        fineweb_edu = not args.data_files and args.dataset == Config.dataset
        args.prefix = manifest.get("source", {}).get("prefix") or ("edufineweb" if fineweb_edu else "shard")
    retry = Retry(args.retries, args.retry_wait, then="the finished shards are kept: run again to continue")
    source = source_settings(args)
    manifest = load_manifest(args.out_dir, source)
    files = manifest["files"] if manifest else input_files(args, source, retry)  # listed once, kept in the manifest
    # one downloader per out dir; then a shard or the manifest left half-written by a killed run is removed
    leftovers = rf"{re.escape(args.prefix)}_(val|train)_\d{{6}}\.npy|{re.escape(MANIFEST)}"
    with take_out_dir(args.out_dir, "download-fineweb-edu.py", leftovers):
        manifest = load_manifest(args.out_dir, source) or dict(  # again: another run may have written it meanwhile
            source=source, files=files, inputs=input_fingerprint(files), shards=[], complete=False
        )
        if manifest["complete"]:
            print(f"{args.out_dir} is complete ({len(manifest['shards'])} shards); --verify checks it")
            return
        write_shards(args, manifest, retry)


def write_shards(args, manifest, retry):
    """Shards from where the manifest ends to the end, then the manifest says complete."""
    t0 = time.time()
    done = sum(s["tokens"] for s in manifest["shards"])
    with tqdm(initial=done, unit="tok", unit_scale=True, smoothing=0.1, desc="tokenizing") as progress:
        documents = tokenize_to_shards(args, manifest["files"], manifest, progress, retry)
    manifest.update(complete=True, documents=documents, tokens=sum(s["tokens"] for s in manifest["shards"]))
    write_json(os.path.join(args.out_dir, MANIFEST), manifest)
    seconds = time.time() - t0
    n_train = sum(s["split"] == "train" for s in manifest["shards"])
    rate = (manifest["tokens"] - done) / seconds
    print(f"done: {documents:,} documents, {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards "
          f"(1 val, {n_train} train) under {args.out_dir}, {seconds:.1f} s, {rate:,.0f} tokens/s")  # fmt: skip
    if n_train == 0:
        print("warning: the corpus ended in the val shard, no train shard: try a smaller --shard-size", file=sys.stderr)


def tokenize_to_shards(args, files, manifest, progress, retry):
    """Write shards until max_tokens train tokens or the end of the corpus; returns the documents read."""
    writer = ShardWriter(args.out_dir, manifest)
    last = manifest["shards"][-1] if manifest["shards"] else dict(next=[0, 0], next_position=[0, 0])
    doc_index, offset = last["next"]  # the document the next shard starts in, and how far into it
    if writer.train_tokens >= args.max_tokens:  # killed after the last shard, before the manifest said complete
        return doc_index + (offset > 0)
    # read from the (file, row) where the last shard ended, while the tokenizer processes work on what came before
    client = HTTPClient(retry, args.connections, args.stall_seconds)
    manifest.setdefault("remote_inputs", {})  # filled as the files are opened (by the reader thread)
    batches = read_ahead(document_batches(files, args.text_field, tuple(last["next_position"]), client, manifest),
                         4 * args.workers + 4, client.close)  # fmt: skip
    documents = tokenized_documents(batches, args.workers)
    with contextlib.closing(documents), contextlib.closing(batches):  # on any exit, the reader thread stops too
        for (file, row), doc in documents:
            pos, offset = offset, 0  # a resumed run skips what the previous shard already holds of this document
            while pos < len(doc):
                if writer.split == "val" and writer.fill > 0 and writer.fill + len(doc) > writer.shard_size:
                    writer.flush(doc_index, 0, doc_index - 1, (file, row))  # the val shard holds whole documents only
                    continue
                taken = writer.add(doc_index, doc[pos:], args.max_tokens)
                pos += taken
                progress.update(taken)
                if writer.train_tokens == args.max_tokens:
                    writer.flush(doc_index, pos, doc_index, (file, row))
                    return doc_index + 1
                if writer.fill == writer.shard_size:
                    if writer.split == "val":  # a document longer than the val shard is cut: no document is in both
                        pos = len(doc)
                    done = pos == len(doc)  # the next shard starts with the next document, or inside this one
                    writer.flush(doc_index + done, 0 if done else pos, doc_index, (file, row + done))
            doc_index += 1
            if doc_index % 1000 == 0:
                docs_per_sec = doc_index / max(progress.format_dict["elapsed"], 1e-9)
                progress.set_postfix(docs=f"{doc_index:,}", docs_per_s=f"{docs_per_sec:,.0f}", refresh=False)
    if writer.fill > 0:
        writer.flush(doc_index, 0, doc_index - 1, (len(files), 0))
    if not manifest["shards"]:
        source = ", ".join(files) if len(files) < 4 else f"{files[0]} and {len(files) - 1} more files"
        raise UserError(f"empty corpus: {source} holds no documents")
    return doc_index


# ----------------------------------------------------------------------------------------------------------------
# the shard writer and the manifest


class ShardWriter:
    """Fills shards from the document stream. Every finished shard is written to a temporary file, renamed into
    place, then recorded in the manifest together with where the next shard starts."""

    def __init__(self, out_dir, manifest):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size = manifest["source"]["shard_size"]
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0  # tokens in the buffer
        self.first_document = None  # the document the buffer starts in
        self.train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")  # written so far

    @property
    def split(self):
        return "val" if len(self.manifest["shards"]) == 0 else "train"

    def add(self, document, tokens, max_train_tokens):
        """As many of a document's tokens as the shard has room for (and max_train_tokens allows); returns how many."""
        take = min(len(tokens), self.shard_size - self.fill)
        if self.split == "train":
            take = min(take, max_train_tokens - self.train_tokens)
            self.train_tokens += take
        if self.first_document is None:
            self.first_document = document
        self.buffer[self.fill : self.fill + take] = tokens[:take]
        self.fill += take
        return take

    def flush(self, next_document, next_offset, last_document, next_position):
        index = len(self.manifest["shards"])
        name = f"{self.manifest['source']['prefix']}_{self.split}_{index:06d}.npy"
        path = os.path.join(self.out_dir, name)
        try:
            with atomic_write(path) as f:
                np.save(f, self.buffer[: self.fill])
        except OSError as e:
            raise UserError(
                f"{describe_write_error(e, self.out_dir, 2 * self.shard_size)} while writing {path}: the partial shard "
                f"was removed, the {index} finished shards and {MANIFEST} are intact; run again to continue"
            ) from e
        # where the next shard starts, as (document, token offset) and as (file, row) in the input files
        entry = dict(file=name, split=self.split, tokens=self.fill, first_document=self.first_document,
                     last_document=last_document, next=[next_document, next_offset],
                     next_position=list(next_position), sha256=sha256_file(path),
                     fingerprint=shard_fingerprint(path))  # fmt: skip
        self.manifest["shards"].append(entry)
        try:
            write_json(os.path.join(self.out_dir, MANIFEST), self.manifest)
        except OSError as e:
            raise UserError(
                f"{describe_write_error(e, self.out_dir, 1_000_000)} while writing {MANIFEST} in {self.out_dir}: "
                f"it still lists the {index} shards before {name}; run again to continue (that shard is rewritten)"
            ) from e
        self.fill = 0
        self.first_document = None


def source_settings(args):
    """What the shards are made of: an out dir is only continued with the same."""
    source = {k: getattr(args, k) for k in ("text_field", "shard_size", "max_tokens", "prefix")}
    if args.data_files:  # local files as found, remote ones as given: a rerun does not list the hub again
        source["data_files"] = [f for p in args.data_files for f in ([p] if is_remote(p) else local_files(p))]
    else:
        source.update(dataset=args.dataset, name=args.name, split=args.split, revision=args.revision)
    return source


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest["source"], dict) or not isinstance(manifest["complete"], bool):
            raise TypeError("source or complete of the wrong type")
        for shard in manifest["shards"]:
            types = dict(file=str, split=str, tokens=int, next=list, next_position=list, sha256=str)
            if not all(isinstance(shard[key], t) for key, t in types.items()) or len(shard["next"]) != 2:
                raise TypeError(f"shard entry {shard!r:.80} is incomplete")
            if len(shard["next_position"]) != 2 or not all(isinstance(i, int) for i in shard["next_position"]):
                raise TypeError(f"shard entry {shard['file']} has a bad next_position")
            if not SHARD_NAME.fullmatch(shard["file"]):
                raise TypeError(f"shard entry {shard['file']!r} is not a shard's name in this directory")
        if not isinstance(manifest["files"], list) or not isinstance(manifest["inputs"], list):
            raise TypeError("files or inputs is not a list")
        if not isinstance(manifest.get("remote_inputs", {}), dict):
            raise TypeError("remote_inputs is not an object")
        return manifest
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is damaged ({first_line(e)}): the shards cannot be checked or continued without it; "
            "restore it, or start over in another --out-dir"
        ) from e


def input_fingerprint(files):
    """Size and modification time of each local input: a corpus edited between a kill and the rerun is noticed."""
    return [dict(file=f, size=os.path.getsize(f), mtime_ns=os.stat(f).st_mtime_ns) for f in files if not is_remote(f)]


def shorten(value, items=3):
    """A setting as an error shows it: a list of many files by its first few and how many more."""
    if isinstance(value, list) and len(value) > items:
        return f"[{', '.join(map(repr, value[:items]))}, ... {len(value) - items} more]"
    return repr(value)


def load_manifest(out_dir, source):
    """The manifest of an earlier run with the same settings, or None; refuses an out dir made otherwise."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        manifest = read_manifest(out_dir)
        for key in sorted(set(source) | set(manifest["source"])):
            if manifest["source"].get(key) != source.get(key):
                was, now = (shorten(v) for v in (manifest["source"].get(key), source.get(key)))
                raise UserError(
                    f"{out_dir} holds shards made with {key}={was}, not {now}: "
                    "use another --out-dir, or delete this one to start over"
                )
        for shard in manifest["shards"] if not manifest["complete"] else []:
            path = os.path.join(out_dir, shard["file"])
            if not os.path.isfile(path) or os.path.getsize(path) < 2 * shard["tokens"]:
                raise UserError(
                    f"{path}, a finished shard, is missing or cut short: continuing would leave a gap; "
                    "restore it, or start over in another --out-dir"
                )
        for was, now in zip(manifest["inputs"], input_fingerprint(source.get("data_files", []))):
            if was != now and not manifest["complete"]:
                raise UserError(
                    f"{now['file']} changed since {out_dir} was started (size {was['size']:,} -> "
                    f"{now['size']:,} bytes, or its modification time): the shards so far hold the old text; "
                    "restore the file, or start over in another --out-dir"
                )
        return manifest
    if os.path.isdir(out_dir) and any(n.endswith(".npy") for n in os.listdir(out_dir)):
        raise UserError(f"{out_dir} holds .npy files but no {MANIFEST}: use an empty --out-dir")
    return None


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


# ----------------------------------------------------------------------------------------------------------------
# reading documents: which files, in which order, and (file, row) positions that a resume starts from


def input_files(args, source, retry):
    if args.data_files:
        files = list_files(source["data_files"], retry)
    else:
        files = hub_files(args.dataset, args.revision, retry, config=args.name, split=args.split)
    if not files:
        raise UserError(f"{args.dataset} ({args.name}, {args.split}) lists no files")
    file_format(files)
    return files


def local_files(pattern):
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.isfile(m) for m in matches):
        bad = next((m for m in matches if not os.path.isfile(m)), pattern)
        what = "a directory: give the files in it (a glob like dir/*.jsonl)" if os.path.isdir(bad) else "no such file"
        raise UserError(f"cannot read --data-files {bad}: {what}")
    return [os.path.abspath(m) for m in matches]


def file_format(files):
    formats = set()
    for f in files:
        name = urllib.parse.urlparse(f).path if is_remote(f) else f
        name = name[:-3] if name.endswith(".gz") else name
        ext = os.path.splitext(name)[1]
        formats.add(FORMATS.get(ext, ext))
    if len(formats) != 1 or not formats <= {"json", "parquet", "text"}:
        raise UserError(f"--data-files must all be .jsonl/.json, .parquet or .txt (one kind), got {sorted(formats)}")
    return formats.pop()


def document_batches(files, text_field, start, client, manifest, batch_size=1024):
    """(file index, row, texts): the documents of all files in order, from position start = (file index, row) on.
    Only files from start's on are opened; a remote one while the one before it is read, and it must be the one the
    out dir was started on."""
    fmt = file_format(files)
    for index, source, f in opened_files(files, start[0], client):
        start_row = start[1] if index == start[0] else 0
        with f:
            if is_remote(source):
                check_remote_input(manifest, source, f.identity())
            if (f.size if is_remote(source) else os.path.getsize(source)) == 0:
                tqdm.write(f"warning: {source} is empty: no documents from it", file=sys.stderr)
                continue
            if fmt == "parquet":
                batches = parquet_batches(f, source, text_field, start_row, batch_size)
            else:
                if is_remote(source):  # 8 MB pieces, several fetched at once
                    f.prefetch((i, min(8 << 20, f.size - i)) for i in range(0, f.size, 8 << 20))
                stream = io.BufferedReader(f, 8 << 20) if is_remote(source) else f
                stream = gzip.open(stream) if urllib.parse.urlparse(source).path.endswith(".gz") else stream
                if fmt == "json":
                    batches = json_batches(stream, source, text_field, start_row, batch_size)
                else:  # a .txt file is one document
                    batches = iter([(0, [read_text(stream, source)])] if start_row == 0 else [])
            try:
                for row, texts in batches:
                    for i, text in enumerate(texts):
                        if not isinstance(text, str):  # never an empty document: the shards would not say so
                            raise UserError(f"{source}: row {row + i + 1}: {describe_field(text_field, text)}")
                    yield index, row, texts
            except (OSError, EOFError, zlib.error, ValueError) as e:  # a damaged gzip or parquet file, a read error
                raise UserError(f"cannot read {source}: {first_line(e)}") from e


def check_remote_input(manifest, source, identity):
    known = manifest["remote_inputs"]
    if known.get(source, identity) != identity:
        raise UserError(f"{source} changed since the out dir was started ({known[source]} -> {identity}): the shards "
                        "so far hold the old text; start over in another --out-dir")  # fmt: skip
    manifest["remote_inputs"] = {**known, source: identity}  # a new dict: the main thread may be writing the old one


def opened_files(files, first, client):
    """(index, name, file) from files[first] on; a remote file starts opening (its size and its footer, in one
    request) while the one before it is read, so that a file boundary costs no round trip."""
    upcoming = None
    try:
        for index in range(first, len(files)):
            f = upcoming or open_source(files[index], client)
            following = files[index + 1] if index + 1 < len(files) else ""
            upcoming = open_source(following, client) if is_remote(following) else None
            yield index, files[index], f
    except OSError as e:
        raise UserError(f"cannot read {files[index]}: {e.strerror or first_line(e)}") from e


def parquet_batches(f, name, text_field, start_row, batch_size):
    """From start_row on, entering at the row group that holds it: the row groups before it are not read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except UserError:
        raise
    except Exception as e:  # pyarrow reports a bad file with several exception types
        raise UserError(f"cannot read {name}: not a parquet file ({first_line(e)})") from e
    if text_field not in parquet.schema_arrow.names:
        fields = ", ".join(parquet.schema_arrow.names)
        raise UserError(f"{name} has no field {text_field!r} (fields: {fields}); set --text-field")
    rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    first_rows = np.cumsum([0] + rows).tolist()
    groups = [g for g in range(len(rows)) if first_rows[g + 1] > start_row]  # the one that holds start_row, and on
    if isinstance(f, HTTPFile):  # their text column, fetched several at once
        column = [parquet.schema.column(i).path for i in range(len(parquet.schema))].index(text_field)
        f.prefetch(column_chunk(parquet.metadata.row_group(g).column(column)) for g in groups)
    for g in groups:
        texts = parquet.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        for i in range(max(start_row - first_rows[g], 0), rows[g], batch_size):
            yield first_rows[g] + i, texts[i : i + batch_size]


def column_chunk(column):
    """(start, length) of a column chunk in its file: the bytes pyarrow reads for it."""
    start = column.data_page_offset
    if column.has_dictionary_page and 0 < column.dictionary_page_offset < start:
        start = column.dictionary_page_offset
    return start, column.total_compressed_size


def json_batches(f, name, text_field, start_row, batch_size):
    """JSON Lines (or a JSON array): one document per record; a bad record is named by its line."""
    texts, row = [], start_row
    for where, record in json_records(f, name, start_row):
        row += 1
        if not isinstance(record, dict):
            raise UserError(f"cannot read {name}: {where} is not a JSON object")
        if text_field not in record and row == 1:
            raise UserError(f"{name} has no field {text_field!r} (fields: {', '.join(record)}); set --text-field")
        text = record.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{name}: {where}: {describe_field(text_field, text)}")
        texts.append(text)
        if len(texts) == batch_size:
            yield row - len(texts), texts
            texts = []
    if texts:
        yield row - len(texts), texts


def json_records(f, name, start_row):
    """(where, record) of each JSON Lines record after the first start_row ones, which are counted, not parsed. A
    .json file that holds one array of records is read whole."""
    row = 0
    for n, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        if row == 0 and raw.lstrip().startswith(b"["):
            records = parse_json(raw + f.read(), name, "the file")
            yield from ((f"record {i + 1}", r) for i, r in enumerate(records) if i >= start_row)
            return
        row += 1
        if row > start_row:
            yield f"line {n}", parse_json(raw, name, f"line {n}")


def parse_json(raw, name, where):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {name}: {where} is not UTF-8 (byte {e.start + 1})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read {name}: {where} is not JSON ({e.msg})") from e


def describe_field(name, text):
    return f"field {name!r} is " + ("missing" if text is None else f"{type(text).__name__}, not a string")


def read_text(stream, name):
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {name}: byte {e.start + 1} is not UTF-8") from e


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer processes


def tokenized_documents(batches, workers):
    """((file index, row), tokens) of every document, in input order, tokenized in parallel; at most 2 batches per
    worker in flight, so memory stays bounded however fast the input arrives."""
    with TokenizerPool(workers) as pool:
        pending = collections.deque()
        for index, row, texts in batches:
            pool.submit(texts)
            pending.append((index, row))
            if len(pending) == 2 * workers:
                yield from split_documents(*pending.popleft(), *pool.result())
        while pending:
            yield from split_documents(*pending.popleft(), *pool.result())


def split_documents(index, row, tokens, lengths):
    ends = np.cumsum(lengths)
    for i, (end, n) in enumerate(zip(ends.tolist(), lengths.tolist())):
        yield (index, row + i), tokens[end - n : end]


class TokenizerPool:
    """Processes that tokenize, started by a fork server: a fork of this process would copy the locks of its running
    threads in whatever state they are in. Job k goes to process k mod N and its result comes back from there, in
    order. A process that dies is an error at once; they end with the pool, or on their own when this process does."""

    def __init__(self, workers):
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["utils"])  # imported once in the server, shared by every process it forks
        if threading.current_thread() is threading.main_thread():  # the server and its children ignore Ctrl-C
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # from their start on, the imports included:
            multiprocessing.forkserver.ensure_running()  # this process stops them
            signal.signal(signal.SIGINT, handler)
        self.jobs, self.results, self.processes, self.sent, self.received = [], [], [], 0, 0
        try:
            for _ in range(workers):
                jobs, (results, child_end) = context.Queue(), context.Pipe(duplex=False)  # a queue never blocks
                jobs.cancel_join_thread()  # a process that died must not hold up this one's exit
                args = ("download-fineweb-edu", "tokenizer_process", jobs, child_end, os.getpid())
                process = context.Process(target=call_in_script, args=args, daemon=True, name="tokenizer")
                self.jobs.append(jobs), self.results.append(results), self.processes.append(process)
                process.start()
                child_end.close()  # the process holds the only writing end now: its death is an end of file here
        except BaseException:  # a stop (Ctrl-C, SIGTERM) while they start: the ones started end before this one goes
            self.__exit__()  # on to remove the queues they may still be opening
            raise

    def submit(self, texts):
        self.jobs[self.sent % len(self.jobs)].put(texts)  # sent by the queue's own thread: this never blocks
        self.sent += 1

    def result(self):  # the oldest job's (tokens, lengths)
        i = self.received % len(self.jobs)
        try:
            if self.results[i] not in wait([self.results[i], self.processes[i].sentinel]):
                raise EOFError  # the process ended with no result ready
            value = self.results[i].recv()  # EOFError too if it died halfway through sending
        except (EOFError, OSError) as e:
            raise UserError(
                "a tokenizer process died (killed, or out of memory?): the finished shards are kept; run again to "
                "continue, with fewer --workers if memory is short"
            ) from e
        self.received += 1
        return value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        started = [process for process in self.processes if process.pid is not None]
        for process in started:
            process.terminate()  # they hold no state: whatever they were doing is not needed any more
        for process in started:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for jobs, results in zip(self.jobs, self.results):
            jobs.close()
            results.close()


def tokenizer_process(jobs, results, parent_pid):
    """A tokenizer process: texts in, (tokens, lengths) out, for as long as the downloader that started it lives."""
    when_gone(parent_pid, lambda: os._exit(1))
    while True:
        results.send(tokenize_documents(jobs.get()))


def tokenize_documents(texts):
    """The unit of work of the tokenizer processes: the texts as one uint16 array (each document is EOT followed by
    its tokens), and each document's length."""
    enc = get_tokenizer()
    # disallowed_special=() reads "<|endoftext|>" inside a text as plain text, exactly like encode_ordinary
    encoded = [enc.encode_to_numpy(text, disallowed_special=()) for text in texts]
    eot = np.array([EOT], dtype=np.uint32)
    tokens = np.concatenate([part for doc in encoded for part in (eot, doc)])
    lengths = np.array([len(doc) + 1 for doc in encoded], dtype=np.int64)
    return tokens.astype(np.uint16), lengths  # GPT-2's 50,257 ids fit in uint16


if __name__ == "__main__":
    run_cli(main)
