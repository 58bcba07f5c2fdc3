//! One sequence's generation after its prompt: sampling from each merged distribution,
//! log-probabilities, stop strings and the text released to the client. Shared by
//! `Session::generate` (one sequence) and the server's batching engine (many at once).

use anyhow::{Context, bail};

use crate::coordinator::sampler::{Rng, SamplingParams, sample};
use crate::coordinator::session::{DEFAULT_CANDIDATES, Distribution};
use crate::model::tokenizer::{TextStream, Tokenizer};

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stop {
    /// The model's end-of-generation token.
    Eos,
    /// A stop string (not part of the text).
    Stop,
    /// `max_tokens`.
    Limit,
    /// The client went away.
    Cancelled,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::Stop => "stop",
            Stop::Limit => "limit",
            Stop::Cancelled => "cancelled",
        }
    }

    /// OpenAI's `finish_reason`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            Stop::Limit => "length",
            _ => "stop",
        }
    }
}

/// What a sequence asks for.
#[derive(Clone, Debug)]
pub struct SequenceSpec {
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Report this many alternatives' log-probabilities per generated token (0: none).
    pub top_logprobs: usize,
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct Sampled {
    pub token: u32,
    /// log P(token) under the model's distribution (before penalties and temperature).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
    /// Text now safe to hand to the client: complete characters that cannot be the start of a
    /// stop string. May be empty; text held back comes out with a later token or at the end.
    pub text: String,
    /// Set when this token ended the sequence.
    pub stop: Option<Stop>,
}

pub struct Decoder {
    spec: SequenceSpec,
    rng: Rng,
    /// Prompt and generated tokens, for the penalties.
    history: Vec<u32>,
    generated: usize,
    stream: TextStream,
    /// Everything decoded so far (without a stop string and what follows it).
    text: String,
    /// How much of `text` has been released.
    released: usize,
}

impl Decoder {
    pub fn new(spec: SequenceSpec, prompt: &[u32]) -> anyhow::Result<Decoder> {
        spec.params.validate().map_err(|e| anyhow::anyhow!(e))?;
        if spec.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        Ok(Decoder {
            rng: Rng::new(spec.params.seed),
            history: prompt.to_vec(),
            spec,
            generated: 0,
            stream: TextStream::new(),
            text: String::new(),
            released: 0,
        })
    }

    /// Candidates each worker should send per position for this sequence.
    pub fn candidates(&self) -> usize {
        DEFAULT_CANDIDATES
            .max(self.spec.params.top_k)
            .max(self.spec.top_logprobs)
            .min(1000)
    }

    /// Whether sampling needs the whole logits row rather than the candidates.
    pub fn needs_full_logits(&self) -> bool {
        self.spec.params.needs_full_logits(self.candidates())
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The text so far, without a stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Samples the next token from `distribution` and advances the text.
    pub fn next(
        &mut self,
        distribution: &Distribution,
        tokenizer: &Tokenizer,
    ) -> anyhow::Result<Sampled> {
        let full_pool;
        let pool: &[(u32, f32)] = match &distribution.full {
            Some(full) => {
                full_pool = full
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l))
                    .collect::<Vec<_>>();
                &full_pool
            }
            None => &distribution.candidates,
        };
        let token = sample(pool, &self.spec.params, &self.history, &mut self.rng)
            .context("no candidates to sample")?;
        let logit = distribution
            .full
            .as_ref()
            .and_then(|full| full.get(token as usize).copied())
            .or_else(|| {
                distribution
                    .candidates
                    .iter()
                    .find(|c| c.0 == token)
                    .map(|c| c.1)
            })
            .context("the sampled token has no logit")?;
        let top = distribution
            .candidates
            .iter()
            .take(self.spec.top_logprobs)
            .map(|&(id, l)| (id, distribution.logprob(l)))
            .collect();
        self.history.push(token);
        self.generated += 1;
        let mut sampled = Sampled {
            token,
            logprob: distribution.logprob(logit),
            top,
            text: String::new(),
            stop: None,
        };
        if tokenizer.is_end_of_generation(token) {
            sampled.stop = Some(Stop::Eos);
            self.text.push_str(&self.stream.finish());
        } else {
            let piece = self.stream.push(tokenizer.token_bytes(token));
            self.text.push_str(&piece);
            if let Some(at) = self
                .spec
                .stop_strings
                .iter()
                .filter_map(|s| self.text[self.released..].find(s.as_str()))
                .min()
            {
                self.text.truncate(self.released + at);
                sampled.stop = Some(Stop::Stop);
            } else if self.generated == self.spec.max_tokens {
                self.text.push_str(&self.stream.finish());
                sampled.stop = Some(Stop::Limit);
            }
        }
        // Release all at the end; otherwise keep back a tail that may begin a stop string.
        let keep = if sampled.stop.is_some() {
            0
        } else {
            self.held_back()
        };
        let end = self.text.len() - keep;
        if end > self.released {
            sampled.text = self.text[self.released..end].to_string();
            self.released = end;
        }
        Ok(sampled)
    }

    /// Bytes at the end of the unreleased text that are a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let pending = &self.text[self.released..];
        let mut keep = 0;
        for stop in &self.spec.stop_strings {
            for (i, _) in pending.char_indices() {
                let tail = &pending[i..];
                if tail.len() < stop.len() && stop.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(stop: &[&str], max_tokens: usize) -> SequenceSpec {
        SequenceSpec {
            max_tokens,
            params: SamplingParams::greedy(),
            stop_strings: stop.iter().map(|s| s.to_string()).collect(),
            top_logprobs: 2,
        }
    }

    /// A distribution whose best candidate is `token`.
    fn pick(token: u32) -> Distribution {
        Distribution {
            candidates: vec![(token, 3.0), (token + 1, 1.0)],
            log_sum_exp: 3.5,
            full: None,
        }
    }

    #[test]
    fn held_back_text_is_released_or_cut_at_a_stop_string() {
        let Some(tokenizer) = crate::model::tokenizer::tests::smollm2() else {
            return;
        };
        // Token ids of single characters, found through the tokenizer.
        let id = |s: &str| {
            let ids = tokenizer.encode(s, false).unwrap();
            assert_eq!(ids.len(), 1, "{s:?}");
            ids[0]
        };
        let mut d = Decoder::new(spec(&["xyz"], 10), &[]).unwrap();
        let a = d.next(&pick(id("a")), tokenizer).unwrap();
        assert_eq!((a.text.as_str(), a.stop), ("a", None));
        assert!((a.logprob - (3.0 - 3.5)).abs() < 1e-6);
        assert_eq!(a.top.len(), 2);
        // "x" may start the stop string: held back, then released when "q" follows.
        assert_eq!(d.next(&pick(id("x")), tokenizer).unwrap().text, "");
        assert_eq!(d.next(&pick(id("q")), tokenizer).unwrap().text, "xq");
        assert_eq!(d.next(&pick(id("x")), tokenizer).unwrap().text, "");
        assert_eq!(d.next(&pick(id("y")), tokenizer).unwrap().text, "");
        let last = d.next(&pick(id("z")), tokenizer).unwrap();
        assert_eq!((last.text.as_str(), last.stop), ("", Some(Stop::Stop)));
        assert_eq!(d.text(), "axq");

        let mut d = Decoder::new(spec(&["xyz"], 2), &[]).unwrap();
        d.next(&pick(id("b")), tokenizer).unwrap();
        let last = d.next(&pick(id("x")), tokenizer).unwrap();
        assert_eq!((last.text.as_str(), last.stop), ("x", Some(Stop::Limit)));
    }
}
