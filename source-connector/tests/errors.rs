//! Bad input: clear errors with byte offsets, never a panic, never a wrong item.

use rand::{Rng, SeedableRng};
use source_connector::rdb::{self, assemble, ErrorKind};
use source_connector::resp;

fn corpus_file(label: &str, profile: &str) -> Vec<u8> {
    std::fs::read(
        harness::corpus::dir()
            .join("rdb")
            .join(label)
            .join(format!("{profile}.rdb")),
    )
    .unwrap()
}

fn decode(data: &[u8]) -> Result<assemble::Contents, rdb::Error> {
    assemble::decode_all(data, rdb::Config::default(), 4096)
}

#[test]
fn not_an_rdb() {
    let e = decode(b"HTTP/1.1 200 OK\r\n").unwrap_err();
    assert_eq!((e.offset, e.kind.clone()), (0, ErrorKind::NotRdb));
    assert!(
        e.to_string().starts_with("rdb byte 0: not an RDB file"),
        "{e}"
    );
}

#[test]
fn newer_version_is_refused() {
    let e = decode(b"REDIS0013\xff").unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnsupportedVersion(13));
    assert_eq!(e.offset, 5);
}

#[test]
fn unknown_opcode_names_its_offset() {
    let e = decode(b"REDIS0009\x08").unwrap_err();
    assert_eq!((e.offset, e.kind), (9, ErrorKind::UnknownType(8)));
}

#[test]
fn truncation_at_every_boundary_is_an_error_with_a_prefix_of_the_keys() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let samples = [
        ("7.4.1", "lfu"),
        ("5.0.14", "lru"),
        ("7.2.6", "empty"),
        ("7.0.15", "small"),
        ("5.0.14", "small"),
    ];
    for (label, profile) in samples {
        let data = corpus_file(label, profile);
        let full = decode(&data).unwrap();
        // Every boundary of the small samples; 200 random ones of the larger files.
        let cuts: Vec<usize> = if data.len() < 4096 {
            (0..data.len()).collect()
        } else {
            (0..200).map(|_| rng.random_range(0..data.len())).collect()
        };
        for n in cuts {
            match decode(&data[..n]) {
                Ok(_) => {
                    panic!("{label}/{profile} truncated at {n} decoded without error (seed {seed})")
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind, ErrorKind::Truncated(_)),
                        "{label}/{profile} cut at {n}: {e}"
                    );
                    assert_eq!(
                        e.offset as usize, n,
                        "the error names where the input ended"
                    );
                }
            }
        }
        // Items produced before the cut are exactly the first items of the whole file.
        let mut d = rdb::Decoder::new(rdb::Config::default());
        let mut a = assemble::Assembler::default();
        d.feed(&data[..data.len() / 2]);
        while let Some(i) = d.next_item().unwrap() {
            a.push(i);
        }
        assert_eq!(a.contents.keys[..], full.keys[..a.contents.keys.len()]);
    }
}

#[test]
fn flipped_bytes_give_clean_errors() {
    let data = corpus_file("7.0.15", "cluster");
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..300 {
        let mut d = data.clone();
        let at = rng.random_range(0..d.len());
        d[at] ^= rng.random_range(1..=255u8);
        // The file has a checksum, so no flip may go unnoticed.
        let e = decode(&d)
            .err()
            .unwrap_or_else(|| panic!("flip at {at} not detected (seed {seed})"));
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn absurd_lengths_are_refused_before_allocating() {
    // A list (type 1) whose one element declares 2^62 bytes.
    let mut data = b"REDIS0009\x01\x01k\x01\x81".to_vec();
    data.extend_from_slice(&(1u64 << 62).to_be_bytes());
    let e = decode(&data).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::TooLarge { .. }), "{e}");
    assert_eq!(e.offset, 13);

    // A top-level string declaring 2^62 bytes streams; the end of input is then a truncation.
    let mut data = b"REDIS0009\x00\x01k\x81".to_vec();
    data.extend_from_slice(&(1u64 << 62).to_be_bytes());
    data.extend_from_slice(b"abc");
    assert!(matches!(
        decode(&data).unwrap_err().kind,
        ErrorKind::Truncated(_)
    ));
}

#[test]
fn crc_mismatch_is_reported_at_the_checksum() {
    let mut data = corpus_file("7.2.6", "empty");
    let n = data.len();
    data[n - 1] ^= 1;
    let e = decode(&data).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::CrcMismatch { .. }), "{e}");
    assert_eq!(e.offset as usize, n - 8);
}

#[test]
fn garbage_after_the_rdb_is_an_error() {
    let mut data = corpus_file("6.2.16", "empty");
    data.extend_from_slice(b"junk");
    assert_eq!(decode(&data).unwrap_err().kind, ErrorKind::TrailingData);
}

/// Random mutations of corpus files: the decoders may fail, but never panic or loop.
#[test]
fn mutation_property_never_panics() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let files: Vec<Vec<u8>> = ["small", "lfu", "empty", "cluster"]
        .iter()
        .flat_map(|p| ["5.0.14", "7.0.15", "7.4.1"].map(|l| corpus_file(l, p)))
        .collect();
    for _ in 0..400 {
        let mut d = files[rng.random_range(0..files.len())].clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..d.len());
            match rng.random_range(0..3) {
                0 => d[at] = rng.random(),
                1 => {
                    d.remove(at);
                }
                _ => d.insert(at, rng.random()),
            }
        }
        let _ = assemble::decode_all(
            &d,
            rdb::Config {
                max_unit_bytes: 1 << 20,
                ..Default::default()
            },
            97,
        );
        let mut r = resp::Decoder::new(0, resp::Limits::default());
        r.feed(&d);
        while let Ok(Some(_)) = r.next_command() {}
    }
}

/// Found by the fuzzer: a hash field TTL relative to a huge minimum overflowed.
#[test]
fn regression_hash_field_ttl_overflow_is_an_error() {
    // HASH_METADATA (24): min expire u64::MAX, one field with relative TTL 5.
    let mut data = b"REDIS0012\x18\x01h".to_vec();
    data.extend_from_slice(&u64::MAX.to_le_bytes());
    data.extend_from_slice(b"\x01\x05\x01f\x01v\xff");
    let e = decode(&data).unwrap_err();
    assert_eq!(
        e.kind,
        ErrorKind::Invalid("hash field TTL out of range"),
        "{e}"
    );
    assert_eq!(e.offset, 21);
}
