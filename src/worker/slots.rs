//! Saving a sequence slot's KV cache to this worker's disk and reading it back (`serve
//! --slot-save-path`, llama-server's `POST /slots/{id}?action=save|restore`). Each worker
//! writes its own shard of the sequence: a header naming the model, this worker's place in
//! the plan, the cache's layout and the tokens, then each layer's keys and values of
//! positions `0..tokens.len()` as the cache stores them. A restore checks the header against
//! the loaded shard, so a file from another model, split or cache type is refused by name.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::worker::kv::KvCache;

const MAGIC: &[u8; 8] = b"TPKVSEQ1";
/// Largest header accepted (the token list dominates: 4 bytes and a comma per token).
const MAX_HEADER_BYTES: u32 = 64 << 20;

/// What a saved file must agree with to be restored here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedShard {
    pub model_header_hash: u64,
    pub rank_index: u32,
    pub rank_count: u32,
    /// Per layer, the KV heads this rank holds.
    pub kv_heads: Vec<(u32, u32)>,
    pub head_dim: u32,
    pub cache_type_k: String,
    pub cache_type_v: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    shard: SavedShard,
    tokens: Vec<u32>,
}

/// The file of this rank for a save named `name` (already checked by `check_file_name`).
pub fn file_path(dir: &Path, name: &str, rank: u32) -> PathBuf {
    dir.join(format!("{name}.rank{rank}"))
}

/// Writes positions `0..tokens.len()` of `sequence` to `path` (through a temporary file, so a
/// failed save never leaves half a file under the name). Returns the bytes written.
pub fn save(
    path: &Path,
    shard: &SavedShard,
    kv: &KvCache,
    sequence: usize,
    tokens: &[u32],
) -> Result<u64, String> {
    let n = tokens.len();
    if n == 0 || n > kv.max_context() || sequence >= kv.max_sequences() {
        return Err(format!(
            "cannot save {n} positions of slot {sequence} (slots: {}, context: {})",
            kv.max_sequences(),
            kv.max_context()
        ));
    }
    let runs = layer_runs(kv, sequence, n)?;
    let header = serde_json::to_vec(&Header {
        shard: shard.clone(),
        tokens: tokens.to_vec(),
    })
    .map_err(|e| e.to_string())?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    let write = || -> std::io::Result<u64> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u32).to_le_bytes())?;
        out.write_all(&header)?;
        let mut written = (MAGIC.len() + 4 + header.len()) as u64;
        for (layer, runs) in runs.iter().enumerate() {
            let (keys, values) = kv.layer_bytes(layer);
            for (k, _) in runs {
                out.write_all(&keys[k.clone()])?;
                written += k.len() as u64;
            }
            for (_, v) in runs {
                out.write_all(&values[v.clone()])?;
                written += v.len() as u64;
            }
        }
        out.into_inner()?.sync_all()?;
        Ok(written)
    };
    let written = write().map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("cannot write {}: {e}", temporary.display())
    })?;
    std::fs::rename(&temporary, path).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            temporary.display(),
            path.display()
        )
    })?;
    Ok(written)
}

/// Opens a saved file and checks its header against this shard; returns the file positioned
/// after the header, the header, the file's length and the header's.
fn open(
    path: &Path,
    shard: &SavedShard,
) -> Result<(std::io::BufReader<std::fs::File>, Header, u64, u32), String> {
    let name = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {name}: {e}"))?;
    let length = file.metadata().map_err(|e| e.to_string())?.len();
    let mut input = std::io::BufReader::new(file);
    let mut magic = [0u8; 8];
    let mut size = [0u8; 4];
    input
        .read_exact(&mut magic)
        .and_then(|_| input.read_exact(&mut size))
        .map_err(|_| format!("{name} is not a saved tp sequence (too short)"))?;
    if &magic != MAGIC {
        return Err(format!("{name} is not a saved tp sequence"));
    }
    let header_len = u32::from_le_bytes(size);
    if header_len > MAX_HEADER_BYTES || header_len as u64 > length {
        return Err(format!("{name}: its header is cut off or corrupt"));
    }
    let mut header = vec![0u8; header_len as usize];
    input
        .read_exact(&mut header)
        .map_err(|_| format!("{name}: its header is cut off"))?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| format!("{name}: bad header: {e}"))?;
    check_shard(&header.shard, shard).map_err(|e| format!("{name} {e}"))?;
    Ok((input, header, length, header_len))
}

/// The tokens a saved file holds, after checking its header against this shard (nothing is
/// read into a cache): the coordinator finds blocks for them before the restore.
pub fn peek(path: &Path, shard: &SavedShard) -> Result<Vec<u32>, String> {
    Ok(open(path, shard)?.1.tokens)
}

/// Reads a file `save` wrote into `sequence`'s blocks, after checking it against this shard.
/// Returns the tokens its positions hold and the bytes read.
pub fn restore(
    path: &Path,
    shard: &SavedShard,
    kv: &mut KvCache,
    sequence: usize,
) -> Result<(Vec<u32>, u64), String> {
    let (mut input, header, length, header_len) = open(path, shard)?;
    let name = path.display();
    let n = header.tokens.len();
    if n == 0 || n > kv.max_context() {
        return Err(format!(
            "{name} holds {n} positions; this cluster's context is {}",
            kv.max_context()
        ));
    }
    if sequence >= kv.max_sequences() {
        return Err(format!(
            "no slot {sequence} (slots: {})",
            kv.max_sequences()
        ));
    }
    let runs = layer_runs(kv, sequence, n)?;
    let payload: u64 = runs
        .iter()
        .flatten()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum();
    let expected = (MAGIC.len() + 4) as u64 + header_len as u64 + payload;
    if length != expected {
        return Err(format!(
            "{name} has {length} bytes where its header promises {expected}: cut off or corrupt"
        ));
    }
    for (layer, runs) in runs.iter().enumerate() {
        let (keys, values) = kv.layer_bytes_mut(layer);
        runs.iter()
            .try_for_each(|(k, _)| input.read_exact(&mut keys[k.clone()]))
            .and_then(|_| {
                runs.iter()
                    .try_for_each(|(_, v)| input.read_exact(&mut values[v.clone()]))
            })
            .map_err(|e| format!("cannot read {name}: {e}"))?;
    }
    Ok((header.tokens, length))
}

type Runs = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// Per layer, where positions `0..n` of a sequence lie (see `KvCache::sequence_runs`).
fn layer_runs(kv: &KvCache, sequence: usize, n: usize) -> Result<Vec<Runs>, String> {
    (0..kv.layers())
        .map(|layer| {
            kv.sequence_runs(layer, sequence, n).ok_or_else(|| {
                format!("the block table of slot {sequence} does not cover {n} positions")
            })
        })
        .collect()
}

/// Why a file saved by `saved` cannot be restored into `here`, naming the first difference.
fn check_shard(saved: &SavedShard, here: &SavedShard) -> Result<(), String> {
    if saved.model_header_hash != here.model_header_hash {
        return Err("was saved from another model".into());
    }
    if (saved.rank_index, saved.rank_count) != (here.rank_index, here.rank_count)
        || saved.kv_heads != here.kv_heads
    {
        return Err(format!(
            "was saved by rank {} of {} holding KV heads {}; this worker is rank {} of {} holding {}: restore into the same split",
            saved.rank_index,
            saved.rank_count,
            describe_heads(&saved.kv_heads),
            here.rank_index,
            here.rank_count,
            describe_heads(&here.kv_heads)
        ));
    }
    if (&saved.cache_type_k, &saved.cache_type_v) != (&here.cache_type_k, &here.cache_type_v) {
        return Err(format!(
            "was saved from a {}/{} KV cache; this cluster's is {}/{} (--cache-type-k/-v)",
            saved.cache_type_k, saved.cache_type_v, here.cache_type_k, here.cache_type_v
        ));
    }
    if saved.head_dim != here.head_dim {
        return Err("was saved with another head size".into());
    }
    Ok(())
}

fn describe_heads(heads: &[(u32, u32)]) -> String {
    match heads.first() {
        Some(first) if heads.iter().all(|h| h == first) => {
            format!("{}..{} of each layer", first.0, first.1)
        }
        _ => format!("{heads:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::cache::{CacheType, CacheTypes};

    fn shard(rank: u32) -> SavedShard {
        SavedShard {
            model_header_hash: 7,
            rank_index: rank,
            rank_count: 2,
            kv_heads: vec![(0, 1), (0, 1)],
            head_dim: 32,
            cache_type_k: "q8_0".into(),
            cache_type_v: "f16".into(),
        }
    }

    fn cache() -> KvCache {
        let types = CacheTypes {
            k: CacheType::Q8_0,
            v: CacheType::F16,
        };
        let layout = crate::worker::kv::KvLayout {
            sequences: 2,
            context: 16,
            block_size: 4,
            blocks: 8,
            types,
        };
        let mut kv = KvCache::new(&[1, 1], 32, layout);
        // Sequence 0's pages in shuffled blocks.
        kv.set_table(0, 0, &[5, 2, 7, 0]).unwrap();
        kv
    }

    #[test]
    fn a_saved_sequence_comes_back_bit_for_bit_and_other_shards_are_refused() {
        let dir = std::env::temp_dir().join(format!("tp-slots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut kv = cache();
        kv.set_table(1, 0, &[1, 3]).unwrap();
        for position in 0..5 {
            for layer in 0..2 {
                let row: Vec<f32> = (0..32)
                    .map(|i| (i + position * 7 + layer) as f32 * 0.1)
                    .collect();
                kv.write(layer, 1, position, &row, &row);
            }
        }
        let path = file_path(&dir, "chat", 0);
        let tokens = [5, 6, 7, 8, 9];
        let written = save(&path, &shard(0), &kv, 1, &tokens).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), written);
        let mut other = cache();
        let (back, read) = restore(&path, &shard(0), &mut other, 0).unwrap();
        assert_eq!((back, read), (tokens.to_vec(), written));
        // The positions' bytes, in order, whichever blocks hold them.
        let bytes = |kv: &KvCache, layer: usize, sequence: usize| -> Vec<u8> {
            let (keys, values) = kv.layer_bytes(layer);
            let runs = kv.sequence_runs(layer, sequence, 5).unwrap();
            let keys = runs.iter().flat_map(|(k, _)| keys[k.clone()].to_vec());
            keys.chain(runs.iter().flat_map(|(_, v)| values[v.clone()].to_vec()))
                .collect()
        };
        for layer in 0..2 {
            assert_eq!(bytes(&kv, layer, 1), bytes(&other, layer, 0));
        }
        // A table that does not cover the file is refused.
        let mut short = cache();
        short.set_table(0, 0, &[5]).unwrap();
        let e = restore(&path, &shard(0), &mut short, 0).unwrap_err();
        assert!(e.contains("does not cover 5 positions"), "{e}");
        let refused = |here: SavedShard| restore(&path, &here, &mut cache(), 0).unwrap_err();
        assert!(
            refused(shard(1)).contains("rank 0 of 2"),
            "{}",
            refused(shard(1))
        );
        let mut model = shard(0);
        model.model_header_hash = 8;
        assert!(refused(model).contains("another model"));
        let mut types = shard(0);
        types.cache_type_k = "f16".into();
        assert!(refused(types).contains("q8_0/f16"));
        // A file cut short is refused before anything is read into the cache.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(refused(shard(0)).contains("cut off or corrupt"));
        std::fs::write(&path, b"not a save").unwrap();
        assert!(refused(shard(0)).contains("not a saved tp sequence"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
