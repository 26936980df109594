#!/usr/bin/env python3
"""Benchmark vastworker against the original worker's host, Flask's development server, and the
current Vast worker's framework, aiohttp.

All serve the same backends in the same run, driven by the same load generator (wrk when it is
installed, else a built-in keep-alive client), after a warm-up.  Prints a table of requests/s and
p50/p99 latency for GET /value and POST /increment at several concurrencies, the time from
process start to the first 200, resident memory idle and after load, a 50 ms I/O-bound
endpoint (not for aiohttp, whose event loop a blocking handler would stall), the same GET and
POST over TLS (vastworker and aiohttp, with a self-signed certificate; needs wrk and openssl), and
8 MB JSON uploads and answers, each with its ratio to the references' figures.

    python3 bench/bench.py [--seconds 3] [--rounds 3] [--concurrency 1,16,64,256] [--no-flask] [--no-aiohttp]

Each load cell is run --rounds times against every server, the servers taking turns (the order
reversed each round), and the table shows the median of the rounds; with aiohttp, the ratio of
each round is printed too.

Flask is only needed for its column (python3 -m pip install flask); aiohttp is installed by the
benchmark itself into a venv in ~/.cache/vastworker, and left out, saying why, when it cannot be.
"""

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from harness import (ROOT, VASTWORKER, Cores, cached_venv, free_port, http_status, rss_kb, stop_process,
                     value_at, wait_until)

HELLOWORLD = os.path.join(ROOT, "backends", "helloworld")

# The original worker's host: a catch-all route dispatching through flask_dict, app.run(threaded).
FLASK_HOST = """
import importlib.util, logging, sys
from flask import Flask, abort, request
spec = importlib.util.spec_from_file_location("backend", sys.argv[1] + "/backend.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
backend = module.Backend()
app = Flask("reference")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # as the original server.py did

@app.route("/<path:endpoint>", methods=["GET", "POST", "PUT", "DELETE"])
def handler(endpoint):
    if endpoint not in module.flask_dict.get(request.method, {}):
        abort(404)
    return module.flask_dict[request.method][endpoint](backend, request)

app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
"""

# The current Vast worker's framework, aiohttp, serving the same backend's handlers on its event
# loop (they are quick: no thread, no lock needed), its access log off as the issue measured it.
AIOHTTP_HOST = """
import importlib.util, json, sys
from aiohttp import web
spec = importlib.util.spec_from_file_location("backend", sys.argv[1] + "/backend.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
backend = module.Backend()

class Shim:
    def __init__(self, data):
        self.json = data

async def handler(request):
    found = module.flask_dict.get(request.method, {}).get(request.match_info["endpoint"])
    if found is None:
        raise web.HTTPNotFound()
    data = await request.json() if request.can_read_body else None
    result = found(backend, Shim(data))
    if isinstance(result, (dict, list)):
        return web.json_response(result)
    return web.Response(text=result, content_type="text/html")

app = web.Application(client_max_size=64 * 1024 * 1024)  # as vastworker's --max-body (aiohttp's is 1 MB)
app.router.add_route("*", "/{endpoint:.+}", handler)
tls = None
if len(sys.argv) > 3:  # certificate and key: HTTPS
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[3], sys.argv[4])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None, ssl_context=tls)
"""

IO_BACKEND = """
import time
{parallel}

class Backend:
    pass

def wait(backend, request):
    time.sleep(0.05)  # a call to a model server, say
    return "done"

flask_dict = {{"GET": {{"wait": wait}}}}
"""

# Large bodies, as image backends see them: an 8 MB JSON upload (a base64 image) whose field the
# handler reads, and an 8 MB JSON answer.
LARGE_BACKEND = """
IMAGE = "iVBORw0KGgo" * (8 * 1024 * 1024 // 11)

class Backend:
    pass

def upload(backend, request):
    return {"length": len(request.json["image"])}

def download(backend, request):
    return {"image": IMAGE}

def ping(backend, request):
    return {"ok": True}

flask_dict = {"POST": {"upload": upload}, "GET": {"download": download, "ping": ping}}
"""


WRK_POST = """
wrk.method = "POST"
wrk.body = '{"amount": 1}'
wrk.headers["Content-Type"] = "application/json"
"""


class Server:
    """One server process under test: vastworker or the Flask reference."""

    def __init__(self, kind, backend_dir, cores, extra=(), probe="/value", python=None, tls=None):
        """tls: (certificate file, key file) to serve HTTPS (vastworker and aiohttp)."""
        self.kind = kind
        self.port = free_port()
        if kind == "flask":
            command = [sys.executable, "-c", FLASK_HOST, backend_dir, str(self.port)]
        elif kind == "aiohttp":
            command = [python, "-c", AIOHTTP_HOST, backend_dir, str(self.port)] + list(tls or ())
        elif kind == "vastworker -m":  # as start_server.sh runs it: bytecode from the cache
            command = [sys.executable, "-S", "-m", "vastworker", backend_dir, "--host", "127.0.0.1",
                       "--port", str(self.port)]
        else:
            command = [sys.executable, "-I", "-S", VASTWORKER, backend_dir, "--host", "127.0.0.1",
                       "--port", str(self.port)] + list(extra)
            if tls:
                command += ["--certfile", tls[0], "--keyfile", tls[1]]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cores.server(command), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            self.first_200 = wait_for_200(self.port, self.proc, probe, certificate=tls and tls[0])
        except BaseException:
            self.stop()
            raise
        self.startup_ms = (self.first_200 - self.started) * 1000

    @property
    def rss_mb(self):
        return rss_kb(self.proc.pid) / 1024

    def get_value(self):
        return value_at(self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        stop_process(self.proc)


def wait_for_200(port, proc, path="/value", timeout=30, certificate=None):
    """The moment the server first answers 200 (polled every 2 ms, for the start-up time); over
    HTTPS, checked against `certificate`, when one is given."""
    context = None
    if certificate is not None:
        import ssl
        context = ssl.create_default_context(cafile=certificate)

    def answered():
        if proc.poll() is not None:
            raise SystemExit("a server exited at start-up (exit status %s)" % proc.returncode)
        return http_status(port, path, 1, context) == 200 and time.perf_counter()

    try:
        return wait_until(answered, timeout, 0.002)
    except AssertionError:
        raise SystemExit("no 200 from port %d within %d s" % (port, timeout))


class Load:
    """A load run's figures: requests/s, p50 and p99 latency (ms), and failures."""

    def __init__(self, requests, seconds, p50, p99, failures):
        self.requests, self.seconds = requests, seconds
        self.rate = requests / seconds
        self.p50, self.p99, self.failures = p50, p99, failures


def wrk_load(cores, port, path, method, concurrency, seconds, scheme="http"):
    command = ["wrk", "-t1", "-c%d" % concurrency, "-d%ds" % seconds, "--latency", "--timeout", "30s",
               "%s://127.0.0.1:%d%s" % (scheme, port, path)]
    script = None
    if method == "POST":
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(WRK_POST)
        script.close()
        command[1:1] = ["-s", script.name]
    try:
        output = subprocess.run(cores.load(command), stdout=subprocess.PIPE, check=True,
                                timeout=seconds + 60).stdout.decode()
    finally:
        if script:
            os.unlink(script.name)
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    failures = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), "
                    r"write (\d+), timeout (\d+)"):
        match = re.search(pattern, output)
        if match:
            failures += sum(int(number) for number in match.groups())
    return Load(requests, seconds, wrk_ms(output, "50%"), wrk_ms(output, "99%"), failures)


def wrk_ms(output, percentile):
    number, unit = re.search(r"%s\s+([\d.]+)(us|ms|s)\b" % percentile, output).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def builtin_load(cores, port, path, method, concurrency, seconds, scheme="http"):
    """The fallback load generator, run as a separate (pinned) process: keep-alive clients
    (plain HTTP only)."""
    assert scheme == "http", "the built-in client speaks plain HTTP only"
    command = [sys.executable, os.path.abspath(__file__), "--load-worker",
               json.dumps([port, path, method, concurrency, seconds])]
    result = json.loads(subprocess.run(cores.load(command), stdout=subprocess.PIPE, check=True,
                                       timeout=seconds + 60).stdout)
    latencies = sorted(result["latencies"]) or [0.0]
    return Load(len(result["latencies"]), result["elapsed"], latencies[len(latencies) // 2] * 1000,
                latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
                result["failures"])


def load_worker(port, path, method, concurrency, seconds):
    body = b'{"amount": 1}' if method == "POST" else None
    headers = {"Content-Type": "application/json"} if body else {}
    latencies, failures, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        mine, connection = [], None
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures[0] += 1
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                failures[0] += 1
                connection = None
                continue
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started  # the last requests end after the deadline
    print(json.dumps({"latencies": latencies, "failures": failures[0], "elapsed": elapsed}))


def large_bodies(cores, port, pid):
    """Median ms of 11 uploads and of 11 downloads of 8 MB of JSON (one each first, to warm up),
    from a client on the load core, and the server's peak memory during the uploads over its
    memory before them, in MB."""
    def client(what):
        command = cores.load([sys.executable, os.path.abspath(__file__), "--large-client", str(port), what])
        return json.loads(subprocess.run(command, capture_output=True, check=True, timeout=600).stdout)

    # VmHWM is the peak since the process started: the load runs before may have set it (threads
    # for hundreds of connections), which read as 49-97 MB "above idle" on a busy machine.  Writing
    # 5 to clear_refs starts the peak again from now (Linux 4.0 and later).
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as file:
            file.write("5")
    except OSError as exc:
        print("warning: the peak memory of %d could not be reset (%s): the upload row may count an "
              "earlier peak" % (pid, exc))
    before = rss_kb(pid)
    upload = client("upload")
    peak = (rss_kb(pid, "VmHWM") - before) / 1024
    return upload, client("download"), peak


def large_client(port, what):
    """The median of 11 timed requests of one kind, after one untimed."""
    body = json.dumps({"image": "iVBORw0KGgo" * (8 * 1024 * 1024 // 11)}).encode()
    request = ("POST", "/upload", body) if what == "upload" else ("GET", "/download", None)

    def once():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        connection.request(request[0], request[1], request[2], {"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        answer = response.read()
        connection.close()
        if response.status != 200:
            raise SystemExit("%s %s: %d %r" % (request[0], request[1], response.status, answer[:200]))
        return (time.perf_counter() - started) * 1000

    once()
    print(json.dumps(statistics.median(once() for _ in range(11))))


def tls_files(directory):
    """(certificate, key) for 127.0.0.1, self-signed by openssl into `directory`; None, saying
    why, when openssl is missing."""
    if shutil.which("openssl") is None:
        print("openssl is not installed: no TLS rows")
        return None
    crt, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", crt],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return crt, key


def aiohttp_python():
    """A Python with aiohttp (a venv the benchmark makes once); None, saying why, without it."""
    try:
        return cached_venv("bench-aiohttp", "aiohttp")
    except RuntimeError as exc:
        print("%s: no aiohttp column" % exc)
        return None


def load_rounds(servers, cells, rounds, seconds, run_load, cores, problems, scheme="http"):
    """{kind: {label: [Load, one per round]}}: each (method, path, concurrency) cell run against
    every server in turn, after a 1 s warm-up, `rounds` times, the servers' order reversed each
    round.  A ratio then compares runs made seconds apart: this machine is shared, and run one
    server after the other its speed drifted between the two by as much as the ratio sought
    (GET c16 on the same code: 35k one hour, 17k the next).  Failures, and increments
    acknowledged but not counted, go to `problems`."""
    results = {server.kind: {} for server in servers}
    for round_number in range(rounds):
        for method, path, concurrency in cells:
            label = "%s%s %s c%d" % ("TLS " if scheme == "https" else "", method, path, concurrency)
            for server in servers if round_number % 2 == 0 else servers[::-1]:
                before = server.get_value() if method == "POST" and scheme == "http" else None
                run_load(cores, server.port, path, method, concurrency, 1, scheme)
                result = run_load(cores, server.port, path, method, concurrency, seconds, scheme)
                results[server.kind].setdefault(label, []).append(result)
                if result.failures:
                    problems.append("%s %s: %d failed responses" % (server.kind, label, result.failures))
                if before is not None and server.get_value() - before < result.requests:
                    problems.append("%s %s: %d increments acknowledged, %d counted"
                                    % (server.kind, label, result.requests, server.get_value() - before))
    return results


def load_rows(loads, with_p50=True):
    """The table's rows for one server's load cells: the median over the rounds of each figure."""
    rows = {}
    for label, runs in loads.items():
        rows[label + " req/s"] = ("req/s", statistics.median(run.rate for run in runs), True)
        if with_p50:
            rows[label + " p50"] = ("ms", statistics.median(run.p50 for run in runs), False)
        rows[label + " p99"] = ("ms", statistics.median(run.p99 for run in runs), False)
    return rows


def startup_rows(kind, cores, python):
    """Start-up: the median of 5 fresh processes, from exec to the first 200; for vastworker,
    also as start_server.sh runs it (python3 -m, the bytecode cached), and its idle memory so."""
    startups = []
    for _ in range(5):
        with Server(kind, HELLOWORLD, cores, python=python) as server:
            startups.append(server.startup_ms)
    rows = {"start to first 200": ("ms", statistics.median(startups), False)}
    if kind == "vastworker":
        subprocess.run([sys.executable, "-m", "py_compile", VASTWORKER], check=True)
        startups = []
        for _ in range(5):
            with Server("vastworker -m", HELLOWORLD, cores) as server:
                startups.append(server.startup_ms)
                idle = server.rss_mb  # no compiler scratch memory: the bytecode is cached
        rows["start to first 200, python3 -m vastworker"] = ("ms", statistics.median(startups), False)
        rows["memory idle, python3 -m vastworker"] = ("MB", idle, False)
    return rows


def io_rows(kind, cores, seconds, run_load, problems):
    """A 50 ms I/O-bound endpoint at c64, its handlers in parallel and (vastworker) serialised."""
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        # aiohttp would run the blocking 50 ms handler on its event loop: not comparable
        variants = [] if kind == "aiohttp" else [("parallel", "allow_parallel_requests = True")]
        if kind == "vastworker":
            variants.append(("serialised", ""))
        for name, parallel in variants:
            backend = os.path.join(directory, name)
            os.mkdir(backend)
            with open(os.path.join(backend, "backend.py"), "w") as file:
                file.write(IO_BACKEND.format(parallel=parallel))
            extra = ["--queue-time", "60"] if kind == "vastworker" else []
            with Server(kind, backend, cores, extra, probe="/wait") as server:
                # a serialised warm-up at c64 would leave 3 s of queued requests behind it
                run_load(cores, server.port, "/wait", "GET", 64 if name == "parallel" else 1, 1)
                result = run_load(cores, server.port, "/wait", "GET", 64, seconds)
            rows["50 ms I/O c64 %s req/s" % name] = ("req/s", result.rate, True)
            rows["50 ms I/O c64 %s p99" % name] = ("ms", result.p99, False)
            if result.failures:
                problems.append("%s 50 ms I/O %s: %d failed responses" % (kind, name, result.failures))
    return rows


def large_rows(kind, cores, python):
    """8 MB JSON uploads and answers, and the memory the uploads take."""
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "backend.py"), "w") as file:
            file.write(LARGE_BACKEND)
        with Server(kind, directory, cores, probe="/ping", python=python) as server:
            upload, download, peak = large_bodies(cores, server.port, server.proc.pid)
    return {"8 MB JSON upload, median of 11": ("ms", upload, False),
            "8 MB JSON answer, median of 11": ("ms", download, False),
            "8 MB JSON uploads: peak memory over idle": ("MB", peak, False)}


def ratio(ours, theirs, higher_is_better=True):
    if not theirs or not ours:
        return "-"
    return "%.2fx" % (ours / theirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=3, help="length of each load run (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each load cell per server, the servers taking turns; the table shows "
                             "the median (default 3)")
    parser.add_argument("--concurrency", default="1,16,64,256", help="client counts (default 1,16,64,256)")
    parser.add_argument("--no-flask", action="store_true", help="skip the Flask reference")
    parser.add_argument("--no-aiohttp", action="store_true", help="skip the aiohttp reference (Vast's current framework)")
    parser.add_argument("--builtin-load", action="store_true", help="use the built-in client even if wrk is installed")
    parser.add_argument("--load-worker", help=argparse.SUPPRESS)
    parser.add_argument("--large-client", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.load_worker:
        return load_worker(*json.loads(options.load_worker))
    if options.large_client:
        return large_client(int(options.large_client[0]), options.large_client[1])

    cores = Cores()
    use_wrk = shutil.which("wrk") is not None and not options.builtin_load
    run_load = wrk_load if use_wrk else builtin_load
    if not use_wrk:  # a Python client is the bottleneck: every server looks about 7 times slower
        print("warning: %s: the built-in Python client measures itself more than the servers; the "
              "figures are about a seventh of wrk's and only the ratios compare (apt install wrk)"
              % ("--builtin-load" if options.builtin_load else "wrk is not installed"))
    kinds = ["vastworker"]
    python_with_aiohttp = None if options.no_aiohttp else aiohttp_python()
    if python_with_aiohttp:
        kinds.append("aiohttp")
    if not options.no_flask:
        if importlib.util.find_spec("flask") is not None:
            kinds.append("flask")
        else:
            print("Flask is not installed: no reference column (python3 -m pip install flask)")
    concurrencies = [int(c) for c in options.concurrency.split(",")]
    keys = tempfile.TemporaryDirectory()
    tls = tls_files(keys.name) if use_wrk else None  # the built-in client speaks plain HTTP only
    print("machine: %d cores, %s; Python %s; load generator: %s; %d s per run after a 1 s warm-up, "
          "%d round(s), the servers taking turns in each" % (os.cpu_count(), cores.description, sys.version.split()[0],
                                                          "wrk" if use_wrk else "built-in keep-alive client",
                                                          options.seconds, options.rounds))

    problems = []
    figures = {kind: startup_rows(kind, cores, python_with_aiohttp) for kind in kinds}  # kind: {label: (unit, value, higher is better)}
    cells = [(method, path, concurrency) for method, path in (("GET", "/value"), ("POST", "/increment"))
             for concurrency in concurrencies]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(kind, HELLOWORLD, cores, python=python_with_aiohttp)) for kind in kinds]
        for server in servers:
            figures[server.kind]["memory idle"] = ("MB", server.rss_mb, False)
        loads = load_rounds(servers, cells, options.rounds, options.seconds, run_load, cores, problems)
        all_loads = {kind: dict(runs) for kind, runs in loads.items()}
        for server in servers:
            figures[server.kind].update(load_rows(loads[server.kind]))
            figures[server.kind]["memory after load"] = ("MB", server.rss_mb, False)
    if tls:  # vastworker and aiohttp: the original served plain HTTP behind Vast's proxy
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(Server(kind, HELLOWORLD, cores, python=python_with_aiohttp, tls=tls))
                       for kind in kinds if kind != "flask"]
            loads = load_rounds(servers, [cell for cell in cells if cell[2] > 1], options.rounds, options.seconds,
                                run_load, cores, problems, "https")
        for server in servers:
            figures[server.kind].update(load_rows(loads[server.kind], with_p50=False))
            all_loads[server.kind].update(loads[server.kind])
    for kind in kinds:
        figures[kind].update(io_rows(kind, cores, options.seconds, run_load, problems))
        figures[kind].update(large_rows(kind, cores, python_with_aiohttp))
    rows = []  # (label, unit, {kind: value}, higher_is_better), in vastworker's order
    for kind in kinds:
        for label, (unit, value, better) in figures[kind].items():
            for row in rows:
                if row[0] == label:
                    row[2][kind] = value
                    break
            else:
                rows.append((label, unit, {kind: value}, better))
    print()
    references = [kind for kind in ("aiohttp", "flask") if kind in kinds]
    names = {"aiohttp": "aiohttp", "flask": "Flask dev server"}
    print("| measure | vastworker | %s |" % " | ".join("%s | ratio" % names[kind] for kind in references))
    print("|---|---:|" + "---:|---:|" * len(references))
    for label, unit, values, better in rows:
        ours = values.get("vastworker")
        cells = ["%.1f %s" % (ours, unit) if ours is not None else "-"]
        for kind in references:
            theirs = values.get(kind)
            cells += ["%.1f %s" % (theirs, unit) if theirs is not None else "-",
                      ratio(ours, theirs, better) if theirs is not None else "-"]
        print("| %s | %s |" % (label, " | ".join(cells)))
    if "aiohttp" in kinds and options.rounds > 1:
        print()
        print("vastworker / aiohttp requests/s, round by round:")
        for label, runs in all_loads["vastworker"].items():
            print("  %-26s %s" % (label, "  ".join("%.2f" % (ours.rate / theirs.rate)
                                                     for ours, theirs in zip(runs, all_loads["aiohttp"][label]))))
    print()
    print("ideal for the 50 ms endpoint at c64: 1280 req/s in parallel, 20 req/s serialised")
    print("failed, lost or wrong responses: %s" % ("; ".join(problems) if problems else "none"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
