//! The OpenAI-compatible server, driven over HTTP/1.1 from this test: completions, chat,
//! streaming, stop strings, usage, and a table of malformed requests that must each get the
//! right status and an OpenAI-style error body while the server keeps serving.

mod common;

use common::server::*;
use common::*;
use serde_json::{Value, json};

fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(server, "POST", path, &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The data lines of a server-sent event stream.
/// The content of a greedy chat reply of at most 24 tokens.
fn greedy_reply(server: &Server, messages: &Value) -> String {
    let (status, body) = post(
        server,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The server's count of prompt tokens reused from its KV cache (`/metrics`).
fn prompt_tokens_cached(server: &Server) -> f64 {
    let (_, metrics) = http(server, "GET", "/metrics", "");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tp_prompt_tokens_cached_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tp_prompt_tokens_cached_total in {metrics}"))
}

fn events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn completions_chat_streaming_and_errors() {
    let Some(path) = model(SMOLLM2) else { return };
    let server = start(&path, &["-c", "512", "--queue", "4", "--parallel", "2"]);

    let (status, health) = http(&server, "GET", "/health", "");
    assert_eq!(status, 200, "{health}");
    let (status, models) = http(&server, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(status, 200);
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, "SmolLM2-135M-Instruct.Q4_1");

    // Completion: greedy is repeatable, max_tokens bounds it, usage adds up.
    let request = json!({"model": id, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let (status, first) = post(&server, "/v1/completions", request.clone());
    assert_eq!(status, 200, "{first}");
    let (_, second) = post(&server, "/v1/completions", request.clone());
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
    assert_eq!(first["object"], "text_completion");
    let usage = &first["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 12
    );
    let text = first["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text}");
    // The same prompt as token ids (flat, and as an array of one) gives the same text.
    let ids = tp::model::tokenizer::Tokenizer::from_gguf_path(&path)
        .unwrap()
        .encode_prompt("The capital of France is", true)
        .unwrap();
    for prompt in [json!(ids), json!([ids])] {
        let (status, by_ids) = post(
            &server,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(status, 200, "{by_ids}");
        assert_eq!(by_ids["choices"][0]["text"], json!(text));
        assert_eq!(by_ids["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    }

    // A stop string ends the text before it.
    let (_, stopped) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stop": ["."]}),
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let stopped_text = stopped["choices"][0]["text"].as_str().unwrap();
    assert!(
        !stopped_text.contains('.') && text.starts_with(stopped_text),
        "{stopped_text}"
    );

    // Streaming gives the same text, then the finish reason, the usage and [DONE].
    let mut streamed_request = request.clone();
    streamed_request["stream"] = json!(true);
    streamed_request["stream_options"] = json!({"include_usage": true});
    let (status, body) = http(
        &server,
        "POST",
        "/v1/completions",
        &streamed_request.to_string(),
    );
    assert_eq!(status, 200);
    let data = events(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str()))
        .collect();
    assert_eq!(joined, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);

    // Chat, plain and streamed.
    let chat = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16, "temperature": 0});
    let (status, reply) = post(&server, "/v1/chat/completions", chat.clone());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!content.is_empty());
    let mut streamed_chat = chat.clone();
    streamed_chat["stream"] = json!(true);
    let (_, body) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        &streamed_chat.to_string(),
    );
    let data = events(&body);
    let deltas: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(deltas, content);

    // Malformed requests: status, an OpenAI error body, and the server keeps serving.
    let cases: Vec<(&str, &str, u16)> = vec![
        ("/v1/completions", "{not json", 400),
        ("/v1/completions", "[1, 2]", 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "model": "gpt-4"}"#,
            404,
        ),
        ("/v1/completions", r#"{"max_tokens": 4}"#, 400),
        ("/v1/completions", r#"{"prompt": ""}"#, 400),
        ("/v1/completions", r#"{"prompt": 42}"#, 400),
        ("/v1/completions", r#"{"prompt": [1, -2]}"#, 400),
        ("/v1/completions", r#"{"prompt": [1, 2.5]}"#, 400),
        ("/v1/completions", r#"{"prompt": [999999999]}"#, 400),
        ("/v1/completions", r#"{"prompt": [[1], 2]}"#, 400),
        ("/v1/completions", r#"{"prompt": [[]]}"#, 400),
        ("/v1/completions", r#"{"prompt": ["a", {}]}"#, 400),
        ("/v1/completions", r#"{"prompt": []}"#, 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 100000}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": "8"}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": 5}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": "hot"}"#,
            400,
        ),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 2}"#, 400),
        ("/v1/completions", r#"{"prompt": "x", "n": 17}"#, 400),
        ("/v1/completions", r#"{"prompt": "x", "n": 0}"#, 400),
        // More choices than the server runs and queues at once (2 + 4).
        ("/v1/completions", r#"{"prompt": "x", "n": 7}"#, 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#,
            400,
        ),
        ("/v1/completions", r#"{"prompt": "x", "stop": [1]}"#, 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "stream": "yes"}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "stream_options": 3}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "presence_penalty": 3}"#,
            400,
        ),
        ("/v1/completions", r#"{"prompt": "x", "logprobs": 21}"#, 400),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
            400,
        ),
        ("/v1/chat/completions", r#"{"messages": []}"#, 400),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            400,
        ),
        ("/v1/chat/completions", r#"{"messages": "hello"}"#, 400),
        ("/v1/nothing", "{}", 404),
    ];
    for (path, body, expected) in &cases {
        let (status, text) = http(&server, "POST", path, body);
        assert_eq!(status, *expected, "{path} {body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path} {body}: no error body: {text}"
        );
    }
    let (status, again) = post(&server, "/v1/completions", request);
    assert_eq!(status, 200);
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);

    // Metrics: what was served above, in Prometheus text format.
    let (status, metrics) = http(&server, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    // 7 completions (2 plain, 2 by token ids, stop, stream, again) and 2 chats succeeded;
    // malformed ones were refused before counting, except the model and context checks after
    // tokenizing.
    assert_eq!(value("tp_requests_total{endpoint=\"completions\"}"), 7.0);
    assert_eq!(
        value("tp_requests_total{endpoint=\"chat_completions\"}"),
        2.0
    );
    assert_eq!(
        value("tp_request_errors_total{class=\"4xx\"}"),
        cases.len() as f64
    );
    assert_eq!(value("tp_queue_depth"), 0.0);
    assert_eq!(value("tp_slots_busy"), 0.0);
    assert!(value("tp_slots_total") >= 1.0);
    // Every pass was timed on both workers, and each of their AllReduces on shared memory.
    let steps = value("tp_steps_total");
    assert!(steps >= 4.0 * 12.0);
    assert_eq!(
        value("tp_worker_step_seconds_count{rank=\"0\",stage=\"0\"}"),
        steps
    );
    assert_eq!(
        value("tp_worker_step_seconds_count{rank=\"1\",stage=\"0\"}"),
        steps
    );
    assert!(value("tp_allreduce_seconds_count{transport=\"shm\"}") >= 2.0 * steps);
    assert!(value("tp_completion_tokens_total") >= 4.0 * 12.0);
    assert_eq!(value("tp_time_to_first_token_seconds_count"), 9.0);
    assert!(value("tp_inter_token_latency_seconds_count") >= 4.0 * 11.0);
}

/// A harmony chat template (gpt-oss's, given with --chat-template-file): the reply's final
/// channel is the content and its analysis channel `reasoning_content`, as
/// `tp::model::harmony::ChannelSplit` splits the raw reply (`reasoning_format: "none"`);
/// streamed deltas add up to the same; bad reasoning fields are refused. SmolLM2 follows the
/// format it sees in the prompt well enough to write channel markers.
#[test]
fn harmony_chat_shows_the_final_channel_and_reasoning_apart() {
    let Some(path) = model(SMOLLM2) else { return };
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden/harmony/gpt-oss.jinja");
    let server = start(
        &path,
        &[
            "-c",
            "1024",
            "--chat-template-file",
            template.to_str().unwrap(),
        ],
    );
    let messages = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "What is 3+3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "3+3=6"},
        {"role": "user", "content": "What is 5+5?"},
    ]);
    let request = |extra: Value| {
        let mut body = json!({"messages": messages, "max_tokens": 40, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let (status, raw) = post(
        &server,
        "/v1/chat/completions",
        request(json!({"reasoning_format": "none"})),
    );
    assert_eq!(status, 200, "{raw}");
    let raw = raw["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        raw.starts_with("<|channel|>final<|message|>"),
        "the raw reply should be in harmony form: {raw:?}"
    );
    let expected = tp::model::harmony::ChannelSplit::split(&raw);
    assert!(!expected.content.is_empty() && !expected.content.contains("<|"));

    let (status, split) = post(&server, "/v1/chat/completions", request(json!({})));
    assert_eq!(status, 200, "{split}");
    let message = &split["choices"][0]["message"];
    assert_eq!(message["content"], json!(expected.content), "{split}");
    assert_eq!(
        message
            .get("reasoning_content")
            .and_then(Value::as_str)
            .unwrap_or(""),
        expected.reasoning
    );

    let (status, text) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        &request(json!({"stream": true})).to_string(),
    );
    assert_eq!(status, 200, "{text}");
    let (mut content, mut reasoning) = (String::new(), String::new());
    for event in events(&text).iter().filter(|e| *e != "[DONE]") {
        let event: Value = serde_json::from_str(event).unwrap();
        let delta = &event["choices"][0]["delta"];
        content.push_str(delta["content"].as_str().unwrap_or(""));
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
        assert!(
            !content.contains("<|"),
            "a marker leaked into a delta: {content:?}"
        );
    }
    assert_eq!((content, reasoning), (expected.content, expected.reasoning));

    // The harmony template's own variable, through OpenAI's field and through kwargs.
    for extra in [
        json!({"reasoning_effort": "high"}),
        json!({"chat_template_kwargs": {"reasoning_effort": "low"}}),
    ] {
        let (status, body) = post(&server, "/v1/chat/completions", request(extra.clone()));
        assert_eq!(status, 200, "{extra}: {body}");
    }
    for (extra, param) in [
        (json!({"reasoning_effort": "max"}), "reasoning_effort"),
        (json!({"reasoning_format": 3}), "reasoning_format"),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
        (
            json!({"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]}),
            "messages",
        ),
        // The template refuses channel markers in an assistant's content.
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<|channel|>final<|message|>y"}, {"role": "user", "content": "z"}]}),
            "messages",
        ),
    ] {
        let (status, body) = post(&server, "/v1/chat/completions", request(extra.clone()));
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], json!(param), "{extra}: {body}");
    }
}

/// The prefix cache: a chat's next turn (resending its history) and a request sharing a system
/// prompt reuse what a slot's KV cache holds, and every reply equals the reply of a server that
/// computes every prompt in full (`--no-prefix-cache`); `/metrics` counts the reused tokens.
#[test]
fn the_prefix_cache_reuses_prompts_and_changes_no_reply() {
    let Some(path) = model(SMOLLM2) else { return };
    let system = "You are a concise assistant who answers in one sentence about geography.";
    let conversation = |server: &Server| -> (Vec<String>, f64) {
        let chat = |messages: Value| greedy_reply(server, &messages);
        let first = chat(json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "What is the capital of France?"},
        ]));
        let second = chat(json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And of Italy?"},
        ]));
        let other = chat(json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "Name a river in Spain."},
        ]));
        (vec![first, second, other], prompt_tokens_cached(server))
    };
    let full = start(
        &path,
        &["-c", "512", "--parallel", "2", "--no-prefix-cache"],
    );
    let (expected, none) = conversation(&full);
    drop(full);
    assert_eq!(none, 0.0);
    let cached = start(&path, &["-c", "512", "--parallel", "2"]);
    let (replies, reused) = conversation(&cached);
    assert_eq!(replies, expected, "the prefix cache changed a reply");
    // The second turn reuses at least the first turn's prompt; the third the system prompt.
    assert!(reused > 40.0, "only {reused} prompt tokens reused");
    println!("prefix cache: {reused} prompt tokens reused; replies {replies:?}");
}

/// A conversation saved (`POST /slots/0?action=save`), the server and its workers stopped, a
/// new cluster started and the slot restored: the next turn reuses the restored tokens and
/// gives exactly the reply it gave without the restart. Restoring into another split, a file
/// that is missing, and names that leave the save directory are refused clearly.
#[test]
fn a_saved_conversation_survives_a_restart() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-slot-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let save = dir.to_str().unwrap();
    let args = [
        "-c",
        "512",
        "--parallel",
        "1",
        "-ctk",
        "q8_0",
        "--slot-save-path",
        save,
    ];
    let first_turn = json!([
        {"role": "user", "content": "Tell me about the river Danube in two sentences."},
    ]);
    let second_turn = |first: &str| {
        json!([
            {"role": "user", "content": "Tell me about the river Danube in two sentences."},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Which countries does it cross?"},
        ])
    };
    let server = start(&path, &args);
    let first = greedy_reply(&server, &first_turn);
    let started = std::time::Instant::now();
    let (status, saved) = post(
        &server,
        "/slots/0?action=save",
        json!({"filename": "danube"}),
    );
    assert_eq!(status, 200, "{saved}");
    let save_ms = started.elapsed().as_secs_f64() * 1e3;
    let n_saved = saved["n_saved"].as_u64().unwrap();
    assert!(n_saved > 20, "{saved}");
    for rank in 0..2 {
        assert!(
            dir.join(format!("danube.rank{rank}")).is_file(),
            "rank {rank}'s file"
        );
    }
    let expected = greedy_reply(&server, &second_turn(&first));
    drop(server);

    let server = start(&path, &args);
    let started = std::time::Instant::now();
    let (status, restored) = post(
        &server,
        "/slots/0?action=restore",
        json!({"filename": "danube"}),
    );
    assert_eq!(status, 200, "{restored}");
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(restored["n_restored"].as_u64(), Some(n_saved), "{restored}");
    assert_eq!(restored["n_read"], saved["n_written"]);
    let before = prompt_tokens_cached(&server);
    assert_eq!(
        greedy_reply(&server, &second_turn(&first)),
        expected,
        "the restored conversation went elsewhere"
    );
    let reused = prompt_tokens_cached(&server) - before;
    assert!(
        reused >= n_saved as f64 - 1.0,
        "only {reused} of {n_saved} restored tokens reused"
    );
    println!(
        "saved {n_saved} tokens ({} bytes over 2 workers) in {save_ms:.1} ms, restored in {restore_ms:.1} ms; the next turn reused {reused}",
        saved["n_written"]
    );
    let (status, body) = post(&server, "/slots/0?action=erase", json!({}));
    assert!(
        status == 200 && body["n_erased"].as_u64().unwrap() > 0,
        "{body}"
    );
    // Bad requests: no file of that name (a failed restore leaves the slot empty), names that
    // leave the directory, an unknown action.
    let (status, body) = post(
        &server,
        "/slots/0?action=restore",
        json!({"filename": "nile"}),
    );
    assert!(
        status == 400 && body.to_string().contains("nile.rank"),
        "{body}"
    );
    for name in ["../danube", "/etc/passwd", ".danube", ""] {
        let (status, body) = post(&server, "/slots/0?action=save", json!({"filename": name}));
        assert!(
            status == 400 && body.to_string().contains("bad file name"),
            "{name}: {body}"
        );
    }
    let (status, body) = post(&server, "/slots/0?action=copy", json!({}));
    assert!(
        status == 400 && body.to_string().contains("unknown slot action"),
        "{body}"
    );
    let (status, body) = post(&server, "/slots/7?action=erase", json!({}));
    assert!(
        status == 400 && body.to_string().contains("no slot 7"),
        "{body}"
    );
    drop(server);

    // Another split: one worker is not the first of two.
    let server = start_with(&[
        "--model",
        path.to_str().unwrap(),
        "--local",
        "1",
        "-c",
        "512",
        "-ctk",
        "q8_0",
        "--slot-save-path",
        save,
    ]);
    let (status, body) = post(
        &server,
        "/slots/0?action=restore",
        json!({"filename": "danube"}),
    );
    assert!(
        status == 400 && body.to_string().contains("rank 0 of 2"),
        "{body}"
    );
    drop(server);
    // Another cache type.
    let server = start(
        &path,
        &["-c", "512", "--parallel", "1", "--slot-save-path", save],
    );
    let (status, body) = post(
        &server,
        "/slots/0?action=restore",
        json!({"filename": "danube"}),
    );
    assert!(
        status == 400 && body.to_string().contains("q8_0/f16"),
        "{body}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A KV budget smaller than the load: eight concurrent requests whose KV would take about three
/// times the pool (`--kv-budget` buying one context of 1024 positions per worker), first with
/// long prompts (requests wait for blocks before starting), then with long replies (running
/// sequences give their blocks back and are recomputed later). Every request completes with
/// exactly the reply of a server whose pool holds them all; `/metrics` shows the waits, the
/// preemptions and the pool's size, and the workers' resident memory grows by no more than the
/// budget (plus their activation buffers), where the unbounded server's grows by the whole load.
#[test]
fn a_full_kv_pool_makes_requests_wait_and_every_one_completes() {
    let Some(path) = model(SMOLLM2) else { return };
    // Long prompts of a story, then short prompts that count on for long replies.
    let story = |i: usize| {
        let sentence = "The river ran past the old mill and the children counted the boats. ";
        format!("Story {i}. {}", sentence.repeat(24))
    };
    let count = |i: usize| {
        let numbers: Vec<String> = (0..12).map(|k| (1000 * (i + 1) + k).to_string()).collect();
        format!("{},", numbers.join(", "))
    };
    let workloads: [(&(dyn Fn(usize) -> String + Sync), usize); 2] = [(&story, 32), (&count, 200)];
    let run = |server: &Server| -> (Vec<String>, u64) {
        let idle: u64 = worker_memory(server).iter().map(|m| m.0).max().unwrap();
        let mut replies = Vec::new();
        for (prompt, max_tokens) in workloads {
            replies.extend(std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        scope.spawn(move || {
                            let prompt = prompt(i);
                            let (status, body) = post(
                                server,
                                "/v1/completions",
                                json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
                            );
                            assert_eq!(status, 200, "request {i}: {body}");
                            body["choices"][0]["text"].as_str().unwrap().to_string()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            }));
        }
        let peak: u64 = worker_memory(server).iter().map(|m| m.1).max().unwrap();
        (replies, peak.saturating_sub(idle))
    };
    let metric = |server: &Server, name: &str| -> f64 {
        let (_, text) = http(server, "GET", "/metrics", "");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    // SmolLM2 at two workers: 11,520 bytes per position on each (f16).
    let per_position = 11_520u64;
    let budget = 1024 * per_position;
    let roomy = start(&path, &["-c", "1024", "--parallel", "8"]);
    let (expected, roomy_growth) = run(&roomy);
    drop(roomy);
    let tight = start(
        &path,
        &[
            "-c",
            "1024",
            "--parallel",
            "8",
            "--kv-budget",
            &budget.to_string(),
        ],
    );
    assert_eq!(metric(&tight, "tp_kv_blocks_total"), 64.0);
    let (replies, growth) = run(&tight);
    let waits = metric(&tight, "tp_kv_admission_waits_total");
    let preempted = metric(&tight, "tp_kv_preemptions_total");
    println!(
        "KV pool of 1024 positions: {waits} requests waited, {preempted} sequences preempted; \
         worker RSS grew {:.1} MiB (unbounded pool: {:.1} MiB)",
        growth as f64 / (1 << 20) as f64,
        roomy_growth as f64 / (1 << 20) as f64
    );
    assert_eq!(replies, expected, "waiting or recomputing changed a reply");
    assert!(waits > 0.0, "no request waited for blocks");
    assert!(preempted > 0.0, "no sequence gave its blocks back");
    assert_eq!(metric(&tight, "tp_kv_blocks_free"), 64.0);
    // Activations of a batch of up to 512 tokens take about 12 MiB more at most.
    let slack = 16u64 << 20;
    assert!(
        growth <= budget + slack,
        "worker RSS grew {growth} bytes with a budget of {budget}"
    );
    assert!(
        roomy_growth > growth + (8 << 20),
        "the unbounded pool grew {roomy_growth} bytes, the bounded {growth}: the load did not need the budget"
    );
}

/// `n` choices of one prompt: greedy ones equal the single reply, sampled ones take seeds
/// `seed`, `seed + 1`, ... (so choice 1 equals a single request with the next seed), streamed
/// ones arrive interleaved by index; the later choices share the first's prompt blocks
/// (`tp_prompt_tokens_cached_total` grows by their full blocks) and usage counts the prompt once.
#[test]
fn several_choices_share_the_prompt() {
    let Some(path) = model(SMOLLM2) else { return };
    let server = start(&path, &["-c", "512", "--parallel", "4"]);
    let prompt = "The lighthouse keeper wrote in his log every night. ".repeat(6);
    let complete = |extra: Value| -> Value {
        let mut body = json!({"prompt": prompt, "max_tokens": 12});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, body) = post(&server, "/v1/completions", body);
        assert_eq!(status, 200, "{body}");
        body
    };
    let before = prompt_tokens_cached(&server);
    let three = complete(json!({"n": 3, "temperature": 0}));
    let shared = prompt_tokens_cached(&server) - before;
    let prompt_tokens = three["usage"]["prompt_tokens"].as_u64().unwrap();
    // Each later choice shares the first's whole blocks of 16 (the last token runs again).
    let blocks = (prompt_tokens - 1) / 16 * 16;
    assert!(
        shared >= 2.0 * blocks as f64,
        "the later choices reused {shared} prompt tokens, fewer than 2 x {blocks}"
    );
    let single = complete(json!({"temperature": 0}));
    let text = |body: &Value, i: usize| body["choices"][i]["text"].as_str().unwrap().to_string();
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(text(&three, i), text(&single, 0), "greedy choice {i}");
    }
    assert_eq!(
        three["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );
    assert_eq!(
        three["usage"]["completion_tokens"].as_u64().unwrap(),
        3 * single["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // Sampled: choice i samples with seed + i.
    let sampled = complete(json!({"n": 2, "temperature": 1.0, "seed": 5}));
    let next_seed = complete(json!({"temperature": 1.0, "seed": 6}));
    assert_eq!(text(&sampled, 1), text(&next_seed, 0));
    assert_ne!(text(&sampled, 0), text(&sampled, 1), "two choices alike");
    // Streamed: both indexes, each choice's pieces adding up to its text, one [DONE].
    let body = json!({"prompt": prompt, "max_tokens": 12, "n": 2, "temperature": 1.0, "seed": 5, "stream": true});
    let (status, stream) = http(&server, "POST", "/v1/completions", &body.to_string());
    assert_eq!(status, 200);
    let data = events(&stream);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["text"].as_str().unwrap());
        finished[i] |= !choice["finish_reason"].is_null();
    }
    assert_eq!(finished, [true, true]);
    assert_eq!(texts, [text(&sampled, 0), text(&sampled, 1)]);
    // Several prompts (as text and as token ids), n = 2 each: the choices go prompt by prompt,
    // each equal to its prompt run alone; usage counts each prompt once.
    let other = json!("Once upon a time, in a quiet village by the sea,");
    let ids = json!([504, 3575, 282, 4649, 314]); // "The capital of France is"
    for second in [other, ids] {
        let alone = complete(json!({"prompt": second, "temperature": 0}));
        let batch = complete(json!({"prompt": [prompt, second], "n": 2, "temperature": 0}));
        let choices = batch["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4, "{batch}");
        let want = [&single, &single, &alone, &alone];
        for (i, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], i);
            assert_eq!(
                text(&batch, i),
                text(want[i], 0),
                "prompt {} choice {i}",
                i / 2
            );
        }
        let prompts = |b: &Value| b["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(prompts(&batch), prompts(&single) + prompts(&alone));
    }
}
