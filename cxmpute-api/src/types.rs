//! Domain types: identifiers, money, time, services, accounts, keys, providers,
//! provisions, pool entries, reservations, settlements and usage.
//!
//! Everything here is plain data shared by the broker and every store. Money is
//! [`Credits`]: whole micro-credits in an `i64`, never a float.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::secret::KeyHash;
use crate::Error;

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        string_id!($(#[$meta])* $name, $prefix, "A fresh random id.", random_id);
    };
    // `$make` builds a fresh id from the prefix.
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $generated:literal, $make:path) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The prefix every generated id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            #[doc = $generated]
            pub fn generate() -> Self {
                Self($make($prefix))
            }

            /// Wraps an existing id (from a store row or a path parameter).
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as text.
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

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A user account.
    UserId,
    "usr_"
);
string_id!(
    /// An API key (not the secret: the key's public id).
    ApiKeyId,
    "key_"
);
string_id!(
    /// A provider account.
    ProviderId,
    "prv_"
);
string_id!(
    /// A provision: one provider node.
    ProvisionId,
    "node_"
);
string_id!(
    /// One gateway request; also the idempotency key of its settlement.
    RequestId,
    "req_",
    "A fresh id: the time in microseconds (16 hex digits), raised past the \
     last id this process made so each id sorts after the one before, then \
     12 random characters that keep the ids of different processes apart. \
     In time order, a store's index of request ids takes appends at its end.",
    time_ordered_id
);

/// The last time [`time_ordered_id`] handed out, in microseconds.
static LAST_TOKEN_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `prefix`, then the wall-clock time in microseconds, as 16 hex digits
/// (fixed width, so text order is time order), bumped past the last one
/// this process made so that each id sorts after the one before; then 12
/// random characters, which keep ids of different processes (hosts sharing
/// a store) apart.
///
/// Why: a store keeps settled calls in an index by request id. Random ids
/// land each insert on a random page of that index; SQLite splits those
/// pages and, to keep siblings in page order, renumbers them through a
/// scratch page number past the end of the file, which makes the next
/// commit walk the writer's whole page cache (64 MiB of it). Ids that
/// grow append at the index's end instead; the bump makes each one the
/// last, also when many are made in one tick of the clock. The time only
/// orders; a clock that steps back is ridden over by the bump.
fn time_ordered_id(prefix: &str) -> String {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let after = |last: u64| now.max(last.saturating_add(1));
    // The closure always agrees to the update, so this is the value it
    // replaced either way.
    let (Ok(last) | Err(last)) =
        LAST_TOKEN_MICROS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(after(l)));
    let mut id = String::with_capacity(prefix.len() + 16 + 12);
    id.push_str(prefix);
    // Writing to a String cannot fail.
    let _ = std::fmt::Write::write_fmt(&mut id, format_args!("{:016x}", after(last)));
    crate::secret::push_random(&mut id, 12);
    id
}

/// `prefix`, then 16 random characters, in one allocation.
fn random_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    crate::secret::push_random(&mut id, 16);
    id
}

string_id!(
    /// A notification shown on dashboards.
    NotificationId,
    "ntf_"
);
string_id!(
    /// A family of refresh tokens born from one sign-in.
    TokenFamilyId,
    "fam_"
);

/// An amount of money in micro-credits (1 credit = 1,000,000 micro-credits).
///
/// Integer arithmetic only; the helpers saturate instead of wrapping so a
/// hostile input can never turn a charge into a gift.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credits(pub i64);

impl Credits {
    /// Zero credits.
    pub const ZERO: Credits = Credits(0);
    /// Micro-credits in one credit.
    pub const MICROS_PER_CREDIT: i64 = 1_000_000;

    /// From micro-credits.
    pub const fn micros(m: i64) -> Self {
        Credits(m)
    }

    /// From whole credits.
    pub const fn whole(c: i64) -> Self {
        Credits(c.saturating_mul(Self::MICROS_PER_CREDIT))
    }

    /// The amount in micro-credits.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Saturating addition.
    pub const fn saturating_add(self, o: Credits) -> Credits {
        Credits(self.0.saturating_add(o.0))
    }

    /// Saturating subtraction.
    pub const fn saturating_sub(self, o: Credits) -> Credits {
        Credits(self.0.saturating_sub(o.0))
    }

    /// The smaller of two amounts.
    pub fn min(self, o: Credits) -> Credits {
        Credits(self.0.min(o.0))
    }

    /// Whether the amount is below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl fmt::Display for Credits {
    /// Whole credits with six decimals, e.g. `1.250000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", a / 1_000_000, a % 1_000_000)
    }
}

impl fmt::Debug for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credits({self})")
    }
}

/// Milliseconds since the Unix epoch, from a [`Clock`](crate::clock::Clock).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// This instant plus a duration.
    pub fn plus(self, d: std::time::Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// This instant minus a duration.
    pub fn minus(self, d: std::time::Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// The UTC day this instant falls on.
    pub fn day(self) -> Day {
        Day(self.0.div_euclid(86_400_000) as i32)
    }
}

/// A UTC calendar day, counted in days since 1970-01-01. Shown as `YYYY-MM-DD`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i32);

impl Day {
    /// The (year, month, day) of this day in the proleptic Gregorian calendar.
    pub fn ymd(self) -> (i32, u32, u32) {
        // Howard Hinnant's civil_from_days.
        let z = self.0 as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        ((y + i64::from(m <= 2)) as i32, m, d)
    }

    /// The day for a calendar date; `None` when the date does not exist.
    pub fn from_ymd(y: i32, m: u32, d: u32) -> Option<Day> {
        if !(1..=12).contains(&m) || d == 0 || d > 31 {
            return None;
        }
        // Howard Hinnant's days_from_civil.
        let y = i64::from(y) - i64::from(m <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (i64::from(m) + 9) % 12;
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let day = Day((era * 146_097 + doe - 719_468) as i32);
        (day.ymd() == (y as i32 + i32::from(m <= 2), m, d)).then_some(day)
    }

    /// The day `n` days later.
    pub fn plus_days(self, n: i32) -> Day {
        Day(self.0.saturating_add(n))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl fmt::Debug for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Day({self})")
    }
}

impl FromStr for Day {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidInput(format!("`{s}` is not a date (YYYY-MM-DD)"));
        let mut it = s.splitn(3, '-');
        let (y, m, d) = (it.next(), it.next(), it.next());
        let (Some(y), Some(m), Some(d)) = (y, m, d) else {
            return Err(bad());
        };
        let y = y.parse().map_err(|_| bad())?;
        let m = m.parse().map_err(|_| bad())?;
        let d = d.parse().map_err(|_| bad())?;
        Day::from_ymd(y, m, d).ok_or_else(bad)
    }
}

impl Serialize for Day {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Day {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A kind of AI service the marketplace sells.
///
/// Exhaustive on purpose: the host matches on it everywhere a service is
/// handled, so a new service cannot be forgotten in any of those places; a
/// new one changes [`Service::ALL`]'s length anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// Chat completions.
    Chat,
    /// Embeddings.
    Embeddings,
    /// Text to speech.
    Tts,
    /// Web scraping.
    Scrape,
    /// Vision: caption, query, detect, point.
    Vision,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 5] = [
        Service::Chat,
        Service::Embeddings,
        Service::Tts,
        Service::Scrape,
        Service::Vision,
    ];

    /// The stable lowercase name (`chat`, `embeddings`, ...), as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Chat => "chat",
            Service::Embeddings => "embeddings",
            Service::Tts => "tts",
            Service::Scrape => "scrape",
            Service::Vision => "vision",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Service::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown service `{s}`")))
    }
}

/// A gateway route a key may be permitted to call.
///
/// Exhaustive for the same reason as [`Service`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Route {
    /// `POST /v1/chat/completions`
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    /// `POST /v1/embeddings`
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
    /// `POST /v1/audio/speech`
    #[serde(rename = "/v1/audio/speech")]
    AudioSpeech,
    /// `POST /v1/tts`
    #[serde(rename = "/v1/tts")]
    Tts,
    /// `POST /v1/scrape`
    #[serde(rename = "/v1/scrape")]
    Scrape,
    /// `POST /v1/m/caption`
    #[serde(rename = "/v1/m/caption")]
    Caption,
    /// `POST /v1/m/query`
    #[serde(rename = "/v1/m/query")]
    Query,
    /// `POST /v1/m/detect`
    #[serde(rename = "/v1/m/detect")]
    Detect,
    /// `POST /v1/m/point`
    #[serde(rename = "/v1/m/point")]
    Point,
}

impl Route {
    /// Every gateway route.
    pub const ALL: [Route; 9] = [
        Route::ChatCompletions,
        Route::Embeddings,
        Route::AudioSpeech,
        Route::Tts,
        Route::Scrape,
        Route::Caption,
        Route::Query,
        Route::Detect,
        Route::Point,
    ];

    /// The HTTP path of the route, e.g. `/v1/chat/completions`.
    pub const fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::AudioSpeech => "/v1/audio/speech",
            Route::Tts => "/v1/tts",
            Route::Scrape => "/v1/scrape",
            Route::Caption => "/v1/m/caption",
            Route::Query => "/v1/m/query",
            Route::Detect => "/v1/m/detect",
            Route::Point => "/v1/m/point",
        }
    }

    /// The service the route sells.
    pub const fn service(self) -> Service {
        match self {
            Route::ChatCompletions => Service::Chat,
            Route::Embeddings => Service::Embeddings,
            Route::AudioSpeech | Route::Tts => Service::Tts,
            Route::Scrape => Service::Scrape,
            Route::Caption | Route::Query | Route::Detect | Route::Point => Service::Vision,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

impl FromStr for Route {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Route::ALL
            .into_iter()
            .find(|r| r.path() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown route `{s}`")))
    }
}

/// Why and by whom an account was suspended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Suspension {
    /// The reason given.
    pub reason: String,
    /// Who suspended it (an admin's user id, or `system`).
    pub by: String,
    /// When.
    pub at: Timestamp,
}

/// A user account: the one who pays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Its id.
    pub id: UserId,
    /// Its sign-in email, lower-cased; unique.
    pub email: String,
    /// Credits available (reservations already taken out).
    pub credits: Credits,
    /// Whether the account may use the admin API.
    pub is_admin: bool,
    /// Set while the account is suspended.
    pub suspended: Option<Suspension>,
    /// When it was created.
    pub created_at: Timestamp,
    /// How much the account may spend per day or month, over all its keys
    /// (absent: no budget).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// When the account wants an email.
    #[serde(default)]
    pub alerts: Alerts,
    /// Which alert emails were sent (the marks hosts take before sending).
    #[serde(default)]
    pub alerted: AlertMarks,
}

/// When an account wants an email: its balance fell below a threshold, or
/// its budget's spending in the current period reached a share of the limit.
/// `None` is no email.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Alerts {
    /// An email when the balance falls below this many micro-credits.
    #[serde(default)]
    pub balance_below: Option<Credits>,
    /// An email when the account budget's spending this period reaches this
    /// percentage of its limit (1 to 100).
    #[serde(default)]
    pub budget_percent: Option<u8>,
}

/// The alert emails sent, one mark per kind, each taken with an atomic
/// conditional write ([`AlertKind`]) so that one host sends each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AlertMarks {
    /// When the balance alert of the current crossing was sent; cleared when
    /// a grant brings the balance back to the threshold or above.
    #[serde(default)]
    pub balance: Option<Timestamp>,
    /// The start of the last budget period whose alert was sent.
    #[serde(default)]
    pub budget: Option<Timestamp>,
}

impl AlertMarks {
    /// The mark of one kind.
    pub fn get(&self, kind: AlertKind) -> Option<Timestamp> {
        match kind {
            AlertKind::Balance => self.balance,
            AlertKind::Budget => self.budget,
        }
    }

    /// Sets the mark of one kind.
    pub fn set(&mut self, kind: AlertKind, to: Option<Timestamp>) {
        match kind {
            AlertKind::Balance => self.balance = to,
            AlertKind::Budget => self.budget = to,
        }
    }
}

/// The kinds of alert email.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The balance fell below `balance_below`.
    Balance,
    /// The budget's spending reached `budget_percent`.
    Budget,
}

/// A change to an account's budget or alerts. `None` leaves a field as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSettingsUpdate {
    /// A new budget: `Some(None)` removes it.
    #[serde(default)]
    pub budget: Option<Option<Budget>>,
    /// New alerts (replacing the old ones).
    #[serde(default)]
    pub alerts: Option<Alerts>,
}

/// An API key. The secret itself is never stored, only its [`KeyHash`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Its public id.
    pub id: ApiKeyId,
    /// Its owner.
    pub user_id: UserId,
    /// SHA-256 of the secret; unique.
    pub hash: KeyHash,
    /// A name the owner chose.
    pub name: String,
    /// The first characters of the secret, for display.
    pub prefix: String,
    /// The key's own spending limit; `None` means only the account balance limits it.
    pub credit_limit: Option<Credits>,
    /// What is left of the limit; `None` when the key has no limit.
    pub credits_left: Option<Credits>,
    /// The routes the key may call; empty means every route.
    pub permitted_routes: Vec<Route>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last used to admit a request.
    pub last_used_at: Option<Timestamp>,
    /// Set once the key is revoked; a revoked key never works again.
    pub revoked_at: Option<Timestamp>,
    /// How fast the key may call (absent in stored JSON: no limit).
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// How much the key may spend per day or month (absent: no budget).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The response cache's settings for the key (absent: off, not shared).
    #[serde(default)]
    pub cache: KeyCacheSettings,
}

/// A key's response-cache settings: a default time to live for calls that
/// send no `X-Cxmpute-Cache` header, and whether its entries are shared with
/// other accounts' keys that have sharing on (an operator's choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyCacheSettings {
    /// Seconds an answer is kept when the call does not say (`None`: calls
    /// without the header are not cached).
    #[serde(default)]
    pub ttl_secs: Option<u32>,
    /// Whether the key reads and writes the shared namespace instead of its
    /// account's own (set by an admin only).
    #[serde(default)]
    pub shared: bool,
}

/// What a call asks of the response cache (`X-Cxmpute-Cache`): `ttl=N`
/// (seconds; `ttl=0` is `no-store`) or `no-store`. A call without the header
/// follows its key's [`KeyCacheSettings::ttl_secs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheDirective {
    /// Answer from the cache when an entry is there, else keep the answer
    /// for this many seconds (at least 1).
    Ttl(u32),
    /// Neither read nor write the cache.
    NoStore,
}

impl CacheDirective {
    /// The request header's name.
    pub const HEADER: &'static str = "x-cxmpute-cache";

    /// Parses the header's value: `ttl=N` or `no-store` (case and spaces
    /// around ignored); `None` when it is neither.
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim();
        if v.eq_ignore_ascii_case("no-store") {
            return Some(CacheDirective::NoStore);
        }
        let (name, n) = v.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("ttl") {
            return None;
        }
        let n = n.trim();
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(match n.parse::<u32>().ok()? {
            0 => CacheDirective::NoStore,
            n => CacheDirective::Ttl(n),
        })
    }

    /// The header's value for this directive.
    pub fn header_value(&self) -> String {
        match self {
            CacheDirective::Ttl(n) => format!("ttl={n}"),
            CacheDirective::NoStore => "no-store".to_owned(),
        }
    }
}

/// A spending limit per UTC calendar day or month of the broker's clock,
/// starting again on its own with the next period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Budget {
    /// What may be spent in one period, in micro-credits (at least 1).
    pub limit: Credits,
    /// The period.
    pub period: BudgetPeriod,
}

/// The period a [`Budget`] counts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl BudgetPeriod {
    /// Its name on the wire and in the store (`day`, `month`).
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }

    /// The period named `s` (`day`, `month`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            _ => None,
        }
    }
}

/// How fast a key may call: requests and tokens (input and output, as a
/// call's bound counts them) per minute. `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RateLimits {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
}

impl RateLimits {
    /// No limit at all.
    pub const NONE: RateLimits = RateLimits {
        rpm: None,
        tpm: None,
    };

    /// Whether either limit is set.
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// What a rate window's counters hold in the store: requests and tokens
/// counted by every host sharing it (see `UserStore::add_rate_usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateUsage {
    /// Requests.
    pub requests: u64,
    /// Tokens.
    pub tokens: u64,
}

impl ApiKey {
    /// Whether the key may call `route`.
    pub fn permits(&self, route: Route) -> bool {
        self.permitted_routes.is_empty() || self.permitted_routes.contains(&route)
    }
}

/// A change to an API key's limit, routes or name. `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new limit: `Some(None)` removes the limit. `credits_left` moves by the
    /// same amount as the limit, never below zero.
    pub credit_limit: Option<Option<Credits>>,
    /// New permitted routes (empty: every route).
    pub permitted_routes: Option<Vec<Route>>,
    /// A new requests-per-minute limit: `Some(None)` removes it.
    pub rpm: Option<Option<u32>>,
    /// A new tokens-per-minute limit: `Some(None)` removes it.
    pub tpm: Option<Option<u64>>,
    /// A new budget: `Some(None)` removes it.
    #[serde(default)]
    pub budget: Option<Option<Budget>>,
    /// A new default cache TTL in seconds: `Some(None)` removes it.
    #[serde(default)]
    pub cache_ttl_secs: Option<Option<u32>>,
    /// Whether the key shares the cache across accounts (admins only).
    #[serde(default)]
    pub cache_shared: Option<bool>,
}

/// A provider account: the one who runs nodes and earns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// Its id.
    pub id: ProviderId,
    /// The user account it belongs to, when it has one.
    pub user_id: Option<UserId>,
    /// A contact email.
    pub email: String,
    /// SHA-256 of the provider key; unique.
    pub key_hash: KeyHash,
    /// Rewards earned and not paid out.
    pub earnings: Credits,
    /// Set while the provider is suspended.
    pub suspended: Option<Suspension>,
    /// When it was created.
    pub created_at: Timestamp,
}

/// Where a node says it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Location {
    /// Country (ISO code or name).
    #[serde(default)]
    pub country: String,
    /// State or region.
    #[serde(default)]
    pub state: String,
    /// City.
    #[serde(default)]
    pub city: String,
}

/// The lifecycle state of a provision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ProvisionState {
    /// Registered; not serving yet.
    Registered,
    /// Services assigned by the broker; starting them.
    Starting,
    /// Serving: its pool entries are routable.
    Ready,
    /// Ended by its provider or expired; serves nothing.
    Ended,
}

impl ProvisionState {
    /// The stable lowercase name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProvisionState::Registered => "registered",
            ProvisionState::Starting => "starting",
            ProvisionState::Ready => "ready",
            ProvisionState::Ended => "ended",
        }
    }
}

impl FromStr for ProvisionState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        [Self::Registered, Self::Starting, Self::Ready, Self::Ended]
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown provision state `{s}`")))
    }
}

/// One provider node.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provision {
    /// Its id.
    pub id: ProvisionId,
    /// The provider that owns it; only that provider may manage it.
    pub provider_id: ProviderId,
    /// The base URL the broker forwards to (`{endpoint}/v1/chat/completions`, ...).
    pub endpoint: Option<String>,
    /// The secret the broker sends to the node so the node serves only the broker.
    pub node_secret: String,
    /// Device diagnostics as the node reported them (free-form JSON, size-capped by the API).
    pub device: serde_json::Value,
    /// Where the node says it is.
    pub location: Location,
    /// Capacity tier (1-4 by VRAM, as the original tiered nodes).
    pub tier: u8,
    /// Lifecycle state.
    pub state: ProvisionState,
    /// When the node was last heard from.
    pub last_heartbeat: Timestamp,
    /// When it was registered.
    pub created_at: Timestamp,
}

impl fmt::Debug for Provision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provision")
            .field("id", &self.id)
            .field("provider_id", &self.provider_id)
            .field("endpoint", &self.endpoint)
            .field("node_secret", &"<redacted>")
            .field("location", &self.location)
            .field("tier", &self.tier)
            .field("state", &self.state)
            .field("last_heartbeat", &self.last_heartbeat)
            .finish_non_exhaustive()
    }
}

/// One routable (node, service, model): a node serving two models has two entries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// The node.
    pub provision_id: ProvisionId,
    /// Its provider, who earns the rewards.
    pub provider_id: ProviderId,
    /// The service.
    pub service: Service,
    /// The model name, kept whole (`llama3.2:3b`).
    pub model: String,
    /// The node's base URL.
    pub endpoint: String,
    /// The secret the broker presents to the node.
    pub node_secret: String,
    /// The node's capacity tier, for tiered rewards.
    pub tier: u8,
    /// The node's region (its location's country), for routing constraints.
    pub region: String,
}

impl fmt::Debug for PoolEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolEntry")
            .field("provision_id", &self.provision_id)
            .field("provider_id", &self.provider_id)
            .field("service", &self.service)
            .field("model", &self.model)
            .field("endpoint", &self.endpoint)
            .field("node_secret", &"<redacted>")
            .field("tier", &self.tier)
            .field("region", &self.region)
            .finish()
    }
}

/// A hold on a user's credits (and the key's limit) for one request in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The request; the reservation's idempotency key.
    pub request_id: RequestId,
    /// Who pays.
    pub user_id: UserId,
    /// With which key.
    pub key_id: ApiKeyId,
    /// The route called (checked against the key's permitted routes).
    pub route: Route,
    /// How much is held: the most the request can cost.
    pub amount: Credits,
    /// When it was taken (stale reservations are released after a while).
    pub created_at: Timestamp,
}

/// The final accounting of one request: applied once, atomically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The request (its reservation must exist unless already settled).
    pub request_id: RequestId,
    /// What the user pays; at most the reservation (the rest is released).
    pub charged: Credits,
    /// The provider's reward, if the request succeeded on a node.
    pub reward: Option<(ProviderId, Credits)>,
    /// The usage record stored with it.
    pub usage: UsageRecord,
}

/// What became of a settlement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Applied now.
    Applied,
    /// The same request id was settled before; nothing changed.
    AlreadySettled,
}

/// One request's usage, stored with its settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The request.
    pub request_id: RequestId,
    /// Who called.
    pub user_id: UserId,
    /// With which key.
    pub key_id: ApiKeyId,
    /// The route.
    pub route: Route,
    /// The model asked for.
    pub model: String,
    /// The node that served it (the last one tried).
    pub provision_id: Option<ProvisionId>,
    /// Its provider.
    pub provider_id: Option<ProviderId>,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Other units (TTS characters, scraped URLs, images).
    pub units: u64,
    /// Whether the request succeeded.
    pub success: bool,
    /// Wall time from admission to the end of the answer.
    pub latency_ms: u64,
    /// The calling application (`X-Title` / `HTTP-Referer`), if named.
    pub app: Option<String>,
    /// When it finished.
    pub at: Timestamp,
    /// What the user paid.
    pub charged: Credits,
    /// What the provider earned.
    pub reward: Credits,
    /// The name the caller asked for (its `model`, else the first of its
    /// `models`; an alias as written) when another model served it: a
    /// fallback or an alias. `None` when the served model is the one asked for.
    #[serde(default)]
    pub requested_model: Option<String>,
    /// Whether it was answered from the response cache (no provider, no
    /// reward; charged the cache price).
    #[serde(default)]
    pub cache_hit: bool,
}

/// Sums over every settlement, for audits: `charged == rewarded + platform`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerTotals {
    /// Settlements applied.
    pub settlements: u64,
    /// Total charged to users.
    pub charged: Credits,
    /// Total rewarded to providers.
    pub rewarded: Credits,
    /// Total the users still hold in open reservations.
    pub reserved: Credits,
}

impl LedgerTotals {
    /// What the platform kept.
    pub fn platform(&self) -> Credits {
        self.charged.saturating_sub(self.rewarded)
    }
}

/// A manual change to a user's balance, recorded with who and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreditGrant {
    /// Whose balance.
    pub user_id: UserId,
    /// How much (negative removes credits; never below zero).
    pub amount: Credits,
    /// Who did it.
    pub by: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: Timestamp,
}

/// A price for one service (and optionally one model).
///
/// Cost of a request = `per_request` + tokens and units at the per-million
/// rates, each rounded up to a whole micro-credit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceEntry {
    /// The service priced.
    pub service: Service,
    /// The model; `None` is the service's default price.
    pub model: Option<String>,
    /// Charged once per request.
    #[serde(default)]
    pub per_request: Credits,
    /// Per million input tokens.
    #[serde(default)]
    pub per_million_input_tokens: Credits,
    /// Per million output tokens.
    #[serde(default)]
    pub per_million_output_tokens: Credits,
    /// Per million units (TTS characters, scraped URLs, images).
    #[serde(default)]
    pub per_million_units: Credits,
}

/// One model the network offers, and how much of the network should serve it:
/// an entry of the catalogue, which the store keeps (one per service and
/// model) and every host reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CatalogueModel {
    /// The service.
    pub service: Service,
    /// The model name, whole (`llama3.2:3b`).
    pub model: String,
    /// The least tier (1-4) a node needs to serve it.
    pub min_tier: u8,
    /// How many nodes the network wants serving it. 0: never assigned, but a
    /// node of the tier may still serve it.
    pub target_nodes: u32,
}

/// A name the operator defines for an ordered list of models (`fast` ->
/// `llama3.2:3b`, then `llama3.2:1b`): a request naming it is tried as if it
/// named that `models` list. Kept with the catalogue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelAlias {
    /// The alias (`fast`): a model name no catalogue entry uses.
    pub alias: String,
    /// The models it stands for, in the order they are tried (1-4).
    pub models: Vec<String>,
}

impl CatalogueModel {
    /// A catalogue entry.
    pub fn new(service: Service, model: &str, min_tier: u8, target_nodes: u32) -> Self {
        CatalogueModel {
            service,
            model: model.to_owned(),
            min_tier,
            target_nodes,
        }
    }
}

/// A one-time sign-in code, stored hashed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCode {
    /// The email it was sent to (lower-cased).
    pub email: String,
    /// SHA-256 of the code.
    pub code_hash: KeyHash,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When it was issued.
    pub created_at: Timestamp,
}

/// A refresh token, stored hashed; one use, then rotated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshToken {
    /// SHA-256 of the token.
    pub hash: KeyHash,
    /// The family: every token rotated from one sign-in.
    pub family: TokenFamilyId,
    /// Whose session.
    pub user_id: UserId,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When it was issued.
    pub created_at: Timestamp,
}

/// Where a notification is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The public homepage.
    Homepage,
    /// The user dashboard.
    UserDashboard,
    /// The provider dashboard.
    ProviderDashboard,
}

/// A notification with its display window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Notification {
    /// Its id.
    pub id: NotificationId,
    /// Title.
    pub title: String,
    /// Banner text.
    #[serde(default)]
    pub banner: String,
    /// Popup content.
    #[serde(default)]
    pub popup: String,
    /// Shown from.
    pub starts_at: Timestamp,
    /// Shown until.
    pub ends_at: Timestamp,
    /// Where.
    pub placements: Vec<Placement>,
}

/// Counters for one day and one scope, added to by [`StatsBatch`]es.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsCounters {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other units.
    pub units: u64,
    /// Sum of latencies, for the average.
    pub latency_ms_sum: u64,
    /// Latency histogram: counts per [`LATENCY_BUCKETS_MS`] upper bound, last is overflow.
    pub latency_buckets: Vec<u64>,
    /// Micro-credits charged.
    pub charged: i64,
    /// Micro-credits rewarded.
    pub rewarded: i64,
}

/// Upper bounds (ms) of the latency histogram buckets kept per day and scope.
pub const LATENCY_BUCKETS_MS: [u64; 15] = [
    25, 50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 30_000, 60_000,
];

impl StatsCounters {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &StatsCounters) {
        self.requests += o.requests;
        self.failures += o.failures;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.units += o.units;
        self.latency_ms_sum += o.latency_ms_sum;
        if self.latency_buckets.len() < o.latency_buckets.len() {
            self.latency_buckets.resize(o.latency_buckets.len(), 0);
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(&o.latency_buckets) {
            *a += b;
        }
        self.charged += o.charged;
        self.rewarded += o.rewarded;
    }
}

/// A batch of stats deltas, applied once: a retried batch with the same id adds nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsBatch {
    /// The batch's idempotency key.
    pub id: String,
    /// The deltas: (day, scope, counters). Scopes are strings such as
    /// `endpoint:/v1/chat/completions`, `model:chat:llama3.2:3b`, `app:MyApp`,
    /// `user:usr_..`, `provider:prv_..`, `network`.
    pub deltas: Vec<(Day, String, StatsCounters)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_micros() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    }

    /// The time a request id starts with, in microseconds.
    fn micros_of(id: &RequestId) -> u128 {
        let token = id.as_str().strip_prefix(RequestId::PREFIX).unwrap();
        assert_eq!(token.len(), 28, "{id:?}");
        assert!(token[16..].bytes().all(|b| b.is_ascii_alphanumeric()));
        u128::from_str_radix(&token[..16], 16).unwrap()
    }

    #[test]
    fn request_ids_start_with_the_time_they_were_made() {
        let before = now_micros();
        let id = RequestId::generate();
        let after = now_micros();
        // The bump may carry an id a little past the clock when ids are
        // made faster than one a microsecond (other tests make many).
        assert!(micros_of(&id) >= before, "{id:?}");
        assert!(micros_of(&id) < after + 1_000_000, "{id:?}");
    }

    #[test]
    fn each_request_id_sorts_after_the_one_before() {
        let ids: Vec<_> = (0..10_000).map(|_| RequestId::generate()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{:?} then {:?}", pair[0], pair[1]);
        }
    }

    #[test]
    fn other_ids_stay_random() {
        let id = UserId::generate();
        let token = id.as_str().strip_prefix(UserId::PREFIX).unwrap();
        assert_eq!(token.len(), 16);
        assert_ne!(UserId::generate(), id);
    }
}
