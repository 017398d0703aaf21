//! Availability probe: is each runtime's command installed, and which version is it?
//!
//! Commands are resolved against the sandbox's PATH, not the daemon's, because that is where
//! they will run. Version commands are trusted config, so they run unsandboxed, bounded by a
//! short timeout, all runtimes in parallel.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Availability, Runtime};

const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolve `program` like `execvp` would with `path` as PATH.
pub(crate) fn resolve_command(program: &str, path: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| is_exec(p))
}

pub(super) async fn probe_all(runtimes: Vec<Runtime>, path: &str) -> Vec<Runtime> {
    let tasks: Vec<_> = runtimes
        .into_iter()
        .map(|runtime| {
            let path = path.to_string();
            tokio::spawn(async move { probe_one(runtime, &path).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(runtime) => out.push(runtime),
            Err(e) => tracing::error!(error = %e, "runtime probe task failed"),
        }
    }
    out
}

async fn probe_one(mut runtime: Runtime, path: &str) -> Runtime {
    let mut commands = vec![("run", runtime.run[0].clone())];
    if let Some(compile) = &runtime.compile {
        commands.push(("compile", compile[0].clone()));
    }
    for (stage, program) in commands {
        // `./name` is built by the compile stage inside the work dir.
        if program.starts_with("./") {
            continue;
        }
        if resolve_command(&program, path).is_none() {
            runtime.availability = Availability {
                available: false,
                reason: Some(format!(
                    "{stage} command `{program}` is not installed (searched PATH {path})"
                )),
            };
            return runtime;
        }
    }
    if runtime.version.is_none()
        && let Some(command) = runtime.version_command.clone()
    {
        runtime.version = detect_version(&command, path).await;
        if runtime.version.is_none() {
            // Say so: otherwise `/api/v1/runtimes` shows `version` missing with no clue
            // (mawk, Debian's awk, refuses `--version`; it wants `-W version`).
            tracing::warn!(runtime = %runtime.name, command = ?command,
                    "the version command printed no version (wrong flag, or a timeout)");
        }
    }
    runtime
}

async fn detect_version(command: &[String], path: &str) -> Option<String> {
    let program = resolve_command(command.first()?, path)?;
    let output = tokio::time::timeout(
        VERSION_TIMEOUT,
        tokio::process::Command::new(program)
            .args(&command[1..])
            .env_clear()
            .env("PATH", path)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    // Some tools print their version on stderr (java, older python).
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    extract_version(&text)
}

/// The first dotted number in `text`: `Python 3.11.2` gives `3.11.2`, `go1.19.8` gives `1.19.8`.
pub(crate) fn extract_version(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let candidate = text[start..i].trim_end_matches('.');
            if candidate.contains('.') {
                return Some(candidate.to_string());
            }
        } else {
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_extracted_from_typical_banners() {
        assert_eq!(extract_version("Python 3.11.2").as_deref(), Some("3.11.2"));
        assert_eq!(
            extract_version("go version go1.19.8 linux/amd64").as_deref(),
            Some("1.19.8")
        );
        assert_eq!(extract_version("v20.20.2\n").as_deref(), Some("20.20.2"));
        assert_eq!(extract_version("no digits here"), None);
    }

    #[test]
    fn commands_resolve_against_the_given_path_only() {
        assert!(resolve_command("sh", "/usr/bin:/bin").is_some());
        assert!(resolve_command("sh", "/nonexistent").is_none());
        assert!(resolve_command("definitely-not-a-command-xyz", "/usr/bin").is_none());
    }
}
