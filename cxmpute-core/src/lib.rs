//! # cxmpute-core
//!
//! The domain, the traits and the whole broker of the Cxmpute compute
//! marketplace, implemented once. Backends plug in through [`Store`];
//! mail, routing and payouts through [`Mailer`], [`ProvisionSelector`] and
//! [`RewardPolicy`]; time through [`Clock`].
//!
//! Money is [`Credits`]: integer micro-credits.

pub mod clock;
pub mod error;
pub mod memory;
pub mod secret;
pub mod store;
pub mod store_support;
pub mod types;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use memory::MemoryStore;
pub use secret::{KeyHash, Secret};
pub use store::Store;
pub use types::*;
