"""A web server pair on 127.0.0.1 for the download tests, a model of the Hugging Face hub on a wide-area network: the
hub's host answers the few API calls the downloader makes and redirects a file's resolve URL to a second host, the
CDN, with a signed link that can be made to expire. Both serve files with byte ranges on kept-alive HTTP/1.1
connections. On demand: a round-trip delay before every answer and more for a new connection, bandwidth caps per
connection and for the whole link, and faults (error statuses, connections dropped mid-body, bodies that dribble
in or never come). It counts requests, new connections and body bytes, so a test can tell what a run did."""

import collections
import contextlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

Request = collections.namedtuple("Request", "host path range authorization")
WORDS = "the of and to in is was for on that with as by at from it an be this which or are have not had".split()


def write_parquet_files(folder, n_files=6, docs_per_file=240, seed=0):
    """Parquet files of word-salad documents in row groups of 40, with a bulky second column the downloader must not
    fetch. Returns the texts in order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    texts = []
    for i in range(n_files):
        part = [f"file {i} doc {j}: " + " ".join(rng.choice(WORDS, rng.integers(5, 200))) for j in range(docs_per_file)]
        part[7] = ""  # an empty document still gets its EOT
        noise = [rng.bytes(6000).hex() for _ in part]
        table = pa.table({"text": part, "metadata": noise})
        pq.write_table(table, os.path.join(folder, f"{i:03d}_00000.parquet"), row_group_size=40)
        texts += part
    return texts


class LoopbackServer:
    """Serves root/ under /files/ on both hosts. A hub dataset "owner/name" is the folder root/hub/owner/name, at
    commit `sha`, with the configs given to add_dataset; its resolve URLs redirect to the CDN host."""

    def __init__(self, root):
        self.root = str(root)
        self.datasets = {}  # "owner/name" -> dict(sha=..., configs=[...])
        self.lock = threading.Lock()
        self.link_generation = 0  # the CDN refuses links signed before the current generation
        self.link_free = 0.0  # when the shared link has sent what it was given so far
        self.reset()
        self.httpd = {host: ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, host)) for host in ("hub", "cdn")}
        for httpd in self.httpd.values():
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd['hub'].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.httpd['cdn'].server_address[1]}"

    def reset(self):
        """No faults, no delays, no caps, and counts from zero."""
        self.faults = []  # dicts: path (a regex), mode (status, drop, dribble, silent), count, status, ...
        self.wan(delay=0.0, connect_delay=0.0, connection_rate=0.0, link_rate=0.0)
        self.ranges = True  # False: Range headers are ignored, as by a server that cannot serve ranges
        self.suffix_ranges = True  # False: bytes=-N is refused with 416 and the size, as some CDNs do
        self.shifted_ranges = False  # True: a range answered from 1000 bytes before the one asked, and said so
        self.on_request = []  # callables, each given every Request as it comes (to change things mid-download)
        self.content_length = True  # False: bodies are sent without a Content-Length, up to a closed connection
        self.redirects = {}  # path -> where it redirects to
        self.reset_counts()

    def add_dataset(self, repo, sha, configs):
        self.datasets[repo] = dict(sha=sha, configs=configs)

    def fault(self, path, status=None, count=1, retry_after=None, mode=None, every=1.0):
        """The next `count` requests whose path matches get `status`; with status None, by mode: "drop" (half the
        body, then the connection is closed), "dribble" (one byte every `every` seconds) or "silent" (no answer for
        `every` seconds, then the connection is closed)."""
        mode = mode or ("status" if status is not None else "drop")
        self.faults.append(dict(path=path, mode=mode, status=status, count=count, retry_after=retry_after, every=every))

    def take_fault(self, path, modes):
        with self.lock:
            for fault in self.faults:
                if fault["count"] > 0 and fault["mode"] in modes and re.search(fault["path"], path):
                    fault["count"] -= 1
                    return fault
        return None

    def expire_links(self):
        """Every CDN link handed out so far is refused from now on (403), as a signed URL is once it expires."""
        self.link_generation += 1

    def reset_counts(self):
        with self.lock:
            self.sent = collections.Counter()  # path under root -> body bytes sent
            self.requests = []  # Request tuples, in the order they came
            self.connections = collections.Counter()  # host -> connections opened
            self.in_flight = self.most_in_flight = 0  # requests being answered: now, and at most so far

    def wan(self, delay=0.05, connect_delay=0.15, connection_rate=10e6, link_rate=60e6):
        """A wide-area network: by default a 50 ms round trip, 3 more for a new connection (TCP and TLS), 10 MB/s
        per connection and 60 MB/s in all. delay: seconds before each answer; connect_delay: seconds more before the
        first answer on a new connection; the rates in bytes/s of one connection's bodies and of all (0: no cap)."""
        self.delay, self.connect_delay, self.connection_rate, self.link_rate = (
            delay, connect_delay, connection_rate, link_rate)  # fmt: skip

    def pace(self, handler, n):
        """Wait until n more body bytes may go on this connection and on the link."""
        now = time.monotonic()
        done = now
        if self.link_rate:
            with self.lock:
                self.link_free = done = max(now, self.link_free) + n / self.link_rate
        if self.connection_rate:
            handler.free = max(now, handler.free) + n / self.connection_rate
            done = max(done, handler.free)
        if done > now:
            time.sleep(done - now)

    def close(self):
        for httpd in self.httpd.values():
            httpd.shutdown()
            httpd.server_close()


def _handler(server, host):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections are kept alive between requests

        def setup(self):
            super().setup()
            self.new_connection, self.free = True, 0.0
            with server.lock:
                server.connections[host] += 1

        def handle(self):
            with contextlib.suppress(ConnectionError):  # a client that closes a connection it no longer needs
                super().handle()

        def log_message(self, *args):  # quiet
            pass

        def wait_a_round_trip(self):
            time.sleep(server.delay + (server.connect_delay if self.new_connection else 0.0))
            self.new_connection = False

        def do_HEAD(self):
            self.wait_a_round_trip()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            with server.lock:
                server.in_flight += 1
                server.most_in_flight = max(server.most_in_flight, server.in_flight)
            try:
                self.get()
            finally:
                with server.lock:
                    server.in_flight -= 1

        def get(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            request = Request(host, path, self.headers.get("Range"), self.headers.get("Authorization"))
            with server.lock:
                server.requests.append(request)
            for hook in list(server.on_request):
                hook(request)
            self.wait_a_round_trip()
            if path in server.redirects:
                self.send_response(302)
                self.send_header("Location", server.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fault = server.take_fault(path, ("status", "silent"))
            if fault is not None and fault["mode"] == "silent":
                time.sleep(fault["every"])
                self.close_connection = True
                return
            if fault is not None:
                self.send_response(fault["status"])
                if fault["retry_after"] is not None:
                    self.send_header("Retry-After", str(fault["retry_after"]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if host == "hub" and (m := re.match(r"^/api/datasets/([^/]+/[^/]+)/revision/(.+)$", path)):
                return self.dataset_info(m[1], m[2])
            if host == "hub" and (m := re.match(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)):
                return self.tree(m[1], m[2], (m[3] or "/")[1:])
            if host == "hub" and (m := re.match(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)):
                if m[1] not in server.datasets or m[2] != server.datasets[m[1]]["sha"]:
                    return self.answer(404, b"")
                self.send_response(302)
                self.send_header("Location", f"{server.cdn_url}/files/hub/{m[1]}/{m[3]}?sig={server.link_generation}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path.startswith("/files/"):
                signature = parse_qs(url.query).get("sig")
                if signature is not None and signature != [str(server.link_generation)]:
                    return self.answer(403, b"expired", "text/plain")
                return self.file(path[len("/files/") :])
            self.answer(404, b"")

        def answer(self, status, body, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def dataset_info(self, repo, revision):
            dataset = server.datasets.get(repo)
            if dataset is None or revision not in ("main", dataset["sha"]):
                return self.answer(404, b'{"error": "Repository not found"}')
            info = dict(id=repo, sha=dataset["sha"], cardData=dict(configs=dataset["configs"]))
            self.answer(200, json.dumps(info).encode())

        def tree(self, repo, revision, folder):
            dataset = server.datasets.get(repo)
            if dataset is None or revision != dataset["sha"]:
                return self.answer(404, b'{"error": "Revision not found"}')
            base = os.path.join(server.root, "hub", repo)
            entries = []
            for directory, _, names in sorted(os.walk(os.path.join(base, folder))):
                for name in sorted(names):
                    rel = os.path.relpath(os.path.join(directory, name), base)
                    entries.append(dict(type="file", path=rel, size=os.path.getsize(os.path.join(base, rel)), oid="0"))
            self.answer(200, json.dumps(entries).encode())

        def file(self, rel):
            full = os.path.join(server.root, rel)
            if not os.path.isfile(full):
                return self.answer(404, b"not found", "text/plain")
            size = os.path.getsize(full)
            start, end, status = 0, size - 1, 200
            m = re.match(r"^bytes=(\d*)-(\d*)$", self.headers.get("Range") or "")
            if m and server.ranges and (m[1] or m[2]):
                if m[1]:
                    start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
                    start = max(start - 1000, 0) if server.shifted_ranges else start
                elif not server.suffix_ranges:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                else:  # bytes=-N: the last N bytes
                    start = max(size - int(m[2]), 0)
                if start >= size:
                    return self.answer(416, b"", "text/plain")
                status = 206
            with open(full, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            stat = os.stat(full)
            self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{size:x}"')
            self.send_header("Last-Modified", self.date_time_string(int(stat.st_mtime)))
            if server.content_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.close_connection = True
            self.end_headers()
            fault = server.take_fault("/files/" + rel, ("drop", "dribble")) if len(body) > 1 else None
            if fault is not None and fault["mode"] == "drop":  # half the body, then it goes away
                body = body[: len(body) // 2]
                self.close_connection = True
            every = fault["every"] if fault is not None and fault["mode"] == "dribble" else 0
            for i in range(0, len(body), 1 if every else 1 << 16):
                piece = body[i : i + (1 if every else 1 << 16)]
                time.sleep(every)
                server.pace(self, len(piece))
                try:
                    self.wfile.write(piece)
                    self.wfile.flush()
                except OSError:  # the client went away
                    self.close_connection = True
                    return
                with server.lock:
                    server.sent[rel] += len(piece)

    return Handler
