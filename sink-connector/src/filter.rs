//! What the sink applies and how fast: key, db and command filters (Redis glob patterns), and a
//! rate limit in operations and bytes per second shared by every lane of the process.

use crate::config::ApplyConfig;
use bytes::Bytes;
use proto::v1;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Redis's glob: `*`, `?`, `[abc]`, `[^a-z]`, and `\` to escape, on bytes.
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index after it, string index it matched to).
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, i));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class(pattern, p, s[i]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == s[i]).then_some(p + 2),
            Some(&c) => (c == s[i]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                i += 1;
            }
            (None, Some((after, matched))) => {
                p = after;
                i = matched + 1;
                star = Some((after, matched + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[p] == b'['`: the index after it, or None.
fn class(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut j = p + 1;
    let negate = pattern.get(j) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut hit = false;
    while j < pattern.len() && pattern[j] != b']' {
        if pattern[j] == b'\\' && j + 1 < pattern.len() {
            hit |= pattern[j + 1] == c;
            j += 2;
        } else if j + 2 < pattern.len() && pattern[j + 1] == b'-' && pattern[j + 2] != b']' {
            let (a, b) = (
                pattern[j].min(pattern[j + 2]),
                pattern[j].max(pattern[j + 2]),
            );
            hit |= (a..=b).contains(&c);
            j += 3;
        } else {
            hit |= pattern[j] == c;
            j += 1;
        }
    }
    (hit != negate).then_some(j + 1)
}

/// Which records the sink applies (`apply.include_keys`, `exclude_keys`, `include_dbs`,
/// `exclude_commands`).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    include_keys: Vec<Vec<u8>>,
    exclude_keys: Vec<Vec<u8>>,
    include_dbs: Vec<u32>,
    exclude_commands: Vec<Vec<u8>>,
}

impl Filter {
    pub fn new(cfg: &ApplyConfig) -> Filter {
        let bytes = |v: &[String]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
        Filter {
            include_keys: bytes(&cfg.include_keys),
            exclude_keys: bytes(&cfg.exclude_keys),
            include_dbs: cfg.include_dbs.clone(),
            exclude_commands: bytes(&cfg.exclude_commands),
        }
    }

    /// A record of source db `db` is applied.
    pub fn db(&self, db: u32) -> bool {
        self.include_dbs.is_empty() || self.include_dbs.contains(&db)
    }

    /// A key is applied.
    pub fn key(&self, key: &[u8]) -> bool {
        (self.include_keys.is_empty() || self.include_keys.iter().any(|p| glob(p, key)))
            && !self.exclude_keys.iter().any(|p| glob(p, key))
    }

    /// A command is applied: its name is not excluded and its first key (if any) passes.
    pub fn command(&self, args: &[Bytes]) -> bool {
        let Some(name) = args.first() else {
            return false;
        };
        if self
            .exclude_commands
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
        {
            return false;
        }
        if self.include_keys.is_empty() && self.exclude_keys.is_empty() {
            return true;
        }
        match wire::commands::key_indexes(args) {
            Some(keys) => keys.first().is_none_or(|&i| self.key(&args[i])),
            None => true,
        }
    }

    /// The commands of a transaction or barrier that are applied.
    pub fn commands(&self, db: u32, commands: Vec<v1::Command>) -> Vec<v1::Command> {
        if !self.db(db) {
            return Vec::new();
        }
        commands
            .into_iter()
            .filter(|c| self.command(&c.args))
            .collect()
    }
}

/// A token bucket in operations and bytes per second (0: unlimited), shared by the lanes.
#[derive(Debug)]
pub struct RateLimit {
    ops_per_s: f64,
    bytes_per_s: f64,
    state: Mutex<(f64, f64, Instant)>,
}

impl RateLimit {
    pub fn new(cfg: &ApplyConfig) -> RateLimit {
        RateLimit {
            ops_per_s: cfg.max_ops_per_s as f64,
            bytes_per_s: cfg.max_bytes_per_s as f64,
            state: Mutex::new((
                cfg.max_ops_per_s as f64,
                cfg.max_bytes_per_s as f64,
                Instant::now(),
            )),
        }
    }

    /// Takes `ops` operations of `bytes` bytes; how long to wait before sending them. Tokens may
    /// go negative (a batch larger than a second's worth waits for the debt to be repaid).
    pub fn take(&self, ops: usize, bytes: usize) -> Duration {
        if self.ops_per_s <= 0.0 && self.bytes_per_s <= 0.0 {
            return Duration::ZERO;
        }
        let Ok(mut state) = self.state.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(state.2).as_secs_f64();
        state.2 = now;
        let mut wait: f64 = 0.0;
        if self.ops_per_s > 0.0 {
            state.0 = (state.0 + elapsed * self.ops_per_s).min(self.ops_per_s) - ops as f64;
            wait = wait.max(-state.0 / self.ops_per_s);
        }
        if self.bytes_per_s > 0.0 {
            state.1 = (state.1 + elapsed * self.bytes_per_s).min(self.bytes_per_s) - bytes as f64;
            wait = wait.max(-state.1 / self.bytes_per_s);
        }
        Duration::from_secs_f64(wait.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_glob() {
        let m = |p: &str, s: &str| glob(p.as_bytes(), s.as_bytes());
        assert!(m("*", ""));
        assert!(m("user:*", "user:42"));
        assert!(!m("user:*", "users:42"));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("a*b*c", "axxbyyc") && !m("a*b*c", "axxbyy"));
        assert!(m("\\*literal", "*literal") && !m("\\*literal", "xliteral"));
        assert!(m("*:tmp", "a:b:tmp"));
    }

    fn args(words: &[&str]) -> Vec<Bytes> {
        words.iter().map(|w| crate::cluster::b(w)).collect()
    }

    #[test]
    fn filters_by_key_db_and_command() {
        let cfg = ApplyConfig {
            include_keys: vec!["keep:*".into()],
            exclude_keys: vec!["keep:tmp:*".into()],
            include_dbs: vec![0, 2],
            exclude_commands: vec!["publish".into()],
            ..ApplyConfig::default()
        };
        let f = Filter::new(&cfg);
        assert!(f.key(b"keep:1") && !f.key(b"drop:1") && !f.key(b"keep:tmp:1"));
        assert!(f.db(2) && !f.db(1));
        assert!(f.command(&args(&["SET", "keep:1", "v"])));
        assert!(!f.command(&args(&["SET", "drop:1", "v"])));
        assert!(!f.command(&args(&["PUBLISH", "ch", "m"])));
        assert!(f.command(&args(&["FLUSHALL"])));
    }

    #[test]
    fn rate_limit_waits_for_the_debt() {
        let cfg = ApplyConfig {
            max_ops_per_s: 100,
            ..ApplyConfig::default()
        };
        let r = RateLimit::new(&cfg);
        assert_eq!(r.take(100, 0), Duration::ZERO);
        let wait = r.take(50, 0);
        assert!(
            wait >= Duration::from_millis(450) && wait <= Duration::from_millis(510),
            "{wait:?}"
        );
        assert_eq!(
            RateLimit::new(&ApplyConfig::default()).take(1_000_000, 1 << 30),
            Duration::ZERO
        );
    }
}
