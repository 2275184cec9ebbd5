//! SOAP faults for refusals on `soap` routes (DESIGN §4 and §5, issue 6 item 6).
//!
//! The error contract is unchanged on these routes: the status is the gateway's (401, 403, 413,
//! 502, …) and `x-error`/`x-error-id` are set as everywhere; only the body becomes a SOAP Fault
//! of the version the request used, so a SOAP client's stack can parse it.

use http::header::{self, HeaderMap};

/// The SOAP 1.1 envelope namespace.
pub const SOAP11_ENVELOPE_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The SOAP 1.2 envelope namespace.
pub const SOAP12_ENVELOPE_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
/// The namespace of the fault detail entry that carries the error id.
pub const DETAIL_NS: &str = "urn:portcullis:gateway";

/// How much of the body [`SoapVersion::detect`] looks at.
pub const SNIFF_LEN: usize = 1024;

/// SOAP 1.1 or 1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoapVersion {
    V11,
    V12,
}

impl SoapVersion {
    /// The content type of a message of this version.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::V11 => "text/xml; charset=utf-8",
            Self::V12 => "application/soap+xml; charset=utf-8",
        }
    }

    /// The version of the request, from (in this order):
    ///
    /// 1. the media type of `Content-Type`: `application/soap+xml` is 1.2, `text/xml` is 1.1
    ///    (SOAP 1.2 never uses `text/xml`), parameters and case ignored;
    /// 2. the envelope namespace in the first [`SNIFF_LEN`] bytes of `body_prefix` (whichever of
    ///    the two namespaces comes first);
    /// 3. a `SOAPAction` header, which only SOAP 1.1 has: 1.1.
    ///
    /// `None` when nothing tells; the caller then uses 1.1, the more common one. Refusals made
    /// before the body is read pass an empty `body_prefix`.
    pub fn detect(headers: &HeaderMap, body_prefix: &[u8]) -> Option<Self> {
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim);
        if let Some(media_type) = media_type {
            if media_type.eq_ignore_ascii_case("application/soap+xml") {
                return Some(Self::V12);
            }
            if media_type.eq_ignore_ascii_case("text/xml") {
                return Some(Self::V11);
            }
        }
        let sniffed = body_prefix.get(..SNIFF_LEN).unwrap_or(body_prefix);
        match (find(sniffed, SOAP11_ENVELOPE_NS.as_bytes()), find(sniffed, SOAP12_ENVELOPE_NS.as_bytes())) {
            (Some(v11), Some(v12)) => return Some(if v11 < v12 { Self::V11 } else { Self::V12 }),
            (Some(_), None) => return Some(Self::V11),
            (None, Some(_)) => return Some(Self::V12),
            (None, None) => {}
        }
        headers.contains_key("soapaction").then_some(Self::V11)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whose fault it is: `Client` is SOAP 1.1 `soap:Client` and 1.2 `soap:Sender`; `Server` is 1.1
/// `soap:Server` and 1.2 `soap:Receiver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Client,
    Server,
}

impl FaultKind {
    /// `Server` for 5xx statuses (upstream failures, internal errors), `Client` otherwise.
    pub fn for_status(status: http::StatusCode) -> Self {
        if status.is_server_error() { Self::Server } else { Self::Client }
    }
}

/// Escapes text for XML content and attribute values: `& < > " '` as entities; control
/// characters (C0 including tab and newlines, DEL, C1) and the non-characters U+FFFE/U+FFFF are
/// removed (most are not allowed in XML 1.0 at all).
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// A SOAP Fault for a refusal: returns the content type to send and the body.
///
/// * 1.1: `soap:Envelope/soap:Body/soap:Fault` with `faultcode` `soap:Client` or `soap:Server`,
///   `faultstring` = `reason`, and `detail` holding `<pc:errorId>` (namespace [`DETAIL_NS`]);
///   content type `text/xml; charset=utf-8`.
/// * 1.2: `soap:Fault` with `soap:Code/soap:Value` `soap:Sender` or `soap:Receiver`,
///   `soap:Reason/soap:Text xml:lang="en"` = `reason`, and `soap:Detail` holding the same error id
///   element; content type `application/soap+xml; charset=utf-8`.
///
/// `reason` and `error_id` are XML-escaped ([`xml_escape`]).
pub fn fault(version: SoapVersion, kind: FaultKind, reason: &str, error_id: &str) -> (&'static str, String) {
    let reason = xml_escape(reason);
    let error_id = xml_escape(error_id);
    let detail = format!(r#"<pc:errorId xmlns:pc="{DETAIL_NS}">{error_id}</pc:errorId>"#);
    let body = match version {
        SoapVersion::V11 => {
            let code = match kind {
                FaultKind::Client => "soap:Client",
                FaultKind::Server => "soap:Server",
            };
            format!(
                concat!(
                    r#"<?xml version="1.0" encoding="utf-8"?>"#,
                    r#"<soap:Envelope xmlns:soap="{ns}">"#,
                    "<soap:Body><soap:Fault>",
                    "<faultcode>{code}</faultcode>",
                    "<faultstring>{reason}</faultstring>",
                    "<detail>{detail}</detail>",
                    "</soap:Fault></soap:Body></soap:Envelope>\n",
                ),
                ns = SOAP11_ENVELOPE_NS,
                code = code,
                reason = reason,
                detail = detail,
            )
        }
        SoapVersion::V12 => {
            let code = match kind {
                FaultKind::Client => "soap:Sender",
                FaultKind::Server => "soap:Receiver",
            };
            format!(
                concat!(
                    r#"<?xml version="1.0" encoding="utf-8"?>"#,
                    r#"<soap:Envelope xmlns:soap="{ns}">"#,
                    "<soap:Body><soap:Fault>",
                    "<soap:Code><soap:Value>{code}</soap:Value></soap:Code>",
                    r#"<soap:Reason><soap:Text xml:lang="en">{reason}</soap:Text></soap:Reason>"#,
                    "<soap:Detail>{detail}</soap:Detail>",
                    "</soap:Fault></soap:Body></soap:Envelope>\n",
                ),
                ns = SOAP12_ENVELOPE_NS,
                code = code,
                reason = reason,
                detail = detail,
            )
        }
    };
    (version.content_type(), body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use http::HeaderValue;
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    use quick_xml::reader::NsReader;

    /// Parses the whole document with namespace resolution (every prefix must be bound, every
    /// end tag must match) and returns `(namespace, local name, text)` for each element, the text
    /// with entity references resolved.
    fn parse(xml: &str) -> Vec<(String, String, String)> {
        let mut reader = NsReader::from_str(xml);
        let mut stack: Vec<(String, String, String)> = Vec::new();
        let mut done = Vec::new();
        let mut roots = 0;
        loop {
            let (ns, event) = reader.read_resolved_event().unwrap();
            let ns = match ns {
                ResolveResult::Bound(n) => String::from_utf8(n.as_ref().to_vec()).unwrap(),
                ResolveResult::Unbound => String::new(),
                ResolveResult::Unknown(p) => panic!("unbound prefix {p:?}"),
            };
            match event {
                Event::Start(e) => {
                    if stack.is_empty() {
                        roots += 1;
                    }
                    for attr in e.attributes() {
                        attr.unwrap();
                    }
                    let local = String::from_utf8(e.local_name().as_ref().to_vec()).unwrap();
                    stack.push((ns, local, String::new()));
                }
                Event::End(_) => done.push(stack.pop().unwrap()),
                Event::Empty(_) => panic!("no empty elements expected"),
                Event::Text(t) => {
                    let text = t.decode().unwrap();
                    if let Some(top) = stack.last_mut() {
                        top.2.push_str(&text);
                    } else {
                        assert!(text.trim().is_empty(), "text outside the root: {text:?}");
                    }
                }
                Event::GeneralRef(r) => {
                    let name = r.decode().unwrap();
                    let c = match name.as_ref() {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        other => panic!("unexpected entity {other}"),
                    };
                    stack.last_mut().unwrap().2.push(c);
                }
                Event::Decl(_) | Event::Comment(_) => {}
                Event::Eof => break,
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert!(stack.is_empty());
        assert_eq!(roots, 1);
        done
    }

    fn element<'a>(doc: &'a [(String, String, String)], ns: &str, local: &str) -> &'a str {
        &doc.iter().find(|(n, l, _)| n == ns && l == local).unwrap_or_else(|| panic!("no {local}")).2
    }

    const NASTY: &str = "bad <token> & \"quotes\" 'single' ]]> \u{0}\u{7}\r\n\t\u{7f}\u{85}\u{fffe} é ✓";
    const NASTY_ESCAPED_TEXT: &str = "bad <token> & \"quotes\" 'single' ]]>  é ✓";

    #[test]
    fn soap11_fault_parses_and_carries_reason_and_id() {
        for (kind, code) in [(FaultKind::Client, "soap:Client"), (FaultKind::Server, "soap:Server")] {
            let (ct, body) = fault(SoapVersion::V11, kind, NASTY, "err-<1>&\"2\"");
            assert_eq!(ct, "text/xml; charset=utf-8");
            let doc = parse(&body);
            assert!(doc.iter().any(|(n, l, _)| n == SOAP11_ENVELOPE_NS && l == "Envelope"));
            assert!(doc.iter().any(|(n, l, _)| n == SOAP11_ENVELOPE_NS && l == "Body"));
            assert!(doc.iter().any(|(n, l, _)| n == SOAP11_ENVELOPE_NS && l == "Fault"));
            assert_eq!(element(&doc, "", "faultcode"), code);
            assert_eq!(element(&doc, "", "faultstring"), NASTY_ESCAPED_TEXT);
            assert_eq!(element(&doc, DETAIL_NS, "errorId"), "err-<1>&\"2\"");
            assert!(doc.iter().any(|(n, l, _)| n.is_empty() && l == "detail"));
            assert!(body.contains("&lt;token&gt; &amp; &quot;quotes&quot; &apos;single&apos; ]]&gt;"));
        }
    }

    #[test]
    fn soap12_fault_parses_and_carries_reason_and_id() {
        for (kind, code) in [(FaultKind::Client, "soap:Sender"), (FaultKind::Server, "soap:Receiver")] {
            let (ct, body) = fault(SoapVersion::V12, kind, NASTY, "01J0ABCDEF");
            assert_eq!(ct, "application/soap+xml; charset=utf-8");
            let doc = parse(&body);
            let ns = SOAP12_ENVELOPE_NS;
            for local in ["Envelope", "Body", "Fault", "Code", "Reason", "Detail"] {
                assert!(doc.iter().any(|(n, l, _)| n == ns && l == local), "{local}");
            }
            assert_eq!(element(&doc, ns, "Value"), code);
            assert_eq!(element(&doc, ns, "Text"), NASTY_ESCAPED_TEXT);
            assert_eq!(element(&doc, DETAIL_NS, "errorId"), "01J0ABCDEF");
            assert!(body.contains(r#"<soap:Text xml:lang="en">"#));
            assert!(!body.contains(SOAP11_ENVELOPE_NS));
        }
    }

    #[test]
    fn reason_cannot_inject_markup() {
        let evil = "</faultstring><faultcode>soap:Server</faultcode><!--";
        for version in [SoapVersion::V11, SoapVersion::V12] {
            let (_, body) = fault(version, FaultKind::Client, evil, "</pc:errorId>");
            let doc = parse(&body);
            assert!(doc.iter().filter(|(_, l, _)| l == "faultcode").count() <= 1);
            assert_eq!(element(&doc, DETAIL_NS, "errorId"), "</pc:errorId>");
        }
    }

    #[test]
    fn xml_escape_table() {
        assert_eq!(xml_escape("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(xml_escape("x\u{0}\u{1b}[31m\u{9f}y"), "x[31my");
        assert_eq!(xml_escape("日本"), "日本");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const ENV11: &[u8] =
        b"<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body/></s:Envelope>";
    const ENV12: &[u8] =
        b"<env:Envelope xmlns:env=\"http://www.w3.org/2003/05/soap-envelope\"><env:Body/></env:Envelope>";

    #[test]
    fn version_from_content_type() {
        use SoapVersion::*;
        let cases = [
            (vec![("content-type", "text/xml; charset=utf-8"), ("soapaction", "\"urn:x\"")], V11),
            (vec![("content-type", "TEXT/XML")], V11),
            (vec![("content-type", "application/soap+xml; charset=utf-8; action=\"urn:x\"")], V12),
            (vec![("content-type", " Application/SOAP+XML ")], V12),
        ];
        for (pairs, want) in cases {
            // The content type wins over the body.
            assert_eq!(SoapVersion::detect(&headers(&pairs), ENV12), Some(want), "{pairs:?}");
            assert_eq!(SoapVersion::detect(&headers(&pairs), ENV11), Some(want), "{pairs:?}");
        }
    }

    #[test]
    fn version_sniffed_from_body() {
        let other = headers(&[("content-type", "application/xml")]);
        assert_eq!(SoapVersion::detect(&other, ENV11), Some(SoapVersion::V11));
        assert_eq!(SoapVersion::detect(&other, ENV12), Some(SoapVersion::V12));
        assert_eq!(SoapVersion::detect(&HeaderMap::new(), ENV12), Some(SoapVersion::V12));
        // The first namespace decides.
        let mut both = ENV12.to_vec();
        both.extend_from_slice(SOAP11_ENVELOPE_NS.as_bytes());
        assert_eq!(SoapVersion::detect(&other, &both), Some(SoapVersion::V12));
        // Only the first KiB is looked at.
        let mut late = vec![b' '; SNIFF_LEN];
        late.extend_from_slice(ENV12);
        assert_eq!(SoapVersion::detect(&other, &late), None);
        // SOAPAction alone means 1.1; nothing at all means unknown.
        let action = headers(&[("SOAPAction", "\"\"")]);
        assert_eq!(SoapVersion::detect(&action, b""), Some(SoapVersion::V11));
        assert_eq!(SoapVersion::detect(&action, ENV12), Some(SoapVersion::V12));
        assert_eq!(SoapVersion::detect(&HeaderMap::new(), b"{\"json\":1}"), None);
        assert_eq!(SoapVersion::detect(&HeaderMap::new(), b""), None);
    }

    #[test]
    fn fault_kind_for_status() {
        assert_eq!(FaultKind::for_status(http::StatusCode::UNAUTHORIZED), FaultKind::Client);
        assert_eq!(FaultKind::for_status(http::StatusCode::PAYLOAD_TOO_LARGE), FaultKind::Client);
        assert_eq!(FaultKind::for_status(http::StatusCode::BAD_GATEWAY), FaultKind::Server);
    }
}
