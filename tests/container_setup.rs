//! What the shipped container and service files promise, checked on this host: nothing
//! operator-owned is visible to a submission (the image's host-code path lies outside every
//! sandbox bind, and a file placed there is invisible to a run), a host where bubblewrap
//! cannot mount /proc gets a start-up error naming the flag that fixes it, and the systemd
//! unit passes `systemd-analyze verify` with the drain's settings.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{app_with, bounded, command, free_port, repo_path, test_settings};
use serde_json::json;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The image's host-code directory: the target of `COPY host_code/ DIR` in the Dockerfile.
fn image_host_code_dir() -> PathBuf {
    let dockerfile = read("Dockerfile");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY host_code/"))
        .expect("the Dockerfile copies host_code/");
    let dir = line
        .split_whitespace()
        .nth(2)
        .expect("a destination")
        .trim_end_matches('/');
    PathBuf::from(dir)
}

/// Every path a bubblewrap sandbox binds from the host, with the repo's runtimes.
fn sandbox_binds() -> Vec<PathBuf> {
    let mut binds = mixed_docker_executor::config::Settings::default()
        .sandbox
        .ro_binds;
    for line in read("runtimes.toml").lines() {
        if let Some(list) = line.trim().strip_prefix("ro_binds = ") {
            let list: Vec<String> = serde_json::from_str(list).expect("a list of strings");
            binds.extend(list.into_iter().map(PathBuf::from));
        }
    }
    // The merged-/usr links, bound when they are directories.
    binds.extend(["/bin", "/sbin", "/lib", "/lib64"].map(PathBuf::from));
    binds
}

#[test]
fn the_host_code_path_is_the_same_everywhere_and_outside_every_bind() {
    let dir = image_host_code_dir();
    for bind in sandbox_binds() {
        assert!(
            !dir.starts_with(&bind),
            "{} is under {}, which every sandbox binds",
            dir.display(),
            bind.display()
        );
    }
    let mount = format!(":{}", dir.display());
    for file in [
        "monitoring/docker-compose.yml",
        "docker/README.md",
        "Dockerfile",
    ] {
        assert!(
            read(file).contains(&mount),
            "{file} does not mount host_code at {}",
            dir.display()
        );
        assert!(
            !read(file).contains(":/usr/"),
            "{file} still mounts something under /usr, which every sandbox binds"
        );
    }
}

/// Create `dir` (and missing parents) with a secret file; remove what was created on drop.
struct Planted {
    created: Option<PathBuf>,
    file: PathBuf,
}

impl Planted {
    fn new(dir: &Path, content: &str) -> Planted {
        let created = dir
            .ancestors()
            .filter(|a| !a.exists())
            .last()
            .map(Path::to_path_buf);
        std::fs::create_dir_all(dir).expect("create the directory");
        let file = dir.join(format!("operator-secret-{}.txt", std::process::id()));
        std::fs::write(&file, content).expect("plant the file");
        Planted { created, file }
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Python that reports, for `path` and each of its parents, whether the run sees it.
fn probe(path: &Path) -> String {
    format!(
        "import os\np = {:?}\nwhile p != '/':\n    print(p, os.path.exists(p))\n    p = os.path.dirname(p)\ntry:\n    print('content', open({:?}).read())\nexcept OSError as e:\n    print('open failed', type(e).__name__)\n",
        path.display().to_string(),
        path.display().to_string()
    )
}

#[tokio::test]
async fn a_file_under_the_host_code_path_is_invisible_to_a_run() {
    if !common::installed_or_skip("bwrap", "the host-code attack") {
        return;
    }
    bounded(120, async {
        let mut settings = test_settings();
        settings.sandbox.uid_base = 58500;
        let app = app_with(settings).await;

        let secret = "operator-only-3f9c1e";
        let planted = Planted::new(&image_host_code_dir(), secret);
        let out = app
            .execute(json!({"runtime": "python3", "code": probe(&planted.file)}))
            .await;
        let stdout = out["run"]["stdout"].as_str().unwrap_or_default();
        assert!(!stdout.contains(secret), "the run read the file: {out}");
        assert!(stdout.contains("open failed"), "{out}");
        assert!(
            !stdout.contains(" True"),
            "the run sees part of the path: {out}"
        );

        // The control: the same file under the old place, /usr/src/app, is visible (the
        // attack of the issue), so the probe above can tell.
        let control = Planted::new(
            Path::new(&format!("/usr/src/app-mde-test-{}", std::process::id())),
            secret,
        );
        let out = app
            .execute(json!({"runtime": "python3", "code": probe(&control.file)}))
            .await;
        let stdout = out["run"]["stdout"].as_str().unwrap_or_default();
        assert!(
            stdout.contains(secret),
            "the control file under /usr should be readable: {out}"
        );
    })
    .await;
}

#[test]
fn a_masked_proc_is_refused_at_start_naming_the_flag_that_fixes_it() {
    if !common::installed_or_skip("bwrap", "the masked /proc start-up error")
        || !common::installed_or_skip("unshare", "the masked /proc start-up error")
    {
        return;
    }
    // As docker and podman do without `systempaths=unconfined`: /proc/sys read-only.
    let binary = command(free_port());
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"",
        )
        .arg("sh")
        .arg(binary.get_program())
        .current_dir(repo_path(""))
        .envs(binary.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("MDE_SANDBOX__UID_BASE", "58600");
    let output = cmd.output().expect("runs");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "started under a masked /proc: {text}"
    );
    assert!(text.contains("Can't mount proc"), "{text}");
    assert!(text.contains("systempaths=unconfined"), "{text}");
    assert!(text.contains("procMount: Unmasked"), "{text}");
    assert!(text.contains("MDE_SANDBOX__BACKEND=process"), "{text}");
}

/// `Key=value` of the unit (the last one wins, as in systemd).
fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

#[test]
fn the_systemd_unit_verifies_and_matches_the_drain() {
    let unit = read("deploy/systemd/mixed-docker-executor.service");
    // SIGTERM to the daemon alone: control-group would send it to every process of the
    // unit, including the submissions themselves.
    assert_eq!(unit_value(&unit, "KillMode").as_deref(), Some("mixed"));
    let grace = mixed_docker_executor::config::Settings::default()
        .server
        .shutdown_grace_seconds;
    let stop: u64 = unit_value(&unit, "TimeoutStopSec")
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop >= grace + 15,
        "TimeoutStopSec={stop}s leaves no time after a {grace} s drain to answer and clean up"
    );
    assert!(
        unit_value(&unit, "CapabilityBoundingSet").is_some_and(|c| c.contains("CAP_SYS_ADMIN"))
    );
    if !Path::new("/usr/bin/systemd-analyze").exists()
        && !Path::new("/bin/systemd-analyze").exists()
    {
        println!("SKIPPED: systemd-analyze verify (`systemd-analyze` is not installed)");
        return;
    }
    // verify wants ExecStart's binary to exist: point it at the one just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("mixed-docker-executor.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/mixed-docker-executor",
            env!("CARGO_BIN_EXE_mixed-docker-executor"),
        ),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // systemd ignores (and only warns about) a key it cannot parse: any line about the
    // unit is a failure.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("mixed-docker-executor.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
