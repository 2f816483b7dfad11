//! Administration: everything an administrator does.
//!
//! [`Admin`] is a cheap view over a [`Broker`] (`broker.admin()`): creating
//! users, API keys and providers, granting credits, setting prices, the
//! host's own admin account, finding, suspending and lifting suspensions of
//! users and providers, listing and deleting any node, and the
//! notifications users are shown. The HTTP routes in `http::admin` are thin
//! wrappers around it; they take the admin the request was authenticated
//! as ([`crate::sessions::Sessions::admin`]). An embedder calling it
//! directly is trusted as an administrator.
//!
//! An API key made here goes through the same checks as a user's own
//! ([`crate::accounts`]).

use crate::accounts::{check_len, check_text, normalize_email};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::services;
use crate::sessions::key_may_administer;
use crate::types::*;
use crate::wire::*;

/// Longest reason for a suspension.
const MAX_REASON_LEN: usize = 1_000;

/// Administration over a [`Broker`]. Get one with [`Broker::admin`].
#[derive(Clone, Debug)]
pub struct Admin {
    pub(crate) broker: Broker,
}

impl Broker {
    /// Everything an administrator does.
    pub fn admin(&self) -> Admin {
        Admin {
            broker: self.clone(),
        }
    }
}

impl Admin {
    fn store(&self) -> &dyn crate::store::Store {
        self.broker.store().as_ref()
    }

    fn now(&self) -> Timestamp {
        self.broker.now()
    }

    // ---- accounts, keys, credits, prices -------------------------------------------

    /// Creates a user with `credits` and a first API key; returns the key's secret.
    pub async fn create_user(
        &self,
        email: &str,
        credits: Credits,
        is_admin: bool,
    ) -> Result<(User, ApiKey, Secret)> {
        let email = normalize_email(email)?;
        if credits.is_negative() {
            return Err(services::invalid("credits must not be negative"));
        }
        let user = User {
            id: UserId::generate(),
            email,
            credits,
            is_admin,
            suspended: None,
            created_at: self.now(),
            budget: None,
            alerts: Default::default(),
            alerted: Default::default(),
        };
        self.store().create_user(&user).await?;
        let (key, secret) = self
            .create_api_key(&user.id, "default", None, Vec::new())
            .await?;
        Ok((user, key, secret))
    }

    /// Creates an API key for a user; returns it and its secret (shown once).
    /// The same checks as a user's own keys (name, limit, routes, keys per user).
    pub async fn create_api_key(
        &self,
        user: &UserId,
        name: &str,
        credit_limit: Option<Credits>,
        permitted_routes: Vec<Route>,
    ) -> Result<(ApiKey, Secret)> {
        let secret = Secret::generate_api_key();
        (self.broker.accounts())
            .new_key(user, name, credit_limit, permitted_routes, secret)
            .await
    }

    /// Changes any user's API key: name, credit limit, routes, rate limits
    /// (`rpm`, `tpm`; `null` removes one), by the rules a key's owner is held to.
    pub async fn update_key(&self, id: &ApiKeyId, req: UpdateKeyRequest) -> Result<ApiKey> {
        let update = crate::accounts::Accounts::key_update(req)?;
        let key = self.broker.accounts().apply_key_update(id, &update).await?;
        tracing::info!(key = %id, user = %key.user_id, "API key changed by an admin");
        Ok(key)
    }

    /// Makes sure an admin account for `email` exists with an API key that
    /// administers (an unrestricted one: restricted keys never do). Returns a
    /// new key's secret when one was created: on first start (or when the
    /// admin holds no active unrestricted key), or when `key` names a secret
    /// the store does not know yet (it is then stored, hashed, and not
    /// returned). `Conflict` when `key` is a restricted key of the admin's.
    pub async fn ensure_admin(&self, email: &str, key: Option<Secret>) -> Result<Option<Secret>> {
        let accounts = self.broker.accounts();
        let (user, _) = accounts
            .user_for_email(normalize_email(email)?, true)
            .await?;
        if !user.is_admin {
            return Err(Error::Conflict(format!(
                "{} exists and is not an admin",
                user.email
            )));
        }
        match key {
            Some(secret) => {
                match self.store().api_key_by_hash(&secret.hash()).await {
                    Ok(k) if k.user_id == user.id && key_may_administer(&k) => {}
                    Ok(k) if k.user_id == user.id => {
                        return Err(Error::Conflict(
                            "that admin key is restricted (routes or a credit limit) and \
                             cannot administer"
                                .into(),
                        ))
                    }
                    Ok(_) => {
                        return Err(Error::Conflict(
                            "that admin key belongs to another account".into(),
                        ))
                    }
                    Err(Error::NotFound(_)) => {
                        (accounts.new_key(&user.id, "admin", None, Vec::new(), secret)).await?;
                    }
                    Err(e) => return Err(e),
                }
                Ok(None)
            }
            None => {
                let keys = self.store().api_keys(&user.id).await?;
                // Restricted keys do not administer: the admin needs one that does.
                if keys
                    .iter()
                    .any(|k| k.revoked_at.is_none() && key_may_administer(k))
                {
                    return Ok(None);
                }
                let (_, secret) = self
                    .create_api_key(&user.id, "admin", None, Vec::new())
                    .await?;
                Ok(Some(secret))
            }
        }
    }

    /// Adds (or removes) credits, recorded with who and why.
    pub async fn grant_credits(
        &self,
        user: &UserId,
        amount: Credits,
        by: &str,
        reason: &str,
    ) -> Result<Credits> {
        let grant = CreditGrant {
            user_id: user.clone(),
            amount,
            by: by.to_owned(),
            reason: reason.to_owned(),
            at: self.now(),
        };
        let balance = self.broker.inner().admission.grant(&grant).await?;
        // A balance back at its alert threshold re-arms the alert at once.
        let alerts = self.broker.inner().budgets.alerts();
        if let Err(e) = alerts.granted(user, balance).await {
            tracing::warn!(error = %e, user = %user, "re-arming a balance alert failed");
        }
        Ok(balance)
    }

    /// Creates a provider account; returns it and its key (shown once).
    pub async fn create_provider(
        &self,
        email: &str,
        user: Option<UserId>,
    ) -> Result<(Provider, Secret)> {
        let secret = Secret::generate_provider_key();
        let p = Provider {
            id: ProviderId::generate(),
            user_id: user,
            email: normalize_email(email)?,
            key_hash: secret.hash(),
            earnings: Credits::ZERO,
            suspended: None,
            created_at: self.now(),
        };
        self.store().create_provider(&p).await?;
        Ok((p, secret))
    }

    /// Stores a price and uses it at once.
    pub async fn put_price(&self, price: PriceEntry) -> Result<()> {
        let negative = [
            price.per_request,
            price.per_million_input_tokens,
            price.per_million_output_tokens,
            price.per_million_units,
        ]
        .iter()
        .any(|c| c.is_negative());
        if negative {
            return Err(services::invalid("prices must not be negative"));
        }
        self.store().put_price(&price).await?;
        self.broker.prices().set(price);
        Ok(())
    }

    // ---- users and providers ---------------------------------------------------------

    fn admin_user_view(&self, u: &User, provider_id: Option<ProviderId>) -> AdminUserView {
        AdminUserView {
            user_id: u.id.clone(),
            email: u.email.clone(),
            credits: u.credits,
            is_admin: self.broker.sessions().is_admin(u),
            suspended: u.suspended.clone(),
            created_at: u.created_at,
            provider_id,
            budget: u.budget,
            alerts: u.alerts,
        }
    }

    /// Changes any account's budget or alerts.
    pub async fn update_user(
        &self,
        id: &UserId,
        req: UpdateAccountRequest,
    ) -> Result<AdminUserView> {
        let update = crate::accounts::Accounts::account_update(req)?;
        let accounts = self.broker.accounts();
        let user = accounts.apply_account_update(id, &update).await?;
        tracing::info!(user = %id, "account budget or alerts changed by an admin");
        let provider_id = accounts.provider_id_of(id).await?;
        Ok(self.admin_user_view(&user, provider_id))
    }

    /// Accounts whose email contains `query` (all when empty), at most `limit` (1 to 200).
    pub async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<AdminUserView>> {
        if !(1..=200).contains(&limit) {
            return Err(Error::InvalidInput("`limit` must be 1 to 200".into()));
        }
        check_text("q", query, 254)?;
        let users = self.store().search_users(query.trim(), limit).await?;
        let mut out = Vec::with_capacity(users.len());
        for u in &users {
            let pid = self.broker.accounts().provider_id_of(&u.id).await?;
            out.push(self.admin_user_view(u, pid));
        }
        Ok(out)
    }

    /// A user with its keys (never secrets) and credit grants.
    pub async fn user_detail(&self, id: &UserId) -> Result<AdminUserDetail> {
        let u = self.store().user(id).await?;
        let keys = self.store().api_keys(id).await?;
        let grants = self.store().credit_grants(id).await?;
        let pid = self.broker.accounts().provider_id_of(id).await?;
        Ok(AdminUserDetail {
            user: self.admin_user_view(&u, pid),
            keys: keys.iter().map(ApiKeyView::from).collect(),
            grants,
        })
    }

    fn suspension(admin: &User, reason: &str, at: Timestamp) -> Result<Suspension> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Error::InvalidInput("`reason` must not be empty".into()));
        }
        check_text("reason", reason, MAX_REASON_LEN)?;
        Ok(Suspension {
            reason: reason.to_owned(),
            by: admin.id.to_string(),
            at,
        })
    }

    /// Suspends a user: the gateway refuses its keys at once on this host,
    /// and on other hosts sharing the store within
    /// [`BrokerConfig::key_cache_ttl`](crate::BrokerConfig::key_cache_ttl).
    pub async fn suspend_user(&self, admin: &User, id: &UserId, reason: &str) -> Result<()> {
        let s = Self::suspension(admin, reason, self.now())?;
        if &admin.id == id {
            return Err(Error::Conflict("an admin cannot suspend itself".into()));
        }
        self.store().set_user_suspended(id, Some(s)).await?;
        self.broker.inner().keys.forget_user(id);
        self.broker.inner().admission.refresh(id).await?;
        tracing::info!(user = %id, by = %admin.id, "user suspended");
        Ok(())
    }

    /// Lifts a user's suspension.
    pub async fn unsuspend_user(&self, admin: &User, id: &UserId) -> Result<()> {
        self.store().set_user_suspended(id, None).await?;
        self.broker.inner().keys.forget_user(id);
        self.broker.inner().admission.refresh(id).await?;
        tracing::info!(user = %id, by = %admin.id, "user unsuspended");
        Ok(())
    }

    /// Suspends a provider: its key is refused, and its nodes leave routing at
    /// once (on this host; elsewhere they expire, since they can no longer
    /// send heartbeats with a refused key).
    pub async fn suspend_provider(
        &self,
        admin: &User,
        id: &ProviderId,
        reason: &str,
    ) -> Result<()> {
        let s = Self::suspension(admin, reason, self.now())?;
        self.store().set_provider_suspended(id, Some(s)).await?;
        for n in self.store().provisions_by_provider(id).await? {
            self.broker.pools().set_healthy(&n.id, false);
        }
        tracing::info!(provider = %id, by = %admin.id, "provider suspended");
        Ok(())
    }

    /// Lifts a provider's suspension; its nodes still registered route again.
    pub async fn unsuspend_provider(&self, admin: &User, id: &ProviderId) -> Result<()> {
        self.store().set_provider_suspended(id, None).await?;
        for n in self.store().provisions_by_provider(id).await? {
            self.broker.pools().set_healthy(&n.id, true);
        }
        tracing::info!(provider = %id, by = %admin.id, "provider unsuspended");
        Ok(())
    }

    /// A provider with its nodes.
    pub async fn provider_detail(&self, id: &ProviderId) -> Result<AdminProviderView> {
        let p = self.store().provider(id).await?;
        let provisions = self.broker.network().provisions(&p).await?;
        Ok(AdminProviderView {
            provider_id: p.id,
            email: p.email,
            user_id: p.user_id,
            earnings: p.earnings,
            suspended: p.suspended,
            created_at: p.created_at,
            provisions,
        })
    }

    // ---- nodes --------------------------------------------------------------------

    /// Every node that has not ended, with its provider.
    pub async fn provisions(&self) -> Result<Vec<AdminProvisionView>> {
        Ok(self
            .store()
            .provisions()
            .await?
            .into_iter()
            .map(|n| AdminProvisionView {
                provider_id: n.provider_id.clone(),
                provision: self.broker.network().view(n),
            })
            .collect())
    }

    /// Deletes any node, whoever owns it (`NotFound` if there is none): it
    /// leaves every pool at once and is gone (the route calls this
    /// disconnecting it).
    pub async fn delete_provision(&self, admin: &User, id: &ProvisionId) -> Result<()> {
        self.broker.network().delete_any(id).await?;
        tracing::info!(provision = %id, by = %admin.id, "node disconnected by an admin");
        Ok(())
    }

    // ---- notifications ------------------------------------------------------------

    /// Creates (no `id`) or replaces a notification.
    pub async fn put_notification(
        &self,
        id: Option<NotificationId>,
        req: NotificationRequest,
    ) -> Result<Notification> {
        if req.title.trim().is_empty() {
            return Err(Error::InvalidInput("`title` must not be empty".into()));
        }
        check_text("title", &req.title, 200)?;
        check_text("banner", &req.banner, 1_000)?;
        check_len("popup", &req.popup, 20_000)?;
        if req.ends_at <= req.starts_at {
            return Err(Error::InvalidInput(
                "`ends_at` must be after `starts_at`".into(),
            ));
        }
        if req.placements.is_empty() {
            return Err(Error::InvalidInput(
                "`placements` must name at least one place".into(),
            ));
        }
        let id = match id {
            Some(id) => {
                let exists = self
                    .store()
                    .notifications()
                    .await?
                    .into_iter()
                    .any(|n| n.id == id);
                if !exists {
                    return Err(Error::NotFound(format!("notification {id}")));
                }
                id
            }
            None => NotificationId::generate(),
        };
        let mut placements = req.placements;
        placements.dedup();
        let n = Notification {
            id,
            title: req.title.trim().to_owned(),
            banner: req.banner,
            popup: req.popup,
            starts_at: req.starts_at,
            ends_at: req.ends_at,
            placements,
        };
        self.store().put_notification(&n).await?;
        Ok(n)
    }

    /// Deletes a notification.
    pub async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.store().delete_notification(id).await
    }

    /// Every notification, by start time.
    pub async fn notifications(&self) -> Result<Vec<Notification>> {
        self.store().notifications().await
    }
}
