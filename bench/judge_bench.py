#!/usr/bin/env python3
"""Judge workloads: a C++ submission with 20 tests as one batch against 20 single requests,
and each compiled language's submission twice (compile cache cold, then hot).

Usage: bench/judge_bench.py [--rounds N] [--binary PATH]
Starts its own daemons (release build by default) on free ports, each with its own work
root, and stops them after. Every figure is measured in this run, baselines included:

1. Batch against singles, on a daemon with the compile cache off (so the singles are
   today's behaviour: one compile per request): wall time and CPU-seconds of one batch of
   20 tests, and of the same 20 tests sent as 20 single requests (two at a time, as many
   as the daemon has slots). CPU is the daemon's own (utime + stime) plus its cgroup
   tree's (`cpuacct.usage`: every slot, launcher and sandbox). Each round uses a program
   no earlier round compiled. Target: the batch uses at most 1/5 of the singles' CPU.
   The same 20 singles on a daemon with the cache on are shown for comparison.
2. Cold against hot, per compiled language: p50 latency of a program the cache has not
   seen (cold: it compiles), of the same program again (hot: a cache hit), and of the run
   stage alone: the same binary or class file sent to a runtime without a compile stage
   (C, C++, Rust through the dynamic loader, Java as a class file; Go's binary is static,
   so for Go the run stage's own `wall_time_ms` stands in). Target: hot p50 within 1.5x
   of the run stage alone.
"""
import argparse
import base64
import concurrent.futures
import glob
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")

CPP_TESTED = "#include <iostream>\nint main(){long n; std::cin>>n; std::cout<<n*2<<\"\\n\";}\n"

HELLO = {
    "c": ("main.c", "#include <stdio.h>\nint main(void){puts(\"hello\");return 0;}\n",
          ["gcc", "-O2", "-std=gnu17", "-pipe", "-o", "main", "main.c", "-lm"]),
    "cpp": ("main.cpp", "#include <iostream>\nint main(){std::cout<<\"hello\\n\";}\n",
            ["g++", "-O2", "-std=gnu++17", "-pipe", "-o", "main", "main.cpp"]),
    "java": ("Main.java", "class Main { public static void main(String[] a) { System.out.println(\"hello\"); } }\n",
             ["javac", "-encoding", "UTF-8", "-d", ".", "Main.java"]),
    "rust": ("main.rs", "fn main() { println!(\"hello\"); }\n",
             ["rustc", "-O", "--edition", "2021", "-o", "main", "main.rs"]),
    "go": ("main.go", "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello\") }\n", None),
}

# Runtimes without a compile stage that run what the host compiled: the run stage alone.
BENCH_RUNTIMES = """
[[runtime]]
name = "bench-elf"
language = "bench"
version = "0"
file_name = "main"
run = ["/lib64/ld-linux-x86-64.so.2", "./main"]

[[runtime]]
name = "bench-java"
language = "bench"
version = "0"
file_name = "Main.class"
run = ["java", "-XX:MaxRAM={memory_mb}m", "-Xmx{heap_mb}m", "-Xss64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", ".", "Main"]
ro_binds = ["/etc/java-17-openjdk"]
limits = { memory_bytes = 536870912 }
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, binary, runtimes, cache, uid_base):
        self.port = free_port()
        self.work = tempfile.mkdtemp(prefix="mde-bench-")
        os.chmod(self.work, 0o711)  # slot uids pass through it to their own dirs
        env = dict(os.environ, MDE_SERVER__PORT=str(self.port), MDE_RUNTIMES__WATCH="false",
                   MDE_RUNTIMES__FILE=runtimes, MDE_SERVER__LOG_LEVEL="warn", RUST_LOG="warn",
                   MDE_EXECUTION__WORK_ROOT=self.work, MDE_SANDBOX__UID_BASE=str(uid_base),
                   # the run-alone baselines send whole binaries (rustc: about 4 MiB)
                   MDE_SERVER__MAX_BODY_BYTES=str(32 << 20),
                   MDE_COMPILE_CACHE__ENABLED="true" if cache else "false")
        self.proc = subprocess.Popen([binary], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                self.proc.wait()
                shutil.rmtree(self.work, ignore_errors=True)
                sys.exit("daemon did not start")
            time.sleep(0.1)
        roots = glob.glob(os.path.join(self.work, "mde-*"))
        self.cgroup = None
        if roots:
            name = os.path.basename(roots[0])
            path = f"/sys/fs/cgroup/cpuacct/{name}/cpuacct.usage"
            if os.path.exists(path):
                self.cgroup = path

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / TICK
        tree = 0.0
        if self.cgroup:
            with open(self.cgroup) as f:
                tree = int(f.read()) / 1e9
        return own + tree

    def execute(self, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        t = time.perf_counter()
        conn.request("POST", "/api/v1/execute", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"unexpected answer {resp.status}: {data[:300]!r}")
        return elapsed, json.loads(data)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)


def measure(daemon, fn):
    cpu, wall = daemon.cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, daemon.cpu_seconds() - cpu


def tests_for(n=20):
    return [{"stdin": f"{i}\n", "expected_output": f"{i * 2}\n"} for i in range(n)]


def batch(daemon, code):
    _, answer = daemon.execute({"runtime": "cpp", "code": code, "tests": tests_for()})
    assert answer["summary"]["passed"] == 20, answer["summary"]


def singles(daemon, code):
    def one(test):
        _, answer = daemon.execute({"runtime": "cpp", "code": code, "stdin": test["stdin"],
                                    "expected_output": test["expected_output"]})
        assert answer.get("verdict") == "accepted", answer
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(one, tests_for()))


def host_build(lang, tmp):
    name, code, command = HELLO[lang]
    if command is None or shutil.which(command[0]) is None:
        return None
    d = os.path.join(tmp, lang)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(code)
    subprocess.run(command, cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = "Main.class" if lang == "java" else "main"
    if out == "main" and shutil.which("strip"):
        # Smaller to send (rustc's hello world is 4 MiB with symbols); runs the same.
        subprocess.run(["strip", "main"], cwd=d, check=True)
    with open(os.path.join(d, out), "rb") as f:
        return base64.b64encode(f.read()).decode()


def p50(values):
    return statistics.median(values) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/mixed-docker-executor"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mde-bench-src-")
    runtimes = os.path.join(tmp, "runtimes.toml")
    with open(os.path.join(ROOT, "runtimes.toml")) as f:
        text = f.read()
    with open(runtimes, "w") as f:
        f.write(text + BENCH_RUNTIMES)

    print(f"machine: {os.cpu_count()} cores; binary: {os.path.relpath(args.binary, ROOT)}")
    # 1. Batch against singles.
    off = Daemon(args.binary, runtimes, cache=False, uid_base=57800)
    try:
        if off.cgroup is None:
            print("note: no cpuacct cgroup found; CPU counts the daemon's own time only")
        rows = {"batch": [], "singles": []}
        for r in range(args.rounds):
            code = CPP_TESTED + f"// round {r} {time.time()}\n"
            rows["batch"].append(measure(off, lambda: batch(off, code)))
            code = CPP_TESTED + f"// round {r} singles {time.time()}\n"
            rows["singles"].append(measure(off, lambda: singles(off, code)))
    finally:
        off.stop()
    on = Daemon(args.binary, runtimes, cache=True, uid_base=57900)
    try:
        rows["singles, cache on"] = []
        for r in range(args.rounds):
            code = CPP_TESTED + f"// round {r} cached {time.time()}\n"
            rows["singles, cache on"].append(measure(on, lambda: singles(on, code)))

        print(f"\nC++, 20 tests, {args.rounds} rounds (medians)")
        print(f"{'':34}{'wall s':>10}{'CPU s':>10}")
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
        print(f"{'1 batch of 20 tests (cache off)':34}{med['batch'][0]:10.2f}{med['batch'][1]:10.2f}")
        print(f"{'20 single requests (cache off)':34}{med['singles'][0]:10.2f}{med['singles'][1]:10.2f}")
        print(f"{'20 single requests (cache on)':34}{med['singles, cache on'][0]:10.2f}{med['singles, cache on'][1]:10.2f}")
        cpu_ratio = med["batch"][1] / med["singles"][1]
        wall_ratio = med["batch"][0] / med["singles"][0]
        print(f"batch / singles: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x "
              f"(target CPU <= 0.20: {'met' if cpu_ratio <= 0.20 else 'NOT met'})")

        # 2. Cold against hot, and the run stage alone.
        print(f"\ncompile cache, {args.samples} samples each (p50 ms)")
        print(f"{'':8}{'cold':>10}{'hot':>10}{'run alone':>12}{'run stage':>12}{'hot/alone':>11}")
        for lang, (name, code, _) in HELLO.items():
            tool = {"c": "gcc", "cpp": "g++", "java": "javac", "rust": "rustc", "go": "go"}[lang]
            if shutil.which(tool) is None:
                print(f"{lang:8} skipped ({tool} not installed)")
                continue
            built = host_build(lang, tmp)
            cold, hot, alone, stage = [], [], [], []
            for i in range(args.samples):
                body = {"runtime": lang, "code": code + f"// sample {i} {time.time()}\n"}
                t, a = on.execute(body)
                assert a["compile"]["cached"] is False and a.get("run", {}).get("stdout") == "hello\n", a
                cold.append(t)
                t, a = on.execute(body)
                assert a["compile"]["cached"] is True and a.get("run", {}).get("stdout") == "hello\n", a
                hot.append(t)
                stage.append(a["run"]["wall_time_ms"] / 1000)
                if built is not None:
                    runtime = "bench-java" if lang == "java" else "bench-elf"
                    fname = "Main.class" if lang == "java" else "main"
                    t, a = on.execute({"runtime": runtime, "files": [
                        {"name": fname, "content": built, "encoding": "base64"}]})
                    assert a["run"]["stdout"] == "hello\n", a
                    alone.append(t)
            base = p50(alone) if alone else p50(stage)
            label = f"{p50(alone):12.1f}" if alone else f"{'-':>12}"
            ratio = p50(hot) / base
            print(f"{lang:8}{p50(cold):10.1f}{p50(hot):10.1f}{label}{p50(stage):12.1f}{ratio:10.2f}x"
                  f"  ({'met' if ratio <= 1.5 else 'NOT met'}{'' if alone else ', against the run stage'})")
    finally:
        on.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
