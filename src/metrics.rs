//! Prometheus metrics on the daemon's own registry. Built once; the core reaches them only
//! through the [`ExecutionObserver`] and [`ReloadObserver`] hooks. Label values come from
//! fixed lists or from `runtimes.toml`, never from request input, so cardinality is bounded.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::error_code::ErrorCode;
use crate::execution::{
    CacheEvent, ExecutionObserver, ExecutionReport, StageStatus, StartKind, ZygoteRestart,
};
use crate::runtimes::RuntimeSet;
use crate::runtimes::reload::ReloadObserver;

/// The HTTP guards that turn a client away before any request is read (see `server.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpGuard {
    /// `server.max_connections` were open and none was idle.
    Connections,
    /// An idle connection was closed to make room for a new one at the cap.
    IdleEvicted,
    /// Accepting failed (EMFILE and the like); the loop backed off.
    AcceptError,
    /// The in-flight request-body budget stayed full (`server.max_inflight_body_bytes`).
    BodyBudget,
    /// A request body did not arrive within `server.body_read_timeout_ms`.
    BodyTimeout,
    /// The answers held in memory filled `server.max_inflight_response_bytes`.
    ResponseBudget,
}

impl HttpGuard {
    pub const ALL: [HttpGuard; 6] = [
        HttpGuard::ResponseBudget,
        HttpGuard::Connections,
        HttpGuard::IdleEvicted,
        HttpGuard::AcceptError,
        HttpGuard::BodyBudget,
        HttpGuard::BodyTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpGuard::Connections => "connections",
            HttpGuard::IdleEvicted => "idle_evicted",
            HttpGuard::AcceptError => "accept_error",
            HttpGuard::BodyBudget => "body_budget",
            HttpGuard::BodyTimeout => "body_timeout",
            HttpGuard::ResponseBudget => "response_budget",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    connections_open: IntGauge,
    http_refused: IntCounterVec,
    executions: IntCounterVec,
    failures: IntCounterVec,
    run_starts: IntCounterVec,
    zygote_restarts: IntCounterVec,
    duration: HistogramVec,
    queue_wait: Histogram,
    in_flight: IntGauge,
    queue_depth: IntGauge,
    slots_out_of_service: IntGauge,
    output_bytes: HistogramVec,
    peak_memory: HistogramVec,
    rejected: IntCounterVec,
    runtime_available: GaugeVec,
    reloads: IntCounterVec,
    last_reload_ok: Gauge,
    compiles: IntCounterVec,
    cache_events: IntCounterVec,
    cache_bytes: IntGauge,
    cache_entries: IntGauge,
}

fn exponential(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    pub fn new(slots: usize, queue: usize) -> Result<Arc<Metrics>, prometheus::Error> {
        let registry = Registry::new_custom(None, None)?;
        let connections_open =
            IntGauge::new("mde_http_connections_open", "HTTP connections open now")?;
        let http_refused = IntCounterVec::new(
            Opts::new(
                "mde_http_refused_total",
                "Connections or requests turned away by an HTTP guard, by guard",
            ),
            &["guard"],
        )?;
        for guard in HttpGuard::ALL {
            http_refused.with_label_values(&[guard.as_str()]);
        }
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(http_refused.clone()))?;
        let executions = IntCounterVec::new(
            Opts::new(
                "mde_executions_total",
                "Executions finished, by runtime and outcome",
            ),
            &["runtime", "outcome"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "mde_execution_failures_total",
                "Executions that did not end ok, by runtime and reason",
            ),
            &["runtime", "reason"],
        )?;
        let run_starts = IntCounterVec::new(
            Opts::new(
                "mde_run_starts_total",
                "Run stages by how their process started: forked from a zygote, handed to a \
                 warm interpreter, or started cold",
            ),
            &["runtime", "how"],
        )?;
        let zygote_restarts = IntCounterVec::new(
            Opts::new(
                "mde_zygote_restarts_total",
                "Zygotes (fork servers) replaced, by runtime and reason",
            ),
            &["runtime", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mde_execution_duration_seconds",
                "Time from slot acquired to result, all stages",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["runtime"],
        )?;
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "mde_queue_wait_seconds",
                "Time a submission waited for a free slot",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )?;
        let in_flight = IntGauge::new("mde_executions_in_flight", "Executions running now")?;
        let queue_depth = IntGauge::new("mde_queue_depth", "Submissions waiting for a slot")?;
        let slots_out_of_service = IntGauge::new(
            "mde_slots_out_of_service",
            "Slots taken out of service because they could not be cleaned after a run",
        )?;
        let capacity = IntGauge::new("mde_capacity_slots", "Executions that may run at once")?;
        let queue_capacity =
            IntGauge::new("mde_queue_capacity", "Submissions that may wait for a slot")?;
        let output_bytes = HistogramVec::new(
            HistogramOpts::new(
                "mde_execution_output_bytes",
                "Bytes of stdout plus stderr kept per execution",
            )
            .buckets(exponential(64.0, 4.0, 10)),
            &["runtime"],
        )?;
        let peak_memory = HistogramVec::new(
            HistogramOpts::new(
                "mde_execution_peak_memory_bytes",
                "Peak memory of an execution, where measured",
            )
            .buckets(exponential(1024.0 * 1024.0, 2.0, 12)),
            &["runtime"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "mde_requests_rejected_total",
                "Requests turned away before any code ran, by reason",
            ),
            &["reason"],
        )?;
        let runtime_available = GaugeVec::new(
            Opts::new(
                "mde_runtime_available",
                "1 when a configured runtime can run here, else 0",
            ),
            &["runtime"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "mde_runtimes_reloads_total",
                "Reloads of runtimes.toml, by result",
            ),
            &["result"],
        )?;
        let last_reload_ok = Gauge::new(
            "mde_runtimes_last_reload_success",
            "1 when the latest runtimes.toml (re)load succeeded, else 0",
        )?;
        let build_info = GaugeVec::new(
            Opts::new(
                "mde_build_info",
                "Always 1; labelled with the daemon's version",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        capacity.set(slots as i64);
        queue_capacity.set(queue as i64);
        last_reload_ok.set(1.0);
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        for reason in ErrorCode::REJECT_REASONS {
            rejected.with_label_values(&[reason.as_str()]);
        }

        registry.register(Box::new(executions.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(run_starts.clone()))?;
        registry.register(Box::new(zygote_restarts.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(slots_out_of_service.clone()))?;
        registry.register(Box::new(capacity))?;
        registry.register(Box::new(queue_capacity))?;
        registry.register(Box::new(output_bytes.clone()))?;
        registry.register(Box::new(peak_memory.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(runtime_available.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_reload_ok.clone()))?;
        registry.register(Box::new(build_info))?;
        let compiles = IntCounterVec::new(
            Opts::new(
                "mde_compiles_total",
                "Compile stages run (not those the compile cache answered), by runtime and outcome",
            ),
            &["runtime", "outcome"],
        )?;
        let cache_events = IntCounterVec::new(
            Opts::new(
                "mde_compile_cache_events_total",
                "Compile cache lookups and evictions, by event (hit, miss, evicted)",
            ),
            &["event"],
        )?;
        for event in ["hit", "miss", "evicted"] {
            cache_events.with_label_values(&[event]);
        }
        let cache_bytes = IntGauge::new(
            "mde_compile_cache_bytes",
            "Bytes of compile outputs the compile cache holds",
        )?;
        let cache_entries = IntGauge::new(
            "mde_compile_cache_entries",
            "Compile outputs the compile cache holds",
        )?;
        registry.register(Box::new(compiles.clone()))?;
        registry.register(Box::new(cache_events.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Arc::new(Metrics {
            registry,
            connections_open,
            http_refused,
            executions,
            failures,
            run_starts,
            zygote_restarts,
            duration,
            queue_wait,
            in_flight,
            queue_depth,
            slots_out_of_service,
            output_bytes,
            peak_memory,
            rejected,
            runtime_available,
            reloads,
            last_reload_ok,
            compiles,
            cache_events,
            cache_bytes,
            cache_entries,
        }))
    }

    /// Publish availability for the current runtime set and create every runtime's
    /// outcome series at 0, so `increase()` sees the first event after a start.
    pub fn set_runtimes(&self, set: &RuntimeSet) {
        self.runtime_available.reset();
        for runtime in &set.runtimes {
            let available = if runtime.availability.available {
                1.0
            } else {
                0.0
            };
            self.runtime_available
                .with_label_values(&[runtime.name.as_str()])
                .set(available);
            // Every series exists from start-up at 0, so a dashboard's failure panel shows
            // 0 rather than "No data" until the first failure.
            for how in StartKind::ALL {
                self.run_starts
                    .with_label_values(&[runtime.name.as_str(), how.as_str()]);
            }
            if runtime.zygote {
                for reason in ZygoteRestart::ALL {
                    self.zygote_restarts
                        .with_label_values(&[runtime.name.as_str(), reason.as_str()]);
                }
            }
            if runtime.compile.is_some() {
                for status in [StageStatus::Ok, StageStatus::CompileError] {
                    self.compiles
                        .with_label_values(&[runtime.name.as_str(), status.as_str()]);
                }
            }
            for status in StageStatus::ALL {
                self.executions
                    .with_label_values(&[runtime.name.as_str(), status.as_str()]);
                if status != StageStatus::Ok {
                    self.failures
                        .with_label_values(&[runtime.name.as_str(), status.as_str()]);
                }
            }
        }
    }

    /// A submission turned away before any code ran, counted under its code's group.
    pub fn rejected(&self, code: ErrorCode) {
        let reason = code.reject_reason();
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// The text exposition of every metric. The gauges of running and waiting executions
    /// are read from the executor at scrape time, so they can never drift.
    pub fn render(&self, load: Load) -> Result<String, prometheus::Error> {
        self.in_flight.set(load.running as i64);
        self.queue_depth.set(load.waiting as i64);
        self.slots_out_of_service.set(load.out_of_service as i64);
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        // The text format is UTF-8 by construction.
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

impl Metrics {
    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub fn http_refused(&self, guard: HttpGuard) {
        self.http_refused.with_label_values(&[guard.as_str()]).inc();
    }
}

/// The executor's load at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    pub out_of_service: usize,
}

impl ExecutionObserver for Metrics {
    fn admitted(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
    }

    fn compiled(&self, runtime: &str, status: StageStatus) {
        self.compiles
            .with_label_values(&[runtime, status.as_str()])
            .inc();
    }

    fn compile_cache(&self, event: CacheEvent) {
        let (label, n) = match event {
            CacheEvent::Hit => ("hit", 1),
            CacheEvent::Miss => ("miss", 1),
            CacheEvent::Evicted(n) => ("evicted", n),
        };
        self.cache_events.with_label_values(&[label]).inc_by(n);
    }

    fn compile_cache_size(&self, bytes: u64, entries: usize) {
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    fn finished(&self, runtime: &str, report: &ExecutionReport, elapsed: Duration) {
        let status = report.status();
        self.executions
            .with_label_values(&[runtime, status.as_str()])
            .inc();
        if status != StageStatus::Ok {
            self.failures
                .with_label_values(&[runtime, status.as_str()])
                .inc();
        }
        self.duration
            .with_label_values(&[runtime])
            .observe(elapsed.as_secs_f64());
        self.output_bytes
            .with_label_values(&[runtime])
            .observe(report.output_bytes() as f64);
        if let Some(peak) = report.peak_memory_bytes() {
            self.peak_memory
                .with_label_values(&[runtime])
                .observe(peak as f64);
        }
    }

    fn run_started(&self, runtime: &str, how: StartKind) {
        self.run_starts
            .with_label_values(&[runtime, how.as_str()])
            .inc();
    }

    fn zygote_restarted(&self, runtime: &str, reason: ZygoteRestart) {
        self.zygote_restarts
            .with_label_values(&[runtime, reason.as_str()])
            .inc();
    }
}

impl ReloadObserver for Metrics {
    fn reloaded(&self, result: Result<&RuntimeSet, &str>) {
        match result {
            Ok(set) => {
                self.reloads.with_label_values(&["success"]).inc();
                self.last_reload_ok.set(1.0);
                self.set_runtimes(set);
            }
            Err(_) => {
                self.reloads.with_label_values(&["failure"]).inc();
                self.last_reload_ok.set(0.0);
            }
        }
    }
}
