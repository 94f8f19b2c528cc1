//! Any bytes: the command-stream decoder returns commands with increasing offsets or an error,
//! never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use source_connector::resp;

fuzz_target!(|data: &[u8]| {
    let limits = resp::Limits { max_bulk_bytes: 1 << 20, max_args: 1 << 16, max_line_bytes: 1024 };
    let mut d = resp::Decoder::new(0, limits);
    let mut last = 0;
    for chunk in data.chunks(7) {
        d.feed(chunk);
        loop {
            match d.next_command() {
                Ok(Some(c)) => {
                    assert!(c.end_offset > last);
                    last = c.end_offset;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});
