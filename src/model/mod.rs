//! Model files and what they describe: the GGUF reader, the tokenizer and chat template,
//! and the architectures tp runs (hyper-parameters and tensor names).
pub mod arch;
pub mod chat;
pub mod gguf;
pub mod harmony;
pub mod tokenizer;
