//! The user API: the OpenAI-compatible gateway (chat, embeddings, speech),
//! the original platform's services (text to speech, scraping, vision) and
//! the model list, called with a user's API key.

use bytes::Bytes;
use cxmpute_api::wire::{
    CaptionResponse, CatalogueList, ChatCompletionRequest, ChatCompletionResponse, DetectResponse,
    EmbeddingsRequest, EmbeddingsResponse, ModelList, PointResponse, QueryResponse, ScrapeRequest,
    ScrapeResponse, SpeechRequest, StreamOptions, TtsRequest, VisionRequest,
};
use http::Method;

use crate::error::Result;
use crate::stream::{ByteStream, ChatStream};
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
    ///     models: Vec::new(),
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

    /// `GET /v1/catalogue`: what the network offers, every model of the
    /// catalogue with its price and the healthy nodes serving it now. Needs
    /// no credential.
    ///
    /// ```no_run
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// for o in client.user().catalogue().await?.data {
    ///     println!("{} {}: {} per request, {} nodes", o.service, o.model, o.price.per_request, o.nodes);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn catalogue(&self) -> Result<CatalogueList> {
        self.client
            .req(Method::GET, &["v1", "catalogue"])
            .send_json()
            .await
    }

    /// `POST /v1/audio/speech` (OpenAI's shape): the whole audio.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::{AudioFormat, SpeechRequest};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = SpeechRequest {
    ///     model: "kokoro".into(),
    ///     input: "Hello there.".into(),
    ///     voice: "af_bella".into(),
    ///     response_format: Some(AudioFormat::Wav),
    ///     speed: None,
    ///     extra: Default::default(),
    /// };
    /// let wav = client.user().speech(&req).await?;
    /// std::fs::write("hello.wav", &wav).unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn speech(&self, req: &SpeechRequest) -> Result<Bytes> {
        self.client
            .req(Method::POST, &["v1", "audio", "speech"])
            .json(req)?
            .send_bytes()
            .await
    }

    /// `POST /v1/audio/speech`: the audio as it is produced, to play or
    /// write it before the end.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use cxmpute_client::wire::SpeechRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client, req: SpeechRequest) -> Result<(), cxmpute_client::Error> {
    /// let mut audio = client.user().speech_stream(&req).await?;
    /// println!("{:?}", audio.content_type());
    /// while let Some(chunk) = audio.next().await {
    ///     let chunk = chunk?;
    ///     // play or write `chunk`
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn speech_stream(&self, req: &SpeechRequest) -> Result<ByteStream> {
        self.client
            .req(Method::POST, &["v1", "audio", "speech"])
            .json(req)?
            .send_byte_stream()
            .await
    }

    /// `POST /v1/tts` (the original platform's shape): the whole audio (WAV).
    ///
    /// ```no_run
    /// use cxmpute_client::wire::TtsRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = TtsRequest { text: "Hello there.".into(), voice: "af_bella".into(), model: None };
    /// let wav = client.user().tts(&req).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn tts(&self, req: &TtsRequest) -> Result<Bytes> {
        self.client
            .req(Method::POST, &["v1", "tts"])
            .json(req)?
            .send_bytes()
            .await
    }

    /// `POST /v1/tts`: the audio as it is produced.
    ///
    /// ```no_run
    /// use futures::TryStreamExt;
    /// use cxmpute_client::wire::TtsRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client, req: TtsRequest) -> Result<(), cxmpute_client::Error> {
    /// let chunks: Vec<_> = client.user().tts_stream(&req).await?.try_collect().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn tts_stream(&self, req: &TtsRequest) -> Result<ByteStream> {
        self.client
            .req(Method::POST, &["v1", "tts"])
            .json(req)?
            .send_byte_stream()
            .await
    }

    /// `POST /v1/scrape`: fetches pages (through the node's egress guard)
    /// and returns one result per URL, in order. Only pages fetched are charged.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::{ScrapeFormat, ScrapeRequest};
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = ScrapeRequest {
    ///     urls: vec!["https://example.com/".into()],
    ///     format: ScrapeFormat::Markdown,
    ///     model: None,
    /// };
    /// for r in client.user().scrape(&req).await?.results {
    ///     println!("{} -> {:?}", r.url, r.content.or(r.error));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn scrape(&self, req: &ScrapeRequest) -> Result<ScrapeResponse> {
        self.client
            .req(Method::POST, &["v1", "scrape"])
            .json(req)?
            .send_json()
            .await
    }

    /// `POST /v1/m/caption`: what an image shows.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::VisionRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = VisionRequest {
    ///     image_url: Some("https://example.com/cat.jpg".into()),
    ///     ..Default::default()
    /// };
    /// println!("{}", client.user().caption(&req).await?.caption);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn caption(&self, req: &VisionRequest) -> Result<CaptionResponse> {
        self.vision("caption", req).await
    }

    /// `POST /v1/m/query`: answers `question` about an image.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::VisionRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = VisionRequest {
    ///     image: Some("data:image/png;base64,iVBORw0KGgo...".into()),
    ///     question: Some("How many cats?".into()),
    ///     ..Default::default()
    /// };
    /// println!("{}", client.user().query(&req).await?.answer);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn query(&self, req: &VisionRequest) -> Result<QueryResponse> {
        self.vision("query", req).await
    }

    /// `POST /v1/m/detect`: a box around each instance of `target`.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::VisionRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = VisionRequest {
    ///     image_url: Some("https://example.com/street.jpg".into()),
    ///     target: Some("car".into()),
    ///     ..Default::default()
    /// };
    /// for b in client.user().detect(&req).await?.objects {
    ///     println!("car at ({}, {})-({}, {})", b.x_min, b.y_min, b.x_max, b.y_max);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn detect(&self, req: &VisionRequest) -> Result<DetectResponse> {
        self.vision("detect", req).await
    }

    /// `POST /v1/m/point`: a point on each instance of `target`.
    ///
    /// ```no_run
    /// use cxmpute_client::wire::VisionRequest;
    ///
    /// # async fn run(client: cxmpute_client::Client) -> Result<(), cxmpute_client::Error> {
    /// let req = VisionRequest {
    ///     image_url: Some("https://example.com/street.jpg".into()),
    ///     target: Some("traffic light".into()),
    ///     ..Default::default()
    /// };
    /// let points = client.user().point(&req).await?.points;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn point(&self, req: &VisionRequest) -> Result<PointResponse> {
        self.vision("point", req).await
    }

    /// The vision routes share a body and differ by path and answer.
    async fn vision<T: serde::de::DeserializeOwned>(
        &self,
        route: &str,
        req: &VisionRequest,
    ) -> Result<T> {
        self.client
            .req(Method::POST, &["v1", "m", route])
            .json(req)?
            .send_json()
            .await
    }
}
