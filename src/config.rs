//! Typed settings, layered as: built-in defaults < TOML file (`--config`) < `MDE_*` environment.
//!
//! The `config` crate does the layering; [`Settings::validate`] does the semantic checks the
//! crate cannot, so a bad value stops start-up with a message that names its key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::{InvalidLimit, Limits};

/// Errors that stop start-up. Each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Limit(#[from] InvalidLimit),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub runtimes: RuntimesSettings,
    pub execution: ExecutionSettings,
    pub sandbox: SandboxSettings,
    /// Limits applied to a run when neither the request nor the runtime sets them.
    pub limits: Limits,
    /// The most any request or runtime entry may ask for.
    pub max_limits: Limits,
    /// Limits for compile stages (compilers need more than the programs they build).
    pub compile_limits: Limits,
    /// The most a request's `compile_limits` (or a runtime's compile limits) may ask for.
    pub max_compile_limits: Limits,
    pub compile_cache: CompileCacheSettings,
}

/// The compile cache: compiled outputs kept in the daemon's memory, keyed by a SHA-256 of
/// everything that goes into a compile (see `execution/compile_cache.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompileCacheSettings {
    pub enabled: bool,
    /// Bytes of compile outputs kept at most; the least recently used go first.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub host: IpAddr,
    pub port: u16,
    /// Largest accepted request body; larger ones get 413 with a JSON error.
    pub max_body_bytes: usize,
    /// When not empty, `/submit_code` and `/api/v1/*` need one of these keys, as
    /// `Authorization: Bearer KEY` or `X-API-Key: KEY`. Health, readiness, metrics and the
    /// docs stay open.
    pub api_keys: Vec<String>,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log_level: String,
    /// `text` (coloured only on a terminal) or `json` (one object per line, for shippers).
    pub log_format: LogFormat,
    /// How long a graceful shutdown waits for in-flight executions.
    pub shutdown_grace_seconds: u64,
    /// Open connections at most; one more gets a canned 503 and is closed.
    pub max_connections: usize,
    /// A request head (and, between requests, the next one) must arrive within this.
    pub header_read_timeout_ms: u64,
    /// A request body must arrive within this (408 otherwise).
    pub body_read_timeout_ms: u64,
    /// A connection whose writes make no progress for this long is closed.
    pub write_timeout_ms: u64,
    /// Request-body bytes buffered at once across all requests (each counts as its
    /// Content-Length, or `max_body_bytes` when chunked); past it, 503 with Retry-After.
    pub max_inflight_body_bytes: usize,
    /// Bytes of execution answers held in memory at once (each submission reserves its
    /// worst case: four times its `output_bytes`, plus the compile stage's); past it,
    /// submissions wait like queued ones.
    pub max_inflight_response_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimesSettings {
    /// Path of the runtimes file; relative paths are taken from the working directory.
    pub file: PathBuf,
    /// Poll the file for changes and reload it (SIGHUP always reloads).
    pub watch: bool,
    pub watch_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionSettings {
    /// Executions that run at once (0 = number of CPU cores).
    pub max_concurrent: usize,
    /// Submissions that may wait for a slot; one more is answered 429.
    pub queue_size: usize,
    /// Where per-slot work dirs live (a fresh sub-directory per daemon).
    pub work_root: PathBuf,
    /// The longest a submission waits in the queue; then it is answered 429 busy.
    pub max_queue_wait_ms: u64,
    /// Tests in one batch (`tests` of `POST /api/v1/execute`) at most.
    pub max_batch_tests: usize,
    /// Bytes of stdin, args and expected outputs of all tests of a batch together, at most.
    pub max_batch_input_bytes: u64,
    /// The longest a batch may run, all tests together (a request may ask for less).
    pub max_batch_wall_time_ms: u64,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// bubblewrap: namespaces, read-only system, seccomp. The default.
    Bwrap,
    /// A plain child process with rlimits. No isolation: development only.
    Process,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Bwrap => "bwrap",
            BackendKind::Process => "process",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    pub backend: BackendKind,
    /// The bubblewrap binary (looked up in PATH when not absolute).
    pub bwrap_path: PathBuf,
    /// Slot N runs as uid/gid `uid_base + N` (only when the daemon runs as root).
    pub uid_base: u32,
    /// Use a memory cgroup per slot when the host allows it (else RLIMIT_AS).
    pub memory_cgroup: bool,
    /// Mount a size-limited tmpfs per slot for the work dir and /tmp (root only).
    pub tmpfs_workdir: bool,
    /// Fork stages from a per-slot launcher that already sits in the slot's cgroups, instead
    /// of moving each stage in (which costs milliseconds per run on cgroup v1).
    pub launcher: bool,
    /// Keep a bubblewrap sandbox set up in each idle slot, so a request skips the ~10 ms of
    /// namespace and mount set-up (see execution/stage_exec.rs).
    pub prepare_sandboxes: bool,
    /// Run runtimes marked `zygote` in runtimes.toml from a fork server per slot (see
    /// execution/sandbox/zygote): each run forks a fresh sandbox from an interpreter that
    /// has already started. Off, they use their warm interpreter as before.
    pub zygotes: bool,
    /// Replace a slot's zygote after this many runs (a fork shares the zygote's address
    /// space layout and, for python, its hash secret: rotating bounds how long they live).
    pub zygote_max_runs: u64,
    /// ... or once it is this many seconds old.
    pub zygote_max_age_secs: u64,
    /// PATH inside the sandbox; runtime commands are resolved against it.
    pub path: String,
    /// Host paths bound read-only into every sandbox (missing ones are skipped).
    pub ro_binds: Vec<PathBuf>,
    /// Let runtimes.toml entries say `backend = "process"` (no isolation). Off, such an
    /// entry is refused; on, `/health` reports isolation off and warns.
    pub allow_unsandboxed_runtimes: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server: ServerSettings::default(),
            runtimes: RuntimesSettings::default(),
            execution: ExecutionSettings::default(),
            sandbox: SandboxSettings::default(),
            limits: Limits::default_run(),
            max_limits: Limits::default_max(),
            compile_limits: Limits::default_compile(),
            max_compile_limits: Limits::default_max_compile(),
            compile_cache: CompileCacheSettings::default(),
        }
    }
}

impl Default for CompileCacheSettings {
    fn default() -> Self {
        CompileCacheSettings {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8000,
            max_body_bytes: 2 * 1024 * 1024,
            api_keys: Vec::new(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            shutdown_grace_seconds: 15,
            max_connections: 512,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            max_inflight_body_bytes: 64 * 1024 * 1024,
            max_inflight_response_bytes: 512 * 1024 * 1024,
        }
    }
}

impl Default for RuntimesSettings {
    fn default() -> Self {
        RuntimesSettings {
            file: PathBuf::from("runtimes.toml"),
            watch: true,
            watch_interval_ms: 1000,
        }
    }
}

impl Default for ExecutionSettings {
    fn default() -> Self {
        ExecutionSettings {
            max_concurrent: 0,
            queue_size: 64,
            work_root: std::env::temp_dir(),
            max_queue_wait_ms: 60_000,
            max_batch_tests: 100,
            max_batch_input_bytes: 16 * 1024 * 1024,
            max_batch_wall_time_ms: 300_000,
        }
    }
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            backend: BackendKind::Bwrap,
            bwrap_path: PathBuf::from("bwrap"),
            uid_base: 61000,
            memory_cgroup: true,
            tmpfs_workdir: true,
            launcher: true,
            prepare_sandboxes: true,
            zygotes: true,
            zygote_max_runs: 500,
            zygote_max_age_secs: 300,
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            ro_binds: [
                "/usr",
                "/etc/alternatives",
                "/etc/ld.so.cache",
                "/etc/ld.so.conf",
                "/etc/ld.so.conf.d",
                "/etc/localtime",
                "/etc/ssl/certs",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            allow_unsandboxed_runtimes: false,
        }
    }
}

/// The `config` crate rounds a float where an integer belongs (`1500.7` becomes 1501). No
/// setting is fractional, so a float anywhere in the file is refused, naming its key.
fn refuse_floats(path: &Path) -> Result<(), ConfigError> {
    fn walk(prefix: &str, value: &toml::Value) -> Result<(), ConfigError> {
        match value {
            toml::Value::Float(f) => Err(invalid(prefix, format!("must be an integer, found {f}"))),
            toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&key, v)
            }),
            toml::Value::Array(items) => items.iter().try_for_each(|v| walk(prefix, v)),
            _ => Ok(()),
        }
    }
    // Unreadable or malformed files are reported by the `config` crate's own load.
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    match text.parse::<toml::Table>() {
        Ok(table) => walk("", &toml::Value::Table(table)),
        Err(_) => Ok(()),
    }
}

/// Environment variables holding comma-separated lists, and their keys.
const LIST_VARIABLES: &[(&str, &str)] = &[
    ("MDE_SERVER__API_KEYS", "server.api_keys"),
    ("MDE_SANDBOX__RO_BINDS", "sandbox.ro_binds"),
];

impl Settings {
    /// Defaults, then the optional file, then `MDE_*` variables from `env`.
    ///
    /// `env` is passed in (rather than read here) so tests can layer variables without
    /// touching the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            refuse_floats(path)?;
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // `MDE_CONFIG` names the file (the CLI reads it); it is not a setting.
        let mut vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with("MDE_") && key != "MDE_CONFIG")
            .collect();
        // Lists are split here, because the crate splits them only with `try_parsing`, and
        // each item trimmed: `MDE_SERVER__API_KEYS="k1, k2"` means "k1" and "k2", never " k2".
        let mut lists = Vec::new();
        for (var, key) in LIST_VARIABLES {
            if let Some(value) = vars.remove(*var) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_string)
                    .collect();
                lists.push((*key, items));
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("MDE")
                .prefix_separator("_")
                .separator("__")
                // Values stay strings, and serde parses each into its field's type: with
                // `try_parsing` the crate would coerce `1500.7` into an integer and wrap
                // `99999999999999999999` around instead of refusing them.
                .try_parsing(false)
                .source(Some(vars)),
        );
        for (key, items) in lists {
            builder = builder.set_override(key, items)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Semantic checks the `config` crate does not do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.api_keys.iter().any(|k| k.len() < 16) {
            return Err(invalid(
                "server.api_keys",
                "every key must be at least 16 characters",
            ));
        }
        let s = &self.server;
        if !(1..=1_000_000).contains(&s.max_connections) {
            return Err(invalid("server.max_connections", "must be 1 to 1000000"));
        }
        for (key, ms) in [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            ("server.write_timeout_ms", s.write_timeout_ms),
            (
                "execution.max_queue_wait_ms",
                self.execution.max_queue_wait_ms,
            ),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return Err(invalid(key, "must be 100 to 3600000 (milliseconds)"));
            }
        }
        if s.max_body_bytes > 1 << 30 {
            return Err(invalid("server.max_body_bytes", "must be at most 1 GiB"));
        }
        if s.max_inflight_body_bytes < s.max_body_bytes || s.max_inflight_body_bytes > 1 << 40 {
            return Err(invalid(
                "server.max_inflight_body_bytes",
                "must be at least server.max_body_bytes (and at most 1 TiB)",
            ));
        }
        let largest =
            Limits::answer_bytes_at_most(&self.max_limits, Some(&self.max_compile_limits));
        if s.max_inflight_response_bytes < largest || s.max_inflight_response_bytes > 1 << 40 {
            return Err(invalid(
                "server.max_inflight_response_bytes",
                format!(
                    "must hold the largest answer max_limits allow ({largest} bytes), and at most 1 TiB"
                ),
            ));
        }
        if self.execution.queue_size > 100_000 {
            return Err(invalid("execution.queue_size", "must be at most 100000"));
        }
        if self.runtimes.watch_interval_ms < 50 {
            return Err(invalid("runtimes.watch_interval_ms", "must be at least 50"));
        }
        if self.sandbox.uid_base == 0 || self.sandbox.uid_base.checked_add(65_536).is_none() {
            return Err(invalid(
                "sandbox.uid_base",
                "must be a non-root uid with room for one uid per slot",
            ));
        }
        if self.sandbox.zygote_max_runs == 0 || self.sandbox.zygote_max_age_secs == 0 {
            return Err(invalid(
                "sandbox.zygote_max_runs",
                "zygote_max_runs and zygote_max_age_secs must be at least 1 (set sandbox.zygotes = false to turn zygotes off)",
            ));
        }
        self.limits.validate("limits")?;
        self.max_limits.validate("max_limits")?;
        self.compile_limits.validate("compile_limits")?;
        self.max_compile_limits.validate("max_compile_limits")?;
        if let Some(name) = self
            .compile_limits
            .first_exceeding(&self.max_compile_limits)
        {
            return Err(invalid(
                format!("compile_limits.{name}"),
                format!("is above max_compile_limits.{name}"),
            ));
        }
        let e = &self.execution;
        if !(1..=10_000).contains(&e.max_batch_tests) {
            return Err(invalid("execution.max_batch_tests", "must be 1 to 10000"));
        }
        if !(1..=1 << 30).contains(&e.max_batch_input_bytes) {
            return Err(invalid(
                "execution.max_batch_input_bytes",
                "must be 1 to 1073741824",
            ));
        }
        if !(100..=86_400_000).contains(&e.max_batch_wall_time_ms) {
            return Err(invalid(
                "execution.max_batch_wall_time_ms",
                "must be 100 to 86400000 (milliseconds)",
            ));
        }
        if self.compile_cache.max_bytes > 1 << 40 {
            return Err(invalid("compile_cache.max_bytes", "must be at most 1 TiB"));
        }
        if let Some(name) = self.limits.first_exceeding(&self.max_limits) {
            return Err(invalid(
                format!("limits.{name}"),
                format!("is above max_limits.{name}"),
            ));
        }
        Ok(())
    }

    /// The number of execution slots, resolving 0 to the core count.
    pub fn slots(&self) -> usize {
        match self.execution.max_concurrent {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}
