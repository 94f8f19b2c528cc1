//! Decodes an RDB file the way the connector does (streaming, pieces, no assembly) and prints
//! throughput: `cargo run --release --example decode_stats -- FILE`. Used by
//! scripts/bench-rdb.sh together with /usr/bin/time for peak RSS.
use source_connector::rdb::{Config, Decoder, Item};
use std::io::Read;
use std::time::Instant;

// The allocator the connector runs with (source-connector/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: decode_stats FILE")?;
    let mut file = std::fs::File::open(&path)?;
    let mut decoder = Decoder::new(Config::default());
    let mut buf = vec![0u8; 256 * 1024];
    let (mut keys, mut pieces, mut bytes) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        decoder.feed(&buf[..n]);
        while let Some(item) = decoder.next_item()? {
            match item {
                Item::Key(_) => keys += 1,
                Item::Piece(_) => pieces += 1,
                _ => {}
            }
        }
    }
    decoder.finish()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{path}: {bytes} bytes, {keys} keys, {pieces} pieces in {secs:.3} s = {:.1} MB/s, {:.0} keys/s",
        bytes as f64 / secs / 1e6,
        keys as f64 / secs
    );
    Ok(())
}
