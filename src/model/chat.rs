//! Chat templates: the GGUF's `tokenizer.chat_template` (Jinja) rendered with minijinja, set up
//! the way HuggingFace `transformers` renders them (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, a `tojson` that writes like Python's `json.dumps`, and Python
//! string methods through minijinja-contrib's pycompat), plus `strftime_now` (local time, as
//! llama.cpp gives it) and the request's `chat_template_kwargs`.

use minijinja::value::{Kwargs, Serde};
use minijinja::{AutoEscape, Environment, ErrorKind, Value as JinjaValue, context};

use crate::model::gguf::{GgufError, GgufFile};
use crate::model::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's reasoning (the API's `reasoning_content`), under the name harmony
    /// templates read; absent from the template's view when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            thinking: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("the chat template (tokenizer.chat_template) does not compile: {0}")]
    Compile(String),
    #[error("the chat template raised an error: {0}")]
    Raised(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("a chat needs at least one message")]
    NoMessages,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_chars", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// The message `raise_exception` raised, recognised again when rendering fails.
const RAISED_PREFIX: &str = "raise_exception: ";

fn raise_exception(message: String) -> Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_PREFIX}{message}"),
    ))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, not HTML-escaped.
fn tojson(value: &JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, minijinja::Error> {
    let indent: Option<JinjaValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
            (Some(s), _) => Some(s.to_string()),
            (None, Ok(n)) => Some(" ".repeat(n.max(0) as usize)),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonStyle {
    fn write_string(&self, s: &str, out: &mut String) {
        // serde_json escapes exactly what Python's json does with ensure_ascii=False.
        let quoted = serde_json::to_string(s).expect("strings serialize");
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match value {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => out.push_str(&n.to_string()),
            J::String(s) => self.write_string(s, out),
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write_string(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }
}

impl ChatTemplate {
    /// The GGUF's `tokenizer.chat_template`, or `None` when it has none.
    pub fn from_gguf(
        file: &GgufFile,
        tokenizer: &Tokenizer,
    ) -> Result<Option<ChatTemplate>, ChatError> {
        let Some(source) = file.get_str("tokenizer.chat_template")? else {
            return Ok(None);
        };
        ChatTemplate::for_tokenizer(source, tokenizer).map(Some)
    }

    /// Compiles `source` with the tokenizer's BOS and EOS texts.
    pub fn for_tokenizer(
        source: impl Into<String>,
        tokenizer: &Tokenizer,
    ) -> Result<ChatTemplate, ChatError> {
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or("")
                .to_string()
        };
        ChatTemplate::new(source, text(tokenizer.bos_id()), text(tokenizer.eos_id()))
    }

    /// Compiles a template; `bos_token` and `eos_token` are the texts the template may print.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, ChatError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| ChatError::Compile(e.to_string()))?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatError::Compile(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether replies come in harmony's channels (gpt-oss), recognised as llama.cpp does: by
    /// the template's `<|channel|>` marker.
    pub fn is_harmony(&self) -> bool {
        self.source.contains("<|channel|>")
    }

    /// Renders `messages`; with `add_generation_prompt` the prompt ends where the assistant's
    /// reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// `render` with extra variables (a request's `chat_template_kwargs`, such as harmony's
    /// `reasoning_effort`); they cannot replace `messages` and the other fixed names.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::NoMessages);
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Compile(describe(&e)))?;
        let ctx = context! {
            messages => Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            ..JinjaValue::from(Serde(kwargs))
        };
        template.render(ctx).map_err(|e| {
            match e.detail().and_then(|d| d.strip_prefix(RAISED_PREFIX)) {
                Some(message) => ChatError::Raised(message.to_string()),
                None => ChatError::Render(describe(&e)),
            }
        })
    }
}

/// `strftime_now(format)`: the local time now, formatted as C's `strftime` does.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let now = jiff::ZonedDateTime::now();
    jiff::fmt::strtime::format(format.as_str(), &now).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {e}"),
        )
    })
}

/// An error with its causes, on one line.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::tests::{QWEN, SMOLLM2, golden_json, model_path};

    /// Recovers the messages from a ChatML prompt rendered by llama.cpp.
    fn chatml_messages(prompt: &str) -> Vec<ChatMessage> {
        let body = prompt
            .strip_suffix("<|im_start|>assistant\n")
            .expect("ends with the generation prompt");
        body.split_terminator("<|im_end|>\n")
            .map(|turn| {
                let turn = turn
                    .strip_prefix("<|im_start|>")
                    .expect("turn starts with <|im_start|>");
                let (role, content) = turn.split_once('\n').expect("role line");
                ChatMessage::new(role, content)
            })
            .collect()
    }

    fn check_golden(model: &str, golden: &str, default_system: &str) {
        let (Some(path), Some(golden)) = (model_path(model), golden_json(golden)) else {
            return;
        };
        let file = GgufFile::open(&path).unwrap();
        let tokenizer = Tokenizer::from_gguf(&file).unwrap();
        let template = ChatTemplate::from_gguf(&file, &tokenizer)
            .unwrap()
            .expect("the model has a template");
        let mut checked = 0;
        for case in golden["cases"].as_array().unwrap() {
            if case["kind"] != "chat" {
                continue;
            }
            let prompt = case["prompt"].as_str().unwrap();
            let mut messages = chatml_messages(prompt);
            // Drop the default system prompt that the template itself inserts.
            if messages[0].role == "system" && messages[0].content == default_system {
                messages.remove(0);
            }
            assert_eq!(
                template.render(&messages, true).unwrap(),
                prompt,
                "case {}",
                case["id"]
            );
            checked += 1;
        }
        assert_eq!(checked, 5);
    }

    #[test]
    fn smollm2_golden_chats() {
        check_golden(
            SMOLLM2,
            "generate.json",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        );
    }

    #[test]
    fn qwen_golden_chats() {
        check_golden(
            QWEN,
            "qwen2.5-0.5b/generate.json",
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        );
    }

    #[test]
    fn qwen_multi_turn_and_no_generation_prompt() {
        let Some(path) = model_path(QWEN) else { return };
        let file = GgufFile::open(&path).unwrap();
        let tokenizer = Tokenizer::from_gguf(&file).unwrap();
        let template = ChatTemplate::from_gguf(&file, &tokenizer).unwrap().unwrap();
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        );
    }

    #[test]
    fn template_features() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\
             {{ m.content.strip() | upper }}{{ m | tojson }}{% if loop.first %}{% continue %}{% endif %}!{% endfor %}\
             {{ {'b': [1, 2.5], 'a': 'é\"'} | tojson(indent=2) }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = template
            .render(
                &[
                    ChatMessage::new("user", " hi "),
                    ChatMessage::new("assistant", "<ok>"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>HI{\"content\": \" hi \", \"role\": \"user\"}<OK>{\"content\": \"<ok>\", \"role\": \"assistant\"}!\
             {\n  \"a\": \"é\\\"\",\n  \"b\": [\n    1,\n    2.5\n  ]\n}</s>"
        );
        let err = template
            .render(&[ChatMessage::new("bad", "x")], true)
            .unwrap_err();
        assert!(
            matches!(&err, ChatError::Raised(m) if m == "no bad"),
            "{err}"
        );
        assert!(matches!(
            template.render(&[], true),
            Err(ChatError::NoMessages)
        ));
        let err = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
        let err = ChatTemplate::new("{{ messages[0].content | nosuchfilter }}", "", "")
            .and_then(|t| t.render(&[ChatMessage::new("user", "x")], true))
            .unwrap_err();
        assert!(err.to_string().contains("nosuchfilter"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let template = ChatTemplate::new(
            "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::new("user", "a")], true)
                .unwrap(),
            "a\n"
        );
    }

    /// gpt-oss's harmony template (llama.cpp's copy) renders as llama.cpp renders it, with
    /// reasoning in earlier assistant turns and `chat_template_kwargs`; `strftime_now` gives
    /// today's date.
    #[test]
    fn harmony_template_renders_as_llama_cpp() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden/harmony");
        let source = std::fs::read_to_string(dir.join("gpt-oss.jinja")).unwrap();
        let template = ChatTemplate::new(source, "<|startoftext|>", "<|return|>").unwrap();
        assert!(template.is_harmony());
        let golden: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.join("apply_template.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(golden.len(), 7);
        let today = jiff::ZonedDateTime::now().strftime("%Y-%m-%d").to_string();
        for chat in &golden {
            let messages: Vec<ChatMessage> = chat["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    // As the server reads them.
                    let role = match m["role"].as_str().unwrap() {
                        "developer" => "system",
                        role => role,
                    };
                    let mut message = ChatMessage::new(role, m["content"].as_str().unwrap());
                    message.thinking = m["reasoning_content"].as_str().map(str::to_string);
                    message
                })
                .collect();
            let kwargs = chat["chat_template_kwargs"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let ours = template.render_with(&messages, true, &kwargs).unwrap();
            let date = format!("Current date: {today}\n");
            assert!(ours.contains(&date), "{}: {ours}", chat["name"]);
            let ours = ours.replacen(&date, "Current date: DATE\n", 1);
            assert_eq!(ours, chat["prompt"].as_str().unwrap(), "{}", chat["name"]);
        }
        // kwargs cannot replace the fixed variables.
        let messages = [ChatMessage::new("user", "x")];
        let spoofed = template
            .render_with(
                &messages,
                true,
                &serde_json::from_str(r#"{"messages": [], "add_generation_prompt": false}"#)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(spoofed, template.render(&messages, true).unwrap());
    }

    #[test]
    fn strftime_now_rejects_bad_formats() {
        let template = ChatTemplate::new("{{ strftime_now('%Y %') }}", "", "").unwrap();
        let err = template
            .render(&[ChatMessage::new("user", "x")], true)
            .unwrap_err();
        assert!(err.to_string().contains("strftime_now"), "{err}");
    }
}
