//! Providers, their nodes (provisions) and the pool entries the routing
//! index is built from.
//!
//! A node item carries a version number and the sort keys of its pool
//! entries. Every change of state or entries reads the node, then writes the
//! node, its index item and its entries in one transaction conditioned on
//! the version it read: two hosts changing the same node cannot interleave,
//! and the entries deleted are always the ones that exist.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cxmpute_core::store_support::check_provision_update;
use cxmpute_core::{
    Credits, Error, KeyHash, Location, NetworkStore, PoolEntry, Provider, ProviderId, Provision,
    ProvisionId, ProvisionState, Result, Suspension, Timestamp, UserId,
};

use crate::db::{DynamoStore, Fail, Query, Tx, MAX_TX_ITEMS};
use crate::item::{key, list_s, n, s, Ex, Item, ItemBuilder, Rd};
use crate::schema;

fn provider_item(p: &Provider) -> Result<Item> {
    Ok(ItemBuilder::at(schema::provider(&p.id))
        .s("id", p.id.as_str())
        .opt_s("user_id", p.user_id.as_ref().map(|u| u.as_str()))
        .s("email", &p.email)
        .s("key_hash", p.key_hash.to_hex())
        .n("earnings", p.earnings.0)
        .opt_json("suspended", p.suspended.as_ref())?
        .n("created_at", p.created_at.0)
        .build())
}

fn decode_provider(it: &Item) -> Result<Provider> {
    let r = Rd::new(it, "provider");
    Ok(Provider {
        id: ProviderId::new(r.s("id")?),
        user_id: r.opt_s("user_id")?.map(UserId::new),
        email: r.s("email")?,
        key_hash: r.hash("key_hash")?,
        earnings: Credits(r.num("earnings")?),
        suspended: r.opt_json("suspended")?,
        created_at: Timestamp(r.num("created_at")?),
    })
}

fn node_item(p: &Provision, entry_keys: &[String]) -> Result<Item> {
    Ok(ItemBuilder::at(schema::node(&p.id))
        .s("id", p.id.as_str())
        .s("provider_id", p.provider_id.as_str())
        .opt_s("endpoint", p.endpoint.clone())
        .s("node_secret", &p.node_secret)
        .json("device", &p.device)?
        .json("location", &p.location)?
        .n("tier", p.tier)
        .s("state", p.state.as_str())
        .n("last_heartbeat", p.last_heartbeat.0)
        .n("created_at", p.created_at.0)
        .n("ver", 0)
        .set("entry_keys", list_s(entry_keys.iter().cloned()))
        .build())
}

fn decode_node(it: &Item) -> Result<Provision> {
    let r = Rd::new(it, "provision");
    Ok(Provision {
        id: ProvisionId::new(r.s("id")?),
        provider_id: ProviderId::new(r.s("provider_id")?),
        endpoint: r.opt_s("endpoint")?,
        node_secret: r.s("node_secret")?,
        device: r.json("device")?,
        location: r.json::<Location>("location")?,
        tier: r.num("tier")?,
        state: r.parse("state")?,
        last_heartbeat: Timestamp(r.num("last_heartbeat")?),
        created_at: Timestamp(r.num("created_at")?),
    })
}

/// What a change of a node needs to know besides the node itself.
struct NodeMeta {
    ver: u64,
    entry_keys: Vec<String>,
}

fn decode_meta(it: &Item) -> Result<NodeMeta> {
    let r = Rd::new(it, "provision");
    Ok(NodeMeta {
        ver: r.num("ver")?,
        entry_keys: r.list_s("entry_keys")?,
    })
}

fn entry_item(node: &ProvisionId, e: &PoolEntry) -> Item {
    ItemBuilder::new(
        schema::POOL_PK,
        schema::pool_entry_sk(node, e.service, &e.model),
    )
    .s("provision_id", e.provision_id.as_str())
    .s("provider_id", e.provider_id.as_str())
    .s("service", e.service.as_str())
    .s("model", &e.model)
    .s("endpoint", &e.endpoint)
    .s("node_secret", &e.node_secret)
    .n("tier", e.tier)
    .s("region", &e.region)
    .build()
}

fn decode_entry(it: &Item) -> Result<PoolEntry> {
    let r = Rd::new(it, "pool entry");
    Ok(PoolEntry {
        provision_id: ProvisionId::new(r.s("provision_id")?),
        provider_id: ProviderId::new(r.s("provider_id")?),
        service: r.parse("service")?,
        model: r.s("model")?,
        endpoint: r.s("endpoint")?,
        node_secret: r.s("node_secret")?,
        tier: r.num("tier")?,
        region: r.s("region")?,
    })
}

/// A node's entries by sort key: one item per (service, model), the last
/// given winning, as a transaction may touch an item only once.
fn entries_by_key(node: &ProvisionId, entries: &[PoolEntry]) -> BTreeMap<String, Item> {
    entries
        .iter()
        .map(|e| {
            (
                schema::pool_entry_sk(node, e.service, &e.model),
                entry_item(node, e),
            )
        })
        .collect()
}

fn sort_nodes(mut v: Vec<Provision>) -> Vec<Provision> {
    v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    v
}

#[async_trait]
impl NetworkStore for DynamoStore {
    // ---- providers ----------------------------------------------------------

    async fn create_provider(&self, p: &Provider) -> Result<()> {
        let what = "creating a provider";
        let mut tx = Tx::new(self);
        let mut ex = Ex::new();
        let c = ex.absent();
        tx.put(provider_item(p)?, Some(c), ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        let by_hash = ItemBuilder::at(schema::provider_hash(&p.key_hash))
            .s("provider_id", p.id.as_str())
            .build();
        tx.put(by_hash, Some(c), ex)?;
        if let Some(u) = &p.user_id {
            let mut ex = Ex::new();
            let c = ex.absent();
            let by_user = ItemBuilder::at(schema::user_provider(u))
                .s("provider_id", p.id.as_str())
                .build();
            tx.put(by_user, Some(c), ex)?;
        }
        match self.transact(what, tx).await {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::AlreadyExists(format!("provider {}", p.id))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        match self.get("reading a provider", schema::provider(id)).await? {
            Some(it) => decode_provider(&it),
            None => Err(Error::NotFound(format!("provider {id}"))),
        }
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        let p = self
            .provider_via("reading a provider by key", schema::provider_hash(hash))
            .await?;
        // Both reads are strongly consistent and rotation moves the pointer and
        // the provider together, so a rotated-away key finds nothing; the
        // comparison only makes that explicit.
        match p {
            Some(p) if p.key_hash == *hash => Ok(p),
            _ => Err(Error::NotFound("provider key".into())),
        }
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        self.provider_via("reading a user's provider", schema::user_provider(user))
            .await?
            .ok_or_else(|| Error::NotFound(format!("provider of {user}")))
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        let what = "rotating a provider key";
        let mut attempt = 0;
        loop {
            if self
                .get(what, schema::provider_hash(new_hash))
                .await?
                .is_some()
            {
                return Err(Error::AlreadyExists("provider key".into()));
            }
            let old = self.provider(id).await?.key_hash;
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let h = ex.n("key_hash");
            let upd = format!("SET {h} = {}", ex.v(s(new_hash.to_hex())));
            let cond = format!("{h} = {}", ex.v(s(old.to_hex())));
            tx.update(schema::provider(id), upd, Some(cond), ex)?;
            tx.delete(schema::provider_hash(&old), None, Ex::new())?;
            let mut ex = Ex::new();
            let c = ex.absent();
            let ptr = ItemBuilder::at(schema::provider_hash(new_hash))
                .s("provider_id", id.as_str())
                .build();
            tx.put(ptr, Some(c), ex)?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                // A concurrent rotation or a concurrent claim of the new hash:
                // look again, the checks above will say which.
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.set_suspended("provider", id.as_str(), schema::provider(id), suspension)
            .await
    }

    // ---- provisions and pools -----------------------------------------------

    async fn create_provision(&self, p: &Provision, entries: &[PoolEntry]) -> Result<()> {
        let what = "registering a provision";
        let entries = entries_by_key(&p.id, entries);
        let keys: Vec<String> = entries.keys().cloned().collect();
        let mut tx = Tx::new(self);
        let mut ex = Ex::new();
        let c = ex.exists();
        let owner = tx.check(schema::provider(&p.provider_id), c, ex)?;
        let mut ex = Ex::new();
        let c = ex.absent();
        tx.put(node_item(p, &keys)?, Some(c), ex)?;
        let index = ItemBuilder::at(schema::node_index(&p.id))
            .s("state", p.state.as_str())
            .build();
        tx.put(index, None, Ex::new())?;
        let listed = ItemBuilder::at(schema::provider_node(&p.provider_id, &p.id)).build();
        tx.put(listed, None, Ex::new())?;
        for e in entries.into_values() {
            tx.put(e, None, Ex::new())?;
        }
        match self.transact(what, tx).await {
            Ok(()) => Ok(()),
            Err(Fail::Condition(flags)) => {
                let no_provider = self
                    .must_exist_failed(what, &flags, owner, schema::provider(&p.provider_id))
                    .await?;
                Err(if no_provider {
                    Error::NotFound(format!("provider {}", p.provider_id))
                } else {
                    Error::AlreadyExists(format!("provision {}", p.id))
                })
            }
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        match self.get("reading a provision", schema::node(id)).await? {
            Some(it) => decode_node(&it),
            None => Err(Error::NotFound(format!("provision {id}"))),
        }
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        let what = "listing a provider's provisions";
        let listed = self
            .query(what, Query::prefix(schema::provider_pk(provider), "NODE#"))
            .await?;
        let ids = Self::ids_after_prefix(&listed, "NODE#")?;
        let nodes = self.nodes(what, ids).await?;
        Ok(sort_nodes(nodes.into_iter().map(|(p, _)| p).collect()))
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        let nodes = self.live_nodes("listing provisions").await?;
        Ok(sort_nodes(nodes.into_iter().map(|(p, _)| p).collect()))
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        let what = "updating a provision";
        check_provision_update(state, entries)?;
        let entries = entries_by_key(id, entries);
        let mut attempt = 0;
        loop {
            let item = self
                .get(what, schema::node(id))
                .await?
                .ok_or_else(|| Error::NotFound(format!("provision {id}")))?;
            let meta = decode_meta(&item)?;
            let new_keys: Vec<String> = entries.keys().cloned().collect();
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let ver = ex.n("ver");
            let mut sets = vec![
                format!("{} = {}", ex.n("state"), ex.v(s(state.as_str()))),
                format!("{} = {}", ex.n("entry_keys"), ex.v(list_s(new_keys))),
                format!("{ver} = {ver} + {}", ex.v(n(1))),
            ];
            let mut upd = String::new();
            match &endpoint {
                Some(e) => sets.push(format!("{} = {}", ex.n("endpoint"), ex.v(s(e)))),
                None => upd = format!(" REMOVE {}", ex.n("endpoint")),
            }
            let upd = format!("SET {}{upd}", sets.join(", "));
            let cond = format!("{ver} = {}", ex.v(n(meta.ver)));
            tx.update(schema::node(id), upd, Some(cond), ex)?;
            let mut ex = Ex::new();
            let upd = format!("SET {} = {}", ex.n("state"), ex.v(s(state.as_str())));
            tx.update(schema::node_index(id), upd, None, ex)?;
            for old in &meta.entry_keys {
                // A put replaces an entry that stays; only the ones that go are deleted.
                if !entries.contains_key(old) {
                    tx.delete(key(schema::POOL_PK, old.clone()), None, Ex::new())?;
                }
            }
            for e in entries.values() {
                tx.put(e.clone(), None, Ex::new())?;
            }
            if tx.len() > MAX_TX_ITEMS {
                return Err(Error::InvalidInput(format!(
                    "provision {id}: too many pool entries to change at once"
                )));
            }
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                // Another host changed the node since the read: read again.
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        let what = "recording a heartbeat";
        let mut ex = Ex::new();
        let hb = ex.n("last_heartbeat");
        let at_v = ex.v(n(at.0));
        let upd = format!("SET {hb} = {at_v}");
        // Only ever forward: a late, reordered heartbeat must not move it back.
        let cond = format!("{} AND {hb} < {at_v}", ex.exists());
        match self
            .update(what, schema::node(id), upd, Some(cond), ex, false)
            .await
        {
            Ok(_) => Ok(()),
            Err(Fail::Condition(_)) => match self.get(what, schema::node(id)).await? {
                Some(_) => Ok(()),
                None => Err(Error::NotFound(format!("provision {id}"))),
            },
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        let what = "deleting a provision";
        let mut attempt = 0;
        loop {
            let item = self
                .get(what, schema::node(id))
                .await?
                .ok_or_else(|| Error::NotFound(format!("provision {id}")))?;
            let node = decode_node(&item)?;
            let meta = decode_meta(&item)?;
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let cond = format!("{} = {}", ex.n("ver"), ex.v(n(meta.ver)));
            tx.delete(schema::node(id), Some(cond), ex)?;
            tx.delete(schema::node_index(id), None, Ex::new())?;
            tx.delete(
                schema::provider_node(&node.provider_id, id),
                None,
                Ex::new(),
            )?;
            for k in &meta.entry_keys {
                tx.delete(key(schema::POOL_PK, k.clone()), None, Ex::new())?;
            }
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        let items = self
            .query("reading the pool", Query::prefix(schema::POOL_PK, "ENTRY#"))
            .await?;
        let mut v = items.iter().map(decode_entry).collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| {
            (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
        });
        Ok(v)
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        let what = "expiring provisions";
        let mut gone = Vec::new();
        for (mut node, mut item) in self.live_nodes(what).await? {
            let mut attempt = 0;
            while node.state != ProvisionState::Ended && node.last_heartbeat < before {
                let meta = decode_meta(&item)?;
                let mut tx = Tx::new(self);
                let mut ex = Ex::new();
                let (st, ver, hb) = (ex.n("state"), ex.n("ver"), ex.n("last_heartbeat"));
                let ended = ex.v(s(ProvisionState::Ended.as_str()));
                let upd = format!(
                    "SET {st} = {ended}, {} = {}, {ver} = {ver} + {}",
                    ex.n("entry_keys"),
                    ex.v(list_s(Vec::<String>::new())),
                    ex.v(n(1))
                );
                // A heartbeat or a change that landed since the read saves the node.
                let cond = format!(
                    "{ver} = {} AND {hb} < {}",
                    ex.v(n(meta.ver)),
                    ex.v(n(before.0))
                );
                tx.update(schema::node(&node.id), upd, Some(cond), ex)?;
                let mut ex = Ex::new();
                let upd = format!(
                    "SET {} = {}",
                    ex.n("state"),
                    ex.v(s(ProvisionState::Ended.as_str()))
                );
                tx.update(schema::node_index(&node.id), upd, None, ex)?;
                for k in &meta.entry_keys {
                    tx.delete(key(schema::POOL_PK, k.clone()), None, Ex::new())?;
                }
                match self.transact(what, tx).await {
                    Ok(()) => {
                        gone.push(node.id.clone());
                        break;
                    }
                    Err(Fail::Condition(_)) => {
                        self.again(&mut attempt, what).await?;
                        match self.get(what, schema::node(&node.id)).await? {
                            Some(fresh) => {
                                node = decode_node(&fresh)?;
                                item = fresh;
                            }
                            None => break,
                        }
                    }
                    Err(f) => return Err(f.into_error(what)),
                }
            }
        }
        gone.sort();
        Ok(gone)
    }
}

impl DynamoStore {
    async fn provider_via(&self, what: &str, ptr: Item) -> Result<Option<Provider>> {
        let Some(p) = self.get(what, ptr).await? else {
            return Ok(None);
        };
        let id = ProviderId::new(Rd::new(&p, "provider pointer").s("provider_id")?);
        match self.get(what, schema::provider(&id)).await? {
            Some(it) => decode_provider(&it).map(Some),
            None => Ok(None),
        }
    }

    /// Reads nodes by id (consistently), in any order.
    async fn nodes(&self, what: &str, ids: Vec<ProvisionId>) -> Result<Vec<(Provision, Item)>> {
        let keys = ids.iter().map(schema::node).collect();
        self.batch_get(what, keys)
            .await?
            .into_iter()
            .map(|it| Ok((decode_node(&it)?, it)))
            .collect()
    }

    fn ids_after_prefix(items: &[Item], prefix: &str) -> Result<Vec<ProvisionId>> {
        items
            .iter()
            .map(|it| {
                let sk = Rd::new(it, "node listing").s(crate::item::SK)?;
                Ok(ProvisionId::new(sk.strip_prefix(prefix).unwrap_or(&sk)))
            })
            .collect()
    }

    /// Every node not ended, with its raw item.
    async fn live_nodes(&self, what: &str) -> Result<Vec<(Provision, Item)>> {
        let mut q = Query::prefix(schema::NODES_PK, "NODE#");
        let f = format!(
            "{} <> {}",
            q.ex.n("state"),
            q.ex.v(s(ProvisionState::Ended.as_str()))
        );
        q.filter = Some(f);
        let listed = self.query(what, q).await?;
        let ids = Self::ids_after_prefix(&listed, "NODE#")?;
        let mut nodes = self.nodes(what, ids).await?;
        // The index and the node change in the same transactions; this only
        // covers a node ended between the two reads.
        nodes.retain(|(p, _)| p.state != ProvisionState::Ended);
        Ok(nodes)
    }
}
