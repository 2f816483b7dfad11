//! The provider network: what nodes may serve, what the broker asks each new
//! node to serve, and the node lifecycle after registration.
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
//! The one-step path that predates start and ready, registering with an
//! endpoint and services, is not held to the catalogue (it keeps its
//! earlier meaning); nodes following the lifecycle are.
//!
//! **Expiry.** A node not heard from (heartbeat, ready or start) for
//! `heartbeat_ttl` is ended by the next maintenance round and leaves every
//! pool. Its heartbeats are then refused with 409; it returns by reporting
//! ready again.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::broker::{pool_entries_for, Broker};
use crate::error::{Error, Result};
use crate::types::*;
use crate::wire::*;

pub use cxmpute_api::wire::tier_for_vram;

/// One model the network offers, and how much of the network should serve it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
            if !(1..=4).contains(&m.min_tier) {
                return Err(Error::InvalidInput(format!(
                    "catalogue model `{}`: min_tier must be 1-4, not {}",
                    m.model, m.min_tier
                )));
            }
            let name = m.model.trim();
            if name.is_empty() || name != m.model || name.len() > 200 {
                return Err(Error::InvalidInput(format!(
                    "catalogue model name `{}` is empty, padded or too long",
                    m.model
                )));
            }
            if !seen.insert((m.service, m.model.as_str())) {
                return Err(Error::InvalidInput(format!(
                    "catalogue lists {} `{}` twice",
                    m.service, m.model
                )));
            }
        }
        Ok(Catalogue { models })
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

/// Settings of the provider network.
///
/// Every provider is a stranger, and so is every node: the limits below
/// bound what one of them can make the broker hold and show.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkConfig {
    /// What nodes may serve.
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

impl Broker {
    /// Starts a provider's node: assigns the services it should run (see
    /// [`assign_services`]) and takes it out of routing while it (re)starts.
    pub async fn start_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
        req: StartProvisionRequest,
    ) -> Result<StartProvisionResponse> {
        let p = self.owned_provision(provider, id).await?;
        let net = &self.config().network;
        let count = net.models_per_tier[usize::from(p.tier.clamp(1, 4)) - 1];
        // Each service once: the list is a stranger's, and is named in the
        // refusal below.
        let mut wanted = req.services;
        wanted.sort_unstable();
        wanted.dedup();
        let services = assign_services(
            &net.catalogue,
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
        let net = &self.config().network;
        net.check_services(&req.services)?;
        net.catalogue.check(p.tier, &req.services)?;
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
    /// [`Broker::delete_provision`]).
    pub async fn end_provision(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        let p = self.owned_provision(provider, id).await?;
        self.store()
            .update_provision(id, ProvisionState::Ended, p.endpoint, &[])
            .await?;
        self.pools().remove(id);
        Ok(())
    }

    /// One of a provider's nodes, as it sees it.
    pub async fn provider_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
    ) -> Result<ProvisionView> {
        let p = self.owned_provision(provider, id).await?;
        Ok(self.view(p))
    }
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
