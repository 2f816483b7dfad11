//! Mapping SQLite's errors into the core [`Error`], keeping the source.

use std::sync::Arc;

use cxmpute_core::error::BoxError;
use cxmpute_core::Error;

/// SQLite's primary result codes that mean "someone else holds the lock":
/// `SQLITE_BUSY` (5) and `SQLITE_LOCKED` (6). The same call may succeed later.
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// Whether `e` is SQLite saying "busy" or "locked".
fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            // Extended codes carry the primary code in their low byte.
            .is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED)),
        _ => false,
    }
}

/// Whether the error says the database cannot be reached at all right now
/// (pool exhausted or closed, I/O), as opposed to a broken query or file.
fn is_unavailable(e: &sqlx::Error) -> bool {
    is_busy(e)
        || matches!(
            e,
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed
        )
}

/// Maps an error met while doing `what`: a unique violation is
/// `AlreadyExists`, busy/locked is the retryable `Unavailable`, anything else
/// `Backend`; the SQLite error stays the source.
pub(crate) fn map(what: impl Into<String>, e: sqlx::Error) -> Error {
    let what = what.into();
    if let sqlx::Error::Database(db) = &e {
        if db.is_unique_violation() {
            return Error::AlreadyExists(format!("{what} ({})", db.message()));
        }
    }
    if is_unavailable(&e) {
        Error::unavailable(what, e)
    } else {
        Error::backend(what, e)
    }
}

/// [`map`] for an error of the writer's direct use of its connection (see
/// `crate::writer`): the same three kinds, told apart by SQLite's codes.
pub(crate) fn map_direct(what: impl Into<String>, e: rusqlite::Error) -> Error {
    use rusqlite::ffi;
    let what = what.into();
    if let rusqlite::Error::SqliteFailure(f, message) = &e {
        if matches!(
            f.extended_code,
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        ) {
            let message = message.as_deref().unwrap_or("not unique");
            return Error::AlreadyExists(format!("{what} ({message})"));
        }
        if matches!(f.extended_code & 0xff, SQLITE_BUSY | SQLITE_LOCKED) {
            return Error::unavailable(what, e);
        }
    }
    Error::backend(what, e)
}

/// Maps a shared error (a failed commit every write of the batch learns of).
pub(crate) fn map_shared(what: &str, e: &Arc<sqlx::Error>) -> Error {
    let source: BoxError = Box::new(Arc::clone(e));
    if is_unavailable(e) {
        Error::Unavailable {
            message: what.to_owned(),
            source: Some(source),
        }
    } else {
        Error::Backend {
            message: what.to_owned(),
            source: Some(source),
        }
    }
}

/// A stored value that cannot be read back into the domain type.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Backend {
        message: format!("unreadable stored value: {what}"),
        source: None,
    }
}
