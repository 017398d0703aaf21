//! A compile stage's output, taken out of a slot's work dir into the daemon's memory and
//! written into other (fresh) work dirs: what the compile cache keeps, and what every test
//! of a batch runs from. The copy is bounded (depth, entries, bytes), never follows a
//! symlink, and what it writes back is root's and read-only, so a run can neither change
//! nor delete it (the copy it got; the kept one is in no sandbox at all).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{PoolError, SlotPool, at};

/// What the work dir held after a compile.
#[derive(Debug, Clone, Default)]
pub(crate) struct Artifact {
    entries: Vec<Entry>,
    bytes: u64,
}

#[derive(Debug, Clone)]
enum Entry {
    Dir {
        path: PathBuf,
    },
    File {
        path: PathBuf,
        mode: u32,
        content: Vec<u8>,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
}

/// Bookkeeping charged per entry on top of its content, so a million empty files are not
/// free in the cache's byte bound.
const ENTRY_OVERHEAD: u64 = 256;
/// Directories below `box/` at most.
const MAX_DEPTH: usize = 32;
/// Entries at most.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Why a compile's output was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("the compile left more than {max} bytes or {MAX_ENTRIES} files")]
    TooLarge { max: u64 },
    #[error("the compile left directories nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl Artifact {
    /// Bytes it holds, as the cache counts them (content plus a fixed overhead per entry).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl SlotPool {
    /// Copy what slot `index`'s `box/` holds into memory: at most `max_bytes` (as
    /// [`Artifact::bytes`] counts), [`MAX_ENTRIES`] entries, [`MAX_DEPTH`] levels. Only
    /// after the compile's processes are gone (its sandbox's pid namespace is), so nothing
    /// changes the tree while it is read; symlinks are kept as links, never followed.
    pub(crate) fn capture_box(
        &self,
        index: usize,
        max_bytes: u64,
    ) -> Result<Artifact, CaptureError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
        let root = slot.dir.join("box");
        let mut artifact = Artifact::default();
        let mut pending = vec![(PathBuf::new(), 0usize)];
        let too_large = || CaptureError::TooLarge { max: max_bytes };
        while let Some((rel, depth)) = pending.pop() {
            let dir = root.join(&rel);
            let listing = std::fs::read_dir(&dir).map_err(at("reading", &dir))?;
            let mut names: Vec<_> = listing.flatten().map(|e| e.file_name()).collect();
            // A stable order, so one compile's output always reads back the same.
            names.sort();
            for name in names {
                let path = rel.join(&name);
                let full = root.join(&path);
                let meta = full.symlink_metadata().map_err(at("reading", &full))?;
                artifact.bytes += ENTRY_OVERHEAD;
                if artifact.entries.len() >= MAX_ENTRIES || artifact.bytes > max_bytes {
                    return Err(too_large());
                }
                let kind = meta.file_type();
                if kind.is_dir() {
                    if depth + 1 > MAX_DEPTH {
                        return Err(CaptureError::TooDeep);
                    }
                    artifact.entries.push(Entry::Dir { path: path.clone() });
                    pending.push((path, depth + 1));
                } else if kind.is_symlink() {
                    let target = std::fs::read_link(&full).map_err(at("reading", &full))?;
                    artifact.entries.push(Entry::Symlink { path, target });
                } else if kind.is_file() {
                    if artifact.bytes.saturating_add(meta.len()) > max_bytes {
                        return Err(too_large());
                    }
                    let content = read_no_follow(&full)?;
                    artifact.bytes += content.len() as u64;
                    if artifact.bytes > max_bytes {
                        return Err(too_large());
                    }
                    artifact.entries.push(Entry::File {
                        path,
                        mode: meta.permissions().mode(),
                        content,
                    });
                }
                // Sockets, fifos and devices are not build outputs: left out.
            }
        }
        // Parents before children (the walk is depth first, so sort by depth is enough).
        artifact
            .entries
            .sort_by_key(|e| entry_path(e).components().count());
        Ok(artifact)
    }

    /// Write `artifact` into slot `index`'s (fresh, empty) `box/`, every entry root's and
    /// read-only (executable where it was), as a sealed compile leaves it (see
    /// `seal_compile_output`, which the caller runs next for the dirs themselves).
    pub(crate) fn restore_box(&self, index: usize, artifact: &Artifact) -> Result<(), PoolError> {
        let slot = self.slots.get(index).ok_or(PoolError::NoSuchSlot)?;
        let root = slot.dir.join("box");
        for entry in &artifact.entries {
            let full = root.join(entry_path(entry));
            match entry {
                Entry::Dir { .. } => std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&full)
                    .map_err(at("creating", &full))?,
                Entry::Symlink { target, .. } => {
                    std::os::unix::fs::symlink(target, &full).map_err(at("creating", &full))?;
                }
                Entry::File { mode, content, .. } => {
                    let sealed = (mode | 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 }) & 0o555;
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&full)
                        .map_err(at("creating", &full))?;
                    std::io::Write::write_all(&mut out, content).map_err(at("writing", &full))?;
                    out.set_permissions(std::fs::Permissions::from_mode(sealed))
                        .map_err(at("chmod", &full))?;
                }
            }
        }
        Ok(())
    }
}

fn entry_path(entry: &Entry) -> &Path {
    match entry {
        Entry::Dir { path } | Entry::File { path, .. } | Entry::Symlink { path, .. } => path,
    }
}

/// A regular file's bytes, through a descriptor opened without following a link.
fn read_no_follow(path: &Path) -> Result<Vec<u8>, PoolError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(at("reading", path))?;
    let mut content = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut content).map_err(at("reading", path))?;
    Ok(content)
}
