//! Per-slot memory cgroups (v2, or v1 where that is what the host mounts).
//!
//! Created once per slot at start-up (creating one per run costs milliseconds); each run
//! sets its limit and resets the peak. The runner moves the sandbox into the cgroup in the
//! child before exec, so no process of the run starts outside it.

use std::io::Write;
use std::path::{Path, PathBuf};

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
}

/// Where new memory cgroups can be made: under the daemon's own cgroup, so the host's
/// limits on the daemon still bound its submissions.
#[derive(Debug, Clone)]
pub(crate) struct CgroupRoot {
    pub(crate) dir: PathBuf,
    pub(crate) version: CgroupVersion,
    /// v1 only: where the per-slot `cpuacct` cgroups go, when that hierarchy is writable.
    pub(crate) cpuacct_dir: Option<PathBuf>,
    /// v1 only: where the per-slot `cpu` cgroups go (equal shares, so that slots share the
    /// CPU fairly whatever a run does with sessions: autogroups only count in the root).
    pub(crate) cpu_dir: Option<PathBuf>,
}

impl CgroupRoot {
    /// Find a writable memory hierarchy, or say why there is none.
    pub(crate) fn detect(name: &str) -> Result<CgroupRoot, String> {
        let self_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers");
        if unified.exists() {
            let controllers = std::fs::read_to_string(unified).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                let own = self_cgroup
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/");
                // cgroup v2 forbids processes in inner nodes, so use a sibling of our own
                // cgroup when we are in a leaf; creating there needs delegation or root.
                let parent = Path::new("/sys/fs/cgroup").join(own.trim_start_matches('/'));
                // At the root of a cgroup namespace (a container) there is no sibling to
                // use: try a child, which works where the root is exempt or delegated.
                let base = if own.trim() == "/" {
                    parent.join(name)
                } else {
                    parent.parent().unwrap_or(&parent).join(name)
                };
                return make_root(base, CgroupVersion::V2, &parent);
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let own = v1_own_path(&self_cgroup, "memory").unwrap_or("/");
            let parent = v1.join(own.trim_start_matches('/'));
            let mut root = make_root(parent.join(name), CgroupVersion::V1, &parent)?;
            root.cpuacct_dir = v1_controller_root(&self_cgroup, "cpuacct", name);
            // Mounted together with cpuacct on many hosts (`cpu,cpuacct`): one group then.
            root.cpu_dir = v1_controller_root(&self_cgroup, "cpu", name)
                .filter(|cpu| !same_dir(Some(cpu), root.cpuacct_dir.as_ref()));
            return Ok(root);
        }
        Err("no memory cgroup controller is mounted".into())
    }

    /// Remove the cgroups a dead daemon left under `name` (killing anything still inside).
    pub(crate) fn remove_stale(name: &str) {
        let Ok(self_cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
            return;
        };
        let mut bases = Vec::new();
        for controller in ["memory", "cpuacct", "cpu"] {
            let own = v1_own_path(&self_cgroup, controller);
            if let Some(own) = own {
                bases.push(
                    Path::new("/sys/fs/cgroup")
                        .join(controller)
                        .join(own.trim_start_matches('/'))
                        .join(name),
                );
            }
        }
        if let Some(own) = self_cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
            let dir = Path::new("/sys/fs/cgroup").join(own.trim_start_matches('/'));
            bases.push(dir.parent().unwrap_or(&dir).join(name));
        }
        for base in bases.iter().filter(|b| b.is_dir()) {
            let slots = std::fs::read_dir(base).into_iter().flatten().flatten();
            for slot in slots.filter(|e| e.path().is_dir()) {
                let cg = MemoryCgroup {
                    dir: slot.path(),
                    version: CgroupVersion::V1,
                    cpuacct_dir: None,
                    cpu_dir: None,
                };
                cg.remove();
            }
            let _ = std::fs::remove_dir(base);
        }
    }

    pub(crate) fn slot(&self, index: usize) -> Result<MemoryCgroup, String> {
        let dir = self.dir.join(format!("slot-{index}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        if self.version == CgroupVersion::V2 {
            if !dir.join("memory.max").exists() {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!(
                    "the memory controller is not enabled for {}",
                    self.dir.display()
                ));
            }
            // Keep runs out of swap so the memory limit means what it says.
            let _ = write_file(&dir.join("memory.swap.max"), "0");
        }
        let sub = |root: &Option<PathBuf>| {
            let d = root.as_ref()?.join(format!("slot-{index}"));
            (std::fs::create_dir(&d).is_ok() || d.is_dir()).then_some(d)
        };
        let cpuacct_dir = match self.version {
            CgroupVersion::V2 => Some(dir.clone()),
            CgroupVersion::V1 => sub(&self.cpuacct_dir),
        };
        let cg = MemoryCgroup {
            cpu_dir: sub(&self.cpu_dir),
            dir,
            version: self.version,
            cpuacct_dir,
        };
        Ok(cg)
    }

    /// Give the slots' parent group the CPU weight of `slots` ordinary tasks, so that the
    /// slots together weigh what that many sandboxes outside a group would (best effort).
    pub(crate) fn weigh_like(&self, slots: usize) {
        let slots = slots.max(1) as u64;
        match (self.version, &self.cpu_dir) {
            (CgroupVersion::V1, Some(dir)) => {
                let _ = write_file(&dir.join("cpu.shares"), &(1024 * slots).to_string());
            }
            (CgroupVersion::V2, _) => {
                let weight = (100 * slots).min(10_000);
                let _ = write_file(&self.dir.join("cpu.weight"), &weight.to_string());
            }
            (CgroupVersion::V1, None) => {}
        }
    }

    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
        for d in [&self.cpuacct_dir, &self.cpu_dir].into_iter().flatten() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The daemon's own path in the v1 hierarchy of `controller`, from `/proc/self/cgroup`
/// (lines `id:controller,controller:/path`).
fn v1_own_path<'a>(self_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })
}

/// A v1 hierarchy beside the memory one: `cpuacct` for CPU time of whole process trees
/// (rusage misses processes that are never reaped up the chain), `cpu` for fair shares.
fn v1_controller_root(self_cgroup: &str, controller: &str, name: &str) -> Option<PathBuf> {
    let own = v1_own_path(self_cgroup, controller)?;
    let marker = match controller {
        "cpu" => "cpu.shares",
        _ => "cpuacct.usage",
    };
    let mount = [
        format!("/sys/fs/cgroup/{controller}"),
        "/sys/fs/cgroup/cpu,cpuacct".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.join(marker).exists())?;
    let dir = mount.join(own.trim_start_matches('/')).join(name);
    (std::fs::create_dir(&dir).is_ok() || dir.is_dir()).then_some(dir)
}

/// Whether two cgroup paths are the same directory (hierarchies mounted together are
/// reached by several names: `cpu`, `cpuacct` and `cpu,cpuacct`).
fn same_dir(a: Option<&PathBuf>, b: Option<&PathBuf>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        },
        _ => false,
    }
}

fn make_root(base: PathBuf, version: CgroupVersion, parent: &Path) -> Result<CgroupRoot, String> {
    if version == CgroupVersion::V2 {
        // Enable the memory and cpu controllers for children of the base (best effort,
        // one by one: cpu is often not delegated where memory is).
        let _ = std::fs::create_dir(&base);
        for controller in ["+memory", "+cpu"] {
            let _ = write_file(&base.join("cgroup.subtree_control"), controller);
        }
    } else {
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create a memory cgroup under {}: {e}",
                    parent.display()
                ));
            }
        }
    }
    if !base.is_dir() {
        return Err(format!(
            "cannot create a memory cgroup under {}",
            parent.display()
        ));
    }
    Ok(CgroupRoot {
        dir: base,
        version,
        cpuacct_dir: None,
        cpu_dir: None,
    })
}

/// cgroup v1's limit on a cgroup's TCP socket buffers.
const V1_TCP_LIMIT: &str = "memory.kmem.tcp.limit_in_bytes";

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

fn read_u64(path: &Path) -> Option<u64> {
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
    pub(crate) fn prepare(&self, limit_bytes: u64) -> Result<u64, String> {
        let err = |what: &str, e: std::io::Error| format!("{what} on {}: {e}", self.dir.display());
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
                }) {
                    if tcp.exists() {
                        tracing::warn!(cgroup = %self.dir.display(), error = %e,
                            "cannot set the socket memory limit");
                    }
                }
                let _ = write_file(&self.dir.join("memory.max_usage_in_bytes"), "0");
            }
            CgroupVersion::V2 => {
                write_file(&self.dir.join("memory.max"), &limit_bytes.to_string())
                    .map_err(|e| err("setting memory.max", e))?;
                // Writing to memory.peak resets it on kernels that support that (6.12+).
                let _ = write_file(&self.dir.join("memory.peak"), "0");
            }
        }
        Ok(self.oom_kills())
    }

    /// Memory the cgroup holds now.
    pub(crate) fn usage_bytes(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => read_u64(&self.dir.join("memory.usage_in_bytes")),
            CgroupVersion::V2 => read_u64(&self.dir.join("memory.current")),
        }
    }

    /// Peak memory since `prepare`.
    pub(crate) fn peak_bytes(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => read_u64(&self.dir.join("memory.max_usage_in_bytes")),
            CgroupVersion::V2 => read_u64(&self.dir.join("memory.peak")),
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
