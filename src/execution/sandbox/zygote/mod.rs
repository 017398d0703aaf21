//! Fork servers ("zygotes"): an interpreter started once in a slot's sandbox that forks a
//! complete, fresh sandbox per run, instead of a bubblewrap sandbox and an interpreter start
//! per run (about 10 ms of CPU each, against under 2 ms for a fork and fresh namespaces).
//!
//! The zygote runs in a bubblewrap sandbox like every stage (the slot's uid, cgroups and
//! read-only system), but keeps `CAP_SYS_ADMIN`, `CAP_NET_ADMIN` and `CAP_SETPCAP` inside its own user
//! namespace, without the seccomp filters, so each run's process can make its own
//! namespaces and mounts. The interpreter loads this crate as a shared library
//! (`libmixed_docker_executor.so`, bound at [`LIBRARY_PATH`]) and calls the functions in
//! [`fork_server`], so the sandboxing is the same Rust code for every language; only the
//! loop that calls them is the language's (`executor/warm.rs` holds python's).
//!
//! Ahead of each run, the zygote clones a child into a new pid namespace (the run's
//! init, which shares the zygote's memory and runs only Rust), which makes new mount,
//! network, ipc and uts namespaces, mounts a fresh `/proc` and a fresh tmpfs for `/box`,
//! `/tmp` and `/dev/shm`, and forks the run as pid 2 (as in a cold sandbox, where the
//! stage-exec helper is pid 1); the run resumes the zygote's interpreter where it called
//! the clone. The run waits on the zygote's unix
//! socket for the daemon's one message, which carries only descriptors: the request pipe,
//! the status pipe and the run's stdin, stdout and stderr; the zygote itself never reads
//! one. The run reads its request (files, argv, rlimits, work dir size), sizes the tmpfs,
//! writes the files, drops every capability, sets no_new_privs, installs the seccomp
//! filters and the run's rlimits, and only then returns to the interpreter, which runs the
//! program. The init reports the run's wait status and resource use on the status pipe,
//! after it has killed and reaped everything else left in the namespace; when it exits,
//! the zygote readies the next run.

// The fork point is x86_64 assembly; elsewhere runtimes run warm (see `executor/zygote.rs`).
#[cfg(target_arch = "x86_64")]
pub(crate) mod fork_server;
mod protocol;
#[cfg(target_arch = "x86_64")]
mod raw;

pub(crate) use protocol::{RunRequest, STARTED, STATUS_LEN, Status};

/// Where the fork-server library is bound inside a zygote's sandbox.
pub(crate) const LIBRARY_PATH: &str = "/.mde/zygote.so";
/// The file name cargo gives this crate's shared library.
pub(crate) const LIBRARY_FILE: &str = "libmixed_docker_executor.so";
