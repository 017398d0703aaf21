//! Runtimes: loaded from `runtimes.toml`, validated, probed for availability, and swapped
//! atomically on reload. This module never spawns submissions.

mod probe;
pub(crate) use probe::resolve_command;
pub mod reload;
mod schema;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use schema::{CompileEntry, RuntimeEntry, RuntimesFile, WarmKind};

use crate::config::{BackendKind, Settings};
use crate::execution::Limits;

/// A runtimes file that cannot be used. Messages name the file, the entry and the key.
#[derive(Debug, thiserror::Error)]
pub enum RuntimesError {
    #[error("cannot read runtimes file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid runtimes file {path}: {message}")]
    Parse {
        path: PathBuf,
        /// Where the error is (1-based), when TOML says.
        line: Option<usize>,
        message: String,
    },
    #[error("invalid runtimes file {path}: runtime `{entry}`, key `{key}`: {message}")]
    Entry {
        path: PathBuf,
        entry: String,
        key: String,
        message: String,
    },
}

impl RuntimesError {
    /// What a client may see (`/ready`): which entry and key, or which line, but no path
    /// and none of the file's content (a value there could be a secret). The full error
    /// goes to the log.
    pub fn summary(&self) -> String {
        let (RuntimesError::Read { path, .. }
        | RuntimesError::Parse { path, .. }
        | RuntimesError::Entry { path, .. }) = self;
        let file = path
            .file_name()
            .map_or_else(|| "the runtimes file".into(), |n| n.to_string_lossy());
        match self {
            RuntimesError::Read { source, .. } => {
                format!("cannot read {file} ({source})")
            }
            RuntimesError::Parse { line: Some(n), .. } => {
                format!("{file} is not valid TOML (line {n})")
            }
            RuntimesError::Parse { line: None, .. } => format!("{file} is not valid TOML"),
            RuntimesError::Entry { entry, key, .. } => {
                format!("{file}: runtime `{entry}`, key `{key}` is invalid (see the daemon's log)")
            }
        }
    }
}

/// The most a runtimes file may hold.
const MAX_RUNTIMES_FILE_BYTES: u64 = 1024 * 1024;
/// How long reading it may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read a config file that an operator (or a hostile edit) controls: a regular file only
/// (a FIFO would block the reader forever, and with it shutdown), opened without blocking,
/// at most [`MAX_RUNTIMES_FILE_BYTES`], within [`READ_TIMEOUT`]. Symlinks are followed
/// (Kubernetes ConfigMaps are symlinks).
async fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        if meta.len() > MAX_RUNTIMES_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_RUNTIMES_FILE_BYTES} bytes"),
            ));
        }
        let mut text = String::new();
        file.take(MAX_RUNTIMES_FILE_BYTES)
            .read_to_string(&mut text)?;
        Ok(text)
    });
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "reading took too long",
        )),
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether a runtime can run here, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub available: bool,
    pub reason: Option<String>,
}

/// One runtime, ready to build commands from.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub name: String,
    pub aliases: Vec<String>,
    pub language: String,
    /// Declared, or detected by the probe from `version_command`.
    pub version: Option<String>,
    pub version_command: Option<Vec<String>>,
    pub file_name: String,
    pub run: Vec<String>,
    pub compile: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub ro_binds: Vec<PathBuf>,
    /// Default limits of the run stage.
    pub limits: Limits,
    /// The most a request may ask for.
    pub max_limits: Limits,
    pub compile_limits: Limits,
    pub backend: BackendKind,
    /// Kept started in idle sandboxes (see `execution/warm.rs`).
    pub warm: Option<WarmKind>,
    pub availability: Availability,
}

/// A consistent set of runtimes. In-flight executions keep the `Arc` they started with.
#[derive(Debug)]
pub struct RuntimeSet {
    pub default: String,
    pub runtimes: Vec<Arc<Runtime>>,
    by_name: HashMap<String, usize>,
}

/// Why a name could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("unknown runtime `{name}`; known runtimes: {known}")]
    Unknown { name: String, known: String },
    #[error("runtime `{name}` has version {actual}, which does not match `{requested}`")]
    VersionMismatch {
        name: String,
        requested: String,
        actual: String,
    },
    #[error("runtime `{name}` is not available on this server: {reason}")]
    Unavailable { name: String, reason: String },
}

impl RuntimeSet {
    /// Find a runtime by name or alias (`None` = the default), optionally checking a version
    /// selector: `3` matches `3.11.2`, `3.11` matches `3.11.2`, `3.1` does not.
    pub fn resolve(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Arc<Runtime>, LookupError> {
        let name = name.map(str::trim).filter(|n| !n.is_empty());
        let key = name.unwrap_or(&self.default);
        let runtime = self
            .by_name
            .get(&key.to_ascii_lowercase())
            .map(|&i| Arc::clone(&self.runtimes[i]))
            .ok_or_else(|| LookupError::Unknown {
                name: key.to_string(),
                known: self
                    .runtimes
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if let Some(requested) = version.map(str::trim).filter(|v| !v.is_empty()) {
            let actual = runtime.version.clone().unwrap_or_default();
            if !version_matches(requested, &actual) {
                return Err(LookupError::VersionMismatch {
                    name: runtime.name.clone(),
                    requested: requested.to_string(),
                    actual: if actual.is_empty() {
                        "unknown".into()
                    } else {
                        actual
                    },
                });
            }
        }
        if !runtime.availability.available {
            return Err(LookupError::Unavailable {
                name: runtime.name.clone(),
                reason: runtime.availability.reason.clone().unwrap_or_default(),
            });
        }
        Ok(runtime)
    }
}

fn version_matches(selector: &str, actual: &str) -> bool {
    if selector == "*" || selector == actual {
        return true;
    }
    actual
        .strip_prefix(selector)
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
}

/// Load, validate and probe a runtimes file.
pub async fn load(path: &Path, settings: &Settings) -> Result<RuntimeSet, RuntimesError> {
    let text = read_config_file(path)
        .await
        .map_err(|source| RuntimesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let file: RuntimesFile = toml::from_str(&text).map_err(|e| RuntimesError::Parse {
        path: path.to_path_buf(),
        line: e.span().map(|span| line_of(&text, span.start)),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    let runtimes = validate(path, &file, settings)?;
    for r in runtimes
        .iter()
        .filter(|r| r.backend == BackendKind::Process && settings.sandbox.backend != r.backend)
    {
        tracing::warn!(runtime = %r.name,
            "!!! ISOLATION IS OFF for this runtime: runtimes.toml gives it the process backend !!!");
    }
    let probed = probe::probe_all(runtimes, &settings.sandbox.path).await;
    let mut by_name = HashMap::new();
    for (i, runtime) in probed.iter().enumerate() {
        by_name.insert(runtime.name.to_ascii_lowercase(), i);
        for alias in &runtime.aliases {
            by_name.insert(alias.to_ascii_lowercase(), i);
        }
    }
    Ok(RuntimeSet {
        default: file.default.clone(),
        runtimes: probed.into_iter().map(Arc::new).collect(),
        by_name,
    })
}

fn validate(
    path: &Path,
    file: &RuntimesFile,
    settings: &Settings,
) -> Result<Vec<Runtime>, RuntimesError> {
    let entry_error = |entry: &str, key: &str, message: String| RuntimesError::Entry {
        path: path.to_path_buf(),
        entry: entry.to_string(),
        key: key.to_string(),
        message,
    };
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(file.runtimes.len());
    for entry in &file.runtimes {
        let name = entry.name.as_str();
        // One line in runtimes.toml must not turn isolation off unnoticed (also by reload).
        if entry.backend == Some(BackendKind::Process)
            && settings.sandbox.backend != BackendKind::Process
            && !settings.sandbox.allow_unsandboxed_runtimes
        {
            return Err(entry_error(
                name,
                "backend",
                "`process` runs submissions without isolation; set \
                 sandbox.allow_unsandboxed_runtimes = true to allow it"
                    .into(),
            ));
        }
        if !valid_name(name) {
            return Err(entry_error(
                name,
                "name",
                "must be 1-64 characters of a-z, 0-9, `.`, `_`, `+` or `-`".into(),
            ));
        }
        for (key, candidate) in std::iter::once(("name", name))
            .chain(entry.aliases.iter().map(|a| ("aliases", a.as_str())))
        {
            if !valid_name(candidate) {
                return Err(entry_error(
                    name,
                    key,
                    format!("`{candidate}` is not a valid name"),
                ));
            }
            if let Some(owner) = seen.insert(candidate.to_ascii_lowercase(), name.to_string()) {
                return Err(entry_error(
                    name,
                    key,
                    format!("duplicate name `{candidate}` (already used by runtime `{owner}`)"),
                ));
            }
        }
        if entry.run.is_empty() || entry.run[0].trim().is_empty() {
            return Err(entry_error(name, "run", "must name a command".into()));
        }
        if let Some(compile) = &entry.compile {
            if compile.command.is_empty() || compile.command[0].trim().is_empty() {
                return Err(entry_error(
                    name,
                    "compile.command",
                    "must name a command".into(),
                ));
            }
        }
        if entry.warm.is_some() {
            if entry.compile.is_some() {
                return Err(entry_error(
                    name,
                    "warm",
                    "only runtimes without a compile stage can be kept warm".into(),
                ));
            }
            let file_args = entry.run.iter().filter(|a| *a == "{file}").count();
            if file_args != 1 || entry.run.first().is_some_and(|a| a == "{file}") {
                return Err(entry_error(
                    name,
                    "warm",
                    "needs `{file}` once, as an argument of its own (not the command), in `run`"
                        .into(),
                ));
            }
        }
        if let Err(message) = crate::execution::validate_file_name(&entry.file_name) {
            return Err(entry_error(name, "file_name", message));
        }
        let max_limits = settings.max_limits.with_override(&entry.max_limits);
        let limits = settings.limits.with_override(&entry.limits);
        let compile_limits = settings
            .compile_limits
            .with_override(&entry.compile.as_ref().map(|c| c.limits).unwrap_or_default());
        for (key, set, ceiling) in [
            ("max_limits", &max_limits, &settings.max_limits),
            ("limits", &limits, &max_limits),
            ("compile.limits", &compile_limits, &settings.max_limits),
        ] {
            if let Some(field) = set.first_exceeding(ceiling) {
                return Err(entry_error(
                    name,
                    &format!("{key}.{field}"),
                    "is above the server's max_limits (or this runtime's max_limits)".into(),
                ));
            }
            if let Some((field, _)) = set.entries().into_iter().find(|(_, v)| *v == 0) {
                return Err(entry_error(
                    name,
                    &format!("{key}.{field}"),
                    "must be greater than 0".into(),
                ));
            }
        }
        out.push(Runtime {
            name: name.to_string(),
            aliases: entry.aliases.clone(),
            language: entry.language.clone(),
            version: entry.version.clone(),
            version_command: entry.version_command.clone(),
            file_name: entry.file_name.clone(),
            run: entry.run.clone(),
            compile: entry.compile.as_ref().map(|c| c.command.clone()),
            env: entry
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ro_binds: entry.ro_binds.clone(),
            limits,
            max_limits,
            compile_limits,
            backend: entry.backend.unwrap_or(settings.sandbox.backend),
            warm: entry.warm,
            availability: Availability {
                available: true,
                reason: None,
            },
        });
        if let Some(cmd) = &entry.version_command {
            if cmd.is_empty() {
                return Err(entry_error(
                    name,
                    "version_command",
                    "must name a command".into(),
                ));
            }
        }
    }
    if !seen.contains_key(&file.default.to_ascii_lowercase()) {
        return Err(RuntimesError::Entry {
            path: path.to_path_buf(),
            entry: file.default.clone(),
            key: "default".into(),
            message: "the default runtime is not defined in this file".into(),
        });
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._+-".contains(&b))
}

/// The live runtime set, replaced whole on reload.
#[derive(Debug, Clone)]
pub struct RuntimeRegistry {
    current: Arc<RwLock<Arc<RuntimeSet>>>,
}

impl RuntimeRegistry {
    pub fn new(set: RuntimeSet) -> Self {
        RuntimeRegistry {
            current: Arc::new(RwLock::new(Arc::new(set))),
        }
    }

    /// A snapshot: keeps working even if a reload happens meanwhile.
    pub fn snapshot(&self) -> Arc<RuntimeSet> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace(&self, set: RuntimeSet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut guard) => *guard = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }
}
