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
        println!("ok    {what}");
    }

    pub fn warn(&mut self, what: impl std::fmt::Display) {
        self.warnings += 1;
        println!("warn  {what}");
    }

    pub fn fail(&mut self, what: impl std::fmt::Display) {
        self.failures += 1;
        println!("FAIL  {what}");
    }

    /// `Ok` when nothing failed, else an error counting the failures.
    pub fn finish(self) -> anyhow::Result<()> {
        println!("{} failed, {} warnings", self.failures, self.warnings);
        anyhow::ensure!(self.failures == 0, "{} check(s) failed", self.failures);
        Ok(())
    }
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
    fn info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrole:master\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field(info, "role"), Some("master"));
        assert_eq!(info_field(info, "missing"), None);
    }
}
