//! The gateway's own answers: every refusal carries `x-error` (safe text) and `x-error-id` (also
//! in the access log), per DESIGN §4. On `rest` routes (and before a route is known) the body is
//! the JSON `{"error": …, "error_id": …}`; on `soap` routes it is a SOAP Fault in the request's
//! envelope version ([`crate::soap`]). 401s carry `WWW-Authenticate`, 429s `Retry-After`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use crate::soap::{self, FaultKind, SoapVersion};

/// Errors of a body the gateway streams (the client's request or the upstream's response).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends or forwards.
pub type Body = BoxBody<Bytes, BoxError>;

pub const X_ERROR: &str = "x-error";
pub const X_ERROR_ID: &str = "x-error-id";

/// A fixed body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A unique id for one refusal: what a caller quotes and the log line carries.
pub fn error_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// How to shape a refusal's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Json,
    Soap(SoapVersion),
}

/// A refusal before or instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// The `x-error` text: what went wrong, safe to show to the caller.
    pub message: String,
    /// `WWW-Authenticate` for 401s.
    pub www_authenticate: Option<String>,
    /// `Retry-After` seconds for 429s and 503s.
    pub retry_after: Option<u64>,
    /// A redirect target (browser routes without a session): sent as `Location` with a 302.
    pub location: Option<String>,
    /// `Allow` for 405s.
    pub allow: Option<String>,
    /// `Set-Cookie` headers (the browser sign-in's flow cookie).
    pub set_cookies: Vec<HeaderValue>,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            www_authenticate: None,
            retry_after: None,
            location: None,
            allow: None,
            set_cookies: Vec::new(),
        }
    }

    pub fn unauthorized(message: impl Into<String>, www_authenticate: String) -> Self {
        Self { www_authenticate: Some(www_authenticate), ..Self::new(StatusCode::UNAUTHORIZED, message) }
    }

    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    /// Renders the refusal with a fresh error id; returns the response and the id.
    pub fn render(&self, shape: Shape) -> (Response<Body>, String) {
        let id = error_id();
        (self.render_with_id(shape, &id), id)
    }

    fn render_with_id(&self, shape: Shape, id: &str) -> Response<Body> {
        let (content_type, body) = match shape {
            Shape::Json => {
                ("application/json", serde_json::json!({ "error": self.message, "error_id": id }).to_string())
            }
            Shape::Soap(version) => {
                let (ct, body) = soap::fault(version, FaultKind::for_status(self.status), &self.message, id);
                (ct, body)
            }
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(X_ERROR, header_text(&self.message));
        if let Ok(v) = HeaderValue::from_str(id) {
            h.insert(X_ERROR_ID, v);
        }
        if let Some(w) = &self.www_authenticate
            && let Ok(v) = HeaderValue::from_str(w)
        {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Some(allow) = &self.allow
            && let Ok(v) = HeaderValue::from_str(allow)
        {
            h.insert(header::ALLOW, v);
        }
        if let Some(loc) = &self.location
            && let Ok(v) = HeaderValue::from_str(loc)
        {
            h.insert(header::LOCATION, v);
        }
        for c in &self.set_cookies {
            h.append(header::SET_COOKIE, c.clone());
        }
        resp
    }
}

/// `s` as a header value: visible ASCII and spaces kept, anything else replaced by `?`, at most
/// 512 bytes, so a message built from untrusted input can never break the header block.
pub fn header_text(s: &str) -> HeaderValue {
    let clean: String = s.chars().take(512).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    HeaderValue::from_str(clean.trim()).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// RFC 6750 §3 challenge for a route accepting bearer tokens: `Bearer realm="portcullis"`, with
/// `error`/`error_description` when a token was presented and refused.
pub fn bearer_challenge(error: Option<(&str, &str)>) -> String {
    match error {
        None => "Bearer realm=\"portcullis\"".to_owned(),
        Some((code, description)) => {
            let description: String = description
                .chars()
                .filter(|c| (c.is_ascii_graphic() || *c == ' ') && !matches!(c, '"' | '\\'))
                .collect();
            format!("Bearer realm=\"portcullis\", error=\"{code}\", error_description=\"{description}\"")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    async fn body_text(resp: Response<Body>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn json_refusal_carries_the_contract_headers() {
        let r = Refusal::unauthorized("no credential", bearer_challenge(None)).with_retry_after(None);
        let (resp, id) = r.render(Shape::Json);
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()[X_ERROR], "no credential");
        assert_eq!(resp.headers()[X_ERROR_ID], id.as_str());
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"portcullis\"");
        let body: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
        assert_eq!(body["error_id"], id.as_str());
    }

    #[tokio::test]
    async fn soap_refusal_is_a_fault_of_the_request_version() {
        let (resp, id) = Refusal::new(StatusCode::FORBIDDEN, "missing <role>").render(Shape::Soap(SoapVersion::V12));
        assert_eq!(resp.headers()[header::CONTENT_TYPE], SoapVersion::V12.content_type());
        let text = body_text(resp).await;
        assert!(text.contains(soap::SOAP12_ENVELOPE_NS) && text.contains(&id) && text.contains("missing &lt;role&gt;"));
    }

    #[test]
    fn untrusted_text_cannot_break_a_header() {
        assert_eq!(header_text("a\r\nx-injected: 1\u{e9}"), "a??x-injected: 1?");
        let c = bearer_challenge(Some(("invalid_token", "bad \"quote\" \\ here")));
        assert!(HeaderValue::from_str(&c).is_ok());
        assert!(c.ends_with("error_description=\"bad quote  here\""));
    }
}
