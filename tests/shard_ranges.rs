//! What a worker without the model receives: the byte ranges of its shard. Loading a shard
//! from copies of the model's files in which every byte outside those ranges is garbage must
//! give exactly the shard loaded from the real file; for a split model, from the parts.

mod common;

use std::path::Path;

use common::*;
use tp::model::arch::ModelConfig;
use tp::model::gguf::GgufFile;
use tp::shard::plan::plan_with;
use tp::shard::tensors::shard_byte_ranges;
use tp::worker::shard::load_shard;

#[test]
fn a_shard_loads_from_its_byte_ranges_alone() {
    let Some(path) = model(SMOLLM2) else { return };
    check_ranges(&path, &path, SMOLLM2, MoeSplit::Tensor);
}

/// Expert slices: rows of every expert's gate and up, columns of every expert's down (tensor
/// split), or whole experts (expert split); qwen2moe adds the shared expert and biases.
#[test]
fn moe_shards_load_from_their_byte_ranges_alone() {
    for name in [MOE, MOE_QWEN2] {
        let Some(path) = model(name) else { return };
        for split in [MoeSplit::Tensor, MoeSplit::Expert] {
            check_ranges(&path, &path, name, split);
        }
    }
}

/// A model split into three files: each shard's ranges name their part, and the parts' copies
/// holding only those give the shard of the single file.
#[test]
fn a_shard_of_a_split_model_loads_from_its_byte_ranges_alone() {
    let Some(path) = model(QWEN05) else { return };
    let dir = std::env::temp_dir().join(format!("tp-shard-ranges-split-{}", std::process::id()));
    let parts = split::split_into(&path, &dir, "qwen", 3);
    check_ranges(&parts[0], &path, "qwen-split", MoeSplit::Tensor);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Loads every shard of an uneven three-way plan from sparse copies of `model_path`'s files
/// and compares it with the shard loaded from `reference` (the same model, maybe unsplit).
fn check_ranges(model_path: &Path, reference: &Path, label: &str, split: MoeSplit) {
    let file = GgufFile::open(model_path).unwrap();
    let reference = GgufFile::open(reference).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let originals: Vec<Vec<u8>> = file
        .parts
        .iter()
        .map(|part| std::fs::read(&part.path).unwrap())
        .collect();
    let model_bytes: u64 = originals.iter().map(|o| o.len() as u64).sum();
    // An uneven three-way split, so that row-parallel slices start inside rows.
    let p = plan_with(&config, &[2.0, 1.0, 1.0], split).unwrap();
    for shard in &p.ranks {
        let ranges = shard_byte_ranges(&file, &config, shard).unwrap();
        assert_eq!(ranges.len(), file.parts.len(), "one list per file");
        let dir = std::env::temp_dir().join(format!(
            "tp-shard-ranges-{}-{label}-{split:?}-{}",
            std::process::id(),
            shard.rank_index
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut covered = 0u64;
        let mut read = Vec::new();
        for ((part, original), ranges) in file.parts.iter().zip(&originals).zip(&ranges) {
            assert_eq!(ranges[0].start, 0, "the header comes first");
            let mut sparse = vec![0xABu8; original.len()];
            let mut part_covered = 0u64;
            for r in ranges {
                sparse[r.start as usize..r.end as usize]
                    .copy_from_slice(&original[r.start as usize..r.end as usize]);
                part_covered += r.end - r.start;
            }
            covered += part_covered;
            read.push(format!(
                "{:.1}",
                (part_covered - part.header_bytes) as f64 / (1 << 20) as f64
            ));
            std::fs::write(dir.join(part.path.file_name().unwrap()), &sparse).unwrap();
        }
        let from_copy = GgufFile::open(dir.join(file.path.file_name().unwrap())).unwrap();
        assert_eq!(from_copy.parts.len(), file.parts.len());
        let a = load_shard(&reference, &config, shard).unwrap();
        let b = load_shard(&from_copy, &config, shard).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a.weights.len(), b.weights.len());
        for (name, w) in &a.weights {
            assert!(
                w.data == b.weights[name].data,
                "rank {}: {name} differs",
                shard.rank_index
            );
        }
        assert_eq!(a.vectors, b.vectors, "rank {}", shard.rank_index);
        println!(
            "{label} {split:?} rank {}: {} ranges, {:.1} MiB of the {:.1} MiB model in {} files \
             (tensor data per file: {} MiB; weights {:.1} MiB)",
            shard.rank_index,
            ranges.iter().map(Vec::len).sum::<usize>(),
            covered as f64 / (1 << 20) as f64,
            model_bytes as f64 / (1 << 20) as f64,
            file.parts.len(),
            read.join(" + "),
            a.weight_bytes as f64 / (1 << 20) as f64
        );
        assert!(
            covered < model_bytes * 3 / 4,
            "a shard is not the whole model"
        );
    }
}
