//! The node's HTTP surface: the broker's paths, behind the node secret.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use parking_lot::RwLock;

use cxmpute_core::http::ApiError;
use cxmpute_core::secret::ct_eq;
use cxmpute_core::{Error, Result, Route, Secret, Service};

use crate::NodeConfig;

/// What every handler shares.
pub(crate) struct Serving {
    pub(crate) cfg: Arc<NodeConfig>,
    /// Calls to upstreams (from configuration: no egress guard needed).
    pub(crate) upstream_http: reqwest::Client,
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
            (Some(w), Some(got)) => ct_eq(w.expose().as_bytes(), got.as_bytes()),
            _ => false,
        }
    }
}

/// The bearer token of a request, read as the broker reads its own callers'
/// (scheme in any case, spaces trimmed).
fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
            crate::proxy::forward(&s, Service::Chat, "/chat/completions", body).await
        }
        Route::Embeddings => {
            crate::proxy::forward(&s, Service::Embeddings, "/embeddings", body).await
        }
        Route::AudioSpeech | Route::Tts => crate::tts::speak(&s, route, &body).await,
        Route::Scrape => crate::scrape::scrape(&s, &body).await,
        Route::Caption | Route::Query | Route::Detect | Route::Point => {
            crate::proxy::vision(&s, route, &body).await
        }
    };
    r.unwrap_or_else(|e| ApiError(e).into_response())
}
