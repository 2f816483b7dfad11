//! The provider network: what nodes may serve, what the broker asks each new
//! node to serve, and the node lifecycle after registration.
//!
//! [`Network`] is a cheap view over a [`Broker`] (`broker.network()`): every
//! step of the lifecycle below, a provider's view of its nodes, and
//! [`Network::node_status`], how the routing index sees a node. The HTTP
//! routes in `http::provider` are thin wrappers around it.
//!
//! ## Lifecycle
//!
//! | step | route (provider key) | effect |
//! |---|---|---|
//! | register | `POST /v1/provider/provisions` | the node exists, tiered by its device diagnostics; with an endpoint and services it is ready at once |
//! | start | `POST /v1/provider/provisions/{id}/start` | the broker assigns services (see [`assign_services`]); the node leaves any pool while it (re)starts |
//! | ready | `POST /v1/provider/provisions/{id}/ready` | the node reports its endpoint and the services it started, and joins exactly those pools |
//! | heartbeat | `POST /v1/provider/provisions/{id}/heartbeat` | keeps it from expiring |
//! | end | `POST /v1/provider/provisions/{id}/end` | it leaves every pool at once; it is kept, and may start again |
//! | delete | `DELETE /v1/provider/provisions/{id}` | it leaves every pool and is forgotten |
//!
//! A provider can see and manage only its own nodes: anyone else's answer 404,
//! as if they did not exist.
//!
//! **What a node may report ready.** Any (service, model) of the
//! [`Catalogue`] whose minimum tier its tier meets, whether or not it was
//! assigned at start. The assignment is the broker's advice on what the
//! network lacks; the catalogue is the rule. (The store keeps no record of an
//! assignment, and a node that could not pull one model should still be able
//! to serve another it can hold.) Models outside the catalogue are refused.
//! The one-step path, registering with an endpoint and services, is held to
//! the same rule. The catalogue is the store's (see `Admin::put_catalogue_model`);
//! [`Network::catalogue`] is the one in force.
//!
//! **Expiry.** A node not heard from (heartbeat, ready or start) for
//! `heartbeat_ttl` is ended by the next maintenance round and leaves every
//! pool. Its heartbeats are then refused with 409; it returns by reporting
//! ready again.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::egress;
use crate::error::{Error, Result};
use crate::health::BreakerState;
use crate::pool::PoolIndex;
use crate::secret::Secret;
use crate::services;
use crate::types::*;
use crate::wire::*;

pub use cxmpute_api::wire::tier_for_vram;

pub use cxmpute_api::types::CatalogueModel;

/// The models nodes may serve: the rule for what a node may report ready,
/// and the list the broker assigns from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    models: Vec<CatalogueModel>,
}

impl Default for Catalogue {
    /// [`Catalogue::original`].
    fn default() -> Self {
        Catalogue::original()
    }
}

impl Catalogue {
    /// A catalogue of `models`. Refused: tiers outside 1-4, empty or
    /// overlong names, the same (service, model) twice.
    pub fn new(models: Vec<CatalogueModel>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for m in &models {
            check_catalogue_model(m)?;
            if !seen.insert((m.service, m.model.as_str())) {
                return Err(Error::InvalidInput(format!(
                    "catalogue lists {} `{}` twice",
                    m.service, m.model
                )));
            }
        }
        Ok(Catalogue { models })
    }

    /// The store's entries, as they are: each was checked when it was put,
    /// and the store keeps one per (service, model).
    pub(crate) fn from_store(models: Vec<CatalogueModel>) -> Self {
        Catalogue { models }
    }

    /// The original platform's models, with our tiers and targets:
    ///
    /// | service | model | min tier | target nodes |
    /// |---|---|---|---|
    /// | chat | `llama3.2:1b` | 1 | 10 |
    /// | chat | `llama3.2:3b` | 1 | 10 |
    /// | chat | `llama3.1:8b` | 2 | 5 |
    /// | chat | `deepseek-r1:7b` | 2 | 5 |
    /// | chat | `qwen2.5:7b` | 2 | 5 |
    /// | chat | `mistral:7b` | 2 | 5 |
    /// | chat | `codellama:7b` | 2 | 3 |
    /// | embeddings | `nomic-embed-text` | 1 | 5 |
    /// | embeddings | `mxbai-embed-large` | 1 | 3 |
    /// | embeddings | `all-minilm` | 1 | 3 |
    /// | tts | `kokoro` | 1 | 5 |
    /// | scrape | `default` | 1 | 5 |
    /// | vision | `moondream` | 2 | 3 |
    ///
    /// Tiers follow the models' memory needs as served by default (4-bit
    /// weights plus a working context): the 1B and 3B models (1.3 and 2 GB),
    /// the embedders, kokoro and scraping fit under 4 GB; the 7-8B models
    /// (4-5 GB) and moondream (whose image encoder needs room beside its
    /// text model) need a tier 2 card. Tiers 3 and 4 hold more models at once
    /// ([`NetworkConfig::models_per_tier`]). The tts, scrape and vision names
    /// are the gateway's default models for those routes.
    pub fn original() -> Self {
        use Service::*;
        let m = CatalogueModel::new;
        Catalogue {
            models: vec![
                m(Chat, "llama3.2:1b", 1, 10),
                m(Chat, "llama3.2:3b", 1, 10),
                m(Chat, "llama3.1:8b", 2, 5),
                m(Chat, "deepseek-r1:7b", 2, 5),
                m(Chat, "qwen2.5:7b", 2, 5),
                m(Chat, "mistral:7b", 2, 5),
                m(Chat, "codellama:7b", 2, 3),
                m(Embeddings, "nomic-embed-text", 1, 5),
                m(Embeddings, "mxbai-embed-large", 1, 3),
                m(Embeddings, "all-minilm", 1, 3),
                m(Tts, "kokoro", 1, 5),
                m(Scrape, "default", 1, 5),
                m(Vision, "moondream", 2, 3),
            ],
        }
    }

    /// Every model.
    pub fn models(&self) -> &[CatalogueModel] {
        &self.models
    }

    /// The entry for (service, model), if listed.
    pub fn get(&self, service: Service, model: &str) -> Option<&CatalogueModel> {
        self.models
            .iter()
            .find(|m| m.service == service && m.model == model)
    }

    /// Whether a node of `tier` may serve (service, model).
    pub fn allows(&self, service: Service, model: &str, tier: u8) -> bool {
        self.get(service, model).is_some_and(|m| m.min_tier <= tier)
    }

    /// Checks that a node of `tier` may serve every one of `services`, with
    /// a 400 that says which may not, and why.
    pub fn check(&self, tier: u8, services: &[ServedModel]) -> Result<()> {
        for s in services {
            match self.get(s.service, s.model.trim()) {
                None => {
                    return Err(Error::InvalidInput(format!(
                        "{} model `{}` is not in the catalogue",
                        s.service, s.model
                    )))
                }
                Some(m) if m.min_tier > tier => {
                    return Err(Error::InvalidInput(format!(
                        "{} model `{}` needs a tier {} node; this node is tier {tier}",
                        s.service, s.model, m.min_tier
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Checks one catalogue entry (400): a tier of 1-4, a model name that is
/// not empty, padded, over 200 bytes or holding control characters (the
/// rules of a model named in a request).
pub(crate) fn check_catalogue_model(m: &CatalogueModel) -> Result<()> {
    if !(1..=4).contains(&m.min_tier) {
        return Err(Error::InvalidInput(format!(
            "catalogue model `{}`: min_tier must be 1-4, not {}",
            m.model, m.min_tier
        )));
    }
    match services::check_model(&m.model) {
        Ok(name) if name == m.model => Ok(()),
        _ => Err(Error::InvalidInput(format!(
            "catalogue model name `{}` is empty, padded, too long or holds control characters",
            m.model.escape_debug()
        ))),
    }
}

/// Settings of the provider network.
///
/// Every provider is a stranger, and so is every node: the limits below
/// bound what one of them can make the broker hold and show.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkConfig {
    /// What nodes may serve while the store holds no catalogue: the
    /// built-in catalogue (see `Admin::put_catalogue_model` for how the
    /// store's takes over).
    pub catalogue: Catalogue,
    /// How many models a node is assigned at start, by tier 1-4.
    pub models_per_tier: [usize; 4],
    /// The most (service, model) pairs one node may serve, on every path
    /// that sets them (registering with services, reporting ready); a longer
    /// list is refused with a 400. Default 64: ten times what the largest
    /// tier is assigned, while a node's entries are what the routing index
    /// links and unlinks under its lock.
    pub max_services_per_node: usize,
    /// The most nodes one provider may have registered, ended ones included
    /// (they are kept and may start again); registering another is refused
    /// with a 403 until one is deleted. Default 32: a provider is anyone
    /// with an email address, and each node is a store record, a row in its
    /// listings and up to [`NetworkConfig::max_services_per_node`] pool
    /// entries; a farm larger than that is an operator's conversation.
    pub max_nodes_per_provider: usize,
    /// The longest location field (country, state, city) a node may give,
    /// in bytes (default 100). The country keys a regional sub-pool.
    pub max_location_bytes: usize,
    /// The largest device diagnostics a node may send, in bytes of JSON
    /// (default 64 KiB). They are stored with the node and shown to admins.
    pub max_device_bytes: usize,
}

impl Default for NetworkConfig {
    /// The original catalogue; 2, 3, 4 and 6 models for tiers 1 to 4; the
    /// limits as documented on each field.
    fn default() -> Self {
        NetworkConfig {
            catalogue: Catalogue::original(),
            models_per_tier: [2, 3, 4, 6],
            max_services_per_node: 64,
            max_nodes_per_provider: 32,
            max_location_bytes: 100,
            max_device_bytes: 64 * 1024,
        }
    }
}

impl NetworkConfig {
    /// Refuses (400) a list of more services than a node may serve. Counted
    /// as sent, duplicates included: checked before anything else is read.
    pub(crate) fn check_services(&self, services: &[ServedModel]) -> Result<()> {
        let max = self.max_services_per_node;
        if services.len() > max {
            return Err(Error::InvalidInput(format!(
                "`services` lists {} models; a node may serve at most {max}",
                services.len()
            )));
        }
        Ok(())
    }

    /// Refuses (400) location fields that are too long or hold control characters.
    pub(crate) fn check_location(&self, l: &Location) -> Result<()> {
        for (what, text) in [
            ("location.country", &l.country),
            ("location.state", &l.state),
            ("location.city", &l.city),
        ] {
            crate::accounts::check_text(what, text, self.max_location_bytes)?;
        }
        Ok(())
    }

    /// Refuses (400) device diagnostics larger than the limit.
    pub(crate) fn check_device(&self, device: &serde_json::Value) -> Result<()> {
        // Measured as JSON without writing it anywhere.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut n = Count(0);
        let len = serde_json::to_writer(&mut n, device).map_or(usize::MAX, |()| n.0);
        if len > self.max_device_bytes {
            return Err(Error::InvalidInput(format!(
                "device diagnostics are larger than {} bytes",
                self.max_device_bytes
            )));
        }
        Ok(())
    }
}

/// The services to ask a new node of `tier` to serve: among the catalogue
/// models its tier allows (and, when `wanted` is not empty, of those
/// services only), the `count` least covered relative to their target —
/// fewest nodes per target node first — ties broken at random. `coverage`
/// is how many nodes serve each (service, model) now.
pub fn assign_services(
    catalogue: &Catalogue,
    tier: u8,
    count: usize,
    wanted: &[Service],
    coverage: &HashMap<(Service, String), usize>,
) -> Vec<ServedModel> {
    let mut candidates: Vec<(&CatalogueModel, u64)> = catalogue
        .models()
        .iter()
        .filter(|m| m.min_tier <= tier && m.target_nodes > 0)
        .filter(|m| wanted.is_empty() || wanted.contains(&m.service))
        .map(|m| {
            let have = coverage
                .get(&(m.service, m.model.clone()))
                .copied()
                .unwrap_or(0);
            (m, have as u64)
        })
        .collect();
    // Shuffle, then a stable sort: equal coverage keeps the random order.
    candidates.shuffle(&mut rand::rng());
    // have_a / target_a < have_b / target_b, compared without division.
    candidates.sort_by(|(a, ha), (b, hb)| {
        (u128::from(*ha) * u128::from(b.target_nodes))
            .cmp(&(u128::from(*hb) * u128::from(a.target_nodes)))
    });
    candidates
        .into_iter()
        .take(count)
        .map(|(m, _)| ServedModel {
            service: m.service,
            model: m.model.clone(),
        })
        .collect()
}

/// The node lifecycle over a [`Broker`]: what providers do with their
/// nodes, and how the routing index sees a node. Get one with
/// [`Broker::network`].
#[derive(Clone, Debug)]
pub struct Network {
    pub(crate) broker: Broker,
}

impl Broker {
    /// The provider network: the node lifecycle and the nodes' status.
    pub fn network(&self) -> Network {
        Network {
            broker: self.clone(),
        }
    }
}

/// How the routing index sees one node now: a read view, for dashboards and
/// tests (see [`Network::node_status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// Whether requests are routed to it now: it is in the index and no
    /// health verdict (probe, circuit breaker, suspension) took it out.
    pub routable: bool,
    /// Its circuit breaker.
    pub breaker: BreakerState,
    /// Until when an open breaker keeps it out of routing.
    pub breaker_open_until: Timestamp,
    /// Requests it completed (successes and failures) since it joined this host's index.
    pub requests: u64,
    /// Of those, the failed ones.
    pub failures: u64,
    /// Requests it is serving right now.
    pub in_flight: u32,
    /// Its latency estimate in microseconds as last recorded (0 before any sample).
    pub latency_ewma_us: u64,
    /// Whether verification quarantined it (see [`crate::verify`]); a
    /// quarantined node is not routable.
    pub quarantined: bool,
}

impl Network {
    fn store(&self) -> &dyn crate::store::Store {
        self.broker.store().as_ref()
    }

    fn now(&self) -> Timestamp {
        self.broker.now()
    }

    fn config(&self) -> &NetworkConfig {
        &self.broker.config().network
    }

    fn pools(&self) -> &PoolIndex {
        self.broker.pools()
    }

    /// Registers a node for a provider; with an endpoint and services it joins
    /// those pools at once.
    ///
    /// Everything a stranger sends is bounded first (diagnostics, location,
    /// the number of services: 400s), and a provider holds at most
    /// [`NetworkConfig::max_nodes_per_provider`] nodes (403 past it).
    pub async fn register_provision(
        &self,
        provider: &Provider,
        req: RegisterProvisionRequest,
    ) -> Result<RegisterProvisionResponse> {
        let net = self.config();
        net.check_device(&req.device)?;
        net.check_services(&req.services)?;
        net.check_location(&req.location)?;
        let tier = DeviceDiagnostics::from_json(&req.device)?.tier();
        // The same rule as a node reporting ready: catalogue models its
        // tier allows, nothing else.
        self.broker.catalogue().check(tier, &req.services)?;
        let endpoint = match &req.endpoint {
            Some(e) => Some(self.check_endpoint(e).await?),
            None => None,
        };
        if endpoint.is_none() && !req.services.is_empty() {
            return Err(services::invalid(
                "services need an endpoint to be served from",
            ));
        }
        let now = self.now();
        let secret = Secret::generate(40);
        let state = if endpoint.is_some() && !req.services.is_empty() {
            ProvisionState::Ready
        } else {
            ProvisionState::Registered
        };
        let provision = Provision {
            id: ProvisionId::generate(),
            provider_id: provider.id.clone(),
            endpoint: endpoint.clone(),
            node_secret: secret.expose().to_owned(),
            device: req.device,
            location: req.location,
            tier,
            state,
            last_heartbeat: now,
            created_at: now,
        };
        let entries = pool_entries_for(&provision, &req.services)?;
        let store = self.store();
        let cap = net.max_nodes_per_provider;
        let full = || {
            Error::Forbidden(format!(
                "a provider may have at most {cap} nodes, ended ones included; \
                 delete one (DELETE /v1/provider/provisions/{{id}}) to register another"
            ))
        };
        if store.provisions_by_provider(&provider.id).await?.len() >= cap {
            return Err(full());
        }
        store.create_provision(&provision, &entries).await?;
        // Registrations running at once, on this host or another, each passed
        // the check above. Counting again now that this one is stored and
        // withdrawing it when that made too many keeps the cap whatever the
        // interleaving: the last one admitted sees every other one admitted.
        // (A burst may be refused more than it had to be; a retry succeeds.)
        if store.provisions_by_provider(&provider.id).await?.len() > cap {
            store.delete_provision(&provision.id).await?;
            return Err(full());
        }
        self.pools().upsert(&provision.id, entries);
        Ok(RegisterProvisionResponse {
            provision_id: provision.id,
            node_secret: secret,
            state,
            tier,
        })
    }

    /// Checks a node endpoint under the egress policy and normalises it
    /// (no trailing slash).
    pub(crate) async fn check_endpoint(&self, endpoint: &str) -> Result<String> {
        let (url, _) = egress::check_url(endpoint, self.broker.config().egress).await?;
        Ok(url.as_str().trim_end_matches('/').to_owned())
    }

    /// A provision, if `provider` owns it; `NotFound` otherwise (whether it
    /// exists is not revealed to other providers).
    pub(crate) async fn owned_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
    ) -> Result<Provision> {
        match self.store().provision(id).await {
            Ok(p) if p.provider_id == provider.id => Ok(p),
            Ok(_) | Err(Error::NotFound(_)) => Err(Error::NotFound(format!("provision {id}"))),
            Err(e) => Err(e),
        }
    }

    /// Records a heartbeat from a provider's own node.
    pub async fn heartbeat(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        let p = self.owned_provision(provider, id).await?;
        if p.state == ProvisionState::Ended {
            return Err(Error::Conflict(format!("provision {id} has ended")));
        }
        self.store().heartbeat(id, self.now()).await
    }

    /// Deletes a provider's own node: it leaves every pool at once and is
    /// gone (to keep it and start it again later, end it instead:
    /// [`Network::end_provision`]).
    pub async fn delete_provision(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        self.owned_provision(provider, id).await?;
        self.delete_any(id).await
    }

    /// Deletes any node, whoever owns it (`NotFound` if there is none), and
    /// takes it out of every pool at once: for administration.
    pub(crate) async fn delete_any(&self, id: &ProvisionId) -> Result<()> {
        self.store().delete_provision(id).await?;
        self.pools().remove(id);
        Ok(())
    }

    /// A provider's nodes as it sees them.
    pub async fn provisions(&self, provider: &Provider) -> Result<Vec<ProvisionView>> {
        let list = self.store().provisions_by_provider(&provider.id).await?;
        Ok(list.into_iter().map(|p| self.view(p)).collect())
    }

    /// The public view of a node.
    pub(crate) fn view(&self, p: Provision) -> ProvisionView {
        let entries = self.pools().entries_of(&p.id);
        ProvisionView {
            healthy: self.pools().is_healthy(&p.id),
            verification: self.broker.verification_of(&p.id),
            services: entries
                .into_iter()
                .map(|e| ServedModel {
                    service: e.service,
                    model: e.model,
                })
                .collect(),
            provision_id: p.id,
            state: p.state,
            endpoint: p.endpoint,
            tier: p.tier,
            location: p.location,
            last_heartbeat: p.last_heartbeat,
        }
    }

    /// Starts a provider's node: assigns the services it should run (see
    /// [`assign_services`]) and takes it out of routing while it (re)starts.
    pub async fn start_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
        req: StartProvisionRequest,
    ) -> Result<StartProvisionResponse> {
        let p = self.owned_provision(provider, id).await?;
        let net = self.config();
        let count = net.models_per_tier[usize::from(p.tier.clamp(1, 4)) - 1];
        // Each service once: the list is a stranger's, and is named in the
        // refusal below.
        let mut wanted = req.services;
        wanted.sort_unstable();
        wanted.dedup();
        let services = assign_services(
            &self.broker.catalogue(),
            p.tier,
            count,
            &wanted,
            &self.pools().coverage(),
        );
        if services.is_empty() {
            return Err(Error::InvalidInput(format!(
                "nothing in the catalogue fits a tier {} node{}",
                p.tier,
                if wanted.is_empty() {
                    String::new()
                } else {
                    format!(" offering {wanted:?}")
                }
            )));
        }
        self.store()
            .update_provision(id, ProvisionState::Starting, p.endpoint.clone(), &[])
            .await?;
        self.store().heartbeat(id, self.now()).await?;
        self.pools().remove(id);
        Ok(StartProvisionResponse {
            provision_id: p.id,
            state: ProvisionState::Starting,
            tier: p.tier,
            services,
        })
    }

    /// A provider's node reports ready: its endpoint (checked by the egress
    /// guard) and the services it started, each of which its tier must allow
    /// in the catalogue. It joins exactly those pools (leaving any others).
    /// An ended or expired node comes back this way.
    pub async fn ready_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
        req: ReadyProvisionRequest,
    ) -> Result<ProvisionView> {
        let mut p = self.owned_provision(provider, id).await?;
        if req.services.is_empty() {
            return Err(Error::InvalidInput(
                "`services` must name at least one service the node serves".into(),
            ));
        }
        let net = self.config();
        net.check_services(&req.services)?;
        self.broker.catalogue().check(p.tier, &req.services)?;
        let endpoint = self.check_endpoint(&req.endpoint).await?;
        let now = self.now();
        p.endpoint = Some(endpoint);
        p.state = ProvisionState::Ready;
        p.last_heartbeat = now;
        let entries = pool_entries_for(&p, &req.services)?;
        self.store()
            .update_provision(id, ProvisionState::Ready, p.endpoint.clone(), &entries)
            .await?;
        self.store().heartbeat(id, now).await?;
        self.pools().upsert(id, entries);
        Ok(self.view(p))
    }

    /// Ends a provider's own node: it leaves every pool at once and is kept
    /// (ended), so it can start again later (to remove it for good:
    /// [`Network::delete_provision`]).
    pub async fn end_provision(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        let p = self.owned_provision(provider, id).await?;
        self.store()
            .update_provision(id, ProvisionState::Ended, p.endpoint, &[])
            .await?;
        self.pools().remove(id);
        Ok(())
    }

    /// One of a provider's nodes, as it sees it.
    pub async fn provision(&self, provider: &Provider, id: &ProvisionId) -> Result<ProvisionView> {
        let p = self.owned_provision(provider, id).await?;
        Ok(self.view(p))
    }

    /// How the routing index of this host sees a node now; `None` when the
    /// node is not in it (never registered with services, ended, deleted,
    /// expired).
    pub fn node_status(&self, id: &ProvisionId) -> Option<NodeStatus> {
        let pools = self.broker.pools();
        let stats = pools.stats(id)?;
        Some(NodeStatus {
            routable: pools.is_healthy(id),
            breaker: stats.health().state(),
            breaker_open_until: stats.health().open_until(),
            requests: stats.requests(),
            failures: stats.failures(),
            in_flight: pools.in_flight(id),
            latency_ewma_us: pools.latency_ewma_us(id),
            quarantined: pools.is_quarantined(id),
        })
    }
}

/// The pool entries of a node for the (service, model) pairs it serves.
pub(crate) fn pool_entries_for(p: &Provision, services: &[ServedModel]) -> Result<Vec<PoolEntry>> {
    let Some(endpoint) = &p.endpoint else {
        return Ok(Vec::new());
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for s in services {
        // The same rule as a model named in a request: the pool key is shared.
        let model = services::check_model(&s.model)
            .map_err(|_| Error::InvalidInput(format!("bad model name `{}`", s.model)))?;
        let model = model.as_str();
        if seen.insert((s.service, model.to_owned())) {
            out.push(PoolEntry {
                provision_id: p.id.clone(),
                provider_id: p.provider_id.clone(),
                service: s.service,
                model: model.to_owned(),
                endpoint: endpoint.clone(),
                node_secret: p.node_secret.clone(),
                tier: p.tier,
                region: p.location.country.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vram_tiers_follow_the_original() {
        assert_eq!(tier_for_vram(0), 1);
        assert_eq!(tier_for_vram(4_095), 1);
        assert_eq!(tier_for_vram(4_096), 2);
        assert_eq!(tier_for_vram(8_191), 2);
        assert_eq!(tier_for_vram(8_192), 3);
        assert_eq!(tier_for_vram(22_527), 3);
        assert_eq!(tier_for_vram(22_528), 4);
    }

    #[test]
    fn assignment_fills_the_least_covered_models_its_tier_allows() {
        let c = Catalogue::new(vec![
            CatalogueModel::new(Service::Chat, "small", 1, 10),
            CatalogueModel::new(Service::Chat, "big", 3, 2),
            CatalogueModel::new(Service::Embeddings, "emb", 1, 4),
            CatalogueModel::new(Service::Tts, "voice", 1, 0),
        ])
        .unwrap();
        let mut cov = HashMap::new();
        cov.insert((Service::Chat, "small".to_owned()), 5); // 0.5 of target
        cov.insert((Service::Embeddings, "emb".to_owned()), 1); // 0.25
        cov.insert((Service::Chat, "big".to_owned()), 1); // 0.5
        let names = |v: Vec<ServedModel>| v.into_iter().map(|s| s.model).collect::<Vec<_>>();
        assert_eq!(
            names(assign_services(&c, 1, 5, &[], &cov)),
            ["emb", "small"]
        );
        assert_eq!(names(assign_services(&c, 3, 1, &[], &cov)), ["emb"]);
        assert_eq!(
            names(assign_services(&c, 3, 5, &[Service::Chat], &cov)).len(),
            2
        );
        assert!(assign_services(&c, 4, 5, &[Service::Tts], &cov).is_empty());
        // Ties are broken at random: both orders turn up.
        let tie = HashMap::new();
        let firsts: std::collections::HashSet<String> = (0..64)
            .map(|_| names(assign_services(&c, 1, 1, &[], &tie)).remove(0))
            .collect();
        assert_eq!(firsts.len(), 2, "{firsts:?}");
    }

    #[test]
    fn catalogue_checks_names_and_tiers() {
        let c = Catalogue::original();
        let s = |service, model: &str| ServedModel {
            service,
            model: model.into(),
        };
        assert!(c.check(1, &[s(Service::Chat, "llama3.2:3b")]).is_ok());
        let e = c.check(1, &[s(Service::Chat, "llama3.1:8b")]).unwrap_err();
        assert!(e.to_string().contains("needs a tier 2 node"), "{e}");
        let e = c.check(4, &[s(Service::Chat, "gpt-4o")]).unwrap_err();
        assert!(e.to_string().contains("not in the catalogue"), "{e}");
        assert!(Catalogue::new(vec![CatalogueModel::new(Service::Chat, "x", 5, 1)]).is_err());
        assert!(Catalogue::new(vec![
            CatalogueModel::new(Service::Chat, "x", 1, 1),
            CatalogueModel::new(Service::Chat, "x", 2, 1)
        ])
        .is_err());
        assert!(Catalogue::new(vec![CatalogueModel::new(Service::Chat, " x", 1, 1)]).is_err());
    }
}
