//! The HTTP surface against hostile or careless clients and operators (issue 14): the
//! connection cap with idle eviction, header and body read timeouts, a bounded in-flight
//! body budget, no HTTP/2, queued requests whose client left, the queue-wait limit, a
//! runtimes file that is not a regular file, per-runtime unsandboxed backends, reload
//! errors without file content, argument caps, unknown fields, strict environment values,
//! the open-files check at start-up and API-key schemes.
//!
//! Every daemon and app gets its own `sandbox.uid_base`, so tests running in parallel never
//! share a slot's uid.

mod common;

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Daemon, app_with, bounded, command, env, free_port, repo_path, start_with_args, test_settings,
};
use mixed_docker_executor::app::App;
use mixed_docker_executor::config::Settings;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Helpers

/// A daemon's output, drained from its pipes so that a chatty daemon never blocks on a full
/// pipe; shown when an assertion fails.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn tail(&self) -> String {
        let text = self
            .0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

/// The real binary with `env`, its logs drained.
async fn daemon(env: &[(&str, &str)]) -> (Daemon, Logs) {
    daemon_with_args(&[], env).await
}

/// [`daemon`] with command-line arguments.
async fn daemon_with_args(args: &[&str], env: &[(&str, &str)]) -> (Daemon, Logs) {
    let mut d = start_with_args(args, env).await;
    let logs = Logs::default();
    let pipes: Vec<Box<dyn Read + Send>> = [
        d.child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        d.child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for mut pipe in pipes {
        let logs = logs.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut b) = logs.0.lock() {
                            b.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
        });
    }
    (d, logs)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// `GET /ready` as JSON (200 or 503).
async fn ready(client: &reqwest::Client, base: &str) -> Value {
    client
        .get(format!("{base}/ready"))
        .send()
        .await
        .expect("/ready answers")
        .json()
        .await
        .expect("/ready is JSON")
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics text")
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// POST `body` as JSON, optionally with an `Authorization` header: status, JSON, headers.
async fn post(
    client: &reqwest::Client,
    url: String,
    body: &Value,
    authorization: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client.post(url).json(body);
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    let resp = req.send().await.expect("the request is answered");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let json = resp.json().await.expect("a JSON answer");
    (status, json, headers)
}

/// Start a run of `seconds` that holds a one-slot daemon's slot, and wait until it runs.
async fn occupy_the_slot(
    client: &reqwest::Client,
    base: &str,
    seconds: u64,
) -> tokio::task::JoinHandle<(u16, Value, reqwest::header::HeaderMap)> {
    let long = tokio::spawn({
        let (client, url) = (client.clone(), format!("{base}/submit_code"));
        let code = format!("import time; time.sleep({seconds})");
        async move { post(&client, url, &json!({ "code": code }), None).await }
    });
    eventually(
        Duration::from_secs(10),
        "the long run never started",
        || async move { ready(client, base).await["running"] == 1 },
    )
    .await;
    long
}

/// A complete `POST` with a JSON body, as raw bytes.
fn raw_post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The start of a request head that never ends.
const PARTIAL_HEAD: &[u8] = b"POST /submit_code HTTP/1.1\r\nHost: x\r\n";

/// Read until the peer closes (EOF or reset) or `limit` passes: the bytes, and whether the
/// connection was closed.
async fn read_for(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return (bytes, false),
            Ok(Ok(0) | Err(_)) => return (bytes, true),
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Read one HTTP/1 response (its head, then a Content-Length body) within `limit`: its
/// status and body, or `None` if the connection closed with nothing said.
async fn read_response(s: &mut TcpStream, limit: Duration) -> Option<(u16, String)> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("a status line");
                let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + length]);
                return Some((status, body.into_owned()));
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "no response within {limit:?}; read so far: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(Ok(0) | Err(_)) if bytes.is_empty() => return None,
            Ok(Ok(0) | Err(_)) => panic!(
                "the connection closed mid-response: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The process's CPU time (user + system, all threads) from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after_comm = &stat[stat.rfind(')').expect("the command name ends") + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // proc(5): utime and stime are fields 14 and 15; `state`, field 3, is first here.
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .expect("utime and stime")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks(11) + ticks(12)) as f64 / hz as f64
}

/// The process's resident memory from /proc/PID/status, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status")
        * 1024
}

/// SIGTERM, then wait up to `limit` for the exit.
async fn terminate_within(d: &mut Daemon, limit: Duration, logs: &Logs) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let asked = Instant::now();
    loop {
        if let Some(status) = d.child.try_wait().expect("wait") {
            assert!(
                status.success(),
                "exit status {status}; log:\n{}",
                logs.tail()
            );
            return;
        }
        assert!(
            asked.elapsed() < limit,
            "no exit {limit:?} after SIGTERM; log:\n{}",
            logs.tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `check` every 50 ms until it holds; panic with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A copy of the repo's runtimes.toml in a temp dir: the dir, the file, and its text.
fn runtimes_copy() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("runtimes.toml");
    let text = std::fs::read_to_string(repo_path("runtimes.toml")).expect("read runtimes.toml");
    std::fs::write(&file, &text).expect("write the copy");
    (dir, file, text)
}

/// The same runtimes with `backend = "process"` on the python3 entry.
fn with_unsandboxed_python(text: &str) -> String {
    let changed = text.replacen(
        "name = \"python3\"\n",
        "name = \"python3\"\nbackend = \"process\"\n",
        1,
    );
    assert_ne!(changed, text, "runtimes.toml has a python3 entry");
    changed
}

fn settings(uid_base: u32) -> Settings {
    let mut s = test_settings();
    s.sandbox.uid_base = uid_base;
    s
}

// ---------------------------------------------------------------------------------------
// 1. Idle and slowloris sockets beyond the connection cap

/// Hold 150 connections that each sent `partial` (maybe nothing) to a daemon capped at 50:
/// `/health` still answers within 1 s, the daemon does not spin, and it evicted idle ones.
async fn sockets_beyond_the_cap_lock_nobody_out(partial: &[u8], uid_base: &str) {
    let (d, logs) = daemon(&[
        ("MDE_SERVER__MAX_CONNECTIONS", "50"),
        ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
        ("MDE_SANDBOX__UID_BASE", uid_base),
    ])
    .await;
    let pid = d.child.id();
    let mut held = Vec::with_capacity(150);
    for _ in 0..150 {
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        if !partial.is_empty() {
            // The daemon may already have closed it to make room for another.
            let _ = s.write_all(partial).await;
        }
        held.push(s);
    }
    // Let the daemon accept (and evict) them all.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu_before = cpu_seconds(pid);
    let window = Instant::now();
    let client = client();
    let asked = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(format!("{}/health", d.base)).send(),
    )
    .await
    .expect("/health answers while 150 sockets are held")
    .expect("/health");
    let took = asked.elapsed();
    assert_eq!(resp.status(), 200);
    assert!(
        took < Duration::from_secs(1),
        "/health took {took:?} with 150 sockets held; log:\n{}",
        logs.tail()
    );
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(window.elapsed())).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    println!(
        "the daemon used {cpu:.2} s of CPU in {:?}",
        window.elapsed()
    );
    assert!(
        cpu < 1.0,
        "the daemon used {cpu:.2} s of CPU in 2 s while the sockets were held"
    );

    let text = metrics_text(&client, &d.base).await;
    let evicted = metric(&text, "mde_http_refused_total", &["guard=\"idle_evicted\""]);
    assert!(evicted > 0.0, "no idle connection was evicted:\n{text}");
    let open = metric(&text, "mde_http_connections_open", &[]);
    assert!(open <= 50.0, "{open} connections open, above the cap of 50");
    drop(held);
}

#[tokio::test]
async fn idle_sockets_beyond_the_connection_cap_cannot_lock_clients_out() {
    bounded(120, sockets_beyond_the_cap_lock_nobody_out(b"", "64100")).await;
}

#[tokio::test]
async fn slowloris_heads_beyond_the_connection_cap_cannot_lock_clients_out() {
    bounded(
        120,
        sockets_beyond_the_cap_lock_nobody_out(PARTIAL_HEAD, "64200"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Header read timeout

#[tokio::test]
async fn a_partial_request_head_is_cut_off_at_the_header_read_timeout() {
    bounded(60, async {
        let (d, logs) = daemon(&[
            ("MDE_SERVER__HEADER_READ_TIMEOUT_MS", "1000"),
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_SANDBOX__UID_BASE", "64300"),
        ])
        .await;
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        s.write_all(PARTIAL_HEAD)
            .await
            .expect("send a partial head");
        let sent = Instant::now();
        let (bytes, closed) = read_for(&mut s, Duration::from_secs(6)).await;
        let took = sent.elapsed();
        assert!(
            closed,
            "the connection is still open {took:?} after a partial head; log:\n{}",
            logs.tail()
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "closed after {took:?}, expected about 1 s"
        );
        assert!(
            bytes.is_empty() || bytes.starts_with(b"HTTP/1.1"),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Stalled partial bodies

const BODY_ENV: [(&str, &str); 4] = [
    ("MDE_SERVER__MAX_BODY_BYTES", "2097152"),
    ("MDE_SERVER__MAX_INFLIGHT_BODY_BYTES", "16777216"),
    ("MDE_SERVER__BODY_READ_TIMEOUT_MS", "3000"),
    ("MDE_SERVER__MAX_CONNECTIONS", "512"),
];

fn body_head(length: u64) -> String {
    format!(
        "POST /submit_code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_partial_bodies_hold_the_in_flight_budget_not_the_daemons_memory() {
    bounded(120, async {
        let mut env = BODY_ENV.to_vec();
        env.extend([
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_SANDBOX__UID_BASE", "64400"),
        ]);
        let (d, logs) = daemon(&env).await;
        let pid = d.child.id();
        let client = client();
        let before = rss_bytes(pid);

        // 200 clients send a 2 MiB head and all but 100 bytes of the body, then stall
        // until told to close. Their writes give up after a while: the daemon need not
        // read them.
        const LENGTH: u64 = 2 * MIB;
        let (close_tx, close_rx) = tokio::sync::watch::channel(false);
        let mut clients = Vec::new();
        for _ in 0..200 {
            let addr = d.addr();
            let mut close = close_rx.clone();
            clients.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(&addr).await else {
                    return;
                };
                let send = async {
                    s.write_all(body_head(LENGTH).as_bytes()).await?;
                    let chunk = vec![b' '; 64 * 1024];
                    let mut left = (LENGTH - 100) as usize;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        s.write_all(&chunk[..n]).await?;
                        left -= n;
                    }
                    std::io::Result::Ok(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), send).await;
                let _ = close.wait_for(|c| *c).await;
                drop(s);
            }));
        }

        // While they stall: memory stays bounded, and /health answers.
        let stalled = Instant::now();
        let mut peak = 0;
        while stalled.elapsed() < Duration::from_millis(2500) {
            peak = peak.max(rss_bytes(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let asked = Instant::now();
        let health = tokio::time::timeout(
            Duration::from_secs(10),
            client.get(format!("{}/health", d.base)).send(),
        )
        .await
        .expect("/health answers during the stall")
        .expect("/health");
        assert_eq!(health.status(), 200);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "/health took {:?} during the stall",
            asked.elapsed()
        );
        assert!(
            peak < 200 * MIB,
            "resident memory reached {} MiB with 200 stalled 2 MiB bodies (from {} MiB); log:\n{}",
            peak / MIB,
            before / MIB,
            logs.tail()
        );

        // The budget turned the surplus away (after `body_read_timeout_ms` of waiting for
        // a share).
        eventually(
            Duration::from_secs(10),
            "no body was refused for want of budget",
            || async {
                let text = metrics_text(&client, &d.base).await;
                metric(&text, "mde_http_refused_total", &["guard=\"body_budget\""]) > 0.0
            },
        )
        .await;
        peak = peak.max(rss_bytes(pid));

        // Once they are gone, the memory is given back.
        close_tx.send(true).expect("tell the clients to close");
        for c in clients {
            let _ = c.await;
        }
        let closed = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        eventually(
            Duration::from_secs(6),
            "resident memory stays at or above 150 MiB after the clients left",
            || async { rss_bytes(pid) < 150 * MIB },
        )
        .await;
        println!(
            "RSS: {} MiB before, peak {} MiB stalled, {} MiB {:?} after closing",
            before / MIB,
            peak / MIB,
            rss_bytes(pid) / MIB,
            closed.elapsed()
        );
        assert!(
            peak < 200 * MIB,
            "resident memory peaked at {} MiB",
            peak / MIB
        );
    })
    .await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_at_the_body_read_timeout() {
    bounded(60, async {
        let mut env = BODY_ENV.to_vec();
        env.extend([
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_SANDBOX__UID_BASE", "64500"),
        ]);
        let (d, logs) = daemon(&env).await;
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        s.write_all(body_head(1000).as_bytes())
            .await
            .expect("send the head");
        s.write_all(b"{\"code\": \"print(1)")
            .await
            .expect("send part of the body");
        let sent = Instant::now();
        let answer = read_response(&mut s, Duration::from_secs(15)).await;
        let took = sent.elapsed();
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
            "answered after {took:?}, expected about 3 s; log:\n{}",
            logs.tail()
        );
        if let Some((status, body)) = answer {
            assert_eq!(status, 408, "{body}");
            let json: Value = serde_json::from_str(&body).expect("a JSON body");
            assert_eq!(json["code"], "request_timeout", "{json}");
        }
        let text = metrics_text(&client(), &d.base).await;
        assert!(metric(&text, "mde_http_refused_total", &["guard=\"body_timeout\""]) >= 1.0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. HTTP/2

#[tokio::test]
async fn http2_with_prior_knowledge_is_refused() {
    bounded(60, async {
        let (d, _logs) = daemon(&[
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_SANDBOX__UID_BASE", "64600"),
        ])
        .await;
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        s.write_all(&hello).await.expect("send the HTTP/2 preface");
        let (bytes, _closed) = read_for(&mut s, Duration::from_secs(5)).await;
        assert!(
            bytes.is_empty() || bytes.starts_with(b"HTTP/1.1"),
            "the daemon spoke HTTP/2: {bytes:?}"
        );
        // And it still serves HTTP/1.1.
        let resp = client()
            .get(format!("{}/health", d.base))
            .send()
            .await
            .expect("/health");
        assert_eq!(resp.status(), 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Abandoned queued requests and the queue-wait limit

#[tokio::test]
async fn a_queued_request_whose_client_left_never_runs_and_frees_its_place() {
    bounded(120, async {
        let (d, logs) = daemon(&[
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_EXECUTION__QUEUE_SIZE", "4"),
            ("MDE_SANDBOX__UID_BASE", "64700"),
        ])
        .await;
        let client = client();
        let base = d.base.clone();

        let long = occupy_the_slot(&client, &base, 8).await;

        let mut queued = Vec::new();
        for n in 0..4 {
            let mut s = TcpStream::connect(d.addr()).await.expect("connect");
            let body = json!({"code": format!("print('abandoned-{n}')")}).to_string();
            s.write_all(&raw_post("/submit_code", &body))
                .await
                .expect("send a submission");
            queued.push(s);
        }
        eventually(
            Duration::from_secs(5),
            "the 4 submissions never queued",
            || {
                let (client, base) = (&client, &base);
                async move { ready(client, base).await["waiting"] == 4 }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(queued);
        let left = Instant::now();
        eventually(
            Duration::from_secs(1),
            "the queue did not drop to 0 within 1 s of the clients leaving",
            || {
                let (client, base) = (&client, &base);
                async move { ready(client, base).await["waiting"] == 0 }
            },
        )
        .await;
        println!(
            "the queue emptied {:?} after the clients left",
            left.elapsed()
        );

        // Their places are free: a fresh client is queued, not refused.
        let (status, body, _) = post(
            &client,
            format!("{base}/submit_code"),
            &json!({"code": "print('fresh')"}),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}; log:\n{}", logs.tail());
        assert_eq!(body["output"], "fresh\n");
        let (status, body, _) = long.await.expect("the long run's task");
        assert_eq!(status, 200, "{body}");

        // Only the long run and the fresh client ran.
        let text = metrics_text(&client, &base).await;
        let ran = metric(&text, "mde_executions_total", &["runtime=\"python3\""]);
        assert_eq!(ran, 2.0, "executions:\n{text}\nlog:\n{}", logs.tail());
    })
    .await;
}

#[tokio::test]
async fn a_submission_waits_in_the_queue_no_longer_than_max_queue_wait() {
    bounded(120, async {
        let (d, logs) = daemon(&[
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_EXECUTION__MAX_QUEUE_WAIT_MS", "1000"),
            ("MDE_SANDBOX__UID_BASE", "64800"),
        ])
        .await;
        let client = client();
        let base = d.base.clone();
        // Holds the one slot well past the queue wait.
        let long = occupy_the_slot(&client, &base, 6).await;
        let asked = Instant::now();
        let (status, body, headers) = post(
            &client,
            format!("{base}/submit_code"),
            &json!({"code": "print('late')"}),
            None,
        )
        .await;
        let took = asked.elapsed();
        assert_eq!(status, 429, "{body}; log:\n{}", logs.tail());
        assert_eq!(body["code"], "busy", "{body}");
        assert!(headers.contains_key("retry-after"), "{headers:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "refused after {took:?}, expected about 1 s"
        );
        let (status, _, _) = long.await.expect("the long run's task");
        assert_eq!(status, 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. A FIFO in place of runtimes.toml

fn replace_with_fifo(file: &Path) {
    std::fs::remove_file(file).expect("remove runtimes.toml");
    let path = std::ffi::CString::new(file.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

async fn watching_daemon(file: &Path, uid_base: &str) -> (Daemon, Logs) {
    daemon(&[
        ("MDE_RUNTIMES__FILE", file.to_str().expect("a UTF-8 path")),
        ("MDE_RUNTIMES__WATCH", "true"),
        ("MDE_RUNTIMES__WATCH_INTERVAL_MS", "200"),
        ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
        ("MDE_SANDBOX__UID_BASE", uid_base),
    ])
    .await
}

#[tokio::test]
async fn a_fifo_in_place_of_runtimes_toml_is_refused_and_a_regular_file_reloads_again() {
    bounded(120, async {
        let (_dir, file, text) = runtimes_copy();
        let (mut d, logs) = watching_daemon(&file, "64900").await;
        replace_with_fifo(&file);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let client = client();
        let asked = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), ready(&client, &d.base))
            .await
            .unwrap_or_else(|_| panic!("/ready hangs with a FIFO; log:\n{}", logs.tail()));
        assert!(asked.elapsed() < Duration::from_secs(2));
        let error = r["last_reload_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no reload error for a FIFO: {r}; log:\n{}", logs.tail()));
        println!("last_reload_error: {error}");
        assert!(error.contains("cannot read"), "{error}");
        assert_eq!(r["runtimes_total"], 12, "the previous runtimes stay: {r}");

        std::fs::remove_file(&file).expect("remove the FIFO");
        std::fs::write(&file, &text).expect("restore runtimes.toml");
        eventually(
            Duration::from_secs(5),
            "the restored file did not reload",
            || {
                let (client, base) = (&client, &d.base);
                async move { ready(client, base).await["last_reload_error"].is_null() }
            },
        )
        .await;

        terminate_within(&mut d, Duration::from_secs(10), &logs).await;
    })
    .await;
}

#[tokio::test]
async fn sigterm_with_a_fifo_in_place_of_runtimes_toml_still_exits() {
    bounded(120, async {
        let (_dir, file, _text) = runtimes_copy();
        let (mut d, logs) = watching_daemon(&file, "65000").await;
        replace_with_fifo(&file);
        tokio::time::sleep(Duration::from_secs(1)).await;
        terminate_within(&mut d, Duration::from_secs(10), &logs).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. backend = "process" for one runtime

#[tokio::test]
async fn an_unsandboxed_runtime_needs_allow_unsandboxed_runtimes() {
    bounded(120, async {
        let (_dir, file, text) = runtimes_copy();
        std::fs::write(&file, with_unsandboxed_python(&text)).expect("write");

        let mut s = settings(65100);
        s.runtimes.file = file.clone();
        let err = App::build(s)
            .await
            .err()
            .expect("a process-backend runtime is refused by default")
            .to_string();
        assert!(
            err.contains("`backend`") && err.contains("allow_unsandboxed_runtimes"),
            "{err}"
        );
        assert!(err.contains("python3"), "{err}");

        let mut s = settings(65120);
        s.runtimes.file = file;
        s.sandbox.allow_unsandboxed_runtimes = true;
        let t = app_with(s).await;
        let (status, body) = t.get("/health").await;
        assert_eq!(status, 200);
        let health: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(health["isolation"], false, "{health}");
        let warned = health["warnings"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("python3")))
        });
        assert!(warned, "no warning names python3: {health}");
    })
    .await;
}

#[tokio::test]
async fn a_reload_cannot_turn_isolation_off_for_a_runtime() {
    bounded(120, async {
        let (_dir, file, text) = runtimes_copy();
        let mut s = settings(65150);
        s.runtimes.file = file.clone();
        let t = app_with(s).await;

        std::fs::write(&file, with_unsandboxed_python(&text)).expect("write");
        let err = t
            .app
            .state
            .reloader
            .reload()
            .await
            .expect_err("the reload is refused")
            .to_string();
        assert!(
            err.contains("`backend`") && err.contains("allow_unsandboxed_runtimes"),
            "{err}"
        );

        let run = t
            .execute(json!({
                "runtime": "python3",
                "code": "import socket; print(socket.gethostname())",
            }))
            .await;
        assert_eq!(run["run"]["stdout"], "sandbox\n", "{run}");
        let (_, body) = t.get("/health").await;
        let health: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(health["isolation"], true, "{health}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. Reload errors without the file's content

#[tokio::test]
async fn ready_reports_a_reload_error_without_the_files_content_or_path() {
    bounded(120, async {
        let (dir, file, text) = runtimes_copy();
        let mut s = settings(65200);
        s.runtimes.file = file.clone();
        let t = app_with(s).await;

        let broken = format!("{text}\nleaked_token = SECRET-abc123\n");
        let line = broken
            .lines()
            .position(|l| l.contains("SECRET-abc123"))
            .expect("the secret's line")
            + 1;
        std::fs::write(&file, &broken).expect("write");
        let err = t
            .app
            .state
            .reloader
            .reload()
            .await
            .expect_err("a syntax error is refused");
        println!("the log's error: {err}");

        let (_, body) = t.get("/ready").await;
        let r: Value = serde_json::from_str(&body).expect("JSON");
        let shown = r["last_reload_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no reload error shown: {r}"));
        let dir = dir.path().to_str().expect("a UTF-8 path");
        assert!(!shown.contains("SECRET-abc123"), "{shown}");
        assert!(!shown.contains(dir), "{shown}");
        assert!(!body.contains("SECRET") && !body.contains(dir), "{body}");
        assert!(shown.contains(&format!("line {line}")), "{shown}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 9. Long arguments

#[tokio::test]
async fn a_too_long_argument_is_refused_alike_warm_or_cold() {
    bounded(180, async {
        let mut answers = Vec::new();
        for (prepared, uid_base) in [(true, 65300), (false, 65350)] {
            let mut s = settings(uid_base);
            s.sandbox.prepare_sandboxes = prepared;
            let t = app_with(s).await;

            let (status, body) = t
                .post(
                    "/api/v1/execute",
                    &json!({
                        "runtime": "python3",
                        "code": "import sys; print(len(sys.argv[1]))",
                        "args": ["a".repeat(200_000)],
                    }),
                )
                .await;
            assert_eq!(status, 422, "prepared={prepared}: {body}");
            assert_eq!(body["code"], "invalid_request", "{body}");
            let message = body["message"].as_str().unwrap_or_default().to_string();
            assert!(
                message.contains("args[0]") && message.contains("maximum"),
                "{message}"
            );
            answers.push(body);

            let run = t
                .execute(json!({
                    "runtime": "python3",
                    "code": "import sys; print(len(sys.argv[1]))",
                    "args": ["a".repeat(60_000)],
                }))
                .await;
            assert_eq!(
                run["run"]["stdout"], "60000\n",
                "prepared={prepared}: {run}"
            );
        }
        assert_eq!(answers[0], answers[1], "warm and cold slots answer alike");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 10. Unknown fields

#[tokio::test]
async fn unknown_fields_are_refused_by_the_v1_api_and_ignored_by_submit_code() {
    bounded(120, async {
        let t = app_with(settings(65400)).await;
        for (body, field) in [
            (
                json!({"code": "print(1)", "limits": {"memory": 16_777_216}}),
                "`memory`",
            ),
            (json!({"code": "print(1)", "cod": "x"}), "`cod`"),
        ] {
            let (status, answer) = t.post("/api/v1/execute", &body).await;
            assert_eq!(status, 400, "{body}: {answer}");
            let message = answer["message"].as_str().unwrap_or_default();
            assert!(message.contains(field), "{body}: {message}");
        }
        // The original service's contract ignored unknown fields; /submit_code still does.
        let answer = t
            .post_raw("/submit_code", r#"{"code":"print(1)","extra":1}"#)
            .await;
        assert_eq!(answer.0, 200, "{}", answer.1);
        assert_eq!(answer.1["output"], "1\n");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 11. Environment values

#[test]
fn environment_values_are_parsed_strictly() {
    let err = Settings::load(None, env(&[("MDE_LIMITS__WALL_TIME_MS", "1500.7")]))
        .expect_err("a fraction is not a whole number of milliseconds");
    assert!(err.to_string().contains("limits.wall_time_ms"), "{err}");
    let err = Settings::load(
        None,
        env(&[("MDE_SERVER__MAX_BODY_BYTES", "99999999999999999999")]),
    )
    .expect_err("a number past u64 is refused, not wrapped");
    assert!(err.to_string().contains("server.max_body_bytes"), "{err}");

    let s = Settings::load(
        None,
        env(&[(
            "MDE_SERVER__API_KEYS",
            "key-one-0123456789, key-two-0123456789",
        )]),
    )
    .expect("two keys load");
    assert_eq!(
        s.server.api_keys,
        vec!["key-one-0123456789", "key-two-0123456789"]
    );
}

#[test]
fn a_fraction_in_the_config_file_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[limits]\nwall_time_ms = 1500.7\n").expect("write");
    let err = Settings::load(Some(&file), env(&[])).expect_err("a fraction is refused");
    assert!(err.to_string().contains("limits.wall_time_ms"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 12. Too low an open-files limit

#[test]
fn a_hard_open_files_limit_below_what_the_settings_need_stops_start_up() {
    use std::os::unix::process::CommandExt;
    let mut cmd = command(free_port());
    cmd.env("MDE_SANDBOX__UID_BASE", "65500");
    // SAFETY: the closure only calls setrlimit(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            common::stop_gracefully(&mut child);
            panic!("the daemon started with a hard open-files limit of 1024");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).expect("stderr");
    }
    let defaults = Settings::default();
    // What `App::build` asks for: every run's descriptors, every connection, and 256 of
    // the daemon's own.
    let needed = defaults.max_limits.open_files + defaults.server.max_connections as u64 + 256;
    for part in ["1024", &needed.to_string(), "max_limits.open_files"] {
        assert!(
            stderr.contains(part),
            "stderr does not name {part}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 13. API keys

#[tokio::test]
async fn api_keys_accept_the_bearer_scheme_in_any_case_and_nothing_but_the_key() {
    bounded(120, async {
        const KEY: &str = "issue14-key-0123456789abcdef";
        // From a config file: `MDE_SERVER__API_KEYS` is covered by
        // `environment_values_are_parsed_strictly`.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, format!("[server]\napi_keys = [\"{KEY}\"]\n")).expect("write");
        let (d, logs) = daemon_with_args(
            &["--config", config.to_str().expect("a UTF-8 path")],
            &[
                ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
                ("MDE_SANDBOX__UID_BASE", "65600"),
            ],
        )
        .await;
        let client = client();
        let url = format!("{}/submit_code", d.base);
        let code = json!({"code": "print('authorized')"});
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let auth = format!("{scheme} {KEY}");
            let (status, body, _) = post(&client, url.clone(), &code, Some(&auth)).await;
            assert_eq!(status, 200, "{auth}: {body}; log:\n{}", logs.tail());
            assert_eq!(body["output"], "authorized\n");
        }
        let wrong = format!("{}x", &KEY[..KEY.len() - 1]);
        assert_eq!(wrong.len(), KEY.len());
        for key in [wrong.as_str(), &KEY[..20], ""] {
            let auth = format!("Bearer {key}");
            let (status, body, _) = post(&client, url.clone(), &code, Some(&auth)).await;
            assert_eq!(status, 401, "{auth}: {body}");
            assert_eq!(body["code"], "unauthorized");
        }
        let (status, _, _) = post(&client, url, &code, None).await;
        assert_eq!(status, 401, "no key at all");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Second review of the HTTP surface

/// Read a chunked HTTP/1 answer slowly (`chunk` bytes every `pause`) until its last chunk,
/// the connection's end, or `limit`: whether the whole answer arrived, and its size.
async fn read_chunked_slowly(
    s: &mut TcpStream,
    chunk: usize,
    pause: Duration,
    limit: Duration,
) -> (bool, usize) {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; chunk];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) | Ok(Ok(0) | Err(_)) => return (false, seen.len()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.ends_with(b"\r\n0\r\n\r\n") {
            return (true, seen.len());
        }
        tokio::time::sleep(pause).await;
    }
}

#[tokio::test]
async fn pipelined_bytes_do_not_hide_that_a_queued_client_left() {
    bounded(120, async {
        let (d, logs) = daemon(&[
            ("MDE_EXECUTION__MAX_CONCURRENT", "1"),
            ("MDE_EXECUTION__QUEUE_SIZE", "4"),
            ("MDE_SANDBOX__UID_BASE", "65800"),
        ])
        .await;
        let client = client();
        let base = d.base.clone();
        let long = occupy_the_slot(&client, &base, 6).await;
        // hyper looks for the end of the stream only when it has nothing buffered: a byte
        // or a whole request after the submission used to hide the hang-up.
        let mut queued = Vec::new();
        for (n, trailer) in [&b"G"[..], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"]
            .into_iter()
            .enumerate()
        {
            let mut s = TcpStream::connect(d.addr()).await.expect("connect");
            let body = json!({"code": format!("print('abandoned-{n}')")}).to_string();
            let mut bytes = raw_post("/submit_code", &body);
            bytes.extend_from_slice(trailer);
            s.write_all(&bytes).await.expect("send");
            queued.push(s);
        }
        eventually(
            Duration::from_secs(5),
            "the submissions never queued",
            || {
                let (client, base) = (&client, &base);
                async move { ready(client, base).await["waiting"] == 2 }
            },
        )
        .await;
        drop(queued);
        eventually(Duration::from_secs(2), "the queue did not empty", || {
            let (client, base) = (&client, &base);
            async move { ready(client, base).await["waiting"] == 0 }
        })
        .await;
        let (status, body, _) = long.await.expect("the long run's task");
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let text = metrics_text(&client, &base).await;
        let ran = metric(&text, "mde_executions_total", &["runtime=\"python3\""]);
        assert_eq!(
            ran,
            1.0,
            "only the long run ran:\n{text}\nlog:\n{}",
            logs.tail()
        );
    })
    .await;
}

#[tokio::test]
async fn heads_waiting_for_their_bodies_beyond_the_cap_lock_nobody_out() {
    bounded(90, async {
        let (d, logs) = daemon(&[
            ("MDE_SERVER__MAX_CONNECTIONS", "50"),
            ("MDE_SANDBOX__UID_BASE", "65820"),
        ])
        .await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // 60 sockets, each sending a head that promises a body it never sends, and
        // reconnecting at once when closed (bounded by `stop` and the test's time).
        let mut attackers = Vec::new();
        for _ in 0..60 {
            let (addr, stop) = (d.addr(), Arc::clone(&stop));
            attackers.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let head = "POST /api/v1/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = read_for(&mut s, Duration::from_secs(5)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let client = client();
        for i in 0..8 {
            let started = Instant::now();
            let resp = client.get(format!("{}/health", d.base)).send().await;
            let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
            assert_eq!(status, 200, "health check {i}; log:\n{}", logs.tail());
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "health check {i} took {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for a in attackers {
            a.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn an_answer_still_being_sent_is_never_evicted() {
    bounded(120, async {
        let (d, logs) = daemon(&[
            ("MDE_SERVER__MAX_CONNECTIONS", "20"),
            ("MDE_SANDBOX__UID_BASE", "65840"),
        ])
        .await;
        // 12 MiB of output (more than the kernel's socket buffers hold), read at about 1.3 MB/s
        // while 40 empty connections arrive.
        let body =
            json!({"runtime": "python3", "code": "import sys\nsys.stdout.write('x' * (12 << 20))",
                          "limits": {"output_bytes": 16 * MIB}})
            .to_string();
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        s.write_all(&raw_post("/api/v1/execute", &body))
            .await
            .expect("send");
        let reader = tokio::spawn(async move {
            read_chunked_slowly(
                &mut s,
                64 * 1024,
                Duration::from_millis(50),
                Duration::from_secs(60),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut idle = Vec::new();
        for _ in 0..40 {
            if let Ok(s) = TcpStream::connect(d.addr()).await {
                idle.push(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (whole, size) = reader.await.expect("the reader");
        assert!(
            whole,
            "the answer was cut after {size} bytes; log:\n{}",
            logs.tail()
        );
        assert!(size > 12 << 20, "{size}");
    })
    .await;
}

#[tokio::test]
async fn one_client_address_cannot_hold_the_whole_response_budget() {
    bounded(150, async {
        let (d, logs) = daemon(&[
            ("MDE_EXECUTION__MAX_CONCURRENT", "2"),
            ("MDE_SANDBOX__UID_BASE", "65860"),
        ])
        .await;
        // From 127.0.0.2: eight submissions of 16 MiB answers (64 MiB reserved each, the
        // default budget is 512 MiB), never read.
        let body = json!({"runtime": "python3",
                          "code": "import sys\nsys.stdout.write('\"' * (16 << 20))",
                          "limits": {"output_bytes": 16 * MIB}})
        .to_string();
        let mut hogs = Vec::new();
        for _ in 0..8 {
            let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
            socket
                .bind("127.0.0.2:0".parse().expect("an address"))
                .expect("bind 127.0.0.2");
            let mut s = socket
                .connect(d.addr().parse().expect("the daemon's address"))
                .await
                .expect("connect");
            s.write_all(&raw_post("/api/v1/execute", &body))
                .await
                .expect("send");
            hogs.push(s);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Another client is served at once, not after the queue wait.
        let started = Instant::now();
        let (status, answer, _) = post(
            &client(),
            format!("{}/submit_code", d.base),
            &json!({"code": "print(1)"}),
            None,
        )
        .await;
        assert_eq!(status, 200, "{answer}; log:\n{}", logs.tail());
        assert_eq!(answer["output"], "1\n");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "served after {:?}",
            started.elapsed()
        );
        // The hogs past their share were told so at once.
        let mut refused = 0;
        for s in &mut hogs {
            let (bytes, _) = read_for(s, Duration::from_millis(200)).await;
            if bytes.starts_with(b"HTTP/1.1 429") {
                refused += 1;
            }
        }
        assert!(refused >= 4, "{refused} of 8 hog submissions refused");
    })
    .await;
}
