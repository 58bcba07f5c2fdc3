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

/// Positions per KV block unless `--kv-block-size` says otherwise (vLLM's default).
pub const DEFAULT_KV_BLOCK_SIZE: usize = 16;

/// How the paged KV cache is sized (`--kv-block-size`, `--kv-budget`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvOptions {
    /// Positions per block, a power of two.
    pub block_size: usize,
    /// Memory for the pool on each worker; none: room for every sequence's whole context.
    pub budget: Option<KvBudget>,
}

impl Default for KvOptions {
    fn default() -> KvOptions {
        KvOptions {
            block_size: DEFAULT_KV_BLOCK_SIZE,
            budget: None,
        }
    }
}

/// `--kv-budget`: bytes per worker ("6G", "512MiB", "1000000"), or a share of the memory a
/// worker's host has available beyond its shard's weights ("0.5", "50%").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    Fraction(f64),
}

impl std::str::FromStr for KvBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<KvBudget, String> {
        let t = text.trim();
        let bad = || {
            format!(
                "--kv-budget '{text}' is neither bytes (6G, 512MiB, 1000000) nor a share of \
                 available memory (0.5, 50%)"
            )
        };
        let fraction = |f: f64| {
            if f > 0.0 && f <= 1.0 {
                Ok(KvBudget::Fraction(f))
            } else {
                Err(format!(
                    "--kv-budget '{text}': a share of available memory is in (0, 1]"
                ))
            }
        };
        if let Some(percent) = t.strip_suffix('%') {
            return fraction(percent.trim().parse::<f64>().map_err(|_| bad())? / 100.0);
        }
        let lower = t.to_ascii_lowercase();
        let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &lower[digits.len()..];
        let number: f64 = digits.trim().parse().map_err(|_| bad())?;
        if unit.is_empty() && number <= 1.0 {
            return fraction(number);
        }
        let scale: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
            "" => 1,
            "k" => 1 << 10,
            "m" => 1 << 20,
            "g" => 1 << 30,
            "t" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = number * scale as f64;
        if !bytes.is_finite() || bytes < 1.0 {
            return Err(bad());
        }
        Ok(KvBudget::Bytes(bytes as u64))
    }
}

impl KvOptions {
    /// Blocks in the pool: room for every sequence's whole context without a budget, else what
    /// the budget buys on the rank whose positions take the most bytes. Per rank:
    /// `bytes_per_position` and, for a share, the memory its host has available beyond its
    /// weights. Refused when one request's context (`context` positions) would not fit.
    pub fn pool_blocks(
        &self,
        bytes_per_position: &[u64],
        available: &[u64],
        sequences: usize,
        context: usize,
    ) -> Result<usize, String> {
        let page = self.block_size;
        let per_context = context.div_ceil(page);
        let Some(budget) = self.budget else {
            return Ok(sequences * per_context);
        };
        let (blocks, rank) = bytes_per_position
            .iter()
            .enumerate()
            .map(|(rank, &per_position)| {
                let bytes = match budget {
                    KvBudget::Bytes(b) => b,
                    KvBudget::Fraction(f) => (available[rank] as f64 * f) as u64,
                };
                let blocks = bytes / (page as u64 * per_position.max(1));
                (blocks as usize, rank)
            })
            .min()
            .unwrap_or((0, 0));
        if blocks < per_context {
            return Err(format!(
                "--kv-budget {} buys worker {rank} {} positions of KV cache ({} bytes each), \
                 fewer than one request's context of {context} (-c): raise the budget or lower -c",
                match budget {
                    KvBudget::Bytes(b) => format!("{b} bytes"),
                    KvBudget::Fraction(f) => format!("{:.0}% of available memory", f * 100.0),
                },
                blocks * page,
                bytes_per_position[rank]
            ));
        }
        Ok(blocks)
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
