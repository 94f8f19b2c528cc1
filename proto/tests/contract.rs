//! Wire-compatibility and round-trip tests of the topic contract.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use proto::v1::{self, record::Body};
use std::collections::BTreeMap;

const COMMITTED: &[u8] = include_bytes!("../../schemas/redis_repl_v1.binpb");

/// (message path, field number) -> (name, type, label, type_name)
type FieldMap = BTreeMap<(String, i32), (String, Type, Label, String)>;

fn fields(set: &FileDescriptorSet) -> FieldMap {
    fn walk(prefix: &str, msg: &DescriptorProto, out: &mut FieldMap) {
        let path = format!("{prefix}.{}", msg.name());
        for f in &msg.field {
            out.insert(
                (path.clone(), f.number()),
                (
                    f.name().to_owned(),
                    f.r#type(),
                    f.label(),
                    f.type_name().to_owned(),
                ),
            );
        }
        for nested in &msg.nested_type {
            walk(&path, nested, out);
        }
    }
    let mut out = FieldMap::new();
    for file in &set.file {
        for msg in &file.message_type {
            walk(file.package(), msg, &mut out);
        }
    }
    out
}

/// Every field of the committed descriptor set must still exist with the same number, type and
/// label. Adding fields is allowed; removing, renumbering or retyping one is not.
fn compatibility_breaks(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let new_fields = fields(new);
    let mut breaks = Vec::new();
    for ((msg, num), (name, ty, label, type_name)) in fields(old) {
        match new_fields.get(&(msg.clone(), num)) {
            None => breaks.push(format!(
                "{msg} field {num} ({name}) was removed or renumbered"
            )),
            Some((_, nty, nlabel, ntype_name)) => {
                if (nty, nlabel, ntype_name) != (&ty, &label, &type_name) {
                    breaks.push(format!(
                        "{msg} field {num} ({name}) changed from {ty:?} {label:?} {type_name} \
                         to {nty:?} {nlabel:?} {ntype_name}"
                    ));
                }
            }
        }
    }
    breaks
}

#[test]
fn schema_is_wire_compatible_with_committed_descriptor_set() {
    let old = FileDescriptorSet::decode(COMMITTED).expect("committed descriptor set decodes");
    let new = FileDescriptorSet::decode(proto::DESCRIPTOR_SET).expect("built descriptor decodes");
    let breaks = compatibility_breaks(&old, &new);
    assert!(
        breaks.is_empty(),
        "wire-incompatible schema change:\n{}",
        breaks.join("\n")
    );
}

#[test]
fn committed_descriptor_set_is_up_to_date() {
    // Additions are compatible, but the committed set must follow them so the next change is
    // checked against them too. Fix with `just schema`.
    let old = FileDescriptorSet::decode(COMMITTED).unwrap();
    let new = FileDescriptorSet::decode(proto::DESCRIPTOR_SET).unwrap();
    assert_eq!(
        fields(&old),
        fields(&new),
        "run `just schema` to refresh schemas/redis_repl_v1.binpb"
    );
}

fn record_message(set: &mut FileDescriptorSet) -> &mut DescriptorProto {
    set.file[0]
        .message_type
        .iter_mut()
        .find(|m| m.name() == "Record")
        .unwrap()
}

#[test]
fn compatibility_check_catches_breaks() {
    let base = FileDescriptorSet::decode(proto::DESCRIPTOR_SET).unwrap();

    let mut removed = base.clone();
    record_message(&mut removed)
        .field
        .retain(|f| f.number() != 2);
    assert_eq!(compatibility_breaks(&base, &removed).len(), 1);

    let mut retyped = base.clone();
    let msg = record_message(&mut retyped);
    msg.field
        .iter_mut()
        .find(|f| f.number() == 4)
        .unwrap()
        .set_type(Type::String);
    assert_eq!(compatibility_breaks(&base, &retyped).len(), 1);

    let mut renumbered = base.clone();
    let msg = record_message(&mut renumbered);
    msg.field
        .iter_mut()
        .find(|f| f.number() == 5)
        .unwrap()
        .number = Some(99);
    assert_eq!(compatibility_breaks(&base, &renumbered).len(), 1);

    assert!(compatibility_breaks(&base, &base).is_empty());
}

fn bodies() -> Vec<Body> {
    let id = |ms, seq| Some(v1::StreamId { ms, seq });
    vec![
        Body::SnapshotStart(v1::SnapshotStart {
            replid: "a".repeat(40).into(),
            repl_offset: 7,
            rdb_version: 10,
            rdb_size_bytes: Some(1234),
            source_version: "7.0.15".into(),
            partitions: 16,
            scope: vec![v1::SlotRange {
                first: 0,
                last: 5460,
            }],
        }),
        Body::SnapshotEnd(v1::SnapshotEnd {
            keys: 3,
            rdb_bytes: 99,
            functions: vec![v1::FunctionLibrary {
                name: "lib".into(),
                code: "#!lua".into(),
            }],
        }),
        Body::KeyEntry(v1::KeyEntry {
            key: b"k\0\xff".to_vec().into(),
            expire_at_ms: Some(4_102_444_800_000),
            lru_idle_s: Some(5),
            lfu_freq: Some(3),
            value: Some(v1::Value {
                kind: Some(v1::value::Kind::Zset(v1::ZSetValue {
                    members: vec![v1::ZSetMember {
                        member: "m".into(),
                        score: f64::INFINITY,
                    }],
                })),
            }),
            chunked: true,
        }),
        Body::KeyChunk(v1::KeyChunk {
            key: "h".into(),
            index: 1,
            last: true,
            expire_at_ms: None,
            value: Some(v1::Value {
                kind: Some(v1::value::Kind::Hash(v1::HashValue {
                    fields: vec![v1::HashField {
                        field: "f".into(),
                        value: "v".into(),
                        expire_at_ms: Some(1),
                    }],
                })),
            }),
        }),
        Body::KeyEntry(v1::KeyEntry {
            key: "s".into(),
            value: Some(v1::Value {
                kind: Some(v1::value::Kind::Stream(v1::StreamValue {
                    entries: vec![v1::StreamEntry {
                        id: id(1, 0),
                        fields: vec!["f".into(), "v".into()],
                    }],
                    length: 1,
                    last_id: id(1, 0),
                    entries_added: Some(2),
                    max_deleted_id: id(0, 5),
                    groups: vec![v1::StreamGroup {
                        name: "g".into(),
                        last_delivered_id: id(1, 0),
                        entries_read: Some(1),
                        pending: vec![v1::StreamPendingEntry {
                            id: id(1, 0),
                            consumer: "c".into(),
                            delivery_time_ms: 5,
                            delivery_count: 2,
                        }],
                        consumers: vec![v1::StreamConsumer {
                            name: "c".into(),
                            seen_time_ms: 5,
                            active_time_ms: Some(-1),
                        }],
                    }],
                })),
            }),
            ..Default::default()
        }),
        Body::KeyEntry(v1::KeyEntry {
            key: "d".into(),
            value: Some(v1::Value {
                kind: Some(v1::value::Kind::Dump(v1::DumpPayload {
                    payload: vec![0, 1, 2].into(),
                    rdb_version: 10,
                    module_id: 0,
                })),
            }),
            ..Default::default()
        }),
        Body::Command(v1::Command {
            args: vec!["SET".into(), "k".into(), "v".into()],
        }),
        Body::Transaction(v1::Transaction {
            commands: vec![v1::Command {
                args: vec!["INCR".into(), "k".into()],
            }],
        }),
        Body::Barrier(v1::Barrier {
            kind: v1::BarrierKind::MultiSlot as i32,
            partitions: vec![0, 3],
            commands: vec![v1::Command {
                args: vec!["RENAME".into(), "a".into(), "b".into()],
            }],
            slots: vec![15495, 3300],
            scope: Vec::new(),
        }),
        Body::Barrier(v1::Barrier {
            kind: v1::BarrierKind::Broadcast as i32,
            partitions: vec![1, 2],
            commands: vec![v1::Command {
                args: vec!["FLUSHALL".into()],
            }],
            slots: Vec::new(),
            scope: vec![v1::SlotRange {
                first: 5461,
                last: 10922,
            }],
        }),
        Body::Heartbeat(v1::Heartbeat {
            master_repl_offset: 1 << 40,
        }),
    ]
}

#[test]
fn every_body_round_trips() {
    for (i, body) in bodies().into_iter().enumerate() {
        let rec = v1::Record {
            schema_version: proto::SCHEMA_VERSION,
            source_shard: "shard-0".into(),
            position: Some(proto::Position::new(2, 100, i as u64).into()),
            capture_time_ms: 1_700_000_000_000,
            db: 15,
            slot: Some(42),
            body: Some(body),
        };
        let bytes = proto::topic::encode(&rec);
        let back = proto::topic::decode(Some(proto::topic::CONTENT_TYPE.as_bytes()), &bytes)
            .expect("decodes");
        assert_eq!(back, rec);
    }
}
