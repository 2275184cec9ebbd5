//! The one HTTP error mapping. Every non-2xx response carries `x-error` (safe, human-readable)
//! and `x-error-id` (unique, also in the log line). 500s say nothing about internals.
//! OAuth endpoints answer RFC 6749 JSON; 401s carry `WWW-Authenticate`.

use axum::Json;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::error::{STORAGE_FULL, STORAGE_FULL_RETRY_AFTER, STORAGE_UNAVAILABLE_RETRY_AFTER};
use portcullis_core::{Error, OAuthError, OAuthErrorCode, StoreError};

pub static X_ERROR: HeaderName = HeaderName::from_static("x-error");
pub static X_ERROR_ID: HeaderName = HeaderName::from_static("x-error-id");

pub fn new_error_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Header-safe text: printable ASCII only, bounded.
pub fn header_text(s: &str) -> HeaderValue {
    let clean: String = s.chars().take(300).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

fn stamp(headers: &mut HeaderMap, msg: &str, id: &str) {
    headers.insert(X_ERROR.clone(), header_text(msg));
    headers.insert(X_ERROR_ID.clone(), header_text(id));
}

/// Logs what a client must not see: the internals of a server-side failure, under the error
/// id the client gets. (Every refused request is also logged by the request middleware, with
/// its request id, route and `x-error`.)
fn log(status: StatusCode, id: &str, public: &str, internal: Option<&str>) {
    if status.is_server_error() {
        tracing::error!(
            error_id = id,
            status = status.as_u16(),
            error = public,
            internal = internal.unwrap_or(""),
            "server-side failure"
        );
    }
}

/// How a core error reads over HTTP, for the JSON API and the HTML pages alike.
pub struct Described {
    pub status: StatusCode,
    /// What the client may see (for a 500, only that it happened).
    pub public: String,
    /// What only the log may see.
    pub internal: Option<String>,
    pub retry_after: Option<u64>,
}

pub fn describe(e: Error) -> Described {
    let plain = |status, public: String| Described { status, public, internal: None, retry_after: None };
    match e {
        Error::InvalidInput(m) => plain(StatusCode::BAD_REQUEST, m),
        Error::NotFound(m) => plain(StatusCode::NOT_FOUND, format!("{m} not found")),
        Error::Conflict(m) => plain(StatusCode::CONFLICT, m),
        Error::Unauthenticated(m) => plain(StatusCode::UNAUTHORIZED, m),
        Error::Forbidden(m) => plain(StatusCode::FORBIDDEN, m),
        Error::RateLimited { retry_after_secs } => Described {
            retry_after: Some(retry_after_secs),
            ..plain(StatusCode::TOO_MANY_REQUESTS, "too many requests".to_owned())
        },
        Error::Store(StoreError::Conflict(m)) => Described {
            internal: Some(m),
            ..plain(StatusCode::CONFLICT, "the resource was changed concurrently; retry".to_owned())
        },
        Error::Store(StoreError::NotFound) => plain(StatusCode::NOT_FOUND, "not found".to_owned()),
        Error::Store(StoreError::Full(m)) => Described {
            internal: Some(m),
            retry_after: Some(STORAGE_FULL_RETRY_AFTER),
            ..plain(StatusCode::INSUFFICIENT_STORAGE, STORAGE_FULL.to_owned())
        },
        Error::Store(StoreError::Unavailable(m)) => Described {
            internal: Some(m),
            retry_after: Some(STORAGE_UNAVAILABLE_RETRY_AFTER),
            ..plain(StatusCode::SERVICE_UNAVAILABLE, "storage is unavailable; try again".to_owned())
        },
        other => Described {
            internal: Some(other.to_string()),
            ..plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_owned())
        },
    }
}

/// An error on the JSON API.
#[derive(Debug)]
pub enum ApiError {
    Core(Error),
    BadRequest(String),
    PayloadTooLarge(usize),
    /// 401 with a Bearer challenge.
    Unauthenticated {
        description: String,
        invalid_token: bool,
    },
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Unauthenticated(d) => ApiError::Unauthenticated { description: d, invalid_token: true },
            e => ApiError::Core(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Core(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let id = new_error_id();
        let mut internal = None;
        let mut retry_after = None;
        let mut challenge = None;
        let (status, public) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::PayloadTooLarge(max) => {
                (StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {max} bytes"))
            }
            ApiError::Unauthenticated { description, invalid_token } => {
                challenge = Some(if invalid_token {
                    format!(
                        "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                        description.replace('"', "'")
                    )
                } else {
                    "Bearer realm=\"portcullis\"".to_owned()
                });
                (StatusCode::UNAUTHORIZED, description)
            }
            ApiError::Core(e) => {
                if matches!(e, Error::Unauthenticated(_)) {
                    challenge = Some("Bearer realm=\"portcullis\", error=\"invalid_token\"".to_owned());
                }
                let d = describe(e);
                internal = d.internal;
                retry_after = d.retry_after;
                let public = if d.status == StatusCode::INTERNAL_SERVER_ERROR {
                    format!("internal error (error id {id})")
                } else {
                    d.public
                };
                (d.status, public)
            }
        };
        log(status, &id, &public, internal.as_deref());
        let body = serde_json::json!({ "error": status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "_"), "error_description": public, "error_id": id });
        let mut resp = (status, Json(body)).into_response();
        stamp(resp.headers_mut(), &public, &id);
        if let Some(c) = challenge {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header_text(&c));
        }
        if let Some(s) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// An error on an OAuth endpoint: RFC 6749 §5.2 JSON.
#[derive(Debug)]
pub struct OAuthApiError {
    pub err: OAuthError,
    /// The client tried HTTP Basic: a 401 must challenge with Basic (RFC 6749 §5.2).
    pub basic_challenge: bool,
    pub status: Option<StatusCode>,
}

impl From<OAuthError> for OAuthApiError {
    fn from(err: OAuthError) -> Self {
        Self { err, basic_challenge: false, status: None }
    }
}

impl OAuthApiError {
    /// A failure after the client tried (or should have tried) HTTP Basic: a 401 challenges
    /// with `Basic` (RFC 6749 §5.2).
    pub fn with_basic_challenge(err: OAuthError) -> Self {
        Self { err, basic_challenge: true, status: None }
    }
    pub fn too_large(max: usize) -> Self {
        Self {
            err: OAuthError::invalid_request(format!("request body is larger than {max} bytes")),
            basic_challenge: false,
            status: Some(StatusCode::PAYLOAD_TOO_LARGE),
        }
    }
}

impl IntoResponse for OAuthApiError {
    fn into_response(self) -> Response {
        let id = new_error_id();
        let status = self.status.unwrap_or(match self.err.code {
            OAuthErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            OAuthErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            OAuthErrorCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            OAuthErrorCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        });
        let description = if status == StatusCode::INTERNAL_SERVER_ERROR {
            format!("internal error (error id {id})")
        } else {
            self.err.description.clone()
        };
        log(status, &id, &format!("{}: {description}", self.err.code.as_str()), self.err.internal.as_deref());
        let body = serde_json::json!({ "error": self.err.code.as_str(), "error_description": description });
        let mut resp = (status, Json(body)).into_response();
        let h = resp.headers_mut();
        stamp(h, &format!("{}: {description}", self.err.code.as_str()), &id);
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if status == StatusCode::UNAUTHORIZED {
            let c = if self.basic_challenge {
                "Basic realm=\"portcullis\", charset=\"UTF-8\""
            } else {
                "Basic realm=\"portcullis\""
            };
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if let Some(s) = self.err.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Last line of defence: any error response produced outside our handlers (unknown route,
/// wrong method, a framework rejection) still gets `x-error` and `x-error-id`.
pub fn ensure_error_headers(resp: &mut Response) {
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !resp.headers().contains_key(&X_ERROR) {
        let id = new_error_id();
        let msg = match status {
            StatusCode::NOT_FOUND => "no such endpoint".to_owned(),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint".to_owned(),
            StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_owned(),
            s => s.canonical_reason().unwrap_or("error").to_owned(),
        };
        log(status, &id, &msg, None);
        stamp(resp.headers_mut(), &msg, &id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_conflicts_are_409s_that_reveal_nothing() {
        let r = ApiError::Core(Error::Store(StoreError::Conflict(
            "duplicate key value violates unique constraint \"x\"".into(),
        )))
        .into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let x = r.headers().get(&X_ERROR).unwrap().to_str().unwrap();
        assert!(!x.contains("constraint"), "{x}");
        let r = ApiError::Core(Error::Internal("secret detail".into())).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!r.headers().get(&X_ERROR).unwrap().to_str().unwrap().contains("secret"));
    }

    /// A full disk: 507 on the API, 503 `temporarily_unavailable` on OAuth endpoints, both
    /// saying `storage full` with a `Retry-After` and nothing of the driver's text.
    #[tokio::test]
    async fn a_full_disk_is_a_507_or_an_oauth_503_with_retry_after() {
        let full = || StoreError::Full("13: database or disk is full".into());
        let api = ApiError::Core(Error::Store(full())).into_response();
        let oauth = OAuthApiError::from(OAuthError::from(full())).into_response();
        for (r, status, prefix) in [
            (api, StatusCode::INSUFFICIENT_STORAGE, "storage full: "),
            (oauth, StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable: storage full: "),
        ] {
            assert_eq!(r.status(), status);
            let h = r.headers().clone();
            let x = h.get(&X_ERROR).unwrap().to_str().unwrap();
            assert!(x.starts_with(prefix), "{x}");
            assert!(h.contains_key(&X_ERROR_ID));
            assert_eq!(h.get(header::RETRY_AFTER).unwrap(), &STORAGE_FULL_RETRY_AFTER.to_string());
            let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert!(!body.contains("disk is full") && !x.contains("disk is full"), "{body}");
        }
        let down = ApiError::Core(Error::Store(StoreError::Unavailable("pool timed out".into()))).into_response();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.headers().get(header::RETRY_AFTER).unwrap(), "2");
        let oauth_down = OAuthApiError::from(OAuthError::from(StoreError::Unavailable("x".into()))).into_response();
        assert_eq!(oauth_down.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }
}
