"""http_files.py against a model of the hub on a wide-area network (tests/loopback_http.py): a file opens in one
request through one redirect, the token stays on the hub, an expired link is resolved again, connections are kept
alive and several requests are in flight, a stalled or silent server is retried, a stop ends every wait at once."""

import os
import re
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import HUB_SHA
from http_files import HTTPClient, HTTPFile, Retry
from utils import UserError, load_script

downloader = load_script("download-fineweb-edu")


def resolve_url(server, name):
    return f"{server.url}/datasets/test-org/edu/resolve/{HUB_SHA}/sample/tiny/{name}"


def local_bytes(server, name):
    return open(os.path.join(server.root, "corpus", name), "rb").read()


def by_host(server, host):
    return [r for r in server.requests if r.host == host]


def test_a_file_opens_in_one_request_through_one_redirect_and_the_token_stays_on_the_hub(server):
    name = server.files[0]
    data = local_bytes(server, name)
    with HTTPClient(Retry(wait=0.01)) as client:
        f = HTTPFile(resolve_url(server, name), client, {"Authorization": "Bearer hf_secret"})
        parquet = pq.ParquetFile(f)  # its size and its footer
        assert f.size == len(data) and parquet.metadata.num_row_groups == 6
        assert len(by_host(server, "hub")) == 1 and len(by_host(server, "cdn")) == 1  # the redirect, the last bytes
        assert by_host(server, "cdn")[0].range == "bytes=-524288"
        column = parquet.read_row_group(3, columns=["text"]).column(0).to_pylist()
        assert column == pq.read_table(os.path.join(server.root, "corpus", name)).column("text").to_pylist()[120:160]
        f.seek(100)
        assert f.read(1000) == data[100:1100]
    assert len(by_host(server, "hub")) == 1  # resolved once
    assert all(r.authorization == "Bearer hf_secret" for r in by_host(server, "hub"))
    assert all(r.authorization is None for r in by_host(server, "cdn"))


def test_an_expired_link_is_resolved_again_without_a_backoff(server):
    name = server.files[1]
    data = local_bytes(server, name)
    with HTTPClient(Retry(wait=30)) as client:  # a retry would wait 15 s or more
        f = HTTPFile(resolve_url(server, name), client)
        assert f.read(10) == data[:10]
        server.expire_links()
        t0 = time.time()
        f.seek(5000)
        assert f.read(10) == data[5000:5010]
        assert time.time() - t0 < 5
        assert f.read(10) == data[5010:5020]  # the new link is kept
    assert len(by_host(server, "hub")) == 2
    assert [r.range for r in by_host(server, "hub")] == ["bytes=-524288", "bytes=5000-5009"]


def test_connections_are_kept_and_several_requests_are_in_flight(server):
    """The downloader's reader over a WAN: a request per row group (and one per file for its size and footer) on at
    most --connections kept-alive connections, several at once, the next file opened while one is read."""
    server.wan(delay=0.02, connect_delay=0.06)
    names = server.files
    with HTTPClient(Retry(wait=0.01), connections=4) as client:
        files, manifest = [resolve_url(server, n) for n in names], dict(remote_inputs={})
        batches = list(downloader.document_batches(files, "text", (0, 0), client, manifest))
    assert [t for _, _, texts in batches for t in texts] == server.texts
    row_groups = 6 * len(names)
    assert len(by_host(server, "hub")) == len(names)  # one redirect per file
    assert len(by_host(server, "cdn")) == row_groups + len(names)
    assert server.connections["cdn"] <= 4 and server.connections["hub"] <= 4
    assert server.most_in_flight >= 3


def test_a_dribbling_server_is_a_stall_and_is_retried(server, capsys):
    name = server.files[2]
    data = local_bytes(server, name)
    server.fault(name, mode="dribble", every=0.2)  # a byte every 0.2 s: the first request for the file
    with HTTPClient(Retry(wait=0.01), stall_seconds=1.0) as client:
        f = HTTPFile(f"{server.url}/files/corpus/{name}", client)
        t0 = time.time()
        assert f.size == len(data) and f.read() == data
        assert time.time() - t0 < 10
    assert "the transfer stalled (" in capsys.readouterr().err


def test_a_silent_server_is_retried(server, capsys):
    name = server.files[3]
    server.fault(name, mode="silent", every=5)
    with HTTPClient(Retry(wait=0.01), stall_seconds=0.5) as client:
        f = HTTPFile(f"{server.url}/files/corpus/{name}", client)
        assert f.read() == local_bytes(server, name)
    assert "timed out" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["dribble", "silent"])
def test_a_stop_ends_a_wait_for_the_network_at_once(server, mode):
    """Ctrl-C closes the client: a read that waits for a dribbling or silent server ends within a second."""
    name = server.files[4]
    server.fault(name, mode=mode, every=30 if mode == "silent" else 1.0, count=100)
    client = HTTPClient(Retry(wait=0.01), stall_seconds=60)
    f = HTTPFile(f"{server.url}/files/corpus/{name}", client)
    threading.Timer(0.5, client.close).start()
    t0 = time.time()
    with pytest.raises(UserError, match="stopped"):
        f.read()
    assert time.time() - t0 < 1.5


def test_http_file_reads_ranges_and_resumes_a_dropped_body(server):
    name = server.files[0]
    data = local_bytes(server, name)
    server.fault(name, count=2)  # two bodies cut in half, then the connection is closed
    with HTTPClient(Retry(wait=0.01)) as client:
        with HTTPFile(f"{server.url}/files/corpus/{name}", client) as f:
            assert f.size == len(data)
            f.seek(1000)
            assert f.read(5000) == data[1000:6000]
            f.seek(-10, os.SEEK_END)
            assert f.read(100) == data[-10:] and f.read(10) == b""
        server.reset_counts()
        with HTTPFile(f"{server.url}/files/corpus/{name}", client) as f:
            assert f.read() == data  # the last bytes at open, then the rest in one request
        assert len(server.requests) == 2
        server.ranges = False  # every answer is the whole file: the reader skips to the part it asked for
        with HTTPFile(f"{server.url}/files/corpus/{name}", client) as f:
            assert f.size == len(data)
            f.seek(7000)
            assert f.read(3000) == data[7000:10000]
        with pytest.raises(UserError, match="cannot download http://no-such-host.invalid/x: "):
            HTTPFile("http://no-such-host.invalid/x", client).read(1)  # no such host: not retried


def test_what_a_server_must_not_do_is_one_line(server):
    server.redirects["/elsewhere"] = "ftp://127.0.0.1/file"
    with HTTPClient(Retry(wait=0.01)) as client:
        with pytest.raises(UserError, match=r"redirected to ftp://127.0.0.1/file, which is not followed"):
            HTTPFile(f"{server.url}/elsewhere", client).read(1)
        server.ranges, server.content_length = False, False
        with pytest.raises(UserError, match=r"the server sent no size \(no Content-Length\)"):
            HTTPFile(f"{server.url}/files/corpus/{server.files[0]}", client).read(1)


def test_a_stopped_retry_does_not_wait_out_its_backoff(server):
    """When the download is stopped (Ctrl-C, an error elsewhere), no thread is left sleeping for a retry."""
    server.fault(server.files[0], status=503)
    with HTTPClient(Retry(wait=30)) as client:
        threading.Timer(0.5, client.retry.stop.set).start()
        t0 = time.time()
        with pytest.raises(UserError, match="stopped"):
            HTTPFile(f"{server.url}/files/corpus/{server.files[0]}", client).read(1)
        assert time.time() - t0 < 5


def test_hub_globs_stay_in_their_folder_and_listed_paths_outside_the_dataset_are_refused():
    from huggingface_hub.hf_api import RepoFile

    from http_files import hub_glob

    class Hub:  # what list_repo_tree answers
        def __init__(self, paths):
            self.paths = paths

        def list_repo_tree(self, repo, folder, **kwargs):
            return [RepoFile(path=p, size=1, oid="0") for p in self.paths]

    hub = Hub(["data/a.parquet", "data/old/b.parquet", "data/c.txt", "data/d.parquet"])
    pinned = f"hf://datasets/o/n@{HUB_SHA}/"
    assert hub_glob(hub, "o/n", HUB_SHA, "data/*.parquet", Retry()) == [pinned + f"data/{n}.parquet" for n in "ad"]
    assert hub_glob(hub, "o/n", HUB_SHA, "data/*/*.parquet", Retry()) == [pinned + "data/old/b.parquet"]
    assert len(hub_glob(hub, "o/n", HUB_SHA, "data/**.parquet", Retry())) == 3  # ** crosses folders
    for bad in ("data/../../secret.parquet", "/data/x.parquet"):
        with pytest.raises(UserError, match=f"the hub listed {bad!r}, a path outside the dataset: refused"):
            hub_glob(Hub([bad]), "o/n", HUB_SHA, "**", Retry())


def test_a_commit_id_that_is_not_one_is_refused_at_once(server, tmp_path):
    from conftest import run_script

    server.add_dataset("test-org/bad", "0123\r\nX-Injected: 1", [dict(config_name="c", data_files="d/*")])
    env = dict(os.environ, HF_ENDPOINT=server.url)
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.time()
    r = run_script(
        "download-fineweb-edu.py", "--dataset", "test-org/bad", "--name", "c", "--out-dir", tmp_path / "o", env=env
    )
    assert r.returncode == 2 and "retry" not in r.stderr and time.time() - t0 < 30, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: hf://datasets/test-org/bad@main: the hub answered '0123\\r\\nX-Injected: 1', not a commit id"
    )


def test_a_file_replaced_between_two_range_requests_is_refused_naming_it(server):
    """Every answer must come from the version the first one did: the shards never mix two versions of a file."""
    folder = os.path.join(server.root, "replaced")
    os.makedirs(folder, exist_ok=True)
    path, data = os.path.join(folder, "f.bin"), os.urandom(2_000_000)
    with open(path, "wb") as f:
        f.write(data)
    url = f"{server.url}/files/replaced/f.bin"
    with HTTPClient(Retry(wait=0.01)) as client:
        f = HTTPFile(url, client)
        assert f.read(10) == data[:10]
        with open(path, "wb") as out:  # another version, the same size: its ETag and Last-Modified change
            out.write(os.urandom(len(data)))
        os.utime(path, (time.time() + 5, time.time() + 5))
        f.seek(1_000_000)
        with pytest.raises(UserError, match=f"{url} changed while it was read \\(etag .* would mix two versions"):
            f.read(100)


def test_a_request_that_left_with_an_expired_link_asks_the_hub_again_after_another_did(server):
    """With several requests in flight, one may get 403 for a signed link that another thread has already replaced:
    it asks the hub too, rather than failing for good; a link refused even then says so."""
    name = server.files[1]
    data = local_bytes(server, name)
    with HTTPClient(Retry(wait=30)) as client:
        f = HTTPFile(resolve_url(server, name), client)
        assert f.read(10) == data[:10]
        server.expire_links()
        fresh = re.sub(r"sig=\d+", f"sig={server.link_generation}", f.location)  # what the hub hands out now

        def another_thread_resolved_it(request):  # while this request is on its way with the old link
            if request.host == "cdn" and request.range == "bytes=5000-5009":
                f.location = fresh

        server.on_request.append(another_thread_resolved_it)
        f.seek(5000)
        assert f.read(10) == data[5000:5010]
    server.reset()
    server.fault(f"/files/hub/test-org/edu/sample/tiny/{name}", status=403, count=100)
    with HTTPClient(Retry(wait=30)) as client, pytest.raises(UserError, match="also when asked again"):
        HTTPFile(resolve_url(server, name), client).read(1)


def test_a_server_that_refuses_suffix_ranges_or_answers_another_range_is_read_right_or_refused(server):
    name = server.files[2]
    data = local_bytes(server, name)
    server.suffix_ranges = False  # bytes=-N answered 416 with the size: asked again as an explicit range
    with HTTPClient(Retry(wait=0.01)) as client:
        f = HTTPFile(f"{server.url}/files/corpus/{name}", client)
        assert f.size == len(data) and f.read() == data
        server.suffix_ranges, server.shifted_ranges = True, True  # 206 for bytes the request did not ask for
        f = HTTPFile(f"{server.url}/files/corpus/{name}", client)
        f.seek(5000)
        with pytest.raises(UserError, match="asked for bytes 5000-5009, the server answered 'bytes 4000-5009/"):
            f.read(10)
