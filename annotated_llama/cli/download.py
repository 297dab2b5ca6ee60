"""`annotated-llama download`: Meta's presigned-URL layout or a plain URL, resumable and verified.

    annotated-llama download --meta-url 'https://.../*?Policy=...' --models 7B,13B --dest llama
    annotated-llama download --url https://host/model.gguf --dest model.gguf --md5 0123...

Interrupt it or lose the connection at any point and run the same command again: finished
files are kept (verified), partial ones resume from their .part.
"""


def add_arguments(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--meta-url", help="the presigned URL from Meta's e-mail (its '*' is replaced by each file)")
    source.add_argument("--url", help="a plain URL of one file")
    p.add_argument("--models", default="7B", help="with --meta-url: comma-separated model dirs, e.g. 7B,13B")
    p.add_argument("--dest", required=True, help="target dir (--meta-url) or file (--url)")
    p.add_argument("--md5", help="with --url: expected md5 hex digest")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a read is abandoned")
    p.add_argument("--retries", type=int, default=5, help="attempts without progress before giving up")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles each time)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def run(args):
    from ..weights.download import download_file, download_meta

    if args.timeout <= 0 or args.retries < 0 or args.backoff < 0:
        raise ValueError("--timeout must be positive, --retries and --backoff non-negative")
    kw = dict(timeout=args.timeout, retries=args.retries, backoff=args.backoff, quiet=args.quiet)
    if args.url:
        if args.md5 is not None and len(args.md5) != 32:
            raise ValueError(f"--md5 {args.md5}: expected 32 hex digits")
        download_file(args.url, args.dest, args.md5, **kw)
    else:
        models = [m.strip().strip("/") for m in args.models.split(",") if m.strip()]
        if not models:
            raise ValueError("--models: give at least one model, e.g. 7B")
        download_meta(args.meta_url, models, args.dest, **kw)
