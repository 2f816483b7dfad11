//! Scraping: `POST /v1/scrape`.
//!
//! The broker checks the URLs' syntax (whole-request 400 for a malformed
//! one); the node fetches each through its egress guard and reports per URL.
//! Metered as the URLs actually fetched: a URL the node could not fetch
//! (refused address, timeout) costs nothing.

use bytes::Bytes;

use super::{check_model, encode, invalid, parse_body, AnswerKind, Prepared};
use crate::egress;
use crate::error::Result;
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

/// `POST /v1/scrape`.
pub(super) fn prepare_scrape(body: &Bytes) -> Result<Prepared> {
    let mut req: ScrapeRequest = parse_body(body)?;
    let model = check_model(req.model.as_deref().unwrap_or(DEFAULT_SCRAPE_MODEL))?;
    if req.urls.is_empty() {
        return Err(invalid("`urls` must name at least one URL"));
    }
    if req.urls.len() > MAX_SCRAPE_URLS {
        return Err(invalid(format!(
            "`urls` has {} URLs; at most {MAX_SCRAPE_URLS} are allowed",
            req.urls.len()
        )));
    }
    for (i, u) in req.urls.iter_mut().enumerate() {
        let trimmed = u.trim();
        if trimmed.len() > MAX_URL_LEN {
            return Err(invalid(format!(
                "urls[{i}] is longer than {MAX_URL_LEN} characters"
            )));
        }
        egress::parse_http_url(trimmed).map_err(|e| invalid(format!("urls[{i}]: {e}")))?;
        *u = trimmed.to_owned();
    }
    req.model = Some(model.clone());
    let n = req.urls.len() as u64;
    Ok(Prepared {
        route: Route::Scrape,
        models: vec![model.clone()],
        model,
        body: encode(&req)?,
        kind: AnswerKind::Json(meter_scrape),
        bound: Meter {
            input_tokens: 0,
            output_tokens: 0,
            units: n,
        },
        fallback_input: 0,
    })
}

/// One result per requested URL, in order, or the answer is not acceptable.
fn meter_scrape(prep: &Prepared, body: &[u8]) -> std::result::Result<Meter, String> {
    let r: ScrapeResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a scrape answer: {e}"))?;
    let asked: ScrapeRequest =
        serde_json::from_slice(&prep.body).map_err(|e| format!("scrape request: {e}"))?;
    if r.results.len() != asked.urls.len() {
        return Err(format!(
            "scrape answer has {} results for {} URLs",
            r.results.len(),
            asked.urls.len()
        ));
    }
    if r.results
        .iter()
        .zip(&asked.urls)
        .any(|(got, want)| &got.url != want)
    {
        return Err("scrape answer does not follow the requested URLs".into());
    }
    let fetched = r.results.iter().filter(|x| x.success).count() as u64;
    Ok(Meter {
        input_tokens: 0,
        output_tokens: 0,
        units: fetched,
    }
    .clamp_to(prep.bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_counted_checked_and_capped() {
        let p =
            prepare_scrape(&Bytes::from_static(br#"{"urls":[" https://a.example/ "]}"#)).unwrap();
        assert_eq!((p.model.as_str(), p.bound.units), (DEFAULT_SCRAPE_MODEL, 1));
        let sent: ScrapeRequest = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent.urls, ["https://a.example/"]);
        assert_eq!(sent.format, ScrapeFormat::Html);
        let many: Vec<String> = (0..51).map(|i| format!("https://a.example/{i}")).collect();
        let body = serde_json::json!({ "urls": many });
        assert!(prepare_scrape(&Bytes::from(body.to_string())).is_err());
        for bad in [
            r#"{"urls":[]}"#,
            r#"{}"#,
            r#"{"urls":["ftp://a.example/"]}"#,
            r#"{"urls":["not a url"]}"#,
            r#"{"urls":["https://a.example/"],"format":"pdf"}"#,
        ] {
            assert!(prepare_scrape(&Bytes::from(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_fetched_urls_are_metered_and_answers_must_match() {
        let p = prepare_scrape(&Bytes::from_static(
            br#"{"urls":["https://a.example/","https://b.example/"]}"#,
        ))
        .unwrap();
        let ok =
            br#"{"results":[{"url":"https://a.example/","success":true,"status":200,"content":"x"},
            {"url":"https://b.example/","success":false,"error":"refused"}]}"#;
        assert_eq!(meter_scrape(&p, ok).unwrap().units, 1);
        let short = br#"{"results":[{"url":"https://a.example/","success":true}]}"#;
        assert!(meter_scrape(&p, short).is_err());
        let swapped = br#"{"results":[{"url":"https://b.example/","success":true},
            {"url":"https://a.example/","success":true}]}"#;
        assert!(meter_scrape(&p, swapped).is_err());
    }
}
