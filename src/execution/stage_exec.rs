//! The waiting program inside a prepared sandbox.
//!
//! Setting up bubblewrap's namespaces and mounts costs about 10 ms here, more than everything
//! else a run adds. So each idle slot keeps one sandbox already set up, running this binary
//! as `/.mde/stage-exec __stage-exec FD`: it blocks on FD until the daemon writes the stage's
//! command, environment and limits, applies the limits to itself, and execs the command. The
//! sandbox is used for one stage and then thrown away, like any other.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::FromRawFd;

use serde::{Deserialize, Serialize};

use super::child::Rlimit;

/// The argument that turns the binary into the in-sandbox exec helper.
pub const STAGE_EXEC_ARG: &str = "__stage-exec";
/// Where the helper binary is bound inside prepared sandboxes.
pub(crate) const HELPER_PATH: &str = "/.mde/stage-exec";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExecSpec {
    pub(crate) program: Vec<u8>,
    pub(crate) args: Vec<Vec<u8>>,
    pub(crate) env: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) rlimits: Vec<Rlimit>,
}

fn fail(message: &str) -> ! {
    eprintln!("mixed-docker-executor stage-exec: {message}");
    std::process::exit(127)
}

/// Entry point of `__stage-exec FD`. Never returns: it execs the stage or exits 127.
pub fn stage_exec_main(fd_arg: Option<String>) -> ! {
    let Some(fd) = fd_arg.and_then(|f| f.parse::<i32>().ok()) else {
        fail("usage: __stage-exec FD")
    };
    // SAFETY: the daemon passed this descriptor for us alone; we read it to the end.
    let mut control = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = Vec::new();
    if let Err(e) = control.read_to_end(&mut text) {
        fail(&format!("reading the command: {e}"));
    }
    drop(control);
    // An empty read means the daemon discarded this sandbox unused.
    if text.is_empty() {
        std::process::exit(0);
    }
    let spec: ExecSpec = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => fail(&format!("bad command: {e}")),
    };
    for l in &spec.rlimits {
        let rl = libc::rlimit {
            rlim_cur: l.soft,
            rlim_max: l.hard,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(l.resource, &rl) } != 0 {
            fail(&format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    let cstr = |b: &[u8]| CString::new(b).unwrap_or_else(|_| fail("NUL byte in the command"));
    let program = cstr(&spec.program);
    let argv: Vec<CString> = std::iter::once(program.clone())
        .chain(spec.args.iter().map(|a| cstr(a)))
        .collect();
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&[k.as_slice(), b"=", v.as_slice()].concat()))
        .collect();
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    // SAFETY: both arrays are NULL-terminated and point at live C strings.
    unsafe { libc::execve(program.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    fail(&format!(
        "cannot execute {}: {}",
        String::from_utf8_lossy(&spec.program),
        std::io::Error::last_os_error()
    ))
}
