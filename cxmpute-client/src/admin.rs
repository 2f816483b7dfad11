//! The admin API: accounts, credits, suspensions, nodes, the catalogue and
//! its aliases, prices, the reward policy and notifications, called with an admin's API
//! key or session.

use cxmpute_api::types::{
    ApiKeyId, CatalogueModel, ModelAlias, Notification, NotificationId, PriceEntry, ProviderId,
    ProvisionId, Service, UserId,
};
use cxmpute_api::wire::{
    AdminProviderView, AdminProvisionView, AdminUserDetail, AdminUserView, ApiKeyView,
    BalanceResponse, CatalogueChange, CreateProviderRequest, CreateProviderResponse,
    CreateUserRequest, CreateUserResponse, GrantCreditsRequest, NotificationRequest,
    RewardPolicyView, SuspendRequest, UpdateAccountRequest, UpdateKeyRequest,
};
use http::Method;

use crate::error::Result;
use crate::Client;

/// The admin API of a [`Client`]; see [`Client::admin`].
#[derive(Clone, Copy, Debug)]
pub struct AdminApi<'c> {
    pub(crate) client: &'c Client,
}

impl AdminApi<'_> {
    /// `POST /v1/admin/users`: creates a user with starting credits and a
    /// first API key (shown only in this answer).
    ///
    /// ```no_run
    /// use cxmpute_client::types::Credits;
    /// use cxmpute_client::wire::CreateUserRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let user = admin
    ///     .admin()
    ///     .create_user(&CreateUserRequest { email: "ada@example.com".into(), credits: Credits::whole(5) })
    ///     .await?;
    /// println!("{} got key {}", user.user_id, user.api_key.expose());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_user(&self, req: &CreateUserRequest) -> Result<CreateUserResponse> {
        self.client
            .req(Method::POST, &["v1", "admin", "users"])
            .json(req)?
            .send_json()
            .await
    }

    /// `POST /v1/admin/users/{id}/credits`: adds credits (a negative amount
    /// removes them, never below zero); answers the new balance.
    ///
    /// Not retried: each call adds again.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Credits, UserId};
    /// use cxmpute_client::wire::GrantCreditsRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let grant = GrantCreditsRequest { amount: Credits::whole(10), reason: "promo".into() };
    /// let balance = admin.admin().grant_credits(&UserId::new("usr_..."), &grant).await?;
    /// println!("balance now {}", balance.credits);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn grant_credits(
        &self,
        user: &UserId,
        req: &GrantCreditsRequest,
    ) -> Result<BalanceResponse> {
        self.client
            .req(
                Method::POST,
                &["v1", "admin", "users", user.as_str(), "credits"],
            )
            .json(req)?
            .send_json()
            .await
    }

    /// `PATCH /v1/admin/keys/{id}`: changes any user's key: its rate limits
    /// (`rpm`, `tpm`; `Some(None)` removes one), budget per day or month
    /// (`budget`), credit limit, routes or name; absent fields stay.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ApiKeyId;
    /// use cxmpute_client::wire::UpdateKeyRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let limits = UpdateKeyRequest { rpm: Some(Some(60)), tpm: Some(Some(100_000)), ..Default::default() };
    /// let key = admin.admin().update_key(&ApiKeyId::new("key_..."), &limits).await?;
    /// println!("{:?} requests a minute", key.rpm);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_key(&self, id: &ApiKeyId, req: &UpdateKeyRequest) -> Result<ApiKeyView> {
        self.client
            .req(Method::PATCH, &["v1", "admin", "keys", id.as_str()])
            .json(req)?
            // It sets values: applying it twice leaves what applying it once does.
            .idempotent(true)
            .send_json()
            .await
    }

    /// `POST /v1/admin/providers`: creates a provider account and its key
    /// (shown only in this answer).
    ///
    /// ```no_run
    /// use cxmpute_client::wire::CreateProviderRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let p = admin
    ///     .admin()
    ///     .create_provider(&CreateProviderRequest { email: "gpu@example.com".into() })
    ///     .await?;
    /// let provider = admin.with_bearer(p.provider_key.expose());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_provider(
        &self,
        req: &CreateProviderRequest,
    ) -> Result<CreateProviderResponse> {
        self.client
            .req(Method::POST, &["v1", "admin", "providers"])
            .json(req)?
            .send_json()
            .await
    }

    /// `PUT /v1/admin/prices`: sets the price of a service (and optionally
    /// one model), replacing the one before; answers the price stored.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Credits, PriceEntry, Service};
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin
    ///     .admin()
    ///     .put_price(&PriceEntry {
    ///         service: Service::Chat,
    ///         model: None,
    ///         per_request: Credits(1_000),
    ///         per_million_input_tokens: Credits::whole(1),
    ///         per_million_output_tokens: Credits::whole(2),
    ///         per_million_units: Credits::ZERO,
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_price(&self, price: &PriceEntry) -> Result<PriceEntry> {
        self.client
            .req(Method::PUT, &["v1", "admin", "prices"])
            .json(price)?
            .send_json()
            .await
    }

    /// `GET /v1/admin/prices`: every price set.
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for p in admin.admin().prices().await? {
    ///     println!("{} {:?}: {} per request", p.service, p.model, p.per_request);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.client
            .req(Method::GET, &["v1", "admin", "prices"])
            .send_json()
            .await
    }

    /// `GET /v1/admin/catalogue`: the catalogue of models in force, what
    /// nodes may serve.
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for m in admin.admin().catalogue().await? {
    ///     println!("{} {}: tier {}+, {} nodes wanted", m.service, m.model, m.min_tier, m.target_nodes);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn catalogue(&self) -> Result<Vec<CatalogueModel>> {
        self.client
            .req(Method::GET, &["v1", "admin", "catalogue"])
            .send_json()
            .await
    }

    /// `PUT /v1/admin/catalogue`: adds a model to the catalogue or changes
    /// its entry; the answer counts the nodes that left its pool (below a
    /// raised minimum tier).
    ///
    /// ```no_run
    /// use cxmpute_client::types::{CatalogueModel, Service};
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let entry = CatalogueModel::new(Service::Chat, "qwen2.5:0.5b", 1, 3);
    /// admin.admin().put_catalogue_model(&entry).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_catalogue_model(&self, model: &CatalogueModel) -> Result<CatalogueChange> {
        self.client
            .req(Method::PUT, &["v1", "admin", "catalogue"])
            .json(model)?
            .send_json()
            .await
    }

    /// `DELETE /v1/admin/catalogue/{service}/{model}`: removes a model from
    /// the catalogue; every node serving it leaves its pool, and the answer
    /// counts them. The last model cannot be removed (409).
    ///
    /// ```no_run
    /// use cxmpute_client::types::Service;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let gone = admin.admin().delete_catalogue_model(Service::Chat, "qwen2.5:0.5b").await?;
    /// println!("{} nodes left the pool", gone.removed_nodes);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_catalogue_model(
        &self,
        service: Service,
        model: &str,
    ) -> Result<CatalogueChange> {
        let path = ["v1", "admin", "catalogue", service.as_str(), model];
        self.client.req(Method::DELETE, &path).send_json().await
    }

    /// `GET /v1/admin/aliases`: the model aliases, by name, each with the
    /// models it stands for in the order they are tried.
    pub async fn aliases(&self) -> Result<Vec<ModelAlias>> {
        self.client
            .req(Method::GET, &["v1", "admin", "aliases"])
            .send_json()
            .await
    }

    /// `PUT /v1/admin/aliases`: defines an alias or changes it (1-4 models;
    /// never a catalogue model's name, never naming another alias).
    ///
    /// ```no_run
    /// use cxmpute_client::types::ModelAlias;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let fast = ModelAlias {
    ///     alias: "fast".into(),
    ///     models: vec!["llama3.2:3b".into(), "llama3.2:1b".into()],
    /// };
    /// admin.admin().put_alias(&fast).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_alias(&self, alias: &ModelAlias) -> Result<ModelAlias> {
        self.client
            .req(Method::PUT, &["v1", "admin", "aliases"])
            .json(alias)?
            .send_json()
            .await
    }

    /// `DELETE /v1/admin/aliases/{alias}`: removes an alias (404 when there
    /// is none).
    pub async fn delete_alias(&self, alias: &str) -> Result<()> {
        let path = ["v1", "admin", "aliases", alias];
        self.client.req(Method::DELETE, &path).send_unit().await
    }

    /// `GET /v1/admin/reward`: the reward policy, how providers are paid and
    /// what the platform keeps.
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let policy = admin.admin().reward_policy().await?;
    /// println!("{}: {:?}", policy.policy, policy.platform_share_permille);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reward_policy(&self) -> Result<RewardPolicyView> {
        self.client
            .req(Method::GET, &["v1", "admin", "reward"])
            .send_json()
            .await
    }

    /// `GET /v1/admin/users?q=&limit=`: accounts whose email contains `query`
    /// (all when empty), at most `limit` (the host's default, 50, when `None`).
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for u in admin.admin().users("example.com", Some(20)).await? {
    ///     println!("{} {} {}", u.user_id, u.email, u.credits);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn users(&self, query: &str, limit: Option<usize>) -> Result<Vec<AdminUserView>> {
        let mut req = self
            .client
            .req(Method::GET, &["v1", "admin", "users"])
            .query("q", query);
        if let Some(l) = limit {
            req = req.query("limit", l);
        }
        req.send_json().await
    }

    /// `GET /v1/admin/users/{id}`: a user with every key (no secrets) and its
    /// credit grants.
    ///
    /// ```no_run
    /// use cxmpute_client::types::UserId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let detail = admin.admin().user(&UserId::new("usr_...")).await?;
    /// println!("{} grants", detail.grants.len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn user(&self, id: &UserId) -> Result<AdminUserDetail> {
        self.client
            .req(Method::GET, &["v1", "admin", "users", id.as_str()])
            .send_json()
            .await
    }

    /// `PATCH /v1/admin/users/{id}`: changes a user's budget per UTC day or
    /// month (`budget`; `Some(None)` removes it) or alerts; absent fields stay.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Budget, BudgetPeriod, Credits, UserId};
    /// use cxmpute_client::wire::UpdateAccountRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let change = UpdateAccountRequest {
    ///     budget: Some(Some(Budget { limit: Credits::whole(10), period: BudgetPeriod::Day })),
    ///     ..Default::default()
    /// };
    /// let user = admin.admin().update_user(&UserId::new("usr_..."), &change).await?;
    /// println!("{:?}", user.budget);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_user(
        &self,
        id: &UserId,
        req: &UpdateAccountRequest,
    ) -> Result<AdminUserView> {
        self.client
            .req(Method::PATCH, &["v1", "admin", "users", id.as_str()])
            .json(req)?
            .idempotent(true)
            .send_json()
            .await
    }

    /// `POST /v1/admin/users/{id}/suspend`: suspends a user (its keys and
    /// sessions are refused) with a reason shown to the user.
    ///
    /// ```no_run
    /// use cxmpute_client::types::UserId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().suspend_user(&UserId::new("usr_..."), "chargeback").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn suspend_user(&self, id: &UserId, reason: &str) -> Result<()> {
        self.client
            .req(
                Method::POST,
                &["v1", "admin", "users", id.as_str(), "suspend"],
            )
            .json(&SuspendRequest {
                reason: reason.to_owned(),
            })?
            // A state change, not an increment: repeating it changes nothing more.
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `POST /v1/admin/users/{id}/unsuspend`: lifts a user's suspension.
    ///
    /// ```no_run
    /// use cxmpute_client::types::UserId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().unsuspend_user(&UserId::new("usr_...")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unsuspend_user(&self, id: &UserId) -> Result<()> {
        self.client
            .req(
                Method::POST,
                &["v1", "admin", "users", id.as_str(), "unsuspend"],
            )
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `GET /v1/admin/providers/{id}`: a provider with its nodes.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ProviderId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let p = admin.admin().provider(&ProviderId::new("prv_...")).await?;
    /// println!("{} nodes, {} unpaid", p.provisions.len(), p.earnings);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn provider(&self, id: &ProviderId) -> Result<AdminProviderView> {
        self.client
            .req(Method::GET, &["v1", "admin", "providers", id.as_str()])
            .send_json()
            .await
    }

    /// `POST /v1/admin/providers/{id}/suspend`: suspends a provider: its key
    /// is refused and its nodes leave routing.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ProviderId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().suspend_provider(&ProviderId::new("prv_..."), "serving garbage").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn suspend_provider(&self, id: &ProviderId, reason: &str) -> Result<()> {
        self.client
            .req(
                Method::POST,
                &["v1", "admin", "providers", id.as_str(), "suspend"],
            )
            .json(&SuspendRequest {
                reason: reason.to_owned(),
            })?
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `POST /v1/admin/providers/{id}/unsuspend`: lifts a provider's suspension.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ProviderId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().unsuspend_provider(&ProviderId::new("prv_...")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unsuspend_provider(&self, id: &ProviderId) -> Result<()> {
        self.client
            .req(
                Method::POST,
                &["v1", "admin", "providers", id.as_str(), "unsuspend"],
            )
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `GET /v1/admin/provisions`: every node with its provider.
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for n in admin.admin().provisions().await? {
    ///     println!("{} of {}: {:?}", n.provision.provision_id, n.provider_id, n.provision.state);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn provisions(&self) -> Result<Vec<AdminProvisionView>> {
        self.client
            .req(Method::GET, &["v1", "admin", "provisions"])
            .send_json()
            .await
    }

    /// `DELETE /v1/admin/provisions/{id}`: disconnects a node: it leaves
    /// every pool.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ProvisionId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().disconnect(&ProvisionId::new("node_...")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn disconnect(&self, id: &ProvisionId) -> Result<()> {
        self.client
            .req(Method::DELETE, &["v1", "admin", "provisions", id.as_str()])
            .send_unit()
            .await
    }

    /// `GET /v1/admin/notifications`: every notification, shown now or not.
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let all = admin.admin().notifications().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn notifications(&self) -> Result<Vec<Notification>> {
        self.client
            .req(Method::GET, &["v1", "admin", "notifications"])
            .send_json()
            .await
    }

    /// `POST /v1/admin/notifications`: creates a notification.
    ///
    /// Not retried: a repeat would create a second one.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Placement, Timestamp};
    /// use cxmpute_client::wire::NotificationRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let n = admin
    ///     .admin()
    ///     .create_notification(&NotificationRequest {
    ///         title: "Maintenance".into(),
    ///         banner: "Sunday 02:00 UTC".into(),
    ///         popup: String::new(),
    ///         starts_at: Timestamp(1_767_225_600_000),
    ///         ends_at: Timestamp(1_767_312_000_000),
    ///         placements: vec![Placement::UserDashboard, Placement::ProviderDashboard],
    ///     })
    ///     .await?;
    /// println!("created {}", n.id);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_notification(&self, req: &NotificationRequest) -> Result<Notification> {
        self.client
            .req(Method::POST, &["v1", "admin", "notifications"])
            .json(req)?
            .send_json()
            .await
    }

    /// `PUT /v1/admin/notifications/{id}`: replaces a notification.
    ///
    /// ```no_run
    /// use cxmpute_client::types::NotificationId;
    /// use cxmpute_client::wire::NotificationRequest;
    ///
    /// # async fn run(admin: cxmpute_client::Client, changed: NotificationRequest)
    /// # -> Result<(), cxmpute_client::Error> {
    /// admin.admin().replace_notification(&NotificationId::new("ntf_..."), &changed).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn replace_notification(
        &self,
        id: &NotificationId,
        req: &NotificationRequest,
    ) -> Result<Notification> {
        self.client
            .req(Method::PUT, &["v1", "admin", "notifications", id.as_str()])
            .json(req)?
            .send_json()
            .await
    }

    /// `DELETE /v1/admin/notifications/{id}`: deletes a notification.
    ///
    /// ```no_run
    /// use cxmpute_client::types::NotificationId;
    ///
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// admin.admin().delete_notification(&NotificationId::new("ntf_...")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.client
            .req(
                Method::DELETE,
                &["v1", "admin", "notifications", id.as_str()],
            )
            .send_unit()
            .await
    }
}
