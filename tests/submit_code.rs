//! The original `/submit_code` contract, through the real HTTP surface.

mod common;

use common::{app_for_tests, app_with, assert_no_process_with, bounded, test_settings};
use serde_json::json;

#[tokio::test]
async fn hello_world_matches_the_original_example() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t.submit("print(\"Hello from FastAPI!\")", None).await;
        assert_eq!(
            r,
            json!({
                "status": "success",
                "output": "Hello from FastAPI!\n",
                "error": "",
                "return_code": 0,
                "timeout": false,
                "truncated": false
            })
        );
    })
    .await;
}

#[tokio::test]
async fn syntax_error_is_a_failure_with_the_message_in_error() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t.submit("print(", None).await;
        assert_eq!(r["status"], "failure");
        assert_eq!(r["output"], "");
        assert_eq!(r["return_code"], 1);
        assert_eq!(r["timeout"], false);
        assert!(
            r["error"].as_str().unwrap_or("").contains("SyntaxError"),
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn runtime_exception_keeps_stdout_and_traceback() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t.submit("print('before')\n1/0", None).await;
        assert_eq!(r["status"], "failure");
        assert_eq!(r["output"], "before\n");
        assert_eq!(r["return_code"], 1);
        assert!(
            r["error"]
                .as_str()
                .unwrap_or("")
                .contains("ZeroDivisionError"),
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn nonzero_exit_code_is_reported() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t.submit("import sys; sys.exit(7)", None).await;
        assert_eq!(r["status"], "failure");
        assert_eq!(r["return_code"], 7);
    })
    .await;
}

#[tokio::test]
async fn default_timeout_matches_the_original_message_and_kills_the_tree() {
    bounded(40, async {
        let t = app_for_tests().await;
        let code = "import subprocess, time\n\
                    subprocess.Popen(['sleep', '4242.5'])\n\
                    print('started', flush=True)\n\
                    time.sleep(1000)";
        let started = std::time::Instant::now();
        let r = t.submit(code, None).await;
        let took = started.elapsed();
        assert_eq!(r["status"], "failure");
        assert_eq!(r["timeout"], true);
        assert_eq!(r["return_code"], -1);
        assert_eq!(r["error"], "TimeoutExpired: Command exceeded 10 seconds.");
        assert_eq!(r["output"], "started\n");
        assert!(took.as_secs_f64() < 15.0, "took {took:?}");
        assert_no_process_with("4242.5", 5).await;
    })
    .await;
}

#[tokio::test]
async fn background_children_do_not_outlive_a_finished_program() {
    bounded(30, async {
        let t = app_for_tests().await;
        let code = "import subprocess, os\n\
                    subprocess.Popen(['sleep', '4343.5'], start_new_session=True)\n\
                    print('parent done')";
        let r = t.submit(code, None).await;
        assert_eq!(r["status"], "success", "{r}");
        assert_no_process_with("4343.5", 5).await;
    })
    .await;
}

#[tokio::test]
async fn configured_timeout_is_used_in_the_message() {
    bounded(30, async {
        let mut s = test_settings();
        s.limits.wall_time_ms = 1500;
        let t = app_with(s).await;
        let r = t.submit("while True: pass", None).await;
        assert_eq!(r["timeout"], true);
        assert_eq!(r["error"], "TimeoutExpired: Command exceeded 1.5 seconds.");
    })
    .await;
}

#[tokio::test]
async fn output_flood_is_cut_and_flagged() {
    bounded(30, async {
        let mut s = test_settings();
        s.limits.output_bytes = 64 * 1024;
        let t = app_with(s).await;
        let r = t.submit("while True: print('x' * 1000)", None).await;
        assert_eq!(r["status"], "failure");
        assert_eq!(r["truncated"], true);
        assert_eq!(r["timeout"], false);
        let output = r["output"].as_str().unwrap_or_default();
        assert_eq!(output.len(), 64 * 1024);
        assert!(
            r["error"]
                .as_str()
                .unwrap_or("")
                .contains("OutputLimitExceeded"),
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn non_utf8_output_does_not_break_the_response() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t
            .submit(
                "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')",
                None,
            )
            .await;
        assert_eq!(r["status"], "success");
        assert_eq!(r["output"], "ok \u{fffd}\u{fffd} end\n");
    })
    .await;
}

#[tokio::test]
async fn other_runtimes_are_picked_by_name_or_alias() {
    bounded(30, async {
        let t = app_for_tests().await;
        let r = t.submit("echo from bash; exit 3", Some("bash")).await;
        assert_eq!(r["output"], "from bash\n");
        assert_eq!(r["return_code"], 3);
        let r = t.submit("print('alias')", Some("py")).await;
        assert_eq!(r["output"], "alias\n");
        if common::installed_or_skip("node", "the node alias part") {
            let r = t.submit("console.log(6 * 7)", Some("js")).await;
            assert_eq!(r["output"], "42\n");
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_runtime_is_a_422_naming_it() {
    bounded(30, async {
        let t = app_for_tests().await;
        let (status, body) = t
            .post("/submit_code", &json!({"code": "x", "runtime": "cobol"}))
            .await;
        assert_eq!(status, 422);
        assert_eq!(body["code"], "unknown_runtime");
        assert!(body["message"].as_str().unwrap_or("").contains("cobol"));
    })
    .await;
}

#[tokio::test]
async fn malformed_json_and_missing_code_are_400_json() {
    bounded(30, async {
        let t = app_for_tests().await;
        let (status, body) = t.post_raw("/submit_code", "{not json").await;
        assert_eq!(status, 400);
        assert_eq!(body["code"], "bad_request");
        assert!(body["message"].as_str().is_some());

        let (status, body) = t.post("/submit_code", &json!({"runtime": "python3"})).await;
        assert_eq!(status, 400);
        assert_eq!(body["code"], "bad_request");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("required field"),
            "{body}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_400_naming_it() {
    bounded(30, async {
        let t = app_for_tests().await;
        // A number is not source code: it must not silently run as the program `42`.
        let cases = [
            (
                "/submit_code",
                json!({"code": 42}),
                "`code` must be a JSON string, found 42",
            ),
            (
                "/submit_code",
                json!({"code": true}),
                "`code` must be a JSON string, found true",
            ),
            (
                "/submit_code",
                json!({"code": "print(1)", "runtime": 3}),
                "`runtime` must be",
            ),
            (
                "/api/v1/execute",
                json!({"code": "print(1)", "args": [1]}),
                "`args[0]` must be",
            ),
            (
                "/api/v1/execute",
                json!({"code": "print(1)", "stdin": 7}),
                "`stdin` must be",
            ),
            (
                "/api/v1/execute",
                json!({"files": [{"name": "a.py", "content": 1}]}),
                "`content` must be",
            ),
        ];
        for (path, body, expected) in cases {
            let (status, answer) = t.post(path, &body).await;
            assert_eq!(status, 400, "{body} -> {answer}");
            assert_eq!(answer["code"], "bad_request");
            let message = answer["message"].as_str().unwrap_or("");
            assert!(message.contains(expected), "{body} -> {answer}");
        }
    })
    .await;
}

#[tokio::test]
async fn oversized_body_is_413_json() {
    bounded(30, async {
        let mut s = test_settings();
        s.server.max_body_bytes = 4096;
        let t = app_with(s).await;
        let code = "#".repeat(10_000);
        let (status, body) = t.post("/submit_code", &json!({ "code": code })).await;
        assert_eq!(status, 413);
        assert_eq!(body["code"], "payload_too_large");
        assert!(body["message"].as_str().unwrap_or("").contains("4096"));
    })
    .await;
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    bounded(30, async {
        let t = app_for_tests().await;
        let resp = t.client.get("/no/such/path").send().await;
        assert_eq!(resp.0.status().as_u16(), 404);
        let body: serde_json::Value = resp.0.into_body().into_json().await.expect("json");
        assert_eq!(body["code"], "not_found");

        let resp = t.client.get("/submit_code").send().await;
        assert_eq!(resp.0.status().as_u16(), 405);
        let body: serde_json::Value = resp.0.into_body().into_json().await.expect("json");
        assert_eq!(body["code"], "method_not_allowed");
    })
    .await;
}

#[tokio::test]
async fn health_answers_without_running_code() {
    bounded(30, async {
        let t = app_for_tests().await;
        let (status, body) = t.get("/health").await;
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["backend"], "bwrap");
        assert_eq!(body["isolation"], true);
        assert!(body["cpu_enforcement"].is_string(), "{body}");
        let (status, _) = t.get("/ready").await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test]
async fn swagger_ui_and_spec_are_served() {
    bounded(30, async {
        let t = app_for_tests().await;
        let (status, html) = t.get("/docs").await;
        assert_eq!(status, 200);
        assert!(html.to_lowercase().contains("swagger"));
        let (status, spec) = t.get("/openapi.json").await;
        assert_eq!(status, 200);
        let spec: serde_json::Value = serde_json::from_str(&spec).expect("json spec");
        assert!(spec["paths"]["/submit_code"]["post"].is_object());
        assert!(spec["paths"]["/api/v1/execute"]["post"].is_object());
    })
    .await;
}

#[tokio::test]
async fn api_keys_guard_the_code_running_endpoints_only() {
    bounded(30, async {
        let mut s = test_settings();
        s.server.api_keys = vec!["k3y-for-tests-0123456789".into()];
        let t = app_with(s).await;
        let body = json!({"code": "print(1)"});
        let (status, err) = t.post("/submit_code", &body).await;
        assert_eq!(status, 401);
        assert_eq!(err["code"], "unauthorized");
        let resp = t
            .client
            .post("/submit_code")
            .header("authorization", "Bearer wrong-key-0123456789")
            .body_json(&body)
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 401);
        for (header, value) in [
            ("authorization", "Bearer k3y-for-tests-0123456789"),
            ("x-api-key", "k3y-for-tests-0123456789"),
        ] {
            let resp = t
                .client
                .post("/submit_code")
                .header(header, value)
                .body_json(&body)
                .send()
                .await;
            assert_eq!(resp.0.status().as_u16(), 200, "{header}");
        }
        let resp = t.client.get("/api/v1/runtimes").send().await;
        assert_eq!(resp.0.status().as_u16(), 401);
        for open in ["/health", "/metrics", "/openapi.json"] {
            assert_eq!(t.get(open).await.0, 200, "{open} stays open");
        }
        let (_, metrics) = t.get("/metrics").await;
        assert!(
            metrics.contains("mde_requests_rejected_total{reason=\"unauthorized\"} 2"),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_cpu_timeout_answers_exactly_as_the_original_did() {
    bounded(60, async {
        let mut s = test_settings();
        // Below the wall clock, so the CPU budget is what ends these runs.
        s.limits.cpu_time_ms = 1000;
        s.limits.wall_time_ms = 20_000;
        let t = app_with(s).await;
        let one = "while True: pass";
        let several = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nimport sys\nsys.stderr.write('spinning\\n')\nwhile True: pass";
        for code in [one, several] {
            let r = t.submit(code, None).await;
            assert_eq!(r["timeout"], true, "{r}");
            assert_eq!(r["return_code"], -1, "{r}");
            assert_eq!(r["status"], "failure", "{r}");
            assert_eq!(
                r["error"], "TimeoutExpired: Command exceeded 1 seconds.",
                "exactly the original's message, nothing in front: {r}"
            );
        }
    })
    .await;
}
