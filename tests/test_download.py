"""ccnet.download against an HTTP server on 127.0.0.1: caching, resume, servers that ignore Range, hashes, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ccnet import download
from ccnet.download import DownloadError, fetch_file, main, sha256_prefix_from_name
from ccnet.validate import is_url

DATA = os.urandom(300 * 1024 + 123)  # a few hundred KiB, not a multiple of the chunk or the cut
SHA = hashlib.sha256(DATA).hexdigest()
NAME = f"ccnet_r50-d8_512x1024_40k_cityscapes_20200616_142517-{SHA[:8]}.pth"
CUT = 100_000
DRIP_S = 2.0  # the drip server's pause between bytes (issue 23: "one byte every 2 s")


@dataclass
class Served:
    """What the server does and what it saw: one entry per request in `ranges` (the Range header or None) and
    `sent` (body bytes written)."""

    data: bytes = DATA
    honour_range: bool = True
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int = 0  # ... in this many responses
    statuses: list = field(default_factory=list)  # error statuses for the first requests, e.g. [503]
    stall: threading.Event | None = None  # wait for this, then close without an answer
    gate: threading.Event | None = None  # wait for this before answering
    ranges: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    stop_drip: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        served: Served = self.server.served
        header = self.headers.get("Range")
        served.ranges.append(header)
        served.sent.append(0)
        if served.stall is not None:
            served.stall.wait(10)
            return
        if served.gate is not None:
            served.gate.wait(10)
        if served.statuses:
            self.send_error(served.statuses.pop(0))
            return
        if self.path.startswith("/loop"):  # a redirect to itself, forever
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/drip/"):  # one byte every DRIP_S seconds: no single read ever times out
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.data)))
            self.end_headers()
            for i in range(len(served.data)):
                try:
                    self.wfile.write(served.data[i : i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                served.sent[-1] += 1
                if served.stop_drip.wait(DRIP_S):
                    return
            return
        if self.path != f"/files/{NAME}":
            self.send_error(404)
            return
        data, start = served.data, 0
        if header and served.honour_range:
            assert header.startswith("bytes=") and header.endswith("-"), header  # the only form the client sends
            start = int(header[6:-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if served.drops and served.drop_after is not None:
            served.drops -= 1
            body = body[: served.drop_after]  # Content-Length promised more: the client sees a cut connection
        self.wfile.write(body)
        served.sent[-1] = len(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.served = Served()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/files/{NAME}"
    yield httpd
    if httpd.served.stall is not None:
        httpd.served.stall.set()
    httpd.served.stop_drip.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)


def fetch(server, tmp_path, **kwargs):
    kwargs.setdefault("progress", False)
    return fetch_file(server.url, kwargs.pop("sha256_prefix", SHA[:8]), tmp_path, **kwargs)


def test_sha256_prefix_from_name():
    mmseg = "ccnet_r101-d8_769x769_80k_cityscapes_20200617_010421-869a3423.pth"
    assert sha256_prefix_from_name(mmseg) == "869a3423"
    assert sha256_prefix_from_name(f"https://download.openmmlab.com/mmsegmentation/v0.5/ccnet/x/{mmseg}") == "869a3423"
    assert sha256_prefix_from_name("resnet50-19c8e357.pth") == "19c8e357"  # torch.hub's names
    assert sha256_prefix_from_name("ccnet_r50-d8.pth") is None
    assert sha256_prefix_from_name("model.pth") is None
    assert sha256_prefix_from_name("model-1234567.pth") is None  # 7 digits: not a hash
    assert sha256_prefix_from_name(NAME) == SHA[:8]


def test_first_fetch_downloads_then_the_cache_answers(server, tmp_path, capsys):
    path = fetch(server, tmp_path, progress=True)
    assert path == tmp_path / NAME and path.read_bytes() == DATA
    assert server.served.ranges == [None] and server.served.sent == [len(DATA)]
    assert not (tmp_path / f"{NAME}.part").exists()
    bar = capsys.readouterr().err.rsplit("\r", 1)[-1]  # its last state: the total came from Content-Length
    assert f"{NAME}: 100%|" in bar and "| 300k/300k " in bar
    assert fetch(server, tmp_path) == path
    assert fetch_file(server.url, None, tmp_path, progress=False) == path  # no hash given: used as it is
    assert len(server.served.ranges) == 1  # no second request


def test_default_cache_folder_follows_ccnet_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "base"))
    path = fetch_file(server.url, SHA[:8], progress=False)
    assert path == tmp_path / "base" / "checkpoints" / NAME and path.read_bytes() == DATA
    monkeypatch.delenv("CCNET_CACHE")
    assert download.default_checkpoint_dir() == download.Path.home() / ".cache" / "ccnet" / "checkpoints"


def test_cut_download_resumes_with_a_range_request_in_a_later_call(server, tmp_path):
    server.served.drop_after, server.served.drops = CUT, 1
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path, retries=0)
    assert "\n" not in str(err.value) and server.url in str(err.value) and str(tmp_path / NAME) in str(err.value)
    assert not (tmp_path / NAME).exists()
    assert (tmp_path / f"{NAME}.part").read_bytes() == DATA[:CUT]

    path = fetch(server, tmp_path, retries=0)
    assert server.served.ranges == [None, f"bytes={CUT}-"]
    assert server.served.sent == [CUT, len(DATA) - CUT]  # only the missing bytes travelled
    assert path.read_bytes() == DATA and not (tmp_path / f"{NAME}.part").exists()


def test_cut_download_resumes_within_one_call(server, tmp_path):
    server.served.drop_after, server.served.drops = CUT, 2
    assert fetch(server, tmp_path, retries=2).read_bytes() == DATA
    assert server.served.ranges == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-"]
    assert sum(server.served.sent) == len(DATA)


def test_retries_are_bounded(server, tmp_path):
    server.served.drop_after, server.served.drops = 1000, 100
    with pytest.raises(DownloadError, match="3 attempts"):
        fetch(server, tmp_path, retries=2)
    assert len(server.served.ranges) == 3
    assert (tmp_path / f"{NAME}.part").stat().st_size == 3000  # kept for the next call
    assert not (tmp_path / NAME).exists()


def test_server_that_ignores_range_sends_everything_again(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(DATA[:CUT])
    server.served.honour_range = False
    assert fetch(server, tmp_path).read_bytes() == DATA  # appended to the part it would be CUT bytes too long
    assert server.served.ranges == [f"bytes={CUT}-"] and server.served.sent == [len(DATA)]


def test_range_not_satisfiable_with_a_whole_part_renames_it(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(DATA)  # a run killed between the last byte and the rename
    assert fetch(server, tmp_path).read_bytes() == DATA
    assert server.served.ranges == [f"bytes={len(DATA)}-"] and server.served.sent == [0]


def test_range_not_satisfiable_with_a_foreign_part_starts_over(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * (len(DATA) + 10))
    assert fetch(server, tmp_path).read_bytes() == DATA
    assert server.served.ranges == [f"bytes={len(DATA) + 10}-", None]


def test_hash_mismatch_names_both_hashes_and_keeps_nothing(server, tmp_path):
    wrong = "00000000" if not SHA.startswith("00000000") else "11111111"
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path, sha256_prefix=wrong)
    message = str(err.value)
    assert SHA in message and wrong in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_file_placed_by_hand_is_used_after_the_hash_check(server, tmp_path):
    (tmp_path / NAME).write_bytes(DATA)
    assert fetch(server, tmp_path).read_bytes() == DATA
    (tmp_path / NAME).write_bytes(DATA[:-1])  # a wrong file there: refused and left alone, nothing fetched
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path)
    short_sha = hashlib.sha256(DATA[:-1]).hexdigest()
    assert short_sha in str(err.value) and SHA[:8] in str(err.value) and str(tmp_path / NAME) in str(err.value)
    assert (tmp_path / NAME).read_bytes() == DATA[:-1]
    assert server.served.ranges == []


def test_http_404_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        fetch_file(server.url + ".missing", None, tmp_path, progress=False, retries=3)
    assert server.url in str(err.value) and len(server.served.ranges) == 1


def test_server_error_is_retried(server, tmp_path):
    server.served.statuses = [503]
    assert fetch(server, tmp_path, retries=1).read_bytes() == DATA
    assert len(server.served.ranges) == 2
    server.served.statuses = [503, 503]
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(server, tmp_path / "other", retries=1)


def test_unreachable_host_says_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files/{NAME}"
    with pytest.raises(DownloadError) as err:
        fetch_file(url, SHA[:8], tmp_path, progress=False, retries=1)
    message = str(err.value)
    assert "\n" not in message and url in message and f"put it at {tmp_path / NAME}" in message
    assert "refused" in message.lower()
    assert not (tmp_path / NAME).exists()


def test_a_stalled_server_times_out(server, tmp_path):
    server.served.stall = threading.Event()
    result = []

    def run():
        try:
            fetch(server, tmp_path, timeout=0.2, retries=1)
        except DownloadError as err:
            result.append(str(err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)  # bounded: a missing timeout would hang here (the server waits 10 s)
    assert not thread.is_alive() and "timed out" in result[0] and len(server.served.ranges) == 2


def test_concurrent_fetches_download_once(server, tmp_path):
    """Several ranks of one job asking for the same file: one downloads, the others wait and use its file."""
    server.served.gate = threading.Event()
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(server, tmp_path))) for _ in range(2)]
    threads[0].start()
    while not server.served.ranges:  # the first request is in and held at the gate
        threading.Event().wait(0.01)
    threads[1].start()
    threading.Event().wait(0.3)  # time for a second request, if the second fetch did not wait for the first
    server.served.gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [tmp_path / NAME] * 2 and (tmp_path / NAME).read_bytes() == DATA
    assert server.served.ranges == [None]


def test_bad_arguments_and_unwritable_cache(server, tmp_path):
    with pytest.raises(DownloadError, match="expected 1 to 64 hex digits"):
        fetch(server, tmp_path, sha256_prefix="xyz")
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError, match=f"cannot create the cache folder {blocker}"):
        fetch(server, blocker / "sub")
    with pytest.raises(DownloadError, match="file name '' is not a plain file name"):
        fetch_file(server.url.rsplit("/", 1)[0] + "/", None, tmp_path, progress=False)
    with pytest.raises(DownloadError, match="file name '../x.pth' is not a plain file name"):
        fetch_file(server.url, None, tmp_path, "../x.pth", progress=False)
    assert server.served.ranges == []


def test_command_line(server, tmp_path, capsys):
    assert main([server.url, "--dir", str(tmp_path)]) == 0  # the hash is taken from the file name
    assert capsys.readouterr().out.strip() == str(tmp_path / NAME)
    assert main([server.url + ".missing", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HTTP 404" in err and err.count("\n") == 1


# --- issue 23: hostile servers and URLs, bounded in time; checksums of data set archives; free space; the cache


def timed_fetch(url, tmp_path, bound_s=20.0, **kwargs):
    """(the one-line error, seconds taken) of a fetch expected to fail within bound_s seconds (in a thread, so a
    fetch that never ends fails the test instead of hanging it)."""
    outcome = []

    def run():
        try:
            fetch_file(url, None, tmp_path, progress=False, **kwargs)
            outcome.append("no error")
        except DownloadError as err:
            outcome.append(err)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), f"the fetch of {url} still runs after {bound_s} s"
    assert isinstance(outcome[0], DownloadError), outcome
    return str(outcome[0]), time.monotonic() - start


def test_a_drip_server_is_cut_by_the_minimum_rate(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RATE_WINDOW_S", 1.0)
    url = server.url.replace("/files/", "/drip/")
    message, seconds = timed_fetch(url, tmp_path, retries=1, min_rate=100, timeout=30)
    assert "\n" not in message and "below download.min_rate=100" in message and "2 attempts" in message
    assert seconds < 4 * DRIP_S + 2  # each attempt ends at its first byte after a window: ~DRIP_S, not 30 s
    sent = server.served.sent
    assert len(sent) == 2 and server.served.ranges[1] == f"bytes={sent[0]}-"  # the 2nd attempt asked to resume
    assert not (tmp_path / NAME).exists() and 1 <= (tmp_path / f"{NAME}.part").stat().st_size <= sent[1]


def test_a_drip_server_is_cut_by_the_deadline(server, tmp_path):
    url = server.url.replace("/files/", "/drip/")
    message, seconds = timed_fetch(url, tmp_path, retries=5, min_rate=0, deadline_s=3.0)
    assert "not done within 3 s (download.deadline_s)" in message and "\n" not in message
    assert seconds < 3.0 + DRIP_S + 2  # checked at each byte: at most one drip past the deadline
    assert len(server.served.ranges) == 1  # a deadline is not retried
    assert not (tmp_path / NAME).exists()


@pytest.mark.parametrize("evil", ["\x00", "%00", "\n", "%0A", "%0d", "\x7f"])
def test_urls_with_control_characters_are_refused_before_any_request(server, tmp_path, evil):
    url = server.url.replace(".pth", f"{evil}x.pth")
    message, _ = timed_fetch(url, tmp_path)
    assert "control character" in message and "\n" not in message and "\x00" not in message and "\r" not in message
    assert server.served.ranges == [] and list(tmp_path.iterdir()) == []
    assert not is_url(url) and is_url(server.url)  # zoo.url's rule refuses it before any run starts


def test_cache_names_keep_only_safe_characters(server, tmp_path):
    assert download.cache_name("http://h/a/b%20c%2F..%2Fd;e.pth") == "b_c_.._d_e.pth"
    assert download.cache_name("http://h/a/..%2F..%2Fetc") == "_.._etc"  # no '/', no leading dot
    assert download.cache_name("http://h/a/.hidden") == "hidden"
    with pytest.raises(DownloadError, match="not a plain file name"):
        download.cache_name("http://h/a/..")
    with pytest.raises(DownloadError, match="not a plain file name"):
        fetch_file(server.url, None, tmp_path, "a b.pth", progress=False)


def test_a_redirect_loop_is_one_line(server, tmp_path):
    url = server.url.replace("/files/", "/loop/")
    message, seconds = timed_fetch(url, tmp_path, retries=3)
    assert message == f"{url}: too many redirects (a redirect loop, HTTP 302)"
    assert 5 <= len(server.served.ranges) <= 20 and seconds < 10  # urllib's own bound, and no retries of it


def test_md5_and_sha1_checksums(server, tmp_path):
    md5, sha1 = hashlib.md5(DATA).hexdigest(), hashlib.sha1(DATA).hexdigest()
    assert fetch(server, tmp_path, sha256_prefix=None, checksum=f"md5:{md5}").read_bytes() == DATA
    assert fetch(server, tmp_path, sha256_prefix=None, checksum=f"sha1:{sha1.upper()}").read_bytes() == DATA
    wrong = ("0" if md5[0] != "0" else "1") + md5[1:]
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path / "b", sha256_prefix=None, checksum=f"md5:{wrong}")
    assert f"MD5 is {md5}, expected one starting with {wrong}; nothing was kept" in str(err.value)
    assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.endswith(".lock")] == []
    for bad in ("md5:abc", f"crc32:{md5}", f"sha1:{md5}", "sha256:1234"):
        with pytest.raises(DownloadError, match="expected md5:<32 hex>"):
            fetch(server, tmp_path, sha256_prefix=None, checksum=bad)


def test_not_enough_free_space_is_refused_before_writing(server, tmp_path, monkeypatch):
    free = len(DATA) + download.SPACE_MARGIN - 1  # one byte short
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: download.shutil._ntuple_diskusage(0, 0, free))
    message, _ = timed_fetch(server.url, tmp_path, retries=3)
    assert f"{tmp_path}: not enough free space for {NAME} ({len(DATA)} bytes)" in message
    assert len(server.served.ranges) == 1 and not (tmp_path / NAME).exists()
    assert not (tmp_path / f"{NAME}.part").exists()


def test_a_full_disk_while_writing_is_one_line(server, tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, block):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if str(path).endswith(".part") and "a" in mode else f

    monkeypatch.setattr(download, "open", full_open, raising=False)
    message, _ = timed_fetch(server.url, tmp_path, retries=3)
    assert message == f"cannot write {tmp_path / (NAME + '.part')}: No space left on device"
    assert len(server.served.ranges) == 1 and not (tmp_path / NAME).exists()


def test_list_and_remove_the_cache(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CCNET_CACHE", str(tmp_path))
    fetch_file(server.url, SHA[:8], progress=False)
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "x.zip.part").write_bytes(b"12345")
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"checkpoints/{NAME}  300.1 KiB  sha256 {SHA}", "archives/x.zip.part  5 B  partial" + out[1][33:]]
    assert "cut download" in out[1]
    assert main(["remove", f"checkpoints/{NAME}", "x.zip.part"]) == 0
    assert not (tmp_path / "checkpoints" / NAME).exists() and not (archives / "x.zip.part").exists()
    assert main(["remove", "nothing.pth"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing.pth: not in the cache" in err
    assert main(["list"]) == 0 and "is empty" in capsys.readouterr().out


def test_the_config_defaults_are_the_fetchers():
    from omegaconf import OmegaConf

    from ccnet.config import DownloadConfig

    assert (DownloadConfig().deadline_s, DownloadConfig().min_rate) == (download.DEADLINE_S, download.MIN_RATE)
    cfg = OmegaConf.create({"download": {"deadline_s": 5, "min_rate": 7}})
    assert download.limits(cfg) == {"deadline_s": 5.0, "min_rate": 7.0} and download.limits({}) == {}
