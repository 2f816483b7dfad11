//! The host's configuration file (`cxmpute.toml`): the catalogue, prices and
//! the reward policy a host seeds at start. The host example reads it with
//! `--config` (`CXMPUTE_CONFIG`); an embedder can use it the same way:
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn cxmpute_core::Store>) -> cxmpute_core::Result<()> {
//! use cxmpute_core::config::ConfigFile;
//! let file = ConfigFile::load("cxmpute.toml")?;
//! let broker = cxmpute_core::Broker::builder(store)
//!     .config(file.broker_config(cxmpute_core::BrokerConfig::default()))
//!     .reward_policy(file.reward_policy()?)
//!     .build()
//!     .await?;
//! file.seed(&broker).await?;
//! # Ok(()) }
//! ```
//!
//! Every key is checked: an unknown key, a value of the wrong kind or out of
//! range is refused with a message naming it (and, for syntax and unknown
//! keys, its line). The file's sections:
//!
//! | section | what | seeding |
//! |---|---|---|
//! | `[[catalogue]]` | `service`, `model`, `min_tier` (1-4), `target_nodes` | each entry is put, replacing the stored one for its service and model; entries only in the store stay. On a store with no catalogue the file's entries are the catalogue (the built-in one is not added) |
//! | `[[aliases]]` | `alias`, `models` (1-4, tried in order): a name for models a request may use as its `model` | each alias is put, replacing the stored one of that name; aliases only in the store stay. Seeded after the catalogue; an alias may not take a catalogue model's name |
//! | `[[prices]]` | `service`, `model` (absent: the service's default), `per_request`, `per_million_input_tokens`, `per_million_output_tokens`, `per_million_units` (micro-credits) | each price is put, replacing the stored one; others stay |
//! | `[limits]` | `account_rpm`, `account_tpm`: how many requests and tokens a minute each account may use over all its keys (absent: no limit; a key's own limits apply too) | not stored: [`BrokerConfig::account_rate_limits`] of this host, set by [`ConfigFile::broker_config`] |
//! | `[cache]` | `max_bytes` (64 MiB), `max_ttl_secs` (86,400); `[cache.price_permille]` with `default` (100) and per service: a hit's price per mille of the answer's original charge, at most 1,000 | not stored: [`BrokerConfig::cache`] of this host, set by [`ConfigFile::broker_config`] |
//! | `[reward]` | `policy` = `platform_share` (default), `tiered` or `flat`; `[reward.platform_share_permille]` with `default` and per service (`chat`, `embeddings`, `tts`, `scrape`, `vision`); `flat_micros` for `flat` | not stored: the policy of this host, shown at `GET /v1/admin/reward` |
//!
//! A file is applied whole or not at all: it is checked entirely before
//! anything is written. Seeding runs at every start, so a change made through
//! the admin API to an entry the file also names is undone by the next
//! restart; entries the file does not name are the API's to keep.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::broker::{Broker, BrokerConfig};
use crate::cache::CacheConfig;
use crate::catalogue::MAX_TARGET_NODES;
use crate::error::{Error, Result};
use crate::reward::{FlatReward, PlatformShare, RewardPolicy, TieredReward};
use crate::types::*;

/// A parsed and checked configuration file. See the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConfigFile {
    /// Catalogue entries to put at start.
    #[serde(default)]
    pub catalogue: Vec<CatalogueModel>,
    /// Model aliases to put at start.
    #[serde(default)]
    pub aliases: Vec<ModelAlias>,
    /// Prices to put at start.
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
    /// The reward policy.
    #[serde(default)]
    pub reward: RewardConfig,
    /// Rate limits every account gets.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The response cache of this host.
    #[serde(default)]
    pub cache: CacheFileConfig,
}

/// `[cache]`: the response cache's size, longest TTL and price; absent
/// keys keep [`CacheConfig`]'s defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheFileConfig {
    /// The most bytes its entries take together.
    pub max_bytes: Option<u64>,
    /// The longest time to live a call or key may ask for, in seconds.
    pub max_ttl_secs: Option<u64>,
    /// `[cache.price_permille]`: what a hit costs, per mille of the
    /// original answer's charge; `default` and per service.
    pub price_permille: Option<ShareConfig>,
}

impl CacheFileConfig {
    /// `cfg` with what this section sets.
    pub fn apply(&self, mut cfg: CacheConfig) -> CacheConfig {
        if let Some(b) = self.max_bytes {
            cfg.max_bytes = b;
        }
        if let Some(t) = self.max_ttl_secs {
            cfg.max_ttl = std::time::Duration::from_secs(t);
        }
        if let Some(p) = self.price_permille {
            if let Some(d) = p.default {
                cfg.price_permille = d;
            }
            cfg.service_price_permille = Service::ALL
                .into_iter()
                .filter_map(|s| p.of(s).map(|v| (s, v)))
                .collect();
        }
        cfg
    }
}

/// `[limits]`: the rate limits of every account, over all its keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Requests a minute (absent: no limit).
    pub account_rpm: Option<u32>,
    /// Tokens a minute (absent: no limit).
    pub account_tpm: Option<u64>,
}

impl LimitsConfig {
    /// As the broker keeps them.
    pub fn account(&self) -> RateLimits {
        RateLimits {
            rpm: self.account_rpm,
            tpm: self.account_tpm,
        }
    }
}

/// A `[[prices]]` entry: a [`PriceEntry`] whose keys are all checked.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// The service priced.
    pub service: Service,
    /// The model; absent for the service's default price.
    #[serde(default)]
    pub model: Option<String>,
    /// Micro-credits per request.
    #[serde(default)]
    pub per_request: i64,
    /// Micro-credits per million input tokens.
    #[serde(default)]
    pub per_million_input_tokens: i64,
    /// Micro-credits per million output tokens.
    #[serde(default)]
    pub per_million_output_tokens: i64,
    /// Micro-credits per million units (characters, URLs, images).
    #[serde(default)]
    pub per_million_units: i64,
}

impl PriceConfig {
    /// The price it sets.
    pub fn entry(&self) -> PriceEntry {
        PriceEntry {
            service: self.service,
            model: self.model.clone(),
            per_request: Credits(self.per_request),
            per_million_input_tokens: Credits(self.per_million_input_tokens),
            per_million_output_tokens: Credits(self.per_million_output_tokens),
            per_million_units: Credits(self.per_million_units),
        }
    }
}

/// Which reward policy pays providers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// [`PlatformShare`]: the charge less the platform's share.
    #[default]
    PlatformShare,
    /// [`TieredReward`]: the original's formula.
    Tiered,
    /// [`FlatReward`]: the same amount per request (`flat_micros`).
    Flat,
}

/// The `[reward]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// The policy (default `platform_share`).
    #[serde(default)]
    pub policy: RewardKind,
    /// What the platform keeps, per mille (`platform_share` only).
    #[serde(default)]
    pub platform_share_permille: Option<ShareConfig>,
    /// Micro-credits per request (`flat` only).
    #[serde(default)]
    pub flat_micros: Option<i64>,
}

/// `[reward.platform_share_permille]`: a default and per-service shares, per
/// mille (0-1,000). Absent ones take `default` (itself 200 when absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ShareConfig {
    pub default: Option<u32>,
    pub chat: Option<u32>,
    pub embeddings: Option<u32>,
    pub tts: Option<u32>,
    pub scrape: Option<u32>,
    pub vision: Option<u32>,
}

impl ShareConfig {
    fn of(&self, s: Service) -> Option<u32> {
        match s {
            Service::Chat => self.chat,
            Service::Embeddings => self.embeddings,
            Service::Tts => self.tts,
            Service::Scrape => self.scrape,
            Service::Vision => self.vision,
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

impl ConfigFile {
    /// Parses and checks a file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let file: ConfigFile = toml::from_str(text)
            .map_err(|e| bad(format!("config: {}", e.to_string().trim_end())))?;
        file.check()?;
        Ok(file)
    }

    /// Reads, parses and checks the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("config {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::InvalidInput(m) => bad(format!("{} {}", path.display(), m)),
            other => other,
        })
    }

    /// Everything the parser cannot check alone, each refusal naming its key.
    fn check(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.catalogue.iter().enumerate() {
            let key = format!("config: catalogue[{i}] ({} `{}`)", m.service, m.model);
            crate::network::check_catalogue_model(m).map_err(|e| match e {
                Error::InvalidInput(why) => bad(format!("{key}: {why}")),
                other => other,
            })?;
            if m.target_nodes > MAX_TARGET_NODES {
                return Err(bad(format!(
                    "{key}: target_nodes must be at most {MAX_TARGET_NODES}"
                )));
            }
            if !seen.insert((m.service, m.model.as_str())) {
                return Err(bad(format!("{key}: listed twice")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.aliases.iter().enumerate() {
            let key = format!("config: aliases[{i}] (`{}`)", a.alias);
            let valid = |m: &str| crate::services::check_model(m).ok().as_deref() == Some(m);
            if !valid(&a.alias) {
                return Err(bad(format!("{key}: not a valid model name")));
            }
            if a.models.is_empty() || a.models.len() > crate::services::MAX_MODELS {
                return Err(bad(format!(
                    "{key}: models must name 1 to {} models",
                    crate::services::MAX_MODELS
                )));
            }
            if let Some(m) = a.models.iter().find(|m| !valid(m)) {
                return Err(bad(format!("{key}: `{m}` is not a valid model name")));
            }
            if self.catalogue.iter().any(|m| m.model == a.alias) {
                return Err(bad(format!("{key}: a catalogue model has this name")));
            }
            if !seen.insert(a.alias.as_str()) {
                return Err(bad(format!("{key}: listed twice")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.prices.iter().enumerate() {
            let key = format!("config: prices[{i}]");
            for (field, v) in [
                ("per_request", p.per_request),
                ("per_million_input_tokens", p.per_million_input_tokens),
                ("per_million_output_tokens", p.per_million_output_tokens),
                ("per_million_units", p.per_million_units),
            ] {
                if v < 0 {
                    return Err(bad(format!("{key}.{field}: must not be negative")));
                }
            }
            if let Some(m) = &p.model {
                if crate::services::check_model(m).ok().as_deref() != Some(m.as_str()) {
                    return Err(bad(format!("{key}.model: `{m}` is not a valid model name")));
                }
            }
            if !seen.insert((p.service, p.model.as_deref())) {
                return Err(bad(format!("{key}: the same service and model twice")));
            }
        }
        crate::accounts::check_rate_limits(&self.limits.account()).map_err(|e| match e {
            Error::InvalidInput(why) => bad(format!(
                "config: limits: {}",
                why.replace("`rpm`", "`account_rpm`")
                    .replace("`tpm`", "`account_tpm`")
                    .replace(" (null removes the limit)", " (leave it out for none)")
            )),
            other => other,
        })?;
        self.cache
            .apply(CacheConfig::default())
            .check()
            .map_err(|e| match e {
                Error::InvalidInput(why) => bad(format!("config: {why}")),
                other => other,
            })?;
        self.reward_policy().map(drop)
    }

    /// `config` with what the file sets of a broker's settings (the
    /// accounts' rate limits and the response cache).
    pub fn broker_config(&self, mut config: BrokerConfig) -> BrokerConfig {
        config.account_rate_limits = self.limits.account();
        config.cache = self.cache.apply(config.cache);
        config
    }

    /// The reward policy the file names.
    pub fn reward_policy(&self) -> Result<Arc<dyn RewardPolicy>> {
        let r = &self.reward;
        let key = "config: reward";
        if r.flat_micros.is_some() && r.policy != RewardKind::Flat {
            return Err(bad(format!(
                "{key}.flat_micros: only for policy = \"flat\""
            )));
        }
        if r.platform_share_permille.is_some() && r.policy != RewardKind::PlatformShare {
            return Err(bad(format!(
                "{key}.platform_share_permille: only for policy = \"platform_share\""
            )));
        }
        Ok(match r.policy {
            RewardKind::Tiered => Arc::new(TieredReward::default()),
            RewardKind::Flat => {
                let micros = r.flat_micros.ok_or_else(|| {
                    bad(format!("{key}.flat_micros: required for policy = \"flat\""))
                })?;
                if micros < 0 {
                    return Err(bad(format!("{key}.flat_micros: must not be negative")));
                }
                Arc::new(FlatReward(Credits(micros)))
            }
            RewardKind::PlatformShare => {
                let shares = r.platform_share_permille.unwrap_or_default();
                let key = format!("{key}.platform_share_permille");
                let default = shares.default.unwrap_or(PlatformShare::DEFAULT_PERMILLE);
                let mut p = PlatformShare::new(default)
                    .map_err(|_| bad(format!("{key}.default: at most 1000, not {default}")))?;
                for s in Service::ALL {
                    if let Some(v) = shares.of(s) {
                        p = p
                            .with_service(s, v)
                            .map_err(|_| bad(format!("{key}.{s}: at most 1000, not {v}")))?;
                    }
                }
                Arc::new(p)
            }
        })
    }

    /// Puts the file's catalogue entries and prices into the broker's store
    /// and uses them at once (see the [module docs](self) for what stays).
    pub async fn seed(&self, broker: &Broker) -> Result<()> {
        let admin = broker.admin();
        for m in &self.catalogue {
            admin.put_catalogue(m.clone(), false).await?;
        }
        for a in &self.aliases {
            admin.put_alias(a.clone()).await?;
        }
        for p in &self.prices {
            admin.put_price(p.entry()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match ConfigFile::parse(text) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected a refusal of {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../cxmpute.example.toml");
        let f = ConfigFile::parse(text).unwrap();
        assert!(!f.catalogue.is_empty());
        assert!(!f.prices.is_empty());
        let view = f.reward_policy().unwrap().describe();
        assert_eq!(view.policy, "platform_share");
        assert_eq!(view.platform_share_permille[&Service::Chat], 200);
        assert_eq!(f.limits.account().rpm, Some(600));
        assert_eq!(f.aliases[0].alias, "fast");
    }

    #[test]
    fn limits_set_the_accounts_rate_limits_and_are_checked() {
        let f = ConfigFile::parse("[limits]\naccount_rpm = 600\naccount_tpm = 1000000\n").unwrap();
        let c = f.broker_config(BrokerConfig::default());
        assert_eq!(
            c.account_rate_limits,
            RateLimits {
                rpm: Some(600),
                tpm: Some(1_000_000)
            }
        );
        let none = ConfigFile::parse("")
            .unwrap()
            .broker_config(BrokerConfig::default());
        assert_eq!(none.account_rate_limits, RateLimits::NONE);
        assert_eq!(
            err("[limits]\naccount_rpm = 0\n"),
            "config: limits: `account_rpm` must be at least 1 (leave it out for none)"
        );
        assert!(err("[limits]\naccount_tpm = -1\n").contains("account_tpm"));
        assert!(err("[limits]\nrpm = 5\n").contains("unknown field `rpm`"));
    }

    #[test]
    fn the_cache_section_sets_size_ttl_and_prices_and_is_checked() {
        let f = ConfigFile::parse(
            "[cache]\nmax_bytes = 1000\nmax_ttl_secs = 60\n\
             [cache.price_permille]\ndefault = 250\nembeddings = 0\n",
        )
        .unwrap();
        let c = f.broker_config(BrokerConfig::default()).cache;
        assert_eq!(
            (c.max_bytes, c.max_ttl),
            (1000, std::time::Duration::from_secs(60))
        );
        assert_eq!(c.price_permille_of(Service::Chat), 250);
        assert_eq!(c.price_permille_of(Service::Embeddings), 0);
        let defaults = ConfigFile::parse("")
            .unwrap()
            .broker_config(BrokerConfig::default());
        assert_eq!(defaults.cache, CacheConfig::default());
        assert_eq!(defaults.cache.price_permille_of(Service::Chat), 100);
        assert!(err("[cache.price_permille]\nchat = 1001\n").contains("at most 1000"));
        assert!(err("[cache]\nmax_ttl_secs = 0\n").contains("at least a second"));
        assert!(err("[cache]\nmax_entries = 5\n").contains("unknown field"));
        let example = ConfigFile::parse(include_str!("../../cxmpute.example.toml")).unwrap();
        assert_eq!(
            example
                .broker_config(BrokerConfig::default())
                .cache
                .max_bytes,
            64 << 20
        );
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let f = ConfigFile::parse("").unwrap();
        assert_eq!(f, ConfigFile::default());
        let view = f.reward_policy().unwrap().describe();
        assert_eq!(view.policy, "platform_share");
        assert!(view.platform_share_permille.values().all(|v| *v == 200));
    }

    #[test]
    fn policies_and_shares_are_read() {
        let f = ConfigFile::parse(
            "[reward]\npolicy = \"platform_share\"\n\
             [reward.platform_share_permille]\ndefault = 150\nembeddings = 0\n",
        )
        .unwrap();
        let v = f.reward_policy().unwrap().describe();
        assert_eq!(v.platform_share_permille[&Service::Chat], 150);
        assert_eq!(v.platform_share_permille[&Service::Embeddings], 0);
        let tiered = ConfigFile::parse("[reward]\npolicy = \"tiered\"\n").unwrap();
        assert_eq!(tiered.reward_policy().unwrap().describe().policy, "tiered");
        let flat = ConfigFile::parse("[reward]\npolicy = \"flat\"\nflat_micros = 5\n").unwrap();
        assert_eq!(flat.reward_policy().unwrap().describe().policy, "flat");
    }

    #[test]
    fn refusals_name_the_bad_key() {
        for (text, want) in [
            ("colour = 1", "unknown field `colour`"),
            ("[limit]\nrpm = 1", "unknown field `limit`"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 1\ntarget_nodes = 1\nprice = 2",
             "unknown field `price`"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 1", "missing field `target_nodes`"),
            ("[[catalogue]]\nservice = \"teleport\"\nmodel = \"m\"\nmin_tier = 1\ntarget_nodes = 1",
             "unknown variant `teleport`"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 5\ntarget_nodes = 1",
             "catalogue[0] (chat `m`): catalogue model `m`: min_tier must be 1-4"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 300\ntarget_nodes = 1",
             "min_tier"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \" m\"\nmin_tier = 1\ntarget_nodes = 1",
             "catalogue[0]"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 1\ntarget_nodes = 100001",
             "catalogue[0] (chat `m`): target_nodes must be at most 100000"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 1\ntarget_nodes = 1\n\
              [[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 2\ntarget_nodes = 1",
             "catalogue[1] (chat `m`): listed twice"),
            ("[[prices]]\nservice = \"chat\"\nper_request = -1", "prices[0].per_request: must not be negative"),
            ("[[prices]]\nservice = \"chat\"\nper_token = 1", "unknown field `per_token`"),
            ("[[prices]]\nservice = \"chat\"\nper_request = \"ten\"", "per_request"),
            ("[[aliases]]\nalias = \"fast\"\nmodels = []", "aliases[0] (`fast`): models must name 1 to 4"),
            ("[[aliases]]\nalias = \"fast\"\nmodels = [\"a\", \" b\"]", "aliases[0] (`fast`): ` b`"),
            ("[[aliases]]\nalias = \"\"\nmodels = [\"a\"]", "aliases[0] (``): not a valid"),
            ("[[aliases]]\nalias = \"f\"\nmodels = [\"a\"]\nfallback = 1", "unknown field `fallback`"),
            ("[[aliases]]\nalias = \"f\"\nmodels = [\"a\"]\n[[aliases]]\nalias = \"f\"\nmodels = [\"b\"]",
             "aliases[1] (`f`): listed twice"),
            ("[[catalogue]]\nservice = \"chat\"\nmodel = \"m\"\nmin_tier = 1\ntarget_nodes = 1\n\
              [[aliases]]\nalias = \"m\"\nmodels = [\"a\"]",
             "aliases[0] (`m`): a catalogue model has this name"),
            ("[reward]\npolicy = \"generous\"", "unknown variant `generous`"),
            ("[reward]\npolicy = \"flat\"", "reward.flat_micros: required"),
            ("[reward]\npolicy = \"tiered\"\nflat_micros = 3", "reward.flat_micros: only for"),
            ("[reward]\npolicy = \"tiered\"\n[reward.platform_share_permille]\nchat = 1",
             "reward.platform_share_permille: only for"),
            ("[reward.platform_share_permille]\nchat = 1001",
             "reward.platform_share_permille.chat: at most 1000, not 1001"),
            ("[reward.platform_share_permille]\ndefault = 2000",
             "reward.platform_share_permille.default: at most 1000"),
            ("[reward.platform_share_permille]\nchatt = 1", "unknown field `chatt`"),
            ("[reward.platform_share_permille]\nchat = -1", "chat"),
            ("[reward\n", "config:"),
        ] {
            let m = err(text);
            assert!(m.contains(want), "{text:?}: {m}");
        }
        // Syntax and unknown keys come with their line.
        let m = err("\n\n[[prices]]\nservice = \"chat\"\nper_token = 1");
        assert!(m.contains("line 5"), "{m}");
    }
}
