//! Failure counting for anything guessable: a fixed window per key (client id, client IP).
//! In memory per node for now; the scale-out issue moves the counters to the shared store.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::UnixTime;

#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window_secs: i64,
    counters: Mutex<HashMap<String, (UnixTime, u32)>>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window_secs: i64) -> Self {
        Self { max_failures, window_secs, counters: Mutex::new(HashMap::new()) }
    }

    /// `Err(retry_after_secs)` when `key` has used up its failures in the current window.
    pub fn check(&self, key: &str, now: UnixTime) -> Result<(), u64> {
        let Ok(map) = self.counters.lock() else { return Ok(()) };
        match map.get(key) {
            Some((start, n)) if *n >= self.max_failures && now < start + self.window_secs => {
                Err(u64::try_from(start + self.window_secs - now).unwrap_or(1).max(1))
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, key: &str, now: UnixTime) {
        let Ok(mut map) = self.counters.lock() else { return };
        if map.len() > 100_000 {
            let w = self.window_secs;
            map.retain(|_, (start, _)| now < *start + w);
        }
        let e = map.entry(key.to_owned()).or_insert((now, 0));
        if now >= e.0 + self.window_secs {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let l = FailureLimiter::new(3, 60);
        for _ in 0..3 {
            assert!(l.check("ip:1", 100).is_ok());
            l.record_failure("ip:1", 100);
        }
        assert_eq!(l.check("ip:1", 110), Err(50));
        assert!(l.check("ip:2", 110).is_ok(), "keys are independent");
        assert!(l.check("ip:1", 160).is_ok(), "a new window starts");
        l.record_failure("ip:1", 160);
        assert!(l.check("ip:1", 161).is_ok());
    }
}
