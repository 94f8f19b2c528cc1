//! Where a Redis server is and how to reach it: the `redis.url` both connectors take, parsed
//! (credentials decoded, TLS from the scheme), and the helpers built on it.

/// Where to reach the source, parsed from `redis.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
}

impl Endpoint {
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let redacted = crate::config::redact_url(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("redis.url {redacted:?}: expected redis://host:port"))?;
        let tls = match scheme {
            "redis" => false,
            "rediss" => true,
            other => anyhow::bail!(
                "redis.url {redacted:?}: unknown scheme {other:?} (use redis:// or rediss://)"
            ),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    (!user.is_empty()).then(|| percent_decode(user)),
                    Some(percent_decode(pass)),
                ),
                None => (Some(percent_decode(u)), None),
            },
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => {
                let port: u32 = p.parse().map_err(|_| {
                    anyhow::anyhow!("redis.url {redacted:?}: port {p:?} is not a number")
                })?;
                anyhow::ensure!(
                    (1..=65535).contains(&port),
                    "redis.url {redacted:?}: port {port} is out of range 1-65535"
                );
                (h, port as u16)
            }
            None => (hostport, 6379),
        };
        anyhow::ensure!(!host.is_empty(), "redis.url {redacted:?}: no host");
        Ok(Endpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            user,
            password,
            tls,
        })
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL of `endpoint` for the redis client (credentials kept).
pub fn client_url(endpoint: &Endpoint) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let scheme = if endpoint.tls { "rediss" } else { "redis" };
    let auth = match (&endpoint.user, &endpoint.password) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        (None, None) => String::new(),
    };
    format!("{scheme}://{auth}{}:{}", endpoint.host, endpoint.port)
}

/// Whether Redis refused the connection's credentials: redis-rs turns a refused `AUTH`
/// (`WRONGPASS`) into its own error kind and keeps the server's code for the others.
pub fn refused_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// `seed` with another node's address (same credentials and TLS).
pub fn at(seed: &Endpoint, host: &str, port: u16) -> Endpoint {
    Endpoint {
        host: host.to_owned(),
        port,
        ..seed.clone()
    }
}
