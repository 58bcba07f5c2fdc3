//! The KV cache of a worker's own KV heads: one slot per sequence, allocated at load. Keys and
//! values are stored in the types the coordinator asked for (`CacheTypes`, f16 by default), one
//! row of `head_dim` values per (position, head).

use crate::kernels::cpu::quantize_row;
use crate::shard::cache::{CacheType, CacheTypes};
use half::f16;

pub struct KvCache {
    /// Per layer: `[sequence][position][head]` rows, as bytes in a buffer of u16 so that f16
    /// and bf16 rows are aligned.
    keys: Vec<Vec<u16>>,
    values: Vec<Vec<u16>>,
    types: CacheTypes,
    /// Bytes of one head's row of keys and of values.
    key_row: usize,
    value_row: usize,
    heads: Vec<usize>,
    head_dim: usize,
    max_sequences: usize,
    max_context: usize,
}

/// Rows of one KV head at positions `0..n`: each position's row `stride` bytes after the
/// previous one.
pub struct HeadRows<'a> {
    pub keys: &'a [u8],
    pub values: &'a [u8],
    pub key_stride: usize,
    pub value_stride: usize,
}

fn as_bytes(v: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding; any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2) }
}

fn as_bytes_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 2) }
}

impl KvCache {
    pub fn new(
        heads: &[usize],
        head_dim: usize,
        max_sequences: usize,
        max_context: usize,
        types: CacheTypes,
    ) -> KvCache {
        let (key_row, value_row) = (types.k.row_bytes(head_dim), types.v.row_bytes(head_dim));
        // Every row type has an even size (2 bytes per value, 34 or 18 per block).
        let words = |h: usize, row: usize| max_sequences * max_context * h * row / 2;
        KvCache {
            keys: heads.iter().map(|&h| vec![0; words(h, key_row)]).collect(),
            values: heads
                .iter()
                .map(|&h| vec![0; words(h, value_row)])
                .collect(),
            types,
            key_row,
            value_row,
            heads: heads.to_vec(),
            head_dim,
            max_sequences,
            max_context,
        }
    }

    pub fn types(&self) -> CacheTypes {
        self.types
    }

    pub fn bytes(&self) -> u64 {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.len() as u64 * 2)
            .sum()
    }

    pub fn check(&self, sequence: usize, position: usize) -> Result<(), String> {
        if sequence >= self.max_sequences {
            return Err(format!(
                "sequence {sequence} exceeds the {} sequence slots",
                self.max_sequences
            ));
        }
        if position >= self.max_context {
            return Err(format!(
                "position {position} exceeds the context of {}",
                self.max_context
            ));
        }
        Ok(())
    }

    /// Positions are addressed directly, so clearing only has to forget nothing: a sequence
    /// restarted at position 0 overwrites what it reads.
    pub fn clear(&mut self, _sequence: usize) {}

    /// Byte offset of a (sequence, position, head) row in a layer with rows of `row` bytes.
    fn offset(&self, layer: usize, sequence: usize, position: usize, row: usize) -> usize {
        (sequence * self.max_context + position) * self.heads[layer] * row
    }

    /// Stores the keys and values of one position, every head of the layer, converting each
    /// head's row to the cache's types.
    pub fn write(
        &mut self,
        layer: usize,
        sequence: usize,
        position: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let hd = self.head_dim;
        let heads = self.heads[layer];
        let (key_row, value_row) = (self.key_row, self.value_row);
        let k_at = self.offset(layer, sequence, position, key_row);
        let v_at = self.offset(layer, sequence, position, value_row);
        let (kt, vt) = (self.types.k, self.types.v);
        let k_dst = &mut as_bytes_mut(&mut self.keys[layer])[k_at..k_at + heads * key_row];
        store_rows(kt, &keys[..heads * hd], k_dst, hd);
        let v_dst = &mut as_bytes_mut(&mut self.values[layer])[v_at..v_at + heads * value_row];
        store_rows(vt, &values[..heads * hd], v_dst, hd);
    }

    /// Rows of `head` at positions `0..n` of a sequence.
    pub fn head_rows(&self, layer: usize, sequence: usize, head: usize, n: usize) -> HeadRows<'_> {
        let heads = self.heads[layer];
        let span = |row: usize| {
            let start = self.offset(layer, sequence, 0, row) + head * row;
            start..start + n.saturating_sub(1) * heads * row + row
        };
        HeadRows {
            keys: &as_bytes(&self.keys[layer])[span(self.key_row)],
            values: &as_bytes(&self.values[layer])[span(self.value_row)],
            key_stride: heads * self.key_row,
            value_stride: heads * self.value_row,
        }
    }

    /// The same rows as f16 values when both caches are f16 (the vector kernels' own form):
    /// `(keys, values, stride)` with the stride in values.
    pub fn head_rows_f16(
        &self,
        layer: usize,
        sequence: usize,
        head: usize,
        n: usize,
    ) -> Option<(&[f16], &[f16], usize)> {
        if self.types.k != CacheType::F16 || self.types.v != CacheType::F16 {
            return None;
        }
        let rows = self.head_rows(layer, sequence, head, n);
        let view = |b: &[u8]| {
            // SAFETY: the bytes lie in a u16 buffer at an even offset (rows of 2·head_dim
            // bytes), so they are aligned for f16, whose every bit pattern is valid.
            unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), b.len() / 2) }
        };
        Some((view(rows.keys), view(rows.values), rows.key_stride / 2))
    }

    /// Bytes of positions `0..n` of a sequence in one layer, keys then values: the unit in
    /// which a sequence's cache is saved and restored.
    pub fn sequence_bytes(&self, layer: usize, sequence: usize, n: usize) -> (&[u8], &[u8]) {
        let heads = self.heads[layer];
        let span = |row: usize| {
            let start = self.offset(layer, sequence, 0, row);
            start..start + n * heads * row
        };
        (
            &as_bytes(&self.keys[layer])[span(self.key_row)],
            &as_bytes(&self.values[layer])[span(self.value_row)],
        )
    }

    pub fn sequence_bytes_mut(
        &mut self,
        layer: usize,
        sequence: usize,
        n: usize,
    ) -> (&mut [u8], &mut [u8]) {
        let heads = self.heads[layer];
        let k_start = self.offset(layer, sequence, 0, self.key_row);
        let v_start = self.offset(layer, sequence, 0, self.value_row);
        let (k_len, v_len) = (n * heads * self.key_row, n * heads * self.value_row);
        (
            &mut as_bytes_mut(&mut self.keys[layer])[k_start..k_start + k_len],
            &mut as_bytes_mut(&mut self.values[layer])[v_start..v_start + v_len],
        )
    }

    pub fn layers(&self) -> usize {
        self.heads.len()
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn max_sequences(&self) -> usize {
        self.max_sequences
    }
}

/// Converts `src` (rows of `hd` values) into rows of type `ty` in `dst`.
fn store_rows(ty: CacheType, src: &[f32], dst: &mut [u8], hd: usize) {
    let row = ty.row_bytes(hd);
    if ty == CacheType::F16 {
        for (d, s) in dst.chunks_exact_mut(2).zip(src) {
            d.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
        }
        return;
    }
    for (d, s) in dst.chunks_exact_mut(row).zip(src.chunks_exact(hd)) {
        quantize_row(ty.quant_type(), s, d);
    }
}
