"""schemathesis against the server's own /openapi.json: requests generated from the published
request schemas (valid ones, and invalid ones meant to be refused), each answered without a server
error (5xx), with the documented status codes, content types and response bodies. Kept bounded: a
tiny random model with a 48-token context, a few dozen examples per route."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from annotated_llama import Tokenizer
from annotated_llama.serving.server import create_app
from fixtures import DATA, tiny_model

MODEL = tiny_model(dim=32, n_layers=1, n_heads=2, max_seq_len=48)
APP = create_app(MODEL, Tokenizer(DATA / "llama-spm.model"), model_name="tiny", max_batch_size=4, max_queue=16)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_on_generated_requests(case):
    case.call_and_validate(checks=CHECKS, timeout=120)  # best_of=16 on a busy 2-core box may take a while
