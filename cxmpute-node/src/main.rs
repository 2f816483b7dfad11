//! A Cxmpute provider node: serves chat, embeddings and vision through an
//! OpenAI-compatible model server, speech through espeak-ng and scraping
//! built in, for one broker.
//!
//! ```text
//! cargo run --release -p cxmpute-node -- \
//!     --broker http://127.0.0.1:8080 --provider-key cxp-... \
//!     --upstream http://127.0.0.1:11434/v1 --chat-model llama3.2:3b \
//!     --embeddings-model nomic-embed-text --vision-model moondream
//! ```
//!
//! It registers with the machine's diagnostics, heartbeats, and on Ctrl-C or
//! SIGTERM leaves every pool before it exits. The broker must be able to
//! reach `--public-url` (by default the listen address).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use cxmpute_core::wire::{DEFAULT_SCRAPE_MODEL, DEFAULT_TTS_MODEL};
use cxmpute_core::{Location, Secret};
use cxmpute_node::{Node, NodeConfig, ScrapeConfig, TtsConfig, Upstream};

#[derive(Debug, Parser)]
#[command(about = "Runs a Cxmpute provider node")]
struct Args {
    /// The broker's base URL.
    #[arg(long, env = "CXMPUTE_BROKER")]
    broker: String,
    /// The provider key.
    #[arg(long, env = "CXMPUTE_PROVIDER_KEY", hide_env_values = true)]
    provider_key: String,
    /// Address to listen on.
    #[arg(long, env = "CXMPUTE_NODE_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The URL the broker reaches this node at (a tunnel, a public address).
    #[arg(long, env = "CXMPUTE_NODE_PUBLIC_URL")]
    public_url: Option<String>,
    /// The OpenAI-compatible model server's base URL, e.g. http://127.0.0.1:11434/v1.
    #[arg(long, env = "CXMPUTE_UPSTREAM")]
    upstream: Option<String>,
    /// The model server's API key, if it wants one.
    #[arg(long, env = "CXMPUTE_UPSTREAM_KEY", hide_env_values = true)]
    upstream_key: Option<String>,
    /// A separate model server for vision.
    #[arg(long, env = "CXMPUTE_VISION_UPSTREAM")]
    vision_upstream: Option<String>,
    /// A chat model to serve (repeatable).
    #[arg(long = "chat-model")]
    chat_models: Vec<String>,
    /// An embeddings model to serve (repeatable).
    #[arg(long = "embeddings-model")]
    embedding_models: Vec<String>,
    /// A vision model to serve (repeatable).
    #[arg(long = "vision-model")]
    vision_models: Vec<String>,
    /// Do not offer text to speech.
    #[arg(long)]
    no_tts: bool,
    /// The pool model speech is offered as.
    #[arg(long, default_value = DEFAULT_TTS_MODEL)]
    tts_model: String,
    /// Do not offer scraping.
    #[arg(long)]
    no_scrape: bool,
    /// The pool model scraping is offered as.
    #[arg(long, default_value = DEFAULT_SCRAPE_MODEL)]
    scrape_model: String,
    /// An address or CIDR scrape targets and image URLs may reach although it
    /// is not public (repeatable; e.g. a private mirror).
    #[arg(long = "egress-allow")]
    egress_allow: Vec<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Where the node is: country.
    #[arg(long, default_value = "")]
    country: String,
    /// Where the node is: state or region.
    #[arg(long, default_value = "")]
    state: String,
    /// Where the node is: city.
    #[arg(long, default_value = "")]
    city: String,
}

fn upstream(url: &str, key: Option<&str>) -> Result<Upstream, Box<dyn std::error::Error>> {
    let mut u: Upstream = url.parse()?;
    u.api_key = key.map(Secret::new);
    Ok(u)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let mut cfg = NodeConfig::new(args.broker, args.provider_key);
    cfg.listen = args.listen;
    cfg.public_url = args.public_url;
    let key = args.upstream_key.as_deref();
    cfg.upstream = args
        .upstream
        .as_deref()
        .map(|u| upstream(u, key))
        .transpose()?;
    cfg.vision_upstream = args
        .vision_upstream
        .as_deref()
        .map(|u| upstream(u, key))
        .transpose()?;
    cfg.chat_models = args.chat_models;
    cfg.embedding_models = args.embedding_models;
    cfg.vision_models = args.vision_models;
    cfg.tts = (!args.no_tts).then(|| TtsConfig {
        model: args.tts_model,
        ..TtsConfig::default()
    });
    cfg.scrape = (!args.no_scrape).then(|| ScrapeConfig {
        model: args.scrape_model,
        ..ScrapeConfig::default()
    });
    for net in &args.egress_allow {
        cfg.egress = cfg.egress.allowing(net)?;
    }
    cfg.heartbeat_every = Duration::from_secs(args.heartbeat_secs.max(1));
    cfg.location = Location {
        country: args.country,
        state: args.state,
        city: args.city,
    };

    Node::new(cfg)
        .run(cxmpute_core::http::shutdown_signal())
        .await?;
    Ok(())
}
