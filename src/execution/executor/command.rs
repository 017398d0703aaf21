//! Commands of a runtime, as runtimes.toml writes them: templates with placeholders.

/// What a command template's placeholders stand for.
pub(super) struct Placeholders<'a> {
    /// `{file}`; `{stem}` is its final component without the extension.
    pub(super) entry: &'a str,
    /// `{class}`: the class to run, where the runtime finds one (else `{stem}`).
    pub(super) class: Option<&'a str>,
    /// The stage's memory limit: `{memory_mb}` in MiB, `{heap_mb}` half of it (at least 8),
    /// for runtimes that would otherwise size their heap from the host's memory.
    pub(super) memory_bytes: u64,
}

/// Fill `{file}`, `{stem}`, `{class}`, `{memory_mb}` and `{heap_mb}`.
pub(super) fn fill_template(template: &[String], p: &Placeholders<'_>) -> Vec<String> {
    let entry = p.entry;
    let base = entry.rsplit('/').next().unwrap_or(entry);
    let stem = base.rsplit_once('.').map_or(base, |(stem, _)| stem);
    let memory_mb = (p.memory_bytes / (1024 * 1024)).max(1);
    let heap_mb = (memory_mb / 2).max(8);
    template
        .iter()
        .map(|part| {
            part.replace("{file}", entry)
                .replace("{stem}", stem)
                .replace("{class}", p.class.unwrap_or(stem))
                .replace("{memory_mb}", &memory_mb.to_string())
                .replace("{heap_mb}", &heap_mb.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Placeholders, fill_template};

    fn strings(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn templates_fill_file_stem_class_and_memory() {
        let p = |entry, class| Placeholders {
            entry,
            class,
            memory_bytes: 256 * 1024 * 1024,
        };
        let t = strings(&["java", "-cp", ".", "{stem}"]);
        assert_eq!(
            fill_template(&t, &p("src/Main.java", None)),
            vec!["java", "-cp", ".", "Main"]
        );
        let t = strings(&["python3", "{file}"]);
        assert_eq!(
            fill_template(&t, &p("main.py", None)),
            vec!["python3", "main.py"]
        );
        let t = strings(&[
            "java",
            "-XX:MaxRAM={memory_mb}m",
            "-Xmx{heap_mb}m",
            "{class}",
        ]);
        assert_eq!(
            fill_template(&t, &p("Main.java", Some("Solution"))),
            vec!["java", "-XX:MaxRAM=256m", "-Xmx128m", "Solution"]
        );
        assert_eq!(
            fill_template(&t, &p("Main.java", None))[3],
            "Main",
            "without a class found, `{{class}}` is the stem"
        );
        let tiny = Placeholders {
            entry: "main.js",
            class: None,
            memory_bytes: 10 * 1024 * 1024,
        };
        assert_eq!(
            fill_template(&strings(&["--max-old-space-size={heap_mb}"]), &tiny),
            vec!["--max-old-space-size=8"]
        );
    }
}
