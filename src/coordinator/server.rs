//! The OpenAI-compatible HTTP API (`tp-coordinator serve`).
//!
//! The server listens at once and loads the model behind it: `/health` answers 503 until every
//! worker holds its shard, and so do generation requests. Requests then go to the batching
//! engine (`engine.rs`), which runs up to `--parallel` of them in each forward pass; beyond
//! that they wait in a bounded queue (a full queue answers 503). `/metrics` reports requests,
//! errors, tokens, queue depth and latency histograms in Prometheus text format.
//!
//! Request bodies are parsed by hand from JSON values, so that every malformed request gets an
//! OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) and a 4xx code.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use crate::coordinator::engine::{self, EngineOptions, Job, JobEvent, SlotAction, SlotJob, Work};
use crate::coordinator::metrics::{ERRORS_4XX, ERRORS_5XX, Metrics};
use crate::coordinator::sampler::SamplingParams;
use crate::coordinator::sequence::{Sampled, SequenceSpec, Stop};
use crate::coordinator::session::{Model, Session};
use crate::model::chat::ChatMessage;
use crate::model::harmony::{ChannelSplit, Split};

/// What a request may ask for at most.
pub use crate::limits::{MAX_CHOICES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS};

pub struct ServerOptions {
    pub listen: SocketAddr,
    /// The id `/v1/models` reports and requests must name (or leave out).
    pub model_id: String,
    /// Requests allowed to wait for a sequence slot; more get 503.
    pub queue: usize,
    /// Prompt tokens per forward pass while other sequences generate.
    pub chunk: usize,
    /// Reuse a slot's KV cache for a prompt that starts with what it holds.
    pub prefix_cache: bool,
    /// The key every request but `/health` must carry (`Authorization: Bearer KEY`).
    pub api_key: Option<crate::auth::Token>,
    /// HTTPS instead of HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// What requests need once the model is loaded.
struct Ready {
    model: Arc<Model>,
    max_context: usize,
    slots: usize,
    jobs: mpsc::UnboundedSender<Work>,
    /// Which workers answer, and whether the cluster must re-form (`/health`).
    health: Arc<crate::coordinator::cluster::Health>,
}

struct AppState {
    model_id: String,
    queue: usize,
    api_key: Option<crate::auth::Token>,
    /// None while loading and after shutdown began.
    ready: RwLock<Option<Ready>>,
    metrics: Arc<Metrics>,
}

/// An OpenAI-style error response.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn unavailable(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            ERRORS_5XX.fetch_add(1, Ordering::Relaxed);
        } else {
            ERRORS_4XX.fetch_add(1, Ordering::Relaxed);
        }
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Listens on `options.listen` at once, serves 503 while `load` runs, then serves the model
/// until Ctrl-C or SIGTERM. Returns the session (its cluster is shut down by the caller), or
/// the load's error.
pub async fn serve(
    options: ServerOptions,
    load: impl Future<Output = anyhow::Result<Session>>,
) -> anyhow::Result<Session> {
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        model_id: options.model_id,
        queue: options.queue,
        api_key: options.api_key,
        ready: RwLock::new(None),
        metrics: metrics.clone(),
    });
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    let address = listener.local_addr()?;
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%address, scheme, "serving the OpenAI API");
    eprintln!(
        "serving on {scheme}://{address}/v1{} (Ctrl-C stops; /health is ready once the model is loaded)",
        if state.api_key.is_some() {
            " with an API key"
        } else {
            ""
        }
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = async move {
        let mut stop_rx = stop_rx;
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let server = match options.tls {
        Some(tls) => spawn_server(
            crate::coordinator::api_access::TlsListener::new(listener, tls)?,
            app,
            stopped,
        ),
        None => spawn_server(listener, app, stopped),
    };
    let shutdown_signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::pin!(shutdown_signal);
    let session = tokio::select! {
        session = load => session,
        _ = &mut shutdown_signal => Err(anyhow::anyhow!("interrupted while loading")),
    };
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Err(e);
        }
    };
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    *state.ready.write().unwrap() = Some(Ready {
        model: session.model.clone(),
        max_context: session.max_context,
        slots: session.sequences,
        jobs: jobs_tx,
        health: session.cluster.health.clone(),
    });
    eprintln!(
        "ready: {} sequence slots of {} tokens",
        session.sequences, session.max_context
    );
    let engine = tokio::spawn(engine::run(
        session,
        jobs_rx,
        metrics,
        EngineOptions {
            chunk: options.chunk,
            prefix_cache: options.prefix_cache,
        },
    ));
    shutdown_signal.await;
    eprintln!("stopping: finishing the requests in flight");
    // No new requests; the engine ends once the last job is done and its sender is gone.
    let _ = stop_tx.send(true);
    state.ready.write().unwrap().take();
    server.await??;
    Ok(engine.await?)
}

/// Serves `app` on `listener` (plain TCP or TLS) until `stopped` resolves.
fn spawn_server<L>(
    listener: L,
    app: Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
    })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/slots/{id}", post(slot_action))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .with_state(state)
}

/// With an API key, every request but `/health` (for load balancers) must carry it, as
/// OpenAI's API wants it: `Authorization: Bearer KEY`. Compared in constant time.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &state.api_key
        && request.uri().path() != "/health"
    {
        let presented = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .map_or(&b""[..], |v| v.as_bytes());
        if !key.accepts(presented) {
            let message = if presented.is_empty() {
                "no API key: send it as 'Authorization: Bearer KEY'"
            } else {
                "incorrect API key"
            };
            let mut response = ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: message.into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(request).await
}

/// 200 while the model is loaded and every worker answers as the process holding its shard;
/// 503 while loading, while a worker is down or restarted and the cluster has not re-formed
/// yet (naming the workers), and while stopping.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.ready.read().unwrap();
    let Some(ready) = ready.as_ref() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response();
    };
    match ready.health.unready() {
        None => axum::Json(json!({"status": "ok"})).into_response(),
        Some((error, workers)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "error": error, "workers": workers})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn models(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": "tp"}],
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}")
}

/// The fields both endpoints share, validated.
struct Common {
    /// Choices to generate for the prompt (`n`).
    n: usize,
    max_tokens: usize,
    params: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Some(n): report the chosen token's log-probability and n alternatives.
    top_logprobs: Option<usize>,
}

fn number(body: &Value, key: &'static str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(
            format!("'{key}' must be a number"),
            Some(key),
        )),
    }
}

fn integer(body: &Value, key: &'static str) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid(format!("'{key}' must be a non-negative integer"), Some(key))
        }),
        Some(_) => Err(ApiError::invalid(
            format!("'{key}' must be an integer"),
            Some(key),
        )),
    }
}

fn boolean(body: &Value, key: &'static str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            format!("'{key}' must be a boolean"),
            Some(key),
        )),
    }
}

fn common(
    body: &Value,
    state: &AppState,
    kind: &Kind,
    max_context: usize,
) -> Result<Common, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    match body.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if *m == state.model_id => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model '{m}' does not exist; this server has '{}'",
                    state.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
        Some(_) => return Err(ApiError::invalid("'model' must be a string", Some("model"))),
    }
    let n = integer(body, "n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES as u64).contains(&n) {
        return Err(ApiError::invalid(
            format!("'n' must be within 1..={MAX_CHOICES}"),
            Some("n"),
        ));
    }
    let top_logprobs = match kind {
        // The completions API: `logprobs` is the number of alternatives (0 = the chosen token's).
        Kind::Completion => match body.get("logprobs") {
            None | Some(Value::Null) => None,
            Some(_) => Some(integer(body, "logprobs")?.unwrap_or(0) as usize),
        },
        // The chat API: `logprobs` switches them on, `top_logprobs` asks for alternatives.
        Kind::Chat => {
            let top = integer(body, "top_logprobs")?;
            match (boolean(body, "logprobs")?, top) {
                (true, top) => Some(top.unwrap_or(0) as usize),
                (false, Some(_)) => {
                    return Err(ApiError::invalid(
                        "'top_logprobs' needs 'logprobs': true",
                        Some("top_logprobs"),
                    ));
                }
                (false, None) => None,
            }
        }
    };
    if top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            format!("at most {MAX_TOP_LOGPROBS} log-probabilities per token"),
            Some(match kind {
                Kind::Completion => "logprobs",
                Kind::Chat => "top_logprobs",
            }),
        ));
    }
    let max_tokens = integer(body, "max_tokens")?
        .or(integer(body, "max_completion_tokens")?)
        .unwrap_or(16) as usize;
    if max_tokens == 0 || max_tokens >= max_context {
        return Err(ApiError::invalid(
            format!("'max_tokens' must be within 1..{max_context} (the context window)"),
            Some("max_tokens"),
        ));
    }
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        temperature: number(body, "temperature")?.map_or(1.0, |v| v as f32),
        top_p: number(body, "top_p")?.map_or(1.0, |v| v as f32),
        top_k: integer(body, "top_k")?.map_or(0, |v| v as usize),
        min_p: number(body, "min_p")?.map_or(0.0, |v| v as f32),
        repeat_penalty: number(body, "repeat_penalty")?.map_or(1.0, |v| v as f32),
        frequency_penalty: number(body, "frequency_penalty")?.map_or(0.0, |v| v as f32),
        presence_penalty: number(body, "presence_penalty")?.map_or(0.0, |v| v as f32),
        repeat_last_n: defaults.repeat_last_n,
        seed: integer(body, "seed")?.unwrap_or_else(|| now() ^ 0x5eed),
    };
    if !(0.0..=2.0).contains(&params.temperature) {
        return Err(ApiError::invalid(
            "'temperature' must be within 0..=2",
            Some("temperature"),
        ));
    }
    params.validate().map_err(|e| ApiError::invalid(e, None))?;
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOP_STRINGS => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("'stop' must hold strings", Some("stop")))?,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("'stop' must be a string or up to {MAX_STOP_STRINGS} strings"),
                Some("stop"),
            ));
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "'stop' strings must not be empty",
            Some("stop"),
        ));
    }
    let stream = boolean(body, "stream")?;
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(options @ Value::Object(_)) => boolean(options, "include_usage")?,
        Some(_) => {
            return Err(ApiError::invalid(
                "'stream_options' must be an object",
                Some("stream_options"),
            ));
        }
    };
    Ok(Common {
        n: n as usize,
        max_tokens,
        params,
        stop,
        stream,
        include_usage,
        top_logprobs,
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))
}

enum Kind {
    Completion,
    Chat,
}

/// A completion's prompt: text to tokenize, or the token ids themselves.
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Token ids of a prompt given as numbers (checked against the vocabulary later).
fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("prompt token {v} is not a token id (a non-negative integer)"),
                        Some("prompt"),
                    )
                })
        })
        .collect()
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let prompts = match body.get("prompt") {
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        // Token ids, as OpenAI's API takes them: one prompt as a flat array.
        Some(Value::Array(items)) if items.first().is_some_and(Value::is_number) => {
            match token_ids(items) {
                Ok(ids) => vec![Prompt::Tokens(ids)],
                Err(e) => return e.into_response(),
            }
        }
        // Several prompts: an array of strings, or of arrays of token ids (each prompt gets `n`
        // choices, indexed prompt by prompt).
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut prompts = Vec::with_capacity(items.len());
            for item in items {
                prompts.push(match item {
                    Value::String(s) => Prompt::Text(s.clone()),
                    Value::Array(ids) if !ids.is_empty() => match token_ids(ids) {
                        Ok(ids) => Prompt::Tokens(ids),
                        Err(e) => return e.into_response(),
                    },
                    _ => {
                        return ApiError::invalid(
                            "each prompt of an array must be a string or a non-empty array of token ids",
                            Some("prompt"),
                        )
                        .into_response();
                    }
                });
            }
            prompts
        }
        None | Some(Value::Null) => {
            return ApiError::invalid("'prompt' is required", Some("prompt")).into_response();
        }
        Some(_) => {
            return ApiError::invalid(
                "'prompt' must be a string, an array of token ids, or an array of those",
                Some("prompt"),
            )
            .into_response();
        }
    };
    run(state, body, Kind::Completion, prompts, false).await
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let Some(Value::Array(items)) = body.get("messages") else {
        return ApiError::invalid("'messages' must be an array of messages", Some("messages"))
            .into_response();
    };
    if items.is_empty() {
        return ApiError::invalid("'messages' must not be empty", Some("messages")).into_response();
    }
    let mut messages = Vec::new();
    for item in items {
        let role = item.get("role").and_then(Value::as_str);
        let content = match item.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            // The content-parts form: text parts only.
            Some(Value::Array(parts)) => parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Some(t.clone()),
                        _ => None,
                    },
                )
                .collect::<Option<Vec<_>>>()
                .map(|t| t.concat()),
            // An assistant turn may carry only its reasoning.
            None | Some(Value::Null) if role == Some("assistant") => Some(String::new()),
            _ => None,
        };
        let thinking = match item.get("reasoning_content") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if role == Some("assistant") => Some(s.clone()),
            Some(_) => {
                return ApiError::invalid(
                    "'reasoning_content' must be a string, on assistant messages only",
                    Some("messages"),
                )
                .into_response();
            }
        };
        match (role, content) {
            (Some(role @ ("system" | "user" | "assistant" | "developer")), Some(content)) => {
                let role = if role == "developer" { "system" } else { role };
                let mut message = ChatMessage::new(role, content);
                message.thinking = thinking;
                messages.push(message);
            }
            _ => {
                return ApiError::invalid(
                    "each message needs a 'role' (system, user, assistant) and text 'content'",
                    Some("messages"),
                )
                .into_response();
            }
        }
    }
    // Template variables: `chat_template_kwargs` (as llama-server and vLLM take them), and
    // OpenAI's `reasoning_effort` for templates that read it (harmony's does).
    let mut kwargs = match body.get("chat_template_kwargs") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(_) => {
            return ApiError::invalid(
                "'chat_template_kwargs' must be an object",
                Some("chat_template_kwargs"),
            )
            .into_response();
        }
    };
    match body.get("reasoning_effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(effort)) if matches!(effort.as_str(), "low" | "medium" | "high") => {
            kwargs
                .entry("reasoning_effort")
                .or_insert_with(|| Value::String(effort.clone()));
        }
        Some(_) => {
            return ApiError::invalid(
                "'reasoning_effort' must be \"low\", \"medium\" or \"high\"",
                Some("reasoning_effort"),
            )
            .into_response();
        }
    }
    // `reasoning_format`: "none" leaves a reply's channels in its content.
    let split_reasoning = match body.get("reasoning_format") {
        None | Some(Value::Null) => true,
        Some(Value::String(f)) if matches!(f.as_str(), "auto" | "deepseek") => true,
        Some(Value::String(f)) if f == "none" => false,
        Some(_) => {
            return ApiError::invalid(
                "'reasoning_format' must be \"auto\", \"deepseek\" or \"none\"",
                Some("reasoning_format"),
            )
            .into_response();
        }
    };
    let Some(model) = ready_model(&state) else {
        return not_ready().into_response();
    };
    let Some(template) = &model.chat_template else {
        return ApiError::invalid("this model has no chat template", Some("messages"))
            .into_response();
    };
    let reasoning = split_reasoning && template.is_harmony();
    match template.render_with(&messages, true, &kwargs) {
        Ok(prompt) => {
            run(
                state,
                body,
                Kind::Chat,
                vec![Prompt::Text(prompt)],
                reasoning,
            )
            .await
        }
        Err(e) => ApiError::invalid(
            format!("cannot apply the chat template: {e}"),
            Some("messages"),
        )
        .into_response(),
    }
}

fn ready_model(state: &AppState) -> Option<Arc<Model>> {
    state
        .ready
        .read()
        .unwrap()
        .as_ref()
        .map(|r| r.model.clone())
}

/// `POST /slots/{id}?action=save|restore|erase` with `{"filename": NAME}` (llama-server's
/// slot persistence): every worker saves or reads its own shard of the slot's KV cache in its
/// save directory (`--slot-save-path`). A restored slot is reused by the next prompt that
/// starts with its tokens.
async fn slot_action(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    body: Bytes,
) -> Response {
    let Ok(slot) = id.parse::<usize>() else {
        return ApiError::invalid(format!("'{id}' is not a slot number"), None).into_response();
    };
    let action = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("action="))
        .unwrap_or("");
    let file_name = || -> Result<String, ApiError> {
        let body = parse_body(&body)?;
        match body.get("filename") {
            Some(Value::String(name)) => {
                crate::shard::cache::check_save_name(name)
                    .map_err(|e| ApiError::invalid(e, Some("filename")))?;
                Ok(name.clone())
            }
            _ => Err(ApiError::invalid(
                "give the file name as {\"filename\": \"NAME\"}",
                Some("filename"),
            )),
        }
    };
    let action = match action {
        "save" => file_name().map(SlotAction::Save),
        "restore" => file_name().map(SlotAction::Restore),
        "erase" => Ok(SlotAction::Erase),
        other => Err(ApiError::invalid(
            format!("unknown slot action '{other}': use ?action=save, restore or erase"),
            None,
        )),
    };
    let action = match action {
        Ok(action) => action,
        Err(e) => return e.into_response(),
    };
    let kind = match &action {
        SlotAction::Save(name) => ("save", Some(name.clone())),
        SlotAction::Restore(name) => ("restore", Some(name.clone())),
        SlotAction::Erase => ("erase", None),
    };
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let job = SlotJob {
        slot,
        action,
        reply,
    };
    let sent = match state.ready.read().unwrap().as_ref() {
        Some(r) => r.jobs.send(Work::Slot(job)).is_ok(),
        None => false,
    };
    if !sent {
        return not_ready().into_response();
    }
    let outcome = match outcome.await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(message)) => return ApiError::invalid(message, None).into_response(),
        Err(_) => return not_ready().into_response(),
    };
    let ms = outcome.seconds * 1e3;
    let body = match kind {
        ("save", name) => json!({
            "id_slot": slot, "filename": name, "n_saved": outcome.tokens,
            "n_written": outcome.bytes, "timings": {"save_ms": ms},
        }),
        ("restore", name) => json!({
            "id_slot": slot, "filename": name, "n_restored": outcome.tokens,
            "n_read": outcome.bytes, "timings": {"restore_ms": ms},
        }),
        _ => json!({"id_slot": slot, "n_erased": outcome.tokens}),
    };
    axum::Json(body).into_response()
}

fn not_ready() -> ApiError {
    ApiError::unavailable(
        "the model is still loading (or the server is stopping); see /health",
        "model_not_ready",
    )
}

/// Releases a queue place when dropped.
struct Place(Arc<Metrics>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The text of a token as the logprobs fields show it, and its bytes.
fn token_text(model: &Model, token: u32) -> (String, Vec<u8>) {
    let bytes = model.tokenizer.token_bytes(token).to_vec();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Log-probabilities of generated tokens in the response's shape (chat or completions).
struct Logprobs {
    chat: bool,
    /// Chat: `content` entries.
    content: Vec<Value>,
    /// Completions: parallel lists.
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn new(chat: bool) -> Logprobs {
        Logprobs {
            chat,
            content: Vec::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        }
    }

    fn push(&mut self, model: &Model, sampled: &Sampled, text_offset: usize) {
        let (text, bytes) = token_text(model, sampled.token);
        if self.chat {
            let top: Vec<Value> = sampled
                .top
                .iter()
                .map(|&(id, lp)| {
                    let (t, b) = token_text(model, id);
                    json!({"token": t, "logprob": lp, "bytes": b})
                })
                .collect();
            self.content.push(json!({
                "token": text, "logprob": sampled.logprob, "bytes": bytes, "top_logprobs": top,
            }));
        } else {
            let mut top = serde_json::Map::new();
            for &(id, lp) in &sampled.top {
                top.insert(token_text(model, id).0, json!(lp));
            }
            self.tokens.push(text);
            self.token_logprobs.push(sampled.logprob);
            self.top_logprobs.push(Value::Object(top));
            self.text_offset.push(text_offset);
        }
    }

    /// The `logprobs` value of a choice; `take` empties it (for streamed chunks).
    fn take(&mut self) -> Value {
        if self.chat {
            json!({"content": std::mem::take(&mut self.content)})
        } else {
            json!({
                "tokens": std::mem::take(&mut self.tokens),
                "token_logprobs": std::mem::take(&mut self.token_logprobs),
                "top_logprobs": std::mem::take(&mut self.top_logprobs),
                "text_offset": std::mem::take(&mut self.text_offset),
            })
        }
    }
}

/// Runs one request. `reasoning`: the reply is in harmony's channels; chat answers show the
/// final channel as `content` and the analysis channel as `reasoning_content`.
async fn run(
    state: Arc<AppState>,
    body: Value,
    kind: Kind,
    prompts: Vec<Prompt>,
    reasoning: bool,
) -> Response {
    if prompts.iter().any(|p| match p {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Tokens(t) => t.is_empty(),
    }) {
        return ApiError::invalid("the prompt is empty", Some("prompt")).into_response();
    }
    let (model, max_context, slots, unready) = match state.ready.read().unwrap().as_ref() {
        Some(r) => (r.model.clone(), r.max_context, r.slots, r.health.unready()),
        None => return not_ready().into_response(),
    };
    // A worker is down or the cluster is re-forming: say so now (503, retry later) rather
    // than queue the request behind a step that would fail.
    if let Some((why, workers)) = unready {
        let missing: Vec<String> = workers
            .iter()
            .map(|w| format!("worker {} ({}): {}", w.rank, w.address, w.problem))
            .collect();
        let mut response = ApiError::unavailable(
            if missing.is_empty() {
                format!("the cluster is not ready ({why}); see /health")
            } else {
                format!(
                    "the cluster is not ready: {}; see /health",
                    missing.join("; ")
                )
            },
            "cluster_unavailable",
        )
        .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return response;
    }
    let common = match common(&body, &state, &kind, max_context) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut prompt_tokens = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let tokens = match prompt {
            Prompt::Text(text) => match model.tokenizer.encode_prompt(&text, true) {
                Ok(t) => t,
                Err(e) => {
                    return ApiError::invalid(
                        format!("cannot tokenize the prompt: {e}"),
                        Some("prompt"),
                    )
                    .into_response();
                }
            },
            Prompt::Tokens(ids) => {
                let vocab = model.tokenizer.vocab_size();
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return ApiError::invalid(
                        format!("prompt token {bad} is outside the vocabulary of {vocab}"),
                        Some("prompt"),
                    )
                    .into_response();
                }
                ids
            }
        };
        if tokens.is_empty() {
            return ApiError::invalid("the prompt has no tokens", Some("prompt")).into_response();
        }
        if tokens.len() + common.max_tokens > max_context {
            return ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "This model's context is {max_context} tokens; the prompt has {} and max_tokens asks for {}",
                    tokens.len(),
                    common.max_tokens
                ),
                kind: "invalid_request_error",
                param: Some("max_tokens"),
                code: Some("context_length_exceeded"),
            }
            .into_response();
        }
        prompt_tokens.push(tokens);
    }
    let metrics = state.metrics.clone();
    // Choices: `n` per prompt, prompt by prompt (OpenAI's order).
    let per_prompt = common.n;
    let n = per_prompt * prompt_tokens.len();
    if n > slots + state.queue {
        let asked = if prompt_tokens.len() > 1 {
            format!("{} prompts x 'n' = {per_prompt}", prompt_tokens.len())
        } else {
            format!("'n' = {n}")
        };
        return ApiError::invalid(
            format!(
                "{asked} exceeds what this server runs and queues at once ({slots} + {})",
                state.queue
            ),
            Some(if prompt_tokens.len() > 1 {
                "prompt"
            } else {
                "n"
            }),
        )
        .into_response();
    }
    // Each choice is a sequence and holds a place in the queue.
    if metrics.pending.fetch_add(n, Ordering::SeqCst) + n > slots + state.queue {
        metrics.pending.fetch_sub(n, Ordering::SeqCst);
        return ApiError::unavailable(
            format!(
                "the server is busy: {slots} requests are running and {} waiting",
                state.queue
            ),
            "queue_full",
        )
        .into_response();
    }
    let places: Vec<Place> = (0..n).map(|_| Place(metrics.clone())).collect();
    let prompt_count: usize = prompt_tokens.iter().map(Vec::len).sum();
    match kind {
        Kind::Completion => &metrics.completions,
        Kind::Chat => &metrics.chat_completions,
    }
    .fetch_add(1, Ordering::Relaxed);
    metrics
        .prompt_tokens
        .fetch_add(prompt_count as u64, Ordering::Relaxed);
    // One job per choice, each sampling with its own seed (seed + i for a prompt's i-th); a
    // prompt's later choices share its first's prompt blocks. Their events merge into one
    // stream, keyed by choice.
    let mut events = StreamMap::new();
    let mut jobs = Vec::with_capacity(n);
    for index in 0..n {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        events.insert(index, UnboundedReceiverStream::new(events_rx));
        let mut params = common.params.clone();
        params.seed = params.seed.wrapping_add((index % per_prompt) as u64);
        jobs.push(Job {
            prompt: prompt_tokens[index / per_prompt].clone(),
            spec: SequenceSpec {
                max_tokens: common.max_tokens,
                params,
                stop_strings: common.stop.clone(),
                top_logprobs: common.top_logprobs.unwrap_or(0),
            },
            events: events_tx,
            accepted: Instant::now(),
            follows: index % per_prompt > 0,
        });
    }
    let sent = match state.ready.read().unwrap().as_ref() {
        Some(r) => jobs
            .into_iter()
            .all(|job| r.jobs.send(Work::Generate(job)).is_ok()),
        None => false,
    };
    if !sent {
        return not_ready().into_response();
    }

    let chat = matches!(kind, Kind::Chat);
    let (id, object, chunk_object) = match kind {
        Kind::Completion => (request_id("cmpl"), "text_completion", "text_completion"),
        Kind::Chat => (
            request_id("chatcmpl"),
            "chat.completion",
            "chat.completion.chunk",
        ),
    };
    let created = now();
    let model_id = state.model_id.clone();
    let want_logprobs = common.top_logprobs.is_some();
    let mut logprobs: Vec<Logprobs> = (0..n).map(|_| Logprobs::new(chat)).collect();
    let usage = |prompt_tokens: usize, completion_tokens: usize| {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })
    };

    if !common.stream {
        let _places = places;
        let mut texts = vec![String::new(); n];
        let mut choices: Vec<Value> = vec![Value::Null; n];
        let (mut completion_count, mut done) = (0, 0);
        while done < n {
            let Some((index, event)) = events.next().await else {
                return server_error("generation ended without a result".into());
            };
            let text = &mut texts[index];
            match event {
                JobEvent::Token(sampled) => {
                    if want_logprobs && sampled.stop != Some(Stop::Eos) {
                        logprobs[index].push(&model, &sampled, text.len());
                    }
                    text.push_str(&sampled.text);
                }
                JobEvent::Done {
                    stop,
                    completion_tokens,
                    ..
                } => {
                    let logprobs = if want_logprobs {
                        logprobs[index].take()
                    } else {
                        Value::Null
                    };
                    choices[index] = if chat {
                        let mut message = json!({"role": "assistant", "content": text});
                        if reasoning {
                            let split = ChannelSplit::split(text);
                            message["content"] = json!(split.content);
                            if !split.reasoning.is_empty() {
                                message["reasoning_content"] = json!(split.reasoning);
                            }
                        }
                        json!({
                            "index": index,
                            "message": message,
                            "logprobs": logprobs,
                            "finish_reason": stop.finish_reason(),
                        })
                    } else {
                        json!({
                            "index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": stop.finish_reason(),
                        })
                    };
                    completion_count += completion_tokens;
                    done += 1;
                }
                JobEvent::Failed(message) => {
                    return server_error(format!("generation failed: {message}"));
                }
            }
        }
        return axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model_id,
            "choices": choices, "usage": usage(prompt_count, completion_count),
        }))
        .into_response();
    }

    // Server-sent events: per choice a role delta (chat), its pieces and its finish reason,
    // then the usage when asked for, then [DONE]. A client that goes away closes `sse`, which
    // drops `events` and so cancels the jobs.
    let include_usage = common.include_usage;
    let (sse, sse_rx) = mpsc::unbounded_channel::<String>();
    let event = move |choice: Value, usage: Option<Value>| {
        let mut event = json!({
            "id": id, "object": chunk_object, "created": created, "model": model_id,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if let Some(usage) = usage {
            event["usage"] = usage;
        }
        event.to_string()
    };
    if chat {
        for index in 0..n {
            let _ = sse.send(event(
                json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                None,
            ));
        }
    }
    tokio::spawn(async move {
        let _places = places;
        let mut offsets = vec![0; n];
        let mut channels: Vec<Option<ChannelSplit>> =
            (0..n).map(|_| reasoning.then(ChannelSplit::new)).collect();
        let (mut completion_count, mut done) = (0, 0);
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                _ = sse.closed() => return,
            };
            let data = match next {
                Some((index, JobEvent::Token(sampled))) => {
                    let with_logprobs = want_logprobs && sampled.stop != Some(Stop::Eos);
                    if with_logprobs {
                        logprobs[index].push(&model, &sampled, offsets[index]);
                    }
                    offsets[index] += sampled.text.len();
                    if sampled.text.is_empty() && !with_logprobs {
                        continue;
                    }
                    let lp = if with_logprobs {
                        logprobs[index].take()
                    } else {
                        Value::Null
                    };
                    let choice = if let Some(channels) = &mut channels[index] {
                        let split = channels.push(&sampled.text);
                        if split.is_empty() && !with_logprobs {
                            continue;
                        }
                        json!({"index": index, "delta": split_delta(split), "logprobs": lp, "finish_reason": null})
                    } else if chat {
                        json!({"index": index, "delta": {"content": sampled.text}, "logprobs": lp, "finish_reason": null})
                    } else {
                        json!({"index": index, "text": sampled.text, "logprobs": lp, "finish_reason": null})
                    };
                    vec![event(choice, None)]
                }
                Some((
                    index,
                    JobEvent::Done {
                        stop,
                        completion_tokens,
                        ..
                    },
                )) => {
                    let choice = if chat {
                        json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": stop.finish_reason()})
                    } else {
                        json!({"index": index, "text": "", "logprobs": null, "finish_reason": stop.finish_reason()})
                    };
                    let mut tail = Vec::new();
                    // What a harmony reply held back (a marker's possible start).
                    if let Some(rest) = channels[index].as_mut().map(ChannelSplit::finish)
                        && !rest.is_empty()
                    {
                        tail.push(event(
                            json!({"index": index, "delta": split_delta(rest), "logprobs": null, "finish_reason": null}),
                            None,
                        ));
                    }
                    tail.push(event(choice, None));
                    completion_count += completion_tokens;
                    done += 1;
                    if done == n {
                        if include_usage {
                            tail.push(event(
                                Value::Null,
                                Some(usage(prompt_count, completion_count)),
                            ));
                        }
                        tail.push("[DONE]".into());
                    }
                    tail
                }
                Some((_, JobEvent::Failed(message))) => vec![
                    json!({"error": {"message": format!("generation failed: {message}"), "type": "server_error"}}).to_string(),
                    "[DONE]".into(),
                ],
                None => vec![
                    json!({"error": {"message": "generation ended without a result", "type": "server_error"}}).to_string(),
                    "[DONE]".into(),
                ],
            };
            let last = data.last().is_some_and(|d| d == "[DONE]");
            for d in data {
                let _ = sse.send(d);
            }
            if last {
                return;
            }
        }
    });
    let stream = UnboundedReceiverStream::new(sse_rx)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(stream).into_response()
}

/// A streamed chat delta of a harmony reply: the fields that have text.
fn split_delta(split: Split) -> Value {
    let mut delta = serde_json::Map::new();
    if !split.reasoning.is_empty() {
        delta.insert("reasoning_content".into(), json!(split.reasoning));
    }
    if !split.content.is_empty() || split.reasoning.is_empty() {
        delta.insert("content".into(), json!(split.content));
    }
    Value::Object(delta)
}

fn server_error(message: String) -> Response {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
    .into_response()
}
