#!/usr/bin/env python3
"""Benchmark streaming through vastworker's openai backend, against connecting to the model
server directly and against the current Vast worker's approach, an aiohttp proxy.

A fake vLLM (bench/fake_model_server.py) streams `--tokens` tokens per request, one every
`--token-delay` seconds, each event stamped with the moment it was sent.  A load generator keeps
M streams open at once for `--seconds` (a finished stream is replaced at once) and counts the
events it receives and how long each took from the fake's write to its read.  Then each proxy
holds `--open-streams` slow streams at once, to measure the memory an open stream costs.  The
proxy runs on core 0; the fake and the load generator share core 1.

    python3 bench/stream_bench.py [--streams 1,16,64] [--tokens 100] [--token-delay 0.01]
                                  [--seconds 5] [--open-streams 200] [--no-aiohttp]
"""

import argparse
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import time

from harness import ROOT, VASTWORKER, Cores, cached_venv, free_port, http_status, rss_kb, stop_process, wait_until

FAKE = os.path.join(ROOT, "bench", "fake_model_server.py")

# The current Vast worker's way (vastai/serverless/server/lib/backend.py): one aiohttp
# ClientSession to the model server (force_close, no timeout), the client's body posted on, and
# a streamed answer relayed chunk by chunk with StreamResponse and iter_any().  Ours, not theirs.
AIOHTTP_PROXY = """
import sys
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

upstream = sys.argv[1]

async def session_of(app):
    app["session"] = ClientSession(upstream, timeout=ClientTimeout(total=None),
                                   connector=TCPConnector(force_close=True, enable_cleanup_closed=True))
    yield
    await app["session"].close()

async def relay(request):
    payload = await request.json()
    async with request.app["session"].post(request.path, json=payload) as answer:
        if answer.content_type == "text/event-stream":
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                if chunk:
                    await response.write(chunk)
            await response.write_eof()
            return response
        return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.cleanup_ctx.append(session_of)
app.router.add_post("/v1/completions", relay)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""

STAMP = re.compile(rb'"t": ([0-9.]+)')


def stream_request(tokens):
    body = json.dumps({"model": "fake-model", "prompt": "hi", "max_tokens": tokens, "stream": True}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Stream:
    """One streamed request on a connection of its own, read as it comes."""

    def __init__(self, port, request):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        self.sock.setblocking(False)
        self.pending = b""
        self.done = False

    def read(self, latencies):
        """Read what has come; the number of events in it, their latencies appended."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return 0
        now = time.time()
        if not data:
            self.done = True
            return 0
        data = self.pending + data
        cut = data.rfind(b"\n\n") + 2
        whole, self.pending = data[:cut], data[cut:]
        stamps = STAMP.findall(whole)
        latencies.extend(now - float(stamp) for stamp in stamps)
        if b"data: [DONE]" in whole:
            self.done = True
        return len(stamps)

    def close(self):
        self.sock.close()


def load_client(port, streams, tokens, seconds):
    """Keep `streams` streams open for `seconds`: events/s and latency percentiles (ms)."""
    request = stream_request(tokens)
    selector = selectors.DefaultSelector()
    latencies, events, finished = [], 0, 0
    for _ in range(streams):
        stream = Stream(port, request)
        selector.register(stream.sock, selectors.EVENT_READ, stream)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for key, _ in selector.select(0.5):
            stream = key.data
            events += stream.read(latencies)
            if stream.done:
                finished += 1
                selector.unregister(stream.sock)
                stream.close()
                fresh = Stream(port, request)
                selector.register(fresh.sock, selectors.EVENT_READ, fresh)
    elapsed = time.monotonic() - started
    for key in list(selector.get_map().values()):
        key.data.close()
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0)
    return {"events_per_s": events / elapsed, "p50": pick(0.5), "p99": pick(0.99), "streams_done": finished}


def hold_client(port, count, tokens):
    """Open `count` streams, wait for the first event of each, say so, then wait for a line."""
    request = stream_request(tokens)
    streams = [Stream(port, request) for _ in range(count)]
    for stream in streams:
        stream.sock.setblocking(True)
        seen = b""
        while b"data:" not in seen:
            data = stream.sock.recv(65536)
            if not data:
                sys.exit("a held stream was answered without events: %r" % seen[:300])
            seen += data
    print("open", flush=True)
    sys.stdin.readline()
    for stream in streams:
        stream.close()


class Process:
    """A process of the benchmark on its core; stopped with SIGTERM."""

    def __init__(self, command, port, ready_path="/health", **popen):
        self.port = port
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
        wait_until(lambda: self.answers(ready_path), timeout=60, interval=0.05,
                   failure=lambda: "%s did not answer %s" % (command[-1], ready_path))

    def answers(self, path):
        if self.proc.poll() is not None:
            raise SystemExit("a benchmark process exited at start-up (exit status %s)" % self.proc.returncode)
        return http_status(self.port, path, timeout=2) == 200

    def stop(self):
        stop_process(self.proc)


def run_client(cores, *args):
    """The load generator in a process of its own, on the load core; its JSON result."""
    command = cores.load([sys.executable, os.path.abspath(__file__), "--client"] + [str(a) for a in args])
    result = subprocess.run(command, capture_output=True, check=True, timeout=600)
    return json.loads(result.stdout)


def memory_per_stream(cores, proxy_pid, port, count):
    """KiB of the proxy's resident memory per open stream (count held open at once)."""
    before = rss_kb(proxy_pid)
    command = cores.load([sys.executable, os.path.abspath(__file__), "--hold", str(port), str(count), "1000"])
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if holder.stdout.readline().strip() != b"open":
            raise SystemExit("the streams could not be held open")
        time.sleep(0.5)  # settle
        during = rss_kb(proxy_pid)
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
    finally:
        holder.wait(60)
    return (during - before) / count


def start_fake(cores, delay, timestamps=True):
    port = free_port()
    command = [sys.executable, FAKE, "vllm", "--port", str(port), "--token-delay", str(delay)]
    return Process(cores.load(command + (["--timestamps"] if timestamps else [])), port)


def start_worker(cores, fake_port, cache):
    """The openai backend in front of the fake, its access log on (the default).  --queue-time is
    raised so that admission, which would rightly refuse more tokens than the fake's measured
    rate serves in 30 s, lets every stream of the benchmark in."""
    port = free_port()
    env = dict(os.environ, MODEL_SERVER_URL="http://127.0.0.1:%d" % fake_port, BENCHMARK_MAX_TOKENS="1")
    command = [sys.executable, "-I", "-S", VASTWORKER, "openai", "--host", "127.0.0.1", "--port", str(port),
               "--cache-dir", cache, "--queue-time", "100000"]
    return Process(cores.server(command), port, "/v1/models", env=env)


def start_aiohttp(cores, python, fake_port):
    port = free_port()
    return Process(cores.server([python, "-c", AIOHTTP_PROXY, "http://127.0.0.1:%d" % fake_port, str(port)]), port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16,64", help="streams open at once (default 1,16,64)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream (default 100)")
    parser.add_argument("--token-delay", type=float, default=0.01, help="seconds between tokens (default 0.01)")
    parser.add_argument("--seconds", type=float, default=5, help="length of each run (default 5)")
    parser.add_argument("--open-streams", type=int, default=200, help="slow streams held for memory (default 200)")
    parser.add_argument("--no-aiohttp", action="store_true", help="skip the aiohttp proxy")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--hold", nargs=3, type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.client:
        port, streams, tokens, seconds = options.client
        print(json.dumps(load_client(int(port), int(streams), int(tokens), float(seconds))))
        return
    if options.hold:
        return hold_client(*options.hold)

    cores = Cores()
    python = None
    if not options.no_aiohttp:
        try:
            python = cached_venv("bench-aiohttp", "aiohttp")
        except RuntimeError as exc:
            print("%s: no aiohttp column" % exc)
    counts = [int(n) for n in options.streams.split(",")]
    print("streaming: %d tokens a stream, %g s apart; %s; %g s runs" % (
        options.tokens, options.token_delay, cores.description, options.seconds))
    fake = start_fake(cores, options.token_delay)
    cache = tempfile.mkdtemp(prefix="vastworker-stream-bench-")
    proxies = [("direct", None), ("vastworker", start_worker(cores, fake.port, cache))]
    if python:
        proxies.append(("aiohttp proxy", start_aiohttp(cores, python, fake.port)))
    results = {}
    try:
        for count in counts:
            for name, proxy in proxies:
                port = proxy.port if proxy else fake.port
                print("  %s, %d stream(s)" % (name, count), flush=True)
                run_client(cores, port, min(count, 4), options.tokens, 1)  # warm-up
                results[name, count] = run_client(cores, port, count, options.tokens, options.seconds)
        slow = start_fake(cores, 0.5, timestamps=False)
        memory = {}
        try:
            for name, proxy in proxies[1:]:
                proxy.stop()
            proxies = [("vastworker", start_worker(cores, slow.port, cache))]
            if python:
                proxies.append(("aiohttp proxy", start_aiohttp(cores, python, slow.port)))
            for name, proxy in proxies:
                print("  %s, %d streams held open" % (name, options.open_streams), flush=True)
                memory[name] = memory_per_stream(cores, proxy.proc.pid, proxy.port, options.open_streams)
        finally:
            slow.stop()
    finally:
        for _, proxy in proxies:
            if proxy:
                proxy.stop()
        fake.stop()
    report(results, memory, counts, [name for name, _ in [("direct", 0)] + [(n, 0) for n in memory]], options)


def report(results, memory, counts, names, options):
    print()
    print("| streams | " + " | ".join("%s events/s | p50 ms | p99 ms" % name for name in names) + " | vastworker/direct |")
    print("|---:|" + "---:|" * (3 * len(names) + 1))
    for count in counts:
        cells = []
        for name in names:
            figures = results[name, count]
            cells.append("%.0f | %.2f | %.2f" % (figures["events_per_s"], figures["p50"], figures["p99"]))
        ratio = results["vastworker", count]["events_per_s"] / results["direct", count]["events_per_s"]
        print("| %d | %s | %.3f |" % (count, " | ".join(cells), ratio))
    print()
    for count in counts:
        added = results["vastworker", count]["p99"] - results["direct", count]["p99"]
        line = "%d streams: vastworker adds %.2f ms at p99 per event" % (count, added)
        if ("aiohttp proxy", count) in results:
            line += " (the aiohttp proxy %.2f ms)" % (results["aiohttp proxy", count]["p99"] - results["direct", count]["p99"])
        print(line)
    for name, kib in memory.items():
        print("%s: %.1f KiB of resident memory per open stream (%d held open)" % (name, kib, options.open_streams))


if __name__ == "__main__":
    main()
