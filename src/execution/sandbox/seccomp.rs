//! The seccomp filters handed to bubblewrap (`--add-seccomp-fd`), built with `seccompiler`.
//!
//! Three programs, because a seccompiler filter has one match action:
//! - a denylist answering EPERM: mounts (including the new mount API and mount listing),
//!   namespaces, tracing, kernel keyrings, modules, BPF, perf, userfaultfd, io_uring,
//!   inotify/fanotify (they would show which files concurrent runs open on the shared
//!   read-only binds), reboot/clock/swap, `memfd_secret`, `modify_ldt`, and clone with any
//!   namespace flag;
//! - `clone3` answering ENOSYS: its flags sit in memory a filter cannot read, and ENOSYS makes
//!   libc fall back to `clone`, whose flags the first filter checks;
//! - socket families answering EAFNOSUPPORT: only AF_UNIX, AF_INET, AF_INET6 (the sandbox's
//!   own loopback) and NETLINK_ROUTE (which libc uses to list the sandbox's interfaces).
//!   AF_VSOCK crosses network namespaces to the hypervisor; AF_PACKET, AF_ALG, Bluetooth,
//!   the other netlink protocols and the rest are kernel surface no submission needs.
//!
//! Syscalls from another architecture (e.g. `int 0x80` on x86_64) fail the filter's arch check.

use std::collections::BTreeMap;

use super::SandboxError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls no submission needs and a sandbox escape would.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_lookup_dcookie,
    libc::SYS_personality,
    // io_uring is a large, often-exploited kernel surface no submission needs.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // ptrace-class: reach into other processes.
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_process_madvise,
    // Watching the shared binds shows what concurrent runs open.
    libc::SYS_inotify_init1,
    libc::SYS_fanotify_init,
    libc::SYS_memfd_secret,
    // Mount API additions newer than the libc crate's constants (same number everywhere).
    SYS_STATMOUNT,
    SYS_LISTMOUNT,
    SYS_OPEN_TREE_ATTR,
];

/// Syscalls only some architectures have.
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: &[libc::c_long] = &[libc::SYS_inotify_init, libc::SYS_modify_ldt];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ARCH: &[libc::c_long] = &[];

const SYS_STATMOUNT: libc::c_long = 457;
const SYS_LISTMOUNT: libc::c_long = 458;
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// The socket families a submission may open (see the module docs).
const SOCKET_FAMILIES: &[libc::c_int] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// x32 syscalls (x86_64 numbers with this bit set) share the x86_64 audit arch, so the
/// arch check does not stop them: deny the x32 numbers of the denied syscalls too.
#[cfg(target_arch = "x86_64")]
const X32_BIT: libc::c_long = 0x4000_0000;

const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// Both filters as raw `struct sock_filter` arrays, the format bubblewrap reads.
pub(crate) fn build_filters() -> Result<Vec<Vec<u8>>, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::seccomp)?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(DENIED_ARCH)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    #[cfg(target_arch = "x86_64")]
    for &nr in DENIED
        .iter()
        .chain(DENIED_ARCH)
        .chain([&libc::SYS_clone, &libc::SYS_clone3])
    {
        deny.insert(nr | X32_BIT, Vec::new());
    }
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = u64::from(flag.unsigned_abs());
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|cond| SeccompRule::new(vec![cond]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SandboxError::seccomp)?;
    deny.insert(libc::SYS_clone, clone_rules);
    let refusing = |rules, errno: libc::c_int| {
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(SandboxError::seccomp)
    };
    let deny = refusing(deny, libc::EPERM)?;
    let clone3 = refusing([(libc::SYS_clone3, Vec::new())].into(), libc::ENOSYS)?;

    let sockets = refusing(socket_rules()?, libc::EAFNOSUPPORT)?;

    [deny, clone3, sockets]
        .into_iter()
        .map(|filter| {
            let program: BpfProgram = filter.try_into().map_err(SandboxError::seccomp)?;
            Ok(to_bytes(&program))
        })
        .collect()
}

/// `socket` and `socketpair` match (and are refused) when the family is none of
/// [`SOCKET_FAMILIES`] and not netlink with protocol NETLINK_ROUTE.
fn socket_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let cond = |arg: u8, op: SeccompCmpOp, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value as u64)
            .map_err(SandboxError::seccomp)
    };
    // Conditions in one rule all hold; rules of one syscall are alternatives.
    let other_family = SOCKET_FAMILIES
        .iter()
        .chain([&libc::AF_NETLINK])
        .map(|&family| cond(0, SeccompCmpOp::Ne, family))
        .collect::<Result<Vec<_>, _>>()?;
    let other_netlink = vec![
        cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK)?,
        cond(2, SeccompCmpOp::Ne, libc::NETLINK_ROUTE)?,
    ];
    let rules = || -> Result<Vec<SeccompRule>, SandboxError> {
        [other_family.clone(), other_netlink.clone()]
            .into_iter()
            .map(|conds| SeccompRule::new(conds).map_err(SandboxError::seccomp))
            .collect()
    };
    let mut map = BTreeMap::new();
    map.insert(libc::SYS_socket, rules()?);
    // A pair is AF_UNIX only in practice; the same family rule refuses the rest.
    map.insert(libc::SYS_socketpair, rules()?);
    #[cfg(target_arch = "x86_64")]
    {
        // x32 numbers would skip these rules: refuse them outright.
        map.insert(libc::SYS_socket | X32_BIT, Vec::new());
        map.insert(libc::SYS_socketpair | X32_BIT, Vec::new());
    }
    Ok(map)
}

fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_build_for_this_architecture() {
        let filters = super::build_filters().expect("filters build");
        assert_eq!(filters.len(), 3);
        for f in filters {
            assert!(!f.is_empty() && f.len() % 8 == 0);
        }
    }
}
