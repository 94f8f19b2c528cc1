//! The Kafka-protocol broker used by the tests: nisshi (formerly tansu), installed by
//! `scripts/dev-env.sh` into a cache directory.
//!
//! Memory storage is fast and lost on restart; sqlite storage survives kill -9 and restart.

use crate::ports::free_port;
use crate::process::{ManagedProcess, Spec, WorkDir};
use crate::proxy::FaultProxy;
use crate::wait_for;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::path::PathBuf;
use std::time::Duration;

/// Where the broker keeps data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://` — fast, gone on restart.
    Memory,
    /// `sqlite://FILE` in the broker's directory — survives kill -9 and restart.
    Sqlite,
}

/// Path of the nisshi binary: `$NISSHI_BIN`, else the cache path used by `scripts/dev-env.sh`.
pub fn broker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NISSHI_BIN") {
        return p.into();
    }
    crate::cache_dir().join("nisshi-0.8.1/bin/nisshi")
}

#[derive(Debug)]
pub struct Broker {
    // The process is dropped before its directory.
    process: ManagedProcess,
    port: u16,
    /// What clients are told to connect to: the broker itself, or a proxy in front of it.
    advertised: u16,
    storage: Storage,
    _dir: WorkDir,
}

impl Broker {
    /// Starts a broker on a free port from an empty directory and waits until it serves metadata.
    pub fn start(storage: Storage) -> anyhow::Result<Broker> {
        let port = free_port();
        Broker::spawn(storage, port, port)
    }

    /// Starts a broker that advertises a fault-injecting proxy as its address, so every client
    /// connection (bootstrap and the ones metadata points to) goes through the proxy.
    pub fn start_behind_proxy(storage: Storage) -> anyhow::Result<(Broker, FaultProxy)> {
        let port = free_port();
        let proxy = FaultProxy::start(&format!("127.0.0.1:{port}"))?;
        let broker = Broker::spawn(storage, port, proxy.port())?;
        Ok((broker, proxy))
    }

    fn spawn(storage: Storage, port: u16, advertised: u16) -> anyhow::Result<Broker> {
        let bin = broker_bin();
        anyhow::ensure!(
            bin.exists(),
            "broker binary {} not found: run scripts/dev-env.sh (or set NISSHI_BIN)",
            bin.display()
        );
        let dir = WorkDir::new("broker")?;
        let cwd = dir.subdir("run")?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let engine = match storage {
            Storage::Memory => "memory://nisshi/".to_owned(),
            // nisshi resolves the sqlite path relative to its working directory.
            Storage::Sqlite => "sqlite://broker.db".to_owned(),
        };
        let process = ManagedProcess::spawn(Spec {
            name: format!("broker-{port}"),
            program: bin,
            args: vec![
                "broker".into(),
                "--listener-url".into(),
                listener.clone(),
                "--advertised-listener-url".into(),
                format!("tcp://127.0.0.1:{advertised}"),
                "--storage-engine".into(),
                engine,
            ],
            cwd,
            env: vec![("RUST_LOG".into(), "warn".into())],
        })?;
        let broker = Broker {
            process,
            port,
            advertised,
            storage,
            _dir: dir,
        };
        if let Err(e) = broker.wait_ready() {
            anyhow::bail!("{e}; broker log:\n{}", broker.process.log_tail(2000));
        }
        Ok(broker)
    }

    /// Asks the broker itself for metadata, with a bare Kafka request on its own port. Not with
    /// a Kafka client: one follows the advertised address, which may be the proxy in front of the
    /// broker, and a restart must not wait for a proxy fault (a half-open Kafka link in the fault
    /// campaign) to end. Generous: a restarted broker reloading its storage while a build shared
    /// the two cores took more than 30 s.
    fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for(
            &format!("broker on port {} to serve metadata", self.port),
            Duration::from_secs(120),
            || serves_metadata(self.port).then_some(()),
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// `127.0.0.1:PORT` (the advertised address), for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// A client configuration pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        c
    }

    /// Creates `topic` with `partitions` partitions and waits until metadata shows them.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
        let results = rt.block_on(admin.create_topics([&new], &AdminOptions::new()))?;
        for r in results {
            if let Err((name, code)) = r {
                anyhow::bail!("create topic {name}: {code:?}");
            }
        }
        wait_for(
            &format!("topic {topic} with {partitions} partitions"),
            Duration::from_secs(20),
            || {
                self.partition_count(topic)
                    .filter(|&n| n == partitions)
                    .map(|_| ())
            },
        )
    }

    /// The offset after the last message of each partition of `topic`, by partition.
    pub fn high_watermarks(&self, topic: &str) -> anyhow::Result<Vec<i64>> {
        let consumer: BaseConsumer = self.client_config().create()?;
        let partitions = self
            .partition_count(topic)
            .ok_or_else(|| anyhow::anyhow!("topic {topic} not found"))?;
        (0..partitions as i32)
            .map(|p| {
                Ok(consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))?
                    .1)
            })
            .collect()
    }

    /// Commits `offsets` (by partition) as consumer group `group`'s position in `topic`, as an
    /// operator resetting the group's offsets would. Retries while the group still has members
    /// (a killed member stays until its session times out).
    pub fn commit_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[i64],
    ) -> anyhow::Result<()> {
        use rdkafka::consumer::CommitMode;
        use rdkafka::{Offset, TopicPartitionList};
        let mut list = TopicPartitionList::new();
        for (p, &o) in offsets.iter().enumerate() {
            list.add_partition_offset(topic, p as i32, Offset::Offset(o))?;
        }
        let mut c = self.client_config();
        c.set("group.id", group).set("enable.auto.commit", "false");
        let consumer: BaseConsumer = c.create()?;
        wait_for(
            &format!("group {group} to accept committed offsets"),
            Duration::from_secs(60),
            || consumer.commit(&list, CommitMode::Sync).ok(),
        )
    }

    /// Deletes every record of each partition of `topic` below its current high watermark, as
    /// retention would, and returns the new low watermarks.
    pub fn delete_all_records(&self, topic: &str) -> anyhow::Result<Vec<i64>> {
        use rdkafka::{Offset, TopicPartitionList};
        let mut list = TopicPartitionList::new();
        for (p, high) in self.high_watermarks(topic)?.into_iter().enumerate() {
            list.add_partition_offset(topic, p as i32, Offset::Offset(high))?;
        }
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deleted = rt.block_on(admin.delete_records(&list, &AdminOptions::new()))?;
        deleted
            .elements()
            .iter()
            .map(|e| {
                e.error().map_err(|err| {
                    anyhow::anyhow!("delete records of partition {}: {err}", e.partition())
                })?;
                e.offset().to_raw().ok_or_else(|| {
                    anyhow::anyhow!("no low watermark for partition {}", e.partition())
                })
            })
            .collect()
    }

    /// The topic's partition count, from metadata.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        let consumer: BaseConsumer = self.client_config().create().ok()?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .ok()?;
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len() as u32)
    }

    /// Every record of `topic` (all partitions, from the beginning to the current end), with
    /// its message's partition and offset (a batch message gives one entry per record, in
    /// order), decoded (`Err` for messages or records that cannot be read).
    pub fn read_records(&self, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
        use rdkafka::message::{Headers, Message};
        let partitions = self
            .partition_count(topic)
            .ok_or_else(|| anyhow::anyhow!("topic {topic} does not exist"))?;
        let mut c = self.client_config();
        c.set("group.id", "harness-reader")
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = c.create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in 0..partitions as i32 {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            ends.push(high);
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(low))?;
        }
        consumer.assign(&tpl)?;
        let mut next = Vec::with_capacity(partitions as usize);
        for p in 0..partitions as i32 {
            next.push(
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))?
                    .0,
            );
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while next.iter().zip(&ends).any(|(n, e)| n < e) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "reading {topic} timed out"
            );
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            let p = msg.partition() as usize;
            next[p] = msg.offset() + 1;
            let content_type = msg.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == proto::topic::HEADER_CONTENT_TYPE)
                    .and_then(|h| h.value.map(|v| v.to_vec()))
            });
            let value = bytes::Bytes::copy_from_slice(msg.payload().unwrap_or_default());
            let key = msg.key().map(|k| k.to_vec()).unwrap_or_default();
            let entry = |record| TopicMessage {
                partition: p as u32,
                offset: msg.offset(),
                key: key.clone(),
                record,
            };
            match proto::topic::decode_message(content_type.as_deref(), &value) {
                Ok(entries) => out.extend(
                    entries
                        .into_iter()
                        .map(|e| entry(e.record.map_err(|e| e.to_string()))),
                ),
                Err(e) => out.push(entry(Err(e.to_string()))),
            }
        }
        // Stable: a batch's records keep their order.
        out.sort_by_key(|m| (m.partition, m.offset));
        Ok(out)
    }

    /// Produces encoded record bytes with the record content type, as the source connector
    /// would (for hand-written topics), and waits for it.
    pub fn produce_record(&self, topic: &str, partition: i32, record: &[u8]) -> anyhow::Result<()> {
        let content_type = proto::topic::CONTENT_TYPE.as_bytes();
        self.produce_raw(
            topic,
            partition,
            b"00000",
            record,
            &[(proto::topic::HEADER_CONTENT_TYPE, content_type)],
        )
    }

    /// Produces one raw message (for foreign or corrupt data on a topic) and waits for it.
    pub fn produce_raw(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> anyhow::Result<()> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseRecord, Producer};
        let producer: rdkafka::producer::BaseProducer = self.client_config().create()?;
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(payload)
                    .headers(h),
            )
            .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
        producer.flush(Duration::from_secs(10))?;
        Ok(())
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn stop(&mut self) {
        let _ = self.process.stop(Duration::from_secs(10));
    }

    /// Starts the broker again on the same port with the same storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        self.wait_ready()
            .map_err(|e| anyhow::anyhow!("{e}; broker log:\n{}", self.process.log_tail(2000)))
    }

    /// The process id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap_or(0)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub partition: u32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub record: Result<proto::v1::Record, String>,
}

/// A random topic name, so tests sharing a broker never collide.
pub fn random_topic(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Whether the broker on `port` answers a Kafka `Metadata` request (v0, all topics) within a
/// second.
fn serves_metadata(port: u16) -> bool {
    use std::io::{Read, Write};
    let ask = || -> std::io::Result<bool> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        let client = b"harness";
        let mut request = Vec::new();
        request.extend_from_slice(&3i16.to_be_bytes()); // Metadata
        request.extend_from_slice(&0i16.to_be_bytes()); // version 0
        request.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        request.extend_from_slice(&(client.len() as i16).to_be_bytes());
        request.extend_from_slice(client);
        request.extend_from_slice(&0i32.to_be_bytes()); // no topics named: all of them
        let mut framed = (request.len() as i32).to_be_bytes().to_vec();
        framed.extend_from_slice(&request);
        stream.write_all(&framed)?;
        let mut header = [0u8; 8];
        stream.read_exact(&mut header)?;
        Ok(header[4..8] == 7i32.to_be_bytes())
    };
    ask().unwrap_or(false)
}
