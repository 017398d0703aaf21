//! The launcher process: this binary as `__slot-launcher`, living in its slot's cgroups,
//! forking each stage it is sent and reporting how it ended.

use std::ffi::{CString, c_int};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use super::{Reply, Request, SOCKET_FD, SpawnSpec, encode, read_frame, recv_fds, send_fds};
use crate::execution::sandbox::child::{ExecStrings, HIGH_FD_MIN, MAX_PASS_FDS, prepare_child};

/// Entry point of `mixed-docker-executor __slot-launcher`. Serves one stage at a time until
/// the daemon closes the socket (or dies: the launcher has PDEATHSIG).
pub fn launcher_main() -> ! {
    // Never the OOM killer's choice inside the slot's memory cgroup (lowering the score
    // takes CAP_SYS_RESOURCE, which some containers lack: stages also raise theirs to the
    // maximum, which needs no privilege and makes them the first choice either way).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // Processes a stage leaves behind (killed with its pid namespace) are reparented here,
    // not to the host's init, so they are reaped at once: until then they would count
    // against the slot uid's process limit in the slot's next run.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    // Stopping is the daemon's decision, never a stray signal's: SIGINT, SIGTERM, SIGHUP
    // and SIGQUIT sent to a whole cgroup or session (systemd's `KillMode=control-group`, a
    // terminal) would otherwise kill the launcher and lose its running stage. The daemon
    // ends a launcher by closing its socket or with SIGKILL; PDEATHSIG still fires. Each
    // stage gets default dispositions back before exec (`prepare_child`).
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing SIG_IGN, no handler code runs.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    // The socket must never reach a stage (bubblewrap passes inherited descriptors on).
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(SOCKET_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the daemon put our end of the socket at SOCKET_FD before exec.
    let mut stream = unsafe { StdUnixStream::from_raw_fd(SOCKET_FD) };
    loop {
        // Between stages, reap orphans while any remain, waking every 10 ms to do so.
        while reap_orphans() {
            let mut poll = libc::pollfd {
                fd: SOCKET_FD,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, 10) } > 0 {
                break;
            }
        }
        let Some(fds) = recv_fds(SOCKET_FD) else {
            shut_down()
        };
        match read_frame::<Request>(&mut stream) {
            Some(Request::Spawn(spec)) => serve_one(&mut stream, spec, fds),
            Some(Request::Kill) => {}
            None => shut_down(),
        }
    }
}

/// The daemon closed the socket: reap what is left (it was killed) and exit, so that no
/// process of the slot's uid outlives the slot.
fn shut_down() -> ! {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while reap_orphans() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::process::exit(0)
}

/// Reap every exited child; true while some children are still running.
fn reap_orphans() -> bool {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        match unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } {
            0 => return true,
            pid if pid > 0 => continue,
            _ => return false,
        }
    }
}

fn reply(stream: &mut StdUnixStream, msg: &Reply) {
    let ok = encode(msg)
        .is_ok_and(|frame| send_fds(SOCKET_FD, &[]).is_ok() && stream.write_all(&frame).is_ok());
    if !ok {
        std::process::exit(1);
    }
}

fn serve_one(stream: &mut StdUnixStream, spec: SpawnSpec, fds: Vec<OwnedFd>) {
    if fds.len() < 3 || fds.len() > MAX_PASS_FDS + 3 {
        return reply(
            stream,
            &Reply::Failed {
                error: "bad descriptor count".into(),
            },
        );
    }
    let prepared = ExecStrings::new(&spec.program, &spec.args, &spec.env)
        .and_then(|command| Ok((command, CString::new(spec.cwd.as_slice())?)));
    let (command, cwd) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let error = format!("a NUL byte in the command: {e}");
            return reply(stream, &Reply::Failed { error });
        }
    };
    let program = &command.program;
    let (argv_ptrs, envp_ptrs) = command.pointers();
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let pass: Vec<c_int> = raw[3..].to_vec();
    let mut scratch = [0 as c_int; MAX_PASS_FDS];
    let mut exec_error = [0 as c_int; 2];
    // SAFETY: plain pipe2 into a valid two-element array.
    if unsafe { libc::pipe2(exec_error.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return reply(
            stream,
            &Reply::Failed {
                error: "pipe2 failed".into(),
            },
        );
    }
    // Keep the write end clear of the numbers the child moves pass descriptors to.
    // SAFETY: fcntl/close on descriptors we own.
    unsafe {
        let high = libc::fcntl(exec_error[1], libc::F_DUPFD_CLOEXEC, HIGH_FD_MIN);
        if high >= 0 {
            libc::close(exec_error[1]);
            exec_error[1] = high;
        }
    }
    // SAFETY: the launcher is single-threaded, so the child may run ordinary code; it
    // still only makes system calls before exec.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; every pointer was built before the fork.
        unsafe {
            libc::setpgid(0, 0);
            if !spec.oom_protected {
                let _ = std::fs::write(
                    "/proc/self/oom_score_adj",
                    crate::execution::sandbox::child::STAGE_OOM_SCORE,
                );
            }
            for (target, &fd) in raw[..3].iter().enumerate() {
                libc::dup2(fd, target as c_int);
            }
            let mut err = match prepare_child(&pass, &mut scratch, &spec.rlimits, spec.uid) {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
            };
            if err == 0 && libc::chdir(cwd.as_ptr()) != 0 {
                err = *libc::__errno_location();
            }
            if err == 0 {
                libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
                err = *libc::__errno_location();
            }
            libc::write(
                exec_error[1],
                (&raw const err).cast(),
                std::mem::size_of::<c_int>(),
            );
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the write end; the child holds its own.
    unsafe { libc::close(exec_error[1]) };
    drop(fds);
    // SAFETY: the read end is ours; File takes ownership and closes it.
    let mut errors = unsafe { std::fs::File::from_raw_fd(exec_error[0]) };
    if pid < 0 {
        return reply(
            stream,
            &Reply::Failed {
                error: std::io::Error::last_os_error().to_string(),
            },
        );
    }
    let mut errno = [0u8; 4];
    if errors.read_exact(&mut errno).is_ok() {
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let error = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        return reply(
            stream,
            &Reply::Failed {
                error: format!(
                    "cannot start `{}`: {error}",
                    String::from_utf8_lossy(&spec.program)
                ),
            },
        );
    }
    reply(stream, &Reply::Started { pid });
    supervise(stream, pid);
}

/// Wait for the stage's leader to exit (or a kill request), kill its group, reap, report.
fn supervise(stream: &mut StdUnixStream, pid: libc::pid_t) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as c_int;
    loop {
        let mut polls = [
            libc::pollfd {
                fd: SOCKET_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n_polls = if pidfd >= 0 { 2 } else { 1 };
        // Without a pidfd (old kernel), poll the child with WNOHANG every 5 ms.
        let timeout = if pidfd >= 0 { -1 } else { 5 };
        // SAFETY: `polls` is a valid array of `n_polls` entries.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), n_polls, timeout) };
        if ready < 0 {
            continue;
        }
        if polls[0].revents != 0 {
            match recv_fds(SOCKET_FD).and_then(|_| read_frame::<Request>(stream)) {
                Some(Request::Kill) => {
                    // SAFETY: the leader is not reaped yet, so the group id is still ours.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                Some(Request::Spawn(_)) => {}
                None => {
                    // The daemon is gone or closing the slot: take the stage down with us.
                    // SAFETY: the leader is unreaped, so the group id is still ours.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    shut_down();
                }
            }
        }
        let exited = if pidfd >= 0 {
            polls[1].revents != 0
        } else {
            crate::execution::sandbox::child::exited_unreaped(pid, false)
        };
        if exited {
            break;
        }
    }
    // SAFETY: still unreaped, so the group id is still ours: end any leftovers, then reap.
    let (status, rusage) = unsafe {
        libc::kill(-pid, libc::SIGKILL);
        let mut status = 0;
        let mut rusage: libc::rusage = std::mem::zeroed();
        libc::wait4(pid, &mut status, 0, &mut rusage);
        if pidfd >= 0 {
            libc::close(pidfd);
        }
        (status, rusage)
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    reply(
        stream,
        &Reply::Exited {
            pid,
            status,
            cpu_us: us(rusage.ru_utime) + us(rusage.ru_stime),
            maxrss_kb: rusage.ru_maxrss as u64,
        },
    );
}
