//! Users and their API keys.
//!
//! A key is stored under its hash, so authenticating a request is one
//! strongly consistent `GetItem`; the key id item maps an id to its owner and
//! hash, which never change, so a process remembers it after the first read.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::store_support::moved_credits_left;
use cxmpute_core::{
    AlertKind, AlertMarks, ApiKey, ApiKeyId, ApiKeyUpdate, Credits, Error, KeyCacheSettings,
    KeyHash, RateLimits, RateUsage, Result, Route, Suspension, Timestamp, User, UserId,
    UserSettingsUpdate, UserStore,
};

use crate::db::{DynamoStore, Fail, Query, Tx};
use crate::item::{corrupt, list_s, n, s, Ex, Item, ItemBuilder, Rd};
use crate::schema;

fn user_item(u: &User) -> Result<Item> {
    Ok(ItemBuilder::at(schema::user(&u.id))
        .s("id", u.id.as_str())
        .s("email", &u.email)
        .n("credits", u.credits.0)
        .b("is_admin", u.is_admin)
        .opt_json("suspended", u.suspended.as_ref())?
        .n("created_at", u.created_at.0)
        .opt_json("budget", u.budget.as_ref())?
        .json("alerts", &u.alerts)?
        .opt_n(
            mark_attr(AlertKind::Balance),
            u.alerted.balance.map(|t| t.0),
        )
        .opt_n(mark_attr(AlertKind::Budget), u.alerted.budget.map(|t| t.0))
        .build())
}

/// The attribute of an account's alert mark of `kind`.
fn mark_attr(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Balance => "alerted_balance",
        AlertKind::Budget => "alerted_budget",
    }
}

pub(crate) fn decode_user(it: &Item) -> Result<User> {
    let r = Rd::new(it, "user");
    Ok(User {
        id: UserId::new(r.s("id")?),
        email: r.s("email")?,
        credits: Credits(r.num("credits")?),
        is_admin: r.b("is_admin")?,
        suspended: r.opt_json("suspended")?,
        created_at: Timestamp(r.num("created_at")?),
        budget: r.opt_json("budget")?,
        alerts: r.opt_json("alerts")?.unwrap_or_default(),
        alerted: AlertMarks {
            balance: r.opt_num(mark_attr(AlertKind::Balance))?.map(Timestamp),
            budget: r.opt_num(mark_attr(AlertKind::Budget))?.map(Timestamp),
        },
    })
}

/// `limited` says whether the key tracks `credits_left`. The number itself is
/// always there so reserve and settle can `ADD` to it without first reading
/// whether the key has a limit; for an unlimited key it means nothing.
fn key_item(k: &ApiKey) -> Result<Item> {
    Ok(ItemBuilder::at(schema::api_key(&k.hash))
        .s("id", k.id.as_str())
        .s("user_id", k.user_id.as_str())
        .s("hash", k.hash.to_hex())
        .s("name", &k.name)
        .s("prefix", &k.prefix)
        .opt_n("credit_limit", k.credit_limit.map(|c| c.0))
        .b("limited", k.credits_left.is_some())
        .n("credits_left", k.credits_left.unwrap_or_default().0)
        .n("spent", spent(k.credit_limit, k.credits_left))
        .set("routes", routes_value(&k.permitted_routes))
        .n("created_at", k.created_at.0)
        .opt_n("last_used_at", k.last_used_at.map(|t| t.0))
        .opt_n("revoked_at", k.revoked_at.map(|t| t.0))
        .opt_n("rpm", k.rate_limits.rpm)
        .opt_n("tpm", k.rate_limits.tpm)
        .opt_json("budget", k.budget.as_ref())?
        .opt_json(
            "cache",
            (k.cache != KeyCacheSettings::default()).then_some(&k.cache),
        )?
        .build())
}

/// What a limited key has used of its limit (limit - left), kept beside
/// `credits_left` so a settlement can tell, in a condition, whether a refund
/// still fits under the limit. Zero when the key does not track a limit.
fn spent(limit: Option<Credits>, left: Option<Credits>) -> i64 {
    match (limit, left) {
        (Some(l), Some(left)) => l.0.saturating_sub(left.0),
        _ => 0,
    }
}

fn routes_value(routes: &[Route]) -> AttributeValue {
    list_s(routes.iter().map(|r| r.path()))
}

pub(crate) fn decode_key(it: &Item) -> Result<ApiKey> {
    let r = Rd::new(it, "api key");
    let routes = r
        .list_s("routes")?
        .iter()
        .map(|p| p.parse().map_err(|_| corrupt("api key attribute `routes`")))
        .collect::<Result<Vec<Route>>>()?;
    Ok(ApiKey {
        id: ApiKeyId::new(r.s("id")?),
        user_id: UserId::new(r.s("user_id")?),
        hash: r.hash("hash")?,
        name: r.s("name")?,
        prefix: r.s("prefix")?,
        credit_limit: r.opt_num("credit_limit")?.map(Credits),
        credits_left: if r.b("limited")? {
            Some(Credits(r.num("credits_left")?))
        } else {
            None
        },
        permitted_routes: routes,
        created_at: Timestamp(r.num("created_at")?),
        last_used_at: r.opt_num("last_used_at")?.map(Timestamp),
        revoked_at: r.opt_num("revoked_at")?.map(Timestamp),
        rate_limits: RateLimits {
            rpm: r.opt_num("rpm")?,
            tpm: r.opt_num("tpm")?,
        },
        budget: r.opt_json("budget")?,
        cache: r.opt_json("cache")?.unwrap_or_default(),
    })
}

/// `SET a = :x` or `REMOVE a` for an optional JSON attribute.
fn set_or_remove_json<T: serde::Serialize>(
    ex: &mut Ex,
    name: &str,
    v: Option<&T>,
) -> Result<String> {
    Ok(match v {
        Some(v) => {
            let text = serde_json::to_string(v).map_err(|e| Error::backend("encoding", e))?;
            format!("SET {} = {}", ex.n(name), ex.v(s(text)))
        }
        None => format!("REMOVE {}", ex.n(name)),
    })
}

/// A change of an optional JSON attribute in an update of several: `a = :x`
/// into `sets` for `Some(Some(v))`, `a` into `removes` for `Some(None)`,
/// nothing for `None` (unchanged).
fn change_json<T: serde::Serialize>(
    ex: &mut Ex,
    sets: &mut Vec<String>,
    removes: &mut Vec<String>,
    name: &str,
    change: Option<Option<&T>>,
) -> Result<()> {
    match change {
        Some(Some(v)) => {
            let text = serde_json::to_string(v).map_err(|e| Error::backend("encoding", e))?;
            sets.push(format!("{} = {}", ex.n(name), ex.v(s(text))));
        }
        Some(None) => removes.push(ex.n(name)),
        None => {}
    }
    Ok(())
}

#[async_trait]
impl UserStore for DynamoStore {
    // ---- users --------------------------------------------------------------

    async fn create_user(&self, u: &User) -> Result<()> {
        let what = "creating a user";
        let mut tx = Tx::new(self);
        let mut ex = Ex::new();
        let c = ex.absent();
        tx.put(user_item(u)?, Some(c), ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        let email = ItemBuilder::at(schema::email(&u.email))
            .s("email", &u.email)
            .s("user_id", u.id.as_str())
            .build();
        tx.put(email, Some(c), ex)?;
        match self.transact(what, tx).await {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::AlreadyExists(format!("user {}", u.email))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        match self.get("reading a user", schema::user(id)).await? {
            Some(it) => decode_user(&it),
            None => Err(Error::NotFound(format!("user {id}"))),
        }
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        let what = "reading a user by email";
        let nf = || Error::NotFound(format!("user {email}"));
        let ptr = self.get(what, schema::email(email)).await?.ok_or_else(nf)?;
        let id = UserId::new(Rd::new(&ptr, "email").s("user_id")?);
        match self.get(what, schema::user(&id)).await? {
            Some(it) => decode_user(&it),
            None => Err(nf()),
        }
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        let what = "searching users";
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut q = Query::prefix(schema::USERS_PK, "EMAIL#");
        let needle = query.to_lowercase();
        if !needle.is_empty() {
            let f = format!("contains({}, {})", q.ex.n("email"), q.ex.v(s(needle)));
            q.filter = Some(f);
        }
        q.limit = Some(limit);
        let ptrs = self.query(what, q).await?;
        let keys = ptrs
            .iter()
            .map(|p| {
                Ok(schema::user(&UserId::new(
                    Rd::new(p, "email").s("user_id")?,
                )))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut users = self
            .batch_get(what, keys)
            .await?
            .iter()
            .map(decode_user)
            .collect::<Result<Vec<_>>>()?;
        users.sort_by(|a, b| a.email.cmp(&b.email));
        users.truncate(limit);
        Ok(users)
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        self.set_suspended("user", id.as_str(), schema::user(id), suspension)
            .await
    }

    async fn update_user_settings(&self, id: &UserId, update: &UserSettingsUpdate) -> Result<User> {
        let what = "changing a user's settings";
        let mut ex = Ex::new();
        let mut sets = Vec::new();
        let mut removes = Vec::new();
        let budget = update.budget.as_ref().map(Option::as_ref);
        change_json(&mut ex, &mut sets, &mut removes, "budget", budget)?;
        if let Some(alerts) = update.alerts {
            let text = serde_json::to_string(&alerts).map_err(|e| Error::backend("encoding", e))?;
            sets.push(format!("{} = {}", ex.n("alerts"), ex.v(s(text))));
        }
        let cond = ex.exists();
        let mut upd = String::new();
        if !sets.is_empty() {
            upd = format!("SET {}", sets.join(", "));
        }
        if !removes.is_empty() {
            upd = format!("{upd} REMOVE {}", removes.join(", "));
        }
        if upd.is_empty() {
            return self.user(id).await;
        }
        match self
            .update(what, schema::user(id), upd, Some(cond), ex, true)
            .await
        {
            Ok(Some(it)) => decode_user(&it),
            Ok(None) => Err(corrupt("update returned no attributes")),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!("user {id}"))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn swap_alert_mark(
        &self,
        id: &UserId,
        kind: AlertKind,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<bool> {
        let what = "swapping an alert mark";
        let mut ex = Ex::new();
        let attr = ex.n(mark_attr(kind));
        let mut cond = ex.exists();
        match from {
            Some(t) => cond = format!("{cond} AND {attr} = {}", ex.v(n(t.0))),
            None => cond = format!("{cond} AND attribute_not_exists({attr})"),
        }
        let upd = match to {
            Some(t) => format!("SET {attr} = {}", ex.v(n(t.0))),
            None => format!("REMOVE {attr}"),
        };
        match self
            .update(what, schema::user(id), upd, Some(cond), ex, false)
            .await
        {
            Ok(_) => Ok(true),
            Err(Fail::Condition(_)) => Ok(false),
            Err(f) => Err(f.into_error(what)),
        }
    }

    // ---- API keys -----------------------------------------------------------

    async fn create_api_key(&self, k: &ApiKey) -> Result<()> {
        let what = "creating an API key";
        let mut tx = Tx::new(self);
        let mut ex = Ex::new();
        let c = ex.exists();
        let owner = tx.check(schema::user(&k.user_id), c, ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        tx.put(key_item(k)?, Some(c), ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        let by_id = ItemBuilder::at(schema::key_id(&k.id))
            .s("user_id", k.user_id.as_str())
            .s("hash", k.hash.to_hex())
            .build();
        tx.put(by_id, Some(c), ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        let listed = ItemBuilder::at(schema::user_key(&k.user_id, &k.id))
            .s("hash", k.hash.to_hex())
            .build();
        tx.put(listed, Some(c), ex)?;
        match self.transact(what, tx).await {
            Ok(()) => {
                self.remember_key(&k.id, &k.user_id, k.hash);
                Ok(())
            }
            Err(Fail::Condition(flags)) => {
                let no_user = self
                    .must_exist_failed(what, &flags, owner, schema::user(&k.user_id))
                    .await?;
                Err(if no_user {
                    Error::NotFound(format!("user {}", k.user_id))
                } else {
                    Error::AlreadyExists(format!("api key {}", k.id))
                })
            }
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        match self
            .get("reading an API key", schema::api_key(hash))
            .await?
        {
            Some(it) => {
                let k = decode_key(&it)?;
                self.remember_key(&k.id, &k.user_id, k.hash);
                Ok(k)
            }
            None => Err(Error::NotFound("api key".into())),
        }
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        let what = "listing API keys";
        let listed = self
            .query(what, Query::prefix(schema::user_pk(user), "KEY#"))
            .await?;
        let keys = listed
            .iter()
            .map(|it| Ok(schema::api_key(&Rd::new(it, "key listing").hash("hash")?)))
            .collect::<Result<Vec<_>>>()?;
        let mut out = self
            .batch_get(what, keys)
            .await?
            .iter()
            .map(decode_key)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        let what = "updating an API key";
        let nf = || Error::NotFound(format!("api key {id}"));
        let (_, hash) = self.key_owner(id).await?.ok_or_else(nf)?;
        let mut attempt = 0;
        loop {
            let item = self
                .get(what, schema::api_key(&hash))
                .await?
                .ok_or_else(nf)?;
            let cur = decode_key(&item)?;
            let mut ex = Ex::new();
            let mut sets = Vec::new();
            let mut removes = Vec::new();
            let mut cond = ex.exists();
            if let Some(name) = &update.name {
                sets.push(format!("{} = {}", ex.n("name"), ex.v(s(name))));
            }
            if let Some(routes) = &update.permitted_routes {
                sets.push(format!(
                    "{} = {}",
                    ex.n("routes"),
                    ex.v(routes_value(routes))
                ));
            }
            for (name, v) in [
                ("rpm", update.rpm.map(|v| v.map(u64::from))),
                ("tpm", update.tpm),
            ] {
                match v {
                    Some(Some(v)) => sets.push(format!("{} = {}", ex.n(name), ex.v(n(v)))),
                    Some(None) => removes.push(ex.n(name)),
                    None => {}
                }
            }
            let budget = update.budget.as_ref().map(Option::as_ref);
            change_json(&mut ex, &mut sets, &mut removes, "budget", budget)?;
            if update.cache_ttl_secs.is_some() || update.cache_shared.is_some() {
                // One attribute for both settings, written whole from what
                // was read: a change racing another loses one of them, as
                // the last write wins for every key setting.
                let mut cache = cur.cache;
                if let Some(ttl) = update.cache_ttl_secs {
                    cache.ttl_secs = ttl;
                }
                if let Some(shared) = update.cache_shared {
                    cache.shared = shared;
                }
                if cache == KeyCacheSettings::default() {
                    removes.push(ex.n("cache"));
                } else {
                    let text =
                        serde_json::to_string(&cache).map_err(|e| Error::backend("encoding", e))?;
                    sets.push(format!("{} = {}", ex.n("cache"), ex.v(s(text))));
                }
            }
            if let Some(limit) = update.credit_limit {
                let left = moved_credits_left(cur.credit_limit, cur.credits_left, limit);
                match limit {
                    Some(l) => sets.push(format!("{} = {}", ex.n("credit_limit"), ex.v(n(l.0)))),
                    None => removes.push(ex.n("credit_limit")),
                }
                sets.push(format!(
                    "{} = {}",
                    ex.n("limited"),
                    ex.v(AttributeValue::Bool(left.is_some()))
                ));
                if let Some(left) = left {
                    sets.push(format!("{} = {}", ex.n("credits_left"), ex.v(n(left.0))));
                    let used = spent(limit, Some(left));
                    sets.push(format!("{} = {}", ex.n("spent"), ex.v(n(used))));
                }
                // The new amount left was computed from what was read; reserves
                // and settles move it concurrently, so write only if it did not move.
                let old_limit = match cur.credit_limit {
                    Some(l) => format!("{} = {}", ex.n("credit_limit"), ex.v(n(l.0))),
                    None => format!("attribute_not_exists({})", ex.n("credit_limit")),
                };
                cond = format!("{cond} AND {old_limit}");
                match cur.credits_left {
                    Some(l) => {
                        let t = ex.v(AttributeValue::Bool(true));
                        let v = ex.v(n(l.0));
                        cond = format!(
                            "{cond} AND {} = {t} AND {} = {v}",
                            ex.n("limited"),
                            ex.n("credits_left")
                        );
                    }
                    None => {
                        let f = ex.v(AttributeValue::Bool(false));
                        cond = format!("{cond} AND {} = {f}", ex.n("limited"));
                    }
                }
            }
            if sets.is_empty() && removes.is_empty() {
                return Ok(cur);
            }
            let mut upd = String::new();
            if !sets.is_empty() {
                upd = format!("SET {}", sets.join(", "));
            }
            if !removes.is_empty() {
                upd = format!("{upd} REMOVE {}", removes.join(", "));
            }
            match self
                .update(what, schema::api_key(&hash), upd, Some(cond), ex, true)
                .await
            {
                Ok(Some(it)) => return decode_key(&it),
                Ok(None) => return Err(corrupt("update returned no attributes")),
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        let what = "revoking an API key";
        let nf = || Error::NotFound(format!("api key {id}"));
        let (_, hash) = self.key_owner(id).await?.ok_or_else(nf)?;
        let mut ex = Ex::new();
        // The first revocation time stays: revoking twice is harmless.
        let r = ex.n("revoked_at");
        let upd = format!("SET {r} = if_not_exists({r}, {})", ex.v(n(at.0)));
        let cond = ex.exists();
        match self
            .update(what, schema::api_key(&hash), upd, Some(cond), ex, false)
            .await
        {
            Ok(_) => Ok(()),
            Err(Fail::Condition(_)) => Err(nf()),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn add_rate_usage(
        &self,
        scope: &str,
        window: Timestamp,
        add: RateUsage,
    ) -> Result<Option<RateUsage>> {
        let what = "counting a rate window";
        let item = || schema::rate(scope);
        // Nearly always the window stored: one ADD. Else a new or older
        // window starts again; a race with another host starting it too
        // sends this back to the ADD. Failing both means a later window.
        for _ in 0..2 {
            let mut ex = Ex::new();
            let (w, r, t) = (ex.n("window"), ex.n("requests"), ex.n("tokens"));
            let upd = format!(
                "ADD {r} {}, {t} {}",
                ex.v(n(add.requests)),
                ex.v(n(add.tokens))
            );
            let cond = format!("{w} = {}", ex.v(n(window.0)));
            match self.update(what, item(), upd, Some(cond), ex, true).await {
                Ok(Some(it)) => return decode_rate(&it).map(Some),
                Ok(None) => return Err(corrupt("update returned no attributes")),
                Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
            let mut ex = Ex::new();
            let (w, r, t) = (ex.n("window"), ex.n("requests"), ex.n("tokens"));
            let at = ex.v(n(window.0));
            let upd = format!(
                "SET {w} = {at}, {r} = {}, {t} = {}",
                ex.v(n(add.requests)),
                ex.v(n(add.tokens))
            );
            let cond = format!("attribute_not_exists({w}) OR {w} < {at}");
            match self.update(what, item(), upd, Some(cond), ex, true).await {
                Ok(Some(it)) => return decode_rate(&it).map(Some),
                Ok(None) => return Err(corrupt("update returned no attributes")),
                Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
        }
        Ok(None)
    }
}

fn decode_rate(it: &Item) -> Result<RateUsage> {
    let r = Rd::new(it, "rate counters");
    Ok(RateUsage {
        requests: r.num("requests")?,
        tokens: r.num("tokens")?,
    })
}

impl DynamoStore {
    /// Sets or clears the suspension on the `noun` ("user", "provider") `id`
    /// stored at `key`; `NotFound` when there is no such item. Providers are
    /// suspended the same way (`network.rs`).
    pub(crate) async fn set_suspended(
        &self,
        noun: &str,
        id: &str,
        key: Item,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        let what = format!("suspending a {noun}");
        let mut ex = Ex::new();
        let upd = set_or_remove_json(&mut ex, "suspended", suspension.as_ref())?;
        let cond = ex.exists();
        match self.update(&what, key, upd, Some(cond), ex, false).await {
            Ok(_) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!("{noun} {id}"))),
            Err(f) => Err(f.into_error(&what)),
        }
    }

    /// The owner and hash of a key id: remembered, or one consistent read.
    pub(crate) async fn key_owner(&self, id: &ApiKeyId) -> Result<Option<(UserId, KeyHash)>> {
        if let Some(k) = self.known_key(id) {
            return Ok(Some(k));
        }
        let Some(it) = self
            .get("reading an API key id", schema::key_id(id))
            .await?
        else {
            return Ok(None);
        };
        let r = Rd::new(&it, "api key id");
        let owner = (UserId::new(r.s("user_id")?), r.hash("hash")?);
        self.remember_key(id, &owner.0, owner.1);
        Ok(Some(owner))
    }
}
