//! Per-slot launchers: small fork servers that live inside their slot's cgroups.
//!
//! Moving a process into a cgroup v1 hierarchy waits for an RCU grace period (measured
//! here: ~5 ms per hierarchy, serialised across all runs). A launcher pays that once at
//! start-up; every stage it forks is born inside the cgroups. The launcher is this same
//! binary run as `mixed-docker-executor __slot-launcher`: it receives a spawn request and the
//! stage's pipes over a Unix socket, forks and execs the stage (after the same
//! [`prepare_child`] the direct path uses), kills the stage's process group on request or
//! once its leader exits, reaps it, and reports the exit status and usage.

use std::ffi::{CString, c_int};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};

use super::child::{HIGH_FD_MIN, MAX_PASS_FDS, Rlimit, prepare_child};

/// The argument that turns the binary into a launcher.
pub const LAUNCHER_ARG: &str = "__slot-launcher";
/// The launcher's end of the socket.
const SOCKET_FD: RawFd = 3;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SpawnSpec {
    pub(crate) program: Vec<u8>,
    pub(crate) args: Vec<Vec<u8>>,
    pub(crate) env: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) cwd: Vec<u8>,
    pub(crate) rlimits: Vec<Rlimit>,
    pub(crate) uid: Option<u32>,
    /// Keep the launcher's OOM immunity (see `SandboxCommand::oom_protected`).
    pub(crate) oom_protected: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Fork and exec; the message carries stdin, stdout, stderr and the pass descriptors.
    Spawn(SpawnSpec),
    /// SIGKILL the running stage's process group.
    Kill,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Started {
        pid: i32,
    },
    Failed {
        error: String,
    },
    /// `pid` names the stage, so a reply for an earlier stage can never be taken for the
    /// current one's.
    Exited {
        pid: i32,
        status: i32,
        cpu_us: u64,
        maxrss_kb: u64,
    },
}

/// Requests carry a command line and environment; replies are small. Anything larger is
/// a corrupt stream, not something to allocate for.
const MAX_FRAME: usize = 4 << 20;

// ---- framing: a one-byte message carrying any descriptors, then a length-prefixed JSON body.

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn send_fds(fd: RawFd, fds: &[RawFd]) -> Result<(), String> {
    let marker = [b'F'];
    let iov = [IoSlice::new(&marker)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(|e| format!("sending to the launcher: {e}"))
}

/// Receive the marker byte and its descriptors; `None` at end of stream.
fn recv_fds(fd: RawFd) -> Option<Vec<OwnedFd>> {
    let mut marker = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut marker)];
    let mut space = nix::cmsg_space!([RawFd; MAX_PASS_FDS + 3]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).ok()?;
    if msg.bytes == 0 {
        return None;
    }
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just handed us these descriptors; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
            );
        }
    }
    Some(fds)
}

fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut StdUnixStream) -> Option<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return None;
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

// ---- the launcher process

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

fn cstr(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| "a NUL byte in the command".to_string())
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
    let prepared = (|| -> Result<_, String> {
        let program = cstr(&spec.program)?;
        let mut argv = vec![program.clone()];
        for a in &spec.args {
            argv.push(cstr(a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in &spec.env {
            let mut kv = k.clone();
            kv.push(b'=');
            kv.extend_from_slice(v);
            envp.push(cstr(&kv)?);
        }
        Ok((program, argv, envp, cstr(&spec.cwd)?))
    })();
    let (program, argv, envp, cwd) = match prepared {
        Ok(p) => p,
        Err(error) => return reply(stream, &Reply::Failed { error }),
    };
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
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
                let _ = std::fs::write("/proc/self/oom_score_adj", super::child::STAGE_OOM_SCORE);
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
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid out-pointer; WNOWAIT leaves the child unreaped.
            unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                ) == 0
                    && info.si_pid() == pid
            }
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

// ---- the daemon's handle on a launcher

pub(crate) struct Launcher {
    process: std::sync::Mutex<std::process::Child>,
    raw_fd: RawFd,
    writer: Mutex<tokio::net::unix::OwnedWriteHalf>,
    replies: Mutex<mpsc::UnboundedReceiver<Reply>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Launcher {
    /// Start a launcher from `exe`, moving it into the cgroups whose `cgroup.procs` are given.
    pub(crate) fn start(exe: &Path, cgroup_procs: &[PathBuf]) -> Result<Arc<Launcher>, String> {
        let (ours, theirs) = StdUnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let procs = cgroup_procs
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("opening cgroup.procs: {e}"))?;
        let proc_fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let theirs_fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new(exe);
        command
            .arg(LAUNCHER_ARG)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        // SAFETY: only async-signal-safe calls on descriptors opened before the fork.
        unsafe {
            command.pre_exec(move || {
                let mut buf = [0u8; 16];
                let pid = super::runner::format_pid(libc::getpid() as u32, &mut buf);
                for &fd in &proc_fds {
                    if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::dup2(theirs_fd, SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let process = command
            .spawn()
            .map_err(|e| format!("starting the launcher {}: {e}", exe.display()))?;
        drop(theirs);
        ours.set_nonblocking(true).map_err(|e| e.to_string())?;
        let raw_fd = ours.as_raw_fd();
        let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
        let (mut read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        // One reader per launcher: frames are parsed whole here, so the runner can wait on
        // the channel in a `select!` without ever losing half a message.
        let reader = tokio::spawn(async move {
            loop {
                let mut marker = [0u8; 1];
                let mut len = [0u8; 4];
                if read.read_exact(&mut marker).await.is_err()
                    || read.read_exact(&mut len).await.is_err()
                {
                    return;
                }
                let len = u32::from_le_bytes(len) as usize;
                if len > MAX_FRAME {
                    return;
                }
                let mut body = vec![0u8; len];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                let Ok(reply) = serde_json::from_slice::<Reply>(&body) else {
                    return;
                };
                if tx.send(reply).is_err() {
                    return;
                }
            }
        });
        Ok(Arc::new(Launcher {
            process: std::sync::Mutex::new(process),
            raw_fd,
            writer: Mutex::new(write),
            replies: Mutex::new(rx),
            reader,
        }))
    }

    async fn send(&self, request: &Request, fds: &[RawFd]) -> Result<(), String> {
        let frame = encode(request)?;
        let mut writer = self.writer.lock().await;
        // The socket is idle between requests, so the one-byte send never meets a full buffer.
        send_fds(self.raw_fd, fds)?;
        writer
            .write_all(&frame)
            .await
            .map_err(|e| format!("writing to the launcher: {e}"))
    }

    async fn next_reply(&self) -> Result<Reply, String> {
        self.replies
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| "the launcher exited".to_string())
    }

    /// Start a stage; `fds` are stdin, stdout, stderr, then the pass descriptors.
    pub(crate) async fn spawn(&self, spec: SpawnSpec, fds: &[RawFd]) -> Result<i32, String> {
        self.send(&Request::Spawn(spec), fds).await?;
        loop {
            match self.next_reply().await? {
                Reply::Started { pid } => return Ok(pid),
                Reply::Failed { error } => return Err(error),
                // The end of an earlier stage nobody waited for (a discarded sandbox).
                Reply::Exited { .. } => continue,
            }
        }
    }

    /// The stage's exit if it has already been reported (never waits).
    pub(crate) fn try_exited(&self, stage: i32) -> Option<Result<(i32, u64, u64), String>> {
        let mut replies = self.replies.try_lock().ok()?;
        loop {
            match replies.try_recv() {
                Ok(Reply::Exited {
                    pid,
                    status,
                    cpu_us,
                    maxrss_kb,
                }) if pid == stage => return Some(Ok((status, cpu_us, maxrss_kb))),
                Ok(_) => continue,
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err("the launcher exited".into()));
                }
            }
        }
    }

    /// Ask for the stage's process group to be killed.
    pub(crate) async fn kill(&self) {
        let _ = self.send(&Request::Kill, &[]).await;
    }

    /// Wait for the stage to end (cancel-safe). Returns `(status, cpu_us, maxrss_kb)`.
    pub(crate) async fn exited(&self, stage: i32) -> Result<(i32, u64, u64), String> {
        loop {
            if let Reply::Exited {
                pid,
                status,
                cpu_us,
                maxrss_kb,
            } = self.next_reply().await?
            {
                if pid == stage {
                    return Ok((status, cpu_us, maxrss_kb));
                }
            }
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.lock().ok().map(|p| p.id())
    }

    /// Kill the launcher (and so, by PDEATHSIG, its stage); the slot starts a new one.
    pub(crate) fn terminate(&self) {
        if let Ok(mut p) = self.process.lock() {
            let _ = p.kill();
        }
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.process
            .lock()
            .is_ok_and(|mut p| matches!(p.try_wait(), Ok(None)))
            && !self.reader.is_finished()
    }
}

impl Drop for Launcher {
    /// Close the socket so the launcher kills its stage, reaps everything and exits; force
    /// it after two seconds.
    fn drop(&mut self) {
        self.reader.abort();
        // SAFETY: shutting down a socket we own; the descriptor stays valid until the
        // write half is dropped after this.
        unsafe { libc::shutdown(self.raw_fd, libc::SHUT_RDWR) };
        if let Ok(mut p) = self.process.lock() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while matches!(p.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Set by the daemon's `main`: this very binary runs launchers and helpers, whatever it
/// is called (a renamed binary once silently lost the helper, and with it the sandbox's
/// non-dumpable pid 1).
static DAEMON_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Called by the daemon binary before anything else: it serves the helper modes.
pub fn this_binary_serves_helpers() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = DAEMON_BINARY.set(exe);
    }
}

/// The binary to run launchers and helpers from: the daemon's own (see above), else one
/// named like it (the daemon built beside a test binary: `target/debug/deps/..` next to
/// `target/debug/`).
pub(crate) fn launcher_executable() -> Option<PathBuf> {
    const NAME: &str = "mixed-docker-executor";
    if let Some(exe) = DAEMON_BINARY.get() {
        return Some(exe.clone());
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == NAME) {
        return Some(exe);
    }
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(NAME))
        .find(|p| p.is_file())
}
