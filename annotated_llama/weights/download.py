"""Downloads that never stall: HTTP Range resume, a timeout on every read, bounded retries with
exponential back-off, and md5 verification before a file gets its final name.

Why: LLaMA's weights come as presigned URLs, and users of the reference scripts watched `wget`
hang for hours on consolidated.00.pth and wrote restart loops and watchdogs around it (pyllama
#104, #103, #88; meta-llama/llama #99; REFERENCE section 3 item 4). The fixes are small:
  - bytes go to NAME.part; a new attempt asks for `Range: bytes=<size of .part>-` and appends;
  - every socket read has a timeout, so a stalled connection raises instead of blocking
    forever, and the next attempt resumes where it stopped;
  - attempts that make no progress are bounded, with back-off (1 s, 2 s, 4 s, ...);
  - the md5 is checked on the .part before the rename, so a file with its final name is a
    verified file; one that fails is deleted and fetched again.
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
import urllib.request
from pathlib import Path

CHUNK = 1 << 20  # bytes per read (and per md5 update)
# Model-parallel shard counts of Meta's releases (download.sh; REFERENCE b4), by size in billions.
SHARDS_BY_SIZE = {7: 1, 8: 1, 13: 2, 30: 4, 33: 4, 34: 4, 65: 8, 70: 8}


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


def _progress(name: str, total: int | None, offset: int, quiet: bool):
    from tqdm import tqdm

    # A bar only on a terminal; logs and pipes get the one-line messages alone.
    return tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _fetch_once(url: str, part: Path, timeout: float, quiet: bool) -> bool:
    """One HTTP request, appending to `part`. True if the file is complete (by Content-Length
    or by the server's end of stream when it sent none)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # timeout: connect and every read
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # Range Not Satisfiable: .part already holds every byte
            return True
        raise
    with response:
        if offset and response.status != 206:  # the server ignored the Range: start over
            _say(quiet, f"{part.name[:-5]}: the server does not resume; restarting from byte 0")
            offset = 0
        elif offset:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{public(url)}: server resumed at the wrong byte "
                                    f"({response.headers.get('Content-Range')!r} for a request from {offset})")
            _say(quiet, f"{part.name[:-5]}: resuming at byte {offset:,}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as f, _progress(part.name[:-5], total, offset, quiet) as bar:
            # read1: whatever has arrived (up to CHUNK), so bytes received before a stall are
            # written, not lost in a half-filled buffer when the timeout fires
            while block := response.read1(CHUNK):
                f.write(block)
                bar.update(len(block))
        size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    return True


def download_file(url: str, dest, md5: str | None = None, *, timeout: float = 30.0, retries: int = 5,
                  backoff: float = 1.0, quiet: bool = False) -> Path:
    """Fetch `url` to `dest` (resuming dest.part), verify `md5` if given, then rename into place.

    `retries` bounds consecutive attempts that make no progress (an attempt that received
    bytes resets the count), and separately the md5 failures. Raises DownloadError with a
    one-line message; the .part is kept so that running again resumes."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    md5 = md5.lower() if md5 else None
    if dest.exists():
        if md5 is None or md5_of(dest) == md5:
            _say(quiet, f"{dest.name}: already complete{' (md5 verified)' if md5 else ''}")
            return dest
        # A file with its final name but the wrong content (an interrupted wget, say): treat
        # it as partial, resume, and verify; if it was corrupt, it fails md5 and starts over.
        os.replace(dest, part)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stalls = bad_sums = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, timeout, quiet)
        except urllib.error.HTTPError as e:
            if e.code == 403:
                raise DownloadError(f"{public(url)}: 403 Forbidden: the download link has expired or is not valid "
                                    "for this file; request a new URL and run again (finished files are kept)") from None
            if e.code == 404:
                raise DownloadError(f"{public(url)}: 404 Not Found: no such file at this URL "
                                    "(check the model name and the URL)") from None
            if e.code < 500 and e.code != 429:
                raise DownloadError(f"{public(url)}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                socket.timeout, OSError) as e:
            if isinstance(e, DownloadError):
                raise
            if isinstance(e, http.client.IncompleteRead):
                error = f"connection closed {e.expected:,} bytes early"
            elif isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in str(e):
                error = f"no data for {timeout:g} s"
            else:
                error = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
        else:
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
        after = part.stat().st_size if part.exists() else 0
        stalls = 0 if after > before else stalls + 1
        if stalls > retries:
            raise DownloadError(f"{public(url)}: giving up after {stalls} attempts without progress ({error}); "
                                f"run again to resume from byte {after:,}")
        delay = backoff * 2 ** max(stalls - 1, 0)
        _say(quiet, f"{dest.name}: {error} at byte {after:,}; retrying in {delay:g} s")
        time.sleep(delay)


def parse_checklist(path: Path) -> dict[str, str]:
    """md5sum's output format ("<hex>  <name>" per line) -> {name: hex}."""
    sums = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
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
    return template.replace("*", file, 1)


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

    def fetch(file, md5=None):
        return download_file(meta_url(template, file), dest / file, md5, **kw)

    sums = parse_checklist(fetch("tokenizer_checklist.chk"))
    fetch("tokenizer.model", sums.get("tokenizer.model"))
    for model in models:
        # The checklist first: it names every file of the model with its md5, shards included.
        checklist = fetch(f"{model}/checklist.chk")
        sums = parse_checklist(checklist)
        shards = sorted(name for name in sums if re.fullmatch(r"consolidated\.\d+\.pth", name))
        if not shards:
            shards = [f"consolidated.{i:02d}.pth" for i in range(shard_count(model))]
        for name in shards + ["params.json"]:
            fetch(f"{model}/{name}", sums.get(name))
        missing = [name for name in sums if not (dest / model / name).exists()]
        for name in missing:  # anything else the checklist names
            fetch(f"{model}/{name}", sums[name])
