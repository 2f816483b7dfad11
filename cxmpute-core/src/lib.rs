//! # cxmpute-core
//!
//! The domain, the traits and the whole broker of the Cxmpute compute
//! marketplace, implemented once. Backends plug in through [`Store`];
//! mail, routing and payouts through [`Mailer`], [`ProvisionSelector`] and
//! [`RewardPolicy`]; time through [`Clock`].
//!
//! Money is [`Credits`]: integer micro-credits.
//!
//! A [`Broker`] serves the gateway ([`Broker::handle`]) and reaches every
//! other operation through a handle for its area: [`Broker::sessions`]
//! (sign-in, sessions, who is calling), [`Broker::accounts`] (a user's and a
//! provider's own account), [`Broker::admin`] (administration),
//! [`Broker::network`] (the node lifecycle) and [`Broker::analytics`]
//! (statistics). [`router`] serves them all over HTTP.

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

pub mod accounts;
pub mod admin;
mod admission;
mod alerts;
pub mod analytics;
pub mod broker;
mod budget;
pub mod cache;
mod catalogue;
pub mod config;
pub mod egress;
pub mod error;
#[cfg(any(test, feature = "conformance"))]
mod fixtures;
mod forward;
mod gateway;
pub mod health;
pub mod http;
mod keycache;
pub mod mail;
pub mod memory;
pub mod metrics;
pub mod network;
pub(crate) mod pool;
pub mod pricing;
mod ratelimit;
pub mod reward;
pub mod select;
pub mod services;
pub mod sessions;
pub mod sse;
pub mod stats;
pub mod store;
pub mod store_support;
pub mod verify;

// The API's types live in `cxmpute-api`, shared with the client; they are
// reached here at the paths they always had.
pub use cxmpute_api::{clock, secret, types, wire};

#[cfg(feature = "testkit")]
pub mod testkit;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use accounts::Accounts;
pub use admin::Admin;
pub use broker::{Broker, BrokerBuilder, BrokerConfig, GatewayRequest, GatewayResponse};
pub use broker::{ListedPools, RoutePreferences};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use http::router;
pub use mail::{AlertMail, ConsoleMailer, Mailer, MailerConfig};
pub use memory::MemoryStore;
pub use network::Network;
pub use reward::{FlatReward, PlatformShare, RewardPolicy, TieredReward, VerifiedReward};
pub use secret::{KeyHash, Secret};
pub use select::{LeastInFlightSelector, PeakEwmaSelector, RoundRobinSelector};
pub use select::{ProvisionSelector, RandomSelector, VerifiedFirst};
pub use sessions::{AuthConfig, Sessions};
pub use store::{
    CatalogueStore, LedgerStore, NetworkStore, SignInStore, StatsStore, Store, UserStore,
};
pub use types::*;
