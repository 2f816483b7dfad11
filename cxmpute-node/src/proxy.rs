//! Chat and embeddings proxied to an OpenAI-compatible upstream, and vision
//! through the upstream's image chat.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use cxmpute_core::egress;
use cxmpute_core::services::{data_url, decode_inline_image, parse_body, sniff_image};
use cxmpute_core::wire::*;
use cxmpute_core::{Error, Result, Route, Service};

use crate::server::Serving;
use crate::Upstream;

#[derive(Deserialize)]
struct ModelOnly {
    #[serde(default)]
    model: String,
}

/// `Ok` when `model` is one of `models`, else a 404 naming it.
pub(crate) fn served(models: &[String], model: &str) -> Result<()> {
    if models.iter().any(|m| m == model) {
        Ok(())
    } else {
        Err(Error::ModelNotFound(model.to_owned()))
    }
}

fn post(s: &Serving, up: &Upstream, path: &str) -> reqwest::RequestBuilder {
    let req = s
        .upstream_http
        .post(format!("{}{path}", up.base_url))
        .header(header::CONTENT_TYPE, "application/json");
    match &up.api_key {
        Some(k) => req.bearer_auth(k.expose()),
        None => req,
    }
}

/// The models an upstream lists at `GET /models`; empty when it lists
/// none or does not answer in time.
pub(crate) async fn upstream_models(http: &reqwest::Client, up: Option<&Upstream>) -> Vec<String> {
    let Some(up) = up else {
        return Vec::new();
    };
    let mut req = http.get(format!("{}/models", up.base_url));
    if let Some(k) = &up.api_key {
        req = req.bearer_auth(k.expose());
    }
    let fetched = async {
        let r = req.send().await.ok()?.error_for_status().ok()?;
        r.json::<Value>().await.ok()
    };
    let Ok(Some(v)) = tokio::time::timeout(std::time::Duration::from_secs(5), fetched).await else {
        return Vec::new();
    };
    v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Passes a chat or embeddings call through to the upstream: status, type
/// and bytes as they arrive (streams stay streams). A chat's image URLs are
/// fetched and inlined first ([`inline_chat_images`]).
pub(crate) async fn forward(
    s: &Serving,
    service: Service,
    path: &str,
    body: Bytes,
) -> Result<Response> {
    let up = s
        .cfg
        .upstream
        .as_ref()
        .ok_or_else(|| Error::NotFound(format!("{service} on this node")))?;
    let m: ModelOnly = parse_body(&body)?;
    let models = match service {
        Service::Chat => &s.cfg.chat_models,
        _ => &s.cfg.embedding_models,
    };
    served(models, &m.model)?;
    let body = match service {
        Service::Chat => inline_chat_images(s, body).await?,
        _ => body,
    };
    let resp = post(s, up, path)
        .body(body)
        .send()
        .await
        .map_err(|e| Error::Upstream(format!("the model server is unreachable: {e}")))?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| header::HeaderValue::from_static("application/json"));
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    Ok(out)
}

/// A chat body whose `http(s)` image URLs are replaced by the images
/// themselves, fetched here through the egress guard (all at once, each
/// capped in size and time): the model server never fetches a URL a caller
/// named, since it would do so unguarded, link-local metadata included. A
/// body without one is passed on as it is.
async fn inline_chat_images(s: &Serving, body: Bytes) -> Result<Bytes> {
    let mut v: Value = parse_body(&body)?;
    let mut found = Vec::new();
    for (i, m) in v["messages"].as_array().into_iter().flatten().enumerate() {
        for (j, part) in m["content"].as_array().into_iter().flatten().enumerate() {
            let image = &part["image_url"];
            let url = image["url"].as_str().or(image.as_str());
            if let Some(url) = url.filter(|u| !u.trim_start().starts_with("data:")) {
                found.push((i, j, url.to_owned()));
            }
        }
    }
    if found.is_empty() {
        return Ok(body);
    }
    let images =
        futures::future::try_join_all(found.iter().map(|(_, _, url)| fetch_image(s, url))).await?;
    for ((i, j, _), image) in found.iter().zip(images) {
        let part = &mut v["messages"][*i]["content"][*j]["image_url"];
        if part.is_object() {
            part["url"] = Value::String(image);
        } else {
            *part = json!({ "url": image });
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| Error::backend("encoding the chat request", e))
}

/// The most tokens a vision answer may take.
const VISION_MAX_TOKENS: u32 = 512;
/// The largest upstream answer read for vision.
const VISION_MAX_ANSWER: usize = 1 << 20;

/// A vision call: the image made inline, a chat request with an image part,
/// the answer parsed into the route's typed result.
pub(crate) async fn vision(s: &Serving, route: Route, body: &[u8]) -> Result<Response> {
    let req: VisionRequest = parse_body(body)?;
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| DEFAULT_VISION_MODEL.to_owned());
    served(&s.cfg.vision_models, &model)?;
    let up = s
        .cfg
        .vision_upstream
        .as_ref()
        .or(s.cfg.upstream.as_ref())
        .ok_or_else(|| Error::NotFound("vision on this node".into()))?;
    let image = image_data_url(s, &req).await?;
    let prompt = prompt(route, &req)?;
    let chat = json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": image}},
        ]}],
        "max_tokens": VISION_MAX_TOKENS,
        "temperature": 0,
        "stream": false,
    });
    let mut resp = post(s, up, "/chat/completions")
        .json(&chat)
        .send()
        .await
        .map_err(|e| Error::Upstream(format!("the model server is unreachable: {e}")))?;
    if !resp.status().is_success() {
        return Err(Error::Upstream(format!(
            "the model server answered {}",
            resp.status()
        )));
    }
    let buf = egress::read_capped(&mut resp, VISION_MAX_ANSWER, None)
        .await
        .map_err(|e| match e {
            egress::CappedReadError::TooLarge => {
                Error::Upstream("the model server's answer is too large".into())
            }
            other => Error::Upstream(format!("the model server's answer failed: {other}")),
        })?;
    let answer: ChatCompletionResponse = serde_json::from_slice(&buf).map_err(|e| {
        Error::Upstream(format!(
            "the model server's answer is not a chat completion: {e}"
        ))
    })?;
    let text = answer
        .choices
        .first()
        .and_then(|c| c.message.text())
        .unwrap_or_default();
    let v = parse_answer(route, &text).map_err(Error::Upstream)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response())
}

/// The image as a data URL: inline ones checked again, URLs fetched through
/// the egress guard (size-capped) and checked to be images.
async fn image_data_url(s: &Serving, req: &VisionRequest) -> Result<String> {
    let data_image_url = req
        .image_url
        .as_deref()
        .filter(|u| u.trim_start().starts_with("data:"));
    if let Some(inline) = req.image.as_deref().or(data_image_url) {
        let (mime, bytes) = decode_inline_image(inline, s.cfg.image_limits.max_bytes)?;
        return Ok(data_url(mime, &bytes));
    }
    let url = req.image_url.as_deref().ok_or_else(|| {
        Error::InvalidInput("an image is required: `image_url` or `image`".into())
    })?;
    fetch_image(s, url).await
}

/// An image URL fetched through the egress guard (size-capped), checked to
/// be an image, as a data URL.
async fn fetch_image(s: &Serving, url: &str) -> Result<String> {
    let page = egress::fetch(url, &s.cfg.egress, &s.cfg.image_limits)
        .await
        .map_err(|e| match e {
            Error::PayloadTooLarge(m) => Error::InvalidInput(format!("the image: {m}")),
            Error::Forbidden(m) => Error::InvalidInput(format!("`image_url` refused: {m}")),
            other => Error::InvalidInput(format!("`image_url` could not be fetched: {other}")),
        })?;
    if !(200..300).contains(&page.status) {
        return Err(Error::InvalidInput(format!(
            "`image_url` answered {}",
            page.status
        )));
    }
    let mime = sniff_image(&page.body).ok_or_else(|| {
        Error::InvalidInput("`image_url` is not a PNG, JPEG, GIF or WebP image".into())
    })?;
    Ok(data_url(mime, &page.body))
}

fn prompt(route: Route, req: &VisionRequest) -> Result<String> {
    let need = |v: &Option<String>, field: &str| {
        v.as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| Error::InvalidInput(format!("`{field}` is required")))
    };
    Ok(match route {
        Route::Caption => "Describe this image in one or two sentences.".to_owned(),
        Route::Query => need(&req.question, "question")?,
        Route::Detect => format!(
            "Find every {} in the image. Answer only with JSON of the form \
             {{\"objects\": [{{\"x_min\": 0.1, \"y_min\": 0.2, \"x_max\": 0.3, \"y_max\": 0.4}}]}} \
             with coordinates as fractions of the image's width and height, and an empty \
             list when there is none.",
            need(&req.target, "target")?
        ),
        Route::Point => format!(
            "Point at every {} in the image. Answer only with JSON of the form \
             {{\"points\": [{{\"x\": 0.1, \"y\": 0.2}}]}} with coordinates as fractions of \
             the image's width and height, and an empty list when there is none.",
            need(&req.target, "target")?
        ),
        other => return Err(Error::NotFound(format!("{other} is not a vision route"))),
    })
}

/// The route's typed result from a model's text answer.
///
/// Models wrap JSON in prose or code fences, use a bare list instead of an
/// object, lists of numbers instead of named fields, or a 0-1000 scale
/// (Qwen-VL): all are accepted and normalised to fractions.
pub(crate) fn parse_answer(route: Route, text: &str) -> std::result::Result<Value, String> {
    let text = text.trim();
    match route {
        Route::Caption => Ok(json!(CaptionResponse {
            caption: text.to_owned()
        })),
        Route::Query => Ok(json!(QueryResponse {
            answer: text.to_owned()
        })),
        Route::Detect => {
            let items = find_list(text, &["objects", "boxes", "bboxes", "detections"])?;
            let mut objects = Vec::new();
            for it in items {
                let nums = numbers(
                    &it,
                    &[
                        &["x_min", "xmin", "x1"],
                        &["y_min", "ymin", "y1"],
                        &["x_max", "xmax", "x2"],
                        &["y_max", "ymax", "y2"],
                    ],
                    "bbox",
                )
                .ok_or_else(|| format!("not a box: {it}"))?;
                let n = normalise(&nums)?;
                objects.push(BoundingBox {
                    x_min: n[0].min(n[2]),
                    y_min: n[1].min(n[3]),
                    x_max: n[0].max(n[2]),
                    y_max: n[1].max(n[3]),
                });
            }
            Ok(json!(DetectResponse { objects }))
        }
        Route::Point => {
            let items = find_list(text, &["points", "objects"])?;
            let mut points = Vec::new();
            for it in items {
                let nums = numbers(&it, &[&["x"], &["y"]], "point")
                    .ok_or_else(|| format!("not a point: {it}"))?;
                let n = normalise(&nums)?;
                points.push(ImagePoint { x: n[0], y: n[1] });
            }
            Ok(json!(PointResponse { points }))
        }
        other => Err(format!("{other} is not a vision route")),
    }
}

/// The first JSON value in `text` that is a list, or an object holding one
/// under one of `keys`.
fn find_list(text: &str, keys: &[&str]) -> std::result::Result<Vec<Value>, String> {
    for (i, c) in text.char_indices() {
        if c != '{' && c != '[' {
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        if let Some(Ok(v)) = de.next() {
            match v {
                Value::Array(a) => return Ok(a),
                Value::Object(o) => {
                    if let Some(Value::Array(a)) = keys.iter().find_map(|k| o.get(*k)) {
                        return Ok(a.clone());
                    }
                }
                _ => {}
            }
        }
    }
    Err(format!(
        "the model's answer holds no list: {}",
        text.chars().take(200).collect::<String>()
    ))
}

/// The numbers of a box or point: named fields (any of the aliases), a list,
/// or a list under `list_key`.
fn numbers(v: &Value, fields: &[&[&str]], list_key: &str) -> Option<Vec<f64>> {
    let from_list = |a: &Vec<Value>| -> Option<Vec<f64>> {
        (a.len() == fields.len())
            .then(|| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .flatten()
    };
    match v {
        Value::Array(a) => from_list(a),
        Value::Object(o) => {
            if let Some(Value::Array(a)) = o.get(list_key) {
                return from_list(a);
            }
            fields
                .iter()
                .map(|names| names.iter().find_map(|n| o.get(*n)?.as_f64()))
                .collect()
        }
        _ => None,
    }
}

/// Fractions as they are; a 0-1000 scale divided down; anything else refused.
fn normalise(nums: &[f64]) -> std::result::Result<Vec<f64>, String> {
    if nums.iter().any(|n| !n.is_finite() || *n < 0.0) {
        return Err(format!("coordinates out of range: {nums:?}"));
    }
    let max = nums.iter().copied().fold(0.0, f64::max);
    let scale = if max <= 1.0 {
        1.0
    } else if max <= 1000.0 {
        1000.0
    } else {
        return Err(format!("coordinates out of range: {nums:?}"));
    };
    Ok(nums.iter().map(|n| (n / scale).clamp(0.0, 1.0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_in_the_shapes_models_use_are_parsed() {
        let v = parse_answer(Route::Detect, "Sure!\n```json\n{\"objects\": [{\"x_min\": 0.1, \"y_min\": 0.2, \"x_max\": 0.5, \"y_max\": 0.6}]}\n```").unwrap();
        assert_eq!(v["objects"][0]["x_max"], 0.5);
        let v = parse_answer(Route::Detect, "[[100, 200, 500, 600]]").unwrap();
        assert_eq!(v["objects"][0]["y_min"], 0.2);
        let v = parse_answer(Route::Detect, "{\"objects\": []}").unwrap();
        assert_eq!(v["objects"].as_array().unwrap().len(), 0);
        let v = parse_answer(Route::Point, "points: [{\"x\": 0.25, \"y\": 0.75}]").unwrap();
        assert_eq!(v["points"][0]["y"], 0.75);
        assert!(parse_answer(Route::Point, "I see two cats").is_err());
        assert!(parse_answer(Route::Detect, "[[1, 2, 3, 5000]]").is_err());
        let v = parse_answer(Route::Caption, "  A cat.  ").unwrap();
        assert_eq!(v["caption"], "A cat.");
    }
}
