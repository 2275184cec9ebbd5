//! Failure counting for anything guessable: a fixed window per key (client id, client IP).
//!
//! [`SharedLimiter`] counts in the store, so every node sharing a database shares one budget
//! (the control plane's client-authentication, login, code, reset and mail limits).
//! [`FailureLimiter`] counts in this process's memory (the gateway's per-route limits, which
//! are per gateway instance, like Envoy's local rate limit).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::UnixTime;
use crate::store::Store;

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

/// A failure limit shared by every node on one database: at most `max_failures` events per
/// key in a fixed window of `window_secs` (the counters are rows of the store, updated
/// atomically). Keys are stored as SHA-256 digests under the limiter's name, never raw (they
/// may be addresses). A key found used up is remembered here until its window ends, so a
/// flood against it costs no database round trip (a `forgive` on another node is seen here
/// only when that window ends). If the store cannot be reached, the event is let through
/// (logged): the checks behind these limits need the store too, except a client secret
/// compared with a cached client, and those are 256-bit secrets.
#[derive(Debug)]
pub struct SharedLimiter {
    name: &'static str,
    max_failures: u32,
    window_secs: i64,
    /// Stored keys known to be used up, and until when.
    blocked: Mutex<HashMap<String, UnixTime>>,
}

impl SharedLimiter {
    pub fn new(name: &'static str, max_failures: u32, window_secs: i64) -> Self {
        Self { name, max_failures: max_failures.max(1), window_secs, blocked: Mutex::new(HashMap::new()) }
    }

    fn stored_key(&self, key: &str) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
        let hex: String = d.as_ref().iter().take(20).map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", self.name)
    }

    /// `Err(retry after)` if this node already knows `stored` is used up.
    fn known_blocked(&self, stored: &str, now: UnixTime) -> Result<(), u64> {
        let Ok(map) = self.blocked.lock() else { return Ok(()) };
        match map.get(stored) {
            Some(until) if *until > now => Err(retry_after(*until, now)),
            _ => Ok(()),
        }
    }

    fn remember_blocked(&self, stored: &str, until: UnixTime, now: UnixTime) {
        let Ok(mut map) = self.blocked.lock() else { return };
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, u| *u > now);
        }
        map.insert(stored.to_owned(), until);
    }

    /// Counts an event for every key in `keys`: `Err(retry after)` when any of them is past its
    /// limit with this event (which counts all the same: a refused attempt is an attempt).
    pub async fn fail(&self, store: &dyn Store, keys: &[&str], now: UnixTime) -> Result<(), u64> {
        let stored: Vec<String> = keys.iter().map(|k| self.stored_key(k)).collect();
        for s in &stored {
            self.known_blocked(s, now)?;
        }
        let counts = match store.count_attempts(&stored, self.window_secs, now).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, limiter = self.name, "could not count a failure in the shared counters");
                return Ok(());
            }
        };
        let mut refused = None;
        for (s, (n, until)) in stored.iter().zip(counts) {
            if n >= self.max_failures {
                self.remember_blocked(s, until, now);
            }
            if n > self.max_failures {
                refused = Some(refused.map_or(retry_after(until, now), |r: u64| r.max(retry_after(until, now))));
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// Takes back one counted event (an attempt that turned out right).
    pub async fn forgive(&self, store: &dyn Store, key: &str, now: UnixTime) {
        let stored = self.stored_key(key);
        if let Ok(mut map) = self.blocked.lock() {
            map.remove(&stored);
        }
        if let Err(e) = store.forgive_attempt(&stored, now).await {
            tracing::warn!(error = %e, limiter = self.name, "could not take back a counted attempt");
        }
    }
}

fn retry_after(until: UnixTime, now: UnixTime) -> u64 {
    u64::try_from(until - now).unwrap_or(1).max(1)
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
