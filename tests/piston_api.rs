//! `/api/v2`: the Piston v2 drop-in. Piston's shapes for the runtime list and executions
//! (python, bash, C, a compile error, a timeout, stdin, args, files, limits), its
//! `{"message"}` 400s, and the real `piston-client` package from npm driving a real daemon.
//!
//! Every app and daemon gets its own `sandbox.uid_base` (65900 and up), so tests running in
//! parallel never share a slot's uid.

mod common;

use std::time::Duration;

use common::{TestApp, app_with, bounded, installed, installed_or_skip, repo_path, test_settings};
use serde_json::{Value, json};

async fn app(uid_base: u32) -> TestApp {
    let mut s = test_settings();
    s.sandbox.uid_base = uid_base;
    app_with(s).await
}

/// `POST /api/v2/execute`, expecting 200.
async fn execute(t: &TestApp, body: Value) -> Value {
    let (status, json) = t.post("/api/v2/execute", &body).await;
    assert_eq!(status, 200, "unexpected answer to {body}: {json}");
    json
}

/// `POST /api/v2/execute`, expecting Piston's 400 `{"message"}` with exactly `message`.
async fn expect_400(t: &TestApp, body: Value, message: &str) {
    let (status, json) = t.post("/api/v2/execute", &body).await;
    assert_eq!(status, 400, "{body}: {json}");
    assert_eq!(json, json!({ "message": message }), "{body}");
}

fn is_semver(v: &Value) -> bool {
    let parts: Vec<&str> = v.as_str().unwrap_or_default().split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok())
}

#[tokio::test]
async fn runtimes_are_listed_under_pistons_language_names() {
    bounded(60, async {
        let t = app(65900).await;
        let (status, text) = t.get("/api/v2/runtimes").await;
        assert_eq!(status, 200, "{text}");
        let list: Vec<Value> = serde_json::from_str(&text).expect("a JSON list");
        let python = list
            .iter()
            .find(|r| r["language"] == "python")
            .expect("python is listed under Piston's name");
        assert_eq!(python["runtime"], "python3");
        assert_eq!(python["aliases"], json!(["python3", "py"]));
        assert!(is_semver(&python["version"]), "{python}");
        let bash = list.iter().find(|r| r["language"] == "bash").expect("bash");
        assert!(
            bash.get("runtime").is_none(),
            "no `runtime` when it is the language: {bash}"
        );
        assert_eq!(bash["aliases"], json!(["sh", "shell"]));
        for r in &list {
            let keys: Vec<&String> = r.as_object().expect("objects").keys().collect();
            assert!(
                keys.iter()
                    .all(|k| ["language", "version", "aliases", "runtime"].contains(&k.as_str())),
                "only Piston's fields: {r}"
            );
            assert!(is_semver(&r["version"]), "{r}");
        }
        if installed("g++") {
            let cpp = list.iter().find(|r| r["language"] == "c++").expect("c++");
            assert_eq!(cpp["runtime"], "cpp");
        }
        if installed("node") {
            let js = list.iter().find(|r| r["language"] == "javascript");
            assert_eq!(js.map(|r| &r["runtime"]), Some(&json!("node")));
        }
    })
    .await;
}

#[tokio::test]
async fn python_runs_with_stdin_args_and_pistons_version_selectors() {
    bounded(90, async {
        let t = app(65910).await;
        let r = execute(
            &t,
            json!({
                "language": "python",
                "version": "3",
                "files": [{"content": "import sys\nname = input()\nprint(f'hello, {name}', sys.argv[1:])"}],
                "stdin": "world",
                "args": ["a", "b c"]
            }),
        )
        .await;
        assert_eq!(r["language"], "python", "the language, not the runtime: {r}");
        assert!(is_semver(&r["version"]), "{r}");
        assert!(r.get("compile").is_none(), "no compile stage: {r}");
        let run = &r["run"];
        assert_eq!(run["stdout"], "hello, world ['a', 'b c']\n", "{r}");
        assert_eq!(run["output"], run["stdout"]);
        assert_eq!(run["stderr"], "");
        assert_eq!(run["code"], 0);
        // Piston sends these as null rather than leaving them out.
        for key in ["signal", "status", "message"] {
            assert!(run[key].is_null() && run.get(key).is_some(), "{key}: {r}");
        }
        assert!(run["wall_time"].is_u64() && run["memory"].is_u64(), "{r}");

        // `version` is a semver range; the language, the runtime name or an alias selects.
        let version = r["version"].as_str().unwrap_or_default().to_string();
        for (language, selector) in [
            ("python3", "*"),
            ("python", "3.x"),
            ("py", "^3"),
            ("PYTHON", ">=3 <4"),
            ("python", version.as_str()),
        ] {
            let r = execute(
                &t,
                json!({"language": language, "version": selector,
                       "files": [{"content": "print(1)"}]}),
            )
            .await;
            assert_eq!(r["run"]["stdout"], "1\n", "{language} {selector}: {r}");
        }
        expect_400(
            &t,
            json!({"language": "python", "version": "2", "files": [{"content": "print(1)"}]}),
            "python-2 runtime is unknown",
        )
        .await;

        // A program that fails: its code and stderr, and `output` = stdout then stderr.
        let r = execute(
            &t,
            json!({"language": "python", "version": "*", "files": [{"content":
                "import sys\nprint('out')\nsys.stdout.flush()\nprint('err', file=sys.stderr)\nsys.exit(3)"}]}),
        )
        .await;
        let run = &r["run"];
        assert_eq!(
            (&run["code"], &run["status"], &run["signal"]),
            (&json!(3), &json!("RE"), &Value::Null),
            "{r}"
        );
        assert_eq!(run["output"], "out\nerr\n", "{r}");
        assert_eq!(run["message"], "Exited with error status 3");

        // Killed by a signal: no code, the signal's name.
        let r = execute(
            &t,
            json!({"language": "python", "version": "*", "files": [{"content":
                "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"}]}),
        )
        .await;
        let run = &r["run"];
        assert_eq!(
            (&run["code"], &run["signal"], &run["status"]),
            (&Value::Null, &json!("SIGSEGV"), &json!("SG")),
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn several_files_and_encodings() {
    bounded(60, async {
        let t = app(65920).await;
        // The first utf8 file runs; the others sit next to it (base64 and hex are data).
        let r = execute(
            &t,
            json!({
                "language": "python", "version": "*",
                "files": [
                    {"name": "data.bin", "content": "AAEC/w==", "encoding": "base64"},
                    {"name": "app.py", "content":
                        "from lib.util import twice\nprint(twice(2), list(open('data.bin','rb').read()), open('raw','rb').read())"},
                    {"name": "lib/util.py", "content": "def twice(n):\n    return 2 * n\n"},
                    {"name": "raw", "content": "6869", "encoding": "hex"}
                ]
            }),
        )
        .await;
        assert_eq!(r["run"]["stdout"], "4 [0, 1, 2, 255] b'hi'\n", "{r}");

        for (body, message) in [
            (
                json!({"language": "python", "version": "*", "files": [{"content": "AA==", "encoding": "base64"}]}),
                "files must include at least one utf8 encoded file",
            ),
            (
                json!({"language": "python", "version": "*", "files": []}),
                "files must include at least one utf8 encoded file",
            ),
        ] {
            expect_400(&t, body, message).await;
        }
        let (status, json) = t
            .post(
                "/api/v2/execute",
                &json!({"language": "python", "version": "*",
                        "files": [{"name": "../escape.py", "content": "print(1)"}]}),
            )
            .await;
        assert_eq!(status, 400, "{json}");
        assert!(json["message"].as_str().unwrap_or_default().contains("files[0]"), "{json}");
        assert_eq!(json.as_object().map(|o| o.len()), Some(1), "only `message`: {json}");
    })
    .await;
}

#[tokio::test]
async fn bash_with_args_and_stdin() {
    bounded(60, async {
        let t = app(65930).await;
        let r = execute(
            &t,
            json!({"language": "bash", "version": "*",
                   "files": [{"name": "run.sh", "content": "read -r line\necho \"$# args: $1, $2; stdin: $line\""}],
                   "args": ["one", "two words"], "stdin": "from stdin"}),
        )
        .await;
        assert_eq!(
            r["run"]["stdout"],
            "2 args: one, two words; stdin: from stdin\n",
            "{r}"
        );
        // Piston adds a newline to stdin that lacks one, even an empty one.
        let r = execute(
            &t,
            json!({"language": "sh", "version": "*", "files": [{"content": "od -c | head -1"}]}),
        )
        .await;
        assert!(
            r["run"]["stdout"].as_str().unwrap_or_default().contains("\\n"),
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn c_compiles_then_runs_and_a_compile_error_is_also_the_run() {
    if !installed_or_skip("gcc", "the C cases of the Piston API") {
        return;
    }
    bounded(120, async {
        let t = app(65940).await;
        let r = execute(
            &t,
            json!({"language": "c", "version": "*", "files": [{"name": "main.c", "content":
                "#include <stdio.h>\nint main(int argc, char **argv) { printf(\"%d %s\\n\", argc - 1, argv[1]); return 0; }"}],
                "args": ["x", "y"], "compile_timeout": 10000, "compile_memory_limit": -1}),
        )
        .await;
        assert_eq!(r["language"], "c");
        assert_eq!(r["compile"]["code"], 0, "{r}");
        assert!(r["compile"]["status"].is_null(), "{r}");
        assert_eq!(r["run"]["stdout"], "2 x\n", "{r}");

        let r = execute(
            &t,
            json!({"language": "c", "version": "*", "files": [{"content": "int main( {"}]}),
        )
        .await;
        let compile = &r["compile"];
        assert!(compile["code"].as_i64().is_some_and(|c| c != 0), "{r}");
        assert_eq!(compile["status"], "RE", "{r}");
        assert!(
            compile["stderr"].as_str().unwrap_or_default().contains("error"),
            "{r}"
        );
        // The program never ran: Piston answers the compile stage as `run` too.
        assert_eq!(r["run"], r["compile"], "{r}");

        // Compile limits can be lowered, never raised past the runtime's compile limits.
        let (status, json) = t
            .post(
                "/api/v2/execute",
                &json!({"language": "c", "version": "*", "files": [{"content": "int main(){}"}],
                        "compile_timeout": 10_000_000}),
            )
            .await;
        assert_eq!(status, 400, "{json}");
        assert!(
            json["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("compile_timeout cannot exceed the configured limit of "),
            "{json}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_run_timeout_kills_with_sigkill_and_status_to() {
    bounded(60, async {
        let t = app(65950).await;
        let started = std::time::Instant::now();
        let r = execute(
            &t,
            json!({"language": "python", "version": "*", "run_timeout": 500,
                   "files": [{"content": "print('spinning', flush=True)\nwhile True:\n    pass"}]}),
        )
        .await;
        let run = &r["run"];
        assert_eq!(run["status"], "TO", "{r}");
        assert_eq!(run["signal"], "SIGKILL", "{r}");
        assert!(run["code"].is_null(), "{r}");
        assert_eq!(run["stdout"], "spinning\n", "output so far is kept: {r}");
        assert!(
            run["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Time limit exceeded"),
            "{r}"
        );
        assert!(run["wall_time"].as_u64().is_some_and(|w| w >= 500), "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the limit applied"
        );

        // -1 means "no limit": here the runtime's maximum, so the program simply finishes.
        let r = execute(
            &t,
            json!({"language": "python", "version": "*", "run_timeout": -1, "run_memory_limit": -1,
                   "run_cpu_time": -1, "files": [{"content": "print('ok')"}]}),
        )
        .await;
        assert_eq!(r["run"]["stdout"], "ok\n", "{r}");
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_pistons_400_message() {
    bounded(60, async {
        let t = app(65960).await;
        let files = json!([{"content": "print(1)"}]);
        for (body, message) in [
            (json!({}), "language is required as a string".to_string()),
            (
                json!({"language": 3, "version": "*", "files": files}),
                "language is required as a string".into(),
            ),
            (
                json!({"language": "python", "files": files}),
                "version is required as a string".into(),
            ),
            (
                json!({"language": "python", "version": "*"}),
                "files is required as an array".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": [{"name": "a.py"}]}),
                "files[0].content is required as a string".into(),
            ),
            (
                json!({"language": "cobol", "version": "*", "files": files}),
                "cobol-* runtime is unknown".into(),
            ),
            (
                json!({"language": "python", "version": "not a range", "files": files}),
                "python-not a range runtime is unknown".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "run_timeout": "fast"}),
                "If specified, run_timeout must be a number".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "run_memory_limit": -5}),
                "run_memory_limit must be non-negative".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "run_timeout": 3_600_000}),
                "run_timeout cannot exceed the configured limit of 60000".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "run_memory_limit": 1000}),
                "run_memory_limit must be at least 16777216".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "args": [1, 2]}),
                "args must be an array of strings".into(),
            ),
            (
                json!({"language": "python", "version": "*", "files": files, "stdin": 5}),
                "stdin must be a string".into(),
            ),
        ] {
            expect_400(&t, body, &message).await;
        }
        let (status, json) = t.post_raw("/api/v2/execute", "{\"language\": ").await;
        assert_eq!(status, 400, "{json}");
        assert!(json["message"].is_string() && json.get("code").is_none(), "{json}");
    })
    .await;
}

#[tokio::test]
async fn bodies_labelled_text_plain_are_json_and_forms_are_refused() {
    bounded(60, async {
        let t = app(65970).await;
        let body = r#"{"language":"python","version":"*","files":[{"content":"print(42)"}]}"#;
        for content_type in [Some("text/plain;charset=UTF-8"), None] {
            let mut req = t.client.post("/api/v2/execute").body(body);
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let resp = req.send().await;
            assert_eq!(resp.0.status().as_u16(), 200, "{content_type:?}");
            let json: Value = resp.0.into_body().into_json().await.expect("JSON");
            assert_eq!(json["run"]["stdout"], "42\n", "{json}");
        }
        let resp = t
            .client
            .post("/api/v2/execute")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("language=python")
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 415);
        let json: Value = resp.0.into_body().into_json().await.expect("JSON");
        assert!(
            json["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("requests must be of type application/json"),
            "{json}"
        );
    })
    .await;
}

#[tokio::test]
async fn api_keys_guard_the_piston_routes_too() {
    bounded(60, async {
        let key = "piston-test-key-0123456789";
        let mut s = test_settings();
        s.sandbox.uid_base = 65980;
        s.server.api_keys = vec![key.to_string()];
        let t = app_with(s).await;
        let body =
            json!({"language": "python", "version": "*", "files": [{"content": "print(1)"}]});
        let (status, json) = t.post("/api/v2/execute", &body).await;
        assert_eq!(status, 401, "{json}");
        assert!(json["message"].is_string(), "{json}");
        let (status, _) = t.get("/api/v2/runtimes").await;
        assert_eq!(status, 401);
        let resp = t
            .client
            .post("/api/v2/execute")
            .header("authorization", format!("Bearer {key}"))
            .body_json(&body)
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 200);
    })
    .await;
}

/// The real `piston-client` package from npm (installed by `npm ci --prefix
/// tests/piston-client`, pinned in its package-lock.json) against the real binary.
#[tokio::test]
async fn the_piston_client_package_works_unchanged() {
    let dir = repo_path("tests/piston-client");
    if !installed("node") {
        println!("SKIPPED: the piston-client test (`node` is not installed)");
        return;
    }
    if !dir.join("node_modules/piston-client/package.json").exists() {
        println!(
            "SKIPPED: the piston-client test (run `npm ci --prefix tests/piston-client` first)"
        );
        return;
    }
    bounded(180, async {
        let daemon = common::start(&[("MDE_SANDBOX__UID_BASE", "65990")]).await;
        let output = tokio::process::Command::new("node")
            .arg(dir.join("run.mjs"))
            .arg(&daemon.base)
            .kill_on_drop(true)
            .output()
            .await
            .expect("node runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "node failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cases: std::collections::HashMap<String, Value> = stdout
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).expect("one JSON line per case");
                (
                    v["case"].as_str().unwrap_or_default().to_string(),
                    v["result"].clone(),
                )
            })
            .collect();
        let case = |name: &str| {
            cases
                .get(name)
                .unwrap_or_else(|| panic!("no `{name}` case in:\n{stdout}"))
        };

        let runtimes = case("runtimes");
        assert!(
            runtimes
                .as_array()
                .is_some_and(|l| l.iter().any(|r| r["language"] == "python")),
            "{runtimes}"
        );
        let r = case("python");
        assert_eq!(r["language"], "python", "{r}");
        assert_eq!(
            r["run"]["stdout"], "hello from python ['1', '2', '3']\n",
            "the client's default args: {r}"
        );
        let r = case("javascript-args");
        assert_eq!(r["language"], "javascript", "{r}");
        assert_eq!(r["run"]["stdout"], "a,b c\n", "{r}");
        let r = case("bash-stdin");
        assert_eq!(r["run"]["stdout"], "hello, piston\n", "{r}");
        assert_eq!(r["run"]["output"], "hello, piston\noops\n", "{r}");
        assert_eq!(r["run"]["code"], 3, "{r}");
        let r = case("python-files");
        assert_eq!(r["run"]["stdout"], "hi from a second file\n", "{r}");
        if installed_or_skip("gcc", "the C cases through piston-client") {
            let r = case("c");
            assert_eq!(r["run"]["stdout"], "3 1\n", "{r}");
            assert_eq!(r["compile"]["code"], 0, "{r}");
            let r = case("c-compile-error");
            assert!(r["compile"]["code"].as_i64().is_some_and(|c| c != 0), "{r}");
            assert_eq!(r["run"], r["compile"], "{r}");
        }
        let r = case("timeout");
        assert_eq!(
            (&r["run"]["status"], &r["run"]["signal"]),
            (&json!("TO"), &json!("SIGKILL")),
            "{r}"
        );
        let r = case("unknown-language");
        assert_eq!(r, &json!({"message": "version is required as a string"}));
    })
    .await;
}
