//! # cxmpute-node
//!
//! The provider node: the program a provider runs to serve the marketplace
//! (the `cxmpute-node` binary), and the library it is made of.
//!
//! A node signs in with its provider key, registers a provision with the
//! machine's [device diagnostics](device), serves the services it was
//! configured with on its own HTTP endpoint, heartbeats, and leaves every
//! pool when it stops. It talks to the broker through the provider API of
//! [`cxmpute_client`], like any other client of the broker.
//!
//! | service | backend |
//! |---|---|
//! | chat, embeddings | proxied to an OpenAI-compatible server (Ollama, vLLM, llama.cpp's server) |
//! | vision | that server's image chat: a chat request with an `image_url` part, its answer parsed into typed results |
//! | tts | `espeak-ng`, run with arguments (never a shell), text on stdin, WAV streamed back |
//! | scrape | built in: every target through the [egress guard](cxmpute_core::egress), HTML to Markdown or text |
//!
//! The node answers only the broker: every call must carry the per-provision
//! secret the broker was given at registration (`Authorization: Bearer`),
//! compared in constant time; anything else gets 401. It serves the same
//! paths the broker forwards to (`Route::path`), so the two cannot disagree,
//! and checks what it is sent by the broker's own rules
//! ([`cxmpute_core::services`]).
//!
//! ```no_run
//! use cxmpute_node::{Node, NodeConfig};
//! # async fn run() -> cxmpute_core::Result<()> {
//! let mut cfg = NodeConfig::new("https://broker.example", "cxp-provider-key");
//! cfg.upstream = Some("http://127.0.0.1:11434/v1".parse()?);
//! cfg.chat_models = vec!["llama3.2:3b".into()];
//! Node::new(cfg).run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cxmpute_client::{Client, RetryPolicy};
use cxmpute_core::egress::{EgressRules, FetchLimits};
use cxmpute_core::wire::{
    DeviceDiagnostics, ReadyProvisionRequest, RegisterProvisionRequest, RegisterProvisionResponse,
    ServedModel, StartProvisionRequest, DEFAULT_SCRAPE_MODEL, DEFAULT_TTS_MODEL, MAX_IMAGE_BYTES,
};
use cxmpute_core::{Error, Location, ProvisionId, Result, Secret, Service};
use tokio::sync::oneshot;

pub mod device;
mod proxy;
mod scrape;
mod server;
mod tts;

/// An OpenAI-compatible server the node forwards to.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its OpenAI base URL, ending in `/v1` (e.g. `http://127.0.0.1:11434/v1`);
    /// the node appends `/chat/completions` and `/embeddings`.
    pub base_url: String,
    /// The bearer key it wants, if any.
    pub api_key: Option<Secret>,
}

impl std::str::FromStr for Upstream {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let u = cxmpute_core::egress::parse_http_url(s.trim())?;
        Ok(Upstream {
            base_url: u.as_str().trim_end_matches('/').to_owned(),
            api_key: None,
        })
    }
}

/// Text to speech through espeak-ng.
#[derive(Clone, Debug)]
pub struct TtsConfig {
    /// The pool model it is offered as.
    pub model: String,
    /// The espeak-ng program.
    pub program: PathBuf,
    /// Longest a synthesis may run.
    pub timeout: Duration,
}

impl Default for TtsConfig {
    fn default() -> Self {
        TtsConfig {
            model: DEFAULT_TTS_MODEL.to_owned(),
            program: PathBuf::from("espeak-ng"),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The built-in scraper.
#[derive(Clone, Debug)]
pub struct ScrapeConfig {
    /// The pool model it is offered as.
    pub model: String,
    /// Caps of each page fetch.
    pub limits: FetchLimits,
    /// Pages fetched at once.
    pub concurrency: usize,
    /// The whole request: URLs not done by then report a timeout. Keep it
    /// under the broker's first-byte timeout.
    pub deadline: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            model: DEFAULT_SCRAPE_MODEL.to_owned(),
            limits: FetchLimits::default(),
            concurrency: 8,
            deadline: Duration::from_secs(45),
        }
    }
}

/// Everything a node needs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The broker's base URL.
    pub broker_url: String,
    /// The provider key the node signs in with.
    pub provider_key: Secret,
    /// Where the node listens.
    pub listen: SocketAddr,
    /// The base URL the broker reaches the node at (a tunnel, a public
    /// address); `http://{listen}` when absent.
    pub public_url: Option<String>,
    /// The OpenAI-compatible server behind chat, embeddings and vision.
    pub upstream: Option<Upstream>,
    /// A separate server for vision, when it is not `upstream`.
    pub vision_upstream: Option<Upstream>,
    /// Chat models served (by `upstream`).
    pub chat_models: Vec<String>,
    /// Embedding models served (by `upstream`).
    pub embedding_models: Vec<String>,
    /// Vision models served (by `vision_upstream`, else `upstream`).
    pub vision_models: Vec<String>,
    /// Text to speech, when served.
    pub tts: Option<TtsConfig>,
    /// Scraping, when served.
    pub scrape: Option<ScrapeConfig>,
    /// What scrape targets and image URLs may reach. Public addresses only
    /// unless a test or a private deployment opens exact addresses.
    pub egress: EgressRules,
    /// Caps of fetching an image URL for vision.
    pub image_limits: FetchLimits,
    /// Timeout of connecting to an upstream.
    pub upstream_connect_timeout: Duration,
    /// Longest silence while reading an upstream answer.
    pub upstream_read_timeout: Duration,
    /// How often the node heartbeats (the broker drops silent nodes).
    pub heartbeat_every: Duration,
    /// Where the node is.
    pub location: Location,
    /// Device diagnostics to report instead of diagnosing the machine
    /// (machines whose probes mislead, tests).
    pub device_override: Option<DeviceDiagnostics>,
}

impl NodeConfig {
    /// A node of `broker_url` signing in with `provider_key`, listening on
    /// `127.0.0.1:0`, serving scraping and (if espeak-ng is found) speech,
    /// and nothing proxied until models and an upstream are set.
    pub fn new(broker_url: impl Into<String>, provider_key: impl Into<String>) -> Self {
        NodeConfig {
            broker_url: broker_url.into().trim_end_matches('/').to_owned(),
            provider_key: Secret::new(provider_key.into()),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: None,
            upstream: None,
            vision_upstream: None,
            chat_models: Vec::new(),
            embedding_models: Vec::new(),
            vision_models: Vec::new(),
            tts: Some(TtsConfig::default()),
            scrape: Some(ScrapeConfig::default()),
            egress: EgressRules::public_only(),
            image_limits: FetchLimits {
                max_bytes: MAX_IMAGE_BYTES,
                ..FetchLimits::default()
            },
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: Duration::from_secs(120),
            heartbeat_every: Duration::from_secs(30),
            location: Location::default(),
            device_override: None,
        }
    }

    /// The (service, model) pairs this configuration serves.
    pub fn services(&self) -> Vec<ServedModel> {
        let mut out = Vec::new();
        let mut add = |service, models: &[String]| {
            for m in models {
                out.push(ServedModel {
                    service,
                    model: m.clone(),
                });
            }
        };
        if self.upstream.is_some() {
            add(Service::Chat, &self.chat_models);
            add(Service::Embeddings, &self.embedding_models);
        }
        if self.vision_upstream.is_some() || self.upstream.is_some() {
            add(Service::Vision, &self.vision_models);
        }
        if let Some(t) = &self.tts {
            add(Service::Tts, std::slice::from_ref(&t.model));
        }
        if let Some(s) = &self.scrape {
            add(Service::Scrape, std::slice::from_ref(&s.model));
        }
        out
    }
}

/// A provider node, ready to run.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
}

/// A node running in the background (see [`Node::start`]).
#[derive(Debug)]
pub struct NodeHandle {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The base URL the broker calls.
    pub endpoint: String,
    /// Its provision.
    pub provision_id: ProvisionId,
    /// What it serves.
    pub services: Vec<ServedModel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl NodeHandle {
    /// Stops it: it leaves every pool at the broker, then stops serving.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::backend("node task", e))?
    }
}

impl Node {
    /// A node with `config`.
    pub fn new(config: NodeConfig) -> Self {
        Node { config }
    }

    /// Runs until `shutdown` resolves (Ctrl-C, SIGTERM), then leaves every
    /// pool and stops.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let h = self.start().await?;
        shutdown.await;
        h.shutdown().await
    }

    /// Checks the backends, starts serving, registers with the broker and
    /// heartbeats in the background. Returns once the node is registered.
    pub async fn start(self) -> Result<NodeHandle> {
        let mut config = self.config;
        if let Some(t) = &config.tts {
            if let Err(e) = tts::check_program(&t.program).await {
                tracing::warn!(error = %e, "text to speech is not offered");
                config.tts = None;
            }
        }
        let services = config.services();
        if services.is_empty() {
            return Err(Error::InvalidInput(
                "the node serves nothing: configure an upstream with models, speech or scraping"
                    .into(),
            ));
        }
        let broker = broker_client(&config)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::backend(format!("binding {}", config.listen), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::backend("listener address", e))?;
        let endpoint = config
            .public_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| format!("http://{local_addr}"));
        let device = match &config.device_override {
            Some(d) => d.clone(),
            None => device::diagnose().await,
        };
        let config = Arc::new(config);
        let state = server::Serving::new(config.clone())?;
        let (stop_serving, serving_stopped) = oneshot::channel::<()>();
        let app = server::router(state.clone());
        let serve = tokio::spawn(async move {
            // Small stream chunks go out at once, not after a delayed ACK.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = serving_stopped.await;
                })
                .await;
        });

        let joiner = Joiner {
            broker,
            device: serde_json::to_value(&device).unwrap_or_default(),
            config: config.clone(),
            endpoint: endpoint.clone(),
            configured: services,
            upstream_http: state.upstream_http.clone(),
        };
        let joined = match joiner.join().await {
            Ok(j) => j,
            Err(e) => {
                let _ = stop_serving.send(());
                let _ = serve.await;
                return Err(e);
            }
        };
        state.set_secret(joined.secret.clone());
        let provision_id = joined.id.clone();
        let services = joined.services.clone();
        tracing::info!(provision = %provision_id, %endpoint, tier = joined.tier, ?services, "node serving");

        let (stop, stopped) = oneshot::channel::<()>();
        let every = config.heartbeat_every;
        let id = provision_id.clone();
        let joined_with = services.clone();
        let task = tokio::spawn(async move {
            let id = lifecycle(&joiner, &state, id, joined_with, every, stopped).await;
            // Leave every pool first, then stop serving: no call is routed
            // here once the broker has forgotten the node.
            let left = joiner.delete(&id).await;
            if let Err(e) = &left {
                tracing::warn!(error = %e, provision = %id, "could not leave the broker");
            }
            let _ = stop_serving.send(());
            let _ = serve.await;
            tracing::info!(provision = %id, "node stopped");
            left
        });
        Ok(NodeHandle {
            local_addr,
            endpoint,
            provision_id,
            services,
            stop: Some(stop),
            task,
        })
    }
}

/// A provision the node serves as.
struct Joined {
    id: ProvisionId,
    secret: Secret,
    tier: u8,
    services: Vec<ServedModel>,
}

/// Everything needed to join the broker, again if need be.
struct Joiner {
    /// The broker's client, calling with the provider key.
    broker: Client,
    config: Arc<NodeConfig>,
    device: serde_json::Value,
    endpoint: String,
    /// What the node is configured to serve.
    configured: Vec<ServedModel>,
    upstream_http: reqwest::Client,
}

impl Joiner {
    /// Registers, asks the broker which services to start, and reports ready
    /// with those it serves. A broker without the start step gets the
    /// services at registration instead.
    async fn join(&self) -> Result<Joined> {
        let bare = RegisterProvisionRequest {
            endpoint: None,
            services: Vec::new(),
            device: self.device.clone(),
            location: self.config.location.clone(),
        };
        let r = self.register(&bare).await?;
        let id = r.provision_id.clone();
        let secret = r.node_secret;
        match self.start_and_ready(&id).await {
            Ok(Some(services)) => Ok(Joined {
                id,
                secret,
                tier: r.tier,
                services,
            }),
            Ok(None) => {
                // No start step: this registration cannot take services
                // later, so it is replaced by one that carries them.
                let _ = self.delete(&id).await;
                let full = RegisterProvisionRequest {
                    endpoint: Some(self.endpoint.clone()),
                    services: self.configured.clone(),
                    ..bare
                };
                let r = self.register(&full).await?;
                Ok(Joined {
                    id: r.provision_id,
                    secret: r.node_secret,
                    tier: r.tier,
                    services: self.configured.clone(),
                })
            }
            Err(e) => {
                let _ = self.delete(&id).await;
                Err(e)
            }
        }
    }

    /// The start and ready steps; `None` when the broker has no start step.
    async fn start_and_ready(&self, id: &ProvisionId) -> Result<Option<Vec<ServedModel>>> {
        let mut kinds: Vec<Service> = self.configured.iter().map(|s| s.service).collect();
        kinds.dedup();
        let Some(assigned) = self.start(id, kinds).await? else {
            return Ok(None);
        };
        let services = self.to_serve(&assigned).await;
        self.ready(id, &services).await?;
        Ok(Some(services))
    }

    /// What the node configured, plus the assigned models its model server
    /// already has (so a server holding many models serves what the
    /// network lacks).
    async fn to_serve(&self, assigned: &[ServedModel]) -> Vec<ServedModel> {
        let mut out = self.configured.clone();
        let extra: Vec<&ServedModel> = assigned
            .iter()
            .filter(|a| !out.contains(a))
            .filter(|a| {
                matches!(
                    a.service,
                    Service::Chat | Service::Embeddings | Service::Vision
                )
            })
            .collect();
        if extra.is_empty() {
            return out;
        }
        let cfg = &self.config;
        let chat_up = proxy::upstream_models(&self.upstream_http, cfg.upstream.as_ref()).await;
        let vision_up = match &cfg.vision_upstream {
            Some(v) => proxy::upstream_models(&self.upstream_http, Some(v)).await,
            None => chat_up.clone(),
        };
        for a in extra {
            let have = match a.service {
                Service::Vision => &vision_up,
                _ => &chat_up,
            };
            if have.contains(&a.model) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Comes back after the broker forgot the node: ready again as the same
    /// node when the broker allows it, else a new registration.
    async fn rejoin(&self, id: &ProvisionId, serving: &[ServedModel]) -> Result<Option<Joined>> {
        match self.ready(id, serving).await {
            Ok(()) => return Ok(None),
            // Deleted, or a broker without the ready step.
            Err(Error::NotFound(_) | Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        self.join().await.map(Some)
    }

    // The broker's provider API, through the client. Its failures become the
    // errors the lifecycle tells apart: forgotten (`NotFound`, `Conflict`)
    // or anything else (retried at the next heartbeat).

    /// Registers a provision; the answer carries the node secret.
    async fn register(&self, req: &RegisterProvisionRequest) -> Result<RegisterProvisionResponse> {
        self.broker
            .provider()
            .register(req)
            .await
            .map_err(broker_error)
    }

    /// Asks which services to start, offering the kinds the node can run.
    /// `None` when the broker has no start step (then registration with
    /// services is the whole lifecycle).
    async fn start(
        &self,
        id: &ProvisionId,
        kinds: Vec<Service>,
    ) -> Result<Option<Vec<ServedModel>>> {
        let req = StartProvisionRequest { services: kinds };
        match self
            .broker
            .provider()
            .start(id, &req)
            .await
            .map_err(broker_error)
        {
            Ok(started) => Ok(Some(started.services)),
            Err(Error::NotFound(m)) if m.contains("no such route") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reports the node serving `services` at its endpoint: it joins exactly
    /// those pools.
    async fn ready(&self, id: &ProvisionId, services: &[ServedModel]) -> Result<()> {
        let req = ReadyProvisionRequest {
            endpoint: self.endpoint.clone(),
            services: services.to_vec(),
        };
        self.broker
            .provider()
            .ready(id, &req)
            .await
            .map(drop)
            .map_err(broker_error)
    }

    /// Says the node is alive.
    async fn heartbeat(&self, id: &ProvisionId) -> Result<()> {
        self.broker
            .provider()
            .heartbeat(id)
            .await
            .map_err(broker_error)
    }

    /// Leaves every pool and is forgotten: a node that starts again
    /// registers anew.
    async fn delete(&self, id: &ProvisionId) -> Result<()> {
        self.broker
            .provider()
            .delete(id)
            .await
            .map_err(broker_error)
    }
}

/// The broker's client for `config`, calling with its provider key.
///
/// Not retried by the client: the node's lifecycle is its retry loop (a
/// heartbeat each period, joining again when forgotten), and a node that
/// cannot register should say so at once.
fn broker_client(config: &NodeConfig) -> Result<Client> {
    Client::builder()
        .base_url(config.broker_url.as_str())
        .bearer(config.provider_key.expose())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .retry(RetryPolicy::none())
        .build()
        .map_err(broker_error)
}

/// What a failed broker call means to the node: a refusal by its status,
/// with the broker's own message; a connection that failed or timed out,
/// unavailable.
fn broker_error(e: cxmpute_client::Error) -> Error {
    use cxmpute_client::Error as E;
    let (status, message) = match &e {
        E::Api(a) => (a.status, a.error.message.clone()),
        // A proxy's page in front of the broker, not its JSON.
        E::Decode { status, .. } if !(200..300).contains(status) => {
            (*status, format!("the broker answered {status}"))
        }
        E::Decode { .. } => return Error::Upstream(format!("the broker's answer: {e}")),
        E::Config(_) | E::InvalidRequest(_) => return Error::InvalidInput(e.to_string()),
        _ => return Error::unavailable("the broker is unreachable", e),
    };
    match status {
        400 | 422 => Error::InvalidInput(message),
        401 => Error::Unauthorized(message),
        403 => Error::Forbidden(message),
        404 => Error::NotFound(message),
        409 => Error::Conflict(message),
        _ => Error::Unavailable {
            message,
            source: None,
        },
    }
}

/// Heartbeats until told to stop; comes back when the broker has forgotten
/// the node (expired, ended). Returns the provision to end.
async fn lifecycle(
    joiner: &Joiner,
    state: &server::Serving,
    mut id: ProvisionId,
    // What the node joined with (its configured models plus any assigned
    // ones it took on): what it reports when it joins again.
    mut serving: Vec<ServedModel>,
    every: Duration,
    mut stopped: oneshot::Receiver<()>,
) -> ProvisionId {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the node just joined
    loop {
        tokio::select! {
            _ = &mut stopped => return id,
            _ = tick.tick() => {}
        }
        match joiner.heartbeat(&id).await {
            Ok(()) => {}
            Err(Error::NotFound(_) | Error::Conflict(_)) => {
                tracing::warn!(provision = %id, "the broker forgot this node; joining again");
                match joiner.rejoin(&id, &serving).await {
                    Ok(None) => {}
                    Ok(Some(j)) => {
                        state.set_secret(j.secret);
                        id = j.id;
                        serving = j.services;
                    }
                    Err(e) => tracing::warn!(error = %e, "joining again failed; will retry"),
                }
            }
            Err(e) => tracing::warn!(error = %e, provision = %id, "heartbeat failed; will retry"),
        }
    }
}
