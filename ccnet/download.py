"""Fetch a published file once into a local cache, like torch.hub: resumable, hash-checked, offline-friendly.

    path = fetch_file(url, sha256_prefix=sha256_prefix_from_name(url))

- Cache: `$CCNET_CACHE/checkpoints/` (`CCNET_CACHE` defaults to `~/.cache/ccnet`, the folder that also holds
  `data/`), or `cache_dir`. A file already there, downloaded before or placed by hand, is used after the hash check
  without any network access.
- A download goes to `<name>.part` and resumes from its size with an HTTP Range request after a cut (in the same
  call, up to `retries` times, or in a later one); a server that ignores Range sends everything again and the part
  is rewritten from the start.
- The SHA-256 of the whole file must start with `sha256_prefix` (mmsegmentation's and torch.hub's file names end
  in its first 8 hex digits); only then is the part renamed to its final name, so the final name never holds a
  bad or half file. A mismatch deletes the part and raises, naming both hashes.
- Every failure is a `DownloadError` with a one-line message; an unreachable host names the URL and the exact path
  where to put the file by hand.

- Bounded in time: `deadline_s` for the whole call (every attempt together; config `download.deadline_s`), and a
  transfer slower than `min_rate` bytes/s over any RATE_WINDOW_S seconds counts as a failed attempt (config
  `download.min_rate`); a server that drips a byte every few seconds never trips a per-read timeout alone.
- Checked before anything is written: a URL holding a control character (a NUL byte, a newline, also
  percent-encoded: %00, %0A) is refused; the cache name keeps only [A-Za-z0-9._+-] of the URL's last segment; the
  free space of the cache folder must hold what the server announces; a redirect loop is one line.
- Hashes: `sha256_prefix` (the start of the SHA-256, as in mmsegmentation's and torch.hub's file names) or
  `checksum="md5:<hex>"` / `"sha1:<hex>"` / `"sha256:<hex>"` (data set archives: the provider's published MD5).

Command line: `python -m ccnet.download URL [--sha256 PREFIX] [--dir DIR] [--name NAME]` prints the cached path;
`python -m ccnet.download list` shows what the cache holds (size, SHA-256), `... remove NAME...` deletes entries.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CACHE_ENV = "CCNET_CACHE"
CACHE_KINDS = ("checkpoints", "archives")  # published models and backbone weights; data set archives
CHUNK = 1 << 20
RETRY_WAIT_S = 1.0  # the wait before retry k is k * RETRY_WAIT_S
DEADLINE_S = 12 * 3600.0  # a whole fetch_file call (Cityscapes' 11 GB at 1 MB/s: about 3 h)
MIN_RATE = 1024  # bytes/s, averaged over each RATE_WINDOW_S seconds of a transfer
RATE_WINDOW_S = 60.0
SPACE_MARGIN = 64 << 20  # free bytes left over after a download or an unpacked archive
HASHES = {"md5": 32, "sha1": 40, "sha256": 64}  # algorithm -> hex digits of a whole digest
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a cut connection, a stalled read, a refused connection, an unknown host (all OSErrors): worth another try
_TRANSIENT = (OSError, http.client.HTTPException)


def one_line(text: str) -> str:
    """text with every control character written as an escape: a message that stays on one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


class DownloadError(ValueError):
    """A file that could not be fetched or failed its hash check; the message is one line (control characters of
    a URL, a file name or a server's reason are escaped)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class _TooSlow(OSError):
    """A transfer below the minimum rate: a failed attempt (the next one resumes)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/ccnet").expanduser()


def default_checkpoint_dir() -> Path:
    return cache_root() / "checkpoints"


def default_archive_dir() -> Path:
    return cache_root() / "archives"


def limits(cfg) -> dict:
    """fetch_file's time limits from a run's config (its `download` section; the defaults without one)."""
    section = cfg.get("download") if hasattr(cfg, "get") else None
    if not section:
        return {}
    return {"deadline_s": float(section["deadline_s"]), "min_rate": float(section["min_rate"])}


def sha256_prefix_from_name(name: str) -> str | None:
    """'..._20200616_142517-4123f401.pth' (a path or URL works too) -> '4123f401'; None when the name has no hash."""
    match = _NAME_HASH.search(urllib.parse.urlparse(str(name)).path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def digest_of(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return digest_of(path, "sha256")


def check_url(url: str) -> None:
    """Refuse what no file should be fetched from: another scheme than http(s), a control character (raw or
    percent-encoded: it would end up in a file name or a message)."""
    if _CONTROL.search(url) or _CONTROL.search(urllib.parse.unquote(url)):
        raise DownloadError(f"{ascii(url)}: a URL with a control character (NUL, newline, ...) is refused")
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"{url}: expected an http:// or https:// address")


def cache_name(url: str) -> str:
    """The cache file's name from the URL's last path segment: only [A-Za-z0-9._+-] kept, others become '_'."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if name in ("", ".", ".."):
        raise DownloadError(f"{url}: file name {name!r} is not a plain file name; give file_name")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "_"


def parse_checksum(checksum: str | None, sha256_prefix: str | None) -> tuple[str, str] | None:
    """('md5' | 'sha1' | 'sha256', expected hex: a whole digest, or for sha256 any prefix) or None."""
    if sha256_prefix is not None:
        expected = sha256_prefix.lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", expected):
            raise DownloadError(f"sha256_prefix {sha256_prefix!r}: expected 1 to 64 hex digits")
        return "sha256", expected
    if checksum is None:
        return None
    algorithm, _, expected = checksum.lower().partition(":")
    shortest = 8 if algorithm == "sha256" else HASHES.get(algorithm, 0)  # SHA-256: a prefix is enough
    hex_ok = re.fullmatch(r"[0-9a-f]+", expected) and shortest <= len(expected) <= HASHES.get(algorithm, -1)
    if not hex_ok:
        raise DownloadError(f"checksum {checksum!r}: expected md5:<32 hex>, sha1:<40 hex> or sha256:<8 to 64 hex>")
    return algorithm, expected


def _matches(path: Path, expected: tuple[str, str]) -> tuple[bool, str]:
    actual = digest_of(path, expected[0])
    return actual.startswith(expected[1]), actual


def fetch_file(
    url: str,
    sha256_prefix: str | None = None,
    cache_dir: str | Path | None = None,
    file_name: str | None = None,
    progress: bool = True,
    *,
    checksum: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    deadline_s: float = DEADLINE_S,
    min_rate: float = MIN_RATE,
) -> Path:
    """The cached copy of url (downloaded first when missing), checked against sha256_prefix or checksum.

    timeout: seconds for connecting and for each read; retries: further attempts after a transient failure
    (cut connection, timeout, unreachable host, HTTP 5xx, a transfer below min_rate bytes/s), each resuming from
    the part already received; deadline_s: the whole call, every attempt together.
    """
    check_url(url)
    if file_name is not None and not _SAFE_NAME.fullmatch(file_name):
        raise DownloadError(f"{url}: file name {file_name!r} is not a plain file name; use [A-Za-z0-9._+-]")
    name = file_name or cache_name(url)
    expected = parse_checksum(checksum, sha256_prefix)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_checkpoint_dir()
    final = folder / name
    if final.is_file():
        _check_existing(final, url, expected)
        return final
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create the cache folder {folder}: {err.strerror or err}") from err
    with _locked(folder / f".{name}.lock"):
        if final.is_file():  # another process finished it while this one waited
            _check_existing(final, url, expected)
            return final
        part = folder / f"{name}.part"
        limits = _Limits(time.monotonic() + deadline_s, deadline_s, min_rate, timeout)
        _download(url, part, final, expected, progress, limits, retries)
        _verify_and_place(part, final, url, expected)
    return final


class _Limits:
    def __init__(self, deadline: float, deadline_s: float, min_rate: float, timeout: float):
        self.deadline, self.deadline_s, self.min_rate, self.timeout = deadline, deadline_s, min_rate, timeout

    def check_deadline(self, url: str, part: Path) -> None:
        if time.monotonic() > self.deadline:
            held = part.stat().st_size if part.is_file() else 0
            raise DownloadError(
                f"{url}: not done within {self.deadline_s:g} s (download.deadline_s); {held} bytes kept in {part}, "
                f"the next call resumes from there"
            )


def _check_existing(final: Path, url: str, expected: tuple[str, str] | None) -> None:
    if expected is None:
        return
    ok, actual = _matches(final, expected)
    if not ok:  # never overwrite a file someone put there: say what to do instead
        raise DownloadError(
            f"{final}: {_label(expected)} {actual} does not start with {expected[1]} (the hash of {url}); "
            f"delete or replace the file to fetch it again"
        )


def _label(expected: tuple[str, str]) -> str:
    return {"md5": "MD5", "sha1": "SHA-1", "sha256": "SHA-256"}[expected[0]]


def _download(url, part: Path, final: Path, expected, progress: bool, limits: _Limits, retries: int) -> None:
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(attempt * RETRY_WAIT_S)
        limits.check_deadline(url, part)
        try:
            if _attempt(url, part, expected, progress, limits):
                return
            last = "the connection closed before the end of the file"
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:  # urllib's own message spans three lines
                raise DownloadError(f"{url}: too many redirects (a redirect loop, HTTP {err.code})") from None
            if err.code < 500 and err.code not in (408, 429):  # 404, 403, ...: asking again will not help
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            last = f"HTTP {err.code} {err.reason}"
        except _TRANSIENT as err:  # disk errors are DownloadErrors already
            last = str(getattr(err, "reason", None) or err or type(err).__name__)
    raise DownloadError(
        f"cannot download {url} ({last}; {retries + 1} attempts); on a machine without access, download it "
        f"elsewhere and put it at {final}"
    )


def _attempt(url: str, part: Path, expected, progress: bool, limits: _Limits) -> bool:
    """One request; True when the part holds the whole file (as far as the server tells)."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ccnet-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    timeout = max(0.01, min(limits.timeout, limits.deadline - time.monotonic()))
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the part is already whole (a run killed before the rename) or is not this file
        if expected and _matches(part, expected)[0]:
            return True
        part.unlink()
        return _attempt(url, part, expected, progress, limits)  # from byte 0: no second 416
    with response:
        start, total = _content_range(response, offset)
        if start is None:  # a 206 for another range than asked: not worth stitching; the next attempt starts over
            part.unlink(missing_ok=True)
            raise urllib.error.URLError(f"a range other than bytes={offset}-: {response.headers['Content-Range']}")
        if start != offset:
            part.unlink(missing_ok=True)  # a 200: the server ignored Range and sends everything again
        if total is not None:
            require_space(part.parent, total - start, f"{part.name[: -len('.part')]} ({total} bytes)")
        try:
            f = open(part, "ab")
        except OSError as err:
            raise _disk_error(part, err) from None
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.stem,
            disable=not progress,
        )
        received = start
        window_start, window_bytes = time.monotonic(), 0
        with f, bar:
            # read1: whatever has arrived (up to CHUNK), so a drip of bytes comes back to the checks below
            while block := response.read1(CHUNK):
                try:
                    f.write(block)
                except OSError as err:
                    raise _disk_error(part, err) from None
                received += len(block)
                bar.update(len(block))
                now, window_bytes = time.monotonic(), window_bytes + len(block)
                if now > limits.deadline:
                    _fsync(f, part)
                    limits.check_deadline(url, part)
                if now - window_start >= RATE_WINDOW_S:
                    rate = window_bytes / (now - window_start)
                    if rate < limits.min_rate:
                        _fsync(f, part)
                        raise _TooSlow(f"{rate:.0f} bytes/s, below download.min_rate={limits.min_rate:g}")
                    window_start, window_bytes = now, 0
            _fsync(f, part)
    return total is None or received >= total


def require_space(folder: Path, needed: int, what: str) -> None:
    """A DownloadError unless folder's file system has `needed` bytes free (plus SPACE_MARGIN)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise DownloadError(f"cannot read the free space of {folder}: {err.strerror or err}") from None
    if needed + SPACE_MARGIN > free:
        raise DownloadError(
            f"{folder}: not enough free space for {what}: {human_size(needed)} needed (plus "
            f"{human_size(SPACE_MARGIN)} spare), {human_size(free)} free"
        )


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _content_range(response, offset: int) -> tuple[int | None, int | None]:
    """(first byte of the body, size of the whole file or None) from the status and headers: 0 for a 200 (the
    server ignored Range or none was sent), None for a 206 that is not the range asked for."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.getcode() == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
        if not match or int(match.group(1)) != offset:
            return None, None
        size = match.group(3)
        return offset, int(size) if size.isdigit() else int(match.group(2)) + 1
    return 0, length


def _fsync(f, part: Path) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as err:
        raise _disk_error(part, err) from None


def _disk_error(part: Path, err: OSError) -> DownloadError:
    return DownloadError(f"cannot write {part}: {err.strerror or err}")


def _verify_and_place(part: Path, final: Path, url: str, expected: tuple[str, str] | None) -> None:
    if expected is not None:
        ok, actual = _matches(part, expected)
        if not ok:
            part.unlink()  # resuming on top of bad bytes would only fail again
            raise DownloadError(
                f"{url}: the downloaded file's {_label(expected)} is {actual}, expected one starting with "
                f"{expected[1]}; nothing was kept"
            )
    try:
        os.replace(part, final)
        fsync_dir(final.parent)
    except OSError as err:
        raise DownloadError(f"cannot move {part} to {final}: {err.strerror or err}") from None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """One download of a file at a time (several ranks of one job may ask for it together); POSIX only."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise DownloadError(f"cannot create {lock_path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(kind, path) of every file in the cache's folders (CACHE_KINDS), parts of cut downloads included."""
    root = cache_root() if root is None else root
    found = []
    for kind in CACHE_KINDS:
        folder = root / kind
        if folder.is_dir():
            found += [(kind, p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return found


def list_cache(root: Path | None = None, hashes: bool = True) -> list[str]:
    """One line per cached file: kind/name, size, SHA-256 (or 'partial' for the part of a cut download)."""
    lines = []
    for kind, path in cached_files(root):
        size = path.stat().st_size
        if path.name.endswith(".part"):
            state = "partial (a cut download; the next fetch resumes it)"
        else:
            state = f"sha256 {sha256_of(path)}" if hashes else ""
        lines.append(f"{kind}/{path.name}  {human_size(size)}  {state}".rstrip())
    return lines


def remove_cached(names: list[str], root: Path | None = None) -> list[Path]:
    """Delete the cached files named (a name, or kind/name); a DownloadError naming any name not in the cache."""
    entries = cached_files(root)
    chosen = []
    for name in names:
        hits = [p for kind, p in entries if name in (p.name, f"{kind}/{p.name}")]
        if not hits:
            raise DownloadError(f"{name}: not in the cache {cache_root() if root is None else root} (see: list)")
        chosen += hits
    for path in chosen:
        path.unlink(missing_ok=True)
    return chosen


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["list"]:
            parser = argparse.ArgumentParser(prog="python -m ccnet.download list")
            parser.add_argument("--no-hash", action="store_true", help="skip the SHA-256 (large archives)")
            args = parser.parse_args(argv[1:])
            lines = list_cache(hashes=not args.no_hash)
            print("\n".join(lines) if lines else f"the cache {cache_root()} is empty")
            return 0
        if argv[:1] == ["remove"]:
            parser = argparse.ArgumentParser(prog="python -m ccnet.download remove")
            parser.add_argument("names", nargs="+", help="file names as `list` shows them (kind/name or name)")
            for path in remove_cached(parser.parse_args(argv[1:]).names):
                print(f"removed {path}")
            return 0
        parser = argparse.ArgumentParser(prog="python -m ccnet.download", description=__doc__.split("\n")[0])
        parser.add_argument("url")
        parser.add_argument("--sha256", help="expected SHA-256 prefix (default: the hash at the end of the file name)")
        parser.add_argument("--dir", help=f"cache folder (default: {default_checkpoint_dir()})")
        parser.add_argument("--name", help="file name in the cache (default: the URL's)")
        args = parser.parse_args(argv)
        path = fetch_file(args.url, args.sha256 or sha256_prefix_from_name(args.name or args.url), args.dir, args.name)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
