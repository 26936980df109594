"""What /metrics costs: GET /value at 16 connections (wrk) against helloworld with the per-request
statistics recorded, as always, and with their recording stubbed out, alternating the two for
several rounds in the same run (the worker on one core, wrk on the other).  Standard library
and wrk only.

    python3 bench/metrics_cost.py [--rounds 6] [--seconds 3]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, free_port, stop_process, wait_until, http_status  # noqa: E402

# The worker as `python3 vastworker.py helloworld` runs it, but for RequestStats.answer, which
# records each answer for /metrics: stubbed out, so the difference is its cost.
UNRECORDED = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import vastworker
vastworker.RequestStats.answer = lambda self, *args: None
sys.argv[0] = vastworker.__file__
vastworker.main()
"""


def rate(recorded, seconds):
    port = free_port()
    args = ["helloworld", "--host", "127.0.0.1", "--port", str(port)]
    command = [sys.executable, "-I", "-S", os.path.join(ROOT, "vastworker.py")] + args if recorded else \
        [sys.executable, "-I", "-S", "-c", UNRECORDED, ROOT] + args
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() > 1 else []
    proc = subprocess.Popen(taskset + command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_status(port, "/value") == 200, timeout=20)
        load = (["taskset", "-c", "1"] if taskset else []) + ["wrk", "-t1", "-c16", "-d%ds" % seconds,
                                                                  "http://127.0.0.1:%d/value" % port]
        subprocess.run(load[:-2] + ["-d1s", load[-1]], capture_output=True)  # warm-up
        output = subprocess.run(load, capture_output=True, text=True).stdout
        return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    finally:
        stop_process(proc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=3)
    options = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("metrics_cost: wrk is needed (apt-get install wrk)")
    rates = {True: [], False: []}
    for round_number in range(options.rounds):
        for recorded in (False, True):
            rates[recorded].append(rate(recorded, options.seconds))
        print("round %d: %.0f req/s unrecorded, %.0f recorded" % (round_number + 1, rates[False][-1], rates[True][-1]),
              flush=True)
    without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
    print("GET /value c16, median of %d: %.0f req/s without recording, %.0f with: metrics cost %.1f%%"
          % (options.rounds, without, with_, 100.0 * (without - with_) / without))


if __name__ == "__main__":
    main()
