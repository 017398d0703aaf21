//! Reading a config file that an operator (or a hostile edit) controls, safely.

use std::path::Path;

/// The most a runtimes file may hold.
const MAX_RUNTIMES_FILE_BYTES: u64 = 1024 * 1024;
/// How long reading it may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read a config file that an operator (or a hostile edit) controls: a regular file only
/// (a FIFO would block the reader forever, and with it shutdown), opened without blocking,
/// at most [`MAX_RUNTIMES_FILE_BYTES`], within [`READ_TIMEOUT`]. Symlinks are followed
/// (Kubernetes ConfigMaps are symlinks).
pub(super) async fn read_config_file(path: &Path) -> std::io::Result<String> {
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
        // One byte more than allowed: a file that grew since `metadata` is refused, not cut.
        file.take(MAX_RUNTIMES_FILE_BYTES + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > MAX_RUNTIMES_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_RUNTIMES_FILE_BYTES} bytes"),
            ));
        }
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
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
