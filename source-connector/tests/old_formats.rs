//! Encodings that no corpus server writes any more (the corpus starts at Redis 5.0, RDB 9):
//! linked lists, text-scored sorted sets, zipmaps, ziplist lists, the seconds-resolution expiry
//! opcode, integer- and LZF-encoded strings in an RDB 6 file, and a file before checksums (RDB 3).
//! The files are written byte by byte here, as Redis 2.x wrote them; each value is decoded, and
//! each DUMP payload is restored on the harness's real server and read back.

use bytes::Bytes;
use harness::redis::{RedisConfig, RedisServer};
use source_connector::rdb::{self, assemble, assemble::Value, crc64};

fn len(n: usize) -> Vec<u8> {
    match n {
        0..=63 => vec![n as u8],
        64..=16383 => vec![0x40 | (n >> 8) as u8, n as u8],
        _ => {
            let mut v = vec![0x80];
            v.extend_from_slice(&(n as u32).to_be_bytes());
            v
        }
    }
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = len(s.len());
    v.extend_from_slice(s);
    v
}

/// A ziplist of `entries` (already encoded, each with its prevlen).
fn ziplist(entries: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = entries.concat();
    let total = 4 + 4 + 2 + body.len() + 1;
    let tail = total - 1 - entries.last().map_or(0, Vec::len);
    let mut z = (total as u32).to_le_bytes().to_vec();
    z.extend_from_slice(&(tail as u32).to_le_bytes());
    z.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    z.extend_from_slice(&body);
    z.push(0xFF);
    z
}

/// Key-value pairs of an RDB body, with the file's header and trailer.
fn file(version: u32, body: &[u8]) -> Vec<u8> {
    let mut f = format!("REDIS{version:04}").into_bytes();
    f.extend_from_slice(body);
    f.push(0xFF);
    if version >= 5 {
        let crc = crc64::checksum(&f);
        f.extend_from_slice(&crc.to_le_bytes());
    }
    f
}

fn key(ty: u8, name: &str, value: &[u8]) -> Vec<u8> {
    let mut k = vec![ty];
    k.extend(string(name.as_bytes()));
    k.extend_from_slice(value);
    k
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// An RDB 6 file (Redis 2.6/2.8) with one key of each old encoding; the expiry of `ttl` is
/// `expire_s` in the seconds-resolution opcode.
fn rdb6(expire_s: u32) -> Vec<u8> {
    let mut body = vec![0xFE, 0]; // SELECTDB 0
                                  // A string with an expiry in seconds (0xFD), and the integer encodings.
    body.push(0xFD);
    body.extend_from_slice(&expire_s.to_le_bytes());
    body.extend(key(0, "ttl", &string(b"v")));
    body.extend(key(0, "int8", &[0xC0, (-5i8) as u8]));
    let mut v = vec![0xC1];
    v.extend_from_slice(&(-300i16).to_le_bytes());
    body.extend(key(0, "int16", &v));
    let mut v = vec![0xC2];
    v.extend_from_slice(&100_000i32.to_le_bytes());
    body.extend(key(0, "int32", &v));
    // LZF: the literal "abc" then a 6-byte back reference at distance 3.
    let mut v = vec![0xC3];
    let compressed = [2, b'a', b'b', b'c', 4 << 5, 2];
    v.extend(len(compressed.len()));
    v.extend(len(9));
    v.extend_from_slice(&compressed);
    body.extend(key(0, "lzf", &v));
    // A linked list (type 1) whose elements are plain and integer-encoded strings.
    let mut v = len(3);
    v.extend(string(b"a"));
    v.extend_from_slice(&[0xC0, 7]);
    v.extend(string(b"c"));
    body.extend(key(1, "linked", &v));
    // A hashtable set (type 2) and hash (type 4).
    let mut v = len(2);
    v.extend(string(b"s1"));
    v.extend(string(b"s2"));
    body.extend(key(2, "set", &v));
    let mut v = len(1);
    v.extend(string(b"hf"));
    v.extend(string(b"hv"));
    body.extend(key(4, "hash", &v));
    // A sorted set with text scores (type 3): "1.5" and +inf (254).
    let mut v = len(2);
    v.extend(string(b"m1"));
    v.push(3);
    v.extend_from_slice(b"1.5");
    v.extend(string(b"m2"));
    v.push(254);
    body.extend(key(3, "zset", &v));
    // A zipmap hash (type 9): f=v, f2=v2 with one free byte.
    let zipmap = [
        2, 1, b'f', 1, 0, b'v', 2, b'f', b'2', 2, 1, b'v', b'2', 0, 0xFF,
    ];
    body.extend(key(9, "zipmap", &string(&zipmap)));
    // A ziplist list (type 10): "x", the int8 -3, and the immediate 4.
    let zl = ziplist(&[
        vec![0, 0x01, b'x'],
        vec![3, 0xFE, (-3i8) as u8],
        vec![3, 0xF5],
    ]);
    body.extend(key(10, "ziplist", &string(&zl)));
    file(6, &body)
}

#[test]
fn old_encodings_decode_byte_by_byte_and_whole() {
    let data = rdb6(2_000_000_000);
    let whole = assemble::decode_all(&data, rdb::Config::default(), data.len()).unwrap();
    let bytewise = assemble::decode_all(&data, rdb::Config::default(), 1).unwrap();
    assert_eq!(whole.keys, bytewise.keys);
    assert_eq!(whole.version, 6);
    let value = |name: &str| {
        let k = whole
            .keys
            .iter()
            .find(|k| k.header.key == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} missing"));
        k.value.clone()
    };
    let ttl = whole.keys.iter().find(|k| k.header.key == "ttl").unwrap();
    assert_eq!(ttl.header.expire_ms, Some(2_000_000_000_000));
    assert_eq!(value("ttl"), Value::String(b"v".to_vec()));
    assert_eq!(value("int8"), Value::String(b"-5".to_vec()));
    assert_eq!(value("int16"), Value::String(b"-300".to_vec()));
    assert_eq!(value("int32"), Value::String(b"100000".to_vec()));
    assert_eq!(value("lzf"), Value::String(b"abcabcabc".to_vec()));
    assert_eq!(value("linked"), Value::List(vec![b("a"), b("7"), b("c")]));
    assert_eq!(value("set"), Value::Set(vec![b("s1"), b("s2")]));
    assert_eq!(value("hash"), Value::Hash(vec![(b("hf"), b("hv"), None)]));
    assert_eq!(
        value("zset"),
        Value::ZSet(vec![(b("m1"), 1.5), (b("m2"), f64::INFINITY)])
    );
    assert_eq!(
        value("zipmap"),
        Value::Hash(vec![(b("f"), b("v"), None), (b("f2"), b("v2"), None)])
    );
    assert_eq!(value("ziplist"), Value::List(vec![b("x"), b("-3"), b("4")]));
}

#[test]
fn a_file_before_checksums_ends_at_its_eof_opcode() {
    let mut body = vec![0xFE, 0];
    body.extend(key(0, "k", &string(b"v")));
    let data = file(3, &body);
    let contents = assemble::decode_all(&data, rdb::Config::default(), 1).unwrap();
    assert_eq!(contents.version, 3);
    assert_eq!(contents.checksum, None);
    assert_eq!(contents.keys.len(), 1);
    // A flipped byte in an RDB 6 file is caught by its checksum.
    let mut data = rdb6(2_000_000_000);
    let at = data.len() - 20;
    data[at] ^= 0x01;
    assert!(assemble::decode_all(&data, rdb::Config::default(), 4096).is_err());
}

#[test]
fn old_encodings_restore_on_a_real_server() {
    let server = RedisServer::start(RedisConfig::default()).unwrap();
    let data = rdb6(2_000_000_000);
    let contents = assemble::decode_all(&data, rdb::Config::default(), 4096).unwrap();
    let mut conn = server.conn();
    for k in &contents.keys {
        let payload = k.dump.as_ref().expect("small values have a DUMP payload");
        let mut cmd = redis::cmd("RESTORE");
        cmd.arg(&k.header.key[..])
            .arg(k.header.expire_ms.unwrap_or(0))
            .arg(&payload[..]);
        if k.header.expire_ms.is_some() {
            cmd.arg("ABSTTL");
        }
        cmd.query::<()>(&mut conn).unwrap_or_else(|e| {
            panic!("RESTORE {:?}: {e}", String::from_utf8_lossy(&k.header.key))
        });
    }
    let get = |conn: &mut redis::Connection, k: &str| -> String {
        redis::cmd("GET").arg(k).query(conn).unwrap()
    };
    assert_eq!(get(&mut conn, "lzf"), "abcabcabc");
    assert_eq!(get(&mut conn, "int16"), "-300");
    let lrange = |conn: &mut redis::Connection, k: &str| -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(k)
            .arg(0)
            .arg(-1)
            .query(conn)
            .unwrap()
    };
    assert_eq!(lrange(&mut conn, "ziplist"), ["x", "-3", "4"]);
    assert_eq!(lrange(&mut conn, "linked"), ["a", "7", "c"]);
    let hash: Vec<String> = redis::cmd("HGETALL")
        .arg("zipmap")
        .query(&mut conn)
        .unwrap();
    assert_eq!(hash, ["f", "v", "f2", "v2"]);
    let zset: Vec<String> = redis::cmd("ZRANGE")
        .arg("zset")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut conn)
        .unwrap();
    assert_eq!(zset, ["m1", "1.5", "m2", "inf"]);
    let ttl: i64 = redis::cmd("PEXPIRETIME")
        .arg("ttl")
        .query(&mut conn)
        .unwrap();
    assert_eq!(ttl, 2_000_000_000_000);
}
