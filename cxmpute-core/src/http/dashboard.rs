//! The web dashboard at `/dashboard`: static files compiled into the binary,
//! drawing its charts from the JSON stats routes. No CDN, no build step.
//!
//! The page is served with a strict Content-Security-Policy (scripts,
//! styles and requests from this origin only; no framing), so even a
//! hostile application or model name that slipped past the page's own
//! escaping could not run script.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Routes;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The dashboard routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/dashboard", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/style.css", get(style_css))
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Files change with the binary; a short cache keeps upgrades visible.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

/// The dashboard page.
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
pub(super) async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// The dashboard's script.
#[utoipa::path(get, path = "/dashboard/app.js", tag = "dashboard",
    responses((status = 200, description = "The dashboard's script", content_type = "text/javascript", body = String)))]
pub(super) async fn app_js() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

/// The dashboard's styles.
#[utoipa::path(get, path = "/dashboard/style.css", tag = "dashboard",
    responses((status = 200, description = "The dashboard's styles", content_type = "text/css", body = String)))]
pub(super) async fn style_css() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}
