//! Email: the [`Mailer`] port (adapters: SMTP and the local outbox, in the binary), the
//! messages Portcullis sends with their text and HTML templates, and the delivery loop that
//! drains the persistent queue with backoff. A message is queued in the same transaction as
//! the verification it carries, so a code is never created without its mail, and mail that
//! cannot be delivered stays queued (sealed) and is retried, never dropped.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::UnixTime;

/// One message to deliver. `Debug` omits the bodies (they may hold a code).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMail {
    /// Unique; adapters use it for the `Message-ID`.
    pub id: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl std::fmt::Debug for OutgoingMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingMail")
            .field("id", &self.id)
            .field("to", &self.to)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A failed delivery. `permanent` failures (the server refused the address) are still kept,
/// but retried less eagerly; the message text goes to the log and the queue row.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct MailError {
    pub permanent: bool,
    pub message: String,
}

#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError>;
    /// True for the local outbox (no SMTP configured): verification codes are then also
    /// logged, so a first run works without a mail server.
    fn is_local(&self) -> bool {
        false
    }
}

/// Keeps every message in memory; for tests.
#[derive(Debug, Default)]
pub struct MemoryMailer {
    sent: std::sync::Mutex<Vec<OutgoingMail>>,
}

impl MemoryMailer {
    pub fn sent(&self) -> Vec<OutgoingMail> {
        self.sent.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl Mailer for MemoryMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        if let Ok(mut v) = self.sent.lock() {
            v.push(mail.clone());
        }
        Ok(())
    }
}

/// What Portcullis writes to people.
#[derive(Clone)]
pub enum Message<'a> {
    LoginCode {
        code: &'a str,
        ip: Option<&'a str>,
        minutes: i64,
    },
    ApiKeyCode {
        code: &'a str,
        key_name: &'a str,
        minutes: i64,
    },
    EmailCode {
        code: &'a str,
        minutes: i64,
    },
    PasswordResetCode {
        code: &'a str,
        minutes: i64,
    },
    AccountLocked {
        until: UnixTime,
        failures: u32,
    },
    PasswordChanged,
    /// An invitation (or self-registration) link: set a password, verify the address.
    Invitation {
        link: &'a str,
        org_name: &'a str,
        days: i64,
    },
    /// Sent to the previous primary address.
    PrimaryEmailChanged {
        new: &'a str,
    },
    /// Sent to the organisation's admins.
    CertificateExpiring {
        client_id: &'a str,
        cert_type: &'a str,
        serial: &'a str,
        not_after: UnixTime,
    },
    /// Sent to the organisation's admins.
    CertificateRevoked {
        client_id: &'a str,
        cert_type: &'a str,
        serial: &'a str,
        reason: &'a str,
        by: &'a str,
    },
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// The subject, text body and HTML body of a message.
pub struct Rendered {
    pub subject: String,
    pub text: Zeroizing<String>,
    pub html: Zeroizing<String>,
}

impl Message<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LoginCode { .. } => "login_code",
            Self::ApiKeyCode { .. } => "api_key_code",
            Self::EmailCode { .. } => "email_code",
            Self::PasswordResetCode { .. } => "password_reset_code",
            Self::AccountLocked { .. } => "account_locked",
            Self::PasswordChanged => "password_changed",
            Self::Invitation { .. } => "invitation",
            Self::PrimaryEmailChanged { .. } => "primary_email_changed",
            Self::CertificateExpiring { .. } => "certificate_expiring",
            Self::CertificateRevoked { .. } => "certificate_revoked",
        }
    }

    /// The code this message carries, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::LoginCode { code, .. }
            | Self::ApiKeyCode { code, .. }
            | Self::EmailCode { code, .. }
            | Self::PasswordResetCode { code, .. }
            | Self::Invitation { link: code, .. } => Some(code),
            Self::AccountLocked { .. }
            | Self::PasswordChanged
            | Self::PrimaryEmailChanged { .. }
            | Self::CertificateExpiring { .. }
            | Self::CertificateRevoked { .. } => None,
        }
    }

    pub fn render(&self) -> Rendered {
        let not_you = "If this was not you, ignore this message; nobody can use the code without your password.";
        let (subject, lead, code, tail): (String, String, Option<&str>, String) = match self {
            Self::LoginCode { code, ip, minutes } => (
                "Your Portcullis sign-in code".to_owned(),
                format!(
                    "Someone{} signed in to Portcullis with your email address and password. Enter this code to finish signing in:",
                    ip.map(|i| format!(" at {i}")).unwrap_or_default()
                ),
                Some(code),
                format!("The code expires in {minutes} minutes and works once. {not_you}"),
            ),
            Self::ApiKeyCode { code, key_name, minutes } => (
                "Confirm your new Portcullis API key".to_owned(),
                format!(
                    "An API key named \u{201c}{key_name}\u{201d} was created for your account. Enter this code to activate it:"
                ),
                Some(code),
                format!(
                    "The code expires in {minutes} minutes. If you did not create this key, revoke it and change your password."
                ),
            ),
            Self::EmailCode { code, minutes } => (
                "Confirm your email address".to_owned(),
                "This address was added to a Portcullis account. Enter this code to confirm it:".to_owned(),
                Some(code),
                format!("The code expires in {minutes} minutes. If you did not add this address, ignore this message."),
            ),
            Self::PasswordResetCode { code, minutes } => (
                "Reset your Portcullis password".to_owned(),
                "A password reset was requested for your account. Enter this code with your new password:".to_owned(),
                Some(code),
                format!(
                    "The code expires in {minutes} minutes and works once. If you did not ask for a reset, ignore this message: your password is unchanged."
                ),
            ),
            Self::Invitation { link, org_name, days } => (
                format!("You are invited to {org_name} on Portcullis"),
                format!("You have an account at {org_name}. Open this link to set your password (it also confirms this address):"),
                Some(link),
                format!("The link works once and expires in {days} days. If you did not expect this, ignore this message."),
            ),
            Self::AccountLocked { until, failures } => (
                "Your Portcullis account is locked for a while".to_owned(),
                format!(
                    "After {failures} failed sign-in attempts your account is locked until {} (UTC). Sign-in attempts are refused until then, even with the right password.",
                    crate::clock::rfc3339(*until)
                ),
                None,
                "If these attempts were not yours, consider changing your password once the lock ends.".to_owned(),
            ),
            Self::PasswordChanged => (
                "Your Portcullis password was changed".to_owned(),
                "The password of your account was changed and every session was signed out (after a reset, every API key was revoked too).".to_owned(),
                None,
                "If you did not do this, reset your password now and contact your administrator.".to_owned(),
            ),
            Self::PrimaryEmailChanged { new } => (
                "Your Portcullis sign-in address was changed".to_owned(),
                format!("Your account now signs in and receives its codes at {new}; this address no longer does."),
                None,
                "If you did not do this, contact your administrator now: someone may have taken over your account.".to_owned(),
            ),
            Self::CertificateExpiring { client_id, cert_type, serial, not_after } => (
                format!(
                    "Certificate of {client_id} expires on {}",
                    crate::clock::rfc3339(*not_after).get(..10).unwrap_or_default()
                ),
                format!(
                    "The {cert_type} certificate of application {client_id} (serial {serial}) expires at {} (UTC).",
                    crate::clock::rfc3339(*not_after)
                ),
                None,
                "Renew it before then (portal, `portcullis cert renew`, or POST …/certificates/{id}/renew); after that date it is refused.".to_owned(),
            ),
            Self::CertificateRevoked { client_id, cert_type, serial, reason, by } => (
                format!("Certificate of {client_id} was revoked"),
                format!(
                    "The {cert_type} certificate of application {client_id} (serial {serial}) was revoked by {by} (reason: {reason}). It is on the CRL and refused from now on."
                ),
                None,
                "If this was not expected, check the audit log and issue a new certificate for the application.".to_owned(),
            ),
        };
        let text = match code {
            Some(c) => format!("{lead}\n\n    {c}\n\n{tail}\n\n-- \nPortcullis\n"),
            None => format!("{lead}\n\n{tail}\n\n-- \nPortcullis\n"),
        };
        let code_html = code
            .map(|c| {
                format!(
                    "<p style=\"font-size:28px;letter-spacing:6px;font-family:monospace;font-weight:bold\">{}</p>",
                    html_escape(c)
                )
            })
            .unwrap_or_default();
        let html = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n<body style=\"font-family:sans-serif\">\n<p>{}</p>\n{}<p>{}</p>\n<p style=\"color:#666\">Portcullis</p>\n</body></html>\n",
            html_escape(&subject),
            html_escape(&lead),
            code_html,
            html_escape(&tail)
        );
        Rendered { subject, text: Zeroizing::new(text), html: Zeroizing::new(html) }
    }
}

pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds to wait before retry number `attempts` (1-based): 10 s, 30 s, 1 min, 5 min, 15 min,
/// then hourly. Permanent refusals wait at least an hour.
pub fn retry_delay(attempts: u32, permanent: bool) -> i64 {
    let d = match attempts {
        0 | 1 => 10,
        2 => 30,
        3 => 60,
        4 => 300,
        5 => 900,
        _ => 3600,
    };
    if permanent { d.max(3600) } else { d }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_has_text_and_html_and_escapes() {
        let all = [
            Message::LoginCode { code: "123456", ip: Some("10.0.0.1"), minutes: 10 },
            Message::ApiKeyCode { code: "654321", key_name: "<script>", minutes: 10 },
            Message::EmailCode { code: "111111", minutes: 10 },
            Message::PasswordResetCode { code: "222222", minutes: 10 },
            Message::AccountLocked { until: 1_800_000_000, failures: 10 },
            Message::PasswordChanged,
            Message::PrimaryEmailChanged { new: "new@example.test" },
        ];
        for m in all {
            let r = m.render();
            assert!(!r.subject.is_empty());
            if let Some(c) = m.code() {
                assert!(r.text.contains(c) && r.html.contains(c), "{m:?}");
                // The subject is stored in clear in the mail queue: never a code.
                assert!(!r.subject.contains(c), "{m:?}");
            }
            assert!(r.html.starts_with("<!DOCTYPE html>"));
            assert!(!r.html.contains("<script>"), "names are escaped");
        }
        assert!(Message::AccountLocked { until: 1_800_000_000, failures: 3 }.render().text.contains("2027-01-15"));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(retry_delay(1, false), 10);
        assert!(retry_delay(5, false) > retry_delay(4, false));
        assert_eq!(retry_delay(50, false), 3600);
        assert_eq!(retry_delay(1, true), 3600);
    }
}
