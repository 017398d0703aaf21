//! Layered configuration and runtimes.toml validation: bad input stops start-up with a
//! message that names the key (and for runtimes, the file and entry).

mod common;

use common::{app_with, bounded, env, repo_path, test_settings};
use mixed_docker_executor::app::App;
use mixed_docker_executor::config::{BackendKind, Settings};

#[test]
fn defaults_then_file_then_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "[server]\nport = 9100\nhost = \"0.0.0.0\"\n[limits]\nwall_time_ms = 5000\n",
    )
    .expect("write");

    let defaults = Settings::load(None, env(&[])).expect("defaults load");
    assert_eq!(defaults.server.port, 8000);
    assert_eq!(defaults.server.host.to_string(), "127.0.0.1");
    assert_eq!(defaults.sandbox.backend, BackendKind::Bwrap);

    let from_file = Settings::load(Some(&file), env(&[])).expect("file loads");
    assert_eq!(from_file.server.port, 9100);
    assert_eq!(from_file.limits.wall_time_ms, 5000);

    let from_env = Settings::load(
        Some(&file),
        env(&[
            ("MDE_SERVER__PORT", "9000"),
            ("MDE_SANDBOX__BACKEND", "process"),
            ("MDE_LIMITS__MEMORY_BYTES", "134217728"),
            ("UNRELATED", "ignored"),
        ]),
    )
    .expect("env loads");
    assert_eq!(from_env.server.port, 9000, "environment beats the file");
    assert_eq!(
        from_env.server.host.to_string(),
        "0.0.0.0",
        "the file beats defaults"
    );
    assert_eq!(from_env.sandbox.backend, BackendKind::Process);
    assert_eq!(from_env.limits.memory_bytes, 134_217_728);
}

#[test]
fn invalid_values_name_their_key() {
    let cases = [
        (vec![("MDE_SERVER__PORT", "not-a-port")], "port"),
        (vec![("MDE_SANDBOX__BACKEND", "chroot")], "backend"),
        (
            vec![("MDE_LIMITS__WALL_TIME_MS", "0")],
            "limits.wall_time_ms",
        ),
        (
            vec![("MDE_LIMITS__MEMORY_BYTES", "999999999999999")],
            "limits.memory_bytes",
        ),
        (
            vec![("MDE_SERVER__MAX_BODY_BYTES", "10")],
            "server.max_body_bytes",
        ),
    ];
    for (vars, key) in cases {
        let err = Settings::load(None, env(&vars)).expect_err("must be refused");
        let message = err.to_string();
        assert!(message.contains(key), "{message:?} should name {key}");
    }
}

#[test]
fn unknown_keys_in_the_config_file_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[server]\nprot = 9100\n").expect("write");
    let err = Settings::load(Some(&file), env(&[])).expect_err("typo refused");
    assert!(err.to_string().contains("prot"), "{err}");
}

async fn build_with_runtimes(toml: &str) -> Result<App, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("runtimes.toml");
    std::fs::write(&file, toml).expect("write");
    let mut s = test_settings();
    s.runtimes.file = file;
    App::build(s).await.map_err(|e| e.to_string())
}

const PY: &str = "[[runtime]]\nname = \"python3\"\nlanguage = \"python\"\nfile_name = \"main.py\"\nrun = [\"python3\", \"{file}\"]\n";

#[tokio::test]
async fn runtimes_file_errors_name_file_entry_and_key() {
    bounded(30, async {
        let err = build_with_runtimes(&format!("default = \"python3\"\n{PY}comand = [\"x\"]\n"))
            .await
            .err()
            .expect("unknown key refused");
        assert!(
            err.contains("runtimes.toml") && err.contains("comand"),
            "{err}"
        );

        let err = build_with_runtimes(&format!("default = \"python3\"\n{PY}{PY}"))
            .await
            .err()
            .expect("duplicate refused");
        assert!(
            err.contains("duplicate") && err.contains("python3") && err.contains("name"),
            "{err}"
        );

        let err = build_with_runtimes(&format!("default = \"ruby\"\n{PY}"))
            .await
            .err()
            .expect("missing default refused");
        assert!(err.contains("default") && err.contains("ruby"), "{err}");

        let err = build_with_runtimes(&format!(
            "default = \"python3\"\n{PY}[runtime.limits]\nmemory_bytes = 999999999999\n"
        ))
        .await
        .err()
        .expect("limit over the server maximum refused");
        assert!(
            err.contains("limits.memory_bytes") && err.contains("python3"),
            "{err}"
        );

        let err = build_with_runtimes(&format!(
            "default = \"python3\"\n{PY}file_name = \"../x.py\"\n"
        ))
        .await
        .err()
        .expect("bad key set twice or bad path refused");
        assert!(err.contains("runtimes.toml"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_runtime_that_is_not_installed_is_reported_and_refused_with_422() {
    bounded(30, async {
        let toml = format!(
            "default = \"python3\"\n{PY}\n[[runtime]]\nname = \"cobol\"\nlanguage = \"cobol\"\n\
             file_name = \"main.cob\"\nrun = [\"no-such-cobol-compiler\", \"{{file}}\"]\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("runtimes.toml");
        std::fs::write(&file, toml).expect("write");
        let mut s = test_settings();
        s.runtimes.file = file;
        let t = app_with(s).await;

        let (status, body) = t.get("/api/v1/runtimes").await;
        assert_eq!(status, 200);
        let list: serde_json::Value = serde_json::from_str(&body).expect("json");
        let cobol = list
            .as_array()
            .and_then(|l| l.iter().find(|r| r["name"] == "cobol"))
            .expect("cobol listed");
        assert_eq!(cobol["available"], false);
        assert!(
            cobol["unavailable_reason"]
                .as_str()
                .unwrap_or("")
                .contains("no-such-cobol-compiler")
        );

        let (status, body) = t
            .post(
                "/submit_code",
                &serde_json::json!({"code": "x", "runtime": "cobol"}),
            )
            .await;
        assert_eq!(status, 422);
        assert_eq!(body["code"], "runtime_unavailable");
    })
    .await;
}

#[test]
fn the_shipped_runtimes_file_is_valid() {
    let text = std::fs::read_to_string(repo_path("runtimes.toml")).expect("read");
    let parsed: mixed_docker_executor::runtimes::RuntimesFile =
        toml::from_str(&text).expect("runtimes.toml parses");
    assert_eq!(parsed.default, "python3");
    for name in [
        "python3", "node", "bash", "perl", "ruby", "php", "lua", "c", "cpp", "java", "rust", "go",
    ] {
        assert!(
            parsed.runtimes.iter().any(|r| r.name == name),
            "runtimes.toml lacks {name}"
        );
    }
}
