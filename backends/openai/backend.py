"""Any OpenAI-compatible model server behind the worker: vLLM, llama.cpp's llama-server, Ollama
(its /v1 routes), SGLang, and TGI's Messages API.  Requests pass to the server as they are,
checked first (a bad field is a 400 naming it, and nothing is sent); answers come back as the
server writes them, streamed event by event when asked for ("stream": true).  A client that
hangs up closes the upstream connection, and the server stops generating.

Environment: MODEL_SERVER_URL (default http://127.0.0.1:8000), MODEL_NAME (sent when a request
names no model; otherwise the server's first model), MODEL_LOG (the server's log, watched for
fatal lines), MODEL_HEALTH_ENDPOINT (default MODEL_SERVER_URL/health; Ollama has none, so give
it http://127.0.0.1:11434/api/version)."""

import os

import vastworker
from flask import abort

MODEL_SERVER_URL = os.environ.get("MODEL_SERVER_URL", "http://127.0.0.1:8000").rstrip("/")

readiness = "health"  # loaded once the server's health endpoint answers 200 (the model is in)
healthcheck = MODEL_SERVER_URL + "/health"
allow_parallel_requests = True  # the server batches; the worker only waits on it
log_actions = {"error": [
    "RuntimeError: Engine",  # vLLM's engine died
    "error loading model", "failed to load model", "exiting due to model loading error",  # llama.cpp
    "Initialization failed. warmup error",  # SGLang
    "Error: DownloadError", "Error: ShardCannotStart", "Error: WebserverFailed",  # TGI's launcher
]}

# A completion's default length where the request gives none (OpenAI's and vLLM's default for
# /v1/completions is 16; for chat the server may go to the end of its context, so this is a guess)
DEFAULT_MAX_TOKENS = {"v1/completions": 16, "v1/chat/completions": 256, "v1/embeddings": 0}
CHARS_PER_TOKEN = 4  # a cheap prompt estimate; the autoscaler needs proportions, not exact counts


def prompt_text(payload):
    """The text of a prompt, messages or input, for the token estimate."""
    parts = []

    def collect(value):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            collect(value.get("content") if "content" in value else value.get("text"))

    for key in ("prompt", "messages", "input"):
        collect(payload.get(key))
    return "".join(parts)


def completion_limit(payload):
    """The most tokens a request may generate, as it asks: max_completion_tokens, else max_tokens."""
    return payload.get("max_completion_tokens", payload.get("max_tokens"))


def estimate(endpoint, payload):
    """The request's workload in tokens: its prompt, estimated, plus the most it may generate."""
    limit = completion_limit(payload)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        limit = DEFAULT_MAX_TOKENS[endpoint]
    choices = payload.get("n", 1) if isinstance(payload.get("n", 1), int) else 1
    return -(-len(prompt_text(payload)) // CHARS_PER_TOKEN) + limit * max(choices, 1)


def kind_is(payload, field, kinds, what, required=False):
    """400 naming `field` when it is missing (and required) or not of `kinds`."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if field not in payload:
        if required:
            abort(400, "the request needs %r" % field)
        return
    value = payload[field]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        abort(400, "%r must be %s" % (field, what))


def checked_payload(request, endpoint):
    """The JSON object to send (unwrapped from {"input": {...}}), with its fields checked before
    anything goes upstream."""
    payload = vastworker.json_payload(request)
    if endpoint == "v1/chat/completions":
        kind_is(payload, "messages", list, "a list of messages", required=True)
        if not payload["messages"] or not all(isinstance(m, dict) for m in payload["messages"]):
            abort(400, "'messages' must be a non-empty list of objects")
    elif endpoint == "v1/completions":
        kind_is(payload, "prompt", (str, list), "a string or a list", required=True)
    else:
        kind_is(payload, "input", (str, list), "a string or a list", required=True)
    kind_is(payload, "model", str, "a string")
    kind_is(payload, "stream", bool, "true or false")
    kind_is(payload, "stream_options", dict, "an object")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        kind_is(payload, field, int, "a whole number")
        if field in payload and payload[field] < (1 if field == "n" else 0):
            abort(400, "%r must be at least %d" % (field, 1 if field == "n" else 0))
    return payload


class Backend:
    def __init__(self):
        self.model = vastworker.ModelServer(MODEL_SERVER_URL)
        self.model_name = os.environ.get("MODEL_NAME") or None
        self.context = None  # the model's context in tokens, once the server said (vLLM's max_model_len)
        self.listed = False  # the server's /v1/models was read

    def learn_models(self, request):
        """Read the server's /v1/models once: its first model (unless MODEL_NAME names one) and,
        where the server says it, that model's context length."""
        status, answer = self.model.call("GET", "/v1/models", client=request)
        try:
            first = answer["data"][0]
        except (TypeError, KeyError, IndexError):
            return
        self.listed = True
        if self.model_name is None and isinstance(first.get("id"), str):
            self.model_name = first["id"]
        context = first.get("max_model_len")
        if isinstance(context, int) and not isinstance(context, bool) and context > 0:
            self.context = context

    def relay(self, request, endpoint):
        payload = checked_payload(request, endpoint)
        if not self.listed and ("model" not in payload or completion_limit(payload) is not None):
            self.learn_models(request)
        limit = completion_limit(payload)
        if self.context is not None and limit is not None and limit > self.context:
            field = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
            abort(400, "%r is %d, more than the model's context of %d tokens" % (field, limit, self.context))
        if "model" not in payload and self.model_name is not None:
            payload["model"] = self.model_name
        return self.model.forward(request, "/" + endpoint, json=payload)


def workload(backend, request):
    endpoint = request.path.strip("/")
    payload = vastworker.json_payload(request, silent=True)
    if endpoint not in DEFAULT_MAX_TOKENS or payload is None:
        return 1  # GET /v1/models: next to nothing
    return estimate(endpoint, payload)


def chat(backend, request):
    return backend.relay(request, "v1/chat/completions")


def completions(backend, request):
    return backend.relay(request, "v1/completions")


def embeddings(backend, request):
    return backend.relay(request, "v1/embeddings")


def models(backend, request):
    return backend.model.forward(request, "/v1/models")


flask_dict = {
    "POST": {
        "v1/chat/completions": chat,
        "v1/completions": completions,
        "v1/embeddings": embeddings,
    },
    "GET": {
        "v1/models": models,
    },
}


BENCHMARK_TOKENS = int(os.environ.get("BENCHMARK_MAX_TOKENS", "256"))
_payloads = [{"prompt": vastworker.made_up_words(seed), "max_tokens": BENCHMARK_TOKENS, "temperature": 0.7}
             for seed in range(10)]
benchmark = {"endpoint": "v1/completions", "payloads": _payloads, "concurrency": 10, "runs": 2,
             "workload": sum(estimate("v1/completions", p) for p in _payloads) / len(_payloads)}
