//! Running statements on one connection: what every area's statements
//! share.
//!
//! Writes run on the writer's connection inside a savepoint of the batch's
//! transaction (see [`crate::writer`]): they read what they need, decide with
//! the core's shared rules, and return `Err` to have their changes undone.
//! Reads run on a read connection.

use cxmpute_core::store_support::found;
use cxmpute_core::*;
use sqlx::sqlite::SqliteRow;
use sqlx::SqliteConnection;

use crate::error::map;
use crate::rows::{self, col};

/// The connection a statement runs on.
pub(crate) type Conn = SqliteConnection;

/// A statement with its binds.
pub(crate) type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Runs a query for at most one row.
pub(crate) async fn fetch_optional<'q>(
    conn: &mut Conn,
    what: &str,
    q: Query<'q>,
) -> Result<Option<SqliteRow>> {
    q.fetch_optional(conn).await.map_err(|e| map(what, e))
}

/// Runs a query for all its rows.
pub(crate) async fn fetch_all<'q>(
    conn: &mut Conn,
    what: &str,
    q: Query<'q>,
) -> Result<Vec<SqliteRow>> {
    q.fetch_all(conn).await.map_err(|e| map(what, e))
}

/// Runs a statement and returns how many rows it changed.
pub(crate) async fn execute<'q>(conn: &mut Conn, what: &str, q: Query<'q>) -> Result<u64> {
    q.execute(conn)
        .await
        .map(|r| r.rows_affected())
        .map_err(|e| map(what, e))
}

/// Runs a statement that changes one row by its key; none changed means
/// the row is not there: `NotFound(missing())`.
pub(crate) async fn execute_found<'q>(
    conn: &mut Conn,
    what: &str,
    q: Query<'q>,
    missing: impl FnOnce() -> String,
) -> Result<()> {
    let changed = execute(conn, what, q).await?;
    found((changed > 0).then_some(()), missing)
}

/// Whether `sql` (a `SELECT EXISTS(...)` with one bind) is true.
pub(crate) async fn exists(
    conn: &mut Conn,
    what: &str,
    sql: &'static str,
    bind: &str,
) -> Result<bool> {
    let row = sqlx::query(sql)
        .bind(bind)
        .fetch_one(conn)
        .await
        .map_err(|e| map(what, e))?;
    col(&row, 0)
}

/// Sets or clears the suspension of the `noun` ("user", "provider") whose
/// row in `table` has id `id`.
pub(crate) async fn set_suspended(
    c: &mut Conn,
    table: &str,
    noun: &str,
    id: &str,
    s: &Option<Suspension>,
) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(s);
    let sql = format!(
        "UPDATE {table} SET suspended_reason = ?2, suspended_by = ?3, suspended_at = ?4 \
         WHERE id = ?1"
    );
    let q = sqlx::query(&sql).bind(id).bind(reason).bind(by).bind(at);
    let what = format!("suspending a {noun}");
    execute_found(c, &what, q, || format!("{noun} {id}")).await
}
