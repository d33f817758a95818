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

Command line: `python -m ccnet.download URL [--sha256 PREFIX] [--dir DIR] [--name NAME]` prints the cached path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CACHE_ENV = "CCNET_CACHE"
CHUNK = 1 << 20
RETRY_WAIT_S = 1.0  # the wait before retry k is k * RETRY_WAIT_S
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# a cut connection, a stalled read, a refused connection, an unknown host (all OSErrors): worth another try
_TRANSIENT = (OSError, http.client.HTTPException)


class DownloadError(ValueError):
    """A file that could not be fetched or failed its hash check; the message is one line."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/ccnet").expanduser()


def default_checkpoint_dir() -> Path:
    return cache_root() / "checkpoints"


def sha256_prefix_from_name(name: str) -> str | None:
    """'..._20200616_142517-4123f401.pth' (a path or URL works too) -> '4123f401'; None when the name has no hash."""
    match = _NAME_HASH.search(urllib.parse.urlparse(str(name)).path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(
    url: str,
    sha256_prefix: str | None = None,
    cache_dir: str | Path | None = None,
    file_name: str | None = None,
    progress: bool = True,
    *,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """The cached copy of url (downloaded first when missing), checked against sha256_prefix when one is given.

    timeout: seconds for connecting and for each read; retries: further attempts after a transient failure
    (cut connection, timeout, unreachable host, HTTP 5xx), each resuming from the part already received.
    """
    name = file_name or urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise DownloadError(f"{url}: file name {name!r} is not a plain file name; give file_name")
    expected = None
    if sha256_prefix is not None:
        expected = sha256_prefix.lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", expected):
            raise DownloadError(f"sha256_prefix {sha256_prefix!r}: expected 1 to 64 hex digits")
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
        _download(url, part, final, expected, progress, timeout, retries)
        _verify_and_place(part, final, url, expected)
    return final


def _check_existing(final: Path, url: str, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_of(final)
    if not actual.startswith(expected):  # never overwrite a file someone put there: say what to do instead
        raise DownloadError(
            f"{final}: SHA-256 {actual} does not start with {expected} (the hash of {url}); "
            f"delete or replace the file to fetch it again"
        )


def _download(url, part: Path, final: Path, expected, progress: bool, timeout: float, retries: int) -> None:
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(attempt * RETRY_WAIT_S)
        try:
            if _attempt(url, part, expected, progress, timeout):
                return
            last = "the connection closed before the end of the file"
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code not in (408, 429):  # 404, 403, ...: asking again will not help
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            last = f"HTTP {err.code} {err.reason}"
        except _TRANSIENT as err:  # disk errors are DownloadErrors already
            last = str(getattr(err, "reason", None) or err or type(err).__name__)
    raise DownloadError(
        f"cannot download {url} ({last}; {retries + 1} attempts); on a machine without access, download it "
        f"elsewhere and put it at {final}"
    )


def _attempt(url: str, part: Path, expected, progress: bool, timeout: float) -> bool:
    """One request; True when the part holds the whole file (as far as the server tells)."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ccnet-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the part is already whole (a run killed before the rename) or is not this file
        if expected and sha256_of(part).startswith(expected):
            return True
        part.unlink()
        return _attempt(url, part, expected, progress, timeout)  # from byte 0: no second 416
    with response:
        start, total = _content_range(response, offset)
        if start is None:  # a 206 for another range than asked: not worth stitching; the next attempt starts over
            part.unlink(missing_ok=True)
            raise urllib.error.URLError(f"a range other than bytes={offset}-: {response.headers['Content-Range']}")
        if start != offset:
            part.unlink(missing_ok=True)  # a 200: the server ignored Range and sends everything again
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
        with f, bar:
            while block := response.read(CHUNK):
                try:
                    f.write(block)
                except OSError as err:
                    raise _disk_error(part, err) from None
                received += len(block)
                bar.update(len(block))
            _fsync(f, part)
    return total is None or received >= total


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


def _verify_and_place(part: Path, final: Path, url: str, expected: str | None) -> None:
    if expected is not None:
        actual = sha256_of(part)
        if not actual.startswith(expected):
            part.unlink()  # resuming on top of bad bytes would only fail again
            raise DownloadError(
                f"{url}: the downloaded file's SHA-256 is {actual}, expected one starting with {expected}; "
                f"nothing was kept"
            )
    try:
        os.replace(part, final)
        _fsync_dir(final.parent)
    except OSError as err:
        raise DownloadError(f"cannot move {part} to {final}: {err.strerror or err}") from None


def _fsync_dir(folder: Path) -> None:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccnet.download", description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--sha256", help="expected SHA-256 prefix (default: the hash at the end of the file name)")
    parser.add_argument("--dir", help=f"cache folder (default: {default_checkpoint_dir()})")
    parser.add_argument("--name", help="file name in the cache (default: the URL's)")
    args = parser.parse_args(argv)
    try:
        path = fetch_file(args.url, args.sha256 or sha256_prefix_from_name(args.name or args.url), args.dir, args.name)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
