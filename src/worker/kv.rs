//! The KV cache of a worker's own KV heads: F16, one slot per sequence, allocated at load.

use half::f16;

pub struct KvCache {
    /// Per layer: keys then values, `[sequence][position][head][head_dim]`.
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    heads: Vec<usize>,
    head_dim: usize,
    max_sequences: usize,
    max_context: usize,
}

impl KvCache {
    pub fn new(
        heads: &[usize],
        head_dim: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> KvCache {
        let size = |h: usize| max_sequences * max_context * h * head_dim;
        KvCache {
            keys: heads.iter().map(|&h| vec![f16::ZERO; size(h)]).collect(),
            values: heads.iter().map(|&h| vec![f16::ZERO; size(h)]).collect(),
            heads: heads.to_vec(),
            head_dim,
            max_sequences,
            max_context,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.len() as u64 * 2)
            .sum()
    }

    /// What `new` with these sizes allocates: keys and values of every slot, F16. `plan`
    /// reports this, so its figure is the workers' own.
    pub fn bytes_for(
        heads: &[usize],
        head_dim: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> u64 {
        let per_position: u64 = heads.iter().map(|&h| (h * head_dim) as u64).sum();
        2 * 2 * per_position * max_sequences as u64 * max_context as u64
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

    fn offset(&self, layer: usize, sequence: usize, position: usize, head: usize) -> usize {
        ((sequence * self.max_context + position) * self.heads[layer] + head) * self.head_dim
    }

    pub fn write(
        &mut self,
        layer: usize,
        sequence: usize,
        position: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let start = self.offset(layer, sequence, position, 0);
        let len = self.heads[layer] * self.head_dim;
        for (t, s) in self.keys[layer][start..start + len].iter_mut().zip(keys) {
            *t = f16::from_f32(*s);
        }
        for (t, s) in self.values[layer][start..start + len]
            .iter_mut()
            .zip(values)
        {
            *t = f16::from_f32(*s);
        }
    }

    /// Keys and values of `head` at positions `0..n` of a sequence, each position `stride`
    /// elements after the previous one: `(keys, values, stride)`.
    pub fn head_rows(
        &self,
        layer: usize,
        sequence: usize,
        head: usize,
        n: usize,
    ) -> (&[f16], &[f16], usize) {
        let start = self.offset(layer, sequence, 0, head);
        let stride = self.heads[layer] * self.head_dim;
        let end = start + n.saturating_sub(1) * stride + self.head_dim;
        (
            &self.keys[layer][start..end],
            &self.values[layer][start..end],
            stride,
        )
    }

    pub fn key(&self, layer: usize, sequence: usize, position: usize, head: usize) -> &[f16] {
        let start = self.offset(layer, sequence, position, head);
        &self.keys[layer][start..start + self.head_dim]
    }

    pub fn value(&self, layer: usize, sequence: usize, position: usize, head: usize) -> &[f16] {
        let start = self.offset(layer, sequence, position, head);
        &self.values[layer][start..start + self.head_dim]
    }
}
