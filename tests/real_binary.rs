//! The real binary on a free port: start-up, serving, refusing to start insecurely, and a
//! clean shutdown on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, command, free_port, repo_path, start};

#[tokio::test]
async fn serves_the_original_contract_and_stops_on_sigterm() {
    bounded(60, async {
        let mut daemon = start(&[]).await;
        let client = reqwest::Client::new();
        let resp = client
            .post(format!("{}/submit_code", daemon.base))
            .json(&serde_json::json!({"code": "print(\"Hello from FastAPI!\")"}))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-request-id"));
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["output"], "Hello from FastAPI!\n");
        assert_eq!(body["status"], "success");

        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = daemon.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "exit status {status}");
        let mut log = String::new();
        if let Some(mut err) = daemon.child.stdout.take() {
            std::io::Read::read_to_string(&mut err, &mut log).expect("log");
        }
        assert!(log.contains("submission finished"), "log: {log}");
        assert!(log.contains("request_id"), "log: {log}");
    })
    .await;
}

#[test]
fn refuses_to_start_without_bubblewrap_and_says_how_to_fix_it() {
    let output = command(free_port())
        .env("MDE_SANDBOX__BWRAP_PATH", "/nonexistent/bwrap")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("apt-get install bubblewrap"), "{text}");
    assert!(text.contains("MDE_SANDBOX__BACKEND=process"), "{text}");
}

#[test]
fn bad_configuration_stops_start_up_naming_the_key() {
    let output = command(free_port())
        .env("MDE_LIMITS__WALL_TIME_MS", "0")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("limits.wall_time_ms"), "{text}");
}

#[tokio::test]
async fn the_process_backend_warns_loudly() {
    bounded(60, async {
        let mut daemon = start(&[("MDE_SANDBOX__BACKEND", "process")]).await;
        let health: serde_json::Value = reqwest::get(format!("{}/health", daemon.base))
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
        assert_eq!(health["isolation"], false);
        assert!(
            health["warnings"][0]
                .as_str()
                .unwrap_or("")
                .contains("isolation is OFF")
        );
        let out = daemon.child.stdout.take();
        drop(daemon);
        let mut log = String::new();
        if let Some(mut out) = out {
            std::io::Read::read_to_string(&mut out, &mut log).expect("log");
        }
        assert!(log.contains("ISOLATION IS OFF"), "{log}");
    })
    .await;
}

#[test]
fn prints_the_openapi_spec() {
    let output = Command::new(env!("CARGO_BIN_EXE_mixed-docker-executor"))
        .arg("openapi")
        .output()
        .expect("runs");
    assert!(output.status.success());
    let spec: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(spec["info"]["title"], "mixed-docker-executor");
}

#[tokio::test]
async fn sighup_reloads_runtimes_toml() {
    bounded(60, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("runtimes.toml");
        let base = std::fs::read_to_string(repo_path("runtimes.toml")).expect("read");
        std::fs::write(&file, &base).expect("write");
        let daemon = start(&[("MDE_RUNTIMES__FILE", file.to_str().expect("utf-8 path"))]).await;
        let names = || async {
            reqwest::get(format!("{}/api/v1/runtimes", daemon.base))
                .await
                .expect("runtimes")
                .text()
                .await
                .expect("text")
        };
        assert!(!names().await.contains("\"awk\""));
        std::fs::write(
            &file,
            format!("{base}\n[[runtime]]\nname = \"awk\"\nlanguage = \"awk\"\nfile_name = \"main.awk\"\nrun = [\"awk\", \"-f\", \"{{file}}\"]\n"),
        )
        .expect("write");
        // Watching is off for this daemon: only the signal can make it reload.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !names().await.contains("\"awk\"") {
            assert!(Instant::now() < deadline, "SIGHUP did not reload");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_dead_daemons_leftovers_are_swept_at_start() {
    bounded(60, async {
        let mut first = start(&[]).await;
        let health: serde_json::Value = reqwest::get(format!("{}/health", first.base))
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
        assert_eq!(health["workdir_size_enforced"], true);
        // Find its work root through its owner file, then kill it without a chance to clean.
        let pid = first.child.id().to_string();
        let root = std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::read_to_string(p.join("owner.pid")).is_ok_and(|o| o.trim() == pid))
            .expect("the daemon's work root");
        first.child.kill().expect("kill");
        first.child.wait().expect("wait");
        assert!(root.exists(), "SIGKILL leaves the work root behind");
        let _second = start(&[]).await;
        assert!(
            !root.exists(),
            "the next daemon removes it: {}",
            root.display()
        );
    })
    .await;
}

#[tokio::test]
async fn a_renamed_binary_keeps_the_in_sandbox_helper() {
    bounded(60, async {
        // The helper modes used to be found only under the binary's own name: renamed,
        // the daemon ran without its helper, and bubblewrap's dumpable init was pid 1.
        let dir = tempfile::tempdir().expect("temp dir");
        let renamed = dir.path().join("mde");
        std::fs::copy(env!("CARGO_BIN_EXE_mixed-docker-executor"), &renamed).expect("copy");
        let port = free_port();
        let mut cmd = Command::new(&renamed);
        cmd.current_dir(repo_path(""))
            .env("MDE_SERVER__PORT", port.to_string())
            .env("MDE_RUNTIMES__WATCH", "false")
            .env("MDE_SANDBOX__UID_BASE", "65700")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("the renamed binary starts");
        let daemon = common::Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get(format!("{}/health", daemon.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the renamed daemon did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let code = "print(open('/proc/1/cmdline','rb').read().split(b'\\0')[1].decode())\ntry:\n    open('/proc/1/mem','rb').read(1)\n    print('mem open')\nexcept OSError:\n    print('mem denied')";
        let body: serde_json::Value = client
            .post(format!("{}/submit_code", daemon.base))
            .json(&serde_json::json!({ "code": code }))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(body["output"], "__stage-exec\nmem denied\n", "{body}");
        drop(daemon);
    })
    .await;
}
