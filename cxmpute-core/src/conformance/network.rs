//! Conformance cases of [`NetworkStore`](crate::store::NetworkStore):
//! providers, their nodes and pool entries.

use std::sync::Arc;

use crate::error::Error;
use crate::secret::Secret;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

// ---- providers --------------------------------------------------------------

/// A second provider with the same id, key hash or user is `AlreadyExists`;
/// providers resolve by id, key hash and user.
pub async fn create_provider_is_create_if_absent(store: Arc<dyn Store>) {
    let (user, _) = funded(&store, Credits::ZERO, None).await;
    let p = new_provider(Some(&user));
    store.create_provider(&p).await.unwrap();

    let mut same_id = new_provider(None);
    same_id.id = p.id.clone();
    assert_err!(
        store.create_provider(&same_id).await,
        Error::AlreadyExists(_)
    );
    let mut same_hash = new_provider(None);
    same_hash.key_hash = p.key_hash;
    assert_err!(
        store.create_provider(&same_hash).await,
        Error::AlreadyExists(_)
    );
    assert_err!(store.provider(&same_hash.id).await, Error::NotFound(_));
    let same_user = new_provider(Some(&user));
    assert_err!(
        store.create_provider(&same_user).await,
        Error::AlreadyExists(_)
    );

    assert_eq!(store.provider(&p.id).await.unwrap(), p);
    assert_eq!(store.provider_by_key_hash(&p.key_hash).await.unwrap(), p);
    assert_eq!(store.provider_by_user(&user.id).await.unwrap(), p);
    // Providers without a user account do not collide with each other.
    store.create_provider(&new_provider(None)).await.unwrap();
    store.create_provider(&new_provider(None)).await.unwrap();
}

/// After a rotation the old hash is `NotFound` at once; a hash in use is refused.
pub async fn rotate_provider_key_retires_old_hash_at_once(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let other = stored_provider(&store).await;
    let fresh = Secret::generate_provider_key().hash();
    store.rotate_provider_key(&p.id, &fresh).await.unwrap();

    assert_err!(
        store.provider_by_key_hash(&p.key_hash).await,
        Error::NotFound(_)
    );
    let got = store.provider_by_key_hash(&fresh).await.unwrap();
    assert_eq!(got.id, p.id);
    assert_eq!(got.key_hash, fresh);

    assert_err!(
        store.rotate_provider_key(&p.id, &other.key_hash).await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.provider(&p.id).await.unwrap().key_hash, fresh);
    assert_eq!(
        store
            .provider_by_key_hash(&other.key_hash)
            .await
            .unwrap()
            .id,
        other.id
    );
}

/// Suspending and unsuspending a provider is stored as given.
pub async fn set_provider_suspended_round_trips(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let s = Suspension {
        reason: "bad answers".into(),
        by: "system".into(),
        at: at(3),
    };
    store
        .set_provider_suspended(&p.id, Some(s.clone()))
        .await
        .unwrap();
    assert_eq!(store.provider(&p.id).await.unwrap().suspended, Some(s));
    store.set_provider_suspended(&p.id, None).await.unwrap();
    assert_eq!(store.provider(&p.id).await.unwrap(), p);
}

// ---- provisions and pools ---------------------------------------------------

fn sorted_entries(mut v: Vec<PoolEntry>) -> Vec<PoolEntry> {
    v.sort_by(|a, b| {
        (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
    });
    v
}

/// A provision and its pool entries are stored together and listed by
/// provider (oldest first) and in the live listing.
pub async fn provisions_and_pool_entries_appear_together(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let q = stored_provider(&store).await;
    let n1 = new_provision(&p, at(20));
    let mut n2 = new_provision(&p, at(10));
    n2.endpoint = Some("http://n2.nodes.test".into());
    n2.state = ProvisionState::Ready;
    let n3 = new_provision(&q, at(15));
    let e2 = vec![
        entry(&n2, Service::Chat, "llama3.2:3b"),
        entry(&n2, Service::Embeddings, "nomic-embed-text"),
    ];
    let e3 = vec![entry(&n3, Service::Chat, "llama3.2:3b")];
    store.create_provision(&n1, &[]).await.unwrap();
    store.create_provision(&n2, &e2).await.unwrap();
    store.create_provision(&n3, &e3).await.unwrap();

    assert_err!(
        store
            .create_provision(&n1, &[entry(&n1, Service::Tts, "kokoro")])
            .await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.provision(&n2.id).await.unwrap(), n2);
    assert_eq!(
        store.provisions_by_provider(&p.id).await.unwrap(),
        vec![n2.clone(), n1.clone()]
    );
    assert_eq!(
        store.provisions_by_provider(&q.id).await.unwrap(),
        vec![n3.clone()]
    );
    assert_eq!(
        store.provisions().await.unwrap(),
        vec![n2.clone(), n3.clone(), n1.clone()]
    );
    let mut all = e2.clone();
    all.extend(e3.clone());
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(all)
    );
}

/// `update_provision` replaces state, endpoint and entries in one step; an
/// ended node takes no entries and leaves the live listing.
pub async fn update_provision_replaces_state_endpoint_and_entries(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(1));
    let other = new_provision(&p, at(2));
    let other_entries = vec![entry(&other, Service::Chat, "qwen")];
    store
        .create_provision(&n, &[entry(&n, Service::Tts, "kokoro")])
        .await
        .unwrap();
    store
        .create_provision(&other, &other_entries)
        .await
        .unwrap();

    let ready = vec![
        entry(&n, Service::Chat, "llama3.2:3b"),
        entry(&n, Service::Vision, "moondream"),
    ];
    let endpoint = Some("http://n.nodes.test:8080".to_owned());
    store
        .update_provision(&n.id, ProvisionState::Ready, endpoint.clone(), &ready)
        .await
        .unwrap();
    let got = store.provision(&n.id).await.unwrap();
    assert_eq!(got.state, ProvisionState::Ready);
    assert_eq!(got.endpoint, endpoint);
    let mut want = ready.clone();
    want.extend(other_entries.clone());
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(want.clone())
    );

    assert_err!(
        store
            .update_provision(&n.id, ProvisionState::Ended, None, &ready)
            .await,
        Error::InvalidInput(_)
    );
    assert_eq!(store.provision(&n.id).await.unwrap(), got, "unchanged");
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(want)
    );

    store
        .update_provision(&n.id, ProvisionState::Ended, None, &[])
        .await
        .unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().state,
        ProvisionState::Ended
    );
    assert_eq!(store.pool_entries().await.unwrap(), other_entries);
    assert_eq!(store.provisions().await.unwrap(), vec![other]);
    assert_eq!(store.provisions_by_provider(&p.id).await.unwrap().len(), 2);
}

/// Deleting a node deletes its entries; a second delete is `NotFound`.
pub async fn delete_provision_removes_its_entries(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(1));
    let keep = new_provision(&p, at(2));
    let keep_entries = vec![entry(&keep, Service::Scrape, "default")];
    store
        .create_provision(
            &n,
            &[entry(&n, Service::Chat, "a"), entry(&n, Service::Chat, "b")],
        )
        .await
        .unwrap();
    store.create_provision(&keep, &keep_entries).await.unwrap();

    store.delete_provision(&n.id).await.unwrap();
    assert_err!(store.provision(&n.id).await, Error::NotFound(_));
    assert_eq!(store.pool_entries().await.unwrap(), keep_entries);
    assert_eq!(
        store.provisions_by_provider(&p.id).await.unwrap(),
        vec![keep]
    );
    assert_err!(store.delete_provision(&n.id).await, Error::NotFound(_));
}

/// A late heartbeat never moves `last_heartbeat` back.
pub async fn heartbeat_never_moves_backwards(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(0));
    store.create_provision(&n, &[]).await.unwrap();
    store.heartbeat(&n.id, at(5_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(5_000)
    );
    store.heartbeat(&n.id, at(4_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(5_000)
    );
    store.heartbeat(&n.id, at(6_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(6_000)
    );
}

/// Nodes last heard from before the cut-off end and lose their entries; the
/// rest (including one heard from exactly at the cut-off) stay.
pub async fn expire_provisions_ends_silent_nodes(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let mut nodes = Vec::new();
    for (i, hb) in [1_000, 12_000, 10_000, 2_000].into_iter().enumerate() {
        let mut n = new_provision(&p, at(i as i64));
        n.state = ProvisionState::Ready;
        n.last_heartbeat = at(hb);
        store
            .create_provision(&n, &[entry(&n, Service::Chat, "m")])
            .await
            .unwrap();
        nodes.push(n);
    }
    // An already ended, silent node is not expired again.
    let mut ended = new_provision(&p, at(9));
    ended.state = ProvisionState::Ended;
    store.create_provision(&ended, &[]).await.unwrap();

    let mut want = vec![nodes[0].id.clone(), nodes[3].id.clone()];
    want.sort();
    let mut gone = store.expire_provisions(at(10_000)).await.unwrap();
    gone.sort();
    assert_eq!(gone, want);
    for n in [&nodes[0], &nodes[3]] {
        assert_eq!(
            store.provision(&n.id).await.unwrap().state,
            ProvisionState::Ended
        );
    }
    for n in [&nodes[1], &nodes[2]] {
        assert_eq!(
            store.provision(&n.id).await.unwrap().state,
            ProvisionState::Ready
        );
    }
    let live: Vec<ProvisionId> = store
        .pool_entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.provision_id)
        .collect();
    let mut want_live = vec![nodes[1].id.clone(), nodes[2].id.clone()];
    want_live.sort();
    let mut live_sorted = live;
    live_sorted.sort();
    assert_eq!(live_sorted, want_live);
    assert!(store
        .expire_provisions(at(10_000))
        .await
        .unwrap()
        .is_empty());
}
