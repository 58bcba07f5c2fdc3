//! Split models without llama.cpp: cuts a GGUF file into parts as `llama-gguf-split
//! --split-max-tensors` does. The first part keeps every metadata pair of the source, in order,
//! then the split keys; later parts hold only the split keys; tensors go to the parts in order,
//! each part's data aligned as its own header says (the source's alignment for the first, the
//! default 32 for the others, which carry no `general.alignment`).

use std::path::{Path, PathBuf};

use tp::model::gguf::GgufFile;

const DEFAULT_ALIGNMENT: u64 = 32;

/// Splits `source` into parts of at most `max_tensors` tensors each, written to `dir` as
/// `PREFIX-00001-of-0000N.gguf` ...; returns their paths, the first part first.
pub fn split_max_tensors(
    source: &Path,
    dir: &Path,
    prefix: &str,
    max_tensors: usize,
) -> Vec<PathBuf> {
    let count = GgufFile::open(source).unwrap().tensors.len();
    let mut sizes = vec![max_tensors; count / max_tensors];
    if !count.is_multiple_of(max_tensors) {
        sizes.push(count % max_tensors);
    }
    split_gguf(source, dir, prefix, &sizes)
}

/// Splits `source` into `parts` parts as `--split-max-tensors ceil(tensors / parts)` does.
pub fn split_into(source: &Path, dir: &Path, prefix: &str, parts: usize) -> Vec<PathBuf> {
    let count = GgufFile::open(source).unwrap().tensors.len();
    let paths = split_max_tensors(source, dir, prefix, count.div_ceil(parts));
    assert_eq!(
        paths.len(),
        parts,
        "{count} tensors do not make {parts} parts"
    );
    paths
}

/// Splits `source` into parts holding `tensors_per_part[i]` tensors each, in order.
pub fn split_gguf(
    source: &Path,
    dir: &Path,
    prefix: &str,
    tensors_per_part: &[usize],
) -> Vec<PathBuf> {
    let model = GgufFile::open(source).unwrap();
    let bytes = std::fs::read(source).unwrap();
    let raw = RawHeader::read(&bytes);
    assert_eq!(raw.tensors.len(), model.tensors.len());
    assert_eq!(tensors_per_part.iter().sum::<usize>(), model.tensors.len());
    let first_alignment = model
        .get_u64("general.alignment")
        .unwrap()
        .unwrap_or(DEFAULT_ALIGNMENT);
    let part_count = tensors_per_part.len();
    std::fs::create_dir_all(dir).unwrap();
    let mut paths = Vec::new();
    let mut next = 0;
    for (number, &n) in tensors_per_part.iter().enumerate() {
        let alignment = if number == 0 {
            first_alignment
        } else {
            DEFAULT_ALIGNMENT
        };
        let tensors = next..next + n;
        next += n;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
        let pairs = if number == 0 { raw.pair_count + 3 } else { 3 };
        out.extend(pairs.to_le_bytes());
        if number == 0 {
            out.extend(&bytes[raw.pairs.clone()]);
        }
        put_key(&mut out, "split.no", 2);
        out.extend((number as u16).to_le_bytes());
        put_key(&mut out, "split.count", 2);
        out.extend((part_count as u16).to_le_bytes());
        put_key(&mut out, "split.tensors.count", 5);
        out.extend((model.tensors.len() as i32).to_le_bytes());
        let mut offset = 0u64;
        for i in tensors.clone() {
            out.extend(&bytes[raw.tensors[i].clone()]);
            out.extend(offset.to_le_bytes());
            offset += model.tensors[i].size_bytes.next_multiple_of(alignment);
        }
        pad(&mut out, alignment);
        for i in tensors {
            out.extend(model.tensor_bytes(&model.tensors[i]));
            pad(&mut out, alignment);
        }
        let path = dir.join(format!(
            "{prefix}-{:05}-of-{part_count:05}.gguf",
            number + 1
        ));
        std::fs::write(&path, out).unwrap();
        paths.push(path);
    }
    paths
}

fn put_key(out: &mut Vec<u8>, key: &str, type_id: u32) {
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(type_id.to_le_bytes());
}

fn pad(out: &mut Vec<u8>, alignment: u64) {
    out.resize((out.len() as u64).next_multiple_of(alignment) as usize, 0);
}

/// Where the pieces of a GGUF header lie, to copy them verbatim.
struct RawHeader {
    pair_count: u64,
    /// Every metadata pair.
    pairs: std::ops::Range<usize>,
    /// Each tensor's entry in the index up to, not including, its data offset.
    tensors: Vec<std::ops::Range<usize>>,
}

impl RawHeader {
    fn read(bytes: &[u8]) -> RawHeader {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        assert_eq!(&bytes[..4], b"GGUF");
        let tensor_count = u64_at(8);
        let pair_count = u64_at(16);
        // The size of a value of type `type_id` at `at`.
        fn value_len(bytes: &[u8], at: usize, type_id: u32) -> usize {
            let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            match type_id {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                8 => 8 + u64_at(at) as usize,
                9 => {
                    let element = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                    let count = u64_at(at + 4);
                    let mut position = at + 12;
                    for _ in 0..count {
                        position += value_len(bytes, position, element);
                    }
                    position - at
                }
                other => panic!("metadata type {other}"),
            }
        }
        let mut position = 24;
        for _ in 0..pair_count {
            position += 8 + u64_at(position) as usize; // key
            let type_id = u32_at(position);
            position += 4;
            position += value_len(bytes, position, type_id);
        }
        let pairs = 24..position;
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let start = position;
            position += 8 + u64_at(position) as usize; // name
            let dims = u32_at(position) as usize;
            position += 4 + 8 * dims + 4; // dimensions, type
            tensors.push(start..position);
            position += 8; // offset
        }
        RawHeader {
            pair_count,
            pairs,
            tensors,
        }
    }
}

/// Writes `source` to `dest` with the tensors `choose(name, dims, type)` names stored in another
/// type: each row dequantized (our reference kernels) and quantized again with
/// `tp::kernels::cpu::quantize_row`. Metadata is copied verbatim; tensors `choose` returns None
/// for are copied unchanged.
pub fn requantize(
    source: &Path,
    dest: &Path,
    choose: impl Fn(&str, &[u64], tp::kernels::cpu::QuantType) -> Option<tp::kernels::cpu::QuantType>,
) {
    use tp::kernels::cpu::{dequantize_row, quantize_row};
    let model = GgufFile::open(source).unwrap();
    let bytes = std::fs::read(source).unwrap();
    let raw = RawHeader::read(&bytes);
    let alignment = model
        .get_u64("general.alignment")
        .unwrap()
        .unwrap_or(DEFAULT_ALIGNMENT);
    let mut data = Vec::new();
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((model.tensors.len() as u64).to_le_bytes());
    out.extend(raw.pair_count.to_le_bytes());
    out.extend(&bytes[raw.pairs.clone()]);
    for (info, entry) in model.tensors.iter().zip(&raw.tensors) {
        let old = model.tensor_bytes(info);
        let cols = info.dims[0] as usize;
        let new_bytes = match choose(&info.name, &info.dims, info.quant_type) {
            Some(ty) if ty != info.quant_type => {
                let rows = info.element_count() as usize / cols;
                let (old_rb, new_rb) = (
                    info.quant_type.row_bytes(cols).unwrap(),
                    ty.row_bytes(cols)
                        .expect("rows are whole blocks of the new type"),
                );
                let mut row = vec![0f32; cols];
                let mut new = vec![0u8; rows * new_rb];
                for r in 0..rows {
                    dequantize_row(
                        info.quant_type,
                        &old[r * old_rb..(r + 1) * old_rb],
                        &mut row,
                    );
                    quantize_row(ty, &row, &mut new[r * new_rb..(r + 1) * new_rb]);
                }
                let mut e = bytes[entry.clone()].to_vec();
                let n = e.len();
                e[n - 4..].copy_from_slice(&ty.ggml_id().to_le_bytes());
                out.extend(e);
                new
            }
            _ => {
                out.extend(&bytes[entry.clone()]);
                old.to_vec()
            }
        };
        out.extend((data.len() as u64).to_le_bytes());
        data.extend(new_bytes);
        pad(&mut data, alignment);
    }
    pad(&mut out, alignment);
    out.extend(data);
    std::fs::write(dest, out).unwrap();
}
