//! Conformance cases of the rules every area keeps (see the
//! [store module docs](crate::store)).

use std::sync::Arc;

use crate::error::Error;
use crate::secret::KeyHash;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

/// Every lookup or change of something that does not exist is `NotFound`.
pub async fn missing_things_are_not_found(store: Arc<dyn Store>) {
    let ghost_user = new_user("ghost@example.com", Credits::whole(1));
    let ghost_provider = new_provider(None);
    let ghost_node = new_provision(&ghost_provider, T0);

    assert_err!(store.user(&ghost_user.id).await, Error::NotFound(_));
    assert_err!(
        store.user_by_email("ghost@example.com").await,
        Error::NotFound(_)
    );
    assert_err!(
        store.set_user_suspended(&ghost_user.id, None).await,
        Error::NotFound(_)
    );
    let grant = CreditGrant {
        user_id: ghost_user.id.clone(),
        amount: Credits::whole(1),
        by: "admin".into(),
        reason: "test".into(),
        at: T0,
    };
    assert_err!(store.grant_credits(&grant).await, Error::NotFound(_));

    let key = new_key(&ghost_user, None, T0);
    assert_err!(store.create_api_key(&key).await, Error::NotFound(_));
    assert_err!(store.api_key_by_hash(&key.hash).await, Error::NotFound(_));
    assert_err!(
        store
            .update_api_key(&key.id, &ApiKeyUpdate::default())
            .await,
        Error::NotFound(_)
    );
    assert_err!(store.revoke_api_key(&key.id, T0).await, Error::NotFound(_));

    assert_err!(store.provider(&ghost_provider.id).await, Error::NotFound(_));
    assert_err!(
        store.provider_by_key_hash(&ghost_provider.key_hash).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.provider_by_user(&ghost_user.id).await,
        Error::NotFound(_)
    );
    assert_err!(
        store
            .rotate_provider_key(&ghost_provider.id, &KeyHash::of("fresh"))
            .await,
        Error::NotFound(_)
    );
    assert_err!(
        store.set_provider_suspended(&ghost_provider.id, None).await,
        Error::NotFound(_)
    );

    assert_err!(
        store
            .create_provision(&ghost_node, &[entry(&ghost_node, Service::Chat, "m")])
            .await,
        Error::NotFound(_)
    );
    assert!(store.pool_entries().await.unwrap().is_empty());
    assert_err!(store.provision(&ghost_node.id).await, Error::NotFound(_));
    assert_err!(
        store
            .update_provision(&ghost_node.id, ProvisionState::Ready, None, &[])
            .await,
        Error::NotFound(_)
    );
    assert_err!(
        store.heartbeat(&ghost_node.id, T0).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.delete_provision(&ghost_node.id).await,
        Error::NotFound(_)
    );

    assert_err!(
        store.settlement(&RequestId::generate()).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.refresh_token_family(&KeyHash::of("nope")).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.delete_notification(&NotificationId::generate()).await,
        Error::NotFound(_)
    );
}
