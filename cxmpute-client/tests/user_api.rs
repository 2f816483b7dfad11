//! The user API against a real host router on loopback with stand-in nodes.

mod common;

use common::{World, EMBED, MODEL};
use cxmpute_client::types::CacheDirective;
use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage, EmbeddingInput, EmbeddingsRequest};
use cxmpute_client::Error;
use cxmpute_core::testkit::{Behavior, STREAM_CHUNKS};
use cxmpute_core::{Credits, Service};
use futures::StreamExt;

fn hi() -> ChatCompletionRequest {
    ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")])
}

#[tokio::test]
async fn chat_returns_the_typed_completion_and_is_charged() {
    let w = World::start().await;
    // A request asking to stream is still answered whole by `chat`.
    let mut req = hi();
    req.stream = Some(true);
    let answer = w.client().user().chat(&req).await.unwrap();
    assert_eq!(answer.object, "chat.completion");
    assert_eq!(answer.choices[0].message.role, "assistant");
    assert_eq!(
        answer.choices[0].message.text().as_deref(),
        Some("Hello from a")
    );
    assert_eq!(answer.choices[0].finish_reason.as_deref(), Some("stop"));
    let usage = answer.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (10, 5));
    // 1,000 + 10 input tokens x 1 + 5 output tokens x 2.
    assert_eq!(w.balance().await, Credits(10_000_000 - 1_020));
}

#[tokio::test]
async fn chat_stream_yields_typed_chunks_then_usage_then_ends() {
    let w = World::start().await;
    let mut stream = w.client().user().chat_stream(&hi()).await.unwrap();
    let mut text = String::new();
    let mut usage = None;
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        assert_eq!(chunk.object, "chat.completion.chunk");
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or_default());
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, STREAM_CHUNKS.concat());
    // Five content chunks, the finish chunk, the usage chunk; `[DONE]` is not a chunk.
    assert_eq!(chunks, 7);
    assert_eq!(
        usage.map(|u| u.total_tokens),
        Some(15),
        "usage asked for by default"
    );
    assert!(stream.next().await.is_none(), "the stream stays ended");
    w.host.assert_settled(1).await;
    assert_eq!(w.balance().await, Credits(10_000_000 - 1_020));
}

#[tokio::test]
async fn a_client_with_a_cache_directive_is_answered_from_the_cache() {
    let w = World::start().await;
    let cached = w.client().with_cache(Some(CacheDirective::Ttl(600)));
    let first = cached.user().chat(&hi()).await.unwrap();
    let again = cached.user().chat(&hi()).await.unwrap();
    assert_eq!(again, first);
    // Streamed: the same content, replayed.
    let mut stream = cached.user().chat_stream(&hi()).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for c in &chunk.unwrap().choices {
            text.push_str(c.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(
        Some(text.as_str()),
        first.choices[0].message.text().as_deref()
    );
    // `no-store` goes to the node.
    let fresh = cached.with_cache(Some(CacheDirective::NoStore));
    fresh.user().chat(&hi()).await.unwrap();
    assert_eq!(w.chat_node.hits(), 2);
    let embeddings = EmbeddingsRequest {
        model: EMBED.into(),
        models: Vec::new(),
        input: EmbeddingInput::Texts(vec!["one".into()]),
        extra: Default::default(),
    };
    let e1 = cached.user().embeddings(&embeddings).await.unwrap();
    let e2 = cached.user().embeddings(&embeddings).await.unwrap();
    assert_eq!(e1, e2);
    assert_eq!(w.embed_node.hits(), 1);
    // Charged: one call in full (1,020), two hits at a tenth (102 each),
    // the uncached call, and the embeddings call and its hit.
    let records = w
        .host
        .broker
        .store()
        .usage_records(&w.user.id, 10)
        .await
        .unwrap();
    assert_eq!(records.iter().filter(|r| r.cache_hit).count(), 3);
    w.host.assert_ledger().await;
}

#[tokio::test]
async fn a_stream_cut_by_the_node_ends_with_the_hosts_error_event() {
    let w = World::start().await;
    w.chat_node.set(Behavior::CutStream(2));
    let items: Vec<_> = w
        .client()
        .user()
        .chat_stream(&hi())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert!(items[0].is_ok() && items[1].is_ok());
    match &items[2] {
        Err(e @ Error::Stream(d)) => {
            assert_eq!(d.code.as_deref(), Some("stream_interrupted"));
            assert_eq!(e.code(), Some("stream_interrupted"));
            assert!(!e.is_retryable());
        }
        other => panic!("expected a stream error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_stream_is_an_api_error_before_any_chunk() {
    let w = World::start().await;
    let (_, poor) = w.host.user(Credits(5)).await;
    let client = w.client().with_bearer(poor.expose());
    let e = client.user().chat_stream(&hi()).await.unwrap_err();
    assert_eq!(e.status(), Some(402));
    assert_eq!(e.code(), Some("insufficient_credits"));
}

#[tokio::test]
async fn embeddings_return_one_vector_per_input() {
    let w = World::start().await;
    let req = EmbeddingsRequest {
        model: EMBED.into(),
        input: EmbeddingInput::Texts(vec!["one".into(), "two".into()]),
        extra: Default::default(),
        models: Vec::new(),
    };
    let answer = w.client().user().embeddings(&req).await.unwrap();
    assert_eq!(answer.data.len(), 2);
    assert_eq!(answer.data[1].index, 1);
    assert_eq!(
        answer.data[1].embedding,
        serde_json::json!([0.1, 0.2, 0.3, 1.0])
    );
    assert_eq!(answer.model, EMBED);
    assert_eq!(w.embed_node.hits(), 1);
}

#[tokio::test]
async fn models_lists_what_is_served_without_a_credential() {
    let w = World::start().await;
    let models = w.client().anonymous().user().models().await.unwrap();
    assert_eq!(models.object, "list");
    let mut served: Vec<_> = models
        .data
        .iter()
        .map(|m| (m.id.as_str(), m.service, m.nodes))
        .collect();
    served.sort();
    assert_eq!(
        served,
        vec![(MODEL, Service::Chat, 1), (EMBED, Service::Embeddings, 1)]
    );
}

#[tokio::test]
async fn the_hosts_refusals_map_to_api_errors_with_their_codes() {
    let w = World::start().await;
    let c = w.client();
    let check = |e: Error, status: u16, code: &str| {
        assert_eq!((e.status(), e.code()), (Some(status), Some(code)), "{e}");
        match e {
            Error::Api(a) => assert!(!a.error.message.is_empty()),
            other => panic!("expected an API error, got {other:?}"),
        }
    };
    check(
        c.user()
            .chat(&ChatCompletionRequest::new(MODEL, vec![]))
            .await
            .unwrap_err(),
        400,
        "invalid_request",
    );
    check(
        c.with_bearer("cx-wrong")
            .user()
            .chat(&hi())
            .await
            .unwrap_err(),
        401,
        "invalid_api_key",
    );
    let unknown = ChatCompletionRequest::new("nope:1b", vec![ChatMessage::user("x")]);
    check(
        c.user().chat(&unknown).await.unwrap_err(),
        404,
        "model_not_found",
    );

    let (_, poor) = w.host.user(Credits(10)).await;
    check(
        c.with_bearer(poor.expose())
            .user()
            .chat(&hi())
            .await
            .unwrap_err(),
        402,
        "insufficient_credits",
    );

    let (_, small) = w
        .host
        .broker
        .admin()
        .create_api_key(&w.user.id, "small", Some(Credits(100)), Vec::new())
        .await
        .unwrap();
    let e = c
        .with_bearer(small.expose())
        .user()
        .chat(&hi())
        .await
        .unwrap_err();
    assert!(
        !e.is_retryable(),
        "a spent key limit does not pass by waiting"
    );
    assert_eq!(e.retry_after(), None);
    check(e, 429, "key_limit_reached");

    let (_, embed_only) = w
        .host
        .broker
        .admin()
        .create_api_key(
            &w.user.id,
            "emb",
            None,
            vec![cxmpute_core::Route::Embeddings],
        )
        .await
        .unwrap();
    check(
        c.with_bearer(embed_only.expose())
            .user()
            .chat(&hi())
            .await
            .unwrap_err(),
        403,
        "forbidden",
    );

    w.host.set_node_healthy(&w.chat_node_id, false);
    let e = c.user().chat(&hi()).await.unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(1)));
    check(e, 503, "no_capacity");

    assert_eq!(w.chat_node.hits(), 0);
    assert_eq!(
        w.balance().await,
        Credits::whole(10),
        "no refusal costs anything"
    );
}

#[tokio::test]
async fn health_answers_without_a_credential() {
    let w = World::start().await;
    w.client().anonymous().health().await.unwrap();
}

#[tokio::test]
async fn a_canary_page_that_does_not_exist_is_a_404() {
    let w = World::start().await;
    let e = w
        .client()
        .anonymous()
        .page("no-such-page")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
}
