"""Routing benchmark: a local fleet of workers with an endpoint whose requests are mostly short
and sometimes long, and many concurrent clients, each routing a request and then calling the
worker it was given.  Three ways of choosing the worker, measured in the same run on the same
fleet:

  predicted wait  the stand-in's /route/: reported cur_load plus the grants issued since, over max_perf
  last reports    what the stand-in did before: the least cur_load / max_perf of the last reports
  round robin     each worker in turn, ignoring load

For each: requests served, p50 and p99 latency (route + call, as a client sees it), and each
worker's share.  Standard library only.

    python3 bench/route_bench.py [--workers 4] [--clients 64] [--seconds 10]
"""

import argparse
import collections
import http.client
import itertools
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import JSON, WorkerProcess, free_port, wait_until  # noqa: E402

# One request in ten is long (0.2 s), the rest short (0.01 s); a client says which in its cost,
# as Vast's SDK clients do (the workload of the request).  Handlers run one at a time per worker.
BACKEND = """
import time

class Backend:
    pass

def work(backend, request):
    time.sleep(request.json["seconds"])
    return "done"

max_perf = 1000  # workload a second: 0.01 s of work is 10, 0.2 s is 200
flask_dict = {"POST": {"work": work}}
"""
SHORT, LONG = 0.01, 0.2


class Connections(threading.local):
    """One keep-alive connection per (thread, port), as a client library keeps them."""

    def get(self, port):
        pool = self.__dict__.setdefault("pool", {})
        if port not in pool:
            pool[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        return pool[port]


def exchange(connections, port, method, path, payload):
    connection = connections.get(port)
    try:
        connection.request(method, path, body=json.dumps(payload), headers=JSON)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        connection.close()
        raise


class Fleet:
    def __init__(self, directory, workers):
        self.stand_in = WorkerProcess("autoscaler", "--log-level", "warning", env={"MASTER_TOKEN": "bench"})
        self.stand_in.wait_ready()
        self.ports, self.workers = [], []
        for number in range(1, workers + 1):
            port = free_port()
            self.ports.append(port)
            self.workers.append(WorkerProcess(directory, "--log-level", "warning", port=str(port), env={
                "REPORT_ADDR": "http://127.0.0.1:%d" % self.stand_in.port, "MASTER_TOKEN": "bench",
                "CONTAINER_ID": str(number), "PUBLIC_IPADDR": "127.0.0.1", "UNSECURED": "true",
                "VAST_TCP_PORT_%d" % port: str(port)}).wait_ready())
        wait_until(lambda: len([w for w in self.listed() if w["status"] == "RUNNING"]) == workers, timeout=30)

    def listed(self):
        return self.stand_in.json("POST", "/get_endpoint_workers/", {"id": 1})[1]

    def stop(self):
        for process in self.workers + [self.stand_in]:
            process.stop()


def run(fleet, policy, clients, seconds):
    """(latencies in seconds, requests per port) of `clients` clients for `seconds`."""
    connections, turn, lock = Connections(), itertools.count(), threading.Lock()
    latencies, shares, stop = [], collections.Counter(), time.monotonic() + seconds
    by_id = {number: port for number, port in enumerate(fleet.ports, 1)}

    def choose(cost):
        if policy == "predicted wait":
            status, body = exchange(connections, fleet.stand_in.port, "POST", "/route/",
                                    {"endpoint": "work", "cost": cost})
            grant = json.loads(body)
            return int(grant["url"].rsplit(":", 1)[1]), grant
        if policy == "last reports":
            status, body = exchange(connections, fleet.stand_in.port, "POST", "/get_endpoint_workers/", {"id": 1})
            least = min((w for w in json.loads(body) if w["status"] == "RUNNING"),
                        key=lambda w: w["cur_load"] / max(w["perf"], 1e-6))
            return by_id[least["id"]], None
        return fleet.ports[next(turn) % len(fleet.ports)], None

    def client(index):
        for number in itertools.count(index):
            if time.monotonic() > stop:
                return
            seconds_of_work = LONG if number % 10 == 0 else SHORT
            started = time.monotonic()
            port, grant = choose(seconds_of_work * 1000)
            payload = {"seconds": seconds_of_work}
            body = {"auth_data": grant, "payload": payload} if grant else payload
            status, _ = exchange(connections, port, "POST", "/work", body)
            took = time.monotonic() - started
            with lock:
                if status == 200:
                    latencies.append(took)
                    shares[port] += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(latencies), shares


def percentile(ordered, fraction):
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)] if ordered else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    options = parser.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "backend.py"), "w") as file:
            file.write(BACKEND)
        fleet = Fleet(directory, options.workers)
        try:
            print("%d workers (one handler at a time each), %d clients, %g s per policy; 1 request in 10 "
                  "takes %g s, the rest %g s\n" % (options.workers, options.clients, options.seconds, LONG, SHORT))
            print("| routing | requests | req/s | p50 | p99 | each worker's share |")
            print("|---|---:|---:|---:|---:|---|")
            for policy in ("predicted wait", "last reports", "round robin"):
                latencies, shares = run(fleet, policy, options.clients, options.seconds)
                total = sum(shares.values())
                print("| %s | %d | %.0f | %.0f ms | %.0f ms | %s |" % (
                    policy, total, total / options.seconds, percentile(latencies, 0.5) * 1000,
                    percentile(latencies, 0.99) * 1000,
                    " / ".join("%.0f%%" % (100.0 * shares[port] / max(total, 1)) for port in fleet.ports)), flush=True)
                time.sleep(1.0)  # the fleet drains between policies
        finally:
            fleet.stop()


if __name__ == "__main__":
    main()
