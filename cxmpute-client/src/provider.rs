//! The provider API: a provider's account and nodes. The node routes take the
//! provider key; the account routes take it too, or the session of the user
//! who owns the provider. The provider node program uses this API to join and
//! stay in the network.

use cxmpute_api::types::ProvisionId;
use cxmpute_api::wire::{
    EarningsResponse, ProviderAccountResponse, ProviderKeyResponse, ProvisionView,
    ReadyProvisionRequest, RegisterProvisionRequest, RegisterProvisionResponse,
    StartProvisionRequest, StartProvisionResponse,
};
use http::Method;

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

    /// `GET /v1/provider/provisions/{id}`: one of the provider's nodes.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let id = cxmpute_client::types::ProvisionId::new("node_...");
    /// let node = client.provider().provision(&id).await?;
    /// println!("{:?}, healthy: {}", node.state, node.healthy);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn provision(&self, id: &ProvisionId) -> Result<ProvisionView> {
        self.client
            .req(Method::GET, &["v1", "provider", "provisions", id.as_str()])
            .send_json()
            .await
    }

    /// `POST /v1/provider/provisions/{id}/start`: asks what to serve. The
    /// broker assigns models the node's tier allows and the network lacks;
    /// the node leaves any pool until it reports [`ready`](Self::ready).
    ///
    /// Not retried: each start may assign differently.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{ProvisionId, Service};
    /// use cxmpute_client::wire::StartProvisionRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let id = ProvisionId::new("node_...");
    /// let can = StartProvisionRequest { services: vec![Service::Chat, Service::Embeddings] };
    /// for m in client.provider().start(&id, &can).await?.services {
    ///     println!("pull and serve {} for {}", m.model, m.service);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(
        &self,
        id: &ProvisionId,
        req: &StartProvisionRequest,
    ) -> Result<StartProvisionResponse> {
        self.client
            .req(
                Method::POST,
                &["v1", "provider", "provisions", id.as_str(), "start"],
            )
            .json(req)?
            .send_json()
            .await
    }

    /// `POST /v1/provider/provisions/{id}/ready`: reports the node's endpoint
    /// and the services it started; it joins exactly those pools.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{ProvisionId, Service};
    /// use cxmpute_client::wire::{ReadyProvisionRequest, ServedModel};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let ready = ReadyProvisionRequest {
    ///     endpoint: "https://node.example:8443".into(),
    ///     services: vec![ServedModel { service: Service::Chat, model: "llama3.2:3b".into() }],
    /// };
    /// let node = client.provider().ready(&ProvisionId::new("node_..."), &ready).await?;
    /// assert!(node.healthy);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ready(
        &self,
        id: &ProvisionId,
        req: &ReadyProvisionRequest,
    ) -> Result<ProvisionView> {
        self.client
            .req(
                Method::POST,
                &["v1", "provider", "provisions", id.as_str(), "ready"],
            )
            .json(req)?
            // It states what the node serves; saying it twice says it once.
            .idempotent(true)
            .send_json()
            .await
    }

    /// `POST /v1/provider/provisions/{id}/end`: the node leaves every pool at
    /// once; it is kept and may [`start`](Self::start) again.
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
                Method::POST,
                &["v1", "provider", "provisions", id.as_str(), "end"],
            )
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `DELETE /v1/provider/provisions/{id}`: the node leaves every pool and
    /// is forgotten.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let id = cxmpute_client::types::ProvisionId::new("node_...");
    /// client.provider().delete(&id).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete(&self, id: &ProvisionId) -> Result<()> {
        self.client
            .req(
                Method::DELETE,
                &["v1", "provider", "provisions", id.as_str()],
            )
            .send_unit()
            .await
    }

    /// `GET /v1/provider/account`: the provider's account summary.
    ///
    /// ```no_run
    /// # async fn run(provider: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let a = provider.provider().account().await?;
    /// println!("{}: {} nodes, {} unpaid", a.provider_id, a.provisions, a.earnings);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn account(&self) -> Result<ProviderAccountResponse> {
        self.client
            .req(Method::GET, &["v1", "provider", "account"])
            .send_json()
            .await
    }

    /// `POST /v1/provider/account/key`: a new provider key, shown in this
    /// answer only; the old key stops working at once.
    ///
    /// Not retried: a repeat would rotate again and lose the key.
    ///
    /// ```no_run
    /// # async fn run(provider: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let rotated = provider.provider().rotate_key().await?;
    /// let provider = provider.with_bearer(rotated.provider_key.expose());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn rotate_key(&self) -> Result<ProviderKeyResponse> {
        self.client
            .req(Method::POST, &["v1", "provider", "account", "key"])
            .send_json()
            .await
    }

    /// `GET /v1/provider/account/earnings`: unpaid rewards, and per day over
    /// the last 30 days.
    ///
    /// ```no_run
    /// # async fn run(provider: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let e = provider.provider().earnings().await?;
    /// println!("{} in total, {} over 30 days", e.total, e.last_30_days);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn earnings(&self) -> Result<EarningsResponse> {
        self.client
            .req(Method::GET, &["v1", "provider", "account", "earnings"])
            .send_json()
            .await
    }

    /// `GET /v1/provider/account/provisions`: the provider's nodes, as
    /// [`provisions`](Self::provisions) lists them, also with the owning
    /// user's session.
    ///
    /// ```no_run
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let nodes = session.provider().account_provisions().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn account_provisions(&self) -> Result<Vec<ProvisionView>> {
        self.client
            .req(Method::GET, &["v1", "provider", "account", "provisions"])
            .send_json()
            .await
    }
}
