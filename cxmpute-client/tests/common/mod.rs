//! A host on loopback with stand-in nodes, and clients pointed at it.

#![allow(dead_code)] // each test binary uses its own part of this

use std::sync::Arc;

use cxmpute_client::{Client, RetryPolicy};
#[allow(unused_imports)] // each test binary uses its own part of this
pub use cxmpute_core::testkit::{chat_price, EMBED, MODEL};
use cxmpute_core::testkit::{RecordingMailer, StandInNode, TestHost};
use cxmpute_core::{Credits, MemoryStore, Provider, ProvisionId, Secret, Service, User};

/// A host with a chat node and an embeddings node, and a user holding 10 credits.
pub struct World {
    pub host: TestHost,
    pub chat_node: StandInNode,
    pub embed_node: StandInNode,
    pub provider: Provider,
    pub chat_node_id: ProvisionId,
    pub user: User,
    pub key: Secret,
    /// Where the host's sign-in codes go: kept for the tests to read, as a
    /// person reads their mail.
    pub inbox: RecordingMailer,
}

impl World {
    pub async fn start() -> World {
        let inbox = RecordingMailer::default();
        let mailer = Arc::new(inbox.clone());
        let host = TestHost::start_market_with(Arc::new(MemoryStore::new()), Credits(500), |b| {
            b.mailer(mailer)
        })
        .await;
        let chat_node = StandInNode::start("a").await;
        let embed_node = StandInNode::start("e").await;
        let (provider, _) = host.provider().await;
        let chat_node_id = host
            .add_node(&provider, &chat_node, Service::Chat, MODEL)
            .await;
        host.add_node(&provider, &embed_node, Service::Embeddings, EMBED)
            .await;
        let (user, key) = host.user(Credits::whole(10)).await;
        World {
            host,
            chat_node,
            embed_node,
            provider,
            chat_node_id,
            user,
            key,
            inbox,
        }
    }

    /// A client calling as the world's user.
    pub fn client(&self) -> Client {
        client_for(&self.host.url, &self.key)
    }

    /// A client calling as the host's admin.
    pub fn admin(&self) -> Client {
        client_for(&self.host.url, &self.host.admin_key)
    }

    /// A client calling without a credential.
    pub fn anonymous(&self) -> Client {
        self.client().anonymous()
    }

    /// Signs `email` in through the mailed code; a client calling as the session.
    pub async fn sign_in(&self, email: &str) -> Client {
        let anon = self.anonymous();
        anon.account().request_code(email).await.unwrap();
        anon.account()
            .sign_in(email, &self.inbox.last_code(email))
            .await
            .unwrap()
    }

    /// The user's balance, read from the store.
    pub async fn balance(&self) -> Credits {
        self.host.balance(&self.user.id).await
    }
}

/// A client of `url` calling with `key`. Retries stay on, with short waits,
/// so the tests also exercise the retry path's bookkeeping.
pub fn client_for(url: &str, key: &Secret) -> Client {
    Client::builder()
        .base_url(url)
        .api_key(key.expose())
        .retry(RetryPolicy {
            max_retries: 2,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_secs(2),
        })
        .build()
        .unwrap()
}
