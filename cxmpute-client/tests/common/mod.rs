//! A host on loopback with stand-in nodes, and clients pointed at it.

#![allow(dead_code)] // each test binary uses its own part of this

use std::sync::{Arc, Mutex};

use cxmpute_client::{Client, RetryPolicy};
use cxmpute_core::testkit::{StandInNode, TestHost};
use cxmpute_core::{
    Credits, FlatReward, Mailer, MemoryStore, PriceEntry, Provider, ProvisionId, Secret, Service,
    Store, User,
};

/// The chat model the stand-ins serve.
pub const MODEL: &str = "llama3.2:3b";
/// The embeddings model the stand-ins serve.
pub const EMBED: &str = "nomic-embed-text";

/// 1 micro-credit per input token, 2 per output token, 1,000 per request.
pub fn chat_price() -> PriceEntry {
    PriceEntry {
        service: Service::Chat,
        model: None,
        per_request: Credits(1_000),
        per_million_input_tokens: Credits(1_000_000),
        per_million_output_tokens: Credits(2_000_000),
        per_million_units: Credits::ZERO,
    }
}

/// Where the host's sign-in codes go: kept for the tests to read, as a
/// person reads their mail.
#[derive(Default)]
pub struct Inbox(Mutex<Vec<(String, String)>>);

#[async_trait::async_trait]
impl Mailer for Inbox {
    async fn send_login_code(&self, email: &str, code: &Secret) -> cxmpute_core::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push((email.to_owned(), code.expose().to_owned()));
        Ok(())
    }
}

impl Inbox {
    /// The last code sent to `email`.
    pub fn code_for(&self, email: &str) -> String {
        let mails = self.0.lock().unwrap();
        let (_, code) = mails
            .iter()
            .rev()
            .find(|(to, _)| to == email)
            .expect("a code was mailed");
        code.clone()
    }
}

/// A host with a chat node and an embeddings node, and a user holding 10 credits.
pub struct World {
    pub host: TestHost,
    pub chat_node: StandInNode,
    pub embed_node: StandInNode,
    pub provider: Provider,
    pub chat_node_id: ProvisionId,
    pub user: User,
    pub key: Secret,
    pub inbox: Arc<Inbox>,
}

impl World {
    pub async fn start() -> World {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let inbox = Arc::new(Inbox::default());
        let mailer: Arc<dyn Mailer> = inbox.clone();
        let host = TestHost::start_with(store, |b| {
            b.reward_policy(Arc::new(FlatReward(Credits(500))))
                .mailer(mailer)
        })
        .await;
        host.broker.put_price(chat_price()).await.unwrap();
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
            .sign_in(email, &self.inbox.code_for(email))
            .await
            .unwrap()
    }

    /// The user's balance, read from the store.
    pub async fn balance(&self) -> Credits {
        self.host
            .broker
            .store()
            .user(&self.user.id)
            .await
            .unwrap()
            .credits
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
