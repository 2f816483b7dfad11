//! The admin API: accounts, credits and prices, called with an admin's API key.

use cxmpute_core::wire::{
    BalanceResponse, CreateProviderRequest, CreateProviderResponse, CreateUserRequest,
    CreateUserResponse, GrantCreditsRequest,
};
use cxmpute_core::{PriceEntry, UserId};
use reqwest::Method;

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
    /// println!("{} got key {}", user.user_id, user.api_key);
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
    /// let provider = admin.with_bearer(p.provider_key);
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
}
