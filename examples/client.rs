//! The typed client against a running host.
//!
//! ```text
//! cargo run --example host -- --store memory --allow-private-nodes   # prints the admin key
//! CXMPUTE_ADMIN_KEY=cx-... cargo run --example client --features client
//! CXMPUTE_API_KEY=cx-... cargo run --example client --features client
//! ```
//!
//! Settings come from the environment: `CXMPUTE_URL` (default
//! `http://127.0.0.1:8080`), and `CXMPUTE_API_KEY` (a user's key) or
//! `CXMPUTE_ADMIN_KEY` (an admin's key: the example then creates a user with
//! one credit and calls as that user). It checks the host is up, shows the
//! network's stats, lists the models served, then runs
//! a chat completion (whole and streamed) on the first chat model and an
//! embedding on the first embeddings model.

use std::io::Write;

use cxmpute::client::types::{Credits, Service};
use cxmpute::client::wire::{
    ChatCompletionRequest, ChatMessage, CreateUserRequest, EmbeddingInput, EmbeddingsRequest,
};
use cxmpute::client::{Client, Error};
use futures::StreamExt;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env("CXMPUTE_URL").unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let base = Client::builder()
        .base_url(&url)
        .app_name("cxmpute-example")
        .build()?;

    let user = match (env("CXMPUTE_API_KEY"), env("CXMPUTE_ADMIN_KEY")) {
        (Some(key), _) => base.with_bearer(key),
        (None, Some(admin_key)) => {
            let admin = base.with_bearer(admin_key);
            let email = format!("example-{}@example.com", std::process::id());
            let created = admin
                .admin()
                .create_user(&CreateUserRequest {
                    email,
                    credits: Credits::whole(1),
                })
                .await?;
            println!("created {} with 1 credit", created.user_id);
            for p in admin.admin().prices().await? {
                println!(
                    "price: {} {:?}: {} per request",
                    p.service, p.model, p.per_request
                );
            }
            base.with_bearer(created.api_key.expose())
        }
        (None, None) => return Err("set CXMPUTE_API_KEY or CXMPUTE_ADMIN_KEY".into()),
    };

    base.health().await?;
    let net = base.stats().network(None).await?;
    println!(
        "network: {} requests over 30 days, {} nodes now",
        net.totals.requests, net.nodes_now
    );

    let models = user.user().models().await?;
    if models.data.is_empty() {
        println!("no model is served yet: start a provider node and run this again");
    }
    for m in &models.data {
        println!("model: {} ({}, {} healthy nodes)", m.id, m.service, m.nodes);
    }

    if let Some(m) = models.data.iter().find(|m| m.service == Service::Chat) {
        let req = ChatCompletionRequest::new(
            m.id.clone(),
            vec![
                ChatMessage::system("Be brief."),
                ChatMessage::user("Say hello."),
            ],
        );
        match user.user().chat(&req).await {
            Ok(answer) => {
                let text = answer.choices.first().and_then(|c| c.message.text());
                println!("chat: {}", text.unwrap_or_default());
                println!("usage: {:?}", answer.usage);
            }
            // The typed error says what to do about it.
            Err(Error::Api(e)) if e.status == 402 => {
                println!("out of credits: {}", e.error.message);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }

        print!("stream: ");
        let mut stream = user.user().chat_stream(&req).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            for c in &chunk.choices {
                print!("{}", c.delta.content.as_deref().unwrap_or_default());
            }
            std::io::stdout().flush()?;
            if let Some(u) = chunk.usage {
                print!(" [{} tokens]", u.total_tokens);
            }
        }
        println!();
    }

    if let Some(m) = models
        .data
        .iter()
        .find(|m| m.service == Service::Embeddings)
    {
        let req = EmbeddingsRequest {
            model: m.id.clone(),
            input: EmbeddingInput::Texts(vec!["hello".into(), "world".into()]),
            extra: Default::default(),
            models: Vec::new(),
        };
        let answer = user.user().embeddings(&req).await?;
        println!("embeddings: {} vectors", answer.data.len());
    }
    Ok(())
}
