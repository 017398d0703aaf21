//! Typed settings, layered as: built-in defaults < TOML file (`--config`) < `MDE_*` environment.
//!
//! The `config` crate does the layering; [`Settings::validate`] does the semantic checks the
//! crate cannot, so a bad value stops start-up with a message that names its key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::execution::Limits;

/// Errors that stop start-up. Each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
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
    /// How long a graceful shutdown waits for in-flight executions.
    pub shutdown_grace_seconds: u64,
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
    /// PATH inside the sandbox; runtime commands are resolved against it.
    pub path: String,
    /// Host paths bound read-only into every sandbox (missing ones are skipped).
    pub ro_binds: Vec<PathBuf>,
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
            shutdown_grace_seconds: 15,
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
        }
    }
}

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
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with("MDE_"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("MDE")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("sandbox.ro_binds")
                .with_list_parse_key("server.api_keys")
                .try_parsing(true)
                .source(Some(vars)),
        );
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
        self.limits.validate("limits")?;
        self.max_limits.validate("max_limits")?;
        self.compile_limits.validate("compile_limits")?;
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
