//! The execution core: it runs a checked request's stages in a slot's sandbox and reports
//! how each ended. Nothing here knows about HTTP or Prometheus; outcomes leave through
//! [`ExecutionObserver`]. Layers inside, each importing only those after it:
//! - `executor/`: admission, the compile-then-run pipeline, test batches, prepared and warm
//!   sandboxes;
//! - `compile_cache`: compile outputs kept by a hash of their inputs;
//! - `stage/`: spawn a built command, supervise it, classify how it ended;
//! - `pool/`: the per-slot resources (uid, cgroups, work dir, launcher);
//! - `sandbox/`: backends that build commands, seccomp, the in-sandbox helper, pre-exec steps;
//! - `request`, `report`, `observer`: the data model.

mod compile_cache;
mod executor;
mod observer;
mod pool;
mod report;
mod request;
pub mod sandbox;
mod stage;

pub use crate::file_names::validate as validate_file_name;
pub use crate::limits::{LimitExceeded, Limits, LimitsOverride};
pub use executor::{
    BatchReport, BatchRequest, BatchTest, Busy, Executor, ExecutorError, ExecutorInfo,
    ExecutorOptions, StopReason, TestReport, ZygoteSupport, output_matches,
};
pub use observer::{CacheEvent, ExecutionObserver, NoopObserver, StartKind, ZygoteRestart};
pub use pool::MemoryEnforcement;
pub use pool::launcher::{LAUNCHER_ARG, launcher_main, this_binary_serves_helpers};
pub use report::{ExecutionReport, LimitKind, StageReport, StageStatus, without_host_paths};
pub use request::{
    ExecuteError, ExecutionRequest, MAX_ARG_BYTES, MAX_ARGS, MAX_ARGS_TOTAL_BYTES, SourceFile,
    validate_args,
};
pub use sandbox::stage_exec::{STAGE_EXEC_ARG, stage_exec_main};
