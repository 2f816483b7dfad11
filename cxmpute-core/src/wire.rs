//! Wire types: the JSON bodies of the HTTP API, defined once and shared by
//! the broker and `cxmpute-client`.
//!
//! OpenAI shapes keep fields they do not name in `extra`, so a request passes
//! through to the node with every option the caller set.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::types::*;

// ---- errors -------------------------------------------------------------------

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// OpenAI's error type, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A stable machine-readable code, e.g. `invalid_api_key`.
    #[serde(default)]
    pub code: Option<String>,
    /// The parameter at fault, when known.
    #[serde(default)]
    pub param: Option<String>,
}

// ---- chat ---------------------------------------------------------------------

/// `POST /v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model, e.g. `llama3.2:3b`.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (legacy name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Every other field, passed through unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// A request with a model and messages, other fields unset.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        ChatCompletionRequest {
            model: model.into(),
            messages,
            stream: None,
            stream_options: None,
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            extra: Map::new(),
        }
    }
}

/// `stream_options` of a chat request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a final chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or content parts (text and images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Other fields (name, tool calls...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// A message with a role and text.
    pub fn new(role: impl Into<String>, text: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(text.into())),
            extra: Map::new(),
        }
    }

    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new("user", text)
    }

    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Self::new("system", text)
    }

    /// The text of the message (parts' texts joined), if any.
    pub fn text(&self) -> Option<String> {
        match self.content.as_ref()? {
            MessageContent::Text(t) => Some(t.clone()),
            MessageContent::Parts(parts) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
            ),
        }
    }
}

/// A message's content: text, or an array of parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type":"text",...}`, `{"type":"image_url",...}`).
    Parts(Vec<Value>),
}

/// Token usage as OpenAI reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
}

/// A chat completion (non-streamed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Its id.
    #[serde(default)]
    pub id: String,
    /// `chat.completion`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// The answers.
    pub choices: Vec<ChatChoice>,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One answer of a completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Its index.
    #[serde(default)]
    pub index: u32,
    /// The message.
    pub message: ChatMessage,
    /// Why generation stopped.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// One streamed chunk of a chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Its id.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model.
    #[serde(default)]
    pub model: String,
    /// The deltas (empty in the final usage chunk).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Usage, in the final chunk when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One delta of a chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Its index.
    #[serde(default)]
    pub index: u32,
    /// The new content.
    #[serde(default)]
    pub delta: ChatDelta,
    /// Why generation stopped, in the last delta.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// New content in a chunk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// The role, in the first delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Other fields (tool calls...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

// ---- embeddings ---------------------------------------------------------------

/// `POST /v1/embeddings` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    /// The model, e.g. `nomic-embed-text`.
    pub model: String,
    /// Text(s) or token ids to embed.
    pub input: EmbeddingInput,
    /// Other fields (`encoding_format`, `dimensions`, `user`), passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What to embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One token array.
    Tokens(Vec<u32>),
    /// Several token arrays.
    TokenArrays(Vec<Vec<u32>>),
}

/// Embeddings answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsResponse {
    /// `list`.
    #[serde(default)]
    pub object: String,
    /// One embedding per input.
    pub data: Vec<Embedding>,
    /// The model.
    #[serde(default)]
    pub model: String,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `embedding`.
    #[serde(default)]
    pub object: String,
    /// The vector (floats, or a base64 string with `encoding_format: base64`).
    pub embedding: Value,
    /// Which input.
    #[serde(default)]
    pub index: u32,
}

// ---- models -------------------------------------------------------------------

/// `GET /v1/models` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models served now.
    pub data: Vec<ModelInfo>,
}

/// One served model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds (0: not tracked).
    pub created: u64,
    /// `cxmpute`.
    pub owned_by: String,
    /// The service it is served for.
    pub service: Service,
    /// How many healthy nodes serve it.
    pub nodes: usize,
}

// ---- admin --------------------------------------------------------------------

/// `POST /v1/admin/users`: create a user with a first API key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateUserRequest {
    /// The email.
    pub email: String,
    /// Starting credits in micro-credits.
    #[serde(default)]
    pub credits: Credits,
}

/// A created user and its first API key (shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateUserResponse {
    /// The user's id.
    pub user_id: UserId,
    /// The key's id.
    pub key_id: ApiKeyId,
    /// The API key itself. Shown only here.
    pub api_key: String,
}

/// `POST /v1/admin/users/{id}/credits`: add or remove credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantCreditsRequest {
    /// Micro-credits to add (negative removes).
    pub amount: Credits,
    /// Why (recorded).
    #[serde(default)]
    pub reason: String,
}

/// The balance after a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceResponse {
    /// The user.
    pub user_id: UserId,
    /// Micro-credits available now.
    pub credits: Credits,
}

/// `POST /v1/admin/providers`: create a provider account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateProviderRequest {
    /// Contact email.
    pub email: String,
}

/// A created provider and its key (shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateProviderResponse {
    /// The provider's id.
    pub provider_id: ProviderId,
    /// The provider key itself. Shown only here.
    pub provider_key: String,
}

// ---- provider -----------------------------------------------------------------

/// A (service, model) a node serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServedModel {
    /// The service.
    pub service: Service,
    /// The model name, whole (`llama3.2:3b`).
    pub model: String,
}

/// `POST /v1/provider/provisions`: register a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterProvisionRequest {
    /// The node's base URL; given here (or later, when it is ready).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// What it serves now; joins these pools at once when an endpoint is given.
    #[serde(default)]
    pub services: Vec<ServedModel>,
    /// Device diagnostics (free-form JSON).
    #[serde(default)]
    pub device: Value,
    /// Where it is.
    #[serde(default)]
    pub location: Location,
}

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterProvisionResponse {
    /// Its id.
    pub provision_id: ProvisionId,
    /// The secret the broker will present on every call to the node; the node
    /// answers 401 to anything without it. Shown only here.
    pub node_secret: String,
    /// Its state.
    pub state: ProvisionState,
    /// Capacity tier.
    pub tier: u8,
}

/// A node as its provider sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProvisionView {
    /// Its id.
    pub provision_id: ProvisionId,
    /// Its state.
    pub state: ProvisionState,
    /// Its base URL.
    pub endpoint: Option<String>,
    /// What it serves.
    pub services: Vec<ServedModel>,
    /// Capacity tier.
    pub tier: u8,
    /// Location.
    pub location: Location,
    /// Last heartbeat.
    pub last_heartbeat: Timestamp,
    /// Whether it is routable now.
    pub healthy: bool,
}
