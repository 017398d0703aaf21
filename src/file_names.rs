//! Names of files in a sandbox's work dir (a leaf module): the one rule for names a request
//! or a runtimes.toml entry gives.

/// A name that would leave the work dir or cannot be made there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFileName(String);

/// A submitted file name must stay inside the work dir: relative, no `..`, no empty or hidden
/// tricks, at most a few levels deep.
pub fn validate(name: &str) -> Result<(), InvalidFileName> {
    if name.is_empty() || name.len() > 255 {
        return Err(InvalidFileName("file name must be 1-255 bytes".into()));
    }
    if name.starts_with('/') {
        return Err(InvalidFileName(format!(
            "file name `{name}` must be relative, not absolute"
        )));
    }
    if name.contains('\0') || name.contains('\\') {
        return Err(InvalidFileName(format!(
            "file name `{name}` contains a forbidden character"
        )));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 8 {
        return Err(InvalidFileName(format!(
            "file name `{name}` is nested too deeply"
        )));
    }
    for part in parts {
        if part.is_empty() || part == "." || part == ".." {
            return Err(InvalidFileName(format!(
                "file name `{name}` must not contain empty, `.` or `..` components"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn file_names_cannot_escape_the_work_dir() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["main.py", "src/lib.rs", "Main.java", ".hidden"] {
            assert!(validate(good).is_ok(), "{good:?} must be accepted");
        }
    }
}
