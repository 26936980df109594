"""Any OpenAI-compatible model server behind the worker: vLLM, llama.cpp's llama-server, Ollama
(its /v1 routes), SGLang, and TGI's Messages API.  Requests pass to the server as they are,
checked first (a bad field is a 400 naming it, and nothing is sent); answers come back as the
server writes them, streamed event by event when asked for ("stream": true), the server's own
errors (a prompt too long for its context: 400) included.  The worker's own refusals on these
routes take OpenAI's error shape, so OpenAI's clients raise them as they raise the server's.  A
client that hangs up closes the upstream connection, and the server stops generating.  The
benchmark is sized to what the server says one request may hold.

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

# OpenAI's error types, by status, for the worker's own refusals (the model servers' are their own)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}

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


def error_body(status, message):
    """The worker's own refusals on these routes, in OpenAI's error shape, as vLLM and llama.cpp
    answer theirs: {"error": {"message", "type", "param", "code"}}.  A message about a field
    ("'max_tokens' must be ...") names it as the param."""
    param = message.split("'")[1] if message.startswith("'") and message.count("'") >= 2 else None
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                  else "invalid_request_error"),
                      "param": param, "code": status}}


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


def tokens_in(value):
    """A count of tokens from a server's answer: a positive whole number, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def ollama_context(answer):
    """The context Ollama gives a request: num_ctx from /api/show's parameters, else the smallest
    default it has had (2048), never more than the model's own context_length."""
    parameters = answer.get("parameters") if isinstance(answer.get("parameters"), str) else ""
    given = [int(line.split()[1]) for line in parameters.splitlines()
             if line.split()[:1] == ["num_ctx"] and line.split()[1:2] and line.split()[1].isdigit()]
    trained = [tokens_in(value) for key, value in (answer.get("model_info") or {}).items()
               if key.endswith(".context_length") and tokens_in(value)]
    return min([given[0] if given else 2048] + trained)


class Backend:
    def __init__(self):
        self.model = vastworker.ModelServer(MODEL_SERVER_URL)
        self.model_name = os.environ.get("MODEL_NAME") or None
        self.context = None  # the model's context in tokens, once the server said (vLLM's max_model_len)
        self.listed = False  # the server's /v1/models was read

    def learn_models(self, request=None):
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
        self.context = tokens_in(first.get("max_model_len"))

    def request_context(self):
        """How many tokens one request may hold, prompt and answer, as the server says it: vLLM's
        and SGLang's max_model_len (/v1/models), llama.cpp's context per slot (/props), TGI's
        max_total_tokens (/info), Ollama's num_ctx (/api/show); None when it says none."""
        self.learn_models()
        if self.context is not None:
            return self.context
        asks = [("GET", "/props", None, lambda a: tokens_in((a.get("default_generation_settings") or {}).get("n_ctx"))),
                ("GET", "/info", None, lambda a: tokens_in(a.get("max_total_tokens"))),
                ("POST", "/api/show", {"model": self.model_name or ""}, ollama_context)]
        for method, path, payload, read in asks:
            try:
                status, answer = self.model.call(method, path, payload, timeout=10)
            except vastworker.Refusal:
                continue
            found = read(answer) if status == 200 and isinstance(answer, dict) else None
            if found is not None:
                return found
        return None

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
BENCHMARK_WORDS = 250


def benchmark(backend, smaller):
    """Ten completions of made-up words, 250 words and 256 tokens at most, and no more than half
    of what the server says one request may hold: a quarter for the answer, the rest for the
    prompt.  A server that still refuses them gets them halved (`smaller` times)."""
    context = backend.request_context()
    size = vastworker.benchmark_size(context, BENCHMARK_TOKENS, BENCHMARK_WORDS, smaller)
    if size is None:
        return None  # no smaller than the last
    tokens, words = size
    payloads = [{"prompt": vastworker.made_up_words(seed, words), "max_tokens": tokens, "temperature": 0.7}
                for seed in range(10)]
    return {"endpoint": "v1/completions", "payloads": payloads, "concurrency": 10, "runs": 2,
            "workload": sum(estimate("v1/completions", p) for p in payloads) / len(payloads)}
