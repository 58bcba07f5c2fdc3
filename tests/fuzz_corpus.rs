//! Replays the fuzz targets' seed corpora (`fuzz/corpus/`) and every input that once made a
//! target fail (`fuzz/regressions/`, one file per crash found) through the same functions
//! the targets run, so a fixed crash stays fixed without a nightly toolchain.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == ".keep") {
                continue;
            }
            eprintln!("{}", path.display());
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
    }
    count
}

#[test]
fn gguf_inputs() {
    assert!(replay("gguf", tp::fuzzing::gguf) >= 3);
}

#[test]
fn hosts_toml_inputs() {
    assert!(replay("hosts_toml", tp::fuzzing::hosts_toml) >= 3);
}

#[test]
fn control_message_inputs() {
    assert!(replay("control_messages", tp::fuzzing::control_messages) >= 3);
}

#[test]
fn step_reply_inputs() {
    assert!(replay("step_replies", tp::fuzzing::step_replies) >= 3);
}
