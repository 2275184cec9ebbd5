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
    /// When ended windows were last swept out (at most once a second, so a flood of new keys
    /// cannot make every insert scan the whole map).
    last_sweep: std::sync::atomic::AtomicI64,
}

/// Past this many live keys, ended windows are swept out.
const SWEEP_ABOVE: usize = 100_000;

impl FailureLimiter {
    pub fn new(max_failures: u32, window_secs: i64) -> Self {
        Self {
            max_failures,
            window_secs,
            counters: Mutex::new(HashMap::new()),
            last_sweep: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// `Err(retry_after_secs)` when `key` has used up its failures in the current window.
    pub fn check(&self, key: &str, now: UnixTime) -> Result<(), u64> {
        let Ok(map) = self.counters.lock() else { return Ok(()) };
        self.check_in(&map, key, now)
    }

    pub fn record_failure(&self, key: &str, now: UnixTime) {
        let Ok(mut map) = self.counters.lock() else { return };
        self.record_in(&mut map, key, now);
    }

    /// A failure for every key in `keys`, checked and counted under one lock: `Err(retry
    /// after)` — and nothing counted — when any of them has used up its failures already.
    pub fn fail(&self, keys: &[&str], now: UnixTime) -> Result<(), u64> {
        let Ok(mut map) = self.counters.lock() else { return Ok(()) };
        for key in keys {
            self.check_in(&map, key, now)?;
        }
        for key in keys {
            self.record_in(&mut map, key, now);
        }
        Ok(())
    }

    /// Takes back one counted event (an attempt that turned out right).
    pub fn forgive(&self, key: &str) {
        let Ok(mut map) = self.counters.lock() else { return };
        if let Some(e) = map.get_mut(key) {
            e.1 = e.1.saturating_sub(1);
        }
    }

    fn check_in(&self, map: &HashMap<String, (UnixTime, u32)>, key: &str, now: UnixTime) -> Result<(), u64> {
        match map.get(key) {
            Some((start, n)) if *n >= self.max_failures && now < start + self.window_secs => {
                Err(u64::try_from(start + self.window_secs - now).unwrap_or(1).max(1))
            }
            _ => Ok(()),
        }
    }

    fn record_in(&self, map: &mut HashMap<String, (UnixTime, u32)>, key: &str, now: UnixTime) {
        if map.len() > SWEEP_ABOVE && self.last_sweep.swap(now, std::sync::atomic::Ordering::Relaxed) < now {
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

    #[test]
    fn fail_counts_every_key_or_none() {
        let l = FailureLimiter::new(2, 60);
        assert!(l.fail(&["client:a", "ip:1"], 0).is_ok());
        assert!(l.fail(&["client:a", "ip:1"], 0).is_ok());
        assert!(l.fail(&["client:b", "ip:1"], 0).is_err(), "the IP is used up");
        assert!(l.check("client:b", 0).is_ok(), "nothing was counted for client:b");
        l.forgive("ip:1");
        assert!(l.fail(&["ip:1"], 0).is_ok(), "a forgiven event frees its place");
        assert!(l.fail(&["ip:1"], 0).is_err());
    }
}
