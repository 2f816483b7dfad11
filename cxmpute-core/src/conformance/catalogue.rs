//! Conformance cases of [`CatalogueStore`](crate::store::CatalogueStore):
//! the model catalogue, prices and notifications.

use std::sync::Arc;

use crate::error::Error;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

// ---- the catalogue ----------------------------------------------------------

/// Catalogue entries are put (replacing the one for the same service and
/// model; the same name under another service is another entry), listed
/// sorted by service and model, and deleted (a missing one is not found).
pub async fn catalogue_put_replace_list_delete(store: Arc<dyn Store>) {
    assert!(store.catalogue().await.unwrap().is_empty());
    let m = CatalogueModel::new;
    let small = m(Service::Chat, "qwen2.5:0.5b", 1, 3);
    let embed = m(Service::Embeddings, "qwen2.5:0.5b", 2, 0);
    let odd = m(Service::Chat, "org/model: with spaces#1", 4, 4_000_000_000);
    for e in [&embed, &small, &odd] {
        store.put_catalogue_model(e).await.unwrap();
    }
    let moved = m(Service::Chat, "qwen2.5:0.5b", 2, 7);
    store.put_catalogue_model(&moved).await.unwrap();
    assert_eq!(
        store.catalogue().await.unwrap(),
        vec![odd.clone(), moved.clone(), embed.clone()]
    );

    store
        .delete_catalogue_model(Service::Chat, "qwen2.5:0.5b")
        .await
        .unwrap();
    assert_eq!(store.catalogue().await.unwrap(), vec![odd, embed]);
    assert_err!(
        store
            .delete_catalogue_model(Service::Chat, "qwen2.5:0.5b")
            .await,
        Error::NotFound(_)
    );
    assert_err!(
        store.delete_catalogue_model(Service::Tts, "never").await,
        Error::NotFound(_)
    );
}

// ---- aliases ----------------------------------------------------------------

/// Aliases are put (replacing the one of the same name, their models kept
/// in order), listed by name and deleted (a missing one is not found).
pub async fn aliases_put_replace_list_delete(store: Arc<dyn Store>) {
    assert!(store.aliases().await.unwrap().is_empty());
    let a = |alias: &str, models: &[&str]| ModelAlias {
        alias: alias.into(),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
    };
    let fast = a("fast", &["llama3.2:3b", "llama3.2:1b"]);
    let odd = a("org/alias: with spaces#1", &["z", "a", "m", "b"]);
    store.put_alias(&fast).await.unwrap();
    store.put_alias(&odd).await.unwrap();
    assert_eq!(
        store.aliases().await.unwrap(),
        vec![fast.clone(), odd.clone()]
    );
    let moved = a("fast", &["llama3.2:1b"]);
    store.put_alias(&moved).await.unwrap();
    assert_eq!(
        store.aliases().await.unwrap(),
        vec![moved.clone(), odd.clone()]
    );
    // Aliases are not catalogue entries.
    assert!(store.catalogue().await.unwrap().is_empty());

    store.delete_alias("fast").await.unwrap();
    assert_eq!(store.aliases().await.unwrap(), vec![odd]);
    assert_err!(store.delete_alias("fast").await, Error::NotFound(_));
}

// ---- prices -----------------------------------------------------------------

/// A price replaces the one for the same service and model; a service's
/// default (no model) is a different price from any model's.
pub async fn put_price_replaces_same_service_and_model(store: Arc<dyn Store>) {
    assert!(store.prices().await.unwrap().is_empty());
    let price = |service: Service, model: Option<&str>, per_request: i64| PriceEntry {
        service,
        model: model.map(str::to_owned),
        per_request: Credits::micros(per_request),
        per_million_input_tokens: Credits::micros(150_000),
        per_million_output_tokens: Credits::micros(600_000),
        per_million_units: Credits::ZERO,
    };
    let chat_default = price(Service::Chat, None, 10);
    let chat_llama = price(Service::Chat, Some("llama3.2:3b"), 20);
    let embed_default = price(Service::Embeddings, None, 1);
    for p in [&chat_default, &chat_llama, &embed_default] {
        store.put_price(p).await.unwrap();
    }
    let chat_llama2 = price(Service::Chat, Some("llama3.2:3b"), 25);
    store.put_price(&chat_llama2).await.unwrap();

    let key = |p: &PriceEntry| (p.service, p.model.clone());
    let mut got = store.prices().await.unwrap();
    got.sort_by_key(key);
    let mut want = vec![chat_default, chat_llama2, embed_default];
    want.sort_by_key(key);
    assert_eq!(got, want);
}

// ---- notifications ----------------------------------------------------------

/// Notifications are put (replacing by id), listed by start time and deleted.
pub async fn notifications_put_replace_delete(store: Arc<dyn Store>) {
    let n = |title: &str, starts: i64, placements: Vec<Placement>| Notification {
        id: NotificationId::generate(),
        title: title.into(),
        banner: format!("{title} banner"),
        popup: String::new(),
        starts_at: at(starts),
        ends_at: at(starts + 1_000),
        placements,
    };
    let late = n("late", 500, vec![Placement::Homepage]);
    let early = n(
        "early",
        100,
        vec![Placement::UserDashboard, Placement::ProviderDashboard],
    );
    store.put_notification(&late).await.unwrap();
    store.put_notification(&early).await.unwrap();
    assert_eq!(
        store.notifications().await.unwrap(),
        vec![early.clone(), late.clone()]
    );

    let mut moved = late.clone();
    moved.starts_at = at(50);
    moved.title = "moved".into();
    store.put_notification(&moved).await.unwrap();
    assert_eq!(
        store.notifications().await.unwrap(),
        vec![moved.clone(), early.clone()]
    );

    store.delete_notification(&moved.id).await.unwrap();
    assert_eq!(store.notifications().await.unwrap(), vec![early]);
    assert_err!(
        store.delete_notification(&moved.id).await,
        Error::NotFound(_)
    );
}
