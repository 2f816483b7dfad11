//! The store conformance suite: what every [`Store`] must do, as async
//! functions over `Arc<dyn Store>`, one module per area of the store
//! ([`users`], [`network`], [`ledger`], [`signin`], [`catalogue`],
//! [`stats`]) and one for the rules that cut across them ([`rules`]), and
//! [`store_conformance_tests!`](crate::store_conformance_tests) to stamp them
//! all into `#[tokio::test]`s.
//!
//! ```ignore
//! // tests/conformance.rs of a store crate (needs tokio with `macros` and
//! // `rt-multi-thread` among its dev-dependencies):
//! async fn fresh() -> std::sync::Arc<dyn cxmpute_core::Store> {
//!     std::sync::Arc::new(cxmpute_core::MemoryStore::new())
//! }
//! cxmpute_core::store_conformance_tests!(fresh);
//! ```
//!
//! The factory is called once per test and must hand out an empty store. It
//! may instead return `(Arc<dyn Store>, guard)`: the guard (a temporary
//! directory, a server handle) lives until the test ends. See [`TestStore`].
//!
//! Every case uses fixed [`Timestamp`](crate::types::Timestamp)s and
//! amounts: nothing sleeps or reads the wall clock, so a failure is the
//! store's, never the machine's.
//!
//! The cases take the whole store, not the area's trait alone: checking one
//! area needs another's data (a reservation needs a user and a key; a
//! settlement's reward lands on a provider).

use std::any::Any;
use std::sync::Arc;

use crate::store::Store;

/// Asserts that a result is the error variant given, printing what it was otherwise.
macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!(
                "expected Err({}), got {:?} at {}:{}",
                stringify!($pat),
                other,
                file!(),
                line!()
            ),
        }
    };
}

pub mod fixtures;

pub mod catalogue;
pub mod ledger;
pub mod network;
pub mod rules;
pub mod signin;
pub mod stats;
pub mod users;

/// What a conformance factory may return: a store, or a store with a guard
/// that must outlive it (a temporary directory holding its files).
pub trait TestStore {
    /// The store, and whatever must stay alive while it is used.
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>);
}

impl TestStore for Arc<dyn Store> {
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>) {
        (self, Box::new(()))
    }
}

impl<G: Any> TestStore for (Arc<dyn Store>, G) {
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>) {
        (self.0, Box::new(self.1))
    }
}

/// Stamps every conformance case, area by area, into a `#[tokio::test]`
/// (multi-threaded, 4 workers) that calls `$factory().await` for a fresh
/// store. Each test is named after its case, whatever its area.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::__store_conformance_cases!(
            $factory;
            rules: [missing_things_are_not_found],
            users: [
                create_user_is_create_if_absent,
                users_round_trip_and_resolve_by_email,
                search_users_is_case_insensitive_sorted_and_limited,
                set_user_suspended_round_trips,
                create_api_key_is_create_if_absent,
                api_key_hash_resolves_to_its_user,
                update_api_key_moves_limit_and_changes_fields,
                revoke_api_key_is_permanent,
                rate_limits_round_trip_and_change,
                budgets_round_trip_and_change,
                user_settings_round_trip_and_change,
                alert_marks_swap_only_from_the_state_named,
                concurrent_alert_mark_has_one_winner,
                cache_settings_round_trip_and_change,
                rate_usage_counts_per_window,
                concurrent_rate_usage_is_atomic,
            ],
            network: [
                create_provider_is_create_if_absent,
                rotate_provider_key_retires_old_hash_at_once,
                set_provider_suspended_round_trips,
                provisions_and_pool_entries_appear_together,
                update_provision_replaces_state_endpoint_and_entries,
                delete_provision_removes_its_entries,
                heartbeat_never_moves_backwards,
                expire_provisions_ends_silent_nodes,
            ],
            ledger: [
                grant_credits_adds_and_records,
                negative_grant_below_zero_fails_and_changes_nothing,
                reserve_holds_balance_and_key_limit,
                reserve_insufficient_credits_changes_nothing,
                reserve_key_limit_changes_nothing,
                reserve_rejects_unknown_revoked_and_foreign_keys,
                reserve_rejects_suspended_users_and_unpermitted_routes,
                reserve_same_request_twice_is_already_exists,
                settle_charges_reserved_min_and_releases_rest,
                usage_keeps_the_requested_model,
                settle_clamps_charge_and_reward,
                settle_records_usage_under_the_reservations_user_and_key,
                cache_hits_are_recorded_as_such,
                failed_request_costs_nothing,
                settle_twice_has_effect_once,
                settle_unknown_request_is_not_found,
                settle_refund_never_lifts_key_above_its_limit,
                release_stale_reservations_releases_only_old_ones,
                ledger_totals_add_up,
                usage_records_newest_first_per_user,
                concurrent_reservations_never_overdraw,
                concurrent_reservations_respect_key_limit,
                concurrent_settles_lose_no_update,
                concurrent_duplicate_settles_apply_once,
                settle_held_charges_rewards_and_records_once,
                settle_held_clamps_charge_and_reward,
                settle_held_never_takes_a_key_below_zero,
                settle_held_of_a_reserved_request_is_refused,
                settle_held_leaves_nothing_to_release,
                settle_held_batch_sums_each_account_and_provider_exactly,
                settle_held_batch_with_a_refused_call_changes_nothing,
                settle_held_large_batch_lands_whole,
                concurrent_held_settles_lose_no_update,
                concurrent_duplicate_held_settles_apply_once,
                settle_leased_charges_the_lease_once,
                settle_leased_rest_returns_on_release_and_sweep,
                settle_leased_of_a_reserved_request_is_refused,
                lease_release_is_no_request,
            ],
            signin: [
                login_code_is_single_use,
                login_code_expires,
                login_code_attempts_are_limited,
                login_code_reissue_replaces_and_resets_attempts,
                login_codes_are_rate_limited_per_window,
                old_login_codes_are_pruned,
                refresh_token_rotates,
                refresh_token_reuse_revokes_family,
                refresh_token_expiry_and_revocation,
                expired_refresh_tokens_are_pruned,
            ],
            catalogue: [
                catalogue_put_replace_list_delete,
                aliases_put_replace_list_delete,
                put_price_replaces_same_service_and_model,
                notifications_put_replace_delete,
            ],
            stats: [
                record_stats_is_idempotent_per_batch,
                stats_over_day_range,
                stats_by_prefix_sums_scopes,
            ],
        );
    };
}

/// Implementation detail of [`store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    ($factory:expr; $($area:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, guard) =
                    $crate::conformance::TestStore::into_parts(($factory)().await);
                $crate::conformance::$area::$case(store).await;
                drop(guard);
            }
        )*)*
    };
}
