"""A web server on 127.0.0.1 for the download tests: files with byte ranges, the few Hugging Face hub API calls the
downloader makes, and faults injected on demand (error statuses, connections dropped mid-body). It counts the body
bytes it sends per file, so a test can tell what a run fetched."""

import collections
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class LoopbackServer:
    """Serves root/ under /files/. A hub dataset "owner/name" is the folder root/hub/owner/name, at commit `sha`, with
    the configs given to add_dataset; its resolve URLs redirect to /files/ (as the hub redirects to its CDN)."""

    def __init__(self, root):
        self.root = str(root)
        self.datasets = {}  # "owner/name" -> dict(sha=..., configs=[...])
        self.faults = []  # dicts: path (a regex), status (None: drop the connection mid-body), count, retry_after
        self.sent = collections.Counter()  # path under root -> body bytes sent
        self.requests = []  # (method, path, range, authorization)
        self.delay = 0.0  # seconds before each answer: a slow network
        self.ranges = True  # False: Range headers are ignored, as by a server that cannot serve ranges
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_dataset(self, repo, sha, configs):
        self.datasets[repo] = dict(sha=sha, configs=configs)

    def fault(self, path, status=None, count=1, retry_after=None):
        """The next `count` requests whose path matches get `status`, or (status None) half their body and a closed
        connection."""
        self.faults.append(dict(path=path, status=status, count=count, retry_after=retry_after))

    def take_fault(self, path, drop):
        with self.lock:
            for fault in self.faults:
                if fault["count"] > 0 and (fault["status"] is None) == drop and re.search(fault["path"], path):
                    fault["count"] -= 1
                    return fault
        return None

    def reset_counts(self):
        with self.lock:
            self.sent.clear()
            self.requests.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            path = unquote(urlparse(self.path).path)
            with server.lock:
                server.requests.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
            time.sleep(server.delay)
            fault = server.take_fault(path, drop=False)
            if fault is not None:
                self.send_response(fault["status"])
                if fault["retry_after"] is not None:
                    self.send_header("Retry-After", str(fault["retry_after"]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if m := re.match(r"^/api/datasets/([^/]+/[^/]+)/revision/(.+)$", path):
                return self.dataset_info(m[1], m[2])
            if m := re.match(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path):
                return self.tree(m[1], m[2], (m[3] or "/")[1:])
            if m := re.match(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                if m[1] not in server.datasets or m[2] != server.datasets[m[1]]["sha"]:
                    return self.answer(404, b"")
                self.send_response(302)
                self.send_header("Location", f"/files/hub/{m[1]}/{m[3]}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path.startswith("/files/"):
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
            start, end = 0, size - 1
            status = 200
            m = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
            if m and server.ranges:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
                if start >= size:
                    return self.answer(416, b"", "text/plain")
                status = 206
            with open(full, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if len(body) > 1 and server.take_fault("/files/" + rel, drop=True):  # half the body, then it goes away
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()
            with server.lock:
                server.sent[rel] += len(body)

    return Handler
