//! Users, credit grants, API keys and providers.

use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::store_support::{granted_balance, moved_credits_left};
use cxmpute_core::{
    ApiKey, ApiKeyId, ApiKeyUpdate, CreditGrant, Credits, Error, KeyHash, Provider, ProviderId,
    Result, Route, Suspension, Timestamp, User, UserId,
};

use crate::db::{DynamoStore, Fail, Query, Tx};
use crate::item::{corrupt, list_s, n, s, sortable_i64, Ex, Item, ItemBuilder, Rd};
use crate::schema;

// ---- encoding ----------------------------------------------------------------

fn user_item(u: &User) -> Result<Item> {
    Ok(ItemBuilder::at(schema::user(&u.id))
        .s("id", u.id.as_str())
        .s("email", &u.email)
        .n("credits", u.credits.0)
        .b("is_admin", u.is_admin)
        .opt_json("suspended", u.suspended.as_ref())?
        .n("created_at", u.created_at.0)
        .build())
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
    })
}

fn provider_item(p: &Provider) -> Result<Item> {
    Ok(ItemBuilder::at(schema::provider(&p.id))
        .s("id", p.id.as_str())
        .opt_s("user_id", p.user_id.as_ref().map(|u| u.as_str()))
        .s("email", &p.email)
        .s("key_hash", p.key_hash.to_hex())
        .n("earnings", p.earnings.0)
        .opt_json("suspended", p.suspended.as_ref())?
        .n("created_at", p.created_at.0)
        .build())
}

fn decode_provider(it: &Item) -> Result<Provider> {
    let r = Rd::new(it, "provider");
    Ok(Provider {
        id: ProviderId::new(r.s("id")?),
        user_id: r.opt_s("user_id")?.map(UserId::new),
        email: r.s("email")?,
        key_hash: r.hash("key_hash")?,
        earnings: Credits(r.num("earnings")?),
        suspended: r.opt_json("suspended")?,
        created_at: Timestamp(r.num("created_at")?),
    })
}

fn decode_grant(it: &Item) -> Result<CreditGrant> {
    let r = Rd::new(it, "credit grant");
    Ok(CreditGrant {
        user_id: UserId::new(r.s("user_id")?),
        amount: Credits(r.num("amount")?),
        by: r.s("by")?,
        reason: r.s("reason")?,
        at: Timestamp(r.num("at")?),
    })
}

/// A number that only grows within this process, seeded from the wall clock
/// in nanoseconds: it orders grants made in the same millisecond the way
/// they were made (the grant's own time comes first in the sort key).
fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    let prev = SEQ
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
            Some(p.saturating_add(1).max(now))
        })
        .unwrap_or_default();
    prev.saturating_add(1).max(now)
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

impl DynamoStore {
    // ---- users ---------------------------------------------------------------

    pub(crate) async fn create_user_impl(&self, u: &User) -> Result<()> {
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

    pub(crate) async fn user_impl(&self, id: &UserId) -> Result<User> {
        match self.get("reading a user", schema::user(id)).await? {
            Some(it) => decode_user(&it),
            None => Err(Error::NotFound(format!("user {id}"))),
        }
    }

    pub(crate) async fn user_by_email_impl(&self, email: &str) -> Result<User> {
        let what = "reading a user by email";
        let nf = || Error::NotFound(format!("user {email}"));
        let ptr = self.get(what, schema::email(email)).await?.ok_or_else(nf)?;
        let id = UserId::new(Rd::new(&ptr, "email").s("user_id")?);
        match self.get(what, schema::user(&id)).await? {
            Some(it) => decode_user(&it),
            None => Err(nf()),
        }
    }

    pub(crate) async fn search_users_impl(&self, query: &str, limit: usize) -> Result<Vec<User>> {
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

    pub(crate) async fn set_user_suspended_impl(
        &self,
        id: &UserId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.set_suspended("user", id.as_str(), schema::user(id), suspension)
            .await
    }

    /// Sets or clears the suspension on the `noun` ("user", "provider") `id`
    /// stored at `key`; `NotFound` when there is no such item.
    async fn set_suspended(
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

    pub(crate) async fn grant_credits_impl(&self, g: &CreditGrant) -> Result<Credits> {
        let what = "granting credits";
        let grant = ItemBuilder::new(
            schema::user_pk(&g.user_id),
            format!("GRANT#{}#{:020}", sortable_i64(g.at.0), next_seq()),
        )
        .s("user_id", g.user_id.as_str())
        .n("amount", g.amount.0)
        .s("by", &g.by)
        .s("reason", &g.reason)
        .n("at", g.at.0)
        .build();
        let mut attempt = 0;
        loop {
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let mut cond = ex.exists();
            if g.amount.is_negative() {
                // The balance never goes below zero: the condition is the guard.
                let need = ex.v(n(g.amount.0.saturating_neg()));
                cond = format!("{cond} AND {} >= {need}", ex.n("credits"));
            }
            let upd = format!("ADD {} {}", ex.n("credits"), ex.v(n(g.amount.0)));
            tx.update(schema::user(&g.user_id), upd, Some(cond), ex)?;
            tx.put(grant.clone(), None, Ex::new())?;
            match self.transact(what, tx).await {
                Ok(()) => break,
                Err(Fail::Condition(_)) => {
                    let u = self.user_impl(&g.user_id).await?;
                    granted_balance(u.credits, g.amount)?;
                    // The balance moved between the failed write and the read: again.
                    self.again(&mut attempt, what).await?;
                }
                Err(f) => return Err(f.into_error(what)),
            }
        }
        // A transaction returns no values, so the balance is read after it:
        // exact unless a reservation on the same account landed in between.
        Ok(self.user_impl(&g.user_id).await?.credits)
    }

    pub(crate) async fn credit_grants_impl(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        let q = Query::prefix(schema::user_pk(user), "GRANT#");
        self.query("reading credit grants", q)
            .await?
            .iter()
            .map(decode_grant)
            .collect()
    }

    // ---- API keys --------------------------------------------------------------

    pub(crate) async fn create_api_key_impl(&self, k: &ApiKey) -> Result<()> {
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

    pub(crate) async fn api_key_by_hash_impl(&self, hash: &KeyHash) -> Result<ApiKey> {
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

    pub(crate) async fn api_keys_impl(&self, user: &UserId) -> Result<Vec<ApiKey>> {
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

    pub(crate) async fn update_api_key_impl(
        &self,
        id: &ApiKeyId,
        update: &ApiKeyUpdate,
    ) -> Result<ApiKey> {
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

    pub(crate) async fn revoke_api_key_impl(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
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

    // ---- providers -------------------------------------------------------------

    pub(crate) async fn create_provider_impl(&self, p: &Provider) -> Result<()> {
        let what = "creating a provider";
        let mut tx = Tx::new(self);
        let mut ex = Ex::new();
        let c = ex.absent();
        tx.put(provider_item(p)?, Some(c), ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        let by_hash = ItemBuilder::at(schema::provider_hash(&p.key_hash))
            .s("provider_id", p.id.as_str())
            .build();
        tx.put(by_hash, Some(c), ex)?;
        if let Some(u) = &p.user_id {
            let mut ex = Ex::new();
            let c = ex.absent();
            let by_user = ItemBuilder::at(schema::user_provider(u))
                .s("provider_id", p.id.as_str())
                .build();
            tx.put(by_user, Some(c), ex)?;
        }
        match self.transact(what, tx).await {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::AlreadyExists(format!("provider {}", p.id))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    pub(crate) async fn provider_impl(&self, id: &ProviderId) -> Result<Provider> {
        match self.get("reading a provider", schema::provider(id)).await? {
            Some(it) => decode_provider(&it),
            None => Err(Error::NotFound(format!("provider {id}"))),
        }
    }

    async fn provider_via(&self, what: &str, ptr: Item) -> Result<Option<Provider>> {
        let Some(p) = self.get(what, ptr).await? else {
            return Ok(None);
        };
        let id = ProviderId::new(Rd::new(&p, "provider pointer").s("provider_id")?);
        match self.get(what, schema::provider(&id)).await? {
            Some(it) => decode_provider(&it).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) async fn provider_by_key_hash_impl(&self, hash: &KeyHash) -> Result<Provider> {
        let p = self
            .provider_via("reading a provider by key", schema::provider_hash(hash))
            .await?;
        // Both reads are strongly consistent and rotation moves the pointer and
        // the provider together, so a rotated-away key finds nothing; the
        // comparison only makes that explicit.
        match p {
            Some(p) if p.key_hash == *hash => Ok(p),
            _ => Err(Error::NotFound("provider key".into())),
        }
    }

    pub(crate) async fn provider_by_user_impl(&self, user: &UserId) -> Result<Provider> {
        self.provider_via("reading a user's provider", schema::user_provider(user))
            .await?
            .ok_or_else(|| Error::NotFound(format!("provider of {user}")))
    }

    pub(crate) async fn rotate_provider_key_impl(
        &self,
        id: &ProviderId,
        new_hash: &KeyHash,
    ) -> Result<()> {
        let what = "rotating a provider key";
        let mut attempt = 0;
        loop {
            if self
                .get(what, schema::provider_hash(new_hash))
                .await?
                .is_some()
            {
                return Err(Error::AlreadyExists("provider key".into()));
            }
            let old = self.provider_impl(id).await?.key_hash;
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let h = ex.n("key_hash");
            let upd = format!("SET {h} = {}", ex.v(s(new_hash.to_hex())));
            let cond = format!("{h} = {}", ex.v(s(old.to_hex())));
            tx.update(schema::provider(id), upd, Some(cond), ex)?;
            tx.delete(schema::provider_hash(&old), None, Ex::new())?;
            let mut ex = Ex::new();
            let c = ex.absent();
            let ptr = ItemBuilder::at(schema::provider_hash(new_hash))
                .s("provider_id", id.as_str())
                .build();
            tx.put(ptr, Some(c), ex)?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                // A concurrent rotation or a concurrent claim of the new hash:
                // look again, the checks above will say which.
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    pub(crate) async fn set_provider_suspended_impl(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.set_suspended("provider", id.as_str(), schema::provider(id), suspension)
            .await
    }
}
