//! What a rank's shard reads of the model file: the tensor slices its program names, their
//! byte ranges in each file of the model, and their sizes. The coordinator (to plan, and to
//! stream a shard to a worker without the files) and the worker (to load) share this, so what
//! is loaded, shipped and reported cannot disagree.

use std::ops::Range;

use crate::model::arch::{FfnSpec, ModelConfig, MoeTensors};
use crate::model::gguf::{GgufFile, TensorInfo};
use crate::shard::plan::{OpKind, Parallel, RankShard, shard_program};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("tensor '{0}' is missing from the model")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

/// The part of one tensor a rank's program reads. The tensor is taken as a matrix in ggml
/// layout: dimension 0 is a row, every higher dimension stacks rows (expert `e` of an
/// `[cols, rows, experts]` tensor is rows `e * rows..(e + 1) * rows`).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSlice {
    pub name: String,
    /// Row ranges, in order (None: every row).
    pub rows: Option<Vec<Range<usize>>>,
    /// Columns of each row (None: all): a cut inside a quantization block re-blocks the
    /// slice to F32.
    pub cols: Option<Range<usize>>,
    /// An F32 vector (norm weight, bias), loaded as values rather than as a matrix.
    pub vector: bool,
}

impl TensorSlice {
    fn matrix(name: &str, rows: Option<Vec<Range<usize>>>, cols: Option<Range<usize>>) -> Self {
        TensorSlice {
            name: name.to_string(),
            rows,
            cols,
            vector: false,
        }
    }
    fn vector(name: &str, cols: Option<Range<usize>>) -> Self {
        TensorSlice {
            name: name.to_string(),
            rows: None,
            cols,
            vector: true,
        }
    }
}

/// Every tensor slice `shard`'s program reads, each tensor once (the tied output head reuses
/// the embedding's vocab slice). `load_shard`, `shard_byte_ranges` and `shard_weight_bytes`
/// all work from this list, so what is loaded, shipped and reported cannot disagree.
pub fn shard_tensors(config: &ModelConfig, shard: &RankShard) -> Vec<TensorSlice> {
    let mut out: Vec<TensorSlice> = Vec::new();
    for op in shard_program(config, shard) {
        match &op.kind {
            OpKind::Embed { tensor, .. } => out.push(TensorSlice::matrix(
                tensor,
                Some(vec![shard.embed_rows.clone()]),
                None,
            )),
            OpKind::RmsNorm { tensor, .. }
            | OpKind::Rope {
                freq_factors: Some(tensor),
                ..
            } => out.push(TensorSlice::vector(tensor, None)),
            OpKind::AddResidual { norm, bias, .. } => {
                for tensor in [norm, bias].into_iter().flatten() {
                    out.push(TensorSlice::vector(tensor, None));
                }
            }
            OpKind::Attention { layer } => {
                if let Some(sinks) = &config.layers[*layer].attention.sinks {
                    out.push(TensorSlice::vector(
                        sinks,
                        Some(shard.layers[*layer].q_heads.clone()),
                    ));
                }
            }
            OpKind::HeadNorm {
                q_tensor, k_tensor, ..
            } => {
                out.push(TensorSlice::vector(q_tensor, None));
                out.push(TensorSlice::vector(k_tensor, None));
            }
            OpKind::Linear {
                tensor,
                bias,
                parallel,
                extent,
                ..
            } => {
                out.push(match parallel {
                    Parallel::Column => {
                        TensorSlice::matrix(tensor, Some(vec![extent.clone()]), None)
                    }
                    Parallel::Row => TensorSlice::matrix(tensor, None, Some(extent.clone())),
                });
                if let Some(bias) = bias {
                    out.push(TensorSlice::vector(bias, Some(extent.clone())));
                }
            }
            OpKind::Moe { layer } => {
                if let FfnSpec::Moe(tensors) = &config.layers[*layer].ffn {
                    out.extend(moe_tensors(config, tensors, shard, *layer));
                }
            }
            _ => {}
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|slice| seen.insert(slice.name.clone()));
    out
}

/// The tensors of a mixture-of-experts layer: the whole router (every rank routes every
/// token), the rank's columns of each of its experts' gate and up (column-parallel) and down
/// (row-parallel), and its columns of the shared expert.
fn moe_tensors(
    config: &ModelConfig,
    tensors: &MoeTensors,
    shard: &RankShard,
    layer: usize,
) -> Vec<TensorSlice> {
    let s = &shard.layers[layer];
    let (f, d) = (config.ffn_dim, config.model_dim);
    let columns = s.ffn_columns.clone();
    let expert_rows: Vec<Range<usize>> = if columns.is_empty() {
        Vec::new()
    } else {
        s.experts
            .clone()
            .map(|e| e * f + columns.start..e * f + columns.end)
            .collect()
    };
    let down_rows: Vec<Range<usize>> = if columns.is_empty() {
        Vec::new()
    } else {
        s.experts.clone().map(|e| e * d..(e + 1) * d).collect()
    };
    let mut out = vec![
        TensorSlice::matrix(&tensors.router, None, None),
        TensorSlice::matrix(&tensors.gate, Some(expert_rows.clone()), None),
        TensorSlice::matrix(&tensors.up, Some(expert_rows), None),
        TensorSlice::matrix(&tensors.down, Some(down_rows), Some(columns.clone())),
    ];
    // gpt-oss's biases: the router's and every expert's output bias whole (every rank routes
    // every token and adds the weighted output biases after the AllReduce), gate and up as the
    // rank's columns of its experts (`[width, experts]`: a row per expert).
    if let Some(bias) = &tensors.router_bias {
        out.push(TensorSlice::vector(bias, None));
    }
    if let Some(bias) = &tensors.down_bias {
        out.push(TensorSlice::matrix(bias, None, None));
    }
    let owned = if columns.is_empty() {
        Vec::new()
    } else {
        vec![s.experts.clone()]
    };
    for bias in [&tensors.gate_bias, &tensors.up_bias].into_iter().flatten() {
        out.push(TensorSlice::matrix(
            bias,
            Some(owned.clone()),
            Some(columns.clone()),
        ));
    }
    if let Some(shared_tensors) = &tensors.shared {
        let shared = s.shared_columns.clone();
        out.extend([
            TensorSlice::vector(&shared_tensors.gate_input, None),
            TensorSlice::matrix(&shared_tensors.gate, Some(vec![shared.clone()]), None),
            TensorSlice::matrix(&shared_tensors.up, Some(vec![shared.clone()]), None),
            TensorSlice::matrix(&shared_tensors.down, None, Some(shared)),
        ]);
    }
    out
}

/// A slice's rows and columns resolved against the tensor, checked to lie inside it.
pub(crate) fn resolve(
    info: &TensorInfo,
    slice: &TensorSlice,
) -> Result<(Vec<Range<usize>>, Range<usize>), ShardError> {
    let rows = slice
        .rows
        .clone()
        .unwrap_or_else(|| std::iter::once(0..info.row_count()).collect());
    let cols = slice.cols.clone().unwrap_or(0..info.row_length());
    if rows
        .iter()
        .any(|r| r.start > r.end || r.end > info.row_count())
        || cols.start > cols.end
        || cols.end > info.row_length()
    {
        return Err(ShardError::Invalid(format!(
            "{}: rows {rows:?} / columns {cols:?} exceed its {} x {}",
            info.name,
            info.row_count(),
            info.row_length()
        )));
    }
    Ok((rows, cols))
}

/// Whether `cols` of a row of `info` can be cut out as whole quantization blocks.
pub(crate) fn block_aligned(info: &TensorInfo, cols: &Range<usize>) -> bool {
    let block = info.quant_type.block_elements();
    cols.start.is_multiple_of(block) && cols.end.is_multiple_of(block)
}

/// The byte ranges of the model's files that `load_shard` reads for `shard`: one list per file
/// (`file.parts`: one, or every part of a split model), absolute in that file, sorted and
/// merged, each file's header (metadata and tensor index) first. What a worker without the
/// files must receive: every header, so that the set opens, and data only from the parts that
/// hold its slices. A test checks that files holding only these load the same shard.
pub fn shard_byte_ranges(
    file: &GgufFile,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<Vec<Vec<Range<u64>>>, ShardError> {
    let mut ranges: Vec<Vec<Range<u64>>> = file
        .parts
        .iter()
        .map(|part| std::iter::once(0..part.header_bytes).collect())
        .collect();
    for slice in shard_tensors(config, shard) {
        let info = file
            .tensor(&slice.name)
            .ok_or_else(|| ShardError::Missing(slice.name.clone()))?;
        let (rows, cols) = resolve(info, &slice)?;
        let ty = info.quant_type;
        let row_bytes = ty.row_bytes(info.row_length()).unwrap_or(0) as u64;
        let (start, end) = if block_aligned(info, &cols) {
            let block = ty.block_elements();
            (
                (cols.start / block * ty.block_bytes()) as u64,
                (cols.end / block * ty.block_bytes()) as u64,
            )
        } else {
            (0, row_bytes) // re-blocked: whole rows are dequantized
        };
        let part = &mut ranges[info.part];
        for range in rows {
            if start == 0 && end == row_bytes {
                part.push(
                    info.offset + range.start as u64 * row_bytes
                        ..info.offset + range.end as u64 * row_bytes,
                );
            } else {
                for r in range.start as u64..range.end as u64 {
                    let row = info.offset + r * row_bytes;
                    part.push(row + start..row + end);
                }
            }
        }
    }
    Ok(ranges.into_iter().map(merge_ranges).collect())
}

/// Sorts `ranges` and merges those that overlap or touch; drops empty ones.
pub fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The parts of `wanted` not covered by `have` (both merged and sorted).
pub fn missing_ranges(wanted: &[Range<u64>], have: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut missing = Vec::new();
    for w in wanted {
        let mut start = w.start;
        for h in have.iter().filter(|h| h.end > w.start && h.start < w.end) {
            if h.start > start {
                missing.push(start..h.start);
            }
            start = start.max(h.end);
        }
        if start < w.end {
            missing.push(start..w.end);
        }
    }
    missing
}

/// Bytes of weights a rank would load, computed from tensor infos alone (for `plan`).
pub fn shard_weight_bytes(file: &GgufFile, config: &ModelConfig, shard: &RankShard) -> u64 {
    slice_bytes(file, config, shard, |_| true)
}

/// Bytes of the routed and shared experts' weights a rank would load (for `plan`).
pub fn shard_expert_bytes(file: &GgufFile, config: &ModelConfig, shard: &RankShard) -> u64 {
    let mut experts = std::collections::HashSet::<&str>::new();
    for layer in &config.layers {
        if let FfnSpec::Moe(m) = &layer.ffn {
            experts.extend([&m.gate, &m.up, &m.down].map(String::as_str));
            if let Some(s) = &m.shared {
                experts.extend([&s.gate_input, &s.gate, &s.up, &s.down].map(String::as_str));
            }
        }
    }
    slice_bytes(file, config, shard, |name| experts.contains(name))
}

fn slice_bytes(
    file: &GgufFile,
    config: &ModelConfig,
    shard: &RankShard,
    wanted: impl Fn(&str) -> bool,
) -> u64 {
    let mut total = 0u64;
    for slice in shard_tensors(config, shard) {
        let Some(info) = file.tensor(&slice.name) else {
            continue;
        };
        if !wanted(&slice.name) {
            continue;
        }
        let Ok((rows, cols)) = resolve(info, &slice) else {
            continue;
        };
        let row_count: usize = rows.iter().map(|r| r.len()).sum();
        let per_row = if block_aligned(info, &cols) {
            info.quant_type
                .row_bytes(cols.len())
                .map_or(cols.len() as u64 * 4, |b| b as u64)
        } else {
            cols.len() as u64 * 4
        };
        total += row_count as u64 * per_row;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        assert_eq!(
            merge_ranges(vec![5..7, 0..2, 2..3, 6..9, 4..4]),
            vec![0..3, 5..9]
        );
        assert_eq!(
            missing_ranges(&[0..10, 20..30], &[2..4, 8..25]),
            vec![0..2, 4..8, 25..30]
        );
        assert_eq!(missing_ranges(&[0..10], &[0..10]), Vec::<Range<u64>>::new());
        assert_eq!(missing_ranges(&[0..10], &[]), vec![0..10]);
    }
}
