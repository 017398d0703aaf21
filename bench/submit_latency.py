#!/usr/bin/env python3
"""Latency, throughput, CPU and memory of `print(1)` through POST /submit_code, against
raw `python3 -c 'print(1)'` spawns measured in the same run on the same machine.

Usage: bench/submit_latency.py [--runs N] [--gap-ms MS] [--binary PATH] [--modes zygote,warm]
Starts its own daemon per mode on a free port (release build by default) and stops it after:
`zygote` is the shipped configuration (python3 forked from a zygote per slot), `warm` the
same with `sandbox.zygotes = false` (a warm interpreter in a fresh sandbox per run).
Prints for each: p50/p95 at concurrency 1, throughput at concurrency 2 x cores, CPU per
run (the daemon's own, plus everything in its slots' cgroups: launchers, sandboxes,
zygotes, runs) and idle memory per slot, with the ratios against raw spawns and the
targets: throughput at least 2.0x raw, p50 at most 0.5x raw.
At concurrency 1 both series pause --gap-ms between runs (default 50): after answering, a
slot prepares its next sandbox in the background, and that work should not land on the
next measurement of either series.
"""
import argparse
import concurrent.futures
import glob
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
TICK = os.sysconf("SC_CLK_TCK")


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


def own_cpu(pid):
    """CPU seconds `pid` has used itself (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def slot_cgroups(daemon_pid, controller):
    """The daemon's slot cgroups under `controller` (v1) or the unified tree (v2), found
    from the cgroups of its children (the slot launchers)."""
    dirs = set()
    for task in glob.glob(f"/proc/{daemon_pid}/task/*/children"):
        for child in open(task).read().split():
            try:
                lines = open(f"/proc/{child}/cgroup").read().splitlines()
            except OSError:
                continue
            for line in lines:
                _, ctrls, path = line.split(":", 2)
                if controller in ctrls.split(",") or (ctrls == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers")):
                    base = f"/sys/fs/cgroup/{ctrls}" if ctrls else "/sys/fs/cgroup"
                    dirs.add(base + path)
    return sorted(dirs)


def slots_cpu(dirs):
    total = 0.0
    for d in dirs:
        if os.path.exists(f"{d}/cpuacct.usage"):
            total += int(open(f"{d}/cpuacct.usage").read()) / 1e9
        elif os.path.exists(f"{d}/cpu.stat"):
            stat = dict(l.split() for l in open(f"{d}/cpu.stat"))
            total += int(stat["usage_usec"]) / 1e6
    return total


def slots_memory(dirs):
    used = []
    for d in dirs:
        for name in ("memory.usage_in_bytes", "memory.current"):
            if os.path.exists(f"{d}/{name}"):
                used.append(int(open(f"{d}/{name}").read()))
    return used


def start_daemon(binary, mode, workers):
    port = free_port()
    env = dict(os.environ, MDE_SERVER__PORT=str(port), MDE_RUNTIMES__WATCH="false",
               MDE_SERVER__LOG_LEVEL="warn", MDE_EXECUTION__MAX_CONCURRENT=str(workers),
               MDE_SANDBOX__ZYGOTES="true" if mode == "zygote" else "false", RUST_LOG="warn")
    daemon = subprocess.Popen([binary], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            health = json.loads(c.getresponse().read())
            break
        except (OSError, ValueError):
            pass
        if time.time() > deadline or daemon.poll() is not None:
            sys.exit("daemon did not start")
        time.sleep(0.1)
    return daemon, port, health


def measure(args, mode, workers, raw_lat):
    daemon, port, health = start_daemon(args.binary, mode, workers)
    try:
        body = json.dumps({"code": "print(1)"})
        for _ in range(10):  # warm both paths (page cache, first sandbox set-up)
            submit_once(port, body)
        time.sleep(1)
        memory = slots_memory(slot_cgroups(daemon.pid, "memory"))
        # Interleave with raw spawns so that machine noise hits both series alike.
        lat = []
        for _ in range(args.runs):
            raw_lat.append(raw_once())
            time.sleep(args.gap_ms / 1000)
            lat.append(submit_once(port, body))
            time.sleep(args.gap_ms / 1000)
        total = max(args.runs, 100)
        cpu_dirs = slot_cgroups(daemon.pid, "cpuacct")
        own0, slots0 = own_cpu(daemon.pid), slots_cpu(cpu_dirs)
        tp = throughput(lambda: submit_once(port, body), workers, total)
        time.sleep(0.5)  # the last slots settle and prepare their next sandbox
        own1, slots1 = own_cpu(daemon.pid), slots_cpu(cpu_dirs)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
    return {
        "lat": lat, "tp": tp, "daemon_cpu": (own1 - own0) / total,
        "slots_cpu": (slots1 - slots0) / total, "memory": memory,
        "zygotes": health.get("zygote_runtimes", []),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=50)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/mixed-docker-executor"))
    ap.add_argument("--modes", default="zygote,warm")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    workers = 2 * cores
    for _ in range(10):
        raw_once()
    raw_lat = []
    results = {mode: measure(args, mode, workers, raw_lat) for mode in args.modes.split(",")}
    total = max(args.runs, 100)
    t0 = os.times()
    raw_tp = throughput(raw_once, workers, total)
    t1 = os.times()
    raw_cpu = (t1.children_user + t1.children_system - t0.children_user - t0.children_system) / total

    ms = lambda s: s * 1000
    r50, r95 = ms(pct(raw_lat, 50)), ms(pct(raw_lat, 95))
    print(f"machine: {cores} cores; runs: {args.runs} per mode ({args.gap_ms:g} ms apart); "
          f"slots and concurrency for throughput: {workers}")
    print(f"{'':30}{'p50 ms':>9}{'p95 ms':>9}{'runs/s':>9}{'CPU ms/run':>12}{'  (daemon + slots)':<22}{'idle MiB/slot':>14}")
    print(f"{'raw python3 -c print(1)':30}{r50:9.1f}{r95:9.1f}{raw_tp:9.1f}{ms(raw_cpu):12.2f}")
    for mode, r in results.items():
        s50, s95 = ms(pct(r["lat"], 50)), ms(pct(r["lat"], 95))
        cpu = r["daemon_cpu"] + r["slots_cpu"]
        mem = statistics.mean(r["memory"]) / 2**20 if r["memory"] else float("nan")
        label = f"/submit_code, {mode}"
        split = "  ({:.2f} + {:.2f})".format(ms(r["daemon_cpu"]), ms(r["slots_cpu"]))
        print(f"{label:30}{s50:9.1f}{s95:9.1f}{r['tp']:9.1f}{ms(cpu):12.2f}{split:<22}{mem:14.1f}")
    for mode, r in results.items():
        s50 = ms(pct(r["lat"], 50))
        tp_ratio, lat_ratio = r["tp"] / raw_tp, s50 / r50
        cpu = r["daemon_cpu"] + r["slots_cpu"]
        print(f"{mode}: throughput {tp_ratio:.2f}x raw (target >= 2.0: {'met' if tp_ratio >= 2 else 'NOT met'}); "
              f"p50 {lat_ratio:.2f}x raw (target <= 0.5: {'met' if lat_ratio <= 0.5 else 'NOT met'}); "
              f"CPU per run {cpu / raw_cpu:.2f}x a raw start; zygote runtimes: {', '.join(r['zygotes']) or 'none'}")


if __name__ == "__main__":
    main()
