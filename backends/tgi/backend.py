"""Hugging Face's text-generation-inference (TGI) behind the worker, on its native API:
POST /generate ({"inputs": "...", "parameters": {"max_new_tokens": 64, ...}}) answers once;
POST /generate_stream answers with server-sent events, one per token, the last carrying the
generated_text; POST / is either, by its "stream" field (what huggingface_hub's client calls).
GET /health, /info and /metrics are TGI's own.  (TGI's OpenAI-style /v1/chat/completions is the
openai backend's.)  Requests are checked before they go upstream; TGI's own errors (a prompt too
long: 422) come back as it gives them; a client that hangs up stops the generation.  The
benchmark is sized to TGI's max_total_tokens.

Environment: MODEL_SERVER_URL (default http://127.0.0.1:3000, the launcher's default port),
MODEL_LOG (the launcher's log, watched for its fatal errors), MODEL_HEALTH_ENDPOINT (default
MODEL_SERVER_URL/health)."""

import json
import os

import vastworker
from flask import abort

MODEL_SERVER_URL = os.environ.get("MODEL_SERVER_URL", "http://127.0.0.1:3000").rstrip("/")

readiness = "health"  # the launcher opens the port only once the shards are up; /health then 200
healthcheck = MODEL_SERVER_URL + "/health"
allow_parallel_requests = True  # TGI batches; the worker only waits on it
log_actions = {"error": ["Error: DownloadError", "Error: ShardCannotStart", "Error: WebserverFailed",
                         "Error: ShardFailed"],
               "info": ['"message":"Download']}

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's documented default
CHARS_PER_TOKEN = 4


def error_event(content_type, message):
    """A broken stream ends as TGI's own errors do (data:{"error": "...", "error_type": ...}), which
    is what huggingface_hub's client raises on."""
    return b"data:" + json.dumps({"error": message, "error_type": "upstream"}).encode() + b"\n\n"


def error_body(status, message):
    """The worker's own refusals on these routes, in TGI's error shape ({"error", "error_type"}),
    which huggingface_hub's client raises as it raises TGI's."""
    kind = "overloaded" if status == 429 else "validation" if status < 500 else "unavailable"
    return {"error": message, "error_type": kind}


def checked_payload(request):
    """The JSON object to send, checked: "inputs" a string, "parameters" an object whose
    max_new_tokens is a whole number of at least 1."""
    payload = vastworker.json_payload(request)
    if not isinstance(payload.get("inputs"), str):
        abort(400, "'inputs' must be a string" if "inputs" in payload else "the request needs 'inputs'")
    parameters = payload.get("parameters", {})
    if not isinstance(parameters, dict):
        abort(400, "'parameters' must be an object")
    limit = parameters.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        abort(400, "'parameters.max_new_tokens' must be a whole number of at least 1")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        abort(400, "'stream' must be true or false")
    return payload


def estimate(payload):
    """Tokens: the prompt's, estimated, plus the most it may generate."""
    parameters = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    limit = parameters.get("max_new_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        limit = DEFAULT_MAX_NEW_TOKENS
    inputs = payload.get("inputs") if isinstance(payload.get("inputs"), str) else ""
    return -(-len(inputs) // CHARS_PER_TOKEN) + limit


class Backend:
    def __init__(self):
        self.model = vastworker.ModelServer(MODEL_SERVER_URL, error_event=error_event)


def workload(backend, request):
    if request.method == "GET":
        return 1  # /health, /info, /metrics: next to nothing
    payload = vastworker.json_payload(request, silent=True)
    return DEFAULT_MAX_NEW_TOKENS if payload is None else estimate(payload)


def generate(backend, request):
    return backend.model.forward(request, "/generate", json=checked_payload(request))


def generate_stream(backend, request):
    return backend.model.forward(request, "/generate_stream", json=checked_payload(request))


def compat(backend, request):
    """POST /, as TGI serves it (and huggingface_hub's InferenceClient calls it): generate, or
    generate_stream when the body says "stream": true."""
    payload = checked_payload(request)
    return backend.model.forward(request, "/generate_stream" if payload.get("stream") else "/generate",
                                 json=payload)


def passed(backend, request):
    """TGI's own GET /health, /info and /metrics, as TGI answers them."""
    return backend.model.forward(request)


flask_dict = {"POST": {"generate": generate, "generate_stream": generate_stream, "": compat},
              "GET": {"health": passed, "info": passed, "metrics": passed}}


BENCHMARK_TOKENS = int(os.environ.get("BENCHMARK_MAX_TOKENS", "128"))
BENCHMARK_WORDS = 250


def benchmark(backend, smaller):
    """Ten generations of made-up words, 250 words and 128 new tokens at most, and no more than
    half of TGI's max_total_tokens (/info): a quarter for the answer, the rest for the prompt.
    Refused all the same, they are halved (`smaller` times)."""
    try:
        status, info = backend.model.call("GET", "/info", timeout=10)
    except vastworker.Refusal:
        status, info = None, None
    total = info.get("max_total_tokens") if status == 200 and isinstance(info, dict) else None
    size = vastworker.benchmark_size(total if isinstance(total, int) and not isinstance(total, bool) else None,
                                     BENCHMARK_TOKENS, BENCHMARK_WORDS, smaller)
    if size is None:
        return None  # no smaller than the last
    tokens, words = size
    payloads = [{"inputs": vastworker.made_up_words(seed, words), "parameters": {
        "max_new_tokens": tokens, "temperature": 0.7, "return_full_text": False}} for seed in range(10)]
    return {"endpoint": "generate", "payloads": payloads, "concurrency": 10, "runs": 2,
            "workload": sum(estimate(p) for p in payloads) / len(payloads)}
