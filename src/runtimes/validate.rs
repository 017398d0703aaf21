//! Checking a runtimes file's entries and turning them into [`Runtime`]s: names, aliases,
//! commands, limits within the server's ceilings, backends, warm interpreters.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Availability, Runtime, RuntimesError, RuntimesFile};
use crate::config::{BackendKind, Settings};

pub(super) fn validate(
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
        if let Some(compile) = &entry.compile
            && (compile.command.is_empty() || compile.command[0].trim().is_empty())
        {
            return Err(entry_error(
                name,
                "compile.command",
                "must name a command".into(),
            ));
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
        if entry.zygote && entry.warm.is_none() {
            return Err(entry_error(
                name,
                "zygote",
                "needs `warm` (the language of the interpreter's bootstrap)".into(),
            ));
        }
        if let Err(message) = crate::file_names::validate(&entry.file_name) {
            return Err(entry_error(name, "file_name", message.to_string()));
        }
        let max_limits = settings.max_limits.with_override(&entry.max_limits);
        let limits = settings.limits.with_override(&entry.limits);
        let compile_limits = settings
            .compile_limits
            .with_override(&entry.compile.as_ref().map(|c| c.limits).unwrap_or_default());
        for (key, set, ceiling) in [
            ("max_limits", &max_limits, &settings.max_limits),
            ("limits", &limits, &max_limits),
            (
                "compile.limits",
                &compile_limits,
                &settings.max_compile_limits,
            ),
        ] {
            if let Some(field) = set.first_exceeding(ceiling) {
                return Err(entry_error(
                    name,
                    &format!("{key}.{field}"),
                    "is above the server's max_limits (max_compile_limits for compile.limits), or this runtime's max_limits".into(),
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
            max_compile_limits: settings.max_compile_limits,
            backend: entry.backend.unwrap_or(settings.sandbox.backend),
            warm: entry.warm,
            zygote: entry.zygote,
            class_naming: entry.class_naming,
            availability: Availability {
                available: true,
                reason: None,
            },
        });
        if let Some(cmd) = &entry.version_command
            && cmd.is_empty()
        {
            return Err(entry_error(
                name,
                "version_command",
                "must name a command".into(),
            ));
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
