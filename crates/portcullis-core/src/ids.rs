//! Identifier newtypes and their forms (DESIGN §2). Each parser refuses ill-formed input with a
//! message that names the expected form, so the HTTP layer can return it as a 400 as-is.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The standard OpenID Connect scopes, allowed beside `service/capability` ones.
pub const STANDARD_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

fn is_slug(s: &str) -> bool {
    let b = s.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !b.is_empty() && b.len() <= 63 && b.iter().all(ok_char) && b.first() != Some(&b'-') && b.last() != Some(&b'-')
}

const SLUG_FORM: &str = "1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'";

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                $name::parse(&s)
            }
        }
        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                $name::parse(s)
            }
        }
    };
}

string_newtype!(
    /// An organisation, application or service slug.
    Slug
);
impl Slug {
    /// A slug the code itself names (e.g. the platform service); checked by a test.
    pub(crate) fn from_static(s: &'static str) -> Self {
        debug_assert!(is_slug(s), "{s} is not a slug");
        Self(s.to_owned())
    }
    pub fn parse(s: &str) -> Result<Self, Error> {
        if is_slug(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::invalid(format!("invalid slug {:?}: expected {SLUG_FORM}", truncate(s))))
        }
    }
}

string_newtype!(
    /// `org$app` (DESIGN §2).
    ClientId
);
impl ClientId {
    /// Whether `s` has the form, without allocating (the token path checks every request).
    pub fn is_valid(s: &str) -> bool {
        s.split_once('$').is_some_and(|(org, app)| is_slug(org) && is_slug(app))
    }
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.split_once('$') {
            Some((org, app)) if is_slug(org) && is_slug(app) => Ok(Self(s.to_owned())),
            _ => Err(Error::invalid(format!(
                "invalid client id {:?}: expected organisation$application, each {SLUG_FORM}",
                truncate(s)
            ))),
        }
    }
    pub fn new(org: &Slug, app: &Slug) -> Self {
        Self(format!("{}${}", org.as_str(), app.as_str()))
    }
    pub fn org(&self) -> &str {
        self.0.split_once('$').map(|(o, _)| o).unwrap_or_default()
    }
}

string_newtype!(
    /// `service:level`, e.g. `payments:admin`.
    RoleName
);
impl RoleName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            Some((svc, level)) if is_slug(svc) && is_slug(level) => Ok(Self(s.to_owned())),
            _ => Err(Error::invalid(format!(
                "invalid role {:?}: expected service:level (e.g. payments:admin), each part {SLUG_FORM}",
                truncate(s)
            ))),
        }
    }
    pub fn service(&self) -> &str {
        self.0.split_once(':').map(|(s, _)| s).unwrap_or_default()
    }
}

string_newtype!(
    /// `service/capability`, or one of the standard OIDC scopes.
    ScopeName
);
impl ScopeName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if STANDARD_SCOPES.contains(&s) {
            return Ok(Self(s.to_owned()));
        }
        match s.split_once('/') {
            Some((svc, cap)) if is_slug(svc) && is_slug(cap) => Ok(Self(s.to_owned())),
            _ => Err(Error::invalid(format!(
                "invalid scope {:?}: expected service/capability (e.g. payments/read) or one of {}",
                truncate(s),
                STANDARD_SCOPES.join(", ")
            ))),
        }
    }
    /// The owning service, or `None` for a standard OIDC scope.
    pub fn service(&self) -> Option<&str> {
        self.0.split_once('/').map(|(s, _)| s)
    }
}

string_newtype!(
    /// `service.resource.action`, e.g. `payments.invoice.read`.
    PermissionName
);
impl PermissionName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let mut parts = s.split('.');
        let ok = matches!(
            (parts.next(), parts.next(), parts.next(), parts.next()),
            (Some(a), Some(b), Some(c), None) if is_slug(a) && is_slug(b) && is_slug(c)
        );
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::invalid(format!(
                "invalid permission {:?}: expected service.resource.action (e.g. payments.invoice.read), each part {SLUG_FORM}",
                truncate(s)
            )))
        }
    }
    pub fn service(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }
}

string_newtype!(
    /// An email address, stored lower-cased. Deliberately simple: one `@`, no spaces, ≤ 254 bytes.
    Email
);
impl Email {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let ok = s.len() <= 254
            // No characters with a meaning in address headers: `x<ceo@acme.test>` must not be
            // stored as one address and delivered to another.
            && !s.chars().any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\"\\".contains(c))
            && matches!(s.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.contains('@') && !d.starts_with('.') && !d.ends_with('.'));
        if ok {
            Ok(Self(s.to_lowercase()))
        } else {
            Err(Error::invalid(format!("invalid email {:?}: expected local@domain.tld", truncate(s))))
        }
    }
}

/// Keeps error messages short when the input is huge.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A random, time-ordered identifier (UUIDv7), text in storage.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_enforced_with_named_expectations() {
        assert!(Slug::parse("acme").is_ok());
        assert!(Slug::parse("a-1").is_ok());
        for bad in ["", "-a", "a-", "Acme", "a_b", "a b", &"x".repeat(64)] {
            let e = Slug::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected"), "{e}");
        }
        assert_eq!(ClientId::parse("acme$billing").unwrap().org(), "acme");
        assert!(ClientId::parse("acme").unwrap_err().to_string().contains("organisation$application"));
        assert!(ClientId::parse("acme$bil$ling").is_err());
        assert_eq!(RoleName::parse("payments:admin").unwrap().service(), "payments");
        assert!(RoleName::parse("payments").unwrap_err().to_string().contains("service:level"));
        assert_eq!(ScopeName::parse("payments/read").unwrap().service(), Some("payments"));
        assert_eq!(ScopeName::parse("openid").unwrap().service(), None);
        assert!(ScopeName::parse("payments:read").unwrap_err().to_string().contains("service/capability"));
        assert!(PermissionName::parse("payments.invoice.read").is_ok());
        assert!(PermissionName::parse("payments.invoice").is_err());
        assert!(PermissionName::parse("payments.invoice.read.x").is_err());
        assert_eq!(Email::parse(" Ann@Example.COM ").unwrap().as_str(), "ann@example.com");
        assert!(Email::parse("ann@localhost").is_err());
        assert!(Email::parse("a b@example.com").is_err());
        for header_trick in ["x<ceo@acme.test>", "a@b.test,c@d.test", "\"a\"@b.test", "a@b.test;x", "(c)a@b.test"] {
            assert!(Email::parse(header_trick).is_err(), "{header_trick}");
        }
    }

    #[test]
    fn serde_refuses_bad_forms() {
        let ok: Result<RoleName, _> = serde_json::from_str("\"a:b\"");
        assert!(ok.is_ok());
        let bad: Result<RoleName, _> = serde_json::from_str("\"ab\"");
        assert!(bad.unwrap_err().to_string().contains("service:level"));
    }
}
