//! The Cxmpute host: the broker's router served over HTTP.
//!
//! ```text
//! cargo run --release --example host                       # SQLite at ./cxmpute.db
//! cargo run --release --example host -- --store memory     # nothing kept
//! cargo run --release --example host -- --listen 0.0.0.0:9000 --db /var/lib/cxmpute.db
//! ```
//!
//! On first start with an empty store it creates an admin account and prints
//! its API key once; set `CXMPUTE_ADMIN_KEY` to choose that key instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use cxmpute::core::{Broker, BrokerConfig, MemoryStore, Secret, Store};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// SQLite file (the default): state survives restarts.
    Sqlite,
    /// In memory: state is lost when the host stops.
    Memory,
}

#[derive(Debug, Parser)]
#[command(about = "Runs a Cxmpute broker host")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "CXMPUTE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where state is kept.
    #[arg(long, env = "CXMPUTE_STORE", value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// The SQLite database file.
    #[arg(long, env = "CXMPUTE_DB", default_value = "./cxmpute.db")]
    db: PathBuf,
    /// Email of the admin account created on first start.
    #[arg(long, env = "CXMPUTE_ADMIN_EMAIL", default_value = "admin@localhost.localdomain")]
    admin_email: String,
    /// Accept node endpoints on loopback and private networks (development).
    #[arg(long, env = "CXMPUTE_ALLOW_PRIVATE_NODES")]
    allow_private_nodes: bool,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "CXMPUTE_LOG_JSON")]
    log_json: bool,
}

async fn open_store(args: &Args) -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    Ok(match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Sqlite => {
            tracing::warn!(db = %args.db.display(), "SQLite store not built yet; using memory");
            Arc::new(MemoryStore::new())
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let store = open_store(&args).await.map_err(|e| format!("cannot open the store: {e}"))?;
    let mut config = BrokerConfig::default();
    if args.allow_private_nodes {
        config = config.allow_private_endpoints();
    }
    let broker = Broker::builder(store).config(config).build().await?;

    let admin_key = std::env::var("CXMPUTE_ADMIN_KEY").ok().filter(|k| !k.is_empty()).map(Secret::new);
    if let Some(secret) = broker.ensure_admin(&args.admin_email, admin_key).await? {
        // Printed once, on the terminal of whoever started the host: it is
        // stored only as a hash and cannot be shown again.
        println!("admin API key (shown once): {}", secret.expose());
    }

    let maintenance = broker.spawn_maintenance(Duration::from_secs(15));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "cxmpute host listening");
    axum::serve(listener, cxmpute::core::router(broker.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    maintenance.abort();
    broker.shutdown().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
