//! Per-slot launchers: small fork servers that live inside their slot's cgroups.
//!
//! Moving a process into a cgroup v1 hierarchy waits for an RCU grace period (measured
//! here: ~5 ms per hierarchy, serialised across all runs). A launcher pays that once at
//! start-up; every stage it forks is born inside the cgroups. The launcher is this same
//! binary run as `mixed-docker-executor __slot-launcher`: it receives a spawn request and the
//! stage's pipes over a Unix socket, forks and execs the stage (after the same
//! [`prepare_child`] the direct path uses), kills the stage's process group on request or
//! once its leader exits, reaps it, and reports the exit status and usage.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};

use crate::execution::sandbox::child::{MAX_PASS_FDS, Rlimit, join_cgroups};

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

/// Why the daemon could not use a slot's launcher.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding a launcher message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("sending to the launcher: {0}")]
    Send(#[from] nix::Error),
    #[error("the launcher exited")]
    Exited,
    /// The launcher's own account of why it could not start the stage.
    #[error("{0}")]
    Refused(String),
}

/// How a stage forked by the launcher ended: its wait status, CPU time of it and its
/// reaped children, and its largest RSS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageEnd {
    pub(crate) status: i32,
    pub(crate) cpu_us: u64,
    pub(crate) maxrss_kb: u64,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LauncherError {
    move |source| LauncherError::Io { what, source }
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, LauncherError> {
    let body = serde_json::to_vec(msg)?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn send_fds(fd: RawFd, fds: &[RawFd]) -> Result<(), LauncherError> {
    let marker = [b'F'];
    let iov = [IoSlice::new(&marker)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(LauncherError::Send)
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
    let mut body = vec![0u8; body_len(len)?];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// A frame's body length from its header; `None` past [`MAX_FRAME`] (a corrupt stream).
fn body_len(header: [u8; 4]) -> Option<usize> {
    Some(u32::from_le_bytes(header) as usize).filter(|&n| n <= MAX_FRAME)
}

mod process;
pub use process::launcher_main;

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
    pub(crate) fn start(
        exe: &Path,
        cgroup_procs: &[PathBuf],
    ) -> Result<Arc<Launcher>, LauncherError> {
        let (ours, theirs) = StdUnixStream::pair().map_err(io("socketpair"))?;
        let procs = cgroup_procs
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io("opening cgroup.procs"))?;
        let proc_fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let theirs_fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new(exe);
        command
            .arg(LAUNCHER_ARG)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            // A process group of its own: a signal to the daemon's group (Ctrl-C in a
            // terminal, `kill -- -PGID`) must not reach the slots; the daemon drains them.
            .process_group(0);
        // SAFETY: only async-signal-safe calls on descriptors opened before the fork.
        unsafe {
            command.pre_exec(move || {
                join_cgroups(&proc_fds)?;
                if libc::dup2(theirs_fd, SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let process = command.spawn().map_err(io("starting the launcher"))?;
        drop(theirs);
        ours.set_nonblocking(true)
            .map_err(io("the launcher's socket"))?;
        let raw_fd = ours.as_raw_fd();
        let stream = tokio::net::UnixStream::from_std(ours).map_err(io("the launcher's socket"))?;
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
                let Some(len) = body_len(len) else {
                    return;
                };
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

    async fn send(&self, request: &Request, fds: &[RawFd]) -> Result<(), LauncherError> {
        let frame = encode(request)?;
        let mut writer = self.writer.lock().await;
        // The socket is idle between requests, so the one-byte send never meets a full buffer.
        send_fds(self.raw_fd, fds)?;
        writer
            .write_all(&frame)
            .await
            .map_err(io("writing to the launcher"))
    }

    async fn next_reply(&self) -> Result<Reply, LauncherError> {
        self.replies
            .lock()
            .await
            .recv()
            .await
            .ok_or(LauncherError::Exited)
    }

    /// Start a stage; `fds` are stdin, stdout, stderr, then the pass descriptors.
    pub(crate) async fn spawn(&self, spec: SpawnSpec, fds: &[RawFd]) -> Result<i32, LauncherError> {
        self.send(&Request::Spawn(spec), fds).await?;
        loop {
            match self.next_reply().await? {
                Reply::Started { pid } => return Ok(pid),
                Reply::Failed { error } => return Err(LauncherError::Refused(error)),
                // The end of an earlier stage nobody waited for (a discarded sandbox).
                Reply::Exited { .. } => continue,
            }
        }
    }

    /// The stage's exit if it has already been reported (never waits).
    pub(crate) fn try_exited(&self, stage: i32) -> Option<Result<StageEnd, LauncherError>> {
        let mut replies = self.replies.try_lock().ok()?;
        loop {
            match replies.try_recv() {
                Ok(Reply::Exited {
                    pid,
                    status,
                    cpu_us,
                    maxrss_kb,
                }) if pid == stage => {
                    return Some(Ok(StageEnd {
                        status,
                        cpu_us,
                        maxrss_kb,
                    }));
                }
                Ok(_) => continue,
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err(LauncherError::Exited));
                }
            }
        }
    }

    /// Ask for the stage's process group to be killed.
    pub(crate) async fn kill(&self) {
        let _ = self.send(&Request::Kill, &[]).await;
    }

    /// Wait for the stage to end (cancel-safe).
    pub(crate) async fn exited(&self, stage: i32) -> Result<StageEnd, LauncherError> {
        loop {
            if let Reply::Exited {
                pid,
                status,
                cpu_us,
                maxrss_kb,
            } = self.next_reply().await?
                && pid == stage
            {
                return Ok(StageEnd {
                    status,
                    cpu_us,
                    maxrss_kb,
                });
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
