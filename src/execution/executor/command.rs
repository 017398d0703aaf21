//! Commands of a runtime, as runtimes.toml writes them: templates with placeholders.

/// Replace `{file}` with the entry file's name and `{stem}` with that name's final
/// component without its extension.
pub(super) fn fill_template(template: &[String], entry: &str) -> Vec<String> {
    let base = entry.rsplit('/').next().unwrap_or(entry);
    let stem = base.rsplit_once('.').map_or(base, |(stem, _)| stem);
    template
        .iter()
        .map(|part| part.replace("{file}", entry).replace("{stem}", stem))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn templates_fill_file_and_stem() {
        let t = vec![
            "java".to_string(),
            "-cp".into(),
            ".".into(),
            "{stem}".into(),
        ];
        assert_eq!(
            super::fill_template(&t, "src/Main.java"),
            vec!["java", "-cp", ".", "Main"]
        );
        let t = vec!["python3".to_string(), "{file}".into()];
        assert_eq!(
            super::fill_template(&t, "main.py"),
            vec!["python3", "main.py"]
        );
    }
}
