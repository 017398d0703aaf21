//! Drain on shutdown with real signal delivery: the daemon started in a process group of
//! its own, as a shell or systemd would, and the signal sent to the whole group (Ctrl-C in
//! a terminal is SIGINT to the foreground group). The run in flight must finish and answer
//! 200; `/ready` turns 503 at once; new submissions get 503 `shutting_down` with
//! `Retry-After`; a run that outlives the grace period is answered as killed by the
//! shutdown, never a bare 500.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::{bounded, command, free_port, wait_until_serving};
use serde_json::{Value, json};

/// A daemon led by its own process group (so the group signal misses the test).
struct GroupDaemon {
    child: std::process::Child,
    base: String,
}

impl GroupDaemon {
    async fn start(uid_base: &str, grace_seconds: &str) -> GroupDaemon {
        let port = free_port();
        let mut cmd = command(port);
        cmd.env("MDE_SANDBOX__UID_BASE", uid_base)
            .env("MDE_EXECUTION__MAX_CONCURRENT", "2")
            .env("MDE_SERVER__SHUTDOWN_GRACE_SECONDS", grace_seconds)
            .process_group(0);
        let child = cmd.spawn().expect("the binary starts");
        let mut daemon = GroupDaemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_until_serving(&mut daemon.child, &daemon.base, "/ready").await;
        daemon
    }

    /// Send `signal` to every process of the daemon's process group.
    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) on the group our child leads.
        let rc = unsafe { libc::kill(-(self.child.id() as i32), signal) };
        assert_eq!(rc, 0, "kill(-pgid) failed");
    }

    async fn ready(&self) -> (u16, Value) {
        let r = reqwest::get(format!("{}/ready", self.base))
            .await
            .expect("/ready answers");
        let status = r.status().as_u16();
        (status, r.json().await.expect("json"))
    }

    /// Wait until `n` executions run.
    async fn wait_running(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ready().await.1["running"].as_u64() != Some(n) {
            assert!(Instant::now() < deadline, "the run did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn exit_status(&mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut log = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut log);
        }
        (status, log)
    }
}

impl Drop for GroupDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn execute(base: &str, code: &str) -> tokio::task::JoinHandle<(u16, Option<String>, Value)> {
    let (url, body) = (
        format!("{base}/api/v1/execute"),
        json!({"runtime": "python3", "code": code, "limits": {"wall_time_ms": 30000}}),
    );
    tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("an answer, not a dropped connection");
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, retry, r.json().await.expect("a JSON body"))
    })
}

#[tokio::test]
async fn a_group_sigint_lets_the_run_in_flight_finish() {
    bounded(90, async {
        let mut daemon = GroupDaemon::start("58000", "20").await;
        let run = execute(
            &daemon.base,
            "import time\ntime.sleep(2.5)\nprint('finished after the signal')",
        );
        daemon.wait_running(1).await;
        let signalled = Instant::now();
        daemon.signal_group(libc::SIGINT);

        // Draining: not ready, and nothing new admitted, while the run goes on.
        let deadline = Instant::now() + Duration::from_secs(2);
        let ready = loop {
            let (status, body) = daemon.ready().await;
            if status == 503 {
                break body;
            }
            assert!(Instant::now() < deadline, "/ready still 200 after SIGINT");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(ready["draining"], true, "{ready}");
        assert_eq!(ready["running"], 1, "{ready}");
        let (status, retry, body) = execute(&daemon.base, "print(1)").await.expect("join");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "shutting_down", "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        let submit = reqwest::Client::new()
            .post(format!("{}/submit_code", daemon.base))
            .json(&json!({"code": "print(1)"}))
            .send()
            .await
            .expect("answer");
        assert_eq!(submit.status(), 503);
        assert!(submit.headers().contains_key("retry-after"));

        let (status, _, body) = run.await.expect("join");
        assert_eq!(status, 200, "the run in flight must finish: {body}");
        assert_eq!(body["run"]["status"], "ok", "{body}");
        assert_eq!(
            body["run"]["stdout"], "finished after the signal\n",
            "{body}"
        );
        let (exit, log) = daemon.exit_status(20).await;
        assert!(exit.success(), "exit status {exit}; log: {log}");
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "the daemon waited for the grace period although nothing ran"
        );
        assert!(log.contains("every in-flight execution finished"), "{log}");
    })
    .await;
}

#[tokio::test]
async fn a_run_past_the_grace_period_is_answered_as_killed_by_the_shutdown() {
    bounded(90, async {
        let mut daemon = GroupDaemon::start("58100", "1").await;
        let run = execute(&daemon.base, "import time\ntime.sleep(25)\nprint('never')");
        daemon.wait_running(1).await;
        let signalled = Instant::now();
        // systemd's KillMode=control-group sends SIGTERM to every process of the unit.
        daemon.signal_group(libc::SIGTERM);
        let (status, retry, body) = run.await.expect("join");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "shutting_down", "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("killed")),
            "{body}"
        );
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "answered after {:?}",
            signalled.elapsed()
        );
        let (exit, log) = daemon.exit_status(20).await;
        assert!(exit.success(), "exit status {exit}; log: {log}");
        assert!(log.contains("killing them"), "{log}");
    })
    .await;
}
