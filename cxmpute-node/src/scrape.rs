//! The built-in scraper: every page through the egress guard, then HTML to
//! Markdown (htmd) or plain text (html2text).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use cxmpute_core::egress::{self, EgressRules};
use cxmpute_core::services::parse_body;
use cxmpute_core::wire::*;
use cxmpute_core::{Error, Result};

use crate::proxy::served;
use crate::server::Serving;
use crate::ScrapeConfig;

/// Width of plain-text output: wide enough that prose is not re-wrapped
/// much, narrow enough for tables to stay readable.
const TEXT_WIDTH: usize = 120;

/// `POST /v1/scrape`: one result per URL, in order.
pub(crate) async fn scrape(s: &Serving, body: &[u8]) -> Result<Response> {
    let cfg = s
        .cfg
        .scrape
        .as_ref()
        .ok_or_else(|| Error::NotFound("scraping on this node".into()))?;
    let req: ScrapeRequest = parse_body(body)?;
    let model = req.model.as_deref().unwrap_or(DEFAULT_SCRAPE_MODEL);
    served(std::slice::from_ref(&cfg.model), model)?;
    if req.urls.is_empty() || req.urls.len() > MAX_SCRAPE_URLS {
        return Err(Error::InvalidInput(format!(
            "`urls` must name 1 to {MAX_SCRAPE_URLS} URLs"
        )));
    }
    let deadline = tokio::time::Instant::now() + cfg.deadline;
    // Each fetch is its own future, buffered in order; all are awaited here,
    // so they borrow the rules and the configuration.
    let rules = &s.cfg.egress;
    let format = req.format;
    let pages = req.urls.into_iter().map(move |url| async move {
        match tokio::time::timeout_at(deadline, scrape_one(&url, format, rules, cfg)).await {
            Ok(r) => r,
            Err(_) => failed(
                &url,
                "the scrape's time ran out before this page was fetched",
            ),
        }
    });
    let results: Vec<ScrapeResult> = futures::stream::iter(pages)
        .buffered(cfg.concurrency.max(1))
        .collect()
        .await;
    let body = serde_json::to_vec(&ScrapeResponse { results })
        .map_err(|e| Error::backend("encoding the scrape answer", e))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn failed(url: &str, why: impl Into<String>) -> ScrapeResult {
    ScrapeResult {
        url: url.to_owned(),
        success: false,
        status: None,
        final_url: None,
        content: None,
        error: Some(why.into()),
    }
}

async fn scrape_one(
    url: &str,
    format: ScrapeFormat,
    rules: &EgressRules,
    cfg: &ScrapeConfig,
) -> ScrapeResult {
    let page = match egress::fetch(url, rules, &cfg.limits).await {
        Ok(p) => p,
        Err(e) => return failed(url, e.to_string()),
    };
    let ct = page.content_type.clone().unwrap_or_default();
    let is_html = ct.contains("html") || (ct.is_empty() && looks_like_html(&page.body));
    let is_text = is_html
        || ct.starts_with("text/")
        || ct.contains("json")
        || ct.contains("xml")
        || (ct.is_empty() && std::str::from_utf8(&page.body).is_ok());
    let mut r = ScrapeResult {
        url: url.to_owned(),
        success: false,
        status: Some(page.status),
        final_url: Some(page.url.to_string()),
        content: None,
        error: None,
    };
    if !is_text {
        r.error = Some(format!("not a text page (content type `{ct}`)"));
        return r;
    }
    let text = String::from_utf8_lossy(&page.body).into_owned();
    let converted = if is_html && format != ScrapeFormat::Html {
        // Conversion of a large page is CPU work: keep it off the reactor.
        tokio::task::spawn_blocking(move || convert(&text, format))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    } else {
        Ok(text)
    };
    match converted {
        Ok(c) => {
            r.success = true;
            r.content = Some(c);
        }
        Err(e) => r.error = Some(format!("converting the page failed: {e}")),
    }
    r
}

fn looks_like_html(body: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&body[..body.len().min(1024)]).to_ascii_lowercase();
    head.contains("<html") || head.contains("<!doctype html") || head.contains("<body")
}

/// HTML to Markdown or plain text.
pub(crate) fn convert(html: &str, format: ScrapeFormat) -> std::result::Result<String, String> {
    match format {
        ScrapeFormat::Html => Ok(html.to_owned()),
        ScrapeFormat::Markdown => {
            let conv = htmd::HtmlToMarkdown::builder()
                .skip_tags(vec!["script", "style", "noscript", "iframe", "svg"])
                .build();
            conv.convert(html).map_err(|e| e.to_string())
        }
        ScrapeFormat::Text => html2text::config::plain_no_decorate()
            .string_from_read(html.as_bytes(), TEXT_WIDTH)
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_becomes_markdown_and_text() {
        let html = "<html><head><style>p{}</style><script>x()</script></head><body>\
                    <h1>Title</h1><p>Some <b>bold</b> <a href=\"https://a.example/\">link</a>.</p>\
                    <ul><li>one</li><li>two</li></ul></body></html>";
        let md = convert(html, ScrapeFormat::Markdown).unwrap();
        assert!(md.contains("# Title"), "{md}");
        assert!(md.contains("**bold**"), "{md}");
        assert!(md.contains("[link](https://a.example/)"), "{md}");
        assert!(!md.contains("x()"), "{md}");
        let text = convert(html, ScrapeFormat::Text).unwrap();
        assert!(
            text.contains("Title") && text.contains("bold") && text.contains("two"),
            "{text}"
        );
        assert!(!text.contains('<') && !text.contains("**"), "{text}");
    }
}
