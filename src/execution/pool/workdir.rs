//! A slot's work dir: a sized tmpfs holding `box/` and `tmp/`, replaced by a fresh one
//! after every run (nothing walks what a run left), resized per stage, sealed after a
//! compile, and the submission's files written into it.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{PoolError, Slot, SlotPool, at};
use crate::execution::SourceFile;

impl SlotPool {
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
    ) -> Result<&Slot, PoolError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
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
    pub(crate) fn resize(&self, index: usize, bytes: u64) -> Result<(), PoolError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
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
    pub(crate) fn seal_compile_output(&self, index: usize) -> Result<(), PoolError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
        if slot.uid.is_none() {
            return Ok(());
        }
        for sub in WORK_DIRS {
            let dir = slot.dir.join(sub);
            let entries = std::fs::read_dir(&dir).map_err(at("reading", &dir))?;
            for entry in entries.flatten() {
                seal(&entry.path())?;
            }
            std::os::unix::fs::lchown(&dir, Some(0), Some(0)).map_err(at("chown", &dir))?;
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
    pub(crate) fn reset(&self, index: usize) -> Result<&Slot, PoolError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
        if slot.mounted {
            let target = cstring(&slot.dir)?;
            // SAFETY: `target` is a valid C string for the duration of the call.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) }
                != 0
            {
                return Err(at("unmounting", &slot.dir)(std::io::Error::last_os_error()));
            }
            let size = slot.mounted_size.load(Ordering::Relaxed);
            if !mount_tmpfs(&slot.dir, size)? {
                return Err(PoolError::NoFreshTmpfs(slot.dir.clone()));
            }
        } else {
            self.throw_away(slot)?;
        }
        for dir in WORK_DIRS.map(|sub| slot.dir.join(sub)) {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(at("creating", &dir))?;
            chown(&dir, slot.uid)?;
        }
        Ok(slot)
    }

    /// Move what a run left in an unmounted slot out of the way (a rename: no walk), then
    /// delete it in the background with `rm -rf`, which handles any depth without
    /// recursion or one descriptor per level.
    fn throw_away(&self, slot: &Slot) -> Result<(), PoolError> {
        static TRASHED: AtomicU64 = AtomicU64::new(0);
        let trash = self.root.join(TRASH_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(at("creating", &trash)(e)),
        }
        let mut moved = false;
        for sub in WORK_DIRS {
            let path = slot.dir.join(sub);
            if path.symlink_metadata().is_err() {
                continue;
            }
            let n = TRASHED.fetch_add(1, Ordering::Relaxed);
            let to = trash.join(format!("{sub}-{n}"));
            std::fs::rename(&path, &to).map_err(at("moving aside", &path))?;
            moved = true;
        }
        if moved {
            std::thread::spawn(move || remove_tree_contents(&trash));
        }
        Ok(())
    }
}

/// Where an unmounted slot's leftovers wait to be deleted.
/// Hand one entry to root, readable by all, executable where it was, no set-id bits,
/// through one `O_PATH | O_NOFOLLOW` descriptor: a symlink swapped in meanwhile is never
/// followed (root would otherwise chmod whatever it points at), and is left as it is.
fn seal(path: &Path) -> Result<(), PoolError> {
    let c = cstring(path)?;
    // SAFETY: a valid C string; the descriptor is checked and closed below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        // Gone since the listing: nothing to seal.
        return Ok(());
    }
    // SAFETY: `fd` is ours alone.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat into a zeroed struct on a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(at("fstat", path)(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Ok(());
    }
    // SAFETY: AT_EMPTY_PATH acts on the descriptor itself.
    if unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), 0, 0, libc::AT_EMPTY_PATH) } != 0 {
        return Err(at("chown", path)(std::io::Error::last_os_error()));
    }
    let mode = st.st_mode & 0o7777;
    let mode = (mode | 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 }) & 0o555;
    // An O_PATH descriptor cannot be fchmod'ed; its /proc link names exactly that inode.
    let by_fd = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| PoolError::NulInPath(path.to_path_buf()))?;
    // SAFETY: a valid C string.
    if unsafe { libc::chmod(by_fd.as_ptr(), mode) } != 0 {
        return Err(at("chmod", path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What a slot's tmpfs holds, each bound into the sandbox: the work dir (`/box`), `/tmp`,
/// and `/dev/shm` (so POSIX semaphores and `multiprocessing` work, inside the same size
/// limit, gone with the run).
pub(crate) const WORK_DIRS: [&str; 3] = ["box", "tmp", "shm"];

pub(super) const TRASH_DIR: &str = "trash";

/// Delete everything below `dir` (but `dir` itself) with `rm -rf --one-file-system`: GNU
/// rm walks any depth iteratively, with a bounded number of descriptors, and never follows
/// symlinks. Blocking; run it off the async workers.
pub(super) fn remove_tree_contents(dir: &Path) {
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
fn usage(dir: &Path) -> Result<(u64, u64), PoolError> {
    let c = cstring(dir)?;
    // SAFETY: statvfs writes into a valid, zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(at("statvfs", dir)(std::io::Error::last_os_error()));
    }
    let used_blocks = st.f_blocks.saturating_sub(st.f_bfree);
    let used_inodes = st.f_files.saturating_sub(st.f_ffree);
    Ok((used_blocks * st.f_frsize, used_inodes))
}

pub(super) fn cstring(path: &Path) -> Result<std::ffi::CString, PoolError> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| PoolError::NulInPath(path.to_path_buf()))
}

/// Mount a sized tmpfs on `dir`; `Ok(false)` when the host does not let us.
pub(super) fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<bool, PoolError> {
    let target = cstring(dir)?;
    let data = std::ffi::CString::new(format!(
        "size={bytes},nr_inodes={},mode=0711",
        inodes(bytes)
    ))
    .map_err(|_| PoolError::NulInPath(dir.to_path_buf()))?;
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
            "cannot mount a sized tmpfs; the work dir size is not enforced (mounting needs \
             CAP_SYS_ADMIN: `--cap-add SYS_ADMIN` for docker and podman, \
             `capabilities.add: [SYS_ADMIN]` in Kubernetes)"
        );
        return Ok(false);
    }
    Ok(true)
}

fn remount_tmpfs(dir: &Path, bytes: u64, nr_inodes: u64) -> Result<(), PoolError> {
    let target = cstring(dir)?;
    let data = std::ffi::CString::new(format!("size={bytes},nr_inodes={nr_inodes}"))
        .map_err(|_| PoolError::NulInPath(dir.to_path_buf()))?;
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
        return Err(at("resizing", dir)(std::io::Error::last_os_error()));
    }
    Ok(())
}

use crate::limits::tmpfs_inodes as inodes;

pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), PoolError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(at("chmod", path))
}

fn chown(path: &Path, uid: Option<u32>) -> Result<(), PoolError> {
    match uid {
        Some(uid) => {
            std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(at("chown", path))
        }
        None => Ok(()),
    }
}

/// Write one submitted file under `box_dir`, creating its parent directories. The box is
/// fresh, but `create_new` makes sure no existing path (or link) is ever written through.
fn write_file(box_dir: &Path, file: &SourceFile, uid: Option<u32>) -> Result<(), PoolError> {
    crate::file_names::validate(&file.name)?;
    let path = box_dir.join(&file.name);
    let mut dir = box_dir.to_path_buf();
    let parts: Vec<&str> = file.name.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(at("creating", &dir))?;
            chown(&dir, uid)?;
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| PoolError::WritingFile(file.name.clone(), e))?;
    std::io::Write::write_all(&mut out, &file.content)
        .map_err(|e| PoolError::WritingFile(file.name.clone(), e))?;
    chown(&path, uid)
}
