//! Invariants of what is read from a client certificate: the gateway's `PeerCertificate`
//! (the XFCC it forwards: hash, subject, first URI SAN), the core's key reader
//! (`ClientKeyMaterial::from_spki`), a signing certificate's JWK (`pki::certificate_jwk`) and
//! renewal's CSR stand-in (`pki::csr_from_certificate`). Shared by the cargo-fuzz target
//! `client_cert` and `crates/portcullis-gateway/tests/parsers_fuzz.rs`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64};
use portcullis_core::crypto::jwk::{ClientKey, ClientKeyMaterial};
use portcullis_gateway::tls::PeerCertificate;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::bytes::Bytes;

/// Self-signed leaves shaped like the ones our CA issues (a subject with characters XFCC must
/// escape, a URI and a DNS SAN), one per accepted key type: P-256, P-384, Ed25519, RSA 2048.
/// Fixed files (made once with `openssl req -x509`), so a crash found by editing them replays.
pub fn certificate_fixtures() -> Vec<Vec<u8>> {
    [
        &include_bytes!("../fixtures/leaf-p256.der")[..],
        include_bytes!("../fixtures/leaf-p384.der"),
        include_bytes!("../fixtures/leaf-ed25519.der"),
        include_bytes!("../fixtures/leaf-rsa2048.der"),
    ]
    .iter()
    .map(|d| d.to_vec())
    .collect()
}

/// Edits DER as `data` spells (4 bytes each: operation, position, value): replace, insert,
/// delete, truncate, flip a bit, set a length-like byte.
pub fn mutate_der(der: &[u8], data: &[u8]) -> Vec<u8> {
    let mut d = der.to_vec();
    let mut b = Bytes(data);
    while !b.0.is_empty() {
        let (op, pos, x) = (b.byte(), usize::from(b.u16()), b.byte());
        let pos = pos % (d.len() + 1);
        match op % 6 {
            0 => {
                if let Some(c) = d.get_mut(pos) {
                    *c = x;
                }
            }
            1 => d.insert(pos, x),
            2 => {
                if pos < d.len() {
                    d.remove(pos);
                }
            }
            3 => d.truncate(pos),
            4 => {
                if let Some(c) = d.get_mut(pos) {
                    *c ^= 1 << (x % 8);
                }
            }
            _ => {
                if let Some(c) = d.get_mut(pos) {
                    *c = [0x00, 0x7f, 0x80, 0x81, 0x82, 0xff][usize::from(x) % 6];
                }
            }
        }
    }
    d
}

/// Fuzzer bytes: an even first byte edits one of the fixtures ([`mutate_der`]); an odd one is
/// raw DER.
pub fn der_from_bytes(fixtures: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let mut b = Bytes(data);
    let sel = b.byte();
    if sel & 1 == 1 {
        return b.rest().to_vec();
    }
    let base = fixtures.get(usize::from(sel >> 1) % fixtures.len().max(1)).cloned().unwrap_or_default();
    mutate_der(&base, b.rest())
}

/// Everything read from a (possibly malformed) client certificate agrees with an independent
/// parse of it: `PeerCertificate` exists exactly when the certificate parses, its hash is the
/// SHA-256 of the bytes (lower-case hex), its subject and URI SAN are the certificate's, and the
/// XFCC built from them reads back (`invariants::check_xfcc`); the key, the signing JWK and the
/// renewal CSR all carry the certificate's own public key.
pub fn check_client_certificate(der: &[u8]) {
    let parsed = X509Certificate::from_der(der).ok().map(|(_, c)| c);
    let peer = PeerCertificate::from_der(der.to_vec());
    assert_eq!(peer.is_some(), parsed.is_some(), "PeerCertificate and the parser disagree");
    let (Some(peer), Some(cert)) = (peer, parsed) else {
        assert!(portcullis_core::pki::certificate_jwk(der, &[]).is_none());
        assert!(portcullis_core::pki::csr_from_certificate(der).is_err());
        return;
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    assert_eq!(peer.sha256.as_slice(), digest.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(peer.sha256_hex, hex);
    assert_eq!(peer.subject, cert.subject().to_string());
    let san_uri = cert.subject_alternative_name().ok().flatten().and_then(|s| {
        s.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
    });
    assert_eq!(peer.san_uri, san_uri);
    crate::invariants::check_xfcc(&peer.sha256_hex, &peer.subject, peer.san_uri.as_deref());

    let spki = cert.public_key().raw;
    let key = ClientKeyMaterial::from_spki(spki);
    if let Some(m) = &key {
        crate::tokens::check_client_jwk(&serde_json::Value::Object(m.jwk_members()));
    }
    match portcullis_core::pki::certificate_jwk(der, &[der.to_vec()]) {
        Some(jwk) => {
            let thumb = B64.encode(digest.as_ref());
            assert_eq!(jwk["x5t#S256"], thumb.as_str());
            assert_eq!(jwk["kid"], thumb.as_str());
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["x5c"], serde_json::json!([B64STD.encode(der), B64STD.encode(der)]));
            let m = key.as_ref().expect("a JWK only for an accepted key");
            match ClientKey::from_jwk(&jwk) {
                Some(client) => assert_eq!(client.material.jwk_members(), m.jwk_members(), "another key"),
                // Only an RSA key no client may use (too short, or a zero exponent), which the
                // CA never signs.
                None => assert!(
                    matches!(m, ClientKeyMaterial::Rsa { n, e }
                        if n.iter().skip_while(|b| **b == 0).count() < 256 || e.iter().all(|b| *b == 0)),
                    "{m:?} {jwk}"
                ),
            }
        }
        None => assert!(key.is_none(), "no JWK for an accepted key"),
    }
    if let Ok(csr) = portcullis_core::pki::csr_from_certificate(der) {
        assert_eq!(csr.spki_der, spki);
        assert_eq!(Some(csr.key), key);
        assert!(!csr.asks_ca && csr.other_names.is_empty());
    }
}
