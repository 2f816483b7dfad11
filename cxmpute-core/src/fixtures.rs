//! An account and an API key as tests build them: the conformance suite's
//! cases, the crate's own unit tests and the stores' own tests (through
//! `conformance::fixtures`) share these (one place to change when a field
//! is added).

use crate::secret::Secret;
use crate::types::*;

/// 2026-01-01T00:00:00Z: every conformance case's "now" is counted from here.
pub const T0: Timestamp = Timestamp(1_767_225_600_000);

/// An account with `credits`, created at [`T0`], nothing else set.
pub fn new_user(email: &str, credits: Credits) -> User {
    User {
        id: UserId::generate(),
        email: email.to_owned(),
        credits,
        is_admin: false,
        suspended: None,
        created_at: T0,
        budget: None,
        alerts: Default::default(),
        alerted: Default::default(),
    }
}

/// A key of `user` with an optional credit limit, nothing else set.
pub fn new_key(user: &User, limit: Option<Credits>, created_at: Timestamp) -> ApiKey {
    let secret = Secret::generate_api_key();
    ApiKey {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        hash: secret.hash(),
        name: "default".into(),
        prefix: secret.display_prefix(),
        credit_limit: limit,
        credits_left: limit,
        permitted_routes: Vec::new(),
        created_at,
        last_used_at: None,
        revoked_at: None,
        rate_limits: RateLimits::default(),
        budget: None,
        cache: Default::default(),
    }
}
