//! Strict request-body extraction: the content type must be the one the endpoint takes, the
//! body is read up to a limit (413 beyond it), form parameters may not repeat (RFC 6749 §3.2)
//! and JSON bodies may not carry unknown fields.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, OAuthApiError};
use portcullis_core::OAuthError;

pub const OAUTH_BODY_LIMIT: usize = 64 * 1024;
pub const API_BODY_LIMIT: usize = 1024 * 1024;

/// Whether the request's media type (parameters such as `charset` aside) is `expected`.
pub fn has_media_type(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(expected))
}

pub enum BodyError {
    TooLarge,
    Unreadable,
}

pub async fn read_limited(body: Body, limit: usize) -> Result<bytes::Bytes, BodyError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            // A length-limit error is the only one a client can cause on purpose.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.to_string().contains("length limit exceeded") {
                    return Err(BodyError::TooLarge);
                }
                source = s.source();
            }
            Err(BodyError::Unreadable)
        }
    }
}

/// Parsed `application/x-www-form-urlencoded` parameters, each at most once. Parameters with
/// an empty value count as absent (RFC 6749 §3.1).
#[derive(Debug, Default)]
pub struct Form(HashMap<String, String>);

impl Form {
    pub fn parse(bytes: &[u8]) -> Result<Self, OAuthError> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {:?} is repeated",
                    k.chars().take(64).collect::<String>()
                )));
            }
        }
        map.retain(|_, v| !v.is_empty());
        Ok(Self(map))
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    pub fn take(&mut self, k: &str) -> Option<String> {
        self.0.remove(k)
    }
}

pub async fn oauth_form(headers: &HeaderMap, body: Body) -> Result<Form, OAuthApiError> {
    if !has_media_type(headers, "application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request("content type must be application/x-www-form-urlencoded").into());
    }
    let bytes = match read_limited(body, OAUTH_BODY_LIMIT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(OAuthApiError::too_large(OAUTH_BODY_LIMIT)),
        Err(BodyError::Unreadable) => return Err(OAuthError::invalid_request("request body could not be read").into()),
    };
    if std::str::from_utf8(&bytes).is_err() {
        return Err(OAuthError::invalid_request("request body is not UTF-8").into());
    }
    Ok(Form::parse(&bytes)?)
}

pub async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    if !has_media_type(headers, "application/json") {
        return Err(ApiError::BadRequest("content type must be application/json".into()));
    }
    let bytes = match read_limited(body, API_BODY_LIMIT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(ApiError::PayloadTooLarge(API_BODY_LIMIT)),
        Err(BodyError::Unreadable) => return Err(ApiError::BadRequest("request body could not be read".into())),
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {}", json_error(&e))))
}

/// A JSON body that may be left out: no `Content-Type` means "all defaults" (e.g. a revocation
/// without a reason); with one, the body is read as [`json_body`] reads it.
pub async fn optional_json_body<T: DeserializeOwned + Default>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    if headers.contains_key(header::CONTENT_TYPE) { json_body(headers, body).await } else { Ok(T::default()) }
}

/// serde's message, minus any value it quotes: "invalid type: string \"hunter2\", expected …"
/// or "unknown variant `hunter2`, expected …" would put a password sent in the wrong place into
/// `x-error` and the log. What is expected comes after the *last* ", expected ": the value may
/// contain those words too.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    const QUOTING: [&str; 4] = ["invalid type", "invalid value", "invalid length", "unknown variant"];
    if let Some(what) = QUOTING.iter().find(|p| msg.starts_with(**p)) {
        let expected = msg.rsplit_once(", expected ").map(|(_, x)| x.split(" at line").next().unwrap_or(x));
        match expected {
            Some(x) => format!("{what}, expected {x} at line {} column {}", e.line(), e.column()),
            None => format!("{what} at line {} column {}", e.line(), e.column()),
        }
    } else {
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_never_quote_the_value() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            password: String,
            n: u32,
        }
        for body in [r#"{"password": 123456789, "n": 1}"#, r#"{"password": "x", "n": "hunter2"}"#] {
            let e = serde_json::from_str::<T>(body).unwrap_err();
            let m = json_error(&e);
            assert!(!m.contains("123456789") && !m.contains("hunter2"), "{m}");
            assert!(m.contains("expected") && m.contains("line 1"), "{m}");
        }
        let e = serde_json::from_str::<T>(r#"{"pasword": "x"}"#).unwrap_err();
        assert!(json_error(&e).contains("pasword"), "unknown field names are kept");
    }

    #[test]
    fn json_errors_never_quote_an_enum_value_nor_what_follows_expected_in_a_value() {
        // Found by the json_body fuzz target (docs/fuzzing.md): both used to be echoed.
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "kebab-case")]
        #[allow(dead_code)]
        enum Kind {
            Transport,
            ServerTransport,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            kind: Kind,
            n: u32,
        }
        for body in [r#"{"kind": "hunter2", "n": 1}"#, r#"{"kind": "transport", "n": "x, expected hunter2"}"#] {
            let e = serde_json::from_str::<T>(body).unwrap_err();
            let m = json_error(&e);
            assert!(!m.contains("hunter2"), "{m}");
            assert!(m.contains("expected") && m.contains("line 1"), "{m}");
        }
        let e = serde_json::from_str::<T>(r#"{"kind": "signing", "n": 1}"#).unwrap_err();
        assert_eq!(json_error(&e), "unknown variant, expected `transport` or `server-transport` at line 1 column 18");
    }

    #[test]
    fn forms_refuse_repeats_and_drop_empty_values() {
        let f = Form::parse(b"a=1&b=&c=x%2By+z").unwrap();
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.get("b"), None);
        assert_eq!(f.get("c"), Some("x+y z"));
        let e = Form::parse(b"grant_type=a&grant_type=b").unwrap_err();
        assert!(e.description.contains("grant_type"));
    }
}
