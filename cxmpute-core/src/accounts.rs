//! A user's own account and a provider's own account.
//!
//! [`Accounts`] is a cheap view over a [`Broker`] (`broker.accounts()`): what
//! a signed-in user does with their account (see it, make, change and revoke
//! their API keys, read their usage and the notifications shown to them) and
//! what a provider does with its own (its summary, key rotation, earnings).
//! The HTTP routes in `http::account` and `http::provider_account` are thin
//! wrappers around it. Who is calling is told by [`crate::sessions`];
//! administration is [`crate::admin`].
//!
//! Every API key, whoever makes it (the user, an admin, the host for its
//! admin), is made by one path here, so the same rules hold for all: its
//! fields ([`AuthConfig::max_keys_per_user`] active keys at most, a name,
//! no negative limit).

use std::collections::BTreeMap;

use crate::analytics::{per_day, DateRange};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::secret::Secret;
#[cfg(doc)]
use crate::sessions::AuthConfig;
use crate::stats::scope;
use crate::types::*;
use crate::wire::*;

/// Longest key name accepted.
const MAX_NAME_LEN: usize = 100;
/// Days of history in a provider's earnings.
const EARNINGS_DAYS: i32 = 30;
/// The highest requests-per-minute limit a key may be given (a bound, so
/// counters and the store's numbers never come near overflowing).
const MAX_RPM: u64 = 100_000_000;
/// The highest tokens-per-minute limit a key may be given.
const MAX_TPM: u64 = 1_000_000_000_000_000;

/// A user's and a provider's own account over a [`Broker`]. Get one with
/// [`Broker::accounts`].
#[derive(Clone, Debug)]
pub struct Accounts {
    broker: Broker,
}

impl Broker {
    /// A user's own account and keys, a provider's own account.
    pub fn accounts(&self) -> Accounts {
        Accounts {
            broker: self.clone(),
        }
    }
}

/// Lower-cases and checks an email. Control characters (header injection
/// into the sign-in mail) and whitespace are refused.
pub(crate) fn normalize_email(email: &str) -> Result<String> {
    let e = email.trim().to_lowercase();
    let valid = !e.is_empty()
        && e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty()
                && d.contains('.')
                && !d.starts_with('.')
                && !d.ends_with('.')
                && !d.contains('@')
        })
        && !e
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'));
    if !valid {
        return Err(Error::InvalidInput(
            "`email` is not an email address".into(),
        ));
    }
    Ok(e)
}

/// Refuses limits a key or an account may not have (see [`check_rate_limit`]).
pub(crate) fn check_rate_limits(l: &RateLimits) -> Result<()> {
    check_rate_limit("rpm", l.rpm.map(u64::from), MAX_RPM)?;
    check_rate_limit("tpm", l.tpm, MAX_TPM)
}

/// Refuses a rate limit of 0 (`null` removes a limit) or above `max`.
fn check_rate_limit(what: &str, v: Option<u64>, max: u64) -> Result<()> {
    match v {
        Some(0) => Err(Error::InvalidInput(format!(
            "`{what}` must be at least 1 (null removes the limit)"
        ))),
        Some(v) if v > max => Err(Error::InvalidInput(format!(
            "`{what}` must be at most {max}"
        ))),
        _ => Ok(()),
    }
}

/// Refuses text longer than `max` bytes.
pub(crate) fn check_len(what: &str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(Error::InvalidInput(format!(
            "`{what}` is longer than {max} bytes"
        )));
    }
    Ok(())
}

/// Refuses text longer than `max` bytes or holding control characters
/// other than newlines.
pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    check_len(what, s, max)?;
    if s.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::InvalidInput(format!(
            "`{what}` contains control characters"
        )));
    }
    Ok(())
}

/// The provider id that belongs to a user: derived from the user id, so two
/// racing first sign-ins collide on the provider's id (create-if-absent)
/// instead of creating two providers.
fn provider_id_for(user: &UserId) -> ProviderId {
    let tail = user
        .as_str()
        .strip_prefix(UserId::PREFIX)
        .unwrap_or(user.as_str());
    ProviderId::new(format!("{}{tail}", ProviderId::PREFIX))
}

fn forbidden_if_suspended(s: &Option<Suspension>, what: &str) -> Result<()> {
    match s {
        Some(s) => Err(Error::Forbidden(format!(
            "{what} is suspended: {}",
            s.reason
        ))),
        None => Ok(()),
    }
}

impl Accounts {
    fn store(&self) -> &dyn crate::store::Store {
        self.broker.store().as_ref()
    }

    fn now(&self) -> Timestamp {
        self.broker.now()
    }

    // ---- creating accounts and keys ----------------------------------------------

    /// The user for `email`, created with its provider account if absent.
    /// Safe against concurrent sign-ins: one row of each, whoever wins.
    pub async fn ensure_account(&self, email: &str) -> Result<User> {
        let email = normalize_email(email)?;
        let (mut user, created) = self.user_for_email(email, false).await?;
        if created {
            let credits = self.broker.config().auth.signup_credits;
            if credits > Credits::ZERO {
                user.credits = (self.broker.admin())
                    .grant_credits(&user.id, credits, "system", "sign-up credits")
                    .await?;
            }
            tracing::info!(user = %user.id, "account created");
        }
        self.ensure_provider(&user).await?;
        Ok(user)
    }

    /// The provider account of a user, created if absent (its key is never
    /// shown: the owner rotates it to get one).
    async fn ensure_provider(&self, user: &User) -> Result<Provider> {
        match self.store().provider_by_user(&user.id).await {
            Ok(p) => return Ok(p),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let p = Provider {
            id: provider_id_for(&user.id),
            user_id: Some(user.id.clone()),
            email: user.email.clone(),
            key_hash: Secret::generate_provider_key().hash(),
            earnings: Credits::ZERO,
            suspended: None,
            created_at: self.now(),
        };
        match self.store().create_provider(&p).await {
            Ok(()) => Ok(p),
            Err(Error::AlreadyExists(_)) => self.store().provider(&p.id).await,
            Err(e) => Err(e),
        }
    }

    /// The user with (normalised) `email`, created with `is_admin` and no
    /// credits if absent; `true` when this call created it. Safe against
    /// concurrent callers: one user, whoever wins, and the losers read it.
    pub(crate) async fn user_for_email(
        &self,
        email: String,
        is_admin: bool,
    ) -> Result<(User, bool)> {
        match self.store().user_by_email(&email).await {
            Ok(u) => return Ok((u, false)),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let u = User {
            id: UserId::generate(),
            email,
            credits: Credits::ZERO,
            is_admin,
            suspended: None,
            created_at: self.now(),
            budget: None,
            alerts: Default::default(),
            alerted: Default::default(),
        };
        match self.store().create_user(&u).await {
            Ok(()) => Ok((u, true)),
            // Another caller (or host) created it first.
            Err(Error::AlreadyExists(_)) => {
                Ok((self.store().user_by_email(&u.email).await?, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes an API key for `user` with `secret`: the one path every key is
    /// made by (a user's own, an admin's, the host's for its admin), so each
    /// is held to the same rules: the fields' ([`Accounts::check_key_fields`])
    /// and at most [`AuthConfig::max_keys_per_user`] active keys per user.
    pub(crate) async fn new_key(
        &self,
        user: &UserId,
        name: &str,
        credit_limit: Option<Credits>,
        permitted_routes: Vec<Route>,
        secret: Secret,
    ) -> Result<(ApiKey, Secret)> {
        let name = name.trim();
        Self::check_key_fields(Some(name), credit_limit, Some(&permitted_routes))?;
        let mut permitted_routes = permitted_routes;
        permitted_routes.sort();
        permitted_routes.dedup();
        let max = self.broker.config().auth.max_keys_per_user;
        let keys = self.store().api_keys(user).await?;
        if keys.iter().filter(|k| k.revoked_at.is_none()).count() >= max {
            return Err(Error::Conflict(format!(
                "at most {max} active keys per account; revoke one first"
            )));
        }
        let key = ApiKey {
            id: ApiKeyId::generate(),
            user_id: user.clone(),
            hash: secret.hash(),
            name: name.to_owned(),
            prefix: secret.display_prefix(),
            credit_limit,
            credits_left: credit_limit,
            permitted_routes,
            created_at: self.now(),
            last_used_at: None,
            revoked_at: None,
            rate_limits: RateLimits::NONE,
            budget: None,
            cache: Default::default(),
        };
        self.store().create_api_key(&key).await?;
        self.broker.inner().keys.forget(&key.hash); // it may be held as unknown
        Ok((key, secret))
    }

    // ---- a user's own account ----------------------------------------------------

    /// The user's account as they see it.
    pub async fn me(&self, user: &User) -> Result<MeResponse> {
        let keys = self.active_keys(user).await?;
        let provider_id = self.provider_id_of(&user.id).await?;
        Ok(MeResponse {
            user_id: user.id.clone(),
            email: user.email.clone(),
            credits: user.credits,
            is_admin: self.broker.sessions().is_admin(user),
            suspended: user.suspended.clone(),
            created_at: user.created_at,
            provider_id,
            keys: keys.iter().map(ApiKeyView::from).collect(),
            budget: user.budget,
            budget_spent: match user.budget {
                Some(b) => Some(
                    self.broker
                        .inner()
                        .budgets
                        .account_spent(&user.id, b)
                        .await?,
                ),
                None => None,
            },
            alerts: user.alerts,
        })
    }

    /// Changes the user's budget or alerts (`PATCH /v1/me`) and returns the
    /// account as [`Accounts::me`] shows it.
    pub async fn update_account(
        &self,
        user: &User,
        req: UpdateAccountRequest,
    ) -> Result<MeResponse> {
        forbidden_if_suspended(&user.suspended, "this account")?;
        let update = Self::account_update(req)?;
        let user = self.apply_account_update(&user.id, &update).await?;
        self.me(&user).await
    }

    /// An account change as asked, checked by the rules every account is
    /// held to: the owner's and an admin's alike.
    pub(crate) fn account_update(req: UpdateAccountRequest) -> Result<UserSettingsUpdate> {
        if let Some(Some(b)) = req.budget {
            crate::budget::check_budget(&b)?;
        }
        if let Some(a) = req.alerts {
            if a.balance_below.is_some_and(|c| c.0 < 0) {
                return Err(Error::InvalidInput(
                    "`alerts.balance_below` must not be negative".into(),
                ));
            }
            if a.budget_percent.is_some_and(|p| !(1..=100).contains(&p)) {
                return Err(Error::InvalidInput(
                    "`alerts.budget_percent` must be 1 to 100 (null: no budget alert)".into(),
                ));
            }
        }
        Ok(UserSettingsUpdate {
            budget: req.budget,
            alerts: req.alerts,
        })
    }

    /// Stores a checked account change and applies it on this host at once
    /// (the memory of the account's keys); other hosts see it within
    /// [`BrokerConfig::key_cache_ttl`](crate::BrokerConfig::key_cache_ttl).
    pub(crate) async fn apply_account_update(
        &self,
        id: &UserId,
        update: &UserSettingsUpdate,
    ) -> Result<User> {
        let user = self.store().update_user_settings(id, update).await?;
        // Each key by its hash rather than `forget_user`'s scan of the
        // table: owners may change their settings as often as they like.
        for k in self.store().api_keys(id).await? {
            self.broker.inner().keys.forget(&k.hash);
        }
        Ok(user)
    }

    /// The user's keys that are not revoked.
    pub async fn active_keys(&self, user: &User) -> Result<Vec<ApiKey>> {
        let mut keys = self.store().api_keys(&user.id).await?;
        keys.retain(|k| k.revoked_at.is_none());
        Ok(keys)
    }

    /// Usage over the last `days` days (1 to 90): per day and per service from
    /// the daily counters, and the latest requests from the usage records.
    pub async fn usage(&self, user: &User, days: u32) -> Result<UsageResponse> {
        if !(1..=90).contains(&days) {
            return Err(Error::InvalidInput("`days` must be 1 to 90".into()));
        }
        let to = self.now().day();
        let from = to.plus_days(1 - days as i32);
        let range = DateRange::new(from, to)?;
        let rows = self.store().stats(&scope::user(&user.id), from, to).await?;
        let days_out = per_day(range, rows, |day, c| DayUsage {
            day,
            requests: c.requests,
            failures: c.failures,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            units: c.units,
            charged: Credits(c.charged),
        });
        // Per service: the per-user, per-model counters, summed by service
        // (in service order).
        let prefix = scope::user_model_prefix(&user.id);
        let mut per_service: BTreeMap<Service, StatsCounters> = BTreeMap::new();
        for (sc, c) in self.store().stats_by_prefix(&prefix, from, to).await? {
            let Some(service) = sc
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(svc, _model)| svc.parse::<Service>().ok())
            else {
                continue;
            };
            per_service.entry(service).or_default().add(&c);
        }
        let by_service = per_service
            .into_iter()
            .map(|(service, c)| ServiceUsage {
                service,
                requests: c.requests,
                failures: c.failures,
                input_tokens: c.input_tokens,
                output_tokens: c.output_tokens,
                units: c.units,
                charged: Credits(c.charged),
            })
            .collect();
        // Who served a request is the provider's business: left out.
        let recent = self
            .store()
            .usage_records(&user.id, 20)
            .await?
            .into_iter()
            .map(|r| RecentRequest {
                request_id: r.request_id,
                route: r.route,
                model: r.model,
                key_id: r.key_id,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                units: r.units,
                success: r.success,
                latency_ms: r.latency_ms,
                app: r.app,
                at: r.at,
                charged: r.charged,
                requested_model: r.requested_model,
                cache_hit: r.cache_hit,
            })
            .collect();
        Ok(UsageResponse {
            from,
            to,
            days: days_out,
            services: by_service,
            recent,
        })
    }

    /// The rules every API key's fields obey, however the key is made or changed.
    pub(crate) fn check_key_fields(
        name: Option<&str>,
        limit: Option<Credits>,
        routes: Option<&[Route]>,
    ) -> Result<()> {
        if let Some(n) = name {
            if n.trim().is_empty() {
                return Err(Error::InvalidInput("`name` must not be empty".into()));
            }
            check_text("name", n, MAX_NAME_LEN)?;
        }
        if limit.is_some_and(Credits::is_negative) {
            return Err(Error::InvalidInput(
                "`credit_limit` must not be negative".into(),
            ));
        }
        if routes.is_some_and(|r| r.len() > Route::ALL.len()) {
            return Err(Error::InvalidInput("too many `permitted_routes`".into()));
        }
        Ok(())
    }

    /// Creates an API key for the user; its secret is returned once.
    pub async fn create_key(&self, user: &User, req: CreateKeyRequest) -> Result<(ApiKey, Secret)> {
        forbidden_if_suspended(&user.suspended, "this account")?;
        let name = req.name.as_deref().unwrap_or("key");
        let secret = Secret::generate_api_key();
        (self.new_key(
            &user.id,
            name,
            req.credit_limit,
            req.permitted_routes,
            secret,
        ))
        .await
    }

    /// One of the user's own keys; `NotFound` for anyone else's (whether it
    /// exists is not revealed).
    async fn owned_key(&self, user: &User, id: &ApiKeyId) -> Result<ApiKey> {
        self.active_keys(user)
            .await?
            .into_iter()
            .find(|k| &k.id == id)
            .ok_or_else(|| Error::NotFound(format!("API key {id}")))
    }

    /// Changes one of the user's keys.
    pub async fn update_key(
        &self,
        user: &User,
        id: &ApiKeyId,
        req: UpdateKeyRequest,
    ) -> Result<ApiKey> {
        forbidden_if_suspended(&user.suspended, "this account")?;
        if req.cache_shared.is_some() {
            // Sharing answers across accounts is the operator's decision.
            return Err(Error::Forbidden(
                "only an admin may change `cache_shared`".into(),
            ));
        }
        let update = Self::key_update(req)?;
        self.owned_key(user, id).await?;
        self.apply_key_update(id, &update).await
    }

    /// A key change as asked, checked by the rules every key is held to:
    /// the owner's and an admin's alike.
    pub(crate) fn key_update(req: UpdateKeyRequest) -> Result<ApiKeyUpdate> {
        let name = req.name.as_deref().map(str::trim);
        Self::check_key_fields(
            name,
            req.credit_limit.flatten(),
            req.permitted_routes.as_deref(),
        )?;
        check_rate_limits(&RateLimits {
            rpm: req.rpm.flatten(),
            tpm: req.tpm.flatten(),
        })?;
        if let Some(Some(b)) = req.budget {
            crate::budget::check_budget(&b)?;
        }
        let routes = req.permitted_routes.map(|mut r| {
            r.sort();
            r.dedup();
            r
        });
        Ok(ApiKeyUpdate {
            name: name.map(str::to_owned),
            credit_limit: req.credit_limit,
            permitted_routes: routes,
            rpm: req.rpm,
            tpm: req.tpm,
            budget: req.budget,
            cache_ttl_secs: req.cache_ttl_secs,
            cache_shared: req.cache_shared,
        })
    }

    /// Stores a checked key change and applies it on this host at once
    /// (the key's memory and its account's admission). `NotFound` when
    /// there is no such key.
    pub(crate) async fn apply_key_update(
        &self,
        id: &ApiKeyId,
        update: &ApiKeyUpdate,
    ) -> Result<ApiKey> {
        if let Some(Some(ttl)) = update.cache_ttl_secs {
            crate::cache::check_ttl(&self.broker.inner().config.cache, ttl, "cache_ttl_secs")?;
        }
        let key = self.store().update_api_key(id, update).await?;
        self.broker.inner().keys.forget(&key.hash);
        self.broker.inner().admission.refresh(&key.user_id).await?;
        Ok(key)
    }

    /// Revokes one of the user's keys: it never works again.
    pub async fn revoke_key(&self, user: &User, id: &ApiKeyId) -> Result<()> {
        let key = self.owned_key(user, id).await?;
        self.store().revoke_api_key(id, self.now()).await?;
        self.broker.inner().keys.forget(&key.hash);
        self.broker.inner().admission.refresh(&user.id).await?;
        tracing::info!(user = %user.id, key = %id, "API key revoked");
        Ok(())
    }

    /// The notifications shown now, optionally only those for one place.
    pub async fn active_notifications(
        &self,
        placement: Option<Placement>,
    ) -> Result<Vec<Notification>> {
        let now = self.now();
        Ok(self
            .store()
            .notifications()
            .await?
            .into_iter()
            .filter(|n| n.starts_at <= now && now < n.ends_at)
            .filter(|n| placement.is_none_or(|p| n.placements.contains(&p)))
            .collect())
    }

    // ---- a provider's own account -----------------------------------------------

    /// The provider's account summary.
    pub async fn provider_account(&self, p: &Provider) -> Result<ProviderAccountResponse> {
        let provisions = self
            .store()
            .provisions_by_provider(&p.id)
            .await?
            .iter()
            .filter(|n| n.state != ProvisionState::Ended)
            .count();
        Ok(ProviderAccountResponse {
            provider_id: p.id.clone(),
            email: p.email.clone(),
            user_id: p.user_id.clone(),
            earnings: p.earnings,
            suspended: p.suspended.clone(),
            created_at: p.created_at,
            provisions,
        })
    }

    /// Replaces the provider key; the old one stops working at once. Returns
    /// the new key (shown once).
    pub async fn rotate_provider_key(&self, p: &Provider) -> Result<Secret> {
        forbidden_if_suspended(&p.suspended, "this provider")?;
        let secret = Secret::generate_provider_key();
        self.store()
            .rotate_provider_key(&p.id, &secret.hash())
            .await?;
        tracing::info!(provider = %p.id, "provider key rotated");
        Ok(secret)
    }

    /// Earnings: the unpaid total (as of `p`, read for this request) and each
    /// of the last 30 days.
    pub async fn earnings(&self, p: &Provider) -> Result<EarningsResponse> {
        let to = self.now().day();
        let from = to.plus_days(1 - EARNINGS_DAYS);
        let range = DateRange::new(from, to)?;
        let rows = self
            .store()
            .stats(&scope::provider(&p.id), from, to)
            .await?;
        let days = per_day(range, rows, |day, c| DayEarnings {
            day,
            requests: c.requests,
            rewarded: Credits(c.rewarded),
        });
        let last_30_days = days
            .iter()
            .fold(Credits::ZERO, |a, d| a.saturating_add(d.rewarded));
        Ok(EarningsResponse {
            provider_id: p.id.clone(),
            total: p.earnings,
            last_30_days,
            days,
        })
    }

    /// The id of a user's provider account, if it has one.
    pub(crate) async fn provider_id_of(&self, u: &UserId) -> Result<Option<ProviderId>> {
        match self.store().provider_by_user(u).await {
            Ok(p) => Ok(Some(p.id)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(normalize_email(" A@B.io ").unwrap(), "a@b.io");
        for bad in [
            "",
            "a",
            "@b.io",
            "a@b",
            "a@.io",
            "a@b.io.",
            "a b@c.io",
            "a@b.io\r\nBcc: x@y.io",
            "<a@b.io>",
            "a@b@c.io",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn provider_ids_follow_user_ids() {
        let u = UserId::new("usr_abc");
        assert_eq!(provider_id_for(&u).as_str(), "prv_abc");
    }
}
