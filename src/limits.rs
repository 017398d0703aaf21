//! Resource limits (a leaf module: it imports nothing of the crate): the server's defaults and maxima, per-runtime overrides, per-request asks.
//!
//! The invariant: a request can lower any limit but never raise it past the ceiling, which is
//! the runtime's `max_limits` where it sets one and the server's `max_limits` otherwise.

use serde::{Deserialize, Serialize};

/// One complete set of limits for a stage. Every field is enforced by the kernel or the
/// runner. The API publishes it as `LimitsInfo` (`GET /api/v1/runtimes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, poem_openapi::Object)]
#[serde(deny_unknown_fields)]
#[oai(rename = "LimitsInfo")]
pub struct Limits {
    /// Wall-clock time in milliseconds; the whole process tree is killed after it.
    pub wall_time_ms: u64,
    /// CPU time in milliseconds, of the whole process tree where the host's cgroups count
    /// it (see `cpu_enforcement` in `GET /health`), with RLIMIT_CPU (per process, whole
    /// seconds) behind it.
    pub cpu_time_ms: u64,
    /// Memory in bytes (memory cgroup, or RLIMIT_AS as a fallback).
    pub memory_bytes: u64,
    /// Processes and threads (RLIMIT_NPROC of the slot's own uid).
    pub processes: u64,
    /// Largest file the program may write, in bytes (RLIMIT_FSIZE).
    pub file_size_bytes: u64,
    /// Open file descriptors per process (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Bytes kept per output stream (counted as the JSON they become); more stops the
    /// program (`output_limit`).
    pub output_bytes: u64,
    /// Size of the work dir plus /tmp in bytes (a sized tmpfs).
    pub workdir_bytes: u64,
}

/// The same fields, each optional: a runtime entry's or a request's partial limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsOverride {
    pub wall_time_ms: Option<u64>,
    pub cpu_time_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub processes: Option<u64>,
    pub file_size_bytes: Option<u64>,
    pub open_files: Option<u64>,
    pub output_bytes: Option<u64>,
    pub workdir_bytes: Option<u64>,
}

/// A configured limit that cannot be (zero); `key` is its full name (`limits.memory_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct InvalidLimit {
    pub key: String,
    pub message: &'static str,
}

/// A request asked for more than the ceiling allows, or less than a stage can start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    pub field: &'static str,
    pub requested: u64,
    pub maximum: u64,
    pub minimum: u64,
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let LimitExceeded {
            field,
            requested,
            maximum,
            minimum,
        } = self;
        if requested < minimum {
            write!(
                f,
                "limit `{field}` = {requested} is below the minimum of {minimum}"
            )
        } else {
            write!(
                f,
                "limit `{field}` = {requested} exceeds the maximum of {maximum}"
            )
        }
    }
}

impl std::error::Error for LimitExceeded {}

/// The least a request may ask for: below these no runtime starts, and a memory limit
/// under the slot's current usage cannot even be set.
fn minimum(field: &str) -> u64 {
    match field {
        "memory_bytes" => 16 * MIB,
        "workdir_bytes" => MIB,
        "open_files" => 16,
        "output_bytes" => 1024,
        "wall_time_ms" | "cpu_time_ms" => 10,
        _ => 1,
    }
}

const MIB: u64 = 1024 * 1024;

macro_rules! limit_fields {
    ($($field:ident),* $(,)?) => {
        impl Limits {
            /// `(name, value)` for every field, in declaration order.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field)),*]
            }

            /// Each field of `over` that is set replaces the value here.
            pub fn with_override(mut self, over: &LimitsOverride) -> Limits {
                $(if let Some(v) = over.$field { self.$field = v; })*
                self
            }

            /// Field-wise minimum.
            pub fn min(self, other: &Limits) -> Limits {
                Limits { $($field: self.$field.min(other.$field)),* }
            }

            /// Field-wise maximum.
            pub fn max(self, other: &Limits) -> Limits {
                Limits { $($field: self.$field.max(other.$field)),* }
            }
        }

        impl LimitsOverride {
            /// `(name, value)` for every field that is set.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                let mut out = Vec::new();
                $(if let Some(v) = self.$field { out.push((stringify!($field), v)); })*
                out
            }
        }
    };
}

limit_fields!(
    wall_time_ms,
    cpu_time_ms,
    memory_bytes,
    processes,
    file_size_bytes,
    open_files,
    output_bytes,
    workdir_bytes,
);

impl Limits {
    pub fn default_run() -> Limits {
        Limits {
            wall_time_ms: 10_000,
            cpu_time_ms: 10_000,
            memory_bytes: 256 * MIB,
            processes: 64,
            file_size_bytes: 16 * MIB,
            open_files: 256,
            output_bytes: MIB,
            workdir_bytes: 64 * MIB,
        }
    }

    pub fn default_max() -> Limits {
        Limits {
            wall_time_ms: 60_000,
            cpu_time_ms: 60_000,
            memory_bytes: 2048 * MIB,
            processes: 256,
            file_size_bytes: 256 * MIB,
            open_files: 4096,
            output_bytes: 16 * MIB,
            workdir_bytes: 512 * MIB,
        }
    }

    pub fn default_compile() -> Limits {
        Limits {
            wall_time_ms: 30_000,
            cpu_time_ms: 30_000,
            memory_bytes: 1024 * MIB,
            processes: 128,
            file_size_bytes: 128 * MIB,
            open_files: 1024,
            output_bytes: MIB,
            workdir_bytes: 256 * MIB,
        }
    }

    /// The most a request's `compile_limits` may ask for (a compiler may need more than
    /// the programs it builds, but still within bounds).
    pub fn default_max_compile() -> Limits {
        Limits {
            wall_time_ms: 120_000,
            cpu_time_ms: 120_000,
            memory_bytes: 2048 * MIB,
            processes: 256,
            file_size_bytes: 256 * MIB,
            open_files: 4096,
            output_bytes: 4 * MIB,
            workdir_bytes: 512 * MIB,
        }
    }

    /// Every limit must be positive; `prefix` names the table in messages.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidLimit> {
        match self.entries().into_iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(InvalidLimit {
                key: format!("{prefix}.{name}"),
                message: "must be greater than 0",
            }),
            None => Ok(()),
        }
    }

    /// The most an answer holding stages under these limits can take as JSON: each stream
    /// of each stage at most twice its `output_bytes` (see the runner's output cost), plus
    /// room for everything else in the answer.
    pub fn answer_bytes_at_most(run: &Limits, compile: Option<&Limits>) -> u64 {
        const ENVELOPE_BYTES: u64 = 64 * 1024;
        let stage = |l: &Limits| l.output_bytes.saturating_mul(4);
        stage(run)
            .saturating_add(compile.map_or(0, stage))
            .saturating_add(ENVELOPE_BYTES)
    }

    /// The first field whose value is above the same field of `ceiling`.
    pub fn first_exceeding(&self, ceiling: &Limits) -> Option<&'static str> {
        self.entries()
            .into_iter()
            .zip(ceiling.entries())
            .find(|((_, v), (_, max))| v > max)
            .map(|((name, _), _)| name)
    }

    /// Apply a request's asks: each may lower a limit, none may pass `ceiling`.
    pub fn apply_request(
        self,
        asked: &LimitsOverride,
        ceiling: &Limits,
    ) -> Result<Limits, LimitExceeded> {
        let ceilings = ceiling.entries();
        for (name, requested) in asked.entries() {
            let maximum = ceilings
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(u64::MAX, |(_, m)| *m);
            let minimum = minimum(name);
            if requested > maximum || requested < minimum {
                return Err(LimitExceeded {
                    field: name,
                    requested,
                    maximum,
                    minimum,
                });
            }
        }
        Ok(self.with_override(asked))
    }
}

/// Inodes of a work dir tmpfs of `bytes`: one per 4 KiB of space (at least 1024), since
/// millions of empty files would otherwise cost kernel memory that no size limit sees.
pub fn tmpfs_inodes(bytes: u64) -> u64 {
    (bytes / 4096).max(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_can_lower_but_not_raise() {
        let base = Limits::default_run();
        let ceiling = Limits::default_max();
        let lowered = base
            .apply_request(
                &LimitsOverride {
                    wall_time_ms: Some(500),
                    ..Default::default()
                },
                &ceiling,
            )
            .expect("lowering is allowed");
        assert_eq!(lowered.wall_time_ms, 500);
        assert_eq!(lowered.memory_bytes, base.memory_bytes);

        let err = base
            .apply_request(
                &LimitsOverride {
                    memory_bytes: Some(ceiling.memory_bytes + 1),
                    ..Default::default()
                },
                &ceiling,
            )
            .expect_err("raising past the ceiling is refused");
        assert_eq!(err.field, "memory_bytes");
        assert_eq!(err.maximum, ceiling.memory_bytes);
    }

    #[test]
    fn first_exceeding_names_the_field() {
        let mut l = Limits::default_run();
        l.processes = 10_000;
        assert_eq!(l.first_exceeding(&Limits::default_max()), Some("processes"));
    }
}
