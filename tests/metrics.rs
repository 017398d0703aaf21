//! Prometheus metrics: what /metrics exports, that promtool accepts it, that every metric
//! the dashboard and alert rules use exists, and a real Prometheus scraping a real daemon.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{app_for_tests, bounded, repo_path};
use serde_json::{Value, json};

/// promtool/prometheus are required in CI (`scripts/install-deps.sh` installs them).
fn tool(name: &str) -> Option<&'static str> {
    let path: &'static str = match name {
        "promtool" => "/usr/bin/promtool",
        _ => "/usr/bin/prometheus",
    };
    if std::path::Path::new(path).exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is required in CI: run scripts/install-deps.sh"
    );
    println!("SKIPPED: {name} is not installed (scripts/install-deps.sh installs it)");
    None
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn exercised_app() -> (common::TestApp, String) {
    let t = app_for_tests().await;
    t.submit("print('ok')", None).await;
    t.submit("raise SystemExit(3)", None).await;
    t.execute(json!({"code": "import time; time.sleep(5)", "limits": {"wall_time_ms": 200}}))
        .await;
    let _ = t.post_raw("/submit_code", "{broken").await;
    let _ = t
        .post("/submit_code", &json!({"code": "x", "runtime": "cobol"}))
        .await;
    let _ = t
        .post(
            "/api/v1/execute",
            &json!({"code": "x", "limits": {"memory_bytes": 1u64 << 40}}),
        )
        .await;
    let (status, text) = t.get("/metrics").await;
    assert_eq!(status, 200);
    (t, text)
}

#[tokio::test]
async fn metrics_count_every_outcome_and_rejection() {
    bounded(60, async {
        let (_t, text) = exercised_app().await;
        let py = |outcome: &str| {
            sample(
                &text,
                &format!("mde_executions_total{{outcome=\"{outcome}\",runtime=\"python3\"}}"),
            )
        };
        assert_eq!(py("ok"), Some(1.0), "{text}");
        assert_eq!(py("runtime_error"), Some(1.0));
        assert_eq!(py("timeout"), Some(1.0));
        assert_eq!(py("memory_limit"), Some(0.0), "series exist at zero");
        assert_eq!(
            sample(
                &text,
                "mde_execution_failures_total{reason=\"timeout\",runtime=\"python3\"}"
            ),
            Some(1.0)
        );
        let rejected = |reason: &str| {
            sample(
                &text,
                &format!("mde_requests_rejected_total{{reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(rejected("bad_request"), Some(1.0));
        assert_eq!(rejected("unknown_runtime"), Some(1.0));
        assert_eq!(rejected("limit_exceeded"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                "mde_execution_duration_seconds_count{runtime=\"python3\"}"
            ),
            Some(3.0)
        );
        assert_eq!(sample(&text, "mde_queue_wait_seconds_count"), Some(3.0));
        assert_eq!(sample(&text, "mde_capacity_slots"), Some(2.0));
        assert_eq!(sample(&text, "mde_executions_in_flight"), Some(0.0));
        assert_eq!(
            sample(&text, "mde_runtime_available{runtime=\"python3\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mde_build_info{version=\"0.1.0\"}"),
            Some(1.0)
        );
        assert!(text.contains("process_resident_memory_bytes"));
        assert!(text.contains("process_open_fds"));
        assert!(text.contains("mde_execution_peak_memory_bytes_bucket"));
        assert!(text.contains("mde_execution_output_bytes_bucket"));
    })
    .await;
}

#[tokio::test]
async fn promtool_accepts_a_live_scrape() {
    bounded(60, async {
        let Some(promtool) = tool("promtool") else {
            return;
        };
        let (_t, text) = exercised_app().await;
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs");
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("write");
        }
        let out = child.wait_with_output().expect("promtool finishes");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}

/// Metric names in PromQL expressions (identifiers that start like ours or are `up`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if current.starts_with("mde_") || current.starts_with("process_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| current.strip_suffix(s))
                    .unwrap_or(&current)
                    .to_string();
                names.insert(base);
            }
            current.clear();
        }
    }
    names
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if matches!(k.as_str(), "expr" | "query" | "definition") && v.is_string() {
                    out.push(v.as_str().unwrap_or_default().to_string());
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_metric_in_the_dashboard_and_rules_is_exported() {
    bounded(60, async {
        let (_t, text) = exercised_app().await;
        let exported: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_string)
            .collect();

        let mut exprs = Vec::new();
        let dashboard: Value = serde_json::from_str(
            &std::fs::read_to_string(repo_path(
                "monitoring/grafana/dashboards/mixed-docker-executor.json",
            ))
            .expect("dashboard"),
        )
        .expect("dashboard JSON");
        collect_exprs(&dashboard, &mut exprs);
        let dashboard_count = exprs.len();
        assert!(
            dashboard_count >= 10,
            "dashboard has only {dashboard_count} queries"
        );
        // Every identifier anywhere in the rules file (expressions span several lines).
        let rules = std::fs::read_to_string(repo_path("monitoring/alerts.yml")).expect("rules");
        let in_rules = metric_names(&rules);
        for name in [
            "mde_executions_total",
            "mde_queue_depth",
            "mde_execution_duration_seconds",
        ] {
            assert!(
                in_rules.contains(name),
                "rules no longer use {name}: {in_rules:?}"
            );
        }
        exprs.push(rules);
        let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(missing.is_empty(), "used but not exported: {missing:?}");
    })
    .await;
}

struct Killed(Child);

impl Drop for Killed {
    /// SIGTERM first, so the daemon (and Prometheus) shut down cleanly.
    fn drop(&mut self) {
        common::stop_gracefully(&mut self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn wait_http(url: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !reqwest::get(url)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "{url} did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_daemon_with_the_shipped_config() {
    bounded(180, async {
        let Some(prometheus) = tool("prometheus") else { return };
        let daemon_port = free_port();
        let _daemon = Killed(
            Command::new(env!("CARGO_BIN_EXE_mixed-docker-executor"))
                .current_dir(repo_path(""))
                .env("MDE_SERVER__PORT", daemon_port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("daemon starts"),
        );
        let base = format!("http://127.0.0.1:{daemon_port}");
        wait_http(&format!("{base}/health"), 30).await;

        // The shipped config and rules, pointed at this daemon and scraping faster.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = std::fs::read_to_string(repo_path("monitoring/prometheus.yml"))
            .expect("config")
            .replace("127.0.0.1:8000", &format!("127.0.0.1:{daemon_port}"))
            .replace("scrape_interval: 5s", "scrape_interval: 1s");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write");
        std::fs::copy(repo_path("monitoring/alerts.yml"), dir.path().join("alerts.yml")).expect("copy");
        let prom_port = free_port();
        let _prom = Killed(
            Command::new(prometheus)
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("prometheus starts"),
        );
        let prom = format!("http://127.0.0.1:{prom_port}");
        wait_http(&format!("{prom}/-/ready"), 60).await;

        let client = reqwest::Client::new();
        let submit = |code: &'static str| {
            let client = client.clone();
            let url = format!("{base}/api/v1/execute");
            async move {
                client
                    .post(url)
                    .json(&json!({"code": code, "limits": {"wall_time_ms": 300}}))
                    .send()
                    .await
                    .expect("submit")
                    .status()
            }
        };
        for code in ["print(1)", "print(2)", "print(3)", "raise SystemExit(1)", "raise SystemExit(2)", "import time; time.sleep(3)"] {
            assert_eq!(submit(code).await, 200);
        }

        let query = |q: &'static str| {
            let client = client.clone();
            let url = format!("{prom}/api/v1/query");
            async move {
                let v: Value = client
                    .get(url)
                    .query(&[("query", q)])
                    .send()
                    .await
                    .expect("query")
                    .json()
                    .await
                    .expect("json");
                v["data"]["result"].as_array().cloned().unwrap_or_default()
            }
        };
        let expected = [("ok", "3"), ("runtime_error", "2"), ("timeout", "1")];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = query("sum by (outcome) (mde_executions_total{job=\"mixed-docker-executor\",runtime=\"python3\"})").await;
            let got: Vec<(String, String)> = result
                .iter()
                .map(|r| {
                    (
                        r["metric"]["outcome"].as_str().unwrap_or_default().to_string(),
                        r["value"][1].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            let all_match = expected
                .iter()
                .all(|(o, n)| got.iter().any(|(go, gn)| go == o && gn == n));
            if all_match {
                break;
            }
            assert!(Instant::now() < deadline, "Prometheus never saw the expected counts: {got:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let up = query("up{job=\"mixed-docker-executor\"}").await;
        assert_eq!(up.first().map(|r| r["value"][1].clone()), Some(Value::from("1")));

        // The shipped alert rules loaded and evaluate without errors.
        let rules: Value = client
            .get(format!("{prom}/api/v1/rules"))
            .send()
            .await
            .expect("rules")
            .json()
            .await
            .expect("json");
        let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
        let count: usize = groups.iter().map(|g| g["rules"].as_array().map_or(0, Vec::len)).sum();
        assert!(count >= 6, "alert rules not loaded: {rules}");
    })
    .await;
}
