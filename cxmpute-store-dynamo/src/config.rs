//! How to reach the table: name prefix, endpoint, region, credentials and the
//! timeouts and retry bounds that keep a sick database from hanging a host.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Where and how [`DynamoStore`](crate::DynamoStore) connects.
///
/// Everything has a sensible default; a deployment usually sets only
/// [`table_prefix`](Self::table_prefix) and lets the standard AWS chain
/// (environment, profile, SSO, web identity, container or instance role)
/// supply the region and credentials.
#[derive(Clone)]
pub struct DynamoConfig {
    /// Prepended to the table name (`{prefix}cxmpute`), so several deployments
    /// (prod, staging, a developer's) can share one account and region.
    pub table_prefix: String,
    /// An endpoint to use instead of AWS's (a local DynamoDB-compatible
    /// server or emulator), e.g. `http://127.0.0.1:8000`.
    pub endpoint_url: Option<String>,
    /// The AWS region; `None` takes it from the standard chain.
    pub region: Option<String>,
    /// Fixed credentials; `None` (the normal case) uses the standard chain.
    pub credentials: Option<StaticCredentials>,
    /// How many shards the ledger totals counter is split into. Every reserve
    /// and settle adds to one shard, and concurrent transactions on one item
    /// conflict, so more shards means fewer conflicts under load; reading the
    /// totals costs one batch read of all of them. Only ever raise it: shards
    /// above the new count would no longer be read.
    pub ledger_shards: u32,
    /// Attempts per DynamoDB call made by the AWS SDK itself (throttling,
    /// transient network and 5xx errors), including the first.
    pub max_attempts: u32,
    /// The SDK's initial retry backoff (it grows exponentially, with jitter).
    pub initial_backoff: Duration,
    /// Times a transaction is retried after losing a conflict with a
    /// concurrent one (or after a concurrent change invalidated what it
    /// read), with jittered exponential backoff, before the call fails with
    /// a retryable `Conflict`.
    pub conflict_retries: u32,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt of one call.
    pub attempt_timeout: Duration,
    /// Time allowed for one call, all attempts included.
    pub operation_timeout: Duration,
    /// Caps the DynamoDB requests in flight across every store holding a
    /// clone of this gate. Leave it `None` against DynamoDB, which isolates
    /// concurrent requests itself. It exists for emulators that do not:
    /// moto's server, for one, applies a transaction by snapshotting whole
    /// tables and restoring the snapshot when a condition fails, so two
    /// requests in flight at once can undo each other. A gate of one keeps
    /// tests against such a server meaningful (requests still interleave,
    /// one at a time).
    pub request_gate: Option<RequestGate>,
}

/// A limit on requests in flight, shared by every clone (see
/// [`DynamoConfig::request_gate`]).
#[derive(Clone, Debug)]
pub struct RequestGate(pub(crate) Arc<tokio::sync::Semaphore>);

impl RequestGate {
    /// A gate letting `max_in_flight` requests (at least one) through at once.
    pub fn new(max_in_flight: usize) -> Self {
        RequestGate(Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1))))
    }
}

impl DynamoConfig {
    /// The defaults, with this table prefix.
    pub fn new(table_prefix: impl Into<String>) -> Self {
        DynamoConfig {
            table_prefix: table_prefix.into(),
            ..Self::default()
        }
    }

    /// Uses this endpoint instead of AWS's.
    pub fn with_endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Uses this region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Uses fixed credentials instead of the standard chain.
    pub fn with_credentials(mut self, credentials: StaticCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// The name of the table this configuration points at.
    pub fn table_name(&self) -> String {
        format!("{}cxmpute", self.table_prefix)
    }
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            table_prefix: String::new(),
            endpoint_url: None,
            region: None,
            credentials: None,
            ledger_shards: 32,
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            conflict_retries: 12,
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15),
            request_gate: None,
        }
    }
}

impl fmt::Debug for DynamoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoConfig")
            .field("table", &self.table_name())
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("credentials", &self.credentials)
            .field("ledger_shards", &self.ledger_shards)
            .field("max_attempts", &self.max_attempts)
            .field("conflict_retries", &self.conflict_retries)
            .field("operation_timeout", &self.operation_timeout)
            .field("request_gate", &self.request_gate.is_some())
            .finish_non_exhaustive()
    }
}

/// An access key pair given explicitly (emulators, tests). Its `Debug`
/// shows only the key id.
#[derive(Clone)]
pub struct StaticCredentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl StaticCredentials {
    /// A key pair.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        StaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}
