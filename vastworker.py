#!/usr/bin/env python3
"""vastworker: serve a Vast.ai pyworker-style backend on the Python standard library alone.

A backend is a directory holding ``backend.py``: a ``Backend`` class that keeps the state, handler
functions ``handler(backend, request)`` and a ``flask_dict`` mapping methods and endpoint names to
handlers.  ``python3 vastworker.py NAME`` serves ``backends/NAME``; handlers written for the original
Flask worker run unchanged because this file provides the ``flask`` module they import.

The file reads in the order a request travels.  Each section uses only what is above it; only the
command line at the bottom reaches everything.

1. Core: configuration, the log, ``Refusal`` (the one way to answer a request with an error
   status, from anywhere) and ``StartupError`` (why the worker cannot start).
2. Wire: HTTP/1.1 on a socket -- headers, deadlines, the request head, ``encode_head`` (the one
   place a response head is written), the connection loop and the listening server.
3. Flask shim: the ``flask`` module backends import -- request, response, abort, jsonify.
4. Worker: what a request meets inside -- worker state, metrics and the routed requests'
   ledger, the lock, the state store, signed grants and sessions, and dispatch
   (``BackendApp``), which turns a request into a response.
5. Outbound: what the worker sends and watches by itself -- status reports and finished
   requests, notify, the benchmark, the model's health check, the public-key fetch, the model
   server's log.
6. Tools: RSA signing and the stand-in autoscaler (``python3 vastworker.py autoscaler``).
7. Command line: options, loading a backend, and the ``Worker`` that plans, binds, builds and
   runs everything above.
"""

import sys

if sys.version_info < (3, 8):  # keep this file parseable by old interpreters so they can say this
    sys.exit("vastworker needs Python 3.8 or newer; this is Python %d.%d" % sys.version_info[:2])

import argparse
import bisect
import collections
import email.parser
import email.utils
import errno
import http
import http.client
import http.server
import importlib.util
import io
import itertools
import json
import math
import operator
import os
import re
import select
import signal
import socket
import threading
import time
import types
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.1.0"  # the current Vast worker's VERSION, sent as the status record's "version"


# ------------------------------------------------------------------------------------------------
# 1. Core: configuration, the log, refusals, start-up errors
# ------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS_DIR = os.path.join(HERE, "backends")
DEFAULT_PORT = 3000
MAX_HEAD_BYTES = 65536  # request line plus headers
MAX_HEADER_COUNT = 100
MAX_FORM_BYTES = 500000  # Flask's MAX_FORM_MEMORY_SIZE
MAX_FORM_PARTS = 1000
# Reason phrases, fixed here rather than read from the running Python's http.HTTPStatus, which
# renamed four of them in 3.13 (422 "Unprocessable Content", ...) and lacks 103, 418 and 425
# before 3.9: a client gets the same answer whichever Python serves it.
STATUS_PHRASES = {int(entry[:3]): entry[4:] for entry in " ".join("""
    100 Continue; 101 Switching Protocols; 102 Processing; 103 Early Hints; 200 OK;
    201 Created; 202 Accepted; 203 Non-Authoritative Information; 204 No Content;
    205 Reset Content; 206 Partial Content; 207 Multi-Status; 208 Already Reported;
    226 IM Used; 300 Multiple Choices; 301 Moved Permanently; 302 Found; 303 See Other;
    304 Not Modified; 305 Use Proxy; 307 Temporary Redirect; 308 Permanent Redirect;
    400 Bad Request; 401 Unauthorized; 402 Payment Required; 403 Forbidden; 404 Not Found;
    405 Method Not Allowed; 406 Not Acceptable; 407 Proxy Authentication Required;
    408 Request Timeout; 409 Conflict; 410 Gone; 411 Length Required; 412 Precondition Failed;
    413 Request Entity Too Large; 414 Request-URI Too Long; 415 Unsupported Media Type;
    416 Requested Range Not Satisfiable; 417 Expectation Failed; 418 I'm a Teapot;
    421 Misdirected Request; 422 Unprocessable Entity; 423 Locked; 424 Failed Dependency;
    425 Too Early; 426 Upgrade Required; 428 Precondition Required; 429 Too Many Requests;
    431 Request Header Fields Too Large; 451 Unavailable For Legal Reasons;
    500 Internal Server Error; 501 Not Implemented; 502 Bad Gateway; 503 Service Unavailable;
    504 Gateway Timeout; 505 HTTP Version Not Supported; 506 Variant Also Negotiates;
    507 Insufficient Storage; 508 Loop Detected; 510 Not Extended;
    511 Network Authentication Required""".split()).split("; ")}
SERVER_HEADER = "vastworker/" + __version__
STARTED = time.monotonic()  # loadtime counts from here: process start, near enough
DEFAULT_WORKLOAD = 100.0  # a request's workload unless told otherwise: the Vast SDK's default cost
DEFAULT_MAX_PERF = 100.0  # workload/s when nothing measured or declared it: a request a second


def formatted_exception():
    """The traceback of the exception being handled (traceback is imported only when one is)."""
    import traceback
    return traceback.format_exc().rstrip()


def describe_exception(exc):
    """'RuntimeError: no GPU', or the bare type name when the exception says nothing more."""
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


def is_number(value):
    """Is `value` a JSON number (an int or float, not a bool), finite and not negative?  The one
    check for a cost or rate read from a grant or a report."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def taken(queue):
    """The items of a deque that others append to, taken out: exactly as many as it held when
    asked, popped in C (a Python loop costs some 10 bytecodes an item), so that what is
    appended meanwhile stays for the next time."""
    return list(itertools.starmap(queue.popleft, itertools.repeat((), len(queue))))


class Log:
    """Timestamped lines on stderr, one log for the process.  While serving, lines are queued and
    a background thread writes them (warnings and errors at once, in order): a write per request
    would be a system call per request, and each one is a chance for the thread to lose the GIL
    for milliseconds.  Access lines are queued as tuples and formatted by that thread, in
    batches: a request's own path spends 0.4 us on its line instead of 1.1, and GET's throughput
    at 16 and 64 connections rose 6-14%.  It writes every 10 ms while lines come, since it holds
    the GIL while it formats, and every request waits meanwhile: every 0.1 s, the batches doubled
    GET's p99 (bench/bench.py).  With nothing to write, it looks every 0.1 s."""

    LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
    level = 20
    LABELS = {name: name.upper() for name in LEVELS}
    _pending = collections.deque()
    _writing = threading.Lock()
    _flusher = None
    _stamp = (0, "")  # (second, its timestamp): formatted once a second, not once a line

    @classmethod
    def write(cls, level, message, always=False):
        """always: a line that is written at any level, at once (the one that says the worker is up)."""
        rank = cls.LEVELS[level]
        if always or rank >= cls.level:
            cls._pending.append(cls._line(level, message))
            if always or rank >= 30 or cls._flusher is None:
                cls.flush()

    @classmethod
    def access(cls, entry):
        """An access line, (time.time(), client address, method, target, status, size, seconds
        taken or None, note), at info level: the caller checks the level."""
        cls._pending.append(entry)
        if cls._flusher is None:
            cls.flush()

    @classmethod
    def _line(cls, level, message):
        return "%s %s %s\n" % (cls.stamp(time.time()), cls.LABELS[level], message)

    @classmethod
    def _access_line(cls, entry):
        when, address, method, target, status, size, took, note = entry
        return "%s INFO %s %s %s %s %s%s%s\n" % (cls.stamp(when), address, method, target, status, size,
                                                 "" if took is None else " %.1fms" % (took * 1000), note)

    @classmethod
    def stamp(cls, when):
        """The timestamp of a line: formatted once a second, not once a line."""
        second, stamp = cls._stamp
        if int(when) != second:
            second = int(when)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            cls._stamp = (second, stamp)
        return stamp

    @classmethod
    def flush(cls, wait=-1):
        """Write what is queued; False, writing nothing, when the log stays busy for `wait` s."""
        if not cls._writing.acquire(timeout=wait):
            return False
        try:
            lines = taken(cls._pending)
            if lines:
                sys.stderr.write("".join([line if line.__class__ is str else cls._access_line(line) for line in lines]))
                sys.stderr.flush()  # Python 3.8 buffers a piped stderr: a log must be live
        finally:
            cls._writing.release()
        return True

    @classmethod
    def last_words(cls, message):
        """A warning from a signal handler as the process exits: written with what is queued,
        unless the log stays busy for 0.5 s (the code the signal interrupted may be writing it,
        and waits for the handler): then alone, straight to the file descriptor."""
        line = cls._line("warning", message)
        cls._pending.append(line)
        if not cls.flush(wait=0.5):
            os.write(2, line.encode())

    @classmethod
    def start_flusher(cls):
        def flush_forever():
            wrote = False
            while True:
                time.sleep(0.01 if wrote else 0.1)
                wrote = bool(cls._pending)
                if wrote:
                    cls.flush()

        cls._flusher = threading.Thread(target=flush_forever, name="log", daemon=True)
        cls._flusher.start()

    @classmethod
    def exception(cls, message):
        """An error with the traceback of the exception being handled."""
        cls.write("error", message + "\n" + formatted_exception())


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class StopSignal:
    """SIGTERM and SIGINT, as an event the main thread waits for: is_set(), wait(timeout), and
    `signum`, the first one.  The handler takes no lock.  A Python signal handler runs on the
    main thread between any two of its bytecodes, even inside a `with lock:` there, so a lock it
    takes may be held by the code it interrupted: threading.Event.set() waits for the Event's own
    lock, which the interrupted Event.wait() holds for a moment each round, and waits for ever.
    So the handler notes the signal and writes a byte to a pipe that wait() selects on.  The pipe
    is made at once, the handlers installed by listen(), from the main thread."""

    def __init__(self):
        self.signum = None
        self._again = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def listen(self, again=None):
        """Take SIGTERM and SIGINT from now on; a second signal calls `again()`, if given (after
        SIGINT, the Ctrl-C that quits at once)."""
        self._again = again
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            if self._again is not None:
                self._again()
            return
        self.signum = signum
        os.write(self._write, b".")  # (at most one byte is written: the pipe is never full)

    def is_set(self):
        return self.signum is not None

    def wait(self, timeout):
        """True once a signal has come (within `timeout` s, or before)."""
        if self.signum is None:
            select.select([self._read], [], [], timeout)
        return self.signum is not None


class Waits:
    """The worker's own waits -- between status reports and their retries, health and key polls,
    session sweeps, the stand-in's patience -- are Waits.of(seconds): scaled by `scale`
    ($VASTWORKER_TIME_SCALE), so that tests run them ten times faster, rather than wait them out."""

    scale = 1.0

    @classmethod
    def of(cls, seconds):
        return seconds * cls.scale


def printable(text):
    """Text from a request, safe for the log: control characters (ESC, CR, LF, NUL, ...) are
    written as \\xNN, so a client can neither forge log lines nor drive the reader's terminal."""
    return _UNPRINTABLE.sub(lambda match: "\\x%02x" % ord(match.group()), text)


class StartupError(Exception):
    """Why the worker cannot start, in one line for the user."""


DEFAULT_DETAILS = {
    400: "the request could not be understood",
    401: "the request needs valid credentials",
    403: "the request is not allowed",
    404: "nothing is served at this path",
    413: "the request body is too large",
    415: "the request's Content-Type is not supported",
    429: "too many requests; retry later",
    500: "the handler failed; the worker's log has the details",
    503: "the worker cannot take this request now; retry later",
}


def default_detail(code):
    """What a refusal with no detail of its own says."""
    return DEFAULT_DETAILS.get(code, STATUS_PHRASES.get(code, "error"))


def error_body(code, detail=None):
    """Our error body: short JSON in our own words, never a traceback."""
    if detail is None:
        detail = default_detail(code)
    elif not isinstance(detail, (str, int, float, list, dict)):
        detail = str(detail)
    body = {"error": STATUS_PHRASES.get(code, "Unknown Error"), "detail": detail}
    try:
        text = json.dumps(body, ensure_ascii=True, allow_nan=False)
    except ValueError:
        body["detail"] = str(detail)
        text = json.dumps(body, ensure_ascii=True)
    return (text + "\n").encode("ascii")


class Refusal(Exception):
    """Answer this request with an error status instead of serving it.  Every refusal raises one:
    the HTTP layer's (a malformed request, 408, 413), dispatch's (404, 405), the worker's (still
    loading, busy, a bad grant, a state that could not be saved) and a handler's abort().  Each
    layer answers it in one place, with the JSON error body naming `detail` and the `headers`
    given (`retry_after` adds Retry-After: the one way that header is set).  `response`, when
    given, is sent instead of the error body (Flask's abort(response)).  `code`, `description`
    and `name` are Werkzeug's names, so code written against Flask's HTTPException reads them."""

    def __init__(self, code, detail=None, headers=None, retry_after=None, response=None):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.headers = list(headers or ())
        if retry_after is not None:
            self.headers.append(("Retry-After", "%g" % retry_after))
        self.response = response

    @property
    def description(self):
        return self.detail

    @property
    def name(self):
        return STATUS_PHRASES.get(self.code, "Unknown Error")

    @property
    def message(self):
        """What the refusal says, as text: its detail, else the status's usual words."""
        if self.detail is None:
            return default_detail(self.code)
        return self.detail if isinstance(self.detail, str) else json.dumps(self.detail, default=str)

    def body(self):
        return error_body(self.code, self.detail)


# ------------------------------------------------------------------------------------------------
# 2. Wire: HTTP/1.1 on a socket
# ------------------------------------------------------------------------------------------------

HOP_BY_HOP = frozenset(("connection", "content-length", "keep-alive", "transfer-encoding"))
_HEAD_END = re.compile(rb"\n\r?\n")
_NO_TOKENS = frozenset()  # a request's Connection tokens when it sends none
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # fullmatch: `$` would pass a final newline
# What a response's header value or reason phrase may not hold: a control character other than
# HTAB (RFC 9110 5.5, RFC 9112 4).  CR and LF would end the line (response splitting); NUL, VT
# and FF are read differently by different clients.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # printable ASCII, as h11 reads a request target
_BAD_IN_HEAD = re.compile(rb"[\x00\x0b\x0c]|\r(?!\n|\Z)")  # h11 takes no NUL, no whitespace but SP and HTAB
_PLAIN_HEAD = re.compile(  # the usual request head: see RequestHead._parse_plain
    rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/1\.([01])\r?"
    rb"((?:\n[!#$%&'*+\-.^`|~0-9A-Za-z]+:[ \t]*[\x20-\x7e]*\r?)*)")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?[ \t]*\r\n")
_TRAILER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00\x0b\x0c\r\n]*\r\n")
_API_KEY_IN_QUERY = re.compile(r"([?&]api_key=)[^&]*")
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer shut its sending side
MIN_BODY_RATE = 500  # bytes/s a body must average, past --timeout: Apache's RequestReadTimeout MinRate


class WorkerServer(http.server.ThreadingHTTPServer):
    """Serves an app on a listening socket: at most max_connections connections -- fewer when the
    process may not open that many files, and the log says so -- each waiting for its requests
    in the ConnectionPool, and a count of requests in flight for a graceful stop.  Out of file descriptors all the same, it
    evicts the connection making the least progress or answers the newcomer 503, and never spins.
    The app promises, besides what ConnectionHandler needs, connection_refused() for a
    connection turned away at the door."""

    daemon_threads = True

    def __init__(self, listener, app, timeout=30.0, max_body=64 * 1024 * 1024, tls=None,
                 max_connections=1024, body_memory=256 * 1024 * 1024):
        """Serve `app` on `listener`, an open_listener() socket; tls is an ssl.SSLContext or None."""
        self.address_family = listener.family
        super().__init__(listener.getsockname(), ConnectionHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()
        self.server_name, self.server_port = self.server_address[:2]
        self.app = app
        self.tls = tls  # an ssl.SSLContext when serving HTTPS
        self.timeout = timeout
        self.max_body = max_body
        self.bodies = BodyBudget(body_memory)
        files = file_limit()
        self.max_connections = max_connections
        if files is not None and max_connections > files - FILES_KEPT_BACK:
            self.max_connections = max(files - FILES_KEPT_BACK, 1)
            Log.write("warning", "at most %d connections, not %d: this process may open %d files "
                                 "(RLIMIT_NOFILE; raise it with ulimit -n)"
                      % (self.max_connections, max_connections, files))
        self._spare_file = os.open(os.devnull, os.O_RDONLY)  # given up to answer when out of files
        self._out_of_files_said = 0.0
        self.connections = 0
        self._connections_lock = threading.Lock()
        self._tls_refusals = threading.BoundedSemaphore(8)
        self.stopping = False
        self.deadlines = DeadlineWatcher()
        self.pool = ConnectionPool()
        # One item for each request being served: deque's append() and pop() need no lock of
        # ours (counting under a lock, called twice a request, cost 7-11% of GET's throughput)
        self.in_flight = collections.deque()
        self._idle = threading.Condition()  # a stop waits on it for the last request to end
        self._date = (0, "")

    def http_date(self):
        """The Date header, formatted once a second rather than once a request."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def get_request(self):
        """accept(); out of file descriptors (EMFILE, ENFILE), the listening socket stays ready
        and socketserver would ask again at once, spinning a core: make room first."""
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.out_of_files()
            raise

    def out_of_files(self):
        """Evict the connection making the least progress, whose descriptor then comes free; when
        every one is being served, give up the spare descriptor to take the newcomer and answer
        it 503.  Then pause a moment (the evicted one closes meanwhile), and say so, at most every
        10 s."""
        now = time.monotonic()
        if now - self._out_of_files_said > 10:
            self._out_of_files_said = now
            Log.write("warning", "out of file descriptors with %d connections open: the least busy "
                                 "give way, else new ones get 503 (raise ulimit -n, or lower "
                                 "--max-connections)" % self.connections)
        if not self.deadlines.make_room() and self._spare_file is not None:
            os.close(self._spare_file)
            self._spare_file = None
            try:
                sock, address = self.socket.accept()
            except OSError:
                pass
            else:
                self.refuse_connection(sock, address, "the worker is out of file descriptors; retry")
            finally:
                try:
                    self._spare_file = os.open(os.devnull, os.O_RDONLY)
                except OSError:
                    pass
        time.sleep(0.05)

    def process_request(self, request, client_address):
        """Take the connection into the pool -- unless there are max_connections already: then
        the one making the least progress gives way (idle, or sending its request slowly), or,
        when all are being served, this one is refused at once (memory for every caller is how a
        flood takes a server down)."""
        with self._connections_lock:
            full = self.connections >= self.max_connections
            if not full or self.deadlines.make_room():
                self.connections += 1
                full = False
        if full:
            return self.refuse_connection(request, client_address)
        try:
            self.pool.wait_for(ConnectionHandler(request, client_address, self))
        except BaseException:
            self.connection_closed()
            raise

    def connection_closed(self):
        with self._connections_lock:
            self.connections -= 1

    def refuse_connection(self, sock, client_address, why=None):
        """Over max_connections (or out of files: `why`): 503 with Retry-After, then close.  This
        runs on the accept thread, which must never wait on a client: plain HTTP is written
        without blocking (the answer fits any socket buffer); over TLS, which needs a handshake
        first, a short-lived thread answers under a 1 s deadline -- at most 8 at a time, past
        that it is just closed."""
        self.app.connection_refused()
        why = why or "the worker has %d connections open; retry" % self.max_connections
        Log.write("info", "%s refused: %s" % (client_address[0], why))
        response = HTTPResponse.refused(Refusal(503, why, retry_after=1))
        data = encode_head(503, response.phrase, response.headers, self.http_date(), len(response.body),
                           connection="close") + response.body
        if self.tls is None:
            try:
                sock.setblocking(False)
                sock.send(data)
            except OSError:
                pass
            self.shutdown_request(sock)
        elif self._tls_refusals.acquire(blocking=False):
            threading.Thread(target=self._refuse_over_tls, args=(sock, data), daemon=True).start()
        else:
            self.shutdown_request(sock)

    def _refuse_over_tls(self, sock, data):
        """The refusal thread: handshake and the 503, each under a 1 s deadline, then close --
        after reading what the client sent meanwhile (for up to 1 s), since closing a socket
        with unread data resets it, and a reset can destroy the answer before it is read."""
        client = None
        try:
            client = ClientSocket(self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), 1.0)
            self.deadlines.watch(client)
            client.handshake()
            client.send(data)
            client.sock.shutdown(socket.SHUT_WR)
            client.deadline = time.monotonic() + 1.0
            while client.sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            if client is not None:
                self.deadlines.forget(client)
                client.sock.close()
            sock.close()
            self._tls_refusals.release()

    def request_ended(self):
        """A request has left in_flight while the server is stopping: wake wait_idle()."""
        with self._idle:
            self._idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no request is in flight; False if some still are after timeout seconds.
        (`stopping` is set first, so a request ending meanwhile wakes this.)"""
        with self._idle:
            return self._idle.wait_for(lambda: not self.in_flight, timeout)

    def handle_error(self, request, client_address):
        Log.exception("connection from %s failed" % (client_address[0],))

    def server_close(self):
        super().server_close()
        if self._spare_file is not None:
            os.close(self._spare_file)
            self._spare_file = None


FILES_KEPT_BACK = 128  # descriptors not given to connections: model-server pool (64), logs, files, fetches


def file_limit():
    """How many files this process may open: its soft RLIMIT_NOFILE, first raised to the hard
    limit (services under systemd and Docker 25+ start at a soft 1024, which ~1,100 idle
    sockets exhaust); None where there is no such limit to read."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit of "unlimited" is more than Linux allows
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def open_listener(host, port, backlog=1024):
    """A bound, listening TCP socket.  SO_REUSEADDR, as http.server sets it, so a restarted
    worker can bind while the old one's connections linger in TIME_WAIT; a deep backlog, since
    the default of 5 drops connections under load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectionHandler:
    """One client connection: HTTP/1.1 requests read, handed to the server's app, and answered,
    kept alive while the framing is certain, by whichever pool thread run() is called on; between
    requests it waits in the pool, holding no thread.  (http.server's own request handler is not
    used: its parser is slower, reads a header line at a time with no overall deadline, and does
    not decode chunked bodies.)  The app promises respond(head, body, connection) -> (response, ticket),
    the response None when the client left before anything ran, and finish(ticket, status) once
    the response is sent, or the client left (status 499).  The connection offers the app
    client_address, server_address, scheme and `client`, its ClientSocket.  What the protocol layer
    refuses is answered with the app's refused(refusal, head), head None when none was read."""

    def __init__(self, request, client_address, server):
        self.request, self.client_address, self.server = request, client_address, server
        request.settimeout(None)  # blocking: the DeadlineWatcher bounds every wait
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small writes
        self.server_address = server.server_address
        self.scheme = "http" if server.tls is None else "https"
        sock = request
        if server.tls is not None:  # the handshake happens in run(), under a deadline
            sock = server.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        self.client = ClientSocket(sock, server.timeout)
        self.greeted = server.tls is None  # the TLS handshake is done
        self.hello_due = server.tls is not None  # its costly step, answering the client's hello, is to come
        self.greet_by = time.monotonic() + server.timeout  # when it must be
        server.deadlines.watch(self.client)

    def run(self):
        """Serve what the client has sent -- the pool runs this once it has sent something, or
        closed -- then wait in the pool for what is still to come (the rest of a head, or the
        next request), or close.  No thread waits for a head: one blocked on each client
        trickling its head (a slowloris) made the pool add a thread for each."""
        client = self.client
        try:
            if not self.greeted and (not self.greet() or not client.pending()):
                return self.server.pool.wait_for(self, None if self.greeted else self.greet_by)
            client.receive()  # what the pool found the client had sent: this does not wait
            while True:
                head = client.take_head()
                if head is not None:
                    if not self.handle_one(head):
                        break
                elif client.pending():  # over TLS, bytes decrypted already, which no poller sees
                    client.receive()
                else:
                    return self.server.pool.wait_for(self, client.head_by)
        except Refusal as refusal:  # a head too large to read
            self.refuse(refusal, None, None)
        except socket.timeout:  # its time ran out while it waited, or it was evicted
            if client.head_by is not None:  # in the middle of a head
                self.refuse(client.timed_out("the request headers"), None, None)
        except (ConnectionClosed, OSError):
            pass
        except BaseException:
            self.server.handle_error(self.request, self.client_address)
        self.close()

    def greet(self):
        """Take the TLS handshake as far as it goes without waiting for the client (a thread
        waiting out each round trip would look blocked to the pool, which would add threads
        for a burst of new connections); True once it is done."""
        import ssl  # loaded already: the socket is an ssl.SSLSocket
        self.hello_due = False
        sock = self.client.sock
        sock.setblocking(False)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:  # a full send buffer, unlikely this early: wait it out
            sock.setblocking(True)
            self.client.handshake()
        finally:
            sock.setblocking(True)
        self.greeted = True
        return True

    def close(self):
        server = self.server
        server.deadlines.forget(self.client)
        if self.client.sock is not self.request:  # the TLS socket
            self.client.sock.close()
        server.shutdown_request(self.request)
        server.connection_closed()

    def handle_one(self, raw_head):
        """Serve the request whose head this is; True when the connection may carry another."""
        server = self.server
        started = time.perf_counter()
        server.in_flight.append(None)
        try:
            return self.serve(raw_head, started)
        finally:
            server.in_flight.pop()
            if server.stopping:
                server.request_ended()

    def serve(self, raw_head, started):
        """Parse, read the body, answer; True when the connection may carry another."""
        server = self.server
        head = None
        try:
            if server.stopping:
                raise Refusal(503, "the worker is stopping; retry on another")
            head = RequestHead(raw_head)
            body, held, framing_known = self.read_body(head)
        except Refusal as refusal:
            self.refuse(refusal, head, started)
            return False
        except socket.timeout:
            self.refuse(self.client.timed_out("the request body"), head, started)
            return False
        self.client.request_read()
        self.client.http11 = head.http11
        try:
            return self.answer(head, body, framing_known, started)
        finally:
            if held:
                server.bodies.give_back(held)

    def answer(self, head, body, framing_known, started):
        """The app's response, sent; True when the connection may carry another."""
        server = self.server
        response, ticket = server.app.respond(head, body, self)
        keep_alive = head.keep_alive and framing_known and not server.stopping
        status = 499  # the client left before the response was sent
        try:
            if response is None:  # it left before its handler could run: nothing ran, nothing to send
                self.log_access(head.method, head.target, status, 0, started, " (cancelled: the client left)")
                return False
            status, keep_alive = self.send(head, response, keep_alive, started)
            return keep_alive
        finally:
            server.app.finish(ticket, status)

    def read_body(self, head):
        """(the request body, how many of its bytes are held against the server's body budget,
        whether the connection's framing is still certain after it).  A body that would pass
        the budget is refused before it is read; on any failure nothing stays held."""
        server, client = self.server, self.client
        length = head.content_length
        if not length and not head.chunked:
            # No body; but a POST or PUT without a length may have sent one anyway
            return b"", 0, length is not None or head.method not in ("POST", "PUT", "PATCH")
        max_body = server.max_body
        if length is not None and length > max_body:
            raise Refusal(413, "the request body is %d bytes; the limit is %d" % (length, max_body))
        if length and len(client.buffer) >= length:  # it came with its head: in memory already,
            return client.read_body(length), 0, True  # nothing to wait for, nothing to budget
        if length and not server.bodies.take(length):
            raise server.bodies.refusal()
        try:
            if head.http11 and "expect" in head.fields and \
                    "100-continue" in (value.lower() for value in head.fields["expect"]):
                client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            client.start_body()
            if head.chunked:
                body, held = client.read_chunked(max_body, server.bodies)
                return body, held, True
            return client.read_body(length), length, True
        except BaseException:
            if length:
                server.bodies.give_back(length)
            raise

    def refuse(self, refusal, head, started):
        """Answer a request the protocol layer will not serve, and close: the rest of the
        connection cannot be trusted."""
        try:
            self.send(head, self.server.app.refused(refusal, head), False, started, " (%s)" % refusal.detail)
        except OSError:
            pass

    def send(self, head, response, keep_alive, started, note=""):
        """Write one response -- a handler's, a refusal, an error: every answer goes out here --
        and log it.  (status, whether the connection stays open): the status logged and counted
        is the one on the wire, but for a stream cut midway, which closes the connection and
        counts as 499 when its client left, else 500."""
        method, target, http11 = (head.method, head.target, head.http11) if head else ("-", "-", True)
        status, chunks = response.status_code, response.chunks
        head_only = without_body(method, status)
        length, chunked = None, False
        if chunks is None:
            if status not in (204, 304) and status >= 200:
                length = len(response.body)
        elif not head_only:
            if http11:
                chunked = True
            else:
                keep_alive = False  # an HTTP/1.0 client reads the stream until we close
        connection = "close" if not keep_alive else (None if http11 else "keep-alive")
        try:
            data = encode_head(status, response.phrase, response.headers, self.server.http_date(),
                               length, chunked, connection)
        except UnicodeEncodeError:
            Log.write("error", "%s %s: a response header is not Latin-1 text" % (method, target))
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()
            return self.send(head, HTTPResponse.refused(Refusal(500)), keep_alive, started)
        if head_only:
            self.client.send(data)
            size = 0
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()
        elif chunks is None:
            body = response.body
            self.client.send(data + body if len(body) < 65536 else data)
            if len(body) >= 65536:
                self.client.send(body)
            size = len(body)
        else:
            self.client.send(data)
            size, failed = self.send_stream(method, target, chunks, chunked)
            if failed is not None:  # logged as sent, counted as what happened: 499 or 500
                self.log_access(method, target, status, "aborted", started)
                return failed, False
        self.log_access(method, target, status, size, started, note)
        return status, keep_alive

    def send_stream(self, method, target, chunks, chunked):
        """Send a streamed body item by item (empty items skipped: they would end a chunked body).
        (bytes sent, None) when it was sent whole; else (bytes sent, 499 when the client left or
        500 when the stream failed), and the connection must close."""
        size = 0
        try:
            for item in chunks:
                if not item:
                    continue
                if isinstance(item, str):
                    item = item.encode("utf-8")
                elif not isinstance(item, (bytes, bytearray, memoryview)):
                    raise TypeError("a streamed response yielded a %s, not str or bytes"
                                    % type(item).__name__)
                self.client.send(b"%x\r\n%s\r\n" % (len(item), item) if chunked else item)
                size += len(item)
            if chunked:
                self.client.send(b"0\r\n\r\n")
            return size, None
        except OSError:
            Log.write("debug", "%s %s: the client left during the stream" % (method, target))
            return size, 499
        except AbortStream as exc:
            Log.write("warning", "%s %s: stream cut after %d bytes: %s" % (method, target, size, exc))
            return size, 500
        except BaseException:
            Log.exception("%s %s: the stream failed after %d bytes" % (method, target, size))
            return size, 500
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    Log.exception("%s %s: closing the stream failed" % (method, target))

    def log_access(self, method, target, status, size, started, note=""):
        """The access log line.  The target is printable ASCII (RequestHead refuses any other)
        or "-", with any api_key in its query hidden; a refusal's note may quote the client, so
        it is made printable."""
        if Log.level <= 20:
            if "api_key=" in target:  # Vast's SDK sends the endpoint's key in the query: not for logs
                target = _API_KEY_IN_QUERY.sub(r"\1(hidden)", target)
            Log.access((time.time(), self.client_address[0], method, target, status, size,
                        None if started is None else time.perf_counter() - started, printable(note) if note else ""))


class ConnectionPool:
    """Waits for the next request of every open connection in one poller, and runs the
    connections whose client has sent something, in the order they sent it, on as few threads as
    keep them moving.  Under the GIL, threads able to run only take turns, and every turn is a
    context switch: with a thread per connection, 256 busy ones were served 12% slower than 16,
    with a p99 of 100-250 ms; run in turn by one thread, as fast as 16, with a p99 of 13 ms
    (bench/bench.py).  So one thread serves while the process keeps a core busy.  When
    connections wait while the process does not -- its threads wait on a model server, the
    backend's lock or a slow client -- threads are added, one for each waiting connection (at
    most doubling); every SHRINK s, while the process keeps its core busy with more than one,
    half the extra ones end, and one does while some thread has found nothing to do for SPARE s
    on end.  One always stays.
    A TLS handshake's first step (the server's signature) costs what 10-16 requests do, so
    while requests wait, a thread runs one handshake after every GREET_EVERY connections: run in
    arrival order, a burst of 256 new clients made the requests of those already connected wait
    (TLS c256 p99 63-79 ms, against 20-22 ms so), and under steady load a newcomer's handshake
    waited behind every request queued (16 ms, against 3.5 ms so)."""

    GREET_EVERY = 16

    TICK = 0.003  # how often the pool is looked at while it has work or more than one thread
    SHRINK = 0.05
    SPARE = 10.0

    def __init__(self, poller=None):
        self._poller = poller or OneShotPoller()
        self._parked = {}  # file descriptor: the ConnectionHandler waiting on it
        self._ready = collections.deque()  # connections whose client sent something (or closed)
        self._greeting = collections.deque()  # those whose TLS handshake's costly step is due
        self._polling = threading.Lock()  # held by the one thread waiting on the poller
        self._lock = threading.Lock()  # for the count of threads
        self.threads = 0
        self._surplus = 0  # threads asked to end
        self._watching = threading.Event()  # set when requests come: the watcher looks
        self._add_threads(1)
        threading.Thread(target=self._watch, name="connection pool", daemon=True).start()

    def wait_for(self, handler, until=None):
        """Hold `handler` until its client sends something or closes, or its ClientSocket is cut
        (its idle time is up, or `until`, or it is evicted); then one of the pool's threads runs it."""
        client = handler.client
        client.idle(until)
        fd = client.fileno()
        self._parked[fd] = handler
        self._poller.arm(fd)

    def _add_threads(self, count):
        with self._lock:
            self.threads += count
        for _ in range(count):
            threading.Thread(target=self._work, name="connections", daemon=True).start()

    def _work(self):
        ready, greeting = self._ready, self._greeting
        served = 0  # connections this thread ran since it last ran a handshake
        while True:
            try:
                if greeting and served >= self.GREET_EVERY:
                    served = 0
                    handler = greeting.popleft()
                else:
                    handler = ready.popleft()
                    served += 1
            except IndexError:
                if not self._wait_for_clients():
                    return
                if not ready:  # no request came in meanwhile: a handshake's turn
                    served = self.GREET_EVERY
                continue
            handler.run()
            if self._surplus and self._end_thread():
                return

    def _wait_for_clients(self):
        """Wait until connections are ready: one thread waits on the poller, any others for
        their turn.  False when this thread is to end instead."""
        with self._polling:
            if self._surplus and self._end_thread():
                return False
            # With threads to spare, the wait is cut short now and then, so that the others,
            # waiting for their turn, see whether they are asked to end.
            # While handshakes wait, it only looks: requests that came meanwhile go first.
            timeout = 0 if self._greeting else None if self.threads == 1 else 1.0
            if not self._ready and self._take_ready(timeout) and not self._watching.is_set():
                self._watching.set()
            return True

    def _take_ready(self, timeout):
        """Move the connections whose client has sent something (within `timeout` s; None: until
        one has) from the poller to the ready queue; how many.  Called holding _polling."""
        fds = self._poller.wait(timeout)
        for fd in fds:
            handler = self._parked.pop(fd)
            handler.client.deadline = None
            (self._greeting if handler.hello_due else self._ready).append(handler)
        return len(fds)

    def _end_thread(self):
        """Whether this thread takes one of the ends asked for; never the last thread."""
        with self._lock:
            if not self._surplus or self.threads == 1:
                return False
            self._surplus -= 1
            self.threads -= 1
            return True

    def _watch(self):
        """Every TICK while there is work or more than one thread: when every thread is at work
        (none waits for clients) and connections wait while the process used under half a core,
        add threads; when it used 90% or more with more than one, ask half the extra ones to
        end; when some thread has waited for clients at every look for SPARE s, one."""
        shrunk = last_busy = time.monotonic()
        while True:
            if self.threads - self._surplus <= 1 and self._polling.locked():
                self._watching.clear()  # nothing to watch until a request comes
                self._watching.wait(1.0)  # (or a second has passed, should that be missed)
            began, cpu_began = time.monotonic(), time.process_time()
            time.sleep(self.TICK)
            now = time.monotonic()
            busy = (time.process_time() - cpu_began) / (now - began)
            extra = self.threads - self._surplus - 1
            ending = 0
            if self._polling.acquire(blocking=False):  # every thread is at work
                try:
                    self._take_ready(0)
                finally:
                    self._polling.release()
                last_busy = now
                waiting = len(self._ready) + len(self._greeting)
                if busy < 0.5 and waiting:
                    self._add_threads(min(waiting, self.threads))
                    continue
                if busy >= 0.9:
                    ending = (extra + 1) // 2
            elif now - last_busy >= Waits.of(self.SPARE):
                ending = min(extra, 1)
            if ending and now - shrunk >= self.SHRINK:
                shrunk = now
                with self._lock:
                    self._surplus += ending


class OneShotPoller:
    """Which of the sockets armed have something to read (or have closed), each reported once
    per arm(): epoll with EPOLLONESHOT on Linux, where arming a socket again is one system call;
    elsewhere poll(), which a pipe wakes to take in sockets armed meanwhile."""

    def __init__(self, use_epoll=hasattr(select, "epoll")):
        self._epoll = select.epoll() if use_epoll else None
        if self._epoll is None:
            self._poll = select.poll()
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_write, False)
            self._poll.register(self._wake_read, select.POLLIN)

    def arm(self, fd):
        if self._epoll is None:
            self._poll.register(fd, select.POLLIN | _POLLRDHUP)
            try:
                os.write(self._wake_write, b".")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass
            return
        events = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
        try:
            self._epoll.modify(fd, events)
        except FileNotFoundError:  # the first time
            self._epoll.register(fd, events)

    def wait(self, timeout):
        """The file descriptors ready within `timeout` s (None: until one is), disarmed."""
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        fds = []
        for fd, _ in self._poll.poll(None if timeout is None else timeout * 1000):
            if fd == self._wake_read:
                os.read(fd, 4096)
            else:
                self._poll.unregister(fd)
                fds.append(fd)
        return fds


class ClientSocket:
    """A client connection: buffered reads and whole writes, each bounded in time.  Waiting for a
    next request may last `timeout`; a request head must arrive whole within `timeout` of its
    first byte; a body within `timeout` plus a second for every MIN_BODY_RATE bytes received (so
    a trickle cannot hold the connection for ever, while a large upload on a slow link is not cut
    short); a write may stall for `timeout`.  While it waits for its client, a connection may be
    evicted to make room for another.  What the client gets wrong raises Refusal; a client that
    leaves raises ConnectionClosed."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.tls = hasattr(sock, "pending")  # an ssl.SSLSocket
        self.timeout = timeout
        self.http11 = True  # of the request being served: whether gone() may probe with "100 Continue"
        self.buffer = bytearray()
        self.deadline = None  # while blocked on the socket: when the DeadlineWatcher cuts it short
        self.limit = None  # while waiting for the client: the time limit of what it is sending
        self.paced = False  # receiving a body: each byte received moves the limit on
        self.expired = False
        self.evicted = False
        self.writing = False
        self.probed = False  # gone() sent its "100 Continue" probe
        self.left = False  # gone() found the client gone
        self.head_by = None  # part of a request head is in: when all of it must be

    def idle(self, until=None):
        """Between requests: its time limit starts (or is `until`), after which the
        DeadlineWatcher cuts it."""
        self.limit = self.deadline = until or time.monotonic() + self.timeout

    def pending(self):
        """Bytes received and decrypted but not yet read (over TLS; none otherwise)."""
        return self.tls and self.sock.pending()

    def expire(self):
        """Wake the thread waiting on this socket.  Only the read side is shut while reading, so
        that an answer (408, or 503 for an evicted one) can still be sent."""
        self.expired = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR if self.writing else socket.SHUT_RD)
        except OSError:
            pass

    def evict(self):
        self.evicted = True
        self.expire()

    def fileno(self):
        return self.sock.fileno()

    def gone(self):
        """Has the client left (closed or reset its connection) while its request waits or runs?
        This is the one answer to that question: the handler's request.is_disconnected(), the
        queue for the lock and the model-server proxy's ClientWatch all ask it.
        A client that only shut its sending side (a half-close, as some send a request) has not:
        it still reads the answer.  The two look alike until something is sent, so on the first
        sign of either, an HTTP/1.1 client is sent "100 Continue", an interim answer it must
        accept, and one that has closed answers that with a reset (waited for up to 0.1 s).
        Called only by the connection's own thread, before it writes the response."""
        if self.left:
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | _POLLRDHUP)
        events = sum(event for _, event in poller.poll(0))
        if events & _POLLRDHUP and self.http11 and not self.probed:
            self.probed = True
            try:
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self.left = True
                return True
            events = sum(event for _, event in poller.poll(100))
        self.left = bool(events & (select.POLLERR | select.POLLHUP))
        return self.left

    def abandon(self):
        """No one will wait for the answer (its client left, or the worker gave up on it): cut
        the connection, so the client sees it and a handler asking gone() hears it."""
        self.left = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def receive(self):
        """Read what the client has sent (waiting for it until `limit`) into the buffer."""
        self.deadline = self.limit
        data = self.sock.recv(262144)
        self.deadline = None
        self._received(len(data))
        self.buffer += data

    def _received(self, count):
        """After a read of `count` bytes: none means the client closed (or the deadline cut the
        read short); a body's bytes move its limit on."""
        if not count:
            if self.expired:
                raise socket.timeout("deadline passed")
            raise ConnectionClosed()
        if self.paced:
            self.limit += count / MIN_BODY_RATE

    def timed_out(self, what):
        """The refusal for a request cut short: evicted for another client, or too slow."""
        if self.evicted:
            return Refusal(503, "the worker needed this connection for another client; retry", retry_after=1)
        return Refusal(408, "%s took longer than allowed (%g s, and 1 s more per %d bytes of body)"
                       % (what, self.timeout, MIN_BODY_RATE))

    def handshake(self):
        self.limit = time.monotonic() + self.timeout  # a slow handshake may be evicted as well
        self.deadline = self.limit
        try:
            self.sock.do_handshake()
        finally:
            self.deadline = self.limit = None

    def send(self, data):
        self.deadline = time.monotonic() + self.timeout
        self.writing = True
        try:
            # One send() first: on a blocking socket it sends everything but a rare remainder, and
            # over TLS, ssl's sendall() is a Python loop over send(), 60 bytecodes a response more
            sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        finally:
            self.writing = False
            self.deadline = None

    def take_head(self):
        """The next request's head from what has been received (its lines, without the blank line
        that ends it), or None while it is not all in; blank lines before it are skipped.  From
        its first byte a head has `timeout` to come whole: `head_by`."""
        buffer = self.buffer
        start = 0
        while start < len(buffer) and buffer[start] in b"\r\n":
            start += 1
        if start:
            del buffer[:start]
        if not buffer:
            return None
        head = take_head(buffer)
        if head is not None:
            self.head_by = None
        elif self.head_by is None:  # (a head that came whole, the usual one, is not timed at all)
            self.head_by = time.monotonic() + self.timeout
        return head

    def start_body(self):
        self.limit, self.paced = time.monotonic() + self.timeout, True

    def request_read(self):
        """The whole request is in: the connection is being served, and cannot be evicted."""
        self.limit, self.paced = None, False

    def read_body(self, length):
        """The next `length` bytes of the request, as bytes.  A large body is received straight
        into one buffer of its size: appending pieces copied each byte three times and held
        five times the body at once (41 MB for an 8 MB upload, in bench/bench.py)."""
        buffer = self.buffer
        if len(buffer) >= length:  # the usual small body, already in with its head
            body = bytes(buffer[:length])
            del buffer[:length]
            return body
        if length >= LargeBlocks.SIZE:
            LargeBlocks.settle()
        body = bytearray(length)
        with memoryview(body) as view:
            have = len(buffer)
            view[:have] = buffer
            buffer.clear()
            while have < length:
                self.deadline = self.limit
                got = self.sock.recv_into(view[have:])
                self.deadline = None
                self._received(got)
                have += got
        return bytes(body)

    def read_chunked(self, max_body, budget):
        """A chunked request body, decoded as it arrives, each chunk paid for from `budget`
        before it is read; over max_body a 413 as soon as that is known.  (body, bytes taken
        from the budget): the caller gives them back."""
        body, taken = bytearray(), 0

        def admit(size):
            nonlocal taken
            if taken + size > max_body:
                raise Refusal(413, "the request body is larger than %d bytes" % max_body)
            if not budget.take(size):
                raise budget.refusal()
            taken += size
        try:
            for piece in chunked_pieces(self.buffer, self.receive, admit):
                body += piece
        except BaseException:
            budget.give_back(taken)  # all it took, though a chunk cut short was not all received
            raise
        return bytes(body), taken


def take_head(buffer):
    """The head at the start of bytearray `buffer` (its lines, without the blank line that ends
    it), taken out of the buffer; None while it is incomplete.  One rule for both directions:
    a head larger than MAX_HEAD_BYTES is refused (414 when its first line alone is)."""
    match = _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES + 4)
    if match:
        head = bytes(buffer[:match.start()])
        del buffer[:match.end()]
        return head
    if len(buffer) > MAX_HEAD_BYTES:
        if b"\n" not in buffer[:MAX_HEAD_BYTES]:
            raise Refusal(414, "the request line is longer than %d bytes" % MAX_HEAD_BYTES)
        raise Refusal(431, "the headers are larger than %d bytes" % MAX_HEAD_BYTES)
    return None


def counted_pieces(buffer, fill, size):
    """The next `size` bytes of bytearray `buffer`, which `fill()` extends, as they come."""
    while size:
        if not buffer:
            fill()
        piece = bytes(buffer[:size])
        del buffer[:len(piece)]
        size -= len(piece)
        yield piece


def chunked_pieces(buffer, fill, admit=None):
    """A chunked body's data from bytearray `buffer`, which `fill()` extends, as it comes; its
    trailer fields checked and dropped.  Strictly framed, as h11 reads it, in both directions:
    CRLF line ends, no blanks around the size, well-formed trailer fields.  `admit(size)` is
    told each chunk's size before its data is read (to refuse it early).  Raises Refusal."""
    while True:
        end = buffer.find(b"\n", 0, 1025)
        if end < 0:
            if len(buffer) > 1024:
                raise Refusal(400, "a chunk-size line is longer than 1024 bytes")
            fill()
            continue
        match = _CHUNK_LINE.fullmatch(buffer, 0, end + 1)
        if match is None:
            raise Refusal(400, "invalid chunk-size line %r" % bytes(buffer[:min(end + 1, 40)]))
        size = int(match.group(1), 16)
        del buffer[:end + 1]
        if size == 0:
            break
        if admit is not None:
            admit(size)
        yield from counted_pieces(buffer, fill, size)
        while len(buffer) < 2:
            fill()
        if buffer[:2] != b"\r\n":
            raise Refusal(400, "a chunk is longer than its size says")
        del buffer[:2]
    for _ in range(MAX_HEADER_COUNT + 1):
        end = buffer.find(b"\n", 0, MAX_HEAD_BYTES + 1)
        while end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise Refusal(431, "a trailer field is larger than %d bytes" % MAX_HEAD_BYTES)
            fill()
            end = buffer.find(b"\n", 0, MAX_HEAD_BYTES + 1)
        line = bytes(buffer[:end + 1])
        del buffer[:end + 1]
        if line == b"\r\n":
            return
        if not _TRAILER_LINE.fullmatch(line):
            raise Refusal(400, "malformed trailer line %r" % line[:100])
    raise Refusal(431, "more than %d trailer fields" % MAX_HEADER_COUNT)


class RequestHead:
    """The parsed request line and headers, with the framing facts the server needs.  A head that
    is not well-formed HTTP/1.x raises Refusal (400, 431, 501 or 505)."""

    def __init__(self, head):
        self._finish(*(self._parse_plain(head) or self._parse_any(head)))

    def _parse_plain(self, head):
        """(fields, pairs) of the usual head -- an upper-case method, a path, HTTP/1.0 or 1.1,
        header lines of printable ASCII with plain names -- in one regular expression and one
        pass; None for any other head, which _parse_any() then takes (and refuses, if it must).
        It accepts only what _parse_any() accepts, and reads it the same (a test compares them);
        it is here because parsing the head line by line was the largest part of a request's
        own work in a profile."""
        match = _PLAIN_HEAD.fullmatch(head)
        if match is None or head.count(b"\n") > MAX_HEADER_COUNT:
            return None
        method, raw_target, minor, block = match.groups()
        if raw_target.startswith(b"//"):
            return None
        self.method = method.decode("ascii")
        self.http11 = minor == b"1"
        self.version = "HTTP/1.1" if self.http11 else "HTTP/1.0"
        self.absolute_host = None
        raw_path, _, self.query_string = raw_target.partition(b"?")
        self.target = raw_target.decode("ascii")
        self.path = decode_path(raw_path)
        fields, pairs = {}, []
        for line in block.decode("ascii").split("\n")[1:]:
            name, _, value = line.partition(":")
            value = value.strip(" \t\r")
            fields.setdefault(name.lower(), []).append(value)
            pairs.append((name, value))
        return fields, pairs

    def _parse_any(self, head):
        """(fields, pairs) of any head, checked line by line; Refusal for one that is not
        well-formed.  Names with '_' are left out of the pairs the handler sees, as Werkzeug
        does, against header spoofing through proxies."""
        lines = head.split(b"\n")
        self._parse_request_line(lines[0].rstrip(b"\r"))
        fields, pairs = header_fields(head, lines)
        return fields, [(name, value) for name, value in pairs if "_" not in name]

    def _finish(self, fields, pairs):
        """The framing facts from the parsed fields; the header lines kept for the handler."""
        self.fields = fields
        self.pairs = pairs
        tokens = fields.get("connection")
        self.connection = {token.strip().lower() for value in tokens
                           for token in value.split(",")} if tokens else _NO_TOKENS
        self.content_length = content_length_of(fields) if "content-length" in fields else None
        self.chunked = is_chunked(fields, self.content_length) if "transfer-encoding" in fields else False
        hosts = len(self.fields.get("host", ()))
        if hosts > 1 or (hosts == 0 and self.http11):  # RFC 9112 3.2
            raise Refusal(400, "an HTTP/1.1 request needs one Host header, not %d" % hosts)

    def _parse_request_line(self, line):
        """method, version, target, path and query_string from 'GET /value?x=1 HTTP/1.1'."""
        request_line = line.decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            raise Refusal(400, "malformed request line %r" % request_line[:100])
        method, _, version = parts
        if not _TOKEN.fullmatch(method):
            raise Refusal(400, "malformed request method %r" % method[:20])
        version_match = _VERSION.match(version)
        if not version_match:
            raise Refusal(400, "malformed HTTP version %r" % version[:20])
        if version_match.group(1) != "1":
            raise Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        self.method = method.upper()
        self.version = version
        self.http11 = version != "HTTP/1.0"
        self.absolute_host = None
        raw_target = line.split(b" ")[1]
        if not _TARGET.fullmatch(raw_target):
            raise Refusal(400, "the request target %r is not printable ASCII" % raw_target[:100])
        if raw_target[:7].lower() == b"http://" or raw_target[:8].lower() == b"https://":
            authority, slash, rest = raw_target.split(b"//", 1)[1].partition(b"/")
            if not authority:
                raise Refusal(400, "the request target %r names no host" % raw_target[:100])
            self.absolute_host = authority.decode("latin-1")
            raw_target = slash + rest or b"/"
        elif raw_target == b"*" and self.method == "OPTIONS":
            raw_target = b"/*"  # the server as a whole: OPTIONS answers for every endpoint
        elif raw_target[:1] != b"/":
            raise Refusal(400, "the request target %r does not start with '/'" % raw_target[:100])
        raw_path, _, self.query_string = raw_target.partition(b"?")
        if raw_path.startswith(b"//"):  # Werkzeug reads '//x' as '/x'
            raw_path = b"/" + raw_path.lstrip(b"/")
        self.target = raw_target.decode("latin-1")
        self.path = decode_path(raw_path)

    @property
    def headers(self):
        """The headers as the handler sees them, made on each call (Request keeps its own)."""
        return Headers.received(self.pairs)

    @property
    def keep_alive(self):
        if "close" in self.connection or (self.chunked and not self.http11):
            return False  # RFC 9112 6.1: chunked HTTP/1.0 has faulty framing; close after it
        return self.http11 or "keep-alive" in self.connection


def decode_path(raw):
    """Percent-decode a request path as UTF-8, invalid bytes becoming U+FFFD (Werkzeug's rule)."""
    if raw.find(b"%") < 0:  # not `in`: on bytes it makes and drops a TypeError first (1,800 instructions)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            pass
    return unquote_to_bytes(raw).decode("utf-8", "replace")


def without_body(method, status):
    """An answer that has no body, whatever its head says (RFC 9112 6.3): to HEAD, 1xx, 204, 304."""
    return method == "HEAD" or status in (204, 304) or status < 200


def header_fields(head, lines):
    """The header lines of a message head, a request's or a model server's answer's, read as
    strictly as h11 reads them: ({lower-case name: [values]} for framing, [(name, value)] in
    order).  `lines` is the head split at LF, the start line first.  A malformed line, a stray
    CR (which some read as a line end), NUL, VT or FF, or too many lines raise Refusal."""
    if _BAD_IN_HEAD.search(head, len(lines[0])):
        raise Refusal(400, "a header line holds a stray CR, NUL, VT or FF byte")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise Refusal(431, "more than %d header lines" % MAX_HEADER_COUNT)
    fields, pairs = {}, []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise Refusal(400, "folded header lines are not accepted")
        name, colon, value = line.partition(b":")
        name = name.decode("latin-1")
        if not colon or not _TOKEN.fullmatch(name):
            raise Refusal(400, "malformed header line %r" % line[:100].decode("latin-1"))
        value = value.strip(b" \t").decode("latin-1")
        fields.setdefault(name.lower(), []).append(value)
        pairs.append((name, value))
    return fields, pairs


def content_length_of(fields):
    """The Content-Length of a message with one (repeats allowed when they agree); Refusal(400)
    for one that is not a plain decimal number, or several that differ."""
    values = fields["content-length"]
    if len(values) == 1 and values[0].isdigit() and values[0].isascii() and len(values[0]) <= 18:
        return int(values[0])  # the usual one
    numbers = {value.strip() for joined in values for value in joined.split(",")}
    if len(numbers) != 1:
        raise Refusal(400, "conflicting Content-Length headers")
    number = numbers.pop()
    if not number.isdigit() or not number.isascii():  # "²".isdigit() is true, and int() refuses it
        raise Refusal(400, "invalid Content-Length %r" % number[:30])
    if len(number) > 18:  # far over any body limit; and int() refuses past 4300 digits
        raise Refusal(400, "a Content-Length of %d digits" % len(number))
    return int(number)


def is_chunked(fields, length):
    """True for a message with Transfer-Encoding, which must be chunked alone (Refusal(501)
    for another coding) and without a Content-Length (`length`; Refusal(400): the two together
    are how requests are smuggled)."""
    codings = [coding.strip(" \t").lower() for value in fields["transfer-encoding"] for coding in value.split(",")]
    if codings != ["chunked"]:
        raise Refusal(501, "only the chunked transfer coding is accepted, got %r" % ", ".join(codings)[:60])
    if length is not None:
        raise Refusal(400, "Content-Length and Transfer-Encoding together are ambiguous")
    return True


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9]\d\d)(?: [\t\x20-\x7e\x80-\xff]*)?\r?")


class ResponseHead:
    """A response's status line and headers, as the model server sends them, read by the rules a
    request head is read by (header_fields, content_length_of, is_chunked): what a client may not
    send us, the model server may not either, since whatever passes is relayed to the client.  A
    head that is not well-formed raises Refusal(502)."""

    def __init__(self, head, method):
        """`head` without its blank line; `method` the request's, which decides the framing."""
        lines = head.split(b"\n")
        status = _STATUS_LINE.fullmatch(lines[0])
        if status is None:
            raise Refusal(502, "not an HTTP/1.x status line: %r" % lines[0][:40])
        self.status = int(status.group(1))
        try:
            self.fields, self.pairs = header_fields(head, lines)
            self.framing = self._framing(method)
        except Refusal as exc:
            raise Refusal(502, exc.detail)

    def _framing(self, method):
        """How the body ends (RFC 9112 6.3): ("length", n), ("chunked", None), or ("close", None)
        when the connection's end is the body's."""
        if without_body(method, self.status):
            return "length", 0
        length = content_length_of(self.fields) if "content-length" in self.fields else None
        if "transfer-encoding" in self.fields and is_chunked(self.fields, length):
            return "chunked", None
        return ("length", length) if length is not None else ("close", None)

    def get(self, lower):
        """The first value of the header named `lower` (lower case), or None."""
        values = self.fields.get(lower)
        return values[0] if values else None


class HTTPResponse:
    """What the server writes back: a status, headers, and a body that is either bytes or an
    iterable of chunks sent as they come.  The Flask shim's Response is one, with Flask's API on
    top; a Refusal becomes one through refused()."""

    def __init__(self, status_code, headers=None, body=b"", chunks=None):
        self.status_code = status_code
        self.phrase = STATUS_PHRASES.get(status_code, "Unknown")
        self.headers = Headers(headers)
        self.body = body
        self.chunks = chunks

    @classmethod
    def refused(cls, refusal):
        """The answer to a Refusal: our JSON error body with the refusal's headers."""
        return cls(refusal.code, [("Content-Type", "application/json")] + refusal.headers, refusal.body())


def encode_head(status_code, phrase, headers, date, length=None, chunked=False, connection=None):
    """The one place a response head is written, for every answer on every socket: the status
    line, the response's own headers (hop-by-hop ones dropped: the framing is ours), Date and
    Server unless given, then Content-Length or chunked, and Connection when it is not the
    default.  Latin-1, as HTTP heads are: a header that is not raises UnicodeEncodeError."""
    key = (status_code, phrase, tuple(headers._items))
    fixed = _HEAD_LINES.get(key)
    if fixed is None:
        fixed = _head_lines(*key)
    head, date_wanted, server = fixed
    if date_wanted:
        head += b"Date: %s\r\n" % date.encode("ascii")
    head += server
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    elif chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    if connection is not None:
        head += b"Connection: %s\r\n" % connection.encode("ascii")
    return head + b"\r\n"


def encode_request_head(method, target, host, headers, length=None):
    """The one place a request head is written (to the model server): the request line, Host,
    `headers` (name, value) pairs checked as a response's are, so that a handler's header
    cannot split the request, then Content-Length when there is a body to frame."""
    lines = ["%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host)]
    lines.extend("%s: %s\r\n" % Headers._checked(name, value) for name, value in headers)
    if length is not None:
        lines.append("Content-Length: %d\r\n" % length)
    return "".join(lines).encode("latin-1") + b"\r\n"


# The status line and headers of the responses sent lately, encoded: most responses repeat a few
# heads ("200 OK, Content-Type: application/json"), and one written from this is 0.38 us against
# 0.92 us line by line (timeit).  Cleared when full, so that varying headers cannot grow it.
_HEAD_LINES = {}


def _head_lines(status_code, phrase, items):
    """(the status line and the response's own header lines, encoded; whether Date is to be
    added; the Server line, or nothing when the response names its own), remembered."""
    lines = ["HTTP/1.1 %d %s\r\n" % (status_code, phrase)]
    given = set()
    for name, value in items:
        lower = name.lower()
        given.add(lower)
        if lower not in HOP_BY_HOP:
            lines.append("%s: %s\r\n" % (name, value))
    server = b"" if "server" in given else b"Server: %s\r\n" % SERVER_HEADER.encode("ascii")
    fixed = ("".join(lines).encode("latin-1"), "date" not in given, server)
    if len(fixed[0]) <= 4096:
        if len(_HEAD_LINES) >= 256:
            _HEAD_LINES.clear()
        _HEAD_LINES[(status_code, phrase, items)] = fixed
    return fixed


class Headers:
    """Case-insensitive HTTP headers kept in order, with repeated names allowed (Werkzeug's
    Headers, reduced): a request's and a response's.  Iterating gives (name, value) pairs, as
    Flask's headers do."""

    _index = None  # a request's: {lower-case name: position}, until anything changes them

    def __init__(self, items=None):
        self._items = []
        if items:
            self.extend(items)

    @classmethod
    def received(cls, pairs):
        """A request's headers from its (name, value) lines, as Flask shows them: names
        title-cased, a repeated name joined into one value (", ", or "; " for Cookie)."""
        headers = cls()
        items = headers._items
        seen = {}
        for name, value in pairs:
            lower = name.lower()
            if lower in seen:
                index = seen[lower]
                items[index] = (items[index][0], cls.joined(lower, (items[index][1], value)))
            else:
                seen[lower] = len(items)
                items.append((name.title(), value))
        headers._index = seen  # a request's headers are looked up by name, a few times each
        return headers

    @staticmethod
    def joined(lower, values):
        """A request header's repeated values as one, as Flask shows them: "; " between Cookie
        values, ", " between any other's."""
        return ("; " if lower == "cookie" else ", ").join(values)

    @staticmethod
    def _pairs(items):
        if isinstance(items, Headers):
            return list(items._items)
        if hasattr(items, "items"):
            return list(items.items())
        return list(items)

    @staticmethod
    def _checked(name, value):
        """(name, value) as text, or ValueError for a name that is not a token or a value that
        holds a control character: either could split or corrupt the head it is written in."""
        name, value = str(name), str(value)
        if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise ValueError("invalid header %r: %r" % (name, value))
        return name, value

    def get(self, key, default=None, type=None):
        lower = key.lower()
        if self._index is not None:
            position = self._index.get(lower)
            if position is None:
                return default
            return _converted_one(self._items[position][1], type, default) if type else self._items[position][1]
        for name, value in self._items:
            if name.lower() == lower:
                return _converted_one(value, type, default)
        return default

    def getlist(self, key, type=None):
        lower = key.lower()
        return _converted((v for k, v in self._items if k.lower() == lower), type)

    get_all = getlist

    def __getitem__(self, key):
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        lower = key.lower()
        if self._index is not None:
            return lower in self._index
        return any(name.lower() == lower for name, _ in self._items)

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self):
        return len(self._items)

    def keys(self):
        return [name for name, _ in self._items]

    def values(self):
        return [value for _, value in self._items]

    def items(self):
        return list(self._items)

    def to_dict(self):
        out = {}
        for name, value in self._items:
            out.setdefault(name, value)
        return out

    def add(self, name, value):
        self._items.append(self._checked(name, value))
        self._index = None

    def extend(self, items):
        for name, value in self._pairs(items):
            self.add(name, value)

    def remove(self, key):
        lower = key.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lower]
        self._index = None

    __delitem__ = remove

    def set(self, name, value):
        self.remove(name)
        self.add(name, value)

    __setitem__ = set

    def setdefault(self, name, value):
        if name not in self:
            self.add(name, value)
        return self[name]

    def update(self, items):
        """Replace the named headers with the new values (all of them, when a name repeats)."""
        pairs = self._pairs(items)
        for name in {str(name).lower() for name, _ in pairs}:
            self.remove(name)
        for name, value in pairs:
            self.add(name, value)

    def __repr__(self):
        return "Headers(%r)" % (self._items,)


def _converted_one(value, type, default):
    """value passed through type(); the default when type() rejects it (Werkzeug's get)."""
    if type is None:
        return value
    try:
        return type(value)
    except (ValueError, TypeError):
        return default


def _converted(values, type):
    """Values passed through type(); the ones it rejects are dropped (Werkzeug's getlist)."""
    if type is None:
        return list(values)
    out = []
    for value in values:
        try:
            out.append(type(value))
        except (ValueError, TypeError):
            pass
    return out


class BodyBudget:
    """The bytes of request bodies the worker holds at once, over all connections, kept under a
    limit: a body is paid for before it is read (or, chunked, as it arrives) and given back once
    its request is answered.  A request that would pass the limit is refused with 503, so a few
    large uploads cannot take all the memory there is."""

    def __init__(self, limit):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size):
        """True when `size` more bytes fit (and are now held); False, holding nothing, if not."""
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give_back(self, size):
        with self._lock:
            self.held -= size

    def refusal(self):
        return Refusal(503, "the worker holds %d MB of request bodies, its limit; retry"
                       % (self.limit // 1048576), retry_after=1)


class DeadlineWatcher:
    """Enforces every connection's deadline from one thread: a connection still waiting past its
    deadline has its socket shut down, which wakes the thread blocked on it.  Sockets themselves
    have no timeout, since a timeout costs a poll() before every recv() and send(), and each system
    call is one more chance for a thread to lose the GIL for milliseconds."""

    def __init__(self, interval=0.2):
        self.interval = interval
        self._clients = set()
        threading.Thread(target=self._watch, name="deadlines", daemon=True).start()

    def watch(self, client):
        self._clients.add(client)

    def forget(self, client):
        self._clients.discard(client)

    def make_room(self):
        """Evict the connection making the least progress, for a new one: of those waiting for
        their client (idle, or still sending a request), the one nearest its time limit.  False
        when there is none: every connection is being served."""
        waiting = [(limit, id(client), client) for client in list(self._clients)
                   for limit in (client.limit,) if limit is not None and not client.evicted
                   and not client.writing]
        if not waiting:
            return False
        min(waiting)[2].evict()
        return True

    def _watch(self):
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            for client in list(self._clients):
                deadline = client.deadline
                if deadline is not None and now > deadline:
                    client.expire()


class LargeBlocks:
    """How glibc's malloc treats a large body's blocks, measured with 8 MB JSON bodies over fresh
    connections (bench/bench.py).  By default it hands blocks over 128 KiB to mmap() until the
    first is freed, then raises that threshold, and the blocks come from the heap of whichever of
    up to 16 arenas the connection's thread has, each keeping what it freed: uploads peaked at
    40 MB over idle and could creep further.  mmap() for every large block instead costs fresh
    zeroed pages each time: 8 MB answers took 27 ms instead of 14.  One arena, that keeps what it
    frees up to 64 MB, serving blocks up to 32 MB from its heap: 24 MB over idle (the body, its
    decoded text and the parsed value), stable over rounds, and 14 ms.  (The GIL serialises the
    threads anyway.)  Set the first time a large body arrives: ctypes costs 3 ms and 0.7 MB, which
    workers never taking one need not pay."""

    SIZE = 1 << 20  # a body from this size on is large
    settled = False

    @classmethod
    def settle(cls):
        if cls.settled:
            return
        cls.settled = True
        try:
            import ctypes
            mallopt = ctypes.CDLL(None).mallopt
        except (ImportError, OSError, AttributeError):  # not glibc, or no ctypes: nothing to settle
            return
        mallopt(-8, 1)  # M_ARENA_MAX
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


class ConnectionClosed(Exception):
    """The client went away before sending a whole request."""


class AbortStream(Exception):
    """A streamed body cannot go on (its source broke off, or its client left): the connection
    is closed without the body's proper end, so the client knows it is incomplete, and the log
    says why."""


# ------------------------------------------------------------------------------------------------
# 3. Flask shim: the request a handler receives
# ------------------------------------------------------------------------------------------------

class lazy:
    """A property computed on first use and then stored on the instance: most requests read only
    one or two of the many request attributes, so none is computed before it is asked for."""

    def __init__(self, compute):
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


class Request:
    """The request a handler receives, with Flask's attributes and behaviour,
    made from a RequestHead, the body and the connection it came on.  It is a plain object,
    valid for as long as anyone holds it, including a streaming generator."""

    def __init__(self, head, body, connection):
        self.method = head.method
        self.target = head.target  # the raw request target, e.g. '/value?x=1'
        self.path = head.path  # percent-decoded
        self.query_string = head.query_string  # bytes, as sent
        self.protocol = head.version
        self._head = head
        self.content_length = head.content_length
        self._absolute_host = head.absolute_host
        self.remote_addr, self.remote_port = connection.client_address[:2]
        self.server_address = connection.server_address
        self.scheme = connection.scheme
        self._body = body
        self._cached_json = (_MISSING, _MISSING)
        self.client_socket = connection.client  # whether its client has left: see ClientSocket.gone()
        self.auth = None  # the verified grant from the autoscaler, when the request carried one
        self.waited = None  # how long it waited for the backend's lock (None: it took none)

    @lazy
    def headers(self):
        """Made when first read: most handlers never read them, and each header is some 45
        bytecodes to make."""
        return self._head.headers

    def sent_header(self, name):
        """The value of a header as sent (`name` lower-case, without '_'), repeats joined as
        request.headers joins them; None when not sent.  For the worker's own reads, which
        need no request.headers."""
        values = self._head.fields.get(name)
        if values is None:
            return None
        return values[0] if len(values) == 1 else Headers.joined(name, values)

    def is_disconnected(self):
        """Has the client left?  A long handler (a model call) can ask, and stop: its answer
        would go nowhere.  Not Flask's: vastworker's."""
        return self.client_socket.gone()

    def replace_json(self, payload):
        """What the handler sees once a signed grant is taken off the body: the payload alone."""
        self._body = json.dumps(payload).encode()
        self._cached_json = (payload, payload)

    # -- body ------------------------------------------------------------------------------
    def get_data(self, cache=True, as_text=False, parse_form_data=False):
        body = self._body
        if not cache:
            self._body = b""
        return body.decode("utf-8", "replace") if as_text else body

    @property
    def data(self):
        """The raw body, always (Flask empties it once the form has been parsed from it)."""
        return self._body

    def get_json(self, force=False, silent=False, cache=True):
        """Flask's get_json: the body as JSON when the request says it is JSON (or force),
        else 415; with silent, None instead of an error."""
        cached = self._cached_json[silent]
        if cache and cached is not _MISSING:
            return cached
        if not (force or self.is_json):
            if silent:
                return None
            raise Refusal(415, "request.json needs Content-Type: application/json "
                               "(got %s)" % (self.content_type or "no Content-Type"))
        try:
            value = parse_request_json(self.get_data(cache=cache))
        except Refusal:
            if not silent:
                raise
            if cache:
                self._cached_json = (self._cached_json[0], None)
            return None
        if cache:
            self._cached_json = (value, value)
        return value

    @property
    def json(self):
        return self.get_json()

    @lazy
    def stream(self):
        return io.BytesIO(self._body)

    # -- content type ----------------------------------------------------------------------
    @property
    def content_type(self):
        return self.sent_header("content-type")

    @lazy
    def _parsed_content_type(self):
        return parse_content_type(self.content_type or "")

    @property
    def mimetype(self):
        return self._parsed_content_type[0]

    @property
    def mimetype_params(self):
        return dict(self._parsed_content_type[1])

    @property
    def is_json(self):
        if self.content_type == "application/json":  # the usual one, as sent
            return True
        mimetype = self.mimetype
        return mimetype == "application/json" or (
            mimetype.startswith("application/") and mimetype.endswith("+json"))

    # -- query, form, cookies --------------------------------------------------------------
    @lazy
    def args(self):
        query = self.query_string.decode("latin-1")
        return MultiDict(parse_qsl(query, keep_blank_values=True, encoding="utf-8",
                                   errors="replace"), "query parameter")

    @lazy
    def _form_and_files(self):
        mimetype = self.mimetype
        if mimetype == "application/x-www-form-urlencoded":
            if len(self._body) > MAX_FORM_BYTES:
                raise Refusal(413, "form data over %d bytes" % MAX_FORM_BYTES)
            pairs = parse_qsl(self._body.decode("latin-1"), keep_blank_values=True,
                              encoding="utf-8", errors="replace")
            return MultiDict(pairs, "form field"), MultiDict((), "file")
        if mimetype == "multipart/form-data":
            return parse_multipart(self.content_type, self._body)
        return MultiDict((), "form field"), MultiDict((), "file")

    @property
    def form(self):
        return self._form_and_files[0]

    @property
    def files(self):
        return self._form_and_files[1]

    @lazy
    def values(self):
        """Query and form values together; for GET, the query alone (Flask 2.0 and later)."""
        pairs = self.args.items(multi=True)
        if self.method != "GET":
            pairs += self.form.items(multi=True)
        return MultiDict(pairs, "field")

    @lazy
    def cookies(self):
        pairs = []
        for header in self.headers.getlist("Cookie"):
            for part in header.split(";"):
                name, sep, value = part.partition("=")
                name, value = name.strip(), value.strip()
                if sep and name:
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    pairs.append((name, value))
        return MultiDict(pairs, "cookie")

    # -- addresses ---------------------------------------------------------------------------
    @lazy
    def host(self):
        if self._absolute_host:
            return self._absolute_host
        host = self.headers.get("Host")
        if host:
            return host
        address, port = self.server_address[:2]
        return "%s:%d" % (address, port)

    @property
    def full_path(self):
        return self.path + "?" + self.query_string.decode("latin-1")

    @property
    def host_url(self):
        return "%s://%s/" % (self.scheme, self.host)

    url_root = host_url

    @property
    def base_url(self):
        return "%s://%s%s" % (self.scheme, self.host, self.target.partition("?")[0])

    @property
    def url(self):
        query = self.query_string.decode("latin-1")
        return self.base_url + ("?" + query if query else "")

    @property
    def access_route(self):
        forwarded = self.headers.get("X-Forwarded-For")
        if forwarded:
            return [address.strip() for address in forwarded.split(",")]
        return [self.remote_addr]

    @property
    def view_args(self):
        return {"endpoint": self.path[1:]}

    @lazy
    def environ(self):
        """A WSGI-style environ for code that reads one."""
        environ = {
            "REQUEST_METHOD": self.method, "SCRIPT_NAME": "", "PATH_INFO": self.path,
            "QUERY_STRING": self.query_string.decode("latin-1"), "REQUEST_URI": self.target,
            "RAW_URI": self.target, "SERVER_PROTOCOL": self.protocol,
            "SERVER_NAME": str(self.server_address[0]), "SERVER_PORT": str(self.server_address[1]),
            "REMOTE_ADDR": self.remote_addr, "REMOTE_PORT": str(self.remote_port),
            "wsgi.url_scheme": self.scheme, "wsgi.input": io.BytesIO(self._body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "wsgi.version": (1, 0),
        }
        if self.content_type is not None:
            environ["CONTENT_TYPE"] = self.content_type
        if self.content_length is not None:
            environ["CONTENT_LENGTH"] = str(self.content_length)
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ["HTTP_" + key] = value
        return environ

    def __repr__(self):
        return "<Request %s %r>" % (self.method, self.target)


class CurrentRequest(threading.local):
    """The request each thread is handling, for flask.request: set by dispatch for the handler
    call and the streaming of its response."""

    request = None


class RequestProxy:
    """flask.request: the request the current thread is handling (the object handlers receive)."""

    __slots__ = ("_current",)

    def __init__(self, current):
        self._current = current

    def __getattr__(self, name):
        request = self._current.request
        if request is None:
            raise RuntimeError("flask.request was used outside of a request")
        return getattr(request, name)

    def __bool__(self):
        return self._current.request is not None

    def __repr__(self):
        return repr(self._current.request)


_MISSING = object()  # "not given" where None is a value


class MultiDict:
    """A read-only multi-valued mapping (Werkzeug's ImmutableMultiDict) for args, form, values,
    files and cookies: item access gives the first value; a missing key is a 400."""

    def __init__(self, pairs=(), what="field"):
        self._lists = {}
        for key, value in pairs:
            self._lists.setdefault(key, []).append(value)
        self._what = what

    def __getitem__(self, key):
        if key in self._lists:
            return self._lists[key][0]
        raise BadRequestKeyError(key, "missing %s %r" % (self._what, key))

    def get(self, key, default=None, type=None):
        if key not in self._lists:
            return default
        return _converted_one(self._lists[key][0], type, default)

    def getlist(self, key, type=None):
        return _converted(self._lists.get(key, ()), type)

    def __contains__(self, key):
        return key in self._lists

    def __iter__(self):
        return iter(self._lists)

    def __len__(self):
        return len(self._lists)

    def keys(self):
        return self._lists.keys()

    def values(self):
        return [values[0] for values in self._lists.values()]

    def items(self, multi=False):
        if multi:
            return [(key, value) for key, values in self._lists.items() for value in values]
        return [(key, values[0]) for key, values in self._lists.items()]

    def lists(self):
        return [(key, list(values)) for key, values in self._lists.items()]

    def to_dict(self, flat=True):
        if flat:
            return {key: values[0] for key, values in self._lists.items()}
        return {key: list(values) for key, values in self._lists.items()}

    def __eq__(self, other):
        if isinstance(other, MultiDict):
            return self._lists == other._lists
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    def __repr__(self):
        return "MultiDict(%r)" % (self.items(multi=True),)


class BadRequestKeyError(Refusal, KeyError):
    """A lookup of a field the client did not send: a KeyError, as in Flask, so a handler's own
    `except KeyError` catches it; uncaught, it is refused with 400 naming the field."""

    def __init__(self, key, description):
        super().__init__(400, description)
        self.args = (key,)


def parse_request_json(body):
    """Strict JSON: NaN, Infinity, overflowing numbers, invalid UTF-8 and nesting
    too deep to parse are client errors, and so is a body that is just null.  Objects come back
    as JSONObject, a top-level array as JSONArray; what is refused raises Refusal(400)."""
    utf8 = body[:1] in _UTF8_JSON_STARTS and body[1:2] != b"\x00"  # else maybe UTF-16 or 32
    encoding = "utf-8" if utf8 else json.detect_encoding(body)
    try:  # strictly: json.loads' own "surrogatepass" would take CESU-8's encoded surrogates
        value = _REQUEST_JSON.decode(body.decode(encoding))
    except StrictJSONError as exc:
        raise Refusal(400, "invalid JSON: %s" % exc)
    except UnicodeDecodeError:
        raise Refusal(400, "invalid JSON: the body is not valid %s" % encoding.upper().replace("-SIG", ""))
    except RecursionError:
        raise Refusal(400, "invalid JSON: nested too deeply")
    except ValueError as exc:
        if not body.strip():
            raise Refusal(400, "the request body is empty; expected JSON")
        raise Refusal(400, "invalid JSON: %s" % exc)
    if value is None:
        raise Refusal(400, "the JSON body is null; expected a value")
    if type(value) is list:
        value = JSONArray(value)
    return value


class JSONObject(dict):
    """A JSON object from the request: a real dict whose missing keys are the client's fault."""

    __slots__ = ()

    def __missing__(self, key):
        raise BadRequestKeyError(key, "missing JSON field %r" % (key,))


class JSONArray(list):
    """A top-level JSON array from the request: a real list that answers 400, not 500, when a
    handler expecting an object looks up a field in it."""

    __slots__ = ()

    def __getitem__(self, index):
        if isinstance(index, str):
            raise BadRequestKeyError(index, "expected a JSON object with field %r, got an array" % (index,))
        return list.__getitem__(self, index)

    def __getattr__(self, name):
        if name in ("keys", "items", "values", "get"):
            raise Refusal(400, "expected a JSON object, got an array")
        raise AttributeError(name)


class StrictJSONError(ValueError):
    """A number JSON allows only by Python's leniency (NaN, Infinity, one that overflows)."""


def _reject_constant(name):
    raise StrictJSONError("non-finite number %s is not allowed" % name)


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise StrictJSONError("number %s is too large" % text[:40])
    return value


# One decoder for every request, as json.loads keeps one: json.loads given these hooks builds a new
# decoder and scanner each call, 1.1 us of a 13-byte body's 2.5 us (timeit).
_REQUEST_JSON = json.JSONDecoder(object_pairs_hook=JSONObject, parse_float=_finite_float,
                                 parse_constant=_reject_constant)
_UTF8_JSON_STARTS = (b"{", b"[", b'"')  # the usual first bytes: UTF-8, unless a NUL follows


class FileStorage:
    """An uploaded file from a multipart form (Werkzeug's FileStorage, reduced)."""

    def __init__(self, data, filename, name, content_type):
        self.stream = io.BytesIO(data)
        self.filename = filename
        self.name = name
        self.content_type = content_type
        self.mimetype = (content_type or "").split(";")[0].strip().lower()

    def read(self, size=-1):
        return self.stream.read(size)

    def save(self, destination):
        data = self.stream.getvalue()
        if hasattr(destination, "write"):
            destination.write(data)
        else:
            with open(destination, "wb") as file:
                file.write(data)

    def __repr__(self):
        return "<FileStorage %r (%r)>" % (self.filename, self.content_type)


def parse_content_type(value):
    """'Text/HTML; charset=utf-8' -> ('text/html', {'charset': 'utf-8'})."""
    mimetype, _, rest = value.partition(";")
    params = {}
    for part in rest.split(";"):
        key, sep, val = part.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"')
    return mimetype.strip().lower(), params


def parse_multipart(content_type, body):
    """multipart/form-data into (form, files).  Malformed input gives empty results, as in Flask."""
    form, files = [], []
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if message.is_multipart():
        parts = message.get_payload()
        if len(parts) > MAX_FORM_PARTS:
            raise Refusal(413, "more than %d form parts" % MAX_FORM_PARTS)
        for part in parts:
            name = part.get_param("name", header="content-disposition")
            if name is None:
                continue
            data = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            if filename is not None:
                files.append((name, FileStorage(data, filename, name, part.get("Content-Type"))))
            elif len(data) > MAX_FORM_BYTES:
                raise Refusal(413, "form field %r over %d bytes" % (name, MAX_FORM_BYTES))
            else:
                charset = part.get_content_charset() or "utf-8"
                form.append((name, data.decode(charset, "replace")))
    return MultiDict(form, "form field"), MultiDict(files, "file")


# ------------------------------------------------------------------------------------------------
# 3. Flask shim: what a handler returns, abort(), the flask module
# ------------------------------------------------------------------------------------------------

def to_response(value):
    """Convert what a handler returned into a response, as Flask does;
    raises BadReturnValue for what cannot be one."""
    if isinstance(value, HTTPResponse):
        return value
    if isinstance(value, str):
        return Response.plain(value.encode("utf-8"), HTML_CONTENT_TYPE)
    if isinstance(value, (dict, list)):
        try:
            return Response.plain(json_body(value).encode("ascii"), "application/json")
        except (TypeError, ValueError) as exc:
            raise BadReturnValue("the handler's result could not be sent as JSON: %s" % exc)
    if isinstance(value, (bytes, bytearray)):
        return Response.plain(bytes(value), HTML_CONTENT_TYPE)
    if isinstance(value, tuple):
        body, status, headers = _tuple_parts(value)
        response = to_response(body)
        try:
            if status is not None:
                response.status = status
            if headers:
                response.headers.update(headers)
        except (TypeError, ValueError) as exc:
            raise BadReturnValue(str(exc))
        return response
    if is_response(value):
        return _foreign_response(value)
    if value is None:
        raise BadReturnValue("the handler returned None; return a str, bytes, dict, list, "
                             "tuple, Response or iterator")
    if hasattr(value, "__next__") and hasattr(value, "__iter__"):
        return Response(value)
    raise BadReturnValue("the handler returned a %s; return a str, bytes, dict, list, tuple, "
                         "Response or iterator" % type(value).__name__)


def _tuple_parts(value):
    """(body, status, headers) from a returned (body, status, headers), (body, status) or
    (body, headers), as Flask reads them."""
    if len(value) == 3:
        body, status, headers = value
    elif len(value) == 2:
        body, second = value
        if isinstance(second, (Headers, dict, tuple, list)):
            status, headers = None, second
        else:
            status, headers = second, None
    else:
        raise BadReturnValue("a returned tuple must be (body, status, headers), (body, status) "
                             "or (body, headers); got %d items" % len(value))
    if isinstance(body, tuple):
        raise BadReturnValue("a returned tuple may not hold another tuple as its body")
    return body, status, headers


def _foreign_response(value):
    """A Werkzeug response object built by the handler itself: copy it into ours."""
    body = value.iter_encoded() if hasattr(value, "iter_encoded") else value.response
    return Response(body, value.status_code, list(value.headers.items()))


def is_response(value):
    """Ours or Werkzeug's (duck-typed): something with a status code, headers and a body."""
    return isinstance(value, HTTPResponse) or (
        hasattr(value, "status_code") and hasattr(value, "headers")
        and (hasattr(value, "iter_encoded") or hasattr(value, "response")))


class BadReturnValue(TypeError):
    """A handler returned something that is not a response; the message says what to return."""


CHARSET_MIMETYPES = frozenset(("application/ecmascript", "application/javascript",
                               "application/sql", "application/xml", "application/xml-dtd",
                               "application/xml-external-parsed-entity"))


def content_type_for(mimetype):
    """Werkzeug's rule: text types (and a few others) get '; charset=utf-8'."""
    if mimetype.startswith("text/") or mimetype in CHARSET_MIMETYPES or mimetype.endswith("+xml"):
        return mimetype + "; charset=utf-8"
    return mimetype


HTML_CONTENT_TYPE = content_type_for("text/html")  # a str or bytes result's, Flask's default


class Response(HTTPResponse):
    """flask.Response: an HTTPResponse with Flask's constructor and attributes -- a status, headers,
    and a body that is either bytes or an iterable streamed to the client chunk by chunk."""

    default_mimetype = "text/html"

    def __init__(self, response=None, status=None, headers=None, mimetype=None,
                 content_type=None, direct_passthrough=False):
        """Flask's signature: a str, bytes or iterable body, a status (int or '201 Created'),
        headers, and a mimetype or a whole content type (text/html by default)."""
        self.headers = Headers(headers)
        if content_type is None:
            if mimetype is None and "Content-Type" not in self.headers:
                mimetype = self.default_mimetype
            if mimetype is not None:
                content_type = content_type_for(mimetype)
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.status = 200 if status is None else status
        self.body = b""
        self.chunks = None
        if isinstance(response, (str, bytes, bytearray)):
            self.set_data(response)
        elif response is not None:
            self._set_iterable(response)

    @classmethod
    def plain(cls, body, content_type):
        """A 200 with a bytes body and its Content-Type, as most handlers' results become: the
        same response the constructor makes, without its decisions (a str's: 1.54 -> 0.39 us)."""
        response = cls.__new__(cls)
        response.headers = Headers()
        response.headers._items.append(("Content-Type", content_type))
        response._status_code, response.phrase = 200, "OK"
        response.body, response.chunks = body, None
        return response

    def _set_iterable(self, iterable):
        if isinstance(iterable, (list, tuple)):
            self.body = b"".join(item.encode() if isinstance(item, str) else bytes(item)
                                 for item in iterable)
        else:
            self.chunks = iterable

    @property
    def status(self):
        return "%d %s" % (self.status_code, self.phrase)

    @status.setter
    def status(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            code, phrase = value, None
        elif isinstance(value, str) and value.strip()[:3].isdigit():
            code, phrase = int(value.strip()[:3]), value.strip()[3:].strip() or None
        else:
            raise TypeError("a status must be an int or a string like '201 Created', got %r" % (value,))
        if not 100 <= code <= 999:
            raise ValueError("status code %d is not a three-digit HTTP status" % code)
        if phrase is not None and _CONTROL.search(phrase):
            raise ValueError("the status %r holds a control character" % (value,))
        self.status_code = code
        self.phrase = phrase or STATUS_PHRASES.get(code, "Unknown")

    @property
    def status_code(self):
        return self._status_code

    @status_code.setter
    def status_code(self, code):
        self._status_code = code
        self.phrase = STATUS_PHRASES.get(code, "Unknown")

    @property
    def is_streamed(self):
        return self.chunks is not None

    def get_data(self, as_text=False):
        if self.chunks is not None:  # reading a stream consumes it: keep what was read
            self._set_iterable(list(self.chunks))
            self.chunks = None
        return self.body.decode("utf-8", "replace") if as_text else self.body

    def set_data(self, value):
        self.body = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        self.chunks = None

    data = property(get_data, set_data)

    @property
    def content_type(self):
        return self.headers.get("Content-Type")

    @content_type.setter
    def content_type(self, value):
        self.headers["Content-Type"] = value

    @property
    def mimetype(self):
        value = self.content_type
        return parse_content_type(value)[0] if value else None

    @mimetype.setter
    def mimetype(self, value):
        self.headers["Content-Type"] = content_type_for(value)

    @property
    def json(self):
        return json.loads(self.get_data()) if self.mimetype == "application/json" else None

    def __repr__(self):
        return "<Response %s%s>" % (self.status, " streamed" if self.is_streamed else "")


def json_body(value):
    """Flask's JSON output (compact, sorted keys, ASCII, a trailing newline), but never NaN."""
    if _c_make_encoder is None:  # a Python without the _json accelerator
        return _json_encoder.encode(value) + "\n"
    encode = _c_make_encoder({}, _json_default, json.encoder.encode_basestring_ascii, None,
                             ":", ",", True, False, False)  # sort_keys, skipkeys, allow_nan
    return "".join(encode(value, 0)) + "\n"


def _json_default(value):
    """What Flask's JSON provider converts beyond plain JSON types."""
    datetime = sys.modules.get("datetime")
    if datetime is not None and isinstance(value, datetime.date):
        if not isinstance(value, datetime.datetime):
            value = datetime.datetime(value.year, value.month, value.day)
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc)
        return email.utils.format_datetime(value.replace(tzinfo=datetime.timezone.utc), usegmt=True)
    for module_name, class_name in (("decimal", "Decimal"), ("uuid", "UUID")):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(value, getattr(module, class_name)):
            return str(value)
    dataclasses = sys.modules.get("dataclasses")
    if dataclasses is not None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "__html__"):
        return str(value.__html__())
    raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)


_json_encoder = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True,
                                 allow_nan=False, default=_json_default)
# The C encoder _json_encoder.encode() makes for each call, made directly: encode()'s own set-up
# in Python was 0.4 of {"value": 5}'s 1.0 us (timeit, 3.8 to 3.13).  Each call has its own
# `markers`, the dict that finds circular references, so threads never share one.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)


def jsonify(*args, **kwargs):
    if args and kwargs:
        raise TypeError("jsonify() takes positional or keyword arguments, not both")
    value = kwargs if kwargs else (args[0] if len(args) == 1 else (list(args) if args else None))
    return Response.plain(json_body(value).encode("ascii"), "application/json")


def make_response(*args):
    if not args:
        return Response()
    return to_response(args[0] if len(args) == 1 else args)


def stream_with_context(generator_or_function):
    """Identity: our request stays valid while a stream is sent, so no context needs keeping."""
    return generator_or_function


def refused_response(refusal):
    """The response a Refusal is answered with: the one it carries (abort(response)), else our
    JSON error body."""
    if refusal.response is not None:
        return to_response(refusal.response)
    return HTTPResponse.refused(refusal)


class HTTPError(Refusal):
    """What abort() raises: a Refusal with the rest of Werkzeug's HTTPException face."""

    def __init__(self, code, description=None, response=None):
        super().__init__(code, description, response=response)

    def get_response(self):
        return refused_response(self)


def abort(status, description=None, response=None):
    """flask.abort: raise an HTTP error.  Any code from 400 to 599 is accepted (Flask only knows 31
    of them), so a proxy backend can pass an upstream status through; abort(response) sends it."""
    if isinstance(status, int) and not isinstance(status, bool):
        if 400 <= status <= 599:
            raise HTTPError(status, description, response)
        raise LookupError("abort() needs an HTTP error code from 400 to 599, got %d" % status)
    if is_response(status):
        raise HTTPError(status.status_code, response=status)
    raise LookupError("abort() needs an HTTP error code or a Response, got %r" % (status,))


def as_refusal(exc):
    """A Werkzeug HTTPException that a backend raised itself (it imported werkzeug) read as the
    Refusal it means; None for any other exception."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 400 <= code <= 599 and hasattr(exc, "description"):
        return Refusal(code, exc.description)
    return None


def make_flask_module(current):
    """The `flask` that backends import: ours whether or not Flask is installed, so behaviour never
    depends on the machine, its `request` reading `current`.  A name it lacks fails at import
    time, saying so."""
    exports = {"abort": abort, "Response": Response, "request": RequestProxy(current), "jsonify": jsonify,
               "make_response": make_response, "stream_with_context": stream_with_context}
    module = types.ModuleType("flask", "vastworker's standard-library stand-in for Flask")
    module.__dict__.update(exports)

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("flask.%s is not provided by vastworker (it provides %s)"
                          % (name, ", ".join(sorted(exports))))

    module.__getattr__ = __getattr__
    return module


# ------------------------------------------------------------------------------------------------
# 4. Worker: worker state and metrics
# ------------------------------------------------------------------------------------------------

class WorkerState:
    """The worker's readiness: one small state machine that every source feeds -- Backend(),
    the model's log, vastworker.ready() and failed(), the health check, the benchmark,
    /report_* -- and that the status record and the refusals read.  loading -> benchmarking ->
    loaded; failed from any of them; and from failed back to loaded only when the source that
    failed it says it has recovered (the model server's health check, once its launcher has
    restarted it).  A hold (no public key yet) keeps a loaded worker reported as loading.  From
    any of them, stopping (SIGTERM): for good, and said at once, before the requests in flight
    are drained, so that nothing more is routed to it."""

    MOVES = {"loading": ("benchmarking", "loaded", "failed", "stopping"),
             "benchmarking": ("loaded", "failed", "stopping"), "loaded": ("failed", "stopping"),
             "failed": ("loaded", "stopping"), "stopping": ()}

    def __init__(self, failure=None):
        """A worker loading, or one that failed before it could start (`failure` says why)."""
        self.phase = "loading" if failure is None else "failed"
        self.error = failure or ""
        self.failed_by = None  # the source of the failure: only it may take the failure back
        self.held = None  # a function: None, or the error_msg ("" for none yet) of a worker held back
        self.loadtime = 0.0
        self.max_perf = 0.0
        self.max_perf_known = False  # measured or declared, so admission may predict with it
        self.max_perf_source = "default"  # where max_perf came from, for /.vastworker/status
        self.max_capacity = 0
        self.on_ready = None  # what the worker does when the model is ready (the benchmark)
        self.on_change = []  # functions called after each change of phase (the ready file)
        self.phase_changed = threading.Event()  # the status reporter's
        self._lock = threading.Lock()

    def _changed(self):
        self.phase_changed.set()
        for call in self.on_change:
            call()

    def _move(self, allowed_from, phase):
        with self._lock:
            if self.phase not in allowed_from or phase not in self.MOVES[self.phase]:
                return False
            self.phase = phase
        self._changed()
        return True

    def rated(self, max_perf, source):
        """max_perf is known (measured, declared or reported): admission may predict with it."""
        self.max_perf, self.max_perf_known, self.max_perf_source = float(max_perf), True, source

    @property
    def word(self):
        """The phase as a person reads it: loading (benchmarking too), loaded, error, stopping."""
        return {"benchmarking": "loading", "failed": "error"}.get(self.phase, self.phase)

    def ready(self):
        """The model is ready: benchmark it (when the backend defines a benchmark), then loaded."""
        if self._move(("loading",), "benchmarking"):
            Log.write("info", "the backend is ready")
            if self.on_ready is None:
                self.loaded()
            else:
                threading.Thread(target=self.on_ready, name="benchmark", daemon=True).start()

    def loaded(self, max_perf=None, source=None, quiet=False):
        if max_perf is not None:
            self.rated(max_perf, source)
        if self._move(("loading", "benchmarking"), "loaded"):
            self.loadtime = round(time.monotonic() - STARTED, 3)
            if not quiet:
                Log.write("info", "loaded after %.2f s (max_perf %g)" % (self.loadtime, self.max_perf))

    def failed(self, message, source=None):
        """Failed, for good -- unless `source` later says it recovered()."""
        message = str(message) or "failed"
        with self._lock:
            if self.phase in ("failed", "stopping"):
                return
            self.phase, self.error, self.failed_by = "failed", message, source
        self._changed()
        Log.write("error", "the backend failed: %s" % message)

    def recovered(self, source):
        """`source`, which failed the worker, says the failure is over: loaded again."""
        with self._lock:
            if self.phase != "failed" or self.failed_by != source:
                return
            self.phase, self.error, self.failed_by = "loaded", "", None
        self._changed()
        Log.write("info", "the backend recovered (%s): loaded again" % source)

    def stopping(self):
        """The worker is stopping (SIGTERM or SIGINT): nothing new for it, from now on."""
        with self._lock:
            self.phase = "stopping"
        self._changed()

    def reported(self):
        """(phase, error_msg) as the autoscaler is told them: loading until ready for traffic
        (benchmarking, or held back), with what holds it back as the error_msg; stopping as it is."""
        phase, why = self.phase, self.held() if self.held is not None else None
        if phase == "benchmarking" or (phase == "loaded" and why is not None):
            phase = "loading"
        return phase, self.error or why or ""

    @property
    def accepting(self):
        return self.phase in ("loaded", "benchmarking")

    def most_work(self, queue_time):
        """The most workload one request or session may count for: what this worker serves within
        `queue_time` at its rate.  A client states its own cost (a grant's, a max_tokens), and
        one stated far past that would make every other request look like it must wait."""
        return (self.max_perf or DEFAULT_MAX_PERF) * queue_time

    def refusal(self):
        """The Refusal a backend request gets while the worker is not ready."""
        if self.phase == "stopping":
            return Refusal(503, "the worker is stopping; retry on another", retry_after=1)
        if self.phase == "failed" and self.failed_by == "health":  # its launcher may restart it
            return Refusal(503, "the model server is not healthy; retry later", retry_after=5)
        if self.phase == "failed":  # why is for its operator, in the log and the status reports
            return Refusal(503, "the backend failed; the worker's log says why")
        return Refusal(503, "the backend is still loading", retry_after=5)


class Metrics:
    """The request accounting the status record carries, with the newest generation's meanings:
    workload received and served since the last report, in flight now, and rejected.  A report
    takes a snapshot and acknowledges it once delivered, so what arrives in between is kept.
    Workloads are summed exactly, as whole thousandths: in floating point, 51 + 1e20 - 1e20 is
    0, and a worker whose cur_load drifts below zero looks idle to the autoscaler and to its own
    admission.  With nothing in flight, cur_load is exactly 0.
    The usual request's start and end are only queued, one append each and no lock, and counted
    in by whoever reads the counts (or every 256 ends): a locked update at each cost 9-12% of
    GET's throughput (interleaved A/B runs at 16 and 64 connections)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.received = 0  # num_requests_recieved: requests, ever
        self._working = 0  # num_requests_working
        self._starts = collections.deque()  # the workload of each request started, not yet counted in
        self._ends = tuple(collections.deque() for _ in range(3))  # of each ended: served, rejected, failed
        # In thousandths of a workload unit (ints, so every sum is exact):
        self._in_flight = 0  # cur_load: workload of the requests in flight, and of open sessions
        self._in_sessions = 0  # of that, open sessions' costs: no request waits behind them
        self._new = 0  # new_load: workload received since the last report
        self._served = 0  # cur_perf: workload served since the last report
        self._rejected = 0  # rej_load: workload refused since the last report
        self._news = False  # something happened since the last snapshot, besides what is queued
        self._reqnums, self._reqnum_order = set(), collections.deque()
        self._generation = 0  # restart()s so far: a snapshot taken before one is not taken back

    @property
    def has_news(self):
        """Something happened since the last snapshot."""
        return self._news or bool(self._starts) or any(self._ends)

    @has_news.setter
    def has_news(self, value):
        self._news = value

    @property
    def working(self):
        """num_requests_working: the requests (and sessions) in flight."""
        return self._now()[0]

    @property
    def in_flight(self):
        """cur_load: the workload of the requests in flight and of the open sessions."""
        return self._now()[1] / 1000

    @property
    def queued(self):
        """The workload a new request waits behind: the requests in flight, not the sessions
        (as Vast's worker leaves sessions out of its wait)."""
        _, in_flight, in_sessions = self._now()
        return (in_flight - in_sessions) / 1000

    def _now(self):
        """(requests in flight, their workload, of that the open sessions'), all counted in."""
        with self._lock:
            self._count_in()
            return self._working, self._in_flight, self._in_sessions

    def _count_in(self):
        """Count the queued starts and ends in, holding the lock.  The ends are taken first: a
        request's start is queued before its end, so each end taken has its start taken too,
        and no count ever shows less than nothing in flight."""
        served, rejected, failed = (taken(queue) for queue in self._ends)
        started = taken(self._starts)
        self.received += len(started)
        self._working += len(started) - len(served) - len(rejected) - len(failed)
        self._new += sum(started)
        self._served += sum(served)
        self._rejected += sum(rejected)
        self._in_flight += sum(started) - sum(served) - sum(rejected) - sum(failed)

    def _received(self, grant):
        """num_requests_recieved: distinct reqnums of granted requests (the last
        10 000 remembered), and one for each request without a grant.  Holding the lock."""
        reqnum = grant.get("reqnum") if grant else None
        if reqnum is None or isinstance(reqnum, (dict, list)):
            self.received += 1
        elif reqnum not in self._reqnums:
            self.received += 1
            self._reqnums.add(reqnum)
            self._reqnum_order.append(reqnum)
            if len(self._reqnum_order) > 10000:
                self._reqnums.discard(self._reqnum_order.popleft())

    def started(self, workload, grant=None, session=False):
        """A request (or, with `session`, a session) is in flight from now, counting `workload`."""
        units = round(workload * 1000)  # in thousandths (a method call here cost 0.1 us a request)
        if grant is None and not session:  # the usual request: one more, counted in later
            self._starts.append(units)
            return
        with self._lock:
            self._received(grant)
            self._working += 1
            self._in_flight += units
            self._new += units
            if session:
                self._in_sessions += units
            self._news = True

    def finished(self, workload, status, session=False):
        """It ended with `status`: served (below 400), rejected (429, 503) or failed."""
        units = round(workload * 1000)
        ended = self._ends[0 if status < 400 else 1 if status in (429, 503) else 2]
        if session:  # under the lock: no reader sees it leave the workload but not the sessions'
            with self._lock:
                ended.append(units)
                self._in_sessions -= units
        else:
            ended.append(units)
        if len(ended) >= 256:
            with self._lock:
                self._count_in()

    def refused(self, workload=None, grant=None, received=False):
        """A request refused before it started: turned away at the door (over
        --max-connections, counted at the default cost) or by admission (`received`: it counts
        as received too, as Vast's worker counts it)."""
        units = round((DEFAULT_WORKLOAD if workload is None else workload) * 1000)
        with self._lock:
            if received:
                self._received(grant)
            self._rejected += units
            self._news = True

    def snapshot(self):
        """The record's accounting fields, in workload units; acknowledge() takes it back."""
        with self._lock:
            self._count_in()
            self._news = False
            sums, generation = (self._in_flight, self._new, self._rejected, self._served), self._generation
            snapshot = _Snapshot(zip(("cur_load", "new_load", "rej_load", "cur_perf"),
                                     (value / 1000 for value in sums)),
                                 num_requests_working=self._working, num_requests_recieved=self.received)
        snapshot.units, snapshot.generation = sums, generation
        return snapshot

    def acknowledge(self, snapshot):
        """A report went through: start the next interval (what arrived meanwhile is kept).  A
        snapshot from before a restart() is not taken back: restart() dropped its counts already,
        and taking them again drove new_load below zero, which the autoscaler refuses."""
        _, new, rejected, served = snapshot.units
        with self._lock:
            if snapshot.generation != self._generation:
                return
            self._new -= new
            self._served -= served
            self._rejected -= rejected

    def restart(self):
        """Forget the benchmark's traffic when the worker is declared loaded."""
        with self._lock:
            self._count_in()
            self.received = 0
            self._reqnums, self._reqnum_order = set(), collections.deque()
            self._new = self._served = self._rejected = 0
            self._generation += 1


# Histogram bounds, in seconds, for request durations and waits for the lock: from a fast
# handler's milliseconds to a model's minutes.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


_FIRST, _SECOND, _THIRD = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


def observe(histogram, values):
    """Count `values` into a histogram: [count per bucket of BUCKETS (and past the last), sum]."""
    for bucket, count in collections.Counter(map(bisect.bisect_left, itertools.repeat(BUCKETS), values)).items():
        histogram[bucket] += count
    histogram[-1] += sum(values)


class RequestStats:
    """What GET /metrics counts of the requests, for ever (unlike Metrics, whose counts start
    again with each status report): answers by endpoint, method and status; their durations by
    endpoint and the waits for the lock, as histograms; grants refused by reason.  Endpoints are
    the backend's routes and the worker's own, anything else is "(other)": a label per path a
    client makes up would grow without bound."""

    def __init__(self, endpoints=()):
        self.endpoints = {"/" + name: name for name in endpoints}  # path -> its label
        self.answered = {}  # (endpoint, method, status) -> count
        self.durations = {}  # endpoint -> [count per bucket (and past the last), sum]
        self.waits = [0] * (len(BUCKETS) + 1) + [0.0]
        self.refused = {}  # reason -> grants refused
        self.pending = collections.deque()  # answers not yet counted in: see answer()
        self._lock = threading.Lock()

    def answer(self, method, path, status, seconds, waited=None):
        """An answer sent, `seconds` after its request came, having `waited` for the lock (None:
        it took none).  Only queued here, one append (atomic, no lock), and counted in at the
        next scrape, or every 256: counting each as it came, under a lock, cost 10% of GET c16's
        throughput, and a queue of 4096 4.4%, its tuples walked by the garbage collector;
        this, 0.1% (bench/metrics_cost.py; 1.7-2.9% while settle() counted each in Python)."""
        self.pending.append(((path, method, status), seconds, waited))
        if len(self.pending) >= 256:
            self.settle()

    def settle(self):
        """Count the queued answers in, alike ones (same path, method and status: most of them)
        together, each answer's part done in C: counting each in Python cost 73 bytecodes
        a request."""
        with self._lock:
            answers = taken(self.pending)
            answers.sort(key=_FIRST)
            for (path, method, status), group in itertools.groupby(answers, _FIRST):
                group = list(group)
                endpoint = self.endpoints.get(path, "(other)")
                key = (endpoint, method, status)
                self.answered[key] = self.answered.get(key, 0) + len(group)
                counts = self.durations.get(endpoint)
                if counts is None:
                    counts = self.durations[endpoint] = [0] * (len(BUCKETS) + 1) + [0.0]
                observe(counts, list(map(_SECOND, group)))
                observe(self.waits, [waited for waited in map(_THIRD, group) if waited is not None])

    def refuse(self, reason):
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def families(self):
        """The metric families, for exposition()."""
        self.settle()
        with self._lock:
            answered, waits = dict(self.answered), list(self.waits)
            durations, refused = {name: list(counts) for name, counts in self.durations.items()}, dict(self.refused)
        return [("vastworker_requests_total", "counter", "Requests answered, by endpoint, method and status code",
                 [({"endpoint": e, "method": m, "code": str(c)}, n) for (e, m, c), n in sorted(answered.items())]),
                ("vastworker_request_duration_seconds", "histogram", "Time from a request's arrival to its answer",
                 [({"endpoint": endpoint}, counts) for endpoint, counts in sorted(durations.items())]),
                ("vastworker_queue_wait_seconds", "histogram", "Time requests waited for the backend's lock",
                 [({}, waits)]),
                ("vastworker_grants_refused_total", "counter", "Requests refused for their grant, by reason",
                 [({"reason": reason}, count) for reason, count in sorted(refused.items())])]


def exposition(families):
    """Metric families -- (name, type, help, [(labels, value)]), a histogram's value being its
    counts per bucket then its sum -- in Prometheus' text format (version 0.0.4)."""
    lines = []
    for name, kind, help, samples in families:
        lines += ["# HELP %s %s" % (name, help), "# TYPE %s %s" % (name, kind)]
        for labels, value in samples:
            if kind != "histogram":
                lines.append("%s%s %s" % (name, _labels(labels), _number(value)))
                continue
            total = 0
            for bound, count in zip(BUCKETS + ("+Inf",), value[:-1]):
                total += count
                lines.append("%s_bucket%s %d" % (name, _labels(dict(labels, le=str(bound))), total))
            lines += ["%s_sum%s %s" % (name, _labels(labels), _number(value[-1])),
                      "%s_count%s %d" % (name, _labels(labels), total)]
    return "\n".join(lines) + "\n"


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\").replace('"', '\\"')
                                         .replace("\n", "\\n")) for key, value in labels.items())


def _number(value):
    return repr(float(value)) if isinstance(value, float) else str(int(value))


class _Snapshot(dict):
    """Metrics.snapshot(): the fields for the record; `units`, the exact sums behind them, and
    the `generation` (restarts) they belong to."""


class RequestLedger:
    """The requests the autoscaler routed here (those that carry a grant) from arrival to end, in
    the current Vast worker's terms: in flight, their request_idx in the status record's
    working_request_idxs; then finished with a status -- Success or Error once their handler
    ran, Cancelled when the client left, Rejected when refused before they started -- and their
    times, kept until a /delete_requests/ post has taken them.  At most `limit` wait: should the
    autoscaler never take them, the oldest are dropped, and the log says so."""

    def __init__(self, limit=100000):
        self.limit = limit
        self._lock = threading.Lock()
        self._working = {}  # id(record) -> record
        self._finished = collections.deque()

    def arrived(self, grant):
        record = {"request_idx": grant.get("request_idx"), "success": False, "status": "Created",
                  "entered_queue_at": time.time(), "work_started_at": 0.0, "work_completed_at": 0.0}
        with self._lock:
            self._working[id(record)] = record
        return record

    @staticmethod
    def started(record):
        record["status"], record["work_started_at"] = "Started", time.time()

    def finished(self, record, status):
        """The request ended with HTTP `status` (499: its client left)."""
        if status == 499:
            record["status"], record["success"] = "Cancelled", True  # as Vast's worker reports it
        elif not record["work_started_at"]:
            record["status"] = "Rejected"
        else:
            record["status"], record["success"] = ("Success", True) if status < 500 else ("Error", False)
            record["work_completed_at"] = time.time()
        with self._lock:
            self._working.pop(id(record), None)
            self._finished.append(record)
            dropped = len(self._finished) - self.limit
            for _ in range(max(dropped, 0)):
                self._finished.popleft()
        if dropped > 0:
            Log.write("warning", "%d finished request(s) dropped: /delete_requests/ has not taken them" % dropped)

    def working_idxs(self):
        with self._lock:
            return [record["request_idx"] for record in self._working.values()]

    def batch(self, size=500):
        """The oldest finished records, still held until delivered()."""
        with self._lock:
            return list(itertools.islice(self._finished, size))

    def delivered(self, records):
        """The autoscaler took these records (a batch()): forget them."""
        taken = {id(record) for record in records}
        with self._lock:
            self._finished = collections.deque(record for record in self._finished if id(record) not in taken)

    @property
    def waiting(self):
        return len(self._finished)


# ------------------------------------------------------------------------------------------------
# 4. Worker: the lock and the state store
# ------------------------------------------------------------------------------------------------

class QueueLock:
    """The lock that guards the Backend: first come, first served, with a bounded wait, so a
    request that cannot get its turn in time is refused rather than piling up threads."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._held = False
        self._waiters = collections.deque()

    CHECK_EVERY = 0.25  # seconds between asking a waiter's still_wanted()

    def acquire(self, timeout, still_wanted=None):
        """True when the lock is ours (at once, or handed over in arrival order); False when
        `timeout` seconds passed first, or when still_wanted(), asked every CHECK_EVERY seconds
        while waiting, says no (its client left): the waiter is then forgotten."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if turn.acquire(timeout=min(remaining, self.CHECK_EVERY) if still_wanted else remaining):
                return True
            if still_wanted is not None and not still_wanted():
                break
        with self._mutex:
            try:
                self._waiters.remove(turn)
            except ValueError:  # handed the lock just as the wait ended: it is ours
                return True
            return False

    def release(self):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # hand over directly, in arrival order
            else:
                self._held = False


class UnsaveableState(ValueError):
    """An attribute the state file must keep holds a value JSON cannot (inf, a 5,000-digit int)."""

    def __init__(self, name, reason):
        super().__init__("%r cannot be written as JSON (%s)" % (name, reason))
        self.name = name


class StateStore:
    """The Backend's state in a JSON file (opt-in, --state-file): its public attributes whose values
    JSON can hold, or only those named in the backend's `persist`, and the replay history of
    `history` (a GrantChecker), so a grant used before a restart stays used.  Restored at start;
    written atomically (a temporary file of unpredictable name created exclusively, fsync,
    rename) after each handler call that changed it, before the response is sent, so an
    acknowledged change survives even kill -9.  A change that cannot be written is undone and
    refused: 503 when the disk fails, 422 when an attribute it keeps would hold what JSON cannot.
    A file it cannot read is never replaced: the worker stops and says why in one line."""

    def __init__(self, path, names=None, history=None):
        self.path = os.path.abspath(path)
        self.names = names
        self.history = history
        self.saved = None  # the text last written (or read)
        self.kept = set()  # the attributes that text holds: from now on they must stay JSON

    def load(self):
        """The saved attributes (the replay history restored), or None when there is no file yet."""
        try:
            with open(self.path, "rb") as file:
                text = file.read().decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError("cannot read the state file %s: %s" % (self.path, getattr(exc, "strerror", None) or exc))
        try:
            document = self.parse(text)
            if self.history is not None and "replay" in document:
                self.history.restore_history(document["replay"])
        except ValueError as exc:
            raise StartupError("the state file %s is not valid (%s); fix it or move it away -- it is "
                               "never replaced unread" % (self.path, exc))
        self.saved = text
        return document["state"]

    @staticmethod
    def parse(text):
        """The document in a state file's text, checked; ValueError says what is wrong."""
        try:
            document = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply")
        if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
            raise ValueError('expected {"state": {...}}')
        unexpected = sorted(set(document) - {"state", "replay"})
        if unexpected:
            raise ValueError("unexpected keys: %s" % ", ".join(unexpected))
        for name in document["state"]:
            if name.startswith("_"):
                raise ValueError("attribute %r is private: it is never saved, so it is not restored" % name)
        return document

    def check_writable(self):
        """A state file that could never be written is a mistake to stop at, not 503s later."""
        import tempfile
        try:
            handle, probe = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".probe",
                                             dir=os.path.dirname(self.path))
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise StartupError("cannot write the state file %s: %s" % (
                self.path, exc.strerror or exc) + ("" if os.path.isdir(os.path.dirname(self.path))
                                                   else " (its directory does not exist)"))

    def restore(self, backend, attributes):
        """Put saved attributes back on the backend; raises StartupError for one it refuses."""
        for name, value in attributes.items():
            if self.names is None or name in self.names:
                try:
                    setattr(backend, name, value)
                except Exception as exc:
                    raise StartupError("the state file %s holds attribute %r, which the Backend "
                                       "refuses: %s" % (self.path, name, describe_exception(exc)))
        try:
            self.saved, self.kept = self.snapshot(backend)
        except UnsaveableState as exc:
            raise StartupError("the Backend's state cannot be saved in %s: %s" % (self.path, exc))

    def snapshot(self, backend):
        """(the file's text for the backend's attributes as they are now, the names it holds).
        An attribute whose value is of no JSON type (a lock, a model) is left out, unless the
        file kept it before or `persist` names it; one that JSON cannot hold raises
        UnsaveableState."""
        attributes = {name: value for name, value in vars(backend).items()
                      if not name.startswith("_") and (self.names is None or name in self.names)}
        document = {"state": attributes}
        history = self.history.history() if self.history is not None else None
        if history:
            document["replay"] = history
        try:  # serialised once; attribute by attribute only when something cannot be
            return json.dumps(document, sort_keys=True, allow_nan=False), set(attributes)
        except (TypeError, ValueError, RecursionError):
            pass
        for name, value in list(attributes.items()):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                if name in self.kept or self.names is not None or not isinstance(exc, TypeError):
                    raise UnsaveableState(name, exc)
                del attributes[name]  # locks, threads, models: not state this file can hold
        return json.dumps(document, sort_keys=True, allow_nan=False), set(attributes)

    def save_if_changed(self, backend):
        """Write the file if the attributes changed.  If they cannot be written, put them back as
        last saved and refuse the request, so nothing is answered that was not saved."""
        try:
            text, names = self.snapshot(backend)
            if text == self.saved:
                return
            self.write(text)
        except (UnsaveableState, OSError) as exc:
            if self.saved is not None:
                self.restore(backend, json.loads(self.saved)["state"])
            if isinstance(exc, UnsaveableState):
                raise Refusal(422, "the request would leave the backend's state unsaveable: %s; it "
                                   "was not applied" % exc)
            Log.write("error", "could not write the state file %s: %s; the change was undone"
                      % (self.path, exc.strerror or exc))
            raise Refusal(503, "the backend's state could not be saved, so the request was not "
                               "applied; retry", retry_after=1)
        self.saved, self.kept = text, names

    def write(self, text):
        """Replace the file atomically.  The temporary file is made by mkstemp: a random name,
        created exclusively and never through a symlink, in the file's own directory."""
        import tempfile
        folder, name = os.path.split(self.path)
        handle, temporary = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(text.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)  # the rename itself must survive a crash
        finally:
            os.close(handle)


# ------------------------------------------------------------------------------------------------
# 4. Worker: signed grants
# ------------------------------------------------------------------------------------------------
#
# A client asks the autoscaler's /route/ for a worker and gets a grant: this worker's url, the
# endpoint, the request's cost (its workload), reqnum and request_idx (the autoscaler's
# counters), and a signature -- RSA PKCS#1 v1.5 over SHA-256, base64 -- made with the key that
# {REPORT_ADDR}/pubkey/ serves.  The client sends the grant with its payload: beside it, as the
# original generation's flat fields, or as {"auth_data": grant, "payload": ...}.  Which bytes are
# signed has changed with Vast's worker generations; these are the grant shapes:
#
#   g1  the original worker (2023-24), and g2 (2024-25), which signed the same bytes:
#       {"cost", "endpoint", "reqnum", "url"} in that order, json.dumps(indent=4)
#   g3  late 2025: all five fields, request_idx too, json.dumps(indent=4, sort_keys=True)
#   g4  Vast's current worker (2026): {"url": url} alone, json.dumps(indent=4, sort_keys=True).
#       Only the url is authenticated: the signature is the same for every request to a worker
#
# The message is rebuilt from the JSON the client sent, so a value's type matters (242.0 is
# not 242).  --grant-shape auto tries g4, g3 and g1 in turn.

GRANT_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "url")  # what /route/ grants carry
GRANT_SHAPES = ("auto", "g4", "g3", "g1")
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")
INTERNAL_HEADER = "X-Vastworker-Internal"  # the worker's own requests (its benchmark) carry this
INTERNAL_HEADER_LOWER = INTERNAL_HEADER.lower()
INTERNAL_TOKEN = os.urandom(16).hex()  # ... with this value, known to no one outside the process


class GrantChecker:
    """Checks the signed grant a request carries, in either form (flat fields or the auth_data
    envelope).  The handler then sees the payload alone as request.json, and the verified grant
    as request.auth.  Replays are refused as the original did: a reqnum far below the highest
    seen, or a grant among the last 100 accepted.  Every refusal is a Refusal: 401 for a grant
    that does not verify, 422 for an incomplete envelope, 503 while the key is awaited."""

    HISTORY = 100

    def __init__(self, key=None, shape="auto", allow_unsigned=False, key_expected=False):
        self.key = key
        self.shape = shape
        self.shapes = ("g4", "g3", "g1") if shape == "auto" else (shape,)
        self.allow_unsigned = allow_unsigned
        self.key_expected = key_expected  # a key is being fetched: sign-or-wait, never serve openly
        self.own_url = ""  # this worker's public url, when known: grants for another are refused
        self.on_bad_signature = None  # called when a signature does not verify (the key may be new)
        self.highest_reqnum = None
        self.recent = collections.deque()
        self.recent_set = set()
        self.bad_signatures = {}  # signature -> (reqnum, request_idx, url) of the grant it came on
        self.next_note = 0.0  # when a bad signature may be logged again
        self.repeat_told = False  # a signature seen on two different grants was logged (once, at once)
        self._lock = threading.Lock()

    @property
    def waiting_for_key(self):
        """Requests would be refused until the key arrives: not ready for traffic yet."""
        return self.key is None and self.key_expected and not self.allow_unsigned

    def describe(self, source):
        """One log line on the policy in force."""
        if self.key is not None:
            Log.write("info", "checking signed grants with the key from %s (%d bits, shape %s)%s"
                      % (source, self.key.n.bit_length(), self.shape,
                         "; unsigned requests allowed" if self.allow_unsigned else ""))
        elif self.key_expected:
            Log.write("info", "fetching the autoscaler's public key from %s/pubkey/%s"
                      % (source, "; unsigned requests allowed" if self.allow_unsigned else ""))
        else:  # local use, no autoscaler: said, but not as a problem
            Log.write("info", "no autoscaler (REPORT_ADDR) and no public key (--pubkey, $VASTWORKER_PUBKEY): "
                              "requests are served without checking signatures")

    def check(self, request, sessions=None):
        """Let the request through to its handler (unwrapped from its grant), or raise Refusal.
        A request inside a session (its envelope names a session_id) must carry that session's
        grant, verified but not refused as a replay, and extends the session; an unknown or
        ended session is 410.  Returns the request's Session, or None."""
        internal = request.sent_header(INTERNAL_HEADER_LOWER)
        if internal is not None:
            import hmac
            if hmac.compare_digest(internal.encode(), INTERNAL_TOKEN.encode()):
                return  # the worker's own benchmark: it has no grant to show
        body = request.get_data()
        grant = session_id = None
        if body.find(b'"signature"') >= 0 or body.find(b'"auth_data"') >= 0:  # parsed only if it may carry one
            try:
                data = parse_request_json(body)
            except Refusal:
                data = None
            grant, payload = self.grant_of(data)
            if grant is not None:
                request.replace_json(payload)
                session_id = data.get("session_id")
        if session_id is not None:
            return self.check_in_session(request, grant, session_id, sessions)
        if self.key is None:
            if self.key_expected and not self.allow_unsigned:
                raise Refusal(503, "waiting for the autoscaler's public key", retry_after=5)
            request.auth = grant
            return
        if grant is None:
            if self.allow_unsigned:
                return
            raise Refusal(401, "this worker needs a signed grant from the autoscaler's /route/")
        problem = self.verify(grant)
        if problem:
            raise Refusal(401, problem)
        request.auth = grant
        return None

    def check_in_session(self, request, grant, session_id, sessions):
        """A request inside a session: its Session, extended, or a Refusal (a 401 extends nothing)."""
        session = sessions.find(session_id) if sessions is not None else None
        if session is None:
            raise Refusal(410, "session %r is unknown or has ended" % (session_id,))
        if self.key is not None:
            problem = self.verify(grant, replay=False)
            if problem:
                raise Refusal(401, problem)
        if not session.granted_by(grant):
            raise Refusal(401, "the grant is not the one session %r was created with" % (session_id,))
        session.extend()
        request.auth = grant
        return session

    @staticmethod
    def grant_of(data):
        """(grant, payload) from a request's JSON; (None, None) when it carries no grant; an
        incomplete envelope is refused with 422 naming what is missing."""
        if not isinstance(data, dict):
            return None, None
        if "auth_data" in data:
            grant, payload = data.get("auth_data"), data.get("payload", _MISSING)
            if not isinstance(grant, dict):
                raise Refusal(422, {"auth_data": "must be an object"})
            missing = {name: "missing parameter" for name in ("signature", "cost", "endpoint", "reqnum", "url")
                       if name not in grant}
            if missing:
                raise Refusal(422, {"auth_data": missing})
            if payload is _MISSING:
                raise Refusal(422, {"payload": "field missing"})
            return {name: grant[name] for name in ("signature",) + GRANT_FIELDS if name in grant}, payload
        if "signature" in data:
            grant = {name: data[name] for name in ("signature",) + GRANT_FIELDS if name in data}
            payload = JSONObject((key, value) for key, value in data.items() if key not in grant)
            return grant, payload
        return None, None

    def verify(self, grant, replay=True):
        """None when the grant is genuine and (unless replay is False) fresh, else why not.  Only
        what is signed moves the replay history: under g1 and g3 the reqnum is
        signed, and each grant is known by its signature's bytes (not their base64 text, which
        can be written several ways); under g4 only the url is signed, the same for every
        request to this worker, so nothing tells one request from another and no history is
        kept or moved.  A grant for another worker's url is refused when this one knows its own."""
        for name in ("signature", "cost", "endpoint", "reqnum", "url"):
            if name not in grant:
                return "the grant has no %s" % name
        if not isinstance(grant["reqnum"], int) or isinstance(grant["reqnum"], bool):
            return "the grant's reqnum is not an integer"
        if self.own_url and grant["url"] != self.own_url:  # Vast's worker never checks
            return "the grant is for %r, not this worker (%s)" % (str(grant["url"])[:100], self.own_url)
        shape = self.shape_of(grant)
        if shape is None:
            self.note_bad_signature(grant)
            if self.on_bad_signature is not None:
                self.on_bad_signature()
            return "the grant's signature does not verify"
        if shape == "g4" or not replay:
            return None
        import base64
        import hashlib
        known_as = hashlib.sha256(base64.b64decode(grant["signature"], validate=True)).hexdigest()
        with self._lock:
            if self.highest_reqnum is not None and grant["reqnum"] < self.highest_reqnum - self.HISTORY:
                return "the grant's reqnum %d is too old (the newest is %d)" % (grant["reqnum"], self.highest_reqnum)
            if known_as in self.recent_set:
                return "the grant was already used"
            self.recent.append(known_as)
            self.recent_set.add(known_as)
            if len(self.recent) > self.HISTORY:
                self.recent_set.discard(self.recent.popleft())
            self.highest_reqnum = max(grant["reqnum"], self.highest_reqnum or grant["reqnum"])
        return None

    def note_bad_signature(self, grant):
        """Log, at most once a minute, that a signature verified in no shape, and whether the same
        signature came before on a different grant (then the autoscaler does not sign the grant's
        own fields), naming the doctor, which finds out more."""
        told, signature = (grant["reqnum"], grant.get("request_idx"), grant["url"]), str(grant["signature"])[:2048]
        with self._lock:
            before = self.bad_signatures.get(signature)
            self.bad_signatures[signature] = told
            while len(self.bad_signatures) > self.HISTORY:
                del self.bad_signatures[next(iter(self.bad_signatures))]
            repeated = before is not None and before != told
            now = time.monotonic()
            if now < self.next_note and not (repeated and not self.repeat_told):
                return
            self.next_note, self.repeat_told = now + 60.0, self.repeat_told or repeated
        Log.write("warning", "a grant's signature verifies in none of the shapes tried (%s)%s; `python3 "
                             "vastworker.py doctor BACKEND --endpoint NAME` tells which the autoscaler signs" % (
                                 ", ".join(self.shapes), "; the same signature came on a different grant (reqnum, "
                                 "request_idx, url %s, then %s)" % (printable(str(before)), printable(str(told)))
                                 if repeated else ""))

    def shape_of(self, grant):
        """The shape whose message the grant's signature verifies, or None."""
        for shape in self.shapes:
            if shape == "g3" and "request_idx" not in grant:
                continue
            if self.key.verify(signed_message(grant, shape).encode(), grant["signature"]):
                return shape
        return None

    def history(self):
        """The replay history, for the state file (None while there is none)."""
        with self._lock:
            if not self.recent:
                return None
            return {"highest_reqnum": self.highest_reqnum, "recent": list(self.recent)}

    def restore_history(self, saved):
        """Take back a history() from the state file; ValueError when it is not one."""
        if not isinstance(saved, dict) or set(saved) - {"highest_reqnum", "recent"} or \
                not isinstance(saved.get("recent"), list) or len(saved["recent"]) > self.HISTORY or \
                not all(isinstance(known_as, str) and re.fullmatch(r"[0-9a-f]{64}", known_as)
                        for known_as in saved["recent"]) or \
                not isinstance(saved.get("highest_reqnum"), (int, type(None))):
            raise ValueError("its replay history is not one this worker wrote")
        with self._lock:
            self.highest_reqnum = saved.get("highest_reqnum")
            self.recent = collections.deque(saved["recent"])
            self.recent_set = set(self.recent)


def signed_message(grant, shape):
    """The text the autoscaler signed for a grant, in one of the shapes above."""
    if shape == "g1":
        return json.dumps({name: grant[name] for name in ("cost", "endpoint", "reqnum", "url")}, indent=4)
    if shape == "g3":
        return json.dumps({name: grant[name] for name in GRANT_FIELDS}, indent=4, sort_keys=True)
    return json.dumps({"url": grant["url"]}, indent=4, sort_keys=True)


class RSAPublicKey:
    """An RSA public key, and RSASSA-PKCS1-v1_5 / SHA-256 verification by comparing the whole
    expected encoding (never by parsing the decrypted block, which invites forgeries)."""

    def __init__(self, n, e):
        if n < 2 ** 1023 or e < 3 or e % 2 == 0:
            raise ValueError("not a usable RSA key (at least 1024 bits, odd exponent)")
        self.n, self.e = n, e
        self.size = (n.bit_length() + 7) // 8

    @classmethod
    def from_pem(cls, text):
        """'BEGIN PUBLIC KEY' (SubjectPublicKeyInfo) or 'BEGIN RSA PUBLIC KEY' (PKCS#1) PEM, or the
        bare base64 of either."""
        import base64
        lines = [line.strip() for line in text.strip().splitlines()]
        body = "".join(line for line in lines if line and not line.startswith("-----"))
        try:
            outer = DERReader(DERReader(base64.b64decode(body, validate=True)).read(0x30))
            if outer.data[:1] == b"\x30":  # SubjectPublicKeyInfo: the algorithm, then the key
                algorithm = DERReader(outer.read(0x30))
                if algorithm.read(0x06) != RSA_ENCRYPTION_OID:
                    raise ValueError("not an RSA key")
                bits = outer.read(0x03)
                if bits[:1] != b"\x00":
                    raise ValueError("bad BIT STRING")
                outer = DERReader(DERReader(bits[1:]).read(0x30))
            return cls(outer.integer(), outer.integer())
        except (ValueError, IndexError) as exc:
            raise ValueError("not an RSA public key in PEM: %s" % exc)

    def expected_encoding(self, message):
        import hashlib
        digest = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        return b"\x00\x01" + b"\xff" * (self.size - 3 - len(digest)) + b"\x00" + digest

    def verify(self, message, signature):
        """Is signature (base64 text) a PKCS#1 v1.5 SHA-256 signature of message (bytes)?"""
        import base64
        import hmac
        try:
            raw = base64.b64decode(signature, validate=True)
        except (ValueError, TypeError):
            return False
        if len(raw) != self.size:
            return False
        number = int.from_bytes(raw, "big")
        if number >= self.n:
            return False
        decrypted = pow(number, self.e, self.n).to_bytes(self.size, "big")
        return hmac.compare_digest(decrypted, self.expected_encoding(message))


class DERReader:
    """Just enough DER to read an RSA public key."""

    def __init__(self, data):
        self.data = data
        self.position = 0

    def read(self, expected_tag):
        data, position = self.data, self.position
        if position + 2 > len(data) or data[position] != expected_tag:
            raise ValueError("unexpected DER tag")
        length, position = data[position + 1], position + 2
        if length & 0x80:
            count = length & 0x7F
            if not 0 < count <= 4 or position + count > len(data):
                raise ValueError("bad DER length")
            length, position = int.from_bytes(data[position:position + count], "big"), position + count
        if position + length > len(data):
            raise ValueError("truncated DER")
        self.position = position + length
        return data[position:position + length]

    def integer(self):
        return int.from_bytes(self.read(0x02), "big", signed=True)


class Sessions:
    """Vast's sessions: /session/create takes a verified grant -- Vast's worker
    checks none -- and opens a session whose requests reuse that grant; /session/get, /health
    and /end need it back as session_auth.  At most `limit` are open (then 429); one that
    expires is closed by a sweep every 5 s.  Closing cuts the connections of its requests in
    flight, calls its on-close route (through `on_close`, given by the Worker) and reports it.
    What a grant may ask for is bounded: a lifetime up to `max_lifetime` seconds (longer is a
    422), a cost counted up to `most_work()` (see WorkerState.most_work)."""

    NAMES = ("session/create", "session/get", "session/health", "session/end")

    def __init__(self, grants, ledger, metrics, limit=10, on_close=None, max_lifetime=3600.0,
                 most_work=None):
        self.grants = grants
        self.ledger = ledger
        self.metrics = metrics
        self.limit = limit
        self.max_lifetime = max_lifetime
        self.most_work = most_work  # () -> the largest cost a session counts for; None: no bound
        self.on_close = on_close  # on_close(session): POST its on_close_route, in the background
        self._open = {}
        self._lock = threading.Lock()

    def start(self):
        def sweep_forever():
            while True:
                time.sleep(Waits.of(5.0))
                for session in self.expired():
                    self.close(session, "expired")

        threading.Thread(target=sweep_forever, name="sessions", daemon=True).start()

    def expired(self):
        now = time.time()
        with self._lock:
            return [session for session in self._open.values() if session.expiration <= now]

    def find(self, session_id):
        """The open session, or None (an expired one is closed on the spot)."""
        with self._lock:
            session = self._open.get(session_id) if isinstance(session_id, str) else None
        if session is not None and session.expiration <= time.time():
            self.close(session, "expired")
            return None
        return session

    def respond(self, name, request):
        """The answer to one of the NAMES; a Refusal for bad input (422), an unknown or ended
        session (410), a grant or session_auth that does not hold (401), or too many (429)."""
        data = request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            raise Refusal(422, "expected a JSON object")
        if name == "session/create":
            return self.create(request, data)
        session_id = data.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise Refusal(422, {"session_id": "missing, or not a string"})
        session = self.find(session_id)
        if session is None:
            if name == "session/health":
                return {"ok": False}
            raise Refusal(410, "session %r is unknown or has ended" % session_id)
        session_auth = data.get("session_auth")
        if not isinstance(session_auth, dict) or not session.granted_by(session_auth):
            raise Refusal(401, "session_auth is not the session's grant")
        if name == "session/get":
            return session.describe()
        if name == "session/health":
            return {"ok": True}
        if not self.close(session, "ended"):
            raise Refusal(410, "session %r has already ended" % session_id)
        return {"ended": True, "removed_session": session_id}

    def create(self, request, data):
        grant, payload = GrantChecker.grant_of(data)
        if grant is None:
            raise Refusal(422, {"auth_data": "field missing"})
        if not isinstance(payload, dict):
            raise Refusal(422, {"payload": "must be an object"})
        lifetime = payload.get("lifetime", 60.0)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime < 1e9:
            raise Refusal(422, {"payload": {"lifetime": "must be a positive number of seconds"}})
        if lifetime > self.max_lifetime:
            raise Refusal(422, {"payload": {"lifetime": "at most %g seconds on this worker "
                                                        "(--max-session-lifetime)" % self.max_lifetime}})
        route, close_payload = payload.get("on_close_route"), payload.get("on_close_payload")
        if route is not None and (not isinstance(route, str) or not route):
            raise Refusal(422, {"payload": {"on_close_route": "must be a path or URL"}})
        if self.grants.key is None and self.grants.waiting_for_key:
            raise Refusal(503, "waiting for the autoscaler's public key", retry_after=5)
        if self.grants.key is not None:
            problem = self.grants.verify(grant)
            if problem:
                raise Refusal(401, problem)
        import secrets
        cost = grant.get("cost", DEFAULT_WORKLOAD)
        cost = float(cost) if is_number(cost) else DEFAULT_WORKLOAD
        if self.most_work is not None:
            cost = min(cost, self.most_work())
        with self._lock:
            if len(self._open) >= self.limit:
                self.metrics.refused(cost, grant, received=True)
                raise Refusal(429, "this worker has %d sessions open, its limit" % self.limit, retry_after=1)
            record = self.ledger.arrived(grant)
            self.ledger.started(record)
            session = Session(secrets.token_urlsafe(16), grant, float(lifetime), route, close_payload, record, cost,
                              self.max_lifetime)
            self._open[session.session_id] = session
        self.metrics.started(cost, grant, session=True)
        Log.write("info", "session %s opened for %g s" % (session.session_id, session.lifetime))
        return {"session_id": session.session_id, "expiration": session.expiration}, 201

    def close(self, session, why):
        """Close it once: cut its requests in flight, call its on-close route, report it; False
        when it was closed already."""
        with self._lock:
            if self._open.pop(session.session_id, None) is None:
                return False
        for client in list(session.in_flight):
            client.abandon()
        if session.on_close_route and self.on_close is not None:
            self.on_close(session)
        self.ledger.finished(session.record, 200)
        self.metrics.finished(session.cost, 200, session=True)
        Log.write("info", "session %s %s" % (session.session_id, why))
        return True


class Session:
    """One session: the grant it was created with, which its requests carry again, its lifetime
    (each accepted request extends it by that much), its on-close callback, and the connections
    of its requests in flight, cut when it ends."""

    def __init__(self, session_id, grant, lifetime, on_close_route, on_close_payload, record, cost,
                 max_lifetime=None):
        self.session_id = session_id
        self.grant = grant
        self.lifetime = lifetime
        self.max_lifetime = max_lifetime or lifetime  # how far ahead extensions may push its end
        self.created_at = time.time()
        self.expiration = self.created_at + lifetime
        self.on_close_route = on_close_route
        self.on_close_payload = on_close_payload if on_close_route else None
        self.record = record  # its RequestLedger record: it is reported when it closes
        self.cost = cost  # its workload while it is open
        self.in_flight = set()  # the clients (ClientSockets) of its requests being served

    def granted_by(self, grant):
        """Is `grant` (a request's, or a session_auth: Vast's whole /route/ answer) this session's?"""
        return grant.get("signature") == self.grant.get("signature") and grant.get("url") == self.grant.get("url")

    def extend(self):
        """Each accepted request adds a lifetime, as Vast's sessions do, but never past
        max_lifetime from now: a burst of requests cannot keep a session open for ever."""
        self.expiration = min(self.expiration + self.lifetime, time.time() + self.max_lifetime)

    def describe(self):
        return {"session_id": self.session_id, "auth_data": self.grant, "lifetime": self.lifetime,
                "expiration": self.expiration, "created_at": self.created_at,
                "on_close_route": self.on_close_route, "on_close_payload": self.on_close_payload}



# ------------------------------------------------------------------------------------------------
# 4. Worker: dispatch
# ------------------------------------------------------------------------------------------------

SERVED_METHODS = ("DELETE", "GET", "HEAD", "POST", "PUT")  # the ones flask_dict may name
ALLOW_HEADER = "DELETE, GET, HEAD, OPTIONS, POST, PUT"  # fixed order: deterministic for clients


class BackendApp:
    """Dispatch: one backend being served -- its Backend instance, its flask_dict routes and the
    lock -- and the checks a request passes on its way to a handler: the route, the signed
    grant, the worker's state, the lock's queue.  It is the app the server calls: respond()
    turns a request into a response and never raises; finish() accounts for it once sent."""

    def __init__(self, backend, routes, state, metrics, current, *, parallel=False, queue_time=30.0,
                 workload=None, report_endpoints=None, grants=None, store=None, ledger=None, sessions=None,
                 stats=None, error_body=None):
        """`current` is the CurrentRequest flask.request reads; the rest, named, as below."""
        self.backend = backend
        self.routes = routes
        # (method, path) -> handler, for the routes that share no name with the worker's own
        # endpoints: one lookup finds a request's handler
        self.handlers = {(method, "/" + name): handler for method, named in routes.items()
                         for name, handler in named.items()
                         if name not in ReportEndpoints.NAMES and name not in Sessions.NAMES}
        self.state = state  # the WorkerState: requests wait for "loaded"
        self.metrics = metrics
        self.current = current  # the CurrentRequest that flask.request reads
        self.lock = None if parallel else QueueLock()
        self.queue_time = queue_time
        self.workload = workload  # backend.py's workload(backend, request); else 1 a request
        self.report_endpoints = report_endpoints  # the original's /report_* endpoints, or None
        self.grants = grants  # a GrantChecker: the autoscaler's signed grants, or None
        self.store = store  # a StateStore when the backend's state is persisted, else None
        self.store_lock = threading.Lock()  # handlers may run in parallel; saves may not
        self.ledger = RequestLedger() if ledger is None else ledger  # the routed requests' lifecycle
        self.sessions = sessions  # Vast's sessions, when grants are in use
        self.stats = stats  # a RequestStats, for /metrics, or None
        self.error_body = error_body  # backend.py's error_body(status, message), or None
        self.route_names = {name for named in routes.values() for name in named}

    def respond(self, head, body, connection):
        """(the response, the ticket finish() takes: the request's workload, ledger record, session
        and connection, None where it has none, and what was asked when): a request's way to its
        handler and back.
        Every refusal on the way -- route, grant, state, lock, the handler's abort(), a state that
        could not be saved -- is a Refusal, answered here and nowhere else.  The response is None
        when the client left while the request waited: the handler never ran."""
        request = Request(head, body, connection)
        self.current.request = request
        workload = record = session = None
        asked = (request, time.perf_counter())  # for the request's statistics
        try:
            handler = self.handlers.get((request.method, request.path))
            if handler is None:  # a worker endpoint, OPTIONS, or nothing
                handler = self.routes.get(request.method, {}).get(request.path[1:])
                answer = self.direct_answer(request)
                if answer is not None:
                    return answer, (None, None, None, None, asked)
                if handler is None:
                    raise Refusal(404, "no %s handler for %r" % (request.method, request.path[1:]))
            if self.grants is not None:
                session = self.checked_grant(request)
            if session is not None:
                session.in_flight.add(connection.client)
            elif request.auth is not None:  # a session's own requests are reported with it
                record = self.ledger.arrived(request.auth)
            if not self.state.accepting:
                raise self.state.refusal()
            cost = self.workload_of(request)
            self.admit(cost, request.auth)
            self.metrics.started(cost, request.auth)
            workload = cost  # from here on it is in flight, and finish() must take it out
            return self.call(handler, request, record), (workload, record, session, connection, asked)
        except Refusal as refusal:
            return self.refused(refusal, head), (workload, record, session, connection, asked)
        except Cancelled:
            return None, (workload, record, session, connection, asked)

    # A grant's refusal, by the start of what it says: the reason /metrics counts it under.
    GRANT_REASONS = (("this worker needs a signed grant", "missing"), ("the grant's signature", "signature"),
                     ("the grant was already used", "replay"), ("the grant's reqnum", "replay"),
                     ("the grant is for", "other worker"), ("waiting for", "no key yet"))

    def checked_grant(self, request):
        """The grant check, its refusals counted by reason."""
        try:
            return self.grants.check(request, self.sessions)
        except Refusal as refusal:
            if self.stats is not None:
                detail = refusal.detail if isinstance(refusal.detail, str) else ""
                self.stats.refuse(next((reason for start, reason in self.GRANT_REASONS if detail.startswith(start)),
                                       {410: "session ended", 422: "incomplete"}.get(refusal.code, "other")))
            raise

    def refused(self, refusal, head=None):
        """The answer to a refusal (`head` None when the request could not be read): the response
        it carries (abort(response)), else its JSON error body, in the shape of backend.py's
        error_body() when the request was for one of the backend's routes."""
        if self.error_body is None or refusal.response is not None or head is None \
                or head.path[1:] not in self.route_names:
            return refused_response(refusal)
        try:
            body = json_body(self.error_body(refusal.code, refusal.message))
        except Exception as exc:
            Log.exception("backend.py's error_body() raised %s" % type(exc).__name__)
            return refused_response(refusal)
        return HTTPResponse(refusal.code, [("Content-Type", "application/json")] + refusal.headers, body.encode())

    def direct_answer(self, request):
        """The answer to a request that no handler sees -- OPTIONS, the original's /report_*
        endpoints -- or None; a path or method that is never served is refused (404, 405)."""
        method, endpoint = request.method, request.path[1:]
        if not endpoint:
            raise Refusal(404, "nothing is served at /; endpoints are named paths")
        if method == "OPTIONS":
            return Response(headers={"Allow": ALLOW_HEADER})
        if method not in SERVED_METHODS:
            raise Refusal(405, "method %s is not served" % method, headers=[("Allow", ALLOW_HEADER)])
        if method == "POST" and self.report_endpoints is not None and endpoint in ReportEndpoints.NAMES:
            return self.report_endpoints.respond(endpoint, request)
        if method == "GET" and endpoint == ".vastworker/status" and self.report_endpoints is not None \
                and self.report_endpoints.status is not None:
            return self.report_endpoints.show_status(request)
        if method == "GET" and endpoint in ("metrics", ".vastworker/metrics") and self.report_endpoints is not None \
                and self.report_endpoints.metrics is not None:  # (a backend's own GET /metrics comes first)
            return self.report_endpoints.show_metrics(request)
        if method == "POST" and self.sessions is not None and endpoint in Sessions.NAMES:
            return to_response(self.sessions.respond(endpoint, request))
        return None

    def workload_of(self, request):
        """What the request counts for: backend.py's workload(), else the cost
        its grant was routed with, else DEFAULT_WORKLOAD, the SDK's default cost; never more
        than the worker serves within --queue-time (WorkerState.most_work)."""
        try:
            if self.workload is not None:
                value = float(self.workload(self.backend, request))
            elif request.auth is not None and "cost" in request.auth:
                value = float(request.auth["cost"])
            else:
                return DEFAULT_WORKLOAD
            if value >= 0 and math.isfinite(value):
                return min(value, self.state.most_work(self.queue_time))
            raise ValueError("%r is not a finite, non-negative number" % value)
        except Exception as exc:
            Log.write("debug", "%s %s: no usable workload (%s); counting %g" % (
                request.method, printable(request.path), exc, DEFAULT_WORKLOAD))
            return DEFAULT_WORKLOAD

    def admit(self, workload, grant=None):
        """Refuse at once (429) a request that would wait too long: when the workload already in
        flight, at the measured rate (max_perf, in workload per second), would take longer than
        --queue-time, as the current Vast worker predicts, for parallel handlers too.  The lock's
        bounded wait stays as a backstop; without a known max_perf nothing is predicted."""
        state = self.state
        if state.max_perf_known and state.max_perf > 0:
            wait = self.metrics.queued / state.max_perf
            if wait > self.queue_time:
                self.metrics.refused(workload, grant, received=True)
                raise Refusal(429, "the work ahead of this request would take %.1f s, more than the "
                                   "%g s this worker queues; retry" % (wait, self.queue_time), retry_after=1)

    def call(self, handler, request, record=None):
        """The handler's response, under the lock unless the backend runs handlers in parallel.
        A Refusal passes up to respond(); any other failure is logged and refused with 500."""
        try:
            if self.lock is None:
                return self.run_handler(handler, request, record)
            waiting = time.perf_counter()
            taken = self.lock.acquire(self.queue_time, lambda: not request.is_disconnected())
            request.waited = time.perf_counter() - waiting
            if not taken:
                if request.is_disconnected():
                    raise Cancelled()
                raise Refusal(429, "the backend was busy for more than %g s; retry" % self.queue_time,
                              retry_after=1)
            try:  # converted under the lock: the result may be live backend state
                return self.run_handler(handler, request, record)
            finally:
                self.lock.release()
        except (Refusal, Cancelled):
            raise
        except BadReturnValue as exc:
            Log.write("error", "%s %s: %s" % (request.method, printable(request.path), exc))
            raise Refusal(500)
        except BaseException as exc:
            refusal = as_refusal(exc)
            if refusal is not None:
                raise refusal
            Log.exception("%s %s: the handler raised %s" % (request.method, printable(request.path),
                                                           type(exc).__name__))
            raise Refusal(500)

    def run_handler(self, handler, request, record=None):
        """The handler's response; with a state file, the state is saved first if it changed,
        so an answered request is never lost (a failed save undoes the change)."""
        if record is not None:
            self.ledger.started(record)
        try:
            return to_response(handler(self.backend, request))
        finally:
            if self.store is not None:
                with self.store_lock:
                    self.store.save_if_changed(self.backend)

    def finish(self, ticket, status):
        """The response has been sent (or the client left: status 499): account for it."""
        self.current.request = None
        workload, record, session, connection, (request, started) = ticket
        if self.stats is not None:
            self.stats.answer(request.method, request.path, status, time.perf_counter() - started, request.waited)
        if workload is not None:
            self.metrics.finished(workload, status)
        if record is not None:
            self.ledger.finished(record, status)
        if session is not None:
            session.in_flight.discard(connection.client)

    def connection_refused(self):
        self.metrics.refused()


def bears_token(request, token):
    """Does the request carry `token` as its bearer token (there being one)?"""
    import hmac
    given = request.headers.get("Authorization", "")
    given = given[7:] if given.startswith("Bearer ") else given
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def operator_only(request, token, what, loopback):
    """Refuse (401) a request for `what` that neither bears `token` nor, when `loopback` is
    allowed, comes from this machine."""
    if bears_token(request, token) or (loopback and (request.remote_addr == "::1" or request.remote_addr.startswith(
            ("127.", "::ffff:127.")))):
        return
    raise Refusal(401, "%s %s" % (what, "needs Authorization: Bearer $MASTER_TOKEN" + (
        ", or a client on this machine" if loopback else "") if token else "is for this machine only "
        "(no MASTER_TOKEN is set)"))


class ReportEndpoints:
    """The original worker's internal POST endpoints (/report_loaded, /report_error, ...), kept for
    log watchers written for it.  They need the MASTER_TOKEN in the body and are all refused when
    no token is configured (the original defaulted to the literal 'mtoken')."""

    NAMES = ("report_loading", "report_loaded", "report_error", "report_capacity", "report_done",
             "pyworker/update")

    def __init__(self, token, state, update_flag="/.force_update", status=None, metrics=None):
        self.token = token
        self.state = state
        self.update_flag = update_flag  # what /pyworker/update creates: start_server.sh then fetches
        self.status = status  # a function: the worker's status, for GET /.vastworker/status
        self.metrics = metrics  # a function: its metrics in Prometheus' text format, for GET /metrics

    def show_status(self, request):
        """GET /.vastworker/status: for this machine's clients, or anyone with the MASTER_TOKEN."""
        operator_only(request, self.token, "the worker's status", loopback=True)
        return to_response(self.status())

    def show_metrics(self, request):
        """GET /metrics: with the MASTER_TOKEN, when there is one; else for this machine only."""
        operator_only(request, self.token, "the worker's metrics", loopback=not self.token)
        return Response(self.metrics(), mimetype="text/plain; version=0.0.4")

    def update(self, request):
        """POST /pyworker/update, as Vast's current worker: with the MASTER_TOKEN as its bearer
        token it creates the update flag file, which makes the next start_server.sh fetch the
        project again.  Without a MASTER_TOKEN it is off (Vast's worker then lets anyone in)."""
        if not self.token:
            raise Refusal(403, "/pyworker/update is off: MASTER_TOKEN is not set")
        if not bears_token(request, self.token):
            raise Refusal(401, "the Authorization header must carry the MASTER_TOKEN")
        try:
            with open(self.update_flag, "w"):
                pass
        except OSError as exc:
            Log.write("error", "/pyworker/update: cannot create %s: %s" % (self.update_flag, exc.strerror or exc))
            raise Refusal(500, "the update flag could not be written")
        Log.write("info", "/pyworker/update: %s created; the next start_server.sh fetches the project"
                  % self.update_flag)
        return {"ok": True}

    def respond(self, name, request):
        """'ok' once the report is applied to the worker state; a Refusal when not allowed."""
        if name == "pyworker/update":
            return to_response(self.update(request))
        if not self.token:
            raise Refusal(403, "internal report endpoints are off: MASTER_TOKEN is not set")
        import hmac
        data = request.get_json(force=True, silent=True)
        if not isinstance(data, dict) or not hmac.compare_digest(
                str(data.get("mtoken", "")).encode(), self.token.encode()):
            raise Refusal(401, "a valid mtoken is required")
        if name == "report_loaded":
            max_perf = data.get("max_perf")
            if max_perf is None:
                self.state.ready()
            elif is_number(max_perf) and max_perf > 0:  # the next status report must be valid
                self.state.loaded(float(max_perf), "POST /report_loaded")
            else:
                raise Refusal(400, "max_perf must be a positive number, not %r" % (max_perf,))
        elif name == "report_error":
            self.state.failed(data.get("error_msg", "reported by %s" % request.remote_addr))
        elif name == "report_capacity":
            capacity = data.get("max_capacity") or 0
            if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
                raise Refusal(400, "max_capacity must be a whole number of at least 0, not %r" % (capacity,))
            self.state.max_capacity = capacity
        elif name == "report_loading":
            Log.write("info", "the model is loading")
        return Response("ok")


class Cancelled(Exception):
    """The client left while its request waited for its turn (the handler never runs) or while
    its handler waited on a model server: nothing is sent, and the request is accounted as
    cancelled (499)."""


# ------------------------------------------------------------------------------------------------
# 5. Outbound: status reports and notify
# ------------------------------------------------------------------------------------------------

REPORT_INTERVAL = 10.0  # seconds between status reports when nothing changes


class StatusReporter:
    """Sends the status record to {REPORT_ADDR}/worker_status/ from one background thread: every
    10 s while loading, at once on loaded or failed, then when something changed (at most once a
    second) or every 10 s.  A slow or dead autoscaler delays nothing but this thread, and counts
    are only reset after a report went through, so nothing is lost between reports.  record()
    is the one place the record's fields are set."""

    def __init__(self, addresses, environ, port, scheme, state, metrics, ledger=None):
        self.addresses = addresses
        self.ledger = ledger  # the routed requests: those in flight, those to delete
        self.last = None  # the last report: when, whether it went through, the record (no mtoken)
        self.reports = {True: 0, False: 0}  # reports delivered, and not
        container_id = environ.get("CONTAINER_ID", "")
        self.identity = {"id": int(container_id) if container_id.isdigit() else container_id,
                         "mtoken": environ.get("MASTER_TOKEN", ""), "version": PROTOCOL_VERSION}
        self.url = public_url(environ, port, scheme)
        self.state = state
        self.metrics = metrics
        self._disk_used = disk_used_gb()

    def start(self):
        threading.Thread(target=self._report_forever, name="status", daemon=True).start()
        if self.ledger is not None:
            threading.Thread(target=self._delete_forever, name="delete-requests", daemon=True).start()

    def _delete_forever(self):
        """The finished-requests thread: once a second, the oldest finished ones (up to 500) to
        {REPORT_ADDR}/delete_requests/, forgotten once the autoscaler took them and kept (and
        retried) until then; its own thread, so a slow autoscaler delays no status report."""
        body = {"worker_id": self.identity["id"], "mtoken": self.identity["mtoken"]}
        while True:
            time.sleep(Waits.of(1.0))
            batch = self.ledger.batch()
            if batch and deliver(self.addresses, "/delete_requests/", dict(body, requests=batch)):
                self.ledger.delivered(batch)
            elif batch:
                Log.write("warning", "could not post %d finished request(s) to %s/delete_requests/; "
                                     "retrying" % (len(batch), self.addresses[0]))

    def report_once(self):
        """A report now, on the way out: one quick try."""
        snapshot = self.metrics.snapshot()
        record = self.record(snapshot, *self.state.reported())
        if self.sent(record, deliver(self.addresses, "/worker_status/", record, timeout=2.0, rounds=1)):
            self.metrics.acknowledge(snapshot)

    def sent(self, record, delivered):
        """Keep the outcome of a report, for /.vastworker/status; `delivered` as it is."""
        self.last = {"at": time.time(), "delivered": delivered,
                     "record": dict(record, mtoken="(hidden)" if record.get("mtoken") else "")}
        self.reports[delivered] += 1
        return delivered

    def record(self, snapshot, phase, error):
        """The status record for a metrics snapshot, as of `phase`, with `error` as its error_msg."""
        state = self.state
        record = dict(self.identity, loadtime=state.loadtime if phase == "loaded" else 0.0, error_msg=error,
                      max_perf=state.max_perf if phase == "loaded" else 0.0,
                      cur_capacity=0, max_capacity=state.max_capacity,
                      additional_disk_usage=round(disk_used_gb() - self._disk_used, 3),
                      working_request_idxs=self.ledger.working_idxs() if self.ledger is not None else [],
                      url=self.url)
        record.update(snapshot)
        if phase == "stopping":  # not ready for traffic (no loadtime, no max_perf), and why
            record["stopping"] = True
        return record

    def _report_forever(self):
        """The reporter thread: a record when one is due, and acknowledged once delivered."""
        last_sent, sent_phase, sent_error = 0.0, None, ""
        while True:
            self.state.phase_changed.wait(Waits.of(1.0))
            self.state.phase_changed.clear()
            now = time.monotonic()
            phase, error = self.state.reported()
            due = phase != sent_phase or error != sent_error or now - last_sent >= Waits.of(REPORT_INTERVAL) or (
                phase == "loaded" and self.metrics.has_news)
            if not due:
                continue
            snapshot = self.metrics.snapshot()
            record = self.record(snapshot, phase, error)
            last_sent = now
            if self.sent(record, deliver(self.addresses, "/worker_status/", record)):
                self.metrics.acknowledge(snapshot)
                self._disk_used += record["additional_disk_usage"]
                sent_phase, sent_error = phase, record["error_msg"]
            else:
                self.metrics.has_news = True  # what the snapshot held is still to be reported
                Log.write("warning", "could not report to %s; retrying in %g s"
                          % (", ".join(self.addresses), Waits.of(REPORT_INTERVAL)))


def public_url(environ, port, scheme):
    """This worker's address as clients reach it, from Vast's PUBLIC_IPADDR and the public port
    VAST_TCP_PORT_<port> maps to this one; "" where they are not set."""
    public_ip, public_port = environ.get("PUBLIC_IPADDR"), environ.get("VAST_TCP_PORT_%d" % port)
    return "%s://%s:%s" % (scheme, public_ip, public_port) if public_ip and public_port else ""


def deliver(addresses, path, body, timeout=5.0, rounds=3, pause=2.0):
    """Post to the first address that takes it, in order; up to `rounds` passes, `pause` apart.
    Blocking: call it from a background thread."""
    for attempt in range(rounds):
        for address in addresses:
            try:
                if post_json(address + path, body, timeout):
                    return True
            except (OSError, http.client.HTTPException, ValueError) as exc:
                Log.write("debug", "report to %s%s failed: %s" % (address, path, exc))
        if attempt + 1 < rounds:
            time.sleep(Waits.of(pause))
    return False


def post_json(url, body, timeout):
    """POST body as JSON; True on a 2xx answer."""
    status, _ = http_exchange(url, "POST", json.dumps(body), {"Content-Type": "application/json"}, timeout)
    return 200 <= status < 300


def answer_reason(body, limit=200):
    """What an error answer says, in a line of at most `limit` characters: the message in its JSON
    -- {"error": {"message": ...}} (OpenAI's, vLLM's, llama.cpp's), {"error": "..."} (TGI's),
    {"detail": ...} (ours, FastAPI's), {"message": ...} -- else its text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        for found in (error.get("message") if isinstance(error, dict) else None, data.get("detail"),
                      data.get("message"), error):
            if isinstance(found, str) and found.strip():
                text = found
                break
    text = printable(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def http_exchange(url, method="GET", body=None, headers=None, timeout=10.0, verify=True, answer_headers=None):
    """One request on a connection of its own: (status, body), and the answer's headers appended
    to `answer_headers` when it is a list.  http.client, not urllib: it is already loaded.
    verify=False is for the worker calling itself over loopback, where the certificate names
    the public address."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        import ssl  # only a worker talking https pays for loading it
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                           body=body, headers=headers or {})
        response = connection.getresponse()
        if answer_headers is not None:
            answer_headers.extend(response.getheaders())
        return response.status, response.read()
    finally:
        connection.close()


def report_addresses(value):
    """REPORT_ADDR: one autoscaler address or an ordered, comma-separated list."""
    return [address.strip().rstrip("/") for address in (value or "").split(",") if address.strip()]


def disk_used_gb():
    stats = os.statvfs("/")
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize / 1e9


class Postbox:
    """Posts queued by the notify helpers, sent in order by one background thread, so that a
    backend's call returns at once even when no autoscaler answers.  At most 100 wait: during a
    long outage the oldest are dropped (newer reports supersede them)."""

    def __init__(self):
        self._queue = collections.deque(maxlen=100)
        self._ready = threading.Condition()
        self._thread = None

    def post(self, addresses, path, body):
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_forever, name="notify", daemon=True)
                self._thread.start()
            self._queue.append((addresses, path, body))
            self._ready.notify()

    def _send_forever(self):
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                addresses, path, body = self._queue.popleft()
            if not deliver(addresses, path, body, timeout=2.0):
                Log.write("warning", "notify: could not post to %s" % ", ".join(addresses))


def make_notify_module(postbox):
    """The `notify` the autoscaler guide's backend imports: loaded(), update() and error() post
    its data plus the named fields to {autoscaler_address}/worker_status/ through `postbox`,
    without waiting."""
    module = types.ModuleType("notify", "vastworker's notify helpers for backends that report "
                                        "to the autoscaler themselves")

    def post(data, autoscaler_address, **fields):
        addresses = report_addresses(autoscaler_address)
        if addresses:
            postbox.post(addresses, "/worker_status/", dict(data or {}, **fields))
        else:
            Log.write("debug", "notify: no autoscaler address; not posting %r" % (fields,))

    def loaded(data, autoscaler_address, load_time, max_perf):
        post(data, autoscaler_address, loadtime=load_time, max_perf=max_perf)

    def update(data, autoscaler_address, cur_load, num_requests_recieved):
        post(data, autoscaler_address, cur_load=cur_load, num_requests_recieved=num_requests_recieved)

    def error(data, autoscaler_address, error_msg):
        post(data, autoscaler_address, error_msg=error_msg)

    for function in (loaded, update, error):
        function.__module__ = "notify"
        setattr(module, function.__name__, function)
    return module


def uses_notify(module):
    """Does the backend use notify (the module or its functions)?  Then it reports to the
    autoscaler itself, and the worker stays quiet."""
    return any(isinstance(value, types.ModuleType) and value.__name__ == "notify"
               or isinstance(value, types.FunctionType) and value.__module__ == "notify"
               for value in vars(module).values())


# ------------------------------------------------------------------------------------------------
# 5. Outbound: the benchmark and the public key
# ------------------------------------------------------------------------------------------------

class Benchmark:
    """Measures max_perf: a warm-up request, then `runs` rounds of `concurrency` simultaneous
    requests of the backend's benchmark payloads through the worker itself; the best round's
    workload served per second, counting successes only.  The configuration comes from
    `make(smaller)`: backend.py's `benchmark` dict, or what its benchmark(backend, smaller)
    function makes once the model is ready, sized to what the model server says it takes, and
    smaller (smaller = 1, 2, 3) each time the warm-up is refused with a 4xx -- a prompt too long
    for the server's context.  The result is cached on disk under a key of the backend's name,
    its backend.py and the configuration, so a reboot skips it.  A benchmark that fails says why
    in the answer's own words (its status and message); the log has the whole answer."""

    SMALLER = 3  # how many times a refused warm-up asks for smaller requests

    def __init__(self, make, name, source, cache_file, address, tls=False):
        self.make = make
        self.name, self.backend_source = name, source
        host = "[%s]" % address[0] if ":" in address[0] else address[0]
        self.base = "%s://%s:%d/" % ("https" if tls else "http", host, address[1])
        self.cache_file = cache_file
        self.config = self.url = self.key = None  # use(): the configuration being run
        self.source = None  # run(): where its max_perf came from, measured or cached
        self.failure = None  # the last failed request: "400 what the answer said", or why none came
        self.refused = False  # ... and it was a 4xx answer
        self.answers_logged = 0

    def use(self, config):
        import hashlib
        self.config, self.url = config, self.base + config["endpoint"]
        digest = hashlib.sha256(self.backend_source + json.dumps(config, sort_keys=True).encode()).hexdigest()
        self.key = "%s:%s" % (self.name, digest[:16])

    def cached(self):
        try:
            with open(self.cache_file) as file:
                return float(json.load(file)[self.key])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, max_perf):
        try:
            with open(self.cache_file) as file:
                cache = json.load(file)
        except (OSError, ValueError):
            cache = {}
        cache[self.key] = max_perf
        os.makedirs(os.path.dirname(self.cache_file) or ".", exist_ok=True)
        temporary = self.cache_file + ".tmp"
        with open(temporary, "w") as file:
            json.dump(cache, file, indent=1, sort_keys=True)
        os.replace(temporary, self.cache_file)

    def one_request(self, index=0):
        """Did the index'th request (its payload taken in turn from "payloads") succeed?  When not,
        `failure` says why; the first few failed answers are logged whole."""
        headers = {"Content-Type": "application/json", INTERNAL_HEADER: INTERNAL_TOKEN}
        payloads = self.config.get("payloads") or [self.config["payload"]]
        try:
            status, body = http_exchange(self.url, self.config["method"], json.dumps(payloads[index % len(payloads)]),
                                         headers, timeout=600, verify=False)
        except (OSError, http.client.HTTPException) as exc:
            self.failure, self.refused = describe_exception(exc), False
            return False
        if 200 <= status < 300:
            return True
        self.failure, self.refused = "%d %s" % (status, answer_reason(body)), 400 <= status < 500
        if self.answers_logged < 3:
            self.answers_logged += 1
            Log.write("warning", "benchmark: %s %s answered %d: %s" % (
                self.config["method"], self.url, status, printable(body.decode("utf-8", "replace")[:4000])))
        return False

    def measure(self):
        """The best round's workload per second (the warm-up is not counted)."""
        config = self.config
        best = 0.0
        for _ in range(config["runs"]):
            results = []
            threads = [threading.Thread(target=lambda index=index: results.append(self.one_request(index)))
                       for index in range(config["concurrency"])]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = max(time.monotonic() - started, 1e-6)
            best = max(best, sum(results) * config["workload"] / elapsed)
        return round(best, 3)

    def configured(self, smaller, state):
        """make(smaller), put to use; None when there is no such configuration, or when making
        it failed the worker."""
        try:
            config = self.make(smaller)
        except StartupError as exc:
            state.failed("benchmark: %s" % exc)
            return None
        except Exception as exc:
            Log.exception("benchmark: backend.py's benchmark() raised %s" % type(exc).__name__)
            state.failed("benchmark: backend.py's benchmark() raised %s" % describe_exception(exc))
            return None
        if config is not None:
            self.use(config)
        return config

    def run(self, state, metrics):
        """The cached result, else a measured one (None when the worker failed for want of a
        success).  The benchmark's own requests are not reported as traffic."""
        max_perf = None
        for smaller in range(self.SMALLER + 1):
            config = self.configured(smaller, state)
            if config is None:
                break
            max_perf = self.cached()
            if max_perf is not None:
                Log.write("info", "benchmark: %g workload/s (cached in %s)" % (max_perf, self.cache_file))
                self.source = "benchmark, cached in %s" % self.cache_file
                break
            Log.write("info", "benchmark: %(runs)d rounds of %(concurrency)d %(method)s /%(endpoint)s" % config)
            if not self.one_request() and self.refused:
                Log.write("warning", "benchmark: the warm-up was refused (%s): trying smaller requests" % self.failure)
                continue
            max_perf = self.measure() or None
            if max_perf is not None:
                Log.write("info", "benchmark: %g workload/s" % max_perf)
                self.source = "benchmark"
                try:
                    self.store(max_perf)
                except OSError as exc:
                    Log.write("warning", "benchmark: could not cache the result in %s: %s" % (self.cache_file, exc))
            break
        if max_perf is None:
            if self.config is not None:
                state.failed("benchmark: no successful response from %s /%s: %s" % (
                    self.config["method"], self.config["endpoint"], self.failure))
            return None
        metrics.restart()
        return max_perf


def benchmark_config(value, path, parallel):
    """backend.py's `benchmark`, checked, with its defaults filled in."""
    if not isinstance(value, dict) or not isinstance(value.get("endpoint"), str) or (
            "payload" not in value) == (not isinstance(value.get("payloads"), list) or not value["payloads"]):
        raise StartupError('%s: benchmark must be a dict like {"endpoint": "generate", "payload": {...}} '
                           '(or "payloads": [...], taken in turn)' % path)
    unknown = set(value) - {"endpoint", "payload", "payloads", "method", "runs", "concurrency", "workload"}
    if unknown:
        raise StartupError("%s: benchmark has unknown keys %s" % (path, ", ".join(sorted(unknown))))
    config = {"method": "POST", "runs": 3, "concurrency": 10 if parallel else 1, "workload": DEFAULT_WORKLOAD}
    config.update(value)
    for key in ("runs", "concurrency"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise StartupError("%s: benchmark %s must be a whole number of at least 1" % (path, key))
    if not isinstance(config["workload"], (int, float)) or not config["workload"] > 0:
        raise StartupError("%s: benchmark workload must be a positive number" % path)
    return config


class HealthCheck:
    """The model server's health endpoint (MODEL_HEALTH_ENDPOINT, or backend.py's `healthcheck`),
    as Vast's current worker uses it: the worker is only loaded after a first 200, and from then
    on it is asked every 5 s, and an answer that is not 200 fails the worker.  Unlike Vast's,
    it goes on asking: a 200 again (the model server's launcher restarted it) loads the worker
    again, with the max_perf it had."""

    def __init__(self, url, state, patience=300.0):
        self.url = url
        self.state = state
        self.patience = patience  # after readiness, how long a first 200 may take
        self.healthy = False  # a first 200 has come
        self.last = None  # the last answer: its status, or why there was none

    def status(self):
        """200, or the endpoint's status and what its answer says ("503 Loading model"), or why
        there is none; kept as `last`."""
        try:
            status, body = http_exchange(self.url, timeout=10.0, verify=False)
            reason = answer_reason(body, 120) if status != 200 else ""
            self.last = "%d %s" % (status, reason) if reason else status
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.last = describe_exception(exc)
        return self.last

    def wait_until_healthy(self, patience=None, every=2.0):
        """True after a first 200, asked `every` seconds; False when the worker failed meanwhile
        (an error line in the model's log) or, with a `patience`, no 200 came within it.  While
        it waits, the log says so once a minute."""
        started = time.monotonic()
        next_note = started + 30.0
        while True:
            answer = self.status()
            if answer == 200:
                self.healthy = True
                return True
            now = time.monotonic()
            if self.state.phase == "failed":
                return False
            if patience is not None and now - started > patience:
                self.state.failed("model health check %s: no 200 within %g s (last: %s)" % (self.url, patience, answer))
                return False
            if now >= next_note:
                Log.write("info", "waiting for the model server: %s answered %s after %.0f s"
                          % (self.url, answer, now - started))
                next_note = now + 60.0
            time.sleep(Waits.of(every))

    def become_ready(self):
        """readiness "health": the model is ready at the first 200, however long loading takes."""
        def wait():
            if self.wait_until_healthy(every=1.0):
                self.state.ready()

        threading.Thread(target=wait, name="health", daemon=True).start()

    def watch(self):
        """From now on, in the background: a failed check fails the worker, a passed one after
        that recovers it."""
        def watch_forever():
            state = self.state
            while state.phase == "loaded" or state.failed_by == "health":
                time.sleep(Waits.of(5.0))
                answer = self.status()
                if answer != 200:
                    state.failed("model health check %s answered %s" % (self.url, answer), "health")
                else:
                    state.recovered("health")

        threading.Thread(target=watch_forever, name="health", daemon=True).start()


class KeyFetcher:
    """Brings {REPORT_ADDR}/pubkey/ into a GrantChecker, in the background.  At start it tries
    until the key arrives, 0.5, 1, 2, 4, then 5 s apart; after 5 failed tries `problem` says so,
    and the status reports carry it as error_msg until the key does arrive (Vast's worker gives
    up for good).  Later, when a grant's signature does not verify, refetch() fetches the key
    again, at most once a minute: the autoscaler may have a new one."""

    TRIES_BEFORE_PROBLEM = 5
    REFETCH_EVERY = 60.0

    def __init__(self, addresses, checker):
        self.addresses = addresses
        self.checker = checker
        self.problem = ""
        self._asked = threading.Event()
        self._last_refetch = 0.0

    def start(self):
        threading.Thread(target=self._fetch_forever, name="pubkey", daemon=True).start()

    def refetch(self):
        now = time.monotonic()
        if now - self._last_refetch >= Waits.of(self.REFETCH_EVERY):
            self._last_refetch = now
            self._asked.set()

    def fetch_once(self):
        """The key from the first address that serves one that parses, or None."""
        for address in self.addresses:
            try:
                status, text = http_exchange(address + "/pubkey/")
                if status == 200:
                    return address, RSAPublicKey.from_pem(text.decode("ascii", "replace"))
                Log.write("warning", "public key: %s/pubkey/ answered %d" % (address, status))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                Log.write("warning", "public key: %s/pubkey/: %s" % (address, exc))
        return None, None

    def _fetch_forever(self):
        pause, tries = 0.5, 0
        while True:
            address, key = self.fetch_once()
            if key is None and self.checker.key is None:
                tries += 1
                if tries == self.TRIES_BEFORE_PROBLEM:
                    self.problem = ("no public key from %s/pubkey/ after %d tries; still trying"
                                    % (self.addresses[0], tries))
                    Log.write("error", self.problem)
                time.sleep(Waits.of(pause))
                pause = min(pause * 2, 5.0)
                continue
            if key is not None:
                old = self.checker.key
                self.checker.key, self.problem = key, ""
                if old is None or (old.n, old.e) != (key.n, key.e):
                    Log.write("info", "public key from %s/pubkey/ (%d bits)%s" % (
                        address, key.n.bit_length(), "" if old is None else ": a new one"))
            self._asked.wait()  # until a signature that does not verify asks for it again
            self._asked.clear()


# ------------------------------------------------------------------------------------------------
# 5. Outbound: the model server's log
# ------------------------------------------------------------------------------------------------

class LogWatcher:
    """Follows a model server's log (MODEL_LOG) for the backend's log_actions: a "loaded" line
    makes the worker ready, an "error" line fails it, an "info" line is repeated in the worker's
    log.  It waits for the file to appear, follows it across rotation and truncation, and skips
    what was written before this start (an old "loaded" line must not count)."""

    def __init__(self, path, actions, state, poll=0.1):
        self.path = path
        self.actions = actions
        self.state = state
        self.poll = poll
        try:
            self._skip = (os.stat(path).st_ino, os.stat(path).st_size)
        except OSError:
            self._skip = None

    def start(self):
        threading.Thread(target=self._watch_forever, name="log-watch", daemon=True).start()

    def _open(self):
        """The log file positioned where reading starts; None while it does not exist."""
        try:
            file = open(self.path, "rb")
        except OSError:
            return None
        inode = os.fstat(file.fileno()).st_ino
        if self._skip and self._skip[0] == inode:
            file.seek(self._skip[1])
        self._skip = None
        return file

    def _watch_forever(self):
        """The watcher thread: whole lines to handle(), reopening the file when it is replaced."""
        file, partial = None, b""
        while True:
            if file is None:
                file = self._open()
                if file is None:
                    time.sleep(self.poll)
                    continue
            chunk = file.readline()
            if chunk:
                partial += chunk
                if partial.endswith(b"\n"):
                    self.handle(partial.decode("utf-8", "replace").rstrip("\r\n"))
                    partial = b""
                continue
            time.sleep(self.poll)
            try:
                moved = os.stat(self.path).st_ino != os.fstat(file.fileno()).st_ino
                truncated = os.stat(self.path).st_size < file.tell()
            except OSError:
                moved, truncated = True, False
            if moved or truncated:
                file.close()
                file, partial = None, b""

    def handle(self, line):
        for pattern in self.actions.get("error", ()):
            if pattern in line:
                return self.state.failed("model log: %s" % line.strip()[:500])
        if self.state.phase == "loading":
            for pattern in self.actions.get("loaded", ()):
                if pattern in line:
                    return self.state.ready()
        for pattern in self.actions.get("info", ()):
            if pattern in line:
                return Log.write("info", "model log: %s" % line.strip())


def log_actions_config(value, path):
    """backend.py's `log_actions`, checked."""
    if not isinstance(value, dict) or set(value) - {"loaded", "error", "info"} or not all(
            isinstance(patterns, (list, tuple)) and all(isinstance(p, str) and p for p in patterns)
            for patterns in value.values()):
        raise StartupError('%s: log_actions must be a dict like {"loaded": ["Connected"], '
                           '"error": ["Error:"], "info": ["Downloading"]} of substring lists' % path)
    return value


# ------------------------------------------------------------------------------------------------
# 5. Outbound: the model server proxy
# ------------------------------------------------------------------------------------------------

# What passes between the client and the model server.  Request headers: only these (the
# client's Authorization is for the worker, not for the model server; a backend adds its own).
# Response headers: all but hop-by-hop ones and our own Date and Server.
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Language", "Content-Type", "User-Agent", "X-Request-Id")
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"date", "server", "te", "trailer", "upgrade", "proxy-connection"}
BUFFERED_UP_TO = 1 << 20  # an answer of known length up to this is read whole; others stream
# A model server that writes small pieces without TCP_NODELAY (Nagle's algorithm on) holds each
# piece until the one before is acknowledged, and a kept-alive connection acknowledges late
# (delayed ACK, up to 40 ms): the first event of a stream came 20-27 ms late at p99 in
# bench/stream_bench.py.  Quick acknowledgement on our side lets the next piece go at once.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


def stream_error(content_type, message):
    """How a broken stream tells its client, in the stream's own format: an SSE event or an
    NDJSON line carrying {"error": ...}, as vLLM, llama.cpp and Ollama write theirs; None for a
    body that has no such form (it is cut, so the client sees it incomplete)."""
    mimetype = parse_content_type(content_type or "")[0]
    if mimetype == "text/event-stream":
        return b"data: " + json.dumps({"error": {"message": message, "type": "upstream_error",
                                                  "code": 502}}).encode() + b"\n\n"
    if mimetype in ("application/x-ndjson", "application/jsonl", "application/json-lines"):
        return json.dumps({"error": message}).encode() + b"\n"
    return None


class ModelServer:
    """The model server a backend fronts (vLLM, llama.cpp, TGI, Ollama, ComfyUI ...), at a URL
    like http://127.0.0.1:8000, through a pool of keep-alive connections shared by the worker's
    threads.  forward() hands a request on and gives back the answer as a Response that streams
    when the answer does; call() is for a backend's own JSON calls.  Failures become refusals at
    once: 503 with Retry-After while the server has never answered (it is loading), 502 when it
    refuses, resets or talks nonsense, 504 when it is silent for `timeout` seconds (while
    streaming, `stall` seconds).  A client that leaves closes the upstream connection, which
    makes vLLM, llama.cpp, SGLang, TGI and Ollama stop generating."""

    def __init__(self, url, timeout=600.0, stall=120.0, connect_timeout=10.0, max_idle=64,
                 error_event=stream_error):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("a model server URL looks like http://127.0.0.1:8000, not %r" % url)
        self.url = url.rstrip("/")
        self.address = (parts.hostname, parts.port or 80)
        self.host_header = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.timeout, self.stall, self.connect_timeout = timeout, stall, connect_timeout
        self.max_idle = max_idle
        self.error_event = error_event  # (content type, message): how a broken stream says so
        self.answered = False  # has it ever answered: until then a refusal means "still loading"
        self._idle = []
        self._lock = threading.Lock()

    # -- connections --------------------------------------------------------------------------
    def _connection(self):
        """An idle pooled connection that is still open, or a new one."""
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                break
            if not connection.stale():
                return connection
            connection.close()
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except socket.timeout:
            raise UpstreamFailed("the connection was not accepted within %g s" % self.connect_timeout, "silent")
        except OSError as exc:
            raise socket_failure(exc)
        sock.settimeout(self.timeout)  # reads wait in ClientWatch's poll(); this bounds a send
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return UpstreamConnection(sock)

    def _give_back(self, connection):
        connection.answered += 1
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def _exchange(self, method, path, headers, body, watch, timeout):
        """Send one request; (connection, its ResponseHead) once the answer's head is in.
        A pooled connection the server had closed meanwhile fails before any answer: the request
        is sent again, once, on a new one."""
        target = self.prefix + "/" + path.lstrip("/")
        data = encode_request_head(method, target, self.host_header, headers, len(body) if body or method in (
            "POST", "PUT", "PATCH") else None) + body
        for attempt in (1, 2):
            connection = self._connection()
            connection.received = 0
            try:
                connection.sock.sendall(data)
                answer = connection.read_head(method, watch, timeout)
            except Cancelled:
                connection.close()
                raise
            except (OSError, UpstreamFailed) as exc:
                connection.close()
                failure = exc if isinstance(exc, UpstreamFailed) else socket_failure(exc)
                if attempt == 1 and connection.answered and not connection.received and (
                        failure.kind == "closed" or not isinstance(exc, UpstreamFailed)):
                    continue  # a kept-alive connection the server had closed meanwhile
                raise failure
            self.answered = True
            return connection, answer

    def refusal(self, failure, target):
        """The Refusal for a model server that failed (an UpstreamFailed) before its answer to
        `target` began.  The log names the server; the client is told what happened, never an
        internal address or the system's error text."""
        Log.write("warning", "the model server %s failed %s: %s" % (self.url, target, failure.logged()))
        if failure.kind == "silent":
            return Refusal(504, "the model server failed: %s" % failure)
        if not self.answered and failure.kind in ("refused", "closed"):
            return Refusal(503, "the model server is not answering yet (%s): still loading?" % failure, retry_after=5)
        return Refusal(502, "the model server failed: %s" % failure)

    def broke_off(self, target, failure):
        """Log an answer to `target` that the model server broke off, in full; what its client is
        told (no address, no system error text)."""
        Log.write("warning", "the model server %s broke off %s: %s" % (self.url, target, failure.logged()))
        return "the model server broke off its answer: %s" % failure

    # -- what backends call ---------------------------------------------------------------------
    def forward(self, request, path=None, json=None, method=None, headers=None, timeout=None):
        """The model server's answer to `request`, for a handler to return.  The request goes to
        `path` (default: its own path and query, less any api_key) with its own body, or with
        `json` in its place (a payload the handler checked or changed); the headers in
        FORWARDED_REQUEST_HEADERS pass, plus `headers`, checked as a response's are.  The answer
        comes back with its status, body and end-to-end headers: whole when small and of known
        length, else streamed as it arrives."""
        method = method or request.method
        if json is not None:
            body = json_body(json).encode()
            content_type = [("Content-Type", "application/json")]
        else:
            body, content_type = request.get_data(), []
        sent = [(name, request.headers[name]) for name in FORWARDED_REQUEST_HEADERS
                if name in request.headers and not (content_type and name == "Content-Type")]
        sent += content_type + list(headers.items() if hasattr(headers, "items") else headers or ())
        watch = ClientWatch(request)
        if path is None:  # its own path and query, but not the endpoint key Vast's SDK puts there
            query = "&".join(part for part in request.query_string.decode("latin-1").split("&")
                             if part and not part.startswith("api_key="))
            path = request.path + ("?" + query if query else "")
        target = path
        try:
            connection, answer = self._exchange(method, target, sent, body, watch, timeout or self.timeout)
        except UpstreamFailed as exc:
            raise self.refusal(exc, target)
        status, framing, content = answer.status, answer.framing, answer.get("content-type")
        kept = [(name, value) for name, value in answer.pairs if name.lower() not in DROPPED_RESPONSE_HEADERS]
        if framing[0] == "length" and framing[1] <= BUFFERED_UP_TO:
            try:
                data = b"".join(connection.pieces(framing, watch, timeout or self.timeout))
            except UpstreamFailed as exc:
                connection.close()
                raise Refusal(502, self.broke_off(target, exc))
            except Cancelled:
                connection.close()
                raise
            self._give_back(connection)
            response = Response(data, status, kept)
        else:
            try:
                watch.settle()
            except Cancelled:
                connection.close()
                raise
            response = Response(self._relay(connection, framing, watch, content, target), status, kept)
        if content is None:
            response.headers.remove("Content-Type")
        return response

    def _relay(self, connection, framing, watch, content_type, target):
        """A streamed answer, piece by piece.  A model server that stalls, breaks off or sends
        garbage ends the stream with an error event (SSE, NDJSON) or cuts it; a client that
        leaves closes the upstream connection.  Either way the log says why."""
        watch.streaming = True
        kept = False
        try:
            for piece in connection.pieces(framing, watch, self.stall):
                yield piece
            kept = framing[0] != "close"  # a body that ends with its connection ends that too
            if kept:
                self._give_back(connection)
        except UpstreamFailed as exc:
            why = self.broke_off(target, exc)
            event = self.error_event(content_type, why)
            if event is None:
                raise AbortStream(why)
            yield event
        except Cancelled:  # an OSError, as a write to the departed client would have raised
            raise ConnectionAbortedError("the client left; the model server's answer was stopped")
        finally:
            if not kept:
                connection.close()

    def call(self, method, path, payload=None, client=None, timeout=None):
        """(status, parsed JSON or the raw bytes) of a backend's own call to the model server:
        `payload` sent as JSON; `client`, when given -- a Request, or the ClientWatch of one --
        is the client whose departure cancels the wait (Cancelled).  Failures are the same
        refusals as forward()'s."""
        body = b"" if payload is None else json_body(payload).encode()
        sent = [("Content-Type", "application/json")] if payload is not None else []
        watch = client if isinstance(client, ClientWatch) else ClientWatch(client)
        try:
            connection, answer = self._exchange(method, path, sent, body, watch, timeout or self.timeout)
            status, framing = answer.status, answer.framing
            try:
                data = b"".join(connection.pieces(framing, watch, timeout or self.timeout))
            except BaseException:
                connection.close()
                raise
        except UpstreamFailed as exc:
            raise self.refusal(exc, path)
        if framing[0] == "close":
            connection.close()
        else:
            self._give_back(connection)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data


def json_payload(request, silent=False):
    """A model request's JSON object: its body, unwrapped when sent as Vast's SDK examples do,
    {"input": {...}}; whatever its Content-Type.  Refusal(400) when it is not one (with
    `silent`, None)."""
    payload = request.get_json(force=True, silent=silent)
    if isinstance(payload, dict) and len(payload) == 1 and isinstance(payload.get("input"), dict):
        payload = payload["input"]
    if isinstance(payload, dict):
        return payload
    if silent:
        return None
    raise Refusal(400, "the body must be a JSON object")


def made_up_words(seed, count=250):
    """`count` made-up words for a benchmark prompt: the same for a seed at every start (so the
    cached result is found again), different between seeds (so no prefix cache serves them)."""
    import random
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ner", "tu", "sa", "vel", "don", "ri", "pa", "shu", "tor", "en", "gra"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(count))


def benchmark_size(context, tokens, words, smaller=0):
    """(max tokens, prompt words) of a model server's benchmark request: at most `tokens` and
    `words`, and, where the server says one request may hold `context` tokens, half of that at
    most -- a quarter for the answer, the rest for the prompt, at 3 tokens a made-up word (2.1
    in llama's vocabulary: 520 for 250) -- then halved `smaller` times; None when halving makes
    it no smaller.  The log says what it chose."""
    if context:
        tokens = max(1, min(tokens, context // 4))
        words = max(1, min(words, (context // 2 - tokens) // 3))
    size = (max(1, tokens >> smaller), max(1, words >> smaller))
    if smaller and size == (max(1, tokens >> (smaller - 1)), max(1, words >> (smaller - 1))):
        return None
    Log.write("info", "benchmark: %s; prompts of %d words, at most %d tokens generated" % (
        "the model server takes %d tokens a request" % context if context else "the model server names no context",
        size[1], size[0]))
    return size


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to the model server.  It reads through a buffer of
    its own (http.client's hides what it holds), so the proxy always knows whether something is
    waiting, and so whether it may sleep in poll() watching its client too."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.answered = 0  # answers read whole: a failure before the next one may be a stale socket
        self.received = 0  # bytes received of the current answer
        self.quickack = _TCP_QUICKACK if sock.family in (socket.AF_INET, socket.AF_INET6) else 0

    def stale(self):
        """An idle connection with something to read was closed by the model server (or spoke
        out of turn): either way it cannot carry a request."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def fill(self, watch, seconds):
        watch.wait(self.sock, seconds)
        data = self.sock.recv(262144)
        if self.quickack:  # acknowledge at once (Linux resets it after each read): see above
            self.sock.setsockopt(socket.IPPROTO_TCP, self.quickack, 1)
        if not data:
            raise UpstreamFailed("it closed the connection", "closed")
        self.received += len(data)
        self.buffer += data

    def read_head(self, method, watch, seconds):
        """The ResponseHead of the next final answer to a `method` request; 1xx answers skipped."""
        while True:
            try:
                head = take_head(self.buffer)
                if head is None:
                    self.fill(watch, seconds)
                    continue
                answer = ResponseHead(head, method)
            except Refusal as exc:
                raise UpstreamFailed("it sent a malformed head: %s" % exc.detail)
            if answer.status >= 200 or answer.status == 101:
                return answer

    def pieces(self, framing, watch, seconds):
        """The body as it arrives: ("length", n), ("chunked", None) or ("close", None).  Each
        piece is what one read brought (an SSE event is flushed as soon as it comes)."""
        kind, length = framing

        def fill():
            self.fill(watch, seconds)
        if kind == "length":
            yield from counted_pieces(self.buffer, fill, length)
        elif kind == "close":
            while True:
                if not self.buffer:
                    try:
                        fill()
                    except UpstreamFailed as exc:
                        if exc.kind == "closed":
                            return
                        raise
                piece = bytes(self.buffer)
                self.buffer.clear()
                yield piece
        else:
            try:
                yield from chunked_pieces(self.buffer, fill)
            except Refusal as exc:
                raise UpstreamFailed("it sent a malformed chunk: %s" % exc.detail)


class ClientWatch:
    """Waits on the model server for one request while watching that request's client.  Before
    the answer has started, a client that leaves raises Cancelled (the handler stops, the request
    is a 499); a half-closed client is told apart by the connection's own probe, then only
    watched for a reset.  Once the answer streams nothing may be sent but the answer, so a
    client whose end of the connection shuts (its FIN) while the model server is silent counts
    as gone, as nginx counts it: a client that half-closes mid-answer is not one that HTTP
    clients are, and waiting for the next event to find out can take the model server's whole
    silence (18.9 s measured) of generation nobody reads."""

    def __init__(self, request):
        """Watch the client of `request` (None: nobody to watch)."""
        self.client = request.client_socket if request is not None else None
        self.streaming = False
        self.settled = False  # the client's side was readable, and it had not left: stop asking

    def wait(self, sock, seconds):
        """Return when `sock` has something to read; UpstreamFailed after `seconds` of silence
        (with no `sock`, after `seconds`)."""
        poller = select.poll()
        if sock is not None:
            poller.register(sock, select.POLLIN)
        client = None
        if self.client is not None:
            client = self.client.fileno()
            poller.register(client, 0 if self.settled else _POLLRDHUP if self.streaming
                            else select.POLLIN | _POLLRDHUP)
        until = time.monotonic() + seconds
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise UpstreamFailed("no answer within %g s" % seconds, "silent")
            for fd, events in poller.poll(min(left, 1.0) * 1000):
                if fd != client:
                    return
                if events & (select.POLLERR | select.POLLHUP) or (
                        self.client.gone() if not self.streaming else events & _POLLRDHUP):
                    self.client.abandon()
                    raise Cancelled()
                self.settled = True
                poller.modify(client, 0)

    def settle(self):
        """Before an answer starts to stream, while something may still be sent first: a client
        whose sending side is shut by now has either left (Cancelled) or half-closed on purpose
        (settled: from here on never taken for gone by its FIN)."""
        if self.client is None or self.settled or not _POLLRDHUP:
            return
        poller = select.poll()
        poller.register(self.client.fileno(), _POLLRDHUP)
        if poller.poll(0):
            if self.client.gone():
                raise Cancelled()
            self.settled = True

    def pause(self, seconds):
        """Sleep `seconds` (a backend polling its model server), or raise Cancelled as soon as
        the client leaves."""
        try:
            self.wait(None, seconds)
        except UpstreamFailed:
            pass


class UpstreamFailed(Exception):
    """The model server could not be reached, or broke off its answer: why, in a few words of our
    own that a client may read, and its `kind`, which decides the answer: "silent" (504),
    "refused" or "closed" (503 while the server has never answered: it is loading), else
    "broken" (502).  `cause`, for the log only, is the system's own words (errno text)."""

    def __init__(self, why, kind="broken", cause=None):
        super().__init__(why)
        self.kind, self.cause = kind, cause

    def logged(self):
        return str(self) if self.cause is None else "%s (%s)" % (self, self.cause)


def socket_failure(exc):
    """The UpstreamFailed for an OSError on the model server's socket."""
    if isinstance(exc, socket.timeout):
        return UpstreamFailed("it stopped reading the request", "silent")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamFailed("it refused the connection", "refused")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return UpstreamFailed("it reset the connection")
    return UpstreamFailed("the connection failed", cause=getattr(exc, "strerror", None) or describe_exception(exc))


# ------------------------------------------------------------------------------------------------
# 6. Tools: RSA signing and the stand-in autoscaler
# ------------------------------------------------------------------------------------------------

class FleetMember:
    """One worker as the stand-in autoscaler knows it: its latest status record, and the grants
    issued for it since.  Its predicted wait is the workload it reported in flight (cur_load)
    plus the cost of every grant issued since that it has not yet shown -- neither in flight
    in a report (working_request_idxs) nor finished (/delete_requests/) -- divided by its
    max_perf: routing on outstanding work, as Ray Serve's and SkyPilot's balancers do, not on
    the last report alone, which sent a whole burst to the one worker that looked idle.  A
    grant the worker never shows expires after GRANT_LIFETIME.  It is routed to while its last
    report (under FRESH old) says loaded and not stopping, and it answers when probed."""

    FRESH = 30.0  # seconds: a worker whose last report is older is not routed to
    GRANT_LIFETIME = 10.0  # seconds: a grant not shown by then was never used

    def __init__(self):
        self.record, self.seen, self.first = {}, 0.0, time.time()
        self.outstanding = {}  # request_idx -> (cost, when granted)
        self.stopping = False  # its last report said it is stopping
        self.lost = False  # it did not answer when probed
        self.grants = 0  # grants issued for it, ever
        self.served = self.errors = 0  # its finished requests that succeeded, that failed

    def reported(self, record, now):
        self.record, self.seen, self.stopping, self.lost = record, now, bool(record.get("stopping")), False
        shown = record.get("working_request_idxs")
        if isinstance(shown, list):
            self.finished(shown)  # in flight now: counted in its cur_load

    def granted(self, request_idx, cost, now):
        self.outstanding[request_idx] = (cost, now)
        self.grants += 1

    def state(self, now):
        """In a word: stopped (it said so), lost (silent, or it does not answer), error, ready or
        loading."""
        record = self.record
        if self.stopping:
            return "stopped"
        if self.lost or now - self.seen >= Waits.of(self.FRESH):
            return "lost"
        return "error" if record.get("error_msg") else "ready" if record.get("loadtime") else "loading"

    def finished(self, request_idxs):
        for request_idx in request_idxs:
            if isinstance(request_idx, int):
                self.outstanding.pop(request_idx, None)

    def routable(self, now):
        return bool(self.state(now) == "ready" and self.record.get("url") and self.record.get("max_perf"))

    def predicted_wait(self, now):
        """Seconds of work ahead of a new request here, as far as the stand-in can tell."""
        for request_idx, (_, granted) in list(self.outstanding.items()):
            if now - granted > Waits.of(self.GRANT_LIFETIME):
                del self.outstanding[request_idx]
        ahead = float(self.record.get("cur_load") or 0) + sum(cost for cost, _ in self.outstanding.values())
        return ahead / float(self.record["max_perf"])

    def probe(self):
        """Connect to it: a worker that does not take the connection is lost until it does."""
        parts = urlsplit(self.record["url"])
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=2.0).close()
            answered = True
        except OSError as exc:
            answered, why = False, exc.strerror or describe_exception(exc)
        if answered == self.lost:
            self.lost = not answered
            print("%s worker %s at %s %s" % (time.strftime("%H:%M:%S"), self.record.get("id"), self.record["url"],
                  "answers again: routed to again" if answered else "does not answer (%s): not routed to" % why),
                  flush=True)


class StandInAutoscaler:
    """`python3 vastworker.py autoscaler`: a local stand-in for Vast's autoscaler, served as a
    backend.  It prints and keeps the status records workers send, so a backend's reports can
    be watched before deploying (GET /records returns them), serves its public key and signs
    grants at /route/ -- in Vast's current (url-only) shape unless told otherwise -- to the
    worker with the least predicted wait (see FleetMember), and lists the workers at
    /get_endpoint_workers/ as the SDK expects.  It keeps the last RECORDS_KEPT records,
    FINISHED_KEPT finished requests and WORKERS_KEPT workers, so a long run holds bounded
    memory.  Its key is generated in the background (about a second of pure-Python
    arithmetic), so it answers at once; /pubkey/ and /route/ wait for it.
    GET /records never shows a record's mtoken: it says whether the token matched
    `master_token` (the stand-in's $MASTER_TOKEN), as Vast's would check it."""

    RECORDS_KEPT = 1000
    FINISHED_KEPT = 10000
    WORKERS_KEPT = 1000  # past it, the worker heard from least recently is forgotten

    def __init__(self, shape="g4", master_token=""):
        self.records = collections.deque(maxlen=self.RECORDS_KEPT)
        self.finished = collections.deque(maxlen=self.FINISHED_KEPT)  # what workers posted to /delete_requests/
        self.workers = {}  # worker id (or url) -> its FleetMember
        self.shape = "g4" if shape == "auto" else shape
        self.master_token = master_token
        self._key = None
        self._key_made = threading.Event()
        self.reqnum = 0
        self._turn = 0  # ties go round in turn
        self.unserved = 0  # routes asked for when no worker was ready
        self._lock = threading.Lock()
        threading.Thread(target=self._make_key, name="stand-in key", daemon=True).start()
        threading.Thread(target=self._probe_forever, name="stand-in probe", daemon=True).start()

    def _make_key(self):
        self._key = RSAPrivateKey.generate()
        self._key_made.set()

    @property
    def key(self):
        self._key_made.wait()
        return self._key

    def pubkey(self, _, request):
        return Response(self.key.public_pem(), mimetype="text/plain")

    def route(self, _, request):
        """Like Vast's /route/: a signed grant for a loaded worker (its reported url), or no url."""
        ask = request.get_json(force=True)
        if not isinstance(ask, dict) or not isinstance(ask.get("endpoint"), str):
            abort(400, 'expected {"endpoint": NAME, "cost": WORKLOAD}')
        cost = ask.get("cost", DEFAULT_WORKLOAD)
        if not is_number(cost):
            abort(400, "cost must be a finite number, at least 0")
        key = self.key  # made before the lock is taken: it may still be in the making
        retry_of = ask.get("request_idx")  # a client routing again keeps its request's index
        with self._lock:
            now = time.monotonic()
            ready = [member for member in self.workers.values() if member.routable(now)]
            if not ready:
                self.unserved += 1
                return {"endpoint": ask["endpoint"], "status": "no ready worker"}
            waits = [member.predicted_wait(now) for member in ready]
            least = min(waits)
            tied = [member for member, wait in zip(ready, waits) if wait <= least * (1 + 1e-9)]
            self._turn += 1
            chosen = tied[self._turn % len(tied)]
            self.reqnum += 1
            request_idx = retry_of if type(retry_of) is int and 0 < retry_of <= self.reqnum else self.reqnum
            grant = {"cost": float(cost), "endpoint": ask["endpoint"], "reqnum": self.reqnum,
                     "request_idx": request_idx, "url": chosen.record["url"]}
            chosen.granted(request_idx, float(cost), now)
        grant["signature"] = key.sign(signed_message(grant, self.shape).encode())
        return grant

    def _probe_forever(self):
        """Every second, a worker whose last report is over 2 s old is asked whether it is
        there at all (a TCP connection to its url): one killed with -9, or cut off, is out of
        routing within a few seconds, not when its report goes stale; back in when it answers."""
        while True:
            time.sleep(Waits.of(1.0))
            now = time.monotonic()
            for member in list(self.workers.values()):
                if member.record.get("url") and now - member.seen > Waits.of(2.0) and not member.stopping:
                    member.probe()

    # The status record's fields that routing and the listing read, and what each must be.
    RECORD_NUMBERS = ("loadtime", "cur_load", "new_load", "rej_load", "cur_perf", "max_perf")
    RECORD_COUNTS = ("num_requests_working", "num_requests_recieved", "cur_capacity", "max_capacity")

    def checked_token(self, body, request):
        """Refuse (401) a report whose mtoken is not the stand-in's MASTER_TOKEN, when it has one:
        without this check anyone could post a worker's id with a url of their own, or a load
        that draws every grant."""
        import hmac
        if self.master_token and not hmac.compare_digest(
                str(body.get("mtoken", "")).encode(), self.master_token.encode()):
            print("%s refused a report from %s: its mtoken is not this stand-in's MASTER_TOKEN"
                  % (time.strftime("%H:%M:%S"), request.remote_addr), flush=True)
            abort(401, "the mtoken is not this autoscaler's MASTER_TOKEN")

    @classmethod
    def record_problem(cls, record):
        """Why a status record cannot be routed on, or None: the fields it has must be of the
        kinds a worker sends, so that no record can break /route/ for the others."""
        worker_id, url = record.get("id"), record.get("url")
        if worker_id is None and url is None:
            return "a record needs an id or a url"
        if worker_id is not None and (isinstance(worker_id, bool) or not isinstance(worker_id, (int, str))):
            return "id must be a number or a string"
        if url and not (isinstance(url, str) and re.fullmatch(r"https?://[\x21-\x7e]{1,2000}", url)):
            return "url must be an http:// or https:// URL (or empty: not known)"
        for name in cls.RECORD_NUMBERS:
            if not is_number(record.get(name, 0)):
                return "%s must be a finite number, at least 0" % name
        for name in cls.RECORD_COUNTS:
            value = record.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return "%s must be a whole number, at least 0" % name
        if not isinstance(record.get("error_msg", ""), str):
            return "error_msg must be a string"
        return None

    def worker_status(self, _, request):
        record = request.get_json(force=True)
        if not isinstance(record, dict):
            abort(422, "expected a status record (a JSON object)")
        self.checked_token(record, request)
        problem = self.record_problem(record)
        if problem:
            abort(422, problem)
        self.records.append(record)
        key = str(record.get("id", record.get("url")))
        with self._lock:
            member = self.workers.get(key)
            if member is None:
                if len(self.workers) >= self.WORKERS_KEPT:
                    del self.workers[min(self.workers, key=lambda known: self.workers[known].seen)]
                member = self.workers[key] = FleetMember()
            member.reported(record, time.monotonic())
        fields = ("id", "loadtime", "max_perf", "cur_load", "new_load", "cur_perf",
                  "num_requests_working", "num_requests_recieved", "error_msg")
        print("%s worker_status %s" % (time.strftime("%H:%M:%S"), " ".join(
            "%s=%s" % (name, json.dumps(record[name])) for name in fields if name in record)), flush=True)
        return {"ok": True}

    def endpoint_workers(self, _, request):
        """Like Vast's /get_endpoint_workers/ (the SDK's worker listing): each reporting worker."""
        listed = []
        for member in list(self.workers.values()):
            record, first = member.record, member.first
            status = "ERROR" if record.get("error_msg") else ("RUNNING" if record.get("loadtime") else "LOADING")
            listed.append({"id": record.get("id") if isinstance(record.get("id"), int) else 0, "status": status,
                           "cur_load": record.get("cur_load", 0.0), "new_load": record.get("new_load", 0.0),
                           "cur_perf": record.get("cur_perf", 0.0), "perf": record.get("max_perf", 0.0),
                           "measured_perf": record.get("max_perf", 0.0),
                           "reqs_working": record.get("num_requests_working", 0),
                           "disk_usage": record.get("additional_disk_usage", 0.0),
                           "loaded_at": record.get("loadtime", 0.0), "started_at": first})
        return listed

    def delete_requests(self, _, request):
        """Like Vast's: the finished requests a worker reports, kept for GET /requests."""
        batch = request.get_json(force=True)
        if not isinstance(batch, dict) or not isinstance(batch.get("requests"), list) or \
                not all(isinstance(entry, dict) for entry in batch["requests"]):
            abort(422, 'expected {"worker_id": ID, "mtoken": TOKEN, "requests": [{...}, ...]}')
        self.checked_token(batch, request)
        worker_id = batch.get("worker_id")
        self.finished.extend(dict(entry, worker_id=worker_id) for entry in batch["requests"])
        with self._lock:
            done = [entry.get("request_idx") for entry in batch["requests"]]
            for member in self.workers.values():
                member.finished(done)
            member = self.workers.get(str(worker_id))
            if member is not None:
                member.served += sum(entry.get("status") == "Success" for entry in batch["requests"])
                member.errors += sum(entry.get("status") == "Error" for entry in batch["requests"])
        print("%s delete_requests worker_id=%s %s" % (time.strftime("%H:%M:%S"), json.dumps(batch.get("worker_id")),
              " ".join("%s:%s" % (entry.get("request_idx"), entry.get("status")) for entry in batch["requests"])),
              flush=True)
        return {"ok": True}

    def overview(self, _, request):
        """GET /status: the workers and the latest finished requests, as the page at / shows them
        (for scripts too).  Never a master token."""
        now = time.monotonic()
        workers = [{"url": m.record.get("url", ""), "id": m.record.get("id"), "state": m.state(now),
                    "error_msg": m.record.get("error_msg", ""), "cur_load": m.record.get("cur_load", 0.0),
                    "max_perf": m.record.get("max_perf", 0.0), "in_flight": m.record.get("num_requests_working", 0),
                    "served": m.served, "errors": m.errors, "grants": m.grants,
                    "report_age": round(now - m.seen, 1)}
                   for m in sorted(self.workers.values(), key=lambda m: str(m.record.get("id")))]
        recent = [{"request_idx": entry.get("request_idx"), "worker_id": entry.get("worker_id"),
                   "status": str(entry.get("status", "")).lower(),
                   "queue_time": _seconds_between(entry, "entered_queue_at", "work_started_at"),
                   "work_time": _seconds_between(entry, "work_started_at", "work_completed_at")}
                  for entry in list(self.finished)[-50:]]
        return {"workers": workers, "recent": recent[::-1], "finished": len(self.finished),
                "routes_unserved": self.unserved}

    def page(self, _, request):
        """GET /: the live page (STAND_IN_PAGE), which reads GET /status every second."""
        return Response(STAND_IN_PAGE, mimetype="text/html")

    def metrics(self, _, request):
        """GET /metrics: each worker's load, rate, requests and state (labelled by its url and id),
        the grants issued for it, and the routes no worker was ready for; with the stand-in's
        MASTER_TOKEN, when it has one, else for this machine only."""
        operator_only(request, self.master_token, "the stand-in's metrics", loopback=not self.master_token)
        now, states = time.monotonic(), ("loading", "ready", "error", "stopped", "lost")
        members = [({"url": m.record.get("url", ""), "id": str(m.record.get("id", ""))}, m)
                   for m in list(self.workers.values())]
        families = [
            ("vastworker_fleet_worker_cur_load", "gauge", "Workload in flight, as the worker last reported it",
             [(labels, float(m.record.get("cur_load") or 0)) for labels, m in members]),
            ("vastworker_fleet_worker_max_perf", "gauge", "Workload per second the worker reported",
             [(labels, float(m.record.get("max_perf") or 0)) for labels, m in members]),
            ("vastworker_fleet_worker_requests_in_flight", "gauge", "Requests the worker last reported in flight",
             [(labels, int(m.record.get("num_requests_working") or 0)) for labels, m in members]),
            ("vastworker_fleet_worker_state", "gauge", "1 for the state each worker is in",
             [(dict(labels, state=state), int(m.state(now) == state)) for labels, m in members for state in states]),
            ("vastworker_fleet_grants_total", "counter", "Grants issued for each worker",
             [(labels, m.grants) for labels, m in members]),
            ("vastworker_fleet_routes_unserved_total", "counter", "Routes asked for when no worker was ready",
             [({}, self.unserved)])]
        return Response(exposition(families), mimetype="text/plain; version=0.0.4")

    def list_records(self, _, request):
        import hmac
        shown = []
        for record in list(self.records):
            record = dict(record)
            if "mtoken" in record:
                token = str(record["mtoken"])
                record["mtoken"] = "(hidden)"
                if self.master_token:
                    record["mtoken_matches"] = hmac.compare_digest(token.encode(), self.master_token.encode())
            shown.append(record)
        return shown

    def routes(self):
        return {"POST": {"worker_status/": self.worker_status, "route/": self.route,
                         "delete_requests/": self.delete_requests, "get_endpoint_workers/": self.endpoint_workers},
                "GET": {"records": self.list_records, "pubkey/": self.pubkey, "metrics": self.metrics,
                        "": self.page, "status": self.overview,
                        "favicon.ico": lambda _, request: Response(FAVICON, mimetype="image/svg+xml"),
                        "requests": lambda _, request: list(self.finished)}}


def _seconds_between(entry, start, end):
    """The seconds from one of a finished request's times to another, or None."""
    if is_number(entry.get(start)) and is_number(entry.get(end)):
        return round(entry[end] - entry[start], 6)
    return None


FAVICON = ("<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
           "<rect width='16' height='16' rx='3' fill='#2a6'/></svg>")

# The stand-in's live page: one document, its style and script inline, nothing fetched from
# elsewhere (it must work offline, and show no master token: /status has none).
STAND_IN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vastworker fleet</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' height='16' rx='3' fill='%232a6'/%3E%3C/svg%3E">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right}.ready{color:#2a6}.loading{color:#a80}.error,.lost{color:#c33}.stopped{color:#777}
.success{color:#2a6}.cancelled,.rejected{color:#a80}svg{border:1px solid #ddd;margin-right:1em}
#recent{list-style:none;padding:0;font-family:monospace}.charts span{font-size:.9em;color:#555}
</style></head><body>
<h1>vastworker fleet <small id="updated"></small></h1>
<table><thead><tr><th>worker</th><th>id</th><th>state</th><th>cur_load</th><th>max_perf</th><th>in flight</th>
<th>served</th><th>errors</th><th>grants</th><th>last report</th></tr></thead><tbody id="workers"></tbody></table>
<div class="charts"><h2>the last minutes</h2>
<svg id="load" width="320" height="80"></svg><svg id="rate" width="320" height="80"></svg><br>
<span>load in flight (all workers)</span> &middot; <span>requests finished per second</span></div>
<h2>finished requests</h2><ul id="recent"></ul>
<script>
"use strict";
const history = {load: [], rate: []};
let lastFinished = null;
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function seconds(value) { return value === null ? "?" : value < 1 ? (value * 1000).toFixed(1) + " ms" : value.toFixed(2) + " s"; }
function chart(id, values) {
  const svg = document.getElementById(id), top = Math.max(1, ...values), w = 320, h = 80;
  const step = w / Math.max(values.length - 1, 1);
  const points = values.map((v, i) => (i * step).toFixed(1) + "," + (h - 4 - v * (h - 8) / top).toFixed(1));
  svg.innerHTML = "<polyline fill='none' stroke='#2a6' stroke-width='1.5' points='" + points.join(" ") + "'/>" +
    "<text x='4' y='12' font-size='10'>" + top.toFixed(1) + "</text>";
}
function show(data) {
  const body = document.getElementById("workers");
  body.textContent = "";
  for (const w of data.workers) {
    const row = body.insertRow();
    row.dataset.worker = w.url;
    cell(row, w.url || "(no url)"); cell(row, w.id);
    cell(row, w.state + (w.error_msg ? ": " + w.error_msg : ""), w.state);
    cell(row, w.cur_load, "n"); cell(row, w.max_perf, "n"); cell(row, w.in_flight, "n");
    cell(row, w.served, "n"); cell(row, w.errors, "n"); cell(row, w.grants, "n"); cell(row, w.report_age + " s ago", "n");
  }
  const recent = document.getElementById("recent");
  recent.textContent = "";
  for (const r of data.recent) {
    const item = document.createElement("li");
    item.dataset.request = r.request_idx;
    item.className = r.status;
    item.textContent = "#" + r.request_idx + " " + r.status + " on worker " + r.worker_id + ", queued " +
      seconds(r.queue_time) + ", worked " + seconds(r.work_time);
    recent.appendChild(item);
  }
  history.load.push(data.workers.reduce((sum, w) => sum + w.cur_load, 0));
  history.rate.push(lastFinished === null ? 0 : Math.max(0, data.finished - lastFinished));
  lastFinished = data.finished;
  for (const key of ["load", "rate"]) { if (history[key].length > 180) history[key].shift(); chart(key, history[key]); }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
async function poll() {
  try { const answer = await fetch("status"); if (answer.ok) show(await answer.json()); }
  catch (e) { document.getElementById("updated").textContent = "the stand-in does not answer"; }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""


class RSAPrivateKey(RSAPublicKey):
    """A key the stand-in autoscaler generates to sign grants: pure Python, no dependency.  It
    signs by the Chinese remainder theorem, two half-size powers instead of one: a third of the
    time (6.3 ms a grant against 19.5 ms, 2048 bits, timeit on a busy machine), and signing is
    what bounds the stand-in's /route/."""

    def __init__(self, p, q, e):
        super().__init__(p * q, e)
        d = pow(e, -1, (p - 1) * (q - 1))
        self.p, self.q, self.dp, self.dq, self.q_inverse = p, q, d % (p - 1), d % (q - 1), pow(q, -1, p)

    @classmethod
    def generate(cls, bits=2048):
        e = 65537
        while True:
            p, q = random_prime(bits // 2), random_prime(bits // 2)
            if p != q and (p * q).bit_length() == bits and math.gcd(e, (p - 1) * (q - 1)) == 1:
                return cls(p, q, e)

    def sign(self, message):
        import base64
        number = int.from_bytes(self.expected_encoding(message), "big")
        mod_p, mod_q = pow(number, self.dp, self.p), pow(number, self.dq, self.q)
        signature = mod_q + (self.q_inverse * (mod_p - mod_q) % self.p) * self.q
        return base64.b64encode(signature.to_bytes(self.size, "big")).decode()

    def public_pem(self):
        """SubjectPublicKeyInfo PEM, as Vast's /pubkey/ serves it."""
        import base64
        rsa = der(0x30, der_integer(self.n) + der_integer(self.e))
        info = der(0x30, der(0x30, der(0x06, RSA_ENCRYPTION_OID) + der(0x05, b"")) + der(0x03, b"\x00" + rsa))
        text = base64.b64encode(info).decode()
        return "-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n" % "\n".join(
            text[i:i + 64] for i in range(0, len(text), 64))


def random_prime(bits):
    import secrets
    small_primes = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p ** 0.5) + 1, 2))]
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if all(candidate % p for p in small_primes) and probably_prime(candidate):
            return candidate


def probably_prime(n, rounds=40):
    """Miller-Rabin."""
    import secrets
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def der(tag, content):
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def der_integer(value):
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


# ------------------------------------------------------------------------------------------------
# 7. Command line: options, loading a backend, the Worker
# ------------------------------------------------------------------------------------------------

def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    name_this_process()
    if argv[:1] == ["fleet"]:
        return Fleet(make_fleet_parser().parse_known_args(argv[1:]), environ).run()
    if argv[:1] == ["doctor"]:
        options, worker_argv = make_doctor_parser().parse_known_args(argv[1:])
        return Doctor(options, worker_argv, environ).run()
    options = make_parser(stand_in=argv[:1] == ["autoscaler"]).parse_args(argv)
    try:
        settings = Settings(options, environ)
        Log.level = Log.LEVELS["warning" if settings.quiet else settings.log_level]
        Waits.scale = settings.time_scale
        worker = Worker(settings, environ)
        worker.start()
    except StartupError as exc:
        sys.stderr.write("vastworker: error: %s\n" % exc)
        sys.stderr.flush()
        report_startup_failure(environ, str(exc))
        os._exit(1)  # not sys.exit: a half-built backend's threads must not keep us alive
    worker.run()


def name_this_process():
    """Show as vastworker in ps and top (Linux: the process name; best effort elsewhere), as
    well as in the command line, which always names vastworker.py or its directory."""
    try:
        with open("/proc/self/comm", "w") as file:
            file.write("vastworker")
    except OSError:
        pass


def report_startup_failure(environ, message):
    """Tell the autoscaler, when there is one, so the instance does not sit in "loading" for ever."""
    addresses = report_addresses(environ.get("REPORT_ADDR"))
    if addresses:
        reporter = StatusReporter(addresses, environ, 0, "http", WorkerState(message), Metrics())
        if not deliver(addresses, "/worker_status/", reporter.record(reporter.metrics.snapshot(), "failed", message),
                       timeout=3.0):
            sys.stderr.write("vastworker: could not report the failure to %s\n" % ", ".join(addresses))


class Worker:
    """One worker process: a backend (or the stand-in autoscaler) behind a WorkerServer, with the
    worker state, metrics, status reporter and background services that go with it.

    start() is plan, bind, build: plan reads and checks all that the settings and backend.py name,
    so a mistake is one StartupError line before anything runs; bind takes the port before the
    backend is built, so a busy port fails in a moment rather than after a model has loaded;
    build constructs the Backend and everything that serves it.  run() then serves until
    SIGTERM or SIGINT.  Worker.running is the one this process serves: vastworker.ready() and
    failed() reach it there."""

    running = None

    def __init__(self, settings, environ):
        self.settings = settings
        self.environ = environ
        self.state = WorkerState()
        self.metrics = Metrics()
        self.current = CurrentRequest()  # what flask.request reads
        self.postbox = Postbox()  # what notify posts through
        self.ledger = RequestLedger()  # the routed requests, for the status reports
        self.stop = StopSignal()  # run() listens for it
        self.stats = None  # build(): the RequestStats /metrics shows
        self.health = None  # build(): the model server's HealthCheck, if there is one
        self.backend = None  # build(): the Backend
        # plan(): what the settings and backend.py name
        self.directory = self.port = self.backend_plan = self.tls = None
        self.addresses, self.grants, self.key_source = [], None, None
        self.store, self.saved = None, None  # the StateStore and the attributes it read
        self.listener = None  # bind()
        self.server = self.reporter = None  # build()
        self.own_url = None  # build(): this worker's loopback URL, for its own calls
        self.key_fetcher = None  # build(): the autoscaler's public key, fetched

    def start(self):
        """Plan, bind and build; raises StartupError, having started nothing that outlives it."""
        Worker.running = self
        if self.settings.max_body > self.settings.body_memory:
            raise StartupError("--max-body %d is more than --body-memory %d: no body that large could "
                               "ever be accepted; raise --body-memory" % (self.settings.max_body,
                                                                         self.settings.body_memory))
        if self.settings.backend == "autoscaler":
            return self.start_stand_in()
        self.plan()
        self.bind(self.port)
        self.build()

    def plan(self):
        """Find and import the backend, check what it declares, and read the files the settings name
        (public key, certificate, state file)."""
        settings, environ = self.settings, self.environ
        self.directory = find_backend(settings.backend)
        self.port = settings.port
        install_modules(self.current, self.postbox)
        self.backend_plan = BackendPlan(import_backend(self.directory), self.directory, settings)
        self.addresses = report_addresses(settings.report_addr)
        self.grants, self.key_source = grant_checker(settings, self.addresses)
        self.tls = tls_context(settings)
        state_file = settings.state_file
        if state_file:
            self.store = StateStore(state_file, self.backend_plan.persist, history=self.grants)
            self.saved = self.store.load()
            self.store.check_writable()

    def bind(self, port):
        """Take the port, or say in one line why not."""
        host = self.settings.host
        try:
            self.listener = open_listener(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError("port %d is already in use on %s (is another worker running?)" % (port, host))
            raise StartupError("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc))

    def build(self):
        """The background services, the Backend, its app and the server, in the order that lets
        the autoscaler hear of a model that loads slowly in Backend()."""
        settings, environ, plan, state = self.settings, self.environ, self.backend_plan, self.state
        host, port = self.listener.getsockname()[:2]
        scheme = "https" if self.tls is not None else "http"
        self.grants.own_url = public_url(environ, port, scheme)
        self.key_fetcher = KeyFetcher(self.addresses, self.grants)
        if self.grants.key_expected:
            self.grants.on_bad_signature = self.key_fetcher.refetch
        state.max_perf = float(plan.max_perf)
        if plan.max_perf_declared:
            state.rated(plan.max_perf, "backend.py max_perf")
        benchmark = self.benchmark(host, port) if plan.benchmark is not None else None
        health = self.health = HealthCheck(plan.healthcheck, state) if plan.healthcheck else None
        self.stats = RequestStats([name for named in plan.routes.values() for name in named]
                                  + list(ReportEndpoints.NAMES) + [".vastworker/status", "metrics"])
        if benchmark is not None or health is not None:
            state.on_ready = lambda: self.become_loaded(benchmark, health)
        if plan.log_actions is not None and plan.model_log:
            LogWatcher(plan.model_log, plan.log_actions, state).start()
        elif plan.log_actions is not None:
            Log.write("info", "no MODEL_LOG: the model server's log is not watched")
        if plan.uses_notify:
            Log.write("info", "the backend reports to the autoscaler itself (it uses notify)")
        elif self.addresses:
            state.held = lambda: self.key_fetcher.problem if self.grants.waiting_for_key else None
            self.reporter = StatusReporter(self.addresses, environ, port, scheme, state, self.metrics,
                                           ledger=self.ledger)
            self.reporter.start()
        backend = self.backend = self.construct_backend()
        self.own_url = "%s://%s:%d" % (scheme, loopback_for(host) if ":" not in loopback_for(host)
                                       else "[%s]" % loopback_for(host), port)
        sessions = Sessions(self.grants, self.ledger, self.metrics, settings.max_sessions, self.session_closed,
                            settings.max_session_lifetime, lambda: state.most_work(settings.queue_time))
        sessions.start()
        app = BackendApp(backend, plan.routes, state, self.metrics, self.current, parallel=plan.parallel,
                         queue_time=settings.queue_time, workload=plan.workload, error_body=plan.error_body,
                         grants=self.grants,
                         report_endpoints=ReportEndpoints(settings.master_token or None, state, settings.update_flag,
                                                          self.status, self.prometheus),
                         store=self.store, ledger=self.ledger, sessions=sessions, stats=self.stats)
        self.server = WorkerServer(self.listener, app, settings.timeout, settings.max_body, self.tls,
                                   settings.max_connections, settings.body_memory)
        Log.write("info", "vastworker %s serving %s on %s://%s:%d (%s)%s"
                  % (__version__, os.path.basename(self.directory), scheme,
                     host if ":" not in host else "[%s]" % host, port, describe_routes(plan.routes),
                     "; handlers run in parallel" if plan.parallel else ""), always=True)
        self.grants.describe(self.key_source)
        if self.grants.key_expected:
            self.key_fetcher.start()
        if plan.readiness == "start":
            state.ready()
        else:
            Log.write("info", "waiting for the backend to be ready (%s)" % {
                "log": "a loaded line in %s" % plan.model_log, "call": "vastworker.ready()",
                "health": "a 200 from %s" % plan.healthcheck}[plan.readiness])
            if plan.readiness == "health":
                health.become_ready()

    def benchmark(self, host, port):
        """backend.py's benchmark, run through this worker's own address, cached in --cache-dir:
        its dict, or what its benchmark(backend, smaller) makes, checked as a dict is."""
        plan = self.backend_plan
        if callable(plan.benchmark):
            def make(smaller):
                config = plan.benchmark(self.backend, smaller)
                return None if config is None else benchmark_config(config, plan.path, plan.parallel)
        else:
            def make(smaller):
                return None if smaller else plan.benchmark
        with open(plan.path, "rb") as file:
            return Benchmark(make, os.path.basename(self.directory), file.read(),
                             os.path.join(self.settings.cache_dir, "vastworker-benchmark.json"),
                             (loopback_for(host), port), self.tls is not None)

    def become_loaded(self, benchmark, health):
        """What readiness sets off when there is a benchmark or a health check: a first healthy
        answer, then the benchmark's max_perf, then loaded -- or failed on the way."""
        if health is not None and not health.healthy and not health.wait_until_healthy(health.patience):
            return
        max_perf = benchmark.run(self.state, self.metrics) if benchmark is not None else None
        if benchmark is not None and max_perf is None:
            return
        self.state.loaded(max_perf, benchmark.source if benchmark is not None else None)
        if health is not None:
            health.watch()

    def status(self):
        """GET /.vastworker/status: what the worker is doing, as its operator wants to know it."""
        state, metrics, reporter = self.state, self.metrics, self.reporter
        return {"backend": os.path.basename(self.directory), "version": __version__, "phase": state.word,
                "error_msg": state.reported()[1], "max_perf": state.max_perf,
                "max_perf_source": state.max_perf_source, "cur_load": metrics.in_flight,
                "in_flight": metrics.working, "url": self.grants.own_url or self.own_url,
                "reports": None if reporter is None else dict(
                    reporter.last or {}, delivered_count=reporter.reports[True], failed_count=reporter.reports[False])}

    def prometheus(self):
        """GET /metrics: the RequestStats' families and the worker's own, in Prometheus' format."""
        state, reporter = self.state, self.reporter
        families = self.stats.families() + [
            ("vastworker_requests_in_flight", "gauge", "Requests being served now", [({}, self.metrics.working)]),
            ("vastworker_cur_load", "gauge", "Workload in flight (the status record's cur_load)",
             [({}, self.metrics.in_flight)]),
            ("vastworker_max_perf", "gauge", "Workload per second this worker serves (max_perf)",
             [({}, state.max_perf)]),
            ("vastworker_phase", "gauge", "1 for the phase the worker is in",
             [({"phase": phase}, int(state.word == phase)) for phase in ("loading", "loaded", "error", "stopping")]),
            ("vastworker_info", "gauge", "This worker's version and backend",
             [({"version": __version__, "backend": os.path.basename(self.directory)}, 1)])]
        if reporter is not None:
            families.append(("vastworker_status_reports_total", "counter", "Status reports sent, by outcome",
                             [({"outcome": "delivered"}, reporter.reports[True]),
                              ({"outcome": "failed"}, reporter.reports[False])]))
        if self.health is not None:
            families.append(("vastworker_model_server_healthy", "gauge",
                             "1 when the model server's last health check answered 200",
                             [({}, int(self.health.last == 200))]))
        return exposition(families)

    def construct_backend(self):
        """Backend(), its saved state restored; the one place a backend's own start-up runs."""
        backend_class = self.backend_plan.module.Backend
        try:
            backend = backend_class(**backend_arguments(backend_class, self.environ))
        except BaseException as exc:
            self.listener.close()
            Log.write("debug", formatted_exception())
            raise StartupError("Backend() failed: %s%s" % (describe_exception(exc), where_in(exc, self.directory)))
        if self.store is not None:
            self.store.restore(backend, self.saved or {})
            Log.write("info", "state %s %s" % ("restored from" if self.saved is not None else "will be saved in",
                                              self.store.path))
        declared = getattr(backend, "max_perf", None)
        if is_number(declared) and declared > 0:  # positive_number()'s rule; anything else is not a declaration
            self.state.rated(declared, "Backend().max_perf")
        return backend

    def session_closed(self, session):
        """A closed session's on-close route, POSTed in the background (10 s at most): a path to
        this worker's own handler, a URL as it is; the body its on_close_payload with the
        session_id.  A failure is logged, and nothing else."""
        route = session.on_close_route
        url = route if "://" in route else self.own_url + "/" + route.lstrip("/")
        payload = session.on_close_payload
        body = dict(payload) if isinstance(payload, dict) else ({} if payload is None else {"payload": payload})
        body.setdefault("session_id", session.session_id)

        def post():
            try:
                status, _ = http_exchange(url, "POST", json.dumps(body), {
                    "Content-Type": "application/json", INTERNAL_HEADER: INTERNAL_TOKEN}, timeout=10.0, verify=False)
                Log.write("info" if status < 400 else "warning",
                          "session %s: on-close %s answered %d" % (session.session_id, url, status))
            except (OSError, http.client.HTTPException) as exc:
                Log.write("warning", "session %s: on-close %s failed: %s" % (session.session_id, url, exc))

        threading.Thread(target=post, name="session-close", daemon=True).start()

    def start_stand_in(self):
        """The local autoscaler stand-in, served by the same machinery as a backend."""
        settings = self.settings
        stand_in = StandInAutoscaler(settings.grant_shape, settings.master_token)
        routes = stand_in.routes()
        self.bind(settings.port if settings.source["port"] == "--port" else 8081)  # not $WORKER_PORT: a worker's
        self.state.loaded(quiet=True)  # nothing to load: it serves at once
        app = BackendApp(stand_in, routes, self.state, self.metrics, self.current)
        self.server = WorkerServer(self.listener, app, settings.timeout, settings.max_body,
                                   max_connections=settings.max_connections, body_memory=settings.body_memory)
        host, port = self.server.server_address[:2]
        Log.write("info", "vastworker %s autoscaler stand-in on http://%s:%d: point REPORT_ADDR at it "
                          "(%s)" % (__version__, host, port, describe_routes(routes)), always=True)
        if not stand_in.master_token:
            Log.write("warning", "no MASTER_TOKEN: status reports are taken from anyone who can reach "
                                 "this port; set it (the workers' too) to refuse forged ones")

    def run(self):
        """Serve until SIGTERM or SIGINT, then stop accepting, let in-flight requests finish (for
        up to --grace seconds), send a last status report and exit 0, whatever threads the
        backend left running."""
        server, grace = self.server, self.settings.grace

        def exit_now():
            Log.last_words("second signal: exiting now")
            os._exit(1)

        stop = self.stop
        stop.listen(again=exit_now)
        Log.start_flusher()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="accept", daemon=True)
        thread.start()
        if self.settings.ready_file:  # and again at each change of phase: loaded, error, stopping
            path, state, lock = self.settings.ready_file, self.state, threading.Lock()

            def write():
                with lock:  # the phase as it is when written, so the last write is the latest
                    write_ready_file(path, state.word)
            state.on_change.append(write)
            write()
        while not stop.wait(1.0):
            if not thread.is_alive():
                Log.write("error", "the server loop ended unexpectedly")
                break
        if stop.signum == signal.SIGINT:
            Log.write("info", "stopping (Ctrl-C again to quit now)", always=True)
        server.stopping = True
        self.state.stopping()
        if self.reporter is not None:  # before draining: route nothing more here
            self.reporter.report_once()
        server.shutdown()
        server.server_close()
        in_flight = len(server.in_flight)
        if in_flight:
            Log.write("info", "stopping: waiting up to %g s for %d request(s) in flight" % (grace, in_flight))
        if not server.wait_idle(grace):
            Log.write("warning", "stopping with %d request(s) unfinished" % len(server.in_flight))
        if self.reporter is not None:
            self.reporter.report_once()
        Log.write("info", "stopped", always=True)
        sys.stdout.flush()
        os._exit(0)  # the backend's own non-daemon threads must not keep the process alive


class Fleet:
    """`python3 vastworker.py fleet BACKEND --workers N`: the stand-in autoscaler and N workers,
    each a process of its own started as `python3 vastworker.py ...` (so ps and pgrep name it),
    reporting to the stand-in on free ports with a MASTER_TOKEN of its own, so signed grants
    are required as on Vast.  Their output comes through here, each line marked with whose it
    is; a process that ends is said so; Ctrl-C or SIGTERM stops them all, and waits until they
    have."""

    def __init__(self, parsed, environ):
        (self.options, self.worker_args), self.environ = parsed, environ
        self.children = []  # (name, Popen)
        self.relays = {}  # name -> the thread relaying its output
        self.serving = {}  # name -> the line in which it said it serves, once it has
        self.said = threading.Condition()
        self.stop = StopSignal()  # run() listens for it

    def run(self):
        import secrets
        import subprocess
        options, here = self.options, loopback_for(self.options.host)
        host = "[%s]" % here if ":" in here else here
        token = self.environ.get("MASTER_TOKEN") or secrets.token_hex(16)
        stand_in = "http://%s:%d" % (host, options.port)
        command = [sys.executable] + ["-I"] * sys.flags.isolated + ["-S"] * sys.flags.no_site + [
            os.path.join(HERE, "vastworker.py")]  # run as this one is
        self.stop.listen()
        self.start("stand-in", command + ["autoscaler", "--host", options.host, "--port", str(options.port)],
                   dict(self.environ, MASTER_TOKEN=token), subprocess)
        if not self.wait_serving():
            return self.stop_all(1)
        urls = []
        for number in range(1, options.workers + 1):
            port = free_port_on(options.host)
            urls.append("http://%s:%d" % (host, port))
            self.start("worker %d" % number, command + [options.backend, "--host", options.host, "--port", str(port)]
                       + self.worker_args, dict(self.environ, REPORT_ADDR=stand_in, MASTER_TOKEN=token,
                                                CONTAINER_ID=str(number), PUBLIC_IPADDR=here,
                                                **{"VAST_TCP_PORT_%d" % port: str(port)}), subprocess)
        if not self.wait_serving():
            return self.stop_all(1)
        routes = re.findall(r"(GET|POST|PUT|PATCH|DELETE) /([^,)\s]*)", self.serving["worker 1"].split(" (", 1)[-1])
        method, endpoint = next((route for route in routes if route[0] == "GET"), routes[0] if routes else ("GET", ""))
        print(FLEET_STARTED % {"stand_in": stand_in, "method": method, "endpoint": endpoint, "workers": "\n".join(
            "  worker %d  %s  pid %d" % (number, url, process.pid)
            for number, (url, (_, process)) in enumerate(zip(urls, self.children[1:]), 1))}, flush=True)
        while not self.stop.wait(0.2):
            for name, process in self.children:
                if process.returncode is None and process.poll() is not None:
                    code = process.returncode
                    print("vastworker fleet: %s (pid %d) %s" % (name, process.pid, "exited with status %d" % code
                          if code >= 0 else "was killed by %s" % signal.Signals(-code).name), flush=True)
        return self.stop_all()

    def start(self, name, argv, environ, subprocess):
        """Start one process, its output relayed line by line with its name in front."""
        process = subprocess.Popen(argv, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # Ctrl-C reaches the fleet
        # alone, which stops each once: a second signal would make a worker quit without draining
        self.children.append((name, process))

        def relay():
            for line in process.stdout:
                line = line.decode("utf-8", "replace")
                sys.stdout.write("[%s] %s" % (name, line))
                sys.stdout.flush()
                if name not in self.serving and (" serving " in line or " stand-in on " in line):
                    with self.said:
                        self.serving[name] = line
                        self.said.notify_all()
            with self.said:
                self.said.notify_all()  # it ended

        self.relays[name] = threading.Thread(target=relay, name="relay " + name, daemon=True)
        self.relays[name].start()

    def wait_serving(self):
        """True once every process started so far serves; False when one ended, or a stop came."""
        with self.said:
            while not self.stop.is_set():
                if any(process.poll() is not None for _, process in self.children):
                    break
                if all(name in self.serving for name, _ in self.children):
                    return True
                self.said.wait(0.2)
            else:
                return False
        ended = [name for name, process in self.children if process.poll() is not None]  # each asked again
        for name in ended:  # its last words relayed first
            self.relays[name].join(2.0)
        print("vastworker fleet: %s exited during start-up" % ", ".join(ended), flush=True)
        return False

    def stop_all(self, status=0):
        """SIGTERM to the workers, then to the stand-in (which takes their last reports), each
        waited for (SIGKILL to any still there after 30 s): nothing is left behind.  `status`,
        the fleet's exit status, is returned."""
        print("vastworker fleet: stopping %d processes" % len(self.children), flush=True)
        for group in (self.children[1:], self.children[:1]):
            for _, process in group:
                if process.poll() is None:
                    process.terminate()
            deadline = time.monotonic() + 30
            for name, process in group:
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except Exception:  # subprocess.TimeoutExpired
                    print("vastworker fleet: %s (pid %d) did not stop: killed" % (name, process.pid), flush=True)
                    process.kill()
                    process.wait()
        for relay in self.relays.values():  # every last line out before the fleet's own last one
            relay.join(2.0)
        print("vastworker fleet: stopped", flush=True)
        return status


FLEET_STARTED = """\
vastworker fleet: the autoscaler stand-in on %(stand_in)s and these workers reporting to it:
%(workers)s
Route, then call the worker the grant names (signed grants are required, as on Vast), e.g.
  grant=$(curl -s -X POST %(stand_in)s/route/ -d '{"endpoint": "%(endpoint)s", "cost": 100}')
  url=$(printf '%%s' "$grant" | python3 -c 'import json, sys; print(json.load(sys.stdin)["url"])')
  curl -s -X %(method)s "$url/%(endpoint)s" -H 'Content-Type: application/json' \\
      -d "{\\"auth_data\\": $grant, \\"payload\\": {}}"
Records: curl %(stand_in)s/records   Ctrl-C stops them all."""


class Doctor:
    """`python3 vastworker.py doctor BACKEND --endpoint NAME [--api-key KEY] [worker options]`: run
    in the worker's own environment (REPORT_ADDR, MASTER_TOKEN, PUBLIC_IPADDR, VAST_TCP_PORT_*,
    MODEL_SERVER_URL, its options), it checks what a worker needs, one line each -- ok, or the
    problem and what to do -- and exits 0 only when all hold: the worker's start-up checks, its
    port, the model server, the autoscaler (reachable, its key, the clock); then, with the worker
    started briefly on its port, its status reports, live grants from /route/ tried in each
    signed-message shape, and its public URL."""

    SHAPES = {"g4": "Vast's current worker: the url alone is signed", "g3": "late 2025: all five fields",
              "g1": "the original worker's four fields"}

    def __init__(self, options, worker_argv, environ):
        self.options, self.worker_argv, self.environ = options, worker_argv, environ
        self.problems = 0
        self.key = None  # autoscaler(): its public key

    def say(self, check, problem, text):
        print("%-5s%-14s%s" % ("FAIL" if problem else "ok", check, text), flush=True)
        self.problems += bool(problem)

    def run(self):
        worker = self.start_up()
        if worker is not None and self.port_free(worker) and self.model_server(worker) \
                and self.autoscaler(worker) is not None:
            self.live(worker)
        print("%s" % ("all checks hold" if not self.problems else "%d problem(s)" % self.problems), flush=True)
        return 0 if not self.problems else 1

    def start_up(self):
        """The worker's own start-up checks: backend, settings, key, certificate, state file."""
        try:
            worker = Worker(Settings(make_parser().parse_args(self.worker_argv), self.environ), self.environ)
            worker.plan()
        except StartupError as exc:
            self.say("start-up", True, "%s: the worker would not start" % exc)
            return None
        self.say("start-up", False, "backend %s; %s; %s" % (
            os.path.basename(worker.directory), "HTTPS" if worker.tls is not None else "plain HTTP (USE_SSL unset)",
            "state in %s" % worker.settings.state_file if worker.settings.state_file else "no state file"))
        return worker

    def port_free(self, worker):
        try:
            worker.bind(worker.port)
        except StartupError as exc:
            self.say("port", True, "%s: stop it first (start_server.sh --stop)" % exc)
            return False
        worker.listener.close()
        self.say("port", False, "%s:%d is free" % (worker.settings.host, worker.port))
        return True

    def model_server(self, worker):
        """The model server's health endpoint, for backends that have one; False when it is down."""
        url = worker.backend_plan.healthcheck
        if not url:
            return True
        answer = HealthCheck(url, WorkerState()).status()
        if answer != 200:
            self.say("model server", True, "%s answered %s: is it running (MODEL_COMMAND; its log MODEL_LOG) and "
                                           "is MODEL_SERVER_URL right?" % (url, answer))
            return False
        self.say("model server", False, "%s answered 200" % url)
        return True

    def autoscaler(self, worker):
        """The autoscaler's public key, and the clock against its Date; None when unreachable."""
        if not worker.addresses:
            self.say("autoscaler", True, "REPORT_ADDR is not set: on Vast it is; here, point it at "
                                         "`python3 vastworker.py autoscaler`")
            return None
        address, headers = worker.addresses[0], []
        try:
            status, body = http_exchange(address + "/pubkey/", timeout=10.0, answer_headers=headers)
            key = RSAPublicKey.from_pem(body.decode("ascii", "replace")) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.say("autoscaler", True, "REPORT_ADDR %s: %s: is the address right, and can this machine reach "
                                         "it?" % (address, describe_exception(exc)))
            return None
        if key is None:
            self.say("autoscaler", True, "%s/pubkey/ answered %d, not a key" % (address, status))
            return None
        self.say("autoscaler", False, "%s serves a %d-bit public key" % (address, key.n.bit_length()))
        date = dict((name.lower(), value) for name, value in headers).get("date")
        if date:
            skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
            self.say("clock", abs(skew) > 30, "%+.0f s from the autoscaler's%s" % (
                skew, ": set the time (NTP)" if abs(skew) > 30 else ""))
        self.key = key
        return key

    def live(self, worker):
        """The worker started on its port: its reports, live grants and public URL."""
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as scratch:
            ready, log = os.path.join(scratch, "ready"), open(os.path.join(scratch, "log"), "w+")
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + self.worker_argv
                                     + ["--ready-file", ready], stdout=log, stderr=subprocess.STDOUT, env=self.environ)
            try:
                if self.loaded(child, ready, worker, log):
                    self.reports(worker)
                    self.grants(worker)
                    self.public(worker)
            finally:
                child.terminate()
                child.wait()
                log.close()

    def loaded(self, child, ready, worker, log):
        """Whether the worker loads within --wait; what it said of the model server's context."""
        def logged():
            log.seek(0)
            return log.read()

        deadline = time.monotonic() + self.options.wait
        while time.monotonic() < deadline and child.poll() is None:
            try:
                with open(ready) as file:
                    phase = file.read().split()[1]
            except (OSError, IndexError):
                phase = None
            if phase in ("loaded", "error"):
                status = self.status(worker)
                settle = time.monotonic() + 2.0  # the log is written a moment after the phase
                while phase == "loaded" and "loaded after" not in logged() and time.monotonic() < settle:
                    time.sleep(0.05)
                context = re.findall(r"benchmark: (the model server (?:takes \d+ tokens a request|names no context))",
                                     logged())
                self.say("worker", phase == "error", "loaded, max_perf %g (%s)%s" % (
                    status["max_perf"], status["max_perf_source"], "; " + context[-1] if context else "")
                    if phase == "loaded" else "failed: %s" % status["error_msg"])
                return phase == "loaded"
            time.sleep(0.2)
        last = (logged().strip().splitlines() or [""])[-1]
        self.say("worker", True, "not loaded within %g s (--wait)" % self.options.wait if child.poll() is None
                 else "it exited (status %s): %s" % (child.returncode, last))
        return False

    def status(self, worker):
        return json.loads(http_exchange("http://%s:%d/.vastworker/status" % (
            loopback_for(worker.settings.host), worker.port), timeout=10.0)[1])

    def reports(self, worker):
        reports = self.status(worker)["reports"] or {}
        failed = reports.get("failed_count", 0)
        self.say("reports", failed or not reports.get("delivered_count"), "%d status report(s) taken, %d refused%s" % (
            reports.get("delivered_count", 0), failed, ": is MASTER_TOKEN this instance's?" if failed else ""))

    def grants(self, worker):
        """Three live grants from /route/, each tried in every shape."""
        checker, grants = GrantChecker(self.key), []
        ask = json.dumps({"endpoint": self.options.endpoint, "cost": DEFAULT_WORKLOAD,
                          "api_key": self.options.api_key or ""})
        headers = {"Content-Type": "application/json"}
        if self.options.api_key:
            headers["Authorization"] = "Bearer " + self.options.api_key
        deadline = time.monotonic() + 30.0
        while len(grants) < 3 and time.monotonic() < deadline:
            try:
                status, body = http_exchange(worker.addresses[0] + "/route/", "POST", ask, headers, timeout=10.0)
                grant = json.loads(body)
            except (OSError, http.client.HTTPException, ValueError):
                status, grant = None, None
            if isinstance(grant, dict) and all(name in grant for name in ("signature", "url", "reqnum", "cost")):
                grants.append(grant)
            else:
                time.sleep(1.0)
        if not grants:
            self.say("grants", True, "/route/ for endpoint %r gave no grant within 30 s (last: %s %s): is the "
                                     "endpoint name right, and its API key (--api-key)?" % (
                                         self.options.endpoint, status, printable(str(grant))[:200]))
            return
        shapes = []
        for grant in grants:
            try:
                shapes.append(checker.shape_of(grant))
            except (KeyError, TypeError, ValueError):
                shapes.append(None)
        if None not in shapes:
            self.say("grants", False, "%d live grants verify as %s" % (len(grants), ", ".join(
                "%s (%s)" % (shape, self.SHAPES[shape]) for shape in sorted(set(shapes)))))
            return
        same = len({grant["signature"] for grant in grants}) == 1 and len(
            {(grant["reqnum"], grant.get("request_idx"), grant["url"]) for grant in grants}) > 1
        self.say("grants", True, "%d of %d live grants verify in no shape (g4, g3, g1)%s: the autoscaler signs "
                                 "a message this worker does not know.  Tell Vast, with these grants; meanwhile "
                                 "UNSECURED=true serves without checking (anyone may send requests)" % (
                                     shapes.count(None), len(grants), "; every grant has the same signature, though "
                                     "their reqnum, request_idx or url differ" if same else ""))
        for grant in grants:
            print("     %s" % json.dumps(grant, sort_keys=True), flush=True)

    def public(self, worker):
        url = public_url(self.environ, worker.port, "https" if worker.tls else "http")
        if not url:
            self.say("public url", True, "PUBLIC_IPADDR and VAST_TCP_PORT_%d are not set: the autoscaler is "
                                         "told no url to route to" % worker.port)
            return
        parts = urlsplit(url)
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=5.0).close()
        except OSError as exc:
            self.say("public url", True, "%s does not answer from here (%s): is port %d mapped (-p %d:%d)?" % (
                url, describe_exception(exc), worker.port, worker.port, worker.port))
            return
        self.say("public url", False, "%s answers" % url)


def free_port_on(host):
    """A port free on `host` now (the worker takes it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def write_ready_file(path, phase):
    """Say, in `path`, that this process serves, and its phase: "PID PHASE", written whole (a
    rename) or not at all.  start_server.sh reads it to know its own worker is up, and loaded."""
    temporary = "%s.%d" % (path, os.getpid())
    try:
        with open(temporary, "w") as file:
            file.write("%d %s\n" % (os.getpid(), phase))
        os.replace(temporary, path)
    except OSError as exc:
        Log.write("warning", "could not write the ready file %s: %s" % (path, exc.strerror or exc))


def running_worker():
    if Worker.running is None:
        raise RuntimeError("no worker is running in this process (python3 vastworker.py BACKEND starts one)")
    return Worker.running


def ready():
    """A backend with readiness = "call" says its model is ready: benchmark, then loaded."""
    running_worker().state.ready()


def failed(message):
    """A backend says its model failed, for good: reported as error_msg; requests get 503."""
    running_worker().state.failed(message)


class BackendPlan:
    """What backend.py declares, checked before anything starts: its routes, readiness, log
    actions, a benchmark, a workload function, max_perf, parallelism and what is persisted."""

    def __init__(self, module, directory, settings):
        """Read backend.py's declarations from `module` into `settings` too (where they are
        read, with which wins); StartupError names the first mistake."""
        path = os.path.join(directory, "backend.py")
        self.module, self.path = module, path
        self.routes = validate_routes(module, path)
        settings.add_backend(module, path)
        self.parallel, self.readiness = settings.allow_parallel_requests, settings.readiness
        self.log_actions, self.model_log = settings.log_actions, settings.model_log
        if self.log_actions is not None:
            log_actions_config(self.log_actions, path)
            if not self.model_log and self.readiness == "log":
                raise StartupError("%s defines log_actions but no log to watch: set MODEL_LOG" % path)
        if self.readiness == "log" and not (self.log_actions or {}).get("loaded"):
            raise StartupError('%s: readiness "log" needs log_actions with "loaded" patterns' % path)
        self.benchmark = settings.benchmark  # a dict, checked now, or a function making one later
        if self.benchmark is not None and not callable(self.benchmark):
            self.benchmark = benchmark_config(self.benchmark, path, self.parallel)
        self.workload, self.error_body = settings.workload, settings.error_body
        if self.workload is not None and not callable(self.workload):
            raise StartupError("%s: workload must be a function workload(backend, request)" % path)
        if self.error_body is not None and not callable(self.error_body):
            raise StartupError("%s: error_body must be a function error_body(status, message)" % path)
        self.max_perf, self.max_perf_declared = settings.max_perf, settings.source["max_perf"] != "default"
        self.uses_notify = uses_notify(module)
        self.healthcheck = settings.healthcheck
        if self.readiness == "health" and self.healthcheck is None:
            raise StartupError('%s: readiness "health" needs a healthcheck URL (or $MODEL_HEALTH_ENDPOINT)' % path)
        self.persist = settings.persist if settings.persist is not None else getattr(module.Backend, "persist", None)
        if self.persist is not None and not (isinstance(self.persist, (list, tuple, set)) and all(
                isinstance(name, str) for name in self.persist)):
            raise StartupError("%s: persist must be a list of attribute names" % path)


def grant_checker(settings, addresses):
    """The signature policy: a key from --pubkey, $VASTWORKER_PUBKEY or (fetched in the background)
    the autoscaler; unsigned requests refused when there is one, unless explicitly allowed."""
    key, source = None, None
    if settings.pubkey:
        try:
            with open(settings.pubkey) as file:
                key, source = RSAPublicKey.from_pem(file.read()), settings.pubkey
        except (OSError, ValueError) as exc:
            raise StartupError("--pubkey %s: %s" % (settings.pubkey, exc))
    elif settings.pubkey_pem:
        try:
            key, source = RSAPublicKey.from_pem(settings.pubkey_pem), "$VASTWORKER_PUBKEY"
        except ValueError as exc:
            raise StartupError("$VASTWORKER_PUBKEY: %s" % exc)
    checker = GrantChecker(key, settings.grant_shape, settings.allow_unsigned,
                           key_expected=key is None and bool(addresses))
    return checker, source or (addresses[0] if addresses else None)


def tls_context(settings):
    """HTTPS with --certfile/--keyfile, or with Vast's instance certificate when USE_SSL=true."""
    certfile, keyfile = settings.certfile, settings.keyfile
    if certfile is None and settings.use_ssl:
        certfile, keyfile = "/etc/instance.crt", "/etc/instance.key"
    if certfile is None:
        return None
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError("cannot serve HTTPS with certificate %s and key %s: %s"
                           % (certfile, keyfile or certfile, getattr(exc, "strerror", None) or exc))
    return context


def loopback_for(host):
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def find_backend(spec):
    """A backend name (under backends/) or a path, to the directory holding its backend.py."""
    if "/" in spec or os.sep in spec or spec.startswith("."):
        directory = os.path.abspath(spec)
        if os.path.isfile(directory) and os.path.basename(directory) == "backend.py":
            directory = os.path.dirname(directory)
    else:
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", spec):
            raise StartupError("%r is not a backend name (letters, digits, '_', '-' and '.')" % spec)
        directory = os.path.join(BACKENDS_DIR, spec)
        if not os.path.isdir(directory):
            import difflib
            close = difflib.get_close_matches(spec, available_backends(), 1)
            raise StartupError("no backend %r in %s%s (available: %s)" % (
                spec, BACKENDS_DIR, "; did you mean %r?" % close[0] if close else "",
                ", ".join(available_backends()) or "none"))
    if not os.path.isfile(os.path.join(directory, "backend.py")):
        raise StartupError("%s has no backend.py" % directory)
    return directory


def available_backends():
    if not os.path.isdir(BACKENDS_DIR):
        return []
    return sorted(name for name in os.listdir(BACKENDS_DIR)
                  if os.path.isfile(os.path.join(BACKENDS_DIR, name, "backend.py")))


def import_backend(directory):
    path = os.path.join(directory, "backend.py")
    if directory not in sys.path:
        sys.path.insert(0, directory)  # so backend.py can import modules beside it
    spec = importlib.util.spec_from_file_location("backend", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["backend"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        Log.write("debug", formatted_exception())
        raise StartupError("%s failed to import: %s%s" % (path, describe_exception(exc),
                                                         where_in(exc, directory)))
    return module


def where_in(exc, directory):
    """' (at backend.py line 3)': the innermost frame of the backend's own code."""
    if isinstance(exc, SyntaxError):
        return ""
    import traceback
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if os.path.abspath(frame.filename).startswith(directory + os.sep):
            return " (at %s line %s)" % (os.path.relpath(frame.filename, directory), frame.lineno)
    return ""


def install_modules(current, postbox):
    """Make `import flask` and `import notify` give ours -- reading the worker's current request
    and posting through its postbox -- and `import vastworker` this very module even when it
    runs as __main__ (a second copy would have globals, and a Worker, of its own)."""
    sys.modules["flask"] = make_flask_module(current)
    sys.modules["notify"] = make_notify_module(postbox)
    sys.modules.setdefault("vastworker", sys.modules[__name__])


def validate_routes(module, path):
    """flask_dict, checked now so that a mistake is one clear line at start, not a 404 later."""
    if not hasattr(module, "Backend"):
        raise StartupError("%s defines no Backend class" % path)
    if not callable(module.Backend):
        raise StartupError("%s: Backend is not a class" % path)
    flask_dict = getattr(module, "flask_dict", None)
    example = 'e.g. flask_dict = {"POST": {"increment": increment_handler}}'
    if flask_dict is None:
        raise StartupError("%s defines no flask_dict (%s)" % (path, example))
    if not isinstance(flask_dict, dict):
        raise StartupError("%s: flask_dict is a %s, not a dict (%s)" % (path, type(flask_dict).__name__, example))
    routes = {}
    for method, endpoints in flask_dict.items():
        if method not in SERVED_METHODS:
            raise StartupError("%s: flask_dict method %r is not one of %s"
                               % (path, method, ", ".join(SERVED_METHODS)))
        if not isinstance(endpoints, dict):
            raise StartupError("%s: flask_dict[%r] is not a dict of endpoint names to handlers" % (path, method))
        for endpoint, handler in endpoints.items():
            if not isinstance(endpoint, str) or endpoint.startswith("/"):  # "" is the root, "/"
                raise StartupError("%s: flask_dict[%r] endpoint %r must be a name without a leading "
                                   "'/', e.g. 'increment'" % (path, method, endpoint))
            if not callable(handler):
                raise StartupError("%s: flask_dict[%r][%r] is not a function" % (path, method, endpoint))
            check_handler(handler, method, endpoint)
        routes[method] = dict(endpoints)
    if not any(routes.values()):
        raise StartupError("%s: flask_dict serves no endpoints (%s)" % (path, example))
    return routes


def check_handler(handler, method, endpoint):
    """A handler must take (backend, request): one that cannot is refused at start, naming its
    file and line, rather than failing every request.  Callables whose parameters cannot be read
    without importing inspect (builtins, objects with __call__) are let through."""
    function = getattr(handler, "__func__", handler)
    code = getattr(function, "__code__", None)
    if code is None:
        return
    bound = function is not handler  # a method: its self is already given
    positional = code.co_argcount - bound
    required = positional - len(function.__defaults__ or ())
    keywords = code.co_kwonlyargcount - len(function.__kwdefaults__ or {})
    takes_more = code.co_flags & 0x04  # *args
    if required <= 2 and (positional >= 2 or takes_more) and not keywords:
        return
    names = code.co_varnames[bound:code.co_argcount]
    raise StartupError("%s line %d: the %s /%s handler %s(%s) cannot take (backend, request), "
                       "which is how handlers are called" % (
                           code.co_filename, code.co_firstlineno, method, endpoint,
                           function.__name__, ", ".join(names)))


def backend_arguments(backend_class, environ):
    """The keyword arguments the original worker passed, limited to those the constructor takes,
    so `def __init__(self)` works as well as `def __init__(self, container_id, ...)`."""
    report_addr = environ.get("REPORT_ADDR") or None
    offered = {"container_id": environ.get("CONTAINER_ID"), "master_token": environ.get("MASTER_TOKEN"),
               "control_server_url": report_addr, "send_data": report_addr is not None}
    init = getattr(backend_class, "__init__", None)
    code = getattr(init, "__code__", None)
    if code is None:  # object.__init__ or a constructor written in C: it takes no arguments of ours
        return {}
    if code.co_flags & 0x08:  # **kwargs
        return offered
    names = code.co_varnames[code.co_posonlyargcount:code.co_argcount + code.co_kwonlyargcount]
    return {name: value for name, value in offered.items() if name in names}


def describe_routes(routes):
    return ", ".join("%s /%s" % (method, endpoint)
                     for method in SERVED_METHODS for endpoint in routes.get(method, {}))


def make_parser(stand_in=False):
    """The command line: the backend, then an option for each setting that has a flag; or, for
    `autoscaler`, the stand-in's own."""
    if stand_in:
        parser = argparse.ArgumentParser(
            prog="vastworker.py autoscaler", formatter_class=argparse.RawDescriptionHelpFormatter,
            description=STAND_IN_HELP, epilog="environment variables:\n  MASTER_TOKEN  %s\n" % wrapped(
                "the token workers must send as their reports' mtoken (without it, any report is taken), "
                "and Backend(master_token=...) is given on Vast", 16))
        parser.add_argument("backend", choices=["autoscaler"], help=argparse.SUPPRESS)
        for setting in SETTINGS:
            if setting.name in STAND_IN_SETTINGS:
                setting.add_to(parser, **({"default": 8081, "variables": False} if setting.name == "port" else {}))
        return parser
    parser = argparse.ArgumentParser(
        prog="vastworker.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a pyworker-style backend (backend.py with Backend and flask_dict) "
                    "over HTTP, on the Python standard library alone.",
        epilog=settings_help())
    parser.add_argument("backend", metavar="BACKEND",
                        help="a directory name under backends/, or a path to a directory with backend.py")
    for setting in SETTINGS:
        if setting.flag:
            setting.add_to(parser)
    parser.add_argument("--version", action="version", version="vastworker " + __version__)
    return parser


STAND_IN_SETTINGS = ("host", "port", "grant_shape", "timeout", "max_connections", "log_level", "quiet")
STAND_IN_HELP = """\
A local stand-in for Vast's autoscaler: point workers' REPORT_ADDR at it.  It keeps the status
records they send (GET /records), serves its public key (GET /pubkey/), signs grants at
POST /route/ {"endpoint": NAME, "cost": WORKLOAD} for the worker with the least predicted wait,
takes finished requests (POST /delete_requests/, listed at GET /requests) and lists the workers
(POST /get_endpoint_workers/) as Vast's SDK expects.  Its page at GET / shows the fleet live
(GET /status: the same as JSON); GET /metrics is for Prometheus.  `python3 vastworker.py fleet`
runs one with workers."""


def subcommand_parser(name, arguments, description):
    """The parser of `vastworker.py NAME ARGUMENTS`, its description wrapped as --help's are."""
    return argparse.ArgumentParser(prog="vastworker.py " + name, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   usage="vastworker.py %s %s" % (name, arguments),
                                   description=wrapped(description, 0, 90))


def make_fleet_parser():
    parser = subcommand_parser(
        "fleet", "BACKEND [--workers N] [--port P] [--host H] [worker options]",
        "A local fleet, as Vast runs one: the autoscaler stand-in on P and N workers of BACKEND on free ports, "
        "reporting to it, signed grants required.  Options it does not know go to each worker (see vastworker.py "
        "--help).  Ctrl-C or SIGTERM stops them all.")
    parser.add_argument("backend", metavar="BACKEND", help="as for vastworker.py")
    parser.add_argument("--workers", type=positive_int_option, default=2, metavar="N", help="workers (default 2)")
    parser.add_argument("--port", type=int, default=8081, metavar="P", help="the stand-in's port (default 8081)")
    parser.add_argument("--host", default="127.0.0.1", metavar="H",
                        help="where they all listen (default 127.0.0.1: this machine only)")
    return parser


def make_doctor_parser():
    parser = subcommand_parser(
        "doctor", "BACKEND --endpoint NAME [--api-key KEY] [--wait S] [worker options]",
        "Run in the worker's own environment (REPORT_ADDR, MASTER_TOKEN, PUBLIC_IPADDR, VAST_TCP_PORT_*, "
        "MODEL_SERVER_URL and its options), it checks what the worker needs, one line each, and exits 0 only when "
        "all hold: the worker's start-up checks, its port, the model server, the autoscaler and the clock; then, "
        "with the worker started briefly on its port, its status reports, live grants from /route/ in each "
        "signed-message shape (g4, g3, g1), and its public URL.")
    parser.add_argument("--endpoint", required=True, metavar="NAME", help="the endpoint whose grants to take")
    parser.add_argument("--api-key", metavar="KEY", help="the endpoint's API key, where /route/ needs one")
    parser.add_argument("--wait", type=float, default=120.0, metavar="S",
                        help="how long the worker may take to load (default 120 s)")
    return parser


def positive_int_option(text):
    try:
        return positive_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("%r %s" % (text, exc))


def settings_help():
    """--help's epilog: the variables without a flag, and backend.py's attributes."""
    lines = ["environment variables (and those of the options above):"]
    for setting in SETTINGS:
        if setting.env and not setting.flag:
            lines.append("  %-28s %s" % (setting.variables()[1:], wrapped(setting.doc + (
                "" if setting.reader == "vastworker.py" else " [%s]" % setting.reader), 31)))
    lines += ["", "backend.py may declare (see README.md):"]
    lines += ["  %-28s %s" % (setting.attribute, wrapped(setting.doc, 31)) for setting in SETTINGS if setting.attribute]
    return "\n".join(lines) + "\n\n" + BACKENDS_HELP


def wrapped(text, indent, width=100):
    """`text` in lines of at most `width` characters, all but the first indented."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width - indent:
            lines.append(line)
            line = word
        else:
            line = line + " " + word if line else word
    return ("\n" + " " * indent).join(lines + [line])


def settings_table():
    """The table of every setting in docs/settings.md, in Markdown."""
    rows = ["| setting | flag | variable | `backend.py` | default | read by | meaning |",
            "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        cells = [setting.name, setting.flag, setting.variables(), setting.attribute,
                 None if setting.default in (None, False, "") else setting.default]
        rows.append("| %s | %s | %s |" % (" | ".join("`%s`" % cell if cell else "" for cell in cells),
                                          setting.reader, setting.doc.replace("|", "\\|")))
    return "\n".join(rows)


BACKENDS_HELP = """\
backends:
  BACKEND is a directory name under backends/ next to this file (e.g. helloworld), or a path
  to any directory holding a backend.py.  backend.py defines Backend, its handlers and
  flask_dict = {"POST": {"increment": increment_handler}, "GET": {"value": value_handler}}.
  Handler calls are serialised by a lock unless it sets allow_parallel_requests = True.

  python3 vastworker.py autoscaler [--port P]  runs a local stand-in for Vast's autoscaler
  (default port 8081) that prints the status records workers send it.
  python3 vastworker.py fleet BACKEND --workers N  runs the stand-in and N workers.
  python3 vastworker.py doctor BACKEND --endpoint NAME  checks a worker's set-up, one line a
  check (the autoscaler, live grants, the public URL, the model server ...).
"""


class Settings:
    """The worker's settings, resolved once: an attribute per setting read by vastworker.py,
    and `source`, where each came from.  A flag wins over a variable, a variable over a
    backend.py attribute (add_backend()), that over the default; every value passes its check."""

    def __init__(self, options, environ):
        self.backend, self.environ = options.backend, environ
        self.source = {}
        for setting in SETTINGS:
            if setting.reader == "vastworker.py" and not setting.attribute:
                given = getattr(options, setting.name, None) if setting.flag else None
                self._take(setting, "true" if given is True else given, setting.flag)  # True: a switch given
        if getattr(options, "cache_dir", None) is None:
            base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            self.cache_dir = os.path.join(base, "vastworker")

    def _take(self, setting, given, source):
        """`setting` from `given` (given as `source`), else from its variables, else its default;
        checked (a default given as a value already is one)."""
        if given is None:
            name = next((name for name in setting.env if self.environ.get(name)), None)
            given, source = (self.environ[name], "$" + name) if name else (setting.default, "default")
        if given is not None and (source != "default" or isinstance(given, str)):
            given = setting.parsed(given, source)
        setattr(self, setting.name, given)
        self.source[setting.name] = source

    def add_backend(self, module, path):
        """The settings backend.py may declare, unless a variable gave them; StartupError names
        the first bad one."""
        for setting in SETTINGS:
            if setting.attribute:
                declared = None if any(self.environ.get(name) for name in setting.env) else getattr(
                    module, setting.attribute, None)  # a variable wins over the attribute
                self._take(setting, declared, "%s: %s" % (path, setting.attribute))


class Setting:
    """One setting, wherever it may be given: a command-line flag, environment variables, a
    backend.py attribute (each where it has one); its default, the check a value must pass
    (text -> value, ValueError saying what is wrong), a line of help, and who reads it:
    vastworker.py, or -- listed here all the same, so one table documents everything -- a
    backend or start_server.sh.  Settings.resolve() decides which source wins."""

    def __init__(self, name, doc, default=None, check=None, flag=None, env=(), attribute=None,
                 reader="vastworker.py", metavar=None):
        self.name, self.doc, self.default, self.check = name, doc, default, check
        self.flag, self.env, self.attribute = flag, tuple(env), attribute
        self.reader, self.metavar = reader, metavar

    def parsed(self, text, source):
        """The value of `text` (or of a backend.py attribute) given as `source`; StartupError
        says what is wrong with it."""
        try:
            return text if self.check is None else self.check(text)
        except (ValueError, TypeError) as exc:
            raise StartupError("%s=%r %s" % (source, text, exc))

    def variables(self):
        """Its variables as a user sets them: "$WORKER_PORT, $AUTH_PORT", "$UNSECURED=true"."""
        return ", ".join("$" + name + ("=true" if self.check is switch else "") for name in self.env)

    def add_to(self, parser, default=None, variables=True):
        """This setting's option, with its default (or `default`) and variables in its help."""
        default = self.default if default is None else default
        notes = ["or " + self.variables()] if self.env and variables else []
        notes += ["default %s" % default] if default not in (None, False) else []
        help = self.doc.replace("%", "%%") + (" (%s)" % "; ".join(notes) if notes else "")
        if self.check is switch:
            parser.add_argument(self.flag, action="store_true", default=None, help=help)
        else:
            parser.add_argument(self.flag, metavar=self.metavar, help=help, default=None,
                                choices=getattr(self.check, "choices", None))


def one_of(*choices):
    def check(text):
        if text not in choices:
            raise ValueError("is not one of %s" % ", ".join(choices))
        return text
    check.choices = choices
    return check


def byte_size(text):
    """'64M' -> 67108864; plain numbers are bytes."""
    match = re.match(r"^\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*$", text)
    if not match:
        raise ValueError("is not a size like 1048576, 512K or 64M")
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")


def positive_number(value):
    """A positive, finite number, from a flag's or variable's text or a backend.py attribute
    (not a bool, not inf: a status record must stay JSON)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not (is_number(value) and value > 0):
        raise ValueError("is not a positive, finite number")
    return float(value)


def positive_int(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError("is not a positive whole number")
    return int(text)


def port_number(text):
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError("is not a port number (0-65535)")
    return int(text)


def switch(text):
    """A variable that turns something on: 1, true or yes (any case); anything else is off."""
    return text.strip().lower() in ("1", "true", "yes")


def http_url(value):
    if not (isinstance(value, str) and value.startswith(("http://", "https://"))):
        raise ValueError("must be an http:// or https:// URL")
    return value


# Every setting there is, in one table: parsing, which source wins, --help and docs/settings.md
# all come from it, and a test checks that nothing read anywhere is missing from it.
SETTINGS = (
    # the listening socket and its limits
    Setting("host", "address to listen on; 0.0.0.0 is all of this machine's", "0.0.0.0", flag="--host"),
    Setting("port", "port to listen on; 0 picks a free one", DEFAULT_PORT, port_number, "--port",
            ("WORKER_PORT", "AUTH_PORT")),
    Setting("max_body", "largest request body; a larger one gets 413 before it is read", "64M", byte_size,
            "--max-body", metavar="SIZE"),
    Setting("body_memory", "request bodies held in memory at once, over all connections; a request whose "
            "body would pass it gets 503 with Retry-After before it is read (at least --max-body)", "256M",
            byte_size, "--body-memory", metavar="SIZE"),
    Setting("timeout", "seconds a connection may stay idle or take to send its request headers; a body "
            "may take this long plus 1 s per %d bytes" % MIN_BODY_RATE, 30, positive_number, "--timeout",
            metavar="SECONDS"),
    Setting("queue_time", "seconds a request may wait for the backend lock before it gets 429; with a "
            "known max_perf, one whose predicted wait is longer gets 429 at once", 30, positive_number,
            "--queue-time", metavar="SECONDS"),
    Setting("max_connections", "open connections at most; past it the one making the least progress "
            "gives way, or, when all are being served, a new one gets 503", 1024, positive_int,
            "--max-connections", metavar="N"),
    Setting("max_sessions", "Vast sessions open at once; past it /session/create gets 429", 10, positive_int,
            "--max-sessions", metavar="N"),
    Setting("max_session_lifetime", "the longest lifetime in seconds a session may ask for (longer gets "
            "422), and how far ahead its requests may extend it", 3600, positive_number,
            "--max-session-lifetime", metavar="SECONDS"),
    Setting("grace", "on SIGTERM or SIGINT, seconds in-flight requests may take to finish", 10,
            positive_number, "--grace", metavar="SECONDS"),
    # signed grants and HTTPS
    Setting("pubkey", "the autoscaler's RSA public key (PEM file) for checking signed grants; without it "
            "and $VASTWORKER_PUBKEY the key comes from {REPORT_ADDR}/pubkey/", flag="--pubkey",
            metavar="FILE"),
    Setting("pubkey_pem", "the autoscaler's public key as PEM text, instead of --pubkey",
            env=["VASTWORKER_PUBKEY"]),
    Setting("grant_shape", "the signed-message shape grants use: g4 (url only, Vast's current), g3 (all "
            "fields, sorted), g1 (the original's four); auto tries each", "auto", one_of(*GRANT_SHAPES),
            "--grant-shape"),
    Setting("allow_unsigned", "serve requests without a grant even when a key is configured; grants that "
            "are present are still checked", False, switch, "--allow-unsigned", ["UNSECURED"]),
    Setting("certfile", "serve HTTPS with this certificate (PEM)", flag="--certfile", metavar="FILE"),
    Setting("keyfile", "the certificate's private key, if not in the certificate file", flag="--keyfile",
            metavar="FILE"),
    Setting("use_ssl", "serve HTTPS with Vast's instance certificate, /etc/instance.crt and .key", False,
            switch, env=["USE_SSL"]),
    # the autoscaler
    Setting("report_addr", "autoscaler address(es), comma-separated, tried in order: status reports go to "
            "{address}/worker_status/; also Backend(control_server_url=...)", env=["REPORT_ADDR"]),
    Setting("container_id", "instance id: the reports' id, and Backend(container_id=...)", "",
            env=["CONTAINER_ID"]),
    Setting("master_token", "shared secret: the reports' mtoken, the key to the internal /report_* "
            "endpoints (off without it), and Backend(master_token=...)", "", env=["MASTER_TOKEN"]),
    Setting("public_ipaddr", "the public address reported as url, with $VAST_TCP_PORT_<port>",
            env=["PUBLIC_IPADDR"]),
    Setting("update_flag", "a file whose presence makes start_server.sh fetch the project again; "
            "/report_update creates it", "/.force_update", env=["VASTWORKER_UPDATE_FLAG"]),
    # state, readiness, the log
    Setting("state_file", "keep the Backend's state (its public JSON-able attributes, or those named in "
            "persist) in FILE: restored at start, saved before each answer that changed it",
            flag="--state-file", env=["STATE_FILE"], metavar="FILE"),
    Setting("cache_dir", "where the benchmark result is cached (never the project, which an update "
            "replaces)", "$XDG_CACHE_HOME/vastworker, else ~/.cache/vastworker", flag="--cache-dir",
            metavar="DIR"),
    Setting("ready_file", "once serving, write this process's pid to FILE: how start_server.sh knows that "
            "its own worker is up, not another program on the port", flag="--ready-file", metavar="FILE"),
    Setting("log_level", "info logs one line per request; warning and error only problems, and the lines "
            "saying the worker serves and has stopped; debug adds tracebacks of start-up failures", "info",
            one_of(*sorted(Log.LEVELS, key=Log.LEVELS.get)), "--log-level"),
    Setting("quiet", "same as --log-level warning", False, switch, "--quiet"),
    Setting("time_scale", "multiplies the worker's own waits (between status reports and their retries, health "
            "and key polls, session sweeps, the stand-in's 30 s patience): 0.1 makes them ten times shorter, "
            "for tests", 1, positive_number, env=["VASTWORKER_TIME_SCALE"]),
    # what backend.py declares
    Setting("allow_parallel_requests", "True: handlers do their own locking and run in parallel",
            False, bool, attribute="allow_parallel_requests"),
    Setting("readiness", "when the worker is loaded: start (Backend() returned), log (a log_actions "
            "loaded line), call (vastworker.ready()), health (the healthcheck URL answers 200)", "start",
            one_of("start", "log", "call", "health"), attribute="readiness"),
    Setting("log_actions", 'substrings watched for in the model log: {"loaded": [...], "error": [...], '
            '"info": [...]}', attribute="log_actions"),
    Setting("model_log", "the model server's log, watched for the backend's log_actions", env=["MODEL_LOG"],
            attribute="model_log"),
    Setting("healthcheck", "the model server's health URL: loaded only after a 200, failed on a later "
            "non-200", check=http_url, env=["MODEL_HEALTH_ENDPOINT"], attribute="healthcheck"),
    Setting("benchmark", 'requests that measure max_perf once loaded: {"endpoint": ..., "payload": ...}, '
            "or def benchmark(backend, smaller) making one then (sized to the model server; smaller is 1, 2, 3 "
            "after a 4xx answer to the warm-up)", attribute="benchmark"),
    Setting("error_body", "def error_body(status, message): the JSON object the worker's own refusals on the "
            'backend\'s routes answer with (default: {"error": phrase, "detail": message})',
            attribute="error_body"),
    Setting("workload", "def workload(backend, request): a request's workload (default: its grant's cost, "
            "else 100)", attribute="workload"),
    Setting("max_perf", "workload per second, without a benchmark (also read from the Backend)",
            DEFAULT_MAX_PERF, positive_number, attribute="max_perf"),
    Setting("persist", "the Backend attributes --state-file keeps (default: its public JSON-able ones)",
            attribute="persist"),
    # read by the shipped backends
    Setting("model_server_url", "the model server fronted (openai :8000, tgi :3000, comfyui :8188)",
            env=["MODEL_SERVER_URL"], reader="backends"),
    Setting("model_name", "openai: the model a request without one gets", env=["MODEL_NAME"],
            reader="backends"),
    Setting("benchmark_max_tokens", "openai, tgi: tokens per benchmark request (256, 128)",
            env=["BENCHMARK_MAX_TOKENS"], reader="backends"),
    Setting("comfyui_checkpoint", "comfyui: the checkpoint its benchmark workflow loads",
            "v1-5-pruned-emaonly.safetensors", env=["COMFYUI_CHECKPOINT"], reader="backends"),
    Setting("comfyui_benchmark_workflow", "comfyui: a workflow (API JSON file) to benchmark with instead",
            env=["COMFYUI_BENCHMARK_WORKFLOW"], reader="backends"),
    # read by start_server.sh and the launch.sh scripts
    Setting("workspace", "where the project, vastworker.log and vastworker.pid live; the worker runs there",
            "/home/workspace on Vast (CONTAINER_ID set), else ~/.local/state/vastworker", env=["WORKSPACE"],
            reader="start_server.sh"),
    Setting("model_command", "the command start_server.sh starts the model server with",
            env=["MODEL_COMMAND"], reader="start_server.sh"),
    Setting("script_url", "URL of your copy's start_server.sh (read by launch.sh)",
            env=["VASTWORKER_SCRIPT_URL"], reader="start_server.sh"),
    Setting("tarball", "a .tar.gz of the project to fetch", env=["VASTWORKER_TARBALL"], reader="start_server.sh"),
    Setting("repo", "or anything git clone accepts", env=["VASTWORKER_REPO"], reader="start_server.sh"),
    Setting("update", "1: fetch the project again even though it is there", env=["VASTWORKER_UPDATE"],
            reader="start_server.sh"),
    Setting("wait", "seconds to wait for the worker to serve (or load)", "60", env=["VASTWORKER_WAIT"],
            reader="start_server.sh"),
    Setting("wait_for", "what start_server.sh waits for: serving (the worker answers), or loaded (its model is "
            "too; a failure to load is then its exit status 1)", "serving", env=["VASTWORKER_WAIT_FOR"],
            reader="start_server.sh"),
    Setting("comfyui_dir", "comfyui's launch.sh: a ComfyUI checkout to start when MODEL_COMMAND is unset",
            env=["COMFYUI_DIR"], reader="start_server.sh"),
    Setting("model_id", "tgi's launch.sh: the model TGI serves when MODEL_COMMAND is unset", env=["MODEL_ID"],
            reader="start_server.sh"),
)


if __name__ == "__main__":
    sys.exit(main())
