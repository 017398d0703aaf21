//! Replicas behind a real load balancer: three daemons on loopback behind HAProxy
//! (Debian's package) with health checks on `/ready`, a steady load, then one replica
//! SIGTERMed (it drains) and another SIGKILLed (it dies with runs in flight) mid-load.
//!
//! The bar: every request ends in 200 with its own output, directly or after retries of
//! 429/503 answers that carry `Retry-After` (the retry a client is told to make); no other
//! status and no dropped connection ever reaches the client; nothing hangs; the drained
//! replica finishes the runs it had.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{bounded, command, free_port};
use serde_json::json;

struct Replica {
    child: Child,
    port: u16,
    /// Its log, in a file (a pipe nobody reads would fill and block the daemon).
    log: std::path::PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy_binary() -> Option<&'static str> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

fn start_replica(uid_base: &str, dir: &std::path::Path) -> Replica {
    let port = free_port();
    let log = dir.join(format!("replica-{uid_base}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = command(port);
    cmd.stdout(file.try_clone().expect("log file")).stderr(file);
    cmd.env("MDE_SANDBOX__UID_BASE", uid_base)
        .env("MDE_EXECUTION__MAX_CONCURRENT", "2")
        .env("MDE_EXECUTION__QUEUE_SIZE", "2")
        .env("MDE_SERVER__SHUTDOWN_GRACE_SECONDS", "20")
        .process_group(0);
    Replica {
        child: cmd.spawn().expect("the binary starts"),
        port,
        log,
    }
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The balancer: health checks on `/ready` every 200 ms (a draining replica answers 503
/// and leaves the pool at the first one), and retries where nothing was answered: a refused
/// connection, a connection closed with no answer (a replica killed mid-run: running a
/// submission again is harmless, it has no effect outside its sandbox), and a 503.
fn haproxy_config(front: u16, replicas: &[u16]) -> String {
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!("    server r{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 2\n")
        })
        .collect();
    format!(
        "global
    maxconn 512
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
frontend api
    bind 127.0.0.1:{front}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /ready
    http-check expect status 200
{servers}"
    )
}

/// What one logical request went through.
#[derive(Debug, Default)]
struct Outcome {
    attempts: u32,
    retried_statuses: Vec<u16>,
    /// Anything a client must not see: a status other than 200/429/503, a 429/503 without
    /// Retry-After, a wrong output, a failed connection.
    bad: Option<String>,
}

async fn one_request(client: &reqwest::Client, url: &str, token: &str) -> Outcome {
    let code = format!("import time\ntime.sleep(0.3)\nprint('{token}')");
    let body = json!({"runtime": "python3", "code": code});
    let mut out = Outcome::default();
    for _ in 0..30 {
        out.attempts += 1;
        let resp = match client.post(url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                out.bad = Some(format!("connection error: {e}"));
                return out;
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let text = resp.text().await.unwrap_or_default();
        match status {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if v["run"]["stdout"] != format!("{token}\n") || v["run"]["status"] != "ok" {
                    out.bad = Some(format!("200 with the wrong result: {text}"));
                }
                return out;
            }
            429 | 503 => {
                let Some(wait) = retry_after else {
                    out.bad = Some(format!("{status} without Retry-After: {text}"));
                    return out;
                };
                out.retried_statuses.push(status);
                // Honour Retry-After, capped so the test stays short.
                tokio::time::sleep(Duration::from_millis(wait.min(1) * 1000 / 2)).await;
            }
            other => {
                out.bad = Some(format!("status {other}: {text}"));
                return out;
            }
        }
    }
    out.bad = Some("still refused after 30 attempts".into());
    out
}

fn read_log(path: &std::path::Path) -> String {
    let mut log = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut log);
    }
    log
}

#[tokio::test]
async fn replicas_behind_haproxy_survive_a_drain_and_a_kill_mid_load() {
    let Some(haproxy) = haproxy_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed (scripts/install-deps.sh installs it)"
        );
        println!("SKIPPED: the HAProxy replica test (`haproxy` is not installed)");
        return;
    };
    bounded(180, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut replicas = vec![
            start_replica("58200", dir.path()),
            start_replica("58300", dir.path()),
            start_replica("58400", dir.path()),
        ];
        for r in &replicas {
            wait_ready(&format!("http://127.0.0.1:{}/ready", r.port)).await;
        }
        let front = free_port();
        let cfg = dir.path().join("haproxy.cfg");
        let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
        std::fs::write(&cfg, haproxy_config(front, &ports)).expect("write config");
        let check = Command::new(haproxy)
            .args(["-c", "-q", "-f"])
            .arg(&cfg)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "invalid haproxy config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let _balancer = Haproxy(
            Command::new(haproxy)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy starts"),
        );
        let url = format!("http://127.0.0.1:{front}/api/v1/execute");
        wait_ready(&format!("http://127.0.0.1:{front}/ready")).await;
        // Let every server pass its `rise` checks.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
            workers.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && i < 200 {
                    let token = format!("worker{w}-request{i}");
                    outcomes.push((token.clone(), one_request(&client, &url, &token).await));
                    i += 1;
                }
                outcomes
            }));
        }

        // Mid-load: SIGTERM replica 0 while it runs something (it must drain)...
        tokio::time::sleep(Duration::from_secs(3)).await;
        let drained_base = format!("http://127.0.0.1:{}/ready", replicas[0].port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = match reqwest::get(&drained_base).await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["running"].as_u64())
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if running > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "replica 0 never got work");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(replicas[0].child.id() as i32, libc::SIGTERM) };
        // ...and SIGKILL replica 1 (its runs in flight die with it).
        tokio::time::sleep(Duration::from_secs(2)).await;
        replicas[1].child.kill().expect("SIGKILL");
        let _ = replicas[1].child.wait();
        // The last replica carries the load alone for a while.
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::SeqCst);

        let mut total = 0;
        let mut retried = 0;
        let mut bad = Vec::new();
        for w in workers {
            for (token, outcome) in w.await.expect("worker") {
                total += 1;
                if !outcome.retried_statuses.is_empty() {
                    retried += 1;
                }
                if let Some(why) = outcome.bad {
                    bad.push(format!(
                        "{token}: {why} (after {} attempts)",
                        outcome.attempts
                    ));
                }
            }
        }
        println!("{total} requests, {retried} answered after retries of 429/503");
        assert!(bad.is_empty(), "{} of {total} failed: {bad:#?}", bad.len());
        assert!(total >= 20, "too little load: {total} requests");

        // The drained replica exited cleanly after finishing what it ran.
        let drained = &mut replicas[0].child;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = drained.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the drained replica did not exit"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = read_log(&replicas[0].log);
        assert!(status.success(), "drained replica: {status}; log: {log}");
        assert!(log.contains("every in-flight execution finished"), "{log}");
        assert!(!log.contains("killing them"), "{log}");
    })
    .await;
}
