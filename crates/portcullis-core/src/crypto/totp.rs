//! TOTP (RFC 6238 over RFC 4226 HOTP): HMAC-SHA-1, 30-second steps, 6 digits — what every
//! authenticator app speaks. Secrets are 160 random bits, shown base32 (RFC 4648, no padding).

use aws_lc_rs::hmac;

use crate::error::{Error, Result};

pub const STEP_SECS: i64 = 30;
pub const DIGITS: u32 = 6;
/// Steps either side of the current one that are accepted (clock drift).
pub const WINDOW: i64 = 1;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// 20 random bytes.
pub fn new_secret() -> Result<Vec<u8>> {
    let mut b = vec![0u8; 20];
    aws_lc_rs::rand::fill(&mut b).map_err(Error::internal)?;
    Ok(b)
}

pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(base32_char(buf >> bits));
        }
    }
    if bits > 0 {
        out.push(base32_char(buf << (5 - bits)));
    }
    out
}

fn base32_char(v: u32) -> char {
    BASE32.get((v & 31) as usize).map_or('A', |b| char::from(*b))
}

/// The HOTP value of `counter` (RFC 4226 §5.3, dynamic truncation).
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let mac = tag.as_ref();
    let offset = usize::from(mac.last().copied().unwrap_or(0) & 0x0f);
    let word = mac.get(offset..offset + 4).and_then(|w| <[u8; 4]>::try_from(w).ok()).map_or(0, u32::from_be_bytes);
    (word & 0x7fff_ffff) % 10u32.pow(DIGITS)
}

/// The time step of `now`.
pub fn step(now: i64) -> i64 {
    now.div_euclid(STEP_SECS)
}

/// The step within the window whose code is `code` (the newest if several), or `None`.
/// Comparison is in constant time per step.
pub fn matching_step(secret: &[u8], code: &str, now: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut found = None;
    for s in (step(now) - WINDOW)..=(step(now) + WINDOW) {
        let Ok(counter) = u64::try_from(s) else { continue };
        let expected = format!("{:0width$}", hotp(secret, counter), width = DIGITS as usize);
        if aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), code.as_bytes()).is_ok() {
            found = Some(s);
        }
    }
    found
}

/// The `otpauth://` URI authenticator apps read from the QR code.
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> String {
    let enc =
        |s: &str| -> String { form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20") };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer),
        enc(account),
        base32(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    /// RFC 6238 Appendix B, SHA-1 rows (8 digits there; the low 6 digits are ours).
    #[test]
    fn rfc6238_vectors() {
        let secret = b"12345678901234567890";
        for (t, code8) in [
            (59i64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(secret, u64::try_from(step(t)).unwrap()), code8 % 1_000_000, "t={t}");
        }
    }

    #[test]
    fn window_and_format() {
        let secret = b"12345678901234567890";
        let now = 1111111111;
        let code = format!("{:06}", hotp(secret, u64::try_from(step(now)).unwrap()));
        assert_eq!(matching_step(secret, &code, now), Some(step(now)));
        assert_eq!(matching_step(secret, &code, now + 30), Some(step(now)), "one step late is accepted");
        assert_eq!(matching_step(secret, &code, now + 90), None, "three steps late is not");
        assert_eq!(matching_step(secret, "12345", now), None);
        assert_eq!(matching_step(secret, "12345a", now), None);
    }

    #[test]
    fn base32_rfc4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        let uri = otpauth_uri(b"12345678901234567890", "Portcullis acme", "a@b.example");
        assert!(
            uri.starts_with("otpauth://totp/Portcullis%20acme:a%40b.example?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&")
        );
    }
}
