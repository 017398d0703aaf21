//! The binary: parse the command line, set up logging, and call into the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mixed_docker_executor::app::App;
use mixed_docker_executor::config::{LogFormat, Settings};
use mixed_docker_executor::server::{self, ConnectionLimits};
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "Run untrusted code submissions in a sandbox, over HTTP"
)]
struct Cli {
    /// A TOML config file (settings not in it keep their defaults; MDE_* variables win).
    #[arg(long, global = true, env = "MDE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Print the OpenAPI spec (the committed copy is openapi/openapi.json).
    Openapi,
    /// Load and validate the config and runtimes file, print what would run, and exit.
    CheckConfig,
}

fn main() -> std::process::ExitCode {
    match run_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once, as one message with its causes, never a backtrace: a configuration
            // mistake is not a crash.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(": ");
                    message.push_str(&cause);
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run_main() -> anyhow::Result<()> {
    // A slot launcher (see execution/launcher.rs) is this binary started by the daemon.
    use mixed_docker_executor::execution::{LAUNCHER_ARG, STAGE_EXEC_ARG};
    match std::env::args().nth(1).as_deref() {
        Some(LAUNCHER_ARG) => mixed_docker_executor::execution::launcher_main(),
        // The helper waiting inside a prepared sandbox (see execution/stage_exec.rs).
        Some(STAGE_EXEC_ARG) => mixed_docker_executor::execution::stage_exec_main(
            std::env::args().nth(2),
            std::env::args().nth(3),
        ),
        _ => mixed_docker_executor::execution::this_binary_serves_helpers(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run());
    // Never wait on a blocking task that hangs (a read of a file that never ends): the
    // work that matters is done once `run` returns.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        println!("{}", mixed_docker_executor::api::spec_json());
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref(), std::env::vars())?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.server.log_level))
        .context("invalid log level (server.log_level or RUST_LOG)")?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match settings.server.log_format {
        LogFormat::Json => logs.json().init(),
        // Colours only for a person at a terminal, never into a file or a journal.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
    }

    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(settings).await,
        _ => serve(settings).await,
    }
}

async fn check_config(settings: Settings) -> anyhow::Result<()> {
    let set = mixed_docker_executor::runtimes::load(&settings.runtimes.file, &settings).await?;
    println!("config ok; default runtime: {}", set.default);
    for r in &set.runtimes {
        let state = match &r.availability.reason {
            None => "available".to_string(),
            Some(reason) => format!("unavailable: {reason}"),
        };
        println!(
            "  {:<10} {:<12} {:<10} {}",
            r.name,
            r.language,
            r.version.as_deref().unwrap_or("-"),
            state
        );
    }
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let addr = (settings.server.host, settings.server.port);
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    let app = App::build(settings).await?;
    app.state
        .executor
        .self_test()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = app.state.executor.info();
    if !addr.0.is_loopback() && app.state.settings.server.api_keys.is_empty() {
        tracing::warn!(
            host = %addr.0,
            "listening beyond loopback without API keys: anyone who can reach this port can run code; set server.api_keys (MDE_SERVER__API_KEYS)"
        );
    }
    if !info.isolated() {
        tracing::warn!(
            "!!! ISOLATION IS OFF: the `process` backend runs submissions as plain processes with host access. Use it for development only. !!!"
        );
    }
    let set = app.state.runtimes.snapshot();
    for r in &set.runtimes {
        match &r.availability.reason {
            None => {
                tracing::info!(runtime = %r.name, version = r.version.as_deref().unwrap_or("-"), "runtime available")
            }
            Some(reason) => tracing::warn!(runtime = %r.name, %reason, "runtime unavailable"),
        }
    }
    tracing::info!(
        backend = info.backend.as_str(),
        memory = %info.memory.describe(),
        per_slot_uid = info.per_slot_uid,
        sized_workdir = info.sized_workdir,
        tree_cpu_limit = info.tree_cpu_limit,
        slots = info.slots,
        queue = info.queue,
        "sandbox ready"
    );
    let _reloader = app.spawn_reloader();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {}:{}", addr.0, addr.1))?;
    tracing::info!(
        "listening on http://{}:{} (Swagger UI at /docs)",
        addr.0,
        addr.1
    );
    let limits = ConnectionLimits::from_settings(&app.state.settings.server);
    let executor = Arc::clone(&app.state.executor);
    server::serve(
        listener,
        app.endpoint(),
        limits,
        Arc::clone(&app.state.metrics),
        drain(executor, grace),
        ANSWER_GRACE,
    )
    .await
    .context("server error")?;
    tracing::info!("shut down");
    Ok(())
}

/// After the drain, how long answers (including "killed by shutdown" ones) have to reach
/// their clients before the connections are closed.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Resolves when the server should stop listening: on SIGTERM or SIGINT the daemon turns
/// `/ready` to 503 and refuses new submissions (503 `shutting_down` with `Retry-After`),
/// while it keeps answering; the runs in flight get `grace` to finish; then (or at a second
/// signal) whatever still runs is killed and answered as killed by the shutdown.
async fn drain(executor: Arc<mixed_docker_executor::execution::Executor>, grace: Duration) {
    let mut signals = match ShutdownSignals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            executor.kill_running();
            return;
        }
    };
    let signal = signals.next().await;
    executor.begin_drain();
    tracing::info!(
        signal,
        running = executor.running(),
        waiting = executor.waiting(),
        grace_seconds = grace.as_secs(),
        "shutdown requested; finishing in-flight executions (new submissions get 503)"
    );
    let finished = tokio::select! {
        r = tokio::time::timeout(grace, executor.wait_idle()) => r.is_ok(),
        signal = signals.next() => {
            tracing::warn!(signal, "second shutdown signal; not waiting for the grace period");
            false
        }
    };
    if !finished {
        tracing::warn!(
            running = executor.running(),
            "runs still going at the end of the shutdown grace period; killing them"
        );
        executor.kill_running();
        let _ = tokio::time::timeout(Duration::from_secs(5), executor.wait_idle()).await;
    } else {
        tracing::info!("every in-flight execution finished");
    }
}

/// SIGTERM and SIGINT, whichever comes.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
