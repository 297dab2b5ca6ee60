"""`annotated-llama download`: a Hub repo, Meta's presigned-URL layout, or a plain URL; resumable and verified.

    annotated-llama download --hf meta-llama/Llama-3.2-1B --include '*.json' '*.safetensors' --dest llama-3.2-1b
    annotated-llama download --meta-url 'https://.../*?Policy=...' --models 7B,13B --dest llama
    annotated-llama download --url https://host/model.gguf --dest model.gguf --md5 0123...

Interrupt it or lose the connection at any point and run the same command again: finished
files are kept (verified), partial ones resume. Every file name the remote side sends must stay
inside --dest; a different file already there is replaced only with --force.
"""

from pathlib import Path

from . import argtypes


def add_arguments(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="REPO", help="a Hugging Face Hub model repo, e.g. meta-llama/Llama-3.2-1B")
    source.add_argument("--meta-url", help="the presigned URL from Meta's e-mail (its '*' is replaced by each file)")
    source.add_argument("--url", help="a plain URL of one file")
    p.add_argument("--dest", required=True, help="target dir (--hf, --meta-url; --url into a dir keeps the "
                   "server's file name) or file (--url)")
    p.add_argument("--revision", help="with --hf: branch, tag or commit (default: main)")
    p.add_argument("--include", nargs="+", metavar="PATTERN", help="with --hf: only files matching these "
                   "patterns, e.g. '*.json' '*.safetensors' 'original/*'")
    p.add_argument("--token", help="with --hf: a Hub access token for gated or private repos (default: $HF_TOKEN)")
    p.add_argument("--models", default="7B", help="with --meta-url: comma-separated model dirs, e.g. 7B,13B")
    p.add_argument("--md5", help="with --url: expected md5 hex digest")
    p.add_argument("--force", action="store_true", help="replace a different file already at the destination")
    p.add_argument("--timeout", type=argtypes.positive_float, default=30.0,
                   help="seconds without data before a read is abandoned")
    p.add_argument("--retries", type=argtypes.nonnegative_int, default=5,
                   help="attempts without progress before giving up")
    p.add_argument("--backoff", type=argtypes.nonnegative_float, default=1.0,
                   help="seconds before the first retry (doubles each time)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def run(args):
    from ..weights.download import download_file, download_meta, remote_name, safe_path

    for flag, value, mode in (("--revision", args.revision, args.hf), ("--include", args.include, args.hf),
                              ("--token", args.token, args.hf), ("--md5", args.md5, args.url)):
        if value is not None and not mode:
            raise ValueError(f"{flag}: only with {'--hf' if flag != '--md5' else '--url'}")
    if args.hf:
        from ..weights.hub import download_hub
        paths = download_hub(args.hf, args.dest, revision=args.revision, include=args.include, token=args.token,
                             force=args.force, quiet=args.quiet)
        if not args.quiet:
            print(f"{args.hf}: {len(paths)} file(s) in {args.dest}")
        return
    kw = dict(timeout=args.timeout, retries=args.retries, backoff=args.backoff, quiet=args.quiet, force=args.force)
    if args.url:
        if args.md5 is not None and len(args.md5) != 32:
            raise ValueError(f"--md5 {args.md5}: expected 32 hex digits")
        dest = Path(args.dest)
        if dest.is_dir():  # the file keeps the name the server (or the URL) gives it, if it is a safe one
            dest = safe_path(dest, remote_name(args.url, args.timeout), "the server's file name")
        download_file(args.url, dest, args.md5, **kw)
    else:
        models = [m.strip().strip("/") for m in args.models.split(",") if m.strip()]
        if not models:
            raise ValueError("--models: give at least one model, e.g. 7B")
        download_meta(args.meta_url, models, args.dest, **kw)
