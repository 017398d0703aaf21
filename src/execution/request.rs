//! What a submission asks for: files, stdin, args and limits for one runtime, checked as a
//! whole before anything runs; and the errors that stop a submission outside its stages.

use std::sync::Arc;

use crate::limits::Limits;
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
    /// The common single-file case: `code` saved under the runtime's file name (for Java,
    /// its public class's name).
    pub fn single_file(runtime: Arc<Runtime>, code: impl Into<Vec<u8>>) -> Self {
        let content = code.into();
        let entry = runtime.file_name_for(&content);
        let limits = runtime.limits;
        ExecutionRequest {
            files: vec![SourceFile {
                name: entry.clone(),
                content,
            }],
            entry,
            runtime,
            stdin: Vec::new(),
            args: Vec::new(),
            limits,
        }
    }

    /// The class the runtime's `{class}` names, found in the entry file (Java).
    pub fn main_class(&self) -> Option<String> {
        let entry = self.files.iter().find(|f| f.name == self.entry)?;
        self.runtime.main_class(&entry.content)
    }

    /// Checks that need the whole request: names that collide (a file where another needs a
    /// directory), files that could not fit in the work dir, and arguments the kernel would
    /// refuse to exec (so a warm interpreter, which gets them through a pipe, and a cold
    /// start, which execs, answer the same).
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        validate_args(&self.args)?;
        let mut total: u64 = 0;
        for (i, file) in self.files.iter().enumerate() {
            crate::file_names::validate(&file.name)?;
            total += pages_taken(file.content.len() as u64);
            for other in &self.files[i + 1..] {
                let (a, b) = (&file.name, &other.name);
                if a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/")) {
                    return Err(InvalidRequest::Collide(a.clone(), b.clone()));
                }
            }
        }
        if total > self.limits.workdir_bytes {
            return Err(InvalidRequest::FilesTooLarge {
                total,
                room: self.limits.workdir_bytes,
            });
        }
        Ok(())
    }
}

/// The bytes a file of `len` bytes takes in a tmpfs: whole pages (an empty one, none).
/// Counting raw bytes would accept files that cannot all be written.
fn pages_taken(len: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => 4096,
    };
    len.div_ceil(page) * page
}

/// Arguments the kernel would refuse to exec (too many, too long, a NUL), refused alike
/// whether the run starts warm or cold.
pub fn validate_args(args: &[String]) -> Result<(), InvalidRequest> {
    if args.len() > MAX_ARGS {
        return Err(InvalidRequest::TooManyArgs(args.len()));
    }
    if let Some((i, _)) = args
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > MAX_ARG_BYTES || a.contains('\0'))
    {
        return Err(InvalidRequest::BadArg(i));
    }
    let arg_bytes: usize = args.iter().map(|a| a.len() + 1).sum();
    if arg_bytes > MAX_ARGS_TOTAL_BYTES {
        return Err(InvalidRequest::ArgsTooLarge(arg_bytes));
    }
    Ok(())
}

/// The queue is full, or a submission waited in it for longer than allowed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the server is busy: {running} executions running and {waiting} waiting")]
pub struct Busy {
    pub running: usize,
    pub waiting: usize,
}

/// A request that cannot run as given (the API answers 422 `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("{0} arguments, more than the maximum of {MAX_ARGS}")]
    TooManyArgs(usize),
    #[error("`args[{0}]` is longer than the maximum of {MAX_ARG_BYTES} bytes or holds a NUL")]
    BadArg(usize),
    #[error("the arguments hold {0} bytes, more than the maximum of {MAX_ARGS_TOTAL_BYTES}")]
    ArgsTooLarge(usize),
    #[error(transparent)]
    FileName(#[from] crate::file_names::InvalidFileName),
    #[error("file names `{0}` and `{1}` collide")]
    Collide(String, String),
    #[error(
        "the files take {total} bytes of the work dir (each file counts in whole memory pages, as the work dir's tmpfs stores it), more than its {room} (limit `workdir_bytes`)"
    )]
    FilesTooLarge { total: u64, room: u64 },
}

/// Arguments per request at most.
pub const MAX_ARGS: usize = 1024;
/// One argument at most: below the kernel's 128 KiB per exec string (`MAX_ARG_STRLEN`).
pub const MAX_ARG_BYTES: usize = 64 * 1024;
/// All arguments together at most (with their NULs): well inside the kernel's exec limit
/// next to the runtime's own command and environment.
pub const MAX_ARGS_TOTAL_BYTES: usize = 256 * 1024;

/// Errors that stop a submission before or outside its stages.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The client went away while the submission was queued; it never ran.
    #[error("the client went away while the submission waited for a slot")]
    Abandoned,
    /// The daemon is shutting down: the submission was not admitted (`killed` false), or
    /// it was running when the shutdown grace period ended and was killed.
    #[error("{}", if *killed {
        "the daemon is shutting down: the run was still going when the shutdown grace period ended and was killed; send it again (another replica will run it)"
    } else {
        "the daemon is shutting down and takes no new submissions; send it again (another replica will run it)"
    })]
    ShuttingDown { killed: bool },
    /// The sandbox failed (never because of the request); the cause is kept for the log.
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}
