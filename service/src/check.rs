//! The report of a connector's `check` command: one line per check, `ok`, `warn` or `FAIL`,
//! printed as it happens, and an exit status that fails when any check failed.

/// Collects and prints check results.
#[derive(Debug, Default)]
pub struct Report {
    failures: usize,
    warnings: usize,
}

impl Report {
    pub fn ok(&mut self, what: impl std::fmt::Display) {
        println!("ok    {}", line(what));
    }

    pub fn warn(&mut self, what: impl std::fmt::Display) {
        self.warnings += 1;
        println!("warn  {}", line(what));
    }

    pub fn fail(&mut self, what: impl std::fmt::Display) {
        self.failures += 1;
        println!("FAIL  {}", line(what));
    }

    /// `Ok` when nothing failed, else an error counting the failures.
    pub fn finish(self) -> anyhow::Result<()> {
        println!("{} failed, {} warnings", self.failures, self.warnings);
        anyhow::ensure!(self.failures == 0, "{} check(s) failed", self.failures);
        Ok(())
    }
}

/// One line per check, whatever the underlying error printed; a reply that does not parse as
/// RESP gets a hint that something other than Redis answered.
fn line(what: impl std::fmt::Display) -> String {
    let text = what.to_string();
    let mut one = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if one.to_ascii_lowercase().contains("parse error") {
        one.push_str(" (the server does not speak the Redis protocol: is this the right port?)");
    }
    one
}

/// A field of an `INFO` reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_only_on_failures() {
        let mut r = Report::default();
        r.ok("fine");
        r.warn("hmm");
        assert!(r.finish().is_ok());
        let mut r = Report::default();
        r.fail("broken");
        assert!(r.finish().is_err());
    }

    #[test]
    fn lines_are_single() {
        assert_eq!(line("a\nb\n"), "a; b");
        assert!(
            line("parse error - ParseError: Parse error at 1\nUnexpected `33`")
                .contains("right port")
        );
    }

    #[test]
    fn info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrole:master\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field(info, "role"), Some("master"));
        assert_eq!(info_field(info, "missing"), None);
    }
}
