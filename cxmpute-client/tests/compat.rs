//! Compatibility: the host speaks OpenAI's API. async-openai, unchanged and
//! only pointed at the host, completes chat (whole and streamed) and
//! embeddings; raw requests shaped exactly like OpenAI's documentation work too.

mod common;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestDeveloperMessageArgs, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use common::{World, EMBED, MODEL};
use cxmpute_core::testkit::STREAM_CHUNKS;
use futures::StreamExt;
use serde_json::{json, Value};

fn openai(w: &World) -> async_openai::Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(format!("{}/v1", w.host.url))
        .with_api_key(w.key.expose());
    async_openai::Client::with_config(config)
}

fn chat_request(stream_usage: bool) -> async_openai::types::chat::CreateChatCompletionRequest {
    let mut b = CreateChatCompletionRequestArgs::default();
    b.model(MODEL).max_completion_tokens(64u32).messages([
        ChatCompletionRequestDeveloperMessageArgs::default()
            .content("You are a helpful assistant.")
            .build()
            .unwrap()
            .into(),
        ChatCompletionRequestUserMessageArgs::default()
            .content("Hello!")
            .build()
            .unwrap()
            .into(),
    ]);
    if stream_usage {
        b.stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    }
    b.build().unwrap()
}

#[tokio::test]
async fn async_openai_completes_a_chat() {
    let w = World::start().await;
    let answer = openai(&w).chat().create(chat_request(false)).await.unwrap();
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Hello from a")
    );
    let usage = answer.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (10, 5, 15)
    );
}

#[tokio::test]
async fn async_openai_streams_a_chat() {
    let w = World::start().await;
    let mut stream = openai(&w)
        .chat()
        .create_stream(chat_request(true))
        .await
        .unwrap();
    let mut text = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or_default());
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, STREAM_CHUNKS.concat());
    assert_eq!(usage.map(|u| u.total_tokens), Some(15));
}

#[tokio::test]
async fn async_openai_embeds() {
    let w = World::start().await;
    let req = CreateEmbeddingRequestArgs::default()
        .model(EMBED)
        .input(["The food was delicious", "and the waiter was kind"])
        .build()
        .unwrap();
    let answer = openai(&w).embeddings().create(req).await.unwrap();
    assert_eq!(answer.data.len(), 2);
    assert_eq!(answer.data[0].embedding, vec![0.1, 0.2, 0.3, 0.0]);
    assert_eq!(answer.model, EMBED);
}

#[tokio::test]
async fn async_openai_sees_openai_errors() {
    let w = World::start().await;
    let mut req = chat_request(false);
    req.model = "no-such-model".into();
    let e = openai(&w).chat().create(req).await.unwrap_err();
    match e {
        async_openai::error::OpenAIError::ApiError(api) => {
            assert_eq!(api.code.as_deref(), Some("model_not_found"));
            assert_eq!(api.r#type.as_deref(), Some("not_found_error"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A request as `curl` sends it: the documented headers and JSON body, nothing else.
async fn curl(w: &World, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", w.host.url))
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {}", w.key.expose()))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn documented_chat_request_is_answered_in_openai_shape() {
    let w = World::start().await;
    let r = curl(
        &w,
        "/v1/chat/completions",
        json!({
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"}
            ]
        }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from a");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["total_tokens"], 15);
}

#[tokio::test]
async fn documented_image_input_request_is_accepted() {
    let w = World::start().await;
    let r = curl(
        &w,
        "/v1/chat/completions",
        json!({
            "model": MODEL,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
                ]
            }],
            "max_tokens": 300
        }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from a");
}

#[tokio::test]
async fn documented_streaming_request_is_answered_with_chunks_and_done() {
    let w = World::start().await;
    let r = curl(
        &w,
        "/v1/chat/completions",
        json!({
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"}
            ],
            "stream": true
        }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let mut content = String::new();
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    assert_eq!(content, STREAM_CHUNKS.concat());
}

#[tokio::test]
async fn documented_embeddings_request_is_answered_in_openai_shape() {
    let w = World::start().await;
    let r = curl(
        &w,
        "/v1/embeddings",
        json!({
            "input": "The food was delicious and the waiter...",
            "model": EMBED,
            "encoding_format": "float"
        }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    assert!(v["data"][0]["embedding"].is_array());
    assert!(v["usage"]["prompt_tokens"].is_u64());
}

#[tokio::test]
async fn documented_models_request_lists_models() {
    let w = World::start().await;
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", w.host.url))
        .header("Authorization", format!("Bearer {}", w.key.expose()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert!(m["id"].is_string() && m["created"].is_u64() && m["owned_by"].is_string());
    }
}

#[tokio::test]
async fn documented_error_shape_for_a_bad_key() {
    let w = World::start().await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", w.host.url))
        .header("Content-Type", "application/json")
        .header("Authorization", "Bearer sk-not-a-key")
        .body(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(v["error"]["message"].is_string());
}
