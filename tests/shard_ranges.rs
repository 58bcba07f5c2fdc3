//! What a worker without the model receives: the byte ranges of its shard. Loading a shard
//! from a copy of the model in which every byte outside those ranges is garbage must give
//! exactly the shard loaded from the real file.

mod common;

use common::*;
use tp::coordinator::planner::plan_with;
use tp::model::arch::ModelConfig;
use tp::model::gguf::GgufFile;
use tp::worker::shard::{load_shard, shard_byte_ranges};

#[test]
fn a_shard_loads_from_its_byte_ranges_alone() {
    check_ranges(SMOLLM2, MoeSplit::Tensor);
}

/// Expert slices: rows of every expert's gate and up, columns of every expert's down (tensor
/// split), or whole experts (expert split); qwen2moe adds the shared expert and biases.
#[test]
fn moe_shards_load_from_their_byte_ranges_alone() {
    for name in [MOE, MOE_QWEN2] {
        for split in [MoeSplit::Tensor, MoeSplit::Expert] {
            check_ranges(name, split);
        }
    }
}

fn check_ranges(name: &str, split: MoeSplit) {
    let Some(path) = model(name) else { return };
    let file = GgufFile::open(&path).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let original = std::fs::read(&path).unwrap();
    // An uneven three-way split, so that row-parallel slices start inside rows.
    let p = plan_with(&config, &[2.0, 1.0, 1.0], split).unwrap();
    for shard in &p.ranks {
        let ranges = shard_byte_ranges(&file, &config, shard).unwrap();
        let mut sparse = vec![0xABu8; original.len()];
        let mut covered = 0u64;
        for r in &ranges {
            sparse[r.start as usize..r.end as usize]
                .copy_from_slice(&original[r.start as usize..r.end as usize]);
            covered += r.end - r.start;
        }
        let copy = std::env::temp_dir().join(format!(
            "tp-shard-ranges-{}-{name}-{split:?}-{}.gguf",
            std::process::id(),
            shard.rank_index
        ));
        std::fs::write(&copy, &sparse).unwrap();
        let from_copy = GgufFile::open(&copy).unwrap();
        let a = load_shard(&file, &config, shard).unwrap();
        let b = load_shard(&from_copy, &config, shard).unwrap();
        std::fs::remove_file(&copy).unwrap();
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
            "{name} {split:?} rank {}: {} ranges, {:.1} MiB of the {:.1} MiB file (weights {:.1} MiB)",
            shard.rank_index,
            ranges.len(),
            covered as f64 / (1 << 20) as f64,
            original.len() as f64 / (1 << 20) as f64,
            a.weight_bytes as f64 / (1 << 20) as f64
        );
        assert!(
            covered < original.len() as u64 * 3 / 4,
            "a shard is not the whole file"
        );
    }
}
