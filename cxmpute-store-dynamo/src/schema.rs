//! Where each kind of item lives: every primary key the store writes is
//! made here, so the layout documented in the crate docs is one file.

use cxmpute_core::{
    ApiKeyId, Day, KeyHash, NotificationId, ProviderId, ProvisionId, RequestId, Service,
    TokenFamilyId, UserId,
};

use crate::item::{key, sortable_i32, Item};

/// The one secondary index: sparse, keys only. Open reservations by age.
pub(crate) const GSI: &str = "gsi1";
/// Partition key of [`GSI`].
pub(crate) const GSI_PK: &str = "gsi1pk";
/// Sort key of [`GSI`].
pub(crate) const GSI_SK: &str = "gsi1sk";

/// The partition of a user: the account, its key list, grants and usage.
pub(crate) fn user_pk(id: &UserId) -> String {
    format!("USER#{id}")
}

pub(crate) fn user(id: &UserId) -> Item {
    key(user_pk(id), "USER")
}

/// The partition holding one item per email: makes emails unique and lets
/// an admin search them in one consistent query.
pub(crate) const USERS_PK: &str = "USERS";

pub(crate) fn email(email: &str) -> Item {
    key(USERS_PK, format!("EMAIL#{email}"))
}

/// An API key lives under its hash, so authenticating is one read.
pub(crate) fn api_key(hash: &KeyHash) -> Item {
    key(format!("APIKEY#{}", hash.to_hex()), "APIKEY")
}

/// Key id to owner and hash (never changes once written).
pub(crate) fn key_id(id: &ApiKeyId) -> Item {
    key(format!("KEYID#{id}"), "KEYID")
}

/// The rate counters of a scope (a key or an account): its current window.
pub(crate) fn rate(scope: &str) -> Item {
    key(format!("RATE#{scope}"), "RATE")
}

/// A key in its owner's list.
pub(crate) fn user_key(user: &UserId, id: &ApiKeyId) -> Item {
    key(user_pk(user), format!("KEY#{id}"))
}

pub(crate) fn provider_pk(id: &ProviderId) -> String {
    format!("PROVIDER#{id}")
}

pub(crate) fn provider(id: &ProviderId) -> Item {
    key(provider_pk(id), "PROVIDER")
}

/// Provider key hash to provider id; unique.
pub(crate) fn provider_hash(hash: &KeyHash) -> Item {
    key(format!("PKEYHASH#{}", hash.to_hex()), "PKEYHASH")
}

/// A user's provider account; unique per user.
pub(crate) fn user_provider(user: &UserId) -> Item {
    key(user_pk(user), "PROVIDER")
}

pub(crate) fn node(id: &ProvisionId) -> Item {
    key(format!("NODE#{id}"), "NODE")
}

/// The partition listing every node with its state.
pub(crate) const NODES_PK: &str = "NODES";

pub(crate) fn node_index(id: &ProvisionId) -> Item {
    key(NODES_PK, format!("NODE#{id}"))
}

/// A node in its provider's list.
pub(crate) fn provider_node(provider: &ProviderId, id: &ProvisionId) -> Item {
    key(provider_pk(provider), format!("NODE#{id}"))
}

/// The partition of every routable pool entry.
pub(crate) const POOL_PK: &str = "POOL";

pub(crate) fn pool_entry_sk(node: &ProvisionId, service: Service, model: &str) -> String {
    format!("ENTRY#{node}#{service}#{model}")
}

/// One gateway request: its reservation while open, a settled marker after.
pub(crate) fn request(id: &RequestId) -> Item {
    key(format!("REQ#{id}"), "REQ")
}

/// The index partition of the open reservations of one ledger shard.
pub(crate) fn open_pk(shard: u32) -> String {
    format!("OPEN#{shard}")
}

pub(crate) fn ledger(shard: u32) -> Item {
    key(format!("LEDGER#{shard}"), "LEDGER")
}

/// The ledger shard of a request: stable across processes (FNV-1a), so the
/// shard a reservation added to is the one its settlement takes from.
pub(crate) fn shard_of(id: &RequestId, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

pub(crate) const PRICES_PK: &str = "PRICES";

pub(crate) const CATALOGUE_PK: &str = "CATALOGUE";

pub(crate) fn catalogue_model(service: Service, model: &str) -> Item {
    key(CATALOGUE_PK, format!("MODEL#{service}#{model}"))
}

/// An alias lives in the catalogue's partition: read whole with it.
pub(crate) fn model_alias(alias: &str) -> Item {
    key(CATALOGUE_PK, format!("ALIAS#{alias}"))
}

pub(crate) fn price(service: Service, model: Option<&str>) -> Item {
    // `-` and `=` keep "no model" apart from a model named "".
    let sk = match model {
        None => format!("PRICE#{service}#-"),
        Some(m) => format!("PRICE#{service}#={m}"),
    };
    key(PRICES_PK, sk)
}

pub(crate) fn login_code(email: &str) -> Item {
    key(format!("LOGIN#{email}"), "CODE")
}

pub(crate) fn login_issued(email: &str) -> Item {
    key(format!("LOGIN#{email}"), "ISSUED")
}

/// The index partition of every email's sign-in issues, by latest issue,
/// for the sweep that deletes old ones. Written once per code issued, which
/// the broker's rate limits keep far below a partition's write capacity.
pub(crate) const LOGINS_PK: &str = "LOGINS";

pub(crate) fn refresh_token(hash: &KeyHash) -> Item {
    key(format!("RTOKEN#{}", hash.to_hex()), "RTOKEN")
}

/// Partitions of the index of refresh tokens by expiry.
pub(crate) const TOKEN_SHARDS: u8 = 8;

pub(crate) fn tokens_shard_pk(shard: u8) -> String {
    format!("RTOKENS#{shard}")
}

/// The index partition of a refresh token.
pub(crate) fn tokens_pk(hash: &KeyHash) -> String {
    tokens_shard_pk(hash.0[0] % TOKEN_SHARDS)
}

pub(crate) fn token_family(id: &TokenFamilyId) -> Item {
    key(format!("FAMILY#{id}"), "FAMILY")
}

pub(crate) const NOTIFS_PK: &str = "NOTIFS";

pub(crate) fn notification(id: &NotificationId) -> Item {
    key(NOTIFS_PK, format!("NTF#{id}"))
}

pub(crate) fn stats_pk(scope: &str) -> String {
    format!("STATS#{scope}")
}

pub(crate) fn day_sk(day: Day) -> String {
    format!("DAY#{}", sortable_i32(day.0))
}

/// Counters of one scope on one day, in the scope's partition (range reads by day).
pub(crate) fn stats(scope: &str, day: Day) -> Item {
    key(stats_pk(scope), day_sk(day))
}

pub(crate) fn stats_day_pk(day: Day) -> String {
    format!("STATSDAY#{}", sortable_i32(day.0))
}

/// The same counters in the day's partition (prefix reads by scope).
pub(crate) fn stats_by_day(day: Day, scope: &str) -> Item {
    key(stats_day_pk(day), format!("SCOPE#{scope}"))
}

/// The partition listing the days that have any stats.
pub(crate) const STATS_DAYS_PK: &str = "STATSDAYS";

pub(crate) fn stats_day(day: Day) -> Item {
    key(STATS_DAYS_PK, day_sk(day))
}

/// The marker that one chunk of a stats batch was applied.
pub(crate) fn stats_batch(id: &str, chunk: usize) -> Item {
    key(format!("STATSBATCH#{id}"), format!("CHUNK#{chunk}"))
}
