//! Loading a rank's shard: the exact tensor slices its program reads, copied out of the mapped
//! GGUF into memory the worker owns.

use std::collections::HashMap;
use std::ops::Range;

use crate::kernels::cpu::{QuantType, dequantize_row, first_invalid_block};
use crate::model::arch::ModelConfig;
use crate::model::gguf::{GgufFile, TensorInfo};
use crate::shard::plan::RankShard;
use crate::shard::tensors::{ShardError, block_aligned, resolve, shard_tensors};

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

pub struct LoadedShard {
    pub weights: HashMap<String, Weight>,
    pub vectors: HashMap<String, Vec<f32>>,
    pub weight_bytes: u64,
    /// Things the load log should tell, e.g. tensors re-blocked for an unaligned split.
    pub notes: Vec<String>,
}

/// Refuses blocks whose scale is unusable (an MXFP4 scale of NaN), naming the tensor and the
/// place; `data` holds rows from `first_row` on, `row_bytes` of each starting at block
/// `first_block` of the tensor's row.
fn check_blocks(
    info: &TensorInfo,
    data: &[u8],
    first_row: usize,
    row_bytes: usize,
    first_block: usize,
) -> Result<(), ShardError> {
    let ty = info.quant_type;
    match first_invalid_block(ty, data) {
        None => Ok(()),
        Some((block, why)) => {
            let per_row = (row_bytes / ty.block_bytes()).max(1);
            Err(ShardError::Invalid(format!(
                "tensor '{}' ({}): block {} of row {} is invalid: {why}",
                info.name,
                ty.name(),
                first_block + block % per_row,
                first_row + block / per_row
            )))
        }
    }
}

/// Copies `rows` x `cols` of a matrix out of the file. A column boundary inside a quantization
/// block cannot be cut in place; such a slice is dequantized to F32.
fn slice_matrix(
    file: &GgufFile,
    info: &TensorInfo,
    rows: &[Range<usize>],
    cols: Range<usize>,
    notes: &mut Vec<String>,
) -> Result<Weight, ShardError> {
    let ty = info.quant_type;
    let row_length = info.row_length();
    let row_bytes = ty.row_bytes(row_length).expect("checked at parse");
    let bytes = file.tensor_bytes(info);
    let row_count: usize = rows.iter().map(|r| r.len()).sum();
    if block_aligned(info, &cols) {
        let block = ty.block_elements();
        let start = cols.start / block * ty.block_bytes();
        let end = cols.end / block * ty.block_bytes();
        let mut data = Vec::with_capacity(row_count * (end - start));
        for range in rows {
            let from = data.len();
            if start == 0 && end == row_bytes {
                data.extend_from_slice(&bytes[range.start * row_bytes..range.end * row_bytes]);
            } else {
                for r in range.clone() {
                    data.extend_from_slice(&bytes[r * row_bytes + start..r * row_bytes + end]);
                }
            }
            check_blocks(
                info,
                &data[from..],
                range.start,
                end - start,
                start / ty.block_bytes(),
            )?;
        }
        return Ok(Weight {
            ty,
            rows: row_count,
            cols: cols.len(),
            data,
        });
    }
    notes.push(format!(
        "{}: columns {cols:?} cut {} blocks of {}; re-blocked to F32 for this shard",
        info.name,
        ty.name(),
        ty.block_elements()
    ));
    let mut full = vec![0f32; row_length];
    let mut data = Vec::with_capacity(row_count * cols.len() * 4);
    for r in rows.iter().flat_map(|r| r.clone()) {
        let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
        check_blocks(info, row, r, row_bytes, 0)?;
        dequantize_row(ty, row, &mut full);
        for v in &full[cols.clone()] {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(Weight {
        ty: QuantType::F32,
        rows: row_count,
        cols: cols.len(),
        data,
    })
}

pub fn load_shard(
    file: &GgufFile,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<LoadedShard, ShardError> {
    let mut loaded = LoadedShard {
        weights: HashMap::new(),
        vectors: HashMap::new(),
        weight_bytes: 0,
        notes: Vec::new(),
    };
    for slice in shard_tensors(config, shard) {
        let info = file
            .tensor(&slice.name)
            .ok_or_else(|| ShardError::Missing(slice.name.clone()))?;
        let (rows, cols) = resolve(info, &slice)?;
        if slice.vector {
            if info.quant_type != QuantType::F32 || info.row_count() != 1 {
                return Err(ShardError::Invalid(format!(
                    "'{}' is not an F32 vector",
                    slice.name
                )));
            }
            let values = file.tensor_bytes(info)[cols.start * 4..cols.end * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            loaded.vectors.insert(slice.name, values);
        } else {
            let weight = slice_matrix(file, info, &rows, cols, &mut loaded.notes)?;
            loaded.weights.insert(slice.name, weight);
        }
        file.release(info);
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
