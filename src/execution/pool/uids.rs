//! Slot uids: one per slot, claimed with a lock file (two daemons never share one, as
//! isolate does with box ids), and only while no process still runs as it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{PoolError, at};

/// Claim the next uid not locked by another daemon on this host.
pub(super) fn claim_uid(next: &mut u32, base: u32) -> Result<(u32, File), PoolError> {
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
            .map_err(at("opening", &path))?;
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
    Err(PoolError::NoFreeUid(base))
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
