//! The seeded PRNG and run loop of the stable randomized runners (the `tests/parsers_fuzz.rs`
//! of portcullis-core, portcullis-web and portcullis-gateway, which include this file with
//! `#[path]`), and string generators biased toward the dangerous alphabet. Not used by the
//! cargo-fuzz targets, where libFuzzer generates the bytes.
//!
//! Deterministic by default. `PARSERS_FUZZ_SEED=<u64>` changes the seed and
//! `PARSERS_FUZZ_ITERATIONS=<n>` the number of cases per target; a failure prints the seed and
//! the case number.
#![allow(dead_code)]

/// SplitMix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    /// Up to `max` random bytes.
    pub fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        self.bytes(n)
    }
}

pub fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Prints how to reproduce when a case panics.
struct Case {
    target: &'static str,
    seed: u64,
    index: usize,
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("parsers_fuzz: {} failed at case {} (PARSERS_FUZZ_SEED={})", self.target, self.index, self.seed);
        }
    }
}

/// Runs `body` `iterations` times (or `PARSERS_FUZZ_ITERATIONS`) with one PRNG per target.
pub fn run(target: &'static str, iterations: usize, mut body: impl FnMut(&mut Rng)) {
    let base = env_number("PARSERS_FUZZ_SEED").unwrap_or(0x0070_6f72_7463_756c);
    let seed =
        base ^ target.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let iterations = env_number("PARSERS_FUZZ_ITERATIONS").map_or(iterations, |n| n as usize);
    let mut rng = Rng(seed);
    for index in 0..iterations {
        let _case = Case { target, seed: base, index };
        body(&mut rng);
    }
}

/// Byte-level edits of `s`: insert a piece, delete a range, replace a byte, flip the case of a
/// range, duplicate a range, splice with another string. Invalid UTF-8 is replaced.
pub fn mutate(rng: &mut Rng, s: &str, pieces: &[&str], others: &[&str]) -> String {
    let mut b = s.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(b.len() + 1);
        match rng.below(7) {
            0 | 1 => {
                let p = rng.pick(pieces);
                b.splice(pos..pos, p.bytes());
            }
            2 => {
                let end = (pos + 1 + rng.below(4)).min(b.len());
                b.drain(pos.min(end)..end);
            }
            3 => {
                if pos < b.len() {
                    b[pos] = if rng.percent(80) { rng.byte() & 0x7f } else { rng.byte() };
                }
            }
            4 => {
                let end = (pos + rng.below(12)).min(b.len());
                for c in &mut b[pos.min(end)..end] {
                    *c = if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() };
                }
            }
            5 => {
                let end = (pos + rng.below(8)).min(b.len());
                let copy = b[pos.min(end)..end].to_vec();
                b.splice(pos..pos, copy);
            }
            _ => {
                let other = rng.pick(if others.is_empty() { pieces } else { others }).as_bytes();
                let cut = rng.below(other.len() + 1);
                b.truncate(pos);
                b.extend_from_slice(&other[cut..]);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

pub fn concat(rng: &mut Rng, pieces: &[&str], max: usize) -> String {
    (0..rng.below(max + 1)).map(|_| *rng.pick(pieces)).collect()
}

/// Very long strings: one piece repeated, or a long run with the pieces sprinkled in.
pub fn long(rng: &mut Rng, pieces: &[&str]) -> String {
    let p = rng.pick(pieces);
    let n = 1 + rng.below(1000);
    let mut s = p.repeat(n);
    if rng.percent(50) {
        s.push_str(&"a".repeat(rng.below(6_000)));
        let end = *rng.pick(pieces);
        s.push_str(end);
    }
    s
}

/// Non-ASCII characters that fold, normalise or confuse: dotless i, Kelvin sign, long s,
/// fullwidth and division slashes, a line separator, a BOM, a combining mark, an emoji.
pub const UNICODE: &[&str] =
    &["é", "ı", "\u{212a}", "ſ", "\u{ff0f}", "\u{2215}", "\u{2028}", "\u{feff}", "\u{301}", "😀", "\u{85}", "\u{fffd}"];
