//! People: admins update, disable, delete users and their roles; a signed-in user manages
//! their own addresses (add with an emailed code, verify, make primary, remove) and password
//! (change with the current one, or reset by emailed code). Disabling a user or changing a
//! password ends their sessions in the same transaction.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{CodeSubmission, Portcullis, Principal, RequestContext};
use crate::clock::UnixTime;
use crate::error::{Error, Result};
use crate::ids::{Email, RoleName, new_id};
use crate::mail::Message;
use crate::model::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    /// An admin sets a new password (the user's sessions end).
    #[serde(default)]
    pub password: Option<SecretString>,
}

impl std::fmt::Debug for UserPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPatch").field("name", &self.name).field("enabled", &self.enabled).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: SecretString,
    pub new_password: SecretString,
}

impl std::fmt::Debug for PasswordChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChange(..)")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub email: String,
    #[serde(default)]
    pub organisation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirmation {
    pub verification_id: String,
    pub code: SecretString,
    pub new_password: SecretString,
}

impl std::fmt::Debug for ResetConfirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetConfirmation").field("verification_id", &self.verification_id).finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize)]
pub struct EmailView {
    pub id: String,
    pub email: String,
    pub verified: bool,
    pub primary: bool,
    pub created_at: UnixTime,
}

pub fn email_views(user: &User, emails: &[UserEmail]) -> Vec<EmailView> {
    emails
        .iter()
        .map(|e| EmailView {
            id: e.id.clone(),
            email: e.email.to_string(),
            verified: e.verified_at.is_some(),
            primary: e.email == user.email,
            created_at: e.created_at,
        })
        .collect()
}

/// Changing a user (settings, password, roles, existence) is granting what they hold: only a
/// platform admin may change a user holding a platform-wide role, or an organisation admin of the
/// platform organisation could set a `portcullis:admin`'s password and sign in as them (the
/// same rule as for applications).
pub(crate) fn ensure_may_manage_user(who: &Principal, user: &User) -> Result<()> {
    if who.is_platform_admin() {
        return Ok(());
    }
    match user.roles.iter().find(|r| matches!(r.as_str(), super::ROLE_PLATFORM_ADMIN | super::ROLE_GATEWAY)) {
        Some(r) => Err(Error::Forbidden(format!("user {} holds {r}: only a platform admin may change them", user.id))),
        None => Ok(()),
    }
}

impl Portcullis {
    /// Users of an organisation, optionally filtered by a substring of email or name.
    pub async fn search_users(
        &self,
        who: &Principal,
        org_slug: &str,
        q: Option<&str>,
        page: Page,
    ) -> Result<Vec<User>> {
        let org = self.administered_org(who, org_slug).await?;
        match super::admin::search_text(q)? {
            Some(q) => Ok(self.store.search_users(&org.id, q, page).await?),
            None => Ok(self.store.users(&org.id, page).await?),
        }
    }

    pub async fn user_with_emails(&self, who: &Principal, org_slug: &str, id: &str) -> Result<(User, Vec<UserEmail>)> {
        let user = self.user(who, org_slug, id).await?;
        let emails = self.store.user_emails(&user.id).await?;
        Ok((user, emails))
    }

    /// Saves `user` (read at `before`), ending its sessions when asked, and drops what this
    /// node caches about it.
    async fn save_user(&self, user: &User, before: UnixTime, end_sessions: bool, ev: &AuditEvent) -> Result<()> {
        self.store.update_user(user, before, end_sessions, ev).await?;
        self.forget_user_credentials(&user.id);
        Ok(())
    }

    fn touched(&self, user: &User) -> UnixTime {
        // `updated_at` is the optimistic-concurrency token: it must change on every save.
        self.now().max(user.updated_at + 1)
    }

    pub async fn update_user(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        id: &str,
        patch: UserPatch,
    ) -> Result<User> {
        let mut user = self.user(who, org_slug, id).await?;
        ensure_may_manage_user(who, &user)?;
        let before = user.updated_at;
        let mut changed = Vec::new();
        if let Some(n) = &patch.name {
            user.name = Some(super::admin::check_name(n)?);
            changed.push("name");
        }
        let mut end_sessions = false;
        if let Some(e) = patch.enabled {
            if !e && user.id == who.subject {
                return Err(Error::Conflict("you cannot disable yourself".into()));
            }
            end_sessions |= !e;
            user.enabled = e;
            if e {
                user.failed_logins = 0;
                user.locked_until = None;
            }
            changed.push("enabled");
        }
        let password_set = patch.password.is_some();
        if let Some(p) = patch.password {
            user.password_hash = Some(self.hash_password_limited(p).await?);
            user.failed_logins = 0;
            user.locked_until = None;
            end_sessions = true;
            changed.push("password");
        }
        user.updated_at = self.touched(&user);
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&user.org_id),
            "user.update",
            &user.id,
            serde_json::json!({ "changed": changed, "enabled": user.enabled, "sessions_ended": end_sessions }),
        );
        if end_sessions {
            self.sign_out_everywhere(ctx, &who.subject, &user).await?;
        }
        self.save_user(&user, before, end_sessions, &ev).await?;
        if password_set {
            // The owner learns that someone else set their password.
            self.send_notice(&user.email, &Message::PasswordChanged).await;
        }
        Ok(user)
    }

    pub async fn delete_user(&self, who: &Principal, ctx: &RequestContext, org_slug: &str, id: &str) -> Result<()> {
        let user = self.user(who, org_slug, id).await?;
        ensure_may_manage_user(who, &user)?;
        if user.id == who.subject {
            return Err(Error::Conflict("you cannot delete yourself".into()));
        }
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&user.org_id),
            "user.delete",
            &user.id,
            serde_json::json!({ "email": user.email }),
        );
        if !self.store.delete_user(&user.org_id, &user.id, &ev).await? {
            return Err(Error::NotFound(format!("user {id:?}")));
        }
        self.forget_user_credentials(&user.id);
        Ok(())
    }

    /// Grants (`add`) or takes away a role; taking one away counts at once for the user's
    /// sessions and API keys on this node.
    pub async fn set_user_role(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        id: &str,
        role: &str,
        add: bool,
    ) -> Result<User> {
        let org = self.administered_org(who, org_slug).await?;
        let role = RoleName::parse(role)?;
        let mut user = self.user(who, org_slug, id).await?;
        ensure_may_manage_user(who, &user)?;
        let before = user.updated_at;
        if add {
            self.check_grantable(who, &org, std::slice::from_ref(&role), &[]).await?;
            if user.roles.contains(&role) {
                return Ok(user);
            }
            user.roles.push(role.clone());
            user.roles.sort();
        } else {
            if !user.roles.contains(&role) {
                return Err(Error::NotFound(format!("role {role} of user {id:?}")));
            }
            user.roles.retain(|r| r != &role);
        }
        user.updated_at = self.touched(&user);
        let action = if add { "user.role.grant" } else { "user.role.revoke" };
        let ev = self.audit(ctx, &who.subject, Some(&org.id), action, &user.id, serde_json::json!({ "role": role }));
        self.save_user(&user, before, false, &ev).await?;
        Ok(user)
    }

    // ---- self-service -----------------------------------------------------------------------

    async fn me_user(&self, who: &Principal) -> Result<User> {
        let user_id = who.ensure_user()?;
        let org = self.organisation_or_404(&who.org).await?;
        self.store.user(&org.id, user_id).await?.ok_or_else(|| Error::NotFound("user".into()))
    }

    pub async fn me(&self, who: &Principal) -> Result<(User, Vec<UserEmail>)> {
        let user = self.me_user(who).await?;
        let emails = self.store.user_emails(&user.id).await?;
        Ok((user, emails))
    }

    /// Adds an address and emails a code to it; returns the address and the verification id.
    pub async fn add_email(&self, ctx: &RequestContext, who: &Principal, email: &str) -> Result<(UserEmail, String)> {
        let user = self.me_user(who).await?;
        let email = Email::parse(email)?;
        self.count_mail_action(&user.id).await?;
        if self.store.user_emails(&user.id).await?.len() >= 10 {
            return Err(Error::Conflict("a user may have at most 10 addresses".into()));
        }
        let row = UserEmail {
            id: new_id(),
            user_id: user.id.clone(),
            org_id: user.org_id.clone(),
            email: email.clone(),
            verified_at: None,
            created_at: self.now(),
        };
        let code = super::auth::new_code()?;
        let v = self.new_verification(VerificationPurpose::Email, &user, &row.id, &code);
        let msg = Message::EmailCode { code: code.expose_secret(), minutes: self.code_minutes() };
        let mail = self.queued_mail(&email, &msg)?;
        let ev = self.audit(
            ctx,
            &user.id,
            Some(&user.org_id),
            "user.email.add",
            &row.id,
            serde_json::json!({ "email": email }),
        );
        self.store.add_user_email(&row, &v, &mail, &ev).await.map_err(|e| match e {
            crate::error::StoreError::Conflict(_) => Error::Conflict(format!("address {email} is already in use")),
            e => e.into(),
        })?;
        self.mail_queued(&email, &msg);
        Ok((row, v.id))
    }

    pub async fn verify_email(&self, ctx: &RequestContext, sub: CodeSubmission) -> Result<UserEmail> {
        let v = self.check_code(ctx, &sub, VerificationPurpose::Email).await?;
        self.consume(ctx, &v, VerificationEffect::VerifyEmail { email_id: v.subject_id.clone() }, "user.email.verify")
            .await?;
        self.store
            .user_emails(&v.user_id)
            .await?
            .into_iter()
            .find(|e| e.id == v.subject_id)
            .ok_or_else(|| Error::NotFound("address".into()))
    }

    /// Needs the current password (a stolen session alone must not move the account to
    /// another mailbox); the previous address is told.
    pub async fn make_primary_email(
        &self,
        ctx: &RequestContext,
        who: &Principal,
        email_id: &str,
        current_password: SecretString,
    ) -> Result<()> {
        let user = self.me_user(who).await?;
        self.count_attempt(ctx, Some(user.email.as_str())).await?;
        if !self.verify_password_limited(current_password, user.password_hash.clone()).await? {
            return Err(Error::Forbidden("the current password is wrong".into()));
        }
        let Some(target) = self.store.user_emails(&user.id).await?.into_iter().find(|e| e.id == email_id) else {
            return Err(Error::NotFound(format!("address {email_id:?}")));
        };
        let ev = self.audit(ctx, &user.id, Some(&user.org_id), "user.email.primary", email_id, serde_json::json!({}));
        if !self.store.set_primary_email(&user.id, email_id, self.touched(&user), &ev).await? {
            return Err(Error::Conflict("only a verified address of yours can become the primary one".into()));
        }
        self.forget_user_credentials(&user.id);
        // Reset codes already sent to the previous address stop working.
        self.store.cancel_verifications(&user.id, VerificationPurpose::PasswordReset, self.now()).await?;
        if target.email != user.email {
            self.send_notice(&user.email, &Message::PrimaryEmailChanged { new: target.email.as_str() }).await;
        }
        Ok(())
    }

    pub async fn remove_email(&self, ctx: &RequestContext, who: &Principal, email_id: &str) -> Result<()> {
        let user = self.me_user(who).await?;
        let ev = self.audit(ctx, &user.id, Some(&user.org_id), "user.email.remove", email_id, serde_json::json!({}));
        if !self.store.remove_user_email(&user.id, email_id, &ev).await? {
            return Err(Error::Conflict(
                "no such address, or it is the primary one (make another primary first)".into(),
            ));
        }
        Ok(())
    }

    /// Needs the current password; every session of the user ends, and the user is told.
    pub async fn change_password(&self, ctx: &RequestContext, who: &Principal, req: PasswordChange) -> Result<()> {
        let mut user = self.me_user(who).await?;
        crate::crypto::password::check_password_policy(&req.new_password)?;
        // Guessing the current password is guessing a password: same limits as a login.
        self.count_attempt(ctx, Some(user.email.as_str())).await?;
        if !self.verify_password_limited(req.current_password, user.password_hash.clone()).await? {
            let mut ev = self.audit(
                ctx,
                &user.id,
                Some(&user.org_id),
                "user.password.change",
                &user.id,
                serde_json::json!({ "reason": "wrong current password" }),
            );
            ev.outcome = "failure".to_owned();
            self.store.append_audit(&ev).await?;
            return Err(Error::Forbidden("the current password is wrong".into()));
        }
        let before = user.updated_at;
        user.password_hash = Some(self.hash_password_limited(req.new_password).await?);
        user.updated_at = self.touched(&user);
        let ev = self.audit(ctx, &user.id, Some(&user.org_id), "user.password.change", &user.id, serde_json::json!({}));
        self.save_user(&user, before, true, &ev).await?;
        self.send_notice(&user.email, &Message::PasswordChanged).await;
        Ok(())
    }

    /// Always answers with a verification id, whether or not the address has an account
    /// (no enumeration); only a real account gets a code.
    pub async fn request_password_reset(&self, ctx: &RequestContext, req: ResetRequest) -> Result<String> {
        let email = Email::parse(&req.email)?;
        self.count_attempt(ctx, Some(email.as_str())).await?;
        self.auth
            .reset_requests
            .fail(self.store.as_ref(), &[email.as_str()], self.now())
            .await
            .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })?;
        let Some(user) = self.login_candidate(&email, req.organisation.as_deref()).await?.filter(|u| u.enabled) else {
            self.audit_failed_authentication(ctx, email.as_str(), "user.password.reset", "unknown email").await;
            return Ok(new_id());
        };
        // Only the newest reset code works.
        self.store.cancel_verifications(&user.id, VerificationPurpose::PasswordReset, self.now()).await?;
        let code = super::auth::new_code()?;
        let v = self.new_verification(VerificationPurpose::PasswordReset, &user, &user.id, &code);
        let msg = Message::PasswordResetCode { code: code.expose_secret(), minutes: self.code_minutes() };
        let mail = self.queued_mail(&user.email, &msg)?;
        let ev = self.audit(
            ctx,
            &user.id,
            Some(&user.org_id),
            "user.password.reset",
            &user.id,
            serde_json::json!({ "verification_id": v.id }),
        );
        self.store.create_verification(&v, &mail, &ev).await?;
        self.mail_queued(&user.email, &msg);
        Ok(v.id)
    }

    pub async fn confirm_password_reset(&self, ctx: &RequestContext, req: ResetConfirmation) -> Result<()> {
        crate::crypto::password::check_password_policy(&req.new_password)?;
        let sub = CodeSubmission { verification_id: req.verification_id, code: req.code };
        let v = self.check_code(ctx, &sub, VerificationPurpose::PasswordReset).await?;
        let password_hash = self.hash_password_limited(req.new_password).await?;
        if let Some(user) = self.store.user(&v.org_id, &v.user_id).await? {
            self.sign_out_everywhere(ctx, &v.user_id, &user).await?;
        }
        self.consume(
            ctx,
            &v,
            VerificationEffect::ResetPassword { user_id: v.user_id.clone(), password_hash },
            "user.password.reset.confirm",
        )
        .await?;
        self.forget_user_credentials(&v.user_id);
        if let Some(user) = self.store.user(&v.org_id, &v.user_id).await? {
            self.send_notice(&user.email, &Message::PasswordChanged).await;
        }
        Ok(())
    }
}
