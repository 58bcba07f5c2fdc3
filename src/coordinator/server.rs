//! The OpenAI-compatible HTTP API (`tp-coordinator serve`).
//!
//! `/metrics` reports requests, errors, tokens, queue depth and latency histograms in
//! Prometheus text format. v0.1 serves one sequence at a time: requests wait in a bounded queue for the cluster's one
//! sequence slot (a full queue answers 503), and each runs to completion before the next.
//! Continuous batching (several sequences per decode step) is not built yet.
//!
//! Request bodies are parsed by hand from JSON values, so that every malformed request gets an
//! OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) and a 4xx code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::coordinator::sampler::SamplingParams;
use crate::coordinator::session::{GenerateRequest, Generation, Session};
use crate::model::chat::ChatMessage;

/// What a request may ask for at most.
pub const MAX_STOP_STRINGS: usize = 4;

pub struct ServerOptions {
    pub listen: SocketAddr,
    /// The id `/v1/models` reports and requests must name (or leave out).
    pub model_id: String,
    /// Requests allowed to wait for the sequence slot; more get 503.
    pub queue: usize,
}

struct AppState {
    session: tokio::sync::Mutex<Session>,
    model_id: String,
    queue: usize,
    /// Requests waiting for or holding the sequence slot.
    pending: AtomicUsize,
    metrics: Metrics,
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// What `/metrics` reports (Prometheus text format).
#[derive(Default)]
struct Metrics {
    completions: AtomicU64,
    chat_completions: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cancelled: AtomicU64,
    busy: AtomicUsize,
    time_to_first_token: Mutex<Histogram>,
    inter_token_latency: Mutex<Histogram>,
}

/// Error responses by status class; one server per process.
static ERRORS_4XX: AtomicU64 = AtomicU64::new(0);
static ERRORS_5XX: AtomicU64 = AtomicU64::new(0);

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

/// Serves until Ctrl-C or SIGTERM; the session's cluster is shut down by the caller.
pub async fn serve(session: Session, options: ServerOptions) -> anyhow::Result<Session> {
    let state = Arc::new(AppState {
        session: tokio::sync::Mutex::new(session),
        model_id: options.model_id,
        queue: options.queue,
        pending: AtomicUsize::new(0),
        metrics: Metrics::default(),
    });
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving the OpenAI API");
    eprintln!("serving on http://{address}/v1 (Ctrl-C stops)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    match Arc::try_unwrap(state) {
        Ok(state) => Ok(state.session.into_inner()),
        Err(_) => anyhow::bail!("requests still running at shutdown"),
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    // The server listens only once every worker holds its shard.
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    use std::fmt::Write;
    let m = &state.metrics;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tp_requests_total Generation requests accepted, by endpoint.\n\
         # TYPE tp_requests_total counter\n\
         tp_requests_total{{endpoint=\"completions\"}} {}\n\
         tp_requests_total{{endpoint=\"chat_completions\"}} {}\n\
         # HELP tp_request_errors_total Error responses, by status class.\n\
         # TYPE tp_request_errors_total counter\n\
         tp_request_errors_total{{class=\"4xx\"}} {}\n\
         tp_request_errors_total{{class=\"5xx\"}} {}\n\
         # HELP tp_requests_cancelled_total Generations stopped because the client went away.\n\
         # TYPE tp_requests_cancelled_total counter\n\
         tp_requests_cancelled_total {}\n\
         # HELP tp_prompt_tokens_total Prompt tokens processed.\n\
         # TYPE tp_prompt_tokens_total counter\n\
         tp_prompt_tokens_total {}\n\
         # HELP tp_completion_tokens_total Tokens generated.\n\
         # TYPE tp_completion_tokens_total counter\n\
         tp_completion_tokens_total {}\n\
         # HELP tp_queue_depth Requests waiting for or holding the sequence slot.\n\
         # TYPE tp_queue_depth gauge\n\
         tp_queue_depth {}\n\
         # HELP tp_slots_busy Sequence slots generating (v0.1 has one).\n\
         # TYPE tp_slots_busy gauge\n\
         tp_slots_busy {}",
        load(&m.completions),
        load(&m.chat_completions),
        ERRORS_4XX.load(Ordering::Relaxed),
        ERRORS_5XX.load(Ordering::Relaxed),
        load(&m.cancelled),
        load(&m.prompt_tokens),
        load(&m.completion_tokens),
        state.pending.load(Ordering::Relaxed),
        m.busy.load(Ordering::Relaxed),
    );
    m.time_to_first_token.lock().unwrap().render(
        "tp_time_to_first_token_seconds",
        "From accepting a request to its first generated text.",
        &mut out,
    );
    m.inter_token_latency.lock().unwrap().render(
        "tp_inter_token_latency_seconds",
        "Between consecutive generated tokens of one request.",
        &mut out,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
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
    max_tokens: usize,
    params: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
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

fn common(body: &Value, state: &AppState, max_context: usize) -> Result<Common, ApiError> {
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
    if let Some(n) = integer(body, "n")?
        && n != 1
    {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if number(body, key)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                format!("'{key}' is not supported yet (use repeat_penalty)"),
                None,
            ));
        }
    }
    for key in ["logprobs", "top_logprobs"] {
        if body
            .get(key)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        {
            return Err(ApiError::invalid(
                format!("'{key}' is not supported yet"),
                None,
            ));
        }
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
        max_tokens,
        params,
        stop,
        stream,
        include_usage,
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

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return ApiError::invalid(
                "only one prompt string per request is supported",
                Some("prompt"),
            )
            .into_response();
        }
        None | Some(Value::Null) => {
            return ApiError::invalid("'prompt' is required", Some("prompt")).into_response();
        }
        Some(_) => {
            return ApiError::invalid("'prompt' must be a string", Some("prompt")).into_response();
        }
    };
    run(state, body, Kind::Completion, prompt).await
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
            _ => None,
        };
        match (role, content) {
            (Some(role @ ("system" | "user" | "assistant" | "developer")), Some(content)) => {
                let role = if role == "developer" { "system" } else { role };
                messages.push(ChatMessage::new(role, content));
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
    let rendered = {
        let session = state.session.lock().await;
        match &session.model.chat_template {
            Some(template) => template.render(&messages, true),
            None => {
                return ApiError::invalid("this model has no chat template", Some("messages"))
                    .into_response();
            }
        }
    };
    match rendered {
        Ok(prompt) => run(state, body, Kind::Chat, prompt).await,
        Err(e) => ApiError::invalid(
            format!("cannot apply the chat template: {e}"),
            Some("messages"),
        )
        .into_response(),
    }
}

/// Releases a queue place when dropped.
struct Place(Arc<AppState>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

fn finish_reason(generation: &Generation) -> &'static str {
    match generation.stop {
        "limit" => "length",
        _ => "stop",
    }
}

async fn run(state: Arc<AppState>, body: Value, kind: Kind, prompt: String) -> Response {
    if prompt.is_empty() {
        return ApiError::invalid("the prompt is empty", Some("prompt")).into_response();
    }
    // Validation and tokenization need the model; a short lock.
    let (common, prompt_tokens, max_context) = {
        let session = state.session.lock().await;
        let max_context = session.max_context;
        let common = match common(&body, &state, max_context) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let tokenizer = &session.model.tokenizer;
        let mut tokens = Vec::new();
        if tokenizer.add_bos()
            && let Some(bos) = tokenizer.bos_id()
        {
            tokens.push(bos);
        }
        match tokenizer.encode(&prompt, true) {
            Ok(t) => tokens.extend(t),
            Err(e) => {
                return ApiError::invalid(
                    format!("cannot tokenize the prompt: {e}"),
                    Some("prompt"),
                )
                .into_response();
            }
        }
        (common, tokens, max_context)
    };
    if prompt_tokens.len() + common.max_tokens > max_context {
        return ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's context is {max_context} tokens; the prompt has {} and max_tokens asks for {}",
                prompt_tokens.len(),
                common.max_tokens
            ),
            kind: "invalid_request_error",
            param: Some("max_tokens"),
            code: Some("context_length_exceeded"),
        }
        .into_response();
    }
    if state.pending.fetch_add(1, Ordering::SeqCst) > state.queue {
        state.pending.fetch_sub(1, Ordering::SeqCst);
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the server is busy: {} requests are already waiting",
                state.queue
            ),
            kind: "server_error",
            param: None,
            code: Some("queue_full"),
        }
        .into_response();
    }
    let place = Place(state.clone());
    let accepted = Instant::now();
    match kind {
        Kind::Completion => &state.metrics.completions,
        Kind::Chat => &state.metrics.chat_completions,
    }
    .fetch_add(1, Ordering::Relaxed);
    let (id, object) = match kind {
        Kind::Completion => (request_id("cmpl"), "text_completion"),
        Kind::Chat => (request_id("chatcmpl"), "chat.completion"),
    };
    let created = now();
    let model_id = state.model_id.clone();
    let prompt_count = prompt_tokens.len();
    let chat = matches!(kind, Kind::Chat);
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    // Server-sent events, serialized; the generation task sends one per piece of text.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let event = {
        let (id, model_id) = (id.clone(), model_id.clone());
        move |choices: Value, usage: Option<Value>| {
            let mut event = json!({
                "id": id, "object": chunk_object, "created": created, "model": model_id,
                "choices": choices,
            });
            if let Some(usage) = usage {
                event["usage"] = usage;
            }
            event.to_string()
        }
    };
    let streaming = common.stream;
    let finished = tokio::spawn({
        let state = state.clone();
        let tx = tx.clone();
        let event = event.clone();
        async move {
            let _place = place;
            let mut session = state.session.lock().await;
            let metrics = &state.metrics;
            metrics.busy.fetch_add(1, Ordering::Relaxed);
            let mut last_token: Option<Instant> = None;
            let mut on_text = |piece: &str| {
                let now = Instant::now();
                match last_token {
                    None => metrics
                        .time_to_first_token
                        .lock()
                        .unwrap()
                        .observe((now - accepted).as_secs_f64()),
                    Some(last) => metrics
                        .inter_token_latency
                        .lock()
                        .unwrap()
                        .observe((now - last).as_secs_f64()),
                }
                last_token = Some(now);
                if streaming && !piece.is_empty() {
                    let choice = if chat {
                        json!({"index": 0, "delta": {"content": piece}, "finish_reason": null})
                    } else {
                        json!({"index": 0, "text": piece, "logprobs": null, "finish_reason": null})
                    };
                    let _ = tx.send(event(json!([choice]), None));
                }
            };
            let closed = tx.clone();
            let cancelled = move || closed.is_closed();
            let generation = session
                .generate(GenerateRequest {
                    prompt_tokens,
                    max_tokens: common.max_tokens,
                    params: common.params,
                    stop_strings: common.stop,
                    logprobs: 0,
                    on_text: Some(&mut on_text),
                    cancelled: Some(&cancelled),
                })
                .await;
            metrics.busy.fetch_sub(1, Ordering::Relaxed);
            metrics
                .prompt_tokens
                .fetch_add(prompt_count as u64, Ordering::Relaxed);
            if let Ok(generation) = &generation {
                metrics
                    .completion_tokens
                    .fetch_add(generation.tokens.len() as u64, Ordering::Relaxed);
                if generation.stop == "cancelled" {
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            generation
        }
    });
    let usage = move |generation: &Generation| {
        json!({
            "prompt_tokens": prompt_count,
            "completion_tokens": generation.tokens.len(),
            "total_tokens": prompt_count + generation.tokens.len(),
        })
    };
    if !streaming {
        drop(tx);
        let generation = match finished.await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => return server_error(format!("generation failed: {e:#}")),
            Err(e) => return server_error(format!("generation failed: {e}")),
        };
        drop(rx);
        let choice = if chat {
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": null,
                "finish_reason": finish_reason(&generation),
            })
        } else {
            json!({
                "index": 0, "text": generation.text, "logprobs": null,
                "finish_reason": finish_reason(&generation),
            })
        };
        return axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model_id,
            "choices": [choice], "usage": usage(&generation),
        }))
        .into_response();
    }
    // After the pieces: the finish reason, the usage when asked for, then [DONE].
    let include_usage = common.include_usage;
    tokio::spawn(async move {
        let tail = match finished.await {
            Ok(Ok(generation)) => {
                let choice = if chat {
                    json!({"index": 0, "delta": {}, "finish_reason": finish_reason(&generation)})
                } else {
                    json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(&generation)})
                };
                let mut tail = vec![event(json!([choice]), None)];
                if include_usage {
                    tail.push(event(json!([]), Some(usage(&generation))));
                }
                tail
            }
            Ok(Err(e)) => vec![json!({"error": {"message": format!("generation failed: {e:#}"), "type": "server_error"}}).to_string()],
            Err(e) => vec![json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error"}}).to_string()],
        };
        for data in tail {
            let _ = tx.send(data);
        }
        let _ = tx.send("[DONE]".to_string());
    });
    let head = chat.then(|| {
        json!({
            "id": id, "object": chunk_object, "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}],
        })
        .to_string()
    });
    let stream = tokio_stream::iter(head)
        .chain(UnboundedReceiverStream::new(rx))
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(stream).into_response()
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
