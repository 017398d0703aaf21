//! What every stage process does between fork and exec, whoever forks it (the daemon
//! directly, or a slot's launcher): take its descriptors, apply limits, drop to the slot's
//! uid. Only async-signal-safe calls, no allocation: the daemon forks from many threads.

use std::ffi::c_int;
use std::os::fd::{FromRawFd, OwnedFd};

/// Descriptors a backend passes to the child appear at `PASS_FD_BASE + i` (bubblewrap's
/// `--add-seccomp-fd` arguments name them), whatever their number in the parent.
pub(crate) const PASS_FD_BASE: c_int = 10;

/// Above every descriptor the child keeps, so moving through it never clobbers one.
const SCRATCH_FD_MIN: c_int = 100;
/// Where a forker keeps descriptors of its own that must survive `prepare_child`.
pub(crate) const HIGH_FD_MIN: c_int = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rlimit {
    pub(crate) resource: libc::__rlimit_resource_t,
    pub(crate) soft: u64,
    pub(crate) hard: u64,
}

fn check(ret: c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Move `pass` to `PASS_FD_BASE + i` (clearing close-on-exec), apply `rlimits`, and become
/// `uid` with no supplementary groups, no new privileges, and death with the parent.
///
/// # Safety
/// Call only in a freshly forked child, before exec.
pub(crate) unsafe fn prepare_child(
    pass: &[c_int],
    scratch: &mut [c_int],
    rlimits: &[Rlimit],
    uid: Option<u32>,
) -> std::io::Result<()> {
    // SAFETY (whole body): plain system calls on descriptors and values we own.
    unsafe {
        // Two steps, so a descriptor already sitting at a target number is not clobbered.
        for (i, &fd) in pass.iter().enumerate() {
            let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SCRATCH_FD_MIN);
            check(moved)?;
            scratch[i] = moved;
        }
        for (i, &fd) in scratch.iter().take(pass.len()).enumerate() {
            check(libc::dup2(fd, PASS_FD_BASE + i as c_int))?;
        }
        // Nothing else may cross exec: bubblewrap hands every inherited descriptor on to
        // the sandboxed program. (Best effort on kernels without close_range's CLOEXEC.)
        let first_after = (PASS_FD_BASE + pass.len() as c_int) as libc::c_uint;
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            (PASS_FD_BASE - 1) as libc::c_uint,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        libc::syscall(
            libc::SYS_close_range,
            first_after,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        apply_rlimits(rlimits)?;
        if let Some(uid) = uid {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(uid))?;
            check(libc::setuid(uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // Set after setuid, which clears it.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        reset_signals();
    }
    Ok(())
}

/// Set each of `rlimits` on this process (setrlimit only: no allocation).
pub(crate) fn apply_rlimits(rlimits: &[Rlimit]) -> std::io::Result<()> {
    for l in rlimits {
        let rl = libc::rlimit {
            rlim_cur: l.soft,
            rlim_max: l.hard,
        };
        // SAFETY: setrlimit with a valid struct.
        check(unsafe { libc::setrlimit(l.resource, &rl) })?;
    }
    Ok(())
}

/// Give the program default signal dispositions and an empty signal mask. Rust ignores
/// SIGPIPE at start-up, and an ignored signal stays ignored across exec: without this a
/// stage's `yes | head -n 1` complains of a broken pipe instead of ending quietly.
///
/// # Safety
/// Call only in a forked child, before exec.
pub(crate) unsafe fn reset_signals() {
    /// The kernel's `struct sigaction` (the C library's differs, and its wrappers refuse
    /// the two real-time signals it keeps for itself, which a parent may still ignore).
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::sighandler_t,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction and rt_sigprocmask with valid structs of the kernel's size;
    // SIGKILL and SIGSTOP just fail. Both are async-signal-safe system calls.
    unsafe {
        for sig in 1..=64 {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
        }
        let none: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            std::mem::size_of::<u64>(),
        );
    }
}

/// Every stage's OOM score adjustment: the maximum, so that the OOM killer takes submitted
/// code before the launcher or the in-sandbox helper (raising needs no privilege).
pub(crate) const STAGE_OOM_SCORE: &str = "1000";
pub(crate) const STAGE_OOM_SCORE_C: &std::ffi::CStr = c"1000";

/// Set this process's OOM score adjustment (`-1000` never chosen, `0` the default) with
/// plain system calls, so it may run between fork and exec.
pub(crate) fn set_oom_score_adj(value: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: a static path and a valid C string; the descriptor is closed before return.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        check(fd)?;
        let bytes = value.to_bytes();
        let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        libc::close(fd);
        if written < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Format `n` into `buf` without allocating (we may be between fork and exec).
pub(crate) fn format_pid(mut n: u32, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Join the cgroups whose `cgroup.procs` are open as `procs` (this process's pid into each),
/// so every later process is inside them. Async-signal-safe: for between fork and exec.
pub(crate) fn join_cgroups(procs: &[c_int]) -> std::io::Result<()> {
    let mut buf = [0u8; 16];
    // SAFETY: getpid has no preconditions.
    let pid = format_pid(unsafe { libc::getpid() } as u32, &mut buf);
    for &fd in procs {
        // SAFETY: writing a valid buffer to a descriptor the caller opened.
        if unsafe { libc::write(fd, pid.as_ptr().cast(), pid.len()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A command as the C strings `execve` takes, built before a fork so that the child only
/// has to point at them (it must not allocate).
pub(crate) struct ExecStrings {
    pub(crate) program: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
    envp: Vec<std::ffi::CString>,
}

impl ExecStrings {
    /// `program` is also `argv[0]`; `env` pairs become `KEY=VALUE`.
    pub(crate) fn new(
        program: &[u8],
        args: &[Vec<u8>],
        env: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<ExecStrings, std::ffi::NulError> {
        let program = std::ffi::CString::new(program)?;
        let argv = std::iter::once(Ok(program.clone()))
            .chain(args.iter().map(|a| std::ffi::CString::new(a.as_slice())))
            .collect::<Result<_, _>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| std::ffi::CString::new([k.as_slice(), b"=", v.as_slice()].concat()))
            .collect::<Result<_, _>>()?;
        Ok(ExecStrings {
            program,
            argv,
            envp,
        })
    }

    /// NULL-terminated pointer arrays for `argv` and `envp`, valid while `self` lives.
    pub(crate) fn pointers(&self) -> (Vec<*const libc::c_char>, Vec<*const libc::c_char>) {
        let ptrs = |v: &[std::ffi::CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        (ptrs(&self.argv), ptrs(&self.envp))
    }
}

/// Whether child `pid` has exited, leaving it unreaped (WNOWAIT) so that its process
/// group id stays its own until the caller has killed the group; with `block`, wait for it.
pub(crate) fn exited_unreaped(pid: libc::pid_t, block: bool) -> bool {
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: `info` is a valid out-pointer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ret = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if ret == 0 {
            // SAFETY: waitid filled `info`; with WNOHANG and no exit, si_pid is 0.
            return unsafe { info.si_pid() } == pid;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // No such child (already reaped): it is gone.
            return true;
        }
    }
}

/// The most descriptors a backend may pass.
pub(crate) const MAX_PASS_FDS: usize = 8;

/// A pipe whose ends are closed on exec (read end, write end).
pub(crate) fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pids_format_without_allocation() {
        let mut buf = [0u8; 16];
        assert_eq!(super::format_pid(0, &mut buf), b"0");
        assert_eq!(super::format_pid(4194304, &mut buf), b"4194304");
    }
}
