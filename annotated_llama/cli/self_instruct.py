"""`annotated-llama self-instruct --seed-tasks FILE --out FILE --num N --endpoint URL --model NAME`.

Generates Alpaca-format records (JSON Lines) through any OpenAI-compatible endpoint; see
annotated_llama/data/self_instruct.py. Re-running the same command after an interruption resumes it.
"""

import importlib.util
import json
import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("--seed-tasks", required=True, help="seed tasks: Alpaca records (JSON/JSONL) or stanford_alpaca's "
                   "seed_tasks.jsonl (e.g. data/seed_tasks.jsonl)")
    p.add_argument("--out", required=True, help="output JSONL of kept records (OUT.state.json sits beside it)")
    p.add_argument("--num", type=int, required=True, help="records to keep")
    p.add_argument("--endpoint", required=True, help="base URL of the API, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="model name sent with each request")
    p.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--batch", type=int, default=4, help="concurrent requests")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024, help="max tokens per reply")
    p.add_argument("--prompt-tasks", type=int, default=3, help="example tasks shown in each prompt")
    p.add_argument("--api", default="chat", choices=["chat", "completions"])
    p.add_argument("--max-requests", type=int, help="stop after this many requests (default 10 + 2 * --num)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per request on 429/5xx/connection errors")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles each time)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="start over: replace --out and its state instead of "
                   "refusing (an --out with its OUT.state.json is otherwise resumed)")


def run(args):

    from ..core.outputs import check_output
    from ..data.self_instruct import Config, state_path
    from ..data.self_instruct import run as generate

    # the rule of every writer (cli/outputs.py); an --out with its state file is a run to resume
    out = Path(args.out)
    check_output(out, force=args.force, inputs=[args.seed_tasks], resume=state_path(out).is_file() or None)

    missing = [m for m in ("openai", "rouge_score") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"self-instruct needs the {' and '.join(missing)} package(s): pip install 'annotated-llama[self-instruct]'")

    if args.force:  # start over, only once the checks above have passed
        state_path(out).unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    cfg = Config(seed_tasks=args.seed_tasks, out=args.out, num=args.num, endpoint=args.endpoint, model=args.model,
                 api_key=args.api_key, batch=args.batch, temperature=args.temperature, top_p=args.top_p,
                 max_tokens=args.max_tokens, prompt_tasks=args.prompt_tasks, api=args.api,
                 max_requests=args.max_requests, max_retries=args.max_retries, backoff=args.backoff,
                 timeout=args.timeout, seed=args.seed)
    report = generate(cfg)
    print(json.dumps(report))
    reasons = ", ".join(f"{k} {v}" for k, v in report["discarded"].items()) or "none"
    print(f"self-instruct: requested {report['requested']}, parsed {report['parsed']}, kept {report['kept']}; "
          f"discarded: {reasons}; retries {report['retries']}", file=sys.stderr)
    if not report["complete"]:
        print(f"self-instruct: stopped after {report['requested']} requests with {report['kept']} of {args.num} "
              "records; raise --max-requests or re-run to continue", file=sys.stderr)
