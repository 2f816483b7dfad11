//! Accounts and sessions: sign-in by email code, session tokens, API key
//! management, the provider account and the admin actions.
//!
//! [`Accounts`] is a cheap view over a [`Broker`] (`broker.accounts()`); the
//! HTTP routes in `http::account`, `http::provider_account` and `http::admin`
//! are thin wrappers around it, and an embedder can call it directly.
//!
//! ## Sign-in
//!
//! 1. [`Accounts::request_code`]: a random 8-digit code is stored as a keyed
//!    hash (HMAC with a key derived from the session secret, so a leaked
//!    table of hashes cannot be brute-forced offline), expires after
//!    [`AuthConfig::code_ttl`], and is mailed. Requests are limited per email
//!    (by the store), per client address ([`AuthConfig::codes_per_client`])
//!    and in all ([`AuthConfig::codes_overall`]); a refused request mails
//!    nothing. The answer never depends on whether the account exists.
//! 2. [`Accounts::verify_code`]: the store checks the code atomically (single
//!    use, at most [`AuthConfig::code_max_attempts`] wrong tries, after which
//!    even the right code fails). The first success creates the account, user
//!    and provider side, exactly once: creates are create-if-absent and a lost
//!    race reads the winner's row.
//! 3. A session: a short-lived HS256 access token (JWT) and an opaque refresh
//!    token stored hashed. Each refresh rotates it; presenting a used refresh
//!    token revokes its whole family (someone copied it). Logout revokes the
//!    family too. Refreshes are limited per session
//!    ([`AuthConfig::refreshes_per_session`]), and expired tokens are deleted
//!    by the maintenance round.
//!
//! Access tokens are checked by signature and expiry against the broker's
//! clock. A revoked family's access tokens are refused at once on the host
//! that saw the revocation and expire within [`AuthConfig::access_ttl`]
//! everywhere else: the store keeps revocation only for refresh tokens.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::analytics::{per_day, DateRange};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::secret::{random_token, KeyHash, Secret};
use crate::stats::scope;
use crate::types::*;
use crate::wire::*;

/// Issuer and audience of access tokens: a token of another system that
/// happens to share the secret is still refused.
const ISSUER: &str = "cxmpute";
const AUDIENCE: &str = "cxmpute-session";
/// Digits of a sign-in code: 10^8 codes against 5 tries per code.
const CODE_DIGITS: u32 = 8;
/// Longest code, refresh token or key name accepted from outside.
const MAX_TOKEN_LEN: usize = 512;
const MAX_NAME_LEN: usize = 100;
const MAX_REASON_LEN: usize = 1_000;
/// Days of history in a provider's earnings.
const EARNINGS_DAYS: i32 = 30;

/// Settings of sign-in, sessions and administration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AuthConfig {
    /// The secret that signs access tokens and keys the code hashes: at least
    /// 32 bytes, kept by the host across restarts (and shared by every host of
    /// one store). `None` draws a random one per process (development only:
    /// sessions and pending codes then end with the process).
    pub session_secret: Option<Secret>,
    /// Lifetime of an access token.
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (each refresh issues a new one).
    pub refresh_ttl: Duration,
    /// Lifetime of a sign-in code.
    pub code_ttl: Duration,
    /// Wrong tries after which a code is dead, even for the right code.
    pub code_max_attempts: u32,
    /// Codes one email may request per [`AuthConfig::code_window`].
    pub codes_per_window: u32,
    /// The window of the code rate limit.
    pub code_window: Duration,
    /// Codes one client may request, whatever the emails: one IP address, or
    /// one IPv6 /64 (a single host usually holds a whole /64). Default: 10,
    /// then one a minute. Needs the caller's address: the router sees it when
    /// served by [`crate::http::serve`] (or with axum's `ConnectInfo`), or
    /// from [`AuthConfig::client_ip_header`]; without either, only the
    /// per-email and overall limits apply.
    pub codes_per_client: RateLimit,
    /// Codes this host mails in all, to any addresses, so that no flood of
    /// distinct addresses and clients turns it into a spam cannon or burns
    /// the mail provider's quota. Default: 60, then one a second. The count
    /// is per host: hosts sharing a store each allow this much.
    pub codes_overall: RateLimit,
    /// Refreshes one session may make: default 10, then one a minute. A
    /// session's client refreshes once per access token (every
    /// [`AuthConfig::access_ttl`]); each refresh stores a token, kept until
    /// it expires, so an unbounded loop of them would grow the store.
    pub refreshes_per_session: RateLimit,
    /// Most clients, and most sessions, the per-client and per-session limits
    /// remember at once, so that their tables cannot themselves be flooded.
    /// When full, those whose allowance has refilled are forgotten first,
    /// then the half nearest to refilled.
    pub max_tracked: usize,
    /// The request header a trusted reverse proxy sets to the caller's address
    /// (e.g. `X-Real-IP`; for `X-Forwarded-For` the last address is taken,
    /// the one the proxy appended). Set it only behind a proxy that always
    /// sets it: anyone else may send it and pick their own address. `None`
    /// (the default) uses the connection's peer address.
    pub client_ip_header: Option<String>,
    /// Emails that hold the admin role (besides accounts stored as admins).
    pub admin_emails: Vec<String>,
    /// Credits a new account starts with (recorded as a grant by `system`).
    pub signup_credits: Credits,
    /// Most active API keys one user may hold.
    pub max_keys_per_user: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            session_secret: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            code_ttl: Duration::from_secs(10 * 60),
            code_max_attempts: 5,
            codes_per_window: 5,
            code_window: Duration::from_secs(3600),
            codes_per_client: RateLimit::new(10, Duration::from_secs(10 * 60)),
            codes_overall: RateLimit::new(60, Duration::from_secs(60)),
            refreshes_per_session: RateLimit::new(10, Duration::from_secs(10 * 60)),
            max_tracked: 100_000,
            client_ip_header: None,
            admin_emails: Vec::new(),
            signup_credits: Credits::ZERO,
            max_keys_per_user: 50,
        }
    }
}

impl AuthConfig {
    /// Sets the session secret.
    pub fn with_session_secret(mut self, secret: Secret) -> Self {
        self.session_secret = Some(secret);
        self
    }

    /// Grants the admin role to these emails.
    pub fn with_admin_emails(mut self, emails: impl IntoIterator<Item = String>) -> Self {
        self.admin_emails = emails.into_iter().collect();
        self
    }

    /// The defaults, adjusted from the process environment:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CXMPUTE_SESSION_SECRET` | signs sessions, keys code hashes; at least 32 bytes, the same on every host, kept across restarts |
    /// | `CXMPUTE_ADMIN_EMAILS` | comma-separated emails holding the admin role |
    /// | `CXMPUTE_SIGNUP_CREDITS` | micro-credits a new account starts with |
    /// | `CXMPUTE_ACCESS_TTL_SECS`, `CXMPUTE_REFRESH_TTL_SECS` | session token lifetimes |
    /// | `CXMPUTE_CLIENT_IP_HEADER` | the header a trusted reverse proxy puts the caller's address in ([`AuthConfig::client_ip_header`]) |
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`AuthConfig::from_env`], reading variables through `get` (a
    /// host's flags, a config file, a test).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut c = AuthConfig::default();
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let num = |k: &str, v: String| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Error::InvalidInput(format!("{k} `{v}` is not a whole number")))
        };
        if let Some(s) = var("CXMPUTE_SESSION_SECRET") {
            c.session_secret = Some(Secret::new(s));
        }
        if let Some(list) = var("CXMPUTE_ADMIN_EMAILS") {
            c.admin_emails = list
                .split(',')
                .filter(|e| !e.trim().is_empty())
                .map(normalize_email)
                .collect::<Result<_>>()?;
        }
        if let Some(h) = var("CXMPUTE_CLIENT_IP_HEADER") {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(Error::InvalidInput(format!(
                    "CXMPUTE_CLIENT_IP_HEADER `{h}` is not a header name"
                )));
            }
            c.client_ip_header = Some(h);
        }
        if let Some(v) = var("CXMPUTE_SIGNUP_CREDITS") {
            c.signup_credits = Credits(num("CXMPUTE_SIGNUP_CREDITS", v)?);
        }
        for (k, field) in [
            ("CXMPUTE_ACCESS_TTL_SECS", &mut c.access_ttl),
            ("CXMPUTE_REFRESH_TTL_SECS", &mut c.refresh_ttl),
        ] {
            if let Some(v) = var(k) {
                *field = Duration::from_secs(num(k, v)?.max(1) as u64);
            }
        }
        // Checked now, so a bad secret stops the host at start.
        if c.session_secret.is_some() {
            AuthState::new(&c)?;
        }
        Ok(c)
    }
}

/// A rate limit: a burst of up to `burst` at once, refilled evenly so that
/// a spent burst is whole again after `per` (`burst` per `per`, sustained).
/// A `burst` of 0 allows nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// How many at once.
    pub burst: u32,
    /// How long a spent burst takes to refill.
    pub per: Duration,
}

impl RateLimit {
    /// `burst` at once, refilled over `per`.
    pub const fn new(burst: u32, per: Duration) -> Self {
        RateLimit { burst, per }
    }

    /// Milliseconds between two refills (at least 1).
    fn interval_ms(self) -> i64 {
        let per = i64::try_from(self.per.as_millis()).unwrap_or(i64::MAX);
        (per / i64::from(self.burst.max(1))).max(1)
    }

    /// The generic cell rate algorithm over one number, the "theoretical
    /// arrival time" `tat` (a refilled allowance is `tat <= now`): `Ok` with
    /// the next `tat` when one more is allowed at `now`, else how long until
    /// it is.
    fn admit(self, tat: Option<i64>, now: i64) -> std::result::Result<i64, Duration> {
        if self.burst == 0 {
            return Err(self.per.max(Duration::from_secs(1)));
        }
        let t = self.interval_ms();
        let tolerance = t.saturating_mul(i64::from(self.burst) - 1);
        let tat = tat.unwrap_or(now).max(now);
        let wait = tat - now - tolerance;
        if wait > 0 {
            return Err(Duration::from_millis(wait.unsigned_abs()));
        }
        Ok(tat.saturating_add(t))
    }
}

/// What is left of each key's allowance under one [`RateLimit`] (a client's,
/// a session's), in memory and per host, for at most
/// [`AuthConfig::max_tracked`] keys, so that the table cannot itself be
/// flooded.
struct Allowances<K> {
    /// Each key's "theoretical arrival time" (see [`RateLimit::admit`]).
    tats: HashMap<K, i64>,
}

impl<K> Default for Allowances<K> {
    fn default() -> Self {
        Allowances {
            tats: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Allowances<K> {
    /// The key's next state if one more is allowed now, else when to retry.
    fn check(&self, limit: RateLimit, key: &K, now: i64) -> std::result::Result<i64, Duration> {
        limit.admit(self.tats.get(key).copied(), now)
    }

    /// Records what [`Allowances::check`] allowed.
    fn commit(&mut self, key: K, tat: i64, max: usize, now: i64) {
        if !self.tats.contains_key(&key) {
            self.make_room(max, now);
        }
        self.tats.insert(key, tat);
    }

    /// Frees a place when the table is full: forgets the keys whose
    /// allowance has refilled (they are as good as new), and if that is not
    /// enough, the half nearest to refilled. Each sweep frees many places, so
    /// a sweep is rare and its cost is shared by the inserts it makes room for.
    fn make_room(&mut self, max: usize, now: i64) {
        if self.tats.len() < max.max(1) {
            return;
        }
        self.forget_refilled(now);
        if self.tats.len() >= max.max(1) {
            let mut tats: Vec<i64> = self.tats.values().copied().collect();
            let mid = tats.len() / 2;
            let cut = *tats.select_nth_unstable(mid).1;
            self.tats.retain(|_, t| *t > cut);
        }
    }

    fn forget_refilled(&mut self, now: i64) {
        self.tats.retain(|_, t| *t > now);
    }
}

/// The per-client and overall limits on mailing sign-in codes.
#[derive(Default)]
struct CodeLimiter {
    clients: Allowances<IpAddr>,
    overall: Option<i64>,
}

/// The key a client is limited under: its IPv4 address (an IPv4-mapped IPv6
/// one included), or the /64 of its IPv6 address.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl CodeLimiter {
    /// Takes one code from the client's allowance and one from the overall
    /// one, or neither: a client over its limit does not use up everyone
    /// else's. `Err` says when to retry.
    fn admit(
        &mut self,
        cfg: &AuthConfig,
        client: Option<IpAddr>,
        now: Timestamp,
    ) -> std::result::Result<(), (&'static str, Duration)> {
        let now = now.0;
        let client = client.map(client_key);
        let client_tat = match &client {
            Some(c) => Some(
                self.clients
                    .check(cfg.codes_per_client, c, now)
                    .map_err(|d| ("from this address", d))?,
            ),
            None => None,
        };
        let overall_tat = cfg
            .codes_overall
            .admit(self.overall, now)
            .map_err(|d| ("right now", d))?;
        self.overall = Some(overall_tat);
        if let (Some(c), Some(tat)) = (client, client_tat) {
            self.clients.commit(c, tat, cfg.max_tracked, now);
        }
        Ok(())
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Keys derived from the session secret and the per-host revocation list;
/// built once with the broker.
pub(crate) struct AuthState {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    code_key: [u8; 32],
    admin_emails: Vec<String>,
    /// Families revoked on this host, with the time after which none of their
    /// access tokens can still be valid (then the entry is dropped).
    revoked: Mutex<HashMap<TokenFamilyId, Timestamp>>,
    code_limiter: Mutex<CodeLimiter>,
    refresh_limiter: Mutex<Allowances<TokenFamilyId>>,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState").finish_non_exhaustive()
    }
}

/// HMAC-SHA256 of `msg` under `key`.
fn hmac(key: &[u8], msg: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in msg {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

impl AuthState {
    /// Derives the keys from the configuration. `InvalidInput` for a short secret.
    pub(crate) fn new(cfg: &AuthConfig) -> Result<Self> {
        let secret = match &cfg.session_secret {
            Some(s) if s.expose().len() >= 32 => s.clone(),
            Some(_) => {
                return Err(Error::InvalidInput(
                    "the session secret must be at least 32 bytes".into(),
                ))
            }
            None => {
                tracing::warn!(
                    "no session secret configured: using a random one; sessions and \
                     pending sign-in codes end when this process stops"
                );
                Secret::generate(48)
            }
        };
        // One secret, separate keys per use, so a token signature can never
        // double as a code hash.
        let jwt_key = hmac(secret.expose().as_bytes(), &[b"cxmpute access token v1"]);
        let code_key = hmac(secret.expose().as_bytes(), &[b"cxmpute sign-in code v1"]);
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against the broker's clock, not the system's.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        let admin_emails = cfg
            .admin_emails
            .iter()
            // The one email rule; an invalid address could never match an
            // account's (normalised) email anyway.
            .filter_map(|e| normalize_email(e).ok())
            .collect();
        Ok(AuthState {
            encoding: EncodingKey::from_secret(&jwt_key),
            decoding: DecodingKey::from_secret(&jwt_key),
            validation,
            code_key,
            admin_emails,
            revoked: Mutex::new(HashMap::new()),
            code_limiter: Mutex::new(CodeLimiter::default()),
            refresh_limiter: Mutex::new(Allowances::default()),
        })
    }

    fn code_hash(&self, email: &str, code: &str) -> KeyHash {
        KeyHash(hmac(
            &self.code_key,
            &[email.as_bytes(), b"\n", code.as_bytes()],
        ))
    }

    fn revoke_locally(&self, family: &TokenFamilyId, until: Timestamp, now: Timestamp) {
        let mut r = self.revoked.lock();
        r.retain(|_, t| *t > now);
        r.insert(family.clone(), until);
    }

    fn is_revoked_locally(&self, family: &TokenFamilyId, now: Timestamp) -> bool {
        self.revoked.lock().get(family).is_some_and(|t| *t > now)
    }
}

/// A refused sign-in step, and when a rate limit says to try again.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) error: Error,
    pub(crate) retry_after: Option<Duration>,
}

impl Refused {
    /// A 429 saying why and when to retry (in whole seconds, rounded up).
    fn rate_limited(why: &str, wait: Duration) -> Self {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Refused {
            error: Error::RateLimited(format!("{why}; try again in {secs} s")),
            retry_after: Some(Duration::from_secs(secs)),
        }
    }
}

impl From<Error> for Refused {
    fn from(error: Error) -> Self {
        Refused {
            error,
            retry_after: None,
        }
    }
}

/// The claims of an access token.
#[derive(Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    /// The user id.
    sub: String,
    /// The refresh-token family the session belongs to (for revocation).
    fam: String,
    /// Issued at, seconds since the epoch.
    iat: i64,
    /// Expires at, milliseconds since the epoch.
    exp_ms: i64,
    /// Expires at, seconds since the epoch (the registered claim).
    exp: i64,
}

/// A new session's tokens.
#[derive(Clone, Debug)]
pub struct SessionTokens {
    /// The user signed in.
    pub user_id: UserId,
    /// The access token (a JWT).
    pub access_token: Secret,
    /// When it expires.
    pub access_expires_at: Timestamp,
    /// The refresh token.
    pub refresh_token: Secret,
    /// When it expires.
    pub refresh_expires_at: Timestamp,
}

impl SessionTokens {
    /// The wire form, with lifetimes counted from `now`.
    pub fn to_response(&self, now: Timestamp) -> SessionResponse {
        let secs = |t: Timestamp| u64::try_from((t.0 - now.0).max(0) / 1000).unwrap_or(0);
        SessionResponse {
            token_type: "Bearer".into(),
            access_token: self.access_token.clone(),
            expires_in: secs(self.access_expires_at),
            refresh_token: self.refresh_token.clone(),
            refresh_expires_in: secs(self.refresh_expires_at),
            user_id: self.user_id.clone(),
        }
    }
}

/// A signed-in user, from a valid access token.
#[derive(Clone, Debug)]
pub struct Session {
    /// The user, as the store has it now.
    pub user: User,
    /// The session's token family.
    pub family: TokenFamilyId,
}

/// The credentials an HTTP request carried: the bearer token and the access
/// cookie. Which kind a bearer is (access token, API key, provider key) is
/// told by its shape: access tokens are JWTs, which contain dots.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// `Authorization: Bearer ...`.
    pub bearer: Option<Secret>,
    /// The access-token cookie.
    pub access_cookie: Option<Secret>,
}

impl Credentials {
    fn is_token(s: &Secret) -> bool {
        s.expose().contains('.')
    }

    /// The access token, if the request carried one (bearer first, then cookie).
    pub fn access_token(&self) -> Option<&Secret> {
        match &self.bearer {
            Some(b) if Self::is_token(b) => Some(b),
            Some(_) => None,
            None => self.access_cookie.as_ref(),
        }
    }

    /// The bearer, if it is a key (not an access token).
    pub fn key(&self) -> Option<&Secret> {
        self.bearer.as_ref().filter(|b| !Self::is_token(b))
    }
}

/// Account and session logic over a [`Broker`]. Get one with [`Broker::accounts`].
#[derive(Clone, Debug)]
pub struct Accounts {
    broker: Broker,
}

impl Broker {
    /// Accounts, sessions and administration.
    pub fn accounts(&self) -> Accounts {
        Accounts {
            broker: self.clone(),
        }
    }
}

/// Lower-cases and checks an email. Control characters (header injection
/// into the sign-in mail) and whitespace are refused.
pub fn normalize_email(email: &str) -> Result<String> {
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

fn check_len(what: &str, s: &str, max: usize) -> Result<()> {
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

/// A new refresh token for a user: `cxr-<user id>-<48 random characters>`.
///
/// The store's rotation needs the next token's user before it tells whose
/// the old one was, so the token carries its user id in the clear; it is
/// worth nothing without the random part, and the whole text is hashed.
fn refresh_secret(user: &UserId) -> Secret {
    Secret::new(format!("cxr-{user}-{}", random_token(48)))
}

/// The user a refresh token names (not yet checked against the store).
fn refresh_user(token: &Secret) -> Option<UserId> {
    let rest = token.expose().strip_prefix("cxr-")?;
    let (user, random) = rest.rsplit_once('-')?;
    (!user.is_empty() && random.len() == 48).then(|| UserId::new(user))
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

/// Whether an admin account's API key may call the admin API: only when it
/// is unrestricted (every route, no credit limit). A key an admin narrowed,
/// to hand it to a program or a colleague, is meant for that use alone: it
/// is a gateway key, never an administrator's credential. The key the host
/// makes for its admin (`Broker::ensure_admin`) is unrestricted.
pub(crate) fn key_may_administer(key: &ApiKey) -> bool {
    key.permitted_routes.is_empty() && key.credit_limit.is_none()
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
    fn state(&self) -> &AuthState {
        self.broker.auth_state()
    }

    fn cfg(&self) -> &AuthConfig {
        &self.broker.config().auth
    }

    fn store(&self) -> &dyn crate::store::Store {
        self.broker.store().as_ref()
    }

    fn now(&self) -> Timestamp {
        self.broker.now()
    }

    /// Whether a user holds the admin role now: stored as an admin or named in
    /// [`AuthConfig::admin_emails`], and not suspended.
    pub fn is_admin(&self, user: &User) -> bool {
        user.suspended.is_none()
            && (user.is_admin || self.state().admin_emails.contains(&user.email))
    }

    // ---- sign-in -------------------------------------------------------------

    /// Issues a sign-in code for `email` and mails it. Says nothing about
    /// whether an account exists: none is looked up. `RateLimited` after too
    /// many requests for the email or in all; `Unavailable` when the mail
    /// cannot be sent. Not limited per client: see [`Accounts::request_code_from`].
    pub async fn request_code(&self, email: &str) -> Result<()> {
        self.issue_code(email, None).await.map_err(|r| r.error)
    }

    /// As [`Accounts::request_code`], for a request from `client` (the
    /// caller's IP address), which [`AuthConfig::codes_per_client`] limits.
    pub async fn request_code_from(&self, email: &str, client: Option<IpAddr>) -> Result<()> {
        self.issue_code(email, client).await.map_err(|r| r.error)
    }

    /// The sign-in code flow; a refusal by a rate limit says when to retry.
    pub(crate) async fn issue_code(
        &self,
        email: &str,
        client: Option<IpAddr>,
    ) -> std::result::Result<(), Refused> {
        let email = normalize_email(email)?;
        let now = self.now();
        let cfg = self.cfg();
        // Before anything is stored or sent: a refused request costs a lock.
        let admitted = self.state().code_limiter.lock().admit(cfg, client, now);
        if let Err((whence, wait)) = admitted {
            tracing::info!(?client, "sign-in code refused: too many requested {whence}");
            return Err(Refused::rate_limited(
                &format!("too many sign-in codes requested {whence}"),
                wait,
            ));
        }
        let code = {
            let n: u32 = rand::rng().random_range(0..10u32.pow(CODE_DIGITS));
            Secret::new(format!("{n:0width$}", width = CODE_DIGITS as usize))
        };
        let lc = LoginCode {
            code_hash: self.state().code_hash(&email, code.expose()),
            email: email.clone(),
            expires_at: now.plus(cfg.code_ttl),
            created_at: now,
        };
        match self
            .store()
            .issue_login_code(&lc, now.minus(cfg.code_window), cfg.codes_per_window)
            .await
        {
            Ok(()) => {}
            // The store does not say when the oldest code in the window
            // leaves it; the whole window is the longest the wait can be.
            Err(e @ Error::RateLimited(_)) => {
                return Err(Refused {
                    error: e,
                    retry_after: Some(cfg.code_window),
                })
            }
            Err(e) => return Err(e.into()),
        }
        match self.broker.mailer().send_login_code(&email, &code).await {
            Ok(()) => {}
            Err(e @ Error::InvalidInput(_)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "sending a sign-in code failed");
                return Err(Error::Unavailable {
                    message: "the sign-in code could not be sent".into(),
                    source: Some(Box::new(e)),
                }
                .into());
            }
        }
        tracing::info!("sign-in code issued");
        Ok(())
    }

    /// Housekeeping of sign-in, run by [`Broker::run_maintenance`]: deletes
    /// codes that can no longer be used nor count towards the per-email
    /// limit and expired refresh tokens, and forgets the clients and sessions
    /// whose allowance has refilled.
    pub(crate) async fn prune(&self) -> Result<()> {
        let now = self.now();
        let cfg = self.cfg();
        self.state()
            .code_limiter
            .lock()
            .clients
            .forget_refilled(now.0);
        self.state().refresh_limiter.lock().forget_refilled(now.0);
        let pruned = self
            .store()
            .prune_login_codes(now.minus(cfg.code_ttl.max(cfg.code_window)))
            .await?;
        if pruned > 0 {
            tracing::debug!(pruned, "old sign-in codes deleted");
        }
        let pruned = self.store().prune_refresh_tokens(now).await?;
        if pruned > 0 {
            tracing::debug!(pruned, "expired refresh tokens deleted");
        }
        Ok(())
    }

    /// Checks a sign-in code and starts a session; creates the account on the
    /// first sign-in. `Unauthorized` for a wrong, expired, used or exhausted code.
    pub async fn verify_code(&self, email: &str, code: &Secret) -> Result<SessionTokens> {
        let email = normalize_email(email)?;
        let c = code.expose().trim();
        if c.is_empty() || c.len() > MAX_TOKEN_LEN {
            return Err(Error::InvalidInput("`code` is missing or too long".into()));
        }
        let hash = self.state().code_hash(&email, c);
        self.store()
            .verify_login_code(&email, &hash, self.now(), self.cfg().code_max_attempts)
            .await?;
        let user = self.ensure_account(&email).await?;
        tracing::info!(user = %user.id, "signed in");
        self.start_session(&user).await
    }

    /// The user for `email`, created with its provider account if absent.
    /// Safe against concurrent sign-ins: one row of each, whoever wins.
    pub async fn ensure_account(&self, email: &str) -> Result<User> {
        let email = normalize_email(email)?;
        let (mut user, created) = self.broker.user_for_email(email, false).await?;
        if created {
            let credits = self.cfg().signup_credits;
            if credits > Credits::ZERO {
                user.credits = self
                    .broker
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

    /// Starts a session for a user: a new token family.
    pub async fn start_session(&self, user: &User) -> Result<SessionTokens> {
        let family = TokenFamilyId::generate();
        let now = self.now();
        let refresh = refresh_secret(&user.id);
        let rt = RefreshToken {
            hash: refresh.hash(),
            family: family.clone(),
            user_id: user.id.clone(),
            expires_at: now.plus(self.cfg().refresh_ttl),
            created_at: now,
        };
        self.store().create_refresh_token(&rt).await?;
        self.tokens(&user.id, &family, refresh, rt.expires_at)
    }

    fn tokens(
        &self,
        user: &UserId,
        family: &TokenFamilyId,
        refresh: Secret,
        refresh_expires_at: Timestamp,
    ) -> Result<SessionTokens> {
        let now = self.now();
        let exp = now.plus(self.cfg().access_ttl);
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user.to_string(),
            fam: family.to_string(),
            iat: now.0.div_euclid(1000),
            exp_ms: exp.0,
            exp: exp.0.div_euclid(1000),
        };
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.state().encoding,
        )
        .map_err(|e| Error::backend("signing an access token", e))?;
        Ok(SessionTokens {
            user_id: user.clone(),
            access_token: Secret::new(jwt),
            access_expires_at: exp,
            refresh_token: refresh,
            refresh_expires_at,
        })
    }

    /// Trades a refresh token for a new session (the token is used up).
    /// Presenting a used token revokes its whole family. `RateLimited` past
    /// [`AuthConfig::refreshes_per_session`].
    pub async fn refresh(&self, token: &Secret) -> Result<SessionTokens> {
        self.refresh_session(token).await.map_err(|r| r.error)
    }

    /// The refresh flow; a refusal by the rate limit says when to retry.
    pub(crate) async fn refresh_session(
        &self,
        token: &Secret,
    ) -> std::result::Result<SessionTokens, Refused> {
        let bad = || Error::Unauthorized("invalid or expired refresh token".into());
        if token.expose().is_empty() || token.expose().len() > MAX_TOKEN_LEN {
            return Err(bad().into());
        }
        let old = token.hash();
        let family = match self.store().refresh_token_family(&old).await {
            Ok(f) => f,
            Err(Error::NotFound(_)) => return Err(bad().into()),
            Err(e) => return Err(e.into()),
        };
        let now = self.now();
        // Each refresh stores a token until it expires: a session looping on
        // refresh would grow the store without end.
        {
            let cfg = self.cfg();
            let mut limiter = self.state().refresh_limiter.lock();
            match limiter.check(cfg.refreshes_per_session, &family, now.0) {
                Ok(tat) => limiter.commit(family.clone(), tat, cfg.max_tracked, now.0),
                Err(wait) => {
                    tracing::info!(family = %family, "refresh refused: too many");
                    return Err(Refused::rate_limited(
                        "this session is refreshed too often",
                        wait,
                    ));
                }
            }
        }
        // The token names its user (see `refresh_secret`); it is authentic
        // only if the store knows its hash, which `rotate` checks.
        let user_id = refresh_user(token).ok_or_else(bad)?;
        let next_secret = refresh_secret(&user_id);
        let next = RefreshToken {
            hash: next_secret.hash(),
            family: family.clone(),
            user_id: user_id.clone(),
            expires_at: now.plus(self.cfg().refresh_ttl),
            created_at: now,
        };
        match self.store().rotate_refresh_token(&old, &next, now).await {
            Ok(u) if u == user_id => {}
            Ok(_) => {
                // Unreachable with honest tokens: the user is part of the hashed text.
                self.store().revoke_token_family(&family).await?;
                return Err(bad().into());
            }
            Err(Error::Unauthorized(m)) => {
                // Reuse (the store has revoked the family) or a dead session:
                // either way the family's access tokens stop here at once.
                self.state()
                    .revoke_locally(&family, now.plus(self.cfg().access_ttl), now);
                tracing::warn!(family = %family, "refresh refused: {m}");
                return Err(Error::Unauthorized(m).into());
            }
            Err(e) => return Err(e.into()),
        }
        match self.store().user(&user_id).await {
            Ok(_) => {}
            Err(Error::NotFound(_)) => return Err(bad().into()),
            Err(e) => return Err(e.into()),
        }
        Ok(self.tokens(&user_id, &family, next_secret, next.expires_at)?)
    }

    /// Ends a session: its refresh tokens stop working everywhere, its access
    /// tokens at once on this host. Takes the refresh token, or the family of
    /// an access token; unknown tokens are ignored (logging out twice is fine).
    pub async fn logout(&self, refresh: Option<&Secret>, access: Option<&Secret>) -> Result<()> {
        let mut family = None;
        if let Some(r) = refresh {
            if !r.expose().is_empty() && r.expose().len() <= MAX_TOKEN_LEN {
                match self.store().refresh_token_family(&r.hash()).await {
                    Ok(f) => family = Some(f),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if family.is_none() {
            if let Some(a) = access {
                family = self
                    .decode_access(a)
                    .ok()
                    .map(|c| TokenFamilyId::new(c.fam));
            }
        }
        let Some(family) = family else {
            return Ok(());
        };
        self.store().revoke_token_family(&family).await?;
        let now = self.now();
        self.state()
            .revoke_locally(&family, now.plus(self.cfg().access_ttl), now);
        tracing::info!(family = %family, "signed out");
        Ok(())
    }

    fn decode_access(&self, token: &Secret) -> Result<AccessClaims> {
        let bad = || Error::Unauthorized("invalid or expired session".into());
        if token.expose().len() > 4096 {
            return Err(bad());
        }
        let data = jsonwebtoken::decode::<AccessClaims>(
            token.expose(),
            &self.state().decoding,
            &self.state().validation,
        )
        .map_err(|_| bad())?;
        let c = data.claims;
        if c.exp_ms <= self.now().0 {
            return Err(bad());
        }
        Ok(c)
    }

    /// The signed-in user behind an access token: signature, expiry (by the
    /// broker's clock) and revocation are checked, and the user is read fresh
    /// so a suspension shows at once.
    pub async fn authenticate_access(&self, token: &Secret) -> Result<Session> {
        let c = self.decode_access(token)?;
        let family = TokenFamilyId::new(c.fam);
        if self.state().is_revoked_locally(&family, self.now()) {
            return Err(Error::Unauthorized("session ended".into()));
        }
        let user = match self.store().user(&UserId::new(c.sub)).await {
            Ok(u) => u,
            Err(Error::NotFound(_)) => {
                return Err(Error::Unauthorized("invalid or expired session".into()))
            }
            Err(e) => return Err(e),
        };
        Ok(Session { user, family })
    }

    /// The session of a request. Keys are refused here: account management
    /// needs a signed-in session, so a leaked API key cannot mint more keys.
    pub async fn session(&self, creds: &Credentials) -> Result<Session> {
        match creds.access_token() {
            Some(t) => self.authenticate_access(t).await,
            None if creds.key().is_some() => Err(Error::Unauthorized(
                "this route needs a signed-in session (an access token), not a key".into(),
            )),
            None => Err(Error::Unauthorized(
                "sign in first: send `Authorization: Bearer <access token>`".into(),
            )),
        }
    }

    /// The admin behind a request: an admin's session or an admin's
    /// unrestricted API key (every route, no credit limit). `Forbidden` for
    /// anyone else who is signed in, and for an admin's restricted key.
    pub async fn admin(&self, creds: &Credentials) -> Result<User> {
        let (user, key) = match creds.key() {
            Some(k) => {
                let key = self.broker.authenticate_key(Some(k)).await?;
                (self.store().user(&key.user_id).await?, Some(key))
            }
            None => (self.session(creds).await?.user, None),
        };
        if !self.is_admin(&user) {
            return Err(Error::Forbidden("admin only".into()));
        }
        if key.as_ref().is_some_and(|k| !key_may_administer(k)) {
            return Err(Error::Forbidden(
                "this API key is restricted (permitted routes or a credit limit), so it \
                 cannot administer: use a session or an unrestricted admin key"
                    .into(),
            ));
        }
        Ok(user)
    }

    /// The provider behind a request: its provider key (refused while
    /// suspended), or the session of the user who owns it.
    pub async fn provider(&self, creds: &Credentials) -> Result<Provider> {
        match creds.key() {
            Some(k) => self.broker.authenticate_provider(Some(k)).await,
            None => {
                let s = self.session(creds).await?;
                match self.store().provider_by_user(&s.user.id).await {
                    Ok(p) => Ok(p),
                    Err(Error::NotFound(_)) => {
                        Err(Error::NotFound("provider account of this user".into()))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    // ---- users ---------------------------------------------------------------

    /// The user's account as they see it.
    pub async fn me(&self, user: &User) -> Result<MeResponse> {
        let keys = self.active_keys(user).await?;
        let provider_id = self.provider_id_of(&user.id).await?;
        Ok(MeResponse {
            user_id: user.id.clone(),
            email: user.email.clone(),
            credits: user.credits,
            is_admin: self.is_admin(user),
            suspended: user.suspended.clone(),
            created_at: user.created_at,
            provider_id,
            keys: keys.iter().map(ApiKeyView::from).collect(),
        })
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
        self.broker
            .create_api_key(&user.id, name, req.credit_limit, req.permitted_routes)
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
        let name = req.name.as_deref().map(str::trim);
        Self::check_key_fields(
            name,
            req.credit_limit.flatten(),
            req.permitted_routes.as_deref(),
        )?;
        self.owned_key(user, id).await?;
        let routes = req.permitted_routes.map(|mut r| {
            r.sort();
            r.dedup();
            r
        });
        let update = ApiKeyUpdate {
            name: name.map(str::to_owned),
            credit_limit: req.credit_limit,
            permitted_routes: routes,
        };
        let key = self.store().update_api_key(id, &update).await?;
        self.broker.inner().keys.forget(&key.hash);
        self.broker.inner().admission.refresh(&user.id).await?;
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

    // ---- providers -------------------------------------------------------------

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

    // ---- admin -------------------------------------------------------------------

    fn admin_user_view(&self, u: &User, provider_id: Option<ProviderId>) -> AdminUserView {
        AdminUserView {
            user_id: u.id.clone(),
            email: u.email.clone(),
            credits: u.credits,
            is_admin: self.is_admin(u),
            suspended: u.suspended.clone(),
            created_at: u.created_at,
            provider_id,
        }
    }

    async fn provider_id_of(&self, u: &UserId) -> Result<Option<ProviderId>> {
        match self.store().provider_by_user(u).await {
            Ok(p) => Ok(Some(p.id)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Accounts whose email contains `query` (all when empty), at most `limit` (1 to 200).
    pub async fn search_accounts(&self, query: &str, limit: usize) -> Result<Vec<AdminUserView>> {
        if !(1..=200).contains(&limit) {
            return Err(Error::InvalidInput("`limit` must be 1 to 200".into()));
        }
        check_text("q", query, 254)?;
        let users = self.store().search_users(query.trim(), limit).await?;
        let mut out = Vec::with_capacity(users.len());
        for u in &users {
            let pid = self.provider_id_of(&u.id).await?;
            out.push(self.admin_user_view(u, pid));
        }
        Ok(out)
    }

    /// A user with its keys (never secrets) and credit grants.
    pub async fn user_detail(&self, id: &UserId) -> Result<AdminUserDetail> {
        let u = self.store().user(id).await?;
        let keys = self.store().api_keys(id).await?;
        let grants = self.store().credit_grants(id).await?;
        let pid = self.provider_id_of(id).await?;
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
        let provisions = self.broker.provider_provisions(&p).await?;
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

    /// Every node that has not ended, with its provider.
    pub async fn all_provisions(&self) -> Result<Vec<AdminProvisionView>> {
        Ok(self
            .store()
            .provisions()
            .await?
            .into_iter()
            .map(|n| AdminProvisionView {
                provider_id: n.provider_id.clone(),
                provision: self.broker.view(n),
            })
            .collect())
    }

    /// Disconnects a node: it leaves every pool and is deleted.
    pub async fn disconnect_provision(&self, admin: &User, id: &ProvisionId) -> Result<()> {
        self.broker.delete_any_provision(id).await?;
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

    fn ms(t: i64) -> Timestamp {
        Timestamp(1_767_225_600_000 + t)
    }

    #[test]
    fn a_rate_limit_allows_its_burst_then_one_per_interval() {
        let r = RateLimit::new(3, Duration::from_secs(3));
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(r.admit(tat, 0).unwrap());
        }
        assert_eq!(r.admit(tat, 0), Err(Duration::from_secs(1)));
        assert_eq!(r.admit(tat, 400), Err(Duration::from_millis(600)));
        tat = Some(r.admit(tat, 1_000).unwrap());
        assert!(r.admit(tat, 1_000).is_err());
        // Unused time refills the burst, never beyond it.
        for _ in 0..3 {
            tat = Some(r.admit(tat, 60_000).unwrap());
        }
        assert!(r.admit(tat, 60_000).is_err());
        assert!(RateLimit::new(0, Duration::from_secs(1))
            .admit(None, 0)
            .is_err());
    }

    #[test]
    fn clients_are_keyed_by_address_and_ipv6_by_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(client_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            client_key(ip("2001:db8:1:2::5"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:3::1")),
            client_key(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn a_client_over_its_limit_does_not_use_up_everyone_elses() {
        let cfg = AuthConfig {
            codes_per_client: RateLimit::new(1, Duration::from_secs(60)),
            codes_overall: RateLimit::new(2, Duration::from_secs(60)),
            ..AuthConfig::default()
        };
        let mut l = CodeLimiter::default();
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        assert!(l.admit(&cfg, a, ms(0)).is_ok());
        for _ in 0..10 {
            assert_eq!(l.admit(&cfg, a, ms(0)).unwrap_err().0, "from this address");
        }
        assert!(l.admit(&cfg, b, ms(0)).is_ok());
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(l.admit(&cfg, Some(c), ms(0)).unwrap_err().0, "right now");
        // Refused by the overall limit: c's own allowance is untouched.
        assert!(!l.clients.tats.contains_key(&client_key(c)));
    }

    #[test]
    fn the_client_table_stays_bounded_under_a_flood_of_addresses() {
        let cfg = AuthConfig {
            codes_per_client: RateLimit::new(2, Duration::from_secs(3600)),
            codes_overall: RateLimit::new(1_000_000, Duration::from_secs(1)),
            max_tracked: 64,
            ..AuthConfig::default()
        };
        let mut l = CodeLimiter::default();
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.admit(&cfg, Some(ip), ms(i64::from(i))).is_ok());
            assert!(l.clients.tats.len() <= 64);
        }
        // The most recent clients are the ones remembered.
        let last = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 9_999));
        assert!(l.admit(&cfg, Some(last), ms(10_000)).is_ok());
        assert!(l.admit(&cfg, Some(last), ms(10_000)).is_err());
        // Housekeeping forgets those whose allowance refilled.
        l.clients.forget_refilled(ms(10_000 + 3_600_000).0);
        assert!(l.clients.tats.is_empty());
    }

    #[test]
    fn provider_ids_follow_user_ids() {
        let u = UserId::new("usr_abc");
        assert_eq!(provider_id_for(&u).as_str(), "prv_abc");
    }

    #[test]
    fn code_hashes_are_keyed_and_bound_to_the_email() {
        let a = AuthState::new(&AuthConfig::default()).unwrap();
        let b = AuthState::new(&AuthConfig::default()).unwrap();
        assert_ne!(
            a.code_hash("x@y.io", "12345678"),
            b.code_hash("x@y.io", "12345678")
        );
        assert_ne!(
            a.code_hash("x@y.io", "12345678"),
            a.code_hash("z@y.io", "12345678")
        );
        assert_ne!(a.code_hash("x@y.io", "12345678"), KeyHash::of("12345678"));
    }

    #[test]
    fn settings_come_from_the_environment() {
        let vars = [
            ("CXMPUTE_SESSION_SECRET", "0123456789abcdef0123456789abcdef"),
            ("CXMPUTE_ADMIN_EMAILS", " Boss@X.io, ops@x.io ,"),
            ("CXMPUTE_SIGNUP_CREDITS", "2500000"),
            ("CXMPUTE_ACCESS_TTL_SECS", "60"),
        ];
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let c = AuthConfig::from_lookup(get).unwrap();
        assert_eq!(c.admin_emails, ["boss@x.io", "ops@x.io"]);
        assert_eq!(c.signup_credits, Credits(2_500_000));
        assert_eq!(c.access_ttl, Duration::from_secs(60));
        assert!(c.session_secret.is_some());
        let short = |k: &str| (k == "CXMPUTE_SESSION_SECRET").then(|| "short".to_owned());
        assert!(AuthConfig::from_lookup(short).is_err());
        let bad = |k: &str| (k == "CXMPUTE_SIGNUP_CREDITS").then(|| "-1".to_owned());
        assert!(AuthConfig::from_lookup(bad).is_err());
        assert!(AuthConfig::from_lookup(|_| None)
            .unwrap()
            .session_secret
            .is_none());
    }

    #[test]
    fn short_secrets_are_refused_and_debug_redacts() {
        let cfg = AuthConfig::default().with_session_secret(Secret::new("short"));
        assert!(AuthState::new(&cfg).is_err());
        let long = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t";
        let cfg = AuthConfig::default().with_session_secret(Secret::new(long));
        assert!(!format!("{cfg:?}").contains(long));
        let st = AuthState::new(&cfg).unwrap();
        assert!(!format!("{st:?}").contains(long));
    }
}
