//! The account API: sign-in by emailed code, sessions, and the signed-in
//! user's own account, keys and usage.
//!
//! The `/v1/me` routes take a session (see [`AccountApi::sign_in`]) or the
//! user's API key, as the host allows.

use cxmpute_api::secret::Secret;
use cxmpute_api::types::{ApiKeyId, Notification, Placement};
use cxmpute_api::wire::{
    ApiKeyView, CreateKeyRequest, CreateKeyResponse, MeResponse, RefreshRequest,
    RequestCodeRequest, RequestCodeResponse, SessionResponse, UpdateAccountRequest,
    UpdateKeyRequest, UsageResponse, VerifyCodeRequest,
};
use http::Method;

use crate::error::Result;
use crate::Client;

/// The account API of a [`Client`]; see [`Client::account`].
#[derive(Clone, Copy, Debug)]
pub struct AccountApi<'c> {
    pub(crate) client: &'c Client,
}

impl AccountApi<'_> {
    /// `POST /v1/auth/code`: mails a sign-in code to `email`. The answer is
    /// the same whether or not an account exists.
    ///
    /// Not retried: each call mails a new code, and the host limits codes
    /// per email (429 `rate_limited` past the limit).
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let sent = client.account().request_code("ada@example.com").await?;
    /// println!("check your mail; the code works for {} s", sent.expires_in);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn request_code(&self, email: &str) -> Result<RequestCodeResponse> {
        self.client
            .req(Method::POST, &["v1", "auth", "code"])
            .json(&RequestCodeRequest {
                email: email.to_owned(),
            })?
            .send_json()
            .await
    }

    /// `POST /v1/auth/verify`: trades the mailed code for a session (the
    /// account is created on the first sign-in). Use the tokens with
    /// [`Client::with_session`], or call [`sign_in`](Self::sign_in) instead.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let tokens = client.account().verify("ada@example.com", "123456").await?;
    /// println!("signed in as {}", tokens.user_id);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn verify(&self, email: &str, code: &str) -> Result<SessionResponse> {
        self.client
            .req(Method::POST, &["v1", "auth", "verify"])
            .json(&VerifyCodeRequest {
                email: email.to_owned(),
                code: Secret::new(code),
            })?
            .send_json()
            .await
    }

    /// Verifies the mailed code and returns a client (same pool and
    /// settings) calling as the new session, which renews itself.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let me = client.account().sign_in("ada@example.com", "123456").await?;
    /// println!("{} credits", me.account().me().await?.credits);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn sign_in(&self, email: &str, code: &str) -> Result<Client> {
        let tokens = self.verify(email, code).await?;
        Ok(self.client.with_session(tokens))
    }

    /// `POST /v1/auth/refresh`: trades a refresh token for a new session.
    /// The token works once; presenting it again ends the whole session.
    /// A client holding a session does this by itself when needed.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client, saved: cxmpute_client::wire::SessionResponse)
    /// # -> Result<(), cxmpute_client::Error> {
    /// let fresh = client.account().refresh(&saved.refresh_token).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<SessionResponse> {
        self.client
            .req(Method::POST, &["v1", "auth", "refresh"])
            .json(&RefreshRequest {
                refresh_token: Some(refresh_token.clone()),
            })?
            .send_json()
            .await
    }

    /// `POST /v1/auth/logout`: ends the client's session (its refresh token
    /// and access tokens stop working). With a fixed access token as the
    /// credential, ends that token's session. Logging out twice is fine.
    ///
    /// ```no_run
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// session.account().logout().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn logout(&self) -> Result<()> {
        let refresh_token = self.client.session().await.map(|t| t.refresh_token);
        self.client
            .req(Method::POST, &["v1", "auth", "logout"])
            .json(&RefreshRequest { refresh_token })?
            // Ending a session twice ends it once.
            .idempotent(true)
            .send_unit()
            .await
    }

    /// `GET /v1/me`: the signed-in user's account, with its active keys.
    ///
    /// ```no_run
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let me = session.account().me().await?;
    /// println!("{}: {} credits, {} keys", me.email, me.credits, me.keys.len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn me(&self) -> Result<MeResponse> {
        self.client
            .req(Method::GET, &["v1", "me"])
            .send_json()
            .await
    }

    /// `PATCH /v1/me`: changes the account's budget per UTC day or month
    /// over all its keys (`budget`; `Some(None)` removes it) or its alert
    /// emails (`alerts`, replacing the ones set); absent fields stay.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Alerts, Budget, BudgetPeriod, Credits};
    /// use cxmpute_client::wire::UpdateAccountRequest;
    ///
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let change = UpdateAccountRequest {
    ///     budget: Some(Some(Budget { limit: Credits::whole(50), period: BudgetPeriod::Month })),
    ///     alerts: Some(Alerts { balance_below: Some(Credits::whole(5)), budget_percent: Some(80) }),
    /// };
    /// let me = session.account().update_account(&change).await?;
    /// println!("spent {:?} of {:?}", me.budget_spent, me.budget);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_account(&self, req: &UpdateAccountRequest) -> Result<MeResponse> {
        self.client
            .req(Method::PATCH, &["v1", "me"])
            .json(req)?
            // It sets values: applying it twice leaves what applying it once does.
            .idempotent(true)
            .send_json()
            .await
    }

    /// `GET /v1/me/usage?days=N`: usage per day and per service over the
    /// last `days` days (the host's default, 30, when `None`).
    ///
    /// ```no_run
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let usage = session.account().usage(Some(7)).await?;
    /// for d in usage.days {
    ///     println!("{}: {} requests, {} charged", d.day, d.requests, d.charged);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn usage(&self, days: Option<u32>) -> Result<UsageResponse> {
        let mut req = self.client.req(Method::GET, &["v1", "me", "usage"]);
        if let Some(d) = days {
            req = req.query("days", d);
        }
        req.send_json().await
    }

    /// `GET /v1/me/keys`: the user's active API keys (never their secrets).
    ///
    /// ```no_run
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for k in session.account().keys().await? {
    ///     println!("{} {} ({}...)", k.key_id, k.name, k.prefix);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn keys(&self) -> Result<Vec<ApiKeyView>> {
        self.client
            .req(Method::GET, &["v1", "me", "keys"])
            .send_json()
            .await
    }

    /// `POST /v1/me/keys`: creates an API key; its secret is in this answer
    /// only.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{Credits, Route};
    /// use cxmpute_client::wire::CreateKeyRequest;
    ///
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let created = session
    ///     .account()
    ///     .create_key(&CreateKeyRequest {
    ///         name: Some("ci".into()),
    ///         credit_limit: Some(Credits::whole(5)),
    ///         permitted_routes: vec![Route::ChatCompletions],
    ///     })
    ///     .await?;
    /// let ci = session.with_bearer(created.api_key.expose());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<CreateKeyResponse> {
        self.client
            .req(Method::POST, &["v1", "me", "keys"])
            .json(req)?
            .send_json()
            .await
    }

    /// `PATCH /v1/me/keys/{id}`: renames a key, changes its credit limit,
    /// rate limits (`rpm`, `tpm`; `Some(None)` removes one), budget per day
    /// or month (`budget`; `Some(None)` removes it) or its permitted routes;
    /// absent fields stay.
    ///
    /// ```no_run
    /// use cxmpute_client::types::{ApiKeyId, Credits};
    /// use cxmpute_client::wire::UpdateKeyRequest;
    ///
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let change = UpdateKeyRequest { credit_limit: Some(Some(Credits::whole(20))), ..Default::default() };
    /// let key = session.account().update_key(&ApiKeyId::new("key_..."), &change).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_key(&self, id: &ApiKeyId, req: &UpdateKeyRequest) -> Result<ApiKeyView> {
        self.client
            .req(Method::PATCH, &["v1", "me", "keys", id.as_str()])
            .json(req)?
            // The change sets values (a limit moves `credits_left` by the
            // difference), so applying it twice leaves what applying it once does.
            .idempotent(true)
            .send_json()
            .await
    }

    /// `DELETE /v1/me/keys/{id}`: revokes a key for good.
    ///
    /// ```no_run
    /// use cxmpute_client::types::ApiKeyId;
    ///
    /// # async fn run(session: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// session.account().revoke_key(&ApiKeyId::new("key_...")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_key(&self, id: &ApiKeyId) -> Result<()> {
        self.client
            .req(Method::DELETE, &["v1", "me", "keys", id.as_str()])
            .send_unit()
            .await
    }

    /// `GET /v1/notifications`: the notifications shown now, at one
    /// placement or all. Needs no credential.
    ///
    /// ```no_run
    /// use cxmpute_client::types::Placement;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for n in client.account().notifications(Some(Placement::UserDashboard)).await? {
    ///     println!("{}: {}", n.title, n.banner);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn notifications(&self, placement: Option<Placement>) -> Result<Vec<Notification>> {
        let mut req = self.client.req(Method::GET, &["v1", "notifications"]);
        if let Some(p) = placement {
            req = req.query("placement", placement_name(p));
        }
        req.send_json().await
    }
}

/// The wire name of a placement (`user_dashboard`...), as its serde form says.
fn placement_name(p: Placement) -> String {
    match serde_json::to_value(p) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}
