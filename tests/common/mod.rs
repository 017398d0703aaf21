//! Shared test environment: an app built from the repo's real runtimes.toml, request
//! helpers that return status + JSON, a bound on every async test, and the real binary
//! started on a free port.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mixed_docker_executor::app::App;
use mixed_docker_executor::config::Settings;
use poem::EndpointExt;
use poem::endpoint::BoxEndpoint;
use poem::test::TestClient;
use serde_json::Value;

/// `MDE_*`-style variables as `Settings::load` takes them.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Settings for tests: the repo's runtimes, two slots, no file watching.
pub fn test_settings() -> Settings {
    let mut s = Settings::default();
    s.runtimes.file = repo_path("runtimes.toml");
    s.runtimes.watch = false;
    s.execution.max_concurrent = 2;
    s
}

pub struct TestApp {
    pub app: App,
    pub client: TestClient<BoxEndpoint<'static, poem::Response>>,
}

pub async fn app_with(settings: Settings) -> TestApp {
    let app = App::build(settings).await.expect("app builds");
    TestApp {
        client: TestClient::new(app.endpoint().boxed()),
        app,
    }
}

pub async fn app_for_tests() -> TestApp {
    app_with(test_settings()).await
}

/// Fail the test instead of hanging CI.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {secs} s"))
}

impl TestApp {
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.client.post(path).body_json(body).send().await;
        let status = resp.0.status().as_u16();
        let json = resp
            .0
            .into_body()
            .into_json::<Value>()
            .await
            .expect("the response body is JSON");
        (status, json)
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let resp = self
            .client
            .post(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let status = resp.0.status().as_u16();
        let json = resp
            .0
            .into_body()
            .into_json::<Value>()
            .await
            .expect("the response body is JSON");
        (status, json)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.client.get(path).send().await;
        let status = resp.0.status().as_u16();
        let text = resp.0.into_body().into_string().await.expect("text body");
        (status, text)
    }

    /// `POST /submit_code`, expecting 200.
    pub async fn submit(&self, code: &str, runtime: Option<&str>) -> Value {
        let mut body = serde_json::json!({ "code": code });
        if let Some(r) = runtime {
            body["runtime"] = r.into();
        }
        let (status, json) = self.post("/submit_code", &body).await;
        assert_eq!(status, 200, "unexpected answer: {json}");
        json
    }

    /// `POST /api/v1/execute`, expecting 200.
    pub async fn execute(&self, body: Value) -> Value {
        let (status, json) = self.post("/api/v1/execute", &body).await;
        assert_eq!(status, 200, "unexpected answer: {json}");
        json
    }
}

/// Processes whose command line contains `marker` (used to prove nothing is left behind).
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) {
                found.push(format!("{pid}: {text}"));
            }
        }
    }
    found
}

/// Wait up to `secs` for no process to carry `marker`.
pub async fn assert_no_process_with(marker: &str, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("processes left behind: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `program` is installed where the sandbox looks.
pub fn installed(program: &str) -> bool {
    ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(program).exists())
}

/// Whether `program` is installed; if not, say which part of the test is skipped.
pub fn installed_or_skip(program: &str, part: &str) -> bool {
    let found = installed(program);
    if !found {
        println!("SKIPPED: {part} (`{program}` is not installed)");
    }
    found
}

/// Stop a child the way an operator would (SIGTERM), so it cleans up; SIGKILL after 20 s.
pub fn stop_gracefully(child: &mut std::process::Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The real binary, serving on `port`; stopped with SIGTERM when dropped.
pub struct Daemon {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub port: u16,
}

impl Daemon {
    /// `127.0.0.1:PORT`, for raw sockets.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Daemon {
    /// Stop it the way an operator would (SIGTERM), so it cleans up its slots.
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
    }
}

/// The binary set to serve on `port` from the repo's directory (so its runtimes.toml), no
/// file watching, logs piped.
pub fn command(port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixed-docker-executor"));
    cmd.current_dir(repo_path(""))
        .env("MDE_SERVER__PORT", port.to_string())
        .env("MDE_RUNTIMES__WATCH", "false")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Start the binary on a free port with `extra_env` on top of [`command`]'s, and wait (up to
/// 30 s) until `/health` answers.
pub async fn start(extra_env: &[(&str, &str)]) -> Daemon {
    start_with_args(&[], extra_env).await
}

/// [`start`], with command-line arguments (`--config FILE`).
pub async fn start_with_args(args: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
    let port = free_port();
    let mut cmd = command(port);
    cmd.args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("the binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let mut daemon = Daemon { child, base, port };
    wait_until_serving(&mut daemon.child, &daemon.base, "/health").await;
    daemon
}

/// Wait (30 s at most) until the daemon `child` answers `path` under `base` with a
/// success; panics if it exits first.
pub async fn wait_until_serving(child: &mut Child, base: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = reqwest::get(format!("{base}{path}")).await
            && resp.status().is_success()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("daemon exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not come up on {path}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
