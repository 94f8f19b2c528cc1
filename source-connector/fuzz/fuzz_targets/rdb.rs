//! Any bytes, in chunks of sizes the input chooses: the RDB decoder returns items or an error,
//! never panics, and gives the same result however the input is split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use source_connector::rdb::{self, assemble};

fuzz_target!(|data: &[u8]| {
    // The last byte chooses the chunk size, so seeds that are whole RDB files stay valid.
    let Some((&split, data)) = data.split_last() else { return };
    let config = || rdb::Config { max_unit_bytes: 1 << 20, piece_bytes: 64, dump_limit_bytes: 256 };
    let whole = assemble::decode_all(data, config(), data.len().max(1));
    let chunked = assemble::decode_all(data, config(), usize::from(split % 16) + 1);
    match (whole, chunked) {
        // Compared as text: a NaN score (which a corrupt sorted set can hold) is not equal to
        // itself.
        (Ok(a), Ok(b)) => assert_eq!(format!("{:?}", a.keys), format!("{:?}", b.keys)),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("chunking changed the outcome: {:?} vs {:?}", a.is_ok(), b.is_ok()),
    }
});
