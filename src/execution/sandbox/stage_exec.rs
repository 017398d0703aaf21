//! The waiting program inside a bubblewrap sandbox.
//!
//! Setting up bubblewrap's namespaces and mounts costs about 10 ms here, more than everything
//! else a run adds. So each idle slot keeps one sandbox already set up, running this binary
//! as `/.mde/stage-exec __stage-exec CONTROL_FD STATUS_FD`: it blocks on CONTROL_FD until the
//! daemon writes the stage's command, environment and limits. The sandbox is used for one
//! stage and then thrown away, like any other. Stages without a prepared sandbox start one
//! the same way and hand it the command at once.
//!
//! The helper is the sandbox's pid 1 (bubblewrap's `--as-pid-1`): it is never dumpable, so
//! the stage (same uid) can neither read its memory and descriptors nor write code into it
//! through `/proc/1/mem`, and signals from inside the sandbox do not reach it. Like any init
//! it reaps orphans, so a killed stage's leftovers never pile up as zombies. Before it forks
//! it lowers its own rlimits to the stage's, so nothing in the sandbox holds more.
//!
//! The helper forks the stage rather than becoming it, waits for it, and writes its raw wait
//! status to STATUS_FD. bubblewrap reports a death by signal as exit code 128 + n, so without
//! this `exit(137)` and SIGKILL would look the same. The status is only the stage's own word
//! on how it ended (it could as well exit with any code); which limit ended a run is judged
//! by the daemon, never from this.

use std::ffi::c_int;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use serde::{Deserialize, Serialize};

use super::child::{ExecStrings, Rlimit};

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

/// Entry point of `__stage-exec CONTROL_FD STATUS_FD`. Never returns.
pub fn stage_exec_main(control_arg: Option<String>, status_arg: Option<String>) -> ! {
    // First of all: nothing that runs in this sandbox later may reach into us through /proc.
    // SAFETY: a prctl without pointers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        fail(&format!("prctl: {}", std::io::Error::last_os_error()));
    }
    // No handlers either (Rust installs SIGSEGV/SIGBUS ones): as pid 1 we then ignore every
    // signal sent from inside the sandbox.
    // SAFETY: plain system calls on this process's own dispositions.
    unsafe { super::child::reset_signals() };
    let fd = |arg: Option<String>| arg.and_then(|f| f.parse::<i32>().ok());
    let (Some(control_fd), Some(status_fd)) = (fd(control_arg), fd(status_arg)) else {
        fail("usage: __stage-exec CONTROL_FD STATUS_FD")
    };
    // SAFETY: the daemon passed these descriptors for us alone.
    let mut control = unsafe { std::fs::File::from_raw_fd(control_fd) };
    // SAFETY: as above; written once after the stage ends.
    let mut status_out = unsafe { std::fs::File::from_raw_fd(status_fd) };
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
    let exec = ChildCommand::new(&spec);
    // The stage inherits them; this process never holds more than the stage gets.
    if let Err(e) = super::child::apply_rlimits(&spec.rlimits) {
        fail(&format!("setrlimit: {e}"));
    }
    // SAFETY: this process has one thread, so the child may do anything before exec.
    match unsafe { libc::fork() } {
        -1 => fail(&format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(status_out);
            exec.run()
        }
        child => {
            // Hold none of the stage's pipes: their end must be the stage's alone.
            // SAFETY: closing our own stdio.
            unsafe {
                for fd in 0..3 {
                    libc::close(fd);
                }
            }
            let status = wait_for(child);
            let _ = status_out.write_all(&status.to_le_bytes());
            drop(status_out);
            // Mirror the end for bubblewrap, which reports it as before.
            if libc::WIFEXITED(status) {
                std::process::exit(libc::WEXITSTATUS(status))
            }
            std::process::exit(128 + libc::WTERMSIG(status))
        }
    }
}

/// Wait for the stage, reaping every orphan that ends before it (we are pid 1).
fn wait_for(child: libc::pid_t) -> c_int {
    let mut status: c_int = 0;
    loop {
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == child {
            return status;
        }
        if r == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Cannot happen for our own only child; if it did, no status is reported and
            // the daemon sees exit code 255.
            std::process::exit(255);
        }
    }
}

/// The command as C strings, built before the fork so the child only applies and execs.
struct ChildCommand(ExecStrings);

impl ChildCommand {
    fn new(spec: &ExecSpec) -> ChildCommand {
        match ExecStrings::new(&spec.program, &spec.args, &spec.env) {
            Ok(strings) => ChildCommand(strings),
            Err(_) => fail("NUL byte in the command"),
        }
    }

    /// In the forked child (which inherited the stage's limits): exec the stage.
    fn run(&self) -> ! {
        // SAFETY: we are the forked child, about to exec.
        unsafe { super::child::reset_signals() };
        // We (pid 1) must never be the OOM killer's choice, the stage always is: we are
        // immune where the host lets the launcher lower scores, and the stage's maximum
        // score makes it (and its children) the first victim either way, in the slot's
        // cgroup and on the host.
        // Our /proc files belong to root while we are not dumpable, so become dumpable
        // first, as exec would make us anyway (nothing else runs in the sandbox yet, and
        // this copy holds only the stage's own command).
        // SAFETY: a prctl without pointers.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        if let Err(e) = super::child::set_oom_score_adj(super::child::STAGE_OOM_SCORE_C) {
            fail(&format!("resetting the OOM score: {e}"));
        }
        let (argv_p, envp_p) = self.0.pointers();
        // SAFETY: both arrays are NULL-terminated and point at live C strings.
        unsafe { libc::execve(self.0.program.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
        fail(&format!(
            "cannot execute {}: {}",
            self.0.program.to_string_lossy(),
            std::io::Error::last_os_error()
        ))
    }
}
