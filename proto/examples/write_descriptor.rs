//! Writes the descriptor set compiled from `schemas/` to the path given (used by `just schema`).
fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "schemas/redis_repl_v1.binpb".into());
    std::fs::write(&path, proto::DESCRIPTOR_SET)?;
    eprintln!("wrote {} ({} bytes)", path, proto::DESCRIPTOR_SET.len());
    Ok(())
}
