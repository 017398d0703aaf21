//! The HTTP surface: poem-openapi operations per tag, Swagger UI, the spec, `/metrics`, and
//! the middleware that turns every error into a `{"code", "message"}` JSON body.

pub mod body_limit;
pub mod errors;
pub mod health;
pub mod piston;
mod response_budget;
pub(crate) use response_budget::ResponseBudget;
pub mod submit;
#[cfg(test)]
mod tests;
pub mod text;
pub mod v1;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler};
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
        v1::RuntimesApi,
        health::HealthApi,
        piston::PistonApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            submit::SubmitApi,
            v1::ExecuteApi,
            v1::RuntimesApi,
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
    let api_keys = Arc::new(ApiKeys::new(&state.settings.server.api_keys));
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

/// `GET /` points to the docs (a browser lands on Swagger UI); the spec is nested at `/`,
/// so this is decided before routing.
async fn root_points_to_docs<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    if req.uri().path() == "/"
        && matches!(
            *req.method(),
            poem::http::Method::GET | poem::http::Method::HEAD
        )
    {
        return Ok(poem::web::Redirect::see_other("/docs").into_response());
    }
    ep.call(req).await.map(IntoResponse::into_response)
}

/// A 405 names the methods its path does answer (RFC 9110), as the spec lists them.
async fn allow_on_405<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let path = req.uri().path().to_string();
    let mut resp = ep.call(req).await?.into_response();
    if resp.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED
        && !resp.headers().contains_key("allow")
    {
        if let Some(value) = allowed_methods(&path).and_then(|m| m.parse().ok()) {
            resp.headers_mut().insert(poem::http::header::ALLOW, value);
        }
    }
    Ok(resp)
}

/// The methods of `path` in the spec (`GET, HEAD` for a GET), read from it once.
fn allowed_methods(path: &str) -> Option<String> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<String, String>> =
        std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let spec: serde_json::Value = serde_json::from_str(&spec_json()).unwrap_or_default();
        let mut table = std::collections::HashMap::new();
        table.insert("/metrics".to_string(), "GET, HEAD".to_string());
        let paths = spec.get("paths").and_then(serde_json::Value::as_object);
        for (path, ops) in paths.into_iter().flatten() {
            let mut methods: Vec<String> = ops
                .as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(|m| m.to_ascii_uppercase())
                .collect();
            if methods.iter().any(|m| m == "GET") {
                methods.push("HEAD".into());
            }
            table.insert(path.clone(), methods.join(", "));
        }
        table
    });
    table.get(path).cloned()
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

/// The configured API keys, compared so that timing tells nothing about them: the key
/// given is hashed with a secret per-process SipHash key, and its digest is compared with
/// every key's digest (time depends only on the given key's length, never on where or
/// whether it differs, nor on the keys' lengths); the bytes are compared only on a match.
struct ApiKeys {
    hasher: std::hash::RandomState,
    keys: Vec<(u64, String)>,
}

impl ApiKeys {
    fn new(keys: &[String]) -> ApiKeys {
        let hasher = std::hash::RandomState::new();
        let keys = keys
            .iter()
            .map(|k| {
                (
                    std::hash::BuildHasher::hash_one(&hasher, k.as_bytes()),
                    k.clone(),
                )
            })
            .collect();
        ApiKeys { hasher, keys }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn accepts(&self, given: &str) -> bool {
        let digest = std::hash::BuildHasher::hash_one(&self.hasher, given.as_bytes());
        let matched = self.keys.iter().fold(None, |found, (d, key)| {
            found.or((*d == digest).then_some(key))
        });
        matched.is_some_and(|key| key.as_bytes() == given.as_bytes())
    }
}

/// The key a request presents: `Authorization: Bearer KEY` (the scheme in any case, as
/// RFC 7235 says) or `X-API-Key: KEY`.
fn presented_key(req: &Request) -> &str {
    let bearer = req.header("authorization").and_then(|v| {
        let (scheme, key) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(key)
    });
    bearer
        .or_else(|| req.header("x-api-key"))
        .map(str::trim)
        .unwrap_or_default()
}

/// With `server.api_keys` set, code-running endpoints need a key; others stay open.
async fn require_api_key<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    keys: Arc<ApiKeys>,
) -> poem::Result<Response> {
    let path = req.uri().path();
    let protected = path == "/submit_code" || path.starts_with("/api/v1/");
    if keys.is_empty() || !protected {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    if keys.accepts(presented_key(&req)) {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let mut resp = json_error(
        ErrorCode::Unauthorized,
        "a valid API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
    );
    resp.headers_mut().insert(
        poem::http::header::WWW_AUTHENTICATE,
        poem::http::HeaderValue::from_static("Bearer"),
    );
    Ok(resp)
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

async fn with_request_id<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    answer_grace: std::time::Duration,
) -> poem::Result<Response> {
    let id = req
        .header("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
            format!("{:08x}-{n:06x}", std::process::id())
        });
    let client_gone = req
        .extensions()
        .get::<crate::server::ClientGone>()
        .cloned()
        .unwrap_or_default();
    let reservation = response_budget::Reservation::default();
    let peer = req.remote_addr().as_socket_addr().map(|a| a.ip());
    req.extensions_mut().insert(RequestId {
        id: id.clone(),
        client_gone,
        peer,
        reservation: reservation.clone(),
    });
    let mut resp = ep.call(req).await?.into_response();
    let body = reservation.attach(resp.take_body(), answer_grace).await;
    resp.set_body(body);
    if let Ok(value) = id.parse() {
        resp.headers_mut().insert("x-request-id", value);
    }
    Ok(resp)
}

/// Swagger UI is static: only GET and HEAD (anything else is a JSON 405).
async fn read_only<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    if matches!(
        *req.method(),
        poem::http::Method::GET | poem::http::Method::HEAD
    ) {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let mut resp = json_error(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on the docs; use GET", req.method()),
    );
    resp.headers_mut().insert(
        poem::http::header::ALLOW,
        poem::http::HeaderValue::from_static("GET, HEAD"),
    );
    Ok(resp)
}

/// Count every submission turned away before execution (a 4xx answer), by the error code
/// its builder left in the response's extensions (see `errors::ErrorJson`).
async fn count_rejections<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    metrics: Arc<Metrics>,
) -> poem::Result<Response> {
    let is_submission = req.method() == poem::http::Method::POST
        && matches!(req.uri().path(), "/submit_code" | "/api/v1/execute");
    let resp = ep.call(req).await?.into_response();
    if is_submission && resp.status().is_client_error() {
        // Every error answer is built with its code (one without would count as an
        // unreadable body did: `bad_request`).
        let code = resp
            .extensions()
            .get::<ErrorCode>()
            .copied()
            .unwrap_or(ErrorCode::BadRequest);
        metrics.rejected(code);
    }
    Ok(resp)
}
