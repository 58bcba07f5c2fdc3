//! Split models (llama-gguf-split's `NAME-00001-of-00003.gguf` ...), made here from a single
//! file by `common::split`: opened from the first part they give the single file's logits bit
//! for bit, on one rank and on three; a worker without the files receives exactly its shard's
//! byte ranges of the parts, then loads from its cache; `plan` says which parts each rank reads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tp::coordinator::cluster::{Cluster, ClusterLimits, WorkerEntry};
use tp::coordinator::session::{Model, Session};
use tp::model::gguf::GgufFile;
use tp::shard::tensors::shard_byte_ranges;

const PROMPTS: [&str; 2] = [
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
];

/// Qwen2.5 0.5B split into three parts in a temporary directory, removed when dropped.
struct SplitModel {
    dir: PathBuf,
    single: PathBuf,
    parts: Vec<PathBuf>,
}

impl SplitModel {
    fn new(test: &str) -> Option<SplitModel> {
        let single = model(QWEN05)?;
        let dir = std::env::temp_dir().join(format!("tp-split-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let parts = split::split_into(&single, &dir, "qwen2.5-coder-0.5b-instruct-q4_k_m", 3);
        Some(SplitModel { dir, single, parts })
    }
}

impl Drop for SplitModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn prompt_logits(session: &mut Session) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for prompt in PROMPTS {
        let tokens = session.model.tokenizer.encode(prompt, true).unwrap();
        out.push(session.final_logits(&tokens).await.unwrap());
    }
    out
}

async fn logits_of(path: &Path, weights: &[f64]) -> Vec<Vec<f32>> {
    let mut session = session(path, weights, 128, 64).await;
    let logits = prompt_logits(&mut session).await;
    session.cluster.shutdown().await;
    logits
}

/// Bit for bit: the same weights in the same order give the same sums.
fn assert_identical(label: &str, reference: &[Vec<f32>], other: &[Vec<f32>]) {
    for (i, (a, b)) in reference.iter().zip(other).enumerate() {
        assert_eq!(a.len(), b.len());
        let differing = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        println!(
            "{label} prompt {i}: NMSE {:.3e}, {differing} of {} logits differ",
            nmse(a, b),
            a.len()
        );
        assert_eq!(differing, 0, "{label} prompt {i}");
    }
}

#[test]
fn the_parts_open_as_one_model() {
    let Some(m) = SplitModel::new("open") else {
        return;
    };
    let single = GgufFile::open(&m.single).unwrap();
    let split = GgufFile::open(&m.parts[0]).unwrap();
    assert_eq!(split.parts.len(), 3);
    let paths: Vec<&Path> = split.parts.iter().map(|p| p.path.as_path()).collect();
    assert_eq!(
        paths,
        m.parts.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );
    // Metadata from the first part: the single file's, plus the split keys.
    for (key, value) in &single.metadata {
        assert_eq!(split.get(key), Some(value), "{key}");
    }
    assert_eq!(split.metadata.len(), single.metadata.len() + 3);
    assert_eq!(split.tensors.len(), single.tensors.len());
    let mut last_part = 0;
    for (a, b) in single.tensors.iter().zip(&split.tensors) {
        assert_eq!(
            (&a.name, &a.dims, a.quant_type),
            (&b.name, &b.dims, b.quant_type)
        );
        assert!(b.part >= last_part, "tensors go to the parts in order");
        last_part = b.part;
        assert!(
            single.tensor_bytes(a) == split.tensor_bytes(b),
            "{}",
            a.name
        );
    }
    assert_eq!(last_part, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_model_gives_the_logits_of_the_single_file() {
    let Some(m) = SplitModel::new("logits") else {
        return;
    };
    for weights in [&[1.0][..], &[1.0, 1.0, 1.0]] {
        let single = logits_of(&m.single, weights).await;
        let split = logits_of(&m.parts[0], weights).await;
        assert_identical(&format!("TP = {}", weights.len()), &single, &split);
    }
}

/// Workers with only a cache directory: each receives the headers of the three parts and its
/// slices of their tensors, byte for byte what `shard_byte_ranges` lists, and gives the single
/// file's logits; restarted, they load from the cache and receive nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_the_files_receive_only_their_byte_ranges() {
    let Some(m) = SplitModel::new("streamed") else {
        return;
    };
    let reference = logits_of(&m.single, &[1.0, 1.0, 1.0]).await;
    let caches: Vec<PathBuf> = (0..3).map(|r| m.dir.join(format!("cache-{r}"))).collect();
    let mut streamed = Vec::new();
    for round in 0..2 {
        let workers: Vec<common::server::Worker> = caches
            .iter()
            .map(|cache| {
                let log = m.dir.join("workers.log");
                let (child, address) = server::spawn_listening(
                    Command::new(worker_binary())
                        .args(["--listen", "127.0.0.1:0", "--threads", "1", "--no-auth"])
                        .arg("--cache-dir")
                        .arg(cache)
                        .stderr(
                            std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&log)
                                .unwrap(),
                        ),
                );
                common::server::Worker {
                    child,
                    address,
                    log,
                }
            })
            .collect();
        let entries: Vec<WorkerEntry> = workers
            .iter()
            .map(|w| WorkerEntry {
                address: w.address.clone(),
                weight: 1.0,
                threads: 1,
                // No copy of the model where the worker looks.
                model_path: Some("/nonexistent/model-00001-of-00003.gguf".into()),
                device: None,
                numa_node: None,
                stage: None,
            })
            .collect();
        let cluster = Cluster::connect(&entries, ClusterLimits::default())
            .await
            .unwrap();
        let mut session = Session::start(Model::open(&m.parts[0]).unwrap(), cluster, 128, 64)
            .await
            .unwrap();
        let sent = session.cluster.streamed_bytes().to_vec();
        let logits = prompt_logits(&mut session).await;
        assert_identical(&format!("streamed, round {round}"), &reference, &logits);
        if round == 0 {
            let file = &session.model.file;
            for (rank, shard) in session.plan.ranks.iter().enumerate() {
                let ranges = shard_byte_ranges(file, &session.model.config, shard).unwrap();
                let listed: u64 = ranges.iter().flatten().map(|r| r.end - r.start).sum();
                assert_eq!(
                    sent[rank], listed,
                    "rank {rank} receives its ranges, no more"
                );
            }
        }
        let model_bytes: u64 = session.model.file.part_sizes().iter().sum();
        println!("round {round}: bytes streamed per worker {sent:?} (model: {model_bytes} bytes)");
        streamed.push(sent);
        session.cluster.shutdown().await;
        drop(workers);
    }
    for cache in &caches {
        let mut names: Vec<String> = std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".gguf"))
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "one cache file per part: {names:?}");
        assert!(names[2].ends_with("-00003-of-00003.gguf"), "{names:?}");
    }
    assert!(streamed[0].iter().all(|&s| s > 0));
    assert_eq!(
        streamed[1],
        vec![0, 0, 0],
        "the restart loads from the cache"
    );
}

#[test]
fn plan_shows_the_parts_each_rank_reads() {
    let Some(m) = SplitModel::new("plan") else {
        return;
    };
    let run = |format: &str| {
        let output = Command::new(coordinator_binary())
            .args(["plan", "--local", "3", "--format", format, "--model"])
            .arg(&m.parts[0])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let text = run("text");
    println!("{text}");
    assert!(
        text.contains("model files read (split model of 3 parts"),
        "{text}"
    );
    for rank in 0..3 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("rank {rank}: ")))
            .unwrap_or_else(|| panic!("no line for rank {rank}: {text}"));
        // Tensor parallelism cuts every tensor: every rank reads every part.
        for part in 1..=3 {
            assert!(line.contains(&format!("part {part} ")), "{line}");
        }
    }
    let json: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    let parts = &json["ranks"][1]["parts_read"];
    assert_eq!(parts.as_array().unwrap().len(), 3, "{json}");
    assert!(
        parts[2]["file"]
            .as_str()
            .unwrap()
            .ends_with("-00003-of-00003.gguf")
    );
    // The single file's plan says nothing of parts.
    let output = Command::new(coordinator_binary())
        .args(["plan", "--local", "3", "--model"])
        .arg(&m.single)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&output.stdout).contains("model files read"));
}
