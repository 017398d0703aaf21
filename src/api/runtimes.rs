//! `GET /api/v1/runtimes`: every runtime of runtimes.toml, its names, version, limits and
//! whether it can run here.

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::errors::ErrorJson;
use super::{ApiTags, AppState};
use crate::execution::Limits;

/// A configured runtime.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct RuntimeInfo {
    /// The name requests use.
    pub name: String,
    /// Other names that select this runtime.
    pub aliases: Vec<String>,
    /// The language (`python`, `javascript`, `c`...).
    pub language: String,
    /// Detected from the interpreter or declared in runtimes.toml.
    pub version: Option<String>,
    /// True for the runtime used when a request names none.
    pub default: bool,
    /// True when the runtime has a compile stage.
    pub compiled: bool,
    /// True when idle slots keep this runtime's interpreter started, waiting for the next
    /// program (`warm` in runtimes.toml): its submissions skip the interpreter's start-up.
    pub warm: bool,
    /// How this runtime's runs start here: `zygote` (forked, each a fresh sandbox, from an
    /// interpreter started once per slot: `zygote` in runtimes.toml, where the host allows
    /// it; `/health` says why not), `warm` (an interpreter started ahead per run) or `cold`.
    pub start: RunStart,
    /// The name a single submitted file is saved as.
    pub file_name: String,
    /// Whether the runtime's commands are installed here.
    pub available: bool,
    /// Why the runtime is unavailable.
    pub unavailable_reason: Option<String>,
    /// The sandbox backend it runs under.
    pub backend: String,
    /// Defaults of the run stage.
    pub limits: Limits,
    /// The most a request may ask for.
    pub max_limits: Limits,
    /// Limits of the compile stage, for compiled runtimes.
    pub compile_limits: Option<Limits>,
    /// The most a request's `compile_limits` may ask for, for compiled runtimes.
    pub max_compile_limits: Option<Limits>,
}

/// How a runtime's run stages start.
#[derive(Debug, Clone, Copy, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum RunStart {
    Zygote,
    Warm,
    Cold,
}

#[derive(ApiResponse)]
pub enum RuntimesResponse {
    /// Every configured runtime.
    #[oai(status = 200)]
    Ok(Json<Vec<RuntimeInfo>>),
    /// A valid API key is required (only when `server.api_keys` is set).
    #[oai(status = 401)]
    Unauthorized(ErrorJson),
}

pub struct RuntimesApi;

#[OpenApi(prefix_path = "/api/v1")]
impl RuntimesApi {
    /// List runtimes
    ///
    /// Every runtime in runtimes.toml with its names, version, effective limits and
    /// whether it can run on this server (and why not).
    #[oai(path = "/runtimes", method = "get", tag = "ApiTags::Runtimes")]
    async fn runtimes(&self, state: poem::web::Data<&AppState>) -> RuntimesResponse {
        let set = state.runtimes.snapshot();
        RuntimesResponse::Ok(Json(
            set.runtimes
                .iter()
                .map(|r| RuntimeInfo {
                    name: r.name.clone(),
                    aliases: r.aliases.clone(),
                    language: r.language.clone(),
                    version: r.version.clone(),
                    default: r.name == set.default,
                    compiled: r.compile.is_some(),
                    warm: r.warm.is_some(),
                    start: if state.executor.zygote_serves(r) {
                        RunStart::Zygote
                    } else if r.warm.is_some() {
                        RunStart::Warm
                    } else {
                        RunStart::Cold
                    },
                    file_name: r.file_name.clone(),
                    available: r.availability.available,
                    unavailable_reason: r.availability.reason.clone(),
                    backend: r.backend.as_str().into(),
                    limits: r.limits,
                    max_limits: r.max_limits,
                    compile_limits: r.compile.as_ref().map(|_| r.compile_limits),
                    max_compile_limits: r.compile.as_ref().map(|_| r.max_compile_limits),
                })
                .collect(),
        ))
    }
}
