//! Execution slots: the per-concurrent-run resources, prepared once at start-up.
//!
//! Slot N has its own uid (so RLIMIT_NPROC counts only its processes, and one run can never
//! signal another), its own memory cgroup, and its own directory on a sized tmpfs holding
//! `box/` (the work dir) and `tmp/`. A uid is claimed with an exclusive lock file, so two
//! daemons on one host never share one (as isolate does with box ids).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::SourceFile;
use super::cgroup::{CgroupRoot, CgroupVersion, MemoryCgroup};
use super::launcher::{Launcher, launcher_executable};
use std::sync::Arc;

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

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl SlotPool {
    pub(crate) fn new(opts: &SlotOptions<'_>) -> Result<SlotPool, String> {
        sweep_stale(opts.work_root);
        let root = tempfile::Builder::new()
            .prefix("mde-")
            .tempdir_in(opts.work_root)
            .map_err(|e| format!("creating work root in {}: {e}", opts.work_root.display()))?
            .keep();
        // Lets a later daemon tell our work root from a dead daemon's (see `sweep_stale`).
        std::fs::write(root.join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| format!("writing {}: {e}", root.join(OWNER_FILE).display()))?;
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
                Err(reason) => (None, MemoryEnforcement::AddressSpace { reason }),
            },
        };
        // A hierarchy can be writable yet unusable (v2 without the memory controller
        // delegated): probe one slot, and fall back to RLIMIT_AS if it fails.
        let (cgroup_root, memory) = match cgroup_root {
            Some(root) => match root.slot(0) {
                Ok(_) => (Some(root), memory),
                Err(reason) => {
                    root.remove();
                    (None, MemoryEnforcement::AddressSpace { reason })
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
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
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

    /// Give the slot fresh dirs (see [`SlotPool::reset`]) unless `fresh_dirs` is false,
    /// size them, and write the submission's files.
    ///
    /// With `fresh_dirs` false the dirs were made fresh after the slot's last run, and a
    /// prepared sandbox set up on them binds them, so they must not be replaced.
    pub(crate) fn prepare(
        &self,
        index: usize,
        files: &[SourceFile],
        workdir_bytes: u64,
        fresh_dirs: bool,
    ) -> Result<&Slot, String> {
        let slot = self.slots.get(index).ok_or("no such slot")?;
        if fresh_dirs {
            self.reset(index)?;
        }
        self.resize(index, workdir_bytes)?;
        let box_dir = slot.dir.join("box");
        for file in files {
            write_file(&box_dir, file, slot.uid)?;
        }
        Ok(slot)
    }

    /// Size the slot's tmpfs for the next stage. tmpfs size changes apply to mounts already
    /// bound into a sandbox, too. A stage never gets more room than `bytes` in all, but
    /// what an earlier stage left (a compiler's output) stays: the size is then what is
    /// used already, so the stage can write nothing more.
    pub(crate) fn resize(&self, index: usize, bytes: u64) -> Result<(), String> {
        let slot = self.slots.get(index).ok_or("no such slot")?;
        if !slot.mounted || slot.mounted_size.load(Ordering::Relaxed) == bytes {
            return Ok(());
        }
        let (used_bytes, used_inodes) = usage(&slot.dir)?;
        let size = bytes.max(used_bytes);
        remount_tmpfs(&slot.dir, size, inodes(size).max(used_inodes + 16))?;
        slot.mounted_size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// After a compile: hand what it left at the top of `box/` and `tmp/` to root (readable,
    /// and executable where it was), and make both dirs sticky. The run stage can still
    /// create files there, but can neither delete nor truncate the compiler's output: with
    /// the tmpfs sized to `max(workdir_bytes, used)`, deleting its own 120 MB binary would
    /// otherwise have given a run 120 MB to write under a 1 MiB `workdir_bytes`. Only the
    /// top level is walked (one `readdir`, no recursion): files inside a compiled
    /// directory stay the slot's, and the dir itself becomes root's, so none can be removed.
    pub(crate) fn seal_compile_output(&self, index: usize) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let slot = self.slots.get(index).ok_or("no such slot")?;
        if slot.uid.is_none() {
            return Ok(());
        }
        for sub in ["box", "tmp"] {
            let dir = slot.dir.join(sub);
            let entries =
                std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = path.symlink_metadata() else {
                    continue;
                };
                std::os::unix::fs::lchown(&path, Some(0), Some(0))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
                if meta.file_type().is_symlink() {
                    continue;
                }
                let mode = meta.permissions().mode();
                // Everyone may read it, whoever could execute it still can, and no set-id.
                let mode = mode | 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o555))
                    .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            }
            std::os::unix::fs::lchown(&dir, Some(0), Some(0))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            set_mode(&dir, 0o1777)?;
        }
        Ok(())
    }

    /// Make the slot's `box/` and `tmp/` new and empty, owned by the slot's uid, whatever
    /// the last run left there (a tree 15,000 directories deep, a million files).
    ///
    /// Nothing here walks what a run left: on a tmpfs slot the old filesystem is detached
    /// and a fresh one mounted (the kernel frees the old one when its last user is gone);
    /// otherwise the old dirs are renamed into the slot's trash and removed by `rm -rf` in
    /// the background. Both are O(1) on the caller's thread, so a hostile tree can neither
    /// overflow a stack nor hold up an async worker.
    pub(crate) fn reset(&self, index: usize) -> Result<&Slot, String> {
        let slot = self.slots.get(index).ok_or("no such slot")?;
        if slot.mounted {
            let target = cstring(&slot.dir)?;
            // SAFETY: `target` is a valid C string for the duration of the call.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) }
                != 0
            {
                return Err(format!(
                    "unmounting {}: {}",
                    slot.dir.display(),
                    std::io::Error::last_os_error()
                ));
            }
            let size = slot.mounted_size.load(Ordering::Relaxed);
            if !mount_tmpfs(&slot.dir, size)? {
                return Err(format!(
                    "cannot mount a fresh tmpfs on {}",
                    slot.dir.display()
                ));
            }
        } else {
            self.throw_away(slot)?;
        }
        for dir in [slot.dir.join("box"), slot.dir.join("tmp")] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            chown(&dir, slot.uid)?;
        }
        Ok(slot)
    }

    /// Move what a run left in an unmounted slot out of the way (a rename: no walk), then
    /// delete it in the background with `rm -rf`, which handles any depth without
    /// recursion or one descriptor per level.
    fn throw_away(&self, slot: &Slot) -> Result<(), String> {
        static TRASHED: AtomicU64 = AtomicU64::new(0);
        let trash = self.root.join(TRASH_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating {}: {e}", trash.display())),
        }
        let mut moved = false;
        for sub in ["box", "tmp"] {
            let path = slot.dir.join(sub);
            if path.symlink_metadata().is_err() {
                continue;
            }
            let n = TRASHED.fetch_add(1, Ordering::Relaxed);
            let to = trash.join(format!("{sub}-{n}"));
            std::fs::rename(&path, &to)
                .map_err(|e| format!("moving {} aside: {e}", path.display()))?;
            moved = true;
        }
        if moved {
            std::thread::spawn(move || remove_tree_contents(&trash));
        }
        Ok(())
    }
}

/// Where an unmounted slot's leftovers wait to be deleted.
const TRASH_DIR: &str = "trash";

/// Delete everything below `dir` (but `dir` itself) with `rm -rf --one-file-system`: GNU
/// rm walks any depth iteratively, with a bounded number of descriptors, and never follows
/// symlinks. Blocking; run it off the async workers.
fn remove_tree_contents(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    if paths.is_empty() {
        return;
    }
    let status = std::process::Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .args(&paths)
        .stdin(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::warn!(dir = %dir.display(), ?status, "cannot delete a slot's leftovers");
    }
}

/// Bytes and inodes in use on the filesystem holding `dir`.
fn usage(dir: &Path) -> Result<(u64, u64), String> {
    let c = cstring(dir)?;
    // SAFETY: statvfs writes into a valid, zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    let used_blocks = st.f_blocks.saturating_sub(st.f_bfree);
    let used_inodes = st.f_files.saturating_sub(st.f_ffree);
    Ok((used_blocks * st.f_frsize, used_inodes))
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
            if slot.mounted {
                if let Ok(c) = std::ffi::CString::new(slot.dir.as_os_str().as_encoded_bytes()) {
                    // SAFETY: `c` is a valid C string for the duration of the call.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
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

/// Claim the next uid not locked by another daemon on this host.
fn claim_uid(next: &mut u32, base: u32) -> Result<(u32, File), String> {
    let lock_dir = Path::new("/run/lock/mixed-docker-executor");
    let _ = std::fs::create_dir_all(lock_dir);
    for _ in 0..4096 {
        let uid = *next;
        *next += 1;
        let path = lock_dir.join(format!("uid-{uid}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        // A free lock is not enough: processes of a daemon that just stopped may still be
        // exiting under this uid, and they would count against our runs' process limit.
        if !uid_has_processes(uid) {
            return Ok((uid, file));
        }
    }
    Err(format!(
        "no free sandbox uid from {base} on (all are locked by other daemons)"
    ))
}

/// Whether any process runs with `uid` as its real uid (the one RLIMIT_NPROC counts).
fn uid_has_processes(uid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .any(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|real| real.parse::<u32>().ok())
                == Some(uid)
        })
}

fn cstring(path: &Path) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("path {} contains a NUL byte", path.display()))
}

/// Mount a sized tmpfs on `dir`; `Ok(false)` when the host does not let us.
fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<bool, String> {
    let target = cstring(dir)?;
    let data = std::ffi::CString::new(format!(
        "size={bytes},nr_inodes={},mode=0711",
        inodes(bytes)
    ))
    .map_err(|e| e.to_string())?;
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        tracing::warn!(
            dir = %dir.display(),
            error = %std::io::Error::last_os_error(),
            "cannot mount a sized tmpfs; the work dir size is not enforced"
        );
        return Ok(false);
    }
    Ok(true)
}

fn remount_tmpfs(dir: &Path, bytes: u64, nr_inodes: u64) -> Result<(), String> {
    let target = cstring(dir)?;
    let data = std::ffi::CString::new(format!("size={bytes},nr_inodes={nr_inodes}"))
        .map_err(|e| e.to_string())?;
    // SAFETY: all pointers are valid C strings or null for the duration of the call.
    let ret = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(format!(
            "resizing {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// One inode per 4 KiB of space (at least 1024): millions of empty files would otherwise
/// cost kernel memory that no size limit sees.
fn inodes(bytes: u64) -> u64 {
    (bytes / 4096).max(1024)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn chown(path: &Path, uid: Option<u32>) -> Result<(), String> {
    match uid {
        Some(uid) => std::os::unix::fs::lchown(path, Some(uid), Some(uid))
            .map_err(|e| format!("chown {}: {e}", path.display())),
        None => Ok(()),
    }
}

/// Write one submitted file under `box_dir`, creating its parent directories. The box is
/// fresh, but `create_new` makes sure no existing path (or link) is ever written through.
fn write_file(box_dir: &Path, file: &SourceFile, uid: Option<u32>) -> Result<(), String> {
    super::validate_file_name(&file.name)?;
    let path = box_dir.join(&file.name);
    let mut dir = box_dir.to_path_buf();
    let parts: Vec<&str> = file.name.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            chown(&dir, uid)?;
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("writing {}: {e}", file.name))?;
    std::io::Write::write_all(&mut out, &file.content)
        .map_err(|e| format!("writing {}: {e}", file.name))?;
    chown(&path, uid)
}

#[cfg(test)]
mod tests {
    use super::uid_has_processes;

    #[test]
    fn finds_processes_by_real_uid() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(uid_has_processes(me), "this test runs as uid {me}");
        assert!(!uid_has_processes(3_999_999_999));
    }
}
