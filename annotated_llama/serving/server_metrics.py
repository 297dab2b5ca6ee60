"""`/metrics` in Prometheus' text exposition format, through `prometheus-client`.

One registry per app (tests build many apps in one process; the library's global registry would
mix them). Counted by the server: requests by route and status, prompt and completion tokens,
time to first token, time per output token after the first, request latency. Read from the
scheduler at each scrape (a custom collector, so the numbers are the scheduler's own): requests
running and waiting (the queue depth), the KV budget and the part of it reserved (prompt +
max_tokens of each running request) and the part holding tokens now, decode steps, prefills,
rows decoded. The names follow
vLLM's (`vllm:time_to_first_token_seconds` ...) with our prefix, and Prometheus' conventions:
`_total` on counters, base units (seconds).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `_created` timestamp series next to every counter (vLLM turns them off too)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "annotated_llama_"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _SchedulerCollector:
    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics.scheduler_stats()
        if s is None:  # still loading: no scheduler yet
            return
        g = [("num_requests_running", "requests decoding now", s["active"]),
             ("num_requests_waiting", "requests queued for a cache row (queue depth)", s["waiting"]),
             ("kv_cache_budget_tokens", "cache slots the running requests may reserve at most", s["kv_budget"]),
             ("kv_cache_reserved_tokens", "cache slots reserved by running requests (prompt + max_tokens)",
              s["kv_tokens_reserved"]),
             ("kv_cache_held_tokens", "cache slots holding a token now (in whole blocks)", s["kv_tokens_held"]),
             ("kv_cache_used_bytes", "bytes of the paged cache's blocks in use", s["kv_bytes_used"]),
             ("kv_cache_allocated_bytes", "bytes the paged cache has allocated", s["kv_bytes_allocated"]),
             ("kv_cache_usage_ratio", "kv_cache_held_tokens / kv_cache_budget_tokens",
              s["kv_tokens_held"] / s["kv_budget"] if s["kv_budget"] else 0.0),
             ("max_batch_size", "cache rows", s["max_batch_size"]),
             ("scheduler_running", "1 while the scheduler thread runs", int(bool(s["thread_alive"])))]
        for name, doc, value in g:
            yield GaugeMetricFamily(P + name, doc, value=value)
        c = [("steps", "decode steps (one forward over every running request)", s["steps"]),
             ("prefills", "prompts prefilled", s["prefills"]),
             ("batch_rows", "rows decoded, summed over decode steps", s["batch_rows"]),
             ("forward_calls", "model forward calls", s["forward_calls"]),
             ("scheduler_tokens_generated", "tokens sampled by the scheduler", s["tokens_generated"]),
             ("requests_completed", "jobs that ended with stop or length", s["completed"]),
             ("requests_cancelled", "jobs cancelled (client gone)", s["cancelled"]),
             ("requests_rejected", "jobs refused because the queue was full", s["rejected"]),
             ("generation_failures", "decode or prefill failures", s["failures"])]
        for name, doc, value in c:
            yield CounterMetricFamily(P + name, doc, value=value)


class Metrics:
    """The app's metrics; `scheduler_stats` returns the scheduler's stats() or None."""

    def __init__(self, scheduler_stats):
        self.scheduler_stats = scheduler_stats
        self.registry = r = CollectorRegistry()
        self.requests = Counter(P + "http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens prefilled for finished generations (once "
                                     "per choice)", registry=r)
        self.completion_tokens = Counter(P + "generation_tokens", "tokens generated for finished requests",
                                         registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "from the request's arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "a generation's mean time per token after its first",
                              buckets=_PER_TOKEN, registry=r)
        self.latency = Histogram(P + "e2e_request_latency_seconds", "from arrival to the last token",
                                 buckets=_LATENCY, registry=r)
        r.register(_SchedulerCollector(self))

    def observe_job(self, arrived: float, token_times: list[float], prompt_tokens: int, completion_tokens: int):
        """One finished generation: `token_times` are the monotonic times its text pieces arrived."""
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if token_times:
            self.ttft.observe(token_times[0] - arrived)
            self.latency.observe(token_times[-1] - arrived)
            if completion_tokens > 1:  # pieces may hold several tokens: spread their time over all
                self.tpot.observe((token_times[-1] - token_times[0]) / (completion_tokens - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
