//! The provider API: a provider manages its own nodes with its provider key.
//! The provider node program uses it to join and stay in the network.

use cxmpute_core::wire::{ProvisionView, RegisterProvisionRequest, RegisterProvisionResponse};
use cxmpute_core::ProvisionId;
use reqwest::Method;

use crate::error::Result;
use crate::Client;

/// The provider API of a [`Client`]; see [`Client::provider`].
#[derive(Clone, Copy, Debug)]
pub struct ProviderApi<'c> {
    pub(crate) client: &'c Client,
}

impl ProviderApi<'_> {
    /// `POST /v1/provider/provisions`: registers a node. The answer's
    /// `node_secret` is shown only here: the node must require it on every
    /// call from the broker.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Location, Service};
    /// use cxmpute_client::wire::{RegisterProvisionRequest, ServedModel};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let provider = client.with_bearer("cxp-...");
    /// let node = provider
    ///     .provider()
    ///     .register(&RegisterProvisionRequest {
    ///         endpoint: Some("https://node.example:8443".into()),
    ///         services: vec![ServedModel { service: Service::Chat, model: "llama3.2:3b".into() }],
    ///         device: serde_json::json!({"gpu": {"memory_mb": 24576}}),
    ///         location: Location { country: "US".into(), ..Location::default() },
    ///     })
    ///     .await?;
    /// println!("registered {} (tier {})", node.provision_id, node.tier);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn register(
        &self,
        req: &RegisterProvisionRequest,
    ) -> Result<RegisterProvisionResponse> {
        self.client
            .req(Method::POST, &["v1", "provider", "provisions"])
            .json(req)?
            .send_json()
            .await
    }

    /// `GET /v1/provider/provisions`: the provider's nodes.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for node in client.provider().provisions().await? {
    ///     println!("{} {:?} healthy={}", node.provision_id, node.state, node.healthy);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn provisions(&self) -> Result<Vec<ProvisionView>> {
        self.client
            .req(Method::GET, &["v1", "provider", "provisions"])
            .send_json()
            .await
    }

    /// `POST /v1/provider/provisions/{id}/heartbeat`: the node is alive.
    /// Safe to repeat, so it is retried on 429/503.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let id = cxmpute_client::types::ProvisionId::new("node_...");
    /// client.provider().heartbeat(&id).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn heartbeat(&self, id: &ProvisionId) -> Result<()> {
        self.client
            .req(
                Method::POST,
                &["v1", "provider", "provisions", id.as_str(), "heartbeat"],
            )
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `DELETE /v1/provider/provisions/{id}`: ends the node; it leaves every pool.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let id = cxmpute_client::types::ProvisionId::new("node_...");
    /// client.provider().end(&id).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn end(&self, id: &ProvisionId) -> Result<()> {
        self.client
            .req(
                Method::DELETE,
                &["v1", "provider", "provisions", id.as_str()],
            )
            .send_unit()
            .await
    }
}
