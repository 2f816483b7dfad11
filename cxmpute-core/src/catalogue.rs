//! The catalogue as data: what nodes may serve lives in the store
//! ([`CatalogueStore`](crate::store::CatalogueStore)), so every host of a
//! deployment applies one catalogue, read into memory with the pools
//! ([`Broker::refresh_pools`]) and never on a call's path.
//!
//! - **Empty store, built-in catalogue.** A store that holds no entry means
//!   the built-in catalogue ([`NetworkConfig::catalogue`], by default
//!   [`Catalogue::original`]); nothing is written when a host starts. The
//!   first change through the admin API writes the catalogue in force to
//!   the store and then applies itself, so adding one model keeps the
//!   others. The last entry cannot be removed (409): an empty store would
//!   bring the built-in catalogue back.
//! - **Changes.** [`Admin::put_catalogue_model`] adds or changes an entry;
//!   [`Admin::delete_catalogue_model`] removes one. Nodes that may no longer
//!   serve a pool (its model removed, or their tier below a raised minimum)
//!   leave it at once, in the store and on this host; other hosts follow
//!   on their next refresh, which also leaves such entries out of routing
//!   whatever the store says (a node that reported ready on another host
//!   while the change was made).
//! - **Public.** [`Network::offers`] (`GET /v1/catalogue`) lists the
//!   catalogue with prices and node counts; no credential, as OpenRouter's
//!   model list is public.
//!
//! [`NetworkConfig::catalogue`]: crate::network::NetworkConfig::catalogue

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::admin::Admin;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::network::{Catalogue, Network};
use crate::services::MAX_MODELS;
use crate::types::*;
use crate::wire::*;

/// The most entries a catalogue may hold: every entry is a pool the
/// public lists may name and the network snapshot samples each round.
pub(crate) const MAX_CATALOGUE_MODELS: usize = 1_000;

/// The most nodes an entry may ask for.
pub(crate) const MAX_TARGET_NODES: u32 = 100_000;

/// The most aliases the store may hold: each is listed by `GET /v1/models`.
pub(crate) const MAX_ALIASES: usize = 1_000;

/// Aliases by name, each with the models it stands for.
pub(crate) type Aliases = BTreeMap<String, Vec<String>>;

/// The catalogue in force on a host, and the built-in one for a store that
/// holds none; the aliases, read with it.
pub(crate) struct CatalogueState {
    current: RwLock<Arc<Catalogue>>,
    builtin: Arc<Catalogue>,
    aliases: RwLock<Arc<Aliases>>,
}

impl CatalogueState {
    /// `builtin` in force until the store is read.
    pub(crate) fn new(builtin: &Catalogue) -> Self {
        let builtin = Arc::new(builtin.clone());
        CatalogueState {
            current: RwLock::new(builtin.clone()),
            builtin,
            aliases: RwLock::default(),
        }
    }
}

impl Broker {
    /// The catalogue in force on this host.
    pub(crate) fn catalogue(&self) -> Arc<Catalogue> {
        self.inner().catalogue.current.read().clone()
    }

    /// Reads the store's catalogue into memory (the built-in one when the
    /// store holds none) and returns it.
    pub(crate) async fn load_catalogue(&self) -> Result<Arc<Catalogue>> {
        let stored = self.store().catalogue().await?;
        let state = &self.inner().catalogue;
        let c = if stored.is_empty() {
            state.builtin.clone()
        } else {
            Arc::new(Catalogue::from_store(stored))
        };
        *state.current.write() = c.clone();
        let aliases = self.store().aliases().await?;
        let aliases = (aliases.into_iter()).map(|a| (a.alias, a.models)).collect();
        *state.aliases.write() = Arc::new(aliases);
        Ok(c)
    }

    /// The aliases in force on this host.
    pub(crate) fn aliases(&self) -> Arc<Aliases> {
        self.inner().catalogue.aliases.read().clone()
    }

    /// The aliases in force on this host, as the API shows them.
    pub(crate) fn alias_list(&self) -> Vec<ModelAlias> {
        (self.aliases().iter())
            .map(|(alias, models)| ModelAlias {
                alias: alias.clone(),
                models: models.clone(),
            })
            .collect()
    }

    /// The models a call names, in the order they are tried, aliases
    /// resolved: each alias in its place becomes its models, and a model
    /// named twice keeps its first place. Refused (400): more than
    /// [`MAX_MODELS`] models once resolved; in a list of several names, one
    /// the caller wrote that is neither an alias, in the catalogue nor
    /// served by any node (a single unknown model stays OpenAI's 404
    /// `model_not_found`, checked by the caller). An alias's own models are
    /// not checked: one the catalogue dropped is skipped like a model with
    /// no node, so removing a model does not break the aliases naming it.
    pub(crate) fn resolve_models(&self, service: Service, asked: &[String]) -> Result<Vec<String>> {
        let aliases = self.aliases();
        if asked.len() == 1 && !aliases.contains_key(&asked[0]) {
            // The common call: one model, no alias.
            return Ok(asked.to_vec());
        }
        let catalogue = self.catalogue();
        let pools = self.pools();
        let mut out: Vec<String> = Vec::with_capacity(asked.len());
        for name in asked {
            let models = match aliases.get(name) {
                Some(models) => models.as_slice(),
                None if catalogue.get(service, name).is_none()
                    && !pools.is_offered(service, name) =>
                {
                    return Err(Error::InvalidInput(format!(
                        "`models`: no {service} model `{name}` is offered"
                    )));
                }
                None => std::slice::from_ref(name),
            };
            for m in models {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
        if out.len() > MAX_MODELS {
            return Err(Error::InvalidInput(format!(
                "the request names {} models once aliases are resolved; at most {MAX_MODELS}",
                out.len()
            )));
        }
        Ok(out)
    }
}

impl Admin {
    /// The catalogue in force on this host.
    pub fn catalogue(&self) -> Vec<CatalogueModel> {
        self.broker.catalogue().models().to_vec()
    }

    /// Adds an entry to the catalogue or changes the one for the same
    /// service and model. Refused (400): a tier outside 1-4, a bad model
    /// name (the rules of a model named in a request, unpadded), a target
    /// over 100,000 nodes, a new entry past 1,000. Nodes below a raised
    /// minimum tier leave the pool; the answer counts them.
    pub async fn put_catalogue_model(&self, model: CatalogueModel) -> Result<CatalogueChange> {
        self.put_catalogue(model, true).await
    }

    /// [`Admin::put_catalogue_model`]; with `keep_builtin` false, a store
    /// that holds no entry gets this one alone (seeding from a config file,
    /// whose models replace the built-in ones).
    pub(crate) async fn put_catalogue(
        &self,
        model: CatalogueModel,
        keep_builtin: bool,
    ) -> Result<CatalogueChange> {
        crate::network::check_catalogue_model(&model)?;
        if model.target_nodes > MAX_TARGET_NODES {
            return Err(Error::InvalidInput(format!(
                "target_nodes must be at most {MAX_TARGET_NODES}, not {}",
                model.target_nodes
            )));
        }
        if self
            .broker
            .store()
            .aliases()
            .await?
            .iter()
            .any(|a| a.alias == model.model)
        {
            return Err(Error::Conflict(format!(
                "`{}` is an alias; remove the alias before adding a model of that name",
                model.model
            )));
        }
        let stored = self.stored_catalogue(keep_builtin).await?;
        let is_new = !stored
            .iter()
            .any(|m| m.service == model.service && m.model == model.model);
        if is_new && stored.len() >= MAX_CATALOGUE_MODELS {
            return Err(Error::InvalidInput(format!(
                "the catalogue holds {MAX_CATALOGUE_MODELS} models, the most it may; \
                 remove one first"
            )));
        }
        let store = self.broker.store();
        store.put_catalogue_model(&model).await?;
        self.broker.load_catalogue().await?;
        let removed = self
            .leave_pool(model.service, &model.model, model.min_tier)
            .await?;
        Ok(CatalogueChange {
            entry: Some(model),
            removed_nodes: removed,
        })
    }

    /// Removes (service, model) from the catalogue: every node serving it
    /// leaves that pool (the answer counts them) and calls for it get
    /// `model_not_found`. Refused: an entry not in the catalogue (404), the
    /// last one (409).
    pub async fn delete_catalogue_model(
        &self,
        service: Service,
        model: &str,
    ) -> Result<CatalogueChange> {
        let stored = self.stored_catalogue(true).await?;
        if !stored
            .iter()
            .any(|m| m.service == service && m.model == model)
        {
            return Err(Error::NotFound(format!(
                "{service} model `{model}` is not in the catalogue"
            )));
        }
        if stored.len() == 1 {
            return Err(Error::Conflict(
                "the catalogue's last model cannot be removed: a store with no catalogue \
                 serves the built-in one"
                    .into(),
            ));
        }
        self.broker
            .store()
            .delete_catalogue_model(service, model)
            .await?;
        self.broker.load_catalogue().await?;
        // No node's tier reaches past 4.
        let removed = self.leave_pool(service, model, u8::MAX).await?;
        Ok(CatalogueChange {
            entry: None,
            removed_nodes: removed,
        })
    }

    /// The model aliases in force on this host, by name.
    pub fn aliases(&self) -> Vec<ModelAlias> {
        self.broker.alias_list()
    }

    /// Defines an alias, or changes the one of the same name. Refused (400):
    /// a bad name (the rules of a catalogue model name), a name a catalogue
    /// entry uses (an alias never shadows a model), no model or more than
    /// 4, a model named twice or named badly, a model that is
    /// itself an alias (aliases do not nest), a new alias past 1,000.
    /// Other hosts see it on their next refresh.
    pub async fn put_alias(&self, alias: ModelAlias) -> Result<ModelAlias> {
        let bad = |m: &str| {
            m.is_empty() || m.len() > 200 || m.trim() != m || m.chars().any(char::is_control)
        };
        let name = &alias.alias;
        if bad(name) {
            return Err(Error::InvalidInput(format!(
                "alias `{name}` is empty, padded, too long or holds control characters"
            )));
        }
        if let Some(m) = (self.broker.catalogue().models().iter()).find(|m| m.model == *name) {
            return Err(Error::InvalidInput(format!(
                "alias `{name}` would shadow the catalogue's {} model of that name",
                m.service
            )));
        }
        if alias.models.is_empty() || alias.models.len() > MAX_MODELS {
            return Err(Error::InvalidInput(format!(
                "alias `{name}` must name 1 to {MAX_MODELS} models"
            )));
        }
        let store = self.broker.store();
        let stored = store.aliases().await?;
        for (i, m) in alias.models.iter().enumerate() {
            if bad(m) {
                return Err(Error::InvalidInput(format!(
                    "alias `{name}`: model `{m}` is empty, padded, too long or holds control \
                     characters"
                )));
            }
            if alias.models[..i].contains(m) {
                return Err(Error::InvalidInput(format!(
                    "alias `{name}` names `{m}` twice"
                )));
            }
            if m == name || stored.iter().any(|a| a.alias == *m) {
                return Err(Error::InvalidInput(format!(
                    "alias `{name}`: `{m}` is an alias; aliases name models, not other aliases"
                )));
            }
        }
        if stored.iter().any(|a| a.models.contains(name)) {
            return Err(Error::InvalidInput(format!(
                "`{name}` is a model another alias names; aliases name models, not other aliases"
            )));
        }
        let is_new = !stored.iter().any(|a| a.alias == *name);
        if is_new && stored.len() >= MAX_ALIASES {
            return Err(Error::InvalidInput(format!(
                "the store holds {MAX_ALIASES} aliases, the most it may; remove one first"
            )));
        }
        store.put_alias(&alias).await?;
        self.broker.load_catalogue().await?;
        Ok(alias)
    }

    /// Removes an alias (404 when there is none); calls naming it then get
    /// `model_not_found`. Other hosts follow on their next refresh.
    pub async fn delete_alias(&self, alias: &str) -> Result<()> {
        self.broker.store().delete_alias(alias).await?;
        self.broker.load_catalogue().await?;
        Ok(())
    }

    /// How providers are paid, and what the platform keeps.
    pub fn reward_policy(&self) -> RewardPolicyView {
        self.broker.inner().rewards.describe()
    }

    /// The store's catalogue entries. When it holds none and `keep_builtin`,
    /// the catalogue in force (the built-in one) is written first, so that a
    /// change applies to it rather than to an empty catalogue.
    async fn stored_catalogue(&self, keep_builtin: bool) -> Result<Vec<CatalogueModel>> {
        let store = self.broker.store();
        let stored = store.catalogue().await?;
        if !stored.is_empty() || !keep_builtin {
            return Ok(stored);
        }
        let builtin = self.broker.inner().catalogue.builtin.clone();
        for m in builtin.models() {
            store.put_catalogue_model(m).await?;
        }
        Ok(builtin.models().to_vec())
    }

    /// Takes (service, model) out of every node below `min_tier`, in the
    /// store and in this host's routing; returns how many nodes left.
    async fn leave_pool(&self, service: Service, model: &str, min_tier: u8) -> Result<u32> {
        let store = self.broker.store();
        let mut by_node: BTreeMap<ProvisionId, Vec<PoolEntry>> = BTreeMap::new();
        for e in store.pool_entries().await? {
            by_node.entry(e.provision_id.clone()).or_default().push(e);
        }
        let mut removed = 0;
        for (id, entries) in by_node {
            let hit = |e: &PoolEntry| e.service == service && e.model == model && e.tier < min_tier;
            if !entries.iter().any(hit) {
                continue;
            }
            let rest: Vec<PoolEntry> = entries.into_iter().filter(|e| !hit(e)).collect();
            let p = match store.provision(&id).await {
                Ok(p) => p,
                // Deleted meanwhile: nothing left to change.
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            store
                .update_provision(&id, p.state, p.endpoint, &rest)
                .await?;
            let pools = self.broker.pools();
            if rest.is_empty() {
                pools.remove(&id);
            } else {
                pools.upsert(&id, rest);
            }
            removed += 1;
        }
        Ok(removed)
    }
}

impl Network {
    /// What the network offers: every catalogue model with its price (the
    /// model's own, else its service's) and the healthy nodes serving it on
    /// this host now.
    pub fn offers(&self) -> CatalogueList {
        let b = &self.broker;
        let data = (b.catalogue().models().iter())
            .map(|m| CatalogueOffer {
                service: m.service,
                model: m.model.clone(),
                min_tier: m.min_tier,
                target_nodes: m.target_nodes,
                nodes: b.pools().pool_size(m.service, &m.model),
                price: PriceEntry::clone(&b.prices().get(m.service, &m.model)),
            })
            .collect();
        CatalogueList {
            object: "list".into(),
            data,
            aliases: b.alias_list(),
        }
    }

    /// The catalogue in force on this host: the rule for what a node may
    /// serve.
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.broker.catalogue()
    }
}
