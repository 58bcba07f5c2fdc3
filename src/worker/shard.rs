//! Loading a rank's shard: the exact tensor slices its program reads, copied out of the mapped
//! GGUF into memory the worker owns.

use std::collections::HashMap;
use std::ops::Range;

use crate::coordinator::planner::{OpKind, Parallel, RankShard, shard_program};
use crate::kernels::cpu::{QuantType, dequantize_row};
use crate::model::arch::ModelConfig;
use crate::model::gguf::{GgufFile, TensorInfo};

/// A matrix in ggml layout: `rows` rows of `cols` elements, each row `ty.row_bytes(cols)` bytes.
pub struct Weight {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl Weight {
    pub fn row(&self, index: usize) -> &[u8] {
        let row_bytes = self.data.len() / self.rows.max(1);
        &self.data[index * row_bytes..(index + 1) * row_bytes]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("tensor '{0}' is missing from the model")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

pub struct LoadedShard {
    pub weights: HashMap<String, Weight>,
    pub vectors: HashMap<String, Vec<f32>>,
    pub weight_bytes: u64,
    /// Things the load log should tell, e.g. tensors re-blocked for an unaligned split.
    pub notes: Vec<String>,
}

fn f32_values(file: &GgufFile, info: &TensorInfo, range: Range<usize>) -> Vec<f32> {
    let bytes = file.tensor_bytes(info);
    bytes[range.start * 4..range.end * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Rows `rows` of a matrix (column-parallel: split on the output dimension).
fn slice_rows(file: &GgufFile, info: &TensorInfo, rows: Range<usize>) -> Weight {
    let row_bytes = info
        .quant_type
        .row_bytes(info.row_length())
        .expect("checked at parse");
    let bytes = file.tensor_bytes(info);
    Weight {
        ty: info.quant_type,
        rows: rows.len(),
        cols: info.row_length(),
        data: bytes[rows.start * row_bytes..rows.end * row_bytes].to_vec(),
    }
}

/// Columns `cols` of every row (row-parallel: split on the input dimension). A boundary inside a
/// quantization block cannot be cut in place; such a tensor is dequantized to F32.
fn slice_columns(
    file: &GgufFile,
    info: &TensorInfo,
    cols: Range<usize>,
    notes: &mut Vec<String>,
) -> Weight {
    let ty = info.quant_type;
    let row_length = info.row_length();
    let row_bytes = ty.row_bytes(row_length).expect("checked at parse");
    let rows = info.row_count();
    let bytes = file.tensor_bytes(info);
    let block = ty.block_elements();
    if cols.start % block == 0 && cols.end % block == 0 {
        let start = cols.start / block * ty.block_bytes();
        let end = cols.end / block * ty.block_bytes();
        let mut data = Vec::with_capacity(rows * (end - start));
        for r in 0..rows {
            data.extend_from_slice(&bytes[r * row_bytes + start..r * row_bytes + end]);
        }
        return Weight {
            ty,
            rows,
            cols: cols.len(),
            data,
        };
    }
    notes.push(format!(
        "{}: columns {cols:?} cut {} blocks of {block}; re-blocked to F32 for this shard",
        info.name,
        ty.name()
    ));
    let mut full = vec![0f32; row_length];
    let mut data = Vec::with_capacity(rows * cols.len() * 4);
    for r in 0..rows {
        dequantize_row(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut full);
        for v in &full[cols.clone()] {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    Weight {
        ty: QuantType::F32,
        rows,
        cols: cols.len(),
        data,
    }
}

pub fn load_shard(
    file: &GgufFile,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<LoadedShard, ShardError> {
    let tensor = |name: &str| {
        file.tensor(name)
            .ok_or_else(|| ShardError::Missing(name.to_string()))
    };
    let mut loaded = LoadedShard {
        weights: HashMap::new(),
        vectors: HashMap::new(),
        weight_bytes: 0,
        notes: Vec::new(),
    };
    let program = shard_program(config, shard);
    for op in &program {
        match &op.kind {
            OpKind::Embed { tensor: name } => {
                if !loaded.weights.contains_key(name) {
                    let info = tensor(name)?;
                    loaded.weights.insert(
                        name.clone(),
                        slice_rows(file, info, shard.vocab_rows.clone()),
                    );
                    file.release(info);
                }
            }
            OpKind::RmsNorm { tensor: name, .. } => {
                let info = tensor(name)?;
                loaded
                    .vectors
                    .insert(name.clone(), f32_values(file, info, 0..config.model_dim));
            }
            OpKind::Linear {
                tensor: name,
                bias,
                parallel,
                extent,
                ..
            } => {
                if loaded.weights.contains_key(name) {
                    continue; // the tied output head reuses the embedding's vocab slice
                }
                let info = tensor(name)?;
                let weight = match parallel {
                    Parallel::Column => slice_rows(file, info, extent.clone()),
                    Parallel::Row => slice_columns(file, info, extent.clone(), &mut loaded.notes),
                };
                loaded.weights.insert(name.clone(), weight);
                file.release(info);
                if let Some(bias) = bias {
                    let info = tensor(bias)?;
                    if info.quant_type != QuantType::F32 {
                        return Err(ShardError::Invalid(format!("bias '{bias}' is not F32")));
                    }
                    loaded
                        .vectors
                        .insert(bias.clone(), f32_values(file, info, extent.clone()));
                }
            }
            _ => {}
        }
    }
    loaded.weight_bytes = loaded
        .weights
        .values()
        .map(|w| w.data.len() as u64)
        .sum::<u64>()
        + loaded
            .vectors
            .values()
            .map(|v| v.len() as u64 * 4)
            .sum::<u64>();
    Ok(loaded)
}

/// The byte ranges of the model file that `load_shard` reads for `shard`, absolute, sorted and
/// merged, the header (metadata and tensor index) first: what a worker without the file must
/// receive. Mirrors `load_shard`'s reads; a test checks the two agree.
pub fn shard_byte_ranges(
    file: &GgufFile,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<Vec<Range<u64>>, ShardError> {
    let mut ranges: Vec<Range<u64>> = vec![0..file.header_bytes];
    let tensor = |name: &str| {
        file.tensor(name)
            .ok_or_else(|| ShardError::Missing(name.to_string()))
    };
    let rows = |info: &TensorInfo, rows: Range<usize>, out: &mut Vec<Range<u64>>| {
        let row_bytes = info.quant_type.row_bytes(info.row_length()).unwrap_or(0) as u64;
        out.push(
            info.offset + rows.start as u64 * row_bytes..info.offset + rows.end as u64 * row_bytes,
        );
    };
    let mut seen = std::collections::HashSet::new();
    for op in shard_program(config, shard) {
        match &op.kind {
            OpKind::Embed { tensor: name } => {
                if seen.insert(name.clone()) {
                    rows(tensor(name)?, shard.vocab_rows.clone(), &mut ranges);
                }
            }
            OpKind::RmsNorm { tensor: name, .. } => {
                let info = tensor(name)?;
                ranges.push(info.offset..info.offset + config.model_dim as u64 * 4);
            }
            OpKind::Linear {
                tensor: name,
                bias,
                parallel,
                extent,
                ..
            } => {
                if !seen.insert(name.clone()) {
                    continue;
                }
                let info = tensor(name)?;
                match parallel {
                    Parallel::Column => rows(info, extent.clone(), &mut ranges),
                    Parallel::Row => {
                        let ty = info.quant_type;
                        let block = ty.block_elements();
                        let row_bytes = ty.row_bytes(info.row_length()).unwrap_or(0) as u64;
                        let aligned = extent.start % block == 0 && extent.end % block == 0;
                        let (start, end) = if aligned {
                            (
                                (extent.start / block * ty.block_bytes()) as u64,
                                (extent.end / block * ty.block_bytes()) as u64,
                            )
                        } else {
                            (0, row_bytes) // re-blocked: whole rows are dequantized
                        };
                        for r in 0..info.row_count() as u64 {
                            let row = info.offset + r * row_bytes;
                            ranges.push(row + start..row + end);
                        }
                    }
                }
                if let Some(bias) = bias {
                    let info = tensor(bias)?;
                    ranges.push(
                        info.offset + extent.start as u64 * 4..info.offset + extent.end as u64 * 4,
                    );
                }
            }
            _ => {}
        }
    }
    Ok(merge_ranges(ranges))
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
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    for op in shard_program(config, shard) {
        let (name, extent, per_row) = match &op.kind {
            OpKind::Embed { tensor } => (tensor.clone(), shard.vocab_rows.clone(), true),
            OpKind::Linear {
                tensor,
                parallel,
                bias,
                extent,
                ..
            } => {
                let extent = extent.clone();
                if bias.is_some() {
                    total += extent.len() as u64 * 4;
                }
                (tensor.clone(), extent, *parallel == Parallel::Column)
            }
            OpKind::RmsNorm { .. } => {
                total += config.model_dim as u64 * 4;
                continue;
            }
            _ => continue,
        };
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(info) = file.tensor(&name) else {
            continue;
        };
        let ty = info.quant_type;
        let row_bytes = ty.row_bytes(info.row_length()).unwrap_or(0) as u64;
        total += if per_row {
            extent.len() as u64 * row_bytes
        } else {
            let cols = extent.len();
            let bytes = ty.row_bytes(cols).map_or(cols as u64 * 4, |b| b as u64);
            bytes * info.row_count() as u64
        };
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
