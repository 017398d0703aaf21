//! The seccomp filter handed to bubblewrap (`--add-seccomp-fd`) and installed by every
//! zygote run, built with `seccompiler`.
//!
//! Three seccompiler filters, because one has a single match action, and on x86_64 a
//! hand-written one refusing every x32 call (ENOSYS), chained into one BPF program (see
//! [`chain`]), so a zygote run installs one program. (Installing costs about the same
//! either way, measured: the kernel's cost is per instruction, checking and compiling
//! the program and evaluating it for every system call number to fill its cache.)
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

/// x32 syscalls (numbers with this bit set) share the x86_64 audit arch, so the arch
/// check does not stop them: [`refuse_x32`] answers all of them.
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

/// The filter as raw `struct sock_filter` arrays, the format bubblewrap reads: one
/// program (a list, so a caller may install each program it holds).
pub(crate) fn build_filters() -> Result<Vec<Vec<u8>>, SandboxError> {
    let program = chain(separate_programs()?);
    if program.len() > BPF_MAXINSNS {
        return Err(SandboxError::seccomp(std::io::Error::other(format!(
            "the chained seccomp program has {} instructions, over the kernel's {BPF_MAXINSNS}",
            program.len()
        ))));
    }
    Ok(vec![to_bytes(&program)])
}

/// The filters, in the order the kernel would evaluate them installed one after another:
/// newest first (of equal actions, and all of them answer errnos, the first seen wins).
fn separate_programs() -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::seccomp)?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(DENIED_ARCH)
        .map(|&nr| (nr, Vec::new()))
        .collect();
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

    let mut programs = Vec::new();
    #[cfg(target_arch = "x86_64")]
    programs.push(refuse_x32());
    for filter in [sockets, clone3, deny] {
        programs.push(BpfProgram::try_from(filter).map_err(SandboxError::seccomp)?);
    }
    Ok(programs)
}

/// Every x32 system call answers ENOSYS, as on kernels built without x32: x32 has numbers
/// of its own for some calls (ptrace is 521, process_vm_readv 539), which the deny list,
/// written in x86_64 numbers, would not catch where the kernel has x32 enabled. By hand,
/// because a seccompiler rule matches one number, not a bit of it.
#[cfg(target_arch = "x86_64")]
fn refuse_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JMP_JSET_K: u16 = 0x45;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const JMP_JEQ_K: u16 = 0x15;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // Another architecture's calls go on to the next program's arch check (which
        // kills), as if this one were installed on its own.
        insn(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        insn(JMP_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        insn(JMP_JSET_K, 0, 1, X32_BIT as u32),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// The `AUDIT_ARCH_*` value seccomp sees for this build's native system calls.
#[cfg(test)]
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(test)]
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// The longest program the kernel accepts.
const BPF_MAXINSNS: usize = 4096;
const BPF_RET_K: u16 = 0x06;
const BPF_JMP_JA: u16 = 0x05;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// One program that answers as the given ones installed together would: each one's
/// "allow" becomes a jump to the start of the next (only the last program allows), and
/// any other answer ends the run there. Jumps inside a program keep their targets, since
/// no instruction moves.
fn chain(programs: Vec<BpfProgram>) -> BpfProgram {
    let count = programs.len();
    let mut out = Vec::with_capacity(programs.iter().map(Vec::len).sum());
    for (index, mut program) in programs.into_iter().enumerate() {
        if index + 1 < count {
            let len = program.len();
            for (i, insn) in program.iter_mut().enumerate() {
                if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_ALLOW {
                    insn.code = BPF_JMP_JA;
                    insn.jt = 0;
                    insn.jf = 0;
                    // Past the rest of this program: onto the next one's first instruction.
                    insn.k = (len - 1 - i) as u32;
                }
            }
        }
        out.extend(program);
    }
    out
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
    use seccompiler::{BpfProgram, sock_filter};

    /// Classic BPF as seccomp runs it, for the instructions seccompiler emits, over a
    /// `struct seccomp_data` of `nr`, the arch and `args`.
    fn run(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = vec![nr, arch, 0, 0];
        for arg in args {
            data.extend([arg as u32, (arg >> 32) as u32]);
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            pc += 1;
            let k = insn.k;
            match insn.code {
                0x20 => acc = data[k as usize / 4], // ld [k]
                0x54 => acc &= k,                   // and #k
                0x06 => return k,                   // ret #k
                0x05 => pc += k as usize,           // ja
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match insn.code {
                        0x15 => acc == k,
                        0x25 => acc > k,
                        0x35 => acc >= k,
                        _ => acc & k != 0,
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                other => panic!("instruction {other:#x} not emulated"),
            }
        }
    }

    /// The kernel's answer for several installed programs: all run, the lowest action
    /// class wins, and of equal ones the newest program's (the first in `newest_first`).
    fn run_all(newest_first: &[BpfProgram], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut best: Option<u32> = None;
        for program in newest_first {
            let ret = run(program, nr, arch, args);
            let class = |r: u32| (r & 0xffff_0000) as i32;
            if best.is_none_or(|b| class(ret) < class(b)) {
                best = Some(ret);
            }
        }
        best.unwrap_or(0)
    }

    fn parse(bytes: &[u8]) -> BpfProgram {
        bytes
            .chunks_exact(8)
            .map(|c| sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect()
    }

    #[test]
    fn the_chained_program_answers_as_the_filters_installed_together() {
        let filters = super::build_filters().expect("filters build");
        let chained = parse(&filters[0]);
        let separate = super::separate_programs().expect("programs build");
        let arch = super::AUDIT_ARCH;
        let flag_args = [
            0u64,
            0x1000_0000,
            0x2000_0000,
            0x0002_0000,
            0x11,
            0x4000_0000 | 0x11,
        ];
        let socket_args = [1u64, 2, 10, 16, 17, 40];
        let mut checked = 0;
        for nr in (0..560u32).chain((0..560).map(|n| n | 0x4000_0000)) {
            for &a0 in flag_args.iter().chain(&socket_args) {
                for a2 in [0u64, 9, 15] {
                    let args = [a0, 1, a2, 0, 0, 0];
                    assert_eq!(
                        run(&chained, nr, arch, args),
                        run_all(&separate, nr, arch, args),
                        "syscall {nr:#x} with args {args:?}"
                    );
                    checked += 1;
                }
            }
        }
        // x32's own ptrace and process_vm_readv, which the x86_64 deny list does not name.
        #[cfg(target_arch = "x86_64")]
        for nr in [521u32, 539] {
            let errno_enosys = 0x0005_0000 | libc::ENOSYS as u32;
            assert_eq!(run(&chained, nr | 0x4000_0000, arch, [0; 6]), errno_enosys);
        }
        // Another architecture's calls are refused as by the separate filters, whatever
        // their number.
        for nr in [1u32, 11, 0x4000_0001, 0x4000_0209] {
            assert_eq!(
                run(&chained, nr, 0x4000_0003, [0; 6]),
                run_all(&separate, nr, 0x4000_0003, [0; 6]),
                "foreign syscall {nr:#x}"
            );
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn filters_build_for_this_architecture() {
        let filters = super::build_filters().expect("filters build");
        assert_eq!(filters.len(), 1);
        for f in filters {
            assert!(!f.is_empty() && f.len() % 8 == 0);
        }
    }
}
