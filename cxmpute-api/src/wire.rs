//! Wire types: the JSON bodies of the HTTP API, defined once and shared by
//! the broker and `cxmpute-client`.
//!
//! OpenAI shapes keep fields they do not name in `extra`, so a client can
//! send any option and an answer keeps everything the node said. The broker
//! passes on to a node only the options it knows to be covered by the price
//! (see the gateway routes' validation); the rest is dropped or refused.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::secret::Secret;
use crate::types::*;

// ---- errors -------------------------------------------------------------------

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatCompletionRequest {
    /// The model, e.g. `llama3.2:3b`, or an alias the operator defined.
    /// May be left empty when `models` names the models.
    #[serde(default)]
    pub model: String,
    /// Models to fall back on, in order (OpenRouter's shape): tried after
    /// `model` when no node of it answers before the first byte. At most 4
    /// names together with `model`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
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
    /// Every other field (`n`, `tools`, `top_p`...). The broker passes on
    /// the sampling and tool options it knows, checks `n` and refuses or
    /// drops the rest.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// A request with a model and messages, other fields unset.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        ChatCompletionRequest {
            model: model.into(),
            models: Vec::new(),
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamOptions {
    /// Ask for a final chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
            MessageContent::Parts(parts) => Some(parts.iter().filter_map(part_text).collect()),
        }
    }

    /// The length in bytes of [`ChatMessage::text`], without building it (the
    /// request path measures every prompt and answer).
    pub fn text_len(&self) -> Option<usize> {
        match self.content.as_ref()? {
            MessageContent::Text(t) => Some(t.len()),
            MessageContent::Parts(parts) => {
                Some(parts.iter().filter_map(part_text).map(str::len).sum())
            }
        }
    }
}

/// The text of one content part, if it has any.
fn part_text(part: &Value) -> Option<&str> {
    part.get("text").and_then(Value::as_str)
}

/// A message's content: text, or an array of parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type":"text",...}`, `{"type":"image_url",...}`).
    Parts(Vec<Value>),
}

/// Token usage as OpenAI reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EmbeddingsRequest {
    /// The model, e.g. `nomic-embed-text`, or an alias the operator defined.
    /// May be left empty when `models` names the models.
    #[serde(default)]
    pub model: String,
    /// Models to fall back on, in order, as for chat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Text(s) or token ids to embed.
    pub input: EmbeddingInput,
    /// Other fields: `encoding_format`, `dimensions` and `user` are checked
    /// and passed on; the broker drops any other.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What to embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models served now.
    pub data: Vec<ModelInfo>,
}

/// One served model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelInfo {
    /// The model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds (0: not tracked).
    pub created: u64,
    /// `cxmpute`; `cxmpute-alias` for an alias the operator defined.
    pub owned_by: String,
    /// The service it is served for.
    pub service: Service,
    /// How many healthy nodes serve it (an alias: its models together).
    pub nodes: usize,
    /// An alias's models, in the order they are tried; empty (and left
    /// out) for a model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

// ---- the catalogue --------------------------------------------------------------

/// `GET /v1/catalogue` answer: what the network offers, at what price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogueList {
    /// `list`.
    pub object: String,
    /// Every model of the catalogue, by service and model.
    pub data: Vec<CatalogueOffer>,
    /// The aliases the operator defined, by name (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<ModelAlias>,
}

/// One model of the catalogue, its price and how many nodes serve it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogueOffer {
    /// The service.
    pub service: Service,
    /// The model name.
    pub model: String,
    /// The least tier (1-4) a node needs to serve it.
    pub min_tier: u8,
    /// How many nodes the network wants serving it.
    pub target_nodes: u32,
    /// How many healthy nodes serve it now (on the host that answered).
    pub nodes: usize,
    /// What a call costs: the model's own price, else its service's.
    pub price: PriceEntry,
}

/// The answer to a change of the catalogue (`PUT`, `DELETE
/// /v1/admin/catalogue...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogueChange {
    /// The entry as stored now; absent after a removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<CatalogueModel>,
    /// Nodes that left the entry's pool: every node serving a removed
    /// model, or those below a raised minimum tier.
    pub removed_nodes: u32,
}

/// `GET /v1/admin/reward`: how providers are paid, and what the platform
/// keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RewardPolicyView {
    /// The policy's name: `platform_share`, `tiered`, `flat`, or `custom`
    /// (an embedder's own).
    pub policy: String,
    /// What the platform keeps of every charge, per mille, per service
    /// (`platform_share` only).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub platform_share_permille: std::collections::BTreeMap<Service, u32>,
    /// The policy in words.
    pub description: String,
}

// ---- admin --------------------------------------------------------------------

/// `POST /v1/admin/users`: create a user with a first API key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateUserRequest {
    /// The email.
    pub email: String,
    /// Starting credits in micro-credits.
    #[serde(default)]
    pub credits: Credits,
}

/// A created user and its first API key (shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateUserResponse {
    /// The user's id.
    pub user_id: UserId,
    /// The key's id.
    pub key_id: ApiKeyId,
    /// The API key itself. Shown only here.
    pub api_key: Secret,
}

/// `POST /v1/admin/users/{id}/credits`: add or remove credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GrantCreditsRequest {
    /// Micro-credits to add (negative removes).
    pub amount: Credits,
    /// Why (recorded).
    #[serde(default)]
    pub reason: String,
}

/// The balance after a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalanceResponse {
    /// The user.
    pub user_id: UserId,
    /// Micro-credits available now.
    pub credits: Credits,
}

/// `POST /v1/admin/providers`: create a provider account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateProviderRequest {
    /// Contact email.
    pub email: String,
}

/// A created provider and its key (shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateProviderResponse {
    /// The provider's id.
    pub provider_id: ProviderId,
    /// The provider key itself. Shown only here.
    pub provider_key: Secret,
}

// ---- provider -----------------------------------------------------------------

/// A (service, model) a node serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServedModel {
    /// The service.
    pub service: Service,
    /// The model name, whole (`llama3.2:3b`).
    pub model: String,
}

/// `POST /v1/provider/provisions`: register a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterProvisionResponse {
    /// Its id.
    pub provision_id: ProvisionId,
    /// The secret the broker will present on every call to the node; the node
    /// answers 401 to anything without it. Shown only here.
    pub node_secret: Secret,
    /// Its state.
    pub state: ProvisionState,
    /// Capacity tier.
    pub tier: u8,
}

/// A node as its provider sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// What the broker's canary calls found about it (on the host answering).
    #[serde(default)]
    pub verification: NodeVerification,
}

/// Where a node stands with verification: the broker's canary calls, which
/// check that it serves the model it claims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    /// No canary has given a verdict on it yet.
    #[default]
    Unverified,
    /// Its last verdict was a pass.
    Verified,
    /// Its last verdict found it wrong; more in a row quarantine it.
    Suspect,
    /// Out of routing until it passes canaries again.
    Quarantined,
}

/// A node's verification as its provider and the admin see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeVerification {
    /// Where it stands.
    pub status: VerificationStatus,
    /// Its score, per mille (1,000: nothing found against it); selection and
    /// rewards may weigh it.
    pub score_permille: u16,
    /// Canary checks it passed.
    pub passed: u64,
    /// Canary checks it failed.
    pub failed: u64,
    /// Why its last failed check failed (kept until it re-qualifies).
    pub reason: Option<String>,
    /// When it was last given a verdict.
    pub checked_at: Option<Timestamp>,
}

impl Default for NodeVerification {
    fn default() -> Self {
        NodeVerification {
            status: VerificationStatus::Unverified,
            score_permille: 1000,
            passed: 0,
            failed: 0,
            reason: None,
            checked_at: None,
        }
    }
}

// ---- services -----------------------------------------------------------------
//
// Text to speech, scraping and vision. The broker validates these bodies,
// fills in defaults and forwards them to the node on the same path, so the
// node receives exactly these shapes.

/// The pool model of `POST /v1/tts` when the body names none: the original
/// platform's text-to-speech engine, whose voice names (`af_bella`...) the
/// route keeps.
pub const DEFAULT_TTS_MODEL: &str = "kokoro";
/// The voice of `POST /v1/tts` when the body names none.
pub const DEFAULT_TTS_VOICE: &str = "af_bella";
/// The most characters one speech request may speak (OpenAI's limit).
pub const MAX_SPEECH_CHARS: usize = 4096;
/// The pool model of `POST /v1/scrape` when the body names none.
pub const DEFAULT_SCRAPE_MODEL: &str = "default";
/// The most URLs one scrape request may name.
pub const MAX_SCRAPE_URLS: usize = 50;
/// The longest URL accepted (scrape targets, image URLs).
pub const MAX_URL_LEN: usize = 2048;
/// The pool model of the vision routes (`/v1/m/*`) when the body names none.
pub const DEFAULT_VISION_MODEL: &str = "moondream";
/// The largest image the vision routes accept, decoded (2 MiB).
pub const MAX_IMAGE_BYTES: usize = 2 << 20;
/// The longest `question` or `target` of a vision request, in characters.
pub const MAX_VISION_PROMPT_CHARS: usize = 2000;

/// `POST /v1/audio/speech` body (OpenAI's shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpeechRequest {
    /// The pool model, e.g. `kokoro`.
    pub model: String,
    /// The text to speak (at most [`MAX_SPEECH_CHARS`] characters).
    pub input: String,
    /// The voice: a Kokoro voice (`af_bella`, `bm_george`...) or an OpenAI
    /// voice (`alloy`, `nova`...).
    pub voice: String,
    /// The audio format; `wav` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<AudioFormat>,
    /// Speaking speed, 0.25 to 4.0 (1.0 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<f32>,
    /// Other fields: `instructions` (at most [`MAX_SPEECH_CHARS`]
    /// characters, priced per character with the input) is passed on; the
    /// broker drops any other.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The audio formats the speech routes produce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// RIFF WAVE, 16-bit mono (`audio/wav`).
    #[default]
    Wav,
    /// The same samples without a header (`audio/pcm`).
    Pcm,
}

impl AudioFormat {
    /// Its content type.
    pub const fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Pcm => "audio/pcm",
        }
    }
}

fn default_tts_voice() -> String {
    DEFAULT_TTS_VOICE.to_owned()
}

/// `POST /v1/tts` body (the original platform's shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TtsRequest {
    /// The text to speak (at most [`MAX_SPEECH_CHARS`] characters).
    pub text: String,
    /// The voice; [`DEFAULT_TTS_VOICE`] when absent.
    #[serde(default = "default_tts_voice")]
    pub voice: String,
    /// The pool model; [`DEFAULT_TTS_MODEL`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What a scraped page is turned into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScrapeFormat {
    /// The page as it came.
    #[default]
    Html,
    /// HTML converted to Markdown.
    Markdown,
    /// HTML converted to plain text.
    Text,
}

/// `POST /v1/scrape` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScrapeRequest {
    /// The pages to fetch: 1 to [`MAX_SCRAPE_URLS`] `http(s)` URLs.
    pub urls: Vec<String>,
    /// What each page is turned into; `html` when absent.
    #[serde(default)]
    pub format: ScrapeFormat,
    /// The pool model; [`DEFAULT_SCRAPE_MODEL`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The answer of `POST /v1/scrape`: one result per requested URL, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScrapeResponse {
    /// The results.
    pub results: Vec<ScrapeResult>,
}

/// What became of one URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScrapeResult {
    /// The URL as requested.
    pub url: String,
    /// Whether the page was fetched (whatever its HTTP status).
    pub success: bool,
    /// The page's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The URL the content came from, after redirects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_url: Option<String>,
    /// The content in the requested format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Why there is no content (refused address, timeout, too large...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of every vision route (`/v1/m/caption`, `/v1/m/query`,
/// `/v1/m/detect`, `/v1/m/point`): an image and, by route, a question or a
/// target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VisionRequest {
    /// The pool model; [`DEFAULT_VISION_MODEL`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The image as an `http(s)` URL (fetched by the node through its egress
    /// guard) or a `data:image/...;base64,` URL.
    #[serde(default, alias = "imageUrl", skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// The image as base64 (or a data URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The question (`/v1/m/query`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// What to find (`/v1/m/detect`, `/v1/m/point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The answer of `POST /v1/m/caption`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CaptionResponse {
    /// What the image shows.
    pub caption: String,
}

/// The answer of `POST /v1/m/query`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueryResponse {
    /// The answer to the question.
    pub answer: String,
}

/// The answer of `POST /v1/m/detect`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DetectResponse {
    /// A box around each instance of the target found.
    pub objects: Vec<BoundingBox>,
}

/// A box in an image, as fractions of its width and height (0 to 1, origin
/// top left).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BoundingBox {
    /// Left edge.
    pub x_min: f64,
    /// Top edge.
    pub y_min: f64,
    /// Right edge.
    pub x_max: f64,
    /// Bottom edge.
    pub y_max: f64,
}

/// The answer of `POST /v1/m/point`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PointResponse {
    /// A point on each instance of the target found.
    pub points: Vec<ImagePoint>,
}

/// A point in an image, as fractions of its width and height (0 to 1, origin
/// top left).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImagePoint {
    /// Across.
    pub x: f64,
    /// Down.
    pub y: f64,
}

// ---- accounts -----------------------------------------------------------------

/// `POST /v1/auth/code`: send a sign-in code to an email.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RequestCodeRequest {
    /// Where to send the code.
    pub email: String,
}

/// The answer to a code request. It is the same whether or not an account
/// exists for the email, so it reveals nothing about who has an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RequestCodeResponse {
    /// Always `sent`.
    pub status: String,
    /// How long the code works, in seconds.
    pub expires_in: u64,
}

/// `POST /v1/auth/verify`: exchange a sign-in code for a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifyCodeRequest {
    /// The email the code was sent to.
    pub email: String,
    /// The code from the mail (redacted in `Debug`).
    pub code: Secret,
}

/// A session: a short-lived access token and a refresh token that works once.
///
/// The session routes also set both as `HttpOnly` cookies for browsers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionResponse {
    /// `Bearer`.
    pub token_type: String,
    /// The access token: send it as `Authorization: Bearer <token>`.
    pub access_token: Secret,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Trade it at `POST /v1/auth/refresh` for a new session; it works once.
    pub refresh_token: Secret,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: u64,
    /// The signed-in user.
    pub user_id: UserId,
}

/// `POST /v1/auth/refresh` and `POST /v1/auth/logout`: the refresh token,
/// unless the browser sends it as a cookie.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefreshRequest {
    /// The refresh token (redacted in `Debug`).
    #[serde(default)]
    pub refresh_token: Option<Secret>,
}

/// An API key as its owner sees it: never the secret, only its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKeyView {
    /// The key's id.
    pub key_id: ApiKeyId,
    /// The name its owner chose.
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// Its own spending limit (`None`: only the balance limits it).
    pub credit_limit: Option<Credits>,
    /// What is left of the limit.
    pub credits_left: Option<Credits>,
    /// Routes it may call; empty means every route.
    pub permitted_routes: Vec<Route>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last admitted a request.
    pub last_used_at: Option<Timestamp>,
    /// Requests per minute it may make (`None`: no limit of its own).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute it may use (`None`: no limit of its own).
    #[serde(default)]
    pub tpm: Option<u64>,
    /// What it may spend per UTC day or month (`None`: no budget).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Its response-cache settings (default TTL, shared namespace).
    #[serde(default)]
    pub cache: KeyCacheSettings,
}

impl From<&ApiKey> for ApiKeyView {
    fn from(k: &ApiKey) -> Self {
        ApiKeyView {
            key_id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            credit_limit: k.credit_limit,
            credits_left: k.credits_left,
            permitted_routes: k.permitted_routes.clone(),
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            rpm: k.rate_limits.rpm,
            tpm: k.rate_limits.tpm,
            budget: k.budget,
            cache: k.cache,
        }
    }
}

/// `GET /v1/me`: the signed-in user's account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeResponse {
    /// The user's id.
    pub user_id: UserId,
    /// Sign-in email.
    pub email: String,
    /// Micro-credits available.
    pub credits: Credits,
    /// Whether the user may use the admin API.
    pub is_admin: bool,
    /// Set while the account is suspended.
    pub suspended: Option<Suspension>,
    /// When the account was created.
    pub created_at: Timestamp,
    /// The user's provider account.
    pub provider_id: Option<ProviderId>,
    /// Active (not revoked) API keys, oldest first.
    pub keys: Vec<ApiKeyView>,
    /// What the account may spend per UTC day or month over all its keys
    /// (`None`: no budget).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// What the budget counts in the current period: spent, or held by calls
    /// under way (`None` without a budget).
    #[serde(default)]
    pub budget_spent: Option<Credits>,
    /// When the account is mailed.
    #[serde(default)]
    pub alerts: Alerts,
}

/// `PATCH /v1/me` and `PATCH /v1/admin/users/{id}`: an account's budget or
/// alerts. Absent fields stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateAccountRequest {
    /// A spending limit per UTC day or month over all the account's keys,
    /// `{"limit": <micro-credits>, "period": "day"|"month"}`; `null` removes it.
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub budget: Option<Option<Budget>>,
    /// The alerts, replacing the ones set: `{"balance_below":
    /// <micro-credits>|null, "budget_percent": 1..100|null}` (an absent
    /// field is `null`); `null` removes them all. Unknown fields are refused.
    #[serde(
        default,
        deserialize_with = "strict_alerts",
        skip_serializing_if = "Option::is_none"
    )]
    pub alerts: Option<Alerts>,
}

/// Alerts as a request sends them: a misspelt field is refused rather than
/// read as `null` (which would silently remove that alert). The stored form
/// stays lenient, so a field added later does not break older readers.
fn strict_alerts<'de, D>(d: D) -> Result<Option<Alerts>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        #[serde(default)]
        balance_below: Option<Credits>,
        #[serde(default)]
        budget_percent: Option<u8>,
    }
    let alerts = Option::<Strict>::deserialize(d)?.map(|s| Alerts {
        balance_below: s.balance_below,
        budget_percent: s.budget_percent,
    });
    Ok(Some(alerts.unwrap_or_default()))
}

/// `POST /v1/me/keys`: create an API key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateKeyRequest {
    /// A name (default `key`).
    #[serde(default)]
    pub name: Option<String>,
    /// A spending limit in micro-credits (none: only the balance limits it).
    #[serde(default)]
    pub credit_limit: Option<Credits>,
    /// Routes it may call; empty or absent means every route.
    #[serde(default)]
    pub permitted_routes: Vec<Route>,
}

/// A new API key: the secret is shown here once and never again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateKeyResponse {
    /// The key.
    pub key: ApiKeyView,
    /// The secret (redacted in `Debug`).
    pub api_key: Secret,
}

/// `PATCH /v1/me/keys/{id}` and `PATCH /v1/admin/keys/{id}`: change a key.
/// Absent fields stay as they are; `null` removes a limit (`credit_limit`,
/// `rpm`, `tpm`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateKeyRequest {
    /// A new name.
    #[serde(default)]
    pub name: Option<String>,
    /// A new limit; `null` removes it.
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub credit_limit: Option<Option<Credits>>,
    /// New permitted routes (empty: every route).
    #[serde(default)]
    pub permitted_routes: Option<Vec<Route>>,
    /// Requests per minute (at least 1); `null` removes the limit.
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub rpm: Option<Option<u32>>,
    /// Tokens per minute (at least 1); `null` removes the limit.
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub tpm: Option<Option<u64>>,
    /// A spending limit per UTC day or month,
    /// `{"limit": <micro-credits>, "period": "day"|"month"}`; `null` removes it.
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub budget: Option<Option<Budget>>,
    /// Seconds a call's answer is kept in the response cache when the call
    /// sends no `X-Cxmpute-Cache` header (1 up to the host's maximum);
    /// `null` removes it (such calls are not cached).
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_ttl_secs: Option<Option<u32>>,
    /// Whether the key's calls share cached answers with other accounts'
    /// keys that have sharing on. Admins only (`PATCH /v1/admin/keys/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_shared: Option<bool>,
}

/// Tells an absent field (`None`, by `default`) from an explicit `null` (`Some(None)`).
fn present_nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// One day of a user's usage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DayUsage {
    /// The UTC day.
    pub day: Day,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other units.
    pub units: u64,
    /// Micro-credits charged.
    pub charged: Credits,
}

/// A user's usage of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceUsage {
    /// The service.
    pub service: Service,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other units.
    pub units: u64,
    /// Micro-credits charged.
    pub charged: Credits,
}

/// One of a user's latest requests (what was asked and paid, not who served it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecentRequest {
    /// The request.
    pub request_id: RequestId,
    /// The route called.
    pub route: Route,
    /// The model that served it (or was tried last).
    pub model: String,
    /// The key used.
    pub key_id: ApiKeyId,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other units.
    pub units: u64,
    /// Whether it succeeded.
    pub success: bool,
    /// Wall time in milliseconds.
    pub latency_ms: u64,
    /// The calling application, if named.
    pub app: Option<String>,
    /// When it finished.
    pub at: Timestamp,
    /// What it cost.
    pub charged: Credits,
    /// The name asked for when another model served it (a fallback of a
    /// `models` list, or an alias); left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// Whether it was answered from the response cache.
    #[serde(default)]
    pub cache_hit: bool,
}

/// `GET /v1/me/usage?days=N`: usage per day and per service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageResponse {
    /// First day covered.
    pub from: Day,
    /// Last day covered (today).
    pub to: Day,
    /// One entry per day of the range, oldest first (days without use are zero).
    pub days: Vec<DayUsage>,
    /// Per service, over the range.
    pub services: Vec<ServiceUsage>,
    /// The latest requests (at most 20), newest first; these show at once,
    /// the counters above after the next statistics flush.
    pub recent: Vec<RecentRequest>,
}

/// `GET /v1/provider/account`: a provider's account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProviderAccountResponse {
    /// The provider's id.
    pub provider_id: ProviderId,
    /// Contact email.
    pub email: String,
    /// The user account it belongs to, if any.
    pub user_id: Option<UserId>,
    /// Rewards earned and not paid out.
    pub earnings: Credits,
    /// Set while the provider is suspended.
    pub suspended: Option<Suspension>,
    /// When it was created.
    pub created_at: Timestamp,
    /// Nodes registered and not ended.
    pub provisions: usize,
}

/// `POST /v1/provider/account/key`: a new provider key (shown once); the old
/// one stopped working.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProviderKeyResponse {
    /// The provider.
    pub provider_id: ProviderId,
    /// The new key (redacted in `Debug`).
    pub provider_key: Secret,
}

/// One day of a provider's earnings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DayEarnings {
    /// The UTC day.
    pub day: Day,
    /// Requests served.
    pub requests: u64,
    /// Micro-credits earned.
    pub rewarded: Credits,
}

/// `GET /v1/provider/account/earnings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EarningsResponse {
    /// The provider.
    pub provider_id: ProviderId,
    /// Everything earned and not paid out.
    pub total: Credits,
    /// Earned over the last 30 days.
    pub last_30_days: Credits,
    /// One entry per day of the last 30 days, oldest first.
    pub days: Vec<DayEarnings>,
}

/// `POST /v1/admin/users/{id}/suspend` and `.../providers/{id}/suspend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SuspendRequest {
    /// Why (recorded, shown to the account holder).
    pub reason: String,
}

/// A user as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminUserView {
    /// The user's id.
    pub user_id: UserId,
    /// Sign-in email.
    pub email: String,
    /// Micro-credits available.
    pub credits: Credits,
    /// Whether the user is an admin (stored flag or configuration).
    pub is_admin: bool,
    /// Set while suspended.
    pub suspended: Option<Suspension>,
    /// When it was created.
    pub created_at: Timestamp,
    /// Its provider account, if any.
    pub provider_id: Option<ProviderId>,
    /// Its budget per UTC day or month (`None`: no budget).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// When it is mailed.
    #[serde(default)]
    pub alerts: Alerts,
}

/// `GET /v1/admin/users/{id}`: a user with its keys and credit grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminUserDetail {
    /// The user.
    pub user: AdminUserView,
    /// Every key, revoked ones included (never secrets).
    pub keys: Vec<ApiKeyView>,
    /// Credit grants, oldest first.
    pub grants: Vec<CreditGrant>,
}

/// A provider as an admin sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminProviderView {
    /// The provider's id.
    pub provider_id: ProviderId,
    /// Contact email.
    pub email: String,
    /// The user account it belongs to, if any.
    pub user_id: Option<UserId>,
    /// Unpaid earnings.
    pub earnings: Credits,
    /// Set while suspended.
    pub suspended: Option<Suspension>,
    /// When it was created.
    pub created_at: Timestamp,
    /// Its nodes.
    pub provisions: Vec<ProvisionView>,
}

/// A node as an admin sees it: the provider's view plus its owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminProvisionView {
    /// The provider that owns it.
    pub provider_id: ProviderId,
    /// The node.
    #[serde(flatten)]
    pub provision: ProvisionView,
}

/// `POST /v1/admin/notifications` and `PUT /v1/admin/notifications/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NotificationRequest {
    /// Title.
    pub title: String,
    /// Banner text.
    #[serde(default)]
    pub banner: String,
    /// Popup content.
    #[serde(default)]
    pub popup: String,
    /// Shown from (milliseconds since the epoch).
    pub starts_at: Timestamp,
    /// Shown until (exclusive).
    pub ends_at: Timestamp,
    /// Where it is shown.
    pub placements: Vec<Placement>,
}

// ---- provider network ---------------------------------------------------------

/// Device diagnostics a node reports at registration. Lenient on purpose:
/// every field is optional and unknown fields are ignored, so node programs
/// of any version can report what they know; a field of the wrong type is a
/// 400. camelCase names (the original node's) are accepted too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceDiagnostics {
    /// The operating system: an object, or just its name as a string.
    #[serde(
        default,
        deserialize_with = "os_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub os: Option<OsInfo>,
    /// The GPU, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuInfo>,
    /// The CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuInfo>,
    /// Main memory.
    #[serde(default, alias = "ram", skip_serializing_if = "Option::is_none")]
    pub memory: Option<CapacityInfo>,
    /// Storage.
    #[serde(default, alias = "disk", skip_serializing_if = "Option::is_none")]
    pub storage: Option<CapacityInfo>,
}

/// A node's operating system.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OsInfo {
    /// `linux`, `macos`, `windows`...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Its name, e.g. `Ubuntu 24.04`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

/// `os` as an [`OsInfo`] object or a plain name (`"Ubuntu 24.04"`).
fn os_lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<OsInfo>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Os {
        Name(String),
        Info(OsInfo),
    }
    Ok(Option::<Os>::deserialize(d)?.map(|os| match os {
        Os::Name(name) => OsInfo {
            name: Some(name),
            ..OsInfo::default()
        },
        Os::Info(info) => info,
    }))
}

/// A node's GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuInfo {
    /// Its name, e.g. `NVIDIA GeForce RTX 4090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its memory (VRAM) in MB: what the node's tier is decided by.
    #[serde(
        default,
        alias = "memoryMb",
        alias = "memoryMB",
        alias = "vram_mb",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_mb: Option<u64>,
    /// Whether it is integrated (shares main memory) rather than dedicated.
    #[serde(
        default,
        alias = "isIntegrated",
        skip_serializing_if = "Option::is_none"
    )]
    pub integrated: Option<bool>,
    /// Whether CUDA is available.
    #[serde(
        default,
        alias = "isCudaAvailable",
        skip_serializing_if = "Option::is_none"
    )]
    pub cuda: Option<bool>,
    /// How many GPUs the machine has (`memory_mb` is the largest one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

/// A node's CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuInfo {
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Physical cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    /// Hardware threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Architecture, e.g. `x86_64`, `arm64`.
    #[serde(default, alias = "arch", skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// Total, used and free space of a memory or storage device, in MB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CapacityInfo {
    /// Total.
    #[serde(default, alias = "totalMb", skip_serializing_if = "Option::is_none")]
    pub total_mb: Option<u64>,
    /// Used.
    #[serde(default, alias = "usedMb", skip_serializing_if = "Option::is_none")]
    pub used_mb: Option<u64>,
    /// Free.
    #[serde(default, alias = "freeMb", skip_serializing_if = "Option::is_none")]
    pub free_mb: Option<u64>,
}

impl DeviceDiagnostics {
    /// Reads diagnostics from a JSON value (`null`: none reported). A value
    /// that is not an object, or a field of the wrong type, is a 400.
    pub fn from_json(v: &Value) -> Result<Self, crate::Error> {
        if v.is_null() {
            return Ok(Self::default());
        }
        Self::deserialize(v)
            .map_err(|e| crate::Error::InvalidInput(format!("invalid device diagnostics: {e}")))
    }

    /// GPU memory in MB (0 without a GPU).
    pub fn vram_mb(&self) -> u64 {
        self.gpu.as_ref().and_then(|g| g.memory_mb).unwrap_or(0)
    }

    /// The node's capacity tier, by VRAM (see [`tier_for_vram`]).
    pub fn tier(&self) -> u8 {
        tier_for_vram(self.vram_mb())
    }
}

/// The VRAM tier of a node (the original's thresholds): under 4,096 MB tier 1,
/// under 8,192 tier 2, under 22,528 tier 3, else tier 4.
pub fn tier_for_vram(vram_mb: u64) -> u8 {
    match vram_mb {
        0..4_096 => 1,
        4_096..8_192 => 2,
        8_192..22_528 => 3,
        _ => 4,
    }
}

/// `POST /v1/provider/provisions/{id}/start`: ask what to serve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartProvisionRequest {
    /// The services the node is able to run (empty: any its tier allows).
    #[serde(default)]
    pub services: Vec<Service>,
}

/// What the broker asks a starting node to serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartProvisionResponse {
    /// The node.
    pub provision_id: ProvisionId,
    /// `starting`.
    pub state: ProvisionState,
    /// Its capacity tier.
    pub tier: u8,
    /// Start these, then report ready with the ones that started.
    pub services: Vec<ServedModel>,
}

/// `POST /v1/provider/provisions/{id}/ready`: the node is serving.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadyProvisionRequest {
    /// The node's base URL (the broker calls `{endpoint}/v1/...` and
    /// `{endpoint}/heartbeat`).
    pub endpoint: String,
    /// The services it started; it joins exactly these pools.
    pub services: Vec<ServedModel>,
}
