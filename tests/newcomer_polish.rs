//! What a new user meets first: answers without `null`s, the right statuses and headers at
//! the edges of the HTTP surface, metrics series present from start-up, and a daemon that
//! says what is wrong once, plainly, in a log a file or a shipper can take.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{app_for_tests, bounded, command, free_port, repo_path};
use serde_json::Value;

/// Every `null` in `value`, by path.
fn nulls(value: &Value, at: &str, found: &mut Vec<String>) {
    match value {
        Value::Null => found.push(at.to_string()),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                nulls(v, &format!("{at}[{i}]"), found);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                nulls(v, &format!("{at}.{k}"), found);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn answers_leave_empty_fields_out_instead_of_sending_null() {
    bounded(60, async {
        let t = app_for_tests().await;
        let mut found = Vec::new();
        let r = t
            .execute(serde_json::json!({"runtime": "python3", "code": "print(1)"}))
            .await;
        nulls(&r, "execute", &mut found);
        for path in ["/ready", "/api/v1/runtimes", "/health"] {
            let (status, body) = t.get(path).await;
            assert_eq!(status, 200, "{path}: {body}");
            let json: Value = serde_json::from_str(&body).expect("JSON");
            nulls(&json, path, &mut found);
        }
        assert!(found.is_empty(), "null values: {found:?}");
    })
    .await;
}

#[tokio::test]
async fn the_edges_answer_with_the_right_status_and_headers() {
    bounded(60, async {
        let t = app_for_tests().await;
        // No Content-Type, or another one: 415, not 400.
        for content_type in [None, Some("text/plain")] {
            let mut req = t
                .client
                .post("/submit_code")
                .body(r#"{"code": "print(1)"}"#);
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let resp = req.send().await;
            assert_eq!(resp.0.status().as_u16(), 415, "{content_type:?}");
            let body: Value = resp.0.into_body().into_json().await.expect("JSON");
            assert_eq!(body["code"], "unsupported_media_type", "{body}");
        }
        // A 405 says which methods the path takes.
        let resp = t.client.delete("/submit_code").send().await;
        assert_eq!(resp.0.status().as_u16(), 405);
        assert_eq!(
            resp.0.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some("POST")
        );
        let resp = t.client.post("/api/v1/runtimes").send().await;
        assert_eq!(resp.0.status().as_u16(), 405);
        assert_eq!(
            resp.0.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some("GET, HEAD")
        );
        // `/` points to the docs.
        let resp = t.client.get("/").send().await;
        assert_eq!(resp.0.status().as_u16(), 303);
        assert_eq!(
            resp.0
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok()),
            Some("/docs")
        );
        // A missing field's message names it, without the parser's internals.
        let (status, body) = t
            .post_raw("/submit_code", r#"{"runtime": "python3"}"#)
            .await;
        assert_eq!(status, 400, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("`code`"), "{message}");
        assert!(!message.contains("occurred while parsing"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn failure_series_exist_at_zero_from_start_up() {
    bounded(60, async {
        let t = app_for_tests().await;
        let (_, metrics) = t.get("/metrics").await;
        for reason in ["runtime_error", "timeout", "memory_limit", "output_limit"] {
            let series = format!(
                "mde_execution_failures_total{{reason=\"{reason}\",runtime=\"python3\"}} 0"
            );
            assert!(metrics.contains(&series), "missing {series}");
        }
    })
    .await;
}

/// Run the binary with `args` and `env` until it exits (at most 30 s): exit code, stdout,
/// stderr.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = command(free_port());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("the binary starts");
    let out = child.wait_with_output().expect("it exits");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_configuration_mistake_is_said_once_without_a_backtrace() {
    bounded(60, async {
        let (code, _, stderr) = run_binary(
            &["check-config"],
            &[
                ("MDE_LIMITS__WALL_TIME_MS", "soon"),
                ("RUST_BACKTRACE", "1"),
            ],
        );
        assert_ne!(code, 0);
        assert_eq!(stderr.matches("limits.wall_time_ms").count(), 1, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
        // A TOML mistake keeps its diagnostic readable: the line, and a caret under it.
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("runtimes.toml");
        std::fs::write(&file, "default = \"python3\"\n[[runtime]\nname = \"x\"\n").expect("write");
        let (code, _, stderr) = run_binary(
            &["check-config"],
            &[("MDE_RUNTIMES__FILE", file.to_str().expect("a UTF-8 path"))],
        );
        assert_ne!(code, 0);
        assert!(
            stderr.lines().count() > 1 && stderr.contains('^'),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test]
async fn logs_are_plain_in_a_file_json_on_request_and_warn_of_an_open_bind() {
    bounded(90, async {
        for (format, bind) in [("text", "0.0.0.0"), ("json", "127.0.0.1")] {
            let port = free_port();
            let mut cmd = command(port);
            cmd.current_dir(repo_path(""))
                .env("MDE_SERVER__LOG_FORMAT", format)
                .env("MDE_SERVER__HOST", bind)
                .env("MDE_SANDBOX__UID_BASE", "65960")
                .env("MDE_EXECUTION__MAX_CONCURRENT", "1");
            let mut child = cmd.spawn().expect("the binary starts");
            let client = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{port}/health");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while client.get(&url).send().await.is_err() {
                assert!(std::time::Instant::now() < deadline, "no daemon");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            common::stop_gracefully(&mut child);
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
            }
            assert!(!out.contains('\u{1b}'), "no colour codes in a pipe: {out}");
            if format == "json" {
                let first = out.lines().next().unwrap_or_default();
                let line: Value = serde_json::from_str(first).expect("a JSON log line");
                assert!(line.get("fields").is_some(), "{line}");
            } else {
                assert!(
                    out.contains("without API keys"),
                    "a non-loopback bind without keys is warned about: {out}"
                );
            }
        }
    })
    .await;
}
