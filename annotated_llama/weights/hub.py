"""Snapshots from the Hugging Face Hub through `huggingface_hub` (resumable, its progress bars,
the token for gated repos), with the downloader's rules (download.py) kept:

  - every file name the Hub lists is checked by `safe_path` before anything is fetched, and only
    the checked names are fetched (each is passed as its own allow-pattern);
  - a file already in --dest that huggingface_hub did not put there itself (no record of it under
    DEST/.cache/huggingface/download) is another file, refused unless --force;
  - the revision is resolved to one commit first, so every file comes from the same commit;
  - everything huggingface_hub keeps (download records, locks, a ref) stays under DEST/.cache.

The Hub's file API, as `snapshot_download` calls it: GET /api/models/{repo}/revision/{rev}
(the commit and its `siblings`), GET /api/models/{repo}/tree/{commit}?recursive=True, then per
file HEAD and GET /{repo}/resolve/{commit}/{file} (ETag, X-Repo-Commit, Content-Length, Range).
HF_ENDPOINT chooses another server (a mirror, or the tests' local one).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import huggingface_hub.errors as hub_errors
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, filter_repo_objects
from huggingface_hub.utils import logging as hub_logging

from .download import DownloadError, safe_path

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def _token_hint(repo: str) -> str:
    return f"{repo}: access denied; a gated or private repo needs a token: pass --token (or set HF_TOKEN)"


def _errors(repo: str, revision: str | None, endpoint: str):
    """A context manager turning huggingface_hub's exceptions into one-line DownloadErrors."""
    @contextlib.contextmanager
    def translate():
        try:
            yield
        except hub_errors.GatedRepoError:
            raise DownloadError(f"{repo}: a gated repo: accept its licence on the Hub, then pass --token (or set "
                                "HF_TOKEN)") from None
        except hub_errors.RevisionNotFoundError:
            raise DownloadError(f"--revision {revision}: no such branch, tag or commit in {repo}") from None
        except hub_errors.RepositoryNotFoundError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise DownloadError(_token_hint(repo)) from None
            raise DownloadError(f"{repo}: no such repo on {endpoint} (or private: pass --token)") from None
        except hub_errors.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise DownloadError(_token_hint(repo)) from None
            raise DownloadError(f"{repo}: HTTP {status} from {endpoint}") from None
        except hub_errors.LocalEntryNotFoundError as e:  # what connection failures become
            raise DownloadError(f"{repo}: cannot reach {endpoint} ({str(e).splitlines()[0][:120]})") from None
        except OSError as e:
            if isinstance(e, DownloadError):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise DownloadError(f"{repo}: {type(e).__name__}: {first}") from None
        except Exception as e:  # httpx2's transport errors: connect, read timeouts
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise
            raise DownloadError(f"{repo}: cannot reach {endpoint} ({type(e).__name__})") from None
    return translate()


def _downloaded_by_hub(dest: Path, name: str) -> bool:
    # huggingface_hub records each file it writes into a local_dir here (_local_folder.py)
    return (dest / ".cache" / "huggingface" / "download" / f"{name}.metadata").is_file()


def download_hub(repo: str, dest, *, revision: str | None = None, include=None, token: str | None = None,
                 force: bool = False, quiet: bool = False) -> list[Path]:
    """Files of Hub repo `repo` at `revision` (default: its main branch), those matching the
    fnmatch patterns `include` (default: all), into `dest`. Returns their paths."""
    if not REPO_ID.fullmatch(repo or ""):
        raise DownloadError(f"--hf {repo!r}: expected a repo id such as meta-llama/Llama-3.2-1B")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"--dest {dest}: is a file; a Hub snapshot goes into a directory")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token = token or None  # None: huggingface_hub reads HF_TOKEN, then its stored login
    api = HfApi(endpoint=endpoint, token=token)
    with _errors(repo, revision, endpoint):
        info = api.model_info(repo, revision=revision)
    if not info.sha or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise DownloadError(f"{repo}: {endpoint} gave no commit for revision {revision or 'main'}")
    names = [s.rfilename for s in info.siblings or []]
    chosen = list(filter_repo_objects(names, allow_patterns=list(include) if include else None))
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DownloadError(f"--include {' '.join(include or [])}: no file of {repo} matches (it has "
                            f"{len(names)}: {shown or 'none'})")
    paths = {name: safe_path(dest, name, f"{repo} file") for name in chosen}  # all checked before any is fetched
    others = [p for name, p in paths.items() if os.path.lexists(p) and not _downloaded_by_hub(dest, name)]
    if others and not force:
        raise DownloadError(f"{others[0]}: already exists and was not downloaded from {repo} here; "
                            "pass --force to replace it")
    verbosity = hub_logging.get_verbosity()
    if quiet:  # no bars, and no warnings about retried connections (errors still come through)
        disable_progress_bars()
        hub_logging.set_verbosity_error()
    try:
        with _errors(repo, revision, endpoint):
            snapshot_download(repo, revision=info.sha, local_dir=dest, allow_patterns=chosen, token=token,
                              endpoint=endpoint, cache_dir=dest / ".cache" / "huggingface" / "hub")
    finally:
        if quiet:
            enable_progress_bars()
            hub_logging.set_verbosity(verbosity)
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:  # snapshot_download returns the folder as it is when the Hub stops answering
        raise DownloadError(f"{repo}: {len(missing)} file(s) not downloaded, e.g. {missing[0]}; run again to resume")
    return list(paths.values())
