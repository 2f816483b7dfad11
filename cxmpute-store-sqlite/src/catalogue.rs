//! [`CatalogueStore`] for [`SqliteStore`]: the model catalogue, prices and
//! notifications (tables `catalogue`, `prices` and `notifications`).

use async_trait::async_trait;
use cxmpute_core::*;

use crate::rows;
use crate::sql::*;
use crate::SqliteStore;

#[async_trait]
impl CatalogueStore for SqliteStore {
    async fn catalogue(&self) -> Result<Vec<CatalogueModel>> {
        self.read(move |c| Box::pin(async move { catalogue(c).await }))
            .await
    }

    async fn put_catalogue_model(&self, m: &CatalogueModel) -> Result<()> {
        let m = m.clone();
        self.writer
            .write(move |c| Box::pin(async move { put_catalogue_model(c, &m).await }))
            .await
    }

    async fn delete_catalogue_model(&self, service: Service, model: &str) -> Result<()> {
        let model = model.to_owned();
        self.writer
            .write(move |c| {
                Box::pin(async move { delete_catalogue_model(c, service, &model).await })
            })
            .await
    }

    async fn aliases(&self) -> Result<Vec<ModelAlias>> {
        self.read(move |c| Box::pin(async move { aliases(c).await }))
            .await
    }

    async fn put_alias(&self, a: &ModelAlias) -> Result<()> {
        let a = a.clone();
        self.writer
            .write(move |c| Box::pin(async move { put_alias(c, &a).await }))
            .await
    }

    async fn delete_alias(&self, alias: &str) -> Result<()> {
        let alias = alias.to_owned();
        self.writer
            .write(move |c| Box::pin(async move { delete_alias(c, &alias).await }))
            .await
    }

    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.read(move |c| Box::pin(async move { prices(c).await }))
            .await
    }

    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        let price = price.clone();
        self.writer
            .write(move |c| Box::pin(async move { put_price(c, &price).await }))
            .await
    }

    async fn put_notification(&self, n: &Notification) -> Result<()> {
        let n = n.clone();
        self.writer
            .write(move |c| Box::pin(async move { put_notification(c, &n).await }))
            .await
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { delete_notification(c, id.as_str()).await }))
            .await
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.read(move |c| Box::pin(async move { notifications(c).await }))
            .await
    }
}

// ---- the catalogue ----------------------------------------------------------

async fn catalogue(c: &mut Conn) -> Result<Vec<CatalogueModel>> {
    let sql = "SELECT service, model, min_tier, target_nodes FROM catalogue";
    let found = fetch_all(c, "reading the catalogue", sqlx::query(sql)).await?;
    let mut v = (found.iter())
        .map(rows::catalogue_model)
        .collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
    Ok(v)
}

async fn put_catalogue_model(c: &mut Conn, m: &CatalogueModel) -> Result<()> {
    let q = sqlx::query(
        "INSERT INTO catalogue (service, model, min_tier, target_nodes) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (service, model) DO UPDATE SET min_tier = excluded.min_tier, \
         target_nodes = excluded.target_nodes",
    )
    .bind(m.service.as_str())
    .bind(&m.model)
    .bind(i64::from(m.min_tier))
    .bind(i64::from(m.target_nodes));
    execute(c, "storing a catalogue entry", q).await.map(drop)
}

async fn delete_catalogue_model(c: &mut Conn, service: Service, model: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM catalogue WHERE service = ?1 AND model = ?2")
        .bind(service.as_str())
        .bind(model);
    execute_found(c, "deleting a catalogue entry", q, || {
        format!("catalogue entry {service} `{model}`")
    })
    .await
}

// ---- aliases ----------------------------------------------------------------

async fn aliases(c: &mut Conn) -> Result<Vec<ModelAlias>> {
    let sql = "SELECT alias, models FROM model_aliases ORDER BY alias";
    let found = fetch_all(c, "reading model aliases", sqlx::query(sql)).await?;
    (found.iter())
        .map(|row| {
            let models: String = rows::col(row, 1)?;
            Ok(ModelAlias {
                alias: rows::col(row, 0)?,
                models: serde_json::from_str(&models).map_err(crate::error::corrupt)?,
            })
        })
        .collect()
}

async fn put_alias(c: &mut Conn, a: &ModelAlias) -> Result<()> {
    let q = sqlx::query(
        "INSERT INTO model_aliases (alias, models) VALUES (?1, ?2) \
         ON CONFLICT (alias) DO UPDATE SET models = excluded.models",
    )
    .bind(&a.alias)
    .bind(rows::json(&a.models)?);
    execute(c, "storing a model alias", q).await.map(drop)
}

async fn delete_alias(c: &mut Conn, alias: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM model_aliases WHERE alias = ?1").bind(alias);
    execute_found(c, "deleting a model alias", q, || {
        format!("alias `{alias}`")
    })
    .await
}

// ---- prices -----------------------------------------------------------------

async fn prices(c: &mut Conn) -> Result<Vec<PriceEntry>> {
    let sql = concat!(
        "SELECT service, model, per_request, per_million_input_tokens, ",
        "per_million_output_tokens, per_million_units FROM prices"
    );
    let found = fetch_all(c, "reading prices", sqlx::query(sql)).await?;
    let mut v = found.iter().map(rows::price).collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
    Ok(v)
}

async fn put_price(c: &mut Conn, p: &PriceEntry) -> Result<()> {
    let model_key = match &p.model {
        Some(m) => format!("={m}"),
        None => String::new(),
    };
    let q = sqlx::query(
        "INSERT INTO prices (service, model_key, model, per_request, per_million_input_tokens, \
         per_million_output_tokens, per_million_units) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         ON CONFLICT (service, model_key) DO UPDATE SET per_request = excluded.per_request, \
         per_million_input_tokens = excluded.per_million_input_tokens, \
         per_million_output_tokens = excluded.per_million_output_tokens, \
         per_million_units = excluded.per_million_units",
    )
    .bind(p.service.as_str())
    .bind(model_key)
    .bind(p.model.as_deref())
    .bind(p.per_request.0)
    .bind(p.per_million_input_tokens.0)
    .bind(p.per_million_output_tokens.0)
    .bind(p.per_million_units.0);
    execute(c, "storing a price", q).await.map(drop)
}

// ---- notifications ----------------------------------------------------------

async fn put_notification(c: &mut Conn, n: &Notification) -> Result<()> {
    let placements = serde_json::to_string(&n.placements).unwrap_or_else(|_| "[]".into());
    let q = sqlx::query(
        "INSERT OR REPLACE INTO notifications (id, title, banner, popup, starts_at, ends_at, \
         placements) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(n.id.as_str())
    .bind(&n.title)
    .bind(&n.banner)
    .bind(&n.popup)
    .bind(n.starts_at.0)
    .bind(n.ends_at.0)
    .bind(placements);
    execute(c, "storing a notification", q).await.map(drop)
}

async fn delete_notification(c: &mut Conn, id: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM notifications WHERE id = ?1").bind(id);
    execute_found(c, "deleting a notification", q, || {
        format!("notification {id}")
    })
    .await
}

async fn notifications(c: &mut Conn) -> Result<Vec<Notification>> {
    let sql = concat!(
        "SELECT id, title, banner, popup, starts_at, ends_at, placements ",
        "FROM notifications ORDER BY starts_at, id"
    );
    let found = fetch_all(c, "reading notifications", sqlx::query(sql)).await?;
    found.iter().map(rows::notification).collect()
}
