//! The node's side of the provider API: register, heartbeat, end.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::types::{ProvisionId, Service};
use crate::wire::{ErrorBody, RegisterProvisionRequest, RegisterProvisionResponse, ServedModel};

/// A client of the broker's provider API, signed in with a provider key.
#[derive(Clone, Debug)]
pub(crate) struct BrokerApi {
    http: reqwest::Client,
    base: String,
    key: Secret,
}

impl BrokerApi {
    /// A client of the broker at `base` (its base URL).
    pub(crate) fn new(base: &str, key: Secret) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::backend("building the broker client", e))?;
        Ok(BrokerApi {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// Registers a provision; the answer carries the node secret.
    pub(crate) async fn register(
        &self,
        req: &RegisterProvisionRequest,
    ) -> Result<RegisterProvisionResponse> {
        let r = self
            .http
            .post(format!("{}/v1/provider/provisions", self.base))
            .bearer_auth(self.key.expose())
            .json(req)
            .send()
            .await;
        let r = check(r).await?;
        r.json()
            .await
            .map_err(|e| Error::Upstream(format!("the broker's registration answer: {e}")))
    }

    /// Asks which services to start, offering the kinds the node can run.
    /// `None` when the broker has no start step (then registration with
    /// services is the whole lifecycle).
    pub(crate) async fn start(
        &self,
        id: &ProvisionId,
        kinds: &[Service],
    ) -> Result<Option<Vec<ServedModel>>> {
        let r = self
            .http
            .post(format!("{}/v1/provider/provisions/{id}/start", self.base))
            .bearer_auth(self.key.expose())
            .json(&serde_json::json!({ "services": kinds }))
            .send()
            .await;
        let r = match check(r).await {
            Ok(r) => r,
            Err(Error::NotFound(m)) if m.contains("no such route") => return Ok(None),
            Err(e) => return Err(e),
        };
        #[derive(serde::Deserialize)]
        struct Started {
            #[serde(default)]
            services: Vec<ServedModel>,
        }
        let s: Started = r
            .json()
            .await
            .map_err(|e| Error::Upstream(format!("the broker's start answer: {e}")))?;
        Ok(Some(s.services))
    }

    /// Reports the node serving `services` at `endpoint`: it joins exactly
    /// those pools.
    pub(crate) async fn ready(
        &self,
        id: &ProvisionId,
        endpoint: &str,
        services: &[ServedModel],
    ) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/v1/provider/provisions/{id}/ready", self.base))
            .bearer_auth(self.key.expose())
            .json(&serde_json::json!({ "endpoint": endpoint, "services": services }))
            .send()
            .await;
        check(r).await.map(drop)
    }

    /// Says the node is alive.
    pub(crate) async fn heartbeat(&self, id: &ProvisionId) -> Result<()> {
        let r = self
            .http
            .post(format!(
                "{}/v1/provider/provisions/{id}/heartbeat",
                self.base
            ))
            .bearer_auth(self.key.expose())
            .send()
            .await;
        check(r).await.map(drop)
    }

    /// Ends the provision: it leaves every pool.
    pub(crate) async fn end(&self, id: &ProvisionId) -> Result<()> {
        let r = self
            .http
            .delete(format!("{}/v1/provider/provisions/{id}", self.base))
            .bearer_auth(self.key.expose())
            .send()
            .await;
        check(r).await.map(drop)
    }
}

/// A broker answer, or the error it means (the broker's own message kept).
async fn check(r: reqwest::Result<reqwest::Response>) -> Result<reqwest::Response> {
    let r = r.map_err(|e| Error::unavailable("the broker is unreachable", e))?;
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    let text = r.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| format!("the broker answered {status}"));
    Err(match status.as_u16() {
        400 | 422 => Error::InvalidInput(msg),
        401 => Error::Unauthorized(msg),
        403 => Error::Forbidden(msg),
        404 => Error::NotFound(msg),
        409 => Error::Conflict(msg),
        _ => Error::Unavailable {
            message: msg,
            source: None,
        },
    })
}
