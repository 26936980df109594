"""ComfyUI behind the worker: POST /generate with a workflow (the API format that ComfyUI's
"Export (API)" saves) submits it, waits for it and answers with its images, as base64 or as URLs
the worker serves at GET /view.  With "stream": true the answer is NDJSON progress lines (queued
and how many ahead, running and the sampler's step, elapsed) ending with the result.  A client
that hangs up takes its job with it: interrupted when it runs, taken off the queue when it waits.

    {"workflow": {"3": {"class_type": "KSampler", "inputs": {...}}, ...},
     "images": "base64" | "url", "stream": false}

ComfyUI runs one job at a time and queues the rest, so requests are handed on in parallel and
its queue keeps the GPU busy; the worker refuses (429) what would wait longer than --queue-time.

Environment: MODEL_SERVER_URL (default http://127.0.0.1:8188), MODEL_LOG, MODEL_HEALTH_ENDPOINT
(default MODEL_SERVER_URL/system_stats: ComfyUI has no /health), COMFYUI_CHECKPOINT (the model
the benchmark's workflow loads; default v1-5-pruned-emaonly.safetensors),
COMFYUI_BENCHMARK_WORKFLOW (a file with a workflow of your own to benchmark instead)."""

import base64
import json
import os
import socket
import struct
import time
import uuid
from urllib.parse import urlencode

import vastworker
from flask import abort

MODEL_SERVER_URL = os.environ.get("MODEL_SERVER_URL", "http://127.0.0.1:8188").rstrip("/")

readiness = "health"
healthcheck = MODEL_SERVER_URL + "/system_stats"
allow_parallel_requests = True  # ComfyUI queues; the worker waits on its queue
log_actions = {"error": ["[ERROR] Provisioning Script failed", "MetadataIncompleteBuffer"]}

POLL = 0.2  # seconds between looks at a job: small next to any image's time
GONE_FOR = 10.0  # seconds a job may be neither queued, running nor in its history before it is lost
BASE_COST = 100.0  # a 512x512 image in 20 steps: the Vast SDK's default cost of a request


def checked_workflow(payload):
    """The workflow of a request ("workflow", or ComfyUI's own name for it, "prompt"), checked
    node by node, so that a mistake is a 400 naming it rather than a failed job."""
    name = "workflow" if "workflow" in payload or "prompt" not in payload else "prompt"
    workflow = payload.get(name)
    if not isinstance(workflow, dict) or not workflow:
        abort(400, "%r must be a workflow in ComfyUI's API format: an object of nodes" % name)
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            abort(400, "%s node %r must be an object with a 'class_type'" % (name, node_id))
        if not isinstance(node.get("inputs", {}), dict):
            abort(400, "%s node %r: 'inputs' must be an object" % (name, node_id))
    if payload.get("images", "base64") not in ("base64", "url"):
        abort(400, "'images' must be \"base64\" or \"url\"")
    if not isinstance(payload.get("stream", False), bool):
        abort(400, "'stream' must be true or false")
    return workflow


def cost(workflow):
    """A job's workload: BASE_COST for 512x512 in 20 steps, in proportion to pixels x steps x batch
    (read from the graph's latent image and samplers; BASE_COST when it names neither)."""
    pixels, steps = 512 * 512, 20
    for node in workflow.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        width, height, batch = inputs.get("width"), inputs.get("height"), inputs.get("batch_size", 1)
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height, batch)):
            pixels = width * height * batch
        if isinstance(inputs.get("steps"), int) and inputs["steps"] > 0:
            steps = inputs["steps"]
    return BASE_COST * pixels / (512 * 512) * steps / 20


class ProgressSocket:
    """ComfyUI's websocket (/ws?clientId=...) for one job, read for its "progress" messages (the
    sampler's steps), which nothing else tells.  A small client: ComfyUI talks, we only listen,
    answering pings; text frames are JSON, binary ones (previews) are skipped."""

    def __init__(self, model, client_id):
        self.sock = socket.create_connection(model.address, timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s/ws?clientId=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (model.prefix, client_id, model.host_header, key)).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data or len(self.buffer) > 65536:
                raise OSError("no websocket handshake")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError("ComfyUI refused the websocket: %r" % head[:40])
        self.sock.setblocking(False)

    def messages(self):
        """The JSON messages that have come in since the last call (never waits)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buffer += data
        except BlockingIOError:
            pass
        found = []
        while len(self.buffer) >= 2:
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(length, 0)
            if len(self.buffer) < start:
                break
            if length >= 126:
                length = struct.unpack(">H" if length == 126 else ">Q", self.buffer[2:start])[0]
            if len(self.buffer) < start + length:
                break
            payload, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
            if opcode == 1:
                try:
                    found.append(json.loads(payload))
                except ValueError:
                    pass
            elif opcode == 9:  # ping: a pong, masked as a client's frames must be
                mask = os.urandom(4)
                self.sock.send(bytes([0x8A, 0x80 | len(payload)]) + mask +
                               bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        return found

    def close(self):
        self.sock.close()


def validation_errors(answer):
    """ComfyUI's 400 to /prompt in one line: its message, then each node's errors."""
    error = answer.get("error")
    parts = [error.get("message", "invalid") if isinstance(error, dict) else str(error or "invalid")]
    for node_id, node in sorted((answer.get("node_errors") or {}).items()):
        for each in (node.get("errors") or []) if isinstance(node, dict) else []:
            parts.append("node %s (%s): %s %s" % (node_id, node.get("class_type"), each.get("message", ""),
                                                  each.get("details", "")))
    return "; ".join(part.strip() for part in parts)


class Job:
    """One workflow on ComfyUI, from submission to its outputs; cancel() takes it away.  Its calls
    watch the client (self.watch) but cancel()'s, which must go out after it has left."""

    def __init__(self, model, request, workflow):
        self.model = model
        self.watch = vastworker.ClientWatch(request)
        self.client_id = uuid.uuid4().hex  # its websocket's id: progress goes to that socket only
        status, answer = model.call("POST", "/prompt", {"prompt": workflow, "client_id": self.client_id},
                                    client=self.watch)
        if status == 400 and isinstance(answer, dict):  # ComfyUI's validation, node by node
            abort(400, "ComfyUI refused the workflow: %s" % validation_errors(answer))
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            abort(502, "ComfyUI answered /prompt with %s" % status)
        self.prompt_id = answer["prompt_id"]
        self.started = time.monotonic()
        self.finished = False

    def place(self, client=None):
        """("running", 0), ("queued", how many are ahead) or ("gone", 0): neither, for the moment
        between its end and its history, or for good when someone deleted it in ComfyUI."""
        _, queue = self.model.call("GET", "/queue", client=client)
        queue = queue if isinstance(queue, dict) else {}
        if any(item[1] == self.prompt_id for item in queue.get("queue_running", [])):
            return "running", 0
        pending = sorted(queue.get("queue_pending", []))
        for ahead, item in enumerate(pending):
            if item[1] == self.prompt_id:
                return "queued", ahead + len(queue.get("queue_running", []))
        return "gone", 0

    def result(self):
        """The job's history entry once it has one, else None."""
        _, history = self.model.call("GET", "/history/" + self.prompt_id, client=self.watch)
        return history.get(self.prompt_id) if isinstance(history, dict) else None

    def cancel(self):
        """Interrupt the job if it runs, or take it off the queue.  The interrupt names the job,
        which ComfyUI since 2025 honours; older ones stop whatever runs, hence the look first."""
        if self.finished:
            return
        where, _ = self.place()
        if where == "running":
            self.model.call("POST", "/interrupt", {"prompt_id": self.prompt_id})
        elif where == "queued":
            self.model.call("POST", "/queue", {"delete": [self.prompt_id]})
        vastworker.Log.write("info", "comfyui: job %s cancelled (%s): its client left" % (
            self.prompt_id, "interrupted" if where == "running" else "taken off the queue" if where == "queued"
            else "already over"))

    def outputs(self, entry, images):
        """{"prompt_id", "images": [...], "seconds"} of a finished job; a failed one is a 500."""
        self.finished = True
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m[1] for m in status.get("messages", []) if m and m[0] in ("execution_error", "execution_interrupted")]
            why = errors[0].get("exception_message") or errors[0].get("exception_type") if errors else None
            abort(500, "the workflow failed in ComfyUI: %s" % (why or "interrupted" if errors else status.get("status_str")))
        found = []
        for node_id, output in sorted(entry.get("outputs", {}).items()):
            for image in output.get("images", []) + output.get("gifs", []):
                query = urlencode({"filename": image.get("filename", ""), "subfolder": image.get("subfolder", ""),
                                   "type": image.get("type", "output")})
                item = {"node": node_id, "filename": image.get("filename"), "type": image.get("type", "output")}
                if images == "url":
                    item["url"] = "/view?" + query
                else:
                    _, data = self.model.call("GET", "/view?" + query, client=self.watch)
                    data = data if isinstance(data, bytes) else json.dumps(data).encode()
                    item["base64"] = base64.b64encode(data).decode("ascii")
                found.append(item)
        return {"prompt_id": self.prompt_id, "images": found, "seconds": round(time.monotonic() - self.started, 3)}

    def wait(self, images):
        """The outputs, once the job is done; Cancelled (and the job cancelled) if the client leaves."""
        try:
            while True:
                entry = self.result()
                if entry is not None:
                    return self.outputs(entry, images)
                self.watch.pause(POLL)
        except vastworker.Cancelled:
            self.cancel()
            raise

    def progress(self, images):
        """NDJSON lines: where the job is (queued with how many ahead, running with the sampler's
        step when ComfyUI's websocket tells it), each time that changes and at least every
        second (which also finds out a client that left), then the outputs."""
        self.watch.streaming = True
        said, said_at, step, gone_since = None, 0.0, None, None
        try:
            steps = ProgressSocket(self.model, self.client_id)
        except OSError as exc:
            vastworker.Log.write("info", "comfyui: no step progress (%s)" % exc)
            steps = None
        try:
            while True:
                entry = self.result()
                if entry is not None:
                    yield json.dumps(dict(self.outputs(entry, images), status="done")) + "\n"
                    return
                for message in steps.messages() if steps is not None else ():
                    data = message.get("data") or {}
                    if message.get("type") == "progress" and data.get("prompt_id", self.prompt_id) == self.prompt_id:
                        step = (data.get("value"), data.get("max"))
                where, ahead = self.place(self.watch)
                now = time.monotonic()
                gone_since = (gone_since or now) if where == "gone" else None
                if gone_since is not None and now - gone_since > vastworker.Waits.of(GONE_FOR):
                    self.finished = True
                    abort(502, "the job left ComfyUI's queue with no result (was it deleted there?)")
                if where != "gone" and ((where, ahead, step) != said or now - said_at >= 1.0):
                    said, said_at = (where, ahead, step), now
                    line = {"status": where, "prompt_id": self.prompt_id, "seconds": round(now - self.started, 1)}
                    if where == "queued":
                        line["ahead"] = ahead
                    elif where == "running" and step is not None:
                        line["step"], line["steps"] = step
                    yield json.dumps(line) + "\n"
                self.watch.pause(POLL)
        except vastworker.Refusal as refusal:
            yield json.dumps({"status": "failed", "prompt_id": self.prompt_id, "error": refusal.detail}) + "\n"
        finally:
            if steps is not None:
                steps.close()
            if not self.finished:
                self.cancel()


class Backend:
    def __init__(self):
        self.model = vastworker.ModelServer(MODEL_SERVER_URL)


def workload(backend, request):
    payload = vastworker.json_payload(request, silent=True) or {}
    workflow = payload.get("workflow", payload.get("prompt"))
    return cost(workflow) if isinstance(workflow, dict) else BASE_COST


def generate(backend, request):
    payload = vastworker.json_payload(request)
    job = Job(backend.model, request, checked_workflow(payload))
    images = payload.get("images", "base64")
    if payload.get("stream"):
        return vastworker.Response(job.progress(images), mimetype="application/x-ndjson")
    return job.wait(images)


def view(backend, request):
    """An output image, as ComfyUI's /view serves it (the URLs that "images": "url" gives)."""
    query = urlencode([(name, request.args.get(name, "")) for name in ("filename", "subfolder", "type")])
    return backend.model.forward(request, "/view?" + query)


flask_dict = {"POST": {"generate": generate}, "GET": {"view": view}}


def benchmark_workflow(seed):
    """A plain text-to-image workflow: COMFYUI_CHECKPOINT, 512x512, 20 steps; or the workflow in
    COMFYUI_BENCHMARK_WORKFLOW."""
    path = os.environ.get("COMFYUI_BENCHMARK_WORKFLOW")
    if path:
        with open(path) as file:
            return json.load(file)
    checkpoint = os.environ.get("COMFYUI_CHECKPOINT", "v1-5-pruned-emaonly.safetensors")
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": vastworker.made_up_words(seed, 12), "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "vastworker-benchmark", "images": ["8", 0]}},
    }


_workflows = [benchmark_workflow(seed) for seed in range(4)]
benchmark = {"endpoint": "generate", "payloads": [{"workflow": w, "images": "url"} for w in _workflows],
             "concurrency": 4, "runs": 2, "workload": sum(cost(w) for w in _workflows) / len(_workflows)}
