//! What the fuzz targets (`fuzz/`, cargo-fuzz) run on each input, shared with
//! `tests/fuzz_corpus.rs`, which replays the seed corpora and every input that once made a
//! target fail. Each function must return for any input: no panic, no hang, no allocation
//! beyond what the input's size justifies.

use prost::Message;

use crate::coordinator::cluster::HostsFile;
use crate::model::arch::ModelConfig;
use crate::model::chat::ChatTemplate;
use crate::model::gguf::GgufFile;
use crate::model::tokenizer::Tokenizer;
use crate::proto;

/// The GGUF reader, then what loading reads from the metadata: the architecture's
/// configuration, the tokenizer and the chat template.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data) else {
        return;
    };
    for info in &file.tensors {
        let _ = file.tensor_bytes(info);
    }
    let _ = ModelConfig::from_gguf(&file);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        let _ = tokenizer.encode("Hello, world! 123", true);
        let _ = ChatTemplate::from_gguf(&file, &tokenizer);
    }
}

/// The hosts.toml parser.
pub fn hosts_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = HostsFile::parse(text, std::path::Path::new("hosts.toml"));
    }
}

/// Control-plane messages as they are decoded off the wire (the first byte picks the type),
/// and data-plane frames with their payloads decoded as a receiving rank does.
pub fn control_messages(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => drop(proto::LoadShardRequest::decode(bytes)),
        1 => drop(proto::StepRequest::decode(bytes)),
        2 => drop(proto::StepReply::decode(bytes)),
        3 => drop(proto::PrepareModelRequest::decode(bytes)),
        4 => drop(proto::PrepareModelReply::decode(bytes)),
        5 => drop(proto::ModelChunk::decode(bytes)),
        6 => drop(proto::HelloReply::decode(bytes)),
        7 => drop(proto::ConnectPeersRequest::decode(bytes)),
        8 => {
            if let Ok(frame) = proto::Frame::decode(bytes)
                && let Ok(encoding) = proto::Encoding::try_from(frame.encoding)
            {
                let count = (frame.count as usize).min(1 << 16);
                let mut f32s = vec![0f32; count];
                let _ = crate::transport::grpc::decode(encoding, &frame.payload, &mut f32s);
                let mut f64s = vec![0f64; count];
                let _ = crate::transport::grpc::decode(encoding, &frame.payload, &mut f64s);
            }
        }
        9 => drop(proto::LoadShardReply::decode(bytes)),
        10 => drop(proto::StatsReply::decode(bytes)),
        _ => drop(proto::ClearSequenceRequest::decode(bytes)),
    }
}

/// A worker's step reply as the coordinator takes it: checked against the request and the
/// rank's vocabulary rows, then, if it passes, merged as `Session::step` merges replies. The
/// first six bytes shape the request (rows, top-k, whole logits, vocabulary size and the
/// slice's start); the rest is the reply.
pub fn step_replies(data: &[u8]) {
    let [rows, top, flags, vocab_high, vocab_low, start, reply @ ..] = data else {
        return;
    };
    let vocab_size = 1 + ((*vocab_high as usize) << 8 | *vocab_low as usize);
    let slice = (*start as usize).min(vocab_size - 1)..vocab_size;
    let request = crate::coordinator::cluster::ReplyShape {
        step: 7,
        rows: *rows as usize % 16,
        top_k: *top as u32,
        full_logits: flags & 1 == 1,
    };
    let Ok(reply) = proto::StepReply::decode(reply) else {
        return;
    };
    if crate::coordinator::cluster::check_step_reply(&reply, &request, &slice).is_ok() {
        for row in 0..request.rows {
            let _ = crate::coordinator::session::merge_rows(
                std::slice::from_ref(&reply),
                row,
                request.top_k as usize,
                vocab_size,
                request.full_logits,
            );
        }
    }
}
