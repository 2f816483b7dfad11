//! The user API: the OpenAI-compatible gateway and the model list, called
//! with a user's API key.

use cxmpute_core::wire::{
    ChatCompletionRequest, ChatCompletionResponse, EmbeddingsRequest, EmbeddingsResponse,
    ModelList, StreamOptions,
};
use reqwest::Method;

use crate::error::Result;
use crate::stream::ChatStream;
use crate::Client;

/// The user API of a [`Client`]; see [`Client::user`].
#[derive(Clone, Copy, Debug)]
pub struct UserApi<'c> {
    pub(crate) client: &'c Client,
}

impl UserApi<'_> {
    /// `POST /v1/chat/completions`: a whole completion.
    ///
    /// `stream` is sent as `false` whatever the request says; use
    /// [`chat_stream`](Self::chat_stream) to stream.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let mut req = ChatCompletionRequest::new(
    ///     "llama3.2:3b",
    ///     vec![ChatMessage::system("Be brief."), ChatMessage::user("What is Rust?")],
    /// );
    /// req.max_tokens = Some(64);
    /// let answer = client.user().chat(&req).await?;
    /// println!("{}", answer.choices[0].message.text().unwrap_or_default());
    /// println!("{:?}", answer.usage);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn chat(&self, req: &ChatCompletionRequest) -> Result<ChatCompletionResponse> {
        let mut req = req.clone();
        req.stream = None;
        req.stream_options = None;
        self.client
            .req(Method::POST, &["v1", "chat", "completions"])
            .json(&req)?
            .send_json()
            .await
    }

    /// `POST /v1/chat/completions` with `stream: true`: the completion as a
    /// stream of typed chunks, ending after `[DONE]`.
    ///
    /// Usage is asked for (`stream_options.include_usage`) unless the request
    /// says otherwise, so the last chunk carries the tokens charged.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("Hi")]);
    /// let mut stream = client.user().chat_stream(&req).await?;
    /// while let Some(chunk) = stream.next().await {
    ///     let chunk = chunk?;
    ///     if let Some(text) = chunk.choices.first().and_then(|c| c.delta.content.as_deref()) {
    ///         print!("{text}");
    ///     }
    ///     if let Some(usage) = chunk.usage {
    ///         println!("\n{} tokens", usage.total_tokens);
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn chat_stream(&self, req: &ChatCompletionRequest) -> Result<ChatStream> {
        let mut req = req.clone();
        req.stream = Some(true);
        if req.stream_options.is_none() {
            req.stream_options = Some(StreamOptions {
                include_usage: true,
            });
        }
        self.client
            .req(Method::POST, &["v1", "chat", "completions"])
            .json(&req)?
            .send_sse()
            .await
    }

    /// `POST /v1/embeddings`.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::{EmbeddingInput, EmbeddingsRequest};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = EmbeddingsRequest {
    ///     model: "nomic-embed-text".into(),
    ///     input: EmbeddingInput::Texts(vec!["one".into(), "two".into()]),
    ///     extra: Default::default(),
    /// };
    /// let answer = client.user().embeddings(&req).await?;
    /// assert_eq!(answer.data.len(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn embeddings(&self, req: &EmbeddingsRequest) -> Result<EmbeddingsResponse> {
        self.client
            .req(Method::POST, &["v1", "embeddings"])
            .json(req)?
            .send_json()
            .await
    }

    /// `GET /v1/models`: the models served now, with their service and
    /// healthy node count. Needs no credential.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for m in client.user().models().await?.data {
    ///     println!("{} ({}): {} nodes", m.id, m.service, m.nodes);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn models(&self) -> Result<ModelList> {
        self.client
            .req(Method::GET, &["v1", "models"])
            .send_json()
            .await
    }
}
