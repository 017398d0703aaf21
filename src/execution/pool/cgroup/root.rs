//! Finding where slot cgroups can be made (v2, or the v1 memory, cpuacct and cpu
//! hierarchies), making them, and sweeping those of a dead daemon.

use std::path::{Path, PathBuf};

use super::{CgroupVersion, MemoryCgroup, write_file};
use crate::execution::pool::{PoolError, at};

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
    pub(crate) fn detect(name: &str) -> Result<CgroupRoot, PoolError> {
        let self_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(at("reading", Path::new("/proc/self/cgroup")))?;
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers");
        if unified.exists() {
            let controllers = std::fs::read_to_string(unified).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                let own = self_cgroup
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/")
                    .trim();
                let own_dir = Path::new("/sys/fs/cgroup").join(own.trim_start_matches('/'));
                // Best: slots inside our own cgroup, so whatever bounds the daemon (a systemd
                // unit's MemoryMax, a container's limit) bounds its submissions. cgroup v2
                // forbids processes in a cgroup that hands controllers to children, so we
                // move into a leaf of our own first (`nest`); that works where our cgroup is
                // delegated to us (systemd `Delegate=yes`, the root of a container's cgroup
                // namespace). Otherwise, a sibling of our cgroup, as before.
                // Only where the cgroup is ours to manage: the root of our cgroup namespace, or
                // a systemd unit with `Delegate=yes` (systemd marks it `trusted.delegate`).
                // Nesting inside a unit that is not delegated would fight systemd, and its
                // default `OOMPolicy=stop` would stop the unit at a submission's first OOM.
                let ours = own == "/" || delegated(&own_dir);
                let nested = if ours {
                    nest(&own_dir, own == "/")
                } else {
                    Err(PoolError::NoCgroup(
                        "the daemon's cgroup is not delegated to it".into(),
                    ))
                };
                let base = match nested {
                    Ok(()) => own_dir.join(name),
                    Err(reason) if own == "/" => return Err(reason),
                    Err(reason) => {
                        tracing::info!(%reason, "slot cgroups go beside the daemon's cgroup");
                        own_dir.parent().unwrap_or(&own_dir).join(name)
                    }
                };
                return make_root(base, CgroupVersion::V2, &own_dir);
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
        Err(PoolError::NoCgroup(
            "no memory cgroup controller is mounted".into(),
        ))
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
            let dir = Path::new("/sys/fs/cgroup").join(own.trim().trim_start_matches('/'));
            // Both places slots may be: inside our cgroup (nested) and beside it. A daemon
            // that nested moved itself into `daemon/`, so its slots sit beside that leaf.
            bases.push(dir.join(name));
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
                    peak: None,
                };
                cg.remove();
            }
            let _ = std::fs::remove_dir(base);
        }
    }

    pub(crate) fn slot(&self, index: usize) -> Result<MemoryCgroup, PoolError> {
        let dir = self.dir.join(format!("slot-{index}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(at("cannot create", &dir)(e)),
        }
        if self.version == CgroupVersion::V2 {
            if !dir.join("memory.max").exists() {
                let _ = std::fs::remove_dir(&dir);
                return Err(PoolError::NoCgroup(format!(
                    "the memory controller is not enabled for {}",
                    self.dir.display()
                )));
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
        let peak = match self.version {
            CgroupVersion::V2 => super::PeakFile::open(&dir),
            CgroupVersion::V1 => None,
        };
        let cg = MemoryCgroup {
            cpu_dir: sub(&self.cpu_dir),
            dir,
            version: self.version,
            cpuacct_dir,
            peak,
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

/// The controllers slots use, in the order they are enabled; memory is the one required.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// What to do so that `dir`'s children can have the controllers slots need.
#[derive(Debug, PartialEq, Eq)]
enum Nesting {
    /// `dir` already hands memory to its children.
    Ready,
    /// Move the processes in `dir` into a leaf (unless `dir` is the host's root, exempt
    /// from the rule), then enable these controllers for its children.
    MoveThenEnable(Vec<&'static str>),
    /// The memory controller is not available to `dir` at all: delegation is missing.
    NoMemory,
}

/// The decision, from `dir`'s `cgroup.controllers` and `cgroup.subtree_control`.
fn nesting(controllers: &str, subtree_control: &str) -> Nesting {
    let has = |list: &str, c: &str| list.split_whitespace().any(|x| x == c);
    if has(subtree_control, "memory") {
        return Nesting::Ready;
    }
    if !has(controllers, "memory") {
        return Nesting::NoMemory;
    }
    Nesting::MoveThenEnable(
        V2_CONTROLLERS
            .into_iter()
            .filter(|c| has(controllers, c) && !has(subtree_control, c))
            .collect(),
    )
}

/// Whether systemd delegated `dir` to its unit (`Delegate=yes` sets the `trusted.delegate`
/// extended attribute, systemd 251+).
fn delegated(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut value = [0u8; 8];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.delegate".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n > 0 && value[0] == b'1'
}

/// How to grant the memory controller, for messages and `/health`.
const DELEGATION_HINT: &str = "the memory controller is not delegated to the daemon's cgroup: \
     run it under systemd with `Delegate=yes` (deploy/systemd), give a container its own \
     cgroup with the controllers delegated (Docker and Kubernetes do on cgroup v2 hosts), or \
     use the host's cgroup namespace (`docker run --cgroupns=host`)";

/// Make `dir` hand memory (and pids and cpu, where available) to its children: the
/// "nesting" step container-in-container tools take. `at_namespace_root` says `dir` is the
/// root of our cgroup namespace.
fn nest(dir: &Path, at_namespace_root: bool) -> Result<(), PoolError> {
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let enable = match nesting(&read("cgroup.controllers"), &read("cgroup.subtree_control")) {
        Nesting::Ready => return Ok(()),
        Nesting::NoMemory => return Err(PoolError::NoCgroup(DELEGATION_HINT.into())),
        Nesting::MoveThenEnable(enable) => enable,
    };
    // The host's own root is exempt from the no-processes rule (and has no cgroup.type):
    // never move the host's processes around.
    let true_root = at_namespace_root && !dir.join("cgroup.type").exists();
    if !true_root {
        let leaf = dir.join("daemon");
        match std::fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(at("cannot create", &leaf)(e)),
        }
        // Again until none is left: a process may fork while we move the others.
        for _ in 0..10 {
            let procs = read("cgroup.procs");
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.split_whitespace() {
                // A process that exited meanwhile is no obstacle.
                let _ = write_file(&leaf.join("cgroup.procs"), pid);
            }
        }
    }
    for controller in enable {
        if let Err(e) = write_file(
            &dir.join("cgroup.subtree_control"),
            &format!("+{controller}"),
        ) {
            if controller == "memory" {
                return Err(PoolError::NoCgroup(format!(
                    "{DELEGATION_HINT} (enabling memory: {e})"
                )));
            }
            tracing::warn!(controller, error = %e, "a cgroup controller is not available to the slots");
        }
    }
    Ok(())
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

fn make_root(
    base: PathBuf,
    version: CgroupVersion,
    parent: &Path,
) -> Result<CgroupRoot, PoolError> {
    if version == CgroupVersion::V2 {
        // Enable the controllers for the slots under the base (best effort, one by one:
        // cpu is often not delegated where memory is).
        let _ = std::fs::create_dir(&base);
        for controller in V2_CONTROLLERS {
            let _ = write_file(
                &base.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            );
        }
    } else {
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(at("cannot create a memory cgroup under", parent)(e));
            }
        }
    }
    if !base.is_dir() {
        return Err(PoolError::NoCgroup(format!(
            "cannot create a memory cgroup under {}",
            parent.display()
        )));
    }
    Ok(CgroupRoot {
        dir: base,
        version,
        cpuacct_dir: None,
        cpu_dir: None,
    })
}

#[cfg(test)]
mod tests {
    use super::{Nesting, nesting};

    #[test]
    fn nesting_enables_what_is_there_and_names_what_is_missing() {
        let cases = [
            ("cpuset cpu io memory pids", "memory pids", Nesting::Ready),
            (
                "cpuset cpu io memory pids",
                "",
                Nesting::MoveThenEnable(vec!["memory", "pids", "cpu"]),
            ),
            (
                "memory pids",
                "pids",
                Nesting::MoveThenEnable(vec!["memory"]),
            ),
            ("cpu io pids", "", Nesting::NoMemory),
            ("", "", Nesting::NoMemory),
        ];
        for (controllers, subtree, want) in cases {
            assert_eq!(
                nesting(controllers, subtree),
                want,
                "{controllers} / {subtree}"
            );
        }
    }
}
