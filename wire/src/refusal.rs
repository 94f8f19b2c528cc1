//! Error replies (`-CODE message`) and what they mean for the client that sent the command.

/// An error reply of a Redis server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct Refusal {
    /// The first word: `ERR`, `NOAUTH`, `LOADING`, …
    pub code: String,
    /// The rest of the line.
    pub message: String,
}

/// What a refusal means for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The server refuses this client: wrong or missing credentials, or an ACL without the
    /// command. Retrying cannot help until an operator acts.
    Authentication,
    /// The server does not know the command under this name (too old for it, or renamed or
    /// disabled there by `rename-command`).
    UnknownCommand,
    /// Anything else (`LOADING`, `NOMASTERLINK`, `MASTERDOWN`, …): worth trying again later.
    Other,
}

impl Refusal {
    /// `line` is the reply without its leading `-` (`NOAUTH Authentication required.`).
    pub fn parse(line: &str) -> Refusal {
        let line = line.trim_end_matches(['\r', '\n']);
        let (code, message) = line.split_once(' ').unwrap_or((line, ""));
        Refusal {
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    /// Decided by the code. `ERR` is Redis's catch-all code, and two refusals come with nothing
    /// better in every version that matters: an unknown command (`-ERR unknown command`) and,
    /// before Redis 6 introduced `WRONGPASS`, a wrong password (`-ERR invalid password`,
    /// `-ERR Client sent AUTH, but no password is set`). For `ERR` alone, and only here, the
    /// text decides.
    pub fn meaning(&self) -> Meaning {
        match self.code.as_str() {
            "NOAUTH" | "WRONGPASS" | "NOPERM" => Meaning::Authentication,
            "ERR" => {
                let text = self.message.to_ascii_lowercase();
                if text.starts_with("unknown command") {
                    Meaning::UnknownCommand
                } else if text.contains("password") || text.starts_with("client sent auth") {
                    Meaning::Authentication
                } else {
                    Meaning::Other
                }
            }
            _ => Meaning::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_by_meaning() {
        let cases = [
            ("NOAUTH Authentication required.", Meaning::Authentication),
            (
                "WRONGPASS invalid username-password pair or user is disabled.",
                Meaning::Authentication,
            ),
            (
                "NOPERM User repl has no permissions to run the 'psync' command",
                Meaning::Authentication,
            ),
            ("ERR invalid password", Meaning::Authentication),
            (
                "ERR Client sent AUTH, but no password is set",
                Meaning::Authentication,
            ),
            (
                "ERR unknown command 'PSYNC', with args beginning with: '?' '-1' ",
                Meaning::UnknownCommand,
            ),
            (
                "ERR unknown command `REPLCONF`, with args beginning with: ",
                Meaning::UnknownCommand,
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                Meaning::Other,
            ),
            (
                "NOMASTERLINK Can't SYNC while not connected with my master",
                Meaning::Other,
            ),
            (
                "ERR Can't SYNC while not connected with my master",
                Meaning::Other,
            ),
            ("MASTERDOWN", Meaning::Other),
        ];
        for (line, meaning) in cases {
            assert_eq!(Refusal::parse(line).meaning(), meaning, "{line}");
        }
        let r = Refusal::parse("LOADING Redis is loading\r\n");
        assert_eq!(
            (r.code.as_str(), r.message.as_str()),
            ("LOADING", "Redis is loading")
        );
        assert_eq!(r.to_string(), "LOADING Redis is loading");
    }
}
