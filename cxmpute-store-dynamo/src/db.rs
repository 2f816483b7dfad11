//! The store handle and the handful of DynamoDB calls everything else is
//! written with: error mapping, bounded retries, transactions, paged queries
//! and batch reads.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, ConditionCheck, Delete, GlobalSecondaryIndex, IndexStatus,
    KeySchemaElement, KeyType, KeysAndAttributes, Projection, ProjectionType, Put,
    ScalarAttributeType, TableStatus, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use cxmpute_core::{ApiKeyId, Error, KeyHash, RequestId, Reservation, Result, UserId};
use rand::Rng;

use crate::config::DynamoConfig;
use crate::item::{Ex, Item, PK, SK};
use crate::schema::{GSI, GSI_PK, GSI_SK};

/// A [`Store`](cxmpute_core::Store) on one DynamoDB table, shared by every
/// host of a deployment. See the [crate docs](crate) for the table design.
pub struct DynamoStore {
    pub(crate) client: Client,
    pub(crate) table: String,
    pub(crate) cfg: DynamoConfig,
    /// Reservations this process took and has not settled yet, so the usual
    /// settle (same process) needs no read first. Only a hint: the settle
    /// transaction's conditions check every value taken from it.
    pub(crate) held: Mutex<HashMap<RequestId, Held>>,
    /// Key id to (owner, hash). Never changes for a key, so it is safe to
    /// remember; it spares reserve a read of the key id item.
    pub(crate) key_owners: Mutex<HashMap<ApiKeyId, (UserId, KeyHash)>>,
}

/// An open reservation as this process took it.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub(crate) r: Reservation,
    pub(crate) key_hash: KeyHash,
    pub(crate) shard: u32,
}

/// Caches above this many entries are dropped whole: they are only hints,
/// and this keeps a host that never settles (or never reuses keys) bounded.
const CACHE_CAP: usize = 100_000;

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl DynamoStore {
    /// Builds an SDK client from `cfg` (standard AWS chain for whatever the
    /// config leaves out) and a store on the table `cfg` names. Makes no call:
    /// an unreachable endpoint shows up as [`Error::Unavailable`] on first use.
    pub async fn connect(cfg: DynamoConfig) -> Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .operation_attempt_timeout(cfg.attempt_timeout)
                    .operation_timeout(cfg.operation_timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts.max(1))
                    .with_initial_backoff(cfg.initial_backoff),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(c) = &cfg.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                None,
                None,
                "cxmpute-config",
            ));
        }
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let shared = loader.load().await;
        Self::with_client(Client::new(&shared), cfg)
    }

    /// A store using a client the host configured itself (custom HTTP client,
    /// interceptors...). Only the table and ledger settings of `cfg` are used.
    pub fn with_client(client: Client, cfg: DynamoConfig) -> Result<Self> {
        let table = cfg.table_name();
        let valid = table.len() <= 255
            && table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            return Err(Error::InvalidInput(format!(
                "`{table}` is not a valid DynamoDB table name"
            )));
        }
        if cfg.ledger_shards == 0 {
            return Err(Error::InvalidInput(
                "ledger_shards must be at least 1".into(),
            ));
        }
        Ok(DynamoStore {
            client,
            table,
            cfg,
            held: Mutex::new(HashMap::new()),
            key_owners: Mutex::new(HashMap::new()),
        })
    }

    /// Creates the table (on-demand capacity) and its index when they do not
    /// exist, then waits until both are active. For a fresh account, an
    /// emulator or tests; production tables are better made by your
    /// infrastructure tooling with the same schema (see the crate docs).
    pub async fn create_tables_if_missing(&self) -> Result<()> {
        let what = "creating the DynamoDB table";
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::backend(what, e))
        };
        let key = |name: &str, kt: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kt)
                .build()
                .map_err(|e| Error::backend(what, e))
        };
        let gsi = GlobalSecondaryIndex::builder()
            .index_name(GSI)
            .key_schema(key(GSI_PK, KeyType::Hash)?)
            .key_schema(key(GSI_SK, KeyType::Range)?)
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::KeysOnly)
                    .build(),
            )
            .build()
            .map_err(|e| Error::backend(what, e))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK)?)
            .attribute_definitions(attr(SK)?)
            .attribute_definitions(attr(GSI_PK)?)
            .attribute_definitions(attr(GSI_SK)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .global_secondary_indexes(gsi)
            .send()
            .await;
        if let Err(e) = created {
            // Another host (or an earlier run) made it: fine, wait for it below.
            if e.code() != Some("ResourceInUseException") {
                return Err(classify(what, e).into_error(what));
            }
        }
        // Table creation is asynchronous; poll until the table and its index
        // accept traffic. A fresh on-demand table takes seconds, so a bounded
        // wait with a short interval is enough.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| classify(what, e).into_error(what))?;
            if let Some(t) = out.table() {
                let table_active = t.table_status() == Some(&TableStatus::Active);
                let indexes_active = t
                    .global_secondary_indexes()
                    .iter()
                    .all(|i| i.index_status().is_none_or(|s| s == &IndexStatus::Active));
                if table_active && indexes_active {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable {
                    message: format!("table {} did not become active in time", self.table),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Deletes the table and everything in it. For tests and teardown of
    /// throwaway deployments; a missing table is not an error.
    pub async fn delete_tables(&self) -> Result<()> {
        let what = "deleting the DynamoDB table";
        match self
            .client
            .delete_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(classify(what, e).into_error(what)),
        }
    }

    // ---- caches ------------------------------------------------------------

    pub(crate) fn remember_key(&self, id: &ApiKeyId, user: &UserId, hash: KeyHash) {
        let mut m = self.key_owners.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CACHE_CAP {
            m.clear();
        }
        m.insert(id.clone(), (user.clone(), hash));
    }

    pub(crate) fn known_key(&self, id: &ApiKeyId) -> Option<(UserId, KeyHash)> {
        let m = self.key_owners.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).cloned()
    }

    pub(crate) fn hold(&self, h: Held) {
        let mut m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CACHE_CAP {
            m.clear();
        }
        m.insert(h.r.request_id.clone(), h);
    }

    /// What this process believes of an open reservation, kept.
    pub(crate) fn held_now(&self, id: &RequestId) -> Option<Held> {
        let m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).cloned()
    }

    pub(crate) fn unhold(&self, id: &RequestId) -> Option<Held> {
        let mut m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(id)
    }

    // ---- retries -----------------------------------------------------------

    /// Waits before another try: full jitter over an exponential cap, so
    /// hosts that collided do not collide again in step.
    pub(crate) async fn pause(&self, attempt: u32) {
        let cap_ms = (5u64 << attempt.min(8)).min(1_000);
        let ms = rand::rng().random_range(1..=cap_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Counts one more try of an optimistic read-then-conditional-write and
    /// waits, or fails with a retryable `Conflict` when the tries are spent.
    pub(crate) async fn again(&self, attempt: &mut u32, what: &str) -> Result<()> {
        if *attempt >= self.cfg.conflict_retries {
            return Err(Error::Conflict(format!(
                "{what}: too many concurrent changes, try again"
            )));
        }
        self.pause(*attempt).await;
        *attempt += 1;
        Ok(())
    }

    /// Runs a call, retrying (bounded, with backoff) while it loses
    /// transaction conflicts or is throttled past the SDK's own retries.
    pub(crate) async fn run<T, F, Fut>(&self, mut f: F) -> Result<T, Fail>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        let mut attempt = 0;
        loop {
            let permit =
                match &self.cfg.request_gate {
                    Some(gate) => Some(gate.0.acquire().await.map_err(|e| {
                        Fail::Err(Error::backend("waiting for the request gate", e))
                    })?),
                    None => None,
                };
            let res = f().await;
            drop(permit);
            match res {
                Err(Fail::Retry(e)) => {
                    if attempt >= self.cfg.conflict_retries {
                        return Err(Fail::Err(e));
                    }
                    self.pause(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    // ---- calls -------------------------------------------------------------

    /// A strongly consistent read of one item.
    pub(crate) async fn get(&self, what: &str, key: Item) -> Result<Option<Item>> {
        self.run(|| {
            let call = self
                .client
                .get_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .consistent_read(true)
                .send();
            async move { call.await.map(|o| o.item).map_err(|e| classify(what, e)) }
        })
        .await
        .map_err(|f| f.into_error(what))
    }

    /// Writes a whole item, under a condition if given.
    pub(crate) async fn put(
        &self,
        what: &str,
        item: Item,
        cond: Option<String>,
        ex: Ex,
    ) -> Result<(), Fail> {
        ex.check_used(&[cond.as_deref().unwrap_or_default()])?;
        self.run(|| {
            let call = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item.clone()))
                .set_condition_expression(cond.clone())
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .send();
            async move { call.await.map(|_| ()).map_err(|e| classify(what, e)) }
        })
        .await
    }

    /// Updates one item; returns its new attributes when `return_new`.
    pub(crate) async fn update(
        &self,
        what: &str,
        key: Item,
        update: String,
        cond: Option<String>,
        ex: Ex,
        return_new: bool,
    ) -> Result<Option<Item>, Fail> {
        ex.check_used(&[&update, cond.as_deref().unwrap_or_default()])?;
        let ret = if return_new {
            aws_sdk_dynamodb::types::ReturnValue::AllNew
        } else {
            aws_sdk_dynamodb::types::ReturnValue::None
        };
        self.run(|| {
            let call = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .update_expression(update.clone())
                .set_condition_expression(cond.clone())
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .return_values(ret.clone())
                .send();
            async move {
                call.await
                    .map(|o| o.attributes)
                    .map_err(|e| classify(what, e))
            }
        })
        .await
    }

    /// Deletes one item, under a condition if given.
    pub(crate) async fn delete(
        &self,
        what: &str,
        key: Item,
        cond: Option<String>,
        ex: Ex,
    ) -> Result<(), Fail> {
        ex.check_used(&[cond.as_deref().unwrap_or_default()])?;
        self.run(|| {
            let call = self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .set_condition_expression(cond.clone())
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .send();
            async move { call.await.map(|_| ()).map_err(|e| classify(what, e)) }
        })
        .await
    }

    /// Whether the check at `i` of a refused transaction, that the item at
    /// `key` exists, is one that failed. When DynamoDB named no failed
    /// items (`flags` empty), a consistent read of the item says.
    pub(crate) async fn must_exist_failed(
        &self,
        what: &str,
        flags: &[bool],
        i: usize,
        key: Item,
    ) -> Result<bool> {
        if flags.is_empty() {
            Ok(self.get(what, key).await?.is_none())
        } else {
            Ok(Fail::failed(flags, i))
        }
    }

    /// Applies a transaction: all of it or none of it.
    pub(crate) async fn transact(&self, what: &str, tx: Tx) -> Result<(), Fail> {
        if tx.items.is_empty() {
            return Ok(());
        }
        if tx.items.len() > MAX_TX_ITEMS {
            return Err(Fail::Err(Error::InvalidInput(format!(
                "{what}: more than {MAX_TX_ITEMS} items would change at once"
            ))));
        }
        self.run(|| {
            let call = self
                .client
                .transact_write_items()
                .set_transact_items(Some(tx.items.clone()))
                .send();
            async move { call.await.map(|_| ()).map_err(|e| classify_tx(what, e)) }
        })
        .await
    }

    /// Every item a query finds, following pages; stops early once `q.limit`
    /// items were collected.
    pub(crate) async fn query(&self, what: &str, q: Query) -> Result<Vec<Item>> {
        q.ex.check_used(&[&q.key_cond, q.filter.as_deref().unwrap_or_default()])?;
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page_limit = match (q.limit, &q.filter) {
                // Limit counts items read, not items kept: only use it without a filter.
                (Some(l), None) => Some(i32::try_from(l - out.len()).unwrap_or(i32::MAX)),
                _ => None,
            };
            let page = self
                .run(|| {
                    let call = self
                        .client
                        .query()
                        .table_name(&self.table)
                        .set_index_name(q.index.map(str::to_owned))
                        // Index reads cannot be strongly consistent; table reads always are.
                        .consistent_read(q.index.is_none())
                        .key_condition_expression(q.key_cond.clone())
                        .set_filter_expression(q.filter.clone())
                        .set_expression_attribute_names(q.ex.names())
                        .set_expression_attribute_values(q.ex.values())
                        .scan_index_forward(q.forward)
                        .set_limit(page_limit)
                        .set_exclusive_start_key(start.clone())
                        .send();
                    async move { call.await.map_err(|e| classify(what, e)) }
                })
                .await
                .map_err(|f| f.into_error(what))?;
            out.extend(page.items.unwrap_or_default());
            if let Some(l) = q.limit {
                if out.len() >= l {
                    out.truncate(l);
                    return Ok(out);
                }
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// Strongly consistent reads of many items, in any order; missing ones
    /// are left out.
    pub(crate) async fn batch_get(&self, what: &str, keys: Vec<Item>) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(100) {
            let mut pending: Vec<Item> = chunk.to_vec();
            let mut attempt = 0;
            while !pending.is_empty() {
                let ka = KeysAndAttributes::builder()
                    .set_keys(Some(pending.clone()))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| Error::backend(what, e))?;
                let req = HashMap::from([(self.table.clone(), ka)]);
                let res = self
                    .run(|| {
                        let call = self
                            .client
                            .batch_get_item()
                            .set_request_items(Some(req.clone()))
                            .send();
                        async move { call.await.map_err(|e| classify(what, e)) }
                    })
                    .await
                    .map_err(|f| f.into_error(what))?;
                if let Some(mut r) = res.responses {
                    out.extend(r.remove(&self.table).unwrap_or_default());
                }
                // Unprocessed keys mean the table is throttling us: back off, bounded.
                pending = res
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if !pending.is_empty() {
                    if attempt >= self.cfg.conflict_retries {
                        return Err(Error::Unavailable {
                            message: format!("{what}: DynamoDB kept throttling the read"),
                            source: None,
                        });
                    }
                    self.pause(attempt).await;
                    attempt += 1;
                }
            }
        }
        Ok(out)
    }
}

/// DynamoDB's cap on actions per transaction.
pub(crate) const MAX_TX_ITEMS: usize = 100;

/// A query of the table or of its index.
#[derive(Clone, Debug, Default)]
pub(crate) struct Query {
    /// The index to query; `None` for the table.
    pub(crate) index: Option<&'static str>,
    /// The key condition.
    pub(crate) key_cond: String,
    /// A filter applied after reading (it saves transfer, not read capacity).
    pub(crate) filter: Option<String>,
    /// Names and values of both.
    pub(crate) ex: Ex,
    /// Ascending sort key order when true.
    pub(crate) forward: bool,
    /// Stop after this many items.
    pub(crate) limit: Option<usize>,
}

impl Query {
    /// Every item of the partition `pk` whose sort key starts with `prefix`, in order.
    pub(crate) fn prefix(pk: impl Into<String>, prefix: impl Into<String>) -> Self {
        let mut ex = Ex::new();
        let key_cond = format!(
            "{} = {} AND begins_with({}, {})",
            ex.n(PK),
            ex.v(crate::item::s(pk)),
            ex.n(SK),
            ex.v(crate::item::s(prefix))
        );
        Query {
            key_cond,
            ex,
            forward: true,
            ..Query::default()
        }
    }
}

/// The actions of one transaction, built up in order. Each builder returns
/// the action's index, which is where its cancellation reason will be.
pub(crate) struct Tx {
    table: String,
    items: Vec<TransactWriteItem>,
}

impl Tx {
    /// An empty transaction on the store's table.
    pub(crate) fn new(store: &DynamoStore) -> Self {
        Tx {
            table: store.table.clone(),
            items: Vec::new(),
        }
    }

    fn push(&mut self, item: TransactWriteItem) -> usize {
        self.items.push(item);
        self.items.len() - 1
    }

    /// Number of actions so far.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Writes a whole item.
    pub(crate) fn put(&mut self, item: Item, cond: Option<String>, ex: Ex) -> Result<usize> {
        ex.check_used(&[cond.as_deref().unwrap_or_default()])?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .set_condition_expression(cond)
            .set_expression_attribute_names(ex.names())
            .set_expression_attribute_values(ex.values())
            .build()
            .map_err(|e| Error::backend("building a transaction", e))?;
        Ok(self.push(TransactWriteItem::builder().put(put).build()))
    }

    /// Updates an item.
    pub(crate) fn update(
        &mut self,
        key: Item,
        update: String,
        cond: Option<String>,
        ex: Ex,
    ) -> Result<usize> {
        ex.check_used(&[&update, cond.as_deref().unwrap_or_default()])?;
        let u = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(update)
            .set_condition_expression(cond)
            .set_expression_attribute_names(ex.names())
            .set_expression_attribute_values(ex.values())
            .build()
            .map_err(|e| Error::backend("building a transaction", e))?;
        Ok(self.push(TransactWriteItem::builder().update(u).build()))
    }

    /// Deletes an item.
    pub(crate) fn delete(&mut self, key: Item, cond: Option<String>, ex: Ex) -> Result<usize> {
        ex.check_used(&[cond.as_deref().unwrap_or_default()])?;
        let d = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .set_condition_expression(cond)
            .set_expression_attribute_names(ex.names())
            .set_expression_attribute_values(ex.values())
            .build()
            .map_err(|e| Error::backend("building a transaction", e))?;
        Ok(self.push(TransactWriteItem::builder().delete(d).build()))
    }

    /// Checks a condition on an item without changing it.
    pub(crate) fn check(&mut self, key: Item, cond: String, ex: Ex) -> Result<usize> {
        ex.check_used(&[&cond])?;
        let c = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .condition_expression(cond)
            .set_expression_attribute_names(ex.names())
            .set_expression_attribute_values(ex.values())
            .build()
            .map_err(|e| Error::backend("building a transaction", e))?;
        Ok(self.push(TransactWriteItem::builder().condition_check(c).build()))
    }
}

/// How a call failed, as far as the code calling it cares.
#[derive(Debug)]
pub(crate) enum Fail {
    /// A condition did not hold. For a transaction, which actions failed
    /// (empty when DynamoDB did not say); for a single-item call, `[true]`.
    Condition(Vec<bool>),
    /// Lost a conflict or was throttled: try again later. Carries the error
    /// to give if the retries run out.
    Retry(Error),
    /// Anything else, already mapped.
    Err(Error),
}

impl Fail {
    /// Whether action `i` failed its condition (true when unknown).
    pub(crate) fn failed(flags: &[bool], i: usize) -> bool {
        flags.is_empty() || flags.get(i).copied().unwrap_or(false)
    }

    /// The core error for a failure the caller has no special meaning for.
    pub(crate) fn into_error(self, what: &str) -> Error {
        match self {
            Fail::Condition(_) => Error::Conflict(format!("{what}: a condition did not hold")),
            Fail::Retry(e) | Fail::Err(e) => e,
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Err(e)
    }
}

/// Maps an SDK error to what it means to the store, keeping the source.
pub(crate) fn classify<E>(what: &str, e: SdkError<E>) -> Fail
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        // No answer at all: the endpoint is down, unreachable or too slow.
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            Fail::Err(Error::unavailable(
                format!("{what}: DynamoDB is unreachable"),
                e,
            ))
        }
        SdkError::ServiceError(se) => match se.err().code().unwrap_or_default() {
            "ConditionalCheckFailedException" => Fail::Condition(vec![true]),
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TransactionConflictException"
            | "TransactionInProgressException" => Fail::Retry(Error::unavailable(
                format!("{what}: DynamoDB is throttling or busy"),
                e,
            )),
            "InternalServerError" | "ServiceUnavailable" | "InternalFailure" => Fail::Err(
                Error::unavailable(format!("{what}: DynamoDB is unavailable"), e),
            ),
            "ResourceNotFoundException" => Fail::Err(Error::backend(
                format!("{what}: the table does not exist (create it first)"),
                e,
            )),
            _ => Fail::Err(Error::backend(what.to_owned(), e)),
        },
        _ => Fail::Err(Error::backend(what.to_owned(), e)),
    }
}

/// Like [`classify`], reading a cancelled transaction's per-action reasons.
pub(crate) fn classify_tx(what: &str, e: SdkError<TransactWriteItemsError>) -> Fail {
    let Some(TransactWriteItemsError::TransactionCanceledException(tc)) = e.as_service_error()
    else {
        return classify(what, e);
    };
    let codes: Vec<&str> = tc
        .cancellation_reasons()
        .iter()
        .map(|r| r.code().unwrap_or("None"))
        .collect();
    let busy = codes.iter().any(|c| {
        matches!(
            *c,
            "TransactionConflict"
                | "ThrottlingError"
                | "ProvisionedThroughputExceeded"
                | "RequestLimitExceeded"
        )
    });
    if busy {
        return Fail::Retry(Error::Conflict(format!(
            "{what}: concurrent transactions on the same items, try again"
        )));
    }
    if codes.is_empty() || codes.contains(&"ConditionalCheckFailed") {
        return Fail::Condition(
            codes
                .iter()
                .map(|c| *c == "ConditionalCheckFailed")
                .collect(),
        );
    }
    Fail::Err(Error::backend(what.to_owned(), e))
}
