//! Compiles `schemas/**/*.proto` with protox (no system `protoc`) and keeps the descriptor set in
//! OUT_DIR so the compatibility test can compare it with the committed one.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schemas = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let file = schemas.join("redis_repl/v1/record.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&schemas])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("redis_repl_v1.binpb"),
        prost::Message::encode_to_vec(&fds),
    )?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
