//! [`LedgerStore`] for [`SqliteStore`]: credit grants, reservations and
//! settlements, usage records and the ledger's totals (tables
//! `credit_grants`, `reservations`, `usage`, `ledger`).
//!
//! Reserve, settle and settling a held call are money operations: the writer decides a run of
//! them at a time against one read of the rows they touch ([`crate::money`]).
//! Everything else is a statement like every other area's.

use async_trait::async_trait;
use cxmpute_core::store_support::{found, granted_balance, release_settlement};
use cxmpute_core::*;
use futures::future::join_all;

use crate::error::map;
use crate::money::{MoneyAnswer, MoneyOp};
use crate::rows::{self, col, limit, reservation_cols, usage_cols};
use crate::sql::*;
use crate::SqliteStore;

#[async_trait]
impl LedgerStore for SqliteStore {
    /// The file is written by one process's writer: its host owns it.
    fn owned_by_one_host(&self) -> bool {
        true
    }

    /// The writer applies what is queued together (see `crate::writer`).
    fn groups_settlements(&self) -> bool {
        true
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        let grant = grant.clone();
        self.writer
            .write(move |c| Box::pin(async move { grant_credits(c, &grant).await }))
            .await
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { credit_grants(c, user.as_str()).await }))
            .await
    }

    async fn reserve(&self, reservation: &Reservation) -> Result<()> {
        match self
            .writer
            .money(MoneyOp::Reserve(reservation.clone()))
            .await?
        {
            MoneyAnswer::Reserved => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome> {
        match self
            .writer
            .money(MoneyOp::Settle(settlement.clone()))
            .await?
        {
            MoneyAnswer::Settled(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    async fn settle_held(&self, calls: &[(Reservation, Settlement)]) -> Result<Vec<SettleOutcome>> {
        let op = MoneyOp::SettleHeld(calls.to_vec());
        match self.writer.money(op).await? {
            MoneyAnswer::Outcomes(outcomes) => Ok(outcomes),
            other => Err(unexpected(other)),
        }
    }

    async fn settle_leased(
        &self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>> {
        let op = MoneyOp::SettleLeased(lease.clone(), calls.to_vec());
        match self.writer.money(op).await? {
            MoneyAnswer::Outcomes(outcomes) => Ok(outcomes),
            other => Err(unexpected(other)),
        }
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        let request = request.clone();
        self.read(move |c| Box::pin(async move { settlement(c, request.as_str()).await }))
            .await
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        let stale = self
            .read(move |c| Box::pin(async move { stale_reservations(c, before).await }))
            .await?;
        // The same path as every settlement, so a release is one exactly
        // like them; queued together, they are applied as one run. One
        // settled in the meantime is not this release's.
        let answers = join_all(stale.iter().map(|r| {
            self.writer
                .money(MoneyOp::Settle(release_settlement(r, before)))
        }))
        .await;
        let mut n = 0;
        for answer in answers {
            match answer {
                Ok(MoneyAnswer::Settled(SettleOutcome::Applied)) => n += 1,
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.read(move |c| Box::pin(async move { ledger_totals(c).await }))
            .await
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { usage_records(c, user.as_str(), limit).await }))
            .await
    }
}

/// An answer of the wrong kind: a bug in this crate, reported, not panicked on.
fn unexpected(answer: MoneyAnswer) -> Error {
    Error::Backend {
        message: format!("the writer answered {answer:?} to the wrong operation"),
        source: None,
    }
}

// ---- grants -----------------------------------------------------------------

async fn grant_credits(c: &mut Conn, g: &CreditGrant) -> Result<Credits> {
    let row = fetch_optional(
        c,
        "reading a balance",
        sqlx::query("SELECT credits FROM users WHERE id = ?1").bind(g.user_id.as_str()),
    )
    .await?;
    let row = found(row, || format!("user {}", g.user_id))?;
    let next = granted_balance(Credits(col(&row, 0)?), g.amount)?;
    let q = sqlx::query(
        "UPDATE users SET credits = ? WHERE id = ?; \
         INSERT INTO credit_grants (user_id, amount, by_whom, reason, at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(next.0)
    .bind(g.user_id.as_str())
    .bind(g.user_id.as_str())
    .bind(g.amount.0)
    .bind(&g.by)
    .bind(&g.reason)
    .bind(g.at.0);
    execute(c, "granting credits", q).await?;
    Ok(next)
}

async fn credit_grants(c: &mut Conn, user: &str) -> Result<Vec<CreditGrant>> {
    let found = fetch_all(
        c,
        "reading credit grants",
        sqlx::query(
            "SELECT user_id, amount, by_whom, reason, at FROM credit_grants \
             WHERE user_id = ?1 ORDER BY seq",
        )
        .bind(user),
    )
    .await?;
    found
        .iter()
        .map(|r| {
            Ok(CreditGrant {
                user_id: UserId::new(col::<String>(r, 0)?),
                amount: Credits(col(r, 1)?),
                by: col(r, 2)?,
                reason: col(r, 3)?,
                at: Timestamp(col(r, 4)?),
            })
        })
        .collect()
}

// ---- settlements and totals -------------------------------------------------

async fn settlement(c: &mut Conn, request: &str) -> Result<UsageRecord> {
    let sql = concat!(
        "SELECT ",
        usage_cols!(),
        " FROM usage WHERE request_id = ?1"
    );
    let row = fetch_optional(c, "reading a settlement", sqlx::query(sql).bind(request)).await?;
    rows::usage(&found(row, || format!("settlement {request}"))?)
}

async fn stale_reservations(c: &mut Conn, before: Timestamp) -> Result<Vec<Reservation>> {
    let sql = concat!(
        "SELECT ",
        reservation_cols!(),
        " FROM reservations r WHERE r.created_at < ?1 ORDER BY r.created_at"
    );
    let stale = fetch_all(
        c,
        "reading stale reservations",
        sqlx::query(sql).bind(before.0),
    )
    .await?;
    stale.iter().map(|row| rows::reservation(row, 0)).collect()
}

async fn ledger_totals(c: &mut Conn) -> Result<LedgerTotals> {
    let row =
        sqlx::query("SELECT settlements, charged, rewarded, reserved FROM ledger WHERE id = 1")
            .fetch_one(c)
            .await
            .map_err(|e| map("reading the ledger", e))?;
    Ok(LedgerTotals {
        settlements: rows::to_u64(col(&row, 0)?),
        charged: Credits(col(&row, 1)?),
        rewarded: Credits(col(&row, 2)?),
        reserved: Credits(col(&row, 3)?),
    })
}

async fn usage_records(c: &mut Conn, user: &str, n: usize) -> Result<Vec<UsageRecord>> {
    let sql = concat!(
        "SELECT ",
        usage_cols!(),
        " FROM usage WHERE user_id = ?1 ORDER BY at DESC, request_id DESC LIMIT ?2"
    );
    let q = sqlx::query(sql).bind(user).bind(limit(n));
    let found = fetch_all(c, "reading usage", q).await?;
    found.iter().map(rows::usage).collect()
}
