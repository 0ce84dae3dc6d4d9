"""
Reading over HTTP: remote files read by byte range as if they were local, retries with backoff for the failures that
pass, reading ahead in a thread while the caller works, and the Hugging Face hub's file listing. Used by
download-fineweb-edu.py and by hellaswag.py's download. It works the way the hub is built:

- Kept-alive connections (urllib3's pool): at most `connections` per host, reused for every request, so a request
  costs one round trip, not a new TCP and TLS handshake.
- One redirect per file: the hub answers a file's /resolve/ URL with a redirect to its CDN; the first request follows
  it and the file's later requests go to the CDN address. When that signed address expires (403 or 410) the hub is
  asked again at once, without a backoff. The hub token goes to the hub's host only, never to the CDN; redirects to
  anything but http(s) are refused.
- A file opens in one request, for its last 512 KB: its size (from Content-Range) and a parquet footer in hand.
- Several requests in flight: a reader prefetches the ranges it will read (the text column of the next row groups, or
  a jsonl in 8 MB pieces), two per connection ahead of it, so memory stays bounded; the next file opens while one is
  read, so a file boundary costs no round trip. The bytes still come in order: shards over a WAN equal shards from
  local files.
- No stall lasts: a response silent, or slower than 10 KB/s, for `stall_seconds` is dropped and retried like a reset
  connection. A stop (Ctrl-C, SIGTERM, an error elsewhere) ends every wait at once: the responses being read are shut
  down and the threads are daemons.
- Retries: a reset, a refused connection, a timeout, a stall, a body cut short, HTTP 408/425/429/5xx are retried up to
  `attempts` times with exponential backoff and jitter (or what Retry-After asks), one line each; a dropped body asks
  only for the bytes still missing. 404, 401/403 and a host that does not resolve are permanent: one line, at once.

Measured by bench.py download over tests/loopback_http.py's model of the hub (2-core CPU, 2026-12-02): 1.20 requests
and 0.143 new connections per row group; an earlier version with one request in flight and a new connection and
redirect per request reached 0.45 M tokens/s against the same kind of model, 9-17% of the tokenizer's speed.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import io
import os
import queue
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException

import urllib3

from utils import UserError, first_line

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
TAIL = 1 << 19  # bytes fetched from a file's end when it is opened: its size, and a parquet footer, in one request
MIN_RATE = 10_000  # bytes/s: a response slower than this over the stall time has stalled
MAX_REDIRECTS = 5
HF_PATH = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(@(?P<revision>[^/]+))?/(?P<path>.+)$")


def is_remote(source):
    return source.startswith(("http://", "https://", "hf://"))


# ----------------------------------------------------------------------------------------------------------------
# retries


def http_status(e):
    """The HTTP status of a failed request (ours or the hub client's), or None for a connection error."""
    if isinstance(e, HTTPStatusError):
        return e.status
    return getattr(getattr(e, "response", None), "status_code", None)


def is_transient(e):
    status = http_status(e)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(e, urllib3.exceptions.NameResolutionError):
        return False  # no such host, or no network at all: retrying only delays the error
    if isinstance(e, (ConnectionError, TimeoutError, HTTPException)):
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
    if getattr(e, "redirected", False) and status in (403, 410):
        hint = " (the address the server redirected to refused it, also when asked again: an expired signed link?)"
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
# kept-alive connections, several requests in flight


class HTTPClient:
    """Kept-alive connections (urllib3's pool, up to `connections` per host) and as many daemon threads that run
    requests on them, so that several are in flight at once. Whoever needs a result waits for it with wait(), which
    a stop (Ctrl-C, an error elsewhere) ends at once; close() also cuts the responses being read."""

    def __init__(self, retry, connections=8, stall_seconds=30.0):
        self.retry, self.stop, self.connections, self.stall_seconds = retry, retry.stop, connections, stall_seconds
        timeout = urllib3.Timeout(connect=stall_seconds, read=stall_seconds)  # a silent server is a stall too
        self.pool = urllib3.PoolManager(maxsize=connections, retries=False, timeout=timeout)
        self.jobs, self.reading, self.lock = queue.SimpleQueue(), set(), threading.Lock()
        for _ in range(connections):
            threading.Thread(target=self._work, daemon=True, name="http").start()

    def _work(self):
        while (job := self.jobs.get()) is not None:
            future, request, args = job
            try:
                if self.stop.is_set():
                    raise UserError("stopped")
                future.set_result(request(*args))
            except BaseException as e:
                future.set_exception(e)

    def submit(self, request, *args):
        """Run request(*args) on one of the threads; returns its Future."""
        future = concurrent.futures.Future()
        self.jobs.put((future, request, args))
        return future

    def wait(self, future):
        while not self.stop.is_set():
            with contextlib.suppress(concurrent.futures.TimeoutError):
                return future.result(timeout=0.1)
        raise UserError("stopped")

    @contextlib.contextmanager
    def get(self, url, headers, byte_range):
        """The response to a GET of a byte range, redirects not followed; its connection goes back to the pool when
        the body is read to its end (or nearly), and is closed otherwise."""
        if self.stop.is_set():
            raise UserError("stopped")
        response = self.pool.request("GET", url, headers={**headers, "Range": byte_range}, redirect=False,
                                     preload_content=False, decode_content=False)  # fmt: skip
        with self.lock:
            self.reading.add(response)
        try:
            yield response
        finally:
            with self.lock:
                self.reading.discard(response)
            if response.length_remaining is not None and response.length_remaining <= 1 << 16:
                response.drain_conn()  # the end of an error answer, say: the connection can be used again
            else:
                response.close()
            response.release_conn()

    def body(self, response, n):
        """The next n bytes of a response body, in pieces as they arrive. A body that comes slower than MIN_RATE over
        stall_seconds has stalled: a TimeoutError, retried like a dropped connection."""
        got, window_start, window_got = 0, time.monotonic(), 0
        while got < n:
            piece = response.read1(min(n - got, 1 << 20))
            if not piece:
                raise ConnectionResetError(f"connection closed after {got:,} of {n:,} bytes")
            got, window_got = got + len(piece), window_got + len(piece)
            yield piece
            if (elapsed := time.monotonic() - window_start) >= self.stall_seconds:
                if window_got < MIN_RATE * elapsed:
                    raise TimeoutError(f"the transfer stalled ({window_got:,} bytes in {elapsed:.0f} s)")
                window_start, window_got = time.monotonic(), 0

    def close(self):
        self.stop.set()
        for _ in range(self.connections):
            self.jobs.put(None)
        with self.lock:
            reading = list(self.reading)
        for response in reading:  # a read in another thread returns now, not when the server sends something
            with contextlib.suppress(Exception):
                response.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HTTPStatusError(Exception):
    def __init__(self, status, reason, headers, redirected=False):
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status, self.reason, self.headers, self.redirected = status, reason, headers, redirected


# ----------------------------------------------------------------------------------------------------------------
# a remote file, read by byte range


class HTTPFile(io.RawIOBase):
    """A file on a web server, readable and seekable like a local one, read with HTTP range requests. Opening it is
    one request, in the background, for its last TAIL bytes: the redirect is followed (the hub sends its files to a
    CDN) and remembered, the size comes from Content-Range, and a parquet footer is in hand. prefetch() asks for the
    ranges a reader will read next, several at once; a read of anything else is a request of its own."""

    def __init__(self, url, client, headers=None):
        self.url, self.client, self.headers = url, client, headers or {}
        self.location = url  # where the file is, once the redirect is known
        self.pos, self.tail = 0, (0, b"")  # (start, bytes): the end of the file, fetched when it was opened
        self.chunks, self.planned = {}, collections.deque()  # start -> (end, Future of its bytes); (start, length)
        self.fingerprint = None  # what says the file is the same one: its size, ETag and Last-Modified
        self.opened = client.submit(client.retry, self._open, url)

    @property
    def size(self):
        return self.client.wait(self.opened)

    def identity(self):
        """Size, ETag and Last-Modified: what tells a rerun that the file is still the one it started on."""
        return dict(size=self.size, **self.fingerprint)

    def _open(self, byte_range=f"bytes=-{TAIL}"):
        with self._get(byte_range) as response:
            headers, explicit = response.headers, None
            if response.status != 416:
                return self._read_tail(response)
            # 416, no last bytes: an empty file, or a server that takes no suffix ranges and names the size
            m = re.fullmatch(r"bytes \*/(\d+)", headers.get("Content-Range", ""))
            if m and int(m[1]) > 0 and byte_range.startswith("bytes=-"):
                explicit = f"bytes={max(int(m[1]) - TAIL, 0)}-{int(m[1]) - 1}"
        if explicit:
            return self._open(explicit)
        self.fingerprint = dict(etag=headers.get("ETag"), last_modified=headers.get("Last-Modified"))
        return 0

    def _read_tail(self, response):
        """The file's size, and its last bytes kept, from the answer to the request that opens it."""
        headers = response.headers
        self.fingerprint = dict(etag=headers.get("ETag"), last_modified=headers.get("Last-Modified"))
        if response.status == 200:  # a server that ignores ranges sends the whole file
            size = headers.get("Content-Length")
            if size is None or not size.isdigit():
                raise UserError(f"cannot download {self.url}: the server sent no size (no Content-Length)")
            if int(size) <= TAIL:
                self.tail = (0, b"".join(self.client.body(response, int(size))))
            return int(size)
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("Content-Range", ""))
        if not m:
            raise UserError(f"cannot download {self.url}: a range answer without a valid Content-Range")
        start, end, size = map(int, m.groups())
        self.tail = (start, b"".join(self.client.body(response, end - start + 1)))
        return size

    @contextlib.contextmanager
    def _get(self, byte_range):
        """The response to a range request: at the known location, or after the redirects from the URL (again when a
        signed CDN URL has expired). The hub's token goes to the hub's host only."""
        url, hops, hub, resolved_again = self.location, 0, urllib.parse.urlsplit(self.url).netloc, False
        while True:
            headers = self.headers if urllib.parse.urlsplit(url).netloc == hub else {}
            with self.client.get(url, headers, byte_range) as response:
                if response.status in (403, 410) and url != self.url and not resolved_again:
                    # refused where a redirect sent us (its signed link expired, perhaps while this request waited and
                    # another thread already asked again): ask the hub where the file is now, once
                    url, resolved_again = self.url, True
                    continue
                if response.status in (301, 302, 303, 307, 308):
                    url, hops = urllib.parse.urljoin(url, response.headers.get("Location", "")), hops + 1
                    if urllib.parse.urlsplit(url).scheme not in ("http", "https") or hops > MAX_REDIRECTS:
                        raise UserError(f"cannot download {self.url}: redirected to {url}, which is not followed")
                    continue
                if response.status >= 400 and response.status != 416:
                    raise HTTPStatusError(response.status, response.reason, response.headers, url != self.url)
                self.check_unchanged(response.headers)
                self.location = url
                yield response
                return

    def check_unchanged(self, headers):
        """Every answer must come from the version of the file the first one did (its ETag and Last-Modified): a file
        replaced between two range requests would mix two versions into the shards."""
        first = self.fingerprint or {}
        now = dict(etag=headers.get("ETag"), last_modified=headers.get("Last-Modified"))
        changed = [k for k, v in first.items() if v is not None and now[k] != v]
        if changed:
            raise UserError(f"{self.url} changed while it was read ({changed[0]} {first[changed[0]]} -> "
                            f"{now[changed[0]]}): its shards would mix two versions of it; start over in another "
                            "--out-dir")  # fmt: skip

    def _fetch(self, start, n):
        """n bytes from start; a retry asks only for what a dropped connection did not deliver."""
        data = bytearray()

        def attempt():
            first = start + len(data)
            with self._get(f"bytes={first}-{start + n - 1}") as response:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/\d+", response.headers.get("Content-Range", ""))
                if response.status == 206 and not (m and int(m[1]) == first and int(m[2]) >= first):
                    raise UserError(f"cannot download {self.url}: asked for bytes {first}-{start + n - 1}, the server "
                                    f"answered {response.headers.get('Content-Range')!r}")  # fmt: skip
                skip = first if response.status == 200 else 0  # ranges ignored: read past what comes before
                for piece in self.client.body(response, skip + n - len(data)):
                    data.extend(piece[skip:])
                    skip = max(skip - len(piece), 0)

        self.client.retry(attempt, self.url)
        return bytes(data)

    def prefetch(self, ranges):
        """Fetch these (start, length) ranges, in order, ahead of the reads that will want them: two per connection
        in flight or waiting to be read at any time."""
        self.planned.extend(ranges)
        self._top_up()

    def _top_up(self):
        while self.planned and len(self.chunks) < 2 * self.client.connections:
            start, n = self.planned.popleft()
            self.chunks[start] = (start + n, self.client.submit(self._fetch, start, n))

    def _piece(self, pos, n):
        """Bytes from pos on, at most n: from the tail fetched at open, a prefetched range, or a request of its own."""
        tail_start, tail = self.tail
        if tail_start <= pos < tail_start + len(tail):
            return memoryview(tail)[pos - tail_start : pos - tail_start + n]
        for start, (end, future) in self.chunks.items():
            if start <= pos < end:
                piece = memoryview(self.client.wait(future))[pos - start : pos - start + n]
                # done with: this range once read to its end, and the ranges before it, which the reader skipped
                self.chunks = {s: c for s, c in self.chunks.items() if s >= start and c[0] > pos + len(piece)}
                self._top_up()
                return piece
        n = min(n, tail_start - pos) if pos < tail_start else n
        return self.client.wait(self.client.submit(self._fetch, pos, n))

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n, got = max(min(len(view), self.size - self.pos), 0), 0
        while got < n:
            piece = self._piece(self.pos + got, n - got)
            view[got : got + len(piece)] = piece
            got += len(piece)
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

    def close(self):
        self.chunks, self.planned = {}, collections.deque()
        super().close()


def open_source(source, client):
    """A binary file object for a local path, an http(s) URL or an hf:// path. A remote file opens in the background:
    the first read (or its size) waits for it."""
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
    return HTTPFile(source, client, headers)


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
    paths = sorted(e.path for e in tree if isinstance(e, RepoFile) and glob_match(e.path, pattern))
    for path in paths:
        if path.startswith("/") or ".." in path.split("/"):
            raise UserError(f"{what}: the hub listed {path!r}, a path outside the dataset: refused")
    return [f"hf://datasets/{repo}@{revision}/{p}" for p in paths]


def glob_match(path, pattern):
    """A glob as the hub's file system reads it: * and ? match within one folder, ** across folders."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    parts, names = pattern.split("/"), path.split("/")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts))


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
    if not re.fullmatch(r"[0-9a-f]{40}", str(info.sha)):  # it goes into URLs and the manifest: a commit id or nothing
        raise UserError(f"hf://datasets/{repo}@{revision}: the hub answered {info.sha!r}, not a commit id")
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


def list_files(data_files, retry):
    """--data-files as files: local globs are already expanded; hf:// ones are listed on the hub, pinned to the commit
    the path names (main by default); an http(s) URL is one file (a web server cannot be listed)."""
    files = []
    for pattern in data_files:
        if is_remote(pattern) and (url := urllib.parse.urlsplit(pattern)).password is not None:
            shown = url._replace(netloc=f"{url.username}:***@{url.hostname}" + (f":{url.port}" if url.port else ""))
            raise UserError(f"--data-files {shown.geturl()}: a password in a URL would be written to manifest.json and "
                            "shown in messages; give a URL without one (a server's signed link, say)")  # fmt: skip
        if not pattern.startswith("hf://"):
            files.append(pattern)
            continue
        m = HF_PATH.match(pattern)
        if not m:
            raise UserError(
                f"--data-files {pattern}: write hf:// paths as hf://datasets/<owner>/<name>[@<revision>]/<path>"
            )
        matches = hub_files(m["repo"], m["revision"] or "main", retry, pattern=m["path"])
        if not matches:
            raise UserError(f"cannot read --data-files {pattern}: no such file on the hub")
        files += matches
    return files


def check_hub_reachable():
    """One quick request first: offline, the hub client would retry for half a minute before it gives up."""
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ConnectionError("HF_HUB_OFFLINE is set, and the shards are written from the hub's files, not its cache")
    check_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def check_reachable(url):
    """A server answers at url (any HTTP status), or a ConnectionError says why, within seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15).close()
    except urllib.error.HTTPError:
        pass  # it answered: reachable
    except OSError as e:
        raise ConnectionError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from e
