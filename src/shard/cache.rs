//! KV cache storage types, as llama.cpp names them (`--cache-type-k`, `--cache-type-v`), and
//! the bytes a shard's cache takes. Keys and values are stored per position and KV head, one
//! row of `head_dim` values in the chosen type; the quantized types quantize each row in
//! blocks of 32, so a head's row is the same whichever worker holds it.

use crate::kernels::cpu::{QK, QuantType};

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheType {
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl CacheType {
    pub const ALL: [CacheType; 4] = [
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
        }
    }

    pub fn quant_type(self) -> QuantType {
        match self {
            CacheType::F16 => QuantType::F16,
            CacheType::Bf16 => QuantType::BF16,
            CacheType::Q8_0 => QuantType::Q8_0,
            CacheType::Q4_0 => QuantType::Q4_0,
        }
    }

    /// Bytes of one row of `n` values.
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            CacheType::F16 | CacheType::Bf16 => 2 * n,
            CacheType::Q8_0 => n / QK * 34,
            CacheType::Q4_0 => n / QK * 18,
        }
    }

    /// Whether rows of `head_dim` values can be stored in this type; why not otherwise.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        match self {
            CacheType::Q8_0 | CacheType::Q4_0 if !head_dim.is_multiple_of(QK) => Err(format!(
                "a {} KV cache stores rows in blocks of {QK}, and this model's heads have {head_dim} values: use f16 or bf16",
                self.name()
            )),
            _ => Ok(()),
        }
    }

    /// The wire form: the name, with "" for the default (older coordinators send nothing).
    pub fn from_wire(s: &str) -> Result<CacheType, String> {
        if s.is_empty() {
            Ok(CacheType::F16)
        } else {
            s.parse()
        }
    }
}

impl std::str::FromStr for CacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<CacheType, String> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = CacheType::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown KV cache type '{s}' (choose from {})",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The types of the key and value caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CacheTypes {
    pub k: CacheType,
    pub v: CacheType,
}

impl CacheTypes {
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        self.k
            .check_head_dim(head_dim)
            .map_err(|e| format!("--cache-type-k: {e}"))?;
        self.v
            .check_head_dim(head_dim)
            .map_err(|e| format!("--cache-type-v: {e}"))
    }

    /// The Walsh-Hadamard rotation the keys (and queries) take before a quantized key cache,
    /// as llama.cpp's: in chunks of the largest power of two from 64 up that divides the head
    /// size. An orthonormal rotation leaves every query-key dot product as it is but spreads
    /// outliers over the block, so 4 and 8 bits lose less. None for f16/bf16, or heads that
    /// are not a multiple of 64.
    pub fn key_rotation(self, head_dim: usize) -> Option<usize> {
        if !matches!(self.k, CacheType::Q8_0 | CacheType::Q4_0) || !head_dim.is_multiple_of(64) {
            return None;
        }
        let mut n = 64;
        while head_dim.is_multiple_of(2 * n) {
            n *= 2;
        }
        Some(n)
    }

    /// The rotation values take before a quantized value cache (chunks of 64, as llama.cpp's);
    /// attention's output is rotated back with it.
    pub fn value_rotation(self, head_dim: usize) -> Option<usize> {
        (matches!(self.v, CacheType::Q8_0 | CacheType::Q4_0) && head_dim.is_multiple_of(64))
            .then_some(64)
    }

    /// Bytes of one position's keys and values over the given KV heads per layer.
    pub fn bytes_per_position(self, heads: &[usize], head_dim: usize) -> u64 {
        let heads: usize = heads.iter().sum();
        (heads * (self.k.row_bytes(head_dim) + self.v.row_bytes(head_dim))) as u64
    }

    /// What a shard's cache of `sequences` slots of `context` positions takes.
    pub fn bytes_for(
        self,
        heads: &[usize],
        head_dim: usize,
        sequences: usize,
        context: usize,
    ) -> u64 {
        self.bytes_per_position(heads, head_dim) * sequences as u64 * context as u64
    }
}

/// Checks a name for a saved sequence (`POST /slots/{id}?action=save`): it becomes a file name
/// in the save directory of every worker, so it may not leave that directory or hide in it.
pub fn check_save_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("bad file name '{name}': {why}"));
    if name.is_empty() || name.len() > 200 {
        return bad("give 1 to 200 bytes");
    }
    if name.starts_with('.') {
        return bad("it may not start with '.'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return bad("use letters, digits, '-', '_' and '.' only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes_match_ggml_blocks() {
        for t in CacheType::ALL {
            assert_eq!(t.name().parse::<CacheType>(), Ok(t));
            assert_eq!(
                t.row_bytes(64),
                64 / t.quant_type().block_elements() * t.quant_type().block_bytes()
            );
        }
        assert_eq!(CacheType::from_wire(""), Ok(CacheType::F16));
        assert!("q4_1".parse::<CacheType>().unwrap_err().contains("q8_0"));
        assert!(CacheType::Q4_0.check_head_dim(80).is_err());
        assert!(CacheType::Bf16.check_head_dim(80).is_ok());
        let types = CacheTypes {
            k: CacheType::Q8_0,
            v: CacheType::Q4_0,
        };
        // Two layers of 3 and 1 heads of 64: 4 heads × (68 + 36) bytes.
        assert_eq!(types.bytes_per_position(&[3, 1], 64), 4 * (68 + 36));
        assert_eq!(types.bytes_for(&[3, 1], 64, 2, 10), 4 * (68 + 36) * 20);
        for (hd, k) in [
            (64, Some(64)),
            (128, Some(128)),
            (192, Some(64)),
            (256, Some(256)),
        ] {
            assert_eq!(types.key_rotation(hd), k, "head {hd}");
            assert_eq!(types.value_rotation(hd), Some(64));
        }
        assert_eq!(types.key_rotation(96), None);
        assert_eq!(CacheTypes::default().key_rotation(128), None);
        assert_eq!(CacheTypes::default().value_rotation(128), None);
        for good in ["chat-1.bin", "a", "slot_0.kv"] {
            assert!(check_save_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "..",
            "a\\b",
            "x y",
            "é",
            &"a".repeat(201),
        ] {
            assert!(check_save_name(bad).is_err(), "{bad}");
        }
    }
}
