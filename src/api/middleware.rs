//! The middleware around every route: the API key, request ids (and the answer's share of
//! the response budget), the rejection counter, `Allow` on 405, `GET /` to the docs, and
//! read-only Swagger UI.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use poem::{Endpoint, IntoResponse, Request, Response};

use super::errors::json_error;
use super::{RequestId, response_budget, spec_json};
use crate::error_code::ErrorCode;
use crate::metrics::Metrics;

/// `GET /` points to the docs (a browser lands on Swagger UI); the spec is nested at `/`,
/// so this is decided before routing.
pub(super) async fn root_points_to_docs<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
) -> poem::Result<Response> {
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
pub(super) async fn allow_on_405<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let path = req.uri().path().to_string();
    let mut resp = ep.call(req).await?.into_response();
    if resp.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED
        && !resp.headers().contains_key("allow")
        && let Some(value) = allowed_methods(&path).and_then(|m| m.parse().ok())
    {
        resp.headers_mut().insert(poem::http::header::ALLOW, value);
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

/// The configured API keys, compared so that timing tells nothing about them: the key
/// given is hashed with a secret per-process SipHash key, and its digest is compared with
/// every key's digest (time depends only on the given key's length, never on where or
/// whether it differs, nor on the keys' lengths); the bytes are compared only on a match.
pub(crate) struct ApiKeys {
    hasher: std::hash::RandomState,
    keys: Vec<(u64, String)>,
}

impl ApiKeys {
    pub(crate) fn new(keys: &[String]) -> ApiKeys {
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

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn accepts(&self, given: &str) -> bool {
        let digest = std::hash::BuildHasher::hash_one(&self.hasher, given.as_bytes());
        let matched = self.keys.iter().fold(None, |found, (d, key)| {
            found.or((*d == digest).then_some(key))
        });
        matched.is_some_and(|key| key.as_bytes() == given.as_bytes())
    }
}

/// The key a request presents: `Authorization: Bearer KEY` (the scheme in any case, as
/// RFC 7235 says) or `X-API-Key: KEY`.
pub(crate) fn presented_key(req: &Request) -> &str {
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
pub(super) async fn require_api_key<E: Endpoint>(
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

pub(super) async fn with_request_id<E: Endpoint>(
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
pub(super) async fn read_only<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
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
pub(super) async fn count_rejections<E: Endpoint>(
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
