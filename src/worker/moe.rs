//! One rank's part of a mixture-of-experts FFN (DESIGN section 2).
//!
//! Every rank routes every token itself: the router reads the mirrored normed hidden state, so
//! all ranks select the same experts with the same weights without exchanging anything. A rank
//! then computes its part of each selected expert (its columns of every expert under a tensor
//! split, its whole experts under an expert split), multiplies each expert's partial output by
//! the token's routing weight and sums them into the layer's one `Partial` buffer. The
//! AllReduce after the layer completes the sum, so a mixture-of-experts layer costs the same two
//! AllReduces of `d_model` values as a dense one.
//!
//! A batch is grouped by expert: each expert's weights are read once for all the tokens routed
//! to it, as one matrix product over those tokens.

use std::ops::Range;
use std::sync::Arc;

use crate::kernels::cpu::{PreparedActivations, QuantType, f32_dot, matmul, matmul_f64};
use crate::model::arch::Activation;
use crate::worker::shard::Weight;

/// gpt-oss's clamped SwiGLU (ggml's swiglu_oai with alpha 1.702 and limit 7): the gate
/// clamped from above, the up value to [-7, 7] and shifted by one.
pub fn swiglu_oai(gate: f32, up: f32) -> f32 {
    const ALPHA: f32 = 1.702;
    const LIMIT: f32 = 7.0;
    let x = gate.min(LIMIT);
    let y = up.clamp(-LIMIT, LIMIT);
    x / (1.0 + (ALPHA * -x).exp()) * (y + 1.0)
}

/// gpt-oss's routing: the `used` largest raw logits (ties to the lower index), weighted by a
/// softmax over those alone. Writes `(expert, weight)` pairs, best first.
pub fn route_top_then_softmax(logits: &[f32], used: usize, out: &mut Vec<(usize, f32)>) {
    let start = out.len();
    push_top(logits.iter().copied(), used, out);
    let max = out[start..].first().map_or(0.0, |&(_, l)| l);
    let mut sum = 0f32;
    for (_, w) in &mut out[start..] {
        *w = (*w - max).exp();
        sum += *w;
    }
    for (_, w) in &mut out[start..] {
        *w /= sum;
    }
}

/// The expert that every token also goes through (qwen2moe), scaled by a sigmoid gate.
pub struct SharedExpert {
    /// `ffn_gate_inp_shexp`: the gate's weights over the whole normed input.
    pub gate_input: Vec<f32>,
    pub gate: Arc<Weight>,
    pub up: Arc<Weight>,
    pub down: Arc<Weight>,
}

pub struct MoeLayer {
    /// `ffn_gate_inp`: one row of `d_model` per expert, whole on every rank.
    pub router: Arc<Weight>,
    /// This rank's rows of `ffn_gate_exps` / `ffn_up_exps`: `width` rows per owned expert.
    pub gate: Arc<Weight>,
    pub up: Arc<Weight>,
    /// This rank's columns of `ffn_down_exps`: `d_model` rows of `width` per owned expert.
    pub down: Arc<Weight>,
    /// The experts this rank computes.
    pub experts: Range<usize>,
    /// Columns of each expert this rank holds.
    pub width: usize,
    pub expert_used: usize,
    pub normalize_selected: bool,
    pub shared: Option<SharedExpert>,
    /// gpt-oss: top-k of the raw logits, then a softmax over those.
    pub softmax_selected: bool,
    pub activation: Activation,
    /// gpt-oss's biases: on the router logits (`[experts]`), on this rank's gate and up
    /// columns of each owned expert (`width` per expert), and each expert's output
    /// (`[experts][d_model]`, whole: the weighted sum is added after the AllReduce).
    pub router_bias: Option<Vec<f32>>,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

/// Buffers kept between steps; they only grow.
#[derive(Default)]
pub struct MoeScratch {
    logits: Vec<f32>,
    /// Per token, its selected experts and their weights.
    selected: Vec<(usize, f32)>,
    /// The (token, weight) pairs of every owned expert, expert after expert, tokens ascending
    /// within each; `starts[local]..starts[local + 1]` are expert `local`'s.
    routed: Vec<(usize, f32)>,
    starts: Vec<usize>,
    cursor: Vec<usize>,
    input: Vec<f32>,
    ffn: FfnScratch,
    /// Expert FFNs computed in the last forward: one per distinct expert of the batch.
    pub expert_passes: usize,
    /// Per token, `d_model` values: the weighted sum of its selected experts' output biases,
    /// added to the residual after the layer's AllReduce (gpt-oss).
    pub routed_bias: Vec<f64>,
}

#[derive(Default)]
struct FfnScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    output: Vec<f64>,
    prepared: PreparedActivations,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Rows `rows` of a weight's data.
fn rows_of(weight: &Weight, rows: Range<usize>) -> &[u8] {
    let row_bytes = weight.data.len() / weight.rows.max(1);
    &weight.data[rows.start * row_bytes..rows.end * row_bytes]
}

/// The routing of one token as llama.cpp computes it: softmax over every expert's logit, the
/// `used` most probable (ties to the lower index), each weighted by its probability,
/// renormalized over the selected ones when `normalize` (the sum clamped away from zero as
/// llama.cpp does). Writes `(expert, weight)` pairs, best first; `logits` is overwritten
/// with the unnormalized exponentials.
pub fn route(logits: &mut [f32], used: usize, normalize: bool, out: &mut Vec<(usize, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for l in logits.iter_mut() {
        *l = (*l - max).exp();
        sum += *l as f64;
    }
    let scale = (1.0 / sum) as f32;
    let start = out.len();
    push_top(logits.iter().map(|&e| e * scale), used, out);
    if normalize {
        let total = out[start..]
            .iter()
            .map(|&(_, w)| w)
            .sum::<f32>()
            .max(6.103_515_6e-5);
        for (_, w) in &mut out[start..] {
            *w /= total;
        }
    }
}

/// Appends the `used` largest of `values` to `out` as `(index, value)`, largest first, ties to
/// the lower index: an insertion into the best so far (experts are few, tens to hundreds).
fn push_top(values: impl Iterator<Item = f32>, used: usize, out: &mut Vec<(usize, f32)>) {
    let start = out.len();
    for (index, v) in values.enumerate() {
        let chosen = &out[start..];
        let position = chosen
            .iter()
            .position(|&(_, q)| v > q)
            .unwrap_or(chosen.len());
        if position < used {
            if chosen.len() == used {
                out.pop();
            }
            out.insert(start + position, (index, v));
        }
    }
}

/// `gate = act(gate) * up`, elementwise, for each of the gated activations.
pub fn glu(activation: Activation, gate: &mut [f32], up: &[f32]) {
    match activation {
        Activation::Silu => {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::GeluTanh => {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = crate::worker::executor::gelu_tanh(*g) * u;
            }
        }
        Activation::SwigluOai => {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = swiglu_oai(*g, *u);
            }
        }
    }
}

/// One gated FFN over `n` rows of `input` (`d` values each): `width` rows each of gate and up
/// weights (plus their biases, where given), `activation`, then `d` rows of `width` down
/// weights. Leaves the f64 outputs in `s.output[..n * d]`.
#[allow(clippy::type_complexity)]
fn gated_ffn(
    (gate_ty, gate_w): (QuantType, &[u8]),
    (up_ty, up_w): (QuantType, &[u8]),
    (down_ty, down_w): (QuantType, &[u8]),
    input: &[f32],
    (n, d, width): (usize, usize, usize),
    (activation, gate_bias, up_bias): (Activation, Option<&[f32]>, Option<&[f32]>),
    s: &mut FfnScratch,
) {
    s.prepared.prepare(gate_ty, &input[..n * d], d, n);
    let gate = grow(&mut s.gate, n * width);
    matmul(gate_ty, gate_w, width, d, &s.prepared, gate);
    if up_ty != gate_ty {
        s.prepared.prepare(up_ty, &input[..n * d], d, n);
    }
    let up = grow(&mut s.up, n * width);
    matmul(up_ty, up_w, width, d, &s.prepared, up);
    for (rows, bias) in [(&mut *gate, gate_bias), (&mut *up, up_bias)] {
        if let Some(bias) = bias {
            for row in rows.chunks_exact_mut(width) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
    }
    glu(activation, gate, up);
    s.prepared.prepare(down_ty, gate, width, n);
    matmul_f64(
        down_ty,
        down_w,
        d,
        width,
        &s.prepared,
        grow(&mut s.output, n * d),
    );
}

impl MoeLayer {
    /// Adds this rank's part of the layer's output for `batch` rows of `normed` (`d` values
    /// each) into `out` (f64, zeroed by the caller).
    pub fn forward(
        &self,
        normed: &[f32],
        batch: usize,
        d: usize,
        out: &mut [f64],
        s: &mut MoeScratch,
    ) {
        s.expert_passes = 0;
        // With output biases every rank routes every token (their weighted sum is added once,
        // after the AllReduce, on every rank), even one without columns of any expert.
        if (self.width > 0 && !self.experts.is_empty()) || self.down_bias.is_some() {
            self.routed_experts(normed, batch, d, out, s);
        }
        if let Some(shared) = &self.shared {
            Self::shared_expert(shared, normed, batch, d, out, &mut s.ffn);
        }
    }

    fn routed_experts(
        &self,
        normed: &[f32],
        batch: usize,
        d: usize,
        out: &mut [f64],
        s: &mut MoeScratch,
    ) {
        let expert_count = self.router.rows;
        s.ffn
            .prepared
            .prepare(self.router.ty, &normed[..batch * d], d, batch);
        let logits = grow(&mut s.logits, batch * expert_count);
        matmul(
            self.router.ty,
            &self.router.data,
            expert_count,
            d,
            &s.ffn.prepared,
            logits,
        );
        s.selected.clear();
        for row in logits.chunks_exact_mut(expert_count) {
            if let Some(bias) = &self.router_bias {
                for (l, b) in row.iter_mut().zip(bias) {
                    *l += b;
                }
            }
            if self.softmax_selected {
                route_top_then_softmax(row, self.expert_used, &mut s.selected);
            } else {
                route(
                    row,
                    self.expert_used,
                    self.normalize_selected,
                    &mut s.selected,
                );
            }
        }
        if let Some(bias) = &self.down_bias {
            let sums = grow(&mut s.routed_bias, batch * d);
            sums.fill(0.0);
            for (i, &(e, w)) in s.selected.iter().enumerate() {
                let b = i / self.expert_used;
                for (o, v) in sums[b * d..(b + 1) * d]
                    .iter_mut()
                    .zip(&bias[e * d..(e + 1) * d])
                {
                    *o += w as f64 * *v as f64;
                }
            }
        }
        if self.width == 0 || self.experts.is_empty() {
            return;
        }
        // Bucket the (token, weight) pairs by owned expert in one pass (a counting sort, tokens
        // ascending within each expert).
        let local_count = self.experts.len();
        s.starts.clear();
        s.starts.resize(local_count + 1, 0);
        let owned = |e: usize| {
            e.checked_sub(self.experts.start)
                .filter(|&l| l < local_count)
        };
        for &(e, _) in &s.selected {
            if let Some(l) = owned(e) {
                s.starts[l + 1] += 1;
            }
        }
        for l in 0..local_count {
            s.starts[l + 1] += s.starts[l];
        }
        s.cursor.clone_from(&s.starts);
        s.routed.clear();
        s.routed.resize(s.starts[local_count], (0, 0.0));
        for (i, &(e, w)) in s.selected.iter().enumerate() {
            if let Some(l) = owned(e) {
                s.routed[s.cursor[l]] = (i / self.expert_used, w);
                s.cursor[l] += 1;
            }
        }
        let width = self.width;
        // Experts in ascending order, each over the tokens routed to it: a token's output sums
        // its experts in the same order whatever else is in the batch.
        for local in 0..local_count {
            let routed = &s.routed[s.starts[local]..s.starts[local + 1]];
            let n = routed.len();
            if n == 0 {
                continue;
            }
            s.expert_passes += 1;
            let input = grow(&mut s.input, n * d);
            for (i, &(b, _)) in routed.iter().enumerate() {
                input[i * d..(i + 1) * d].copy_from_slice(&normed[b * d..(b + 1) * d]);
            }
            let rows = local * width..(local + 1) * width;
            let gate_bias = self.gate_bias.as_ref().map(|b| &b[rows.clone()]);
            let up_bias = self.up_bias.as_ref().map(|b| &b[rows.clone()]);
            gated_ffn(
                (self.gate.ty, rows_of(&self.gate, rows.clone())),
                (self.up.ty, rows_of(&self.up, rows.clone())),
                (
                    self.down.ty,
                    rows_of(&self.down, local * d..(local + 1) * d),
                ),
                input,
                (n, d, width),
                (self.activation, gate_bias, up_bias),
                &mut s.ffn,
            );
            for (i, &(b, w)) in routed.iter().enumerate() {
                let w = w as f64;
                for (o, y) in out[b * d..(b + 1) * d]
                    .iter_mut()
                    .zip(&s.ffn.output[i * d..(i + 1) * d])
                {
                    *o += w * y;
                }
            }
        }
    }

    fn shared_expert(
        shared: &SharedExpert,
        normed: &[f32],
        batch: usize,
        d: usize,
        out: &mut [f64],
        s: &mut FfnScratch,
    ) {
        let width = shared.gate.rows;
        if width == 0 {
            return;
        }
        let input = &normed[..batch * d];
        gated_ffn(
            (shared.gate.ty, &shared.gate.data),
            (shared.up.ty, &shared.up.data),
            (shared.down.ty, &shared.down.data),
            input,
            (batch, d, width),
            (Activation::Silu, None, None),
            s,
        );
        for b in 0..batch {
            let g = f32_dot(&shared.gate_input, &input[b * d..(b + 1) * d]);
            let scale = 1.0 / (1.0 + (-g as f64).exp());
            for (o, y) in out[b * d..(b + 1) * d]
                .iter_mut()
                .zip(&s.output[b * d..(b + 1) * d])
            {
                *o += scale * y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn value(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        }
        fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.value() * scale).collect()
        }
    }

    fn f32_weight(rows: usize, cols: usize, values: impl Iterator<Item = f32>) -> Arc<Weight> {
        let data: Vec<u8> = values.flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(data.len(), rows * cols * 4);
        Arc::new(Weight {
            ty: QuantType::F32,
            rows,
            cols,
            data,
        })
    }

    /// A whole model layer's values: router [e][d], gate/up [e][f][d], down [e][d][f], and a
    /// shared expert of width `s` (gate input [d], gate/up [s][d], down [d][s]).
    struct Values {
        d: usize,
        f: usize,
        e: usize,
        s: usize,
        router: Vec<f32>,
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
        shared: [Vec<f32>; 4],
    }

    impl Values {
        fn new(rng: &mut Rng, d: usize, f: usize, e: usize, s: usize) -> Values {
            Values {
                d,
                f,
                e,
                s,
                router: rng.values(e * d, 0.5),
                gate: rng.values(e * f * d, 0.2),
                up: rng.values(e * f * d, 0.2),
                down: rng.values(e * d * f, 0.2),
                shared: [
                    rng.values(d, 0.2),
                    rng.values(s * d, 0.2),
                    rng.values(s * d, 0.2),
                    rng.values(d * s, 0.2),
                ],
            }
        }

        /// The layer of a rank holding `experts` x `columns` and `shared` columns.
        fn layer(
            &self,
            experts: Range<usize>,
            columns: Range<usize>,
            shared: Range<usize>,
            used: usize,
            normalize: bool,
        ) -> MoeLayer {
            let (d, f, s) = (self.d, self.f, self.s);
            let mut gate = Vec::new();
            let mut up = Vec::new();
            let mut down = Vec::new();
            for e in experts.clone() {
                for c in columns.clone() {
                    gate.extend_from_slice(&self.gate[(e * f + c) * d..(e * f + c + 1) * d]);
                    up.extend_from_slice(&self.up[(e * f + c) * d..(e * f + c + 1) * d]);
                }
                for r in 0..d {
                    for c in columns.clone() {
                        down.push(self.down[(e * d + r) * f + c]);
                    }
                }
            }
            let mut shared_weights = [Vec::new(), Vec::new(), Vec::new()];
            for r in shared.clone() {
                shared_weights[0].extend_from_slice(&self.shared[1][r * d..(r + 1) * d]);
                shared_weights[1].extend_from_slice(&self.shared[2][r * d..(r + 1) * d]);
            }
            for r in 0..d {
                for c in shared.clone() {
                    shared_weights[2].push(self.shared[3][r * s + c]);
                }
            }
            let width = columns.len();
            let local = experts.len();
            MoeLayer {
                router: f32_weight(self.e, d, self.router.iter().copied()),
                gate: f32_weight(local * width, d, gate.into_iter()),
                up: f32_weight(local * width, d, up.into_iter()),
                down: f32_weight(local * d, width, down.into_iter()),
                experts,
                width,
                expert_used: used,
                normalize_selected: normalize,
                shared: (s > 0).then(|| SharedExpert {
                    gate_input: self.shared[0].clone(),
                    gate: f32_weight(shared.len(), d, shared_weights[0].clone().into_iter()),
                    up: f32_weight(shared.len(), d, shared_weights[1].clone().into_iter()),
                    down: f32_weight(d, shared.len(), shared_weights[2].clone().into_iter()),
                }),
                softmax_selected: false,
                activation: Activation::Silu,
                router_bias: None,
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            }
        }

        /// The layer's output for one row, in f64 from the description (the oracle).
        fn reference(&self, x: &[f32], used: usize, normalize: bool) -> Vec<f64> {
            let (d, f, s) = (self.d, self.f, self.s);
            let dot = |w: &[f32], v: &[f64]| -> f64 {
                w.iter().zip(v).map(|(&a, &b)| a as f64 * b).sum()
            };
            let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let logits: Vec<f64> = (0..self.e)
                .map(|e| dot(&self.router[e * d..(e + 1) * d], &x))
                .collect();
            let max = logits.iter().copied().fold(f64::MIN, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let mut order: Vec<usize> = (0..self.e).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let chosen = &order[..used];
            let p = |e: usize| (logits[e] - max).exp() / total;
            let norm: f64 = if normalize {
                chosen.iter().map(|&e| p(e)).sum()
            } else {
                1.0
            };
            let silu = |g: f64| g / (1.0 + (-g).exp());
            // One SwiGLU FFN: gate/up rows of `d`, down as [d][width], given as slices and a
            // down stride.
            let ffn = |gate: &[f32], up: &[f32], down: &[f32], width: usize| -> Vec<f64> {
                let h: Vec<f64> = (0..width)
                    .map(|c| {
                        silu(dot(&gate[c * d..(c + 1) * d], &x)) * dot(&up[c * d..(c + 1) * d], &x)
                    })
                    .collect();
                (0..d)
                    .map(|r| (0..width).map(|c| down[r * width + c] as f64 * h[c]).sum())
                    .collect()
            };
            let mut out = vec![0f64; d];
            for &e in chosen {
                let y = ffn(
                    &self.gate[e * f * d..(e + 1) * f * d],
                    &self.up[e * f * d..(e + 1) * f * d],
                    &self.down[e * d * f..(e + 1) * d * f],
                    f,
                );
                for (o, v) in out.iter_mut().zip(y) {
                    *o += p(e) / norm * v;
                }
            }
            if s > 0 {
                let g = 1.0 / (1.0 + (-dot(&self.shared[0], &x)).exp());
                let y = ffn(&self.shared[1], &self.shared[2], &self.shared[3], s);
                for (o, v) in out.iter_mut().zip(y) {
                    *o += g * v;
                }
            }
            out
        }
    }

    fn forward(layer: &MoeLayer, x: &[f32], batch: usize, d: usize) -> (Vec<f64>, usize) {
        let mut out = vec![0f64; batch * d];
        let mut scratch = MoeScratch::default();
        layer.forward(x, batch, d, &mut out, &mut scratch);
        (out, scratch.expert_passes)
    }

    /// A batch grouped by expert gives each row exactly what it gets alone, computes each
    /// selected expert once, and agrees with an f64 evaluation of the definition; with and
    /// without renormalization and a shared expert.
    #[test]
    fn grouped_batch_matches_rows_alone_and_the_definition() {
        let mut rng = Rng(0x005e_ed0f_e4e7);
        let (d, f, e, used, batch) = (64, 32, 6, 2, 7);
        for (normalize, s) in [(true, 0), (false, 16)] {
            let values = Values::new(&mut rng, d, f, e, s);
            let layer = values.layer(0..e, 0..f, 0..s, used, normalize);
            let x = rng.values(batch * d, 1.0);
            let (out, passes) = forward(&layer, &x, batch, d);
            assert!(
                passes <= e && passes < batch * used,
                "{passes} expert passes"
            );
            for b in 0..batch {
                let row = &x[b * d..(b + 1) * d];
                let (alone, _) = forward(&layer, row, 1, d);
                assert_eq!(
                    alone,
                    out[b * d..(b + 1) * d],
                    "row {b} differs from the batch"
                );
                let reference = values.reference(row, used, normalize);
                let error: f64 = reference
                    .iter()
                    .zip(&alone)
                    .map(|(r, o)| (r - o).powi(2))
                    .sum();
                let power: f64 = reference.iter().map(|r| r * r).sum();
                assert!(error / power < 1e-10, "row {b}: NMSE {:e}", error / power);
            }
        }
    }

    /// Ranks holding column slices of every expert, or whole experts, add up to one rank.
    #[test]
    fn column_and_expert_splits_add_up_to_the_whole() {
        let mut rng = Rng(0xc0ffee);
        let (d, f, e, s, used, batch) = (64, 32, 6, 16, 2, 5);
        let values = Values::new(&mut rng, d, f, e, s);
        let x = rng.values(batch * d, 1.0);
        let (whole, _) = forward(&values.layer(0..e, 0..f, 0..s, used, true), &x, batch, d);
        // Per rank: experts, columns of each, shared-expert columns.
        type Part = (Range<usize>, Range<usize>, Range<usize>);
        let splits: [Vec<Part>; 2] = [
            vec![
                (0..e, 0..8, 0..5),
                (0..e, 8..20, 5..11),
                (0..e, 20..32, 11..16),
            ],
            vec![(0..2, 0..f, 0..8), (2..3, 0..f, 8..8), (3..6, 0..f, 8..16)],
        ];
        for split in splits {
            let mut sum = vec![0f64; batch * d];
            for (experts, columns, shared) in split.clone() {
                let (part, _) = forward(
                    &values.layer(experts, columns, shared, used, true),
                    &x,
                    batch,
                    d,
                );
                for (t, p) in sum.iter_mut().zip(part) {
                    *t += p;
                }
            }
            for (a, b) in whole.iter().zip(&sum) {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + a.abs()),
                    "{split:?}: {a} vs {b}"
                );
            }
        }
    }

    /// Softmax, top-k and renormalization against a plain f64 computation of the same rule.
    #[test]
    fn routing_matches_softmax_top_k_renormalized() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 10_000) as f32 / 1000.0 - 5.0
        };
        for &(experts, used) in &[(16usize, 4usize), (8, 2), (60, 4), (128, 8), (4, 4), (3, 1)] {
            for normalize in [false, true] {
                let logits: Vec<f32> = (0..experts).map(|_| next()).collect();
                let mut got = Vec::new();
                route(&mut logits.clone(), used, normalize, &mut got);
                let max = logits
                    .iter()
                    .copied()
                    .fold(f64::MIN, |m, l| m.max(l as f64));
                let total: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
                let mut order: Vec<usize> = (0..experts).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                let chosen = &order[..used];
                let chosen_total: f64 = chosen
                    .iter()
                    .map(|&e| (logits[e] as f64 - max).exp() / total)
                    .sum();
                assert_eq!(got.len(), used);
                for (&(expert, weight), &e) in got.iter().zip(chosen) {
                    assert_eq!(expert, e, "{experts}/{used}");
                    let p = (logits[e] as f64 - max).exp() / total;
                    let expected = if normalize { p / chosen_total } else { p };
                    assert!(
                        (weight as f64 - expected).abs() < 1e-6,
                        "{experts}/{used} expert {e}: {weight} vs {expected}"
                    );
                }
                if normalize {
                    let sum: f32 = got.iter().map(|c| c.1).sum();
                    assert!((sum - 1.0).abs() < 1e-6);
                }
            }
        }
    }

    /// Routing appends per token, so a batch's choices lie one after another.
    #[test]
    fn routing_appends() {
        let mut out = Vec::new();
        route(&mut [0.0, 1.0, 2.0], 1, true, &mut out);
        route(&mut [2.0, 1.0, 0.0], 1, true, &mut out);
        assert_eq!(out, vec![(2, 1.0), (0, 1.0)]);
    }
}
