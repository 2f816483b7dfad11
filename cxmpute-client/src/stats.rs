//! Usage analytics and metrics: the network's public picture, a user's and a
//! provider's own figures, the operators' totals, and Prometheus metrics.
//!
//! Every stats call takes an inclusive range of UTC days (at most 366);
//! `None` asks for the host's default, the last 30 days.

use cxmpute_api::analytics::{AdminStats, DateRange, NetworkStats, ProviderStats, UserStats};
use http::Method;
use serde::de::DeserializeOwned;

use crate::client::Req;
use crate::error::Result;
use crate::Client;

/// The stats API of a [`Client`]; see [`Client::stats`].
#[derive(Clone, Copy, Debug)]
pub struct StatsApi<'c> {
    pub(crate) client: &'c Client,
}

impl StatsApi<'_> {
    /// `GET /v1/stats/network`: traffic and nodes over the range, without
    /// money or accounts. Needs no credential.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let net = client.stats().network(None).await?;
    /// println!("{} requests, {} nodes now", net.totals.requests, net.nodes_now);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn network(&self, range: Option<DateRange>) -> Result<NetworkStats> {
        self.get("network", range).await
    }

    /// `GET /v1/stats/me`: the caller's own usage and charges (an API key or
    /// a session).
    ///
    /// ```no_run
    /// use cxmpute_client::analytics::DateRange;
    /// use cxmpute_client::types::Day;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let january = DateRange {
    ///     from: Day::from_ymd(2026, 1, 1).unwrap(),
    ///     to: Day::from_ymd(2026, 1, 31).unwrap(),
    /// };
    /// let mine = client.stats().me(Some(january)).await?;
    /// println!("{} requests, {:?} charged", mine.totals.requests, mine.totals.charged);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn me(&self, range: Option<DateRange>) -> Result<UserStats> {
        self.get("me", range).await
    }

    /// `GET /v1/stats/provider`: the caller's earnings and nodes (a provider
    /// key or the owner's session).
    ///
    /// ```no_run
    /// # async fn run(provider: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let p = provider.stats().provider(None).await?;
    /// for n in p.nodes {
    ///     println!("{}: {} requests, routable {}", n.provision_id, n.stats.requests, n.routable);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn provider(&self, range: Option<DateRange>) -> Result<ProviderStats> {
        self.get("provider", range).await
    }

    /// `GET /v1/stats/admin`: everything over the range, money and the
    /// ledger included (an admin).
    ///
    /// ```no_run
    /// # async fn run(admin: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let all = admin.stats().admin(None).await?;
    /// println!("platform kept {}", all.ledger.platform);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn admin(&self, range: Option<DateRange>) -> Result<AdminStats> {
        self.get("admin", range).await
    }

    /// `GET /metrics`: this host's Prometheus metrics, as text. Needs no
    /// credential.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let text = client.stats().metrics().await?;
    /// for line in text.lines().filter(|l| !l.starts_with('#')) {
    ///     println!("{line}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn metrics(&self) -> Result<String> {
        self.client.req(Method::GET, &["metrics"]).send_text().await
    }

    async fn get<T: DeserializeOwned>(&self, who: &str, range: Option<DateRange>) -> Result<T> {
        with_range(self.client.req(Method::GET, &["v1", "stats", who]), range)
            .send_json()
            .await
    }
}

/// `?from=YYYY-MM-DD&to=YYYY-MM-DD`, when a range is given.
fn with_range(req: Req<'_>, range: Option<DateRange>) -> Req<'_> {
    match range {
        Some(r) => req.query("from", r.from).query("to", r.to),
        None => req,
    }
}
