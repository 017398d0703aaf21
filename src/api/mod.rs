//! The HTTP surface: poem-openapi operations per tag, Swagger UI, the spec, `/metrics`, and
//! the middleware that turns every error into a `{"code", "message"}` JSON body.

pub mod body_limit;
pub mod errors;
pub mod health;
mod middleware;
pub mod piston;
pub mod runtimes;
pub(crate) use middleware::{ApiKeys, presented_key};
use middleware::{
    allow_on_405, count_rejections, read_only, require_api_key, root_points_to_docs,
    with_request_id,
};
mod response_budget;
pub(crate) use response_budget::ResponseBudget;
pub mod submit;
#[cfg(test)]
mod tests;
pub mod text;
pub mod v1;

use std::sync::Arc;
use std::time::Instant;

use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route, get, handler};
use poem_openapi::{OpenApiService, Tags};

use crate::config::Settings;
use crate::execution::{ExecutionReport, ExecutionRequest, Executor};
use crate::metrics::Metrics;
use crate::runtimes::RuntimeRegistry;
use crate::runtimes::reload::Reloader;
use body_limit::BodyLimit;
use errors::{ApiError, ErrorCode, json_error, json_error_with_status};

#[derive(Tags)]
pub(crate) enum ApiTags {
    /// Run code.
    Execution,
    /// The runtimes this server offers.
    Runtimes,
    /// Liveness and readiness.
    Operations,
    /// Piston v2 compatibility: Piston's `/api/v2/runtimes` and `/api/v2/execute`, its
    /// shapes and its `{"message"}` errors, so Piston clients work unchanged.
    Piston,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    /// The API keys, hashed once at start (see `middleware::ApiKeys`).
    pub(crate) api_keys: Arc<ApiKeys>,
    /// Bytes of execution answers that may be held at once (see `response_budget.rs`).
    pub(crate) responses: response_budget::ResponseBudget,
    pub executor: Arc<Executor>,
    pub runtimes: RuntimeRegistry,
    pub reloader: Reloader,
    pub metrics: Arc<Metrics>,
}

/// Identifies one request in logs and in the `X-Request-Id` response header, and says when
/// its client has gone away (see `server.rs`; never, for requests not from a socket).
#[derive(Debug, Clone)]
pub struct RequestId {
    pub id: String,
    pub client_gone: crate::server::ClientGone,
    /// The client's address, when it came over TCP (its share of the response budget).
    pub peer: Option<std::net::IpAddr>,
    /// The answer's share of the response budget, released once it is sent.
    pub(crate) reservation: response_budget::Reservation,
}

impl AppState {
    /// Run a submission and log one line about it.
    pub(crate) async fn run(
        &self,
        request_id: &RequestId,
        request: ExecutionRequest,
    ) -> Result<ExecutionReport, ApiError> {
        let started = Instant::now();
        let runtime = request.runtime.name.clone();
        let result = self.reserve_and_execute(request_id, request).await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &result {
            Ok(report) => {
                let stage = report.final_stage();
                tracing::info!(
                    request_id = %request_id.id,
                    runtime = %runtime,
                    outcome = report.status().as_str(),
                    exit_code = stage.and_then(|s| s.exit_code),
                    signal = stage.and_then(|s| s.signal),
                    duration_ms = format_args!("{elapsed_ms:.1}"),
                    "submission finished"
                );
            }
            Err(e) => tracing::warn!(
                request_id = %request_id.id,
                runtime = %runtime,
                outcome = "rejected",
                error = %e,
                duration_ms = format_args!("{elapsed_ms:.1}"),
                "submission not run"
            ),
        }
        result.map_err(ApiError::from)
    }
}

impl AppState {
    /// Reserve the answer's worst-case size (waiting no longer than a queue place would),
    /// then execute; both waits end early when the client goes away.
    async fn reserve_and_execute(
        &self,
        request_id: &RequestId,
        request: ExecutionRequest,
    ) -> Result<ExecutionReport, crate::execution::ExecuteError> {
        let gone = &request_id.client_gone;
        use crate::execution::ExecuteError;
        if self.executor.draining() {
            return Err(ExecuteError::ShuttingDown { killed: false });
        }
        let wait = std::time::Duration::from_millis(self.settings.execution.max_queue_wait_ms);
        let bytes = response_budget::worst_case_bytes(&request);
        let reserve = self.responses.reserve(bytes, request_id.peer);
        let reserved = tokio::select! {
            r = tokio::time::timeout(wait, reserve) => r.ok().and_then(Result::ok),
            () = gone.wait() => return Err(ExecuteError::Abandoned),
        };
        let Some(reserved) = reserved else {
            self.metrics
                .http_refused(crate::metrics::HttpGuard::ResponseBudget);
            return Err(ExecuteError::Busy(crate::execution::Busy {
                running: self.executor.running(),
                waiting: self.executor.waiting(),
            }));
        };
        request_id.reservation.hold(reserved);
        self.executor.execute(request, gone.wait()).await
    }
}

/// The OpenAPI service: the single source of the spec, the routes and Swagger UI.
pub fn openapi_service() -> OpenApiService<
    (
        submit::SubmitApi,
        v1::ExecuteApi,
        runtimes::RuntimesApi,
        health::HealthApi,
        piston::PistonApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            submit::SubmitApi,
            v1::ExecuteApi,
            runtimes::RuntimesApi,
            health::HealthApi,
            piston::PistonApi,
        ),
        "mixed-docker-executor",
        env!("CARGO_PKG_VERSION"),
    )
    .summary("Run untrusted code in a sandbox")
    .description(
        "Runs code submissions in a bubblewrap sandbox under kernel-enforced limits. \
         `POST /submit_code` keeps the original service's contract; `POST /api/v1/execute` \
         is the full form. Errors are JSON `{\"code\", \"message\"}` bodies. Prometheus \
         metrics are at `GET /metrics` (outside this spec).",
    )
}

/// The spec as pretty JSON, as committed under `openapi/`.
pub fn spec_json() -> String {
    openapi_service().spec()
}

/// Every route of the daemon.
pub fn routes(state: AppState) -> impl Endpoint<Output = Response> {
    let api = openapi_service();
    let ui = api.swagger_ui();
    let spec = api.spec_endpoint();
    let server = &state.settings.server;
    let body_limit = BodyLimit::new(
        server.max_body_bytes,
        server.max_inflight_body_bytes,
        std::time::Duration::from_millis(server.body_read_timeout_ms),
        Arc::clone(&state.metrics),
    );
    let answer_grace = std::time::Duration::from_millis(server.write_timeout_ms);
    let metrics = Arc::clone(&state.metrics);
    let api_keys = Arc::clone(&state.api_keys);
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", ui.around(read_only))
        .at("/metrics", get(metrics_endpoint))
        .nest("/", api)
        .with(body_limit)
        .catch_all_error(|err: poem::Error| async move {
            let status = err.status();
            json_error_with_status(
                status,
                ErrorCode::for_status(status),
                errors::describe_error(&err),
            )
        })
        .around(allow_on_405)
        .around(root_points_to_docs)
        .around(move |ep, req| require_api_key(ep, req, Arc::clone(&api_keys)))
        .around(move |ep, req| count_rejections(ep, req, Arc::clone(&metrics)))
        .around(move |ep, req| with_request_id(ep, req, answer_grace))
        .data(state)
}

#[handler]
async fn metrics_endpoint(state: poem::web::Data<&AppState>) -> Response {
    match state.metrics.render(crate::metrics::Load {
        running: state.executor.running(),
        waiting: state.executor.waiting(),
        out_of_service: state.executor.slots_out_of_service(),
    }) {
        Ok(text) => text
            .with_content_type("text/plain; version=0.0.4; charset=utf-8")
            .into_response(),
        Err(e) => json_error(ErrorCode::InternalError, e.to_string()),
    }
}
