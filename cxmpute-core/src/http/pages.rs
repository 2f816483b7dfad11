//! `GET /pages/{token}`: the pages scraping canaries ask nodes to fetch
//! (see [`crate::verify`]). A page exists only while its canary runs, under
//! an unguessable token; anything else is a 404.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{ApiError, Routes};
use crate::broker::Broker;
use crate::error::Error;

/// The page routes.
pub(super) fn routes() -> Routes {
    Routes::new().route("/pages/{token}", get(page))
}

/// A page a scraping canary names.
#[utoipa::path(get, path = "/pages/{token}", tag = "observability",
    params(("token" = String, Path, description = "The page's token")),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 404, description = "No such page (or no longer)", body = crate::http::openapi::ErrorSchema),
    ))]
pub(super) async fn page(State(b): State<Broker>, Path(token): Path<String>) -> Response {
    match b.canary_page(&token) {
        Some(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        None => ApiError(Error::NotFound("no such page".into())).into_response(),
    }
}
