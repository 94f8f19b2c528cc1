//! Capped exponential backoff with jitter: how both connectors wait before trying again (a
//! replica link reconnecting, a lane retrying a write the target refuses for now, the
//! Sentinels asked again).

use std::time::Duration;

/// The wait before each next attempt: `first`, doubled after every attempt up to `max`, plus up
/// to a quarter of it at random so that many retriers do not hit a recovering server at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let max = max.max(first);
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next attempt (jitter included); the one after is twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        let quarter = u64::try_from(base.as_millis() / 4).unwrap_or(u64::MAX);
        base + Duration::from_millis(rand::random::<u64>() % (quarter + 1))
    }

    /// Whether the waits have reached the cap.
    pub fn capped(&self) -> bool {
        self.next >= self.max
    }

    /// Back to `first` (the thing retried worked for a while).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_at_most_a_quarter_of_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<Duration> = (0..5).map(|_| b.next_wait()).collect();
        for (wait, base) in waits.iter().zip([100, 200, 400, 500, 500]) {
            assert!(
                *wait >= ms(base) && *wait <= ms(base + base / 4),
                "{waits:?}"
            );
        }
        assert!(b.capped());
        b.reset();
        assert!(!b.capped());
        assert!(b.next_wait() <= ms(125));
    }
}
