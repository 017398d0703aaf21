//! The hardening suite: one hostile program per finding of the sandbox review (a crash of the
//! daemon, a limit that could be escaped, a host detail or kernel surface in reach). Each test
//! failed before its fix; each checks that the attack is contained and the daemon keeps serving.

mod common;

use std::time::Duration;

use common::{
    TestApp, app_with, assert_no_process_with, bounded, installed_or_skip, test_settings,
};
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;

/// Run python `code` through /api/v1/execute with `limits`; returns the run stage.
async fn run_py(t: &TestApp, code: &str, limits: Value) -> Value {
    let r = t
        .execute(json!({"runtime": "python3", "code": code, "limits": limits}))
        .await;
    r["run"].clone()
}

fn stdout_of(run: &Value) -> &str {
    run["stdout"].as_str().unwrap_or_default()
}

/// A tree 15000 directories deep, started in `start`.
fn deep_tree(start: &str) -> String {
    format!(
        "import os\nos.chdir('{start}')\nfor i in range(15000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep', i + 1)"
    )
}

/// Runs on the same (only) slot right after an attack: each must be served normally.
async fn slot_serves_again(t: &TestApp, after: &str) {
    for i in 0..3 {
        let run = run_py(t, &format!("print('after {i}')"), json!({})).await;
        assert_eq!(run["status"], "ok", "run {i} after {after}: {run}");
        assert_eq!(
            run["stdout"],
            format!("after {i}\n"),
            "run {i} after {after}: {run}"
        );
    }
    let (status, body) = t.get("/ready").await;
    assert_eq!(status, 200, "ready after {after}: {body}");
}

#[tokio::test]
async fn a_very_deep_directory_tree_is_cleaned_up_without_crashing_the_daemon() {
    bounded(240, async {
        let mut s = test_settings();
        // One slot: the runs after the attack reuse the slot it left behind.
        s.execution.max_concurrent = 1;
        let t = app_with(s).await;
        for start in ["/tmp", "/box"] {
            // Any outcome will do (the tree may also run out of room): the daemon must
            // survive removing it.
            let run = run_py(&t, &deep_tree(start), json!({})).await;
            println!("deep tree in {start}: {run}");
            slot_serves_again(&t, &format!("a deep tree in {start}")).await;
        }
    })
    .await;
}

const SOCKET_BUFFERS: &str = r#"import socket
total = 0
clients = []
accepted = []
try:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(('127.0.0.1', 0))
    server.listen(512)
    server.settimeout(2)
    port = server.getsockname()[1]
    for _ in range(200):
        try:
            c = socket.create_connection(('127.0.0.1', port), timeout=2)
        except OSError:
            break
        clients.append(c)
        try:
            a, _ = server.accept()
        except OSError:
            break
        accepted.append(a)
    chunk = b'x' * 65536
    for c in clients:
        c.setblocking(False)
        while True:
            try:
                n = c.send(chunk)
            except OSError:
                break
            if n <= 0:
                break
            total += n
except Exception as e:
    print('error', type(e).__name__, e, flush=True)
finally:
    print('clients', len(clients), 'accepted', len(accepted), flush=True)
    print(total, flush=True)
"#;

#[tokio::test]
async fn tcp_socket_buffers_count_against_the_memory_limit() {
    bounded(120, async {
        let t = app_with(test_settings()).await;
        let limit = 32 * MIB;
        let run = run_py(
            &t,
            SOCKET_BUFFERS,
            json!({"memory_bytes": limit, "open_files": 1024, "wall_time_ms": 20000}),
        )
        .await;
        if run["status"] == "memory_limit" {
            return;
        }
        let total: u64 = stdout_of(&run)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(u64::MAX);
        // Sender and receiver buffers are both charged: twice the limit is the most that
        // may sit in the kernel on the program's behalf.
        let bar = 2 * limit;
        assert!(
            total < bar,
            "{total} bytes held in socket buffers under a {limit}-byte memory limit: {run}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_output_limit_bounds_the_json_answer_not_only_the_raw_bytes() {
    bounded(90, async {
        let t = app_with(test_settings()).await;
        // Each control byte is 6 bytes (`\u0001`) in the JSON answer.
        let code = "import sys\nsys.stdout.write('\\x01' * (1 << 20))\nsys.stdout.flush()";
        let run = run_py(&t, code, json!({"output_bytes": MIB})).await;
        let escaped = serde_json::to_string(&run["stdout"])
            .expect("a JSON value serializes")
            .len() as u64;
        let bar = MIB + 64;
        assert!(
            escaped <= bar,
            "stdout is {escaped} bytes in JSON, over {bar}: status {}, truncated {}",
            run["status"],
            run["stdout_truncated"]
        );
        assert_eq!(run["stdout_truncated"], true, "status {}", run["status"]);
        assert_eq!(run["status"], "output_limit");

        // Plain ASCII is counted as before.
        let run = run_py(&t, "import sys\nsys.stdout.write('a' * 1000)", json!({})).await;
        assert_eq!(run["status"], "ok", "{run}");
        assert_eq!(run["stdout"], "a".repeat(1000), "{run}");
        assert_eq!(run["stdout_truncated"], false, "{run}");

        // Multibyte UTF-8 (not escaped in JSON) comes back whole under the default limit.
        let run = run_py(
            &t,
            "import sys\nsys.stdout.write('\u{e9}' * 100000)",
            json!({}),
        )
        .await;
        assert_eq!(run["status"], "ok", "status {}", run["status"]);
        assert_eq!(run["stdout_truncated"], false, "status {}", run["status"]);
        let out = stdout_of(&run);
        assert_eq!(out.len(), 200_000, "bytes of stdout");
        assert!(out.chars().all(|c| c == '\u{e9}'), "stdout is all 'é'");
    })
    .await;
}

const SPIN_MARKER: &str = "hardening-spin-4242";

/// 60 children, each in a session (and so a scheduler autogroup) of its own, spinning. They
/// exec a shell loop so the marker is in their command line (and they stay small).
fn setsid_spinners() -> String {
    format!(
        "import os, time\n\
         for _ in range(60):\n\
         \x20   try:\n\
         \x20       pid = os.fork()\n\
         \x20   except OSError:\n\
         \x20       break\n\
         \x20   if pid == 0:\n\
         \x20       os.setsid()\n\
         \x20       try:\n\
         \x20           os.execv('/bin/sh', ['sh', '-c', 'while :; do :; done', '{SPIN_MARKER}'])\n\
         \x20       except OSError:\n\
         \x20           pass\n\
         \x20       while True:\n\
         \x20           pass\n\
         time.sleep(60)"
    )
}

const CPU_VICTIM: &str = "import time\nt0 = time.process_time()\nn = 0\nfor i in range(5_000_000):\n    n += i\nprint('cpu', round(time.process_time() - t0, 3))";

#[tokio::test]
async fn setsid_spinners_cannot_starve_a_concurrent_run() {
    bounded(90, async {
        let t = app_with(test_settings()).await;
        let spinners = setsid_spinners();
        let (attack, victim) = tokio::join!(
            run_py(
                &t,
                &spinners,
                json!({"wall_time_ms": 8000, "cpu_time_ms": 60000, "processes": 100})
            ),
            async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                run_py(&t, CPU_VICTIM, json!({"wall_time_ms": 5000})).await
            }
        );
        println!("attack: {attack}");
        assert_eq!(
            victim["status"], "ok",
            "the victim got too little CPU: {victim}"
        );
        assert!(stdout_of(&victim).starts_with("cpu "), "{victim}");
        assert_no_process_with(SPIN_MARKER, 10).await;
    })
    .await;
}

const SOCKET_FAMILIES: &str = r#"import socket
def attempt(name, family, kind, proto=0):
    try:
        s = socket.socket(family, kind, proto)
    except OSError:
        print(name, 'refused')
    else:
        s.close()
        print(name, 'open')
attempt('unix', socket.AF_UNIX, socket.SOCK_STREAM)
attempt('inet', socket.AF_INET, socket.SOCK_STREAM)
attempt('inet6', socket.AF_INET6, socket.SOCK_STREAM)
attempt('netlink_route', socket.AF_NETLINK, socket.SOCK_RAW, 0)
attempt('vsock', getattr(socket, 'AF_VSOCK', 40), socket.SOCK_STREAM)
attempt('packet', getattr(socket, 'AF_PACKET', 17), socket.SOCK_RAW)
attempt('netlink_kobject_uevent', socket.AF_NETLINK, socket.SOCK_RAW, 15)
attempt('netlink_audit', socket.AF_NETLINK, socket.SOCK_RAW, 9)
attempt('bluetooth', getattr(socket, 'AF_BLUETOOTH', 31), socket.SOCK_STREAM, 3)
attempt('alg', getattr(socket, 'AF_ALG', 38), socket.SOCK_SEQPACKET)
"#;

#[tokio::test]
async fn only_ordinary_socket_families_open() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let run = run_py(&t, SOCKET_FAMILIES, json!({})).await;
        assert_eq!(
            run["stdout"],
            "unix open\ninet open\ninet6 open\nnetlink_route open\n\
             vsock refused\npacket refused\nnetlink_kobject_uevent refused\n\
             netlink_audit refused\nbluetooth refused\nalg refused\n",
            "{run}"
        );
    })
    .await;
}

const PID_ONE: &str = r#"for mode in ['r+b', 'rb']:
    try:
        open('/proc/1/mem', mode).close()
        print('mem', mode, 'open')
    except OSError:
        print('mem', mode, 'refused')
try:
    print('status', [l.split() for l in open('/proc/1/status') if l.startswith('Uid')])
except OSError as e:
    print('status unreadable', e.errno)
try:
    cmdline = open('/proc/1/cmdline', 'rb').read()
    print('cmdline', cmdline.replace(b'\0', b' ').decode('utf-8', 'replace'))
except OSError as e:
    print('cmdline unreadable', e.errno)
"#;

#[tokio::test]
async fn the_sandboxs_pid_1_gives_away_neither_memory_nor_host_paths() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let work_root = t.app.state.executor.info().work_root;
        let work_root = work_root.to_string_lossy().into_owned();
        let run = run_py(&t, PID_ONE, json!({})).await;
        let out = stdout_of(&run);
        assert!(out.contains("mem r+b refused\n"), "{run}");
        assert!(out.contains("mem rb refused\n"), "{run}");
        assert!(!out.contains("mde-"), "a work root name is visible: {run}");
        assert!(!out.contains("/tmp/"), "a host temp path is visible: {run}");
        assert!(
            !out.contains(&work_root),
            "the work root {work_root} is visible: {run}"
        );
    })
    .await;
}

const C_DISK_FILLER: &str = r#"#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>

static char chunk[65536];

/* Bytes written to `path` (up to 100 MiB) before the first error; the file is removed. */
static long fill(const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    setvbuf(f, NULL, _IONBF, 0);
    long total = 0;
    for (int i = 0; i < 1600; i++) {
        size_t n = fwrite(chunk, 1, sizeof chunk, f);
        total += (long)n;
        if (n < sizeof chunk) break;
    }
    fclose(f);
    unlink(path);
    return total;
}

int main(void) {
    signal(SIGXFSZ, SIG_IGN);
    memset(chunk, 'x', sizeof chunk);
    printf("box %ld\n", fill("fill.bin"));
    printf("tmp %ld\n", fill("/tmp/fill.bin"));
    return 0;
}
"#;

fn number_after(out: &str, label: &str) -> Option<i64> {
    out.lines()
        .find_map(|l| l.strip_prefix(label)?.trim().parse().ok())
}

#[tokio::test]
async fn the_run_stage_after_a_compile_gets_the_requested_disk_limit() {
    bounded(120, async {
        if !installed_or_skip("gcc", "the disk limit after a compile") {
            return;
        }
        let t = app_with(test_settings()).await;
        if !t.app.state.executor.info().sized_workdir {
            println!("SKIPPED: no sized work dir here (the daemon is not root)");
            return;
        }
        let r = t
            .execute(json!({"runtime": "c", "code": C_DISK_FILLER,
                            "limits": {"workdir_bytes": MIB,
                                       "file_size_bytes": 128 * MIB}}))
            .await;
        assert_eq!(r["compile"]["status"], "ok", "{r}");
        let out = stdout_of(&r["run"]);
        let limit = MIB as i64;
        for label in ["box ", "tmp "] {
            let written = number_after(out, label).unwrap_or(i64::MAX);
            assert!(
                (0..=limit).contains(&written),
                "{label}: {written} bytes written under a {limit}-byte work dir: {r}"
            );
        }
    })
    .await;
}

/// A 20 MiB program that deletes itself, then fills the work dir: the room its binary
/// took must not become the run's.
const C_SELF_DELETER: &str = r#"#include <stdio.h>
#include <signal.h>
#include <unistd.h>
static char big[20 << 20] = {1};
static char chunk[65536];
int main(void) {
    signal(SIGXFSZ, SIG_IGN);
    printf("unlink %d\n", unlink("main"));
    FILE *f = fopen("/tmp/fill", "wb");
    if (!f) { printf("tmp 0\n"); return 0; }
    setvbuf(f, NULL, _IONBF, 0);
    long total = 0;
    for (int i = 0; i < 640; i++) {
        size_t n = fwrite(chunk, 1, sizeof chunk, f);
        total += (long)n;
        if (n < sizeof chunk) break;
    }
    printf("tmp %ld\n", total);
    return big[0] == 1 ? 0 : 1;
}
"#;

#[tokio::test]
async fn a_compiled_program_cannot_free_its_own_binary_to_pass_the_disk_limit() {
    bounded(120, async {
        if !installed_or_skip("gcc", "the self-deleting program") {
            return;
        }
        let t = app_with(test_settings()).await;
        if !t.app.state.executor.info().sized_workdir {
            println!("SKIPPED: no sized work dir here (the daemon is not root)");
            return;
        }
        let r = t
            .execute(json!({"runtime": "c", "code": C_SELF_DELETER,
                            "limits": {"workdir_bytes": MIB, "file_size_bytes": 128 * MIB}}))
            .await;
        assert_eq!(r["compile"]["status"], "ok", "{r}");
        let out = stdout_of(&r["run"]);
        assert!(out.starts_with("unlink -1"), "the binary stays: {r}");
        let written = number_after(out, "tmp ").unwrap_or(i64::MAX);
        assert!(
            (0..=MIB as i64).contains(&written),
            "{written} bytes written under a 1 MiB work dir: {r}"
        );
    })
    .await;
}

/// Prints `NAME RC ERRNO` for each call.
const NOTIFY_CALLS: &str = r#"import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
def show(name, call):
    ctypes.set_errno(0)
    try:
        rc = call()
    except AttributeError:
        print(name, 'missing')
        return
    print(name, rc, ctypes.get_errno())
show('inotify_init1', lambda: libc.inotify_init1(0))
show('inotify_init', lambda: libc.inotify_init())
show('fanotify_init', lambda: libc.fanotify_init(0, 0))
# FAN_REPORT_FID: the mode an unprivileged caller may use.
show('fanotify_init_fid', lambda: libc.fanotify_init(0x200, 0))
"#;

/// x86_64 syscall numbers, called with arguments that succeed when the call is allowed.
const X86_64_SYSCALLS: &str = r#"AT_FDCWD = -100
class MntIdReq(ctypes.Structure):
    _fields_ = [('size', ctypes.c_uint32), ('spare', ctypes.c_uint32),
                ('mnt_id', ctypes.c_uint64), ('param', ctypes.c_uint64)]
stx = ctypes.create_string_buffer(256)
# STATX_MNT_ID_UNIQUE: the 64-bit mount id statmount takes.
try:
    libc.statx(AT_FDCWD, b'/', 0, 0x4000, stx)
except AttributeError:
    pass
mnt_id = int.from_bytes(stx.raw[144:152], 'little')
req = MntIdReq(24, 0, mnt_id, 1)
out = ctypes.create_string_buffer(4096)
show('statmount', lambda: libc.syscall(L(457), ctypes.byref(req), out, L(4096), L(0)))
root = MntIdReq(24, 0, 0xffffffffffffffff, 0)
ids = (ctypes.c_uint64 * 64)()
show('listmount', lambda: libc.syscall(L(458), ctypes.byref(root), ids, L(64), L(0)))
show('memfd_secret', lambda: libc.syscall(L(447), L(0)))
show('open_tree_attr', lambda: libc.syscall(L(467), L(AT_FDCWD), b'/box', L(0), None, L(0)))
ldt = ctypes.create_string_buffer(16)
show('modify_ldt', lambda: libc.syscall(L(154), L(0), ldt, L(16)))
"#;

fn returned_minus_one(out: &str, name: &str) -> bool {
    out.lines().any(|l| {
        let mut parts = l.split_whitespace();
        parts.next() == Some(name) && parts.next() == Some("-1")
    })
}

#[tokio::test]
async fn inotify_fanotify_and_new_mount_and_memory_syscalls_are_refused() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let x86_64 = std::env::consts::ARCH == "x86_64";
        let code = if x86_64 {
            format!("{NOTIFY_CALLS}{X86_64_SYSCALLS}")
        } else {
            println!(
                "SKIPPED: the raw syscall numbers (x86_64 only, this is {})",
                std::env::consts::ARCH
            );
            NOTIFY_CALLS.to_string()
        };
        let run = run_py(&t, &code, json!({})).await;
        let out = stdout_of(&run);
        let mut names = vec![
            "inotify_init1",
            "inotify_init",
            "fanotify_init",
            "fanotify_init_fid",
        ];
        if x86_64 {
            names.extend([
                "statmount",
                "listmount",
                "memfd_secret",
                "open_tree_attr",
                "modify_ldt",
            ]);
        }
        for name in names {
            assert!(returned_minus_one(out, name), "{name} must fail: {run}");
        }
    })
    .await;
}

const HOST_INFO: &str = r#"import os
try:
    data = open('/proc/cmdline', 'rb').read()
    print('cmdline', len(data.strip()), repr(data[:80]))
except OSError as e:
    print('cmdline unreadable', e.errno)
try:
    print('pressure', sorted(os.listdir('/proc/pressure')))
except OSError as e:
    print('pressure missing', e.errno)
"#;

#[tokio::test]
async fn the_hosts_boot_command_line_and_pressure_files_are_hidden() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let run = run_py(&t, HOST_INFO, json!({})).await;
        let out = stdout_of(&run);
        println!("{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("cmdline 0 ") || l.starts_with("cmdline unreadable")),
            "/proc/cmdline must read empty: {run}"
        );
        assert!(
            out.lines()
                .any(|l| l == "pressure []" || l.starts_with("pressure missing")),
            "/proc/pressure must be empty or missing: {run}"
        );
    })
    .await;
}

#[tokio::test]
async fn many_processes_near_the_memory_limit_get_a_memory_verdict_not_an_internal_error() {
    bounded(90, async {
        let t = app_with(test_settings()).await;
        // Forty children of 6 MiB each under 64 MiB: the cgroup's OOM killer must pick one
        // of them, never the slot's launcher or the sandbox's pid 1 (both were bigger than
        // any child, and killing them lost the run: 500 on /submit_code).
        let code = "import os, time\nfor i in range(40):\n    if os.fork() == 0:\n        b = bytearray(6 << 20)\n        for j in range(0, len(b), 4096): b[j] = 1\n        time.sleep(3); os._exit(0)\ntime.sleep(3)";
        for _ in 0..2 {
            let run = run_py(
                &t,
                code,
                json!({"memory_bytes": 64 * MIB, "processes": 64, "wall_time_ms": 8000}),
            )
            .await;
            assert_ne!(run["status"], "internal_error", "{run}");
        }
        let r = t.submit(
            "import os, time\nfor i in range(58):\n    if os.fork() == 0:\n        b = bytearray(5 << 20)\n        for j in range(0, len(b), 4096): b[j] = 1\n        time.sleep(3); os._exit(0)\ntime.sleep(3)",
            None,
        )
        .await;
        assert!(r["return_code"].is_i64(), "{r}");
        let run = run_py(&t, "print('after')", json!({})).await;
        assert_eq!(run["stdout"], "after\n", "{run}");
    })
    .await;
}

#[tokio::test]
async fn crash_signals_do_not_reach_the_sandboxs_pid_1() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        // Rust installs SIGSEGV/SIGBUS handlers; pid 1 of a pid namespace gets the signals
        // it handles, so the helper resets them: from inside, every signal is dropped.
        let code = "import os, signal, time\nfor s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGTERM, signal.SIGKILL):\n    os.kill(1, s)\ntime.sleep(0.2)\nst = open('/proc/1/status').read()\nprint([l for l in st.splitlines() if l.startswith('SigCgt')][0], flush=True)\nos._exit(7)";
        for _ in 0..2 {
            let run = run_py(&t, code, json!({})).await;
            assert_eq!(run["exit_code"], 7, "pid 1 reported the exact status: {run}");
            assert_eq!(
                stdout_of(&run).trim(),
                "SigCgt:\t0000000000000000",
                "pid 1 handles no signal: {run}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn shm_is_writable_sized_and_fresh_per_run() {
    bounded(90, async {
        let mut s = test_settings();
        s.execution.max_concurrent = 1;
        let t = app_with(s).await;
        // multiprocessing's semaphores live in /dev/shm.
        let pool = "import multiprocessing\nwith multiprocessing.Pool(2) as p:\n    print(p.map(abs, [-1, -2, 3]))";
        let run = run_py(&t, pool, json!({})).await;
        assert_eq!(run["stdout"], "[1, 2, 3]\n", "{run}");
        // It counts against the work dir's size, like /box and /tmp.
        let fill = "total = 0\ntry:\n    with open('/dev/shm/fill', 'wb') as f:\n        for _ in range(64):\n            f.write(b'x' * (1 << 20)); f.flush(); total += 1 << 20\nexcept OSError:\n    pass\nopen('/dev/shm/marker', 'w').write('left')\nprint(total)";
        let run = run_py(&t, fill, json!({"workdir_bytes": 4 * MIB, "file_size_bytes": 128 * MIB})).await;
        let written: u64 = stdout_of(&run).trim().parse().unwrap_or(u64::MAX);
        if t.app.state.executor.info().sized_workdir {
            assert!(written <= 4 * MIB, "{written} bytes in /dev/shm under a 4 MiB work dir");
        }
        // And it is gone for the next run.
        let run = run_py(&t, "import os\nprint(sorted(os.listdir('/dev/shm')))", json!({})).await;
        assert_eq!(run["stdout"], "[]\n", "{run}");
    })
    .await;
}
