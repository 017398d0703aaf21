//! The `bwrap` backend: bubblewrap with new user, pid, net, mount, ipc, uts and cgroup
//! namespaces; the system bound read-only; the slot's sized tmpfs as `/box` and `/tmp`; no
//! capabilities; a cleared environment; nested user namespaces disabled; the seccomp filters
//! from [`super::seccomp`].
//!
//! The pid namespace is what makes "kill the whole tree" reliable: when the stage's main
//! process or bubblewrap itself dies, the kernel kills every process left in the namespace,
//! including detached grandchildren that called `setsid`.

use std::ffi::OsString;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::child::PASS_FD_BASE;
use super::stage_exec::{HELPER_PATH, STAGE_EXEC_ARG};
use super::zygote::LIBRARY_PATH as ZYGOTE_LIBRARY_PATH;
use super::{SandboxBackend, SandboxCommand, SandboxError, StagePlan};
use crate::config::BackendKind;

/// Top-level directories that merged-/usr systems make symlinks into /usr.
const USR_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

pub struct BwrapBackend {
    bwrap: PathBuf,
    ro_binds: Vec<PathBuf>,
    seccomp: Vec<Vec<u8>>,
}

impl BwrapBackend {
    /// Fails when bubblewrap is missing or cannot create namespaces here.
    pub fn new(
        bwrap: &Path,
        sandbox_path: &str,
        ro_binds: Vec<PathBuf>,
    ) -> Result<Self, SandboxError> {
        let daemon_path = std::env::var("PATH").unwrap_or_default();
        let search = format!("{daemon_path}:{sandbox_path}");
        let bwrap = crate::runtimes::resolve_command(&bwrap.to_string_lossy(), &search)
            .ok_or_else(|| SandboxError::BwrapMissing(bwrap.to_path_buf()))?;
        Ok(BwrapBackend {
            bwrap,
            ro_binds,
            seccomp: super::seccomp::build_filters()?,
        })
    }

    fn bind_args(&self, extra: &[PathBuf], args: &mut Vec<OsString>) {
        for link in USR_LINKS {
            let path = Path::new(link);
            match std::fs::read_link(path) {
                Ok(target) => push(
                    args,
                    ["--symlink".as_ref(), target.as_os_str(), path.as_os_str()],
                ),
                Err(_) if path.is_dir() => push(
                    args,
                    ["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()],
                ),
                Err(_) => {}
            }
        }
        for path in self.ro_binds.iter().chain(extra) {
            push(
                args,
                ["--ro-bind-try".as_ref(), path.as_os_str(), path.as_os_str()],
            );
        }
    }
}

fn push<'a>(args: &mut Vec<OsString>, items: impl IntoIterator<Item = &'a std::ffi::OsStr>) {
    args.extend(items.into_iter().map(OsString::from));
}

/// A sealed-in-memory copy of `bytes` for bubblewrap to read (one per run: the read offset
/// of a shared descriptor would race between concurrent runs).
fn memfd_with(bytes: &[u8]) -> Result<OwnedFd, SandboxError> {
    // SAFETY: the name is a valid C string; the returned descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(c"mde-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(SandboxError::last_os("memfd_create"));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(bytes)
        .and_then(|()| file.rewind())
        .map_err(|source| SandboxError::Io {
            what: "writing the seccomp filter",
            source,
        })?;
    Ok(OwnedFd::from(file))
}

impl BwrapBackend {
    /// A sandbox set up ahead of its stage: it runs the stage-exec helper (this binary,
    /// bound at `HELPER_PATH`), which waits for the command on a pipe, runs it, and reports
    /// its wait status on another.
    pub(crate) fn build_prepared(
        &self,
        slot_dir: &Path,
        path: &str,
        ro_binds: &[PathBuf],
        helper: &Path,
        warm: bool,
    ) -> Result<PreparedCommand, SandboxError> {
        // The runner places pass_fds[i] at PASS_FD_BASE + i: the seccomp programs come first.
        let control_fd = PASS_FD_BASE + self.seccomp.len() as i32;
        let status_fd = control_fd + 1;
        let binds_at = [(helper.to_path_buf(), PathBuf::from(HELPER_PATH))];
        let plan = StagePlan {
            argv: vec![
                HELPER_PATH.into(),
                STAGE_EXEC_ARG.into(),
                control_fd.to_string(),
                status_fd.to_string(),
            ],
            env: &[],
            ro_binds,
            ro_binds_at: &binds_at,
            slot_dir,
            path,
        };
        // The helper is the sandbox's pid 1: no bubblewrap init the stage could reach (a
        // dumpable pid 1 under the same uid let a run write code into /proc/1/mem and fork
        // past its process limit). The helper is never dumpable and reaps orphans itself.
        let mut command = self.build_with(&plan, Role::Helper)?;
        let (control_read, control) = pipe()?;
        let (status, status_write) = pipe()?;
        set_nonblocking(&status)?;
        command.pass_fds.push(control_read);
        command.pass_fds.push(status_write);
        // A warm interpreter waits on a third pipe, at the next number.
        let warm = if warm {
            let (read, write) = pipe()?;
            command.pass_fds.push(read);
            Some((write, status_fd + 1))
        } else {
            None
        };
        Ok(PreparedCommand {
            command,
            control,
            status,
            warm,
        })
    }
}

impl BwrapBackend {
    /// A fork server's sandbox (see `zygote/mod.rs`): the runtime's interpreter running
    /// `argv` with the fork-server library bound at `LIBRARY_PATH`, keeping CAP_SYS_ADMIN
    /// CAP_NET_ADMIN and CAP_SETPCAP in its user namespace and no seccomp filter (each run installs
    /// them after making its own namespaces). `argv` names the control socket as
    /// `ZYGOTE_CONTROL_FD`, where the runner places `command.pass_fds[0]`.
    pub(crate) fn build_zygote(
        &self,
        slot_dir: &Path,
        path: &str,
        runtime: (&[PathBuf], &[(String, String)]),
        library: &Path,
        argv: Vec<String>,
    ) -> Result<(SandboxCommand, OwnedFd), SandboxError> {
        let binds_at = [(library.to_path_buf(), PathBuf::from(ZYGOTE_LIBRARY_PATH))];
        let plan = StagePlan {
            argv,
            env: runtime.1,
            ro_binds: runtime.0,
            ro_binds_at: &binds_at,
            slot_dir,
            path,
        };
        let mut command = self.build_with(&plan, Role::Zygote)?;
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::Io {
            what: "socketpair",
            source: e.into(),
        })?;
        command.pass_fds.insert(0, theirs);
        Ok((command, ours))
    }
}

/// Where a zygote's runner places its control socket (`pass_fds[0]`).
pub(crate) const ZYGOTE_CONTROL_FD: i32 = PASS_FD_BASE;

/// What a bubblewrap sandbox runs, which decides its privileges inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A stage: no capabilities, the seccomp filters, bubblewrap's init as pid 1.
    Stage,
    /// The stage-exec helper as pid 1, and the stage under it, as for `Stage`.
    Helper,
    /// A fork server: see `build_zygote`.
    Zygote,
}

/// A prepared sandbox's command and the daemon's ends of its two pipes.
pub(crate) struct PreparedCommand {
    pub(crate) command: SandboxCommand,
    /// Write the stage's `ExecSpec` here (closing it unwritten ends the helper).
    pub(crate) control: OwnedFd,
    /// The stage's raw wait status arrives here (non-blocking; empty if it was killed).
    pub(crate) status: OwnedFd,
    /// For a warm interpreter: where to write its request, and the number it reads it from
    /// inside the sandbox.
    pub(crate) warm: Option<(OwnedFd, std::ffi::c_int)>,
}

/// A close-on-exec pipe (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    super::child::pipe_pair().map_err(|source| SandboxError::Io {
        what: "pipe2",
        source,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), SandboxError> {
    // SAFETY: fcntl on a descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(SandboxError::last_os("fcntl"))
    }
}

impl SandboxBackend for BwrapBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Bwrap
    }

    fn build(&self, plan: &StagePlan<'_>) -> Result<SandboxCommand, SandboxError> {
        self.build_with(plan, Role::Stage)
    }
}

/// Host files under /proc that tell a run about the host, and are masked with an empty
/// file: the kernel's boot parameters, timer and scheduler internals.
const MASKED_PROC_FILES: &[&str] = &[
    "/proc/cmdline",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
];
/// Host directories under /proc masked with an empty read-only tmpfs: pressure stall
/// information (host-wide load), hardware and driver state.
const MASKED_PROC_DIRS: &[&str] = &["/proc/pressure", "/proc/acpi", "/proc/scsi", "/proc/asound"];

impl BwrapBackend {
    /// The bubblewrap command for `role`: for the helper, the command becomes the
    /// sandbox's pid 1 (`--as-pid-1`; the helper reaps like an init).
    fn build_with(&self, plan: &StagePlan<'_>, role: Role) -> Result<SandboxCommand, SandboxError> {
        let command_is_pid_1 = role == Role::Helper;
        let caps: &[&str] = match role {
            Role::Stage | Role::Helper => &["--cap-drop", "ALL"],
            // Held only in the sandbox's own user namespace, and dropped by every run.
            Role::Zygote => &[
                "--cap-drop",
                "ALL",
                "--cap-add",
                "CAP_SYS_ADMIN",
                "--cap-add",
                "CAP_NET_ADMIN",
                // Only so that each run can empty its bounding set, as a cold run's is.
                "--cap-add",
                "CAP_SETPCAP",
            ],
        };
        let mut args: Vec<OsString> = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
        ]
        .into_iter()
        .chain(caps.iter().copied())
        .chain(["--hostname", "sandbox"])
        .map(OsString::from)
        .collect();
        if command_is_pid_1 {
            args.push("--as-pid-1".into());
        }
        self.bind_args(plan.ro_binds, &mut args);
        let box_dir = plan.slot_dir.join("box");
        let tmp_dir = plan.slot_dir.join("tmp");
        let shm_dir = plan.slot_dir.join("shm");
        push(&mut args, ["--proc".as_ref(), "/proc".as_ref()]);
        // A zygote's runs mount a /proc of their own and mask it themselves: the kernel
        // refuses a new proc mount where the existing one is partly covered.
        let masked: (&[&str], &[&str]) = match role {
            Role::Stage | Role::Helper => (MASKED_PROC_FILES, MASKED_PROC_DIRS),
            Role::Zygote => (&[], &[]),
        };
        for file in masked.0.iter().filter(|f| Path::new(f).exists()) {
            push(
                &mut args,
                ["--ro-bind".as_ref(), "/dev/null".as_ref(), file.as_ref()],
            );
        }
        for dir in masked.1.iter().filter(|d| Path::new(d).is_dir()) {
            push(
                &mut args,
                [
                    "--perms".as_ref(),
                    "0555".as_ref(),
                    "--tmpfs".as_ref(),
                    dir.as_ref(),
                    "--remount-ro".as_ref(),
                    dir.as_ref(),
                ],
            );
        }
        push(
            &mut args,
            [
                "--dev".as_ref(),
                "/dev".as_ref(),
                "--bind".as_ref(),
                box_dir.as_os_str(),
                "/box".as_ref(),
                "--bind".as_ref(),
                tmp_dir.as_os_str(),
                "/tmp".as_ref(),
                // A separate mount: `/dev` is made read-only below, `/dev/shm` stays writable
                // (on the slot's sized tmpfs).
                "--bind".as_ref(),
                shm_dir.as_os_str(),
                "/dev/shm".as_ref(),
                "--chdir".as_ref(),
                "/box".as_ref(),
                "--clearenv".as_ref(),
            ],
        );
        for (src, dest) in plan.ro_binds_at {
            push(
                &mut args,
                ["--ro-bind".as_ref(), src.as_os_str(), dest.as_os_str()],
            );
        }
        for (key, value) in &super::sandboxed_env(plan.path, plan.env) {
            push(
                &mut args,
                ["--setenv".as_ref(), key.as_os_str(), value.as_os_str()],
            );
        }
        // Everything mounted so far is in place: make the root itself read-only, so the
        // only writable places are /box and /tmp (separate mounts, unaffected).
        push(&mut args, ["--remount-ro".as_ref(), "/".as_ref()]);
        // --dev is an unsized tmpfs: keep it read-only too, so the slot's tmpfs (/box, /tmp
        // and /dev/shm) stays the only place to write.
        push(&mut args, ["--remount-ro".as_ref(), "/dev".as_ref()]);
        let mut pass_fds = Vec::with_capacity(self.seccomp.len());
        let filters = match role {
            Role::Stage | Role::Helper => &self.seccomp[..],
            Role::Zygote => &[],
        };
        for (i, program) in filters.iter().enumerate() {
            // The runner moves pass_fds[i] to PASS_FD_BASE + i in the child.
            args.push("--add-seccomp-fd".into());
            args.push((PASS_FD_BASE + i as i32).to_string().into());
            pass_fds.push(memfd_with(program)?);
        }
        args.push("--".into());
        args.extend(plan.argv.iter().map(OsString::from));
        Ok(SandboxCommand {
            // The helper and a zygote live on past what they run, which must be the OOM
            // killer's choice, never them.
            oom_protected: command_is_pid_1 || role == Role::Zygote,
            program: self.bwrap.clone(),
            args,
            // bubblewrap itself gets an empty environment; the stage's comes from --setenv.
            env: Vec::new(),
            cwd: plan.slot_dir.to_path_buf(),
            pass_fds,
        })
    }
}
