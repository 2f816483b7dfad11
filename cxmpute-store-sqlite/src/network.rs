//! [`NetworkStore`] for [`SqliteStore`]: providers, their nodes and the
//! nodes' pool entries (tables `providers`, `provisions`, `pool_entries`).

use async_trait::async_trait;
use cxmpute_core::secret::KeyHash;
use cxmpute_core::store_support::{check_provision_update, found};
use cxmpute_core::*;

use crate::error::map;
use crate::rows::{self, col, json, pool_entry_cols, provider_cols, provision_cols};
use crate::sql::*;
use crate::SqliteStore;

#[async_trait]
impl NetworkStore for SqliteStore {
    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        let provider = provider.clone();
        self.writer
            .write(move |c| Box::pin(async move { create_provider(c, &provider).await }))
            .await
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { provider(c, id.as_str()).await }))
            .await
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { provider_by_key_hash(c, &hash).await }))
            .await
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { provider_by_user(c, user.as_str()).await }))
            .await
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        let (id, hash) = (id.clone(), *new_hash);
        self.writer
            .write(move |c| {
                Box::pin(async move { rotate_provider_key(c, id.as_str(), &hash).await })
            })
            .await
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move { set_provider_suspended(c, id.as_str(), &suspension).await })
            })
            .await
    }

    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        let (provision, entries) = (provision.clone(), entries.to_vec());
        self.writer
            .write(move |c| {
                Box::pin(async move { create_provision(c, &provision, &entries).await })
            })
            .await
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { provision(c, id.as_str()).await }))
            .await
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        let provider = provider.clone();
        self.read(move |c| {
            Box::pin(async move { provisions_by_provider(c, provider.as_str()).await })
        })
        .await
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.read(move |c| Box::pin(async move { provisions(c).await }))
            .await
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        let (id, entries) = (id.clone(), entries.to_vec());
        self.writer
            .write(move |c| {
                Box::pin(async move {
                    update_provision(c, id.as_str(), state, endpoint.as_deref(), &entries).await
                })
            })
            .await
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { heartbeat(c, id.as_str(), at).await }))
            .await
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { delete_provision(c, id.as_str()).await }))
            .await
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.read(move |c| Box::pin(async move { pool_entries(c).await }))
            .await
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.writer
            .write(move |c| Box::pin(async move { expire_provisions(c, before).await }))
            .await
    }
}

// ---- providers --------------------------------------------------------------

async fn create_provider(c: &mut Conn, p: &Provider) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(&p.suspended);
    let q = sqlx::query(
        "INSERT INTO providers (id, user_id, email, key_hash, earnings, suspended_reason, \
         suspended_by, suspended_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(p.id.as_str())
    .bind(p.user_id.as_ref().map(|u| u.as_str()))
    .bind(&p.email)
    .bind(&p.key_hash.0[..])
    .bind(p.earnings.0)
    .bind(reason)
    .bind(by)
    .bind(at)
    .bind(p.created_at.0);
    execute(c, &format!("provider {}", p.id), q).await.map(drop)
}

const PROVIDER_BY: [&str; 3] = [
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.id = ?1"
    ),
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.key_hash = ?1"
    ),
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.user_id = ?1"
    ),
];

async fn provider(c: &mut Conn, id: &str) -> Result<Provider> {
    let row = fetch_optional(
        c,
        "reading a provider",
        sqlx::query(PROVIDER_BY[0]).bind(id),
    )
    .await?;
    rows::provider(&found(row, || format!("provider {id}"))?)
}

async fn provider_by_key_hash(c: &mut Conn, hash: &KeyHash) -> Result<Provider> {
    let q = sqlx::query(PROVIDER_BY[1]).bind(&hash.0[..]);
    let row = fetch_optional(c, "reading a provider", q).await?;
    rows::provider(&found(row, || "provider key".into())?)
}

async fn provider_by_user(c: &mut Conn, user: &str) -> Result<Provider> {
    let row = fetch_optional(
        c,
        "reading a provider",
        sqlx::query(PROVIDER_BY[2]).bind(user),
    )
    .await?;
    rows::provider(&found(row, || format!("provider of {user}"))?)
}

async fn rotate_provider_key(c: &mut Conn, id: &str, new_hash: &KeyHash) -> Result<()> {
    let taken = sqlx::query("SELECT EXISTS (SELECT 1 FROM providers WHERE key_hash = ?1)")
        .bind(&new_hash.0[..])
        .fetch_one(&mut *c)
        .await
        .map_err(|e| map("checking a provider key", e))?;
    if col::<bool>(&taken, 0)? {
        return Err(Error::AlreadyExists("provider key".into()));
    }
    let q = sqlx::query("UPDATE providers SET key_hash = ?2 WHERE id = ?1")
        .bind(id)
        .bind(&new_hash.0[..]);
    execute_found(c, "provider key", q, || format!("provider {id}")).await
}

async fn set_provider_suspended(c: &mut Conn, id: &str, s: &Option<Suspension>) -> Result<()> {
    set_suspended(c, "providers", "provider", id, s).await
}

// ---- provisions and pools ---------------------------------------------------

async fn insert_entries(c: &mut Conn, id: &str, entries: &[PoolEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    // All in one statement; an entry's place in the array is its seq.
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.provider_id.as_str(),
                e.service.as_str(),
                e.model.as_str(),
                e.endpoint.as_str(),
                e.node_secret.as_str(),
                i64::from(e.tier),
                e.region.as_str(),
            )
        })
        .collect();
    let q = sqlx::query(concat!(
        "INSERT INTO pool_entries (provision_id, seq, provider_id, service, model, endpoint, ",
        "node_secret, tier, region) SELECT ?1, key, value ->> 0, value ->> 1, value ->> 2, ",
        "value ->> 3, value ->> 4, value ->> 5, value ->> 6 FROM json_each(?2)"
    ))
    .bind(id)
    .bind(json(&rows)?);
    execute(c, "storing a pool entry", q).await.map(drop)
}

async fn delete_entries(c: &mut Conn, id: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM pool_entries WHERE provision_id = ?1").bind(id);
    execute(c, "deleting pool entries", q).await.map(drop)
}

async fn create_provision(c: &mut Conn, p: &Provision, entries: &[PoolEntry]) -> Result<()> {
    if !exists(
        c,
        "checking a provider",
        "SELECT EXISTS (SELECT 1 FROM providers WHERE id = ?1)",
        p.provider_id.as_str(),
    )
    .await?
    {
        return Err(Error::NotFound(format!("provider {}", p.provider_id)));
    }
    let q = sqlx::query(
        "INSERT INTO provisions (id, provider_id, endpoint, node_secret, device, country, region, \
         city, tier, state, last_heartbeat, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .bind(p.id.as_str())
    .bind(p.provider_id.as_str())
    .bind(p.endpoint.as_deref())
    .bind(&p.node_secret)
    .bind(p.device.to_string())
    .bind(&p.location.country)
    .bind(&p.location.state)
    .bind(&p.location.city)
    .bind(i64::from(p.tier))
    .bind(p.state.as_str())
    .bind(p.last_heartbeat.0)
    .bind(p.created_at.0);
    execute(c, &format!("provision {}", p.id), q).await?;
    insert_entries(c, p.id.as_str(), entries).await
}

const PROVISIONS: [&str; 3] = [
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n WHERE n.id = ?1"
    ),
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n ",
        "WHERE n.provider_id = ?1 ORDER BY n.created_at, n.id"
    ),
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n ",
        "WHERE n.state <> 'ended' ORDER BY n.created_at, n.id"
    ),
];

async fn provision(c: &mut Conn, id: &str) -> Result<Provision> {
    let row = fetch_optional(
        c,
        "reading a provision",
        sqlx::query(PROVISIONS[0]).bind(id),
    )
    .await?;
    rows::provision(&found(row, || format!("provision {id}"))?)
}

async fn provisions_by_provider(c: &mut Conn, provider: &str) -> Result<Vec<Provision>> {
    let q = sqlx::query(PROVISIONS[1]).bind(provider);
    let found = fetch_all(c, "reading provisions", q).await?;
    found.iter().map(rows::provision).collect()
}

async fn provisions(c: &mut Conn) -> Result<Vec<Provision>> {
    let found = fetch_all(c, "reading provisions", sqlx::query(PROVISIONS[2])).await?;
    found.iter().map(rows::provision).collect()
}

async fn update_provision(
    c: &mut Conn,
    id: &str,
    state: ProvisionState,
    endpoint: Option<&str>,
    entries: &[PoolEntry],
) -> Result<()> {
    check_provision_update(state, entries)?;
    let q = sqlx::query("UPDATE provisions SET state = ?2, endpoint = ?3 WHERE id = ?1")
        .bind(id)
        .bind(state.as_str())
        .bind(endpoint);
    execute_found(c, "updating a provision", q, || format!("provision {id}")).await?;
    delete_entries(c, id).await?;
    insert_entries(c, id, entries).await
}

async fn heartbeat(c: &mut Conn, id: &str, at: Timestamp) -> Result<()> {
    // max(): a heartbeat that arrives late never moves the clock back.
    let q =
        sqlx::query("UPDATE provisions SET last_heartbeat = max(last_heartbeat, ?2) WHERE id = ?1")
            .bind(id)
            .bind(at.0);
    execute_found(c, "recording a heartbeat", q, || format!("provision {id}")).await
}

async fn delete_provision(c: &mut Conn, id: &str) -> Result<()> {
    // Its pool entries go with it: the schema cascades the delete.
    let q = sqlx::query("DELETE FROM provisions WHERE id = ?1").bind(id);
    execute_found(c, "deleting a provision", q, || format!("provision {id}")).await
}

async fn pool_entries(c: &mut Conn) -> Result<Vec<PoolEntry>> {
    let sql = concat!(
        "SELECT ",
        pool_entry_cols!(),
        " FROM pool_entries e ORDER BY e.provision_id, e.seq"
    );
    let found = fetch_all(c, "reading pool entries", sqlx::query(sql)).await?;
    let mut v = found
        .iter()
        .map(rows::pool_entry)
        .collect::<Result<Vec<_>>>()?;
    // The same order as the memory store: by node, then service, then model.
    v.sort_by(|a, b| {
        (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
    });
    Ok(v)
}

async fn expire_provisions(c: &mut Conn, before: Timestamp) -> Result<Vec<ProvisionId>> {
    let q = sqlx::query(
        "UPDATE provisions SET state = 'ended' \
         WHERE state <> 'ended' AND last_heartbeat < ?1 RETURNING id",
    )
    .bind(before.0);
    let ended = fetch_all(c, "expiring provisions", q).await?;
    let ids = ended
        .iter()
        .map(|row| col::<String>(row, 0))
        .collect::<Result<Vec<_>>>()?;
    if !ids.is_empty() {
        let q = sqlx::query(
            "DELETE FROM pool_entries WHERE provision_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(&ids)?);
        execute(c, "deleting pool entries", q).await?;
    }
    let mut ids: Vec<ProvisionId> = ids.into_iter().map(ProvisionId::new).collect();
    ids.sort();
    Ok(ids)
}
