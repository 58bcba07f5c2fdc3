//! What identifies a model file set and a host, for both sides of the control plane.

use crate::model::gguf::GgufFile;

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Identifies a model cheaply: a hash of the header, metadata and tensor index of each of its
/// files in turn (for a single file, of its own header).
pub fn model_header_hash(file: &GgufFile) -> u64 {
    file.parts.iter().fold(0xcbf2_9ce4_8422_2325, |hash, part| {
        fnv1a(hash, part.header())
    })
}

/// Identifies this boot of this machine: with the hostname, tells whether two processes share a host.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The network namespace of this process ("net:[4026531840]"); processes in different
/// namespaces are treated as different hosts, as containers usually are.
pub fn network_namespace() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
