//! Execution slots: the per-concurrent-run resources, prepared once at start-up.
//!
//! Slot N has its own uid (so RLIMIT_NPROC counts only its processes, and one run can never
//! signal another), its own memory cgroup, and its own directory on a sized tmpfs holding
//! `box/` (the work dir) and `tmp/`. A uid is claimed with an exclusive lock file, so two
//! daemons on one host never share one (as isolate does with box ids).

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub(crate) mod artifact;
pub(crate) mod cgroup;
pub(crate) mod launcher;
mod uids;
mod workdir;

use cgroup::{CgroupRoot, CgroupVersion, MemoryCgroup};
use launcher::{Launcher, launcher_executable};
use uids::claim_uid;
use workdir::{cstring, mount_tmpfs, remove_tree_contents, set_mode};

/// Why a slot's resources cannot be set up or cleaned.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{what} {}: {source}", path.display())]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A submitted file could not be written (named as the request named it).
    #[error("writing {0}: {1}")]
    WritingFile(String, #[source] std::io::Error),
    #[error("no such slot")]
    NoSuchSlot,
    #[error("no free sandbox uid from {0} on (all are locked by other daemons)")]
    NoFreeUid(u32),
    #[error("path {} contains a NUL byte", .0.display())]
    NulInPath(PathBuf),
    #[error("cannot mount a fresh tmpfs on {}", .0.display())]
    NoFreshTmpfs(PathBuf),
    /// Why no memory cgroup can be used here (shown as the RLIMIT_AS fallback's reason).
    #[error("{0}")]
    NoCgroup(String),
    #[error(transparent)]
    FileName(#[from] crate::file_names::InvalidFileName),
}

/// `what` failed on `path`.
pub(crate) fn at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.to_path_buf();
    move |source| PoolError::Path { what, path, source }
}

/// How memory is limited on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryEnforcement {
    CgroupV1,
    CgroupV2,
    /// RLIMIT_AS: breaks runtimes that reserve large address space (JVM, Go, node).
    AddressSpace {
        reason: String,
    },
}

impl MemoryEnforcement {
    pub fn describe(&self) -> String {
        match self {
            MemoryEnforcement::CgroupV1 => "memory cgroup (v1)".into(),
            MemoryEnforcement::CgroupV2 => "memory cgroup (v2)".into(),
            MemoryEnforcement::AddressSpace { reason } => {
                format!("RLIMIT_AS (no memory cgroup: {reason})")
            }
        }
    }
}

pub(crate) struct Slot {
    pub(crate) uid: Option<u32>,
    pub(crate) cgroup: Option<MemoryCgroup>,
    /// Forks this slot's stages inside its cgroups (see `launcher.rs`); restarted if it dies.
    launcher: std::sync::Mutex<Option<Arc<Launcher>>>,
    launcher_exe: Option<PathBuf>,
    pub(crate) dir: PathBuf,
    mounted: bool,
    mounted_size: AtomicU64,
    _uid_lock: Option<File>,
}

pub(crate) struct SlotPool {
    pub(crate) root: PathBuf,
    pub(crate) slots: Vec<Slot>,
    cgroup_root: Option<CgroupRoot>,
    pub(crate) memory: MemoryEnforcement,
    pub(crate) per_slot_uid: bool,
    pub(crate) sized_workdir: bool,
    /// Whether the cgroups account CPU time, so that a whole tree's CPU use is limited.
    pub(crate) tree_cpu_limit: bool,
    /// Whether every slot has a CPU controller of its own (fair shares between slots).
    pub(crate) cpu_fair: bool,
    /// Whether socket buffers count against each run's memory limit.
    pub(crate) socket_memory_limited: bool,
}

pub(crate) struct SlotOptions<'a> {
    pub(crate) count: usize,
    pub(crate) work_root: &'a Path,
    pub(crate) uid_base: u32,
    pub(crate) memory_cgroup: bool,
    pub(crate) tmpfs_workdir: bool,
    pub(crate) workdir_bytes: u64,
    pub(crate) use_launcher: bool,
}

impl Slot {
    /// The slot's launcher, started (or restarted, if it died) on first use. `None` when
    /// the slot forks its stages directly.
    pub(crate) fn launcher(&self) -> Option<Arc<Launcher>> {
        let exe = self.launcher_exe.as_ref()?;
        let mut guard = self.launcher.lock().ok()?;
        if let Some(l) = guard.as_ref().filter(|l| l.is_alive()) {
            return Some(Arc::clone(l));
        }
        let procs = self
            .cgroup
            .as_ref()
            .map(MemoryCgroup::all_procs_paths)
            .unwrap_or_default();
        match Launcher::start(exe, &procs) {
            Ok(l) => {
                *guard = Some(Arc::clone(&l));
                Some(l)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a slot launcher; forking directly");
                None
            }
        }
    }
}

impl Slot {
    /// Kill whatever the slot runs now, at shutdown: its launcher (whose death takes the
    /// stage with it, by PDEATHSIG and the pid namespace) and anything left in its cgroup.
    /// Starts no new launcher.
    pub(crate) fn kill_everything(&self) {
        let launcher = self.launcher.lock().ok().and_then(|mut g| g.take());
        if let Some(cg) = &self.cgroup {
            cg.kill_all(launcher.as_ref().and_then(|l| l.pid()));
        }
        if let Some(l) = launcher {
            l.terminate();
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl SlotPool {
    pub(crate) fn new(opts: &SlotOptions<'_>) -> Result<SlotPool, PoolError> {
        sweep_stale(opts.work_root);
        let root = tempfile::Builder::new()
            .prefix("mde-")
            .tempdir_in(opts.work_root)
            .map_err(at("creating work root in", opts.work_root))?
            .keep();
        // Lets a later daemon tell our work root from a dead daemon's (see `sweep_stale`).
        std::fs::write(root.join(OWNER_FILE), std::process::id().to_string())
            .map_err(at("writing", &root.join(OWNER_FILE)))?;
        // Slot uids must be able to reach their own directories, and nothing else here.
        set_mode(&root, 0o711)?;
        let root_user = is_root();
        let cgroup_name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("mde-{}", std::process::id()));
        let (cgroup_root, memory) = match (opts.memory_cgroup, root_user) {
            (false, _) => (
                None,
                MemoryEnforcement::AddressSpace {
                    reason: "disabled by sandbox.memory_cgroup".into(),
                },
            ),
            (true, false) => (
                None,
                MemoryEnforcement::AddressSpace {
                    reason: "the daemon is not root".into(),
                },
            ),
            (true, true) => match CgroupRoot::detect(&cgroup_name) {
                Ok(cg) => {
                    let kind = match cg.version {
                        CgroupVersion::V1 => MemoryEnforcement::CgroupV1,
                        CgroupVersion::V2 => MemoryEnforcement::CgroupV2,
                    };
                    (Some(cg), kind)
                }
                Err(reason) => (
                    None,
                    MemoryEnforcement::AddressSpace {
                        reason: reason.to_string(),
                    },
                ),
            },
        };
        // A hierarchy can be writable yet unusable (v2 without the memory controller
        // delegated): probe one slot, and fall back to RLIMIT_AS if it fails.
        let (cgroup_root, memory) = match cgroup_root {
            Some(root) => match root.slot(0) {
                Ok(_) => (Some(root), memory),
                Err(reason) => {
                    root.remove();
                    (
                        None,
                        MemoryEnforcement::AddressSpace {
                            reason: reason.to_string(),
                        },
                    )
                }
            },
            None => (None, memory),
        };
        let mut pool = SlotPool {
            root,
            slots: Vec::with_capacity(opts.count),
            cgroup_root,
            memory,
            per_slot_uid: root_user,
            sized_workdir: root_user && opts.tmpfs_workdir,
            tree_cpu_limit: false,
            cpu_fair: false,
            socket_memory_limited: false,
        };
        let mut all_mounted = true;
        let mut next_uid = opts.uid_base;
        let exe = if opts.use_launcher {
            launcher_executable()
        } else {
            None
        };
        for index in 0..opts.count {
            let (uid, lock) = if root_user {
                let (uid, lock) = claim_uid(&mut next_uid, opts.uid_base)?;
                (Some(uid), Some(lock))
            } else {
                (None, None)
            };
            let dir = pool.root.join(format!("slot-{index}"));
            std::fs::DirBuilder::new()
                .mode(0o711)
                .create(&dir)
                .map_err(at("creating", &dir))?;
            let mounted = pool.sized_workdir && mount_tmpfs(&dir, opts.workdir_bytes)?;
            // `reset` below replaces this first mount (which tells whether we may mount).
            all_mounted &= mounted;
            let cgroup = match &pool.cgroup_root {
                Some(root) => Some(root.slot(index)?),
                None => None,
            };
            // A launcher only pays off where joining the cgroups is what it saves.
            let launcher_exe = cgroup.as_ref().and(exe.clone());
            pool.slots.push(Slot {
                uid,
                cgroup,
                launcher: std::sync::Mutex::new(None),
                launcher_exe,
                dir,
                mounted,
                mounted_size: AtomicU64::new(opts.workdir_bytes),
                _uid_lock: lock,
            });
            pool.reset(index)?;
        }
        // Report what is enforced, not what was asked for: the mount may have been refused.
        pool.sized_workdir = all_mounted;
        let every_slot = |f: fn(&MemoryCgroup) -> bool| {
            pool.slots.iter().all(|s| s.cgroup.as_ref().is_some_and(f))
        };
        pool.tree_cpu_limit = every_slot(|cg| cg.cpu_usage().is_some());
        pool.cpu_fair = every_slot(MemoryCgroup::has_cpu_share);
        pool.socket_memory_limited = every_slot(MemoryCgroup::limits_socket_memory);
        if let Some(root) = &pool.cgroup_root {
            root.weigh_like(opts.count);
        }
        Ok(pool)
    }

    pub(crate) fn cgroup_dir(&self) -> Option<PathBuf> {
        self.cgroup_root.as_ref().map(|c| c.dir.clone())
    }
}

impl Drop for SlotPool {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Ok(mut l) = slot.launcher.lock() {
                // Anything that escaped its stage's process group dies first, so the
                // launcher can reap everything before it exits.
                if let Some(cg) = &slot.cgroup {
                    cg.kill_all(l.as_ref().and_then(|l| l.pid()));
                }
                l.take();
            }
            if let Some(cg) = &slot.cgroup {
                cg.remove();
            }
            if slot.mounted
                && let Ok(c) = std::ffi::CString::new(slot.dir.as_os_str().as_encoded_bytes())
            {
                // SAFETY: `c` is a valid C string for the duration of the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(root) = &self.cgroup_root {
            root.remove();
        }
        remove_tree_contents(&self.root);
        let _ = std::fs::remove_dir(&self.root);
    }
}

const OWNER_FILE: &str = "owner.pid";

/// Remove work roots, slot mounts and cgroups left by daemons that died without cleaning
/// up (SIGKILL, a crash). A work root is stale when the pid in its owner file is gone.
fn sweep_stale(work_root: &Path) {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("mde-") {
            continue;
        }
        // Only what a daemon of our own uid made: the temp dir is shared with other users,
        // and we must not be tricked into unmounting or deleting their paths.
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        match entry.path().symlink_metadata() {
            Ok(m) if m.is_dir() && m.uid() == euid => {}
            _ => continue,
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
        if alive {
            continue;
        }
        tracing::info!(path = %entry.path().display(), "removing a dead daemon's work root");
        CgroupRoot::remove_stale(&name);
        for slot in std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(c) = cstring(&slot.path()) {
                // SAFETY: `c` is a valid C string; failing (not a mount point) is fine.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
            }
        }
        remove_tree_contents(&entry.path());
        let _ = std::fs::remove_dir(entry.path());
    }
}
