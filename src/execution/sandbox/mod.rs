//! Sandbox backends. A backend only *builds* the command for a stage; spawning, pipes,
//! limits, timeouts and killing are shared code in the runner (as in rust-playground's
//! orchestrator), so every backend gets the same enforcement.

mod bwrap;
pub(crate) mod child;
mod process;
pub(crate) mod seccomp;
pub(crate) mod stage_exec;
pub(crate) mod zygote;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use bwrap::BwrapBackend;
pub(crate) use bwrap::ZYGOTE_CONTROL_FD;
pub use process::ProcessBackend;

use crate::config::BackendKind;

/// What a stage should run, independent of the backend.
#[derive(Debug)]
pub struct StagePlan<'a> {
    /// The command with placeholders filled; `argv[0]` is an absolute path.
    pub argv: Vec<String>,
    /// Environment on top of the sandbox's base (PATH, HOME, TMPDIR, LANG).
    pub env: &'a [(String, String)],
    /// Extra read-only host paths this runtime needs.
    pub ro_binds: &'a [PathBuf],
    /// Host files bound read-only at another path inside (source, destination).
    pub ro_binds_at: &'a [(PathBuf, PathBuf)],
    /// The slot's host directory holding `box/` (work dir) and `tmp/`.
    pub slot_dir: &'a Path,
    /// PATH inside the sandbox.
    pub path: &'a str,
}

/// A fully built command, ready for the runner to spawn.
#[derive(Debug)]
pub struct SandboxCommand {
    /// Its first process (bubblewrap, then the stage-exec helper as pid 1) must never be
    /// the OOM killer's choice inside the slot's memory cgroup: killing it would lose the
    /// run's status. The helper gives the stage it forks the maximum score.
    pub oom_protected: bool,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// Descriptors the child must inherit: the runner places `pass_fds[i]` at
    /// `PASS_FD_BASE + i` in the child, whatever its number here.
    pub pass_fds: Vec<OwnedFd>,
}

pub trait SandboxBackend: Send + Sync {
    fn kind(&self) -> BackendKind;
    fn build(&self, plan: &StagePlan<'_>) -> Result<SandboxCommand, SandboxError>;
}

/// Why a sandbox cannot be built or set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// bubblewrap is missing; the message says how to install it or opt out.
    #[error(
        "bubblewrap (`{0}`) is not installed. Install it with `apt-get install bubblewrap`, or opt out of isolation with MDE_SANDBOX__BACKEND=process (development only)"
    )]
    BwrapMissing(PathBuf),
    #[error("seccomp: {0}")]
    Seccomp(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the stage's command is empty")]
    EmptyCommand,
}

impl SandboxError {
    /// The last OS error, as the failure of `what`.
    pub(crate) fn last_os(what: &'static str) -> SandboxError {
        SandboxError::Io {
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    pub(crate) fn seccomp(e: impl std::error::Error + Send + Sync + 'static) -> SandboxError {
        SandboxError::Seccomp(Box::new(e))
    }
}

/// The environment of a stage inside a bubblewrap sandbox: the base plus the runtime's.
pub(crate) fn sandboxed_env(
    path: &str,
    runtime_env: &[(String, String)],
) -> Vec<(OsString, OsString)> {
    let mut env = base_env(path, Path::new("/box"), Path::new("/tmp"));
    env.extend(runtime_env.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

/// The environment every stage starts from; nothing of the daemon's environment leaks in.
fn base_env(path: &str, home: &Path, tmp: &Path) -> Vec<(OsString, OsString)> {
    vec![
        ("PATH".into(), path.into()),
        ("HOME".into(), home.into()),
        ("TMPDIR".into(), tmp.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
    ]
}
