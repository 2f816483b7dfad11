//! The [`Client`], its builder, and the one request helper every API method goes through.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cxmpute_api::clock::{Clock, SystemClock};
use cxmpute_api::retry_after;
use cxmpute_api::secret::Secret;
use cxmpute_api::types::CacheDirective;
use cxmpute_api::wire::{ErrorBody, SessionResponse};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Uri};
use http_body_util::Full;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{retryable_status, ApiError, Error, Result, TimeoutPhase};
use crate::session::{Credential, SessionCell};
use crate::stream::{ByteStream, SseStream};
use crate::transport::{self, Answer, Http};
use crate::{AccountApi, AdminApi, ProviderApi, StatsApi, UserApi};

/// How many bytes of an unexpected body an [`Error::Decode`] keeps.
const BODY_SNIPPET: usize = 512;

/// Sent as `User-Agent` with every call.
const USER_AGENT_VALUE: &str = concat!("cxmpute-client/", env!("CARGO_PKG_VERSION"));

/// How failed calls are retried.
///
/// Only idempotent calls (reads, `PUT`s, `DELETE`s, heartbeats) are retried,
/// and only when the host says "later" (429 other than a spent quota, 503) or
/// the connection could not be made. A gateway call (chat, embeddings...)
/// is never retried by the client: it may have been charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: never retry).
    pub max_retries: u32,
    /// The first backoff; doubled at each retry, with full jitter.
    pub base_delay: Duration,
    /// The longest wait. A `Retry-After` longer than this is not waited for:
    /// the error is returned with its [`Error::retry_after`].
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub const fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    /// The wait before retry number `attempt` (0-based), or `None` when the
    /// host asked for more than [`max_delay`](Self::max_delay).
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if let Some(d) = retry_after {
            return (d <= self.max_delay).then_some(d);
        }
        let cap = self
            .base_delay
            .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
            .min(self.max_delay);
        // Full jitter: many clients refused at once do not come back at once.
        Some(cap.mul_f64(jitter()))
    }
}

/// A number in `[0, 1)` that differs between calls, without a RNG crate:
/// `RandomState` is seeded randomly per instance.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

struct Shared {
    http: Http,
    /// The base URL as given.
    base: Uri,
    /// Scheme, authority and path of the base URL, without a trailing `/`:
    /// every call's path is appended to it.
    prefix: String,
    /// The base URL's own query, kept in front of every call's.
    base_query: Option<String>,
    timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    retry: RetryPolicy,
    app_name: Option<HeaderValue>,
}

/// A client of one Cxmpute host.
///
/// Cheap to clone: clones share the connection pool and settings. The
/// credential (an API key, a provider key, an admin's key, or a signed-in
/// session: the host takes each as `Authorization: Bearer`) belongs to each
/// clone, so one pool can serve several identities through
/// [`with_bearer`](Self::with_bearer) and [`with_session`](Self::with_session).
///
/// A session renews itself: when the host refuses its access token (401),
/// the client trades the refresh token for new tokens once and repeats the
/// call. Clones holding the same session share its renewals.
///
/// The calls are grouped by who makes them: [`user`](Self::user),
/// [`account`](Self::account), [`provider`](Self::provider) and
/// [`admin`](Self::admin).
///
/// ```no_run
/// use cxmpute_client::Client;
/// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
///
/// # async fn run() -> Result<(), cxmpute_client::Error> {
/// let client = Client::new("http://127.0.0.1:8080", "cx-...")?;
/// let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("Hello!")]);
/// let answer = client.user().chat(&req).await?;
/// println!("{}", answer.choices[0].message.text().unwrap_or_default());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    cred: Credential,
    /// Sent as `X-Cxmpute-Cache` on every call (see [`Client::with_cache`]).
    cache: Option<CacheDirective>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.shared.base.to_string())
            .field("credential", &self.cred)
            .field("timeout", &self.shared.timeout)
            .field("read_timeout", &self.shared.read_timeout)
            .field("retry", &self.shared.retry)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the host at `base_url` (e.g. `http://127.0.0.1:8080`,
    /// without `/v1`) calling with `api_key`, other settings at their defaults.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), cxmpute_client::Error> {
    /// let client = cxmpute_client::Client::new("http://127.0.0.1:8080", "cx-...")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(base_url: &str, api_key: &str) -> Result<Self> {
        Client::builder()
            .base_url(base_url)
            .api_key(api_key)
            .build()
    }

    /// A builder for every setting.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use cxmpute_client::{Client, RetryPolicy};
    ///
    /// # fn run() -> Result<(), cxmpute_client::Error> {
    /// let client = Client::builder()
    ///     .base_url("https://cxmpute.example")
    ///     .api_key("cx-...")
    ///     .timeout(Duration::from_secs(120))
    ///     .read_timeout(Duration::from_secs(30))
    ///     .retry(RetryPolicy { max_retries: 4, ..RetryPolicy::default() })
    ///     .app_name("my-app")
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The same client (same pool and settings) calling with another bearer
    /// credential: a provider key, an admin's key, a session's access token.
    ///
    /// ```no_run
    /// # fn run(client: cxmpute_client::Client) {
    /// let as_provider = client.with_bearer("cxp-...");
    /// # }
    /// ```
    pub fn with_bearer(&self, token: impl Into<String>) -> Client {
        Client {
            shared: self.shared.clone(),
            cred: Credential::Bearer(Secret::new(token)),
            cache: self.cache,
        }
    }

    /// The same client (same pool and settings) calling as a signed-in
    /// session, which it renews by itself; see
    /// [`AccountApi::sign_in`](crate::AccountApi::sign_in).
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let tokens = client.account().verify("ada@example.com", "123456").await?;
    /// let me = client.with_session(tokens).account().me().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_session(&self, tokens: SessionResponse) -> Client {
        Client {
            shared: self.shared.clone(),
            cred: Credential::Session(SessionCell::new(tokens)),
            cache: self.cache,
        }
    }

    /// The session's current tokens (renewed ones included), to keep them
    /// across restarts; `None` when the client does not call as a session.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) {
    /// if let Some(tokens) = client.session().await {
    ///     let saved = serde_json::to_string(&tokens).unwrap();
    /// }
    /// # }
    /// ```
    pub async fn session(&self) -> Option<SessionResponse> {
        match &self.cred {
            Credential::Session(c) => Some(c.tokens().await),
            _ => None,
        }
    }

    /// The same client calling without a credential (public routes only).
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let models = client.anonymous().user().models().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn anonymous(&self) -> Client {
        Client {
            shared: self.shared.clone(),
            cred: Credential::None,
            cache: self.cache,
        }
    }

    /// The same client asking the host's response cache for `directive` on
    /// its gateway calls (the `X-Cxmpute-Cache` header; chat completions and
    /// embeddings are cached): `CacheDirective::Ttl(600)` answers a repeated
    /// call from the cache, at the cache price, and keeps new answers for 600
    /// seconds; `CacheDirective::NoStore` neither reads nor keeps, whatever
    /// the key's default. `None` follows the key's default.
    ///
    /// ```no_run
    /// use cxmpute_client::types::CacheDirective;
    /// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let cached = client.with_cache(Some(CacheDirective::Ttl(600)));
    /// let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("Hi")]);
    /// let first = cached.user().chat(&req).await?;
    /// let again = cached.user().chat(&req).await?; // from the cache
    /// assert_eq!(first.choices, again.choices);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_cache(&self, directive: Option<CacheDirective>) -> Client {
        Client {
            shared: self.shared.clone(),
            cred: self.cred.clone(),
            cache: directive,
        }
    }

    /// The host's base URL.
    ///
    /// ```no_run
    /// # fn run(client: cxmpute_client::Client) {
    /// println!("talking to {}", client.base_url());
    /// # }
    /// ```
    pub fn base_url(&self) -> &Uri {
        &self.shared.base
    }

    /// `GET /healthz`: `Ok` when the host answers that it is up. Needs no
    /// credential; retried like every read.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// client.health().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn health(&self) -> Result<()> {
        self.req(Method::GET, &["healthz"]).send_unit().await
    }

    /// `GET /pages/{token}`: a page the host serves for a scraping canary
    /// while it runs (what a node fetching it gets), as HTML. Needs no
    /// credential; a 404 ([`Error::Api`](crate::Error::Api)) once the
    /// canary is over.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let html = client.page("x7Kq...").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn page(&self, token: &str) -> Result<String> {
        self.req(Method::GET, &["pages", token]).send_text().await
    }

    /// `GET /openapi.json`: the host's OpenAPI document, every route it serves.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let doc = client.openapi().await?;
    /// println!("OpenAPI {}", doc["openapi"]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.req(Method::GET, &["openapi.json"]).send_json().await
    }

    /// The stats API: usage analytics for the network, the caller, a
    /// provider and operators, and Prometheus metrics.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let mine = client.stats().me(None).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn stats(&self) -> StatsApi<'_> {
        StatsApi { client: self }
    }

    /// The user API: the OpenAI-compatible gateway and the model list.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let models = client.user().models().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn user(&self) -> UserApi<'_> {
        UserApi { client: self }
    }

    /// The account API: sign-in, sessions, the signed-in user's account,
    /// keys, usage, and the notifications shown now.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// client.anonymous().account().request_code("ada@example.com").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn account(&self) -> AccountApi<'_> {
        AccountApi { client: self }
    }

    /// The provider API: a provider's account and nodes, called with a
    /// provider key (or the session of the user who owns the provider).
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let nodes = client.with_bearer("cxp-...").provider().provisions().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn provider(&self) -> ProviderApi<'_> {
        ProviderApi { client: self }
    }

    /// The admin API, called with an admin's API key.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let prices = client.admin().prices().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn admin(&self) -> AdminApi<'_> {
        AdminApi { client: self }
    }

    /// After the host refused `used` (401): renews the session unless another
    /// caller already has. `Ok(false)` when the client holds no session.
    async fn renew_session(&self, used: Option<&Secret>) -> Result<bool> {
        let Credential::Session(cell) = &self.cred else {
            return Ok(false);
        };
        let mut tokens = cell.lock().await;
        if used.is_some_and(|u| *u == tokens.access_token) {
            // The refresh call goes out without a credential, so it can never
            // come back here; boxed because it is the same request path.
            let fresh = Box::pin(self.anonymous().account().refresh(&tokens.refresh_token)).await?;
            *tokens = fresh;
        }
        Ok(true)
    }

    /// Starts a call to the path made of `segments`, each percent-encoded so
    /// an id can never walk to another route.
    pub(crate) fn req(&self, method: Method, segments: &[&str]) -> Req<'_> {
        let mut url = self.shared.prefix.clone();
        // URLs resolve `.` and `..` (even encoded) away, so such an id would
        // address another path: refuse it instead of sending.
        let invalid = segments
            .iter()
            .find(|s| matches!(**s, "" | "." | ".."))
            .map(|s| Error::InvalidRequest(format!("`{s}` cannot be an id in a path")));
        for s in segments {
            url.push('/');
            transport::encode(s, &mut url);
        }
        // Reads, replacements and deletions can be repeated safely; a POST
        // opts in with `idempotent(true)` when it can be.
        let idempotent = matches!(method, Method::GET | Method::PUT | Method::DELETE);
        Req {
            client: self,
            method,
            url,
            query: Vec::new(),
            body: None,
            idempotent,
            invalid,
        }
    }
}

/// Builds a [`Client`]. Every setting has a default except the base URL.
#[derive(Debug, Default)]
pub struct ClientBuilder {
    base_url: Option<String>,
    cred: Option<Credential>,
    timeout: Option<Option<Duration>>,
    connect_timeout: Option<Duration>,
    read_timeout: Option<Option<Duration>>,
    retry: Option<RetryPolicy>,
    app_name: Option<String>,
}

impl ClientBuilder {
    /// The host, e.g. `http://127.0.0.1:8080` (without `/v1`).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// A user's API key (`cx-...`).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.cred = Some(Credential::Bearer(Secret::new(key)));
        self
    }

    /// Any bearer credential: a provider key, an admin's key, an access token.
    pub fn bearer(mut self, token: impl Into<String>) -> Self {
        self.cred = Some(Credential::Bearer(Secret::new(token)));
        self
    }

    /// A signed-in session (from [`AccountApi::verify`](crate::AccountApi::verify)
    /// or saved from [`Client::session`]); the client renews it by itself.
    pub fn session(mut self, tokens: SessionResponse) -> Self {
        self.cred = Some(Credential::Session(SessionCell::new(tokens)));
        self
    }

    /// The most a whole call may take, answer included (default 10 minutes;
    /// `None`: no limit). Streams are bounded by
    /// [`read_timeout`](Self::read_timeout) instead once they have started.
    pub fn timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.timeout = Some(t.into());
        self
    }

    /// The most connecting may take, TLS handshake included (default 10 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// The most a stream may stay silent between two chunks (default 2
    /// minutes; `None`: no limit).
    pub fn read_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.read_timeout = Some(t.into());
        self
    }

    /// How idempotent calls are retried (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, p: RetryPolicy) -> Self {
        self.retry = Some(p);
        self
    }

    /// Names the calling application (`X-Title`); the host records usage per application.
    pub fn app_name(mut self, name: impl Into<String>) -> Self {
        self.app_name = Some(name.into());
        self
    }

    /// The client. Fails when the base URL is missing or not an `http(s)` URL
    /// (an `https` one needs the `rustls` feature).
    pub fn build(self) -> Result<Client> {
        let raw = self
            .base_url
            .ok_or_else(|| Error::Config("a base URL is required".into()))?;
        let base: Uri = raw
            .trim()
            .parse()
            .map_err(|e| Error::Config(format!("base URL `{raw}`: {e}")))?;
        let scheme = base.scheme_str().map(str::to_ascii_lowercase);
        let Some(authority) = base
            .authority()
            .filter(|_| matches!(scheme.as_deref(), Some("http" | "https")))
        else {
            return Err(Error::Config(format!(
                "base URL `{raw}` is not an http(s) URL"
            )));
        };
        if cfg!(not(feature = "rustls")) && scheme.as_deref() == Some("https") {
            return Err(Error::Config(format!(
                "base URL `{raw}` is https, which needs the client's `rustls` feature"
            )));
        }
        let prefix = format!(
            "{}://{authority}{}",
            scheme.unwrap_or_default(),
            base.path().strip_suffix('/').unwrap_or(base.path())
        );
        let base_query = base.query().filter(|q| !q.is_empty()).map(str::to_owned);
        let http = transport::http(self.connect_timeout.unwrap_or(Duration::from_secs(10)))?;
        let app_name = self
            .app_name
            .map(|n| {
                HeaderValue::from_str(&n)
                    .map_err(|_| Error::Config(format!("app name `{n}` is not a header value")))
            })
            .transpose()?;
        Ok(Client {
            shared: Arc::new(Shared {
                http,
                base,
                prefix,
                base_query,
                timeout: self.timeout.unwrap_or(Some(Duration::from_secs(600))),
                read_timeout: self.read_timeout.unwrap_or(Some(Duration::from_secs(120))),
                retry: self.retry.unwrap_or_default(),
                app_name,
            }),
            cred: self.cred.unwrap_or(Credential::None),
            cache: None,
        })
    }
}

/// One call being built: the generic helper behind every API method.
pub(crate) struct Req<'c> {
    client: &'c Client,
    method: Method,
    /// The URL without its query: the base's prefix and the encoded segments.
    url: String,
    query: Vec<(&'static str, String)>,
    body: Option<Bytes>,
    idempotent: bool,
    /// Why the call must not be sent, found while building it.
    invalid: Option<Error>,
}

impl Req<'_> {
    /// Sends `body` as JSON. Serialized once, so a retry resends the same bytes.
    pub(crate) fn json<B: Serialize + ?Sized>(mut self, body: &B) -> Result<Self> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| Error::InvalidRequest(format!("the body cannot be serialized: {e}")))?;
        self.body = Some(bytes.into());
        Ok(self)
    }

    /// Adds a query parameter.
    pub(crate) fn query(mut self, name: &'static str, value: impl ToString) -> Self {
        self.query.push((name, value.to_string()));
        self
    }

    /// Marks a POST or PATCH as safe to repeat (a heartbeat, a state change).
    pub(crate) fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }

    /// The URL called: the path, then the base URL's query and the call's.
    fn uri(&self) -> Result<Uri> {
        let mut url = self.url.clone();
        let base_query = self.client.shared.base_query.as_deref();
        let mut sep = '?';
        if let Some(q) = base_query {
            url.push(sep);
            url.push_str(q);
            sep = '&';
        }
        for (name, value) in &self.query {
            url.push(sep);
            transport::encode(name, &mut url);
            url.push('=');
            transport::encode(value, &mut url);
            sep = '&';
        }
        url.parse()
            .map_err(|e| Error::InvalidRequest(format!("`{url}` is not a URL: {e}")))
    }

    /// One attempt. `whole` bounds the whole call by the client's timeout;
    /// streams bound only the wait for the head, then use the idle timeout.
    async fn attempt(&self, uri: &Uri, whole: bool, bearer: Option<&Secret>) -> Result<Answer> {
        let s = &self.client.shared;
        let mut rb = http::Request::builder()
            .method(self.method.clone())
            .uri(uri.clone())
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(b) = bearer {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", b.expose()))
                .map_err(|_| Error::Config("the credential is not a header value".into()))?;
            v.set_sensitive(true);
            rb = rb.header(AUTHORIZATION, v);
        }
        if let Some(app) = &s.app_name {
            rb = rb.header("x-title", app.clone());
        }
        if let Some(d) = self.client.cache {
            rb = rb.header(CacheDirective::HEADER, d.header_value());
        }
        if self.body.is_some() {
            rb = rb.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let req = rb
            .body(Full::new(self.body.clone().unwrap_or_default()))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let deadline = s.timeout.map(|t| tokio::time::Instant::now() + t);
        let sending = s.http.request(req);
        let resp = match deadline {
            Some(d) => tokio::time::timeout_at(d, sending)
                .await
                .map_err(|_| Error::Timeout(TimeoutPhase::Request))?,
            None => sending.await,
        }
        .map_err(transport::send_error)?;
        Ok(Answer::new(resp, deadline.filter(|_| whole)))
    }

    /// Sends the call, retrying as the policy allows, and returns the answer
    /// when its status is a success, else the mapped error.
    async fn send(&mut self, whole: bool) -> Result<Answer> {
        if let Some(e) = self.invalid.take() {
            return Err(e);
        }
        let uri = self.uri()?;
        let retry = self.client.shared.retry;
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            let bearer = self.client.cred.bearer().await;
            let err = match self.attempt(&uri, whole, bearer.as_ref()).await {
                Ok(r) if r.status.is_success() => return Ok(r),
                Ok(r) => error_from(r).await,
                Err(e) => e,
            };
            // A refused access token: the call was not carried out, so it is
            // repeated once with renewed tokens, whatever its method.
            if !renewed && err.status() == Some(401) {
                renewed = true;
                if self.client.renew_session(bearer.as_ref()).await? {
                    continue;
                }
            }
            if !(self.idempotent && attempt < retry.max_retries && worth_retrying(&err)) {
                return Err(err);
            }
            match retry.delay(attempt, err.retry_after()) {
                Some(d) => tokio::time::sleep(d).await,
                None => return Err(err),
            }
            attempt += 1;
        }
    }

    /// Sends and parses the answer as `T`.
    pub(crate) async fn send_json<T: DeserializeOwned>(mut self) -> Result<T> {
        let resp = self.send(true).await?;
        let status = resp.status.as_u16();
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| decode_error(status, e, &bytes))
    }

    /// Sends and expects an answer without a body (204).
    pub(crate) async fn send_unit(mut self) -> Result<()> {
        let resp = self.send(true).await?;
        // Read the body so the connection goes back to the pool.
        resp.bytes().await?;
        Ok(())
    }

    /// Sends and returns the answer as text.
    pub(crate) async fn send_text(mut self) -> Result<String> {
        let bytes = self.send(true).await?.bytes().await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends and returns the whole answer body.
    pub(crate) async fn send_bytes(mut self) -> Result<Bytes> {
        self.send(true).await?.bytes().await
    }

    /// Sends and returns the answer body as a stream of bytes.
    pub(crate) async fn send_byte_stream(mut self) -> Result<ByteStream> {
        let idle = self.client.shared.read_timeout;
        let resp = self.send(false).await?;
        Ok(ByteStream::new(resp, idle))
    }

    /// Sends and returns the answer as a stream of typed server-sent events.
    pub(crate) async fn send_sse<T: DeserializeOwned + Send + 'static>(
        mut self,
    ) -> Result<SseStream<T>> {
        let idle = self.client.shared.read_timeout;
        let resp = self.send(false).await?;
        let status = resp.status.as_u16();
        let is_sse = resp
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            // A host (or a proxy) that answers JSON to a streamed request.
            let bytes = resp.bytes().await?;
            let why = <serde_json::Error as serde::de::Error>::custom(
                "expected a stream of server-sent events",
            );
            return Err(decode_error(status, why, &bytes));
        }
        Ok(SseStream::new(resp, idle))
    }
}

/// Whether the client retries after `e` (on an idempotent call): the host
/// said "later", or no connection could be made. A timeout is not retried:
/// the caller's time budget is spent.
fn worth_retrying(e: &Error) -> bool {
    match e {
        Error::Api(a) => retryable_status(a.status, Some(&a.error.kind)),
        // A proxy's page in front of the host.
        Error::Decode { status, .. } => retryable_status(*status, None),
        Error::Connect(_) => true,
        _ => false,
    }
}

/// The error for an answer whose status is not a success.
async fn error_from(resp: Answer) -> Error {
    let status = resp.status.as_u16();
    let retry_after = retry_after(&resp.headers, SystemClock.now());
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return e,
    };
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Error::Api(Box::new(ApiError {
            status,
            error: b.error,
            retry_after,
        })),
        Err(e) => decode_error(status, e, &bytes),
    }
}

/// A [`Error::Decode`] keeping the start of the body.
pub(crate) fn decode_error(status: u16, source: serde_json::Error, body: &[u8]) -> Error {
    let end = body.len().min(BODY_SNIPPET);
    Error::Decode {
        status,
        source,
        body: String::from_utf8_lossy(&body[..end]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        use http::header::{HeaderMap, RETRY_AFTER};
        use std::time::SystemTime;
        let parse_retry_after = |v: &HeaderValue| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.clone());
            retry_after(&h, SystemClock.now())
        };
        let v = HeaderValue::from_static("7");
        assert_eq!(parse_retry_after(&v), Some(Duration::from_secs(7)));
        let past = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let d = parse_retry_after(&HeaderValue::from_str(&later).unwrap()).unwrap();
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn backoff_doubles_under_the_cap_and_refuses_long_retry_after() {
        let p = RetryPolicy {
            max_retries: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for attempt in 0..40 {
            let d = p.delay(attempt, None).unwrap();
            let cap = Duration::from_millis(100 << attempt.min(4)).min(p.max_delay);
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
        assert_eq!(
            p.delay(0, Some(Duration::from_millis(300))),
            Some(Duration::from_millis(300))
        );
        assert_eq!(p.delay(0, Some(Duration::from_secs(5))), None);
    }
}
