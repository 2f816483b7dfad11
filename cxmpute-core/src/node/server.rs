//! The node's HTTP surface: the broker's paths, behind the node secret.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use parking_lot::RwLock;

use super::NodeConfig;
use crate::error::{Error, Result};
use crate::http::{bearer, ApiError};
use crate::secret::{ct_eq, Secret};
use crate::types::Route;

/// What every handler shares.
pub(crate) struct Serving {
    pub cfg: Arc<NodeConfig>,
    /// Calls to upstreams (from configuration: no egress guard needed).
    pub upstream_http: reqwest::Client,
    /// The secret the broker presents; `None` until registered (everything
    /// is refused until then).
    secret: RwLock<Option<Secret>>,
}

impl Serving {
    pub(crate) fn new(cfg: Arc<NodeConfig>) -> Result<Arc<Self>> {
        let upstream_http = reqwest::Client::builder()
            .connect_timeout(cfg.upstream_connect_timeout)
            .read_timeout(cfg.upstream_read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::backend("building the upstream client", e))?;
        Ok(Arc::new(Serving {
            cfg,
            upstream_http,
            secret: RwLock::new(None),
        }))
    }

    pub(crate) fn set_secret(&self, s: Secret) {
        *self.secret.write() = Some(s);
    }

    fn authorized(&self, h: &HeaderMap) -> bool {
        let want = self.secret.read();
        match (want.as_ref(), bearer(h)) {
            (Some(w), Some(got)) => ct_eq(w.expose().as_bytes(), got.expose().as_bytes()),
            _ => false,
        }
    }
}

/// Bodies above this are refused before reading: the broker's own limit is
/// lower, so only a caller that is not the broker sends more.
const MAX_BODY: usize = 8 << 20;

pub(crate) fn router(state: Arc<Serving>) -> Router {
    let gateway = |route: Route| {
        post(
            move |State(s): State<Arc<Serving>>, body: Bytes| async move {
                handle(s, route, body).await
            },
        )
    };
    let mut r = Router::new().route("/heartbeat", get(|| async { "ok" }));
    for route in Route::ALL {
        r = r.route(route.path(), gateway(route));
    }
    r.fallback(|| async { ApiError(Error::NotFound("no such route".into())).into_response() })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        .with_state(state)
}

/// Everything but the broker is refused, before any work is done.
async fn require_secret(State(s): State<Arc<Serving>>, req: Request, next: Next) -> Response {
    if !s.authorized(req.headers()) {
        return ApiError(Error::Unauthorized(
            "this node serves its broker only".into(),
        ))
        .into_response();
    }
    next.run(req).await
}

async fn handle(s: Arc<Serving>, route: Route, body: Bytes) -> Response {
    let r = match route {
        Route::ChatCompletions => {
            super::proxy::forward(&s, crate::types::Service::Chat, "/chat/completions", body).await
        }
        Route::Embeddings => {
            super::proxy::forward(&s, crate::types::Service::Embeddings, "/embeddings", body).await
        }
        Route::AudioSpeech | Route::Tts => super::tts::speak(&s, route, &body).await,
        Route::Scrape => super::scrape::scrape(&s, &body).await,
        Route::Caption | Route::Query | Route::Detect | Route::Point => {
            super::proxy::vision(&s, route, &body).await
        }
    };
    r.unwrap_or_else(|e| ApiError(e).into_response())
}
