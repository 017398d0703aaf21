#!/usr/bin/env python3
"""Latency and throughput of `print(1)` through POST /submit_code, against raw
`python3 -c 'print(1)'` spawns measured in the same run on the same machine.

Usage: bench/submit_latency.py [--runs N] [--gap-ms MS] [--binary PATH] [--backend bwrap|process]
Starts its own daemon on a free port (release build by default) and stops it after.
Prints p50/p95 at concurrency 1, throughput at concurrency 2 x cores, and the ratios
against the targets: p50 under raw + 8 ms, throughput at least 75 % of raw spawns.
At concurrency 1 both series pause --gap-ms between runs (default 50): after answering, a
slot prepares its next sandbox (and warms its interpreter) in the background, and that
work should not land on the next measurement of either series.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"  # the interpreter the sandbox runs, not a shim on PATH


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def raw_once():
    t = time.perf_counter()
    subprocess.run([PYTHON, "-c", "print(1)"], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def submit_once(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.perf_counter()
    conn.request("POST", "/submit_code", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - t
    conn.close()
    if resp.status != 200 or json.loads(data)["output"] != "1\n":
        raise RuntimeError(f"unexpected answer {resp.status}: {data[:200]!r}")
    return elapsed


def throughput(fn, workers, total):
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: fn(), range(total)))
    return total / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=50)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/mixed-docker-executor"))
    ap.add_argument("--backend", default="bwrap")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    workers = 2 * cores

    port = free_port()
    env = dict(os.environ, MDE_SERVER__PORT=str(port), MDE_SANDBOX__BACKEND=args.backend,
               MDE_RUNTIMES__WATCH="false", MDE_SERVER__LOG_LEVEL="warn",
               MDE_EXECUTION__MAX_CONCURRENT=str(workers), RUST_LOG="warn")
    daemon = subprocess.Popen([args.binary], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or daemon.poll() is not None:
                sys.exit("daemon did not start")
            time.sleep(0.1)
        body = json.dumps({"code": "print(1)"})
        for _ in range(10):  # warm both paths (page cache, first sandbox set-up)
            raw_once()
            submit_once(port, body)

        # Interleave so that machine noise hits both series alike.
        raw, sub = [], []
        for _ in range(args.runs):
            raw.append(raw_once())
            time.sleep(args.gap_ms / 1000)
            sub.append(submit_once(port, body))
            time.sleep(args.gap_ms / 1000)
        total = max(args.runs, 100)
        raw_tp = throughput(raw_once, workers, total)
        sub_tp = throughput(lambda: submit_once(port, body), workers, total)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)

    ms = lambda s: s * 1000
    r50, r95, s50, s95 = ms(pct(raw, 50)), ms(pct(raw, 95)), ms(pct(sub, 50)), ms(pct(sub, 95))
    print(f"machine: {cores} cores; runs: {args.runs} ({args.gap_ms:g} ms apart); backend: {args.backend}; concurrency for throughput: {workers}")
    print(f"{'':28}{'p50 ms':>10}{'p95 ms':>10}{'runs/s':>10}")
    print(f"{'raw python3 -c print(1)':28}{r50:10.1f}{r95:10.1f}{raw_tp:10.1f}")
    print(f"{'POST /submit_code':28}{s50:10.1f}{s95:10.1f}{sub_tp:10.1f}")
    print(f"overhead p50: {s50 - r50:+.1f} ms (target < +8 ms: {'met' if s50 - r50 < 8 else 'NOT met'})")
    print(f"latency ratio p50: {s50 / r50:.2f}x; p95: {s95 / r95:.2f}x")
    print(f"throughput ratio: {sub_tp / raw_tp:.2f} (target >= 0.75: {'met' if sub_tp / raw_tp >= 0.75 else 'NOT met'})")


if __name__ == "__main__":
    main()
