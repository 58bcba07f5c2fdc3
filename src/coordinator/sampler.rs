//! Sampling from merged candidates (DESIGN section 5), in llama.cpp's order:
//! penalties (repetition, then frequency and presence), top-k, top-p, min-p, temperature, then
//! a seeded draw.

#[derive(Clone, Debug, serde::Serialize)]
pub struct SamplingParams {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the recent window (OpenAI's
    /// `frequency_penalty`, -2..=2).
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit when it occurs at all in the recent window (OpenAI's
    /// `presence_penalty`, -2..=2).
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // llama.cpp's defaults.
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        check(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0",
        )?;
        check(
            (0.0..=1.0).contains(&self.top_p),
            "top-p must be within 0..=1",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "min-p must be within 0..=1",
        )?;
        check(
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0,
            "repeat-penalty must be > 0",
        )?;
        check(
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "frequency penalty must be within -2..=2",
        )?;
        check(
            (-2.0..=2.0).contains(&self.presence_penalty),
            "presence penalty must be within -2..=2",
        )
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Whether the candidates from the workers' top-k lists are enough to sample exactly; if not,
    /// the coordinator asks for whole logits.
    pub fn needs_full_logits(&self, candidates_per_rank: usize) -> bool {
        if self.penalizes() {
            // A penalized candidate can drop below tokens that no worker sent.
            return true;
        }
        self.temperature > 0.0 && (self.top_k == 0 || self.top_k > candidates_per_rank)
    }
}

/// A deterministic generator (SplitMix64): the same seed gives the same tokens on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks a token from `candidates` (id, logit), which hold at least every token that can win.
pub fn sample(
    candidates: &[(u32, f32)],
    params: &SamplingParams,
    recent: &[u32],
    rng: &mut Rng,
) -> Option<u32> {
    let mut c: Vec<(u32, f32)> = candidates.to_vec();
    if params.penalizes() {
        let window = &recent[recent.len().saturating_sub(params.repeat_last_n)..];
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &id in window {
            *counts.entry(id).or_default() += 1;
        }
        for (id, logit) in c.iter_mut() {
            let Some(&count) = counts.get(id) else {
                continue;
            };
            if *logit > 0.0 {
                *logit /= params.repeat_penalty;
            } else {
                *logit *= params.repeat_penalty;
            }
            *logit -= count as f32 * params.frequency_penalty + params.presence_penalty;
        }
    }
    c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.temperature <= 0.0 {
        return c.first().map(|x| x.0);
    }
    if params.top_k > 0 {
        c.truncate(params.top_k);
    }
    let probabilities = |c: &[(u32, f32)], temperature: f32| -> Vec<f64> {
        let max = c.first().map_or(0.0, |x| x.1) as f64;
        let e: Vec<f64> = c
            .iter()
            .map(|x| ((x.1 as f64 - max) / temperature as f64).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|v| v / sum).collect()
    };
    if params.top_p < 1.0 {
        let p = probabilities(&c, 1.0);
        let mut cumulative = 0.0;
        let mut keep = c.len();
        for (i, pi) in p.iter().enumerate() {
            cumulative += pi;
            if cumulative >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep.max(1));
    }
    if params.min_p > 0.0 {
        let p = probabilities(&c, 1.0);
        let threshold = p[0] * params.min_p as f64;
        let keep = p.iter().take_while(|&&pi| pi >= threshold).count();
        c.truncate(keep.max(1));
    }
    let p = probabilities(&c, params.temperature);
    let mut draw = rng.next_f64();
    for (i, pi) in p.iter().enumerate() {
        if draw < *pi {
            return Some(c[i].0);
        }
        draw -= pi;
    }
    c.last().map(|x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_penalty_can_change_it() {
        let c = [(5, 2.0), (7, 1.9), (9, -1.0)];
        assert_eq!(
            sample(&c, &SamplingParams::greedy(), &[], &mut Rng::new(0)),
            Some(5)
        );
        let penalized = SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        assert_eq!(sample(&c, &penalized, &[5], &mut Rng::new(0)), Some(7));
    }

    #[test]
    fn frequency_and_presence_penalties_count_occurrences() {
        let c = [(5, 2.0), (7, 1.75), (9, 1.5)];
        let frequency = SamplingParams {
            frequency_penalty: 0.2,
            ..SamplingParams::greedy()
        };
        // One occurrence: 5 drops to 1.8 and still wins; two: 1.6 loses to 7.
        assert_eq!(sample(&c, &frequency, &[5], &mut Rng::new(0)), Some(5));
        assert_eq!(sample(&c, &frequency, &[5, 5], &mut Rng::new(0)), Some(7));
        let presence = SamplingParams {
            presence_penalty: 0.6,
            ..SamplingParams::greedy()
        };
        // Presence does not grow with the count: 5 (three times) falls to 1.4 and 7 to 1.15;
        // 9 wins with 1.5.
        assert_eq!(
            sample(&c, &presence, &[5, 5, 5, 7], &mut Rng::new(0)),
            Some(9)
        );
        // Outside the window nothing is penalized.
        let short = SamplingParams {
            repeat_last_n: 1,
            ..presence
        };
        assert_eq!(sample(&c, &short, &[5, 7, 9], &mut Rng::new(0)), Some(5));
        assert!(
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::greedy()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn seeded_sampling_is_repeatable_and_respects_filters() {
        let c: Vec<(u32, f32)> = (0..50).map(|i| (i, -(i as f32) * 0.1)).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..200)
                .map(|_| sample(&c, &params, &[], &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|&t| t < 5));
        assert!(
            draw(7)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 2
        );
        // min-p 0.9 keeps only tokens within 10% of the best's probability.
        let strict = SamplingParams {
            min_p: 0.95,
            top_k: 0,
            ..params
        };
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| sample(&c, &strict, &[], &mut rng) == Some(0)));
    }
}
