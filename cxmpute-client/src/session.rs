//! The credential a client calls with, and the signed-in session that renews
//! itself.

use std::sync::Arc;

use cxmpute_api::secret::Secret;
use cxmpute_api::wire::SessionResponse;

/// What a client presents as `Authorization: Bearer`.
#[derive(Clone)]
pub(crate) enum Credential {
    /// Nothing: public routes only.
    None,
    /// A fixed secret: an API key, a provider key, an access token.
    Bearer(Secret),
    /// A session, shared by the clones of the client that holds it, so one
    /// refresh serves them all.
    Session(Arc<SessionCell>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::None => "None",
            Credential::Bearer(_) => "Bearer(<redacted>)",
            Credential::Session(_) => "Session(<redacted>)",
        })
    }
}

/// A session's current tokens.
///
/// A refresh token works once and presenting a used one revokes the whole
/// session, so refreshes are serialized by this lock: a caller that finds the
/// tokens already renewed by another does not refresh again.
pub(crate) struct SessionCell {
    tokens: tokio::sync::Mutex<SessionResponse>,
}

impl SessionCell {
    pub(crate) fn new(tokens: SessionResponse) -> Arc<Self> {
        Arc::new(SessionCell {
            tokens: tokio::sync::Mutex::new(tokens),
        })
    }

    /// The tokens now.
    pub(crate) async fn tokens(&self) -> SessionResponse {
        self.tokens.lock().await.clone()
    }

    /// Holds the tokens while the caller renews them.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, SessionResponse> {
        self.tokens.lock().await
    }
}

impl Credential {
    /// The secret to send now.
    pub(crate) async fn bearer(&self) -> Option<Secret> {
        match self {
            Credential::None => None,
            Credential::Bearer(s) => Some(s.clone()),
            Credential::Session(c) => Some(c.tokens().await.access_token),
        }
    }
}
