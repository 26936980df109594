"""Tests for vastworker, grouped in the order of the module's sections.  End-to-end tests run the
worker as a subprocess with `python3 -I -S` (no site-packages, so an accidental dependency fails
here) and drive it over real sockets on 127.0.0.1; unit tests call the pure pieces in-process.
Starting workers, polling and reading values are bench/harness.py's, shared with the benchmark.

    python3 test_vastworker.py [--slow | --all] [PYTEST OPTIONS]

runs them with pytest; where this Python has no pytest, it first makes a virtual environment
with it in ~/.cache/vastworker (outside the project) and runs there.  By default it runs the
fast set: every test but those marked slow -- others' clients and servers (interop), soaks and
floods, every Python -- which --slow runs, and --all runs with the rest (.ci/run runs both).
Without PYTEST OPTIONS the set is split over SHARDS pytest processes at once: the tests spend
most of their time waiting on sockets and subprocesses, not on a core."""

import base64
import collections
import glob
import http.client
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.parse

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "bench"))


SHARDS = 4  # the fast set's wall time on 2 cores: 1 process 120 s, 4 processes about 50 s
MARKERS = ["-o", "markers=slow: interop with others' clients and servers, soaks, every Python (--slow)"]


def run_the_suite():
    """`python3 test_vastworker.py`: pytest on this file, installing it first if need be."""
    if importlib.util.find_spec("pytest") is not None:
        args = sys.argv[1:]
        chosen = {"--slow": ["-m", "slow"], "--all": []}.get(args[0] if args else None, ["-m", "not slow"])
        args = args[1:] if args[:1] in (["--slow"], ["--all"]) else args
        if args:  # a choice of tests, or pytest's own options: one process, as pytest runs it
            import pytest
            return pytest.main(["-q", os.path.abspath(__file__)] + MARKERS + chosen + args)
        return run_in_shards(chosen)
    if os.environ.get("VASTWORKER_TEST_VENV") == sys.prefix:
        sys.exit("test_vastworker: pytest is still missing in %s" % sys.prefix)
    from harness import cached_venv
    print("test_vastworker: pytest is not installed for %s; setting it up in $XDG_CACHE_HOME/vastworker "
          "(else ~/.cache/vastworker)" % sys.executable, flush=True)
    try:
        python = cached_venv("test-venv", "pytest")
    except RuntimeError as exc:
        sys.exit("test_vastworker: %s; on Debian or Ubuntu, apt-get install python3-venv, or install "
                 "pytest yourself" % exc)
    os.environ["VASTWORKER_TEST_VENV"] = os.path.dirname(os.path.dirname(python))
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


def run_in_shards(chosen):
    """The chosen tests, dealt in turn to SHARDS pytest processes run at once; each one's
    summary and skips (with why), and the whole output of any that failed.  The exit status is
    the first failing shard's, as pytest gives it."""
    import tempfile
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "test_vastworker",
               os.path.abspath(__file__)] + MARKERS + chosen
    started, shards = time.monotonic(), []
    print("test_vastworker: the tests in %d processes" % SHARDS, flush=True)
    for index in range(SHARDS):
        output = tempfile.TemporaryFile(mode="w+")
        environ = dict(os.environ, VASTWORKER_TEST_SHARD="%d/%d" % (index, SHARDS),
                       PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        shards.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=environ),
                       output))
    status = 0
    for index, (process, output) in enumerate(shards):
        code = process.wait()
        output.seek(0)
        text = output.read()
        lines = text.strip().splitlines()
        print("shard %d: %s" % (index + 1, lines[-1] if lines else "no output"), flush=True)
        for line in lines:
            if line.startswith("SKIPPED"):  # and why
                print("  " + line)
        if code != 0:
            sys.stdout.write(text)
            status = status or code
    print("test_vastworker: %.0f s" % (time.monotonic() - started))
    return status


def pytest_collection_modifyitems(config, items):
    """In a shard (VASTWORKER_TEST_SHARD "index/count", this module loaded as a plugin): every
    count-th test from index on.  Neighbours in the file cost alike, so dealing them in turn
    spreads the slow ones."""
    shard = os.environ.get("VASTWORKER_TEST_SHARD")
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        config.hook.pytest_deselected(items=[item for number, item in enumerate(items) if number % count != index])
        items[:] = items[index::count]


if __name__ == "__main__":
    sys.exit(run_the_suite())

import pytest  # noqa: E402  (below the runner, which must work where pytest is not installed)

import vastworker  # noqa: E402  (the unit tests' subject: importing it starts nothing)
from harness import (JSON, VASTWORKER, WorkerProcess, cached_venv, free_port, read_until_close,  # noqa: E402
                     rss_kb, value_at, wait_until)


# ------------------------------------------------------------------------------------------------
# Harness: fixtures and helpers the sections share (process-level ones: bench/harness.py)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def start_worker():
    workers = []

    def start(backend="helloworld", *args, **kwargs):
        worker = WorkerProcess(backend, *args, **kwargs)
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def hello(start_worker):
    return start_worker("helloworld")


def venv_or_skip(name, requirement, what):
    """A Python with `requirement` in a virtual environment outside the project (made once, kept
    in ~/.cache/vastworker); the test is skipped, saying why, where it cannot be installed."""
    try:
        return cached_venv(name, requirement)
    except RuntimeError as exc:
        pytest.skip("%s: %s" % (what, exc))


def run_client(python, source, tmp_path, *args, env=None):
    """Run a client script written by others' libraries (`source`, in that venv's `python`) with
    `args`; the JSON it prints last."""
    script = tmp_path / "client.py"
    script.write_text(source)
    result = subprocess.run([python, str(script)] + [str(arg) for arg in args], capture_output=True,
                            timeout=120, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


@pytest.fixture
def write_backend(tmp_path):
    """Write a backend.py (dedented source) into a new directory; its path."""
    count = [0]

    def write(source, name=None):
        count[0] += 1
        directory = tmp_path / (name or "backend%d" % count[0])
        directory.mkdir()
        (directory / "backend.py").write_text(textwrap.dedent(source))
        return str(directory)

    return write


def run_cli(*args, env=None, timeout=20):
    """Run vastworker.py to completion: (exit code, combined output)."""
    result = subprocess.run([sys.executable, "-I", "-S", VASTWORKER] + list(args), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, result.stdout.decode()


def status_of(raw):
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert match, raw[:200]
    return int(match.group(1))


def body_of(raw):
    return raw.split(b"\r\n\r\n", 1)[1]


class StaticServer:
    """http.server on loopback serving a directory, and recording what is POSTed to it."""

    def __init__(self, directory):
        import http.server
        posts = self.posts = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=directory, **kwargs)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

class LoopbackServer:
    """The other side of a test, on loopback: an HTTP/1.1 server whose answer(method, path, body)
    gives each request's status, sent with an empty body, or (status, body) (an autoscaler, a
    model server's health endpoint, a program holding the worker's port).  `port` 0 picks a
    free one."""

    def __init__(self, answer, port=0, host="127.0.0.1"):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def respond(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = answer(self.command, self.path, body)
                status, data = status if isinstance(status, tuple) else (status, b"")
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_OPTIONS = respond

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def increment_until_stopped(port, stop, outcome, amount=1):
    """One client incrementing until `stop` is set; counts what was acknowledged (200) and retries
    whatever was not (refused, cut off, 503): those must not have counted."""
    acknowledged = 0
    connection = None
    while not stop.is_set():
        try:
            connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("POST", "/increment", body=json.dumps({"amount": amount}), headers=JSON)
            response = connection.getresponse()
            body = response.read()
            if response.status == 200:
                assert body == b"Incremented"
                acknowledged += amount
            elif response.status != 503:
                outcome.append(("unexpected", response.status, body))
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException):
            if connection is not None:
                connection.close()
            connection = None
            time.sleep(0.005)
    outcome.append(("acknowledged", acknowledged))


HOLD_BACKEND = """
import itertools, os, threading, time
{settings}
calls = itertools.count()

class Backend:
    def __init__(self):
        if {non_daemon_thread}:
            def report_forever():  # like the autoscaler guide's reporting loop: not a daemon
                while True:
                    time.sleep(0.1)
            threading.Thread(target=report_forever).start()

def hold(backend, request):
    directory = os.environ["HOLD_DIR"]
    open(os.path.join(directory, "started-%d" % next(calls)), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(directory, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "held"

def work(backend, request):
    backend.runs = getattr(backend, "runs", []) + [request.args["n"]]
    return "ran " + request.args["n"]

def notice(backend, request):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if request.is_disconnected():
            open(os.path.join(os.environ["HOLD_DIR"], "noticed"), "w").close()
            return "gone"
        time.sleep(0.02)
    return "still there"

flask_dict = {{"GET": {{"hold": hold, "fast": lambda backend, request: "fast", "work": work, "notice": notice,
                      "runs": lambda backend, request: {{"runs": getattr(backend, "runs", [])}}}}}}
"""


class Hold:
    """A backend whose /hold calls each say that they have started, then wait to be released:
    tests wait for those events rather than for time.  `env` tells the worker where they meet."""

    def __init__(self, write_backend, directory, settings="", non_daemon_thread=False):
        directory.mkdir()
        self.directory = directory
        self.backend = write_backend(HOLD_BACKEND.format(settings=settings, non_daemon_thread=non_daemon_thread))
        self.env = {"HOLD_DIR": str(directory)}

    def wait_started(self, count=1):
        wait_until(lambda: len(glob.glob(str(self.directory / "started-*"))) >= count)

    def release(self):
        (self.directory / "release").touch()


@pytest.fixture
def hold(start_worker, write_backend, tmp_path):
    """Makes Hold backends; whatever is still held is released before the workers are stopped."""
    made = []

    def make(**kwargs):
        made.append(Hold(write_backend, tmp_path / ("hold%d" % len(made)), **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.release()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """RSA keys made by openssl: the autoscaler's (both public PEM forms) and a stranger's."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("keys")

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    for name in ("autoscaler", "stranger"):
        openssl("genrsa", "-out", str(directory / (name + ".key")), "2048")
    openssl("rsa", "-in", str(directory / "autoscaler.key"), "-pubout", "-out", str(directory / "spki.pem"))
    openssl("rsa", "-in", str(directory / "stranger.key"), "-pubout", "-out", str(directory / "stranger.pem"))
    openssl("rsa", "-in", str(directory / "autoscaler.key"), "-RSAPublicKey_out", "-out", str(directory / "pkcs1.pem"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(directory / "tls.key"),
            "-out", str(directory / "tls.crt"))
    return directory


def openssl_sign(key_file, message):
    """An RSA PKCS#1 v1.5 SHA-256 signature by openssl, base64."""
    import base64
    signed = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key_file)], input=message,
                            stdout=subprocess.PIPE, check=True).stdout
    return base64.b64encode(signed).decode()


def https_connection(port, keys):
    import ssl
    context = ssl.create_default_context(cafile=str(keys / "tls.crt"))
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)


# ------------------------------------------------------------------------------------------------
# The hello-world guide, end to end
# ------------------------------------------------------------------------------------------------

def test_helloworld_flow(hello):
    status, headers, body = hello.request("GET", "/value")
    assert (status, headers["Content-Type"], body) == (200, "application/json", b'{"value":0}\n')
    status, headers, body = hello.request("POST", "/increment", {"amount": 5})
    assert (status, headers["Content-Type"], body) == (200, "text/html; charset=utf-8", b"Incremented")
    assert hello.request("POST", "/increment", {"amount": 2.5})[0] == 200
    assert hello.value() == 7.5


def test_serving_line_names_url_and_endpoints(hello):
    assert re.search(r"serving helloworld on http://127\.0\.0\.1:\d+ \(GET /value, POST /increment\)",
                     hello.log)


def test_access_log_line_per_request(hello):
    hello.request("GET", "/value?x=1")
    hello.wait_for_log(r"INFO 127\.0\.0\.1 GET /value\?x=1 200 12 \d+\.\dms")


@pytest.mark.parametrize("option", [["--log-level", "warning"], ["--log-level", "error"], ["--quiet"]])
def test_quiet_levels_log_only_problems_and_the_start_and_stop_lines(start_worker, option):
    worker = start_worker("helloworld", *option)
    assert worker.request("GET", "/value")[0] == 200
    assert worker.request("POST", "/increment", {"amount": "x"})[0] == 500  # a problem: logged
    worker.wait_for_log("the handler raised TypeError")  # an error line flushes all before it
    assert worker.stop() == 0
    info = [line for line in worker.lines if " INFO " in line]
    assert len(info) == 2 and "serving helloworld" in info[0] and info[1].endswith("INFO stopped"), info


def test_helloworld_ships_as_the_guide_writes_it():
    with open(os.path.join(ROOT, "backends", "helloworld", "backend.py")) as file:
        source = file.read()
    assert 'backend.count += request.json["amount"]' in source
    assert 'return {"value" : backend.count}' in source
    assert os.access(os.path.join(ROOT, "backends", "helloworld", "launch.sh"), os.X_OK)


# ------------------------------------------------------------------------------------------------
# 1. Core: refusals and error bodies
# ------------------------------------------------------------------------------------------------

def test_a_refusal_carries_its_status_detail_and_retry_after():
    refusal = vastworker.Refusal(503, "busy", retry_after=5)
    assert (refusal.code, refusal.description, refusal.name) == (503, "busy", "Service Unavailable")
    assert refusal.headers == [("Retry-After", "5")]
    assert json.loads(refusal.body()) == {"error": "Service Unavailable", "detail": "busy"}
    assert vastworker.Refusal(401, headers=[("WWW-Authenticate", "Bearer")]).headers == [
        ("WWW-Authenticate", "Bearer")]


def test_reason_phrases_are_the_same_on_every_python():
    phrases = vastworker.STATUS_PHRASES  # http.HTTPStatus renamed four in 3.13, and 3.8 lacks three
    assert (phrases[413], phrases[422], phrases[418], phrases[425]) == (
        "Request Entity Too Large", "Unprocessable Entity", "I'm a Teapot", "Too Early")


def test_error_bodies_are_short_json_in_our_own_words():
    assert vastworker.error_body(404) == b'{"error": "Not Found", "detail": "nothing is served at this path"}\n'
    assert json.loads(vastworker.error_body(422, {"payload": "field missing"}))["detail"] == {
        "payload": "field missing"}
    assert json.loads(vastworker.error_body(520, "x"))["error"] == "Unknown Error"
    assert json.loads(vastworker.error_body(400, ValueError("bad")))["detail"] == "bad"
    assert json.loads(vastworker.error_body(400, float("nan")))["detail"] == "nan"  # never invalid JSON


# ------------------------------------------------------------------------------------------------
# 2. Wire: parsing, framing, deadlines, the connection cap, TLS
# ------------------------------------------------------------------------------------------------

def read_head_both_ways(head):
    """What RequestHead makes of a head (with its fast path for plain heads), and what the
    line-by-line parser alone makes of it: the same, or the same refusal."""
    def reading(make):
        try:
            parsed = make()
        except vastworker.Refusal as refusal:
            return ("refused", refusal.code, refusal.detail)
        return (parsed.method, parsed.version, parsed.http11, parsed.absolute_host, parsed.target, parsed.path,
                parsed.query_string, parsed.fields, list(parsed.headers.items()), parsed.connection,
                parsed.content_length, parsed.chunked, parsed.keep_alive)

    def line_by_line():
        parsed = object.__new__(vastworker.RequestHead)
        parsed._finish(*parsed._parse_any(head))
        return parsed

    return reading(lambda: vastworker.RequestHead(head)), reading(line_by_line)


def test_the_fast_path_for_plain_heads_reads_them_as_the_line_by_line_parser_does():
    import random
    rng = random.Random(7)
    lines = [b"GET /value HTTP/1.1", b"POST /increment?x=%41&y HTTP/1.0", b"get /value HTTP/1.1",
             b"GET //a//b HTTP/1.1", b"GET http://h/x HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET /v HTTP/1.2",
             b"GET /caf\xc3\xa9 HTTP/1.1", b"GET /%E2%82%AC HTTP/1.1", b"GET  /v HTTP/1.1", b"GET /v HTTP/2.0"]
    fields = [b"Host: a", b"host:b", b"Content-Length: 5", b"Content-Length: 5, 5", b"Content-Length: 07",
              b"Transfer-Encoding: chunked", b"Connection: close", b"Connection: keep-alive, Upgrade",
              b"X_Under: 1", b"X-Tab:\ta\tb ", b"X-Obs: caf\xe9", b"X-Empty:", b"X-Sp:   spaced out   ",
              b" folded", b"Bad Name: 1", b"Cookie: a=1", b"Cookie: b=2", b"X-Ctl: a\x01b", b"X-Nul: a\x00b",
              b"X-Colon: a: b", b"Accept: */*"]
    compared = plain = 0
    for _ in range(4000):
        ending = rng.choice([b"\r\n", b"\n"])
        head = ending.join([rng.choice(lines)] + [rng.choice(fields) for _ in range(rng.randint(0, 6))])
        fast, slow = read_head_both_ways(head)
        assert fast == slow, head
        compared += 1
        plain += vastworker._PLAIN_HEAD.fullmatch(head) is not None
    assert plain > 500 and compared - plain > 500  # both paths well exercised


def test_a_request_head_is_parsed_with_its_framing():
    head = vastworker.RequestHead(
        b"post /caf%C3%A9/x?a=1&b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nCookie: a=1\r\n"
        b"Cookie: b=2\r\nX_Under: no\r\nContent-Length: 5\r\nConnection: Keep-Alive, Upgrade")
    assert (head.method, head.path, head.query_string, head.target) == (
        "POST", "/caf\u00e9/x", b"a=1&b", "/caf%C3%A9/x?a=1&b")
    assert head.headers.items() == [("Host", "h"), ("X-A", "1, 2"), ("Cookie", "a=1; b=2"),
                                     ("Content-Length", "5"), ("Connection", "Keep-Alive, Upgrade")]
    assert head.fields["x_under"] == ["no"]  # seen for framing, hidden from the handler
    assert (head.content_length, head.chunked, head.http11, head.keep_alive) == (5, False, True, True)
    old = vastworker.RequestHead(b"GET http://example.com:9//v?q HTTP/1.0")
    assert (old.absolute_host, old.path, old.query_string, old.keep_alive) == ("example.com:9", "/v", b"q", False)
    assert vastworker.RequestHead(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert not vastworker.RequestHead(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close").keep_alive
    assert vastworker.RequestHead(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked").chunked
    assert not vastworker.RequestHead(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n"
                                      b"Transfer-Encoding: chunked").keep_alive  # RFC 9112 6.1
    assert vastworker.RequestHead(b"OPTIONS * HTTP/1.1\r\nHost: h").path == "/*"


@pytest.mark.parametrize("raw, code, detail", [
    (b"GET /v", 400, "malformed request line"),
    (b"G@T /v HTTP/1.1", 400, "malformed request method"),
    (b"GET /v HTTP/1.x", 400, "malformed HTTP version"),
    (b"GET /v HTTP/2.0", 505, "only HTTP/1.0 and HTTP/1.1"),
    (b"GET /v HTTP/1.1\r\nX: a\r\n folded", 400, "folded"),
    (b"GET /v HTTP/1.1\r\nBad Header", 400, "malformed header line"),
    (b"GET /v HTTP/1.1\r\nX: a\rb", 400, "stray CR"),
    (b"GET /v HTTP/1.1\r\nX: a\x0cb", 400, "stray CR, NUL, VT or FF"),
    (b"GET /v HTTP/1.1" + b"\r\nX: 1" * 101, 431, "more than 100"),
    (b"GET /v HTTP/1.1\r\nX: 1", 400, "needs one Host header, not 0"),
    (b"GET /v HTTP/1.0\r\nHost: a\r\nHost: b", 400, "needs one Host header, not 2"),
    (b"GET v HTTP/1.1\r\nHost: h", 400, "does not start with '/'"),
    (b"GET * HTTP/1.1\r\nHost: h", 400, "does not start with '/'"),
    (b"GET https:///v HTTP/1.1\r\nHost: h", 400, "names no host"),
    (b"GET /\x7f HTTP/1.1\r\nHost: h", 400, "not printable ASCII"),
    (b"POST /v HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6", 400, "conflicting"),
    (b"POST /v HTTP/1.1\r\nHost: h\r\nContent-Length: +5", 400, "invalid Content-Length"),
    (b"POST /v HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456789", 400, "19 digits"),
    (b"POST /v HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip", 501, "only the chunked"),
    (b"POST /v HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", 400, "ambiguous"),
])
def test_a_malformed_request_head_is_refused(raw, code, detail):
    with pytest.raises(vastworker.Refusal) as caught:
        vastworker.RequestHead(raw)
    assert caught.value.code == code and detail in caught.value.detail


def test_every_response_head_is_encoded_the_same_way():
    date = "Thu, 01 Jan 2026 00:00:00 GMT"
    headers = vastworker.Headers([("Content-Type", "text/plain"), ("Connection", "upgrade"),
                                  ("Content-Length", "99"), ("Server", "mine")])
    assert vastworker.encode_head(201, "Created", headers, date, length=3, connection="close") == (
        b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nServer: mine\r\nDate: " + date.encode()
        + b"\r\nContent-Length: 3\r\nConnection: close\r\n\r\n")  # the framing is ours alone
    assert vastworker.encode_head(200, "OK", vastworker.Headers(), date, chunked=True) == (
        b"HTTP/1.1 200 OK\r\nDate: %s\r\nServer: vastworker/%s\r\nTransfer-Encoding: chunked\r\n\r\n"
        % (date.encode(), vastworker.__version__.encode()))
    with pytest.raises(UnicodeEncodeError):
        vastworker.encode_head(200, "OK", vastworker.Headers([("X-Euro", "\u20ac")]), date, length=0)
    # heads are remembered by their status and headers: each still gets its own lines and Date
    json_head = vastworker.encode_head(200, "OK", vastworker.Headers([("Content-Type", "application/json")]),
                                       date, length=7)
    text_head = vastworker.encode_head(200, "OK", vastworker.Headers([("Content-Type", "text/plain")]),
                                       "Fri, 02 Jan 2026 00:00:00 GMT", length=7)
    assert b"application/json" in json_head and date.encode() in json_head
    assert b"text/plain" in text_head and b"Fri, 02 Jan" in text_head and b"application/json" not in text_head
    assert vastworker.encode_head(200, "OK", vastworker.Headers([("Content-Type", "application/json")]),
                                  date, length=7) == json_head
    for number in range(1000):  # headers that vary per response cannot grow the memory of them
        vastworker.encode_head(200, "OK", vastworker.Headers([("X-Request", str(number))]), date, length=0)
    assert len(vastworker._HEAD_LINES) <= 256


def decoded(wire):
    """chunked_pieces() over the whole of `wire`: (the body, what is left), or the Refusal."""
    buffer = bytearray(wire)

    def fill():
        raise vastworker.ConnectionClosed()
    try:
        return b"".join(vastworker.chunked_pieces(buffer, fill)), bytes(buffer)
    except vastworker.Refusal as refusal:
        return refusal.code, refusal.detail


@pytest.mark.parametrize("wire, expected", [
    (b"5\r\nhello\r\n0\r\n\r\nNEXT", (b"hello", b"NEXT")),
    (b"5;ext=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n", (b"hello", b"")),  # extensions, trailers dropped
    (b"5\nhello\r\n0\r\n\r\n", (400, "invalid chunk-size line b'5\\n'")),  # a bare LF
    (b" 5\r\nhello\r\n0\r\n\r\n", (400, "invalid chunk-size line b' 5\\r\\n'")),
    (b"5\r\nhelloX\r\n0\r\n\r\n", (400, "a chunk is longer than its size says")),
    (b"5\r\nhello\r\n0\r\nno colon\r\n\r\n", (400, "malformed trailer line b'no colon\\r\\n'")),
    (b"1" * 1030, (400, "a chunk-size line is longer than 1024 bytes")),
])
def test_one_chunked_decoder_reads_both_directions_strictly(wire, expected):
    assert decoded(wire) == expected


def test_the_model_servers_chunked_answer_is_read_as_strictly_as_a_clients_body():
    near, far = socket.socketpair()
    with near, far:
        upstream = vastworker.UpstreamConnection(near)
        far.sendall(b"5\r\nhello\r\n0\r\nno colon\r\n\r\n")  # a trailer the old reader let by
        pieces = upstream.pieces(("chunked", None), vastworker.ClientWatch(None), 5)
        assert next(pieces) == b"hello"
        with pytest.raises(vastworker.UpstreamFailed) as failed:
            next(pieces)
        assert str(failed.value) == "it sent a malformed chunk: malformed trailer line b'no colon\\r\\n'"
    near, far = socket.socketpair()
    with near, far:
        upstream = vastworker.UpstreamConnection(near)
        far.sendall(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n")
        with pytest.raises(vastworker.UpstreamFailed, match="malformed head: the headers are larger than 65536"):
            upstream.read_head("GET", vastworker.ClientWatch(None), 5)


def test_a_client_socket_reads_heads_and_bodies_and_knows_when_its_client_left():
    near, far = socket.socketpair()
    with near, far:
        client = vastworker.ClientSocket(near, 5)
        far.sendall(b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\n\r\n3\r\nabc\r\n0\r\n\r\nrest")
        client.receive()
        assert client.take_head() == b"POST /a HTTP/1.1\r\nHost: x\r"  # a blank line before it skipped
        assert client.head_by is None  # the head is whole: no time limit on it now
        budget = vastworker.BodyBudget(100)
        client.start_body()
        assert client.read_chunked(10, budget) == (b"abc", 3) and budget.held == 3
        assert bytes(client.buffer) == b"rest" and not client.gone()
        client.buffer.clear()
        far.sendall(b"6\r\nabcdef\r\n")
        with pytest.raises(vastworker.Refusal, match="larger than 5 bytes"):  # refused on its size
            client.read_chunked(5, budget)
        assert budget.held == 3  # what the failed one took is given back
        far.close()
        assert client.gone() and client.left
    near, far = socket.socketpair()
    with near, far:
        client = vastworker.ClientSocket(near, 5)
        near.settimeout(5)  # no DeadlineWatcher here: should the refusal not come, the read ends
        far.sendall(b"GET /x HTTP/1.1\r\nHost")
        client.receive()
        assert client.take_head() is None and client.head_by is not None  # part of a head: timed
        far.sendall(b"x" * 70000)
        with pytest.raises(vastworker.Refusal, match="headers are larger"):
            while client.take_head() is None:
                client.receive()
        client.abandon()  # the worker gives up on it: its client sees the connection end
        assert client.gone() and far.recv(10) == b""


@pytest.mark.parametrize("use_epoll", [True, False] if hasattr(select, "epoll") else [False])
def test_the_connection_pool_adds_threads_for_blocked_handlers_and_lets_them_go(use_epoll):
    """In process, with epoll and with the poll() it falls back on: a connection is run only
    once its client sends; handlers that block make the pool add threads for the next ones, and
    once they are done the spare threads end."""
    pool = vastworker.ConnectionPool(vastworker.OneShotPoller(use_epoll))
    pool.SPARE = 0.3
    release, ran = threading.Event(), []

    class Handler:  # what the pool needs of a ConnectionHandler
        hello_due = False

        def __init__(self, sock):
            self.client = vastworker.ClientSocket(sock, 5)

        def run(self):
            self.client.sock.recv(100)
            ran.append(self)
            if len(ran) <= 2:
                release.wait(10)

    pairs = [socket.socketpair() for _ in range(3)]
    handlers = [Handler(near) for near, _ in pairs]
    for handler in handlers:
        pool.wait_for(handler)
    pairs[0][1].sendall(b"x")
    wait_until(lambda: len(ran) == 1)
    assert ran == [handlers[0]]  # the others have sent nothing
    pairs[1][1].sendall(b"x")
    pairs[2][1].sendall(b"x")
    wait_until(lambda: len(ran) == 3)  # while the first two block
    assert pool.threads == 3
    release.set()
    wait_until(lambda: pool.threads == 1, timeout=10, failure=lambda: "%d threads" % pool.threads)
    pool.wait_for(handlers[2])  # waiting again, run again
    pairs[2][1].sendall(b"y")
    wait_until(lambda: len(ran) == 4)
    for near, far in pairs:
        near.close()
        far.close()


class ScriptedPoller:
    """The pool's poller, scripted: once `go` is set, each wait() of a pool thread returns the
    next batch of file descriptors; with none left, a wait that may block blocks for good."""

    def __init__(self, batches):
        self.batches, self.go = collections.deque(batches), threading.Event()

    def arm(self, fd):
        pass

    def wait(self, timeout):
        if threading.current_thread().name == "connections":  # not the pool's watcher
            self.go.wait()
            if self.batches:
                return self.batches.popleft()
        if timeout is None:
            threading.Event().wait()
        return []


@pytest.mark.parametrize("batches, expected", [
    ([[1, 11, 12, 13, 2, 3, 4, 5]], [1, 2, 11, 3, 4, 12, 5, 13]),  # GREET_EVERY requests, a handshake, ...
    ([[1, 11, 12], [2], []], [1, 2, 11, 12]),  # a request that came while handshakes waited goes first
    ([[11, 12]], [11, 12]),  # handshakes alone do not wait for requests
])
def test_the_pool_runs_tls_handshakes_between_requests_not_ahead_of_them(batches, expected):
    """In process: connections due for a handshake's costly step (11 and up, here) run one
    after every GREET_EVERY (2, here) requests, and only after the requests that came while
    they waited; a thread with no request to run takes a handshake."""
    poller = ScriptedPoller(batches)
    pool = vastworker.ConnectionPool(poller)
    pool.TICK = 60  # the watcher adds no thread meanwhile: one thread runs them all, in order
    pool.GREET_EVERY = 2
    ran = []
    for fd in sorted({fd for batch in batches for fd in batch}):
        client = types.SimpleNamespace(idle=lambda until: None, fileno=lambda fd=fd: fd, deadline=None)
        pool.wait_for(types.SimpleNamespace(client=client, hello_due=fd > 10, run=lambda fd=fd: ran.append(fd)))
    poller.go.set()
    wait_until(lambda: len(ran) == len(expected))
    assert ran == expected


def test_dispatch_answers_a_request_in_process():
    """BackendApp.respond() and finish(), without a server: a request's way to its handler."""
    class Backend:
        count = 0

    def increment(backend, request):
        backend.count += request.json["amount"]
        return "Incremented"

    state, metrics = vastworker.WorkerState(), vastworker.Metrics()
    app = vastworker.BackendApp(Backend(), {"POST": {"increment": increment}}, state, metrics,
                                vastworker.CurrentRequest())
    near, far = socket.socketpair()
    with near, far:
        connection = types.SimpleNamespace(client_address=("127.0.0.1", 5), server_address=("127.0.0.1", 3000),
                                           scheme="http", client=vastworker.ClientSocket(near, 5))
        head = vastworker.RequestHead(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 13")
        response, ticket = app.respond(head, b'{"amount": 5}', connection)
        assert response.status_code == 503 and b"still loading" in response.body
        app.finish(ticket, response.status_code)
        state.loaded()
        response, ticket = app.respond(head, b'{"amount": 5}', connection)
        assert (response.status_code, response.body) == (200, b"Incremented")
        assert metrics.snapshot()["num_requests_working"] == 1  # in flight until finished
        app.finish(ticket, 200)
        assert app.backend.count == 5 and metrics.snapshot()["cur_perf"] == 100.0
        response, _ = app.respond(vastworker.RequestHead(b"GET /nothing HTTP/1.1\r\nHost: x"), b"", connection)
        assert response.status_code == 404


def test_huge_content_length_is_413_at_once(hello):
    with socket.create_connection(("127.0.0.1", hello.port), timeout=5) as sock:
        sock.sendall(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        raw = read_until_close(sock)  # the worker answers and closes without reading a body
    assert status_of(raw) == 413 and b"Connection: close" in raw
    assert "limit is 67108864" in json.loads(body_of(raw))["detail"]
    assert hello.value() == 0


def test_body_limit_is_configurable_and_covers_chunked_bodies(start_worker):
    worker = start_worker("helloworld", "--max-body", "1K")
    assert worker.request("POST", "/increment", b'{"amount": 1, "pad": "%s"}' % (b"x" * 900), JSON)[0] == 200
    assert worker.request("POST", "/increment", b'{"amount": 1, "pad": "%s"}' % (b"x" * 1100), JSON)[0] == 413
    chunk = b"x" * 600
    raw = worker.raw(b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n258\r\n" + chunk + b"\r\n258\r\n" + chunk + b"\r\n0\r\n\r\n")
    assert status_of(raw) == 413
    assert worker.value() == 1


@pytest.mark.parametrize("length", [b"-5", b"abc", b"1e3", b"5, 6", b"+5"])
def test_invalid_content_length_is_400(hello, length):
    raw = hello.raw(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + length + b"\r\n\r\n{\"amount\": 1}")
    assert status_of(raw) == 400 and b"Connection: close" in raw
    assert "Content-Length" in json.loads(body_of(raw))["detail"]
    assert hello.value() == 0


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    (b"GET /value\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /value HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /value HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /value HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"GET /value HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /value HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n", 431),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /increment HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /increment HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", 400),
], ids=["garbage", "tls", "http09", "http2", "no-colon", "folded", "70k-header", "300-headers",
        "70k-line", "gzip", "te-and-cl", "bad-chunk-size", "long-chunk"])
def test_malformed_requests_get_a_json_error_and_close(hello, request_bytes, status):
    raw = hello.raw(request_bytes)
    assert status_of(raw) == status, raw[:300]
    assert b"Content-Type: application/json" in raw and b"Connection: close" in raw
    assert json.loads(body_of(raw))["detail"]
    assert hello.value() == 0


def test_stuck_connections_do_not_block_others(start_worker):
    worker = start_worker("helloworld", "--timeout", "2")
    threads = len(os.listdir("/proc/%d/task" % worker.proc.pid))
    stuck = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", worker.port))
        sock.sendall(b"POST /increment HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        stuck.append(sock)
    try:
        started = time.monotonic()
        assert worker.request("POST", "/increment", {"amount": 1})[0] == 200
        assert worker.value() == 1
        assert time.monotonic() - started < 5  # not waiting for the stuck ones (2 s timeout)
        # they wait in the pool's poller, not on a thread each
        assert len(os.listdir("/proc/%d/task" % worker.proc.pid)) < threads + 5
        for sock in stuck:  # then each is answered 408 and closed after the timeout
            sock.settimeout(10)
            assert status_of(read_until_close(sock)) == 408
    finally:
        for sock in stuck:
            sock.close()


def test_idle_keep_alive_connection_is_closed_after_the_timeout(start_worker):
    worker = start_worker("helloworld", "--timeout", "0.5")
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"GET /value HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        raw = read_until_close(sock)
    assert status_of(raw) == 200 and raw.endswith(b'{"value":0}\n')
    assert time.monotonic() - started < 8


def test_keep_alive_reuses_the_connection(hello):
    connection = hello.connect()
    connection.request("POST", "/increment", body='{"amount": 1}', headers=JSON)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Connection") is None
    response.read()
    first_socket = connection.sock
    connection.request("GET", "/value")
    response = connection.getresponse()
    assert response.read() == b'{"value":1}\n'
    assert connection.sock is first_socket
    connection.close()


def test_pipelined_requests_are_all_answered_in_order(hello):
    one = b'POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"amount": 1}'
    raw = hello.raw(one * 3 + b"GET /value HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 4
    assert raw.endswith(b'{"value":3}\n')


def test_chunked_request_body(hello):
    raw = hello.raw(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\n{\"amo\r\n8\r\nunt\": 4}\r\n0\r\nX-Trailer: t\r\n\r\n"
                    b"GET /value HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and raw.endswith(b'{"value":4}\n')


def test_expect_100_continue(hello):
    with socket.create_connection(("127.0.0.1", hello.port), timeout=5) as sock:
        sock.sendall(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 13\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        assert sock.recv(1000) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b'{"amount": 1}')
        raw = read_until_close(sock)
    assert status_of(raw) == 200 and b"100 Continue" not in raw
    with socket.create_connection(("127.0.0.1", hello.port), timeout=5) as sock:
        sock.sendall(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert status_of(read_until_close(sock)) == 413  # refused before the body is sent


def test_http10_client(hello):
    raw = hello.raw(b"GET /value HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 12" in raw
    assert b"Connection: close" in raw and raw.endswith(b'{"value":0}\n')
    with socket.create_connection(("127.0.0.1", hello.port), timeout=5) as sock:
        sock.sendall(b"GET /value HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = b""
        while not first.endswith(b'{"value":0}\n'):  # the whole answer, and the connection stays
            first += sock.recv(1000)
        assert b"Connection: keep-alive" in first
        sock.sendall(b"GET /value HTTP/1.0\r\n\r\n")
        assert status_of(read_until_close(sock)) == 200


def test_post_without_length_closes_the_connection(hello):
    raw = hello.raw(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
                    b'{"amount": 1}')
    assert status_of(raw) == 400 and raw.count(b"HTTP/1.1") == 1 and b"Connection: close" in raw
    assert hello.value() == 0


def test_absolute_form_target(surface):
    raw = surface.raw(b"GET http://example.com:9999/echo?a=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
    data = json.loads(body_of(raw))
    assert data["host"] == "example.com:9999" and data["path"] == "/echo" and data["args"] == {"a": ["1"]}


def test_over_the_connection_cap_idle_ones_make_room_then_new_ones_get_503(start_worker, hold):
    held = hold(settings="allow_parallel_requests = True")
    worker = start_worker(held.backend, "--max-connections", "4", env=held.env)
    idle = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(4)]
    time.sleep(0.3)
    try:
        assert worker.request("GET", "/fast")[2] == b"fast"  # the oldest idle one was closed for it
        assert read_until_close(idle[0]) == b""
        for sock in idle[1:]:
            sock.close()
        time.sleep(0.3)  # the worker sees those go
        busy = [threading.Thread(target=worker.request, args=("GET", "/hold")) for _ in range(4)]
        for thread in busy:
            thread.start()
        held.wait_started(4)  # all four admitted and running
        started = time.monotonic()
        status, headers, body = worker.request("GET", "/fast")
        assert status == 503 and headers["Retry-After"] == "1" and time.monotonic() - started < 1
        assert "4 connections open" in json.loads(body)["detail"]
        held.release()
        for thread in busy:
            thread.join()
        assert worker.request("GET", "/fast")[0] == 200
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.slow
def test_1000_connections_neither_exhaust_memory_nor_stall_a_client(start_worker):
    worker = start_worker("helloworld", "--max-connections", "2000")
    before = rss_kb(worker.proc.pid)
    sockets = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", worker.port))
            sock.sendall(b"GET /value HTTP/1.1\r\nHost: x\r\n\r\n")  # then they sit, kept alive
            sockets.append(sock)
        for sock in sockets[:50]:
            sock.settimeout(10)
            assert sock.recv(1000).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        assert worker.request("POST", "/increment", {"amount": 1})[0] == 200
        assert worker.value() == 1
        took = time.monotonic() - started
        grown = (rss_kb(worker.proc.pid) - before) / 1024
        print("1000 open connections: +%.1f MB resident; a new client served in %.0f ms" % (grown, took * 1000))
        assert grown < 256
    finally:
        for sock in sockets:
            sock.close()


def test_tls_round_trip(start_worker, write_backend, keys):
    worker = start_worker("helloworld", "--certfile", str(keys / "tls.crt"), "--keyfile", str(keys / "tls.key"))
    assert "serving helloworld on https://127.0.0.1:%d" % worker.port in worker.log
    connection = https_connection(worker.port, keys)
    connection.request("POST", "/increment", body='{"amount": 5}', headers=JSON)
    assert connection.getresponse().read() == b"Incremented"
    connection.request("GET", "/value")  # the same TLS connection, kept alive
    assert connection.getresponse().read() == b'{"value":5}\n'
    connection.close()
    try:
        plain = worker.raw(b"GET /value HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the TLS port
    except ConnectionResetError:
        plain = b""
    assert not plain.startswith(b"HTTP/1.1 200")
    connection = https_connection(worker.port, keys)
    connection.request("GET", "/value")
    assert connection.getresponse().status == 200  # and the worker carries on
    code, output = run_cli("helloworld", "--port", "0", "--certfile", "/nonexistent.crt")
    assert code == 1 and "cannot serve HTTPS with certificate /nonexistent.crt" in output


def test_over_the_cap_a_tls_client_gets_its_503_over_tls(start_worker, hold, keys):
    held = hold()
    worker = start_worker(held.backend, "--max-connections", "1", "--certfile", str(keys / "tls.crt"),
                          "--keyfile", str(keys / "tls.key"), env=held.env)
    holder = https_connection(worker.port, keys)
    holder.request("GET", "/hold")
    held.wait_started()  # the one connection allowed is busy in its handler
    refused = https_connection(worker.port, keys)
    refused.request("GET", "/fast")
    response = refused.getresponse()
    assert response.status == 503 and response.getheader("Retry-After") == "1"
    assert response.getheader("Date") and response.getheader("Server") == "vastworker/" + vastworker.__version__
    assert "1 connections open" in json.loads(response.read())["detail"]
    refused.close()
    held.release()
    assert holder.getresponse().read() == b"held"
    holder.close()


def test_the_status_logged_and_counted_is_the_status_sent(start_worker, write_backend, autoscaler):
    backend = write_backend("""
        class Backend:
            pass

        flask_dict = {"GET": {"euro": lambda backend, request: ("x", {"X-Price": "\\u20ac5"})}}
    """)
    worker = start_worker(backend, env=reporting_env(autoscaler))
    status, data = worker.json("GET", "/euro")
    assert status == 500 and data["error"] == "Internal Server Error"
    worker.wait_for_log("a response header is not Latin-1 text")
    worker.wait_for_log(r"GET /euro 500 ")
    autoscaler.wait_for(lambda r: r["num_requests_recieved"] == 1 and r["num_requests_working"] == 0)
    assert sum(record["cur_perf"] for record in autoscaler.records()) == 0.0  # not counted as served


@pytest.mark.slow
def test_trickling_connections_at_the_cap_do_not_lock_out_a_fresh_client(start_worker):
    """More connections than the cap, each sending its head or its body at 1 byte/s and coming
    back when closed (an attacker's loop); a fresh client must still be answered, within 1 s."""
    worker = start_worker("helloworld", "--max-connections", "64", "--log-level", "error")
    stop, connected = threading.Event(), []
    starts = [b"GET /value HTTP/1.1\r\nHost: x\r\nX-Slow: ",
              b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"]

    def trickle(index):
        sock = None
        while not stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", worker.port), timeout=2)
                    sock.sendall(starts[index % 2])
                    connected.append(index)
                sock.sendall(b"1")
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
                continue
            stop.wait(1.0)
        if sock is not None:
            sock.close()

    attackers = [threading.Thread(target=trickle, args=(index,)) for index in range(96)]
    for thread in attackers:
        thread.start()
    try:
        wait_until(lambda: len(set(connected)) == 96)
        answered, tries, deadline = 0, 0, time.monotonic() + 4
        while time.monotonic() < deadline:
            tries += 1
            try:
                connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=1)
                connection.request("GET", "/value")
                answered += connection.getresponse().status == 200
                connection.close()
            except OSError:
                pass
            stop.wait(0.1)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(10)
    print("fresh clients answered within 1 s among 96 tricklers at a cap of 64: %d of %d" % (answered, tries))
    assert answered >= 0.9 * tries
    assert worker.proc.poll() is None


def test_a_body_of_one_byte_chunks_costs_about_its_decoded_size(start_worker):
    worker = start_worker("helloworld", "--log-level", "warning")
    assert worker.request("POST", "/increment", {"amount": 1})[0] == 200
    before = rss_kb(worker.proc.pid, "VmHWM")
    body = b'{"amount": 1, "pad": "' + b"x" * 400000 + b'"}'
    chunks = b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"  # 2.4 MB on the wire
    raw = worker.raw(b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks, timeout=60)
    assert status_of(raw) == 200
    grown = (rss_kb(worker.proc.pid, "VmHWM") - before) / 1024
    print("a 0.4 MB body in one-byte chunks raised the worker's peak memory by %.1f MB" % grown)
    assert grown < 4 and worker.value() == 2


def test_bodies_in_memory_have_a_worker_wide_budget(start_worker):
    worker = start_worker("helloworld", "--max-body", "1M", "--body-memory", "2M")
    body = b'{"amount": 1, "pad": "' + b"x" * (1000000 - 26) + b'"}'
    head = (b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body))
    holders = [socket.create_connection(("127.0.0.1", worker.port), timeout=10) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(head)
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # its 1 MB is set aside
        refused = worker.raw(head)
        assert status_of(refused) == 503 and b"Retry-After: 1" in refused and b"100 Continue" not in refused
        assert "request bodies" in json.loads(body_of(refused))["detail"]
        for sock in holders:
            sock.sendall(body)
            assert status_of(read_until_close(sock)) == 200
    finally:
        for sock in holders:
            sock.close()
    assert worker.request("POST", "/increment", body, JSON)[0] == 200  # given back once answered
    assert worker.value() == 3
    code, output = run_cli("helloworld", "--port", "0", "--max-body", "64M", "--body-memory", "16M")
    assert code == 1 and "--max-body" in output and "--body-memory" in output


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET Xvalue HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # served as /value before
    (b"GET http:///value HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /value HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET /value HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET /val\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # not printable ASCII
    (b"GET /value HTTP/1.1\r\nHost: x\r\nX-A: a\x0bb\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n d\r\n{\"amount\": 1}\r\n0\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\x0cd\r\n{\"amount\": 1}\r\n0\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nd\n{\"amount\": 1}\r\n0\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\n \r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\nno colon\r\n\r\n", 400),
    (b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 4301 + b"\r\n\r\n", 400),
], ids=["no-slash", "empty-authority", "no-host", "two-hosts", "raw-utf8", "vt-in-value", "vt-coding",
        "space-before-size", "ff-before-size", "bare-lf-size", "space-ends-trailers", "bad-trailer",
        "4301-digit-length"])
def test_lenient_parsing_that_could_change_what_runs_is_refused(hello, request_bytes, status):
    raw = hello.raw(request_bytes)
    assert status_of(raw) == status, raw[:300]
    assert b"Connection: close" in raw and json.loads(body_of(raw))["detail"]
    assert hello.value() == 0
    assert "Traceback" not in hello.log


def test_options_asterisk_and_a_chunked_http10_request(hello):
    raw = hello.raw(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 200 and b"Allow: DELETE, GET, HEAD, OPTIONS, POST, PUT" in raw
    with socket.create_connection(("127.0.0.1", hello.port), timeout=5) as sock:  # RFC 9112 6.1
        sock.sendall(b"POST /increment HTTP/1.0\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\n\r\n")
        raw = read_until_close(sock)  # answered, then closed: its framing is not to be trusted
    assert status_of(raw) == 200 and b"Connection: close" in raw


def test_control_characters_from_a_request_are_escaped_in_the_log(start_worker):
    worker = start_worker("helloworld")
    worker.raw(b"GET /value%1b[31m%0aFAKE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    worker.raw(b"GET /\x1b[2J HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    worker.wait_for_log(r"GET /value%1b\[31m%0aFAKE 404")
    worker.wait_for_log(r"\\x1b\[2J")
    assert "\x1b" not in worker.log and "\nFAKE" not in worker.log


# ------------------------------------------------------------------------------------------------
# 3. Flask shim: the request, return values, strict JSON, streaming -- checked against Flask itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, detail", [
    (b'{"a": NaN}', "non-finite number NaN"),
    (b'{"a": -Infinity}', "non-finite number -Infinity"),
    (b'{"a": 1e400}', "too large"),
    (b'"\xff"', "not valid UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b"null", "null"),
    (b"  ", "empty"),
    (b'{"a": 1} x', "invalid JSON"),
])
def test_strict_json_refuses_what_json_cannot_hold(body, detail):
    with pytest.raises(vastworker.Refusal) as caught:
        vastworker.parse_request_json(body)
    assert caught.value.code == 400 and detail in caught.value.detail


def test_strict_json_gives_dicts_whose_missing_fields_are_the_clients_fault():
    value = vastworker.parse_request_json(b'{"a": 1.5, "b": [1, {"c": null}]}')
    assert value == {"a": 1.5, "b": [1, {"c": None}]} and isinstance(value, dict)
    with pytest.raises(KeyError) as caught:  # a handler's own `except KeyError` still works
        value["missing"]
    assert isinstance(caught.value, vastworker.Refusal)
    assert (caught.value.code, caught.value.detail) == (400, "missing JSON field 'missing'")
    array = vastworker.parse_request_json(b"[1, 2]")
    assert array == [1, 2] and array[1] == 2
    for encoding in ("utf-8-sig", "utf-16", "utf-32", "utf-16-le", "utf-16-be", "utf-32-le"):  # as json.loads
        assert vastworker.parse_request_json('{"caf\u00e9": 1}'.encode(encoding)) == {"caf\u00e9": 1}
    with pytest.raises(vastworker.Refusal):
        array["amount"]


def test_return_values_convert_as_in_flask():
    def converted(value):
        response = vastworker.to_response(value)
        return response.status_code, response.headers.get("Content-Type"), response.body

    html = "text/html; charset=utf-8"
    assert converted("x") == (200, html, b"x")
    assert converted(b"\x89PNG") == (200, html, b"\x89PNG")
    assert converted({"b": 1, "a": [2]}) == (200, "application/json", b'{"a":[2],"b":1}\n')
    assert converted(("Created", 201)) == (201, html, b"Created")
    assert converted(({"ok": True}, 202, [("X-A", "1")]))[0] == 202
    assert vastworker.to_response(("x", {"X-A": "1"})).headers["X-A"] == "1"
    custom = vastworker.to_response(("x", "299 CUSTOM"))
    assert (custom.status_code, custom.phrase) == (299, "CUSTOM")
    response = vastworker.Response("r", 203)
    assert vastworker.to_response(response) is response
    stream = iter(["a", "b"])
    assert vastworker.to_response(stream).chunks is stream
    circular = []
    circular.append(circular)
    for bad in (None, 5, ("x",), (("a", 1), 200), {"v": float("nan")}, {1}, circular):
        with pytest.raises(vastworker.BadReturnValue):
            vastworker.to_response(bad)
    # the plain results are built without the constructor, and are the response it makes
    for value, made in (("x", vastworker.Response("x")), (b"\x00", vastworker.Response(b"\x00")),
                        ([1], vastworker.Response('[1]\n', mimetype="application/json"))):
        response = vastworker.to_response(value)
        assert type(response) is vastworker.Response
        assert (response.status, response.headers.items(), response.body, response.chunks) == (
            made.status, made.headers.items(), made.body, made.chunks)
    first, second = vastworker.to_response("a"), vastworker.to_response("a")
    first.headers["X-A"] = "1"
    first.status = 201
    assert "X-A" not in second.headers and second.status_code == 200 and first.status == "201 Created"


def test_request_headers_are_found_by_name_before_and_after_a_change():
    headers = vastworker.Headers.received([("host", "x"), ("X-A", "1"), ("x-a", "2"), ("Cookie", "a=1")])
    assert headers.get("X-a") == "1, 2" and headers["HOST"] == "x" and "cookie" in headers
    assert headers.get("Missing") is None and headers.get("X-A", type=int) is None
    headers.remove("host")
    assert headers.get("Host") is None and "host" not in headers and headers.get("x-a") == "1, 2"
    headers["X-B"] = "3"
    assert headers.get("x-b") == "3" and "X-B" in headers
    assert headers.items() == [("X-A", "1, 2"), ("Cookie", "a=1"), ("X-B", "3")]


SURFACE_BACKEND = """
import dataclasses, datetime, decimal, uuid
import flask
from flask import abort, Response, request as current_request, jsonify, make_response, stream_with_context

class Backend:
    def __init__(self):
        self.count = 0

def echo(backend, request):
    text = request.get_data(as_text=True)  # before form: Flask empties the body once form is parsed
    return {
        "method": request.method, "path": request.path, "full_path": request.full_path,
        "url": request.url, "base_url": request.base_url, "host": request.host,
        "host_url": request.host_url, "query_string": request.query_string.decode(),
        "args": request.args.to_dict(flat=False), "n_int": request.args.get("n", type=int),
        "n_ints": request.args.getlist("n", type=int), "absent": request.args.get("absent"),
        "bad_int": request.args.get("bad", 7, type=int), "args_len": len(request.args),
        "form": request.form.to_dict(flat=False), "values": request.values.to_dict(flat=False),
        "content_type": request.content_type, "mimetype": request.mimetype,
        "mimetype_params": request.mimetype_params, "is_json": request.is_json,
        "content_length": request.content_length, "data": request.data.decode("latin-1"),
        "text": text, "cookies": request.cookies.to_dict(),
        "custom": request.headers.get("X-Custom"), "custom_lower": request.headers.get("x-custom"),
        "header_default": request.headers.get("X-Absent", "dflt"),
        "header_int": request.headers.get("X-Number", type=int),
        "header_in": "x-custom" in request.headers, "underscore": request.headers.get("X-Under_Score"),
        "header_names": sorted(name for name, value in request.headers
                               if name.startswith("X-")),
        "json_silent": request.get_json(silent=True),
        "json_force": request.get_json(force=True, silent=True),
        "remote_addr": request.remote_addr, "proxy_path": current_request.path,
        "proxy_json_silent": current_request.get_json(silent=True),
    }

def json_endpoint(backend, request):
    data = request.json
    return {"is_dict": isinstance(data, dict), "is_list": isinstance(data, list), "json": data}

def gen():
    yield b"data:1"
    yield ""
    yield "\\n"
    yield b""
    yield "caf\\u00e9"

def boom():
    raise ValueError("boom")

@dataclasses.dataclass
class Point:
    x: int
    y: str

RETURNS = {
    "str": lambda: "Incremented", "empty": lambda: "", "unicode": lambda: "caf\\u00e9",
    "bytes": lambda: b"\\x89PNG\\r\\n", "bytearray": lambda: bytearray(b"ab"),
    "dict": lambda: {"value": 3, "b": 1, "a": [1, 2.5, None, True], "u": "\\u00e9"},
    "emptydict": lambda: {}, "emptylist": lambda: [],
    "list": lambda: [1, "two", {"three": 3}], "intkeys": lambda: {1: "a", 2: "b"},
    "mixedkeys": lambda: {1: "a", "b": 2}, "created": lambda: ("Created", 201),
    "dict202": lambda: ({"ok": True}, 202), "status_str": lambda: ("x", "299 CUSTOM"),
    "status_404_str": lambda: ("x", "404"),
    "headers_dict": lambda: ("x", {"X-A": "1", "Content-Type": "text/plain"}),
    "headers_list": lambda: ("x", [("X-A", "1"), ("X-A", "2")]),
    "tuple3": lambda: ("x", 201, {"X-A": "1"}), "response_tuple": lambda: (Response("r"), 203),
    "response_headers": lambda: (Response("r"), {"X-B": "2"}),
    "bad_tuple": lambda: ("x",), "long_tuple": lambda: ("x", 200, {}, 1), "none_tuple": lambda: (None, 200),
    "response": lambda: Response("x"), "r204": lambda: Response(status=204),
    "png": lambda: Response(b"..", mimetype="image/png"),
    "ctype": lambda: Response("x", content_type="text/plain"),
    "xml": lambda: Response("<a/>", mimetype="application/xml"),
    "sequence": lambda: Response(["a", b"b"]),
    "sse": lambda: Response(gen(), mimetype="text/event-stream"),
    "stream_response": lambda: Response(stream_with_context(gen())),
    "jsonify": lambda: jsonify({"b": 1, "a": 2}), "jsonify_kw": lambda: jsonify(b=1, a=2),
    "jsonify_args": lambda: jsonify(1, 2, 3), "jsonify_none": lambda: jsonify(),
    "jsonify_201": lambda: (jsonify(x=1), 201), "make_response": lambda: make_response("x", 201),
    "make_response_dict": lambda: make_response({"a": 1}),
    "gen": gen, "iter": lambda: iter(["a", "b"]),
    "none": lambda: None, "int": lambda: 200, "float": lambda: 1.5, "bool": lambda: True,
    "set": lambda: {1}, "set_in_dict": lambda: {"s": {1, 2}},
    "rich": lambda: {"dt": datetime.datetime(2024, 1, 2, 3, 4, 5), "d": datetime.date(2024, 1, 2),
                     "dec": decimal.Decimal("1.10"), "u": uuid.UUID(int=1), "dc": Point(1, "z")},
    "abort400": lambda: abort(400), "abort404": lambda: abort(404), "abort503": lambda: abort(503),
    "abort_desc": lambda: abort(400, "amount missing"),
    "abort_response": lambda: abort(Response("nope", 418)),
    "abort_jsonify": lambda: abort(jsonify(error="x")),
    "abort401_response": lambda: abort(401, response=Response("custom 401 body", 401)),
    "abort201": lambda: abort(201), "abort_none": lambda: abort(None), "abort_str": lambda: abort("404"),
    "raise": boom,
    "args_missing": lambda: flask.request.args["missing"],
    "form_missing": lambda: flask.request.form["missing"],
    "header_missing": lambda: flask.request.headers["X-Missing"],
    # where we are stricter than Flask, on purpose
    "nan": lambda: {"value": float("nan")}, "abort520": lambda: abort(520),
    "abort499": lambda: abort(499), "json_missing": lambda: flask.request.json["missing"],
}

def returns(backend, request):
    return RETURNS[request.args["kind"]]()

def increment(backend, request):
    backend.count += request.json["amount"]
    return "Incremented"

def value(backend, request):
    return {"value": backend.count}

flask_dict = {
    "GET": {"echo": echo, "returns": returns, "value": value, "json": json_endpoint},
    "POST": {"echo": echo, "returns": returns, "increment": increment, "json": json_endpoint},
    "PUT": {"echo": echo}, "DELETE": {"echo": echo},
}
"""


# Requests as (method, path, headers, body), each answered the same by Flask and by us.
SURFACE_REQUESTS = [
    ("GET", "/echo?n=1&n=2&bad=x&s=a%20b&p=a+b%2Bc&e=&k", {"X-Custom": "hello", "X-Number": "42"}, None),
    ("GET", "/echo", {"X-Custom": "a"}, None),
    ("POST", "/echo?n=x&n=2", {"Content-Type": "application/json"}, b'{"amount": 5, "nested": {"a": [1, 2]}}'),
    ("POST", "/echo", {"Content-Type": "application/json; charset=utf-8"}, b'{"a": 1}'),
    ("POST", "/echo", {"Content-Type": "APPLICATION/JSON"}, b'[1, 2]'),
    ("POST", "/echo", {"Content-Type": "application/problem+json"}, b'"s"'),
    ("POST", "/echo", {"Content-Type": "application/jsonx"}, b'{"a": 1}'),
    ("POST", "/echo", {"Content-Type": "text/plain"}, b'{"amount": 5}'),
    ("POST", "/echo", {}, b'{"amount": 5}'),
    ("POST", "/echo?q=1", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=1&a=2&b=x+y%21"),
    ("POST", "/echo", {"Content-Type": "multipart/form-data; boundary=XyZ"},
     b'--XyZ\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue one\r\n--XyZ\r\n'
     b'Content-Disposition: form-data; name="up"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'
     b'file body\r\n--XyZ--\r\n'),
    ("POST", "/echo", {"Content-Type": "multipart/form-data"}, b"no boundary"),
    ("POST", "/echo", {"Content-Type": "application/json"}, b"caf\xe9 \xff"),
    ("PUT", "/echo", {"Content-Type": "text/plain"}, b"put body"),
    ("DELETE", "/echo", {}, None),
    ("POST", "/json", {"Content-Type": "application/json"}, b'{"a": 1, "a": 2}'),
    ("POST", "/json", {"Content-Type": "application/json"}, b'  [1, {"b": null}]  '),
    ("POST", "/json", {"Content-Type": "application/json"}, b'5'),
    ("POST", "/json", {"Content-Type": "application/json"}, b'{"a": 1} x'),
    ("POST", "/json", {"Content-Type": "application/json"}, b'{"amount": '),
    ("POST", "/json", {"Content-Type": "application/json"}, b''),
    ("POST", "/json", {"Content-Type": "application/json"}, "\ufeff{\"a\": 1}".encode("utf-8")),
    ("POST", "/json", {"Content-Type": "application/json"}, '{"a": "\u00e9"}'.encode("utf-16-le")),
    ("POST", "/json", {"Content-Type": "application/json"}, b'{"a": "\xff"}'),
    ("POST", "/json", {"Content-Type": "text/plain"}, b'{"a": 1}'),
    ("GET", "/json", {}, None),
    ("GET", "/json", {"Content-Type": "application/json"}, b'{"a": 1}'),
    ("POST", "/json", {"Content-Type": "application/json"}, b"1" * 5000),
    ("POST", "/increment", {"Content-Type": "application/json"}, b'{"amount": 5}'),
    ("POST", "/increment", {"Content-Type": "application/json"}, b'{"amount": true}'),
    ("POST", "/increment", {"Content-Type": "application/json"}, b'{"amount": "5"}'),
    ("POST", "/increment", {"Content-Type": "application/json"}, b'{"amount": null}'),
    ("POST", "/increment", {"Content-Type": "text/plain"}, b'{"amount": 5}'),
    ("GET", "/value", {}, None),
    ("GET", "/increment", {}, None),
    ("GET", "/nothing", {}, None),
] + [("GET", "/returns?kind=" + kind, {}, None) for kind in (
    "str empty unicode bytes bytearray dict emptydict emptylist list intkeys mixedkeys created dict202 "
    "status_str status_404_str headers_dict headers_list tuple3 response_tuple response_headers bad_tuple "
    "long_tuple none_tuple response r204 png ctype xml sequence sse stream_response jsonify jsonify_kw "
    "jsonify_args jsonify_none jsonify_201 make_response make_response_dict gen iter none int float bool "
    "set set_in_dict rich abort400 abort404 abort503 abort_desc abort_response abort_jsonify "
    "abort401_response abort201 abort_none abort_str raise args_missing form_missing header_missing").split()]


# Where we are stricter than Flask, on purpose: (path, JSON body) -> (Flask's status, ours)
STRICTER = {
    ("/returns?kind=nan", b"{}"): (200, 500),  # Flask sends invalid JSON: {"value":NaN}
    ("/returns?kind=abort520", b"{}"): (500, 520),  # any 400-599 code passes through
    ("/returns?kind=abort499", b"{}"): (500, 499),
    ("/returns?kind=json_missing", b"{}"): (500, 400),  # a missing field is the client's fault
    ("/increment", b'{"amount": NaN}'): (200, 400),  # strict JSON in
    ("/increment", b'{"amount": 1e400}'): (200, 400),
    ("/increment", b'[1]'): (500, 400),  # an array where an object is expected
    ("/increment", b'null'): (500, 400),
    ("/increment", b'{}'): (500, 400),  # a missing field
}


def difference(expected, ours):
    """The two answers, reduced to their differing keys when both are JSON objects."""
    try:
        left, right = json.loads(expected[2]), json.loads(ours[2])
        keys = [key for key in set(left) | set(right) if left.get(key, "<absent>") != right.get(key, "<absent>")]
        return (expected[:2] + ({key: left.get(key, "<absent>") for key in keys},),
                ours[:2] + ({key: right.get(key, "<absent>") for key in keys},))
    except (ValueError, TypeError, AttributeError):
        return expected, ours


def our_answer(worker, method, path, headers, body):
    status, response_headers, data = worker.request(method, path, body, dict(headers, Host="example.test"))
    return status, response_headers.get("Content-Type"), data, response_headers


@pytest.fixture(scope="module")
def surface_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("surface")
    (directory / "backend.py").write_text(SURFACE_BACKEND)
    return str(directory)


@pytest.fixture(scope="module")
def surface(surface_dir):
    worker = WorkerProcess(surface_dir).wait_ready()
    yield worker
    worker.stop()


@pytest.mark.slow
def test_surface_answers_like_flask(surface, surface_dir):
    """Each request is answered by Flask 3.1 (the original's host, ten lines below) and by us:
    same status, content type and body; error bodies differ on purpose."""
    flask = pytest.importorskip("flask")
    spec = importlib.util.spec_from_file_location("surface_backend_under_flask",
                                                  os.path.join(surface_dir, "backend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = module.Backend()
    app = flask.Flask("reference")

    @app.route("/<path:endpoint>", methods=["GET", "POST", "PUT", "DELETE"])
    def handler(endpoint):
        if endpoint not in module.flask_dict.get(flask.request.method, {}):
            flask.abort(404)
        return module.flask_dict[flask.request.method][endpoint](backend, flask.request)

    client = app.test_client()
    mismatches = []
    for method, path, headers, body in SURFACE_REQUESTS:
        reference = client.open(path, method=method, headers=headers, data=body,
                                base_url="http://example.test")
        expected = (reference.status_code, reference.headers.get("Content-Type"), reference.data)
        ours = our_answer(surface, method, path, headers, body)[:3]
        if expected[0] >= 400 and expected[2].startswith(b"<!doctype html>"):
            same = ours[0] == expected[0] and ours[1] == "application/json"  # error pages differ
        else:
            same = ours == expected
        if not same:
            mismatches.append("%s %s %r\n  flask: %s\n  ours:  %s" % ((method, path, body) + difference(expected, ours)))
    assert not mismatches, "\n".join(mismatches)
    for (path, body), (flask_status, our_status) in STRICTER.items():
        assert client.post(path, headers=JSON, data=body).status_code == flask_status, path
        assert our_answer(surface, "POST", path, JSON, body)[0] == our_status, path


def test_surface_details_on_the_wire(surface):
    """What the differential test cannot see through Flask's test client."""
    conn = surface.connect()
    conn.request("GET", "/returns?kind=headers_list")
    response = conn.getresponse()
    assert [v for k, v in response.getheaders() if k == "X-A"] == ["1", "2"]
    conn.close()
    raw = surface.raw(b"GET /returns?kind=status_str HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 299 CUSTOM\r\n")
    raw = surface.raw(b"GET /returns?kind=r204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 204 No Content\r\n") and b"Content-Length" not in raw
    assert raw.endswith(b"\r\n\r\n")
    # errors are short JSON in our own words
    assert json.loads(our_answer(surface, "GET", "/returns?kind=abort_desc", {}, None)[2]) == {
        "error": "Bad Request", "detail": "amount missing"}
    assert json.loads(our_answer(surface, "GET", "/returns?kind=abort520", {}, None)[2])["error"] == "Unknown Error"
    assert json.loads(our_answer(surface, "POST", "/returns?kind=json_missing", JSON, b"{}")[2]) == {
        "error": "Bad Request", "detail": "missing JSON field 'missing'"}
    assert json.loads(our_answer(surface, "GET", "/returns?kind=args_missing", {}, None)[2]) == {
        "error": "Bad Request", "detail": "missing query parameter 'missing'"}
    for kind in ("raise", "nan", "none"):
        status, _, body, _ = our_answer(surface, "GET", "/returns?kind=" + kind, {}, None)
        assert status == 500 and b"boom" not in body and b"Traceback" not in body
    surface.wait_for_log("ValueError: boom")  # the log comes through a pipe: wait for it
    surface.wait_for_log(r"GET /returns: the handler returned None; return a str")
    surface.wait_for_log("could not be sent as JSON: Out of range float values")
    assert "Traceback" in surface.log
    # the request proxy and the handler's request are the same request; JSON bodies are dicts
    status, data = surface.json("POST", "/echo", {"x": 1})
    assert data["proxy_path"] == "/echo" and data["proxy_json_silent"] == {"x": 1}
    status, content_type, body, _ = our_answer(surface, "GET", "/echo", {"X-Custom": "a", "X-Custom-2": "b"}, None)
    assert json.loads(body)["header_names"] == ["X-Custom", "X-Custom-2"]


def test_repeated_request_headers_are_joined(surface):
    raw = surface.raw(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Custom: a\r\nX-Custom: b\r\n"
                      b"Cookie: sid=1\r\nCookie: theme=dark\r\nConnection: close\r\n\r\n")
    data = json.loads(body_of(raw))
    assert data["custom"] == "a, b"
    assert data["cookies"] == {"sid": "1", "theme": "dark"}


def test_streaming_on_the_wire(surface):
    raw = surface.raw(b"GET /returns?kind=gen HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert body == b"6\r\ndata:1\r\n1\r\n\n\r\n5\r\ncaf\xc3\xa9\r\n0\r\n\r\n"  # empty items skipped
    raw = surface.raw(b"GET /returns?kind=gen HTTP/1.0\r\nHost: x\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"data:1\ncaf\xc3\xa9"  # HTTP/1.0: close-delimited


def test_stream_failure_and_disconnect(start_worker, write_backend):
    backend = write_backend("""
        import threading, time
        closed = threading.Event()

        class Backend:
            pass

        def failing(backend, request):
            def generate():
                yield "first"
                raise RuntimeError("mid-stream failure")
            return generate()

        def endless(backend, request):
            def generate():
                try:
                    while True:
                        yield "x" * 65536
                        time.sleep(0.001)
                finally:
                    closed.set()
            return generate()

        def was_closed(backend, request):
            return {"closed": closed.wait(5)}

        flask_dict = {"GET": {"failing": failing, "endless": endless, "closed": was_closed}}
    """)
    worker = start_worker(backend)
    raw = worker.raw(b"GET /failing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.endswith(b"5\r\nfirst\r\n")  # cut off: no final 0-size chunk
    worker.wait_for_log("mid-stream failure")
    with socket.create_connection(("127.0.0.1", worker.port)) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100000)
    assert worker.json("GET", "/closed") == (200, {"closed": True})
    assert worker.request("GET", "/closed")[0] == 200


def test_streamed_body_is_sent_after_the_lock_is_released(start_worker, write_backend):
    backend = write_backend("""
        import threading
        release = threading.Event()

        class Backend:
            pass

        def slow_stream(backend, request):
            def generate():
                yield "start "
                release.wait(10)
                yield "end"
            return generate()

        def other(backend, request):
            release.set()
            return "other"

        flask_dict = {"GET": {"slow": slow_stream, "other": other}}
    """)
    worker = start_worker(backend, "--queue-time", "5")
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = worker.request("GET", "/other")  # served while the stream is pending
        assert (status, body) == (200, b"other")
        assert read_until_close(sock).endswith(b"6\r\nstart \r\n3\r\nend\r\n0\r\n\r\n")


@pytest.mark.parametrize("body, status, detail", [
    (b'{"amount": ', 400, "invalid JSON"),
    (b'', 400, "empty"),
    (b'{"amount": NaN}', 400, "non-finite number NaN"),
    (b'{"amount": Infinity}', 400, "non-finite number Infinity"),
    (b'{"amount": -Infinity}', 400, "non-finite number -Infinity"),
    (b'{"amount": 1e999}', 400, "too large"),
    (b'{"amount": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'[' * 200000 + b']' * 200000, 400, "nested too deeply"),
    (b'[1, 2]', 400, "got an array"),
    (b'null', 400, "null"),
    (b'{"other": 1}', 400, "missing JSON field 'amount'"),
    (b'{"amount": ' + b'9' * 5000 + b'}', 400, "invalid JSON"),
], ids=["truncated", "empty", "nan", "infinity", "-infinity", "1e999", "utf8", "deep", "list", "null",
        "missing", "5000-digits"])
def test_bad_json_is_a_clear_400(hello, body, status, detail):
    got, data = hello.json("POST", "/increment", body, JSON)
    assert got == status and detail in data["detail"], data
    assert hello.value() == 0


def test_string_amount_is_the_handlers_own_500_and_state_is_unchanged(hello):
    assert hello.request("POST", "/increment", {"amount": 2})[0] == 200
    status, data = hello.json("POST", "/increment", {"amount": "5"})
    assert status == 500 and data["error"] == "Internal Server Error"
    assert hello.value() == 2


def test_wrong_content_type_is_415(hello):
    status, data = hello.json("POST", "/increment", b'{"amount": 1}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in data["detail"]


def test_backend_gets_our_flask_and_the_same_vastworker(start_worker, write_backend):
    backend = write_backend("""
        import sys, flask, vastworker
        from flask import abort, Response, request, jsonify, make_response, stream_with_context

        class Backend:
            pass

        def modules(backend, request):
            return {"flask_is_ours": flask.abort is vastworker.abort,
                    "one_vastworker": vastworker is sys.modules["__main__"],
                    "werkzeug_loaded": "werkzeug" in sys.modules}

        flask_dict = {"GET": {"modules": modules}}
    """)
    worker = start_worker(backend)
    assert worker.json("GET", "/modules") == (200, {"flask_is_ours": True, "one_vastworker": True,
                                                    "werkzeug_loaded": False})


def test_missing_flask_name_fails_at_import_saying_so(write_backend):
    backend = write_backend("""
        from flask import Blueprint
    """)
    code, output = run_cli(backend)
    assert code == 1
    assert "flask.Blueprint is not provided by vastworker" in output
    assert len(output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# 4. Worker: dispatch, the lock, the state file, signed grants, readiness
# ------------------------------------------------------------------------------------------------

def test_the_queue_lock_hands_over_in_arrival_order_and_bounds_the_wait():
    lock = vastworker.QueueLock()
    assert lock.acquire(0)
    assert not lock.acquire(0.01)  # held: the wait ends, and the waiter is forgotten
    order = []

    def take(number):
        assert lock.acquire(10)
        order.append(number)
        lock.release()

    threads = []
    for number in range(5):
        threads.append(threading.Thread(target=take, args=(number,)))
        threads[-1].start()
        wait_until(lambda: len(lock._waiters) == number + 1, interval=0.001)  # queued, in this order
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert lock.acquire(0)  # the last one let go: free again


def test_metrics_keep_what_arrives_between_a_snapshot_and_its_acknowledgement():
    metrics = vastworker.Metrics()
    metrics.started(2.0)
    metrics.finished(2.0, 200)
    metrics.started(3.0)
    snapshot = metrics.snapshot()
    assert snapshot == {"cur_load": 3.0, "new_load": 5.0, "rej_load": 0.0, "cur_perf": 2.0,
                        "num_requests_working": 1, "num_requests_recieved": 2}
    assert not metrics.has_news
    metrics.finished(3.0, 503)  # while the report is on its way
    metrics.started(1.0)
    metrics.refused(1.0)
    assert metrics.has_news
    metrics.acknowledge(snapshot)
    assert metrics.snapshot() == {"cur_load": 1.0, "new_load": 1.0, "rej_load": 4.0, "cur_perf": 0.0,
                                  "num_requests_working": 1, "num_requests_recieved": 3}

def test_metrics_counted_while_requests_start_and_end_never_show_less_than_nothing_in_flight():
    metrics, seen = vastworker.Metrics(), []

    def requests():
        for status in (200, 429, 500) * 700:
            metrics.started(1.5)
            metrics.finished(1.5, status)

    def read():
        while not done.is_set() or not seen:
            snapshot = metrics.snapshot()
            seen.append((snapshot["cur_load"], snapshot["num_requests_working"], metrics.queued))
    done, reader = threading.Event(), threading.Thread(target=read)
    threads = [threading.Thread(target=requests) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, in the middle of counting too
    try:
        for thread in [reader] + threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        reader.join()
    finally:
        sys.setswitchinterval(interval)
    assert seen and all(load >= 0 and working >= 0 and queued >= 0 for load, working, queued in seen)
    assert metrics.snapshot() == {"cur_load": 0.0, "num_requests_working": 0, "num_requests_recieved": 8400,
                                  "new_load": 12600.0, "cur_perf": 4200.0, "rej_load": 4200.0}


def test_a_session_ending_never_shows_less_than_nothing_queued():
    """A session's end leaves the workload in flight and the sessions' share of it at once:
    between the two, admission saw -2 queued."""
    metrics, seen = vastworker.Metrics(), []

    def sessions():
        for reqnum in range(3000):
            metrics.started(2.0, {"reqnum": reqnum}, session=True)
            metrics.finished(2.0, 200, session=True)

    def read():
        while not done.is_set() or not seen:
            seen.append(metrics.queued)
    done, reader, opener = threading.Event(), threading.Thread(target=read), threading.Thread(target=sessions)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        reader.start()
        opener.start()
        opener.join()
        done.set()
        reader.join()
    finally:
        sys.setswitchinterval(interval)
    assert min(seen) == 0.0 and metrics.queued == 0.0 and metrics.in_flight == 0.0


def test_request_stats_count_each_answer_once_in_its_endpoint_bucket_and_wait():
    stats = vastworker.RequestStats(["value"])
    answers = [("GET", "/value", 200, 0.0004, 0.002), ("GET", "/value", 200, 0.02, None),
               ("GET", "/value", 429, 31.0, 30.0), ("GET", "/nothing", 404, 0.0001, None)] * 100
    for answer in answers:  # past 256: some are counted in before the scrape
        stats.answer(*answer)
    families = {name: samples for name, _, _, samples in stats.families()}
    assert families["vastworker_requests_total"] == [
        ({"endpoint": "(other)", "method": "GET", "code": "404"}, 100),
        ({"endpoint": "value", "method": "GET", "code": "200"}, 200),
        ({"endpoint": "value", "method": "GET", "code": "429"}, 100)]
    durations = dict((labels["endpoint"], counts) for labels, counts in families["vastworker_request_duration_seconds"])
    assert durations["value"][0] == 100 and durations["value"][3] == 100 and durations["value"][13] == 100
    assert sum(durations["value"][:-1]) == 300 and durations["value"][-1] == pytest.approx(100 * 31.0204)
    assert durations["(other)"][0] == 100 and sum(durations["(other)"][:-1]) == 100
    [(_, waits)] = families["vastworker_queue_wait_seconds"]
    assert waits[1] == 100 and waits[12] == 100 and sum(waits[:-1]) == 200 and waits[-1] == pytest.approx(100 * 30.002)


def test_the_ledger_follows_each_routed_request_to_its_end():
    ledger = vastworker.RequestLedger(limit=3)
    served, failed, cancelled, refused = (ledger.arrived({"request_idx": idx, "reqnum": idx}) for idx in (1, 2, 3, 4))
    assert sorted(ledger.working_idxs()) == [1, 2, 3, 4]
    for record in (served, failed):
        ledger.started(record)
    ledger.finished(served, 200)
    ledger.finished(failed, 500)
    ledger.finished(cancelled, 499)
    assert ledger.working_idxs() == [4]
    batch = ledger.batch()
    assert [(r["request_idx"], r["status"], r["success"]) for r in batch] == [
        (1, "Success", True), (2, "Error", False), (3, "Cancelled", True)]  # Cancelled: as Vast reports it
    assert served["entered_queue_at"] <= served["work_started_at"] <= served["work_completed_at"]
    assert cancelled["work_started_at"] == cancelled["work_completed_at"] == 0.0
    ledger.finished(refused, 429)  # while the batch is on its way
    ledger.delivered(batch)
    assert [(r["request_idx"], r["status"]) for r in ledger.batch()] == [(4, "Rejected")]
    for idx in range(5, 9):  # nobody takes them: the oldest go once 3 wait
        ledger.finished(ledger.arrived({"request_idx": idx}), 200)
    assert [r["request_idx"] for r in ledger.batch()] == [6, 7, 8]


def test_requests_received_counts_distinct_reqnums_and_each_ungranted_request():
    metrics = vastworker.Metrics()
    for grant in ({"reqnum": 5}, {"reqnum": 5}, {"reqnum": 6}, None, None):
        metrics.started(100.0, grant)
    metrics.refused(100.0, {"reqnum": 7}, received=True)  # refused by admission: received all the same
    assert metrics.snapshot()["num_requests_recieved"] == 5


class Attributes:
    """A stand-in Backend instance for the state store."""


def test_the_state_store_keeps_json_attributes_and_writes_only_changes(tmp_path):
    backend = Attributes()
    backend.count, backend.names, backend.lock, backend._private = 3, ["a"], threading.Lock(), 1
    path = tmp_path / "state.json"
    store = vastworker.StateStore(str(path))
    assert store.load() is None
    store.save_if_changed(backend)
    assert json.loads(path.read_text()) == {"state": {"count": 3, "names": ["a"]}}
    path.unlink()
    store.save_if_changed(backend)
    assert not path.exists()  # nothing changed: nothing written
    backend.count = 4
    store.save_if_changed(backend)
    only_count = vastworker.StateStore(str(tmp_path / "count.json"), names=["count"])
    only_count.save_if_changed(backend)
    assert json.loads((tmp_path / "count.json").read_text()) == {"state": {"count": 4}}
    restored = Attributes()
    again = vastworker.StateStore(str(path))
    again.restore(restored, again.load())
    assert (restored.count, restored.names) == (4, ["a"])


def test_the_state_store_undoes_and_refuses_a_change_it_cannot_write(tmp_path):
    directory = tmp_path / "gone"
    directory.mkdir()
    backend = Attributes()
    backend.count = 1
    store = vastworker.StateStore(str(directory / "state.json"))
    store.save_if_changed(backend)
    (directory / "state.json").unlink()
    directory.rmdir()
    backend.count = 2
    with pytest.raises(vastworker.Refusal) as caught:
        store.save_if_changed(backend)
    assert caught.value.code == 503 and ("Retry-After", "1") in caught.value.headers
    assert backend.count == 1


def test_the_state_store_undoes_and_refuses_a_value_json_cannot_hold(tmp_path):
    backend = Attributes()
    backend.count, backend.lock = 1.5, threading.Lock()
    store = vastworker.StateStore(str(tmp_path / "state.json"))
    store.restore(backend, {})
    backend.count, backend.total = float("inf"), 2
    with pytest.raises(vastworker.Refusal) as caught:
        store.save_if_changed(backend)
    assert caught.value.code == 422 and "'count'" in caught.value.detail
    assert backend.count == 1.5  # every saved attribute is put back as it was saved
    backend.total = float("nan")  # never saved before, but of a JSON type: state all the same
    with pytest.raises(vastworker.Refusal):
        store.save_if_changed(backend)


def test_the_state_store_never_replaces_a_file_it_cannot_read(tmp_path):
    path = tmp_path / "state.json"
    for text in ('{"state": {"count": 4', '{"count": 4}', '[]'):
        path.write_text(text)
        with pytest.raises(vastworker.StartupError, match="is not valid"):
            vastworker.StateStore(str(path)).load()
        assert path.read_text() == text


@pytest.fixture(scope="module")
def signer():
    """A stand-in autoscaler's key (1024 bits: quick to make in pure Python)."""
    return vastworker.RSAPrivateKey.generate(1024)


def test_the_signed_message_of_each_grant_shape():
    grant = {"cost": 100.0, "endpoint": "e", "reqnum": 5, "request_idx": 9, "url": "http://w:1"}
    assert vastworker.signed_message(grant, "g1") == (
        '{\n    "cost": 100.0,\n    "endpoint": "e",\n    "reqnum": 5,\n    "url": "http://w:1"\n}')
    assert vastworker.signed_message(grant, "g3") == (
        '{\n    "cost": 100.0,\n    "endpoint": "e",\n    "reqnum": 5,\n    "request_idx": 9,\n'
        '    "url": "http://w:1"\n}')
    assert vastworker.signed_message(grant, "g4") == '{\n    "url": "http://w:1"\n}'


@pytest.mark.parametrize("shape", ["g1", "g3", "g4"])
def test_the_grant_checker_verifies_each_shape_and_only_signed_fields_move_its_history(signer, shape):
    checker = vastworker.GrantChecker(signer, "auto")
    grant = {"cost": 100.0, "endpoint": "e", "reqnum": 5, "request_idx": 5, "url": "http://w:1"}
    grant["signature"] = signer.sign(vastworker.signed_message(grant, shape).encode())
    assert checker.verify(dict(grant, url="http://other:1")) == "the grant's signature does not verify"
    assert checker.verify(dict(grant)) is None
    assert vastworker.GrantChecker(signer, "g1" if shape != "g1" else "g3").verify(dict(grant)) == (
        "the grant's signature does not verify")  # a pinned shape accepts no other
    if shape == "g4":  # the url alone is signed: the same for every request, nothing to replay
        assert checker.verify(dict(grant)) is None
        assert checker.verify(dict(grant, reqnum=10 ** 18)) is None
        assert checker.history() is None
        return
    assert checker.verify(dict(grant)) == "the grant was already used"
    assert checker.history()["highest_reqnum"] == 5
    restarted = vastworker.GrantChecker(signer, "auto")
    restarted.restore_history(json.loads(json.dumps(checker.history())))
    assert restarted.verify(dict(grant)) == "the grant was already used"
    for bad in ({"recent": "x"}, {"recent": ["zz"]}, {"recent": [], "other": 1}, {"recent": [], "highest_reqnum": "1"}):
        with pytest.raises(ValueError):
            restarted.restore_history(bad)


def test_an_incomplete_grant_envelope_is_refused_naming_what_is_missing():
    def refusal_for(data):
        with pytest.raises(vastworker.Refusal) as caught:
            vastworker.GrantChecker.grant_of(data)
        return caught.value.code, caught.value.detail

    grant = {"signature": "s", "cost": 1, "endpoint": "e", "reqnum": 1, "url": "u"}
    assert refusal_for({"auth_data": "x", "payload": {}}) == (422, {"auth_data": "must be an object"})
    no_cost = {name: value for name, value in grant.items() if name != "cost"}
    assert refusal_for({"auth_data": no_cost, "payload": {}}) == (422, {"auth_data": {"cost": "missing parameter"}})
    assert refusal_for({"auth_data": grant}) == (422, {"payload": "field missing"})
    assert vastworker.GrantChecker.grant_of({"amount": 1}) == (None, None)
    flat, payload = vastworker.GrantChecker.grant_of(dict(grant, amount=1, __request_id="x"))
    assert flat == grant and payload == {"amount": 1, "__request_id": "x"}


def test_routing_rules(start_worker, write_backend):
    backend = write_backend("""
        class Backend:
            pass

        def name(backend, request):
            return {"path": request.path, "endpoint": request.view_args["endpoint"]}

        flask_dict = {"GET": {"value": name, "sdapi/v1/txt2img": name, "a b": name, "café": name},
                      "PUT": {"value": name}, "DELETE": {"value": name}}
    """)
    worker = start_worker(backend)
    assert worker.json("GET", "/value?x=1") == (200, {"path": "/value", "endpoint": "value"})
    assert worker.json("GET", "/sdapi/v1/txt2img")[0] == 200
    assert worker.json("GET", "/sdapi%2Fv1%2Ftxt2img")[0] == 200
    assert worker.json("GET", "/val%75e")[0] == 200
    assert worker.json("GET", "/a%20b")[0] == 200
    assert worker.json("GET", "/caf%C3%A9")[0] == 200
    assert worker.json("PUT", "/value")[0] == 200
    assert worker.json("DELETE", "/value")[0] == 200
    for path in ("/value/", "/VALUE", "/./value", "/x/../value", "/caf%E9", "/%zz", "/sdapi//v1/txt2img"):
        status, body = worker.json("GET", path)
        assert status == 404 and body["error"] == "Not Found", path
    assert worker.json("POST", "/value")[0] == 404  # registered for GET only: 404, not 405
    for method in ("GET", "POST", "OPTIONS", "PATCH"):
        assert worker.json(method, "/")[0] == 404
    assert status_of(worker.raw(b"GET //value HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200
    assert status_of(worker.raw(b"get /value HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200


def test_head_options_and_other_methods(hello):
    status, headers, body = hello.request("HEAD", "/value")
    assert status == 404 and body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = hello.request("OPTIONS", "/anything")
    assert (status, headers["Allow"], headers["Content-Length"], body) == (
        200, "DELETE, GET, HEAD, OPTIONS, POST, PUT", "0", b"")
    for method in ("PATCH", "TRACE", "FOO"):
        status, headers, body = hello.request(method, "/value")
        assert status == 405 and headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, POST, PUT"
        assert json.loads(body)["error"] == "Method Not Allowed"


def test_head_does_not_run_get_but_a_head_handler_runs(start_worker, write_backend):
    backend = write_backend("""
        class Backend:
            def __init__(self):
                self.calls = 0

        def value(backend, request):
            backend.calls += 1
            return {"calls": backend.calls}

        def head(backend, request):
            return "twelve bytes"

        flask_dict = {"GET": {"value": value, "probe": value}, "HEAD": {"probe": head}}
    """)
    worker = start_worker(backend)
    assert worker.request("HEAD", "/value")[0] == 404
    status, headers, body = worker.request("HEAD", "/probe")
    assert (status, headers["Content-Length"], body) == (200, "12", b"")
    assert worker.json("GET", "/value") == (200, {"calls": 1})


def hammer(worker, clients, requests, path="/increment", body=b'{"amount": 1}'):
    """`clients` threads, each sending `requests` POSTs on one keep-alive connection; statuses."""
    statuses = []
    lock = threading.Lock()

    def client():
        connection = worker.connect(timeout=30)
        mine = []
        for _ in range(requests):
            connection.request("POST", path, body=body, headers=JSON)
            response = connection.getresponse()
            response.read()
            mine.append(response.status)
        connection.close()
        with lock:
            statuses.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return statuses


def test_32_clients_100_increments_each_is_exact(hello):
    statuses = hammer(hello, 32, 100)
    assert statuses == [200] * 3200
    assert hello.value() == 3200


RACY_BACKEND = """
import threading, time
{parallel}

class Backend:
    def __init__(self):
        self.count = 0
        self.active = 0
        self.most_active = 0

def increment(backend, request):
    backend.active += 1
    backend.most_active = max(backend.most_active, backend.active)
    count = backend.count
    time.sleep(0.002)  # a read-modify-write with a window: unsafe without the lock
    backend.count = count + 1
    backend.active -= 1
    return "ok"

def value(backend, request):
    return {{"value": backend.count, "most_active": backend.most_active}}

flask_dict = {{"POST": {{"increment": increment}}, "GET": {{"value": value}}}}
"""


def test_lock_serialises_handlers_and_opting_out_runs_them_in_parallel(start_worker, write_backend):
    locked = start_worker(write_backend(RACY_BACKEND.format(parallel="")))
    assert hammer(locked, 8, 10) == [200] * 80
    assert locked.json("GET", "/value") == (200, {"value": 80, "most_active": 1})
    parallel = start_worker(write_backend(RACY_BACKEND.format(parallel="allow_parallel_requests = True")))
    assert "handlers run in parallel" in parallel.log
    assert hammer(parallel, 8, 10) == [200] * 80
    status, data = parallel.json("GET", "/value")
    assert data["most_active"] > 1 and data["value"] < 80  # what the lock prevents


def test_waiting_for_the_lock_is_bounded(start_worker, hold):
    held = hold()
    worker = start_worker(held.backend, "--queue-time", "0.3", env=held.env)
    first = threading.Thread(target=worker.request, args=("GET", "/hold"))
    first.start()
    held.wait_started()  # it has the lock
    status, headers, body = worker.request("GET", "/fast")
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"] == "Too Many Requests"
    held.release()
    first.join()
    assert worker.request("GET", "/fast")[0] == 200

def test_a_request_whose_client_left_while_it_waited_never_runs(start_worker, hold):
    held = hold()
    worker = start_worker(held.backend, env=held.env)
    holder = threading.Thread(target=worker.request, args=("GET", "/hold"))
    holder.start()
    held.wait_started()  # it has the lock; the next request waits for it
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        sock.sendall(b"GET /work?n=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    worker.wait_for_log(r"GET /work\?n=1 499 0 .*cancelled: the client left")  # noticed while waiting
    held.release()
    holder.join(10)
    assert worker.json("GET", "/runs") == (200, {"runs": []})  # it never ran


def test_a_client_that_half_closes_after_sending_is_still_answered(start_worker, hold):
    held = hold()
    worker = start_worker(held.backend, env=held.env)
    holder = threading.Thread(target=worker.request, args=("GET", "/hold"))
    holder.start()
    held.wait_started()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        sock.sendall(b"GET /work?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # all sent; still reading
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # the probe: still here?
        held.release()
        raw = read_until_close(sock)
    holder.join(10)
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"ran 2")
    assert worker.json("GET", "/runs") == (200, {"runs": ["2"]})


def test_a_running_handler_can_see_that_its_client_left(start_worker, hold):
    held = hold()
    worker = start_worker(held.backend, env=held.env)
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        sock.sendall(b"GET /notice HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: (held.directory / "noticed").exists())  # request.is_disconnected() said so
    assert worker.request("GET", "/fast")[0] == 200

@pytest.mark.parametrize("settings", ["max_perf = 25", "max_perf = 25\nallow_parallel_requests = True"],
                         ids=["serialised", "parallel"])
def test_a_request_that_would_wait_too_long_is_refused_at_once(start_worker, hold, autoscaler, settings):
    held = hold(settings=settings)  # 4 s a request, at the default workload of 100
    worker = start_worker(held.backend, "--queue-time", "5", env=dict(reporting_env(autoscaler), **held.env))
    first = threading.Thread(target=worker.request, args=("GET", "/hold"))
    first.start()
    held.wait_started()
    second = threading.Thread(target=worker.request, args=("GET", "/hold"))  # 4 s of work ahead: taken
    second.start()
    autoscaler.wait_for(lambda r: r["num_requests_working"] == 2)  # (it may wait 5 s for the lock)
    started = time.monotonic()
    status, headers, body = worker.request("GET", "/fast")  # 8 s ahead, over the 5 s limit
    assert status == 429 and headers["Retry-After"] == "1", (status, body, worker.log)
    assert "would take 8.0 s, more than the 5 s" in json.loads(body)["detail"], (body, worker.log)
    assert time.monotonic() - started < 1  # refused at once, not after waiting for the lock
    held.release()
    first.join(10)
    second.join(10)
    assert worker.request("GET", "/fast")[0] == 200
    autoscaler.wait_for(lambda r: r["rej_load"] == 100.0)


def test_a_request_counts_its_workload_its_grants_cost_or_the_sdks_default():
    app = vastworker.BackendApp(None, {}, vastworker.WorkerState(), vastworker.Metrics(),
                                vastworker.CurrentRequest())

    class Granted:
        method, path = "POST", "/generate"

        def __init__(self, auth):
            self.auth = auth

    assert app.workload_of(Granted({"cost": 242.0})) == 242.0
    assert app.workload_of(Granted(None)) == 100.0
    assert app.workload_of(Granted({"cost": "lots"})) == app.workload_of(Granted({"cost": -1})) == 100.0
    app.workload = lambda backend, request: 7
    assert app.workload_of(Granted({"cost": 242.0})) == 7.0  # the backend's own count comes first


def test_handler_exceptions_leave_worker_and_lock_healthy(start_worker, write_backend):
    backend = write_backend("""
        class Backend:
            def __init__(self):
                self.count = 0

        def fail(backend, request):
            raise KeyError("internal")

        def leave(backend, request):
            raise SystemExit(3)

        def count(backend, request):
            backend.count += 1
            return {"count": backend.count}

        flask_dict = {"GET": {"fail": fail, "exit": leave, "count": count}}
    """)
    worker = start_worker(backend)
    for path in ("/fail", "/exit", "/fail"):
        status, data = worker.json("GET", path)
        assert status == 500 and data["error"] == "Internal Server Error"
        assert "internal" not in json.dumps(data)
    assert worker.json("GET", "/count") == (200, {"count": 1})
    worker.wait_for_log("GET /fail: the handler raised KeyError")
    assert "Traceback" in worker.log
    assert worker.proc.poll() is None


def test_kill_9_loses_no_acknowledged_increment(start_worker, tmp_path):
    state = str(tmp_path / "state.json")
    port = str(free_port())
    worker = start_worker("helloworld", "--state-file", state, port=port)
    stop, outcome = threading.Event(), []
    client = threading.Thread(target=increment_until_stopped, args=(int(port), stop, outcome))
    client.start()
    time.sleep(1.0)
    worker.proc.kill()  # SIGKILL: no chance to flush anything
    worker.proc.wait()
    stop.set()
    client.join(20)
    acknowledged = dict(outcome)["acknowledged"]
    assert acknowledged > 10
    restarted = start_worker("helloworld", "--state-file", state, port=port)
    assert "state restored from %s" % state in restarted.log
    value = restarted.value()
    # every acknowledged increment is there; at most the one in flight when the worker died was
    # saved without its answer arriving
    assert acknowledged <= value <= acknowledged + 1, (acknowledged, value)
    print("kill -9 after %d acknowledged increments: %d restored" % (acknowledged, value))


def test_state_file_holds_json_attributes_or_those_named_in_persist(start_worker, write_backend, tmp_path):
    source = """
        import threading
        {persist}

        class Backend:
            def __init__(self):
                self.count = 0
                self.names = []
                self.lock = threading.Lock()  # not JSON: never saved
                self._private = 1

        def add(backend, request):
            backend.count += 1
            backend.names.append(request.json["name"])
            return {{"count": backend.count, "names": backend.names}}

        flask_dict = {{"POST": {{"add": add}}}}
    """
    for persist, expected in (("", {"count": 1, "names": ["a"]}), ("persist = ['count']", {"count": 1})):
        backend = write_backend(source.format(persist=persist))
        state = tmp_path / ("state%d.json" % len(persist))
        worker = start_worker(backend, "--state-file", str(state))
        assert worker.json("POST", "/add", {"name": "a"})[0] == 200
        assert json.loads(state.read_text()) == {"state": expected}
        worker.stop()
        again = start_worker(backend, "--state-file", str(state))
        status, data = again.json("POST", "/add", {"name": "b"})
        assert data["count"] == 2 and data["names"] == (["a", "b"] if not persist else ["b"])


def test_a_corrupt_state_file_stops_the_worker_and_is_kept(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"state": {"count": 4')
    code, output = run_cli("helloworld", "--port", "0", "--state-file", str(state))
    assert code == 1
    assert "the state file %s is not valid" % state in output and "never replaced unread" in output
    assert state.read_text() == '{"state": {"count": 4'


def test_a_state_that_cannot_be_saved_is_not_applied(start_worker, tmp_path):
    directory = tmp_path / "gone"
    directory.mkdir()
    worker = start_worker("helloworld", "--state-file", str(directory / "state.json"))
    assert worker.request("POST", "/increment", {"amount": 2})[0] == 200
    (directory / "state.json").unlink()
    directory.rmdir()  # now the state cannot be written
    status, data = worker.json("POST", "/increment", {"amount": 5})
    assert status == 503 and "could not be saved" in data["detail"]
    assert worker.value() == 2  # the change was undone, not left half-applied
    worker.wait_for_log("could not write the state file")


def message_of(grant, shape):
    """The signed text, written out here independently of vastworker's own code."""
    if shape == "g1":
        return json.dumps({"cost": grant["cost"], "endpoint": grant["endpoint"], "reqnum": grant["reqnum"],
                           "url": grant["url"]}, indent=4).encode()
    if shape == "g3":
        return json.dumps({k: grant[k] for k in ("cost", "endpoint", "reqnum", "request_idx", "url")},
                          indent=4, sort_keys=True).encode()
    return json.dumps({"url": grant["url"]}, indent=4, sort_keys=True).encode()


def make_grant(keys, shape="g3", key="autoscaler", reqnum=1, signed_url="http://127.0.0.1:1234", **changes):
    grant = {"cost": 242.0, "endpoint": "my-endpoint", "reqnum": reqnum, "request_idx": reqnum, "url": signed_url}
    grant["signature"] = openssl_sign(keys / (key + ".key"), message_of(grant, shape))
    grant.update(changes)  # tampering happens after signing
    return grant


GRANT_BACKEND = """
class Backend:
    def __init__(self):
        self.count = 0

def increment(backend, request):
    backend.count += request.json["amount"]
    return {"json": request.json, "auth": request.auth, "data": request.get_data(as_text=True)}

flask_dict = {"POST": {"increment": increment}}
"""


@pytest.fixture
def signed_worker(start_worker, write_backend, keys):
    def start(*args):
        return start_worker(write_backend(GRANT_BACKEND), "--pubkey", str(keys / "spki.pem"), *args)
    return start


@pytest.mark.parametrize("shape", ["g1", "g3", "g4"])
def test_valid_grants_are_accepted_in_both_forms(signed_worker, keys, shape):
    worker = signed_worker()
    grant = make_grant(keys, shape, reqnum=1)
    status, data = worker.json("POST", "/increment", {"auth_data": dict(grant, __request_id="x"),
                                                      "payload": {"amount": 2}})
    assert status == 200, data
    assert data["json"] == {"amount": 2} and json.loads(data["data"]) == {"amount": 2}
    assert data["auth"] == grant  # the verified grant, without what the grant does not define
    flat = dict(make_grant(keys, shape, reqnum=2), amount=3)
    status, data = worker.json("POST", "/increment", flat)
    assert status == 200, data
    assert data["json"] == {"amount": 3} and data["auth"]["reqnum"] == 2


@pytest.mark.parametrize("change, reason", [
    ({"cost": 1.0}, "signature does not verify"),
    ({"url": "http://127.0.0.1:6666"}, "signature does not verify"),
    ({"signature": "not base64!"}, "signature does not verify"),
    ({"reqnum": "1"}, "reqnum is not an integer"),
], ids=["tampered-cost", "tampered-url", "bad-signature", "string-reqnum"])
def test_tampered_grants_are_refused(signed_worker, keys, change, reason):
    worker = signed_worker()
    status, data = worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3", **change),
                                                      "payload": {"amount": 1}})
    assert status == 401 and reason in data["detail"]


def test_wrong_key_replay_old_reqnum_and_unsigned_are_refused(signed_worker, keys):
    worker = signed_worker()
    stranger = make_grant(keys, "g3", key="stranger")
    assert worker.json("POST", "/increment", {"auth_data": stranger, "payload": {"amount": 1}})[0] == 401
    fresh = make_grant(keys, "g3", reqnum=1000)
    assert worker.json("POST", "/increment", {"auth_data": fresh, "payload": {"amount": 1}})[0] == 200
    status, data = worker.json("POST", "/increment", {"auth_data": fresh, "payload": {"amount": 1}})
    assert status == 401 and data["detail"] == "the grant was already used"
    old = make_grant(keys, "g3", reqnum=850)
    status, data = worker.json("POST", "/increment", {"auth_data": old, "payload": {"amount": 1}})
    assert status == 401 and "reqnum 850 is too old (the newest is 1000)" in data["detail"]
    status, data = worker.json("POST", "/increment", {"amount": 1})
    assert status == 401 and "signed grant" in data["detail"]


def test_incomplete_envelopes_are_422(signed_worker, keys):
    worker = signed_worker()
    grant = make_grant(keys, "g3")
    del grant["cost"]
    assert worker.json("POST", "/increment", {"auth_data": grant, "payload": {}}) == (
        422, {"error": "Unprocessable Entity", "detail": {"auth_data": {"cost": "missing parameter"}}})
    assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3")}) == (
        422, {"error": "Unprocessable Entity", "detail": {"payload": "field missing"}})


def test_the_shape_can_be_pinned(signed_worker, keys):
    worker = signed_worker("--grant-shape", "g1")
    assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3"), "payload": {"amount": 1}})[0] == 401
    assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g1", reqnum=2),
                                              "payload": {"amount": 1}})[0] == 200

def session_call(worker, path, body):
    return worker.json("POST", path, body)


def test_a_session_reuses_its_verified_grant_until_it_ends(signed_worker, keys):
    worker = signed_worker("--max-sessions", "1")
    grant = make_grant(keys, "g3", reqnum=1)
    create = {"auth_data": grant, "payload": {"lifetime": 30, "on_close_route": "increment",
                                                "on_close_payload": {"amount": 100}}}
    status, opened = session_call(worker, "/session/create", create)
    assert status == 201 and set(opened) == {"session_id", "expiration"}, opened
    sid = opened["session_id"]
    for _ in range(2):  # the session's grant again and again: no replay refusal inside it
        status, data = session_call(worker, "/increment", {"auth_data": grant, "session_id": sid,
                                                            "payload": {"amount": 1}})
        assert status == 200 and data["json"] == {"amount": 1}, data
    other = make_grant(keys, "g3", reqnum=2)
    assert session_call(worker, "/increment", {"auth_data": other, "session_id": sid,
                                               "payload": {"amount": 1}})[0] == 401
    status, described = session_call(worker, "/session/get", {"session_id": sid, "session_auth": grant})
    assert status == 200 and described["auth_data"] == grant and described["lifetime"] == 30
    assert described["expiration"] == opened["expiration"] + 60  # two accepted requests, not the 401
    assert session_call(worker, "/session/get", {"session_id": sid, "session_auth": other})[0] == 401
    routed = dict(grant, __request_id="r-1", status="ready")  # Vast's whole /route/ answer, as the SDK keeps it
    assert session_call(worker, "/session/get", {"session_id": sid, "session_auth": routed})[0] == 200
    assert session_call(worker, "/session/health", {"session_id": sid, "session_auth": grant}) == (200, {"ok": True})
    assert session_call(worker, "/session/create", {"auth_data": make_grant(keys, "g3", reqnum=3),
                                                    "payload": {}})[0] == 429  # --max-sessions 1
    assert session_call(worker, "/session/end", {"session_id": sid, "session_auth": grant}) == (
        200, {"ended": True, "removed_session": sid})
    worker.wait_for_log(r"session %s: on-close http://127\.0\.0\.1:\d+/increment answered 200" % re.escape(sid))
    assert session_call(worker, "/increment", {"auth_data": grant, "session_id": sid,
                                               "payload": {"amount": 1}})[0] == 410
    assert session_call(worker, "/session/end", {"session_id": sid, "session_auth": grant})[0] == 410
    assert session_call(worker, "/session/health", {"session_id": sid, "session_auth": grant}) == (200, {"ok": False})


@pytest.mark.parametrize("body, status, detail", [
    ({"auth_data": "x", "payload": {}}, 422, {"auth_data": "must be an object"}),
    ({"payload": {}}, 422, {"auth_data": "field missing"}),
    ({"auth_data": "GRANT", "payload": {"lifetime": -1}}, 422, {"payload": {"lifetime": "must be a positive number of seconds"}}),
    ({"auth_data": "GRANT", "payload": {"on_close_route": 5}}, 422, {"payload": {"on_close_route": "must be a path or URL"}}),
    ({"auth_data": "FORGED", "payload": {}}, 401, "the grant's signature does not verify"),
], ids=["grant-not-object", "no-grant", "bad-lifetime", "bad-route", "forged"])
def test_a_malformed_or_unsigned_session_create_is_refused(signed_worker, keys, body, status, detail):
    worker = signed_worker()
    if body.get("auth_data") == "GRANT":
        body = dict(body, auth_data=make_grant(keys, "g3"))
    elif body.get("auth_data") == "FORGED":
        body = dict(body, auth_data=make_grant(keys, "g3", key="stranger"))
    assert session_call(worker, "/session/create", body) == (status, {"error": vastworker.STATUS_PHRASES[status],
                                                                       "detail": detail})
    assert session_call(worker, "/session/end", {"session_auth": {}}) == (
        422, {"error": "Unprocessable Entity", "detail": {"session_id": "missing, or not a string"}})
    assert session_call(worker, "/increment", {"auth_data": make_grant(keys, "g3", reqnum=9), "session_id": "nope",
                                               "payload": {"amount": 1}})[0] == 410


def test_an_expired_session_is_gone(signed_worker, keys):
    worker = signed_worker()
    grant = make_grant(keys, "g3", reqnum=1)
    status, opened = session_call(worker, "/session/create", {"auth_data": grant, "payload": {"lifetime": 0.2}})
    assert status == 201
    health = {"session_id": opened["session_id"], "session_auth": grant}  # asking does not extend it
    wait_until(lambda: session_call(worker, "/session/health", health) == (200, {"ok": False}))
    request = {"auth_data": grant, "session_id": opened["session_id"], "payload": {"amount": 1}}
    assert session_call(worker, "/increment", request)[0] == 410
    worker.wait_for_log("session %s expired" % opened["session_id"])

def test_a_grant_for_another_workers_url_is_refused(start_worker, write_backend, keys):
    port = free_port()
    worker = start_worker(write_backend(GRANT_BACKEND), "--pubkey", str(keys / "spki.pem"), port=str(port),
                          env={"PUBLIC_IPADDR": "127.0.0.1", "VAST_TCP_PORT_%d" % port: "1234"})
    ours = make_grant(keys, "g4", signed_url="http://127.0.0.1:1234")  # this worker's public address
    assert worker.json("POST", "/increment", {"auth_data": ours, "payload": {"amount": 1}})[0] == 200
    theirs = make_grant(keys, "g4", signed_url="http://203.0.113.9:4444")  # genuine, but for another worker
    status, data = worker.json("POST", "/increment", {"auth_data": theirs, "payload": {"amount": 1}})
    assert status == 401 and "not this worker (http://127.0.0.1:1234)" in data["detail"]

def test_ending_a_session_cuts_its_requests_in_flight(start_worker, hold, keys):
    held = hold(settings="allow_parallel_requests = True")
    worker = start_worker(held.backend, "--pubkey", str(keys / "spki.pem"), env=held.env)
    grant = make_grant(keys, "g3", reqnum=1)
    status, opened = worker.json("POST", "/session/create", {"auth_data": grant, "payload": {"lifetime": 30}})
    assert status == 201
    body = json.dumps({"auth_data": grant, "session_id": opened["session_id"], "payload": {}}).encode()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        held.wait_started()
        assert worker.json("POST", "/session/end", {"session_id": opened["session_id"], "session_auth": grant})[0] == 200
        try:
            cut = read_until_close(sock)
        except ConnectionResetError:
            cut = b""
        assert cut == b""  # its client sees the connection end, with no answer
    held.release()



def test_finished_requests_are_posted_again_until_the_autoscaler_takes_them(start_worker, write_backend, keys):
    refusals, deleted = [2], []

    def answer(method, path, body):  # refuses the first two /delete_requests/ posts
        if path != "/delete_requests/":
            return 200
        if refusals[0]:
            refusals[0] -= 1
            return 500
        deleted.extend(json.loads(body)["requests"])
        return 200

    autoscaler = LoopbackServer(answer)
    try:
        worker = start_worker(write_backend(GRANT_BACKEND), "--pubkey", str(keys / "spki.pem"),
                              env={"REPORT_ADDR": autoscaler.url, "CONTAINER_ID": "8", "VASTWORKER_TIME_SCALE": "0.1"})
        for reqnum in (11, 12):
            assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3", reqnum=reqnum),
                                                      "payload": {"amount": 1}})[0] == 200
        wait_until(lambda: len(deleted) == 2, timeout=20)
        assert sorted((entry["request_idx"], entry["status"]) for entry in deleted) == [(11, "Success"), (12, "Success")]
        assert refusals == [0]  # it was refused twice first
    finally:
        autoscaler.close()


def test_unsigned_requests_can_be_allowed(signed_worker, keys):
    worker = signed_worker("--allow-unsigned")
    assert worker.json("POST", "/increment", {"amount": 1})[0] == 200
    forged = make_grant(keys, "g3", key="stranger")  # a grant that is present is still checked
    assert worker.json("POST", "/increment", {"auth_data": forged, "payload": {"amount": 1}})[0] == 401


def test_without_a_key_requests_are_served_and_the_log_says_so_once(start_worker, write_backend, keys):
    worker = start_worker(write_backend(GRANT_BACKEND))
    assert worker.json("POST", "/increment", {"amount": 1})[0] == 200
    grant = make_grant(keys, "g3", key="stranger")  # cannot be checked: unwrapped, not verified
    status, data = worker.json("POST", "/increment", {"auth_data": grant, "payload": {"amount": 1}})
    assert status == 200 and data["json"] == {"amount": 1}
    worker.wait_for_log("INFO no autoscaler .* and no public key")  # local use: not a warning
    assert worker.log.count("no public key") == 1 and "WARNING" not in worker.log


LOG_BACKEND = """
readiness = "log"
log_actions = {"loaded": ["MODEL READY"], "error": ["FATAL"], "info": ["progress"]}

class Backend:
    pass

flask_dict = {"GET": {"hello": lambda backend, request: "hello"}}
"""


def test_the_workers_own_status_says_its_phase_and_where_its_max_perf_came_from(start_worker, write_backend,
                                                                                 autoscaler, tmp_path):
    model_log, ready_file = tmp_path / "model.log", tmp_path / "ready"
    worker = start_worker(write_backend(LOG_BACKEND + "\nmax_perf = 40\n"), "--ready-file", str(ready_file),
                          env=reporting_env(autoscaler, MODEL_LOG=str(model_log)))
    status, data = worker.json("GET", "/.vastworker/status")  # from this machine: no token needed
    assert status == 200 and (data["phase"], data["max_perf"], data["max_perf_source"]) == (
        "loading", 40.0, "backend.py max_perf")
    wait_until(lambda: ready_file.exists() and ready_file.read_text() == "%d loading\n" % worker.proc.pid)
    model_log.write_text("MODEL READY\n")
    loaded = wait_until(lambda: (lambda d: d if d["phase"] == "loaded" and d["reports"].get("record", {}).get(
        "loadtime") else None)(worker.json("GET", "/.vastworker/status")[1]))
    assert loaded["reports"]["delivered"] is True and loaded["reports"]["record"]["mtoken"] == "(hidden)"
    assert loaded["reports"]["delivered_count"] >= 1 and loaded["error_msg"] == "" and loaded["in_flight"] == 0
    assert ready_file.read_text() == "%d loaded\n" % worker.proc.pid  # rewritten as the phase changes


PROMETHEUS_PARSER = """
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples[sample.name + json.dumps(sample.labels, sort_keys=True)] = [family.type, sample.value]
print(json.dumps(samples))
"""


@pytest.fixture
def prometheus_parser():
    return venv_or_skip("prometheus-client", "prometheus_client>=0.20,<1", "prometheus_client's parser")


def parsed_metrics(python, text, tmp_path):
    """The samples of `text` as prometheus_client's own parser reads them: name+labels -> [type, value]."""
    script = tmp_path / "parse_metrics.py"
    script.write_text(PROMETHEUS_PARSER)
    result = subprocess.run([python, str(script)], input=text.encode(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return json.loads(result.stdout)


def promtool_problems(text):
    """What `promtool check metrics` says of `text` ("" when nothing), or None without promtool."""
    if not shutil.which("promtool"):
        print("promtool is not installed (Debian's prometheus): the exposition was not checked with it")
        return None
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    return (result.stdout + result.stderr).decode().strip()


def test_the_workers_metrics_count_exactly_what_happened(start_worker, write_backend, keys, prometheus_parser,
                                                          tmp_path):
    worker = start_worker(write_backend(GRANT_BACKEND), "--pubkey", str(keys / "spki.pem"),
                          env={"MASTER_TOKEN": "s3cret"})
    for reqnum in (1, 2, 3):
        assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3", reqnum=reqnum),
                                                  "payload": {"amount": 1}})[0] == 200
    assert worker.json("POST", "/increment", {"amount": 1})[0] == 401  # no grant
    assert worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g3", reqnum=3),
                                              "payload": {"amount": 1}})[0] == 401  # a replay
    assert worker.request("GET", "/nowhere/%d" % 7)[0] == 404
    assert worker.request("GET", "/metrics")[0] == 401  # a token is set: it is needed, even from here

    def scrape():  # each request is counted once its answer is sent: the last may not be yet
        answer = worker.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
        return answer if re.search(rb'^vastworker_requests_total\{[^}]*code="404"[^}]*\} 1', answer[2], re.M) else None
    status, headers, body = wait_until(scrape)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = parsed_metrics(prometheus_parser, body.decode(), tmp_path)

    def value(name, **labels):
        return samples[name + json.dumps(labels, sort_keys=True)][1]
    assert value("vastworker_requests_total", endpoint="increment", method="POST", code="200") == 3
    assert value("vastworker_requests_total", endpoint="increment", method="POST", code="401") == 2
    assert value("vastworker_requests_total", endpoint="(other)", method="GET", code="404") == 1
    assert value("vastworker_request_duration_seconds_count", endpoint="increment") == 5
    assert value("vastworker_queue_wait_seconds_count") == 3  # the three that reached the lock
    assert value("vastworker_grants_refused_total", reason="missing") == 1
    assert value("vastworker_grants_refused_total", reason="replay") == 1
    assert value("vastworker_phase", phase="loaded") == 1 and value("vastworker_phase", phase="loading") == 0
    assert value("vastworker_max_perf") == 100 and value("vastworker_requests_in_flight") == 0
    assert samples['vastworker_requests_total{"code": "200", "endpoint": "increment", "method": "POST"}'][0] == "counter"
    assert promtool_problems(body.decode()) in (None, "")


def test_the_stand_ins_metrics_show_each_worker(fleet, prometheus_parser, tmp_path):
    grant = fleet.route()
    assert fleet.call(grant) == 200
    status, _, body = fleet.stand_in.request("GET", "/metrics")  # no MASTER_TOKEN needed... it has one:
    assert status == 401
    status, _, body = fleet.stand_in.request("GET", "/metrics", headers={"Authorization": "Bearer secret"})
    samples = parsed_metrics(prometheus_parser, body.decode(), tmp_path)
    labels = {"url": grant["url"], "id": str(fleet.numbers[grant["url"]])}
    assert samples["vastworker_fleet_grants_total" + json.dumps(labels, sort_keys=True)] == ["counter", 1]
    ready = [key for key, (_, value) in samples.items() if key.startswith("vastworker_fleet_worker_state")
             and '"state": "ready"' in key and value == 1]
    assert len(ready) == 3 and samples["vastworker_fleet_worker_max_perf" + json.dumps(labels, sort_keys=True)][1] > 0
    assert fleet.stand_in.request("GET", "/favicon.ico")[0] == 200  # asked for by any browser, never a 404
    overview = fleet.stand_in.json("GET", "/status")[1]  # the page's data, for scripts: never a token
    assert len(overview["workers"]) == 3 and "secret" not in json.dumps(overview)
    assert promtool_problems(body.decode()) in (None, "")


def test_the_workers_status_is_for_this_machine_or_the_master_token():
    endpoints = vastworker.ReportEndpoints("s3cret", vastworker.WorkerState(), status=lambda: {"phase": "loading"})

    def asked(remote_addr, authorization=None):
        request = types.SimpleNamespace(remote_addr=remote_addr, headers=vastworker.Headers(
            [("Authorization", authorization)] if authorization else []))
        try:
            return endpoints.show_status(request).status_code
        except vastworker.Refusal as refusal:
            return refusal.code
    assert [asked("127.0.0.1"), asked("::1"), asked("10.0.0.7"), asked("10.0.0.7", "Bearer s3cret"),
            asked("10.0.0.7", "Bearer wrong")] == [200, 200, 401, 200, 401]


def test_the_model_health_check_gates_loaded_fails_the_worker_and_recovers_it(start_worker, autoscaler):
    answers = {"status": 503}
    health = LoopbackServer(lambda method, path, body: answers["status"])
    health.url += "/health"
    try:
        worker = start_worker("helloworld", env=reporting_env(autoscaler, MODEL_HEALTH_ENDPOINT=health.url,
                                                              VASTWORKER_TIME_SCALE="0.1"))
        autoscaler.wait_for(lambda r: r["loadtime"] == 0)
        assert not [r for r in autoscaler.records() if r["loadtime"] > 0]  # not loaded while unhealthy
        answers["status"] = 200
        autoscaler.wait_for(lambda r: r["loadtime"] > 0 and not r["error_msg"])
        assert worker.request("GET", "/value")[0] == 200
        metrics = worker.request("GET", "/metrics", headers={"Authorization": "Bearer secret"})[2].decode()
        assert "\nvastworker_model_server_healthy 1\n" in metrics
        answers["status"] = (500, b'{"error": {"message": "CUDA out of memory.\\nTried to allocate 2.00 GiB"}}')
        failed = autoscaler.wait_for(lambda r: r["error_msg"], timeout=20)[-1]
        # the operator reads the server's own reason; a client, only that it may retry
        assert failed["error_msg"] == ("model health check %s answered 500 CUDA out of memory. Tried to allocate "
                                       "2.00 GiB" % health.url)
        status, headers, body = worker.request("GET", "/value")
        assert (status, json.loads(body)["detail"], headers["Retry-After"]) == (
            503, "the model server is not healthy; retry later", "5")
        loaded, seen = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[0], len(autoscaler.records())
        answers["status"] = 200  # its launcher restarted it: loaded again, as it was
        recovered = wait_until(lambda: [r for r in autoscaler.records()[seen:] if r["loadtime"] > 0], timeout=10)[0]
        assert (recovered["error_msg"], recovered["max_perf"], recovered["loadtime"]) == (
            "", loaded["max_perf"], loaded["loadtime"])
        worker.wait_for_log(r"the backend recovered \(health\): loaded again")
        assert worker.request("GET", "/value")[0] == 200
    finally:
        health.close()


def test_a_log_line_makes_the_worker_ready(start_worker, write_backend, autoscaler, tmp_path):
    model_log = tmp_path / "model.log"
    model_log.write_text("MODEL READY (from the last boot: ignored)\n")
    worker = start_worker(write_backend(LOG_BACKEND), env=reporting_env(autoscaler, MODEL_LOG=str(model_log)))
    status, data = worker.json("GET", "/hello")
    assert status == 503 and data["detail"] == "the backend is still loading"
    autoscaler.wait_for(lambda r: r["loadtime"] == 0 and r["max_perf"] == 0)  # the loading heartbeat
    with open(str(model_log), "a") as log:
        log.write("progress 50%\nMODEL RE")
        log.flush()
        worker.wait_for_log("model log: progress 50%")
        assert worker.request("GET", "/hello")[0] == 503  # half a line is not a line
        log.write("ADY\n")
    wait_until(lambda: worker.request("GET", "/hello")[0] == 200)
    autoscaler.wait_for(lambda r: r["loadtime"] > 0 and r["max_perf"] == 100.0)


def test_an_error_line_fails_the_worker_for_good(start_worker, write_backend, autoscaler, tmp_path):
    model_log = tmp_path / "model.log"  # not there yet: the watcher waits for it
    worker = start_worker(write_backend(LOG_BACKEND), env=reporting_env(autoscaler, MODEL_LOG=str(model_log)))
    model_log.write_text("MODEL READY\n")
    wait_until(lambda: worker.request("GET", "/hello")[0] == 200)
    os.rename(str(model_log), str(tmp_path / "model.log.1"))  # rotated
    model_log.write_text("FATAL: CUDA out of memory\nMODEL READY\n")
    wait_until(lambda: worker.request("GET", "/hello")[0] == 503)
    status, data = worker.json("GET", "/hello")
    assert data["detail"] == "the backend failed; the worker's log says why"  # why is not the client's to read
    worker.wait_for_log("the backend failed: model log: FATAL: CUDA out of memory")
    failed = autoscaler.wait_for(lambda r: r["error_msg"])
    assert failed[-1]["error_msg"] == "model log: FATAL: CUDA out of memory"
    time.sleep(0.5)
    assert worker.request("GET", "/hello")[0] == 503  # the later "MODEL READY" does not undo it


def test_readiness_by_the_backends_own_call(start_worker, write_backend):
    backend = write_backend("""
        import threading, time, vastworker
        readiness = "call"

        class Backend:
            def __init__(self):
                threading.Timer(0.5, vastworker.ready).start()

        flask_dict = {"GET": {"hello": lambda backend, request: "hello"}}
    """)
    worker = start_worker(backend)
    assert worker.request("GET", "/hello")[0] == 503
    wait_until(lambda: worker.request("GET", "/hello")[0] == 200)


def test_internal_report_endpoints_need_the_master_token(start_worker, write_backend):
    source = """
        readiness = "call"

        class Backend:
            pass

        flask_dict = {"GET": {"hello": lambda backend, request: "hello"}}
    """
    without_token = start_worker(write_backend(source), env={"MASTER_TOKEN": ""})
    status, data = without_token.json("POST", "/report_loaded", {"mtoken": ""})
    assert status == 403 and "MASTER_TOKEN is not set" in data["detail"]
    assert without_token.json("POST", "/pyworker/update", {})[0] == 403  # Vast's worker: open to anyone
    worker = start_worker(write_backend(source), env={"MASTER_TOKEN": "s3cret"})
    assert worker.json("POST", "/report_loaded", {"mtoken": "guess"})[0] == 401
    assert worker.request("GET", "/hello")[0] == 503
    assert worker.request("POST", "/report_loaded", {"mtoken": "s3cret", "max_perf": 2.5})[:1] == (200,)
    assert worker.request("GET", "/hello")[0] == 200
    assert worker.request("POST", "/report_error", {"mtoken": "s3cret", "error_msg": "boom"})[0] == 200
    assert worker.json("GET", "/hello") == (503, {"error": "Service Unavailable",
                                                 "detail": "the backend failed; the worker's log says why"})
    worker.wait_for_log("the backend failed: boom")


def test_an_unsigned_reqnum_cannot_lock_out_genuine_grants(signed_worker, keys):
    worker = signed_worker()
    forged = make_grant(keys, "g4", reqnum=1)
    forged["reqnum"] = 10 ** 18  # under the url-only shape nothing but the url is signed
    assert worker.json("POST", "/increment", {"auth_data": forged, "payload": {"amount": 1}})[0] == 200
    genuine = make_grant(keys, "g4", reqnum=2)
    status, data = worker.json("POST", "/increment", {"auth_data": genuine, "payload": {"amount": 1}})
    assert status == 200, data


def test_a_replay_with_its_signature_written_differently_is_refused(signed_worker, keys):
    worker = signed_worker()
    grant = make_grant(keys, "g3", reqnum=7)
    assert worker.json("POST", "/increment", {"auth_data": grant, "payload": {"amount": 1}})[0] == 200
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    signature = grant["signature"]  # 256 bytes: the last character before "==" has 4 unused bits
    same_bytes = signature[:-3] + alphabet[alphabet.index(signature[-3]) ^ 1] + signature[-2:]
    status, data = worker.json("POST", "/increment", {"auth_data": dict(grant, signature=same_bytes),
                                                      "payload": {"amount": 1}})
    assert status == 401 and data["detail"] == "the grant was already used"


def test_a_grant_replayed_after_a_restart_is_refused(signed_worker, keys, tmp_path):
    state = str(tmp_path / "state.json")
    grant = make_grant(keys, "g3", reqnum=3)
    first = signed_worker("--state-file", state)
    assert first.json("POST", "/increment", {"auth_data": grant, "payload": {"amount": 1}})[0] == 200
    first.stop()
    again = signed_worker("--state-file", state)
    status, data = again.json("POST", "/increment", {"auth_data": grant, "payload": {"amount": 1}})
    assert status == 401 and data["detail"] == "the grant was already used"
    assert again.json("POST", "/increment", {"auth_data": make_grant(keys, "g3", reqnum=4),
                                             "payload": {"amount": 1}})[0] == 200


@pytest.mark.parametrize("amount", [1e308, 10 ** 4299 * 9], ids=["1e308", "4300-digits"])
def test_a_change_the_state_file_cannot_hold_is_refused_and_nothing_is_lost(start_worker, tmp_path, amount):
    if isinstance(amount, int) and not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("this Python writes integers of any length")
    state = tmp_path / "state.json"
    worker = start_worker("helloworld", "--state-file", str(state))
    for _ in range(5):
        assert worker.request("POST", "/increment", {"amount": 1})[0] == 200
    body = b'{"amount": %s}' % (repr(amount).encode())
    assert worker.request("POST", "/increment", body, JSON)[0] == 200
    status, data = worker.json("POST", "/increment", body, JSON)  # the sum is too large to write
    assert status == 422 and "'count'" in data["detail"], data
    saved = json.loads(state.read_text(), parse_float=str, parse_int=str)["state"]
    assert saved["count"] != "5" and worker.request("GET", "/value")[0] == 200
    worker.stop()
    again = start_worker("helloworld", "--state-file", str(state))
    assert again.request("GET", "/value")[0] == 200 and "restored" in again.log


def test_the_state_files_temporary_name_cannot_be_planted(start_worker, tmp_path):
    state, victim = tmp_path / "state.json", tmp_path / "victim"
    victim.write_text("precious")
    worker = start_worker("helloworld", "--state-file", str(state))
    (tmp_path / ("state.json.%d.tmp" % worker.proc.pid)).symlink_to(victim)
    assert worker.request("POST", "/increment", {"amount": 2})[0] == 200
    assert victim.read_text() == "precious" and json.loads(state.read_text()) == {"state": {"count": 2}}
    assert sorted(path.name for path in tmp_path.iterdir() if not path.is_symlink()) == ["state.json", "victim"]


def test_report_endpoints_take_only_usable_numbers(start_worker, write_backend):
    worker = start_worker(write_backend("""
        readiness = "call"

        class Backend:
            pass

        flask_dict = {"GET": {"hello": lambda backend, request: "hello"}}
    """), env={"MASTER_TOKEN": "s3cret"})
    for bad in ("nan", "inf", -1, 0, "x", [1]):
        status, data = worker.json("POST", "/report_loaded", {"mtoken": "s3cret", "max_perf": bad})
        assert status == 400 and "max_perf" in data["detail"], bad
    assert worker.json("POST", "/report_capacity", {"mtoken": "s3cret", "max_capacity": -3})[0] == 400
    assert worker.request("GET", "/hello")[0] == 503  # still loading: nothing bad was taken


# ------------------------------------------------------------------------------------------------
# 5. Outbound: status reports, the benchmark, notify, the public key
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def autoscaler(start_worker):
    """The stand-in autoscaler (python3 vastworker.py autoscaler), recording what workers send."""
    stand_in = start_worker("autoscaler", env={"MASTER_TOKEN": "secret"})  # the token it hands out
    stand_in.url = "http://127.0.0.1:%d" % stand_in.port

    def records():
        return stand_in.json("GET", "/records")[1]

    def wait_for(predicate, timeout=15):
        """The records that satisfy predicate, once there are some."""
        return wait_until(lambda: [record for record in records() if predicate(record)], timeout, 0.1,
                          lambda: "no such record among %s" % json.dumps(records(), indent=1))

    stand_in.records = records
    stand_in.wait_for = wait_for
    return stand_in


def reporting_env(autoscaler, **extra):
    """Reporting to the stand-in; requests unsigned (UNSECURED), as these tests are not about grants;
    the worker's own waits ten times shorter."""
    return dict({"REPORT_ADDR": autoscaler.url, "CONTAINER_ID": "123", "MASTER_TOKEN": "secret",
                 "UNSECURED": "true", "VASTWORKER_TIME_SCALE": "0.1"}, **extra)


def test_a_report_delivered_after_the_benchmark_restarted_the_counts_takes_nothing_back():
    metrics = vastworker.Metrics()
    metrics.started(100)  # the benchmark's warm-up
    metrics.finished(100, 200)
    in_delivery = metrics.snapshot()  # a report on its way to a slow autoscaler...
    metrics.restart()  # ...when the benchmark ends
    metrics.acknowledge(in_delivery)
    assert metrics.snapshot() == {"cur_load": 0.0, "new_load": 0.0, "rej_load": 0.0, "cur_perf": 0.0,
                                  "num_requests_working": 0, "num_requests_recieved": 0}


def test_readiness_is_one_state_machine_that_every_source_feeds():
    state = vastworker.WorkerState()
    assert state.reported() == ("loading", "")
    state.loaded()  # e.g. /report_loaded, or the benchmark's end
    assert state.reported() == ("loaded", "")
    state.held = lambda: ""  # no public key yet, nothing to say yet
    assert state.reported() == ("loading", "")
    state.held = lambda: "no public key after 5 tries"
    assert state.reported() == ("loading", "no public key after 5 tries")
    state.held = None
    state.recovered("health")  # nothing failed: nothing happens
    assert state.phase == "loaded"
    state.failed("model health check answered 500", "health")
    state.failed("a later failure")  # the first one stands
    assert state.reported() == ("failed", "model health check answered 500")
    state.loaded()  # only the failing source may take a failure back
    state.recovered("log")
    assert state.phase == "failed"
    state.recovered("health")
    assert state.reported() == ("loaded", "")
    state.failed("model log: CUDA error")  # a failure no source takes back
    state.recovered("health")
    assert state.reported() == ("failed", "model log: CUDA error")
    born_failed = vastworker.WorkerState("Backend() failed")
    assert born_failed.reported() == ("failed", "Backend() failed") and not born_failed.accepting


def test_loaded_record_then_updates_that_count_requests(start_worker, autoscaler):
    port = free_port()
    worker = start_worker("helloworld", port=str(port), env=reporting_env(
        autoscaler, PUBLIC_IPADDR="203.0.113.7", **{"VAST_TCP_PORT_%d" % port: "41234"}))
    loaded = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[0]
    expected_types = {"id": int, "mtoken": str, "version": str, "loadtime": float, "cur_load": float,
                      "rej_load": float, "new_load": float, "error_msg": str, "max_perf": float,
                      "cur_perf": float, "cur_capacity": int, "max_capacity": int,
                      "num_requests_working": int, "num_requests_recieved": int,
                      "additional_disk_usage": float, "working_request_idxs": list, "url": str}
    assert {name: type(loaded[name]) for name in expected_types} == expected_types
    assert (loaded["id"], loaded["mtoken_matches"], loaded["url"], loaded["error_msg"], loaded["max_perf"]) == (
        123, True, "http://203.0.113.7:41234", "", 100.0)  # a request a second, at the default cost
    assert loaded["version"] == "1.1.0"  # what Vast's current worker sends
    for _ in range(5):
        assert worker.request("POST", "/increment", {"amount": 1})[0] == 200
    for _ in range(3):
        worker.value()
    assert worker.request("GET", "/nothing")[0] == 404  # not a backend request: not counted
    autoscaler.wait_for(lambda r: r["num_requests_recieved"] == 8)

    def after_loaded():
        return [r for r in autoscaler.records() if r["loadtime"] > 0]

    # served is counted when a request ends, received when it starts: a report may fall between
    wait_until(lambda: sum(r["cur_perf"] for r in after_loaded()) == 800.0)
    wait_until(lambda: after_loaded()[-1]["num_requests_working"] == 0)
    assert sum(r["new_load"] for r in after_loaded()) == 800.0  # the SDK's default cost, 100, each
    assert sum(r["cur_perf"] for r in after_loaded()) == 800.0
    assert after_loaded()[-1]["cur_load"] == 0.0
    autoscaler.wait_for_log(r"worker_status id=123 loadtime=[\d.]+ max_perf=100\.0")


def test_a_backend_defines_its_workload(start_worker, autoscaler, write_backend):
    backend = write_backend("""
        class Backend:
            pass

        def generate(backend, request):
            return "x" * request.json["tokens"]

        def workload(backend, request):
            return request.json["tokens"]

        flask_dict = {"POST": {"generate": generate}}
    """)
    worker = start_worker(backend, env=reporting_env(autoscaler))
    assert worker.request("POST", "/generate", {"tokens": 30})[0] == 200
    assert worker.request("POST", "/generate", {"tokens": 12})[0] == 200
    autoscaler.wait_for(lambda r: r["num_requests_recieved"] == 2)
    wait_until(lambda: sum(r["cur_perf"] for r in autoscaler.records()) == 42.0)
    assert sum(r["new_load"] for r in autoscaler.records()) == 42.0

def test_routed_requests_are_listed_while_working_and_reported_when_done(start_worker, autoscaler, hold):
    held = hold()
    port = free_port()
    env = dict(held.env, REPORT_ADDR=autoscaler.url, CONTAINER_ID="31", MASTER_TOKEN="secret", VASTWORKER_TIME_SCALE="0.1",
               PUBLIC_IPADDR="127.0.0.1", **{"VAST_TCP_PORT_%d" % port: str(port)})
    worker = start_worker(held.backend, port=str(port), env=env)
    worker.wait_for_log("public key from")
    autoscaler.wait_for(lambda r: r["loadtime"] > 0)

    def routed(path):
        grant = autoscaler.json("POST", "/route/", {"endpoint": "hold", "cost": 250})[1]
        status, _, _ = worker.request("GET", path, {"auth_data": grant, "payload": {}})
        return grant["request_idx"], status

    outcome = []
    holder = threading.Thread(target=lambda: outcome.append(routed("/hold")))
    holder.start()
    held.wait_started()
    working = autoscaler.wait_for(lambda r: r["working_request_idxs"])[-1]
    assert working["cur_load"] == 250.0  # the grant's cost is the request's workload
    held.release()
    holder.join(10)
    fast = routed("/fast")
    (held_idx, held_status), = outcome
    assert held_status == fast[1] == 200 and working["working_request_idxs"] == [held_idx]
    done = wait_until(lambda: {entry["request_idx"]: entry for entry in autoscaler.json("GET", "/requests")[1]}
                      if len(autoscaler.json("GET", "/requests")[1]) >= 2 else None, timeout=15)
    assert {idx: (done[idx]["status"], done[idx]["success"]) for idx in done} == {
        held_idx: ("Success", True), fast[0]: ("Success", True)}
    assert done[held_idx]["entered_queue_at"] <= done[held_idx]["work_started_at"] <= done[held_idx]["work_completed_at"]
    autoscaler.wait_for_log(r"delete_requests worker_id=31 ")
    autoscaler.wait_for(lambda r: r["num_requests_recieved"] == 2 and not r["working_request_idxs"])

SDK_BACKEND = """
import time

class Backend:
    def __init__(self):
        self.count = 0
        self.slow_runs = 0

def increment(backend, request):
    backend.count += request.json["amount"]
    return {"count": backend.count}

def slow(backend, request):
    backend.slow_runs += 1
    time.sleep(4)
    return {"slow_runs": backend.slow_runs}

def value(backend, request):
    return {"count": backend.count, "slow_runs": backend.slow_runs}

flask_dict = {"POST": {"increment": increment, "slow": slow, "value": value}}
"""

SDK_CLIENT = """
import asyncio, json, ssl, sys, time
from vastai.serverless.client import CoroutineServerless, Endpoint

class LoopbackServerless(CoroutineServerless):
    async def get_ssl_context(self):  # the SDK would download Vast's root certificate: stay on loopback
        return ssl.create_default_context()

async def main(autoscaler_url):
    out = {}
    async with LoopbackServerless(api_key="local", autoscaler_url=autoscaler_url) as client:
        endpoint = Endpoint(client=client, name="local", id=1, api_key="local")
        single = await client.queue_endpoint_request(endpoint, "/increment", {"amount": 1})
        out["single"] = [single["status"], single["response"]]
        many = await asyncio.gather(*(client.queue_endpoint_request(endpoint, "/increment", {"amount": 1})
                                      for _ in range(8)))
        out["concurrent"] = sorted(result["response"]["count"] for result in many)
        started = time.time()
        try:
            # 1 s per try, re-sent at once, given up after 2.5 s: all while the first try runs (4 s)
            await client.queue_endpoint_request(endpoint, "/slow", {}, worker_timeout=1, timeout=2.5)
            out["slow"] = "answered"
        except Exception as exc:
            out["slow"] = type(exc).__name__
        out["slow_seconds"] = round(time.time() - started, 1)
        await asyncio.sleep(2)  # the first /slow try, which did start, ends meanwhile
        final = await client.queue_endpoint_request(endpoint, "/value", {})
        out["value"] = final["response"]
        session = await client.start_endpoint_session(endpoint, cost=100, lifetime=30)
        out["session"] = [(await session.request("/increment", {"amount": 10}))["response"]["count"]
                          for _ in range(3)]
        out["session_open"] = await session.is_open()
        await session.close()
        try:
            await session.request("/increment", {"amount": 10})
            out["after_close"] = "answered"
        except ValueError as exc:
            out["after_close"] = str(exc)
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def vast_sdk():
    """Vast's own client SDK (PyPI vastai 1.9.1), where it can be installed."""
    return venv_or_skip("vastai-1.9.1", "vastai==1.9.1", "Vast's SDK")


@pytest.mark.slow
def test_vasts_own_sdk_client_runs_against_the_worker(start_worker, write_backend, autoscaler, vast_sdk, tmp_path):
    port = free_port()
    worker = start_worker(write_backend(SDK_BACKEND), port=str(port), env={
        "REPORT_ADDR": autoscaler.url, "CONTAINER_ID": "5", "MASTER_TOKEN": "secret",
        "PUBLIC_IPADDR": "127.0.0.1", "VAST_TCP_PORT_%d" % port: str(port)})
    worker.wait_for_log("public key from")
    autoscaler.wait_for(lambda r: r["loadtime"] > 0)
    out = run_client(vast_sdk, SDK_CLIENT, tmp_path, autoscaler.url)
    print("Vast's SDK against the worker:", json.dumps(out))
    assert out["single"] == [200, {"count": 1}]
    assert out["concurrent"] == list(range(2, 10))  # serialised by the lock: each count once
    assert out["slow"] != "answered"  # it gave up after its retries
    assert out["value"] == {"count": 9, "slow_runs": 1}  # the abandoned re-sends never ran
    assert out["session"] == [19, 29, 39] and out["session_open"] is True  # one grant, three requests
    assert out["after_close"] == "Cannot make request on closed session."
    assert len(re.findall(r"POST /slow\?api_key=\(hidden\) 499 0 .*cancelled: the client left", worker.log)) == 2, \
        worker.log[-3000:]  # the SDK's endpoint key, sent in the query, is not written to the log
    reported = wait_until(lambda: [entry for entry in autoscaler.json("GET", "/requests")[1]
                                   if entry["status"] == "Cancelled"], timeout=15)
    assert reported, "the abandoned requests were reported as Cancelled"

def test_clients_that_leave_at_any_moment_leak_no_thread_and_leave_counts_exact(start_worker, autoscaler):
    worker = start_worker("helloworld", "--log-level", "warning", env=reporting_env(autoscaler))
    autoscaler.wait_for(lambda r: r["loadtime"] > 0)
    def threads():
        return len(os.listdir("/proc/%d/task" % worker.proc.pid))

    before = threads()
    request = b'POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"amount": 1}'
    for cut in range(200):  # leave after the whole request, or halfway through it, at once
        with socket.create_connection(("127.0.0.1", worker.port)) as sock:
            sock.sendall(request if cut % 2 else request[:40 + cut % 60])
    # every whole request taken in (a connection can wait in the listen backlog with no thread
    # yet: the first value read then came before the last increment), then the pool's threads
    # added meanwhile let go: by count, since the one that stays need not be the one there before
    # (spare ones go after 1 s here, when the thread on the poller next looks up: allow for a
    # loaded machine)
    autoscaler.wait_for(lambda r: sum(x["num_requests_recieved"] for x in autoscaler.records()) >= 100)
    wait_until(lambda: threads() <= before, timeout=30,
               failure=lambda: "threads: %d before, %d now" % (before, threads()))
    applied = worker.value()  # itself a request, served
    assert 0 < applied <= 100
    served = (applied + 1) * 100.0
    reports = autoscaler.wait_for(lambda r: r["num_requests_working"] == 0 and r["cur_load"] == 0.0
                                  and sum(x["cur_perf"] for x in autoscaler.records()) >= served)
    assert sum(r["cur_perf"] for r in autoscaler.records()) == served, reports[-1]  # each applied one, once


def test_reports_go_to_the_first_address_that_takes_them(start_worker, autoscaler):
    env = reporting_env(autoscaler, REPORT_ADDR="http://127.0.0.1:%d/, %s" % (free_port(), autoscaler.url))
    start_worker("helloworld", env=env)
    autoscaler.wait_for(lambda r: r["loadtime"] > 0)


def test_a_dead_or_silent_autoscaler_does_not_slow_requests(start_worker):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        worker = start_worker("helloworld", env={"REPORT_ADDR": "http://127.0.0.1:%d" % silent.getsockname()[1],
                                                 "UNSECURED": "true"})
        silent.settimeout(10)
        stuck, _ = silent.accept()  # the reporter's first post: it will wait for an answer in vain
        for _ in range(20):
            connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=1)
            connection.request("GET", "/value")
            assert connection.getresponse().status == 200  # a timeout here would fail the test
            connection.close()
        stuck.close()


def test_refused_connections_are_reported_as_rej_load(start_worker, hold, autoscaler):
    held = hold(settings="allow_parallel_requests = True")
    worker = start_worker(held.backend, "--max-connections", "2", env=dict(reporting_env(autoscaler), **held.env))
    busy = [threading.Thread(target=worker.request, args=("GET", "/hold")) for _ in range(2)]
    for thread in busy:
        thread.start()
    held.wait_started(2)  # both admitted and running
    assert worker.request("GET", "/fast")[0] == 503
    held.release()
    for thread in busy:
        thread.join()
    autoscaler.wait_for(lambda r: r["rej_load"] == 100.0)


BENCHMARK_BACKEND = """
benchmark = {{"endpoint": "work", "payload": {{"n": 1}}, "runs": 2, "concurrency": 3, "workload": 10}}

class Backend:
    def __init__(self):
        self.calls = 0

def work(backend, request):
    backend.calls += 1
    if {fail}:
        raise RuntimeError("no GPU")
    return "done"

flask_dict = {{"POST": {{"work": work}}, "GET": {{"calls": lambda backend, request: {{"calls": backend.calls}}}}}}
"""


def test_benchmark_sets_max_perf_and_is_cached(start_worker, write_backend, autoscaler, tmp_path):
    backend = write_backend(BENCHMARK_BACKEND.format(fail=False))
    cache = tmp_path / "cache"
    cache.mkdir()
    first = start_worker(backend, "--cache-dir", str(cache), env=reporting_env(autoscaler))
    loaded = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[0]
    assert loaded["max_perf"] > 0 and loaded["num_requests_recieved"] == 0  # benchmark not counted
    assert first.json("GET", "/calls") == (200, {"calls": 7})  # a warm-up and 2 rounds of 3
    cached = json.loads((cache / "vastworker-benchmark.json").read_text())
    assert list(cached.values()) == [loaded["max_perf"]]
    first.stop()
    second = start_worker(backend, "--cache-dir", str(cache))
    second.wait_for_log(r"benchmark: [\d.]+ workload/s \(cached in ")
    assert second.json("GET", "/calls") == (200, {"calls": 0})  # not run again


def test_the_benchmark_passes_when_grants_are_required(start_worker, write_backend, autoscaler, tmp_path):
    env = reporting_env(autoscaler)
    del env["UNSECURED"]  # signatures required: the benchmark's own requests must still get through
    worker = start_worker(write_backend(BENCHMARK_BACKEND.format(fail=False)), "--cache-dir", str(tmp_path),
                          env=env)
    loaded = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[0]
    assert loaded["max_perf"] > 0 and loaded["error_msg"] == ""
    assert worker.json("POST", "/work", {"n": 1})[0] == 401  # while outsiders need a grant

def test_the_benchmark_cache_stays_out_of_the_project(start_worker, write_backend, tmp_path):
    worker = start_worker(write_backend(BENCHMARK_BACKEND.format(fail=False)), env={"XDG_CACHE_HOME": str(tmp_path)})
    worker.wait_for_log(r"loaded after")
    assert (tmp_path / "vastworker" / "vastworker-benchmark.json").is_file()
    assert not os.path.exists(os.path.join(ROOT, "vastworker-benchmark.json"))  # the worker's directory


def test_a_benchmark_with_no_success_is_an_error(start_worker, write_backend, autoscaler, tmp_path):
    worker = start_worker(write_backend(BENCHMARK_BACKEND.format(fail=True)), "--cache-dir", str(tmp_path),
                          env=reporting_env(autoscaler))
    failed = autoscaler.wait_for(lambda r: r["error_msg"])[0]
    assert failed["error_msg"] == ("benchmark: no successful response from POST /work: 500 the handler failed; "
                                   "the worker's log has the details")  # what the answer said
    assert failed["loadtime"] == 0 and failed["max_perf"] == 0
    assert worker.request("POST", "/work", {"n": 1})[0] == 503


def test_the_benchmark_runs_over_https_too(start_worker, write_backend, autoscaler, keys, tmp_path):
    worker = start_worker(write_backend(BENCHMARK_BACKEND.format(fail=False)), "--cache-dir", str(tmp_path),
                          "--certfile", str(keys / "tls.crt"), "--keyfile", str(keys / "tls.key"),
                          env=reporting_env(autoscaler))
    loaded = autoscaler.wait_for(lambda r: r["loadtime"] > 0 or r["error_msg"])[0]
    assert loaded["error_msg"] == "" and loaded["max_perf"] > 0, worker.log


def test_a_failed_start_is_reported(autoscaler, write_backend):
    backend = write_backend("""
        class Backend:
            def __init__(self):
                raise RuntimeError("weights not found")

        flask_dict = {"GET": {"hello": lambda backend, request: "hello"}}
    """)
    code, output = run_cli(backend, "--port", "0", env=reporting_env(autoscaler))
    assert code == 1
    record = autoscaler.wait_for(lambda r: r["error_msg"])[0]
    assert record["error_msg"].startswith("Backend() failed: RuntimeError: weights not found")
    assert record["id"] == 123


def test_helloautoscaler_runs_unchanged_and_reports_itself(start_worker, autoscaler):
    worker = start_worker("helloautoscaler", env=reporting_env(autoscaler, CONTAINER_ID="7"))
    assert "the backend reports to the autoscaler itself" in worker.log
    loaded = autoscaler.wait_for(lambda r: "loadtime" in r)[0]
    assert loaded["id"] == "7" and loaded["mtoken_matches"] is True and loaded["max_perf"] == 0.5
    autoscaler.wait_for(lambda r: "num_requests_recieved" in r)
    assert worker.json("POST", "/increment", {"other": 1})[0] == 400  # its own abort(400)
    assert worker.request("POST", "/increment", {"amount": 4})[2] == b"Incremented"
    assert worker.json("GET", "/value") == (200, {"value": 4})
    time.sleep(1.5)
    assert not [r for r in autoscaler.records() if "version" in r]  # the worker stays quiet


def test_notify_without_an_autoscaler_does_not_fail(start_worker):
    worker = start_worker("helloautoscaler", env={"REPORT_ADDR": ""})
    assert worker.request("POST", "/increment", {"amount": 1})[0] == 200


def test_a_worker_without_its_key_is_held_back_reports_it_and_recovers(start_worker, tmp_path, keys):
    served = tmp_path / "autoscaler"
    served.mkdir()
    autoscaler = StaticServer(str(served))  # records reports; no /pubkey/ yet
    reports = lambda: [json.loads(body) for path, body in autoscaler.posts if path == "/worker_status/"]  # noqa: E731
    try:
        worker = start_worker("helloworld", env={"REPORT_ADDR": autoscaler.url, "VASTWORKER_TIME_SCALE": "0.1"})
        status, data = worker.json("GET", "/value")
        assert status == 503 and data["detail"] == "waiting for the autoscaler's public key"
        failing = wait_until(lambda: [r for r in reports() if r["error_msg"]], timeout=20)[0]
        assert "no public key from %s/pubkey/ after 5 tries" % autoscaler.url in failing["error_msg"]
        assert all(r["loadtime"] == 0 and r["max_perf"] == 0 for r in reports())  # not ready for traffic
        (served / "pubkey").mkdir()
        (served / "pubkey" / "index.html").write_text((keys / "spki.pem").read_text())
        worker.wait_for_log("public key from %s/pubkey/" % autoscaler.url, timeout=70)
        wait_until(lambda: any(r["loadtime"] > 0 and not r["error_msg"] for r in reports()), timeout=15)
        assert worker.json("GET", "/value")[0] == 401  # now a grant is needed
        # the autoscaler changes its key: the first grant that does not verify fetches it again
        (served / "pubkey" / "index.html").write_text((keys / "stranger.pem").read_text())
        assert worker.json("GET", "/value", {"auth_data": make_grant(keys, "g3", key="stranger", reqnum=1),
                                             "payload": {}})[0] == 401
        worker.wait_for_log(r"public key from .*: a new one")
        assert worker.json("GET", "/value", {"auth_data": make_grant(keys, "g3", key="stranger", reqnum=2),
                                             "payload": {}})[0] == 200
    finally:
        autoscaler.close()


# ------------------------------------------------------------------------------------------------
# 5. Outbound: the model server proxy and the model-server backends, against a fake model server
#    (bench/fake_model_server.py) speaking vLLM's, llama.cpp's, TGI's and ComfyUI's wire formats
# ------------------------------------------------------------------------------------------------

from fake_model_server import FakeModelServer  # noqa: E402


@pytest.fixture
def fake_model():
    """Makes fake model servers (listening unless open=False), all closed at the end."""
    made = []

    def make(flavor="vllm", open=True, **kwargs):
        fake = FakeModelServer(flavor, **kwargs)
        made.append(fake)
        return fake.open() if open else fake

    yield make
    for fake in made:
        fake.close()


def model_worker(start_worker, backend, fake, tmp_path, *args, loaded=True, port="0", **env):
    """A worker serving `backend` in front of `fake`, its benchmark made short; once loaded."""
    worker = start_worker(backend, "--cache-dir", str(tmp_path), *args, port=port,
                          env=dict({"MODEL_SERVER_URL": fake.url, "BENCHMARK_MAX_TOKENS": "2",
                                    "VASTWORKER_TIME_SCALE": "0.1"}, **env))
    if loaded:
        worker.wait_for_log("loaded after", timeout=20)
    return worker


def sse_data(response):
    """The data of each server-sent event of an http.client response, as it arrives."""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            yield line[5:].lstrip(" ")


def open_stream(worker, path, payload):
    connection = worker.connect()
    connection.request("POST", path, json.dumps(payload), JSON)
    return connection, connection.getresponse()


PROXY_BACKEND = """
import os
import vastworker

allow_parallel_requests = True

class Backend:
    def __init__(self):
        self.model = vastworker.ModelServer(os.environ["MODEL_SERVER_URL"],
                                            timeout=float(os.environ.get("PROXY_TIMEOUT", "600")),
                                            stall=float(os.environ.get("PROXY_STALL", "120")))

def relay(backend, request):
    return backend.model.forward(request)

flask_dict = {"POST": {"v1/completions": relay, "v1/chat/completions": relay},
              "GET": {"v1/models": relay, "file": relay}}
"""


def test_a_header_a_handler_adds_cannot_split_the_request_to_the_model_server(start_worker, write_backend, fake_model):
    fake = fake_model("vllm")
    backend = write_backend(PROXY_BACKEND.replace("return backend.model.forward(request)", """return backend.model.forward(
        request, headers={"X-Tag": request.args.get("tag", "")})"""))
    worker = start_worker(backend, env={"MODEL_SERVER_URL": fake.url})
    assert worker.json("GET", "/v1/models?tag=blue")[0] == 200
    sent = len(fake.requests)
    status, data = worker.json("GET", "/v1/models?tag=blue%0d%0aX-Injected:%201")
    assert status == 500 and len(fake.requests) == sent, data  # refused before anything was sent
    worker.wait_for_log(r"invalid header 'X-Tag': 'blue\\r\\nX-Injected: 1'")


def test_the_openai_backend_relays_chat_completions_embeddings_and_models(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    status, data = worker.json("POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert status == 200 and data["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert data["usage"]["completion_tokens"] == 3
    assert fake.requests[-1][:2] == ("POST", "/v1/chat/completions")
    assert fake.requests[-1][2]["model"] == "fake-model"  # named by the server's /v1/models
    assert worker.json("GET", "/v1/models")[1]["data"][0]["id"] == "fake-model"
    assert worker.json("POST", "/v1/embeddings", {"input": "hi"})[1]["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    status, headers, body = worker.request("POST", "/v1/completions", {"input": {"prompt": "hi", "max_tokens": 2}})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "tok0 tok1 "  # Vast's wrapped form
    assert headers["Content-Type"] == "application/json" and headers["Content-Length"] == str(len(body))
    assert len({port for _, _, _, port in fake.requests[-4:]}) == 1  # one kept-alive upstream connection
    status, data = worker.json("POST", "/v1/completions", {"prompt": "hi", "model": "another"})
    assert status == 404 and data["error"]["message"] == "The model `another` does not exist."  # passed through


def test_a_stream_is_relayed_event_by_event_as_the_model_server_writes_it(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    fake.gate = threading.Semaphore(0)  # each token now waits for the test
    connection, response = open_stream(worker, "/v1/completions", {
        "prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    events = sse_data(response)
    for index in range(3):  # were the worker to buffer, the next event would never come
        fake.gate.release()
        assert json.loads(next(events))["choices"][0]["text"] == "tok%d " % index
    rest = list(events)
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 3 and rest[-1] == "[DONE]"
    connection.close()


def test_a_client_hanging_up_stops_the_generation_upstream(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    fake.gate = threading.Semaphore(0)
    connection, response = open_stream(worker, "/v1/completions", {"prompt": "hi", "max_tokens": 50, "stream": True})
    fake.gate.release()
    next(sse_data(response))
    connection.close()  # mid-stream
    for _ in range(5):
        fake.gate.release()
    fake.wait_for(lambda f: f.aborted == ["/v1/completions"])
    worker.wait_for_log(r"POST /v1/completions 200 aborted")
    seen = len(fake.requests)
    with socket.create_connection(("127.0.0.1", worker.port)) as sock:  # not streamed: waiting whole
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        fake.wait_for(lambda f: len(f.requests) > seen)
    fake.wait_for(lambda f: f.aborted == ["/v1/completions", "/v1/chat/completions"])
    worker.wait_for_log(r"POST /v1/chat/completions 499 0 .*\(cancelled: the client left\)")


def test_a_model_server_still_loading_keeps_the_worker_loading(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm", open=False)  # bound, not listening: refused, as vLLM is while it loads
    worker = model_worker(start_worker, "openai", fake, tmp_path, loaded=False)
    worker.wait_for_log(r"waiting for the backend to be ready \(a 200 from %s/health\)" % fake.url)
    status, data = worker.json("GET", "/v1/models")
    assert status == 503 and data["error"]["message"] == "the backend is still loading"  # in OpenAI's shape
    fake.open()
    worker.wait_for_log("loaded after", timeout=20)
    assert worker.json("GET", "/v1/models")[0] == 200
    fake.close()  # the model server dies
    status, data = worker.json("GET", "/v1/models")
    assert status in (502, 503) and data["error"]["message"] in (
        "the model server failed: it refused the connection", "the model server is not healthy; retry later")
    worker.wait_for_log(r"the backend failed: model health check", timeout=20)
    status, data = worker.json("GET", "/v1/models")
    assert status == 503 and data["error"]["message"] == "the model server is not healthy; retry later"


def test_llama_servers_loading_503_keeps_the_worker_loading(start_worker, fake_model, tmp_path):
    fake = fake_model("llamacpp")  # listening, but 503 "Loading model" to everything
    worker = model_worker(start_worker, "openai", fake, tmp_path, loaded=False)
    wait_until(lambda: [r for r in fake.requests if r[1] == "/health"])
    assert worker.json("GET", "/v1/models")[0] == 503
    fake.loaded()
    worker.wait_for_log("loaded after", timeout=20)
    status, data = worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and data["choices"][0]["text"] == "tok0 tok1 "


def test_the_proxy_says_503_until_the_model_server_first_answers_then_502(start_worker, write_backend, fake_model):
    fake = fake_model("vllm", open=False)
    worker = start_worker(write_backend(PROXY_BACKEND), env={"MODEL_SERVER_URL": fake.url})
    status, headers, body = worker.request("GET", "/v1/models")
    assert status == 503 and headers["Retry-After"] == "5"
    assert json.loads(body)["detail"] == "the model server is not answering yet (it refused the connection): still loading?"
    fake.open()
    assert worker.request("GET", "/v1/models")[0] == 200
    fake.close()
    status, data = worker.json("GET", "/v1/models")
    assert (status, data["detail"]) == (502, "the model server failed: it refused the connection")
    worker.wait_for_log(r"WARNING the model server %s failed /v1/models: it refused the connection" % fake.url)


def test_a_silent_model_server_is_a_504_and_a_stalled_stream_ends_with_an_error_event(
        start_worker, write_backend, fake_model):
    fake = fake_model("vllm")
    worker = start_worker(write_backend(PROXY_BACKEND), env={
        "MODEL_SERVER_URL": fake.url, "PROXY_TIMEOUT": "0.5", "PROXY_STALL": "0.5"})
    fake.gate = threading.Semaphore(0)  # no token comes
    status, data = worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 5})
    assert (status, data["detail"]) == (504, "the model server failed: no answer within 0.5 s")
    fake.wait_for(lambda f: f.aborted == ["/v1/completions"])  # and it was told to stop
    fake.gate = None
    connection, response = open_stream(worker, "/v1/completions", {
        "prompt": "[[stall-after:2]]", "max_tokens": 5, "stream": True})
    events = list(sse_data(response))
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["tok0 ", "tok1 "]
    assert json.loads(events[2])["error"] == {
        "message": "the model server broke off its answer: no answer within 0.5 s",
        "type": "upstream_error", "code": 502}
    assert len(events) == 3
    worker.wait_for_log(r"WARNING the model server .* broke off /v1/completions: no answer within 0.5 s")


@pytest.mark.parametrize("fault, why, own_error", [
    ("error", None, True),  # the model server's own error event passes, then vLLM's [DONE]
    ("garbage", "it sent a malformed chunk", False),
    ("close", "it closed the connection", False),
])
def test_a_stream_the_model_server_breaks_off_ends_cleanly_with_an_error_event(
        start_worker, fake_model, tmp_path, fault, why, own_error):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    connection, response = open_stream(worker, "/v1/completions", {
        "prompt": "[[%s-after:2]]" % fault, "max_tokens": 5, "stream": True})
    events = list(sse_data(response))  # read to the end: the stream ends properly
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["tok0 ", "tok1 "]
    error = json.loads(events[2])["error"]
    if own_error:
        assert error["message"] == "fake failure mid-stream" and events[3:] == ["[DONE]"]
    else:
        assert error["message"].startswith("the model server broke off its answer: " + why) and len(events) == 3
        worker.wait_for_log("the model server %s broke off /v1/completions: %s" % (fake.url, re.escape(why)))
    assert worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200  # and it goes on


def test_a_body_that_is_not_an_event_stream_is_cut_when_the_model_server_breaks_off(start_worker, write_backend):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve():
        sock, _ = listener.accept()
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 5000000\r\n\r\n" + b"x" * 100000)
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        worker = start_worker(write_backend(PROXY_BACKEND),
                              env={"MODEL_SERVER_URL": "http://127.0.0.1:%d" % listener.getsockname()[1]})
        connection = worker.connect()
        connection.request("GET", "/file")
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()  # not a whole body that looks complete
        worker.wait_for_log(r"WARNING the model server http://127.0.0.1:\d+ broke off /file: it closed the connection")
        worker.wait_for_log(r"GET /file: stream cut after 100000 bytes: the model server broke off its answer: "
                            r"it closed the connection")
    finally:
        listener.close()


@pytest.mark.parametrize("body, detail", [
    (b"{not json", "invalid JSON"),
    ([1, 2], "the body must be a JSON object"),
    ({"messages": "hi"}, "'messages' must be a list of messages"),
    ({"messages": []}, "'messages' must be a non-empty list of objects"),
    ({"max_tokens": 5}, "the request needs 'messages'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "'max_tokens' must be a whole number"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "'max_tokens' must be at least 0"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "'stream' must be true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 7}, "'model' must be a string"),
])
def test_bad_input_is_refused_before_anything_goes_upstream(start_worker, fake_model, tmp_path, body, detail):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    seen = len(fake.requests)
    raw = body if isinstance(body, bytes) else json.dumps(body)
    status, _, answer = worker.request("POST", "/v1/chat/completions", raw, JSON)
    error = json.loads(answer)["error"]  # OpenAI's error shape, so OpenAI's clients read it
    assert status == 400 and error["message"].startswith(detail)
    assert (error["type"], error["code"]) == ("invalid_request_error", 400)
    assert error["param"] == (detail.split("'")[1] if detail.startswith("'") else None)
    assert len(fake.requests) == seen


def test_the_wires_own_refusals_on_the_openai_routes_take_openais_shape_too(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path, "--max-body", "1000")
    status, _, body = worker.request("POST", "/v1/completions", json.dumps({"prompt": "x" * 2000}), JSON)
    assert status == 413 and json.loads(body)["error"]["message"] == "the request body is 2014 bytes; the limit is 1000"
    status, _, body = worker.request("POST", "/nowhere", json.dumps({"prompt": "x" * 2000}), JSON)
    assert status == 413 and json.loads(body)["error"] == "Request Entity Too Large"  # not one of its routes: ours


def test_a_huge_answer_is_streamed_through_not_held(start_worker, write_backend, fake_model):
    fake = fake_model("vllm")
    worker = start_worker(write_backend(PROXY_BACKEND), env={"MODEL_SERVER_URL": fake.url})
    assert worker.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
    before = rss_kb(worker.proc.pid, "VmHWM")
    status, headers, body = worker.request("POST", "/v1/completions", {"prompt": "[[big:40000000]]"})
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert len(json.loads(body)["choices"][0]["text"]) == 40000000
    assert rss_kb(worker.proc.pid, "VmHWM") - before < 20000  # KiB: far less than the 40 MB it passed on


def open_files(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class RawUpstream:
    """A model server written by hand on a socket: `serve(sock)` gets each connection."""

    def __init__(self, serve):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.connections = []

        def accept():
            while True:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    return
                self.connections.append(sock)
                threading.Thread(target=serve, args=(sock,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self):
        self.listener.close()
        for sock in self.connections:
            sock.close()


def test_a_stream_that_ends_with_its_connection_is_relayed_whole_and_the_connection_closed(start_worker, write_backend):
    def serve(sock):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     b"data: one\n\ndata: two\n\n")
        sock.close()

    upstream = RawUpstream(serve)
    try:
        worker = start_worker(write_backend(PROXY_BACKEND), env={"MODEL_SERVER_URL": upstream.url})
        files = open_files(worker.proc.pid)
        for _ in range(5):
            status, headers, body = worker.request("GET", "/file")
            assert (status, body) == (200, b"data: one\n\ndata: two\n\n") and "Connection" not in headers
        wait_until(lambda: open_files(worker.proc.pid) <= files,
                   failure=lambda: "open files: %d before, %d now" % (files, open_files(worker.proc.pid)))
    finally:
        upstream.close()


@pytest.mark.parametrize("head, why", [
    (b"HTTP/1.1 200 OK\r\nX-A: 1\rSet-Cookie: a=b\r\nContent-Length: 2\r\n\r\nok", "stray CR, NUL, VT or FF"),
    (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", "stray CR, NUL, VT or FF"),
    (b"HTTP/1.1 200 OK\r\nX-A: a\x0bb\r\nContent-Length: 2\r\n\r\nok", "stray CR, NUL, VT or FF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok", "invalid Content-Length"),  # '\xb2'.isdigit()
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok", "together are ambiguous"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "only the chunked transfer coding"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok", "folded header lines"),
    (b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok", "malformed header line"),
    (b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok", "not an HTTP/1.x status line"),
])
def test_a_malformed_answer_head_from_the_model_server_is_a_502(start_worker, write_backend, head, why):
    def serve(sock):
        sock.recv(65536)
        sock.sendall(head)
        sock.close()

    upstream = RawUpstream(serve)
    try:
        worker = start_worker(write_backend(PROXY_BACKEND), env={"MODEL_SERVER_URL": upstream.url})
        raw = worker.raw(b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(raw) == 502 and b"Set-Cookie" not in raw and b"\x00" not in raw and b"\x0b" not in raw, raw
        assert why in json.loads(body_of(raw))["detail"], raw
        assert "Traceback" not in worker.log
    finally:
        upstream.close()


def test_a_model_server_that_stops_reading_the_request_is_a_504(start_worker, write_backend):
    upstream = RawUpstream(lambda sock: None)  # accepts, never reads
    try:
        worker = start_worker(write_backend(PROXY_BACKEND), env={"MODEL_SERVER_URL": upstream.url,
                                                                "PROXY_TIMEOUT": "0.5"})
        status, data = worker.json("POST", "/v1/completions", {"prompt": "x" * 30000000})
        assert (status, data["detail"]) == (504, "the model server failed: it stopped reading the request")
    finally:
        upstream.close()


@pytest.mark.slow
def test_a_thousand_aborted_streams_leave_no_thread_or_connection_behind(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm", token_delay=0.002)
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    payload = json.dumps({"prompt": "hi", "max_tokens": 100000, "stream": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    threads_before = rss_kb(worker.proc.pid, "Threads")
    files_before = open_files(worker.proc.pid)

    def abort_streams(count):
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", worker.port)) as sock:
                sock.sendall(request)
                seen = b""
                while b"data:" not in seen:
                    data = sock.recv(65536)
                    assert data, seen  # closed before the stream began: fail, not spin
                    seen += data

    runners = [threading.Thread(target=abort_streams, args=(125,)) for _ in range(8)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    fake.wait_for(lambda f: len(f.aborted) == 1000, timeout=60)
    wait_until(lambda: rss_kb(worker.proc.pid, "Threads") <= threads_before, timeout=20,
               failure=lambda: "threads: %d before, %d now" % (threads_before, rss_kb(worker.proc.pid, "Threads")))
    wait_until(lambda: open_files(worker.proc.pid) <= files_before, timeout=20,
               failure=lambda: "open files: %d before, %d now" % (files_before, open_files(worker.proc.pid)))
    assert worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200


def shipped_backend(monkeypatch, name):
    """backends/NAME/backend.py imported in this process, with our flask module for the time
    of the test (not Flask's, nor one left behind for other tests)."""
    monkeypatch.setitem(sys.modules, "flask", vastworker.make_flask_module(vastworker.CurrentRequest()))
    spec = importlib.util.spec_from_file_location(name + "_backend", os.path.join(ROOT, "backends", name, "backend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_openai_backends_workload_is_its_tokens(monkeypatch):
    module = shipped_backend(monkeypatch, "openai")
    assert module.estimate("v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 400}],
                                                   "max_tokens": 50}) == 150
    assert module.estimate("v1/completions", {"prompt": "abcd", "max_completion_tokens": 10, "n": 2}) == 21
    assert module.estimate("v1/completions", {"prompt": "abcd"}) == 17  # OpenAI's default of 16 tokens
    assert module.estimate("v1/embeddings", {"input": ["abcd", "efgh"]}) == 2


OPENAI_CLIENT = """
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
out = {}
chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
out["chat"] = [chat.choices[0].message.content, chat.usage.completion_tokens]
stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, stream=True, stream_options={"include_usage": True})
chunks = list(stream)
out["chat_stream"] = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.total_tokens > 0]
out["completion_stream"] = "".join(c.choices[0].text for c in client.completions.create(
    model="fake-model", prompt="hi", max_tokens=4, stream=True))
out["models"] = [m.id for m in client.models.list()]
out["embedding"] = client.embeddings.create(model="fake-model", input="hi").data[0].embedding
try:
    list(client.completions.create(model="fake-model", prompt="[[close-after:1]]", max_tokens=4, stream=True))
    out["broken"] = "no error"
except openai.APIError as exc:
    out["broken"] = type(exc).__name__ + ": " + str(exc.message)
try:
    client.chat.completions.create(model="fake-model", messages=[], max_tokens=3)
except openai.BadRequestError as exc:
    out["bad"] = [exc.status_code, exc.message, exc.type, exc.param]
try:
    client.completions.create(model="fake-model", prompt="hi", max_tokens=131072)
except openai.BadRequestError as exc:
    out["too_long"] = [exc.status_code, exc.body.get("message") if isinstance(exc.body, dict) else exc.body]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def openai_client():
    """The openai Python client (PyPI openai 1.x), where it can be installed."""
    return venv_or_skip("openai-client", "openai>=1.40,<2", "the openai client")


@pytest.mark.slow
def test_the_openai_python_client_works_through_the_worker_unchanged(start_worker, fake_model, tmp_path, openai_client):
    fake = fake_model("vllm")
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    out = run_client(openai_client, OPENAI_CLIENT, tmp_path, "http://127.0.0.1:%d" % worker.port)
    print("the openai client through the worker:", json.dumps(out))
    assert out["chat"] == ["tok0 tok1 tok2 ", 3]
    assert out["chat_stream"] == ["tok0 tok1 tok2 ", True]
    assert out["completion_stream"] == "tok0 tok1 tok2 tok3 "
    assert out["models"] == ["fake-model"] and out["embedding"] == [0.1, 0.2, 0.3]
    assert out["broken"] == "APIError: the model server broke off its answer: it closed the connection"
    # the worker's own refusal and the model server's both read as OpenAI's: type, param and message
    assert out["bad"][0] == 400 and "'messages' must be a non-empty list of objects" in out["bad"][1]
    assert out["bad"][2:] == ["invalid_request_error", "messages"]
    assert out["too_long"][0] == 400 and out["too_long"][1].startswith(
        "This model's maximum context length is 131072 tokens. However, you requested 131073 tokens")


# A real llama.cpp llama-server and a tiny random llama (256 tokens of context), both made by
# bench/llama_server.py, which .ci/run calls: `eval "$(python3 bench/llama_server.py --env)"`.
LLAMA_SERVER = os.environ.get("VASTWORKER_LLAMA_SERVER")
LLAMA_MODEL = os.environ.get("VASTWORKER_LLAMA_MODEL")
needs_llama_server = pytest.mark.skipif(
    not (LLAMA_SERVER and LLAMA_MODEL), reason="no real llama-server (VASTWORKER_LLAMA_SERVER and _MODEL unset): "
    ".ci/run builds one with bench/llama_server.py and runs these under its first Python only")


@pytest.fixture
def llama_server(tmp_path):
    """Starts real llama-servers on loopback, each writing to its own log (appended to, as a
    launcher that restarts it would); all killed at the end."""
    started = []

    def start(*options, port=None):
        port = port or free_port()
        log = tmp_path / ("llama-%d.log" % port)
        with open(str(log), "ab") as out:
            proc = subprocess.Popen([LLAMA_SERVER, "-m", LLAMA_MODEL, "--host", "127.0.0.1", "--port", str(port)]
                                    + list(options), stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        return types.SimpleNamespace(proc=proc, port=port, url="http://127.0.0.1:%d" % port, log=log,
                                     text=lambda: log.read_text(errors="replace"))

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


LLAMA_CLIENT = """
import json, sys, time
import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
out = {}
try:
    client.completions.create(model="any", prompt=sys.argv[2], max_tokens=8)
except openai.BadRequestError as exc:
    out["too_long"] = [type(exc).__name__, exc.status_code, exc.type, exc.message]
chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5)
out["chat"] = [chat.usage.completion_tokens, chat.choices[0].finish_reason]
events = list(client.completions.create(model="any", prompt="Once upon", max_tokens=12, stream=True))
out["stream"] = [len(events), events[-1].choices[0].finish_reason]
print(json.dumps(out))
"""


@needs_llama_server
@pytest.mark.slow
def test_a_real_llama_server_with_a_small_context_serves_its_errors_and_recovers(
        start_worker, llama_server, autoscaler, openai_client, tmp_path):
    server = llama_server("-c", "1024", "-np", "4")  # 256 tokens a slot: the benchmark's defaults do not fit
    ready_at = time.monotonic()
    worker = start_worker("openai", "--cache-dir", str(tmp_path), env=reporting_env(
        autoscaler, MODEL_SERVER_URL=server.url, MODEL_LOG=str(server.log), VASTWORKER_TIME_SCALE="1"))
    loaded = autoscaler.wait_for(lambda r: r["loadtime"] > 0 or r["error_msg"], timeout=120)[0]
    assert loaded["error_msg"] == "" and loaded["max_perf"] > 0, worker.log
    worker.wait_for_log("benchmark: the model server takes 256 tokens a request; prompts of 21 words, at most 64")
    took = worker.wait_for_log(r"(\d\d:\d\d:\d\d) INFO the backend is ready\n(?:.*\n)*?.*(\d\d:\d\d:\d\d) INFO "
                               r"benchmark: \S+ workload/s")
    print("small-context llama-server: loaded %.1f s after its start; the benchmark from %s to %s; max_perf %g"
          % (time.monotonic() - ready_at, took.group(1), took.group(2), loaded["max_perf"]))
    out = run_client(openai_client, LLAMA_CLIENT, tmp_path, "http://127.0.0.1:%d" % worker.port,
                     vastworker.made_up_words(0))
    assert out["too_long"][:3] == ["BadRequestError", 400, "exceed_context_size_error"]  # the server's, as it said
    assert "exceeds the available context size (256 tokens)" in out["too_long"][3]
    assert out["chat"][0] <= 5 and out["stream"][1] in ("length", "stop")
    # the model server dies; its launcher starts it again on the same port: loaded again, as it was
    server.proc.kill()
    failed = autoscaler.wait_for(lambda r: r["error_msg"], timeout=20)[-1]
    assert failed["error_msg"].startswith("model health check %s/health answered " % server.url)
    status, headers, body = worker.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 503 and json.loads(body)["error"]["message"] == "the model server is not healthy; retry later"
    assert b"127.0.0.1" not in body and headers["Retry-After"] == "5"
    seen = len(autoscaler.records())
    restarted = time.monotonic()
    llama_server("-c", "1024", "-np", "4", port=server.port)
    again = wait_until(lambda: [r for r in autoscaler.records()[seen:] if r["loadtime"] > 0 and not r["error_msg"]],
                       timeout=20)[0]
    print("llama-server restarted: loaded again after %.1f s" % (time.monotonic() - restarted))
    assert (again["max_perf"], again["loadtime"]) == (loaded["max_perf"], loaded["loadtime"])  # not benchmarked again
    assert worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


@needs_llama_server
@pytest.mark.slow
def test_a_client_hanging_up_mid_stream_frees_the_real_llama_servers_slot(start_worker, llama_server, tmp_path):
    server = llama_server("-c", "4096", "-np", "1")  # one slot, room for a long generation
    worker = start_worker("openai", "--cache-dir", str(tmp_path), env={
        "MODEL_SERVER_URL": server.url, "MODEL_LOG": str(server.log), "BENCHMARK_MAX_TOKENS": "4"})
    worker.wait_for_log("loaded after", timeout=120)
    connection, response = open_stream(worker, "/v1/completions", {"prompt": "Once upon", "max_tokens": 5,
                                                                   "stream": True})
    events = list(sse_data(response))
    assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1])
    connection.close()
    # llama-server logs "stop processing: n_tokens = N" as a slot is released, N the tokens in it:
    # a generation of 4000 tokens stopped by the hang-up releases far fewer
    released = lambda: re.findall(r"stop processing: n_tokens = (\d+)", server.text())  # noqa: E731
    before = len(released())
    connection, response = open_stream(worker, "/v1/completions", {"prompt": "Once upon", "max_tokens": 4000,
                                                                   "stream": True})
    next(sse_data(response))
    connection.close()  # mid-generation: llama-server must hear of it and stop
    wait_until(lambda: len(released()) > before, timeout=30,
               failure=lambda: "llama-server did not stop:\n" + server.text()[-2000:])
    assert int(released()[-1]) < 1000
    worker.wait_for_log(r"POST /v1/completions 200 aborted")
    status, data = worker.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})  # the slot is free
    assert status == 200 and data["usage"]["completion_tokens"] <= 3


def test_the_tgi_backend_relays_generate_and_its_stream_as_tgi_writes_them(start_worker, fake_model, tmp_path):
    fake = fake_model("tgi")
    worker = model_worker(start_worker, "tgi", fake, tmp_path)
    status, headers, body = worker.request("POST", "/generate", {"inputs": "hi", "parameters": {
        "max_new_tokens": 3, "details": True}})
    assert status == 200 and json.loads(body) == {"generated_text": "tok0 tok1 tok2 ", "details": {
        "finish_reason": "length", "generated_tokens": 3, "seed": None}}
    assert headers["x-generated-tokens"] == "3" and headers["x-prompt-tokens"] == "1"  # TGI's headers pass
    connection, response = open_stream(worker, "/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    raw = response.read().decode()
    assert raw.startswith(":\n\ndata:{")  # TGI's keep-alive comment, and its "data:" with no space, as sent
    events = [json.loads(line[5:]) for line in raw.split("\n") if line.startswith("data:")]
    assert [e["token"]["text"] for e in events] == ["tok0 ", "tok1 "] and events[-1]["generated_text"] == "tok0 tok1 "
    connection.close()
    connection, response = open_stream(worker, "/generate_stream", {"inputs": "[[close-after:1]]",
                                                                    "parameters": {"max_new_tokens": 3}})
    events = list(sse_data(response))
    assert json.loads(events[-1]) == {"error": "the model server broke off its answer: it closed the connection",
                                      "error_type": "upstream"}
    for body, detail in [({"parameters": {}}, "the request needs 'inputs'"),
                         ({"inputs": 5}, "'inputs' must be a string"),
                         ({"inputs": "x", "parameters": {"max_new_tokens": 0}},
                          "'parameters.max_new_tokens' must be a whole number of at least 1")]:
        status, data = worker.json("POST", "/generate", body)
        assert (status, data) == (400, {"error": detail, "error_type": "validation"})  # as TGI says its own
    assert not [r for r in fake.requests if r[2] and "parameters" in r[2] and r[2].get("inputs") in (None, 5, "x")]


HF_CLIENT = """
import json, sys
from huggingface_hub import InferenceClient

client = InferenceClient(sys.argv[1])
out = {"text": client.text_generation("hi", max_new_tokens=3)}
out["stream"] = [token for token in client.text_generation("hi", max_new_tokens=3, stream=True)]
details = client.text_generation("hi", max_new_tokens=2, details=True)
out["details"] = [details.generated_text, details.details.generated_tokens]
try:
    list(client.text_generation("[[close-after:1]]", max_new_tokens=3, stream=True))
    out["broken"] = "no error"
except Exception as exc:
    out["broken"] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hf_client():
    """Hugging Face's own TGI client (huggingface_hub's InferenceClient), where it can be installed."""
    return venv_or_skip("hf-client", "huggingface_hub>=0.24,<1", "huggingface_hub")


@pytest.mark.slow
def test_hugging_faces_tgi_client_works_through_the_worker_unchanged(start_worker, fake_model, tmp_path, hf_client):
    fake = fake_model("tgi")
    worker = model_worker(start_worker, "tgi", fake, tmp_path)
    out = run_client(hf_client, HF_CLIENT, tmp_path, "http://127.0.0.1:%d" % worker.port,
                     env={"HF_HUB_DISABLE_TELEMETRY": "1"})
    print("huggingface_hub's client through the worker:", json.dumps(out))
    assert out["text"] == "tok0 tok1 tok2 " and out["stream"] == ["tok0 ", "tok1 ", "tok2 "]
    assert out["details"] == ["tok0 tok1 ", 2]
    assert out["broken"].endswith("the model server broke off its answer: it closed the connection")


def test_a_fatal_line_in_the_model_servers_log_fails_the_worker_with_it(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm", open=False)
    model_log = tmp_path / "model.log"
    worker = model_worker(start_worker, "openai", fake, tmp_path, loaded=False, MODEL_LOG=str(model_log))
    with open(str(model_log), "a") as log:
        log.write("INFO loading weights\nRuntimeError: Engine core initialization failed. See root cause above.\n")
    worker.wait_for_log("the backend failed: model log: RuntimeError: Engine core initialization failed")
    status, data = worker.json("GET", "/v1/models")  # the operator reads why; the client, where to look
    assert status == 503 and data["error"]["message"] == "the backend failed; the worker's log says why"


def benchmark_payloads(fake, path):
    """The payloads the worker's benchmark sent `fake` at `path`, in order."""
    return [r[2] for r in fake.requests if r[0] == "POST" and r[1] == path]


def test_the_openai_benchmark_fits_the_context_the_model_server_states(start_worker, fake_model, tmp_path):
    fake = fake_model("llamacpp", context=256)  # 256 tokens a slot (/props), as llama-server -c 1024 -np 4
    fake.loaded()
    worker = model_worker(start_worker, "openai", fake, tmp_path, BENCHMARK_MAX_TOKENS="256")
    worker.wait_for_log(r"benchmark: the model server takes 256 tokens a request; prompts of 21 words, at most 64")
    sent = benchmark_payloads(fake, "/v1/completions")
    assert len(sent) == 21 and {p["max_tokens"] for p in sent} == {64}  # a warm-up and 2 rounds of 10
    assert all(len(p["prompt"].split()) == 21 and len(p["prompt"]) // 4 + 64 < 256 for p in sent)
    status = worker.json("GET", "/.vastworker/status")[1]
    assert status["phase"] == "loaded" and status["max_perf"] > 0
    # the default benchmark's prompts of 250 words would have been refused; a client's still are, as the
    # server refuses them (status and body as it gave them)
    status, data = worker.json("POST", "/v1/completions", {"prompt": vastworker.made_up_words(0), "max_tokens": 8})
    assert status == 400 and data["error"]["type"] == "exceed_context_size_error"
    assert data["error"]["message"].endswith("exceeds the available context size (256 tokens), try increasing it")


@pytest.mark.parametrize("flavor, says", [("vllm", "max_model_len in /v1/models"), ("ollama", "num_ctx in /api/show")])
def test_the_openai_benchmark_reads_each_servers_own_statement_of_its_context(start_worker, fake_model, tmp_path,
                                                                              flavor, says):
    fake = fake_model(flavor, context=512)
    worker = model_worker(start_worker, "openai", fake, tmp_path, BENCHMARK_MAX_TOKENS="256",
                          MODEL_HEALTH_ENDPOINT=fake.url + ("/api/version" if flavor == "ollama" else "/health"))
    worker.wait_for_log(r"benchmark: the model server takes 512 tokens a request; prompts of 42 words, at most 128")
    assert {len(p["prompt"].split()) for p in benchmark_payloads(fake, "/v1/completions")} == {42}, says


def test_a_refused_benchmark_is_made_smaller_then_fails_naming_the_servers_reason(start_worker, fake_model, tmp_path,
                                                                                   autoscaler):
    fake = fake_model("llamacpp", context=250, stated=4096)  # it says 4096 tokens, and takes 250
    fake.loaded()
    worker = model_worker(start_worker, "openai", fake, tmp_path, BENCHMARK_MAX_TOKENS="256")
    worker.wait_for_log(r"benchmark: the warm-up was refused \(400 request \(\d+ tokens\) exceeds the available "
                        r"context size \(250 tokens\), try increasing it\): trying smaller requests")
    assert {len(p["prompt"].split()) for p in benchmark_payloads(fake, "/v1/completions")} == {250, 125}
    fake = fake_model("llamacpp", context=1, stated=4096)  # it takes nothing at all
    fake.loaded()
    worker = model_worker(start_worker, "openai", fake, tmp_path / "none", loaded=False, **reporting_env(autoscaler))
    failed = autoscaler.wait_for(lambda r: r["error_msg"], timeout=20)[0]["error_msg"]
    assert re.fullmatch(r"benchmark: no successful response from POST /v1/completions: 400 request \(\d+ tokens\) "
                        r"exceeds the available context size \(1 tokens\), try increasing it", failed), failed
    assert {len(p["prompt"].split()) for p in benchmark_payloads(fake, "/v1/completions")} == {250, 125, 62, 31}
    worker.wait_for_log(r'WARNING benchmark: POST http://\S+/v1/completions answered 400: \{"error": \{"code": 400, ')


def test_the_tgi_backend_fits_its_benchmark_to_tgi_and_passes_its_own_routes(start_worker, fake_model, tmp_path):
    fake = fake_model("tgi", context=300)  # /info: max_total_tokens 300
    worker = model_worker(start_worker, "tgi", fake, tmp_path, BENCHMARK_MAX_TOKENS="128")
    sent = benchmark_payloads(fake, "/generate")
    assert len(sent) == 21 and {p["parameters"]["max_new_tokens"] for p in sent} == {75}
    status, headers, body = worker.request("GET", "/info")
    assert status == 200 and json.loads(body)["max_total_tokens"] == 300
    assert worker.request("GET", "/health")[0] == 200
    status, headers, body = worker.request("GET", "/metrics")  # TGI's, and the worker's own beside it
    assert status == 200 and body.startswith(b"# TYPE tgi_request_count counter\n")
    assert b"vastworker_requests_in_flight" in worker.request("GET", "/.vastworker/metrics")[2]
    status, data = worker.json("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 300}})
    assert (status, data) == (422, {"error": "`inputs` tokens + `max_new_tokens` must be <= 300. Given: 1 `inputs` "
                                             "tokens and 300 `max_new_tokens`", "error_type": "validation"})


COMFY_WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
    "3": {"class_type": "KSampler", "inputs": {"steps": 3, "model": ["4", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}


def comfy_workflow(steps=3, **changes):
    workflow = json.loads(json.dumps(COMFY_WORKFLOW))
    workflow["3"]["inputs"]["steps"] = steps
    workflow.update(changes)
    return workflow


def test_the_comfyui_backend_runs_a_workflow_and_returns_its_images(start_worker, fake_model, tmp_path):
    fake = fake_model("comfyui", step_delay=0.002)
    worker = model_worker(start_worker, "comfyui", fake, tmp_path)
    status, data = worker.json("POST", "/generate", {"workflow": comfy_workflow()})
    assert status == 200 and len(data["images"]) == 1
    assert base64.b64decode(data["images"][0]["base64"]).startswith(b"\x89PNG")
    status, data = worker.json("POST", "/generate", {"prompt": comfy_workflow(), "images": "url"})
    url = data["images"][0]["url"]
    assert status == 200 and url.startswith("/view?filename=ComfyUI_") and "base64" not in data["images"][0]
    status, headers, body = worker.request("GET", url)
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    status, data = worker.json("POST", "/generate", {"workflow": comfy_workflow(**{"8": {"class_type": "FailNode"}})})
    assert (status, data["detail"]) == (500, "the workflow failed in ComfyUI: FailNode failed")
    bad = comfy_workflow()
    bad["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    status, data = worker.json("POST", "/generate", {"workflow": bad})
    assert (status, data["detail"]) == (400, "ComfyUI refused the workflow: Prompt outputs failed validation; node 4 "
                                             "(CheckpointLoaderSimple): Value not in list ckpt_name: "
                                             "'missing.safetensors' not in []")
    seen = len(fake.requests)
    for body, detail in [({"workflow": {}}, "'workflow' must be a workflow in ComfyUI's API format"),
                         ({"workflow": {"1": {"inputs": {}}}}, "workflow node '1' must be an object with a 'class_type'"),
                         ({"workflow": comfy_workflow(), "images": "png"}, "'images' must be \"base64\" or \"url\"")]:
        status, data = worker.json("POST", "/generate", body)
        assert status == 400 and data["detail"].startswith(detail)
    assert len(fake.requests) == seen


def test_comfyui_progress_streams_as_ndjson(start_worker, fake_model, tmp_path):
    fake = fake_model("comfyui", step_delay=0.002)
    worker = model_worker(start_worker, "comfyui", fake, tmp_path)
    fake.step_delay = 0.1
    connection, response = open_stream(worker, "/generate", {"workflow": comfy_workflow(steps=15), "stream": True})
    assert response.getheader("Content-Type") == "application/x-ndjson"
    lines = [json.loads(line) for line in response.read().decode().splitlines()]
    assert {line["status"] for line in lines[:-1]} <= {"queued", "running"} and "running" in [l["status"] for l in lines]
    steps = [(line["step"], line["steps"]) for line in lines if "step" in line]  # from ComfyUI's websocket
    assert steps and steps == sorted(steps) and all(total == 15 for _, total in steps)
    assert lines[-1]["status"] == "done" and base64.b64decode(lines[-1]["images"][0]["base64"]).startswith(b"\x89PNG")
    connection.close()


def send_without_reading(worker, path, payload):
    """A request sent on a socket of its own, left open: close it to hang up."""
    sock = socket.create_connection(("127.0.0.1", worker.port))
    body = json.dumps(payload).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def test_a_comfyui_client_hanging_up_interrupts_its_job_or_takes_it_off_the_queue(start_worker, fake_model, tmp_path):
    fake = fake_model("comfyui", step_delay=0.002)
    worker = model_worker(start_worker, "comfyui", fake, tmp_path)
    fake.step_delay = 0.05
    first = send_without_reading(worker, "/generate", {"workflow": comfy_workflow(steps=400)})
    wait_until(lambda: fake.comfy.running is not None)
    second = send_without_reading(worker, "/generate", {"workflow": comfy_workflow(steps=400)})
    wait_until(lambda: fake.comfy.pending)
    second.close()  # waiting in ComfyUI's queue: deleted from it, the running job left alone
    fake.wait_for(lambda f: f.aborted == ["/queue delete"])
    assert fake.interrupts == 0
    first.close()  # running: interrupted
    fake.wait_for(lambda f: f.aborted == ["/queue delete", "/interrupt"])
    worker.wait_for_log(r"comfyui: job \S+ cancelled \(interrupted\): its client left")
    worker.wait_for_log(r"POST /generate 499")


def test_comfyuis_workload_is_in_proportion_to_pixels_and_steps(monkeypatch):
    module = shipped_backend(monkeypatch, "comfyui")
    assert module.cost({"1": {"class_type": "KSampler", "inputs": {"steps": 20}}}) == 100.0
    assert module.cost({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 2}},
                        "2": {"class_type": "KSampler", "inputs": {"steps": 30}}}) == 100.0 * 8 * 1.5


def upstream_pair(data):
    """An UpstreamConnection over a socket pair whose other end has sent `data` and closed."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.close()
    return vastworker.UpstreamConnection(ours), vastworker.ClientWatch(None)


def test_upstream_answers_are_read_strictly():
    connection, watch = upstream_pair(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n")
    answer = connection.read_head("GET", watch, 1)
    assert (answer.status, answer.pairs, answer.framing) == (
        200, [("X-A", "1"), ("Transfer-Encoding", "chunked")], ("chunked", None))
    assert b"".join(connection.pieces(answer.framing, watch, 1)) == b"hello"
    assert connection.buffer == b""
    for bad in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"):
        connection, watch = upstream_pair(bad)
        answer = connection.read_head("GET", watch, 1)
        with pytest.raises(vastworker.UpstreamFailed):
            b"".join(connection.pieces(answer.framing, watch, 1))
    for bad in (b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n bad: fold\r\n\r\n", b"HTTP/1.1 200",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"):
        connection, watch = upstream_pair(bad)
        with pytest.raises(vastworker.UpstreamFailed):
            connection.read_head("GET", watch, 1)
    assert vastworker.ResponseHead(b"HTTP/1.1 200 OK\r\nContent-Length: 5", "HEAD").framing == ("length", 0)
    assert vastworker.ResponseHead(b"HTTP/1.1 200 OK", "GET").framing == ("close", None)
    assert vastworker.ResponseHead(b"HTTP/1.1 204 No Content", "GET").framing == ("length", 0)
    assert vastworker.stream_error("application/x-ndjson", "gone") == b'{"error": "gone"}\n'
    assert vastworker.stream_error("application/json", "gone") is None


# ------------------------------------------------------------------------------------------------
# 6. Tools: RSA signatures against openssl, the stand-in autoscaler end to end
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pem", ["spki.pem", "pkcs1.pem"])
def test_verification_agrees_with_openssl(keys, pem):
    import base64
    import vastworker
    key = vastworker.RSAPublicKey.from_pem((keys / pem).read_text())
    message = b"message one"
    good = openssl_sign(keys / "autoscaler.key", message)
    stranger = openssl_sign(keys / "stranger.key", message)
    raw = base64.b64decode(good)
    cases = {
        "valid": (message, good, True),
        "tampered message": (b"message two", good, False),
        "wrong key": (message, stranger, False),
        "truncated": (message, base64.b64encode(raw[:-1]).decode(), False),
        "one byte flipped": (message, base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode(), False),
        "not base64": (message, "!" + good[1:], False),
        "empty": (message, "", False),
        "signature above the modulus": (message, base64.b64encode(b"\xff" * 256).decode(), False),
    }
    assert {name: key.verify(m, sig) for name, (m, sig, _) in cases.items()} == {
        name: expected for name, (_, _, expected) in cases.items()}
    # and openssl accepts a signature made by vastworker's own signer (the stand-in's)
    private = vastworker.RSAPrivateKey.generate(1024)
    (keys / "ours.pem").write_text(private.public_pem())
    (keys / "ours.sig").write_bytes(base64.b64decode(private.sign(message)))
    verified = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(keys / "ours.pem"), "-signature",
                               str(keys / "ours.sig")], input=message, stdout=subprocess.PIPE)
    assert verified.stdout.strip() == b"Verified OK"


def test_route_signed_request_over_https_end_to_end(start_worker, autoscaler, keys):
    port = free_port()
    env = {"REPORT_ADDR": autoscaler.url, "CONTAINER_ID": "9", "MASTER_TOKEN": "secret",
           "PUBLIC_IPADDR": "127.0.0.1", "VAST_TCP_PORT_%d" % port: str(port)}
    worker = start_worker("helloworld", "--certfile", str(keys / "tls.crt"), "--keyfile", str(keys / "tls.key"),
                          port=str(port), env=env)
    worker.wait_for_log("public key from %s/pubkey/" % autoscaler.url)
    autoscaler.wait_for(lambda r: r["loadtime"] > 0 and r["url"] == "https://127.0.0.1:%d" % port)
    status, grant = autoscaler.json("POST", "/route/", {"endpoint": "hello", "cost": 1.0})
    assert status == 200 and grant["url"] == "https://127.0.0.1:%d" % port

    def call(body):
        connection = https_connection(port, keys)
        connection.request("POST", "/increment", body=json.dumps(body), headers=JSON)
        response = connection.getresponse()
        return response.status, response.read()

    assert call({"auth_data": grant, "payload": {"amount": 3}}) == (200, b"Incremented")
    assert call({"auth_data": grant, "payload": {"amount": 3}})[0] == 200  # the stand-in signs g4, as Vast
    # does: the url alone, so a replay is a new request to this worker (g1 and g3 refuse it: above)
    assert call({"auth_data": dict(grant, url="https://127.0.0.1:1"), "payload": {"amount": 3}})[0] == 401  # tampered
    assert call({"amount": 3})[0] == 401  # unsigned
    status, grant = autoscaler.json("POST", "/route/", {"endpoint": "hello", "cost": 1.0})
    assert call(dict(grant, amount=4)) == (200, b"Incremented")  # the flat form of the original
    connection = https_connection(port, keys)
    connection.request("GET", "/value", body="{}", headers=JSON)
    assert connection.getresponse().status == 401  # reading needs a grant as well
    status, listed = autoscaler.json("POST", "/get_endpoint_workers/", {"id": 1, "api_key": "k"})
    assert status == 200 and [(w["id"], w["status"], w["perf"]) for w in listed] == [(9, "RUNNING", 100.0)]


def test_the_stand_in_does_not_show_master_tokens(start_worker, autoscaler):
    start_worker("helloworld", env=reporting_env(autoscaler))
    record = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[0]
    assert "secret" not in json.dumps(autoscaler.records())
    assert record["mtoken"] == "(hidden)" and record["mtoken_matches"] is True


class Fleet:
    """A stand-in autoscaler and workers reporting to it on known ports, grants required, every
    wait of theirs ten times shorter: what `vastworker.py fleet` runs, built by hand."""

    def __init__(self, start_worker, backend, env):
        self.start_worker, self.backend, self.env = start_worker, backend, env
        self.stand_in = start_worker("autoscaler", env={"MASTER_TOKEN": "secret", "VASTWORKER_TIME_SCALE": "0.1"})
        self.workers, self.numbers = {}, {}  # url -> WorkerProcess, its CONTAINER_ID

    def add(self, number, port=None):
        port = port or free_port()
        env = dict(self.env, REPORT_ADDR="http://127.0.0.1:%d" % self.stand_in.port, MASTER_TOKEN="secret",
                   CONTAINER_ID=str(number), PUBLIC_IPADDR="127.0.0.1", VASTWORKER_TIME_SCALE="0.1",
                   **{"VAST_TCP_PORT_%d" % port: str(port)})
        url = "http://127.0.0.1:%d" % port
        self.workers[url] = self.start_worker(self.backend, port=str(port), env=env)
        self.numbers[url] = number
        return url

    def running(self):
        status, listed = self.stand_in.json("POST", "/get_endpoint_workers/", {"id": 1})
        return sorted(worker["id"] for worker in listed if worker["status"] == "RUNNING")

    def route(self, cost=100.0):
        status, grant = self.stand_in.json("POST", "/route/", {"endpoint": "fast", "cost": cost})
        assert status == 200 and "url" in grant, grant
        return grant

    def call(self, grant, path="/fast"):
        worker = self.workers[grant["url"]]
        return worker.request("GET", path, {"auth_data": grant, "payload": {}})[0]


@pytest.fixture
def fleet(start_worker, hold):
    """Three workers of the Hold backend behind a stand-in, all loaded and routable."""
    held = hold()
    made = Fleet(start_worker, held.backend, held.env)
    made.held = held
    for number in (1, 2, 3):
        made.add(number)
    wait_until(lambda: made.running() == [1, 2, 3], timeout=20)
    return made


def test_a_burst_of_routes_is_spread_over_idle_workers(fleet):
    shares = collections.Counter(fleet.route()["url"] for _ in range(30))  # nothing reported in between
    assert sorted(shares) == sorted(fleet.workers) and all(7 <= share <= 13 for share in shares.values()), shares


def test_a_worker_running_a_slow_request_gets_little_of_what_follows(fleet):
    slow = fleet.route(cost=1000.0)  # a large request: its cost says so
    caller = threading.Thread(target=fleet.call, args=(slow, "/hold"))
    caller.start()
    fleet.held.wait_started()
    shares = collections.Counter()
    for _ in range(12):
        grant = fleet.route()
        assert fleet.call(grant) == 200
        shares[grant["url"]] += 1
    assert shares[slow["url"]] <= 2, shares
    fleet.held.release()
    caller.join(10)


@pytest.mark.slow
def test_ten_clients_of_a_hundred_requests_share_the_workers_evenly(fleet):
    shares, lock = collections.Counter(), threading.Lock()

    def client():
        for _ in range(100):
            grant = fleet.route()
            assert fleet.call(grant) == 200
            with lock:
                shares[grant["url"]] += 1

    clients = [threading.Thread(target=client) for _ in range(10)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert sum(shares.values()) == 1000 and max(shares.values()) / min(shares.values()) <= 1.5, shares


def test_a_worker_stopping_is_routed_nothing_from_its_first_word(fleet):
    grant = fleet.route()
    leaving = fleet.workers[grant["url"]]
    caller = threading.Thread(target=fleet.call, args=(grant, "/hold"))  # it has a request to drain
    caller.start()
    fleet.held.wait_started()
    leaving.proc.send_signal(signal.SIGTERM)
    stopping = wait_until(lambda: [r for r in fleet.stand_in.json("GET", "/records")[1]
                                   if r.get("stopping") and r["url"] == grant["url"]])
    assert stopping[0]["loadtime"] == 0 and stopping[0]["max_perf"] == 0  # not ready for traffic, to Vast too
    assert leaving.proc.poll() is None  # still draining, and no longer routed to
    assert grant["url"] not in {fleet.route()["url"] for _ in range(9)}
    fleet.held.release()
    caller.join(10)
    assert leaving.proc.wait(10) == 0


def test_a_worker_killed_is_out_within_seconds_and_back_when_it_returns(fleet):
    victim_url = fleet.route()["url"]
    victim = fleet.workers[victim_url]
    victim.proc.kill()
    victim.proc.wait()
    fleet.stand_in.wait_for_log(r"worker \d at %s does not answer" % re.escape(victim_url), timeout=10)
    for _ in range(9):  # from then on every grant leads to a worker that serves it
        assert fleet.call(fleet.route()) == 200
    fleet.add(fleet.numbers[victim_url], port=int(victim_url.rsplit(":", 1)[1]))  # it comes back
    wait_until(lambda: fleet.route()["url"] == victim_url, timeout=20)


class FleetCommand:
    """`python3 -I -S vastworker.py fleet ...` as a user runs it: its output read as it comes."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", VASTWORKER, "fleet"] + list(args), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines, self.changed = [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.decode())
                self.changed.notify_all()

    def wait_for(self, pattern, timeout=30):
        with self.changed:
            assert self.changed.wait_for(lambda: re.search(pattern, "".join(self.lines), re.MULTILINE), timeout), \
                "".join(self.lines)[-3000:]
            return re.search(pattern, "".join(self.lines), re.MULTILINE)


def test_the_fleet_command_runs_a_stand_in_and_workers_and_leaves_nothing_behind():
    port = free_port()
    fleet = FleetCommand("helloworld", "--workers", "3", "--port", str(port))
    try:
        fleet.wait_for(r"Ctrl-C stops them all")
        out = "".join(fleet.lines)
        workers = re.findall(r"^  worker (\d)  (http://127\.0\.0\.1:\d+)  pid (\d+)$", out, re.MULTILINE)
        assert [number for number, _, _ in workers] == ["1", "2", "3"], out
        stand_in = re.search(r"the autoscaler stand-in on (http://127\.0\.0\.1:%d)" % port, out).group(1)
        pids = [int(pid) for _, _, pid in workers]
        pids.append(int(subprocess.run(["pgrep", "-f", "vastworker.py autoscaler --host 127.0.0.1 --port %d" % port],
                                       stdout=subprocess.PIPE).stdout.split()[0]))
        for pid in pids + [fleet.proc.pid]:  # each shows as vastworker: its name and its command line
            with open("/proc/%d/comm" % pid) as file:
                assert file.read().strip() == "vastworker"
            with open("/proc/%d/cmdline" % pid, "rb") as file:
                assert b"vastworker.py" in file.read()
        assert re.search(r'curl -s -X GET "\$url/value"', out)  # the example names a real route
        # the example's steps: a grant from the stand-in, then the worker it names, signed grants required
        granted = wait_until(lambda: (lambda answer: answer if "url" in answer else None)(json.loads(
            http_exchange_json(stand_in + "/route/", {"endpoint": "value", "cost": 100}))), timeout=20)
        status, body = http_exchange_json(granted["url"] + "/value", {"auth_data": granted, "payload": {}},
                                          method="GET", status=True)
        assert status == 200 and json.loads(body) == {"value": 0}
        assert http_exchange_json(granted["url"] + "/value", {}, method="GET", status=True)[0] == 401
        os.kill(pids[1], signal.SIGKILL)  # a worker dies: the fleet says so
        fleet.wait_for(r"worker 2 \(pid %d\) was killed by SIGKILL" % pids[1])
        fleet.proc.send_signal(signal.SIGTERM)
        try:
            code = fleet.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = "still running 30 s after SIGTERM"
        assert code == 0, "".join(fleet.lines)[-3000:]  # what it said, should a process not stop
        fleet.wait_for(r"vastworker fleet: stopped")
        assert [pid for pid in pids if os.path.exists("/proc/%d" % pid)] == []  # nothing left behind
    finally:
        if fleet.proc.poll() is None:
            fleet.proc.kill()


def test_a_fleet_whose_workers_cannot_start_says_why_and_exits_1():
    code, output = run_cli("fleet", "nosuchbackend", "--workers", "2", "--port", str(free_port()), timeout=60)
    ended = re.search(r"vastworker fleet: (worker \d)(?:, worker \d)* exited during start-up", output)
    assert code == 1 and ended, output
    # the one that ended first says why (the other may be stopped before it could say anything)
    assert "[%s] vastworker: error: no backend 'nosuchbackend'" % ended.group(1) in output, output
    assert output.rstrip().endswith("vastworker fleet: stopped"), output


def http_exchange_json(url, payload, method="POST", status=False):
    """POST (or `method`) `payload` as JSON to `url`: its body, or (status, body)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request(method, parts.path, body=json.dumps(payload), headers=JSON)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return (response.status, body) if status else body


def test_the_stand_in_and_the_fleet_have_help_of_their_own():
    code, output = run_cli("autoscaler", "--help")
    assert code == 0 and "A local stand-in for Vast's autoscaler" in output and "(default 8081)" in output
    assert "--max-body" not in output and "BACKEND is a directory" not in output  # a worker's, not its
    code, output = run_cli("fleet", "--help")
    assert code == 0 and "--workers N" in output and "Options it does not know go to each worker" in " ".join(output.split())


PAGE_CLIENT = """
import json, os, signal, sys, urllib.request
from playwright.sync_api import sync_playwright

page_url, victim_url, victim_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
out, outside, errors = {}, [], []

def post(url, body, method="POST"):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"},
                                     method=method)
    return urllib.request.urlopen(request, timeout=10).read()

with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(page_url) else outside.append(request.url))
    page.goto(page_url)
    page.wait_for_function("document.querySelectorAll('[data-worker]').length == 3 && "
                           "[...document.querySelectorAll('[data-worker]')].every(r => r.textContent.includes('ready'))")
    out["rows"] = page.eval_on_selector_all("[data-worker]", "rows => rows.map(r => r.dataset.worker)")
    routed = []
    for _ in range(6):  # while the page is open: it must show them without a reload
        grant = json.loads(post(page_url + "route/", {"endpoint": "fast", "cost": 100}))
        post(grant["url"] + "/fast", {"auth_data": grant, "payload": {}}, method="GET")
        routed.append(grant["request_idx"])
    page.wait_for_function("%d <= document.querySelectorAll('[data-request]').length" % len(routed))
    out["requests"] = page.eval_on_selector_all("[data-request]", "items => items.map(i => [+i.dataset.request, "
                                                "i.textContent.split(' ')[1]])")
    out["routed"] = routed
    os.kill(victim_pid, signal.SIGTERM)
    page.wait_for_function("(document.querySelector('[data-worker=\\"%s\\"]') || {}).textContent.includes('stopped')"
                           % victim_url)
    out["stopped"] = True
    page.screenshot(path=os.environ.get("PAGE_SCREENSHOT", "/dev/null"), type="png")
    browser.close()
out["errors"], out["outside"] = errors, outside
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_stand_ins_live_page_in_a_real_browser(fleet, tmp_path):
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    python = venv_or_skip("playwright", "playwright>=1.40,<2", "Playwright")
    victim_url = sorted(fleet.workers)[0]
    out = run_client(python, PAGE_CLIENT, tmp_path, "http://127.0.0.1:%d/" % fleet.stand_in.port, victim_url,
                     fleet.workers[victim_url].proc.pid, env={"PAGE_SCREENSHOT": str(tmp_path / "page.png")})
    assert sorted(out["rows"]) == sorted(fleet.workers)
    assert {idx for idx, word in out["requests"] if word == "success"} >= set(out["routed"])
    assert out["stopped"] and out["errors"] == [] and out["outside"] == []


def test_the_stand_in_keeps_bounded_records(start_worker):
    stand_in = start_worker("autoscaler")
    for number in range(1100):
        assert stand_in.json("POST", "/worker_status/", {"id": number, "loadtime": 0.0})[0] == 200
    records = stand_in.json("GET", "/records")[1]
    assert len(records) == 1000 and records[-1]["id"] == 1099  # the newest kept, the oldest dropped
    listed = stand_in.json("POST", "/get_endpoint_workers/", {"id": 1})[1]
    assert len(listed) == 1000 and min(worker["id"] for worker in listed) == 100  # and so the workers


# ------------------------------------------------------------------------------------------------
# 7. Command line: options, start-up failures, Python versions, stopping
# ------------------------------------------------------------------------------------------------

def test_help_explains_options_and_environment():
    code, output = run_cli("--help")
    assert code == 0
    for word in ("--host", "--port", "--max-body", "--timeout", "--queue-time", "--grace",
                 "--log-level", "--quiet", "WORKER_PORT", "AUTH_PORT", "CONTAINER_ID",
                 "MASTER_TOKEN", "REPORT_ADDR", "MODEL_LOG", "PUBLIC_IPADDR", "--cache-dir",
                 "autoscaler", "allow_parallel_requests"):
        assert word in output


def settings_of(argv, environ=None, module_source=None, tmp_path=None):
    """Settings resolved in-process from a command line, an environment and a backend.py."""
    settings = vastworker.Settings(vastworker.make_parser().parse_args(argv), environ or {})
    if module_source is not None:
        module = types.ModuleType("backend")
        exec(module_source, module.__dict__)
        settings.add_backend(module, "backend.py")
    return settings


def test_a_flag_wins_over_a_variable_which_wins_over_backend_py_which_wins_over_the_default():
    assert (settings_of(["b"]).port, settings_of(["b"]).source["port"]) == (3000, "default")
    assert settings_of(["b"], {"AUTH_PORT": "7"}).port == 7
    assert settings_of(["b"], {"WORKER_PORT": "8", "AUTH_PORT": "7"}).port == 8
    assert settings_of(["b", "--port", "9"], {"WORKER_PORT": "8"}).source["port"] == "--port"
    assert settings_of(["b"], {"UNSECURED": "TRUE"}).allow_unsigned is True
    assert settings_of(["b"], {"UNSECURED": "no"}).allow_unsigned is False
    assert settings_of(["b", "--allow-unsigned"]).allow_unsigned is True
    settings = settings_of(["b"], {"MODEL_LOG": "/var/log/m"}, "model_log = '/tmp/m'\nreadiness = 'call'\n")
    assert (settings.model_log, settings.source["model_log"], settings.readiness) == ("/var/log/m", "$MODEL_LOG", "call")
    settings = settings_of(["b"], {}, "model_log = '/tmp/m'\n")
    assert (settings.model_log, settings.source["model_log"]) == ("/tmp/m", "backend.py: model_log")
    assert (settings.max_perf, settings.source["max_perf"], settings.readiness) == (100.0, "default", "start")
    assert settings_of(["b", "--max-body", "1K", "--timeout", "2.5"]).max_body == 1024


@pytest.mark.parametrize("argv, environ, module, message", [
    (["--timeout", "inf"], {}, None, "--timeout='inf' is not a positive, finite number"),
    (["--timeout", "0"], {}, None, "--timeout='0' is not a positive, finite number"),
    ([], {"WORKER_PORT": "x"}, None, "$WORKER_PORT='x' is not a port number (0-65535)"),
    (["--max-connections", "-3"], {}, None, "--max-connections='-3' is not a positive whole number"),
    (["--body-memory", "lots"], {}, None, "--body-memory='lots' is not a size like"),
    ([], {}, "max_perf = float('inf')", "backend.py: max_perf=inf is not a positive, finite number"),
    ([], {}, "max_perf = True", "backend.py: max_perf=True is not a positive, finite number"),
    ([], {}, "readiness = 'soon'", "backend.py: readiness='soon' is not one of start, log, call, health"),
    ([], {"MODEL_HEALTH_ENDPOINT": "localhost:8000"}, None,
     "$MODEL_HEALTH_ENDPOINT='localhost:8000' must be an http:// or https:// URL"),
])
def test_a_bad_setting_is_refused_naming_where_it_came_from(argv, environ, module, message):
    with pytest.raises(vastworker.StartupError) as raised:
        settings_of(["b"] + argv, environ, module or "")
    assert str(raised.value).startswith(message), raised.value


def test_every_setting_read_anywhere_is_in_the_one_table_and_its_document():
    """Nothing is configured outside SETTINGS: every variable the module, the backends and the
    scripts read, every attribute of backend.py and every flag is a row of it, and
    docs/settings.md is the table as the module makes it."""
    table = vastworker.SETTINGS
    variables = {name for setting in table for name in setting.env}
    reads = set()
    for path in [VASTWORKER] + glob.glob(os.path.join(ROOT, "backends", "*", "backend.py")):
        with open(path) as file:
            reads |= set(re.findall(r'environ(?:\.get\(|\[)"([A-Z][A-Z0-9_]*)"', file.read()))
    for path in [os.path.join(ROOT, "start_server.sh")] + glob.glob(os.path.join(ROOT, "backends", "*", "launch.sh")):
        with open(path) as file:
            reads |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", file.read()))
    not_settings = {"XDG_CACHE_HOME", "XDG_STATE_HOME", "CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_"}  # XDG bases; WSGI
    assert reads - not_settings - variables == set()
    assert len(reads) > 20  # the scan found what it looks for
    with open(VASTWORKER) as file:
        source = file.read()
    flags = set(re.findall(r"(--[a-z][a-z-]+)", run_cli("--help")[1].split("environment variables")[0]))
    assert flags == {setting.flag for setting in table if setting.flag} | {"--help", "--version"}
    assert set(re.findall(r'add_argument\("(--[a-z-]+)"', source)) == {"--version", "--workers", "--port", "--host",
                                                                       "--endpoint", "--api-key", "--wait"}
    # the rest come from the table; those are `fleet`'s and `doctor`'s own
    attributes = {setting.attribute for setting in table if setting.attribute}
    assert attributes >= {"readiness", "log_actions", "benchmark", "workload", "max_perf", "healthcheck",
                          "persist", "model_log", "allow_parallel_requests"}
    with open(os.path.join(ROOT, "docs", "settings.md")) as file:
        assert vastworker.settings_table() in file.read()


@pytest.mark.parametrize("source, message", [
    ("import no_such_module_here\n", r"ModuleNotFoundError: No module named 'no_such_module_here' \(at backend.py line 1\)"),
    ("x = (\n", r"failed to import: SyntaxError"),
    ("flask_dict = {'GET': {'v': print}}\n", r"defines no Backend class"),
    ("class Backend: pass\n", r"defines no flask_dict"),
    ("class Backend: pass\nflask_dict = [1]\n", r"flask_dict is a list, not a dict"),
    ("class Backend: pass\nflask_dict = {'PATCH': {'v': print}}\n", r"method 'PATCH' is not one of"),
    ("class Backend: pass\nflask_dict = {'GET': {'/v': print}}\n", r"endpoint '/v' must be a name"),
    ("class Backend: pass\nflask_dict = {'GET': {'v': 5}}\n", r"\['v'\] is not a function"),
    ("class Backend: pass\nflask_dict = {'GET': {}}\n", r"serves no endpoints"),
    ("class Backend:\n    def __init__(self):\n        raise RuntimeError('no GPU')\nflask_dict = {'GET': {'v': print}}\n",
     r"Backend\(\) failed: RuntimeError: no GPU \(at backend.py line 3\)"),
])
def test_broken_backend_fails_with_one_clear_line(write_backend, source, message):
    code, output = run_cli(write_backend(source))
    assert code == 1
    assert len(output.strip().splitlines()) == 1, output
    assert re.search(message, output), output


@pytest.mark.parametrize("spec, message", [
    ("nosuchbackend", r"no backend 'nosuchbackend' in .*backends \(available: .*helloworld"),
    ("helloworl", r"no backend 'helloworl' in .*backends; did you mean 'helloworld'\? \(available: "),
    ("../../etc", r"has no backend.py"),
    ("hello world", r"is not a backend name"),
])
def test_missing_backend_fails_clearly(spec, message):
    code, output = run_cli(spec)
    assert code == 1 and re.search(message, output), output


def test_port_from_environment_and_bad_port():
    code, output = run_cli("helloworld", "--port", "99999")
    assert code == 1 and "--port='99999' is not a port number" in output
    code, output = run_cli("helloworld", env={"WORKER_PORT": "abc"})
    assert code == 1 and "$WORKER_PORT='abc' is not a port number" in output


def test_port_in_use_is_reported(hello):
    code, output = run_cli("helloworld", "--host", "127.0.0.1", "--port", str(hello.port))
    assert code == 1
    assert "port %d is already in use" % hello.port in output


@pytest.mark.parametrize("variables", [{"AUTH_PORT": "{free}"},
                                       {"WORKER_PORT": "{free}", "AUTH_PORT": "{other}"}])
def test_port_from_worker_port_then_auth_port(start_worker, variables):
    free, other = free_port(), free_port()
    env = {"WORKER_PORT": "", "AUTH_PORT": ""}
    env.update({name: value.format(free=free, other=other) for name, value in variables.items()})
    worker = start_worker("helloworld", env=env, port=None)
    assert worker.port == free


def test_backend_constructor_gets_the_arguments_it_accepts(start_worker, write_backend):
    backend = write_backend("""
        class Backend:
            def __init__(self, container_id, master_token, control_server_url=None, send_data=False):
                self.seen = [container_id, master_token, control_server_url, send_data]

        class Plain:
            def __init__(self):
                self.seen = "plain"

        def seen(backend, request):
            return {"seen": backend.seen}

        flask_dict = {"GET": {"seen": seen}}
    """)
    env = {"CONTAINER_ID": "123", "MASTER_TOKEN": "tok", "REPORT_ADDR": "http://127.0.0.1:9", "UNSECURED": "1"}
    worker = start_worker(backend, env=env)
    assert worker.json("GET", "/seen") == (200, {"seen": ["123", "tok", "http://127.0.0.1:9", True]})
    plain = write_backend("""
        class Backend:
            def __init__(self):
                self.seen = "plain"

        flask_dict = {"GET": {"seen": lambda backend, request: {"seen": backend.seen}}}
    """)
    assert start_worker(plain, env=env).json("GET", "/seen") == (200, {"seen": "plain"})


def interpreters():
    """Every CPython 3.8-3.13 that pyenv has here (none on a machine without pyenv)."""
    found = {}
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))):
        match = re.search(r"/3\.(\d+)\.", path)
        if match and 8 <= int(match.group(1)) <= 13:
            found.setdefault("3." + match.group(1), path)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(interpreters()) or [None])
def test_helloworld_under_each_python(start_worker, version):
    if version is None:
        pytest.skip("no pyenv interpreters 3.8-3.13 on this machine")
    worker = start_worker("helloworld", python=interpreters()[version])
    assert worker.request("POST", "/increment", {"amount": 3})[:1] == (200,)
    assert worker.request("POST", "/increment", {"amount": 1e999})[0] == 400
    assert worker.value() == 3
    assert worker.stop() == 0


def test_old_python_is_refused_clearly():
    old = glob.glob(os.path.expanduser("~/.pyenv/versions/3.7.*/bin/python3"))
    if not old:
        pytest.skip("no Python 3.7 here")
    result = subprocess.run([old[0], "-I", "-S", VASTWORKER, "helloworld"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=20)
    assert result.returncode == 1
    assert b"vastworker needs Python 3.8 or newer; this is Python 3.7" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_requests_and_exits_0(start_worker, hold, sig):
    held = hold(non_daemon_thread=True)  # which must not keep the worker alive
    worker = start_worker(held.backend, env=held.env)
    results = []
    slow = threading.Thread(target=lambda: results.append(worker.request("GET", "/hold")))
    slow.start()
    held.wait_started()
    worker.proc.send_signal(sig)
    worker.wait_for_log(r"waiting up to 10 s for 1 request\(s\) in flight")
    assert ("Ctrl-C again to quit now" in worker.log) == (sig == signal.SIGINT)
    held.release()
    slow.join(10)
    assert results and results[0][0] == 200 and results[0][2] == b"held"
    assert results[0][1].get("Connection") == "close"
    assert worker.proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", worker.port), timeout=2).close()


def test_a_signal_that_comes_while_the_log_is_being_written_neither_waits_for_it_nor_is_lost(capfd):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    told = []
    stop = vastworker.StopSignal()
    stop.listen(again=lambda: told.append(vastworker.Log.last_words("second signal")))
    try:
        with vastworker.Log._writing:  # the main thread is writing the log when the signals come
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.wait(5) and stop.is_set() and stop.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: told)  # its handler ran, without the log's lock
        assert stop.signum == signal.SIGTERM  # the first one stays
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING second signal$", capfd.readouterr().err, re.M)
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])


def test_a_second_signal_exits_at_once_with_status_1(start_worker, hold):
    held = hold(non_daemon_thread=True)
    worker = start_worker(held.backend, env=held.env)
    outcome = []

    def slow_request():
        try:
            outcome.append(worker.request("GET", "/hold"))
        except OSError as exc:  # http.client.RemoteDisconnected is one
            outcome.append(exc)

    client = threading.Thread(target=slow_request)
    client.start()
    held.wait_started()  # and never released
    worker.proc.send_signal(signal.SIGINT)
    worker.wait_for_log(r"waiting up to 10 s for 1 request\(s\) in flight")
    worker.proc.send_signal(signal.SIGINT)  # Ctrl-C again: quit now
    assert worker.proc.wait(5) == 1
    worker.wait_for_log(r"WARNING second signal: exiting now")
    client.join(10)
    assert isinstance(outcome[0], OSError)  # its request was cut off, not answered


def test_grace_bounds_the_wait(start_worker, hold):
    held = hold(non_daemon_thread=True)
    worker = start_worker(held.backend, "--grace", "0.5", env=held.env)
    outcome = []

    def slow_request():
        try:
            outcome.append(worker.request("GET", "/hold"))
        except http.client.RemoteDisconnected as exc:
            outcome.append(exc)

    client = threading.Thread(target=slow_request)
    client.start()
    held.wait_started()  # and never released
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0
    assert time.monotonic() - started < 8
    worker.wait_for_log(r"stopping with 1 request\(s\) unfinished")
    client.join(10)
    assert isinstance(outcome[0], http.client.RemoteDisconnected)  # cut off after the grace time

def test_a_handler_that_cannot_take_backend_and_request_stops_the_start(write_backend):
    backend = write_backend("""
        class Backend:
            pass

        def value(request):
            return "never"

        flask_dict = {"GET": {"value": value, "fine": lambda backend, request, extra=1: "ok"}}
    """)
    code, output = run_cli(backend)
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert re.search(r"backend\.py line 5: the GET /value handler value\(request\) cannot take "
                     r"\(backend, request\)", output), output


@pytest.mark.parametrize("where", ["missing/state.json", "a-file/state.json"])
def test_a_state_file_that_cannot_be_written_stops_the_start(tmp_path, where):
    (tmp_path / "a-file").write_text("not a directory")
    code, output = run_cli("helloworld", "--port", "0", "--state-file", str(tmp_path / where))
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert re.search(r"vastworker: error: cannot (read|write) the state file %s: " % re.escape(str(tmp_path / where)),
                     output), output


@pytest.mark.parametrize("document, message", [
    ('{"state": ' * 100000 + "{}" + "}" * 100000, "nested too deeply"),
    ('{"state": {"count": 1}, "other": 1}', "unexpected keys: other"),
    ('{"state": {"__class__": 1}}', "'__class__'"),
    ('{"state": {}, "replay": {"recent": 5}}', "replay"),
], ids=["deep", "unknown-key", "private-name", "bad-replay"])
def test_a_state_file_that_cannot_be_restored_stops_start_up_in_one_line(tmp_path, document, message):
    state = tmp_path / "state.json"
    state.write_text(document)
    code, output = run_cli("helloworld", "--port", "0", "--state-file", str(state))
    assert code == 1 and len(output.strip().splitlines()) == 1, output[-2000:]
    assert "vastworker: error: the state file" in output and message in output
    assert state.read_text() == document


# ------------------------------------------------------------------------------------------------
# Bootstrap: start_server.sh and launch.sh, served from loopback as an instance would fetch them
# ------------------------------------------------------------------------------------------------

def project_files():
    """What a copy of the project holds: the module, the scripts and the backends."""
    files = ["vastworker.py", "start_server.sh", "README.md"]
    for directory, _, names in os.walk(os.path.join(ROOT, "backends")):
        files += [os.path.relpath(os.path.join(directory, name), ROOT) for name in names
                  if "__pycache__" not in directory]
    return files


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The project as a tarball and start_server.sh, served over HTTP like a release."""
    import tarfile
    directory = tmp_path_factory.mktemp("published")
    with tarfile.open(str(directory / "vastworker-main.tar.gz"), "w:gz") as archive:
        for name in project_files():
            archive.add(os.path.join(ROOT, name), "vastworker-main/" + name)
    (directory / "start_server.sh").write_bytes(open(os.path.join(ROOT, "start_server.sh"), "rb").read())
    server = StaticServer(str(directory))
    yield server
    server.close()


def process_running(pid):
    try:
        with open("/proc/%d/stat" % pid) as file:
            return file.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Bootstrap:
    """Runs bootstrap commands against one temporary WORKSPACE and stops what they started."""

    def __init__(self, workspace, port):
        self.workspace = str(workspace)
        self.port = port
        self.pid_file = os.path.join(self.workspace, "vastworker.pid")

    def run(self, command, timeout=60, cwd=None, **env):
        environment = dict(os.environ, WORKSPACE=self.workspace, WORKER_PORT=str(self.port))
        for name in ("VASTWORKER_TARBALL", "VASTWORKER_REPO", "VASTWORKER_UPDATE", "REPORT_ADDR"):
            environment.pop(name, None)
        environment["VASTWORKER_UPDATE_FLAG"] = os.path.join(self.workspace, ".force_update")
        environment.update(env)
        started = time.monotonic()
        result = subprocess.run(["bash", "-c", command], cwd=cwd or self.workspace, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        result.seconds = time.monotonic() - started
        result.output = result.stdout.decode()
        return result

    @property
    def pid(self):
        with open(self.pid_file) as file:
            return int(file.read().split()[0])

    def value(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", "/value")
        response = connection.getresponse()
        return response.status, response.read()

    def stop(self):
        result = self.run("bash %s --stop" % VASTWORKER.replace("vastworker.py", "start_server.sh"))
        assert result.returncode == 0, result.output
        return result


@pytest.fixture
def bootstrap(tmp_path):
    if not shutil.which("wget"):
        pytest.skip("wget is not installed")
    runner = Bootstrap(tmp_path / "workspace", free_port())
    os.mkdir(runner.workspace)
    yield runner
    runner.stop()


PIPED = "wget -qO- {url}/start_server.sh | bash -s {backend}"


def test_wget_pipe_brings_a_worker_up_and_a_rerun_leaves_one(bootstrap, published):
    command = PIPED.format(url=published.url, backend="helloworld")
    tarball = published.url + "/vastworker-main.tar.gz"
    first = bootstrap.run(command, VASTWORKER_TARBALL=tarball)
    assert first.returncode == 0, first.output
    assert "fetching %s" % tarball in first.output
    assert "helloworld is up at http://127.0.0.1:%d" % bootstrap.port in first.output
    assert bootstrap.value() == (200, b'{"value":0}\n')
    first_pid = bootstrap.pid
    with open("/proc/%d/comm" % first_pid) as file:  # findable: ps and pgrep name it, as its command line does
        assert file.read().strip() == "vastworker"
    assert str(first_pid).encode() in subprocess.run(["pgrep", "-f", "vastworker"], stdout=subprocess.PIPE).stdout
    second = bootstrap.run(command, VASTWORKER_TARBALL=tarball)
    assert second.returncode == 0, second.output
    assert "fetching" not in second.output  # the project is there: nothing is downloaded
    assert "stopping the worker started before (pid %d)" % first_pid in second.output
    assert not process_running(first_pid) and process_running(bootstrap.pid)
    assert bootstrap.value() == (200, b'{"value":0}\n')
    update = bootstrap.run(command, VASTWORKER_TARBALL=tarball, VASTWORKER_UPDATE="1")
    assert update.returncode == 0 and "fetching" in update.output
    assert "answering after" in first.output and first.seconds < 30
    print("bash start to first 200: %.2f s (first run), %.2f s (rerun)" % (first.seconds, second.seconds))


def test_bootstrap_from_a_git_repository(bootstrap, tmp_path):
    repository = tmp_path / "repository"
    for name in project_files():
        target = repository / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(open(os.path.join(ROOT, name), "rb").read())
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "project"], check=True)
    script = os.path.join(ROOT, "start_server.sh")
    result = bootstrap.run("bash -s helloworld < %s" % script, VASTWORKER_REPO=str(repository))
    assert result.returncode == 0, result.output
    assert "cloning %s" % repository in result.output
    assert os.path.isfile(os.path.join(bootstrap.workspace, "vastworker", "vastworker.py"))
    assert bootstrap.value()[0] == 200


def test_launch_sh_fetches_on_first_boot_and_runs_the_local_copy_after(bootstrap, published):
    launch = os.path.join(ROOT, "backends", "helloworld", "launch.sh")
    env = {"VASTWORKER_SCRIPT_URL": published.url + "/start_server.sh",
           "VASTWORKER_TARBALL": published.url + "/vastworker-main.tar.gz"}
    first = bootstrap.run("bash " + launch, **env)
    assert first.returncode == 0 and "fetching" in first.output, first.output
    assert bootstrap.value()[0] == 200
    second = bootstrap.run("bash " + launch, **env)
    assert second.returncode == 0 and "fetching" not in second.output, second.output
    assert bootstrap.value()[0] == 200


def test_off_vast_the_workspace_is_the_users_own(bootstrap, tmp_path):
    home = tmp_path / "home"  # no WORKSPACE, no CONTAINER_ID: not /home/workspace, but the user's
    script = os.path.join(ROOT, "start_server.sh")
    result = bootstrap.run("unset WORKSPACE CONTAINER_ID XDG_STATE_HOME; HOME=%s bash %s helloworld && HOME=%s bash %s "
                           "--stop" % (home, script, home, script))
    assert result.returncode == 0, result.output
    assert "stopping the worker" in result.output
    assert "serving helloworld" in (home / ".local/state/vastworker/vastworker.log").read_text()


def test_stop_ends_the_worker_by_its_pid_file(bootstrap, published):
    result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"),
                           VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz")
    assert result.returncode == 0, result.output
    pid = bootstrap.pid
    assert "stopping the worker started before (pid %d)" % pid in bootstrap.stop().output
    assert not process_running(pid) and not os.path.exists(bootstrap.pid_file)
    assert "stopping" not in bootstrap.stop().output  # nothing left to stop


def test_start_server_says_the_model_is_loading_or_waits_for_it(bootstrap, write_backend, tmp_path):
    backend, model_log = write_backend(LOG_BACKEND), tmp_path / "model.log"
    command = "bash %s %s" % (os.path.join(ROOT, "start_server.sh"), backend)
    first = bootstrap.run(command, MODEL_LOG=str(model_log))
    assert first.returncode == 0, first.output
    assert "is serving at http://127.0.0.1:%d, model loading" % bootstrap.port in first.output
    ready_file = os.path.join(bootstrap.workspace, "vastworker.ready")
    assert open(ready_file).read() == "%d loading\n" % bootstrap.pid
    with open(str(model_log), "a") as log:
        log.write("MODEL READY\n")
    wait_until(lambda: open(ready_file).read() == "%d loaded\n" % bootstrap.pid)  # rewritten as it changes
    first_pid = bootstrap.pid

    def fail_the_next_model():  # once the next worker serves and waits for its model
        def phase():
            try:
                return open(ready_file).read()
            except OSError:
                return ""
        wait_until(lambda: phase().endswith(" loading\n") and not phase().startswith(str(first_pid)), timeout=20)
        with open(str(model_log), "a") as log:
            log.write("FATAL: no GPU\n")
    failer = threading.Thread(target=fail_the_next_model)
    failer.start()
    failing = bootstrap.run(command, MODEL_LOG=str(model_log), VASTWORKER_WAIT_FOR="loaded", VASTWORKER_WAIT="20")
    failer.join(20)
    assert failing.returncode == 1 and "the backend did not load: " in failing.output, failing.output
    assert "FATAL: no GPU" in failing.output and "model loading" not in failing.output


def test_start_server_runs_the_model_server_of_model_command_and_keeps_it_across_restarts(bootstrap, tmp_path):
    model_port = free_port()
    env = {"MODEL_COMMAND": "exec %s %s vllm --port %d" % (sys.executable, os.path.join(ROOT, "bench", "fake_model_server.py"),
                                                        model_port),
           "MODEL_SERVER_URL": "http://127.0.0.1:%d" % model_port, "BENCHMARK_MAX_TOKENS": "2"}
    command = "bash %s openai --cache-dir %s" % (os.path.join(ROOT, "start_server.sh"), tmp_path)
    first = bootstrap.run(command, VASTWORKER_WAIT_FOR="loaded", **env)  # until the model is loaded
    assert first.returncode == 0 and "starting the model server: exec " in first.output, first.output
    assert "openai is up at http://127.0.0.1:%d" % bootstrap.port in first.output  # not just serving
    model_log = os.path.join(bootstrap.workspace, "model.log")
    wait_until(lambda: "fake vllm model server on" in open(model_log).read(), timeout=20)

    def models():
        connection = http.client.HTTPConnection("127.0.0.1", bootstrap.port, timeout=10)
        connection.request("GET", "/v1/models")
        return connection.getresponse().status

    wait_until(lambda: models() == 200, timeout=20)
    with open(os.path.join(bootstrap.workspace, "model.pid")) as file:
        model_pid = int(file.read().split()[0])
    second = bootstrap.run(command, **env)
    assert "the model server started before still runs (pid %d): kept" % model_pid in second.output, second.output
    wait_until(lambda: models() == 200, timeout=20)
    assert "stopping the model server started before (pid %d)" % model_pid in bootstrap.stop().output
    assert not process_running(model_pid)


@pytest.mark.parametrize("backend, env, message", [
    ("nosuch", {"VASTWORKER_TARBALL": "{url}/vastworker-main.tar.gz"},
     "no backend 'nosuch' in .*/vastworker/backends \\(available: comfyui, helloautoscaler, helloworld, openai, tgi"),
    ("helloworld", {"VASTWORKER_TARBALL": "http://127.0.0.1:{closed}/vastworker-main.tar.gz"},
     "could not download http://127.0.0.1:\\d+/vastworker-main.tar.gz"),
    ("helloworld", {"VASTWORKER_TARBALL": "{url}/start_server.sh"}, "is not a .tar.gz archive"),
    ("helloworld", {"VASTWORKER_REPO": "/nonexistent/repository"}, "could not clone /nonexistent/repository"),
    ("helloworld", {}, "set VASTWORKER_TARBALL .* or VASTWORKER_REPO"),
], ids=["unknown-backend", "unreachable-tarball", "not-a-tarball", "bad-repository", "no-source"])
def test_bootstrap_failures_say_what_is_wrong(bootstrap, published, backend, env, message):
    env = {name: value.format(url=published.url, closed=free_port()) for name, value in env.items()}
    result = bootstrap.run(PIPED.format(url=published.url, backend=backend), **env)
    assert result.returncode == 1
    assert re.search("vastworker: error: .*" + message, result.output), result.output
    assert not os.path.exists(bootstrap.pid_file)


def test_python_too_old_is_named(bootstrap, published, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python = fake_bin / "python3"
    python.write_text("#!/bin/sh\ncase \"$*\" in *print*) echo 3.6 ;; *) exit 1 ;; esac\n")
    python.chmod(0o755)
    result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"),
                           PATH="%s:%s" % (fake_bin, os.environ["PATH"]),
                           VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz")
    assert result.returncode == 1
    assert "vastworker: error: python3 is Python 3.6; vastworker needs Python 3.8 or newer" in result.output


def test_failed_start_is_reported_to_the_autoscaler(bootstrap, published):
    with socket.socket() as squatter:  # the port is taken: the worker cannot start
        squatter.bind(("0.0.0.0", bootstrap.port))
        squatter.listen(1)
        result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"),
                               VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz",
                               REPORT_ADDR="http://127.0.0.1:%d,%s" % (free_port(), published.url),
                               CONTAINER_ID="4242", MASTER_TOKEN='to"ken')
    assert result.returncode == 1
    assert "the worker exited during start-up: port %d is already in use" % bootstrap.port in result.output
    assert "error: vastworker: error" not in result.output  # one prefix, not two
    assert "reported the error to %s/worker_status/" % published.url in result.output
    path, body = published.posts[-1]
    record = json.loads(body)
    assert path == "/worker_status/"
    assert record["id"] == 4242 and record["mtoken"] == 'to"ken'
    assert record["error_msg"].startswith("vastworker failed to start: the worker exited during start-up")
    assert record["loadtime"] == 0.0 and record["num_requests_recieved"] == 0


def test_a_restart_under_load_loses_nothing(bootstrap, published, tmp_path):
    state = str(tmp_path / "state.json")
    command = PIPED.format(url=published.url, backend="helloworld") + " --state-file " + state
    env = {"VASTWORKER_TARBALL": published.url + "/vastworker-main.tar.gz"}
    assert bootstrap.run(command, **env).returncode == 0
    stop, outcome = threading.Event(), []
    clients = [threading.Thread(target=increment_until_stopped, args=(bootstrap.port, stop, outcome))
               for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    restart = bootstrap.run(command, **env)  # stops the old worker gracefully, starts a new one
    assert restart.returncode == 0, restart.output
    time.sleep(0.5)
    stop.set()
    for client in clients:
        client.join(30)
    assert not [item for item in outcome if item[0] == "unexpected"], outcome
    acknowledged = sum(count for kind, count in outcome if kind == "acknowledged")
    assert acknowledged > 50
    assert value_at(bootstrap.port) == acknowledged  # graceful: nothing in flight was cut off


def test_another_server_on_the_port_is_not_taken_for_our_worker(bootstrap, published):
    holder = LoopbackServer(lambda method, path, body: 200, port=bootstrap.port, host="0.0.0.0")
    try:
        result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"),
                               VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz")
    finally:
        holder.close()
    assert result.returncode == 1, result.output
    assert "the worker exited during start-up: port %d is already in use" % bootstrap.port in result.output
    assert "is up" not in result.output and not os.path.exists(bootstrap.pid_file)


def test_piped_from_inside_a_checkout_the_script_still_fetches_into_the_workspace(bootstrap, published, tmp_path):
    checkout = tmp_path / "somebody-elses-checkout"
    checkout.mkdir()
    (checkout / "vastworker.py").write_text("raise SystemExit('not this one')\n")
    result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"), cwd=str(checkout),
                           VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz")
    assert result.returncode == 0, result.output
    assert "fetching" in result.output
    assert os.path.isfile(os.path.join(bootstrap.workspace, "vastworker", "vastworker.py"))
    assert bootstrap.value()[0] == 200


def test_an_update_on_a_later_boot_fetches_again_and_keeps_relative_state(bootstrap, published):
    launch = os.path.join(ROOT, "backends", "helloworld", "launch.sh")
    env = {"VASTWORKER_SCRIPT_URL": published.url + "/start_server.sh",
           "VASTWORKER_TARBALL": published.url + "/vastworker-main.tar.gz", "STATE_FILE": "state.json"}
    assert bootstrap.run("bash " + launch, **env).returncode == 0
    connection = http.client.HTTPConnection("127.0.0.1", bootstrap.port, timeout=10)
    connection.request("POST", "/increment", body='{"amount": 7}', headers=JSON)
    assert connection.getresponse().status == 200
    connection.close()
    assert os.path.isfile(os.path.join(bootstrap.workspace, "state.json"))  # in WORKSPACE, not the project
    later = bootstrap.run("bash " + launch, VASTWORKER_UPDATE="1", **env)
    assert later.returncode == 0 and "fetching" in later.output, later.output
    assert bootstrap.value() == (200, b'{"value":7}\n')
    inside = bootstrap.run("bash " + launch, **dict(env, STATE_FILE="vastworker/state.json"))
    assert inside.returncode == 1 and "which an update replaces" in inside.output, inside.output

def test_pyworker_update_sets_the_flag_that_makes_the_next_boot_fetch(bootstrap, published):
    launch = os.path.join(ROOT, "backends", "helloworld", "launch.sh")
    env = {"VASTWORKER_SCRIPT_URL": published.url + "/start_server.sh", "MASTER_TOKEN": "s3cret",
           "VASTWORKER_TARBALL": published.url + "/vastworker-main.tar.gz"}
    assert bootstrap.run("bash " + launch, **env).returncode == 0
    flag = os.path.join(bootstrap.workspace, ".force_update")

    def update(authorization):
        connection = http.client.HTTPConnection("127.0.0.1", bootstrap.port, timeout=10)
        connection.request("POST", "/pyworker/update", headers={"Authorization": authorization})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    assert update("Bearer guess")[0] == 401 and not os.path.exists(flag)
    assert update("Bearer s3cret") == (200, {"ok": True}) and os.path.exists(flag)
    later = bootstrap.run("bash " + launch, **env)
    assert later.returncode == 0 and "fetching" in later.output, later.output
    assert not os.path.exists(flag)  # taken: the boot after fetches nothing
    assert "fetching" not in bootstrap.run("bash " + launch, **env).output


def test_stop_says_when_there_is_nothing_to_stop_and_the_log_has_no_probes(bootstrap, published):
    assert "no worker started by this script is running" in bootstrap.stop().output
    result = bootstrap.run(PIPED.format(url=published.url, backend="helloworld"),
                           VASTWORKER_TARBALL=published.url + "/vastworker-main.tar.gz")
    assert result.returncode == 0, result.output
    with open(os.path.join(bootstrap.workspace, "vastworker.log")) as log:
        text = log.read()
    assert "serving helloworld" in text and "OPTIONS" not in text


# ------------------------------------------------------------------------------------------------
# Reliability: fuzzing and soak
# ------------------------------------------------------------------------------------------------

def connect_retrying(port, attempts=3):
    """A new connection, retried as clients do: with many short connections on loopback a new
    one can meet the TIME_WAIT of an old one on the same port pair and be reset."""
    for attempt in range(attempts):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.05)


class Fuzzer:
    """Random requests over raw sockets: most of them broken in some way (method, path, headers,
    framing, body, truncation), some valid increments, some pipelined.  Keeps the sum of the
    increments the worker acknowledged, so the counter can be checked to the unit."""

    BAD_BODIES = [b"", b"{", b"null", b"[1]", b'{"amount": NaN}', b'{"amount": "5"}', b'{"other": 1}',
                  b"\xff\xfe", b'{"amount": 1e999}', b"[" * 5000, b'{"amount": 1} x']

    LENIENT = [b"GET Xvalue HTTP/1.1\r\nHost: x\r\n\r\n", b"GET http:///value HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET /value HTTP/1.1\r\n\r\n", b"GET /value HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
               b"GET /\x1b[2J HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /value HTTP/1.1\r\nHost: x\r\nX: \x0c\r\n\r\n",
               b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n"]
    LENIENT_CHUNKED = [b"Transfer-Encoding: \x0bchunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\n\r\n",
                       b"Transfer-Encoding: chunked\r\n\r\n d\r\n{\"amount\": 1}\r\n0\r\n\r\n",
                       b"Transfer-Encoding: chunked\r\n\r\nd\n{\"amount\": 1}\r\n0\r\n\r\n",
                       b"Transfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\n \r\n",
                       b"Transfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 1}\r\n0\r\nbad\r\n\r\n"]

    def __init__(self, port, seed):
        import random
        self.port = port
        self.random = random.Random(seed)
        self.acknowledged = 0
        self.sent = 0
        self.problems = []

    def valid(self, amount):
        body = json.dumps({"amount": amount}).encode()
        return (b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def broken(self):
        r = self.random
        choice = r.randrange(10)
        if choice == 0:  # a bad body on the real endpoint
            body = r.choice(self.BAD_BODIES)
            return (b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if choice == 1:  # random bytes
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 300))) + b"\r\n\r\n"
        if choice == 2:  # a method that is not served, or an unknown path
            method = r.choice([b"PATCH", b"TRACE", b"FOO", b"GET", b"DELETE"])
            path = r.choice([b"/", b"/nothing", b"/increment/", b"/%zz", b"/caf%E9", b"//x", b"*"])
            return method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        if choice == 3:  # framing: bad or conflicting lengths, unknown codings
            header = r.choice([b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 5\r\nContent-Length: 6",
                               b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked\r\nContent-Length: 3"])
            return b"POST /increment HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n{}"
        if choice == 4:  # broken chunks
            return (b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + r.choice([b"zz\r\n", b"3\r\nabcdef\r\n0\r\n\r\n",
                                                                     b"ffffffffff\r\n"]))
        if choice == 5:  # a valid request cut short: the worker must give up on it by itself
            whole = self.valid(1)
            return whole[:r.randrange(1, len(whole) - 1)]
        if choice == 6:  # header trouble
            return b"GET /value HTTP/1.1\r\n" + r.choice([b"X: " + b"a" * 70000, b"Bad Header", b" folded: x",
                                                           b"".join(b"H%d: v\r\n" % i for i in range(200))]) + b"\r\n\r\n"
        if choice == 7:  # versions and request lines
            return r.choice([b"GET /value HTTP/2.0\r\n\r\n", b"GET /value\r\n\r\n", b"GET\r\n\r\n",
                             b"GET /value HTTP/1.1 extra\r\n\r\n"])
        if choice == 8:  # lenient framing and targets, which h11 or RFC 9112 refuse
            chunked = b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            return r.choice(self.LENIENT) if r.random() < 0.5 else chunked + r.choice(self.LENIENT_CHUNKED)
        return b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n{\"amount\": 1}"

    def one_connection(self):
        """A connection carrying some valid increments and at most one broken request (last,
        since after it the rest of the connection cannot be trusted)."""
        r = self.random
        amounts = [r.randrange(1, 5) for _ in range(r.randrange(0, 4))]
        data = b"".join(self.valid(a) for a in amounts)
        broken = r.random() < 0.8
        if broken:
            data += self.broken()
        self.sent += len(amounts) + broken
        with connect_retrying(self.port) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # all sent: the worker sees the end at once
                reply = read_until_close(sock)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
        if reply.endswith(b"<timeout>"):
            self.problems.append(("hung", data[:200]))
        for index, status in enumerate(int(code) for code in re.findall(rb"HTTP/1\.1 ([2-5]\d\d) ", reply)):
            if index < len(amounts):
                if status != 200:
                    self.problems.append(("valid increment refused", status, data[:200]))
                self.acknowledged += amounts[index]
            elif status == 200:
                self.problems.append(("broken request acknowledged", data[len(b"".join(self.valid(a) for a in amounts)):][:200]))


@pytest.mark.slow
def test_10000_fuzzed_requests_leave_the_worker_up_and_exact(start_worker):
    worker = start_worker("helloworld", "--timeout", "1", "--log-level", "warning")
    fuzzer = Fuzzer(worker.port, seed=20261126)
    threads = []

    def run(seed):
        local = Fuzzer(worker.port, seed)
        while local.sent < 2500:
            local.one_connection()
        results.append(local)

    results = []
    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == 4, [line for line in worker.lines if "TypeError" not in line][-40:]
    problems = [problem for local in results for problem in local.problems]
    assert not problems, problems[:5]
    assert worker.proc.poll() is None
    total = sum(local.sent for local in results)
    acknowledged = sum(local.acknowledged for local in results)
    assert total >= 10000
    assert worker.value() == acknowledged
    print("fuzz: %d requests, %d acknowledged increments, counter exact" % (total, acknowledged))
    del fuzzer


@pytest.mark.slow
def test_soak_of_keep_alive_clients_mixing_good_and_bad(start_worker):
    worker = start_worker("helloworld", "--log-level", "warning")
    worker.request("GET", "/value")
    before = rss_kb(worker.proc.pid)
    deadline = time.monotonic() + 5
    counts, lock = [], threading.Lock()

    def client(seed):
        import random
        r = random.Random(seed)
        connection, acknowledged = worker.connect(), 0
        while time.monotonic() < deadline:
            kind = r.randrange(4)
            body = {0: '{"amount": 2}', 1: '{"amount": "x"}', 2: '{"amount": NaN}', 3: "[1]"}[kind]
            connection.request("POST", "/increment", body=body, headers=JSON)
            response = connection.getresponse()
            response.read()
            assert response.status == (200 if kind == 0 else (500 if kind == 1 else 400))
            acknowledged += 2 if kind == 0 else 0
            if r.random() < 0.1:
                connection.request("GET", "/nothing")
                assert connection.getresponse().read()
        with lock:
            counts.append(acknowledged)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(counts) == 8
    assert worker.value() == sum(counts)
    grown = (rss_kb(worker.proc.pid) - before) / 1024
    print("soak: %d increments acknowledged, resident memory +%.1f MB" % (sum(counts) // 2, grown))
    assert grown < 32


# ------------------------------------------------------------------------------------------------
# Hardening, second round: limits a client or a model server could push past
# ------------------------------------------------------------------------------------------------

SPLITTING_BACKEND = """
from flask import Response

class Backend:
    pass

def phrase(backend, request):
    return "ok", "200 " + request.args["s"]

def status(backend, request):
    return Response("ok", status=request.args["s"])

def header(backend, request):
    return "ok", 200, {"X-Echo": request.args["v"]}

def name(backend, request):
    return "ok", 200, {request.args["n"]: "1"}

flask_dict = {"GET": {"phrase": phrase, "status": status, "header": header, "name": name}}
"""


@pytest.mark.parametrize("path", [
    "/phrase?s=OK%0d%0aSet-Cookie:%20a=b", "/phrase?s=OK%0aSet-Cookie:%20a=b", "/phrase?s=OK%00",
    "/status?s=200%20OK%0d%0aSet-Cookie:%20a=b", "/status?s=200%20O%0bK",
    "/header?v=a%0d%0aSet-Cookie:%20a=b", "/header?v=a%00b", "/header?v=a%0bb", "/header?v=a%0cb",
    "/header?v=a%7fb", "/name?n=Set-Cookie:%20a=b%0a", "/name?n=X%20Y"])
def test_a_status_or_header_built_from_request_data_cannot_split_the_response(start_worker, write_backend, path):
    worker = start_worker(write_backend(SPLITTING_BACKEND))
    raw = worker.raw(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert status_of(raw) == 500, raw
    assert b"Set-Cookie" not in head and not re.search(rb"[\x00\x0b\x0c\x7f]", head), raw
    assert worker.wait_for_log("invalid header|holds a control character")


def test_a_tab_in_a_header_value_or_phrase_is_allowed(start_worker, write_backend):
    worker = start_worker(write_backend(SPLITTING_BACKEND))
    raw = worker.raw(b"GET /header?v=a%09b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 200 and b"\r\nX-Echo: a\tb\r\n" in raw
    raw = worker.raw(b"GET /phrase?s=Fine%09Here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 Fine\tHere\r\n")


def test_encoded_surrogates_in_a_json_body_are_not_utf8(hello):
    cesu8 = b'{"amount": 1, "note": "\xed\xa0\xbd\xed\xb8\x80"}'  # U+1F600 as CESU-8 writes it
    status, data = hello.json("POST", "/increment", cesu8, JSON)
    assert status == 400 and "not valid UTF-8" in data["detail"], data
    with pytest.raises(vastworker.Refusal, match="not valid UTF-8"):
        vastworker.parse_request_json(b'"\xed\xb2\x80"')  # a lone low surrogate
    assert vastworker.parse_request_json('{"a": "\U0001f600"}'.encode()) == {"a": "\U0001f600"}
    assert hello.value() == 0


def test_workloads_are_summed_exactly_and_nothing_in_flight_is_exactly_zero():
    metrics = vastworker.Metrics()
    for workload in (51, 1e20, 0.1, 0.2):
        metrics.started(workload)
    for workload in (1e20, 0.1, 51, 0.2):  # in another order: floats would leave 0.0 - 51 or a crumb
        metrics.finished(workload, 200)
    snapshot = metrics.snapshot()
    assert snapshot["cur_load"] == 0.0 and metrics.in_flight == 0 and snapshot["num_requests_working"] == 0
    assert snapshot["new_load"] == snapshot["cur_perf"] == pytest.approx(1e20)
    metrics.acknowledge(snapshot)
    assert metrics.snapshot()["new_load"] == metrics.snapshot()["cur_perf"] == 0.0


LOAD_SETTINGS = """
max_perf = 10  # workload a second: with --queue-time 5, no request counts for more than 50
allow_parallel_requests = True

def workload(backend, request):
    return float(request.args.get("w", 1))
"""


def test_a_huge_stated_workload_neither_shuts_others_out_nor_leaves_the_load_wrong(
        start_worker, hold, autoscaler):
    held = hold(settings=LOAD_SETTINGS)
    worker = start_worker(held.backend, "--queue-time", "5", env=dict(reporting_env(autoscaler), **held.env))
    clients = [threading.Thread(target=worker.request, args=("GET", "/hold?w=" + w)) for w in ("0.1", "0.2", "1e20")]
    for started, client in enumerate(clients, 1):  # the huge one last: the small ones fit ahead of it
        client.start()
        held.wait_started(started)
    autoscaler.wait_for(lambda r: r["num_requests_working"] == 3)
    assert autoscaler.records()[-1]["cur_load"] == 50.3  # 1e20 counted as what 5 s serve: 50
    status, _, body = worker.request("GET", "/fast?w=1")  # 5.03 s ahead of it: refused, but only just
    assert status == 429 and b"would take 5.0 s" in body, body
    held.release()
    for client in clients:
        client.join(10)
    assert worker.request("GET", "/fast?w=1")[0] == 200
    final = autoscaler.wait_for(lambda r: r["num_requests_working"] == 0 and r["loadtime"] > 0)[-1]
    assert final["cur_load"] == 0.0, final


def test_one_grant_cannot_hog_the_worker_with_sessions(start_worker, write_backend, keys, autoscaler):
    backend = write_backend(GRANT_BACKEND + "\nmax_perf = 100\n")
    worker = start_worker(backend, "--pubkey", str(keys / "spki.pem"), "--queue-time", "5",
                          env={"REPORT_ADDR": autoscaler.url, "CONTAINER_ID": "9", "MASTER_TOKEN": "secret"})
    grant = make_grant(keys, "g4", cost=1e300)  # g4 signs the url alone: any cost verifies
    status, data = session_call(worker, "/session/create", {"auth_data": grant, "payload": {"lifetime": 1e9 - 1}})
    assert status == 422 and "at most 3600 seconds" in json.dumps(data), data
    status, opened = session_call(worker, "/session/create", {"auth_data": grant, "payload": {"lifetime": 60}})
    assert status == 201, opened
    for reqnum in (2, 3):  # others are still served: the session's cost is not work they wait behind
        status, data = worker.json("POST", "/increment", {"auth_data": make_grant(keys, "g4", reqnum=reqnum, cost=1e300),
                                                          "payload": {"amount": 1}})
        assert status == 200, data
    autoscaler.wait_for(lambda r: r["cur_load"] == 500.0 and r["num_requests_working"] == 1)  # 100/s for 5 s
    status, data = session_call(worker, "/session/end", {"session_id": opened["session_id"], "session_auth": grant})
    assert status == 200, data
    final = autoscaler.wait_for(lambda r: r["num_requests_working"] == 0 and r["cur_perf"] > 0)[-1]
    assert autoscaler.wait_for(lambda r: r["num_requests_working"] == 0)[-1]["cur_load"] == 0.0, final


def test_requests_extend_a_session_only_up_to_its_longest_lifetime():
    session = vastworker.Session("s", {}, 60.0, None, None, None, 1.0, max_lifetime=100.0)
    for _ in range(50):
        session.extend()
    assert session.expiration <= time.time() + 100.0


def test_the_openai_backend_refuses_max_tokens_past_the_models_context(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm", context=2048)
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    sent = len(fake.requests)

    def answer(path, payload):  # past a 429: the request before, counted as a whole queue-time of work,
        return wait_until(lambda: (lambda got: got if got[0] != 429 else None)(  # is taken out only
            worker.json("POST", path, payload)))  # after its answer is sent

    for field in ("max_tokens", "max_completion_tokens"):
        status, data = answer("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       field: 10 ** 20})
        assert status == 400 and "%r is 100000000000000000000, more than the model's context of 2048" % field \
            in data["error"]["message"], data
    assert [request[:2] for request in fake.requests[sent:] if request[0] != "GET"] == []  # nothing sent
    status, data = answer("/v1/completions", {"prompt": "hi", "max_tokens": 2047})
    assert status == 200, data
    status, data = answer("/v1/completions", {"prompt": "hi", "max_tokens": 2048})  # 2049 in all:
    assert status == 400 and data["error"]["message"].startswith(  # vLLM's own answer, as it gave it
        "This model's maximum context length is 2048 tokens. However, you requested 2049 tokens"), data


def doctor_env(autoscaler_url, port, **extra):
    """What a Vast instance gives the worker on `port`: the autoscaler, its token and public address."""
    return dict({"REPORT_ADDR": autoscaler_url, "MASTER_TOKEN": "secret", "CONTAINER_ID": "7",
                 "PUBLIC_IPADDR": "127.0.0.1", "VAST_TCP_PORT_%d" % port: str(port), "VASTWORKER_TIME_SCALE": "0.1"},
                **extra)


@pytest.mark.parametrize("shape", ["g4", "g3", "g1"])
def test_the_doctor_passes_against_the_stand_in_and_names_its_grant_shape(start_worker, shape):
    stand_in = start_worker("autoscaler", "--grant-shape", shape, env={"MASTER_TOKEN": "secret"})
    port = free_port()
    code, output = run_cli("doctor", "helloworld", "--endpoint", "mine", "--port", str(port), timeout=60,
                           env=doctor_env("http://127.0.0.1:%d" % stand_in.port, port))
    assert code == 0, output
    for check in ("start-up", "port", "autoscaler", "clock", "worker", "reports", "public url"):
        assert re.search(r"^ok   %s " % check, output, re.M), output
    assert re.search(r"^ok   grants +3 live grants verify as %s \(" % shape, output, re.M), output
    assert output.rstrip().endswith("all checks hold")


def test_the_doctor_says_what_the_model_server_takes(start_worker, fake_model, tmp_path):
    stand_in = start_worker("autoscaler", env={"MASTER_TOKEN": "secret"})
    fake = fake_model("llamacpp", context=256)
    fake.loaded()
    port = free_port()
    code, output = run_cli("doctor", "openai", "--endpoint", "mine", "--port", str(port), "--cache-dir", str(tmp_path),
                           timeout=60, env=doctor_env("http://127.0.0.1:%d" % stand_in.port, port,
                                                      MODEL_SERVER_URL=fake.url, BENCHMARK_MAX_TOKENS="4"))
    assert code == 0, output
    assert re.search(r"^ok   model server  %s/health answered 200$" % fake.url, output, re.M), output
    assert re.search(r"^ok   worker +loaded, max_perf \S+ \(benchmark\); the model server takes 256 tokens a "
                     r"request$", output, re.M), output


def test_the_doctor_says_when_no_shape_verifies_the_autoscalers_grants(keys):
    port, reqnum = free_port(), [0]
    signature = openssl_sign(keys / "autoscaler.key", b"something else")  # the same on every grant

    def answer(method, path, body):
        if path == "/pubkey/":
            return 200, (keys / "spki.pem").read_bytes()
        if path == "/route/":
            reqnum[0] += 1
            return 200, json.dumps({"cost": 100.0, "endpoint": "mine", "reqnum": reqnum[0], "request_idx": reqnum[0],
                                    "url": "http://127.0.0.1:%d" % port, "signature": signature}).encode()
        return 200

    autoscaler = LoopbackServer(answer)
    try:
        code, output = run_cli("doctor", "helloworld", "--endpoint", "mine", "--port", str(port), timeout=60,
                               env=doctor_env(autoscaler.url, port))
    finally:
        autoscaler.close()
    assert code == 1, output
    assert re.search(r"^FAIL grants +3 of 3 live grants verify in no shape \(g4, g3, g1\); every grant has the same "
                     r"signature, though their reqnum, request_idx or url differ: the autoscaler signs a message", output,
                     re.M), output
    assert output.count(signature) == 3 and output.rstrip().endswith("1 problem(s)")


def test_the_doctor_names_an_unreachable_autoscaler_and_a_model_server_that_is_down(fake_model):
    port, nowhere = free_port(), "http://127.0.0.1:%d" % free_port()
    code, output = run_cli("doctor", "helloworld", "--endpoint", "mine", "--port", str(port), env=doctor_env(
        nowhere, port))
    assert code == 1 and re.search(r"^FAIL autoscaler +REPORT_ADDR %s: .*refused.*: is the address right" % nowhere,
                                   output, re.M), output
    assert "grants" not in output  # nothing live is tried without an autoscaler
    down = fake_model("vllm", open=False)  # bound, not listening
    code, output = run_cli("doctor", "openai", "--endpoint", "mine", "--port", str(port), env=doctor_env(
        nowhere, port, MODEL_SERVER_URL=down.url))
    assert code == 1 and re.search(r"^FAIL model server +%s/health answered .*refused.*: is it running" % down.url,
                                   output, re.M), output


def test_a_signature_that_verifies_in_no_shape_is_logged_with_what_it_repeats(signed_worker, keys):
    worker = signed_worker()
    forged = make_grant(keys, "g3", key="stranger", reqnum=1)
    for reqnum in (1, 2):  # the same signature on a different grant: the autoscaler signs something else
        grant = dict(forged, reqnum=reqnum, request_idx=reqnum)
        assert worker.json("POST", "/increment", {"auth_data": grant, "payload": {"amount": 1}})[0] == 401
    worker.wait_for_log(r"WARNING a grant's signature verifies in none of the shapes tried \(g4, g3, g1\); `python3 "
                        r"vastworker.py doctor")
    worker.wait_for_log(r"the same signature came on a different grant \(reqnum, request_idx, url \(1, 1, .*\), then "
                        r"\(2, 2, ")


def test_the_stand_in_refuses_forged_and_malformed_status_reports(start_worker, autoscaler):
    port = free_port()
    worker = start_worker("helloworld", port=str(port), env=reporting_env(
        autoscaler, PUBLIC_IPADDR="127.0.0.1", **{"VAST_TCP_PORT_%d" % port: str(port)}))
    genuine = autoscaler.wait_for(lambda r: r["loadtime"] > 0)[-1]
    forged = dict(genuine, url="http://203.0.113.66:80", cur_load=0.0, mtoken="guess")
    status, data = autoscaler.json("POST", "/worker_status/", forged)
    assert status == 401 and "MASTER_TOKEN" in data["detail"], data
    assert autoscaler.json("POST", "/worker_status/", dict(forged, mtoken=None))[0] == 401
    assert autoscaler.json("POST", "/delete_requests/", {"worker_id": 123, "requests": [{}]})[0] == 401
    for field, value in (("cur_load", -1e9), ("cur_load", "abc"), ("max_perf", None), ("url", "javascript:x"),
                         ("num_requests_working", 1.5), ("id", [1]), ("error_msg", 5)):
        status, data = autoscaler.json("POST", "/worker_status/", dict(genuine, mtoken="secret", **{field: value}))
        assert status == 422 and field in data["detail"], (field, data)
    for _ in range(3):  # routing still works, and only to the genuine worker
        status, grant = autoscaler.json("POST", "/route/", {"endpoint": "hello", "cost": 1.0})
        assert status == 200 and grant["url"] == genuine["url"], grant
    assert all(record["mtoken_matches"] for record in autoscaler.records())
    assert worker.request("GET", "/value")[0] == 200


def test_a_stand_in_without_a_token_says_so_and_still_validates(start_worker):
    stand_in = start_worker("autoscaler", env={"MASTER_TOKEN": ""})
    stand_in.wait_for_log("no MASTER_TOKEN: status reports are taken from anyone")
    status, data = stand_in.json("POST", "/worker_status/", {"id": 1, "url": "http://127.0.0.1:1",
                                                             "loadtime": 1.0, "cur_load": "abc", "max_perf": 1.0})
    assert status == 422 and "cur_load" in data["detail"]
    assert stand_in.json("POST", "/route/", {"endpoint": "x"}) == (200, {"endpoint": "x", "status": "no ready worker"})


def test_a_client_that_closes_while_the_model_server_is_silent_stops_it_and_is_cancelled(
        start_worker, fake_model, tmp_path, autoscaler):
    fake = fake_model("vllm")
    port = free_port()
    worker = model_worker(start_worker, "openai", fake, tmp_path, port=str(port), **reporting_env(
        autoscaler, PUBLIC_IPADDR="127.0.0.1", **{"VAST_TCP_PORT_%d" % port: str(port)}))
    autoscaler.wait_for(lambda r: r["loadtime"] > 0 and r["url"])
    worker.wait_for_log("public key from")
    status, grant = autoscaler.json("POST", "/route/", {"endpoint": "llm", "cost": 10.0})
    assert status == 200 and grant["url"] == "http://127.0.0.1:%d" % port, grant
    body = json.dumps({"auth_data": grant, "payload": {"prompt": "[[stall-after:2]]", "max_tokens": 5,
                                                        "stream": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    while seen.count(b"data:") < 2:  # two tokens, then the model server says nothing more
        data = sock.recv(65536)
        assert data, seen
        seen += data
    closed = time.monotonic()
    sock.close()  # a clean close: a FIN, no reset
    fake.wait_for(lambda f: f.aborted == ["/v1/completions"], timeout=3)  # the upstream request is closed
    assert time.monotonic() - closed < 3
    worker.wait_for_log(r"POST /v1/completions 200 aborted")
    finished = wait_until(lambda: autoscaler.json("GET", "/requests")[1], timeout=10)
    assert [(entry["request_idx"], entry["status"]) for entry in finished] == [(grant["request_idx"], "Cancelled")]


def test_a_client_that_half_closed_before_the_stream_still_gets_all_of_it(start_worker, fake_model, tmp_path):
    fake = fake_model("vllm", token_delay=0.05)
    worker = model_worker(start_worker, "openai", fake, tmp_path)
    body = json.dumps({"prompt": "hi", "max_tokens": 5, "stream": True}).encode()
    fake.held = threading.Event()  # the answer begins only once the half-close is surely in: before the stream
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.shutdown(socket.SHUT_WR)  # as some clients send a request: it still reads the answer
        fake.wait_for(lambda f: any(r[1] == "/v1/completions" for r in f.requests))
        fake.held.set()
        answer = read_until_close(sock)
    assert answer.count(b"data: {") == 6 and b"data: [DONE]" in answer, answer
    assert fake.aborted == []


FILES_BACKEND = """
import os, time

allow_parallel_requests = True

class Backend:
    def __init__(self):
        self.hogged = []

def take_all(backend):
    try:
        while True:
            backend.hogged.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass

def hog(backend, request):
    take_all(backend)
    deadline = time.monotonic() + 30
    while request.args.get("hold") and not os.path.exists(os.environ["RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "hogging %d" % len(backend.hogged)

def free(backend, request):
    while backend.hogged:
        os.close(backend.hogged.pop())
    return "freed"

flask_dict = {"GET": {"hog": hog, "free": free, "fast": lambda backend, request: "fast"}}
"""


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not shutil.which("prlimit"), reason="prlimit (util-linux) is not installed")
def test_the_connection_cap_fits_the_file_limit_which_is_raised_first(start_worker):
    worker = start_worker("helloworld", wrapper=["prlimit", "--nofile=100:300"])
    worker.wait_for_log(r"at most 172 connections, not 1024: this process may open 300 files")
    with open("/proc/%d/limits" % worker.proc.pid) as file:
        assert re.search(r"Max open files\s+300\s+300", file.read())


@pytest.mark.skipif(not shutil.which("prlimit"), reason="prlimit (util-linux) is not installed")
def test_out_of_file_descriptors_the_worker_makes_room_or_says_503_and_never_spins(start_worker, write_backend,
                                                                                    tmp_path):
    release = tmp_path / "release"
    worker = start_worker(write_backend(FILES_BACKEND), wrapper=["prlimit", "--nofile=200:200"],
                          env={"RELEASE": str(release)})
    idle = socket.create_connection(("127.0.0.1", worker.port), timeout=10)
    idle.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then idle on a kept-alive connection
    assert idle.recv(65536).endswith(b"\r\n\r\nfast")
    control = worker.connect()
    def hogged():  # every descriptor taken, also one the worker closed meanwhile; this connection stays open
        control.request("GET", "/hog")
        assert control.getresponse().read().startswith(b"hogging")
        return len(os.listdir("/proc/%d/fd" % worker.proc.pid)) == 200

    wait_until(hogged)
    assert worker.request("GET", "/fast")[:3:2] == (200, b"fast")  # the idle connection gave way
    assert read_until_close(idle) == b""
    worker.wait_for_log("out of file descriptors with")
    wait_until(lambda: len(os.listdir("/proc/%d/fd" % worker.proc.pid)) < 200)  # the newcomer's, closed
    control.request("GET", "/hog?hold=1")  # takes it, and holds its connection busy
    wait_until(lambda: len(os.listdir("/proc/%d/fd" % worker.proc.pid)) == 200)
    before = cpu_seconds(worker.proc.pid)
    for _ in range(2):  # none left to evict: 503 at once, not a hang
        status, _, body = worker.request("GET", "/fast")
        assert status == 503 and b"out of file descriptors" in body, body
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as waiting:
        time.sleep(0.5)  # connected, in the backlog meanwhile: the accept loop must sleep, not spin
        waiting.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(waiting.recv(65536)) == 503
    assert cpu_seconds(worker.proc.pid) - before < 0.5, cpu_seconds(worker.proc.pid) - before
    release.touch()
    assert control.getresponse().read().startswith(b"hogging")
    control.request("GET", "/free")
    assert control.getresponse().read() == b"freed"
    assert worker.request("GET", "/fast")[0] == 200


# ------------------------------------------------------------------------------------------------
# Documentation and CI stay true
# ------------------------------------------------------------------------------------------------

def test_every_link_in_the_readme_and_docs_leads_somewhere():
    """Relative links name files that exist, and anchors headings that exist (GitHub's slugs)."""
    def slugs(path):
        with open(path) as file:
            headings = re.findall(r"^#+ (.+)$", file.read(), re.M)
        return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}

    checked = 0
    for page in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        with open(page) as file:
            links = re.findall(r"\]\(([^)\s]+)\)", file.read())
        for link in links:
            if "://" in link:
                continue
            target, _, anchor = link.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            assert os.path.exists(path), "%s links to %s, which is not there" % (page, link)
            if anchor:
                assert anchor in slugs(path), "%s links to #%s, which %s has no heading for" % (page, anchor, path)
            checked += 1
    assert checked > 15


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as file:
        readme = file.read()
    with open(os.path.join(ROOT, ".ci", "run")) as file:
        ci = file.read()
    command = "python3 test_vastworker.py"
    assert command in readme and re.search(r"^%s$" % command, ci, re.MULTILINE)
