//! Sign-in and sessions, and who is calling.
//!
//! [`Sessions`] is a cheap view over a [`Broker`] (`broker.sessions()`): it
//! turns an email code into a session, keeps sessions going (refresh,
//! logout), and tells who a request's credentials belong to (a session's
//! user, an API key's, a provider key's, an admin). The HTTP routes of
//! `http::account` and the extractors of `http::extract` are thin wrappers
//! around it.
//!
//! ## Sign-in
//!
//! 1. [`Sessions::request_code`]: a random 8-digit code is stored as a keyed
//!    hash (HMAC with a key derived from the session secret, so a leaked
//!    table of hashes cannot be brute-forced offline), expires after
//!    [`AuthConfig::code_ttl`], and is mailed. Requests are limited per email
//!    (by the store), per client address ([`AuthConfig::codes_per_client`])
//!    and in all ([`AuthConfig::codes_overall`]); a refused request mails
//!    nothing. The answer never depends on whether the account exists.
//! 2. [`Sessions::verify_code`]: the store checks the code atomically (single
//!    use, at most [`AuthConfig::code_max_attempts`] wrong tries, after which
//!    even the right code fails). The first success creates the account, user
//!    and provider side, exactly once ([`crate::accounts::Accounts::ensure_account`]).
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

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::accounts::normalize_email;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::secret::{random_token, KeyHash, Secret};
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

    /// An API key secret derived from the session secret for `purpose`:
    /// the same on every host of one store and across restarts, so a key
    /// the platform uses itself (the canary account's) is made once.
    pub(crate) fn derived_api_key(&self, purpose: &str) -> Secret {
        let mac = hmac(&self.code_key, &[b"api key\n", purpose.as_bytes()]);
        let hex: String = mac.iter().take(20).map(|b| format!("{b:02x}")).collect();
        Secret::new(format!("cx-{hex}"))
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

/// Sign-in, sessions and who is calling, over a [`Broker`]. Get one with
/// [`Broker::sessions`].
#[derive(Clone, Debug)]
pub struct Sessions {
    broker: Broker,
}

impl Broker {
    /// Sign-in, sessions, and who a request's credentials belong to.
    pub fn sessions(&self) -> Sessions {
        Sessions {
            broker: self.clone(),
        }
    }
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

/// Whether an admin account's API key may call the admin API: only when it
/// is unrestricted (every route, no credit limit). A key an admin narrowed,
/// to hand it to a program or a colleague, is meant for that use alone: it
/// is a gateway key, never an administrator's credential. The key the host
/// makes for its admin ([`crate::admin::Admin::ensure_admin`]) is unrestricted.
pub(crate) fn key_may_administer(key: &ApiKey) -> bool {
    key.permitted_routes.is_empty() && key.credit_limit.is_none()
}

impl Sessions {
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
    /// cannot be sent. Not limited per client: see [`Sessions::request_code_from`].
    pub async fn request_code(&self, email: &str) -> Result<()> {
        self.issue_code(email, None).await.map_err(|r| r.error)
    }

    /// As [`Sessions::request_code`], for a request from `client` (the
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
        let user = self.broker.accounts().ensure_account(&email).await?;
        tracing::info!(user = %user.id, "signed in");
        self.start_session(&user).await
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
                let key = self.authenticate_key(Some(k)).await?;
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
            Some(k) => self.authenticate_provider(Some(k)).await,
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

    /// The API key for a bearer secret. `Unauthorized` for missing, unknown
    /// or revoked keys.
    pub async fn authenticate_key(&self, secret: Option<&Secret>) -> Result<ApiKey> {
        let secret = secret.ok_or_else(|| {
            Error::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
        })?;
        let key = match self.store().api_key_by_hash(&secret.hash()).await {
            Ok(k) => k,
            Err(Error::NotFound(_)) => return Err(Error::Unauthorized("invalid API key".into())),
            Err(e) => return Err(e),
        };
        if key.revoked_at.is_some() {
            return Err(Error::Unauthorized("API key revoked".into()));
        }
        Ok(key)
    }

    /// The provider behind a provider key. `Forbidden` when suspended.
    pub async fn authenticate_provider(&self, secret: Option<&Secret>) -> Result<Provider> {
        let secret = secret.ok_or_else(|| Error::Unauthorized("missing provider key".into()))?;
        let p = match self.store().provider_by_key_hash(&secret.hash()).await {
            Ok(p) => p,
            Err(Error::NotFound(_)) => {
                return Err(Error::Unauthorized("invalid provider key".into()))
            }
            Err(e) => return Err(e),
        };
        if p.suspended.is_some() {
            return Err(Error::Forbidden("provider suspended".into()));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
