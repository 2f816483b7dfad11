//! Rate limits: requests and tokens per minute, per API key
//! ([`ApiKey::rate_limits`]) and per account
//! ([`BrokerConfig::account_rate_limits`](crate::BrokerConfig::account_rate_limits)).
//!
//! ## Windows
//!
//! A limit counts per fixed minute of the broker's [`Clock`] (windows start
//! at whole minutes since the epoch, so every host sharing a store agrees on
//! them up to its clock's skew). A call counts one request and its token
//! bound (the input estimate plus the output limit, as pricing reserves) at
//! admission; at settlement the tokens are corrected to what it used (input
//! and output tokens as metered), so a call that failed or stopped short
//! gives the rest back to its window. A call refused before admission (a bad
//! body, an unknown model) counts nothing, and neither does one whose credit
//! hold failed.
//!
//! ## One host, or many
//!
//! On a store one host owns (memory, SQLite) the counts live in this host's
//! memory only: a limit is exact and no call touches the store for it.
//!
//! On a store hosts share (DynamoDB) each host admits from slices of a
//! window's allowance it took from the store ([`UserStore::add_rate_usage`]:
//! an atomic counter per scope and window, as a credit lease takes credits).
//! A slice is a sixteenth of the limit; a host takes the next one in the
//! background once half of its slice is used, so a busy key's calls do not
//! wait for the store; a call waits only when this host holds nothing for
//! its window yet (its first call of a minute) or its slice ran out before
//! the next arrived, and then the take asks for what every waiting call
//! needs (at least a slice), so a burst waits for one take, not one each.
//! The store grants from the limit and never past it: the hosts together
//! admit **at most the limit** per window (its requests; its tokens as
//! counted at admission). What the sharing costs is the other way: a call
//! may be refused while what other hosts hold lies unused in their memory
//! for the rest of the minute, at most about a slice and a half per host
//! (half a slice left when the next was taken ahead); a host's unused slice
//! is not handed back. Tokens given back at settlement return to the host's
//! slice, not to the store.
//!
//! [`UserStore::add_rate_usage`]: crate::store::UserStore::add_rate_usage

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::*;

/// The length of a window, in milliseconds.
const WINDOW_MS: i64 = 60_000;
/// Locks the table is split under, so calls of different keys rarely meet.
const SHARDS: usize = 16;
/// On a shared store a host takes this fraction of a limit at a time.
const SLICE_DIVISOR: u64 = 16;
/// Takes one call may wait for before it is refused as if the limit were
/// spent: a safety bound; a take asks for what every waiting call needs, so
/// a call waits for one or two.
const MAX_WAITS: usize = 16;

/// Whose allowance a call draws on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Subject {
    Key(ApiKeyId),
    Account(UserId),
}

impl Subject {
    /// The store's name for its counters.
    fn scope(&self) -> String {
        match self {
            Subject::Key(id) => format!("key:{id}"),
            Subject::Account(id) => format!("account:{id}"),
        }
    }

    fn noun(&self) -> &'static str {
        match self {
            Subject::Key(_) => "this API key",
            Subject::Account(_) => "this account",
        }
    }
}

/// One dimension (requests or tokens) of one window on this host.
#[derive(Clone, Copy, Debug, Default)]
struct Counter {
    /// Admitted here in this window (tokens corrected at settlement).
    used: u64,
    /// Taken from the store for this window (shared stores only).
    granted: u64,
    /// The store's count after this host's last take: what every host took
    /// (shared stores only).
    seen: u64,
}

impl Counter {
    /// What this host may still admit: the limit less what it used (owned),
    /// or what it holds of its slices (shared).
    fn allowance(&self, limit: u64, owned: bool) -> u64 {
        if owned {
            limit.saturating_sub(self.used)
        } else {
            self.granted.saturating_sub(self.used)
        }
    }

    /// What is left of the window, as far as this host knows.
    fn remaining(&self, limit: u64, owned: bool) -> u64 {
        if owned {
            limit.saturating_sub(self.used)
        } else {
            let held = self.granted.saturating_sub(self.used);
            held.saturating_add(limit.saturating_sub(self.seen))
                .min(limit)
        }
    }

    /// What the store may still grant (shared stores).
    fn store_left(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.seen)
    }
}

/// A take from the store under way; every call short of allowance awaits it.
type Take = Shared<BoxFuture<'static, bool>>;

/// One subject's current window on this host.
struct Window {
    /// Its start (milliseconds of the broker's clock).
    start: i64,
    requests: Counter,
    tokens: Counter,
    taking: Option<Take>,
    /// What the calls waiting for a take need together (requests, tokens),
    /// so that the next take asks for all of it, not a slice per call.
    short: (u64, u64),
}

impl Window {
    fn new(start: i64) -> Self {
        Window {
            start,
            requests: Counter::default(),
            tokens: Counter::default(),
            taking: None,
            short: (0, 0),
        }
    }
}

/// A subject's limits in one call: requests and tokens per minute.
#[derive(Clone, Copy, Debug)]
struct Limits {
    rpm: Option<u64>,
    tpm: Option<u64>,
}

impl From<RateLimits> for Limits {
    fn from(l: RateLimits) -> Self {
        Limits {
            rpm: l.rpm.map(u64::from),
            tpm: l.tpm,
        }
    }
}

/// What one dimension of a limit shows a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shown {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Until the window starts again.
    pub(crate) reset: Duration,
}

/// The limits a call's answer reports (OpenAI's `x-ratelimit-*` headers):
/// for each dimension the tightest of the key's and the account's, `None`
/// where neither has a limit (the headers are then left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RateStatus {
    pub(crate) requests: Option<Shown>,
    pub(crate) tokens: Option<Shown>,
}

impl RateStatus {
    fn tighten(&mut self, requests: Option<Shown>, tokens: Option<Shown>) {
        let tighter = |a: Option<Shown>, b: Option<Shown>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        };
        self.requests = tighter(self.requests, requests);
        self.tokens = tighter(self.tokens, tokens);
    }

    /// The answer's `x-ratelimit-*` headers.
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.requests {
            out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", go_duration(r.reset)));
        }
        if let Some(t) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", go_duration(t.reset)));
        }
        out
    }
}

/// A duration as OpenAI writes its resets (Go's format): `250ms`, `6s`,
/// `1m0s`; whole seconds are rounded up.
pub(crate) fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = whole_seconds(d);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After`).
pub(crate) fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// What a call took from its windows, given back in part at settlement.
#[derive(Debug, Default)]
pub(crate) struct Ticket {
    taken: Option<Taken>,
}

#[derive(Debug)]
struct Taken {
    limiter: RateLimiter,
    /// Each subject it counted against, with the window it counted in and
    /// the dimensions it took.
    from: Vec<(Subject, i64, bool, bool)>,
    tokens: u64,
    /// Set once given back: a call settles once, but a second would not count.
    done: std::sync::atomic::AtomicBool,
}

impl Ticket {
    /// The call was settled having used `used` tokens: the rest of its bound
    /// goes back to its windows (if they are still current).
    pub(crate) fn settled(&self, used: u64) {
        if let Some(t) = self.once() {
            t.limiter
                .give_back(&t.from, 0, t.tokens.saturating_sub(used));
        }
    }

    /// The call was not admitted after all (its credit hold failed): its
    /// request and tokens go back.
    pub(crate) fn cancel(&self) {
        if let Some(t) = self.once() {
            t.limiter.give_back(&t.from, 1, t.tokens);
        }
    }

    fn once(&self) -> Option<&Taken> {
        let t = self.taken.as_ref()?;
        (!t.done.swap(true, std::sync::atomic::Ordering::Relaxed)).then_some(t)
    }
}

/// The rate limits of one host. Cheap to clone: clones share it.
#[derive(Clone)]
pub(crate) struct RateLimiter(Arc<Inner>);

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("owned", &self.0.owned)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Whether this host owns the store (counts in memory only).
    owned: bool,
    /// Every account's limits, over all its keys together.
    account: RateLimits,
    shards: Vec<Mutex<HashMap<Subject, Window>>>,
}

impl RateLimiter {
    pub(crate) fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, account: RateLimits) -> Self {
        let owned = store.owned_by_one_host();
        RateLimiter(Arc::new(Inner {
            store,
            clock,
            owned,
            account,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }))
    }

    /// Whether a call with `key` is limited at all (else nothing is counted).
    pub(crate) fn applies(&self, key: &ApiKey) -> bool {
        key.rate_limits.is_limited() || self.0.account.is_limited()
    }

    /// The subjects a call with `key` counts against, with their limits.
    fn subjects(&self, key: &ApiKey) -> Vec<(Subject, Limits)> {
        let mut out = Vec::with_capacity(2);
        if key.rate_limits.is_limited() {
            out.push((Subject::Key(key.id.clone()), key.rate_limits.into()));
        }
        if self.0.account.is_limited() {
            out.push((Subject::Account(key.user_id.clone()), self.0.account.into()));
        }
        out
    }

    fn shard(&self, s: &Subject) -> &Mutex<HashMap<Subject, Window>> {
        use std::hash::{Hash, Hasher};
        // A fixed hasher: the shard only spreads locks over ids the broker
        // made, it keys no table.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut h);
        let n = usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0);
        &self.0.shards[n]
    }

    /// Now, and the start of the window it falls in.
    fn now(&self) -> (i64, i64) {
        let now = self.0.clock.now().0;
        (now, now - now.rem_euclid(WINDOW_MS))
    }

    /// The limits a call with `key` would be shown now, counting nothing.
    pub(crate) fn status(&self, key: &ApiKey) -> RateStatus {
        let (now, start) = self.now();
        let mut status = RateStatus::default();
        for (subject, limits) in self.subjects(key) {
            let map = self.shard(&subject).lock();
            let fresh = Window::new(start);
            let w = map
                .get(&subject)
                .filter(|w| w.start >= start)
                .unwrap_or(&fresh);
            let (r, t) = self.shown(w, limits, now);
            status.tighten(r, t);
        }
        status
    }

    fn shown(&self, w: &Window, l: Limits, now: i64) -> (Option<Shown>, Option<Shown>) {
        let reset = Duration::from_millis(u64::try_from(w.start + WINDOW_MS - now).unwrap_or(0));
        let owned = self.0.owned;
        let show = |limit: Option<u64>, c: &Counter| {
            limit.map(|limit| Shown {
                limit,
                remaining: c.remaining(limit, owned),
                reset,
            })
        };
        (show(l.rpm, &w.requests), show(l.tpm, &w.tokens))
    }

    /// Admits a call with `key` whose bound is `tokens`: counts one request
    /// and the tokens against the key's and the account's windows, or
    /// refuses it (`RateLimitExceeded`, nothing counted). `status` is set to
    /// what the answer reports either way.
    pub(crate) async fn admit(
        &self,
        key: &ApiKey,
        tokens: u64,
        status: &mut RateStatus,
    ) -> Result<Ticket> {
        let mut from = Vec::with_capacity(2);
        *status = RateStatus::default();
        for (subject, limits) in self.subjects(key) {
            match self.admit_one(&subject, limits, tokens).await {
                Ok((start, r, t)) => {
                    status.tighten(r, t);
                    from.push((subject, start, limits.rpm.is_some(), limits.tpm.is_some()));
                }
                Err(e) => {
                    // The key's window gave already: it goes back.
                    self.give_back(&from, 1, tokens);
                    *status = self.status(key);
                    return Err(e);
                }
            }
        }
        Ok(Ticket {
            taken: Some(Taken {
                limiter: self.clone(),
                from,
                tokens,
                done: Default::default(),
            }),
        })
    }

    /// Counts a call against one subject: its window's start and what it shows.
    async fn admit_one(
        &self,
        subject: &Subject,
        l: Limits,
        tokens: u64,
    ) -> Result<(i64, Option<Shown>, Option<Shown>)> {
        let owned = self.0.owned;
        let need_t = if l.tpm.is_some() { tokens } else { 0 };
        let need_r = u64::from(l.rpm.is_some());
        let mut waits = 0;
        loop {
            let (now, start) = self.now();
            let take = {
                let mut map = self.shard(subject).lock();
                let w = map
                    .entry(subject.clone())
                    .or_insert_with(|| Window::new(start));
                if w.start < start {
                    *w = Window::new(start);
                }
                if waits > 0 {
                    // Back from a wait: no longer short.
                    w.short.0 = w.short.0.saturating_sub(need_r);
                    w.short.1 = w.short.1.saturating_sub(need_t);
                }
                let fits = |limit: Option<u64>, c: &Counter, need: u64| {
                    limit.is_none_or(|limit| c.allowance(limit, owned) >= need)
                };
                let fits_r = fits(l.rpm, &w.requests, need_r);
                let fits_t = fits(l.tpm, &w.tokens, need_t);
                if fits_r && fits_t {
                    w.requests.used += need_r;
                    w.tokens.used += need_t;
                    if !owned {
                        self.top_up(subject, w, l);
                    }
                    let (r, t) = self.shown(w, l, now);
                    return Ok((w.start, r, t));
                }
                // Could the store still give what is missing?
                let obtainable = |limit: Option<u64>, c: &Counter, need: u64| {
                    limit.is_none_or(|limit| {
                        c.allowance(limit, owned)
                            .saturating_add(c.store_left(limit))
                            >= need
                    })
                };
                let refused = owned
                    || waits >= MAX_WAITS
                    || !obtainable(l.rpm, &w.requests, need_r)
                    || !obtainable(l.tpm, &w.tokens, need_t);
                if refused {
                    return Err(self.refusal(subject, w, l, tokens, fits_r, now));
                }
                let take = match &w.taking {
                    Some(t) => t.clone(),
                    None => {
                        // Enough for this call and every call already waiting.
                        let want = |limit: Option<u64>, c: &Counter, short: u64, need: u64| {
                            let held = c.allowance(limit.unwrap_or(0), owned);
                            match short.saturating_add(need) {
                                want if want > held => slice(limit, want - held),
                                _ => 0,
                            }
                        };
                        let ask_r = want(l.rpm, &w.requests, w.short.0, need_r);
                        let ask_t = want(l.tpm, &w.tokens, w.short.1, need_t);
                        self.start_take(subject, w, l, ask_r, ask_t)
                    }
                };
                w.short.0 += need_r;
                w.short.1 += need_t;
                take
            };
            waits += 1;
            if !take.await {
                if let Some(w) = self.shard(subject).lock().get_mut(subject) {
                    w.short.0 = w.short.0.saturating_sub(need_r);
                    w.short.1 = w.short.1.saturating_sub(need_t);
                }
                return Err(Error::Unavailable {
                    message: "the rate-limit counters could not be read".into(),
                    source: None,
                });
            }
        }
    }

    /// The refusal of a call: which limit, and when its window starts again.
    fn refusal(
        &self,
        subject: &Subject,
        w: &Window,
        l: Limits,
        tokens: u64,
        requests_fit: bool,
        now: i64,
    ) -> Error {
        let retry_after =
            Duration::from_millis(u64::try_from(w.start + WINDOW_MS - now).unwrap_or(0));
        let wait = whole_seconds(retry_after);
        let owned = self.0.owned;
        let (what, limit, c, asked, tokens_limit) = match (requests_fit, l.rpm, l.tpm) {
            (false, Some(rpm), _) => ("requests per min (RPM)", rpm, &w.requests, 1, false),
            (_, _, Some(tpm)) => ("tokens per min (TPM)", tpm, &w.tokens, tokens, true),
            // Unreachable: a refusal has a limit; say so plainly anyway.
            _ => ("requests per min (RPM)", 0, &w.requests, 1, false),
        };
        let used = limit.saturating_sub(c.remaining(limit, owned));
        let message = if asked > limit {
            format!(
                "Request too large for {what} on {}: Limit {limit}, Requested {asked}. \
                 Lower max_tokens or the input.",
                subject.noun()
            )
        } else {
            format!(
                "Rate limit reached for {what} on {}: Limit {limit}, Used {used}, \
                 Requested {asked}. Please try again in {wait}s.",
                subject.noun()
            )
        };
        Error::RateLimitExceeded {
            message,
            tokens: tokens_limit,
            retry_after,
        }
    }

    /// On a shared store: takes the next slice in the background once half
    /// of the one held is used, so calls do not wait for the store.
    fn top_up(&self, subject: &Subject, w: &mut Window, l: Limits) {
        if w.taking.is_some() {
            return;
        }
        let low = |limit: Option<u64>, c: &Counter| {
            limit.is_some_and(|limit| {
                c.store_left(limit) > 0 && c.allowance(limit, false) < slice(Some(limit), 1) / 2 + 1
            })
        };
        let ask_r = if low(l.rpm, &w.requests) {
            slice(l.rpm, 1)
        } else {
            0
        };
        let ask_t = if low(l.tpm, &w.tokens) {
            slice(l.tpm, 1)
        } else {
            0
        };
        if ask_r > 0 || ask_t > 0 {
            drop(self.start_take(subject, w, l, ask_r, ask_t));
        }
    }

    /// Starts taking `ask_r` requests and `ask_t` tokens of `w`'s window from
    /// the store, in a task of its own (a caller going away does not stop
    /// it); the returned future says whether the store answered.
    fn start_take(
        &self,
        subject: &Subject,
        w: &mut Window,
        l: Limits,
        ask_r: u64,
        ask_t: u64,
    ) -> Take {
        let this = self.clone();
        let subject = subject.clone();
        let start = w.start;
        let task = tokio::spawn(async move {
            let add = RateUsage {
                requests: ask_r,
                tokens: ask_t,
            };
            let scope = subject.scope();
            let answer = this
                .0
                .store
                .add_rate_usage(&scope, Timestamp(start), add)
                .await;
            let mut map = this.shard(&subject).lock();
            let Some(w) = map.get_mut(&subject).filter(|w| w.start == start) else {
                return answer.is_ok();
            };
            w.taking = None;
            match answer {
                Ok(Some(total)) => {
                    grant(&mut w.requests, l.rpm, ask_r, total.requests);
                    grant(&mut w.tokens, l.tpm, ask_t, total.tokens);
                    true
                }
                // Hosts already in a later window: this one has nothing left.
                Ok(None) => {
                    w.requests.seen = u64::MAX;
                    w.tokens.seen = u64::MAX;
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, scope, "taking a rate-limit slice failed");
                    false
                }
            }
        });
        let take: Take = async move { task.await.unwrap_or(false) }.boxed().shared();
        w.taking = Some(take.clone());
        take
    }

    /// Gives `requests` and `tokens` back to the windows a call counted in,
    /// if they are still current (a past window's counts no longer matter).
    fn give_back(&self, from: &[(Subject, i64, bool, bool)], requests: u64, tokens: u64) {
        for (subject, start, r, t) in from {
            let mut map = self.shard(subject).lock();
            if let Some(w) = map.get_mut(subject).filter(|w| w.start == *start) {
                if *r {
                    w.requests.used = w.requests.used.saturating_sub(requests);
                }
                if *t {
                    w.tokens.used = w.tokens.used.saturating_sub(tokens);
                }
            }
        }
    }

    /// Forgets windows that are over (from maintenance): the table holds the
    /// subjects that called in the current minute.
    pub(crate) fn upkeep(&self) {
        let (_, start) = self.now();
        for shard in &self.0.shards {
            shard
                .lock()
                .retain(|_, w| w.start >= start || w.taking.is_some());
        }
    }

    /// Windows held in memory now.
    #[cfg(all(test, feature = "testkit"))]
    fn held(&self) -> usize {
        self.0.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// What one take from the store asks for: a sixteenth of the limit, at
/// least `need`; nothing without a limit.
fn slice(limit: Option<u64>, need: u64) -> u64 {
    limit.map_or(0, |l| (l / SLICE_DIVISOR).max(1).max(need))
}

/// Records a take's answer: of `asked`, the store granted what was left
/// under `limit` before it (its total less what was asked); past the limit,
/// nothing.
fn grant(c: &mut Counter, limit: Option<u64>, asked: u64, total: u64) {
    let Some(limit) = limit else { return };
    let before = total.saturating_sub(asked);
    c.granted += asked.min(limit.saturating_sub(before));
    c.seen = c.seen.max(total);
}

#[cfg(test)]
mod tests {
    use super::*;
    // The instrumented store is the testkit's: `cargo test -p cxmpute-core
    // --lib` without it still builds and runs the other tests.
    #[cfg(feature = "testkit")]
    use crate::testkit::InstrumentedStore;
    use crate::{ManualClock, MemoryStore};

    fn key(rpm: Option<u32>, tpm: Option<u64>) -> ApiKey {
        let owner = crate::fixtures::new_user("owner@example.com", Credits::ZERO);
        ApiKey {
            rate_limits: RateLimits { rpm, tpm },
            ..crate::fixtures::new_key(&owner, None, Timestamp(0))
        }
    }

    /// A limiter on `store` whose clock stands 10 s into a minute.
    fn limiter(store: Arc<dyn Store>, clock: &ManualClock) -> RateLimiter {
        RateLimiter::new(store, Arc::new(clock.clone()), RateLimits::NONE)
    }

    fn clock() -> ManualClock {
        ManualClock::new(Timestamp(1_767_225_600_000 + 10_000))
    }

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(6_000)), "6s");
        assert_eq!(go_duration(Duration::from_millis(5_001)), "6s");
        assert_eq!(go_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }

    #[cfg(feature = "testkit")]
    #[tokio::test]
    async fn an_owned_store_counts_exactly_in_memory() {
        let store = Arc::new(InstrumentedStore::new());
        let clock = clock();
        let l = limiter(store.clone(), &clock);
        let k = key(Some(3), None);
        let mut st = RateStatus::default();
        for left in (0..3).rev() {
            l.admit(&k, 10, &mut st).await.unwrap();
            let r = st.requests.unwrap();
            assert_eq!((r.limit, r.remaining), (3, left));
            assert_eq!(r.reset, Duration::from_secs(50));
            assert_eq!(st.tokens, None, "no tokens limit: nothing shown");
        }
        match l.admit(&k, 10, &mut st).await {
            Err(Error::RateLimitExceeded {
                tokens: false,
                retry_after,
                message,
            }) => {
                assert_eq!(retry_after, Duration::from_secs(50));
                assert!(
                    message.contains("Limit 3, Used 3, Requested 1"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(st.requests.unwrap().remaining, 0);
        // The next minute allows calls again; the past one is forgotten.
        clock.advance(Duration::from_secs(50));
        l.admit(&k, 10, &mut st).await.unwrap();
        assert_eq!(st.requests.unwrap().remaining, 2);
        l.upkeep();
        assert_eq!(l.held(), 1);
        clock.advance(Duration::from_secs(60));
        l.upkeep();
        assert_eq!(l.held(), 0);
        assert_eq!(
            store.take_calls().get("add_rate_usage"),
            None,
            "no store call"
        );
    }

    #[tokio::test]
    async fn tokens_count_the_bound_then_what_was_used() {
        let clock = clock();
        let l = limiter(Arc::new(MemoryStore::new()), &clock);
        let k = key(None, Some(1_000));
        let mut st = RateStatus::default();
        let t = l.admit(&k, 600, &mut st).await.unwrap();
        assert_eq!(st.tokens.unwrap().remaining, 400);
        let e = l.admit(&k, 600, &mut st).await.unwrap_err();
        assert!(
            matches!(e, Error::RateLimitExceeded { tokens: true, .. }),
            "{e:?}"
        );
        // It used 100 of its 600: the other 500 come back, once.
        t.settled(100);
        t.settled(0);
        assert_eq!(l.status(&k).tokens.unwrap().remaining, 900);
        let t2 = l.admit(&k, 600, &mut st).await.unwrap();
        // A call whose hold failed gives everything back.
        t2.cancel();
        assert_eq!(l.status(&k).tokens.unwrap().remaining, 900);
        // A call larger than the limit can never pass, and says so.
        let e = l.admit(&k, 1_001, &mut st).await.unwrap_err();
        assert!(e.to_string().contains("Request too large"), "{e}");
    }

    #[tokio::test]
    async fn an_account_limit_holds_over_all_its_keys() {
        let clock = clock();
        let account = RateLimits {
            rpm: Some(2),
            tpm: None,
        };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let l = RateLimiter::new(store, Arc::new(clock.clone()), account);
        let a = key(Some(10), None);
        let mut b = key(None, None);
        b.user_id = a.user_id.clone();
        let mut st = RateStatus::default();
        l.admit(&a, 1, &mut st).await.unwrap();
        // The tighter of the key's (9 left) and the account's (1 left) shows.
        assert_eq!(st.requests.unwrap().remaining, 1);
        assert_eq!(st.requests.unwrap().limit, 2);
        l.admit(&b, 1, &mut st).await.unwrap();
        assert!(l.admit(&a, 1, &mut st).await.is_err());
        // The key's own window gave its request back when the account refused.
        let key_only = l.shard(&Subject::Key(a.id.clone())).lock()[&Subject::Key(a.id.clone())]
            .requests
            .used;
        assert_eq!(key_only, 1);
    }

    #[cfg(feature = "testkit")]
    #[tokio::test]
    async fn a_take_the_store_failed_is_a_503_and_the_next_call_takes_again() {
        let store = Arc::new(InstrumentedStore::new().shared());
        let clock = clock();
        let l = limiter(store.clone(), &clock);
        let k = key(Some(32), None);
        let mut st = RateStatus::default();
        store.lose_next_answer("add_rate_usage");
        let e = l.admit(&k, 1, &mut st).await.unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        // The lost take was counted by the store: its slice is gone, not
        // granted twice. The next take asks for what this call needs.
        l.admit(&k, 1, &mut st).await.unwrap();
        let shown = st.requests.unwrap();
        assert_eq!((shown.limit, shown.remaining), (32, 32 - 2 - 1));
        let w = l.shard(&Subject::Key(k.id.clone())).lock()[&Subject::Key(k.id.clone())].short;
        assert_eq!(w, (0, 0), "no call is left counted as waiting");
    }

    #[cfg(feature = "testkit")]
    #[tokio::test]
    async fn hosts_sharing_a_store_never_admit_past_the_limit() {
        let store = Arc::new(InstrumentedStore::new().shared());
        let clock = clock();
        let hosts = [
            limiter(store.clone(), &clock),
            limiter(store.clone(), &clock),
        ];
        let k = key(Some(100), None);
        let mut admitted = [0u64; 2];
        let mut refused_at = None;
        for i in 0..300 {
            let h = i % 2;
            let mut st = RateStatus::default();
            match hosts[h].admit(&k, 1, &mut st).await {
                Ok(_) => admitted[h] += 1,
                Err(Error::RateLimitExceeded { .. }) => {
                    refused_at.get_or_insert(i);
                }
                Err(e) => panic!("{e}"),
            }
        }
        let total = admitted[0] + admitted[1];
        // Never more than the limit; at most about a slice and a half
        // (100 / 16 = 6, so 9) per host left unused in its memory.
        assert!(total <= 100, "{admitted:?}");
        assert!(total >= 100 - 2 * 9, "{admitted:?}");
        assert!(admitted[0] > 40 && admitted[1] > 40, "{admitted:?}");
        // Slices, not a store call per call.
        let takes = store.take_calls()["add_rate_usage"];
        assert!(takes <= 2 * (100 / 6 + 2), "{takes} takes");
        // The next minute, both admit again.
        clock.advance(Duration::from_secs(60));
        let mut st = RateStatus::default();
        hosts[0].admit(&k, 1, &mut st).await.unwrap();
        hosts[1].admit(&k, 1, &mut st).await.unwrap();
    }
}
