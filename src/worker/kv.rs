//! The KV cache of a worker's own KV heads, paged: one pool of blocks of `page` positions,
//! shared by every sequence through its block table (set by the coordinator, which owns the
//! allocation and prefix sharing, and sends table changes with the steps). Keys and values are
//! stored in the types the coordinator asked for (`CacheTypes`, f16 by default), one row of
//! `head_dim` values per (position, head); a block holds, per layer, `page` positions of every
//! head of the layer, position-major, so that within a block a head's rows lie one stride apart
//! as in a contiguous cache.

use crate::kernels::cpu::{Rows, quantize_row};
use crate::shard::cache::{CacheType, CacheTypes};
use half::f16;

pub struct KvCache {
    /// Per layer: `[block][position in block][head]` rows, as bytes in a buffer of u16 so that
    /// f16 and bf16 rows are aligned.
    keys: Vec<Vec<u16>>,
    values: Vec<Vec<u16>>,
    types: CacheTypes,
    /// Bytes of one head's row of keys and of values.
    key_row: usize,
    value_row: usize,
    heads: Vec<usize>,
    head_dim: usize,
    /// Positions per block: `1 << shift`.
    shift: u32,
    blocks: usize,
    /// Per sequence: the block of each page of its positions.
    tables: Vec<Vec<u32>>,
    max_context: usize,
}

/// Rows of one KV head of one sequence: `keys[rows.at(t)..]` is the key row of position
/// `rows.first + t` (bytes), and so for the values.
pub struct HeadRows<'a> {
    pub keys: &'a [u8],
    pub values: &'a [u8],
    pub key_rows: Rows<'a>,
    pub value_rows: Rows<'a>,
}

fn as_bytes(v: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding; any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2) }
}

fn as_bytes_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 2) }
}

/// The shape of a worker's KV cache, as the coordinator sets it at load.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    /// Sequences with a block table (`--parallel`).
    pub sequences: usize,
    /// Positions of one sequence at most (`-c`).
    pub context: usize,
    /// Positions per block, a power of two.
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
    pub types: CacheTypes,
}

impl KvLayout {
    /// Bytes of the pool for a shard with `heads` KV heads per layer.
    pub fn bytes(&self, heads: &[usize], head_dim: usize) -> u64 {
        (self.blocks * self.block_size) as u64 * self.types.bytes_per_position(heads, head_dim)
    }
}

impl KvCache {
    /// The pool `layout` describes, for a shard with `heads` KV heads per layer.
    pub fn new(heads: &[usize], head_dim: usize, layout: KvLayout) -> KvCache {
        let KvLayout {
            sequences: max_sequences,
            context: max_context,
            block_size: page,
            blocks,
            types,
        } = layout;
        assert!(
            page.is_power_of_two(),
            "KV block size {page} is not a power of two"
        );
        let (key_row, value_row) = (types.k.row_bytes(head_dim), types.v.row_bytes(head_dim));
        // Every row type has an even size (2 bytes per value, 34 or 18 per block).
        let words = |h: usize, row: usize| blocks * page * h * row / 2;
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
            shift: page.trailing_zeros(),
            blocks,
            tables: vec![Vec::new(); max_sequences],
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

    fn page(&self) -> usize {
        1 << self.shift
    }

    /// Replaces a sequence's block table from entry `first` on (a message from the
    /// coordinator: checked, never trusted).
    pub fn set_table(
        &mut self,
        sequence: usize,
        first: usize,
        blocks: &[u32],
    ) -> Result<(), String> {
        let pages = self.max_context.div_ceil(self.page());
        let Some(table) = self.tables.get_mut(sequence) else {
            return Err(format!(
                "sequence {sequence} exceeds the {} sequence slots",
                self.tables.len()
            ));
        };
        if first > table.len() || first + blocks.len() > pages {
            return Err(format!(
                "a block table of sequence {sequence} from entry {first} ({} blocks) does not \
                 follow its {} entries or exceeds the {pages} pages of a context",
                blocks.len(),
                table.len()
            ));
        }
        if let Some(b) = blocks.iter().find(|&&b| b as usize >= self.blocks) {
            return Err(format!(
                "block {b} of sequence {sequence} is outside the pool of {} blocks",
                self.blocks
            ));
        }
        table.truncate(first);
        table.extend_from_slice(blocks);
        Ok(())
    }

    pub fn check(&self, sequence: usize, position: usize) -> Result<(), String> {
        let Some(table) = self.tables.get(sequence) else {
            return Err(format!(
                "sequence {sequence} exceeds the {} sequence slots",
                self.tables.len()
            ));
        };
        if position >= self.max_context {
            return Err(format!(
                "position {position} exceeds the context of {}",
                self.max_context
            ));
        }
        if position >> self.shift >= table.len() {
            return Err(format!(
                "position {position} of sequence {sequence} has no KV block (its table has {})",
                table.len()
            ));
        }
        Ok(())
    }

    /// Forgets a sequence's blocks (the coordinator frees them).
    pub fn clear(&mut self, sequence: usize) {
        if let Some(t) = self.tables.get_mut(sequence) {
            t.clear();
        }
    }

    /// Byte offset of a (position, head 0) row of a sequence in a layer with rows of `row`
    /// bytes. The position is within the table (`check`).
    fn offset(&self, layer: usize, sequence: usize, position: usize, row: usize) -> usize {
        let stride = self.heads[layer] * row;
        let block = self.tables[sequence][position >> self.shift] as usize;
        (block << self.shift) * stride + (position & (self.page() - 1)) * stride
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

    /// Rows of `head` of a sequence from position `first` on.
    pub fn head_rows(
        &self,
        layer: usize,
        sequence: usize,
        head: usize,
        first: usize,
    ) -> HeadRows<'_> {
        let heads = self.heads[layer];
        let table = &self.tables[sequence];
        let rows = |row: usize| Rows {
            table,
            shift: self.shift,
            block: self.page() * heads * row,
            stride: heads * row,
            first,
        };
        HeadRows {
            keys: &as_bytes(&self.keys[layer])[head * self.key_row..],
            values: &as_bytes(&self.values[layer])[head * self.value_row..],
            key_rows: rows(self.key_row),
            value_rows: rows(self.value_row),
        }
    }

    /// The same rows as f16 values when both caches are f16 (the vector kernels' own form):
    /// `(keys, values, rows)` with the rows' units in values.
    pub fn head_rows_f16(
        &self,
        layer: usize,
        sequence: usize,
        head: usize,
        first: usize,
    ) -> Option<(&[f16], &[f16], Rows<'_>)> {
        if self.types.k != CacheType::F16 || self.types.v != CacheType::F16 {
            return None;
        }
        let rows = self.head_rows(layer, sequence, head, first);
        let view = |b: &[u8]| {
            // SAFETY: the bytes lie in a u16 buffer at an even offset (rows of 2·head_dim
            // bytes), so they are aligned for f16, whose every bit pattern is valid.
            unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), b.len() / 2) }
        };
        let r = rows.key_rows;
        Some((
            view(rows.keys),
            view(rows.values),
            Rows {
                block: r.block / 2,
                stride: r.stride / 2,
                ..r
            },
        ))
    }

    /// Byte ranges of positions `0..n` of a sequence in one layer, in position order, as
    /// `(keys, values)` runs of whole blocks (the last one cut at `n`): the unit in which a
    /// sequence's cache is saved and restored. `None` when the table does not cover `n`.
    pub fn sequence_runs(
        &self,
        layer: usize,
        sequence: usize,
        n: usize,
    ) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
        let table = self.tables.get(sequence)?;
        if n.div_ceil(self.page()) > table.len() {
            return None;
        }
        let heads = self.heads[layer];
        let page = self.page();
        Some(
            (0..n)
                .step_by(page)
                .map(|start| {
                    let count = page.min(n - start);
                    let run = |row: usize| {
                        let at = self.offset(layer, sequence, start, row);
                        at..at + count * heads * row
                    };
                    (run(self.key_row), run(self.value_row))
                })
                .collect(),
        )
    }

    /// A layer's key and value bytes, for the ranges of [`KvCache::sequence_runs`].
    pub fn layer_bytes(&self, layer: usize) -> (&[u8], &[u8]) {
        (as_bytes(&self.keys[layer]), as_bytes(&self.values[layer]))
    }

    pub fn layer_bytes_mut(&mut self, layer: usize) -> (&mut [u8], &mut [u8]) {
        (
            as_bytes_mut(&mut self.keys[layer]),
            as_bytes_mut(&mut self.values[layer]),
        )
    }

    pub fn layers(&self) -> usize {
        self.heads.len()
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn max_sequences(&self) -> usize {
        self.tables.len()
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
