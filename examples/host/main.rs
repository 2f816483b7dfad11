//! The Cxmpute host: the broker's router served over HTTP.
//!
//! ```text
//! cargo run --release --example host                       # SQLite at ./cxmpute.db
//! cargo run --release --example host -- --store memory     # nothing kept
//! cargo run --release --example host -- --listen 0.0.0.0:9000 --db /var/lib/cxmpute.db
//! cargo run --release --example host --features dynamo -- --store dynamo --dynamo-create-tables
//! cargo run --release --example host -- --config cxmpute.toml  # catalogue, prices, rewards
//! ```
//!
//! `--config` (`CXMPUTE_CONFIG`) names a TOML file that seeds the catalogue
//! and prices at every start and chooses the reward policy; see
//! `cxmpute.example.toml` and `cxmpute_core::config`. A bad file stops the
//! host with a message naming the key.
//!
//! On first start with an empty store it creates an admin account and prints
//! its API key once; set `CXMPUTE_ADMIN_KEY` to choose that key instead.
//!
//! Connections are bounded (`--header-read-timeout-secs`,
//! `--body-read-timeout-secs`, `--idle-timeout-secs`, `--max-connections`).
//! Behind a reverse proxy, set `CXMPUTE_CLIENT_IP_HEADER` to the header it
//! puts the caller's address in, so sign-in codes are limited per caller
//! rather than per proxy.
//! Every flag can also be set through the environment variable it names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use cxmpute::core::config::ConfigFile;
use cxmpute::core::http::{serve, shutdown_signal, ServeConfig};
use cxmpute::core::mail::MailerConfig;
use cxmpute::core::sessions::AuthConfig;
use cxmpute::core::{Broker, BrokerConfig, MemoryStore, Secret, Store};

mod log;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call allocates and frees a few dozen small blocks across two threads;
/// mimalloc's per-thread free lists do that for about half of what the
/// system allocator spends (measured with `scripts/bench.sh`, see README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// SQLite file (the default): state survives restarts.
    Sqlite,
    /// In memory: state is lost when the host stops.
    Memory,
    /// DynamoDB (build with `--features dynamo`): many hosts, one database.
    Dynamo,
}

/// `--sqlite-durability`: see `cxmpute::sqlite::Durability`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SqliteDurability {
    /// Survives a power loss: an fsync per batch of commits (the default).
    Disk,
    /// Survives the process being killed; a power loss may lose the last commits.
    Process,
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
    /// What a SQLite commit survives before a call's answer goes out:
    /// `disk` (an fsync per batch of commits; survives a power loss) or
    /// `process` (survives the host being killed, not a power loss, and
    /// serves many more calls a second).
    #[arg(
        long,
        env = "CXMPUTE_SQLITE_DURABILITY",
        value_enum,
        default_value = "disk"
    )]
    sqlite_durability: SqliteDurability,
    /// DynamoDB table name prefix (several deployments can share an account).
    #[arg(long, env = "CXMPUTE_DYNAMO_PREFIX", default_value = "")]
    dynamo_prefix: String,
    /// DynamoDB endpoint override (a local DynamoDB-compatible server).
    #[arg(long, env = "CXMPUTE_DYNAMO_ENDPOINT")]
    dynamo_endpoint: Option<String>,
    /// Create the DynamoDB table if it is missing.
    #[arg(long, env = "CXMPUTE_DYNAMO_CREATE_TABLES")]
    dynamo_create_tables: bool,
    /// A configuration file (TOML) seeding the catalogue and prices and
    /// choosing the reward policy (see `cxmpute.example.toml`).
    #[arg(long, env = "CXMPUTE_CONFIG")]
    config: Option<PathBuf>,
    /// Email of the admin account created on first start.
    #[arg(
        long,
        env = "CXMPUTE_ADMIN_EMAIL",
        default_value = "admin@localhost.localdomain"
    )]
    admin_email: String,
    /// Which mailer sends sign-in codes: `console` or `smtp` (SMTP settings
    /// from CXMPUTE_SMTP_HOST, _PORT, _TLS, _FROM, _USERNAME, _PASSWORD).
    #[arg(long, env = "CXMPUTE_MAILER", default_value = "console")]
    mailer: String,
    /// Print sign-in codes with the console mailer (local development only).
    #[arg(long, env = "CXMPUTE_MAIL_REVEAL_CODES")]
    reveal_codes: bool,
    /// Accept node endpoints on loopback and private networks (development).
    #[arg(long, env = "CXMPUTE_ALLOW_PRIVATE_NODES")]
    allow_private_nodes: bool,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "CXMPUTE_LOG_JSON")]
    log_json: bool,
    /// What to log, as a tracing filter (`info`, `warn`, `cxmpute_core=debug,info`, ...);
    /// `info` writes a line per call.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Seconds a request's head (request line and headers) may take to arrive.
    #[arg(long, env = "CXMPUTE_HEADER_READ_TIMEOUT_SECS",
          default_value_t = ServeConfig::default().header_read_timeout.as_secs())]
    header_read_timeout_secs: u64,
    /// Seconds a request's body may take to arrive after its head.
    #[arg(long, env = "CXMPUTE_BODY_READ_TIMEOUT_SECS",
          default_value_t = ServeConfig::default().body_read_timeout.as_secs())]
    body_read_timeout_secs: u64,
    /// Seconds after which a connection with nothing to do is closed.
    #[arg(long, env = "CXMPUTE_IDLE_TIMEOUT_SECS",
          default_value_t = ServeConfig::default().idle_timeout.as_secs())]
    idle_timeout_secs: u64,
    /// Most client connections open at once (more are answered 503); keep it
    /// under the file-descriptor limit (`ulimit -n`).
    #[arg(long, env = "CXMPUTE_MAX_CONNECTIONS",
          default_value_t = ServeConfig::default().max_connections)]
    max_connections: usize,
    /// Threads that serve connections, each with a runtime of its own (a
    /// call then stays on one thread); 0 serves them on the main runtime.
    /// Default: one per core.
    #[arg(long, env = "CXMPUTE_SERVE_THREADS")]
    serve_threads: Option<usize>,
}

impl Args {
    /// The connection limits from the flags; a zero timeout is taken as one second.
    fn serve_config(&self) -> ServeConfig {
        let secs = |s: u64| Duration::from_secs(s.max(1));
        ServeConfig::default()
            .header_read_timeout(secs(self.header_read_timeout_secs))
            .body_read_timeout(secs(self.body_read_timeout_secs))
            .idle_timeout(secs(self.idle_timeout_secs))
            .max_connections(self.max_connections.max(1))
            .threads(
                self.serve_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            )
    }
}

async fn open_store(args: &Args) -> Result<Arc<dyn Store>, BoxError> {
    Ok(match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Sqlite => {
            let durability = match args.sqlite_durability {
                SqliteDurability::Disk => cxmpute::sqlite::Durability::Disk,
                SqliteDurability::Process => cxmpute::sqlite::Durability::Process,
            };
            let options = cxmpute::sqlite::SqliteOptions::default().durability(durability);
            Arc::new(cxmpute::sqlite::SqliteStore::open_with(&args.db, options).await?)
        }
        #[cfg(feature = "dynamo")]
        StoreKind::Dynamo => {
            let mut cfg = cxmpute::dynamo::DynamoConfig::new(args.dynamo_prefix.clone());
            if let Some(e) = &args.dynamo_endpoint {
                cfg = cfg.with_endpoint(e.clone());
            }
            let store = cxmpute::dynamo::DynamoStore::connect(cfg).await?;
            if args.dynamo_create_tables {
                store.create_tables_if_missing().await?;
            }
            Arc::new(store)
        }
        #[cfg(not(feature = "dynamo"))]
        StoreKind::Dynamo => return Err("this host was built without the `dynamo` feature".into()),
    })
}

/// The session secret kept in a file beside the SQLite database (created on
/// first start, owner-only), so sessions survive restarts; used when
/// `CXMPUTE_SESSION_SECRET` (read by `AuthConfig::from_env`) is not set.
/// Several hosts sharing DynamoDB must all be given the same
/// `CXMPUTE_SESSION_SECRET`.
fn stored_session_secret(args: &Args) -> Result<Option<Secret>, BoxError> {
    if !matches!(args.store, StoreKind::Sqlite) {
        return Ok(None);
    }
    let path = Path::new(&args.db).with_extension("session-secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => Ok(Some(Secret::new(s.trim()))),
        Ok(_) => Err(format!("{} is too short (at least 32 characters)", path.display()).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = Secret::generate(48);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            std::io::Write::write_all(&mut opts.open(&path)?, secret.expose().as_bytes())?;
            Ok(Some(secret))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display()).into()),
    }
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let serve_config = args.serve_config();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // With serving threads, this runtime runs what is left: the store's
    // writer (SQLite), maintenance and the start. One worker does it; a
    // second only woke up to look for work each time the writer did. On
    // the SQLite host under the bench: 1.3 futex calls and 2.1 context
    // switches a call with two, 0.35 and 1.3 with one. `TOKIO_WORKER_THREADS`
    // still decides when set.
    if serve_config.threads > 0 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(1);
    }
    runtime
        .enable_all()
        .build()?
        .block_on(run(args, serve_config))
}

async fn run(args: Args, serve_config: ServeConfig) -> Result<(), BoxError> {
    let _log_guard = log::init(&args.log, args.log_json)?;

    let store = open_store(&args)
        .await
        .map_err(|e| format!("cannot open the store: {e}"))?;
    let mailer = MailerConfig::from_lookup(|k| match k {
        "CXMPUTE_MAILER" => Some(args.mailer.clone()),
        "CXMPUTE_MAIL_REVEAL_CODES" => Some(if args.reveal_codes { "1" } else { "0" }.into()),
        other => std::env::var(other).ok(),
    })?
    .build()?;
    let mut config = BrokerConfig::default();
    if args.allow_private_nodes {
        config = config.allow_private_endpoints();
    }
    // Session lifetimes, sign-up credits and further admin emails come from
    // CXMPUTE_* variables (see `AuthConfig::from_env`).
    let mut auth = AuthConfig::from_env()?;
    auth.admin_emails.push(args.admin_email.clone());
    if auth.session_secret.is_none() {
        if let Some(s) = stored_session_secret(&args)? {
            auth = auth.with_session_secret(s);
        }
    }
    // Read and checked before anything starts: a bad file stops the host.
    let file = match args.config.as_deref().map(ConfigFile::load) {
        Some(Ok(file)) => file,
        None => ConfigFile::default(),
        // Said as it is (a TOML error spans lines), then stop.
        Some(Err(e)) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let broker = Broker::builder(store)
        .config(file.broker_config(config))
        .auth(auth)
        .mailer(mailer)
        .reward_policy(file.reward_policy()?)
        .build()
        .await?;
    file.seed(&broker).await?;
    if let Some(path) = &args.config {
        let policy = broker.admin().reward_policy();
        tracing::info!(
            config = %path.display(),
            catalogue = file.catalogue.len(),
            prices = file.prices.len(),
            reward = %policy.policy,
            "configuration seeded"
        );
    }

    let admin_key = std::env::var("CXMPUTE_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(Secret::new);
    if let Some(secret) = broker
        .admin()
        .ensure_admin(&args.admin_email, admin_key)
        .await?
    {
        // Printed once, on the terminal of whoever started the host: it is
        // stored only as a hash and cannot be shown again.
        println!("admin API key (shown once): {}", secret.expose());
    }

    let maintenance = broker.spawn_maintenance(Duration::from_secs(15));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "cxmpute host listening");
    // Not `axum::serve`: this one bounds how long a stranger's connection may
    // be held (header, body, idle) and how many are open.
    let router = cxmpute::core::router(broker.clone());
    serve(listener, router, serve_config, shutdown_signal()).await?;
    maintenance.abort();
    broker.shutdown().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}
