//! Runtimes: loaded from `runtimes.toml`, validated, probed for availability, and swapped
//! atomically on reload. This module never spawns submissions.

pub mod java;
mod probe;
pub(crate) use probe::resolve_command;
mod read;
pub mod reload;
mod validate;

use read::{line_of, read_config_file};
use validate::validate;
mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use schema::{ClassNaming, CompileEntry, RuntimeEntry, RuntimesFile, WarmKind};

use crate::config::{BackendKind, Settings};
use crate::limits::Limits;

/// A runtimes file that cannot be used. Messages name the file, the entry and the key.
#[derive(Debug, thiserror::Error)]
pub enum RuntimesError {
    #[error("cannot read runtimes file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid runtimes file {path}:\n{message}")]
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
    /// The most a request's `compile_limits` may ask for.
    pub max_compile_limits: Limits,
    pub backend: BackendKind,
    /// Kept started in idle sandboxes (see `execution/warm.rs`).
    pub warm: Option<WarmKind>,
    /// Forked per run from a fork server (see `execution/sandbox/zygote`); needs `warm`.
    pub zygote: bool,
    /// How file and class names follow the source (see `java.rs`).
    pub class_naming: Option<ClassNaming>,
    pub availability: Availability,
}

impl Runtime {
    /// A runtime that is not from runtimes.toml (the start-up self-test, unit tests): the
    /// default limits, no binds, no environment, available.
    pub fn ad_hoc(
        name: &str,
        file_name: &str,
        run: &[&str],
        compile: Option<&[&str]>,
        backend: BackendKind,
    ) -> Runtime {
        let strings = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect();
        Runtime {
            name: name.into(),
            aliases: Vec::new(),
            language: name.into(),
            version: None,
            version_command: None,
            file_name: file_name.into(),
            run: strings(run),
            compile: compile.map(strings),
            env: Vec::new(),
            ro_binds: Vec::new(),
            limits: Limits::default_run(),
            max_limits: Limits::default_max(),
            compile_limits: Limits::default_compile(),
            max_compile_limits: Limits::default_max_compile(),
            backend,
            warm: None,
            zygote: false,
            class_naming: None,
            availability: Availability {
                available: true,
                reason: None,
            },
        }
    }
}

impl Runtime {
    /// The name a single file submitted without one is saved as: `file_name`, or for Java
    /// the public class's name (`public class HelloWorld` must be in `HelloWorld.java`).
    pub fn file_name_for(&self, source: &[u8]) -> String {
        match self.class_naming {
            Some(ClassNaming::Java) => java::public_class(source)
                .filter(|class| crate::file_names::validate(&format!("{class}.java")).is_ok())
                .map_or_else(|| self.file_name.clone(), |class| format!("{class}.java")),
            None => self.file_name.clone(),
        }
    }

    /// The class `{class}` names: for Java the top-level class of `source` that declares
    /// `main` (else its public class, else the file's stem); `None` for other runtimes.
    pub fn main_class(&self, source: &[u8]) -> Option<String> {
        match self.class_naming {
            Some(ClassNaming::Java) => java::main_class(source),
            None => None,
        }
    }
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
        // TOML's diagnostic spans lines (the line, a caret under the column): keep them.
        message: e.to_string().trim_end().to_string(),
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
