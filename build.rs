fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tp.proto");
    // protox is a pure-Rust protobuf compiler, so no protoc is needed to build.
    let descriptors = protox::compile(["proto/tp.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
