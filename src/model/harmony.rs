//! The harmony response format (gpt-oss): a reply is a run of messages, each
//! `<|channel|>NAME<|message|>TEXT<|end|>`, the later ones opened by `<|start|>assistant`.
//! The `analysis` channel is the model's reasoning, `final` (and a `commentary` preamble) its
//! answer. The chat endpoint shows the answer as `content` and the reasoning as
//! `reasoning_content`, as llama-server does.
//!
//! [`ChannelSplit`] reads the generated text as it streams (the markers are user-defined tokens,
//! so they are part of the text) and hands out each piece to the field it belongs to, holding
//! back only a possible marker's beginning. A reply that does not open with a channel header is
//! plain content; a message addressed to a tool (` to=...` in its header) is dropped, since tp
//! runs no tools.

const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
const END: &str = "<|end|>";
const START: &str = "<|start|>";

/// Text for the two fields, in the order it was generated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Split {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }

    fn append(&mut self, other: Split) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Reasoning,
    Content,
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: a channel header, or plain text.
    Opening,
    /// Inside `<|channel|>...<|message|>` (or a role line before it).
    Header,
    /// A message's text, up to `<|end|>`.
    Body(Target),
    /// After `<|end|>`: `<|start|>ROLE` and the next header.
    Between,
    /// The reply is not in harmony form: everything is content.
    Plain,
}

/// Streaming splitter of a harmony reply into reasoning and content.
#[derive(Debug)]
pub struct ChannelSplit {
    state: State,
    /// Text received but not yet handed out.
    pending: String,
}

impl Default for ChannelSplit {
    fn default() -> Self {
        ChannelSplit::new()
    }
}

impl ChannelSplit {
    pub fn new() -> ChannelSplit {
        ChannelSplit {
            state: State::Opening,
            pending: String::new(),
        }
    }

    /// Takes the next piece of generated text; returns what can be handed out now.
    pub fn push(&mut self, text: &str) -> Split {
        self.pending.push_str(text);
        let mut out = Split::default();
        while self.step(&mut out, false) {}
        out
    }

    /// The end of the reply: hands out whatever was held back.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        while self.step(&mut out, true) {}
        out
    }

    /// Whole-text form.
    pub fn split(text: &str) -> Split {
        let mut splitter = ChannelSplit::new();
        let mut out = splitter.push(text);
        out.append(splitter.finish());
        out
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, out: &mut Split, end: bool) -> bool {
        match self.state {
            State::Opening => {
                if self.pending.starts_with(CHANNEL) {
                    self.state = State::Header;
                } else if CHANNEL.starts_with(self.pending.as_str()) && !end {
                    return false;
                } else {
                    self.state = State::Plain;
                }
                true
            }
            State::Plain => {
                out.content.push_str(&self.pending);
                self.pending.clear();
                false
            }
            State::Header => {
                let Some(at) = self.pending.find(MESSAGE) else {
                    if end {
                        // A header cut off by the token limit carries no text.
                        self.pending.clear();
                    }
                    return false;
                };
                let header = &self.pending[..at];
                let target = if addressed_to_tool(header) {
                    Target::Dropped
                } else {
                    match channel_name(header) {
                        Some("analysis") => Target::Reasoning,
                        Some("final" | "commentary") => Target::Content,
                        _ => Target::Dropped,
                    }
                };
                self.pending.drain(..at + MESSAGE.len());
                self.state = State::Body(target);
                true
            }
            State::Body(target) => {
                let (text, done) = match self.pending.find(END) {
                    Some(at) => (at, true),
                    None if end => (self.pending.len(), false),
                    None => (self.pending.len() - held_back(&self.pending, END), false),
                };
                match target {
                    Target::Reasoning => out.reasoning.push_str(&self.pending[..text]),
                    Target::Content => out.content.push_str(&self.pending[..text]),
                    Target::Dropped => {}
                }
                if done {
                    self.pending.drain(..text + END.len());
                    self.state = State::Between;
                    true
                } else {
                    self.pending.drain(..text);
                    false
                }
            }
            State::Between => {
                // `<|start|>assistant` (perhaps with a recipient) then the next header.
                if let Some(rest) = self.pending.strip_prefix(START) {
                    if rest.contains(CHANNEL) {
                        // The role line stays: it may name a tool as the recipient.
                        self.pending.drain(..START.len());
                        self.state = State::Header;
                        return true;
                    }
                    if end {
                        self.pending.clear();
                    }
                    return false;
                }
                if START.starts_with(self.pending.as_str()) && !end {
                    return false;
                }
                if self.pending.starts_with(CHANNEL) {
                    self.state = State::Header;
                    return true;
                }
                // Text outside any message: the model left the format; show it.
                self.state = State::Plain;
                true
            }
        }
    }
}

/// The channel named in a header such as `<|channel|>final <|constrain|>json` (the last one, when
/// a stray header precedes it).
fn channel_name(header: &str) -> Option<&str> {
    let rest = &header[header.rfind(CHANNEL)? + CHANNEL.len()..];
    let end = rest.find([' ', '<']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Whether a header (with its role line) addresses a recipient other than the assistant, as a
/// tool call's `assistant to=functions.NAME<|channel|>commentary` does.
fn addressed_to_tool(header: &str) -> bool {
    header
        .match_indices(" to=")
        .any(|(at, to)| !header[at + to.len()..].starts_with("assistant"))
}

/// Bytes at the end of `text` that begin `marker` (and so may complete it with the next piece).
fn held_back(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    /// The same reply fed whole, byte by byte (on char boundaries) and in every two-piece cut
    /// gives the same split.
    fn check(text: &str, expected: Split) {
        assert_eq!(ChannelSplit::split(text), expected, "whole: {text:?}");
        let mut splitter = ChannelSplit::new();
        let mut streamed = Split::default();
        for c in text.chars() {
            streamed.append(splitter.push(c.encode_utf8(&mut [0; 4])));
        }
        streamed.append(splitter.finish());
        assert_eq!(streamed, expected, "char by char: {text:?}");
        for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let mut splitter = ChannelSplit::new();
            let mut out = splitter.push(&text[..cut]);
            out.append(splitter.push(&text[cut..]));
            out.append(splitter.finish());
            assert_eq!(out, expected, "cut at {cut}: {text:?}");
        }
    }

    #[test]
    fn analysis_then_final() {
        check(
            "<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hello, how can I help?",
            split("User greets. Reply.", "Hello, how can I help?"),
        );
    }

    #[test]
    fn final_only_and_preamble() {
        check("<|channel|>final<|message|>Hi", split("", "Hi"));
        check(
            "<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant<|channel|>final<|message|> Done.",
            split("", "Let me look. Done."),
        );
        // A stray commentary header before the analysis one (gpt-oss-20b does this).
        check(
            "<|channel|>commentary to=assistant<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>ok",
            split("think", "ok"),
        );
    }

    #[test]
    fn markers_split_anywhere_are_held_back_not_shown() {
        check(
            "<|channel|>analysis<|message|>a < b and <|en is not an end<|end|><|start|>assistant<|channel|>final<|message|>x <| y",
            split("a < b and <|en is not an end", "x <| y"),
        );
    }

    #[test]
    fn tool_calls_are_dropped() {
        check(
            "<|channel|>analysis<|message|>need weather<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"city\":\"Paris\"}<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.",
            split("need weather", "It is sunny."),
        );
        check(
            "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|end|>",
            split("", ""),
        );
    }

    #[test]
    fn plain_text_is_content() {
        check("Just an answer.", split("", "Just an answer."));
        check("<|chan", split("", "<|chan"));
        check("", split("", ""));
        // Leaving the format after a message: the rest is shown.
        check(
            "<|channel|>analysis<|message|>r<|end|>stray text",
            split("r", "stray text"),
        );
    }

    #[test]
    fn cut_off_replies_keep_what_was_said() {
        // max_tokens inside the reasoning, inside a header, inside a marker.
        check(
            "<|channel|>analysis<|message|>half a tho",
            split("half a tho", ""),
        );
        check(
            "<|channel|>analysis<|message|>r<|end|><|start|>assist",
            split("r", ""),
        );
        check("<|channel|>fin", split("", ""));
        check("<|channel|>final<|message|>ab<|e", split("", "ab<|e"));
    }

    #[test]
    fn multibyte_text_streams_intact() {
        check(
            "<|channel|>analysis<|message|>héllo — ünïcode<|end|><|start|>assistant<|channel|>final<|message|>日本語",
            split("héllo — ünïcode", "日本語"),
        );
    }
}
