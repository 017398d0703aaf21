//! The attack suite: each test is a hostile program sent through the HTTP API. Every one must
//! be contained, get a clear outcome, and leave the daemon serving.

mod common;

use common::{
    TestApp, app_with, assert_no_process_with, bounded, installed_or_skip, test_settings,
};
use serde_json::{Value, json};

/// Run python `code` through /api/v1/execute with `limits`; returns the run stage.
async fn run_py(t: &TestApp, code: &str, limits: Value) -> Value {
    let r = t
        .execute(json!({"runtime": "python3", "code": code, "limits": limits}))
        .await;
    r["run"].clone()
}

async fn still_serving(t: &TestApp) {
    let r = t.submit("print('alive')", None).await;
    assert_eq!(r["output"], "alive\n", "the daemon must keep serving: {r}");
}

#[tokio::test]
async fn fork_bomb_is_contained_and_a_concurrent_run_completes() {
    bounded(90, async {
        let t = app_with(test_settings()).await;
        let bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass";
        let (bomb_result, other) = tokio::join!(
            run_py(&t, bomb, json!({"wall_time_ms": 3000, "processes": 32})),
            async {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                t.submit("print(sum(range(10)))", None).await
            }
        );
        assert_eq!(bomb_result["status"], "timeout", "{bomb_result}");
        assert_eq!(other["output"], "45\n", "the concurrent run must complete: {other}");
        still_serving(&t).await;
    })
    .await;
}

const PY_FORKER: &str = "import os, time\nn = 0\ntry:\n    for _ in range(1000):\n        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('refused after', n, e.errno)";

const C_FORKER: &str = "#include <stdio.h>\n#include <unistd.h>\n#include <errno.h>\n\
int main(void) { int n = 0; for (int i = 0; i < 1000; i++) { pid_t p = fork();\n\
if (p == 0) { sleep(5); _exit(0); }\n\
if (p < 0) { printf(\"refused after %d %d\\n\", n, errno); return 0; } n++; } return 0; }";

#[tokio::test]
async fn process_limit_is_enforced() {
    bounded(90, async {
        // Every way a stage starts: in the slot's prepared sandbox, in one started on the
        // spot (a compiled program's run stage), and without the helper at all.
        for prepared in [true, false] {
            let mut s = test_settings();
            s.sandbox.prepare_sandboxes = prepared;
            let t = app_with(s).await;
            let n = forks_until_refused(&t, "python3", PY_FORKER, 10).await;
            // At most 9 children: the program itself is one of the 10. (Fewer when
            // processes of an earlier run on the same uid are still being reaped.)
            assert!((1..=9).contains(&n), "a limit of 10 processes: forked {n}");
        }
        if installed_or_skip("gcc", "the C part") {
            let t = app_with(test_settings()).await;
            let n = forks_until_refused(&t, "c", C_FORKER, 10).await;
            assert!((1..=9).contains(&n), "a limit of 10 processes: forked {n}");
        }
    })
    .await;
}

#[tokio::test]
async fn the_servers_maximum_process_count_is_granted_in_full() {
    bounded(60, async {
        let mut s = test_settings();
        s.execution.max_concurrent = 1;
        s.max_limits.processes = 12;
        s.limits.processes = 12;
        s.compile_limits.processes = 12;
        // A uid range of its own: no other test's processes can be exiting under it.
        s.sandbox.uid_base = 62_000;
        let t = app_with(s).await;
        // The sandbox's own processes (bubblewrap's two, the helper) must not eat into it.
        let n = forks_until_refused(&t, "python3", PY_FORKER, 12).await;
        assert_eq!(n, 11, "12 processes: the program and 11 children");
    })
    .await;
}

/// Run `code` (which forks until refused and prints `refused after N ERRNO`) under a limit
/// of `limit` processes; returns N.
async fn forks_until_refused(t: &TestApp, runtime: &str, code: &str, limit: u64) -> u64 {
    let r = t
        .execute(json!({"runtime": runtime, "code": code,
                        "limits": {"processes": limit, "wall_time_ms": 4000}}))
        .await;
    let run = &r["run"];
    let out = run["stdout"].as_str().unwrap_or_default();
    assert!(out.starts_with("refused after"), "{r}");
    out.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(999)
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_limit() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let run = run_py(
            &t,
            "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))",
            json!({"memory_bytes": 64 * 1024 * 1024}),
        )
        .await;
        let status = run["status"].as_str().unwrap_or_default();
        // With a memory cgroup the kernel OOM-kills; with RLIMIT_AS python raises MemoryError.
        assert!(
            status == "memory_limit"
                || run["stderr"].as_str().unwrap_or("").contains("MemoryError"),
            "{run}"
        );
        if status == "memory_limit" {
            assert_eq!(run["limit"], "memory");
            let peak = run["peak_memory_bytes"].as_u64().unwrap_or(0);
            assert!(peak <= 64 * 1024 * 1024 + 4096 * 1024, "peak {peak}");
        }
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn cpu_spin_is_stopped_by_the_cpu_limit() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let run = run_py(
            &t,
            "while True:\n    pass",
            json!({"cpu_time_ms": 1000, "wall_time_ms": 20000}),
        )
        .await;
        assert_eq!(run["status"], "timeout", "{run}");
        assert_eq!(run["limit"], "cpu_time", "{run}");
        assert!(
            run["wall_time_ms"].as_u64().unwrap_or(u64::MAX) < 10_000,
            "{run}"
        );
        // Not ">= 1000": when RLIMIT_CPU fires first, the kernel judged by its tick-sampled
        // per-process time, which on a loaded host runs ahead of the cgroup's precise count
        // (CI once saw SIGXCPU at 871 ms). Half the budget still proves the spin was measured.
        assert!(run["cpu_time_ms"].as_u64().unwrap_or(0) >= 500, "{run}");
    })
    .await;
}

#[tokio::test]
async fn forked_cpu_spinners_share_one_cpu_budget() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let (_, health) = t.get("/health").await;
        let health: Value = serde_json::from_str(&health).expect("health is JSON");
        if !health["cpu_enforcement"]
            .as_str()
            .is_some_and(|s| s.starts_with("whole process tree"))
        {
            eprintln!("SKIPPED: no cgroup CPU accounting on this host: {health}");
            return;
        }
        // Four spinners: RLIMIT_CPU alone would let each burn its own second (4 s together).
        let code = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass";
        let run = run_py(
            &t,
            code,
            json!({"cpu_time_ms": 1000, "wall_time_ms": 20000}),
        )
        .await;
        assert_eq!(run["status"], "timeout", "{run}");
        assert_eq!(run["limit"], "cpu_time", "{run}");
        let cpu = run["cpu_time_ms"].as_u64().unwrap_or(0);
        assert!((1000..2500).contains(&cpu), "one budget for the tree: {run}");
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn detached_grandchild_dies_with_the_wall_timeout() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "import os, subprocess, time\n\
                    if os.fork() == 0:\n    os.setsid()\n    subprocess.Popen(['sleep', '5151.5'], start_new_session=True)\n    os._exit(0)\n\
                    time.sleep(1000)";
        let run = run_py(&t, code, json!({"wall_time_ms": 1500})).await;
        assert_eq!(run["status"], "timeout");
        assert_eq!(run["limit"], "wall_time");
        assert_no_process_with("5151.5", 5).await;
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn filling_the_work_dir_and_tmp_fails_inside_the_sandbox() {
    bounded(60, async {
        let mut s = test_settings();
        s.limits.workdir_bytes = 8 * 1024 * 1024;
        let t = app_with(s).await;
        let code = "import errno\nfor path in ['fill.bin', '/tmp/fill.bin']:\n    try:\n        with open(path, 'wb') as f:\n            for _ in range(64):\n                f.write(b'x' * 1024 * 1024)\n        print(path, 'wrote everything')\n    except OSError as e:\n        print(path, errno.errorcode[e.errno])\n    import os\n    if os.path.exists(path): os.remove(path)";
        let run = run_py(&t, code, json!({"file_size_bytes": 128 * 1024 * 1024})).await;
        assert_eq!(run["stdout"], "fill.bin ENOSPC\n/tmp/fill.bin ENOSPC\n", "{run}");
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn a_file_over_the_size_limit_is_refused() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (2 * 1024 * 1024))\nprint('wrote it')";
        let run = run_py(&t, code, json!({"file_size_bytes": 1024 * 1024})).await;
        assert_eq!(run["status"], "runtime_error", "{run}");
        // Python ignores SIGXFSZ, so it sees EFBIG and raises.
        assert!(run["stderr"].as_str().unwrap_or("").contains("File too large"), "{run}");
        assert_eq!(run["stdout"], "");
        // A program that does not ignore SIGXFSZ is killed by it.
        let r = t
            .execute(json!({"runtime": "bash", "code": "head -c 2000000 /dev/zero > big.bin; echo after $?",
                            "limits": {"file_size_bytes": 1024 * 1024}}))
            .await;
        assert_eq!(r["run"]["stdout"], "after 153\n", "SIGXFSZ is 25, 128+25 = 153: {r}");
    })
    .await;
}

#[tokio::test]
async fn opening_files_stops_at_the_limit() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "files = []\ntry:\n    while True:\n        files.append(open('/dev/null'))\nexcept OSError as e:\n    print(len(files), e.errno)";
        let run = run_py(&t, code, json!({"open_files": 32})).await;
        let out = run["stdout"].as_str().unwrap_or_default();
        let mut parts = out.split_whitespace();
        let opened: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(999);
        assert!(opened < 32, "{run}");
        assert_eq!(parts.next(), Some("24"), "EMFILE expected: {run}");
    })
    .await;
}

#[tokio::test]
async fn stdout_and_stderr_floods_are_cut() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        for (stream, flag) in [
            ("sys.stdout", "stdout_truncated"),
            ("sys.stderr", "stderr_truncated"),
        ] {
            let code = format!("import sys\nwhile True:\n    {stream}.write('y' * 4096)");
            let run = run_py(&t, &code, json!({"output_bytes": 100_000})).await;
            assert_eq!(run["status"], "output_limit", "{run}");
            assert_eq!(run[flag], true);
            assert_eq!(run["limit"], "output");
            let field = if flag.starts_with("stdout") {
                "stdout"
            } else {
                "stderr"
            };
            assert_eq!(run[field].as_str().unwrap_or("").len(), 100_000);
        }
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn no_network_not_even_the_hosts_loopback() {
    bounded(60, async {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let t = app_with(test_settings()).await;
        let code = format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)\nprint(sorted(name for _, name in socket.if_nameindex()))"
        );
        let run = run_py(&t, &code, json!({})).await;
        let out = run["stdout"].as_str().unwrap_or_default();
        assert!(out.starts_with("refused"), "{run}");
        assert!(out.ends_with("['lo']\n"), "only loopback may be visible: {run}");
        drop(listener);
    })
    .await;
}

#[tokio::test]
async fn host_secrets_and_the_repo_are_out_of_reach() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let repo = env!("CARGO_MANIFEST_DIR");
        let daemon_pid = std::process::id();
        let code = format!(
            "import os\n\
             for p in ['/etc/shadow', '/root/.bashrc', '{repo}/runtimes.toml', '{repo}/Cargo.toml', '/proc/{daemon_pid}/environ']:\n\
             \x20   try:\n\
             \x20       open(p).read(); print(p, 'READ')\n\
             \x20   except OSError as e:\n\
             \x20       print(p, 'blocked')\n\
             env = b''\n\
             for pid in [d for d in os.listdir('/proc') if d.isdigit()]:\n\
             \x20   try: env += open(f'/proc/{{pid}}/environ', 'rb').read()\n\
             \x20   except OSError: pass\n\
             print('cargo env visible' if b'CARGO' in env else 'no daemon env')\n\
             print('root dir', os.path.isdir('/root'))\n\
             print('uid', os.getuid())"
        );
        let run = run_py(&t, &code, json!({})).await;
        let out = run["stdout"].as_str().unwrap_or_default();
        assert!(!out.contains("READ"), "{run}");
        assert!(out.contains("no daemon env"), "{run}");
        assert!(out.contains("root dir False"), "{run}");
        assert!(!out.contains("uid 0\n"), "must not run as root: {run}");
    })
    .await;
}

#[tokio::test]
async fn the_daemon_cannot_be_killed_or_traced() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let pid = std::process::id();
        let code = format!(
            "import os, signal, ctypes\n\
             try:\n    os.kill({pid}, signal.SIGKILL); print('kill sent')\nexcept OSError as e:\n    print('kill', type(e).__name__)\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             print('ptrace', libc.ptrace(16, {pid}, 0, 0), ctypes.get_errno())\n\
             print('ptrace pid1', libc.ptrace(16, 1, 0, 0))"
        );
        let run = run_py(&t, &code, json!({})).await;
        let out = run["stdout"].as_str().unwrap_or_default();
        assert!(out.contains("kill ProcessLookupError"), "{run}");
        assert!(out.contains("ptrace -1"), "{run}");
        assert!(out.contains("ptrace pid1 -1"), "{run}");
        still_serving(&t).await;
    })
    .await;
}

#[tokio::test]
async fn a_planted_module_cannot_stop_a_warm_interpreter_lowering_its_limits() {
    bounded(60, async {
        let mut s = test_settings();
        s.execution.max_concurrent = 1;
        let t = app_with(s).await;
        // The attack waits in the queue, so its files are written the moment the slot is
        // free: while the slot's next interpreter is still starting in the work dir.
        let fake = "def setrlimit(*args):\n    pass\n";
        let count_fds = "import os\nn = 0\ntry:\n    while True:\n        os.open('/dev/null', os.O_RDONLY); n += 1\nexcept OSError:\n    print(n)";
        let attack = json!({"runtime": "python3", "limits": {"open_files": 32},
                            "files": [{"name": "main.py", "content": count_fds},
                                      {"name": "resource.py", "content": fake}]});
        let (_, r) = tokio::join!(t.execute(json!({"code": "print(1)"})), async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            t.execute(attack).await
        });
        let opened: u64 = r["run"]["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        assert!(opened < 32, "the open-files limit held: {r}");
    })
    .await;
}

#[tokio::test]
async fn the_in_sandbox_helper_cannot_be_hijacked() {
    bounded(90, async {
        // Both kinds of pid 1: a zygote's run init (python3 as shipped), and the stage-exec
        // helper (zygotes off: python3 from a warm interpreter in a prepared sandbox).
        for zygotes in [true, false] {
            let mut s = test_settings();
            s.sandbox.zygotes = zygotes;
            hijack_attempts(&app_with(s).await, zygotes).await;
        }
    })
    .await;
}

async fn hijack_attempts(t: &TestApp, zygotes: bool) {
    // The pid 1 that forked us (the stage-exec helper, or a zygote's run init) runs as
    // our uid and holds the status pipe: it must not let us at its descriptors or
    // memory (it is not dumpable).
    let code = "import os\n\
                pp = os.getppid()\n\
                print('parent', pp)\n\
                for what in ['fd', 'mem', 'environ']:\n    \
                try:\n        \
                os.listdir(f'/proc/{pp}/fd') if what == 'fd' else open(f'/proc/{pp}/{what}', 'rb').read(1)\n        \
                print(what, 'open')\n    \
                except PermissionError:\n        \
                print(what, 'denied')";
    let run = run_py(t, code, json!({})).await;
    assert_eq!(
        run["stdout"], "parent 1\nfd denied\nmem denied\nenviron denied\n",
        "zygotes {zygotes}: {run}"
    );
    // The helper is the sandbox's pid 1: a signal from inside cannot kill it (the
    // kernel drops it), so the run goes on and still gets its exact status.
    let code = "import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.2)\nos.kill(1, 0)\nprint('pid 1 survived', os.getppid(), flush=True)\nos.execv('/usr/bin/sleep', ['sleep', '0.1'])";
    let run = run_py(t, code, json!({"wall_time_ms": 20000})).await;
    assert_eq!(run["status"], "ok", "{run}");
    assert_eq!(run["stdout"], "pid 1 survived 1\n", "{run}");
    // A run that cannot end on its own still ends at its limit, with nothing left.
    let code =
        "import os\nos.kill(os.getppid(), 9)\nos.execv('/usr/bin/sleep', ['sleep', '3131.5'])";
    let run = run_py(t, code, json!({"wall_time_ms": 2000})).await;
    assert_eq!(run["status"], "timeout", "{run}");
    assert!(
        run["wall_time_ms"].as_u64().unwrap_or(u64::MAX) < 10_000,
        "the run ends with its sandbox: {run}"
    );
    assert_no_process_with("3131.5", 5).await;
    // The slot's next run has its helper again: exact exit codes.
    let run = run_py(t, "import sys\nsys.exit(137)", json!({})).await;
    assert_eq!(run["exit_code"], 137, "{run}");
    still_serving(t).await;
}

#[tokio::test]
async fn mount_unshare_and_setuid_are_denied() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "import os, ctypes\n\
                    libc = ctypes.CDLL(None, use_errno=True)\n\
                    print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n\
                    print('unshare', libc.unshare(0x10000000))\n\
                    print('unshare-net', libc.unshare(0x40000000))\n\
                    print('chroot', libc.chroot(b'/tmp'))\n\
                    try:\n    os.setuid(0); print('setuid ok')\nexcept OSError as e:\n    print('setuid refused')";
        let run = run_py(&t, code, json!({})).await;
        assert_eq!(
            run["stdout"],
            "mount -1\nunshare -1\nunshare-net -1\nchroot -1\nsetuid refused\n",
            "{run}"
        );
    })
    .await;
}

#[tokio::test]
async fn writing_outside_the_work_dir_fails() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        // /dev/shm is writable on purpose: it is part of the slot's sized tmpfs (see
        // `shm_is_writable_sized_and_fresh_per_run` in hardening_attacks.rs).
        let code = "for p in ['/usr/evil', '/etc/evil', '/evil', '/proc/evil', '/dev/shm/evil', '/dev/evil', '/box/ok', '/tmp/ok']:\n    try:\n        open(p, 'w').write('x'); print(p, 'written')\n    except OSError:\n        print(p, 'denied')";
        let run = run_py(&t, code, json!({})).await;
        assert_eq!(
            run["stdout"],
            "/usr/evil denied\n/etc/evil denied\n/evil denied\n/proc/evil denied\n/dev/shm/evil written\n/dev/evil denied\n/box/ok written\n/tmp/ok written\n",
            "{run}"
        );
        assert!(!std::path::Path::new("/usr/evil").exists());
    })
    .await;
}

#[tokio::test]
async fn symlinks_to_host_files_lead_nowhere() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let before = std::fs::read("/etc/passwd").expect("host passwd");
        let code = "import os\nos.symlink('/etc/passwd', 'link')\ntry:\n    open('link', 'a').write('pwned')\n    print('wrote through link')\nexcept OSError as e:\n    print('blocked', type(e).__name__)";
        let run = run_py(&t, code, json!({})).await;
        assert!(run["stdout"].as_str().unwrap_or("").starts_with("blocked"), "{run}");
        // The next run gets a fresh work dir: the link is gone, and the daemon never followed it.
        let run = run_py(&t, "import os\nprint(sorted(os.listdir('.')))", json!({})).await;
        assert_eq!(run["stdout"], "['main.py']\n");
        assert_eq!(std::fs::read("/etc/passwd").expect("host passwd"), before);
    })
    .await;
}

#[tokio::test]
async fn closing_stdout_early_is_handled() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "import os, sys, time\nprint('bye', flush=True)\nos.close(1)\ntime.sleep(0.3)\nsys.stderr.write('still here\\n')";
        let run = run_py(&t, code, json!({})).await;
        assert_eq!(run["stdout"], "bye\n", "{run}");
        assert_eq!(run["stderr"], "still here\n", "{run}");
    })
    .await;
}

#[tokio::test]
async fn nothing_is_left_behind_after_an_attack_run() {
    bounded(90, async {
        let t = app_with(test_settings()).await;
        let info = t.app.state.executor.info();
        let code = "import os, subprocess\nfor _ in range(4):\n    subprocess.Popen(['sleep', '6161.5'])\nopen('/tmp/junk', 'w').write('x' * 1000)\nos.fork()\nwhile True: pass";
        let run = run_py(&t, code, json!({"wall_time_ms": 1000})).await;
        assert_eq!(run["status"], "timeout");
        assert_no_process_with("6161.5", 5).await;
        // Idle slots hold only the empty box/, tmp/ and shm/ of their next, prepared sandbox. The
        // slot is cleaned right after the answer is sent, so give it a moment.
        let leftovers = || {
            let mut left = Vec::new();
            let slots = std::fs::read_dir(&info.work_root).expect("work root").flatten();
            for slot in slots.filter(|e| e.path().is_dir()) {
                for sub in std::fs::read_dir(slot.path()).expect("slot").flatten() {
                    if !["box", "tmp", "shm"].contains(&sub.file_name().to_str().unwrap_or("")) {
                        left.push(sub.path());
                    }
                    left.extend(std::fs::read_dir(sub.path()).expect("dir").flatten().map(|e| e.path()));
                }
            }
            left
        };
        for _ in 0..100 {
            if leftovers().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(leftovers(), Vec::<std::path::PathBuf>::new(), "slot dirs not emptied");
        drop(t);
        // The slot's last task (preparing the next sandbox) still holds the executor briefly.
        for _ in 0..100 {
            if !info.work_root.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!info.work_root.exists(), "work root removed at shutdown");
        if let Some(cg) = info.cgroup_dir {
            assert!(!cg.exists(), "cgroup {} removed at shutdown", cg.display());
        }
    })
    .await;
}

#[tokio::test]
async fn no_descriptor_of_the_daemon_reaches_the_sandbox() {
    bounded(60, async {
        let t = app_with(test_settings()).await;
        let code = "import os\nfds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\nprint(fds)";
        // The first run uses a prepared sandbox, the run after a compile a fresh one.
        let run = run_py(&t, code, json!({})).await;
        assert_eq!(run["stdout"], "[0, 1, 2, 3]\n", "only stdio (3 is listdir's own): {run}");
        let c = "#include <stdio.h>\n#include <dirent.h>\nint main(void){DIR*d=opendir(\"/proc/self/fd\");struct dirent*e;int n=0;while((e=readdir(d)))n++;printf(\"%d\\n\",n-2);return 0;}";
        let r = t.execute(json!({"runtime": "c", "code": c})).await;
        assert_eq!(r["run"]["stdout"], "4\n", "0, 1, 2 and opendir's own: {r}");
    })
    .await;
}

fn parent_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_killed_slot_launcher_is_replaced() {
    bounded(60, async {
        let mut s = test_settings();
        s.execution.max_concurrent = 1;
        let t = app_with(s).await;
        let run = run_py(&t, "print('first')", json!({})).await;
        assert_eq!(run["stdout"], "first\n");
        // Kill this app's launcher (it lives in the app's slot cgroup) behind its back.
        let cgroup = t
            .app
            .state
            .executor
            .info()
            .cgroup_dir
            .expect("a memory cgroup here");
        let procs = std::fs::read_to_string(cgroup.join("slot-0/cgroup.procs")).expect("procs");
        let launchers: Vec<i32> = procs
            .lines()
            .filter_map(|p| p.trim().parse().ok())
            // The launcher is this process's child; a stage it has just forked (not yet
            // exec'd) shows the same command line but is the launcher's child.
            .filter(|pid: &i32| parent_of(*pid) == Some(std::process::id()))
            .filter(|pid: &i32| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__slot-launcher"))
            })
            .collect();
        assert_eq!(launchers.len(), 1, "one launcher per slot: {procs}");
        // SAFETY: kill(2) on a process this test's app started.
        unsafe { libc::kill(launchers[0], libc::SIGKILL) };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        for i in 0..3 {
            let run = run_py(&t, &format!("print({i})"), json!({})).await;
            assert_eq!(
                run["stdout"],
                format!("{i}\n"),
                "run {i} after the kill: {run}"
            );
        }
    })
    .await;
}
