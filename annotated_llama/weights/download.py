"""Downloads that never stall, never write outside their place, and never look complete when
they are not: HTTP Range resume, a timeout on every read, bounded retries with exponential
back-off, every remote name checked, and a file's final name only once its length or md5 is proven.

Why: LLaMA's weights come as presigned URLs, and users of the reference scripts watched `wget`
hang for hours on consolidated.00.pth and wrote restart loops and watchdogs around it (pyllama
#104, #103, #88; meta-llama/llama #99). The fixes are small:
  - bytes go to NAME.part; a new attempt asks for `Range: bytes=<size of .part>-` and appends;
  - every socket read has a timeout, so a stalled connection raises instead of blocking
    forever, and the next attempt resumes where it stopped;
  - attempts that make no progress are bounded, with back-off (1 s, 2 s, 4 s, ...);
  - a .part is renamed to its final name only when it is proven whole: its md5 matches, or the
    server stated the file's length (Content-Length, a Content-Range total, or the last chunk
    of a chunked body) and the .part has exactly that many bytes. A body cut short by a server
    that sent no length is resumed, never taken for the whole file;
  - every name the remote side chooses (a checklist line, a Content-Disposition header, a Hub
    file) goes through `safe_path`: it must stay inside --dest, or the file is refused;
  - a different file already at the destination is never replaced without --force.
Plain urllib: nothing here needs more than the standard library (tqdm draws the bar).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20  # bytes per read (and per md5 update)
# Model-parallel shard counts of Meta's releases (meta-llama/llama download.sh), by size in billions.
SHARDS_BY_SIZE = {7: 1, 8: 1, 13: 2, 30: 4, 33: 4, 34: 4, 65: 8, 70: 8}
# A path component a remote side may name: printable ASCII without separators, quotes, '%' or
# anything a shell or another platform reads specially. Unicode look-alikes of '.' and '/'
# (U+2024, U+FF0E, U+2215, U+FF0F...) and percent-encodings of them fall outside it.
NAME_PART = re.compile(r"[A-Za-z0-9_+=@,~-][A-Za-z0-9 ._+=@,~-]{0,254}|\.[A-Za-z0-9_+=@,~-][A-Za-z0-9 ._+=@,~-]{0,253}")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
UNSATISFIABLE = re.compile(r"bytes \*/(\d+)")


class DownloadError(OSError):
    """A download that cannot succeed by retrying (or gave up); the message is one line."""


def public(url: str) -> str:
    # Presigned URLs carry their signature in the query string: never print it.
    return url.split("?", 1)[0]


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def safe_path(dest, name: str, source: str) -> Path:
    """dest / name for a `name` the remote side chose (`source` says where it came from), or
    DownloadError: no NUL, backslash, absolute path, empty, '.' or '..' component, no character
    outside NAME_PART, and the path, with every symlink already in dest followed, inside dest."""
    dest = Path(dest)
    shown = repr(name)[:120]
    if not isinstance(name, str) or not name:
        raise DownloadError(f"{source} {shown}: an empty file name; refused")
    if "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise DownloadError(f"{source} {shown}: a NUL, a backslash or an absolute path; refused (it must stay "
                            f"inside {dest})")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise DownloadError(f"{source} {shown}: an empty, '.' or '..' path component; refused (it must stay "
                                f"inside {dest})")
        if not NAME_PART.fullmatch(part):
            raise DownloadError(f"{source} {shown}: only ASCII letters, digits, space and ._+=@,~- are allowed "
                                "in a file name; refused")
    if len(parts) > 16:
        raise DownloadError(f"{source} {shown}: more than 16 directories deep; refused")
    path = dest.joinpath(*parts)
    root = dest.resolve()
    for p in (path, path.with_name(path.name + ".part")):
        if not p.resolve().is_relative_to(root):  # resolve() follows symlinks that already exist
            raise DownloadError(f"{source} {shown}: leads outside {dest} (through a symlink there); refused")
    return path


def _progress(name: str, total: int | None, offset: int, quiet: bool):
    # A bar only on a terminal; logs and pipes get the one-line messages alone.
    return tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _open(url: str, offset: int, timeout: float):
    headers = {"Accept-Encoding": "identity"}  # a compressed body's length is not the file's
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_length(response, url: str) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    if not re.fullmatch(r"\s*\d{1,19}\s*", value):
        raise DownloadError(f"{public(url)}: the server sent an invalid Content-Length {value[:40]!r}")
    return int(value)


class _StartOver(OSError):
    """The .part cannot be resumed (it is longer than the file, or the server will not say): deleted."""


def _fetch_once(url: str, part: Path, timeout: float, quiet: bool) -> bool:
    """One HTTP request, appending to `part`. True if the .part is now the whole file, its length
    proven by the server (Content-Length, a Content-Range total, a chunked body's last chunk);
    False if the server ended the body without saying how long the file is."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)  # timeout: connect and every read
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Range Not Satisfiable: complete if the file is exactly this long ("bytes */TOTAL")
        match = UNSATISFIABLE.fullmatch(e.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == offset:
            return True
        part.unlink()
        raise _StartOver(f"the .part ({offset:,} bytes) is longer than the file "
                         f"({match.group(1) if match else 'of unstated length'} bytes); restarting") from None
    with response:
        length = _content_length(response, url)
        if offset and response.status == 206:
            match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{public(url)}: server resumed at the wrong byte "
                                    f"({response.headers.get('Content-Range')!r} for a request from {offset})")
            total = int(match.group(3)) if match.group(3) != "*" else None
            _say(quiet, f"{part.name[:-5]}: resuming at byte {offset:,}")
        else:
            if offset:  # the server ignored the Range: start over
                _say(quiet, f"{part.name[:-5]}: the server does not resume; restarting from byte 0")
            offset, total = 0, None
        if total is None and length is not None:
            total = offset + length
        with open(part, "ab" if offset else "wb") as f, _progress(part.name[:-5], total, offset, quiet) as bar:
            # read1: whatever has arrived (up to CHUNK), so bytes received before a stall are
            # written, not lost in a half-filled buffer when the timeout fires
            while block := response.read1(CHUNK):
                f.write(block)
                bar.update(len(block))
        size = part.stat().st_size
        chunked = getattr(response, "chunked", False)  # http.client raises if a chunked body is cut
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    if total is not None and size > total:
        part.unlink()
        raise _StartOver(f"received {size:,} bytes of a {total:,}-byte file; restarting")
    return total is not None or chunked


def _http_error(e: urllib.error.HTTPError, url: str) -> DownloadError | None:
    """The one-line error of a status that retrying cannot fix; None for the ones worth a retry."""
    if e.code == 403:
        return DownloadError(f"{public(url)}: 403 Forbidden: the download link has expired or is not valid "
                             "for this file; request a new URL and run again (finished files are kept)")
    if e.code == 404:
        return DownloadError(f"{public(url)}: 404 Not Found: no such file at this URL "
                             "(check the model name and the URL)")
    if e.code < 500 and e.code not in (408, 429):
        return DownloadError(f"{public(url)}: HTTP {e.code} {str(e.reason)[:80]}")
    return None


def remote_length(url: str, offset: int, timeout: float) -> int | None:
    """The file's length as the server states it, asked with a Range from `offset` (no body read)."""
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        match = UNSATISFIABLE.fullmatch(e.headers.get("Content-Range", "").strip()) if e.code == 416 else None
        if match:
            return int(match.group(1))
        raise _http_error(e, url) or DownloadError(f"{public(url)}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{public(url)}: cannot ask the server for the file's length ({e})") from None
    with response:
        match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if response.status == 206 and match and match.group(3) != "*":
            return int(match.group(3))
        length = _content_length(response, url)
        return length if response.status == 200 else None


def _existing(url, dest: Path, md5, timeout, force, quiet) -> bool:
    """True if `dest` already is the file (by md5, or by the server's length without one);
    DownloadError if it is another file and not `force` (with force it stays until replaced)."""
    if md5 is not None:
        if md5_of(dest) == md5:
            _say(quiet, f"{dest.name}: already complete (md5 verified)")
            return True
        found = "does not match the expected md5"
    elif force:
        return False
    else:
        size = dest.stat().st_size
        total = remote_length(url, size, timeout)
        if total == size:
            _say(quiet, f"{dest.name}: already complete ({size:,} bytes, the server's length; "
                        "pass --md5 to verify its content)")
            return True
        found = (f"has {size:,} bytes but the server's file "
                 + ("does not state its length" if total is None else f"has {total:,}"))
    if not force:
        raise DownloadError(f"{dest}: already exists and {found}; pass --force to replace it")
    return False


def download_file(url: str, dest, md5: str | None = None, *, timeout: float = 30.0, retries: int = 5,
                  backoff: float = 1.0, quiet: bool = False, force: bool = False, replace: bool = False) -> Path:
    """Fetch `url` to `dest` (resuming dest.part), prove it whole (md5 if given, else the server's
    length), then rename into place. An existing different `dest` is refused unless `force` (then
    replaced only by a complete new file); `replace`: fetched again whatever is there (an index
    file such as a checklist), and renamed over it once complete.

    `retries` bounds consecutive attempts that make no progress (an attempt that received
    bytes resets the count), and separately the md5 failures. Raises DownloadError with a
    one-line message; the .part is kept so that running again resumes."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    md5 = md5.lower() if md5 else None
    if dest.is_dir():
        raise DownloadError(f"{dest}: is a directory")
    if dest.exists() and not replace and _existing(url, dest, md5, timeout, force, quiet):
        return dest
    if replace:
        part.unlink(missing_ok=True)  # no resuming an index: it may have changed
    dest.parent.mkdir(parents=True, exist_ok=True)
    stalls = bad_sums = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            proven = _fetch_once(url, part, timeout, quiet)
        except urllib.error.HTTPError as e:
            if (fatal := _http_error(e, url)) is not None:
                raise fatal from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                socket.timeout, OSError) as e:
            if isinstance(e, DownloadError):
                raise
            if isinstance(e, http.client.IncompleteRead):
                error = ("connection closed before the end of the body" if e.expected is None
                         else f"connection closed {e.expected:,} bytes early")
            elif isinstance(e, _StartOver):
                error = str(e)
            elif isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in str(e):
                error = f"no data for {timeout:g} s"
            else:
                error = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
        else:
            if proven or md5 is not None:
                if md5 is None or md5_of(part) == md5:
                    os.replace(part, dest)  # only now does it get its final name
                    _say(quiet, f"{dest.name}: done{' (md5 verified)' if md5 else ''}")
                    return dest
                part.unlink()  # corrupt: never resume from bad bytes
                bad_sums += 1
                if bad_sums > retries:
                    raise DownloadError(f"{dest}: md5 mismatch after {bad_sums} downloads (expected {md5}); "
                                        "the file was deleted") from None
                _say(quiet, f"{dest.name}: md5 mismatch; downloading again")
                continue
            # the body ended, but the server never said the file's length: ask again from here
            error = "the server ended the body without stating the file's length (pass --md5 to verify it)"
        after = part.stat().st_size if part.exists() else 0
        stalls = 0 if after > before else stalls + 1
        if stalls > retries:
            raise DownloadError(f"{public(url)}: giving up after {stalls} attempts without progress ({error}); "
                                f"run again to resume from byte {after:,}")
        delay = backoff * 2 ** max(stalls - 1, 0)
        _say(quiet, f"{dest.name}: {error} at byte {after:,}; retrying in {delay:g} s")
        time.sleep(delay)


def remote_name(url: str, timeout: float) -> str:
    """The name a URL's file goes by: its Content-Disposition filename, else the URL path's last
    segment (percent-decoded); checked by the caller with safe_path."""
    try:
        with _open(url, 0, timeout) as response:  # headers only: the body is not read
            disposition = response.headers.get("Content-Disposition")
    except urllib.error.HTTPError as e:
        raise _http_error(e, url) or DownloadError(f"{public(url)}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{public(url)}: cannot reach the server ({e})") from None
    if disposition:
        header = Message()
        header["Content-Disposition"] = disposition
        name = header.get_filename()  # filename*= (RFC 5987, percent-encoded UTF-8) decoded too
        if name is not None:
            if "/" in name:
                raise DownloadError(f"Content-Disposition {name!r}: a file name with a directory; refused")
            return name
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name:
        raise DownloadError(f"{public(url)}: the URL names no file; give --dest a file path")
    return name


def parse_checklist(path: Path) -> dict[str, str]:
    """md5sum's output format ("<hex>  <name>" per line) -> {name: hex}."""
    sums = {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32}) [ *]?(.+)", line.strip())
        if not match:
            raise DownloadError(f"{path}: line {lineno} is not '<md5>  <file name>'")
        sums[match.group(2).removeprefix("./")] = match.group(1).lower()
    return sums


def meta_url(template: str, file: str) -> str:
    # Meta's download.sh: ${PRESIGNED_URL/'*'/"$file"}, i.e. the first '*' becomes the file path
    if "*" not in template:
        raise DownloadError("--meta-url: expected a URL with a '*' where the file name goes (Meta's e-mail link)")
    return template.replace("*", urllib.parse.quote(file), 1)


def shard_count(model: str) -> int:
    match = re.search(r"(\d+)[bB]", model)
    if not match or int(match.group(1)) not in SHARDS_BY_SIZE:
        raise DownloadError(f"--models {model}: cannot tell its shard count from the name "
                            f"(known sizes: {', '.join(f'{k}B' for k in SHARDS_BY_SIZE)})")
    return SHARDS_BY_SIZE[int(match.group(1))]


def download_meta(template: str, models: list[str], dest, **kw) -> None:
    """Meta's layout (download.sh): tokenizer.model + tokenizer_checklist.chk, then per model
    MODEL/params.json, MODEL/consolidated.NN.pth, MODEL/checklist.chk, every file verified."""
    dest = Path(dest)
    for model in models:
        safe_path(dest, model, "--models")
    meta_url(template, "")  # a URL without '*': refused before anything is fetched

    def fetch(file, md5=None, source="file", **extra):
        return download_file(meta_url(template, file), safe_path(dest, file, source), md5, **{**kw, **extra})

    # The checklists are fetched afresh every run (they are tiny, and they are what verifies
    # everything else: a stale one would pass or fail files wrongly), replaced once complete.
    sums = parse_checklist(fetch("tokenizer_checklist.chk", replace=True))
    fetch("tokenizer.model", sums.get("tokenizer.model"))
    for model in models:
        # The checklist first: it names every file of the model with its md5, shards included.
        checklist = fetch(f"{model}/checklist.chk", replace=True)
        sums = parse_checklist(checklist)
        for name in sums:  # every name the server sent, checked before anything is fetched
            safe_path(dest / model, name, f"{checklist}: file")
        shards = sorted(name for name in sums if re.fullmatch(r"consolidated\.\d+\.pth", name))
        if not shards:
            shards = [f"consolidated.{i:02d}.pth" for i in range(shard_count(model))]
        for name in shards + ["params.json"]:
            fetch(f"{model}/{name}", sums.get(name))
        for name in sums:  # anything else the checklist names
            if name not in shards and name != "params.json":
                fetch(f"{model}/{name}", sums[name], f"{checklist}: file")
