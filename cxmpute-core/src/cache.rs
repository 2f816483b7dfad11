//! The exact-match response cache: a repeated call answered without a node.
//!
//! Opt-in per call (`X-Cxmpute-Cache: ttl=N` or `no-store`,
//! [`CacheDirective`]) or per key (its default TTL, [`KeyCacheSettings`]),
//! for chat completions and embeddings. An entry's key is the SHA-256 of the
//! namespace (the account, or one shared namespace for keys an admin lets
//! share), the route, the model and the request body in canonical form
//! (object keys sorted, no whitespace; `stream`, `stream_options` and `user`
//! left out, so they do not split entries).
//!
//! A hit is admitted like any call (authentication, rate limits, budget, a
//! hold) and settled at the cache price: a per mille of what the answer
//! was charged when it was stored ([`CacheConfig::price_permille`]), rounded
//! up to a whole micro-credit and never above the call's hold; no node, no
//! reward. Entries keep the whole answer as JSON (a streamed answer is
//! assembled from the chunks the gateway meters anyway), so a hit is
//! answered plainly or replayed as a stream of `chat.completion.chunk`
//! events. Only complete answers are kept: settled, every choice with a
//! `finish_reason`, a stream that ended with `[DONE]` and carried only text.
//!
//! Memory is bounded in bytes by `moka` (a byte weigher, TinyLFU eviction);
//! each entry's time to live is an `Expiry`, and is checked again on read
//! against the broker's clock, so tests expire entries by moving their clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::pricing::Meter;
use crate::types::*;

/// The response cache's settings (part of `BrokerConfig`, `[cache]` in the
/// configuration file).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// The most bytes the entries of this host may take together (default
    /// 64 MiB): an entry weighs its answer's bytes plus a fixed overhead.
    pub max_bytes: u64,
    /// The longest time to live a call or key may ask for (default a day);
    /// a call asking for more is refused (400), a key's default is cut to it.
    pub max_ttl: Duration,
    /// What a hit costs, per mille of what the answer was charged when it
    /// was stored (default 100, a tenth), for services not named in
    /// `service_price_permille`. At most 1,000.
    pub price_permille: u32,
    /// Per-service prices overriding `price_permille`.
    pub service_price_permille: Vec<(Service, u32)>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            max_ttl: Duration::from_secs(86_400),
            price_permille: 100,
            service_price_permille: Vec::new(),
        }
    }
}

impl CacheConfig {
    /// The cache price of `service`, per mille of the original charge.
    pub fn price_permille_of(&self, service: Service) -> u32 {
        self.service_price_permille
            .iter()
            .find(|(s, _)| *s == service)
            .map_or(self.price_permille, |(_, p)| *p)
    }

    /// Refuses settings that make no sense: a price above the original
    /// answer's, a maximum TTL under a second.
    pub(crate) fn check(&self) -> Result<()> {
        let prices = std::iter::once(self.price_permille)
            .chain(self.service_price_permille.iter().map(|(_, p)| *p));
        for p in prices {
            if p > 1000 {
                return Err(Error::InvalidInput(format!(
                    "cache price_permille must be at most 1000, not {p}"
                )));
            }
        }
        if self.max_ttl < Duration::from_secs(1) {
            return Err(Error::InvalidInput(
                "cache max_ttl must be at least a second".into(),
            ));
        }
        Ok(())
    }

    fn max_ttl_secs(&self) -> u32 {
        u32::try_from(self.max_ttl.as_secs()).unwrap_or(u32::MAX)
    }
}

/// Refuses a TTL (`what` names the field) above the host's maximum.
pub(crate) fn check_ttl(cfg: &CacheConfig, ttl: u32, what: &str) -> Result<()> {
    if ttl == 0 || ttl > cfg.max_ttl_secs() {
        return Err(Error::InvalidInput(format!(
            "`{what}` must be 1 to {} seconds, not {ttl}",
            cfg.max_ttl_secs()
        )));
    }
    Ok(())
}

/// Whether calls of `service` may be cached: those whose answer depends on
/// the request alone and is JSON (chat completions, embeddings).
pub(crate) fn serves(service: Service) -> bool {
    matches!(service, Service::Chat | Service::Embeddings)
}

/// The cache price of a hit: `⌈charged × permille / 1000⌉`, rounded up as
/// every price part is, and never above `held`.
pub(crate) fn hit_price(charged: Credits, permille: u32, held: Credits) -> Credits {
    let c = i128::from(charged.0.max(0)) * i128::from(permille);
    let price = i64::try_from((c + 999) / 1000).unwrap_or(i64::MAX);
    Credits(price.min(held.0.max(0)))
}

/// What a call that used the cache found (the `X-Cxmpute-Cache` answer
/// header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Answered from the cache.
    Hit,
    /// Not there: answered by a node (and kept when complete).
    Miss,
}

impl Lookup {
    /// The header's value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
        }
    }
}

/// A cache entry's key: SHA-256 of what makes two calls the same.
pub(crate) type EntryKey = [u8; 32];

/// What a call does with the cache, decided before admission.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) key: EntryKey,
    /// How long a miss's answer is kept.
    pub(crate) ttl: Duration,
}

impl Plan {
    /// The plan of a call of `route` for `model` with `body` (as the caller
    /// sent it), by `key`: `None` when it does not use the cache (no
    /// directive and no default on the key, `no-store`, another service, or
    /// a body that is not a JSON object). A TTL above the maximum is a 400.
    pub(crate) fn of(
        cfg: &CacheConfig,
        directive: Option<CacheDirective>,
        key: &ApiKey,
        route: Route,
        model: &str,
        body: &[u8],
    ) -> Result<Option<Plan>> {
        if !serves(route.service()) {
            return Ok(None);
        }
        let ttl = match directive {
            Some(CacheDirective::NoStore) => return Ok(None),
            Some(CacheDirective::Ttl(n)) => {
                check_ttl(cfg, n, "X-Cxmpute-Cache: ttl")?;
                n
            }
            // A key's default may predate a lower maximum: cut to it.
            None => match key.cache.ttl_secs {
                Some(n) => n.min(cfg.max_ttl_secs()),
                None => return Ok(None),
            },
        };
        let Some(canonical) = canonical_body(body) else {
            return Ok(None);
        };
        let namespace = if key.cache.shared {
            "shared".to_owned()
        } else {
            format!("account:{}", key.user_id)
        };
        Ok(Some(Plan {
            key: entry_key(&namespace, route, model, &canonical),
            ttl: Duration::from_secs(u64::from(ttl)),
        }))
    }
}

/// The fields of a request that do not change its answer's content.
const NOT_KEYED: [&str; 3] = ["stream", "stream_options", "user"];

/// A request body in canonical form: object keys sorted at every depth, no
/// whitespace, the top-level fields of [`NOT_KEYED`] left out. `None` when
/// the body is not a JSON object.
pub(crate) fn canonical_body(body: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut top)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    for f in NOT_KEYED {
        top.remove(f);
    }
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&Value::Object(top), &mut out);
    Some(out)
}

/// Writes `v` compactly with its objects' keys sorted (serde_json's map
/// keeps insertion order when a crate in the build turns that on).
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut fields: Vec<(&String, &Value)> = m.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string or a scalar to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

fn entry_key(namespace: &str, route: Route, model: &str, canonical: &[u8]) -> EntryKey {
    let mut h = Sha256::new();
    // Lengths first, so no two different tuples hash the same bytes.
    for part in [
        namespace.as_bytes(),
        route.path().as_bytes(),
        model.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(canonical);
    h.finalize().into()
}

/// One kept answer.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The whole answer as JSON: a chat completion or an embeddings list.
    pub(crate) body: Bytes,
    /// What it was metered as.
    pub(crate) meter: Meter,
    /// What it was charged.
    pub(crate) charged: Credits,
    /// When it expires, on the broker's clock.
    expires_at: Timestamp,
    /// Its time to live, for moka's own expiry (which frees the memory).
    ttl: Duration,
}

/// What an entry weighs besides its answer: its key, the map's and moka's
/// bookkeeping (an estimate; the cap is on the sum).
const ENTRY_OVERHEAD: usize = 160;

fn weight(e: &Entry) -> u32 {
    u32::try_from(e.body.len().saturating_add(ENTRY_OVERHEAD)).unwrap_or(u32::MAX)
}

struct TtlExpiry;

impl moka::Expiry<EntryKey, Arc<Entry>> for TtlExpiry {
    fn expire_after_create(
        &self,
        _key: &EntryKey,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache of one host, with its counters for `/metrics`.
pub(crate) struct ResponseCache {
    entries: moka::sync::Cache<EntryKey, Arc<Entry>>,
    clock: Arc<dyn Clock>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

impl ResponseCache {
    pub(crate) fn new(cfg: &CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(cfg.max_bytes)
            .weigher(|_k: &EntryKey, v: &Arc<Entry>| weight(v))
            .expire_after(TtlExpiry)
            .eviction_listener(move |_k, _v, cause| {
                // Pushed out (or not let in) for room; expiries and
                // replacements are not evictions.
                if cause == moka::notification::RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        ResponseCache {
            entries,
            clock,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    /// The entry kept for `plan`, if one is and has not expired on the
    /// broker's clock; counts a hit or a miss.
    pub(crate) fn get(&self, plan: &Plan) -> Option<Arc<Entry>> {
        let found = self.entries.get(&plan.key).filter(|e| {
            let live = self.clock.now() < e.expires_at;
            if !live {
                self.entries.invalidate(&plan.key);
            }
            live
        });
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps a complete answer for `plan.ttl`.
    pub(crate) fn put(&self, plan: &Plan, body: Bytes, meter: Meter, charged: Credits) {
        let ttl_ms = i64::try_from(plan.ttl.as_millis()).unwrap_or(i64::MAX);
        let entry = Entry {
            body,
            meter,
            charged,
            expires_at: Timestamp(self.clock.now().0.saturating_add(ttl_ms)),
            ttl: plan.ttl,
        };
        self.entries.insert(plan.key, Arc::new(entry));
    }

    /// Hits, misses, evictions, bytes kept and entries, for `/metrics`
    /// (pending inserts and evictions applied first, so bytes are exact).
    pub(crate) fn figures(&self) -> CacheFigures {
        self.entries.run_pending_tasks();
        CacheFigures {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self.entries.weighted_size(),
            entries: self.entries.entry_count(),
        }
    }
}

/// The cache's counters at one moment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheFigures {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evictions: u64,
    pub(crate) bytes: u64,
    pub(crate) entries: u64,
}

/// Whether a plain answer of `service` is complete enough to keep: a chat
/// completion whose every choice has a `finish_reason`, an embeddings list
/// with data.
pub(crate) fn complete_answer(service: Service, body: &[u8]) -> bool {
    let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    if v.contains_key("error") {
        return false;
    }
    match service {
        Service::Chat => match v.get("choices") {
            Some(Value::Array(choices)) if !choices.is_empty() => choices.iter().all(|c| {
                c.get("message").is_some_and(Value::is_object)
                    && c.get("finish_reason").is_some_and(Value::is_string)
            }),
            _ => false,
        },
        Service::Embeddings => matches!(v.get("data"), Some(Value::Array(d)) if !d.is_empty()),
        _ => false,
    }
}

/// A chat stream assembled into the completion it streamed, as it passes
/// the meter. Only plain text is assembled; a stream carrying anything else
/// in its deltas or choices (tool calls, reasoning, log probabilities) is
/// not kept, since its replay could not be made identical.
#[derive(Debug, Default)]
pub(crate) struct Assembly {
    head: Map<String, Value>,
    choices: Vec<AssembledChoice>,
    usage: Option<Value>,
    unusable: bool,
}

#[derive(Debug, Default)]
struct AssembledChoice {
    role: Option<String>,
    content: String,
    finish_reason: Option<String>,
}

/// The most choices assembled (the broker allows at most a few).
const MAX_CHOICES: usize = 64;

impl Assembly {
    /// Takes one chunk's JSON (a well-formed chunk, as the meter judged).
    pub(crate) fn push(&mut self, data: &str) {
        if self.unusable {
            return;
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(data) else {
            self.unusable = true;
            return;
        };
        for f in ["id", "created", "model", "system_fingerprint"] {
            if let Some(v) = chunk.remove(f) {
                if !v.is_null() {
                    self.head.entry(f).or_insert(v);
                }
            }
        }
        if let Some(u) = chunk.remove("usage") {
            if !u.is_null() {
                self.usage = Some(u);
            }
        }
        let Some(Value::Array(choices)) = chunk.remove("choices") else {
            return;
        };
        for c in choices {
            if !self.push_choice(c) {
                self.unusable = true;
                return;
            }
        }
    }

    fn push_choice(&mut self, c: Value) -> bool {
        let Value::Object(mut c) = c else {
            return false;
        };
        let Some(index) = c.remove("index").and_then(|i| i.as_u64()) else {
            return false;
        };
        let Ok(index) = usize::try_from(index) else {
            return false;
        };
        if index >= MAX_CHOICES {
            return false;
        }
        if self.choices.len() <= index {
            self.choices
                .resize_with(index + 1, AssembledChoice::default);
        }
        let slot = &mut self.choices[index];
        match c.remove("finish_reason") {
            Some(Value::String(r)) => slot.finish_reason = Some(r),
            None | Some(Value::Null) => {}
            Some(_) => return false,
        }
        if let Some(delta) = c.remove("delta") {
            let Value::Object(delta) = delta else {
                return false;
            };
            for (k, v) in delta {
                match (k.as_str(), v) {
                    (_, Value::Null) => {}
                    ("role", Value::String(r)) => slot.role = Some(r),
                    ("content", Value::String(t)) => slot.content.push_str(&t),
                    // Anything else (tool calls, reasoning, a refusal)
                    // with a value: not assembled.
                    _ => return false,
                }
            }
        }
        // Anything else set on a choice (log probabilities): not assembled.
        c.values().all(Value::is_null)
    }

    /// The completion streamed, as a `chat.completion` body; `None` when the
    /// stream cannot be kept (see [`Assembly`]). `meter` gives the usage
    /// when the node reported none.
    pub(crate) fn completion(self, meter: Meter) -> Option<Bytes> {
        if self.unusable
            || self.choices.is_empty()
            || self.choices.iter().any(|c| c.finish_reason.is_none())
        {
            return None;
        }
        let mut out = self.head;
        out.insert("object".into(), Value::from("chat.completion"));
        let choices = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::json!({
                    "index": i,
                    "message": {
                        "role": c.role.unwrap_or_else(|| "assistant".to_owned()),
                        "content": c.content,
                    },
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        out.insert("choices".into(), Value::Array(choices));
        let usage = self.usage.unwrap_or_else(|| {
            serde_json::json!({
                "prompt_tokens": meter.input_tokens,
                "completion_tokens": meter.output_tokens,
                "total_tokens": meter.input_tokens + meter.output_tokens,
            })
        });
        out.insert("usage".into(), usage);
        serde_json::to_vec(&Value::Object(out))
            .ok()
            .map(Bytes::from)
    }
}

/// A kept chat completion replayed as a stream in OpenAI's shape: per
/// choice a chunk with its role, one with its content (and any other field
/// of its message) and one with its `finish_reason`; then, when the caller
/// asked for usage, the usage chunk; then `[DONE]`. `None` when the body is
/// not a chat completion.
pub(crate) fn replay(body: &[u8], with_usage: bool) -> Option<Bytes> {
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let Some(Value::Array(choices)) = v.remove("choices") else {
        return None;
    };
    let usage = v.remove("usage");
    let mut head = Map::new();
    for f in ["id", "created", "model", "system_fingerprint"] {
        if let Some(x) = v.remove(f) {
            head.insert(f.to_owned(), x);
        }
    }
    head.insert("object".into(), Value::from("chat.completion.chunk"));
    let mut out = Vec::with_capacity(body.len() * 2);
    let mut event = |choices: Value, usage: Option<&Value>| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        if let Some(u) = usage {
            chunk.insert("usage".into(), u.clone());
        }
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut out, &Value::Object(chunk));
        out.extend_from_slice(b"\n\n");
    };
    for (i, c) in choices.into_iter().enumerate() {
        let Value::Object(mut c) = c else {
            return None;
        };
        let index = c.remove("index").unwrap_or_else(|| Value::from(i));
        let Some(Value::Object(mut message)) = c.remove("message") else {
            return None;
        };
        let role = message.remove("role").unwrap_or_else(|| "assistant".into());
        event(
            serde_json::json!([{"index": index, "delta": {"role": role, "content": ""}, "finish_reason": null}]),
            None,
        );
        // The rest of the message in one delta; tool calls get the index a
        // streamed tool call carries.
        if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
            for (n, call) in calls.iter_mut().enumerate() {
                if let Value::Object(call) = call {
                    call.entry("index").or_insert(Value::from(n));
                }
            }
        }
        message.retain(|_, v| !v.is_null());
        if !message.is_empty() {
            event(
                serde_json::json!([{"index": index, "delta": message, "finish_reason": null}]),
                None,
            );
        }
        let finish = c.remove("finish_reason").unwrap_or(Value::Null);
        let mut last = serde_json::json!({"index": index, "delta": {}, "finish_reason": finish});
        if let Some(lp) = c.remove("logprobs").filter(|l| !l.is_null()) {
            last["logprobs"] = lp;
        }
        event(Value::Array(vec![last]), None);
    }
    if with_usage {
        if let Some(u) = usage.as_ref().filter(|u| !u.is_null()) {
            event(Value::Array(Vec::new()), Some(u));
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(shared: bool, user: &str) -> ApiKey {
        let owner = crate::fixtures::new_user("owner@example.com", Credits::ZERO);
        ApiKey {
            id: ApiKeyId::new("k1"),
            user_id: UserId::new(user),
            cache: KeyCacheSettings {
                ttl_secs: None,
                shared,
            },
            ..crate::fixtures::new_key(&owner, None, Timestamp(0))
        }
    }

    fn plan_of(k: &ApiKey, body: &str) -> Option<Plan> {
        let cfg = CacheConfig::default();
        Plan::of(
            &cfg,
            Some(CacheDirective::Ttl(60)),
            k,
            Route::ChatCompletions,
            "m",
            body.as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn canonical_form_ignores_order_whitespace_stream_and_user() {
        let a = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#;
        let b = r#"{ "temperature" : 0.5,
            "stream": true, "stream_options": {"include_usage": true}, "user": "u-7",
            "messages": [ { "content": "hi", "role": "user" } ], "model": "m" }"#;
        assert_eq!(canonical_body(a.as_bytes()), canonical_body(b.as_bytes()));
        let k = key(false, "u1");
        assert_eq!(plan_of(&k, a).unwrap().key, plan_of(&k, b).unwrap().key);
        // What changes the answer splits entries: a value, a nested key's
        // value, the order of an array.
        for other in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.6}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0.5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        ] {
            assert_ne!(plan_of(&k, a).unwrap().key, plan_of(&k, other).unwrap().key);
        }
        assert_eq!(
            canonical_body(br#"{"b":{"d":1,"c":[2,{"f":3,"e":4}]},"a":"x"}"#).unwrap(),
            br#"{"a":"x","b":{"c":[2,{"e":4,"f":3}],"d":1}}"#.to_vec()
        );
    }

    #[test]
    fn accounts_are_apart_unless_both_keys_share() {
        let body = r#"{"model":"m","messages":[]}"#;
        let (a, b) = (key(false, "u1"), key(false, "u2"));
        assert_ne!(
            plan_of(&a, body).unwrap().key,
            plan_of(&b, body).unwrap().key
        );
        let (a, b) = (key(true, "u1"), key(true, "u2"));
        assert_eq!(
            plan_of(&a, body).unwrap().key,
            plan_of(&b, body).unwrap().key
        );
        assert_ne!(
            plan_of(&a, body).unwrap().key,
            plan_of(&key(false, "u1"), body).unwrap().key
        );
    }

    #[test]
    fn directives_and_key_defaults_decide_the_ttl() {
        let cfg = CacheConfig::default();
        let body = br#"{"model":"m","input":"x"}"#;
        let mut k = key(false, "u1");
        let plan = |d, k: &ApiKey, route| Plan::of(&cfg, d, k, route, "m", body);
        assert!(plan(None, &k, Route::Embeddings).unwrap().is_none());
        k.cache.ttl_secs = Some(10_000_000);
        // A key's default above the maximum is cut to it.
        let p = plan(None, &k, Route::Embeddings).unwrap().unwrap();
        assert_eq!(p.ttl, cfg.max_ttl);
        assert!(plan(Some(CacheDirective::NoStore), &k, Route::Embeddings)
            .unwrap()
            .is_none());
        // A call asking for more than the maximum is refused.
        assert!(matches!(
            plan(Some(CacheDirective::Ttl(86_401)), &k, Route::Embeddings),
            Err(Error::InvalidInput(_))
        ));
        // Other services are not cached, whatever the header says.
        for d in [CacheDirective::Ttl(5), CacheDirective::Ttl(u32::MAX)] {
            assert!(plan(Some(d), &k, Route::AudioSpeech).unwrap().is_none());
        }
        assert_eq!(
            CacheDirective::parse(" TTL = 600 "),
            Some(CacheDirective::Ttl(600))
        );
        assert_eq!(
            CacheDirective::parse("ttl=0"),
            Some(CacheDirective::NoStore)
        );
        assert_eq!(
            CacheDirective::parse("No-Store"),
            Some(CacheDirective::NoStore)
        );
        for bad in [
            "",
            "ttl=",
            "ttl=-1",
            "ttl=1e3",
            "ttl=99999999999",
            "max-age=5",
        ] {
            assert_eq!(CacheDirective::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_hit_price_rounds_up_and_stays_within_the_hold() {
        assert_eq!(
            hit_price(Credits(1_000), 100, Credits(10_000)),
            Credits(100)
        );
        assert_eq!(
            hit_price(Credits(1_001), 100, Credits(10_000)),
            Credits(101)
        );
        assert_eq!(hit_price(Credits(1), 100, Credits(10_000)), Credits(1));
        assert_eq!(hit_price(Credits(0), 100, Credits(10_000)), Credits(0));
        assert_eq!(hit_price(Credits(5_000), 1000, Credits(300)), Credits(300));
        assert_eq!(hit_price(Credits(i64::MAX), 1000, Credits(7)), Credits(7));
    }

    #[test]
    fn a_stream_assembles_into_its_completion_and_replays_as_the_same_content() {
        let chunks = [
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        ];
        let mut a = Assembly::default();
        for c in chunks {
            a.push(c);
        }
        let body = a.completion(Meter::default()).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert_eq!(v["id"], "c1");
        let replayed = replay(&body, true).unwrap();
        // The replay assembles into the same completion.
        let mut again = Assembly::default();
        let text = std::str::from_utf8(&replayed).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line != "[DONE]" {
                let chunk: crate::wire::ChatCompletionChunk = serde_json::from_str(line).unwrap();
                assert_eq!(chunk.object, "chat.completion.chunk");
                again.push(line);
            }
        }
        assert_eq!(again.completion(Meter::default()).unwrap(), body);
        // Without usage asked for, no usage chunk.
        assert!(!std::str::from_utf8(&replay(&body, false).unwrap())
            .unwrap()
            .contains("usage"));
    }

    #[test]
    fn streams_with_more_than_text_or_without_an_end_are_not_kept() {
        let mut tools = Assembly::default();
        tools.push(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":"tool_calls"}]}"#);
        assert!(tools.completion(Meter::default()).is_none());
        let mut cut = Assembly::default();
        cut.push(r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#);
        assert!(cut.completion(Meter::default()).is_none());
        assert!(!complete_answer(
            Service::Chat,
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":null}]}"#
        ));
        assert!(complete_answer(
            Service::Chat,
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}]}"#
        ));
        assert!(complete_answer(
            Service::Embeddings,
            br#"{"data":[{"embedding":[0.1]}]}"#
        ));
    }

    #[test]
    fn entries_expire_on_the_brokers_clock_and_bytes_stay_under_the_cap() {
        let clock = Arc::new(crate::clock::ManualClock::new(Timestamp(1_000_000)));
        let cfg = CacheConfig {
            max_bytes: 2 * (1_000 + ENTRY_OVERHEAD as u64) + 100,
            ..CacheConfig::default()
        };
        let cache = ResponseCache::new(&cfg, clock.clone());
        let plan = |n: u8| Plan {
            key: [n; 32],
            ttl: Duration::from_secs(60),
        };
        cache.put(
            &plan(0),
            Bytes::from(vec![b'x'; 1_000]),
            Meter::default(),
            Credits(5),
        );
        assert!(cache.get(&plan(0)).is_some());
        clock.advance(Duration::from_secs(59));
        assert!(cache.get(&plan(0)).is_some());
        clock.advance(Duration::from_secs(1));
        assert!(cache.get(&plan(0)).is_none());
        for n in 1..=5 {
            cache.put(
                &plan(n),
                Bytes::from(vec![b'x'; 1_000]),
                Meter::default(),
                Credits(5),
            );
        }
        let f = cache.figures();
        assert!(f.bytes <= cfg.max_bytes, "{} > {}", f.bytes, cfg.max_bytes);
        assert!(f.entries <= 2);
        assert!(f.evictions >= 3, "{f:?}");
        assert_eq!((f.hits, f.misses), (2, 1));
    }
}
