//! A strict proxy in front of a Redis Cluster that looks like one standalone endpoint, with the
//! two rules managed proxy services (Huawei DCS Proxy Cluster, Alibaba Tair proxy and the like)
//! document for transactions:
//!
//! - `MULTI … EXEC` is accepted only when every key of the transaction hashes to one slot
//!   (`-CROSSSLOT` otherwise, and nothing runs);
//! - `SELECT` is refused inside a transaction (and the transaction is aborted, as Redis does
//!   with a command refused while queueing); outside one only `SELECT 0` is accepted.
//!
//! Outside transactions every command goes to the master of its keys' slot (the keys are asked
//! of the cluster itself with `COMMAND GETKEYS`, so the proxy shares no code with the sink);
//! `FLUSHALL`, `FLUSHDB`, `FUNCTION` and `SCRIPT` go to every master; other keyless commands to
//! the first master. Counters say how many transactions it ran and refused, so a test can tell
//! the rules were exercised.

use crate::ports::free_port;
use redis::{ConnectionLike, Value};
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    refused_cross_slot: AtomicU64,
    refused_select: AtomicU64,
    stopped: AtomicBool,
}

/// A running proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct SlotProxy {
    port: u16,
    counters: Arc<Counters>,
}

impl SlotProxy {
    /// Listens on a free port in front of the cluster that `seed` (`host:port`) belongs to.
    pub fn start(seed: &str) -> anyhow::Result<SlotProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let counters = Arc::new(Counters::default());
        let state = Arc::clone(&counters);
        let seed = seed.to_owned();
        std::thread::Builder::new()
            .name(format!("slot-proxy-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    if state.stopped.load(SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let state = Arc::clone(&state);
                    let seed = seed.clone();
                    let _ = std::thread::Builder::new()
                        .name("slot-proxy-client".into())
                        .spawn(move || {
                            let _ = Session::new(&seed, state).and_then(|s| s.serve(client));
                        });
                }
            })?;
        Ok(SlotProxy { port, counters })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Transactions run on the cluster.
    pub fn transactions(&self) -> u64 {
        self.counters.transactions.load(SeqCst)
    }

    /// Transactions refused because their keys were in several slots.
    pub fn refused_cross_slot(&self) -> u64 {
        self.counters.refused_cross_slot.load(SeqCst)
    }

    /// Transactions refused because of a `SELECT` inside.
    pub fn refused_select(&self) -> u64 {
        self.counters.refused_select.load(SeqCst)
    }
}

impl Drop for SlotProxy {
    fn drop(&mut self) {
        self.counters.stopped.store(true, SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One client connection: its own connections to the masters, and its transaction.
struct Session {
    seed: String,
    counters: Arc<Counters>,
    /// Master address of every slot.
    owners: Vec<String>,
    masters: Vec<String>,
    nodes: HashMap<String, redis::Connection>,
    /// Commands queued since `MULTI`, and the error that aborts the transaction.
    queued: Option<Vec<Vec<Vec<u8>>>>,
    aborted: Option<String>,
}

type Args = Vec<Vec<u8>>;

impl Session {
    fn new(seed: &str, counters: Arc<Counters>) -> anyhow::Result<Session> {
        let mut s = Session {
            seed: seed.to_owned(),
            counters,
            owners: Vec::new(),
            masters: Vec::new(),
            nodes: HashMap::new(),
            queued: None,
            aborted: None,
        };
        s.refresh()?;
        Ok(s)
    }

    fn node(&mut self, addr: &str) -> redis::RedisResult<&mut redis::Connection> {
        if !self.nodes.contains_key(addr) {
            let c = redis::Client::open(format!("redis://{addr}"))?
                .get_connection_with_timeout(Duration::from_secs(5))?;
            self.nodes.insert(addr.to_owned(), c);
        }
        Ok(self.nodes.get_mut(addr).expect("just inserted"))
    }

    /// Reads the slot map.
    fn refresh(&mut self) -> anyhow::Result<()> {
        let seed = self.seed.clone();
        let reply = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Value>(self.node(&seed)?)?;
        let mut owners = vec![String::new(); 16384];
        let mut masters = Vec::new();
        if let Value::Array(ranges) = reply {
            for r in ranges {
                let Value::Array(items) = r else { continue };
                let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(m))) =
                    (items.first(), items.get(1), items.get(2))
                else {
                    continue;
                };
                let Some(Value::Int(port)) = m.get(1) else {
                    continue;
                };
                let addr = format!("127.0.0.1:{port}");
                for slot in *lo..=*hi {
                    owners[slot as usize] = addr.clone();
                }
                if !masters.contains(&addr) {
                    masters.push(addr);
                }
            }
        }
        masters.sort();
        self.owners = owners;
        self.masters = masters;
        Ok(())
    }

    /// The keys of a command, as the cluster itself sees them.
    fn keys(&mut self, args: &Args) -> Vec<Vec<u8>> {
        let seed = self.seed.clone();
        let Ok(conn) = self.node(&seed) else {
            return Vec::new();
        };
        let mut cmd = redis::cmd("COMMAND");
        cmd.arg("GETKEYS");
        for a in args {
            cmd.arg(a.as_slice());
        }
        match cmd.query::<Value>(conn) {
            Ok(Value::Array(keys)) => keys
                .into_iter()
                .filter_map(|k| match k {
                    Value::BulkString(k) => Some(k),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The one slot of `commands`' keys: `Ok(None)` for no key, `Err` for several slots.
    fn slot_of(&mut self, commands: &[Args]) -> Result<Option<u16>, ()> {
        let mut slot = None;
        for args in commands {
            for k in self.keys(args) {
                let s = proto::key_slot(&k).get();
                if slot.is_some_and(|x| x != s) {
                    return Err(());
                }
                slot = Some(s);
            }
        }
        Ok(slot)
    }

    /// Sends `commands` to `addr` and returns the last reply (one redirection followed).
    fn forward(&mut self, addr: &str, commands: &[Args]) -> Vec<u8> {
        let mut pipe = redis::pipe();
        for args in commands {
            let mut cmd = redis::cmd(&String::from_utf8_lossy(&args[0]));
            for a in &args[1..] {
                cmd.arg(a.as_slice());
            }
            pipe.add_command(cmd);
        }
        let reply = match self.node(addr) {
            Ok(conn) => conn.req_packed_commands(&pipe.get_packed_pipeline(), 0, commands.len()),
            Err(e) => Err(e),
        };
        match reply {
            Ok(mut values) => encode(&values.pop().unwrap_or(Value::Nil)),
            Err(e) => {
                self.nodes.remove(addr);
                error_reply(
                    e.code().unwrap_or("ERR"),
                    e.detail().unwrap_or(&e.to_string()),
                )
            }
        }
    }

    /// A command outside a transaction.
    fn run(&mut self, args: Args) -> Vec<u8> {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        match name.as_str() {
            "SELECT" => {
                return match args.get(1).map(Vec::as_slice) {
                    Some(b"0") => b"+OK\r\n".to_vec(),
                    _ => error_reply("ERR", "SELECT is not allowed in cluster mode"),
                }
            }
            "FLUSHALL" | "FLUSHDB" | "FUNCTION" | "SCRIPT" => {
                let mut last = b"+OK\r\n".to_vec();
                for m in self.masters.clone() {
                    last = self.forward(&m, std::slice::from_ref(&args));
                }
                return last;
            }
            _ => {}
        }
        let addr = match self.slot_of(std::slice::from_ref(&args)) {
            Err(()) => {
                return error_reply("CROSSSLOT", "Keys in request don't hash to the same slot")
            }
            Ok(Some(slot)) => self.owners[usize::from(slot)].clone(),
            Ok(None) => self.masters.first().cloned().unwrap_or_default(),
        };
        let reply = self.forward(&addr, std::slice::from_ref(&args));
        if reply.starts_with(b"-MOVED") && self.refresh().is_ok() {
            return self.run(args);
        }
        reply
    }

    /// A command while a transaction is open.
    fn queue(&mut self, args: Args) -> Vec<u8> {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        match name.as_str() {
            "MULTI" => error_reply("ERR", "MULTI calls can not be nested"),
            "DISCARD" => {
                self.queued = None;
                self.aborted = None;
                b"+OK\r\n".to_vec()
            }
            "SELECT" => {
                self.counters.refused_select.fetch_add(1, SeqCst);
                let e = "SELECT inside MULTI is not allowed by this proxy";
                self.aborted = Some(e.to_owned());
                error_reply("ERR", e)
            }
            "EXEC" => {
                let commands = self.queued.take().unwrap_or_default();
                if let Some(why) = self.aborted.take() {
                    return error_reply(
                        "EXECABORT",
                        &format!("Transaction discarded because of previous errors: {why}"),
                    );
                }
                let addr = match self.slot_of(&commands) {
                    Err(()) => {
                        self.counters.refused_cross_slot.fetch_add(1, SeqCst);
                        return error_reply(
                            "CROSSSLOT",
                            "Keys in request don't hash to the same slot (a transaction must stay in one slot)",
                        );
                    }
                    Ok(Some(slot)) => self.owners[usize::from(slot)].clone(),
                    Ok(None) => self.masters.first().cloned().unwrap_or_default(),
                };
                let mut all = vec![vec![b"MULTI".to_vec()]];
                all.extend(commands);
                all.push(vec![b"EXEC".to_vec()]);
                let reply = self.forward(&addr, &all);
                if !reply.starts_with(b"-") {
                    self.counters.transactions.fetch_add(1, SeqCst);
                }
                reply
            }
            _ => {
                self.queued.get_or_insert_with(Vec::new).push(args);
                b"+QUEUED\r\n".to_vec()
            }
        }
    }

    fn serve(mut self, client: TcpStream) -> anyhow::Result<()> {
        let mut reader = BufReader::new(client.try_clone()?);
        let mut writer = client;
        let mut parser = redis::Parser::new();
        loop {
            let request = parser.parse_value(&mut reader)?;
            let Value::Array(items) = request else {
                writer.write_all(&error_reply("ERR", "expected an array of bulk strings"))?;
                continue;
            };
            let args: Args = items
                .into_iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => Some(b),
                    _ => None,
                })
                .collect();
            if args.is_empty() {
                continue;
            }
            let reply = if self.queued.is_some() {
                self.queue(args)
            } else if args[0].eq_ignore_ascii_case(b"MULTI") {
                self.queued = Some(Vec::new());
                b"+OK\r\n".to_vec()
            } else {
                self.run(args)
            };
            writer.write_all(&reply)?;
        }
    }
}

fn error_reply(code: &str, message: &str) -> Vec<u8> {
    format!("-{code} {message}\r\n").into_bytes()
}

/// A reply in RESP2.
fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(v, &mut out);
    out
}

fn encode_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Value::BulkString(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::Array(items) | Value::Set(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            items.iter().for_each(|i| encode_into(i, out));
        }
        Value::Map(pairs) => {
            out.extend_from_slice(format!("*{}\r\n", pairs.len() * 2).as_bytes());
            for (k, v) in pairs {
                encode_into(k, out);
                encode_into(v, out);
            }
        }
        Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Value::Okay => out.extend_from_slice(b"+OK\r\n"),
        Value::ServerError(e) => {
            out.extend_from_slice(&error_reply(e.code(), e.details().unwrap_or_default()))
        }
        Value::Double(d) => encode_into(&Value::BulkString(d.to_string().into_bytes()), out),
        Value::Boolean(b) => encode_into(&Value::Int(i64::from(*b)), out),
        Value::VerbatimString { text, .. } => {
            encode_into(&Value::BulkString(text.clone().into_bytes()), out)
        }
        other => encode_into(&Value::BulkString(format!("{other:?}").into_bytes()), out),
    }
}
