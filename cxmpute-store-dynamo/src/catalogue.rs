//! The model catalogue, prices and notifications: what the operator
//! publishes, each a single-partition listing, written rarely and read whole.

use async_trait::async_trait;
use cxmpute_core::{
    CatalogueModel, CatalogueStore, Credits, Error, ModelAlias, Notification, NotificationId,
    PriceEntry, Result, Service, Timestamp,
};

use crate::db::{DynamoStore, Fail, Query};
use crate::item::{Ex, Item, ItemBuilder, Rd};
use crate::schema;

fn decode_catalogue_model(it: &Item) -> Result<CatalogueModel> {
    let r = Rd::new(it, "catalogue entry");
    Ok(CatalogueModel {
        service: r.parse("service")?,
        model: r.s("model")?,
        min_tier: r.num("min_tier")?,
        target_nodes: r.num("target_nodes")?,
    })
}

fn decode_alias(it: &Item) -> Result<ModelAlias> {
    let r = Rd::new(it, "model alias");
    Ok(ModelAlias {
        alias: r.s("alias")?,
        models: r.list_s("models")?,
    })
}

fn decode_price(it: &Item) -> Result<PriceEntry> {
    let r = Rd::new(it, "price");
    Ok(PriceEntry {
        service: r.parse("service")?,
        model: r.opt_s("model")?,
        per_request: Credits(r.num("per_request")?),
        per_million_input_tokens: Credits(r.num("per_million_input_tokens")?),
        per_million_output_tokens: Credits(r.num("per_million_output_tokens")?),
        per_million_units: Credits(r.num("per_million_units")?),
    })
}

fn decode_notification(it: &Item) -> Result<Notification> {
    let r = Rd::new(it, "notification");
    Ok(Notification {
        id: NotificationId::new(r.s("id")?),
        title: r.s("title")?,
        banner: r.s("banner")?,
        popup: r.s("popup")?,
        starts_at: Timestamp(r.num("starts_at")?),
        ends_at: Timestamp(r.num("ends_at")?),
        placements: r.json("placements")?,
    })
}

#[async_trait]
impl CatalogueStore for DynamoStore {
    // ---- the catalogue ------------------------------------------------------

    async fn catalogue(&self) -> Result<Vec<CatalogueModel>> {
        let q = Query::prefix(schema::CATALOGUE_PK, "MODEL#");
        let mut v = self
            .query("reading the catalogue", q)
            .await?
            .iter()
            .map(decode_catalogue_model)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
        Ok(v)
    }

    async fn put_catalogue_model(&self, m: &CatalogueModel) -> Result<()> {
        let what = "storing a catalogue entry";
        let item = ItemBuilder::at(schema::catalogue_model(m.service, &m.model))
            .s("service", m.service.as_str())
            .s("model", &m.model)
            .n("min_tier", m.min_tier)
            .n("target_nodes", m.target_nodes)
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    async fn delete_catalogue_model(&self, service: Service, model: &str) -> Result<()> {
        let what = "deleting a catalogue entry";
        let mut ex = Ex::new();
        let cond = ex.exists();
        match self
            .delete(
                what,
                schema::catalogue_model(service, model),
                Some(cond),
                ex,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!(
                "catalogue entry {service} `{model}`"
            ))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    // ---- aliases ------------------------------------------------------------

    async fn aliases(&self) -> Result<Vec<ModelAlias>> {
        let q = Query::prefix(schema::CATALOGUE_PK, "ALIAS#");
        let mut v = self
            .query("reading model aliases", q)
            .await?
            .iter()
            .map(decode_alias)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| a.alias.cmp(&b.alias));
        Ok(v)
    }

    async fn put_alias(&self, a: &ModelAlias) -> Result<()> {
        let what = "storing a model alias";
        let item = ItemBuilder::at(schema::model_alias(&a.alias))
            .s("alias", &a.alias)
            .set("models", crate::item::list_s(a.models.iter().cloned()))
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    async fn delete_alias(&self, alias: &str) -> Result<()> {
        let what = "deleting a model alias";
        let mut ex = Ex::new();
        let cond = ex.exists();
        match self
            .delete(what, schema::model_alias(alias), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!("alias `{alias}`"))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    // ---- prices -------------------------------------------------------------

    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        let q = Query::prefix(schema::PRICES_PK, "PRICE#");
        let mut v = self
            .query("reading prices", q)
            .await?
            .iter()
            .map(decode_price)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
        Ok(v)
    }

    async fn put_price(&self, p: &PriceEntry) -> Result<()> {
        let what = "storing a price";
        let item = ItemBuilder::at(schema::price(p.service, p.model.as_deref()))
            .s("service", p.service.as_str())
            .opt_s("model", p.model.clone())
            .n("per_request", p.per_request.0)
            .n("per_million_input_tokens", p.per_million_input_tokens.0)
            .n("per_million_output_tokens", p.per_million_output_tokens.0)
            .n("per_million_units", p.per_million_units.0)
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    // ---- notifications ------------------------------------------------------

    async fn put_notification(&self, x: &Notification) -> Result<()> {
        let what = "storing a notification";
        let item = ItemBuilder::at(schema::notification(&x.id))
            .s("id", x.id.as_str())
            .s("title", &x.title)
            .s("banner", &x.banner)
            .s("popup", &x.popup)
            .n("starts_at", x.starts_at.0)
            .n("ends_at", x.ends_at.0)
            .json("placements", &x.placements)?
            .build();
        self.put(what, item, None, Ex::new())
            .await
            .map_err(|f| f.into_error(what))
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        let what = "deleting a notification";
        let mut ex = Ex::new();
        let cond = ex.exists();
        match self
            .delete(what, schema::notification(id), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::NotFound(format!("notification {id}"))),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        let q = Query::prefix(schema::NOTIFS_PK, "NTF#");
        let mut v = self
            .query("reading notifications", q)
            .await?
            .iter()
            .map(decode_notification)
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (a.starts_at, &a.id).cmp(&(b.starts_at, &b.id)));
        Ok(v)
    }
}
