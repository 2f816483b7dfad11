//! Cxmpute facade.
pub use cxmpute_core as core;
