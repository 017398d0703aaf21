//! The fork server's side: C functions an interpreter calls (python through `ctypes`),
//! exported from `libmixed_docker_executor.so`. See `zygote/mod.rs` for the whole design.
//!
//! The interpreter's loop, for every runtime:
//! ```text
//! mde_zygote_init(control_fd)          once: not dumpable, children reaped, filters built
//! loop:
//!     mde_zygote_next()                wait for the last run to end (0: the daemon left)
//!     <before-fork hooks>
//!     pid = mde_zygote_clone()         clones the next run's init (pid 1 of a new pid
//!                                      namespace), which makes the run's namespaces,
//!                                      /proc, tmpfs and loopback, forks the run (pid 2)
//!                                      and supervises it without returning; the run
//!                                      returns 0 here, the zygote the init's pid
//!     <after-fork hooks: the parent's in the zygote, the child's in the run>
//!     if pid > 0: continue             the zygote goes back to waiting
//!     n = mde_run_enter()              (run) waits for a request's descriptors, reads the
//!                                      request, writes its files, drops every privilege;
//!                                      descriptor 3 holds the argv, n bytes
//! ```
//! The init is a `CLONE_VM` child on a stack of its own: it shares the zygote's memory
//! (cloning it copies nothing, and its exit frees nothing), and forks the run with the C
//! library's `fork` while the zygote waits, so the run is the one copy of the zygote's
//! memory a run costs, and the C library's own state (its cached thread id) is right in
//! it (see `mde_zygote_clone`).
//! So the next run is ready (namespaces made, interpreter forked) before its request
//! comes, and only the request's own work is on its path. There is one run, ready or
//! running, per zygote at a time: the next is cloned when the last one's init has exited,
//! so it never counts against a running one's processes or memory.
//! Every function returns a negative errno on failure; the bootstrap then exits, and the
//! daemon sees a run without a status (and replaces the zygote).
//!
//! The process is single-threaded throughout, so the state lives in one `Mutex` that is
//! never contended, and a forked child may take it. The init, which shares the zygote's
//! memory, never touches it (it gets what it needs in a `CloneRun`).

use std::ffi::{CStr, c_int};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::protocol::{RunRequest, STARTED, Status};
use super::raw;
use crate::execution::sandbox::child::{STAGE_OOM_SCORE_C, apply_rlimits, set_oom_score_adj};

/// The descriptors of one run, in the order the daemon sends them.
pub(crate) const RUN_FDS: usize = 5;
const REQUEST: usize = 0;
const STATUS: usize = 1;
const STDIN: usize = 2;
const STDOUT: usize = 3;
const STDERR: usize = 4;

/// Where the run finds its argv (the bootstrap reads and closes it).
const ARGV_FD: RawFd = 3;

/// Host files under /proc masked in every run, as bubblewrap's cold sandboxes mask them
/// (see `bwrap.rs`), and the directories masked with an empty read-only tmpfs.
const MASKED_PROC_FILES: &[&CStr] = &[
    c"/proc/cmdline",
    c"/proc/timer_list",
    c"/proc/sched_debug",
    c"/proc/latency_stats",
];
const MASKED_PROC_DIRS: &[&CStr] = &[
    c"/proc/pressure",
    c"/proc/acpi",
    c"/proc/scsi",
    c"/proc/asound",
];
/// What bubblewrap's `--proc` makes read-only in its own /proc.
const READ_ONLY_PROC: &[&CStr] = &[
    c"/proc/sys",
    c"/proc/sysrq-trigger",
    c"/proc/irq",
    c"/proc/bus",
];

#[derive(Default)]
struct State {
    control: Option<RawFd>,
    filters: Vec<Vec<u8>>,
    /// The zygote's end of the pipe its ready run (init and run) writes to once it has
    /// taken a request; the run's end while it waits.
    taken: Option<OwnedFd>,
    /// A pidfd of the run's init the zygote cloned last: the next is cloned when it ends.
    init: Option<OwnedFd>,
    /// Consecutive ready runs that died before taking a request.
    failures: u32,
    /// Where each run's init runs (see `mde_zygote_clone`).
    init_stack: Option<InitStack>,
    run_fds: Vec<OwnedFd>,
    request: Option<RunRequest>,
    argv: Option<OwnedFd>,
    argv_len: usize,
}

/// Ready runs that may die in a row before the zygote gives up (and is replaced).
const MAX_FAILURES: u32 = 3;
/// The size a ready run's tmpfs is mounted with before its request says the real one
/// (nothing is written to it before then).
const READY_TMPFS_BYTES: u64 = 1 << 30;

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut guard = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(guard.get_or_insert_with(State::default))
}

fn errno() -> c_int {
    -std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn neg(e: &std::io::Error) -> c_int {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

fn check(ret: c_int) -> Result<(), c_int> {
    if ret < 0 { Err(errno()) } else { Ok(()) }
}

/// Once, in the zygote: keep it out of reach of everything that later runs under its uid,
/// have the kernel reap the run inits it clones, and build the seccomp filters every run
/// installs.
#[unsafe(no_mangle)]
pub(crate) extern "C" fn mde_zygote_init(control_fd: c_int) -> c_int {
    // SAFETY: prctl and signal with constant arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return errno();
        }
        if libc::signal(libc::SIGCHLD, libc::SIG_IGN) == libc::SIG_ERR {
            return errno();
        }
    }
    let filters = match crate::execution::sandbox::seccomp::build_filters() {
        Ok(f) => f,
        Err(_) => return -libc::EINVAL,
    };
    if raw::shadow_stack_enabled() {
        return -libc::ENOTSUP;
    }
    let stack = match map_init_stack() {
        Ok(stack) => stack,
        Err(e) => return e,
    };
    with_state(|s| {
        s.control = Some(control_fd);
        s.filters = filters;
        s.init_stack = Some(stack);
    });
    0
}

/// Get ready to clone the next run: wait until the run cloned last has ended (taken a
/// request and finished, or died before it could), so one run, ready or running, exists
/// at a time: nothing of the next run counts against this one's processes or memory. 1
/// when the caller should clone it now, 0 when the daemon closed the socket (the zygote
/// should exit), a negative errno when ready runs keep dying.
///
/// The ready run, not the zygote, reads the run's descriptors from the socket: the zygote
/// holds no request at any time, and a request finds its namespaces, mounts and forked
/// interpreter already made.
#[unsafe(no_mangle)]
pub(crate) extern "C" fn mde_zygote_next() -> c_int {
    let Some(control) = with_state(|s| s.control) else {
        return -libc::EBADF;
    };
    if let (Some(taken), Some(init)) = with_state(|s| (s.taken.take(), s.init.take())) {
        match wait_ended(&init, &taken, control) {
            Taken::Yes => with_state(|s| s.failures = 0),
            Taken::DaemonLeft => return 0,
            Taken::Died => {
                let failures = with_state(|s| {
                    s.failures += 1;
                    s.failures
                });
                if failures >= MAX_FAILURES {
                    return -libc::ECHILD;
                }
            }
        }
    }
    match crate::execution::sandbox::child::pipe_pair() {
        Ok((read, write)) => {
            with_state(|s| {
                s.taken = Some(read);
                s.run_fds = vec![write];
            });
            1
        }
        Err(e) => neg(&e),
    }
}

enum Taken {
    Yes,
    Died,
    DaemonLeft,
}

/// Block until the run's init has exited (then: did it take a request?), or the daemon
/// hangs up on `control`.
fn wait_ended(init: &OwnedFd, taken: &OwnedFd, control: RawFd) -> Taken {
    let mut fds = [
        libc::pollfd {
            fd: init.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        // Only a hang-up: a waiting message is the ready run's to read.
        libc::pollfd {
            fd: control,
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll on two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Taken::DaemonLeft;
        }
        if fds[0].revents != 0 {
            let mut byte = [0u8; 1];
            // SAFETY: a non-blocking read of one byte into a local buffer (the init and
            // the run are gone, so the pipe holds the byte or is at its end).
            let n = unsafe {
                libc::fcntl(taken.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
                libc::read(taken.as_raw_fd(), byte.as_mut_ptr().cast(), 1)
            };
            return if n == 1 { Taken::Yes } else { Taken::Died };
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Taken::DaemonLeft;
        }
    }
}

fn receive_fds(control: RawFd) -> std::io::Result<Option<Vec<OwnedFd>>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; RUN_FDS]);
    let msg = recvmsg::<()>(
        control,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(fds))
}

/// Clone the run's init into a new pid namespace, and have it fork the run. The zygote
/// gets the init's pid, the run 0; the caller runs its interpreter's before/after-fork
/// hooks around this call, as its own `fork` would.
///
/// How, so that a run costs one copy of the zygote's memory, not two: the init is a
/// `CLONE_VM` child on a stack of its own (sharing the zygote's memory, so cloning it
/// copies nothing), and the zygote waits, parked in a `read`, while the init makes the
/// run's namespaces and mounts and forks the run. The fork copies the memory as it is
/// then, with the zygote's frames stopped inside [`raw::fork_point`]; the run resumes
/// them there, returning 0, as if it had been the zygote. Only then does the zygote
/// go on; from there the init, which shares its memory, makes only raw system calls on
/// its own stack (no allocation, no `errno`, no lock: see [`supervise`]).
///
/// Not `unshare(CLONE_NEWPID)` and `fork`: that would fix the zygote's children's
/// namespace for good (a second unshare fails, and going back needs privileges the
/// zygote lacks in the namespace's owner).
#[unsafe(no_mangle)]
pub(crate) extern "C" fn mde_zygote_clone() -> c_int {
    let Some(stack) = with_state(|s| s.init_stack) else {
        return -libc::EINVAL;
    };
    // The last init, which shared this memory, has exited (see `mde_zygote_next`): forget
    // what it left on its stack (the last run's status) before the next run copies it.
    // SAFETY: our own mapping, used by no one now.
    unsafe { libc::madvise(stack.base.cast(), stack.len, libc::MADV_DONTNEED) };
    let mut fork = CloneRun {
        stack_top: stack.base as usize + stack.len,
        ..CloneRun::default()
    };
    let shared = &raw mut fork;
    // SAFETY: `clone_run` takes the pointer, which points at a `CloneRun` (its first field
    // the registers), alive until the fork point returns.
    let pid = unsafe { raw::fork_point(shared.cast(), clone_run) };
    if pid == 0 {
        // The run: its own copies of the zygote's state (the init never touched it).
        // SAFETY: the run's own copy of `fork`, and descriptors it holds.
        unsafe {
            restore_thread_state(&*shared);
            raw::close(fork.pair[0]);
        }
        // SAFETY: a descriptor the run holds, now its own.
        let theirs = unsafe { OwnedFd::from_raw_fd(fork.pair[1]) };
        with_state(|s| {
            s.taken = None;
            s.init = None;
            s.run_fds.push(theirs);
        });
        return 0;
    }
    // A init without a pidfd could not be waited for, and the next would reuse its stack.
    let pid = if pid > 0 && fork.pidfd < 0 {
        -libc::EBADF
    } else {
        pid
    };
    // The zygote keeps only its end of the `taken` pipe (the run's end is in `run_fds`).
    with_state(|s| {
        s.run_fds.clear();
        if pid < 0 {
            s.taken = None;
        } else {
            // SAFETY: the kernel made this descriptor for us.
            s.init = Some(unsafe { OwnedFd::from_raw_fd(fork.pidfd) });
        }
    });
    pid
}

/// The init's stack: mapped once, with a guard page below it.
#[derive(Clone, Copy)]
struct InitStack {
    base: *mut u8,
    len: usize,
}

// SAFETY: a mapping address, used by this single-threaded process only.
unsafe impl Send for InitStack {}

const INIT_STACK_BYTES: usize = 256 << 10;

fn map_init_stack() -> Result<InitStack, c_int> {
    let page = 4096;
    // SAFETY: a fresh private mapping; its lowest page is made inaccessible.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            INIT_STACK_BYTES + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(errno());
        }
        check(libc::mprotect(map, page, libc::PROT_NONE))?;
        Ok(InitStack {
            base: map.cast::<u8>().add(page),
            len: INIT_STACK_BYTES,
        })
    }
}

/// What the zygote, the init and the run pass each other through one clone (all in the
/// memory they share, or copied at the fork).
#[repr(C)]
#[derive(Default)]
struct CloneRun {
    /// First: `fork_point` and `clone_run` see a pointer to it.
    registers: raw::Registers,
    stack_top: usize,
    /// The zygote's signal mask before it blocked every signal around the clone.
    mask: u64,
    /// The init writes to `sync[1]` once the run is forked; the zygote waits on `sync[0]`.
    sync: [c_int; 2],
    /// The init's and the run's ends of the pair the run passes its status pipe over.
    pair: [c_int; 2],
    pidfd: c_int,
    /// The zygote's alternate signal stack: the kernel clears it in a `CLONE_VM` child.
    altstack: Option<libc::stack_t>,
}

/// The zygote's half of `mde_zygote_clone`, inside the fork point: clone the init and
/// wait until it has forked the run (or died). Returns the init's pid.
unsafe extern "C" fn clone_run(registers: *mut raw::Registers) -> c_int {
    // Only raw-pointer accesses from here: the init reads and writes the same struct
    // while this frame waits.
    let fork = registers.cast::<CloneRun>();
    let all: u64 = !0;
    // SAFETY: plain system calls on our own memory and descriptors; `fork` points at the
    // caller's `CloneRun`.
    unsafe {
        // Nothing runs a handler of the interpreter's in the init (on its stack, in
        // this memory); the run sets the mask back before it resumes.
        raw::call(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &all as *const u64 as usize,
            &raw mut (*fork).mask as usize,
            8,
        );
        let restore = |fork: *const CloneRun| {
            raw::call(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as usize,
                &raw const (*fork).mask as usize,
                0,
                8,
            )
        };
        let mut altstack: libc::stack_t = std::mem::zeroed();
        if libc::sigaltstack(std::ptr::null(), &mut altstack) == 0
            && altstack.ss_flags & libc::SS_DISABLE == 0
        {
            (*fork).altstack = Some(altstack);
        }
        if libc::pipe2((&raw mut (*fork).sync).cast(), libc::O_CLOEXEC) != 0 {
            let e = errno();
            restore(fork);
            return e;
        }
        (*fork).pidfd = -1;
        let flags = libc::CLONE_VM | libc::CLONE_NEWPID | libc::CLONE_PIDFD | libc::SIGCHLD;
        let pid = libc::clone(
            init_main,
            (*fork).stack_top as *mut libc::c_void,
            flags,
            fork.cast(),
            &raw mut (*fork).pidfd,
        );
        // From here the init may be running the C library in this memory: raw calls only
        // until it has forked the run (or died trying: then the read ends).
        let clone_error = if pid < 0 { errno() } else { 0 };
        raw::close((*fork).sync[1]);
        if pid > 0 {
            let mut byte = 0u8;
            while raw::call(
                libc::SYS_read,
                (*fork).sync[0] as usize,
                &raw mut byte as usize,
                1,
                0,
            ) == -(libc::EINTR as isize)
            {}
        }
        raw::close((*fork).sync[0]);
        restore(fork);
        if pid < 0 { clone_error } else { pid }
    }
}

/// In the run, first: what the kernel does not carry through the init's `CLONE_VM` clone
/// (there, a thread's registration of its restartable-sequences area and its alternate
/// signal stack are reset), set again for the zygote's thread the run continues.
///
/// # Safety
/// Only in the run, before it returns to the interpreter.
unsafe fn restore_thread_state(fork: &CloneRun) {
    // The C library's rseq area of this thread, at the thread pointer plus its offset;
    // a size of 0 means it registered none.
    unsafe extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    const RSEQ_SIG: u32 = 0x5305_3053;
    // The kernel's own `struct rseq` size, the least a registration may give.
    const RSEQ_AREA_LEN: u32 = 32;
    // SAFETY: reading the C library's exported constants and our thread pointer; the
    // area is this thread's, as the C library laid it out.
    unsafe {
        if let Some(altstack) = fork.altstack {
            libc::sigaltstack(&altstack, std::ptr::null_mut());
        }
        let size = __rseq_size;
        if size == 0 {
            return;
        }
        let thread_pointer: usize;
        core::arch::asm!("mov {}, fs:0", out(reg) thread_pointer, options(nostack, readonly));
        let area = (thread_pointer as isize + __rseq_offset) as usize;
        let len = size.max(RSEQ_AREA_LEN);
        if raw::call(libc::SYS_rseq, area, len as usize, 0, RSEQ_SIG as usize) < 0 {
            // Unregistered: have the C library ask the kernel instead (its cpu_id field
            // at offset 4 set to "registration failed").
            ((area + 4) as *mut i32).write_volatile(-2);
        }
    }
}

/// The run's init, on its own stack in the zygote's memory, the zygote parked: make the
/// run's namespaces and mounts, fork the run (which resumes the zygote's frames), let
/// the zygote go on, and supervise the run. Never returns.
extern "C" fn init_main(arg: *mut libc::c_void) -> c_int {
    // Raw-pointer accesses only: the zygote's frame holds the same struct.
    let fork = arg.cast::<CloneRun>();
    // SAFETY: the zygote passed its `CloneRun`, alive while it waits on `sync` (until the
    // write below, after which only copies of its fields are used).
    unsafe {
        raw::close((*fork).sync[0]);
        match run_init() {
            Ok(pair) => (*fork).pair = pair,
            Err(e) => {
                eprintln!(
                    "mixed-docker-executor zygote: a run's set-up failed: errno {}",
                    -e
                );
                raw::exit_group(72);
            }
        }
        // The zygote is parked in a read, so this process is the memory's only user (the
        // C library's locks are free); the child only resumes the zygote's frames.
        match libc::fork() {
            0 => {
                raw::close((*fork).sync[1]);
                // Set back the zygote's mask, then return 0 from its fork point in this
                // fork of its memory.
                raw::call(
                    libc::SYS_rt_sigprocmask,
                    libc::SIG_SETMASK as usize,
                    &raw const (*fork).mask as usize,
                    0,
                    8,
                );
                raw::resume(fork.cast())
            }
            -1 => raw::exit_group(73),
            run => {
                let ours = (*fork).pair[0];
                raw::close((*fork).pair[1]);
                let sync = (*fork).sync[1];
                // From this write on, the zygote runs again in this memory: `fork` (on its
                // stack) is gone, and only raw system calls on this stack follow.
                raw::call(libc::SYS_write, sync as usize, b"f".as_ptr() as usize, 1, 0);
                raw::close(sync);
                supervise(run, ours)
            }
        }
    }
}

/// In the run's init (pid 1), before any request: a new session; new mount, network, ipc
/// and uts namespaces; a fresh /proc; one fresh tmpfs behind `/box`, `/tmp` and `/dev/shm`;
/// loopback up; the socket pair over which the run will pass its status pipe (the init's
/// end first).
fn run_init() -> Result<[c_int; 2], c_int> {
    // SAFETY: plain system calls with constant or owned arguments.
    unsafe {
        // The run's init waits for the run itself.
        if libc::signal(libc::SIGCHLD, libc::SIG_DFL) == libc::SIG_ERR {
            return Err(errno());
        }
        // A session and process group of its own, which the run inherits as in a cold
        // sandbox (1 and 1): the zygote's group would let `kill(0, ...)` reach the zygote
        // and the sandbox's own init, outside the run's pid namespace.
        check(libc::setsid())?;
        check(libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        ))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
    }
    mount_proc()?;
    mount_work_dirs(READY_TMPFS_BYTES)?;
    loopback_up()?;
    // SAFETY: a static path.
    check(unsafe { libc::chdir(c"/box".as_ptr()) })?;
    let mut pair = [-1; 2];
    // SAFETY: socketpair into a local array.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    })?;
    Ok(pair)
}

/// In the run, once a request came: read it, give its tmpfs the run's size, write its
/// files, and tell the daemon the run is under way (a zygote that stopped forking is
/// replaced, and its run started elsewhere, when this does not come).
fn take_request() -> Result<(), c_int> {
    let request_fd = with_state(|s| s.run_fds.get(REQUEST).map(AsRawFd::as_raw_fd));
    let request_fd = request_fd.ok_or(-libc::EBADF)?;
    let mut bytes = Vec::new();
    // SAFETY: borrowed for the read only; the descriptor stays owned by the state.
    let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(request_fd) });
    file.read_to_end(&mut bytes).map_err(|e| neg(&e))?;
    let request = RunRequest::decode(&bytes).ok_or(-libc::EINVAL)?;
    resize_work_dirs(request.workdir_bytes)?;
    write_files(&request.files)?;
    let (argv, argv_len) = argv_memfd(&request.argv)?;
    let status_fd = with_state(|s| s.run_fds.get(STATUS).map(AsRawFd::as_raw_fd));
    let status_fd = status_fd.ok_or(-libc::EBADF)?;
    // SAFETY: one byte from a static buffer to a descriptor we hold.
    if unsafe { libc::write(status_fd, STARTED.as_ptr().cast(), 1) } != 1 {
        return Err(errno());
    }
    with_state(|s| {
        s.request = Some(request);
        s.argv = Some(argv);
        s.argv_len = argv_len;
    });
    Ok(())
}

fn mount(
    source: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), c_int> {
    // SAFETY: valid C strings or null pointers.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

fn exists(path: &CStr) -> bool {
    // SAFETY: a valid C string.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}

/// A /proc of the run's own pid namespace, masked as bubblewrap masks a cold sandbox's.
fn mount_proc() -> Result<(), c_int> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(c"proc", c"/proc", Some(c"proc"), nosuid, None)?;
    for &dir in READ_ONLY_PROC.iter().filter(|d| exists(d)) {
        mount(dir, dir, None, libc::MS_BIND | libc::MS_REC, None)?;
        mount(
            dir,
            dir,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
            None,
        )?;
    }
    for &file in MASKED_PROC_FILES.iter().filter(|f| exists(f)) {
        // Read-only and nodev, as bubblewrap's `--ro-bind`: opening it is refused.
        mount(c"/dev/null", file, None, libc::MS_BIND, None)?;
        mount(
            file,
            file,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
            None,
        )?;
    }
    for &dir in MASKED_PROC_DIRS.iter().filter(|d| exists(d)) {
        mount(
            c"tmpfs",
            dir,
            Some(c"tmpfs"),
            libc::MS_RDONLY | nosuid,
            Some(c"mode=0555,size=0"),
        )?;
    }
    Ok(())
}

/// One tmpfs of `size` bytes, first mounted at /tmp, holding `box`, `tmp` and `shm`;
/// each is then bound where a cold sandbox has it (its own /tmp last, covering the
/// staging mount), so the three share one size limit as the slot's tmpfs does.
fn mount_work_dirs(size: u64) -> Result<(), c_int> {
    let inodes = crate::limits::tmpfs_inodes(size);
    let options = std::ffi::CString::new(format!("size={size},nr_inodes={inodes},mode=0700"))
        .map_err(|_| -libc::EINVAL)?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    mount(c"tmpfs", c"/tmp", Some(c"tmpfs"), flags, Some(&options))?;
    for (dir, mode) in [
        (c"/tmp/box", 0o700),
        (c"/tmp/tmp", 0o700),
        (c"/tmp/shm", 0o700),
    ] {
        // SAFETY: a valid C string.
        check(unsafe { libc::mkdir(dir.as_ptr(), mode) })?;
    }
    mount(c"/tmp/box", c"/box", None, libc::MS_BIND, None)?;
    mount(c"/tmp/shm", c"/dev/shm", None, libc::MS_BIND, None)?;
    mount(c"/tmp/tmp", c"/tmp", None, libc::MS_BIND, None)?;
    Ok(())
}

/// The run's own size for the tmpfs behind /box, /tmp and /dev/shm (one superblock, so
/// remounting one of its binds resizes all three).
fn resize_work_dirs(size: u64) -> Result<(), c_int> {
    let inodes = crate::limits::tmpfs_inodes(size);
    let options = std::ffi::CString::new(format!("size={size},nr_inodes={inodes}"))
        .map_err(|_| -libc::EINVAL)?;
    mount(
        c"tmpfs",
        c"/box",
        None,
        libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
        Some(&options),
    )
}

/// Write the submission's files under /box, as `workdir.rs` writes a cold run's: parents
/// 0755, files 0644, never through an existing path.
fn write_files(files: &[(Vec<u8>, Vec<u8>)]) -> Result<(), c_int> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let root = std::path::Path::new("/box");
    for (name, content) in files {
        let name = std::str::from_utf8(name).map_err(|_| -libc::EINVAL)?;
        crate::file_names::validate(name).map_err(|_| -libc::EINVAL)?;
        let parts: Vec<&str> = name.split('/').collect();
        let mut dir = root.to_path_buf();
        for part in &parts[..parts.len().saturating_sub(1)] {
            dir.push(part);
            if !dir.is_dir() {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|e| neg(&e))?;
            }
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(root.join(name))
            .map_err(|e| neg(&e))?;
        out.write_all(content).map_err(|e| neg(&e))?;
    }
    Ok(())
}

/// Bring up `lo` in the run's fresh network namespace, as bubblewrap does.
fn loopback_up() -> Result<(), c_int> {
    // SAFETY: a socket we close below, and an ifreq we own.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(sock)?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        libc::close(sock);
        check(r)
    }
}

/// The argv in the warm bootstrap's format (`0`, no rlimits: they are applied here), in
/// a memfd the run reads.
fn argv_memfd(argv: &[Vec<u8>]) -> Result<(OwnedFd, usize), c_int> {
    let mut fields: Vec<&[u8]> = vec![b"0"];
    fields.extend(argv.iter().map(Vec::as_slice));
    let bytes = fields.join(&b'\0');
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"mde-argv".as_ptr(), libc::MFD_CLOEXEC) };
    check(fd)?;
    // SAFETY: a fresh descriptor nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(&bytes).map_err(|e| neg(&e))?;
    std::io::Seek::rewind(&mut file).map_err(|e| neg(&e))?;
    Ok((OwnedFd::from(file), bytes.len()))
}

/// In the run's init, once the run is forked and the zygote runs again in this memory:
/// hold nothing but the status pipe, wait for the run, then kill and reap everything else
/// in the namespace, and report. Only raw system calls on this stack: the C library's
/// state (`errno`, its allocator, its locks) is the zygote's now.
fn supervise(run: c_int, pair: c_int) -> ! {
    // The run passes the status pipe once it has taken a request; if it dies first, there
    // is nothing to report (the zygote sees this init exit with nothing on its `taken`
    // pipe, and clones another).
    let Some(status_fd) = receive_status_fd(pair) else {
        raw::exit_group(0)
    };
    // SAFETY: raw system calls on our own descriptors and stack.
    unsafe {
        // No handler of the interpreter's: as pid 1 it then drops every signal the run
        // sends it. (Every signal stays blocked, as the zygote cloned us: waiting for
        // children needs none.) As `child::reset_signals`, which may set errno.
        let default = [0u64; 4];
        for sig in 1..=64usize {
            raw::call(libc::SYS_rt_sigaction, sig, default.as_ptr() as usize, 0, 8);
        }
        let kept = raw::call(
            libc::SYS_fcntl,
            status_fd as usize,
            libc::F_DUPFD_CLOEXEC as usize,
            0,
            0,
        );
        if kept < 0 {
            raw::exit_group(70);
        }
        // Nothing of the run's stdio or request stays open here, so its pipes reach EOF
        // with the run's own processes.
        for fd in 0..kept as c_int {
            raw::close(fd);
        }
        raw::call(
            libc::SYS_close_range,
            kept as usize + 1,
            u32::MAX as usize,
            0,
            0,
        );
        let mut status: c_int = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        loop {
            let r = raw::call(
                libc::SYS_wait4,
                -1isize as usize,
                &mut status as *mut c_int as usize,
                libc::__WALL as usize,
                &mut usage as *mut libc::rusage as usize,
            );
            if r == run as isize {
                break;
            }
            if r < 0 && r != -(libc::EINTR as isize) {
                raw::exit_group(71);
            }
        }
        // As a cold sandbox ends with its stage: nothing the run left behind outlives it,
        // and the status is only sent once the namespace is empty but for us.
        raw::call(
            libc::SYS_kill,
            -1isize as usize,
            libc::SIGKILL as usize,
            0,
            0,
        );
        loop {
            let r = raw::call(
                libc::SYS_wait4,
                -1isize as usize,
                0,
                libc::__WALL as usize,
                0,
            );
            if r <= 0 && r != -(libc::EINTR as isize) {
                break;
            }
        }
        let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        let report = Status {
            wait_status: status,
            cpu_us: micros(usage.ru_utime) + micros(usage.ru_stime),
            maxrss_kb: usage.ru_maxrss as u64,
        }
        .encode();
        raw::call(
            libc::SYS_write,
            kept as usize,
            report.as_ptr() as usize,
            report.len(),
            0,
        );
    }
    raw::exit_group(0)
}

/// The one descriptor the run sends over the pair (its status pipe), received into this
/// stack with a raw `recvmsg`.
fn receive_status_fd(pair: c_int) -> Option<c_int> {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut byte = 0u8;
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to locals below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    loop {
        // SAFETY: recvmsg into the locals `msg` points at.
        let n = unsafe {
            raw::call(
                libc::SYS_recvmsg,
                pair as usize,
                &mut msg as *mut libc::msghdr as usize,
                libc::MSG_CMSG_CLOEXEC as usize,
                0,
            )
        };
        if n == -(libc::EINTR as isize) {
            continue;
        }
        if n <= 0 {
            return None;
        }
        break;
    }
    // The first control message, read by hand (the CMSG macros are the C library's).
    let header = std::mem::size_of::<libc::cmsghdr>();
    if msg.msg_controllen < header + std::mem::size_of::<c_int>() {
        return None;
    }
    // SAFETY: the kernel filled at least one header and a descriptor into `control`,
    // which is aligned for both.
    unsafe {
        let cmsg = &*control.0.as_ptr().cast::<libc::cmsghdr>();
        if cmsg.cmsg_level != libc::SOL_SOCKET || cmsg.cmsg_type != libc::SCM_RIGHTS {
            return None;
        }
        Some(control.0.as_ptr().add(header).cast::<c_int>().read())
    }
}

/// In the run (pid 2), last before the program: its stdio, its limits, no capabilities,
/// no new privileges, the seccomp filters, and no descriptor but stdio and the argv's.
/// Returns the length of the argv, which descriptor 3 holds.
#[unsafe(no_mangle)]
pub(crate) extern "C" fn mde_run_enter() -> c_int {
    match run_enter() {
        Ok(fd) => fd,
        Err(e) => e,
    }
}

/// In the ready run: wait for a request's descriptors on the zygote's socket, hand the
/// status pipe to the init, and tell the zygote to ready the next run.
fn take_run() -> Result<(), c_int> {
    let (control, mut held) = with_state(|s| (s.control, std::mem::take(&mut s.run_fds)));
    let control = control.ok_or(-libc::EBADF)?;
    let (Some(to_init), Some(taken)) = (held.pop(), held.pop()) else {
        return Err(-libc::EBADF);
    };
    let fds = loop {
        match receive_fds(control) {
            Ok(None) => return Err(-libc::EPIPE),
            Ok(Some(fds)) if fds.len() == RUN_FDS => break fds,
            // Not a run's message: drop what came with it and wait for the next.
            Ok(Some(_)) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(neg(&e)),
        }
    };
    {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let status = [fds[STATUS].as_raw_fd()];
        let byte = [b's'];
        let iov = [std::io::IoSlice::new(&byte)];
        sendmsg::<()>(
            to_init.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&status)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| -(e as c_int))?;
    }
    // SAFETY: one byte from a static buffer to our end of the zygote's pipe.
    unsafe { libc::write(taken.as_raw_fd(), b"t".as_ptr().cast(), 1) };
    drop((to_init, taken));
    with_state(|s| s.run_fds = fds);
    Ok(())
}

fn run_enter() -> Result<c_int, c_int> {
    take_run()?;
    take_request()?;
    let (fds, argv, rlimits, filters) = with_state(|s| {
        let fds: Vec<RawFd> = s.run_fds.iter().map(AsRawFd::as_raw_fd).collect();
        let argv = s.argv.as_ref().map(AsRawFd::as_raw_fd);
        let rlimits = s.request.as_ref().map(|r| r.rlimits.clone());
        (fds, argv, rlimits, std::mem::take(&mut s.filters))
    });
    let (Some(argv), Some(rlimits)) = (argv, rlimits) else {
        return Err(-libc::EBADF);
    };
    if fds.len() != RUN_FDS {
        return Err(-libc::EBADF);
    }
    // SAFETY: plain system calls on descriptors we hold.
    unsafe {
        // Above every target first, so no dup2 clobbers a descriptor still to be moved.
        let high = |fd: RawFd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
        let moved = [
            high(fds[STDIN]),
            high(fds[STDOUT]),
            high(fds[STDERR]),
            high(argv),
        ];
        if moved.iter().any(|&fd| fd < 0) {
            return Err(errno());
        }
        for (target, &fd) in moved.iter().enumerate() {
            check(libc::dup2(fd, target as c_int))?;
        }
        libc::syscall(libc::SYS_close_range, ARGV_FD as u32 + 1, u32::MAX, 0u32);
        // The argv's descriptor is the bootstrap's to close; nothing crosses an exec.
        libc::fcntl(ARGV_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    with_state(|s| {
        // Their numbers were closed above; forget them without closing again.
        for fd in s.run_fds.drain(..).chain(s.argv.take()) {
            std::mem::forget(fd);
        }
        s.control = None;
    });
    // As a cold run: its own /proc files (a zygote's child inherits "not dumpable"), and
    // the OOM killer's first choice in the slot.
    // SAFETY: prctl without pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) })?;
    set_oom_score_adj(STAGE_OOM_SCORE_C).map_err(|e| neg(&e))?;
    apply_rlimits(&rlimits).map_err(|e| neg(&e))?;
    drop_capabilities()?;
    // SAFETY: prctl without pointers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    for filter in &filters {
        install_filter(filter)?;
    }
    let len = with_state(|s| s.argv_len);
    c_int::try_from(len).map_err(|_| -libc::E2BIG)
}

/// Empty every capability set: bounding (while CAP_SETPCAP may still allow it), ambient,
/// then effective, permitted and inheritable.
fn drop_capabilities() -> Result<(), c_int> {
    // SAFETY: prctl and capset with valid arguments.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability this kernel knows. The zygote keeps
            // CAP_SETPCAP for this alone, so the set ends empty, as a cold run's.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as c_int)
    }
}

/// Install one seccomp program (raw `struct sock_filter`s, as bubblewrap reads them).
fn install_filter(bytes: &[u8]) -> Result<(), c_int> {
    let filters: Vec<libc::sock_filter> = bytes
        .chunks_exact(std::mem::size_of::<libc::sock_filter>())
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let program = libc::sock_fprog {
        len: u16::try_from(filters.len()).map_err(|_| -libc::E2BIG)?,
        filter: filters.as_ptr().cast_mut(),
    };
    // SAFETY: `program` points at `filters`, alive for the call.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    })
}
