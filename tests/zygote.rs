//! Fork-server sandboxes (zygotes): what a run can find of the runs before it, what it can
//! do to its zygote, and how zygotes are replaced. The warm/zygote/cold equivalence suite
//! is in `v1_api.rs`; every attack test of `sandbox_attacks.rs` and `hardening_attacks.rs`
//! runs python3, and so runs on the zygote path too.

mod common;

use std::time::Duration;

use common::{TestApp, app_with, bounded, test_settings};
use serde_json::{Value, json};

/// One slot, so every run lands on the same zygote; a uid range of its own, so the
/// zygote's processes can be told from other tests'.
fn one_slot(uid_base: u32) -> mixed_docker_executor::config::Settings {
    let mut s = test_settings();
    s.execution.max_concurrent = 1;
    s.sandbox.uid_base = uid_base;
    s
}

async fn run(t: &TestApp, code: &str) -> Value {
    let r = t
        .execute(json!({"runtime": "python3", "code": code, "limits": {"wall_time_ms": 20000}}))
        .await;
    r["run"].clone()
}

/// The value of one series in `/metrics` (0 when absent).
async fn metric(t: &TestApp, series: &str) -> u64 {
    let text = t.get("/metrics").await.1;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn zygote_starts(t: &TestApp) -> u64 {
    metric(
        t,
        "mde_run_starts_total{how=\"zygote\",runtime=\"python3\"}",
    )
    .await
}

async fn restarts(t: &TestApp, reason: &str) -> u64 {
    let series = format!("mde_zygote_restarts_total{{reason=\"{reason}\",runtime=\"python3\"}}");
    metric(t, &series).await
}

/// Searches the run's own memory, files, sockets and processes for `h1` followed by `h2`
/// without ever holding the two together (so it cannot find itself).
const SEARCH: &str = r#"
import os
found = []
for line in open('/proc/self/maps'):
    parts = line.split()
    if 'r' not in parts[1] or (len(parts) > 5 and parts[5].startswith('[v')):
        continue
    start, end = (int(x, 16) for x in parts[0].split('-'))
    with open('/proc/self/mem', 'rb', 0) as mem:
        at = start
        while at < end:
            try:
                mem.seek(at)
                data = mem.read(min(1 << 20, end - at) + 64)
            except OSError:
                break
            i = data.find(h1)
            while i >= 0:
                if data[i + len(h1):i + len(h1) + len(h2)] == h2:
                    found.append(hex(at + i))
                i = data.find(h1, i + 1)
            at += 1 << 20
print('memory', len(found))
name = h1.decode()
print('files', [n for d in ('/tmp', '/dev/shm', '/box') for n in os.listdir(d) if name in n])
print('sockets', [l.split()[-1] for l in open('/proc/net/unix') if name in l])
print('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
"#;

#[tokio::test]
async fn nothing_of_a_run_is_found_by_the_next_one_from_the_same_zygote() {
    bounded(120, async {
        let t = app_with(one_slot(54_000)).await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let (h1, h2) = (
            format!("MDEMARK{nanos}"),
            format!("Z{}", std::process::id()),
        );
        let token = format!("{h1}{h2}");
        // The marker in the source, in a string built at run time, in files under /tmp,
        // /dev/shm and /box, in an abstract socket, and in a process left running.
        let plant = format!(
            "import os, socket, time\n\
             T = '{token}'\n\
             kept = ''.join(reversed(T[::-1])) * 3\n\
             for d in ('/tmp', '/dev/shm', '/box'):\n    open(f'{{d}}/{{T}}', 'w').write(T)\n\
             s = socket.socket(socket.AF_UNIX)\ns.bind('\\0' + T)\ns.listen()\n\
             if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n\
             print('planted', len(kept))"
        );
        let before = zygote_starts(&t).await;
        let planted = run(&t, &plant).await;
        assert_eq!(planted["stdout"], format!("planted {}\n", token.len() * 3));
        let search = format!("h1 = b'{h1}'\nh2 = b'{h2}'\n{SEARCH}");
        let next = run(&t, &search).await;
        assert_eq!(zygote_starts(&t).await, before + 2, "both from the zygote");
        assert_eq!(
            next["stdout"], "memory 0\nfiles []\nsockets []\nprocs [1, 2]\n",
            "{next}"
        );
        // The search does find the marker where it is: in a run that holds it.
        let control = format!("h1 = b'{h1}'\nh2 = b'{h2}'\nheld = h1 + h2\n{SEARCH}");
        let control = run(&t, &control).await;
        let stdout = control["stdout"].as_str().unwrap_or_default();
        assert!(
            stdout.starts_with("memory ") && !stdout.starts_with("memory 0\n"),
            "{control}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_run_cannot_reach_its_zygote_and_killing_all_it_sees_ends_only_itself() {
    bounded(90, async {
        let t = app_with(one_slot(54_100)).await;
        let code = "import ctypes, os, signal\n\
                    libc = ctypes.CDLL(None, use_errno=True)\n\
                    print('ptrace', libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n\
                    print('unshare', libc.unshare(0x10000000), libc.unshare(0x20000))\n\
                    print('caps', [l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap') and not l.startswith('CapBnd')])\n\
                    print('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n\
                    if os.fork() == 0:\n    os.setsid()\n    os.execv('/usr/bin/sleep', ['sleep', '60'])\n\
                    os.kill(-1, signal.SIGKILL)\n\
                    print('still here', os.waitpid(-1, 0)[1], flush=True)";
        let expected = "ptrace -1 1\nunshare -1 -1\ncaps ['0000000000000000', '0000000000000000', '0000000000000000', '0000000000000000']\nprocs [1, 2]\nstill here 9\n";
        run_leaving_the_zygote_untouched(&t, code, expected).await;
    })
    .await;
}

/// Run `code` (an attack), expect `stdout`, then check that the zygote was not touched:
/// the next run is forked from the same one, as pid 2 of its init, and no zygote died or
/// was stopped.
async fn run_leaving_the_zygote_untouched(t: &TestApp, code: &str, stdout: &str) {
    let died = restarts(t, "died").await;
    let before = zygote_starts(t).await;
    let r = run(t, code).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["stdout"], stdout, "{r}");
    let again = run(t, "import os\nprint(os.getpid(), os.getppid())").await;
    assert_eq!(again["stdout"], "2 1\n", "{again}");
    assert_eq!(zygote_starts(t).await, before + 2);
    assert_eq!(restarts(t, "died").await, died);
    assert_eq!(restarts(t, "run_killed").await, 0);
}

/// A run's pid 1 (its init) runs in its zygote's memory: the run can read none of it,
/// stop or kill it, or leave anything on it for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cannot_read_or_stop_its_init_which_shares_the_zygotes_memory() {
    bounded(90, async {
        let t = app_with(one_slot(54_700)).await;
        let code = "import ctypes, os, signal\n\
                    libc = ctypes.CDLL(None, use_errno=True)\n\
                    for name in ('mem', 'maps', 'environ', 'exe', 'stack', 'syscall'):\n    \
                        try:\n        \
                            os.readlink('/proc/1/exe') if name == 'exe' else open('/proc/1/' + name, 'rb').read(64)\n        \
                            print(name, 'READ')\n    \
                        except OSError as e:\n        \
                            print(name, e.errno)\n\
                    buf = ctypes.create_string_buffer(64)\n\
                    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 64)\n\
                    remote = (ctypes.c_void_p * 2)(0x400000, 64)\n\
                    print('vm_readv', libc.process_vm_readv(1, local, 1, remote, 1, 0), ctypes.get_errno())\n\
                    for sig in (signal.SIGSTOP, signal.SIGSEGV, signal.SIGTERM, signal.SIGKILL):\n    \
                        os.kill(1, sig)\n\
                    print('init', open('/proc/1/stat').read().split()[2])";
        // EACCES for every file that needs ptrace access, EPERM from the seccomp filter.
        let expected =
            "mem 13\nmaps 13\nenviron 13\nexe 13\nstack 13\nsyscall 13\nvm_readv -1 1\ninit S\n";
        run_leaving_the_zygote_untouched(&t, code, expected).await;
    })
    .await;
}

/// A run has a session and process group of its own, as in a cold sandbox: signalling
/// its whole group reaches neither its zygote nor the sandbox's init.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_signalling_its_process_group_reaches_only_itself() {
    bounded(90, async {
        let t = app_with(one_slot(54_800)).await;
        let code = "import os, signal, time\n\
                    print(os.getpgid(0), os.getsid(0))\n\
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTSTP):\n    \
                        signal.signal(sig, signal.SIG_IGN)\n    \
                        os.kill(0, sig)\n\
                    time.sleep(0.3)\n\
                    print('still here', flush=True)";
        run_leaving_the_zygote_untouched(&t, code, "1 1\nstill here\n").await;
    })
    .await;
}

/// Pids of the python processes (the zygotes) running as `uid`.
fn zygotes_of(uid: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let uid_matches = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .is_some_and(|u| u == uid.to_string());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if uid_matches
            && cmdline.starts_with("/usr/bin/python3")
            && cmdline.contains("mde_zygote_next")
        {
            pids.push(pid);
        }
    }
    pids
}

async fn wait_for_zygote(uid: u32) -> i32 {
    for _ in 0..200 {
        if let Some(&pid) = zygotes_of(uid).first() {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no zygote runs as uid {uid}");
}

#[tokio::test]
async fn a_dead_or_hung_zygote_is_replaced_without_failing_a_run() {
    bounded(120, async {
        let uid = 54_200;
        let t = app_with(one_slot(uid)).await;
        assert_eq!(run(&t, "print(1)").await["stdout"], "1\n");
        // Dead: its run still answers, and the slot gets a new zygote.
        let zygote = wait_for_zygote(uid).await;
        // SAFETY: signalling a process of this test's own daemon.
        unsafe { libc::kill(zygote, libc::SIGKILL) };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = run(&t, "print('after a death')").await;
        assert_eq!(r["stdout"], "after a death\n", "{r}");
        assert!(restarts(&t, "died").await >= 1);
        let replaced = wait_for_zygote(uid).await;
        assert_ne!(replaced, zygote);
        assert_eq!(run(&t, "print(2)").await["stdout"], "2\n");
        // Hung: a stopped zygote clones no more runs. The run it had made ready still
        // takes the next request; the one after starts elsewhere within seconds.
        let hung = wait_for_zygote(uid).await;
        // SAFETY: as above.
        unsafe { libc::kill(hung, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let died = restarts(&t, "died").await;
        let r = run(&t, "print('ready before the hang')").await;
        assert_eq!(r["stdout"], "ready before the hang\n", "{r}");
        let started = std::time::Instant::now();
        let r = run(&t, "print('after a hang')").await;
        assert_eq!(r["stdout"], "after a hang\n", "{r}");
        assert!(started.elapsed() < Duration::from_secs(15));
        assert_eq!(restarts(&t, "died").await, died + 1);
        // SAFETY: as above (it is gone already, with its sandbox).
        unsafe { libc::kill(hung, libc::SIGKILL) };
        let before = zygote_starts(&t).await;
        assert_eq!(run(&t, "print(3)").await["stdout"], "3\n");
        assert_eq!(
            zygote_starts(&t).await,
            before + 1,
            "a new zygote serves again"
        );
    })
    .await;
}

#[tokio::test]
async fn zygotes_rotate_after_max_runs_and_after_a_killed_run() {
    bounded(120, async {
        let mut s = one_slot(54_300);
        s.sandbox.zygote_max_runs = 3;
        let t = app_with(s).await;
        // python's hash secret is the zygote's: shared by its runs, new with each zygote.
        let mut hashes = Vec::new();
        for _ in 0..7 {
            let r = run(&t, "print(hash('mixed-docker-executor'))").await;
            hashes.push(r["stdout"].as_str().unwrap_or_default().to_owned());
        }
        assert!(
            hashes[0] == hashes[1] && hashes[1] == hashes[2],
            "{hashes:?}"
        );
        assert!(
            hashes[3] == hashes[4] && hashes[4] == hashes[5],
            "{hashes:?}"
        );
        assert!(
            hashes[2] != hashes[3] && hashes[5] != hashes[6],
            "{hashes:?}"
        );
        assert_eq!(restarts(&t, "max_runs").await, 2);
        // A run stopped at a limit is stopped by killing its zygote's sandbox.
        let r = t
            .execute(json!({"code": "while True: pass", "limits": {"wall_time_ms": 300}}))
            .await;
        assert_eq!(r["run"]["status"], "timeout", "{r}");
        assert_eq!(restarts(&t, "run_killed").await, 1);
        let before = zygote_starts(&t).await;
        assert_eq!(
            run(&t, "print('forked again')").await["stdout"],
            "forked again\n"
        );
        assert_eq!(zygote_starts(&t).await, before + 1);
    })
    .await;
}

#[tokio::test]
async fn health_and_runtimes_say_which_runtimes_use_a_zygote() {
    bounded(60, async {
        for zygotes in [true, false] {
            let mut s = test_settings();
            s.sandbox.zygotes = zygotes;
            let t = app_with(s).await;
            let health: Value = serde_json::from_str(&t.get("/health").await.1).expect("json");
            let runtimes: Value =
                serde_json::from_str(&t.get("/api/v1/runtimes").await.1).expect("json");
            let start = |name: &str| {
                runtimes
                    .as_array()
                    .and_then(|a| a.iter().find(|r| r["name"] == name))
                    .map(|r| r["start"].clone())
            };
            if zygotes {
                assert_eq!(health["zygote_runtimes"], json!(["python3"]), "{health}");
                assert_eq!(start("python3"), Some(json!("zygote")));
            } else {
                assert_eq!(health["zygote_runtimes"], json!([]), "{health}");
                assert_eq!(start("python3"), Some(json!("warm")));
                // Turned off by the operator: nothing to fix.
                assert!(
                    !health["warnings"].to_string().contains("zygote"),
                    "{health}"
                );
            }
            assert_eq!(start("node"), Some(json!("cold")));
        }
    })
    .await;
}

#[tokio::test]
async fn a_zygote_that_cannot_start_leaves_its_runtime_warm_and_health_says_so() {
    bounded(90, async {
        let base = std::fs::read_to_string(common::repo_path("runtimes.toml")).expect("read");
        // python3 as shipped, but its interpreter cannot start (no standard library).
        let broken = "[[runtime]]\nname = \"pybroken\"\nlanguage = \"python\"\nfile_name = \"main.py\"\nrun = [\"python3\", \"{file}\"]\nenv = { PYTHONHOME = \"/nonexistent\" }\nwarm = \"python\"\nzygote = true\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("runtimes.toml");
        std::fs::write(&file, format!("{base}\n{broken}")).expect("write");
        let mut s = one_slot(54_500);
        s.runtimes.file = file;
        let t = app_with(s).await;
        let warnings = async || {
            let health: Value = serde_json::from_str(&t.get("/health").await.1).expect("json");
            health["warnings"].to_string()
        };
        assert!(!warnings().await.contains("zygotes fail to start"));
        for _ in 0..3 {
            let r = t
                .execute(json!({"runtime": "pybroken", "code": "print(1)"}))
                .await;
            assert_ne!(r["run"]["status"], "ok", "{r}");
        }
        assert!(restarts_of(&t, "pybroken", "died").await >= 1);
        assert!(
            warnings().await.contains("zygotes fail to start"),
            "{}",
            warnings().await
        );
        // A zygote that serves again clears it.
        for _ in 0..2 {
            assert_eq!(run(&t, "print(1)").await["stdout"], "1\n");
        }
        assert!(!warnings().await.contains("zygotes fail to start"));
    })
    .await;
}

async fn restarts_of(t: &TestApp, runtime: &str, reason: &str) -> u64 {
    let series = format!("mde_zygote_restarts_total{{reason=\"{reason}\",runtime=\"{runtime}\"}}");
    metric(t, &series).await
}

#[tokio::test]
async fn what_a_run_leaves_in_kernel_caches_does_not_count_against_the_next() {
    bounded(90, async {
        let t = app_with(one_slot(54_600)).await;
        // Negative dentries, charged to the slot's memory cgroup and held by no process.
        let poison = "import os, time\nt = time.time()\nn = 0\nwhile time.time() - t < 1.5:\n    for i in range(1000):\n        try:\n            os.stat('/usr/z%d_%d' % (n, i))\n        except OSError:\n            pass\n    n += 1\nprint('done')";
        assert_eq!(run(&t, poison).await["stdout"], "done\n");
        let memory_restarts = restarts(&t, "memory").await;
        let before = zygote_starts(&t).await;
        for _ in 0..2 {
            let r = t
                .execute(json!({"code": "print(1)", "limits": {"memory_bytes": 128 << 20}}))
                .await;
            assert_eq!(r["run"]["stdout"], "1\n", "{r}");
            let peak = r["run"]["peak_memory_bytes"].as_u64().unwrap_or(u64::MAX);
            assert!(peak < 32 << 20, "the next run's peak is its own: {r}");
        }
        assert_eq!(zygote_starts(&t).await, before + 2, "still forked from the zygote");
        assert_eq!(restarts(&t, "memory").await, memory_restarts);
    })
    .await;
}
