//! The execution core: requests, stages, limits and reports, the shared runner, and the sandbox
//! backends. Nothing here knows about HTTP or Prometheus; outcomes leave through
//! [`ExecutionObserver`].

mod admission;
mod cgroup;
pub(crate) mod child;
mod engine;
mod launcher;
mod limits;
mod observer;
mod report;
mod runner;
pub mod sandbox;
mod slots;
mod stage_exec;
mod warm;

use std::sync::Arc;

pub use admission::Busy;
pub use engine::{Executor, ExecutorInfo};
pub use launcher::{LAUNCHER_ARG, launcher_main, this_binary_serves_helpers};
pub use limits::{LimitExceeded, Limits, LimitsOverride};
pub use observer::{ExecutionObserver, NoopObserver};
pub use report::{ExecutionReport, LimitKind, StageReport, StageStatus, without_host_paths};
pub use slots::MemoryEnforcement;
pub use stage_exec::{STAGE_EXEC_ARG, stage_exec_main};

use crate::runtimes::Runtime;

/// A file of a submission, placed in the work dir before any stage runs.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub content: Vec<u8>,
}

/// Everything needed to run one submission.
#[derive(Debug, Clone)]
pub struct ExecutionRequest {
    /// The runtime resolved when the request arrived; a reload does not change it.
    pub runtime: Arc<Runtime>,
    /// Files to write; `entry` names the one the run command gets as `{file}`.
    pub files: Vec<SourceFile>,
    pub entry: String,
    pub stdin: Vec<u8>,
    pub args: Vec<String>,
    /// Limits of the run stage (compile stages use the runtime's compile limits).
    pub limits: Limits,
}

impl ExecutionRequest {
    /// The common single-file case: `code` saved under the runtime's file name.
    pub fn single_file(runtime: Arc<Runtime>, code: impl Into<Vec<u8>>) -> Self {
        let entry = runtime.file_name.clone();
        let limits = runtime.limits;
        ExecutionRequest {
            files: vec![SourceFile {
                name: entry.clone(),
                content: code.into(),
            }],
            entry,
            runtime,
            stdin: Vec::new(),
            args: Vec::new(),
            limits,
        }
    }

    /// Checks that need the whole request: names that collide (a file where another needs a
    /// directory), files that could not fit in the work dir, and arguments the kernel would
    /// refuse to exec (so a warm interpreter, which gets them through a pipe, and a cold
    /// start, which execs, answer the same).
    pub fn validate(&self) -> Result<(), String> {
        if self.args.len() > MAX_ARGS {
            return Err(format!(
                "{} arguments, more than the maximum of {MAX_ARGS}",
                self.args.len()
            ));
        }
        if let Some((i, _)) = self
            .args
            .iter()
            .enumerate()
            .find(|(_, a)| a.len() > MAX_ARG_BYTES || a.contains('\0'))
        {
            return Err(format!(
                "`args[{i}]` is longer than the maximum of {MAX_ARG_BYTES} bytes or holds a NUL"
            ));
        }
        let arg_bytes: usize = self.args.iter().map(|a| a.len() + 1).sum();
        if arg_bytes > MAX_ARGS_TOTAL_BYTES {
            return Err(format!(
                "the arguments hold {arg_bytes} bytes, more than the maximum of {MAX_ARGS_TOTAL_BYTES}"
            ));
        }
        let mut total: u64 = 0;
        for (i, file) in self.files.iter().enumerate() {
            validate_file_name(&file.name)?;
            total += file.content.len() as u64;
            for other in &self.files[i + 1..] {
                let (a, b) = (&file.name, &other.name);
                if a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/")) {
                    return Err(format!("file names `{a}` and `{b}` collide"));
                }
            }
        }
        if total > self.limits.workdir_bytes {
            return Err(format!(
                "the files hold {total} bytes, more than the work dir's {} (limit `workdir_bytes`)",
                self.limits.workdir_bytes
            ));
        }
        Ok(())
    }
}

/// Arguments per request at most.
pub const MAX_ARGS: usize = 1024;
/// One argument at most: below the kernel's 128 KiB per exec string (`MAX_ARG_STRLEN`).
pub const MAX_ARG_BYTES: usize = 64 * 1024;
/// All arguments together at most (with their NULs): well inside the kernel's exec limit
/// next to the runtime's own command and environment.
pub const MAX_ARGS_TOTAL_BYTES: usize = 256 * 1024;

/// A submitted file name must stay inside the work dir: relative, no `..`, no empty or hidden
/// tricks, at most a few levels deep.
pub fn validate_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("file name must be 1-255 bytes".into());
    }
    if name.starts_with('/') {
        return Err(format!("file name `{name}` must be relative, not absolute"));
    }
    if name.contains('\0') || name.contains('\\') {
        return Err(format!("file name `{name}` contains a forbidden character"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 8 {
        return Err(format!("file name `{name}` is nested too deeply"));
    }
    for part in parts {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!(
                "file name `{name}` must not contain empty, `.` or `..` components"
            ));
        }
    }
    Ok(())
}

/// Errors that stop a submission before or outside its stages.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The client went away while the submission was queued; it never ran.
    #[error("the client went away while the submission waited for a slot")]
    Abandoned,
    #[error("internal error: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::validate_file_name;

    #[test]
    fn file_names_cannot_escape_the_work_dir() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(validate_file_name(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["main.py", "src/lib.rs", "Main.java", ".hidden"] {
            assert!(
                validate_file_name(good).is_ok(),
                "{good:?} must be accepted"
            );
        }
    }
}
