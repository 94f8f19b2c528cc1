//! `cargo bench -p source-connector --bench decode`: the streaming RDB decoder over every corpus
//! RDB file, and the RESP decoder over every corpus capture's command stream, in bytes per
//! second. The corpus sits in `../shared/corpus` (or `$REDIS_REPL_CORPUS`). Larger generated
//! files (a 1 GB string, 3 M small keys) are measured by scripts/bench-rdb.sh.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use source_connector::{rdb, resp};

fn rdb_files(c: &mut Criterion) {
    let mut group = c.benchmark_group("rdb");
    for (path, _) in harness::corpus::rdb_files() {
        let data = std::fs::read(&path).expect("corpus file");
        let name = format!(
            "{}/{}",
            path.parent()
                .and_then(|p| p.file_name())
                .unwrap_or_default()
                .to_string_lossy(),
            path.file_stem().unwrap_or_default().to_string_lossy()
        );
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &data, |b, data| {
            b.iter(|| {
                let mut decoder = rdb::Decoder::new(rdb::Config::default());
                let mut items = 0usize;
                // 64 KiB reads, as from a socket.
                for part in data.chunks(64 * 1024) {
                    decoder.feed(part);
                    while let Some(_item) = decoder.next_item().expect("corpus decodes") {
                        items += 1;
                    }
                }
                decoder.finish().expect("corpus decodes");
                items
            })
        });
    }
    group.finish();
}

fn command_streams(c: &mut Criterion) {
    let mut group = c.benchmark_group("resp");
    for label in harness::corpus::labels() {
        let (bin, json) = harness::corpus::capture(&label, "stream");
        let (Ok(bytes), Ok(meta)) = (std::fs::read(&bin), std::fs::read(&json)) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_slice(&meta).expect("capture json");
        let at = meta["command_stream"]["offset_in_file"]
            .as_u64()
            .unwrap_or(0) as usize;
        let stream = bytes[at..].to_vec();
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(&label), &stream, |b, stream| {
            b.iter(|| {
                let mut decoder = resp::Decoder::new(0, resp::Limits::default());
                let mut commands = 0usize;
                for part in stream.chunks(16 * 1024) {
                    decoder.feed(part);
                    while let Some(_cmd) = decoder.next_command().expect("capture decodes") {
                        commands += 1;
                    }
                }
                commands
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rdb_files, command_streams);
criterion_main!(benches);
