"""A model server without a model, for the tests, the streaming benchmark, and trying a backend
without a GPU: it speaks the wire formats of vLLM (and any OpenAI-compatible server), llama.cpp's
llama-server, TGI and ComfyUI, as their own code answers (routes, streaming formats, error shapes,
context limits), and makes up its tokens ("tok0 tok1 ...").  A prompt counts a token for every
4 characters.  Standard library only.

    python3 bench/fake_model_server.py vllm --port 8000 [--token-delay 0.02] [--load-time 5]

Tests drive its faults through the prompt: a prompt containing "[[error-after:3]]" sends an
error event after 3 tokens, and likewise "[[garbage-after:N]]" (bytes that are not HTTP
chunking), "[[stall-after:N]]" (silence, the connection kept open), "[[close-after:N]]" (the
connection closed mid-stream) and "[[big:N]]" (an answer of N bytes).  It records every request
it takes and every generation it stops because its client went away (`aborted`), and lets a
test wait for either; with a `gate`, a test releases the tokens one by one."""

import argparse
import base64
import hashlib
import http.server
import json
import re
import select
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

FLAVORS = ("vllm", "llamacpp", "ollama", "tgi", "comfyui")
FAULT = re.compile(r"\[\[(error|garbage|stall|close|big)(?:-after)?:(\d+)\]\]")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 56  # enough of a PNG for a test to recognise


class ClientLeft(Exception):
    """The client of a generation went away: the fake stops, as the real servers do."""


class FakeModelServer:
    """One fake server on 127.0.0.1.  Created bound but not listening, as vLLM is while it loads
    (connections are refused); open() makes it listen.  With the llamacpp flavor it answers 503
    "Loading model" until loaded() is called, as llama-server does."""

    def __init__(self, flavor, port=0, token_delay=0.0, model="fake-model", step_delay=0.05, context=131072,
                 stated=None):
        assert flavor in FLAVORS, flavor
        self.flavor, self.model = flavor, model
        self.context = context  # tokens a request may hold: vLLM's max_model_len, llama.cpp's n_ctx a slot,
        # TGI's max_total_tokens; a request past it is refused as each server refuses it
        self.stated = stated or context  # the context it says it has (a test may make it claim more)
        self.token_delay, self.step_delay = token_delay, step_delay
        self.loading = flavor == "llamacpp"
        self.requests = []  # (method, path, JSON body or None, client port), in arrival order
        self.gate = None  # a threading.Semaphore: when set, each token waits for a release()
        self.held = None  # a threading.Event: when set, answers wait for it to be set before they begin
        self.timestamps = False  # each streamed OpenAI chunk carries "t", when it was sent (the benchmark's)
        self.aborted = []  # paths whose generation stopped because the client left
        self.interrupts = 0
        self.changed = threading.Condition()
        self.comfy = ComfyQueue(self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 1024  # http.server's 5 drops connections that come at once
        self.httpd.fake = self
        self.httpd.server_bind()
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = None
        self.sockets = set()  # the connections it serves: a process that dies drops them all

    def open(self):
        """Listen and serve (the model has loaded, or for llamacpp: the HTTP server is up)."""
        self.httpd.server_activate()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def loaded(self):
        self.loading = False

    def close(self):
        """Stop, as a process that dies: no listener, every connection dropped."""
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.comfy.stop()
        for sock in list(self.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def record(self, kind, item):
        with self.changed:
            getattr(self, kind).append(item)
            self.changed.notify_all()

    def wait_for(self, predicate, timeout=10.0):
        """Wait until predicate(self) is true; AssertionError after `timeout` seconds."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError("the fake model server did not see it within %g s: requests %s, aborted %s"
                                     % (timeout, [r[:2] for r in self.requests][-5:], self.aborted))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tokens(count):
    return ("tok%d " % index for index in range(count))


def fault_in(payload):
    text = json.dumps(payload)
    match = FAULT.search(text)
    return (match.group(1), int(match.group(2))) if match else (None, 0)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.server.fake.sockets.add(self.connection)

    def finish(self):
        self.server.fake.sockets.discard(self.connection)
        super().finish()

    @property
    def fake(self):
        return self.server.fake

    # -- plumbing -------------------------------------------------------------------------------
    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        try:
            return json.loads(data) if data else None
        except ValueError:
            return data

    def answer(self, status, payload, content_type="application/json", headers=()):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self, content_type="text/event-stream"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def chunk(self, data):
        if self.client_left():
            raise ClientLeft()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            raise ClientLeft()

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")

    def client_left(self):
        """Has the client closed its side?  (What uvicorn's http.disconnect and llama-server's
        is_connection_closed tell the real servers.)"""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def generate(self, count, fault, emit):
        """emit(index, token) for `count` tokens, token_delay apart, with the fault asked for;
        ClientLeft when the client goes."""
        kind, after = fault
        for index, token in enumerate(tokens(count)):
            if kind in ("error", "garbage", "stall", "close") and index == after:
                return kind
            while self.fake.gate is not None and not self.fake.gate.acquire(timeout=0.01):
                if self.client_left():
                    raise ClientLeft()
            if self.fake.token_delay:
                deadline = time.monotonic() + self.fake.token_delay
                while time.monotonic() < deadline:
                    if self.client_left():
                        raise ClientLeft()
                    time.sleep(min(0.01, self.fake.token_delay))
            emit(index, token)
        return None

    def broken(self, kind):
        """A fault after the stream has begun."""
        if kind == "garbage":
            self.wfile.write(b"zz not a chunk\r\n")
            self.close_connection = True
        elif kind == "stall":
            while not self.client_left():
                time.sleep(0.02)
            self.fake.record("aborted", self.path)
            self.close_connection = True
        elif kind == "close":
            self.close_connection = True

    # -- dispatch -------------------------------------------------------------------------------
    def do_GET(self):
        if self.fake.flavor == "comfyui" and urlsplit(self.path).path in ("/ws", "/api/ws"):
            return self.websocket()
        self.dispatch("GET", None)

    def websocket(self):
        """ComfyUI's /ws: the handshake, then the socket is the job queue's to send frames on
        until the client closes it."""
        client_id = parse_qs(urlsplit(self.path).query).get("clientId", [""])[0]
        accept = base64.b64encode(hashlib.sha1((self.headers.get("Sec-WebSocket-Key", "") +
                                                "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.fake.comfy.sockets[client_id] = self.connection
        send_frame(self.connection, {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                                  "sid": client_id}})
        try:
            while self.connection.recv(65536):
                pass
        except OSError:
            pass
        self.fake.comfy.sockets.pop(client_id, None)
        self.close_connection = True

    def do_POST(self):
        self.dispatch("POST", self.body())

    def dispatch(self, method, payload):
        fake = self.fake
        path = urlsplit(self.path).path
        fake.record("requests", (method, self.path, payload, self.client_address[1]))
        if fake.held is not None:
            fake.held.wait(30)
        if fake.loading:
            return self.answer(503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
        route = getattr(self, "%s_route" % (fake.flavor if fake.flavor in ("tgi", "comfyui") else "vllm"))
        try:
            if not route(method, path, payload):
                self.answer(404, {"error": "no route %s %s" % (method, path)})
        except ClientLeft:
            fake.record("aborted", self.path)
            self.close_connection = True

    # -- vLLM, llama.cpp: the OpenAI API ---------------------------------------------------------
    def vllm_route(self, method, path, payload):
        if (method, path) == ("GET", "/health"):
            if self.fake.flavor == "llamacpp":
                return self.answer(200, {"status": "ok"}) or True
            return self.answer(200, b"", "text/plain") or True
        if (method, path) == ("GET", "/v1/models"):
            model = {"id": self.fake.model, "object": "model", "created": 1, "owned_by": "fake"}
            if self.fake.flavor == "llamacpp":
                model["meta"] = {"n_ctx": self.fake.stated, "n_ctx_train": self.fake.stated}
            elif self.fake.flavor == "vllm":
                model["max_model_len"] = self.fake.stated
            return self.answer(200, {"object": "list", "data": [model]}) or True
        if self.fake.flavor == "ollama" and (method, path) == ("GET", "/api/version"):
            return self.answer(200, {"version": "0.0.0-fake"}) or True
        if self.fake.flavor == "ollama" and (method, path) == ("POST", "/api/show"):  # num_ctx, as a Modelfile sets it
            return self.answer(200, {"parameters": "stop \"<|end|>\"\nnum_ctx                        %d" % self.fake.stated,
                                     "model_info": {"general.architecture": "llama",
                                                    "llama.context_length": 131072}}) or True
        if (method, path) == ("GET", "/props") and self.fake.flavor == "llamacpp":
            return self.answer(200, {"default_generation_settings": {"n_ctx": self.fake.stated, "params": {}},
                                     "total_slots": 1, "model_alias": self.fake.model}) or True
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            self.openai(path, payload if isinstance(payload, dict) else {})
            return True
        return False

    def openai(self, path, payload):
        if payload.get("model", self.fake.model) != self.fake.model:
            return self.answer(404, {"error": {"message": "The model `%s` does not exist." % payload["model"],
                                               "type": "NotFoundError", "param": "model", "code": 404}})
        prompt = json.dumps(payload.get("prompt", payload.get("messages", payload.get("input", ""))))
        usage_in = max(1, len(prompt) // 4)
        if path == "/v1/embeddings":
            return self.answer(200, {"object": "list", "model": self.fake.model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": usage_in, "total_tokens": usage_in}})
        chat = path == "/v1/chat/completions"
        count = payload.get("max_completion_tokens", payload.get("max_tokens", 16))
        if self.fake.flavor == "llamacpp" and usage_in >= self.fake.context:
            return self.answer(400, {"error": {"code": 400, "message": "request (%d tokens) exceeds the available "
                                               "context size (%d tokens), try increasing it" % (usage_in, self.fake.context),
                                               "type": "exceed_context_size_error", "n_prompt_tokens": usage_in,
                                               "n_ctx": self.fake.context}})
        if self.fake.flavor == "vllm" and usage_in + count > self.fake.context:
            return self.answer(400, {"error": {"message": "This model's maximum context length is %d tokens. However, "
                                               "you requested %d tokens (%d in the messages, %d in the completion). "
                                               "Please reduce the length of the messages or completion."
                                               % (self.fake.context, usage_in + count, usage_in, count),
                                               "type": "BadRequestError", "param": None, "code": 400}})
        fault = fault_in(payload)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:12]
        usage = {"prompt_tokens": usage_in, "completion_tokens": count, "total_tokens": usage_in + count}
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.fake.model}

        def choice(text, finish=None):
            if chat:
                return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not payload.get("stream"):
            if fault[0] == "big":
                text = "x" * fault[1]
            else:
                parts = []
                self.generate(count, fault, lambda index, token: parts.append(token))
                text = "".join(parts)
            result = dict(base, object="chat.completion" if chat else "text_completion", usage=usage, choices=[
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": "length"} if chat else
                {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}])
            return self.answer(200, result)
        self.start_stream()
        event = (lambda obj: b"data: " + json.dumps(obj).encode() + b"\n\n")
        if chat:
            self.chunk(event(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])))
        stamped = (lambda obj: dict(obj, t=time.time())) if self.fake.timestamps else (lambda obj: obj)
        kind = self.generate(count, fault, lambda index, token: self.chunk(event(stamped(dict(base, choices=[choice(token)])))))
        if kind == "error":
            self.chunk(event({"error": {"message": "fake failure mid-stream", "type": "InternalServerError",
                                        "code": 500}}))
            if self.fake.flavor == "vllm":  # vLLM still ends with [DONE]; llama.cpp does not
                self.chunk(b"data: [DONE]\n\n")
            return self.end_stream()
        if kind:
            return self.broken(kind)
        self.chunk(event(dict(base, choices=[choice("", "length")])))
        if (payload.get("stream_options") or {}).get("include_usage"):
            self.chunk(event(dict(base, choices=[], usage=usage)))
        self.chunk(b"data: [DONE]\n\n")
        self.end_stream()

    # -- TGI: generate and generate_stream ------------------------------------------------------
    def tgi_route(self, method, path, payload):
        if (method, path) == ("GET", "/health"):
            return self.answer(200, b"", "text/plain") or True
        if (method, path) == ("GET", "/info"):
            return self.answer(200, {"model_id": self.fake.model, "max_input_tokens": self.fake.stated - 1,
                                     "max_total_tokens": self.fake.stated, "version": "fake"}) or True
        if (method, path) == ("GET", "/metrics"):
            return self.answer(200, b"# TYPE tgi_request_count counter\ntgi_request_count %d\n" % len(
                self.fake.requests), "text/plain; version=0.0.4") or True
        if method == "POST" and path in ("/generate", "/generate_stream"):
            self.tgi(path, payload)
            return True
        return False

    def tgi(self, path, payload):
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), str):
            return self.answer(422, {"error": "Failed to deserialize the JSON body: missing field `inputs`",
                                     "error_type": "validation"})
        parameters = payload.get("parameters") or {}
        count = parameters.get("max_new_tokens", 100)
        fault = fault_in(payload)
        prompt_tokens = max(1, len(payload["inputs"]) // 4)
        if prompt_tokens + count > self.fake.context:
            return self.answer(422, {"error": "`inputs` tokens + `max_new_tokens` must be <= %d. Given: %d `inputs` "
                                              "tokens and %d `max_new_tokens`" % (self.fake.context, prompt_tokens, count),
                                     "error_type": "validation"})
        details = {"finish_reason": "length", "generated_tokens": count, "seed": None}
        if path == "/generate":
            parts = []
            self.generate(count, fault, lambda index, token: parts.append(token))
            result = {"generated_text": "".join(parts)}
            if parameters.get("details"):
                result["details"] = details
            return self.answer(200, result, headers=[("x-prompt-tokens", str(prompt_tokens)),
                                                     ("x-generated-tokens", str(count))])
        self.start_stream()
        self.chunk(b":\n\n")  # axum's keep-alive comment: clients must skip it
        event = (lambda obj: b"data:" + json.dumps(obj).encode() + b"\n\n")
        last = count - 1

        def emit(index, token):
            final = index == last
            self.chunk(event({"index": index + 1, "token": {"id": index, "text": token, "logprob": -0.1,
                                                             "special": False},
                              "generated_text": "".join(tokens(count)) if final else None,
                              "details": dict(details, input_length=prompt_tokens) if final else None}))

        kind = self.generate(count, fault, emit)
        if kind == "error":
            self.chunk(event({"error": "fake failure mid-stream", "error_type": "generation"}))
            return self.end_stream()
        if kind:
            return self.broken(kind)
        self.end_stream()

    # -- ComfyUI ----------------------------------------------------------------------------------
    def comfyui_route(self, method, path, payload):
        comfy = self.fake.comfy
        if path.startswith("/api/"):
            path = path[4:]
        if (method, path) == ("GET", "/system_stats"):
            return self.answer(200, {"system": {"os": "posix", "comfyui_version": "fake"}, "devices": []}) or True
        if (method, path) == ("POST", "/prompt"):
            graph = payload.get("prompt") if isinstance(payload, dict) else None
            if not isinstance(graph, dict) or not graph:
                return self.answer(400, {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                                   "details": "", "extra_info": {}}, "node_errors": {}}) or True
            for node_id, node in graph.items():
                if (node.get("inputs") or {}).get("ckpt_name") == "missing.safetensors":  # ComfyUI's validation
                    return self.answer(400, {"error": {"type": "prompt_outputs_failed_validation",
                                                       "message": "Prompt outputs failed validation",
                                                       "details": "", "extra_info": {}},
                                             "node_errors": {node_id: {"errors": [{
                                                 "type": "value_not_in_list", "message": "Value not in list",
                                                 "details": "ckpt_name: 'missing.safetensors' not in []",
                                                 "extra_info": {}}], "dependent_outputs": [],
                                                 "class_type": node.get("class_type")}}}) or True
            return self.answer(200, comfy.submit(graph, payload.get("client_id"))) or True
        if method == "GET" and path.startswith("/history/"):
            return self.answer(200, comfy.history(path[len("/history/"):])) or True
        if (method, path) == ("GET", "/queue"):
            return self.answer(200, comfy.queue()) or True
        if (method, path) == ("POST", "/queue"):
            comfy.delete((payload or {}).get("delete", []))
            return self.answer(200, b"", "text/plain") or True
        if (method, path) == ("POST", "/interrupt"):
            comfy.interrupt((payload or {}).get("prompt_id") if isinstance(payload, dict) else None)
            return self.answer(200, b"", "text/plain") or True
        if (method, path) == ("GET", "/view"):
            query = parse_qs(urlsplit(self.path).query)
            image = comfy.images.get(query.get("filename", [""])[0])
            if image is None:
                return self.answer(404, b"", "text/plain") or True
            return self.answer(200, image, "image/png") or True
        return False


def send_frame(sock, message):
    """A websocket text frame, as a server sends it (unmasked)."""
    data = json.dumps(message).encode()
    length = bytes([len(data)]) if len(data) < 126 else bytes([126]) + len(data).to_bytes(2, "big")
    try:
        sock.sendall(b"\x81" + length + data)
    except OSError:
        pass


class ComfyQueue:
    """ComfyUI's prompt queue: jobs run one at a time in a thread, a job of `steps` (the graph's
    largest "steps" input, else 4) taking step_delay each; an interrupt stops the running one."""

    def __init__(self, fake):
        self.fake = fake
        self.lock = threading.Condition()
        self.pending, self.running, self.done = [], None, {}
        self.images = {}
        self.sockets = {}  # clientId: its websocket, where a job's progress goes
        self.number = 0
        self.interrupted = False
        self.stopped = False
        self.thread = None

    def submit(self, graph, client_id):
        with self.lock:
            self.number += 1
            prompt_id = str(uuid.uuid4())
            self.pending.append((self.number, prompt_id, graph, client_id))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, daemon=True)
                self.thread.start()
            self.lock.notify_all()
        return {"prompt_id": prompt_id, "number": self.number, "node_errors": {}}

    def queue(self):
        with self.lock:
            running = [[n, i, g, {}, []] for n, i, g, _ in ([self.running] if self.running else [])]
            return {"queue_running": running, "queue_pending": [[n, i, g, {}, []] for n, i, g, _ in self.pending]}

    def history(self, prompt_id):
        with self.lock:
            return {prompt_id: self.done[prompt_id]} if prompt_id in self.done else {}

    def delete(self, ids):
        with self.lock:
            kept = [job for job in self.pending if job[1] not in ids]
            deleted, self.pending = len(self.pending) - len(kept), kept
        if deleted:
            self.fake.record("aborted", "/queue delete")

    def interrupt(self, prompt_id=None):
        """Stop the running job; with a prompt_id, only when that is the one running (as
        ComfyUI since 2025 does)."""
        with self.lock:
            if self.running is None or (prompt_id is not None and self.running[1] != prompt_id):
                return
            self.interrupted = True
            self.fake.record("aborted", "/interrupt")
            self.fake.interrupts += 1

    def stop(self):
        with self.lock:
            self.stopped = True
            self.lock.notify_all()

    def run(self):
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.pending or self.stopped)
                if self.stopped:
                    return
                self.running = self.pending.pop(0)
                self.interrupted = False
            number, prompt_id, graph, client_id = self.running
            steps = max([node.get("inputs", {}).get("steps", 0) for node in graph.values()
                         if isinstance(node, dict) and isinstance(node.get("inputs", {}).get("steps", 0), int)] or [4]) or 4
            failing = any(isinstance(node, dict) and node.get("class_type") == "FailNode" for node in graph.values())
            status = "success"
            for step in range(steps):
                time.sleep(self.fake.step_delay)
                if client_id in self.sockets:
                    send_frame(self.sockets[client_id], {"type": "progress", "data": {
                        "value": step + 1, "max": steps, "prompt_id": prompt_id, "node": "3"}})
                with self.lock:
                    if self.interrupted:
                        status = "interrupted"
                        break
            if failing and status == "success":
                status = "error"
            filename = "ComfyUI_%05d_.png" % number
            with self.lock:
                outputs = {}
                if status == "success":
                    self.images[filename] = PNG
                    outputs = {"9": {"images": [{"filename": filename, "subfolder": "", "type": "output"}]}}
                messages = [["execution_start", {"prompt_id": prompt_id}]]
                if status == "interrupted":
                    messages.append(["execution_interrupted", {"prompt_id": prompt_id, "node_id": "3"}])
                elif status == "error":
                    messages.append(["execution_error", {"prompt_id": prompt_id, "node_id": "3",
                                                         "exception_message": "FailNode failed"}])
                self.done[prompt_id] = {"prompt": [number, prompt_id, graph, {}, ["9"]], "outputs": outputs,
                                        "status": {"status_str": "success" if status == "success" else "error",
                                                   "completed": status == "success", "messages": messages}}
                self.running = None
            with self.fake.changed:
                self.fake.changed.notify_all()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flavor", choices=FLAVORS)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--load-time", type=float, default=0.0,
                        help="seconds before it serves (refused, or 503 for llamacpp, meanwhile)")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--context", type=int, default=131072, help="tokens a request may hold (default 131072)")
    parser.add_argument("--timestamps", action="store_true", help='each streamed chunk says when it was sent ("t")')
    options = parser.parse_args()
    fake = FakeModelServer(options.flavor, options.port, options.token_delay, options.model, context=options.context)
    fake.timestamps = options.timestamps
    if options.flavor == "llamacpp":
        fake.open()
    time.sleep(options.load_time)
    if options.flavor != "llamacpp":
        fake.open()
    fake.loaded()
    print("fake %s model server on %s" % (options.flavor, fake.url), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.close()


if __name__ == "__main__":
    main()
