//! The `runtimes.toml` file format. Unknown keys are errors, so a typo never passes silently.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::BackendKind;
use crate::limits::LimitsOverride;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimesFile {
    /// Name of the runtime used when a request names none.
    pub default: String,
    #[serde(rename = "runtime", default)]
    pub runtimes: Vec<RuntimeEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEntry {
    /// Unique name used in requests (`"runtime": "python3"`).
    pub name: String,
    /// Other names that select this runtime; unique across all names and aliases.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The language, for clients that group runtimes (`python`, `javascript`, `c`...).
    pub language: String,
    /// A declared version. Wins over `version_command`.
    #[serde(default)]
    pub version: Option<String>,
    /// A command whose output holds the version (`["python3", "--version"]`).
    #[serde(default)]
    pub version_command: Option<Vec<String>>,
    /// Name given to a single submitted source file (`main.py`).
    pub file_name: String,
    /// The run command. `{file}` is the entry file's name and `{stem}` that name without its
    /// extension; request `args` are appended.
    pub run: Vec<String>,
    /// An optional compile stage that runs before `run`, in the same work dir.
    #[serde(default)]
    pub compile: Option<CompileEntry>,
    /// Extra environment for both stages (the sandbox starts from an empty one).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra host paths bound read-only into the sandbox (missing ones are skipped).
    #[serde(default)]
    pub ro_binds: Vec<PathBuf>,
    /// Defaults for this runtime's run stage, replacing the server's `[limits]`.
    #[serde(default)]
    pub limits: LimitsOverride,
    /// Ceilings for this runtime's requests, below the server's `[max_limits]`.
    #[serde(default)]
    pub max_limits: LimitsOverride,
    /// Run this runtime under another backend than the server's.
    #[serde(default)]
    pub backend: Option<BackendKind>,
    /// Keep an interpreter of this runtime started and waiting in idle slots' sandboxes
    /// (`"python"`: the run command with `{file}` replaced by a small bootstrap). Only for
    /// runtimes without a compile stage.
    #[serde(default)]
    pub warm: Option<WarmKind>,
    /// Fork each run from a started interpreter of this runtime (a "zygote", using the
    /// `warm` bootstrap's language) instead of starting one per run: a fresh sandbox per run
    /// for about a fifth of the CPU. Needs `warm`; falls back to it where zygotes cannot
    /// run (`/health` says why).
    #[serde(default)]
    pub zygote: bool,
    /// `"java"`: a single submitted file is named after its public class (`HelloWorld.java`),
    /// and `{class}` in a command is the top-level class that declares `main`.
    #[serde(default)]
    pub class_naming: Option<ClassNaming>,
}

/// Languages whose file and class names are tied together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassNaming {
    Java,
}

/// Interpreters that can wait, started, for the program they will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmKind {
    Python,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileEntry {
    /// The compile command; same placeholders as `run`.
    pub command: Vec<String>,
    /// Limits for the compile stage, replacing the server's `[compile_limits]`.
    #[serde(default)]
    pub limits: LimitsOverride,
}
