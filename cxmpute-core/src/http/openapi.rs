//! The OpenAPI document of the whole HTTP surface, served at `GET /openapi.json`.
//!
//! Generated from the code: every handler carries a `#[utoipa::path]`
//! annotation next to it and `ApiDoc` lists them; schemas come from the
//! types' `ToSchema` derives. The gateway routes share one handler, so each
//! is described by a documentation-only function in `gateway`.
//!
//! Nothing keeps a new route from being added without documentation at
//! compile time, so a test does: every path the router serves
//! ([`super::paths`], recorded by the route table) is asked which methods
//! it allows, and that set must equal the document's.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::Routes;

/// The document: every route of [`super::router`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cxmpute broker",
        description = "An OpenAI-compatible gateway to a marketplace of AI compute, \
                       with user, provider and admin APIs. Money is in integer micro-credits.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        gateway::healthz,
        gateway::models,
        gateway::catalogue,
        gateway::chat_completions,
        gateway::embeddings,
        gateway::audio_speech,
        gateway::tts,
        gateway::scrape,
        gateway::caption,
        gateway::query,
        gateway::detect,
        gateway::point,
        super::stats::network,
        super::stats::me,
        super::stats::provider,
        super::stats::admin,
        super::stats::metrics,
        super::dashboard::index,
        super::dashboard::app_js,
        super::dashboard::style_css,
        super::pages::page,
        openapi_json,
        super::account::request_code,
        super::account::verify,
        super::account::refresh,
        super::account::logout,
        super::account::me,
        super::account::update_account,
        super::account::usage,
        super::account::list_keys,
        super::account::create_key,
        super::account::update_key,
        super::account::revoke_key,
        super::account::active_notifications,
        super::provider::register_provision,
        super::provider::list_provisions,
        super::provider::get_provision,
        super::provider::start_provision,
        super::provider::ready_provision,
        super::provider::heartbeat,
        super::provider::end_provision,
        super::provider::delete_provision,
        super::provider_account::account,
        super::provider_account::rotate_key,
        super::provider_account::earnings,
        super::provider_account::provisions,
        super::admin::create_user,
        super::admin::search_users,
        super::admin::user_detail,
        super::admin::update_user,
        super::admin::update_key,
        super::admin::grant_credits,
        super::admin::suspend_user,
        super::admin::unsuspend_user,
        super::admin::create_provider,
        super::admin::provider_detail,
        super::admin::suspend_provider,
        super::admin::unsuspend_provider,
        super::admin::provisions,
        super::admin::disconnect,
        super::admin::put_price,
        super::admin::prices,
        super::admin::notifications,
        super::admin::create_notification,
        super::admin::replace_notification,
        super::admin::delete_notification,
        super::admin::catalogue,
        super::admin::put_catalogue,
        super::admin::delete_catalogue,
        super::admin::aliases,
        super::admin::put_alias,
        super::admin::delete_alias,
        super::admin::reward_policy,
    ),
    components(schemas(ErrorSchema)),
    modifiers(&Security),
    tags(
        (name = "gateway", description = "OpenAI-compatible and Cxmpute services, paid in credits"),
        (name = "stats", description = "Usage analytics over date ranges"),
        (name = "observability", description = "Health, metrics and this document"),
        (name = "dashboard", description = "The web dashboard"),
        (name = "auth", description = "Sign-in by emailed code, sessions"),
        (name = "account", description = "The signed-in user's account and keys"),
        (name = "provider", description = "Provider accounts and their nodes"),
        (name = "admin", description = "Administration: accounts, nodes, the catalogue and its aliases, prices, rewards, notifications"),
    )
)]
pub(crate) struct ApiDoc;

/// The security schemes the annotations refer to, and unique operation ids.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // Handlers are named within their area (`me`, `provisions`), so the
        // ids utoipa takes from them repeat across areas: prefix the tag.
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
                if let (Some(tag), Some(id)) = (tag, op.operation_id.as_mut()) {
                    *id = format!("{tag}_{id}");
                }
            }
        }
        let c = doc.components.get_or_insert_with(Default::default);
        let bearer = |d: &str| {
            let mut h = Http::new(HttpAuthScheme::Bearer);
            h.description = Some(d.to_owned());
            SecurityScheme::Http(h)
        };
        c.add_security_scheme("api_key", bearer("A user's API key (`sk-...`)."));
        c.add_security_scheme("provider_key", bearer("A provider key (`pk-...`)."));
        c.add_security_scheme(
            "session",
            bearer("A signed-in session's access token (a JWT from `/v1/auth/verify`)."),
        );
        c.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                super::account::ACCESS_COOKIE,
                "The access-token cookie set by the sign-in routes.",
            ))),
        );
    }
}

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the document serializes")
    })
}

pub(super) fn routes() -> Routes {
    Routes::new().route("/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "observability",
    responses((status = 200, description = "The OpenAPI document of this API", content_type = "application/json", body = Object)))]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}

/// The gateway routes, described one by one (they share one handler).
// Documentation only: utoipa reads the functions' attributes, nothing calls them.
#[allow(dead_code)]
pub(crate) mod gateway {
    use super::ErrorSchema;
    use crate::wire::*;

    #[utoipa::path(get, path = "/healthz", tag = "observability",
        responses((status = 200, description = "The process is up", content_type = "text/plain", body = String)))]
    /// `GET /healthz`: the process is up.
    pub(crate) fn healthz() {}

    #[utoipa::path(get, path = "/v1/models", tag = "gateway",
        description = "The models served now, then the operator's aliases (`owned_by`: \
            `cxmpute-alias`, with the `models` they stand for).",
        responses((status = 200, description = "The models served now, with node counts", body = ModelList)))]
    /// `GET /v1/models`: the models served now.
    pub(crate) fn models() {}

    #[utoipa::path(get, path = "/v1/catalogue", tag = "gateway",
        description = "What the network offers: every model of the catalogue with its price \
            and the healthy nodes serving it now, and the aliases. Public, like OpenRouter's \
            model list.",
        responses((status = 200, description = "The catalogue with prices", body = CatalogueList)))]
    /// `GET /v1/catalogue`: the catalogue with prices.
    pub(crate) fn catalogue() {}

    macro_rules! gateway_doc {
        ($name:ident, $path:literal, $what:literal, $req:ty, $answer:literal, $ct:literal, $resp:ty) => {
            #[doc = $what]
            #[utoipa::path(post, path = $path, tag = "gateway",
                description = $what,
                security(("api_key" = [])),
                params(
                    ("X-Title" = Option<String>, Header, description = "The calling application, for per-application usage"),
                    ("HTTP-Referer" = Option<String>, Header, description = "The calling application, when X-Title is absent"),
                    ("X-Cxmpute-Cache" = Option<String>, Header, description = "The response cache (chat completions and embeddings): `ttl=<seconds>` answers from a kept answer when there is one (charged the cache price) and keeps this answer for that long; `no-store` (or `ttl=0`) neither reads nor keeps. Absent: the key's default TTL, if it has one"),
                ),
                request_body(content = $req, content_type = "application/json"),
                responses(
                    (status = 200, description = $answer, content_type = $ct, body = $resp,
                        headers(("X-Cxmpute-Cache" = String, description = "`hit` or `miss`, on calls that used the response cache"))),
                    (status = 400, description = "Malformed or missing fields", body = ErrorSchema),
                    (status = 401, description = "Missing, unknown or revoked key", body = ErrorSchema),
                    (status = 402, description = "The account's balance does not cover the request", body = ErrorSchema),
                    (status = 403, description = "Suspended, or the key may not call this route", body = ErrorSchema),
                    (status = 404, description = "Unknown model", body = ErrorSchema),
                    (status = 413, description = "Body over the limit", body = ErrorSchema),
                    (status = 429, description = "The key's credit limit is spent", body = ErrorSchema),
                    (status = 502, description = "Every node tried failed", body = ErrorSchema),
                    (status = 503, description = "No healthy node serves the model", body = ErrorSchema),
                    (status = 504, description = "Every node tried timed out", body = ErrorSchema),
                ))]
            pub(crate) fn $name() {}
        };
    }

    gateway_doc!(
        chat_completions,
        "/v1/chat/completions",
        "Chat completions (OpenAI shape); `stream: true` answers server-sent events.",
        ChatCompletionRequest,
        "A completion, or an event stream",
        "application/json",
        ChatCompletionResponse
    );
    gateway_doc!(
        embeddings,
        "/v1/embeddings",
        "Embeddings (OpenAI shape).",
        EmbeddingsRequest,
        "The embeddings",
        "application/json",
        EmbeddingsResponse
    );
    gateway_doc!(
        audio_speech,
        "/v1/audio/speech",
        "Text to speech (OpenAI shape).",
        SpeechRequest,
        "The audio",
        "audio/wav",
        super::Binary
    );
    gateway_doc!(
        tts,
        "/v1/tts",
        "Text to speech (Cxmpute shape: `text`, `voice`).",
        TtsRequest,
        "The audio",
        "audio/wav",
        super::Binary
    );
    gateway_doc!(
        scrape,
        "/v1/scrape",
        "Fetch pages as HTML, Markdown or text.",
        ScrapeRequest,
        "The pages",
        "application/json",
        ScrapeResponse
    );
    gateway_doc!(
        caption,
        "/v1/m/caption",
        "Caption an image.",
        VisionRequest,
        "The caption",
        "application/json",
        CaptionResponse
    );
    gateway_doc!(
        query,
        "/v1/m/query",
        "Answer a question about an image.",
        VisionRequest,
        "The answer",
        "application/json",
        QueryResponse
    );
    gateway_doc!(
        detect,
        "/v1/m/detect",
        "Find objects in an image.",
        VisionRequest,
        "Bounding boxes",
        "application/json",
        DetectResponse
    );
    gateway_doc!(
        point,
        "/v1/m/point",
        "Point at objects in an image.",
        VisionRequest,
        "Points",
        "application/json",
        PointResponse
    );
}

/// OpenAI's error JSON: `{"error": {"message", "type", "code", "param"}}`.
/// A schema only: the body itself is [`crate::wire::ErrorBody`].
#[derive(Debug)]
pub(crate) struct ErrorSchema;

impl PartialSchema for ErrorSchema {
    fn schema() -> RefOr<Schema> {
        let text = |d: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(d))
        };
        let detail = ObjectBuilder::new()
            .property("message", text("What went wrong, for people."))
            .property(
                "type",
                text("The error's kind, e.g. `invalid_request_error`."),
            )
            .property("code", text("A stable code, e.g. `invalid_api_key`."))
            .property("param", text("The request field at fault, when one is."))
            .required("message")
            .required("type");
        ObjectBuilder::new()
            .property("error", detail)
            .required("error")
            .into()
    }
}

impl ToSchema for ErrorSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Error")
    }
}

/// Opaque bytes (audio): a binary string in the schema.
#[derive(Debug)]
pub(crate) struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        use utoipa::openapi::schema::{KnownFormat, SchemaFormat};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for Binary {}

/// The refusals every authenticated route can answer (400, 401, 403, 404,
/// 409), each with OpenAI's error JSON. Used as `responses(..., Refusals)`.
#[derive(Debug)]
pub(crate) struct Refusals;

impl utoipa::IntoResponses for Refusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        let error = |d: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(d)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("Error")))
                        .build(),
                )
                .build()
                .into()
        };
        [
            ("400", "Malformed or missing fields"),
            ("401", "Missing, invalid or expired credentials"),
            ("403", "Not allowed to the caller (suspended, not an admin)"),
            ("404", "Not found, or not the caller's"),
            ("409", "Conflicts with the current state"),
        ]
        .into_iter()
        .map(|(code, d)| (code.to_owned(), error(d)))
        .collect()
    }
}
