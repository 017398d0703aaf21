//! `GET /health` (liveness, never runs code) and `GET /ready` (can we serve submissions?).

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::{ApiTags, AppState};

const CPU_TREE: &str = "whole process tree (cgroup CPU accounting)";
const CPU_PER_PROCESS: &str = "per process (RLIMIT_CPU, whole seconds)";

/// Liveness and what this daemon enforces.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
    /// The daemon's version.
    pub version: String,
    /// The default sandbox backend: `bwrap` or `process`.
    pub backend: String,
    /// False when any submission can run without isolation (the `process` backend, by
    /// default or for one runtime).
    pub isolation: bool,
    /// How memory is limited: a memory cgroup, or RLIMIT_AS as a fallback.
    pub memory_enforcement: String,
    /// Whether each slot runs as its own unprivileged uid.
    pub per_slot_uid: bool,
    /// Whether the work dir and /tmp are a size-limited tmpfs.
    pub workdir_size_enforced: bool,
    /// How CPU time is limited: for the whole process tree (cgroup accounting, with
    /// RLIMIT_CPU behind it), or per process by RLIMIT_CPU alone.
    pub cpu_enforcement: String,
    /// Runtimes whose runs are forked from a zygote (a fork server per slot) here.
    pub zygote_runtimes: Vec<String>,
    /// Things an operator should fix; empty on a well set-up host.
    pub warnings: Vec<String>,
}

impl poem_openapi::types::Example for Health {
    fn example() -> Self {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: "bwrap".into(),
            isolation: true,
            memory_enforcement: "memory cgroup (v2)".into(),
            per_slot_uid: true,
            workdir_size_enforced: true,
            cpu_enforcement: CPU_TREE.into(),
            zygote_runtimes: vec!["python3".into()],
            warnings: Vec::new(),
        }
    }
}

/// Readiness: capacity, load and the state of the runtimes file.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct Readiness {
    /// True when the default runtime can run and the daemon is not shutting down.
    pub ready: bool,
    /// True once the daemon is shutting down (SIGTERM or SIGINT): it admits nothing new
    /// and finishes the runs in flight.
    pub draining: bool,
    /// Executions that can run at once.
    pub slots: u64,
    /// Slots taken out of service because they could not be cleaned after a run (each
    /// lowers capacity by one; all of them out of service makes the daemon not ready).
    pub slots_out_of_service: u64,
    /// Executions running now.
    pub running: u64,
    /// Submissions waiting for a slot.
    pub waiting: u64,
    /// How many submissions may wait before new ones get 429.
    pub queue_capacity: u64,
    /// Runtimes configured in runtimes.toml.
    pub runtimes_total: u64,
    /// Runtimes whose commands are installed.
    pub runtimes_available: u64,
    /// The error of the latest runtimes.toml reload if it failed (the previous
    /// definitions stay active); absent when it succeeded.
    pub last_reload_error: Option<String>,
}

impl poem_openapi::types::Example for Readiness {
    fn example() -> Self {
        Readiness {
            ready: true,
            draining: false,
            slots: 2,
            slots_out_of_service: 0,
            running: 1,
            waiting: 0,
            queue_capacity: 64,
            runtimes_total: 12,
            runtimes_available: 12,
            last_reload_error: None,
        }
    }
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Ready to run submissions.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Not ready: the default runtime is unavailable, every slot is out of service, or the
    /// daemon is shutting down (`draining`).
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

pub struct HealthApi;

#[OpenApi]
impl HealthApi {
    /// Liveness
    ///
    /// Answers at once without running code, and says which isolation is in force.
    #[oai(path = "/health", method = "get", tag = "ApiTags::Operations")]
    async fn health(&self, state: poem::web::Data<&AppState>) -> Json<Health> {
        let info = state.executor.info();
        let mut warnings = Vec::new();
        if !info.isolated() {
            warnings
                .push("isolation is OFF: the process backend runs submissions unsandboxed".into());
        }
        let unsandboxed: Vec<String> = state
            .runtimes
            .snapshot()
            .runtimes
            .iter()
            .filter(|r| r.backend == crate::config::BackendKind::Process)
            .map(|r| r.name.clone())
            .collect();
        if info.isolated() && !unsandboxed.is_empty() {
            warnings.push(format!(
                "isolation is OFF for runtimes {}: runtimes.toml gives them the process backend",
                unsandboxed.join(", ")
            ));
        }
        if !info.per_slot_uid {
            warnings.push(
                "the daemon is not root: sandboxes share its uid and RLIMIT_NPROC is not applied"
                    .into(),
            );
        }
        if !info.sized_workdir {
            warnings
                .push("the work dir is not a sized tmpfs: its total size is not limited (mounting it needs CAP_SYS_ADMIN: `--cap-add SYS_ADMIN` in a container)".into());
        }
        if let crate::execution::MemoryEnforcement::AddressSpace { reason } = &info.memory {
            warnings.push(format!("memory is limited by RLIMIT_AS only ({reason})"));
        }
        if !info.cpu_fair {
            warnings.push(
                "no CPU controller per slot: one run's processes can starve the others".into(),
            );
        }
        if !info.socket_memory_limited {
            warnings.push("socket buffers are not charged to the runs' memory limit".into());
        }
        let runtimes = state.runtimes.snapshot();
        let zygote_runtimes: Vec<String> = runtimes
            .runtimes
            .iter()
            .filter(|r| state.executor.zygote_serves(r))
            .map(|r| r.name.clone())
            .collect();
        let opted_in: Vec<&str> = runtimes
            .runtimes
            .iter()
            .filter(|r| r.zygote && r.availability.available)
            .map(|r| r.name.as_str())
            .collect();
        if let crate::execution::ZygoteSupport::Unavailable(why) = &info.zygotes
            && !opted_in.is_empty()
            && state.settings.sandbox.zygotes
        {
            warnings.push(format!(
                "runtimes {} start without a zygote (one interpreter start per run): {why}",
                opted_in.join(", ")
            ));
        }
        if let Some(error) = state.executor.zygote_start_error() {
            warnings.push(format!(
                "zygotes fail to start, their runtimes run warm (one interpreter start per run): {error}"
            ));
        }
        let out_of_service = state.executor.slots_out_of_service();
        if out_of_service > 0 {
            warnings.push(format!(
                "{out_of_service} of {} slots are out of service: they could not be cleaned after a run (see the log)",
                info.slots
            ));
        }
        let cpu_enforcement = if info.tree_cpu_limit {
            CPU_TREE
        } else {
            warnings.push(
                "no cgroup CPU accounting: CPU time is limited per process, in whole seconds"
                    .into(),
            );
            CPU_PER_PROCESS
        };
        Json(Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: info.backend.as_str().into(),
            isolation: info.isolated() && unsandboxed.is_empty(),
            memory_enforcement: info.memory.describe(),
            per_slot_uid: info.per_slot_uid,
            workdir_size_enforced: info.sized_workdir,
            cpu_enforcement: cpu_enforcement.into(),
            zygote_runtimes,
            warnings,
        })
    }

    /// Readiness
    ///
    /// 200 when submissions can run, 503 when the default runtime is unavailable, no slot
    /// is in service or the daemon is shutting down (a load balancer then stops sending it
    /// work; the runs in flight finish). Also shows
    /// load and whether the latest runtimes.toml reload failed.
    #[oai(path = "/ready", method = "get", tag = "ApiTags::Operations")]
    async fn ready(&self, state: poem::web::Data<&AppState>) -> ReadyResponse {
        let set = state.runtimes.snapshot();
        let info = state.executor.info();
        let out_of_service = state.executor.slots_out_of_service();
        let draining = state.executor.draining();
        let ready = !draining && set.resolve(None, None).is_ok() && out_of_service < info.slots;
        let body = Readiness {
            ready,
            draining,
            slots: info.slots as u64,
            slots_out_of_service: out_of_service as u64,
            running: state.executor.running() as u64,
            waiting: state.executor.waiting() as u64,
            queue_capacity: info.queue as u64,
            runtimes_total: set.runtimes.len() as u64,
            runtimes_available: set
                .runtimes
                .iter()
                .filter(|r| r.availability.available)
                .count() as u64,
            last_reload_error: state.reloader.status().last_error,
        };
        if ready {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
    }
}
