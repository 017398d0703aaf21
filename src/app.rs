//! Wiring: settings + runtimes + executor + metrics into the HTTP application. Used by the
//! binary and by the tests (so tests drive the same application the daemon serves).

use std::sync::Arc;

use crate::api::{self, AppState};
use crate::config::{ConfigError, Settings};
use crate::execution::{ExecutionObserver, Executor, ExecutorOptions};
use crate::metrics::Metrics;
use crate::runtimes::reload::{ReloadObserver, Reloader};
use crate::runtimes::{self, RuntimeRegistry, RuntimesError};

/// Why the daemon cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtimes(#[from] RuntimesError),
    #[error("sandbox: {0}")]
    Sandbox(#[from] crate::execution::ExecutorError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("host: {0}")]
    Host(#[from] crate::server::OpenFilesError),
}

/// The executor's part of the settings.
fn executor_options(settings: &Settings) -> ExecutorOptions {
    ExecutorOptions {
        slots: settings.slots(),
        queue_size: settings.execution.queue_size,
        max_queue_wait: std::time::Duration::from_millis(settings.execution.max_queue_wait_ms),
        work_root: settings.execution.work_root.clone(),
        workdir_bytes: settings.limits.workdir_bytes,
        // Sandboxes are set up before they know their stage: under the ceiling of any stage,
        // run or compile (each stage's helper lowers them to its own limits).
        max_limits: settings.max_limits.max(&settings.max_compile_limits),
        sandbox: settings.sandbox.clone(),
        compile_cache_bytes: settings
            .compile_cache
            .enabled
            .then_some(settings.compile_cache.max_bytes),
    }
}

/// Descriptors the daemon keeps for itself beyond connections (slots' pipes, cgroup files,
/// the runtimes file, logs).
const OWN_DESCRIPTORS: u64 = 256;

/// What a reload of `runtimes.toml` tells: the metrics, and the executor (whose compile
/// cache drops the outputs of runtimes the new file defines differently).
struct ReloadHooks {
    metrics: Arc<Metrics>,
    executor: Arc<Executor>,
}

impl ReloadObserver for ReloadHooks {
    fn reloaded(&self, result: Result<&runtimes::RuntimeSet, &str>) {
        if let Ok(set) = result {
            self.executor.runtimes_changed(&set.runtimes);
        }
        self.metrics.reloaded(result);
    }
}

pub struct App {
    pub state: AppState,
}

impl App {
    /// Load runtimes, prepare the executor and metrics. Does not bind a socket.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let settings = Arc::new(settings);
        // Every connection and every run's descriptors come out of one process budget.
        let needed = settings.max_limits.open_files
            + settings.server.max_connections as u64
            + OWN_DESCRIPTORS;
        crate::server::raise_open_files(
            needed,
            &format!(
                "max_limits.open_files ({}), server.max_connections ({}) and the daemon's own ({OWN_DESCRIPTORS})",
                settings.max_limits.open_files, settings.server.max_connections
            ),
        )?;
        let metrics = Metrics::new(settings.slots(), settings.execution.queue_size)?;
        let set = runtimes::load(&settings.runtimes.file, &settings).await?;
        metrics.set_runtimes(&set);
        let registry = RuntimeRegistry::new(set);
        let observer: Arc<dyn ExecutionObserver> = metrics.clone();
        let executor = Executor::new(executor_options(&settings), observer)?;
        let executor = Arc::new(executor);
        let reload_observer: Arc<dyn ReloadObserver> = Arc::new(ReloadHooks {
            metrics: Arc::clone(&metrics),
            executor: Arc::clone(&executor),
        });
        let reloader = Reloader::new(Arc::clone(&settings), registry.clone(), reload_observer);
        let default_runtime = registry.snapshot().resolve(None, None).ok();
        executor.prepare_idle_slots(default_runtime).await;
        Ok(App {
            state: AppState {
                api_keys: Arc::new(api::ApiKeys::new(&settings.server.api_keys)),
                responses: api::ResponseBudget::new(settings.server.max_inflight_response_bytes),
                settings,
                executor,
                runtimes: registry,
                reloader,
                metrics,
            },
        })
    }

    /// Every route, ready to serve or to test with `poem::test::TestClient`.
    pub fn endpoint(&self) -> impl poem::Endpoint<Output = poem::Response> + use<> {
        api::routes(self.state.clone())
    }

    /// Start the runtimes.toml watcher / SIGHUP listener.
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        self.state.reloader.clone().spawn()
    }
}
