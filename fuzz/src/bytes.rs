//! Reading a fuzzer's raw bytes as structured input, shared by the invariant modules
//! (`tokens.rs`, `redirects.rs`, `web.rs`, `login.rs`, `certs.rs`). The stable runners include
//! this file with `#[path]` beside the modules that use it.

#![allow(dead_code)]

/// Reads bytes front to back; zero (or nothing) once they run out.
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    /// The next byte, `0` when none is left.
    pub fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    /// Bytes up to (not including) the next `sep`, or all that is left; the separator is used up.
    pub fn field(&mut self, sep: u8) -> &'a [u8] {
        match self.0.iter().position(|b| *b == sep) {
            Some(i) => {
                let (field, rest) = self.0.split_at(i);
                self.0 = rest.get(1..).unwrap_or_default();
                field
            }
            None => std::mem::take(&mut self.0),
        }
    }

    /// [`Bytes::field`] as text (invalid UTF-8 replaced).
    pub fn text(&mut self, sep: u8) -> String {
        String::from_utf8_lossy(self.field(sep)).into_owned()
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    /// One of `items`, chosen by the next byte.
    pub fn pick<'t, T>(&mut self, items: &'t [T]) -> Option<&'t T> {
        let i = usize::from(self.byte());
        items.get(i % items.len().max(1))
    }
}

/// A string from fuzzer bytes: each byte picks one of `pieces`; a `0xff` byte takes the rest as
/// text (invalid UTF-8 replaced).
pub fn from_pieces(pieces: &[&str], data: &[u8]) -> String {
    let mut b = Bytes(data);
    let mut s = String::new();
    while !b.0.is_empty() {
        let x = b.byte();
        if x == 0xff {
            s.push_str(&String::from_utf8_lossy(b.rest()));
            break;
        }
        s.push_str(pieces.get(usize::from(x) % pieces.len().max(1)).copied().unwrap_or(""));
    }
    s
}
