//! What a run's init needs once its zygote runs again beside it in the same memory (see
//! `fork_server.rs`): system calls that never touch the C library's state (not even
//! `errno`, which is the zygote's), and the two halves of a fork point, which let the run,
//! forked by the init, carry on where the zygote called [`fork_point`].
//!
//! x86_64 only: the fork server is not built for other architectures (`zygote.rs` reports
//! zygotes unavailable there and runtimes run warm).

use std::ffi::{c_int, c_long};

/// A system call as the kernel answers it: the result, or a negative errno.
///
/// # Safety
/// As the system call `nr` with these arguments.
#[inline(always)]
pub(super) unsafe fn syscall(nr: c_long, args: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller's; the kernel clobbers rcx and r11 and nothing else.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// # Safety
/// As `syscall`.
pub(super) unsafe fn call(nr: c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    // SAFETY: the caller's.
    unsafe { syscall(nr, [a, b, c, d, 0, 0]) }
}

pub(super) fn exit_group(code: c_int) -> ! {
    loop {
        // SAFETY: ends this process.
        unsafe { call(libc::SYS_exit_group, code as usize, 0, 0, 0) };
    }
}

/// # Safety
/// `fd` must be a descriptor nothing else owns any more.
pub(super) unsafe fn close(fd: c_int) {
    // SAFETY: the caller's.
    unsafe { call(libc::SYS_close, fd as usize, 0, 0, 0) };
}

/// Whether this thread runs with a user shadow stack: a run resumed through
/// [`resume`] would then return on a shadow stack that is the init's, and fault.
pub(super) fn shadow_stack_enabled() -> bool {
    const ARCH_SHSTK_STATUS: usize = 0x5005;
    const ARCH_SHSTK_SHSTK: u64 = 1;
    let mut features: u64 = 0;
    // SAFETY: the kernel writes one u64 to `features` (or fails, on kernels without it).
    let r = unsafe {
        call(
            libc::SYS_arch_prctl,
            ARCH_SHSTK_STATUS,
            &raw mut features as usize,
            0,
            0,
        )
    };
    r == 0 && features & ARCH_SHSTK_SHSTK != 0
}

/// The callee-saved registers, stack and return address of a [`fork_point`] call, and
/// the floating-point control state (the offsets are the assembly's).
#[repr(C)]
#[derive(Default)]
pub(super) struct Registers {
    saved: [u64; 8],
    mxcsr: u32,
    fpu_control: u16,
}

/// Save the caller's registers in `registers` and tail-call `body(registers)`; returns
/// what `body` returns. A process that [`resume`]s the registers, being a fork made while
/// `body` ran (so its memory holds the caller's frames as they were then), returns 0
/// from here instead.
///
/// # Safety
/// `body` must be an `extern "C"` function taking the pointer.
#[unsafe(naked)]
pub(super) unsafe extern "C" fn fork_point(
    registers: *mut Registers,
    body: unsafe extern "C" fn(*mut Registers) -> c_int,
) -> c_int {
    core::arch::naked_asm!(
        "mov [rdi], rbx",
        "mov [rdi + 8], rbp",
        "mov [rdi + 16], r12",
        "mov [rdi + 24], r13",
        "mov [rdi + 32], r14",
        "mov [rdi + 40], r15",
        // The stack pointer as the caller will see it after the return, and the return
        // address (where `resume` goes).
        "lea rax, [rsp + 8]",
        "mov [rdi + 48], rax",
        "mov rax, [rsp]",
        "mov [rdi + 56], rax",
        "stmxcsr [rdi + 64]",
        "fnstcw [rdi + 68]",
        // Tail call: `body` returns straight to our caller.
        "jmp rsi",
    )
}

/// Return 0 from the [`fork_point`] call whose registers these are.
///
/// # Safety
/// Only in a fork of the process that called `fork_point`, made while its `body` ran.
#[unsafe(naked)]
pub(super) unsafe extern "C" fn resume(registers: *const Registers) -> ! {
    core::arch::naked_asm!(
        "mov rbx, [rdi]",
        "mov rbp, [rdi + 8]",
        "mov r12, [rdi + 16]",
        "mov r13, [rdi + 24]",
        "mov r14, [rdi + 32]",
        "mov r15, [rdi + 40]",
        "ldmxcsr [rdi + 64]",
        "fldcw [rdi + 68]",
        "mov rsp, [rdi + 48]",
        "xor eax, eax",
        "jmp qword ptr [rdi + 56]",
    )
}
