//! Model bytes received from the coordinator, cached on disk by the model's identity.
//!
//! A worker without its own copy of the model keeps a sparse file of each model file's full
//! size holding the ranges it has received, and beside each `<same>.ranges`, one "start end"
//! line per range. A single file is `<cache dir>/<header hash>-<size>.gguf`; the parts of a
//! split model are `<header hash>-<total size>-00001-of-00004.gguf` ..., named as
//! llama-gguf-split names parts, so that opening the first finds the others. A later start asks
//! only for what is not there yet; a cluster whose shards did not move loads entirely from the
//! cache.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::shard::tensors::{merge_ranges, missing_ranges};

/// Largest model a worker accepts into its cache (the request comes over the network).
pub const MAX_MODEL_BYTES: u64 = 1 << 40;

/// A model's cache files being filled.
pub struct CacheFile {
    /// The file LoadShard opens: the only one, or the first part.
    pub path: PathBuf,
    pub header_hash: u64,
    parts: Vec<CachePart>,
}

/// One file of a cached model: the ranges a PushModel may write, and those written.
struct CachePart {
    path: PathBuf,
    size: u64,
    file: File,
    /// What PushModel may write: the missing ranges PrepareModel reported.
    allowed: Vec<Range<u64>>,
    have: Vec<Range<u64>>,
}

fn manifest(path: &Path) -> PathBuf {
    path.with_extension("ranges")
}

fn read_manifest(path: &Path, size: u64) -> Vec<Range<u64>> {
    let text = std::fs::read_to_string(manifest(path)).unwrap_or_default();
    let ranges = text
        .lines()
        .filter_map(|line| {
            let (a, b) = line.split_once(' ')?;
            let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
            (a < b && b <= size).then_some(a..b)
        })
        .collect();
    merge_ranges(ranges)
}

impl CacheFile {
    /// Opens (or creates, sparse) the cache files of this model, whose files have `sizes`, and
    /// says which of `wanted` (one list per file) they lack.
    pub fn open(
        dir: &Path,
        header_hash: u64,
        sizes: &[u64],
        wanted: &[Vec<Range<u64>>],
    ) -> std::io::Result<(CacheFile, Vec<Vec<Range<u64>>>)> {
        let total = sizes
            .iter()
            .try_fold(0u64, |sum, &size| sum.checked_add(size))
            .unwrap_or(u64::MAX);
        if sizes.is_empty()
            || sizes.contains(&0)
            || total > MAX_MODEL_BYTES
            || wanted.len() != sizes.len()
        {
            return Err(std::io::Error::other(format!(
                "model file sizes {sizes:?} (a total of {total}) are outside 1..={MAX_MODEL_BYTES}, \
                 or not one per list of ranges ({})",
                wanted.len()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let count = sizes.len();
        let mut parts = Vec::with_capacity(count);
        let mut missing = Vec::with_capacity(count);
        for (number, (&size, wanted)) in sizes.iter().zip(wanted).enumerate() {
            let name = if count == 1 {
                format!("{header_hash:016x}-{size}.gguf")
            } else {
                format!(
                    "{header_hash:016x}-{total}-{:05}-of-{count:05}.gguf",
                    number + 1
                )
            };
            let path = dir.join(name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let mut have = Vec::new();
            if file.metadata()?.len() == size {
                have = read_manifest(&path, size);
            } else {
                file.set_len(size)?;
            }
            let lacking = missing_ranges(wanted, &have);
            parts.push(CachePart {
                path,
                size,
                file,
                allowed: lacking.clone(),
                have,
            });
            missing.push(lacking);
        }
        Ok((
            CacheFile {
                path: parts[0].path.clone(),
                header_hash,
                parts,
            },
            missing,
        ))
    }

    /// Writes one received chunk into file `part`; it must lie inside the ranges PrepareModel
    /// asked for.
    pub fn write(&mut self, part: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let count = self.parts.len();
        let target = self
            .parts
            .get_mut(part)
            .ok_or_else(|| format!("chunk for file {part} of a model of {count}"))?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= target.size)
            .ok_or_else(|| {
                format!(
                    "chunk at {offset} of {} bytes is outside file {part}",
                    data.len()
                )
            })?;
        if !target
            .allowed
            .iter()
            .any(|r| r.start <= offset && end <= r.end)
        {
            return Err(format!(
                "chunk {offset}..{end} of file {part} was not asked for"
            ));
        }
        target
            .file
            .write_all_at(data, offset)
            .map_err(|e| format!("{}: {e}", target.path.display()))?;
        target.have.push(offset..end);
        Ok(())
    }

    /// Flushes the data, then records the ranges held (data first, so that a crash in
    /// between loses ranges rather than claiming ones never written).
    pub fn commit(&mut self) -> std::io::Result<()> {
        for part in &mut self.parts {
            part.file.sync_data()?;
            part.have = merge_ranges(std::mem::take(&mut part.have));
            let temporary = manifest(&part.path).with_extension("ranges.tmp");
            let mut out = File::create(&temporary)?;
            for r in &part.have {
                writeln!(out, "{} {}", r.start, r.end)?;
            }
            out.sync_all()?;
            std::fs::rename(temporary, manifest(&part.path))?;
        }
        Ok(())
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/tp/received`, else `~/.cache/tp/received`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("tp/received")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_file_remembers_what_it_received() {
        let dir = std::env::temp_dir().join(format!("tp-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let wanted = vec![vec![0..10, 100..200]];
        let (mut cache, missing) = CacheFile::open(&dir, 0xfeed, &[1000], &wanted).unwrap();
        assert_eq!(missing, wanted);
        assert!(cache.path.ends_with("000000000000feed-1000.gguf"));
        assert!(cache.write(0, 500, &[1; 10]).is_err(), "not asked for");
        assert!(cache.write(0, 995, &[1; 10]).is_err(), "past the end");
        assert!(cache.write(1, 0, &[1; 10]).is_err(), "no such file");
        cache.write(0, 0, &[7; 10]).unwrap();
        cache.write(0, 100, &[8; 50]).unwrap();
        cache.commit().unwrap();
        drop(cache);
        let (cache, missing) = CacheFile::open(&dir, 0xfeed, &[1000], &wanted).unwrap();
        assert_eq!(missing, vec![vec![150..200]]);
        let mut byte = [0u8; 1];
        cache.parts[0].file.read_exact_at(&mut byte, 120).unwrap();
        assert_eq!(byte[0], 8);
        assert!(CacheFile::open(&dir, 1, &[0], &wanted).is_err());
        assert!(CacheFile::open(&dir, 1, &[], &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The parts of a split model: one cache file each, named so that the first finds the
    /// others, each with its own manifest.
    #[test]
    fn the_parts_of_a_split_model_are_cached_apart() {
        let dir = std::env::temp_dir().join(format!("tp-cache-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let wanted = vec![vec![0..10], vec![0..5, 50..60], vec![0..5]];
        let (mut cache, missing) =
            CacheFile::open(&dir, 0xbeef, &[100, 200, 300], &wanted).unwrap();
        assert_eq!(missing, wanted);
        assert!(
            cache
                .path
                .ends_with("000000000000beef-600-00001-of-00003.gguf")
        );
        assert!(
            cache.write(1, 0, &[1; 10]).is_err(),
            "part 1 wants 0..5 only"
        );
        cache.write(1, 50, &[9; 10]).unwrap();
        cache.write(2, 0, &[3; 5]).unwrap();
        cache.commit().unwrap();
        drop(cache);
        let (cache, missing) = CacheFile::open(&dir, 0xbeef, &[100, 200, 300], &wanted).unwrap();
        assert_eq!(missing, vec![vec![0..10], vec![0..5], vec![]]);
        let third = dir.join("000000000000beef-600-00003-of-00003.gguf");
        assert_eq!(std::fs::metadata(&third).unwrap().len(), 300);
        let mut byte = [0u8; 1];
        cache.parts[1].file.read_exact_at(&mut byte, 55).unwrap();
        assert_eq!(byte[0], 9);
        assert!(
            CacheFile::open(&dir, 1, &[100, 200], &wanted).is_err(),
            "one list per file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
