//! Decoders against every file of the shared corpus (real servers' RDB files and replication
//! captures, with their expected content).

use serde_json::Value as J;
use source_connector::rdb::{self, assemble};
use source_connector::{dump, resp, transfer};
use std::path::Path;

fn load_json(p: &Path) -> J {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn score(v: &J) -> f64 {
    v.as_str().unwrap().parse::<f64>().unwrap()
}

/// Compares one key's `value` with the corpus rules: zset scores as doubles, and clock fields of
/// streams only where the corpus has them.
fn values_equal(kind: &str, want: &J, got: &J) -> bool {
    match kind {
        "zset" => {
            let (w, g) = (want.as_array().unwrap(), got.as_array().unwrap());
            w.len() == g.len()
                && w.iter()
                    .zip(g)
                    .all(|(a, b)| a[0] == b[0] && score(&a[1]).to_bits() == score(&b[1]).to_bits())
        }
        "stream" => {
            let mut g = got.clone();
            for (gi, wg) in want["groups"].as_array().unwrap().iter().enumerate() {
                for (ci, wc) in wg["consumers"].as_array().unwrap().iter().enumerate() {
                    for field in ["seen_time", "active_time"] {
                        if wc[field].is_null() {
                            g["groups"][gi]["consumers"][ci][field] = J::Null;
                        }
                    }
                }
            }
            &g == want
        }
        _ => want == got,
    }
}

/// Checks decoded keys against the corpus `keys` array. Returns a list of differences.
fn compare_keys(want: &J, got: &J, ttl_slack_ms: i64) -> Vec<String> {
    let mut diffs = Vec::new();
    let (w, g) = (want.as_array().unwrap(), got.as_array().unwrap());
    if w.len() != g.len() {
        diffs.push(format!("key count {} != {}", w.len(), g.len()));
    }
    for (a, b) in w.iter().zip(g) {
        let name = format!("db {} key {}", a["db"], a["key"]);
        for f in ["db", "key", "type"] {
            if a[f] != b[f] {
                diffs.push(format!("{name}: {f} {} != {}", a[f], b[f]));
            }
        }
        match (a["ttl"].as_i64(), b["ttl"].as_i64()) {
            (Some(x), Some(y))
                if a["ttl_approx"].as_bool() == Some(true) && (x - y).abs() <= ttl_slack_ms => {}
            (x, y) if x == y => {}
            (x, y) => diffs.push(format!("{name}: ttl {x:?} != {y:?}")),
        }
        if a.get("value_digest").is_some_and(|d| !d.is_null()) {
            let (dw, dg) = (&a["value_digest"], &b["value_digest"]);
            if dw["sha256"] != dg["sha256"] || dw["len"] != dg["len"] {
                diffs.push(format!("{name}: digest {dw} != {dg}"));
            }
        } else if !values_equal(
            a["type"].as_str().unwrap_or_default(),
            &a["value"],
            &b["value"],
        ) {
            let s = format!("{name}: value {} != {}", a["value"], b["value"]);
            diffs.push(s.chars().take(600).collect());
        }
        let flag = |k: &J, f: &str| k[f].as_bool().unwrap_or(false);
        if flag(a, "expired") != flag(b, "expired") {
            diffs.push(format!(
                "{name}: expired {} != {}",
                flag(a, "expired"),
                flag(b, "expired")
            ));
        }
        if a["lfu_freq"] != b["lfu_freq"] {
            diffs.push(format!(
                "{name}: lfu_freq {} != {}",
                a["lfu_freq"], b["lfu_freq"]
            ));
        }
        match (a["lru_idle_s"].as_i64(), b["lru_idle_s"].as_i64()) {
            (Some(x), Some(y)) if (x - y).abs() <= 5 => {}
            (None, None) => {}
            (x, y) => diffs.push(format!("{name}: lru_idle_s {x:?} != {y:?}")),
        }
    }
    diffs
}

fn compare_functions(want: &J, got: &J) -> Vec<String> {
    if want == got {
        return vec![];
    }
    vec![format!("functions {want} != {got}")]
}

#[test]
fn every_corpus_rdb_decodes_to_its_json() {
    let files = harness::corpus::rdb_files();
    assert!(
        files.len() >= 40,
        "corpus not found at {}",
        harness::corpus::dir().display()
    );
    let mut failures = Vec::new();
    for (rdb_path, json_path) in files {
        let data = std::fs::read(&rdb_path).unwrap();
        let expected = load_json(&json_path);
        let contents = match assemble::decode_all(&data, rdb::Config::default(), 4096) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{}: {e}", rdb_path.display()));
                continue;
            }
        };
        let now = expected["saved_at_ms"].as_i64().unwrap();
        let got = dump::contents_json(&contents, now);
        let mut diffs = Vec::new();
        if got["rdb_version"] != expected["rdb_version"] {
            diffs.push(format!(
                "rdb_version {} != {}",
                expected["rdb_version"], got["rdb_version"]
            ));
        }
        diffs.extend(compare_functions(&expected["functions"], &got["functions"]));
        diffs.extend(compare_keys(&expected["keys"], &got["keys"], 0));
        for d in diffs.into_iter().take(5) {
            failures.push(format!("{}: {d}", rdb_path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn feeding_byte_by_byte_equals_feeding_whole() {
    for (rdb_path, _) in harness::corpus::rdb_files() {
        let name = rdb_path.file_name().unwrap().to_string_lossy().into_owned();
        if !["small.rdb", "empty.rdb", "lfu.rdb", "lru.rdb"].contains(&name.as_str()) {
            continue;
        }
        let data = std::fs::read(&rdb_path).unwrap();
        let whole = assemble::decode_all(&data, rdb::Config::default(), data.len()).unwrap();
        let bytewise = assemble::decode_all(&data, rdb::Config::default(), 1).unwrap();
        assert_eq!(whole.keys, bytewise.keys, "{}", rdb_path.display());
        assert_eq!(whole.functions, bytewise.functions);
    }
}

/// Splits a capture into (reply, rdb payload, command stream) the way a replica reads it.
struct Capture {
    replid: String,
    offset: u64,
    rdb: rdb::assemble::Contents,
    stream: Vec<u8>,
}

fn read_capture(bin: &[u8], chunk: usize) -> Capture {
    let (reply, mut pos) = transfer::psync_reply(bin).unwrap().unwrap();
    let transfer::PsyncReply::FullResync { replid, offset } = reply else {
        panic!("{reply:?}")
    };
    let (framing, used) = transfer::rdb_framing(&bin[pos..]).unwrap().unwrap();
    pos += used;
    let mut decoder = rdb::Decoder::new(rdb::Config {
        piece_bytes: 4096,
        ..Default::default()
    });
    let mut asm = assemble::Assembler::default();
    let stream_start = match framing {
        transfer::RdbFraming::Length(n) => {
            let end = pos + n as usize;
            for part in bin[pos..end].chunks(chunk) {
                decoder.feed(part);
                while let Some(i) = decoder.next_item().unwrap() {
                    asm.push(i);
                }
            }
            decoder.finish().unwrap();
            end
        }
        transfer::RdbFraming::EofMark(mark) => {
            // The decoder knows where the RDB ends; the mark must follow it.
            let mut fed = pos;
            while !decoder.is_done() {
                let end = (fed + chunk).min(bin.len());
                decoder.feed(&bin[fed..end]);
                fed = end;
                while let Some(i) = decoder.next_item().unwrap() {
                    asm.push(i);
                }
            }
            let rdb_end = fed - decoder.trailing().len();
            assert_eq!(
                &bin[rdb_end..rdb_end + mark.len()],
                &mark[..],
                "EOF mark follows the RDB"
            );
            rdb_end + mark.len()
        }
    };
    Capture {
        replid,
        offset,
        rdb: asm.contents,
        stream: bin[stream_start..].to_vec(),
    }
}

/// Commands that the master propagates exactly as the client sent them (when they changed data).
const VERBATIM: &[&str] = &[
    "APPEND", "SETRANGE", "INCR", "INCRBY", "DECR", "DECRBY", "LPUSH", "RPUSH", "LSET", "LINSERT",
    "HSET", "HINCRBY", "SETBIT", "RENAME", "SADD", "ZADD",
];

#[test]
fn every_capture_decodes_with_exact_offsets() {
    let mut checked = 0;
    for label in harness::corpus::labels() {
        for form in ["stream", "stream-diskless"] {
            let (bin_path, json_path) = harness::corpus::capture(&label, form);
            let bin = std::fs::read(&bin_path).unwrap();
            let meta = load_json(&json_path);
            let what = format!("{label}/{form}");
            let cap = read_capture(&bin, 1000);
            assert_eq!(
                cap.replid,
                meta["fullresync"]["replid"].as_str().unwrap(),
                "{what}"
            );
            assert_eq!(
                cap.offset,
                meta["fullresync"]["offset"].as_u64().unwrap(),
                "{what}"
            );
            let cs = &meta["command_stream"];
            assert_eq!(
                bin.len() - cap.stream.len(),
                cs["offset_in_file"].as_u64().unwrap() as usize,
                "{what}"
            );

            // The snapshot equals initial_dataset.
            let first_t = meta["commands"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|c| c["t_ms"].as_i64())
                .unwrap();
            let got = dump::contents_json(&cap.rdb, first_t);
            let diffs = compare_keys(&meta["initial_dataset"], &got["keys"], 0);
            assert!(diffs.is_empty(), "{what}: {}", diffs.join("\n"));

            // The command stream, fed in odd-sized chunks, ends at master_repl_offset_end.
            let mut d = resp::Decoder::new(cap.offset, resp::Limits::default());
            let mut cmds = Vec::new();
            let mut last_end = cap.offset;
            for part in cap.stream.chunks(7) {
                d.feed(part);
                while let Some(c) = d.next_command().unwrap() {
                    assert!(c.end_offset > last_end, "{what}: offsets increase");
                    last_end = c.end_offset;
                    cmds.push(c);
                }
            }
            assert_eq!(d.buffered(), 0, "{what}: no partial command at the end");
            assert_eq!(
                d.offset(),
                cs["master_repl_offset_end"].as_u64().unwrap(),
                "{what}"
            );
            assert!(
                cmds.iter().any(|c| c.kind == resp::Kind::Ping),
                "{what}: master PINGs seen"
            );
            if meta["getack_seen"].as_u64().unwrap_or(0) > 0 {
                assert!(
                    cmds.iter().any(|c| c.kind == resp::Kind::GetAck),
                    "{what}: GETACK seen"
                );
            }

            // Client commands that propagate verbatim appear in the stream, in order.
            let stream_args: Vec<Vec<String>> = cmds
                .iter()
                .map(|c| {
                    c.args
                        .iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect()
                })
                .collect();
            let mut at = 0;
            let mut matched = 0;
            for c in meta["commands"].as_array().unwrap() {
                let Some(args) = c["cmd"].as_array() else {
                    continue;
                };
                let args: Vec<String> = args
                    .iter()
                    .map(|a| a.as_str().unwrap_or_default().to_owned())
                    .collect();
                let changed = match &c["reply"] {
                    J::Object(o) if o.contains_key("error") => false,
                    J::Number(n) => n.as_i64() != Some(0) || args[0] != "SADD" && args[0] != "ZADD",
                    _ => true,
                };
                if !VERBATIM.contains(&args[0].as_str()) || !changed {
                    continue;
                }
                let found = stream_args[at..].iter().position(|s| {
                    s.len() == args.len()
                        && s.iter()
                            .zip(&args)
                            .all(|(a, b)| a.eq_ignore_ascii_case(b) || a == b)
                });
                let pos = found
                    .unwrap_or_else(|| panic!("{what}: {args:?} not found in order in the stream"));
                at += pos + 1;
                matched += 1;
            }
            assert!(
                matched >= 20,
                "{what}: only {matched} verbatim commands checked"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16, "8 versions x 2 transfer forms");
}
