"""
Reading over HTTP: remote files read by byte range as if they were local, retries with backoff for the failures that
pass, reading ahead in a thread while the caller works, and the Hugging Face hub's file listing. Used by
download-fineweb-edu.py and by hellaswag.py's download.
"""

import dataclasses
import fnmatch
import io
import os
import queue
import random
import re
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException

from utils import UserError, first_line

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
TIMEOUT = 60  # seconds a connection may stay silent before it counts as dropped
HF_PATH = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(@(?P<revision>[^/]+))?/(?P<path>.+)$")


def is_remote(source):
    return source.startswith(("http://", "https://", "hf://"))


# ----------------------------------------------------------------------------------------------------------------
# retries


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


# ----------------------------------------------------------------------------------------------------------------
# a remote file, read by byte range


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


def open_source(source, retry):
    """A binary file object for a local path, an http(s) URL or an hf:// path."""
    if not is_remote(source):
        return open(source, "rb")
    headers = {}
    if source.startswith("hf://"):
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        m = HF_PATH.match(source)
        path = urllib.parse.quote(m["path"])
        headers = {k: v for k, v in build_hf_headers().items() if k.lower() == "authorization"}
        source = f"{constants.ENDPOINT}/datasets/{m['repo']}/resolve/{m['revision']}/{path}"
    return HTTPFile(source, retry, headers)


def read_ahead(items, depth, cancel=lambda: None):
    """The items, produced by a background thread up to depth ahead: the next row group is fetched while the ones
    before it are tokenized. An error in the thread is raised here. When the consumer stops (an error, Ctrl-C), the
    thread is stopped (cancel ends a wait for a retry) and waited for: a thread still inside pyarrow or a request
    when the interpreter exits would crash it."""
    ready, stop, end = queue.Queue(depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return ready.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    break
            put(end)
        except BaseException as e:
            put(e)
        finally:
            items.close()  # its open file or connection

    thread = threading.Thread(target=produce, daemon=True, name="read-ahead")
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        cancel()
        thread.join()


# ----------------------------------------------------------------------------------------------------------------
# the hub's file listing


def hub_glob(api, repo, revision, pattern, retry):
    """The dataset's files that match pattern, as hf:// paths pinned to a commit, in name order."""
    from huggingface_hub.hf_api import RepoFile

    folder = re.split(r"[*?[]", pattern)[0].rpartition("/")[0]  # the deepest folder without a wildcard
    what = f"the file list of hf://datasets/{repo}@{revision}/{folder}"
    tree = retry(lambda: list(api.list_repo_tree(repo, folder or None, recursive=True, revision=revision,
                                                repo_type="dataset")), what)  # fmt: skip
    paths = sorted(e.path for e in tree if isinstance(e, RepoFile) and fnmatch.fnmatchcase(e.path, pattern))
    return [f"hf://datasets/{repo}@{revision}/{p}" for p in paths]


def hub_files(repo, revision, retry, config=None, split=None, pattern=None):
    """Files of a hub dataset at the commit that revision names now: those of a config's split (as its card lists
    them), or those matching a pattern."""
    from huggingface_hub import HfApi

    label = f"{repo} ({config})" if pattern is None else f"hf://datasets/{repo}"
    try:
        check_hub_reachable()
    except ConnectionError as e:
        raise UserError(
            f"cannot open {label} on the Hugging Face hub: {first_line(e)}; "
            "with no network, tokenize local files with --data-files"
        ) from e
    api = HfApi()  # the endpoint from HF_ENDPOINT, the token from HF_TOKEN or `hf auth login`
    info = retry(lambda: api.dataset_info(repo, revision=revision), f"hf://datasets/{repo}@{revision}")
    patterns = [pattern] if pattern is not None else config_patterns(info, repo, config, split)
    return [f for p in patterns for f in hub_glob(api, repo, info.sha, p, retry)]


def config_patterns(info, repo, config, split):
    """The file patterns of a config's split, as the dataset card lists them."""
    configs = {c.get("config_name"): c for c in (info.card_data.get("configs") or [])} if info.card_data else {}
    if config not in configs:
        raise UserError(f"{repo} has no config {config!r} (configs: {', '.join(map(str, configs)) or 'none'})")
    data_files = configs[config].get("data_files") or []
    if isinstance(data_files, str):
        data_files = [dict(split="train", path=data_files)]
    paths = [d["path"] for d in data_files if d.get("split") == split]
    patterns = [p for path in paths for p in ([path] if isinstance(path, str) else path)]
    if not patterns:
        raise UserError(f"{repo} ({config}) has no split {split!r}")
    return patterns


def check_hub_reachable():
    """One quick request first: offline, the hub client would retry for half a minute before it gives up."""
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ConnectionError("HF_HUB_OFFLINE is set, and the shards are written from the hub's files, not its cache")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=15).close()
    except urllib.error.HTTPError:
        pass  # it answered: reachable
    except OSError as e:
        raise ConnectionError(f"cannot reach {endpoint} ({getattr(e, 'reason', e)})") from e
