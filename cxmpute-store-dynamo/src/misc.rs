//! Pricing, sign-in codes, refresh tokens, notifications and stats: the
//! parts off the request path.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::{
    Credits, Day, Error, KeyHash, LoginCode, Notification, NotificationId, PriceEntry,
    RefreshToken, Result, StatsBatch, StatsCounters, Timestamp, TokenFamilyId, UserId,
};

use crate::db::{DynamoStore, Fail, Query, Tx};
use crate::item::{n, s, sortable_i64, Ex, Item, ItemBuilder, Rd, PK, SK};
use crate::schema::{self, GSI, GSI_PK, GSI_SK};

/// Deltas per stats transaction: each takes two counter updates, plus one
/// marker and at most one day-registry put per delta, within the cap of 100.
const STATS_CHUNK: usize = 30;
/// Emails the sign-in housekeeping looks at per round.
const PRUNE_BATCH: usize = 1_000;

fn decode_price(it: &Item) -> Result<PriceEntry> {
    let r = Rd::new(it, "price");
    Ok(PriceEntry {
        service: r.parse("service")?,
        model: r.opt_s("model")?,
        per_request: Credits(r.num("per_request")?),
        per_million_input_tokens: Credits(r.num("per_million_input_tokens")?),
        per_million_output_tokens: Credits(r.num("per_million_output_tokens")?),
        per_million_units: Credits(r.num("per_million_units")?),
    })
}

fn decode_notification(it: &Item) -> Result<Notification> {
    let r = Rd::new(it, "notification");
    Ok(Notification {
        id: NotificationId::new(r.s("id")?),
        title: r.s("title")?,
        banner: r.s("banner")?,
        popup: r.s("popup")?,
        starts_at: Timestamp(r.num("starts_at")?),
        ends_at: Timestamp(r.num("ends_at")?),
        placements: r.json("placements")?,
    })
}

fn decode_counters(it: &Item) -> Result<StatsCounters> {
    let r = Rd::new(it, "stats");
    let mut buckets = Vec::new();
    while let Some(b) = r.opt_num::<u64>(&format!("b{}", buckets.len()))? {
        buckets.push(b);
    }
    Ok(StatsCounters {
        requests: r.num_or_zero("requests")?,
        failures: r.num_or_zero("failures")?,
        input_tokens: r.num_or_zero("input_tokens")?,
        output_tokens: r.num_or_zero("output_tokens")?,
        units: r.num_or_zero("units")?,
        latency_ms_sum: r.num_or_zero("latency_ms_sum")?,
        latency_buckets: buckets,
        charged: r.num_or_zero("charged")?,
        rewarded: r.num_or_zero("rewarded")?,
    })
}

/// `ADD` every counter (zeros too: a histogram bucket that was added to must
/// exist, so the histogram keeps its length) and name the scope and day.
fn counters_update(ex: &mut Ex, c: &StatsCounters, scope: &str, day: Day) -> String {
    let mut adds = Vec::new();
    let mut add = |ex: &mut Ex, name: &str, v: AttributeValue| {
        adds.push(format!("{} {}", ex.n(name), ex.v(v)));
    };
    add(ex, "requests", n(c.requests));
    add(ex, "failures", n(c.failures));
    add(ex, "input_tokens", n(c.input_tokens));
    add(ex, "output_tokens", n(c.output_tokens));
    add(ex, "units", n(c.units));
    add(ex, "latency_ms_sum", n(c.latency_ms_sum));
    add(ex, "charged", n(c.charged));
    add(ex, "rewarded", n(c.rewarded));
    for (i, b) in c.latency_buckets.iter().enumerate() {
        add(ex, &format!("b{i}"), n(b));
    }
    format!(
        "ADD {} SET {} = {}, {} = {}",
        adds.join(", "),
        ex.n("scope"),
        ex.v(s(scope)),
        ex.n("day"),
        ex.v(n(day.0))
    )
}

fn between(pk: String, lo: String, hi: String) -> Query {
    let mut ex = Ex::new();
    let key_cond = format!(
        "{} = {} AND {} BETWEEN {} AND {}",
        ex.n(PK),
        ex.v(s(pk)),
        ex.n(SK),
        ex.v(s(lo)),
        ex.v(s(hi))
    );
    Query {
        key_cond,
        ex,
        forward: true,
        ..Query::default()
    }
}

impl DynamoStore {
    // ---- pricing ---------------------------------------------------------------

    pub(crate) async fn prices_impl(&self) -> Result<Vec<PriceEntry>> {
        let q = Query::prefix(schema::PRICES_PK, "PRICE#");
        let mut v = self
            .query("reading prices", q)
            .await?
            .iter()
            .map(decode_price)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
        Ok(v)
    }

    pub(crate) async fn put_price_impl(&self, p: &PriceEntry) -> Result<()> {
        let what = "storing a price";
        let item = ItemBuilder::at(schema::price(p.service, p.model.as_deref()))
            .s("service", p.service.as_str())
            .opt_s("model", p.model.clone())
            .n("per_request", p.per_request.0)
            .n("per_million_input_tokens", p.per_million_input_tokens.0)
            .n("per_million_output_tokens", p.per_million_output_tokens.0)
            .n("per_million_units", p.per_million_units.0)
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    // ---- sign-in codes ---------------------------------------------------------

    pub(crate) async fn issue_login_code_impl(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        let what = "issuing a sign-in code";
        let mut attempt = 0;
        loop {
            let (mut issued, ver) = match self.get(what, schema::login_issued(&code.email)).await? {
                Some(it) => {
                    let r = Rd::new(&it, "sign-in issues");
                    (r.json::<Vec<i64>>("issued")?, Some(r.num::<u64>("ver")?))
                }
                None => (Vec::new(), None),
            };
            issued.retain(|t| *t >= window_start.0);
            if issued.len() >= max_per_window as usize {
                return Err(Error::RateLimited(
                    "too many sign-in codes requested".into(),
                ));
            }
            issued.push(code.created_at.0);
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            // The count was made from what was read: write only if nobody
            // issued a code for this email since.
            let cond = match ver {
                Some(v) => format!("{} = {}", ex.n("ver"), ex.v(n(v))),
                None => ex.absent(),
            };
            // In the index by its latest issue, for the housekeeping sweep.
            let issues = ItemBuilder::at(schema::login_issued(&code.email))
                .json("issued", &issued)?
                .n("ver", ver.map_or(0, |v| v + 1))
                .s(GSI_PK, schema::LOGINS_PK)
                .s(
                    GSI_SK,
                    format!("{}#{}", sortable_i64(code.created_at.0), code.email),
                )
                .build();
            tx.put(issues, Some(cond), ex)?;
            let c = ItemBuilder::at(schema::login_code(&code.email))
                .s("email", &code.email)
                .s("code_hash", code.code_hash.to_hex())
                .n("expires_at", code.expires_at.0)
                .n("created_at", code.created_at.0)
                .n("attempts", 0)
                .build();
            tx.put(c, None, Ex::new())?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    pub(crate) async fn verify_login_code_impl(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        let what = "verifying a sign-in code";
        let bad = || Error::Unauthorized("invalid or expired code".into());
        let it = self
            .get(what, schema::login_code(email))
            .await?
            .ok_or_else(bad)?;
        let r = Rd::new(&it, "sign-in code");
        let stored = r.hash("code_hash")?;
        let created_at: i64 = r.num("created_at")?;
        let expires_at: i64 = r.num("expires_at")?;
        let attempts: u64 = r.num("attempts")?;
        if expires_at <= now.0 || attempts >= u64::from(max_attempts) {
            return Err(bad());
        }
        if stored != *code_hash {
            // Count the wrong try against this code (not one issued since).
            let mut ex = Ex::new();
            let upd = format!("ADD {} {}", ex.n("attempts"), ex.v(n(1)));
            let cond = format!(
                "{} = {} AND {} = {}",
                ex.n("created_at"),
                ex.v(n(created_at)),
                ex.n("code_hash"),
                ex.v(s(stored.to_hex()))
            );
            match self
                .update(what, schema::login_code(email), upd, Some(cond), ex, false)
                .await
            {
                Ok(_) | Err(Fail::Condition(_)) => return Err(bad()),
                Err(f) => return Err(f.into_error(what)),
            }
        }
        // Consume it only if it is still this code, unexpired and not locked
        // by wrong tries made since the read.
        let mut ex = Ex::new();
        let attempts_n = ex.n("attempts");
        let cond = format!(
            "{} = {} AND {attempts_n} < {} AND {} > {}",
            ex.n("code_hash"),
            ex.v(s(code_hash.to_hex())),
            ex.v(n(max_attempts)),
            ex.n("expires_at"),
            ex.v(n(now.0))
        );
        match self
            .delete(what, schema::login_code(email), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(bad()),
            Err(f) => Err(f.into_error(what)),
        }
    }

    pub(crate) async fn prune_login_codes_impl(&self, before: Timestamp) -> Result<u64> {
        let what = "deleting old sign-in codes";
        // Sort key `{latest issue}#{email}`, fixed-width time: everything
        // below the bare time of `before` was last issued earlier.
        let q = older_than(schema::LOGINS_PK, before);
        let mut pruned = 0;
        // The index lags; each email is read again and deleted only if
        // nothing was issued for it since (`ver` unchanged).
        for it in self.query(what, q).await? {
            let pk = Rd::new(&it, "sign-in issues").s(PK)?;
            let Some(email) = pk.strip_prefix("LOGIN#") else {
                continue;
            };
            let Some(issues) = self.get(what, schema::login_issued(email)).await? else {
                continue;
            };
            let r = Rd::new(&issues, "sign-in issues");
            let latest = r.json::<Vec<i64>>("issued")?.into_iter().max();
            if latest.is_some_and(|t| t >= before.0) {
                continue;
            }
            let mut ex = Ex::new();
            let cond = format!("{} = {}", ex.n("ver"), ex.v(n(r.num::<u64>("ver")?)));
            match self
                .delete(what, schema::login_issued(email), Some(cond), ex)
                .await
            {
                Ok(()) => {}
                Err(Fail::Condition(_)) => continue,
                Err(f) => return Err(f.into_error(what)),
            }
            // The code (if not used) is as old; a newer one issued since
            // the read fails the condition and stays.
            let mut ex = Ex::new();
            let cond = format!("{} < {}", ex.n("created_at"), ex.v(n(before.0)));
            match self
                .delete(what, schema::login_code(email), Some(cond), ex)
                .await
            {
                Ok(()) => pruned += 1,
                Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
        }
        Ok(pruned)
    }

    // ---- refresh tokens --------------------------------------------------------

    fn token_item(t: &RefreshToken, family: &TokenFamilyId) -> Item {
        // In the index by expiry, for the housekeeping sweep; sharded by
        // hash, as every sign-in and refresh writes one.
        ItemBuilder::at(schema::refresh_token(&t.hash))
            .s(GSI_PK, schema::tokens_pk(&t.hash))
            .s(
                GSI_SK,
                format!("{}#{}", sortable_i64(t.expires_at.0), t.hash.to_hex()),
            )
            .s("hash", t.hash.to_hex())
            .s("family", family.as_str())
            .s("user_id", t.user_id.as_str())
            .n("expires_at", t.expires_at.0)
            .n("created_at", t.created_at.0)
            .b("used", false)
            .build()
    }

    pub(crate) async fn create_refresh_token_impl(&self, t: &RefreshToken) -> Result<()> {
        let what = "storing a refresh token";
        let mut ex = Ex::new();
        let cond = ex.absent();
        match self
            .put(what, Self::token_item(t, &t.family), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::AlreadyExists("refresh token".into())),
            Err(f) => Err(f.into_error(what)),
        }
    }

    pub(crate) async fn rotate_refresh_token_impl(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        let what = "rotating a refresh token";
        let bad = || Error::Unauthorized("invalid refresh token".into());
        let mut attempt = 0;
        loop {
            let it = self
                .get(what, schema::refresh_token(old))
                .await?
                .ok_or_else(bad)?;
            let r = Rd::new(&it, "refresh token");
            let family = TokenFamilyId::new(r.s("family")?);
            let user = UserId::new(r.s("user_id")?);
            let used = r.b("used")?;
            let expires_at: i64 = r.num("expires_at")?;
            let revoked = match self.get(what, schema::token_family(&family)).await? {
                Some(f) => Rd::new(&f, "token family").b("revoked")?,
                None => false,
            };
            if revoked {
                return Err(bad());
            }
            if used {
                // A used token presented again was stolen or replayed: end the session.
                self.revoke_token_family_impl(&family).await?;
                return Err(Error::Unauthorized(
                    "refresh token reused; session revoked".into(),
                ));
            }
            if expires_at <= now.0 {
                return Err(bad());
            }
            if next.hash == *old {
                return Err(Error::AlreadyExists("refresh token".into()));
            }
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let u = ex.n("used");
            let upd = format!("SET {u} = {}", ex.v(AttributeValue::Bool(true)));
            let cond = format!("{u} = {}", ex.v(AttributeValue::Bool(false)));
            tx.update(schema::refresh_token(old), upd, Some(cond), ex)?;
            let mut ex = Ex::new();
            let cond = format!("attribute_not_exists({})", ex.n("revoked"));
            tx.check(schema::token_family(&family), cond, ex)?;
            let mut ex = Ex::new();
            let cond = ex.absent();
            let next_i = tx.put(Self::token_item(next, &family), Some(cond), ex)?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(user),
                Err(Fail::Condition(flags)) => {
                    if Fail::failed(&flags, next_i)
                        && self
                            .get(what, schema::refresh_token(&next.hash))
                            .await?
                            .is_some()
                    {
                        return Err(Error::AlreadyExists("refresh token".into()));
                    }
                    // Used, revoked or replaced since the read: the next read says which.
                    self.again(&mut attempt, what).await?;
                }
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    pub(crate) async fn prune_refresh_tokens_impl(&self, before: Timestamp) -> Result<u64> {
        let what = "deleting expired refresh tokens";
        let mut pruned = 0;
        for shard in 0..schema::TOKEN_SHARDS {
            let q = older_than(&schema::tokens_shard_pk(shard), before);
            for it in self.query(what, q).await? {
                let r = Rd::new(&it, "refresh token");
                let key = crate::item::key(r.s(PK)?, r.s(SK)?);
                let mut ex = Ex::new();
                let cond = format!("{} < {}", ex.n("expires_at"), ex.v(n(before.0)));
                match self.delete(what, key, Some(cond), ex).await {
                    Ok(()) => pruned += 1,
                    Err(Fail::Condition(_)) => {}
                    Err(f) => return Err(f.into_error(what)),
                }
            }
        }
        // Revocation items stay: without an index of tokens by family, which
        // every rotation would write, a sweep cannot tell when a family's
        // last token is gone. There is one per ended session.
        Ok(pruned)
    }

    pub(crate) async fn revoke_token_family_impl(&self, family: &TokenFamilyId) -> Result<()> {
        let what = "revoking a token family";
        let mut ex = Ex::new();
        let upd = format!(
            "SET {} = {}",
            ex.n("revoked"),
            ex.v(AttributeValue::Bool(true))
        );
        self.update(what, schema::token_family(family), upd, None, ex, false)
            .await
            .map(|_| ())
            .map_err(|f| f.into_error(what))
    }

    pub(crate) async fn refresh_token_family_impl(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        match self
            .get("reading a refresh token", schema::refresh_token(hash))
            .await?
        {
            Some(it) => Ok(TokenFamilyId::new(
                Rd::new(&it, "refresh token").s("family")?,
            )),
            None => Err(Error::NotFound("refresh token".into())),
        }
    }

    // ---- notifications ---------------------------------------------------------

    pub(crate) async fn put_notification_impl(&self, x: &Notification) -> Result<()> {
        let what = "storing a notification";
        let item = ItemBuilder::at(schema::notification(&x.id))
            .s("id", x.id.as_str())
            .s("title", &x.title)
            .s("banner", &x.banner)
            .s("popup", &x.popup)
            .n("starts_at", x.starts_at.0)
            .n("ends_at", x.ends_at.0)
            .json("placements", &x.placements)?
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    pub(crate) async fn delete_notification_impl(&self, id: &NotificationId) -> Result<()> {
        let what = "deleting a notification";
        let mut ex = Ex::new();
        let cond = ex.exists();
        match self
            .delete(what, schema::notification(id), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!("notification {id}"))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    pub(crate) async fn notifications_impl(&self) -> Result<Vec<Notification>> {
        let q = Query::prefix(schema::NOTIFS_PK, "NTF#");
        let mut v = self
            .query("reading notifications", q)
            .await?
            .iter()
            .map(decode_notification)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (a.starts_at, &a.id).cmp(&(b.starts_at, &b.id)));
        Ok(v)
    }

    // ---- stats -----------------------------------------------------------------

    pub(crate) async fn record_stats_impl(&self, batch: &StatsBatch) -> Result<()> {
        let what = "recording stats";
        // One update per item per transaction: merge repeated (day, scope) first.
        // The merge is ordered, so a retried batch splits into the same chunks.
        let mut merged: BTreeMap<(Day, String), StatsCounters> = BTreeMap::new();
        for (day, scope, c) in &batch.deltas {
            merged.entry((*day, scope.clone())).or_default().add(c);
        }
        let merged: Vec<_> = merged.into_iter().collect();
        let chunks: Vec<&[((Day, String), StatsCounters)]> = if merged.is_empty() {
            vec![&[]]
        } else {
            merged.chunks(STATS_CHUNK).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut tx = Tx::new(self);
            // The chunk's marker: a chunk applied before (a retried batch) is skipped.
            let mut ex = Ex::new();
            let cond = ex.absent();
            tx.put(
                ItemBuilder::at(schema::stats_batch(&batch.id, i)).build(),
                Some(cond),
                ex,
            )?;
            let mut days = BTreeSet::new();
            for ((day, scope), c) in chunk {
                for key in [
                    schema::stats(scope, *day),
                    schema::stats_by_day(*day, scope),
                ] {
                    let mut ex = Ex::new();
                    let upd = counters_update(&mut ex, c, scope, *day);
                    tx.update(key, upd, None, ex)?;
                }
                days.insert(*day);
            }
            for day in days {
                let item = ItemBuilder::at(schema::stats_day(day))
                    .n("day", day.0)
                    .build();
                tx.put(item, None, Ex::new())?;
            }
            match self.transact(what, tx).await {
                Ok(()) | Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
        }
        Ok(())
    }

    pub(crate) async fn stats_impl(
        &self,
        scope: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(Day, StatsCounters)>> {
        if from > to {
            return Ok(Vec::new());
        }
        let q = between(
            schema::stats_pk(scope),
            schema::day_sk(from),
            schema::day_sk(to),
        );
        self.query("reading stats", q)
            .await?
            .iter()
            .map(|it| Ok((Day(Rd::new(it, "stats").num("day")?), decode_counters(it)?)))
            .collect()
    }

    pub(crate) async fn stats_by_prefix_impl(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        let what = "reading stats by prefix";
        if from > to {
            return Ok(Vec::new());
        }
        // Only days that have stats are visited, however wide the range.
        let days = self
            .query(
                what,
                between(
                    schema::STATS_DAYS_PK.to_owned(),
                    schema::day_sk(from),
                    schema::day_sk(to),
                ),
            )
            .await?;
        let mut out: BTreeMap<String, StatsCounters> = BTreeMap::new();
        for d in &days {
            let day = Day(Rd::new(d, "stats day").num("day")?);
            let q = Query::prefix(schema::stats_day_pk(day), format!("SCOPE#{prefix}"));
            for it in self.query(what, q).await? {
                let scope = Rd::new(&it, "stats").s("scope")?;
                out.entry(scope).or_default().add(&decode_counters(&it)?);
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// A bounded sweep of the index partition `pk` for items whose time-first
/// sort key is below `before`, oldest first: a backlog clears over a few
/// maintenance rounds.
fn older_than(pk: &str, before: Timestamp) -> Query {
    let mut q = Query {
        index: Some(GSI),
        forward: true,
        limit: Some(PRUNE_BATCH),
        ..Query::default()
    };
    q.key_cond = format!(
        "{} = {} AND {} < {}",
        q.ex.n(GSI_PK),
        q.ex.v(s(pk)),
        q.ex.n(GSI_SK),
        q.ex.v(s(sortable_i64(before.0)))
    );
    q
}
