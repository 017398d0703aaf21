//! Per-slot cgroups (v2, or the v1 memory, cpuacct and cpu hierarchies the host mounts).
//!
//! Created once per slot at start-up (`root.rs`; creating one per run costs milliseconds);
//! each run sets its limits and resets the peak. The slot's launcher sits in them, so every
//! stage it forks is born inside.

mod root;

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{PoolError, at};
pub(crate) use root::CgroupRoot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupVersion {
    V1,
    V2,
}

#[derive(Debug)]
pub(crate) struct MemoryCgroup {
    dir: PathBuf,
    version: CgroupVersion,
    /// v1 keeps CPU accounting in a separate `cpuacct` hierarchy; v2 has it in `dir`.
    cpuacct_dir: Option<PathBuf>,
    /// v1 only: the slot's group in the `cpu` hierarchy (its CPU share), when that is a
    /// hierarchy of its own; v2 has the controller in `dir`.
    cpu_dir: Option<PathBuf>,
    /// v2: `memory.peak`, kept open. Since 6.12 a write resets the peak *for the descriptor
    /// that wrote*, and only reads through it see the reset value, so it is one descriptor
    /// for the slot's life.
    peak: Option<PeakFile>,
}

/// A v2 slot's `memory.peak` and whether resetting it worked on this kernel.
#[derive(Debug)]
pub(crate) struct PeakFile {
    file: std::sync::Mutex<std::fs::File>,
    resets: std::sync::atomic::AtomicBool,
}

impl PeakFile {
    pub(super) fn open(dir: &Path) -> Option<PeakFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("memory.peak"))
            .ok()?;
        Some(PeakFile {
            file: std::sync::Mutex::new(file),
            resets: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reset the peak for this descriptor; false on kernels before 6.12 (read-only file).
    fn reset(&self) -> bool {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ok = file.write_all(b"reset").is_ok();
        self.resets.store(ok, std::sync::atomic::Ordering::Relaxed);
        ok
    }

    /// The peak since the last reset, read through the same descriptor; `None` when the
    /// kernel cannot reset it (the peak would be the slot's since its creation).
    fn read(&self) -> Option<u64> {
        use std::io::{Read, Seek};
        if !self.resets.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        file.rewind().ok()?;
        file.read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    }
}

/// cgroup v1's limit on a cgroup's TCP socket buffers.
pub(super) const V1_TCP_LIMIT: &str = "memory.kmem.tcp.limit_in_bytes";

pub(super) fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

pub(super) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl MemoryCgroup {
    /// `cgroup.procs`: the runner writes the child's pid here before exec.
    pub(crate) fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Every `cgroup.procs` the child must join (memory, and v1's cpuacct and cpu).
    pub(crate) fn all_procs_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.procs_path()];
        for d in [&self.cpuacct_dir, &self.cpu_dir].into_iter().flatten() {
            if *d != self.dir {
                paths.push(d.join("cgroup.procs"));
            }
        }
        paths
    }

    /// Whether the slot has a CPU controller of its own, so slots share the CPU fairly.
    pub(crate) fn has_cpu_share(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => self.cpu_dir.is_some() || self.cpuacct_has_cpu(),
            CgroupVersion::V2 => self.dir.join("cpu.weight").exists(),
        }
    }

    /// v1 `cpu,cpuacct` mounted together: the cpuacct group is the cpu group too.
    fn cpuacct_has_cpu(&self) -> bool {
        self.cpuacct_dir
            .as_ref()
            .is_some_and(|d| d.join("cpu.shares").exists())
    }

    /// Whether socket buffers count against the memory limit (v2 always; v1 with a TCP limit).
    pub(crate) fn limits_socket_memory(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => self.dir.join(V1_TCP_LIMIT).exists(),
            CgroupVersion::V2 => true,
        }
    }

    /// CPU time used by everything that ever ran in the cgroup (compare two readings).
    pub(crate) fn cpu_usage(&self) -> Option<std::time::Duration> {
        let dir = self.cpuacct_dir.as_ref()?;
        match self.version {
            CgroupVersion::V1 => {
                read_u64(&dir.join("cpuacct.usage")).map(std::time::Duration::from_nanos)
            }
            CgroupVersion::V2 => std::fs::read_to_string(dir.join("cpu.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .map(std::time::Duration::from_micros),
        }
    }

    /// Set the limit for the next run and reset its peak and OOM counters' baseline.
    pub(crate) fn prepare(&self, limit_bytes: u64) -> Result<u64, PoolError> {
        let err = |what: &'static str, e: std::io::Error| at(what, &self.dir)(e);
        match self.version {
            CgroupVersion::V1 => {
                let limit = limit_bytes.to_string();
                let memsw = self.dir.join("memory.memsw.limit_in_bytes");
                // memsw must stay >= the memory limit: order the writes to keep that true.
                let _ = write_file(&memsw, &limit);
                write_file(&self.dir.join("memory.limit_in_bytes"), &limit)
                    .map_err(|e| err("setting memory.limit_in_bytes", e))?;
                let _ = write_file(&memsw, &limit);
                // v1 charges socket buffers apart from memory, and only once a TCP limit is
                // set: without one, 108 loopback connections pinned a gigabyte outside any
                // limit. Bound them by the run's memory limit too. Lowering it fails (EBUSY)
                // while the last run's sockets are still being torn down; the previous
                // limit then stays, which is still a bound.
                let tcp = self.dir.join(V1_TCP_LIMIT);
                if let Err(e) = write_file(&tcp, &limit).or_else(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    write_file(&tcp, &limit)
                }) && tcp.exists()
                {
                    tracing::warn!(cgroup = %self.dir.display(), error = %e,
                            "cannot set the socket memory limit");
                }
                let _ = write_file(&self.dir.join("memory.max_usage_in_bytes"), "0");
            }
            CgroupVersion::V2 => {
                write_file(&self.dir.join("memory.max"), &limit_bytes.to_string())
                    .map_err(|e| err("setting memory.max", e))?;
                // Resets the peak for our descriptor on kernels that support it (6.12+).
                if let Some(peak) = &self.peak {
                    peak.reset();
                }
            }
        }
        Ok(self.oom_kills())
    }

    /// Give back memory charged here that no process holds: what the last run left in the
    /// page cache and kernel caches (a run that stats a million missing paths leaves
    /// negative dentries worth tens of megabytes), which would otherwise count against
    /// the next run here, inflate its reported peak, and make a waiting interpreter or a
    /// zygote look too big to keep. Resident memory (anonymous, shared and mapped pages)
    /// stays. Cheap when there is nothing to give back (two reads).
    pub(crate) fn reclaim_unheld(&self) {
        const SLACK: u64 = 16 << 20;
        let Some(usage) = self.usage_bytes() else {
            return;
        };
        let resident = self.resident_bytes();
        if usage <= resident + SLACK {
            return;
        }
        // Best effort: what cannot be reclaimed stays, and the caller's checks see it.
        let _ = match self.version {
            // Lowering the limit makes the kernel reclaim down to it (or refuse, EBUSY);
            // `prepare` then sets the run's own limit.
            CgroupVersion::V1 => write_file(
                &self.dir.join("memory.limit_in_bytes"),
                &(resident + SLACK).to_string(),
            ),
            CgroupVersion::V2 => write_file(
                &self.dir.join("memory.reclaim"),
                &(usage - resident - SLACK / 2).to_string(),
            ),
        };
    }

    /// Memory processes here hold: anonymous, shared memory and mapped file pages.
    fn resident_bytes(&self) -> u64 {
        let keys: &[&str] = match self.version {
            CgroupVersion::V1 => &["total_rss", "total_shmem", "total_mapped_file"],
            CgroupVersion::V2 => &["anon", "shmem", "file_mapped"],
        };
        std::fs::read_to_string(self.dir.join("memory.stat"))
            .map(|stat| {
                stat.lines()
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(k, _)| keys.contains(k))
                    .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Memory the cgroup holds now.
    pub(crate) fn usage_bytes(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => read_u64(&self.dir.join("memory.usage_in_bytes")),
            CgroupVersion::V2 => read_u64(&self.dir.join("memory.current")),
        }
    }

    /// Peak memory since `prepare`: v1's `max_usage_in_bytes` (reset by `prepare`), v2's
    /// `memory.peak` through the slot's own descriptor (kernels 6.12+); `None` where the
    /// kernel cannot give a per-run peak (v2 before 6.12), and the runner then reports the
    /// largest process's resident size instead.
    pub(crate) fn peak_bytes(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => read_u64(&self.dir.join("memory.max_usage_in_bytes")),
            CgroupVersion::V2 => self.peak.as_ref().and_then(PeakFile::read),
        }
    }

    /// The number of OOM kills so far (compare with the value `prepare` returned).
    pub(crate) fn oom_kills(&self) -> u64 {
        let file = match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGKILL everything still in the cgroup but `except` (the slot's launcher); returns
    /// how many were signalled.
    pub(crate) fn kill_all(&self, except: Option<u32>) -> usize {
        if except.is_none()
            && self.version == CgroupVersion::V2
            && write_file(&self.dir.join("cgroup.kill"), "1").is_ok()
        {
            return 0;
        }
        let Ok(text) = std::fs::read_to_string(self.procs_path()) else {
            return 0;
        };
        let except = except.map(|p| p as i32);
        let mut n = 0;
        for pid in text
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter(|p| Some(*p) != except)
        {
            if self.kill_member(pid) {
                n += 1;
            }
        }
        n
    }

    /// SIGKILL `pid` only if it is still in this cgroup: a pidfd pins the process, so a
    /// pid reused between reading `cgroup.procs` and signalling is never hit.
    fn kill_member(&self, pid: i32) -> bool {
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            return false;
        }
        let ours = std::fs::read_to_string(self.procs_path())
            .map(|t| t.lines().any(|l| l.trim() == pid.to_string()))
            .unwrap_or(false);
        // SAFETY: signalling and closing the pidfd we just opened.
        let sent = ours
            && unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd,
                    libc::SIGKILL,
                    std::ptr::null::<u8>(),
                    0,
                )
            } == 0;
        unsafe { libc::close(pidfd) };
        sent
    }

    /// Whether no process but `except` is inside.
    pub(crate) fn is_empty(&self, except: Option<u32>) -> bool {
        let except = except.map(|p| p.to_string());
        std::fs::read_to_string(self.procs_path())
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .all(|l| l.is_empty() || Some(l) == except.as_deref())
            })
            .unwrap_or(true)
    }

    pub(crate) fn remove(&self) {
        self.kill_all(None);
        let dirs: Vec<&PathBuf> = std::iter::once(&self.dir)
            .chain(self.cpuacct_dir.iter().filter(|d| **d != self.dir))
            .collect();
        // rmdir fails while the last killed processes are still exiting; retry briefly.
        for _ in 0..100 {
            for dir in &dirs {
                let _ = std::fs::remove_dir(dir);
            }
            if dirs.iter().all(|d| !d.exists()) {
                return;
            }
            self.kill_all(None);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::warn!(cgroup = %self.dir.display(), "could not remove cgroup");
    }
}
