//! Hot reload of `runtimes.toml`: on SIGHUP, and by polling the file when `watch` is on.
//!
//! A reload builds a whole new [`RuntimeSet`] and swaps it in; executions already running keep
//! the set they started with. An invalid file is logged and counted, and the old set stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{RuntimeRegistry, RuntimeSet};
use crate::config::Settings;

/// The outcome of the latest reload, for `/ready` and metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// A summary of the latest reload's error, if that one failed: which entry and key or
    /// which line, without the path or the file's content (the log has the detail).
    pub last_error: Option<String>,
}

/// Told about every reload attempt (metrics hang off this).
pub trait ReloadObserver: Send + Sync {
    fn reloaded(&self, _result: Result<&RuntimeSet, &str>) {}
}

#[derive(Clone)]
pub struct Reloader {
    path: PathBuf,
    settings: Arc<Settings>,
    registry: RuntimeRegistry,
    status: Arc<Mutex<ReloadStatus>>,
    observer: Arc<dyn ReloadObserver>,
}

impl Reloader {
    pub fn new(
        settings: Arc<Settings>,
        registry: RuntimeRegistry,
        observer: Arc<dyn ReloadObserver>,
    ) -> Self {
        Reloader {
            path: settings.runtimes.file.clone(),
            settings,
            registry,
            status: Arc::new(Mutex::new(ReloadStatus::default())),
            observer,
        }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Load the file again; on success swap it in, on failure keep the old set.
    pub async fn reload(&self) -> Result<(), super::RuntimesError> {
        let result = super::load(&self.path, &self.settings).await;
        let mut status = match self.status.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match result {
            Ok(set) => {
                tracing::info!(
                    file = %self.path.display(),
                    runtimes = set.runtimes.len(),
                    "runtimes reloaded"
                );
                // Say which runtimes a reload made unavailable, and why (a command that
                // fails its probe, a version command that prints nothing...).
                for r in &set.runtimes {
                    if let Some(reason) = &r.availability.reason {
                        tracing::warn!(runtime = %r.name, %reason, "runtime unavailable");
                    }
                }
                self.observer.reloaded(Ok(&set));
                self.registry.replace(set);
                status.reloads_ok += 1;
                status.last_error = None;
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "runtimes reload failed; keeping the previous definitions");
                self.observer.reloaded(Err(&message));
                status.reloads_failed += 1;
                status.last_error = Some(e.summary());
                Err(e)
            }
        }
    }

    /// Reload on SIGHUP and, when `watch` is set, whenever the file's mtime or size changes.
    /// Runs until the task is dropped.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut hangup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file watch only");
                    None
                }
            };
            let interval = Duration::from_millis(self.settings.runtimes.watch_interval_ms);
            let watch = self.settings.runtimes.watch;
            let mut last_seen = fingerprint(&self.path);
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = hup => {
                        tracing::info!("SIGHUP received; reloading runtimes");
                        last_seen = fingerprint(&self.path);
                        let _ = self.reload().await;
                    }
                    _ = tokio::time::sleep(interval), if watch => {
                        let now = fingerprint(&self.path);
                        if now != last_seen {
                            last_seen = now;
                            let _ = self.reload().await;
                        }
                    }
                }
            }
        })
    }
}

fn fingerprint(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
