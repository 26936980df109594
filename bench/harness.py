"""Starting vastworker processes and talking to them over loopback, written once for the tests
(test_vastworker.py) and the benchmark (bench/bench.py).  Standard library only."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VASTWORKER = os.path.join(ROOT, "vastworker.py")
JSON = {"Content-Type": "application/json"}


def cache_directory():
    """Where what the tests and benchmarks install is kept between runs, outside the project:
    $XDG_CACHE_HOME/vastworker, else ~/.cache/vastworker."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vastworker")


def cached_venv(name, requirement):
    """A Python with `requirement` pip-installed, from a virtual environment made once in the
    cache directory and kept for the runs after; RuntimeError, saying why, when it cannot be made."""
    venv = os.path.join(cache_directory(), "%s-py%d.%d" % ((name,) + sys.version_info[:2]))
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "installed")):
        try:
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=300)
            subprocess.run([python, "-m", "pip", "install", "--quiet", requirement], check=True,
                           capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError("%s could not be installed into %s: %s" % (requirement, venv, exc))
        open(os.path.join(venv, "installed"), "w").close()
    return python


def free_port():
    """A loopback port that nothing listens on just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_kb(pid, field="VmRSS"):
    """A process's resident memory in KiB: now (VmRSS), or at its peak so far (VmHWM)."""
    with open("/proc/%d/status" % pid) as file:
        return int(re.search(field + r":\s+(\d+)", file.read()).group(1))


def wait_until(predicate, timeout=10, interval=0.05, failure=None):
    """Poll until predicate() is true and return its value; after `timeout` seconds, raise
    AssertionError with failure() (or a plain message) as its text."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure() if failure else "not within %s s" % timeout)
        time.sleep(interval)


def stop_process(proc, sig=signal.SIGTERM, timeout=15):
    """Stop a child process with `sig`, killing it if it has not exited within `timeout`
    seconds; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def http_status(port, path, timeout=1, context=None):
    """The status of GET `path` on a loopback port (HTTPS with an ssl `context`); None when
    nothing answers."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def value_at(port, timeout=10):
    """helloworld's counter: GET /value on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/value")
        return json.loads(connection.getresponse().read())["value"]
    finally:
        connection.close()


def read_until_close(sock):
    """Everything the peer sends until it closes; b"<timeout>" appended if it stalls instead."""
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except socket.timeout:
        chunks.append(b"<timeout>")
    return b"".join(chunks)


class Cores:
    """Pins the server and the load generator to different cores, when the machine allows."""

    def __init__(self):
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.pinned = count >= 2 and shutil.which("taskset") is not None
        self.description = ("server on core 0, load generator on core 1" if self.pinned
                            else "not pinned (needs 2 cores and taskset)")

    def server(self, command):
        return ["taskset", "-c", "0"] + command if self.pinned else command

    def load(self, command):
        return ["taskset", "-c", "1"] + command if self.pinned else command


class WorkerProcess:
    """A vastworker subprocess started as an instance would run it, with no site-packages
    (python3 -I -S: an accidental dependency fails), on a loopback port, its log collected as it
    is written.  The port is read from the line that says it is serving."""

    def __init__(self, backend, *args, python=sys.executable, env=None, port="0", wrapper=()):
        """`wrapper`: a command the worker runs under, such as prlimit with its options."""
        command = list(wrapper) + [python, "-I", "-S", VASTWORKER, backend, "--host", "127.0.0.1"]
        command += ["--port", port] if port is not None else []
        self.proc = subprocess.Popen(command + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
                                     cwd=ROOT)
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            match = re.search(r"(?:serving .*|autoscaler stand-in) on https?://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def log(self):
        return "\n".join(self.lines)

    def wait_ready(self, timeout=15):
        self._ready.wait(timeout)
        if self.port is None:
            self.stop()
            raise AssertionError("worker did not start:\n" + self.log)
        return self

    def connect(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None):
        """One request on a new connection: (status, headers dict, body bytes)."""
        connection = self.connect()
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
                headers = dict(JSON, **(headers or {}))
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method, path, body=None, headers=None):
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def value(self):
        return value_at(self.port)

    def raw(self, data, timeout=5):
        """Send raw bytes; everything the worker sends back until it closes (or timeout)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_close(sock)

    def wait_for_log(self, pattern, timeout=5):
        return wait_until(lambda: re.search(pattern, self.log), timeout, 0.02,
                          lambda: "%r not in the log:\n%s" % (pattern, self.log))

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the worker; its exit code."""
        code = stop_process(self.proc, sig, timeout)
        self._reader.join(5)
        return code
