//! Malformed model files and arguments: each is a clear error and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A little GGUF writer for crafting broken files.
struct Gguf {
    bytes: Vec<u8>,
}

impl Gguf {
    fn new(magic: &[u8; 4], version: u32, tensors: u64, metadata: u64) -> Gguf {
        let mut bytes = magic.to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(tensors.to_le_bytes());
        bytes.extend(metadata.to_le_bytes());
        Gguf { bytes }
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.bytes.extend((s.len() as u64).to_le_bytes());
        self.bytes.extend(s.as_bytes());
        self
    }
    fn kv_string(&mut self, key: &str, value: &str) -> &mut Self {
        self.string(key);
        self.bytes.extend(8u32.to_le_bytes());
        self.string(value)
    }
    fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.string(key);
        self.bytes.extend(4u32.to_le_bytes());
        self.bytes.extend(value.to_le_bytes());
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.string(name);
        self.bytes.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.bytes.extend(d.to_le_bytes());
        }
        self.bytes.extend(type_id.to_le_bytes());
        self.bytes.extend(offset.to_le_bytes());
        self
    }
    fn pad(&mut self, bytes: usize) -> &mut Self {
        while self.bytes.len() % 32 != 0 {
            self.bytes.push(0);
        }
        self.bytes.extend(std::iter::repeat_n(0u8, bytes));
        self
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.bytes).unwrap();
        path
    }
}

fn expect_error(args: &[&str], file: &Path, needle: &str) {
    let output = Command::new(coordinator_binary())
        .args(args)
        .arg("--model")
        .arg(file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{args:?} {} succeeded",
        file.display()
    );
    assert!(
        !stderr.contains("panicked"),
        "{args:?} {} panicked: {stderr}",
        file.display()
    );
    assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?} {}: expected '{needle}' in: {stderr}",
        file.display()
    );
}

#[test]
fn malformed_model_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tp-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();

    cases.push((
        Gguf::new(b"GGUX", 3, 0, 0).write(&dir, "magic.gguf"),
        "not a GGUF file",
    ));
    cases.push((
        Gguf::new(b"GGUF", 7, 0, 0).write(&dir, "version.gguf"),
        "unsupported GGUF version 7",
    ));
    cases.push((
        Gguf::new(b"GGUF", 3, 1 << 60, 0).write(&dir, "tensor-count.gguf"),
        "exceeds the limit",
    ));
    cases.push((
        Gguf::new(b"GGUF", 3, 0, 1 << 62).write(&dir, "metadata-count.gguf"),
        "exceeds the limit",
    ));
    let mut g = Gguf::new(b"GGUF", 3, 0, 1);
    g.string("general.architecture")
        .bytes
        .extend(8u32.to_le_bytes());
    g.bytes.extend((1u64 << 40).to_le_bytes());
    cases.push((g.write(&dir, "string-length.gguf"), "exceeds the limit"));
    let mut g = Gguf::new(b"GGUF", 3, 0, 2);
    g.kv_string("general.architecture", "llama");
    cases.push((g.write(&dir, "truncated-metadata.gguf"), "truncated"));
    let mut g = Gguf::new(b"GGUF", 3, 1, 1);
    g.kv_string("general.architecture", "llama")
        .tensor("token_embd.weight", &[64, 8], 0, 1 << 40)
        .pad(64);
    cases.push((
        g.write(&dir, "extent.gguf"),
        "truncated: data of tensor 'token_embd.weight'",
    ));
    let mut g = Gguf::new(b"GGUF", 3, 1, 1);
    g.kv_string("general.architecture", "llama")
        .tensor("token_embd.weight", &[64, 8], 99, 0)
        .pad(4096);
    cases.push((g.write(&dir, "quant-type.gguf"), "unsupported type id 99"));
    let mut g = Gguf::new(b"GGUF", 3, 1, 1);
    g.kv_string("general.architecture", "llama")
        .tensor("token_embd.weight", &[u64::MAX / 2, 4], 0, 0)
        .pad(64);
    cases.push((g.write(&dir, "dims.gguf"), "absurd dimensions"));
    let mut g = Gguf::new(b"GGUF", 3, 1, 2);
    g.kv_string("general.architecture", "mamba")
        .kv_u32("mamba.block_count", 2)
        .tensor("a", &[8], 0, 0)
        .pad(32);
    cases.push((
        g.write(&dir, "arch.gguf"),
        "unsupported architecture 'mamba'",
    ));
    let mut g = Gguf::new(b"GGUF", 3, 1, 2);
    g.kv_string("general.architecture", "llama")
        .kv_u32("llama.block_count", 2)
        .tensor("a", &[8], 0, 0)
        .pad(32);
    cases.push((
        g.write(&dir, "missing-key.gguf"),
        "missing metadata key 'llama.embedding_length'",
    ));
    let mut g = Gguf::new(b"GGUF", 3, 1, 6);
    g.kv_string("general.architecture", "qwen3moe")
        .kv_u32("qwen3moe.block_count", 2)
        .kv_u32("qwen3moe.embedding_length", 64)
        .kv_u32("qwen3moe.attention.head_count", 4)
        .kv_u32("qwen3moe.expert_count", 16)
        .kv_u32("qwen3moe.expert_used_count", 20)
        .tensor("a", &[8], 0, 0)
        .pad(32);
    cases.push((
        g.write(&dir, "moe-used.gguf"),
        "qwen3moe.expert_used_count: 20 is outside 1..=16",
    ));
    let mut g = Gguf::new(b"GGUF", 3, 1, 5);
    g.kv_string("general.architecture", "qwen3moe")
        .kv_u32("qwen3moe.block_count", 2)
        .kv_u32("qwen3moe.embedding_length", 64)
        .kv_u32("qwen3moe.attention.head_count", 4)
        .kv_u32("qwen3moe.expert_count", 16)
        .tensor("a", &[8], 0, 0)
        .pad(32);
    cases.push((
        g.write(&dir, "moe-missing.gguf"),
        "missing metadata key 'qwen3moe.expert_used_count'",
    ));
    // Metadata the architecture files reject: an unknown RoPE scaling, YaRN without its
    // factor, a zero sliding window, more KV heads than query heads.
    let dense = |arch: &str, extra: &[(&str, &str)], window: Option<u32>, kv: u32| {
        let mut g = Gguf::new(
            b"GGUF",
            3,
            1,
            6 + extra.len() as u64 + u64::from(window.is_some()),
        );
        g.kv_string("general.architecture", arch)
            .kv_u32(&format!("{arch}.block_count"), 2)
            .kv_u32(&format!("{arch}.embedding_length"), 64)
            .kv_u32(&format!("{arch}.attention.head_count"), 4)
            .kv_u32(&format!("{arch}.attention.head_count_kv"), kv)
            .kv_u32(&format!("{arch}.feed_forward_length"), 128);
        for (key, value) in extra {
            g.kv_string(&format!("{arch}.{key}"), value);
        }
        if let Some(w) = window {
            g.kv_u32(&format!("{arch}.attention.sliding_window"), w);
        }
        g.tensor("token_embd.weight", &[64, 8], 0, 0)
            .pad(64 * 8 * 4);
        g
    };
    cases.push((
        dense("llama", &[("rope.scaling.type", "longrope")], None, 2).write(&dir, "rope-kind.gguf"),
        "llama.rope.scaling.type: unknown RoPE scaling type 'longrope' (supported: none, linear, yarn)",
    ));
    cases.push((
        dense("qwen3", &[("rope.scaling.type", "yarn")], None, 2).write(&dir, "yarn.gguf"),
        "qwen3.rope.scaling.type is yarn but qwen3.rope.scaling.factor is missing",
    ));
    cases.push((
        dense("gemma3", &[], Some(0), 1).write(&dir, "window.gguf"),
        "gemma3.attention.sliding_window is 0: every key would be masked",
    ));
    cases.push((
        dense("qwen3", &[], None, 8).write(&dir, "kv-heads.gguf"),
        "qwen3.attention.head_count_kv: 8 is outside 1..=4",
    ));
    // A complete one-layer llama (F32) with one tensor more than the layout reads: llama.cpp
    // refuses it, and so must tp rather than drop the bias silently.
    let mut tensors: Vec<(&str, Vec<u64>)> = vec![
        ("token_embd.weight", vec![64, 8]),
        ("blk.0.attn_norm.weight", vec![64]),
        ("blk.0.attn_q.weight", vec![64, 64]),
        ("blk.0.attn_k.weight", vec![64, 32]),
        ("blk.0.attn_v.weight", vec![64, 32]),
        ("blk.0.attn_output.weight", vec![64, 64]),
        ("blk.0.ffn_norm.weight", vec![64]),
        ("blk.0.ffn_gate.weight", vec![64, 128]),
        ("blk.0.ffn_up.weight", vec![64, 128]),
        ("blk.0.ffn_down.weight", vec![128, 64]),
        ("output_norm.weight", vec![64]),
    ];
    tensors.push(("blk.0.attn_output.bias", vec![64]));
    let mut g = Gguf::new(b"GGUF", 3, tensors.len() as u64, 6);
    g.kv_string("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.embedding_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 2)
        .kv_u32("llama.feed_forward_length", 128);
    let mut offset = 0u64;
    for (name, dims) in &tensors {
        g.tensor(name, dims, 0, offset);
        offset += (dims.iter().product::<u64>() * 4).next_multiple_of(32);
    }
    g.pad(offset as usize);
    cases.push((
        g.write(&dir, "extra-tensor.gguf"),
        "tensor 'blk.0.attn_output.bias' is not part of the llama layout tp reads (11 tensors expected, the file has 12)",
    ));
    if let Some(real) = model(SMOLLM2) {
        // The real model cut inside its metadata, and cut inside its tensor data.
        let bytes = std::fs::read(real).unwrap();
        std::fs::write(dir.join("cut-header.gguf"), &bytes[..100_000]).unwrap();
        cases.push((dir.join("cut-header.gguf"), "truncated"));
        std::fs::write(dir.join("cut-data.gguf"), &bytes[..bytes.len() - 1000]).unwrap();
        cases.push((dir.join("cut-data.gguf"), "truncated: data of tensor"));
    }
    cases.push((dir.join("does-not-exist.gguf"), "cannot open"));

    for (path, needle) in &cases {
        expect_error(&["plan", "--local", "2"], path, needle);
        expect_error(
            &["generate", "--local", "1", "--prompt", "hi"],
            path,
            needle,
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A split model with a part missing, a part of another split, or its second part given: each
/// is a clear error naming the file, before anything loads.
#[test]
fn split_models_with_bad_parts_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tp-bad-split-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Tiny models of F32 vectors: the split checks come before the architecture's.
    let tiny = |name: &str, tensors: &[&str]| {
        let mut g = Gguf::new(b"GGUF", 3, tensors.len() as u64, 1);
        g.kv_string("general.architecture", "llama");
        for (i, t) in tensors.iter().enumerate() {
            g.tensor(t, &[8], 0, 32 * i as u64);
        }
        g.pad(32 * tensors.len());
        g.write(&dir, name)
    };
    let six = tiny("six.gguf", &["a", "b", "c", "d", "e", "f"]);
    let seven = tiny("seven.gguf", &["a", "b", "c", "d", "e", "f", "g"]);
    let a = split::split_gguf(&six, &dir.join("a"), "tiny", &[2, 2, 2]);
    let b = split::split_gguf(&six, &dir.join("b"), "tiny", &[3, 2, 1]);
    let c = split::split_gguf(&six, &dir.join("c"), "tiny", &[3, 3]);
    let d = split::split_gguf(&seven, &dir.join("d"), "tiny", &[3, 2, 2]);
    // A set of three made of these parts, in order, in its own directory.
    let set = |name: &str, parts: [Option<&PathBuf>; 3]| {
        let target = dir.join(name);
        std::fs::create_dir_all(&target).unwrap();
        for (i, part) in parts.iter().enumerate() {
            if let Some(part) = part {
                let file = target.join(format!("tiny-{:05}-of-00003.gguf", i + 1));
                std::fs::copy(part, file).unwrap();
            }
        }
        target.join("tiny-00001-of-00003.gguf")
    };
    let plan = ["plan", "--local", "2"];

    // The set itself opens: what fails is the tiny model's missing hyper-parameters.
    expect_error(&plan, &a[0], "missing metadata key 'llama.block_count'");
    let missing = set("missing", [Some(&a[0]), Some(&a[1]), None]);
    expect_error(
        &plan,
        &missing,
        "tiny-00003-of-00003.gguf: cannot open part 3 of 3 of the split model",
    );
    expect_error(&plan, &missing, "No such file");
    expect_error(
        &plan,
        &a[1],
        "is part 2 of 3 of a split model: pass the first part",
    );
    expect_error(&plan, &a[2], "tiny-00001-of-00003.gguf");
    expect_error(
        &["generate", "--local", "1", "--prompt", "hi"],
        &a[2],
        "is part 3 of 3 of a split model: pass the first part",
    );
    let count = set("count", [Some(&a[0]), Some(&c[1]), Some(&a[2])]);
    expect_error(&plan, &count, "not part 2 of 3 of the split model");
    expect_error(&plan, &count, "it says it is part 2 of 2");
    let number = set("number", [Some(&a[0]), Some(&a[2]), Some(&a[2])]);
    expect_error(&plan, &number, "it says it is part 3 of 3");
    let duplicate = set("duplicate", [Some(&a[0]), Some(&b[1]), Some(&a[2])]);
    expect_error(&plan, &duplicate, "tensor 'e' is in part 2 too");
    let short = set("short", [Some(&a[0]), Some(&a[1]), Some(&b[2])]);
    expect_error(
        &plan,
        &short,
        "split.tensors.count is 6 but the 3 parts hold 5 tensors",
    );
    let other = set("other", [Some(&a[0]), Some(&d[1]), Some(&a[2])]);
    expect_error(
        &plan,
        &other,
        "its set has 7 tensors, the first part's has 6",
    );
    let renamed = dir.join("renamed.gguf");
    std::fs::copy(&a[0], &renamed).unwrap();
    expect_error(&plan, &renamed, "must be named NAME-00001-of-00003.gguf");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_are_clear_errors() {
    let Some(path) = model(SMOLLM2) else { return };
    let run = |args: &[&str]| {
        let output = Command::new(coordinator_binary())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let model = path.to_str().unwrap();
    let (ok, err) = run(&["generate", "--model", model, "--prompt", "hi"]);
    assert!(!ok && err.contains("--local N or --workers"), "{err}");
    let (ok, err) = run(&[
        "generate", "--model", model, "--local", "17", "--prompt", "hi",
    ]);
    assert!(!ok && err.contains("17"), "{err}");
    let (ok, err) = run(&[
        "generate", "--model", model, "--local", "1", "--prompt", "hi", "--top-p", "2",
    ]);
    assert!(!ok && err.contains("top-p"), "{err}");
    let (ok, err) = run(&[
        "generate",
        "--model",
        model,
        "--workers",
        "/nonexistent/hosts.toml",
        "--prompt",
        "hi",
    ]);
    assert!(!ok && err.contains("cannot read"), "{err}");
    let hosts = std::env::temp_dir().join(format!("tp-bad-hosts-{}.toml", std::process::id()));
    std::fs::write(
        &hosts,
        "[[worker]]\naddress = \"127.0.0.1:1\"\nweigth = 2.0\n",
    )
    .unwrap();
    let (ok, err) = run(&[
        "plan",
        "--model",
        model,
        "--workers",
        hosts.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("line 3") && err.contains("weigth"),
        "{err}"
    );
    std::fs::write(
        &hosts,
        "transport = \"carrier-pigeon\"\n[[worker]]\naddress = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let (ok, err) = run(&[
        "plan",
        "--model",
        model,
        "--workers",
        hosts.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("line 1") && err.contains("carrier-pigeon"),
        "{err}"
    );
    std::fs::remove_file(&hosts).ok();
    for (args, needle) in [
        (
            &[
                "generate",
                "-m",
                model,
                "--local",
                "2",
                "-p",
                "hi",
                "--sync-precision",
                "f8",
            ][..],
            "unknown sync precision",
        ),
        (
            &[
                "generate",
                "-m",
                model,
                "--local",
                "2",
                "-p",
                "hi",
                "--transport",
                "udp",
            ][..],
            "udp",
        ),
        (&["bench", "-m", model, "--tp", "0"][..], "--tp 0"),
        (&["bench", "-m", model, "-r", "0"][..], "--repetitions"),
        (&["bench", "-m", model, "-t", "0"][..], "--threads"),
        (
            &["bench", "-m", model, "-p", "0", "-n", "0"][..],
            "nothing to measure",
        ),
        (&["bench", "-m", "/nonexistent.gguf"][..], "cannot read"),
        (
            &["bench", "-m", model, "-p", "9000", "-n", "0"][..],
            "context",
        ),
    ] {
        let (ok, err) = run(args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    for (ok, err) in [run(&[
        "generate", "--model", model, "--local", "1", "--prompt", "hi",
    ])] {
        assert!(ok, "{err}");
    }
}

#[test]
fn bad_worker_cpu_lists_are_clear_errors() {
    for (list, needle) in [
        ("abc", "not a CPU number"),
        ("3-1", "bad CPU range"),
        ("", "names no CPU"),
        ("100000", "out of range"),
    ] {
        let output = Command::new(worker_binary())
            .args(["--listen", "127.0.0.1:0", "--cpus", list])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && err.contains(needle),
            "--cpus {list:?}: {err}"
        );
    }
}

/// Byte position just after `needle` in the file's header (a metadata key or a tensor name).
fn after(bytes: &[u8], needle: &str) -> usize {
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("'{needle}' is not in the file"));
    at + needle.len()
}

/// gpt-oss files broken where the architecture is particular: an MXFP4 expert block whose
/// E8M0 scale is NaN (0xFF), a sink tensor with fewer entries than heads, and a sliding window
/// wider than the context. Each is a clear error naming what is wrong, at both MoE splits.
#[test]
fn gpt_oss_files_with_bad_tensors_are_clear_errors() {
    let Some(path) = model(GPTOSS_SYNTH) else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let file = tp::model::gguf::GgufFile::open(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("tp-bad-gptoss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write_copy = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };

    // Expert 3's rows of layer 1's down projection, third block of row 5 of that expert.
    let down = file.tensor("blk.1.ffn_down_exps.weight").unwrap();
    assert_eq!(down.quant_type.name(), "MXFP4");
    let row_bytes = down.dims[0] as usize / 32 * 17;
    let row = 3 * down.dims[1] as usize + 5;
    let mut scale = bytes.clone();
    scale[down.offset as usize + row * row_bytes + 2 * 17] = 0xFF;
    let scale = write_copy("nan-scale.gguf", &scale);

    // The sink vector of layer 0 stated as 4 entries (the model has 8 query heads).
    let sinks = file.tensor("blk.0.attn_sinks.weight").unwrap();
    assert_eq!(sinks.dims, [8]);
    let mut short = bytes.clone();
    let dims_at = after(&short, "blk.0.attn_sinks.weight") + 4;
    short[dims_at..dims_at + 8].copy_from_slice(&4u64.to_le_bytes());
    let short = write_copy("short-sinks.gguf", &short);

    // A window of context + 1 positions (the value follows the key and its type, u32).
    let context = file.get_u64("gpt-oss.context_length").unwrap().unwrap();
    let mut wide = bytes.clone();
    let value_at = after(&wide, "gpt-oss.attention.sliding_window") + 4;
    wide[value_at..value_at + 4].copy_from_slice(&(context as u32 + 1).to_le_bytes());
    let wide = write_copy("wide-window.gguf", &wide);
    drop(file);

    for split in ["tensor", "expert"] {
        expect_error(
            &[
                "generate",
                "--local",
                "2",
                "--moe-split",
                split,
                "--prompt",
                "hi",
                "-n",
                "1",
            ],
            &scale,
            &format!(
                "tensor 'blk.1.ffn_down_exps.weight' (MXFP4): block 2 of row {row} is invalid: its E8M0 scale is 0xFF (NaN)"
            ),
        );
    }
    for args in [
        &["plan", "--local", "2"][..],
        &["generate", "--local", "1", "--prompt", "hi", "-n", "1"][..],
    ] {
        expect_error(args, &short, "blk.0.attn_sinks.weight");
        expect_error(
            args,
            &wide,
            &format!(
                "gpt-oss.attention.sliding_window: a window of {} positions is larger than the context length {context}",
                context + 1
            ),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
