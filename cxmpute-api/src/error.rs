//! The one error of this crate: a value that does not parse or is out of range.

/// A value that does not parse (an id, a date, a service name, a key hash)
/// or breaks a rule of its type (a date range too long).
///
/// The host turns it into its own `invalid input` error (HTTP 400) with the
/// same text, so both sides of the wire word a refusal alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is malformed or out of range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}
