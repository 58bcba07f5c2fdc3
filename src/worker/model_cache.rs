//! Model bytes received from the coordinator, cached on disk by the file's identity.
//!
//! A worker without its own copy of the model keeps a sparse file of the model's full size,
//! `<cache dir>/<header hash>-<size>.gguf`, holding the ranges it has received, and beside it
//! `<same>.ranges`, one "start end" line per range. A later start asks only for what is not
//! there yet; a cluster whose shards did not move loads entirely from the cache.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::worker::shard::{merge_ranges, missing_ranges};

/// Largest model a worker accepts into its cache (the request comes over the network).
pub const MAX_MODEL_BYTES: u64 = 1 << 40;

/// A cache file being filled: the ranges a PushModel may write, and those written.
pub struct CacheFile {
    pub path: PathBuf,
    pub header_hash: u64,
    pub size: u64,
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
    /// Opens (or creates, sparse) the cache file of this model and says which of `wanted`
    /// it lacks.
    pub fn open(
        dir: &Path,
        header_hash: u64,
        size: u64,
        wanted: &[Range<u64>],
    ) -> std::io::Result<(CacheFile, Vec<Range<u64>>)> {
        if size == 0 || size > MAX_MODEL_BYTES {
            return Err(std::io::Error::other(format!(
                "model size {size} is outside 1..={MAX_MODEL_BYTES}"
            )));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{header_hash:016x}-{size}.gguf"));
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
        let missing = missing_ranges(wanted, &have);
        Ok((
            CacheFile {
                path,
                header_hash,
                size,
                file,
                allowed: missing.clone(),
                have,
            },
            missing,
        ))
    }

    /// Writes one received chunk; it must lie inside the ranges PrepareModel asked for.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                format!(
                    "chunk at {offset} of {} bytes is outside the file",
                    data.len()
                )
            })?;
        if !self
            .allowed
            .iter()
            .any(|r| r.start <= offset && end <= r.end)
        {
            return Err(format!("chunk {offset}..{end} was not asked for"));
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.have.push(offset..end);
        Ok(())
    }

    /// Flushes the data, then records the ranges held (data first, so that a crash in
    /// between loses ranges rather than claiming ones never written).
    pub fn commit(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.have = merge_ranges(std::mem::take(&mut self.have));
        let temporary = manifest(&self.path).with_extension("ranges.tmp");
        let mut out = File::create(&temporary)?;
        for r in &self.have {
            writeln!(out, "{} {}", r.start, r.end)?;
        }
        out.sync_all()?;
        std::fs::rename(temporary, manifest(&self.path))
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
        let wanted = vec![0..10, 100..200];
        let (mut cache, missing) = CacheFile::open(&dir, 0xfeed, 1000, &wanted).unwrap();
        assert_eq!(missing, wanted);
        assert!(cache.write(500, &[1; 10]).is_err(), "not asked for");
        assert!(cache.write(995, &[1; 10]).is_err(), "past the end");
        cache.write(0, &[7; 10]).unwrap();
        cache.write(100, &[8; 50]).unwrap();
        cache.commit().unwrap();
        drop(cache);
        let (cache, missing) = CacheFile::open(&dir, 0xfeed, 1000, &wanted).unwrap();
        assert_eq!(missing, vec![150..200]);
        let mut byte = [0u8; 1];
        cache.file.read_exact_at(&mut byte, 120).unwrap();
        assert_eq!(byte[0], 8);
        assert!(CacheFile::open(&dir, 1, 0, &wanted).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
