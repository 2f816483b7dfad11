//! Vision: `POST /v1/m/caption`, `/v1/m/query`, `/v1/m/detect`, `/v1/m/point`.
//!
//! The image comes inline (base64 or a data URL: decoded, size-capped and
//! checked to be PNG, JPEG, GIF or WebP here, so a bad one is a clear 400) or
//! as an `http(s)` URL the node fetches through its egress guard. The node
//! receives a normalised body: `image` as a `data:` URL, or `image_url` as an
//! `http(s)` URL, never both. Metered as one image per request.

use base64::Engine;
use bytes::Bytes;

use super::{check_fetch_url, check_model, encode, invalid, parse_body, AnswerKind, Prepared};
use crate::broker::BrokerConfig;
use crate::error::{Error, Result};
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

/// The image type of `bytes`, by its magic number.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// Decodes an inline image (plain base64 or a `data:...;base64,` URL),
/// checking its size against `max` and its type. Returns the type and bytes.
pub fn decode_inline_image(s: &str, max: usize) -> Result<(&'static str, Vec<u8>)> {
    let s = s.trim();
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| invalid("the image data URL has no `,`"))?;
            if !meta.ends_with(";base64") {
                return Err(invalid("the image data URL must be base64 (`;base64,`)"));
            }
            data
        }
        None => s,
    };
    // A quick bound before decoding: 4 base64 characters carry 3 bytes.
    let estimate = b64.len() / 4 * 3;
    if estimate > max + 3 {
        return Err(too_big(max));
    }
    let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cleaned.trim_end_matches('='))
        })
        .map_err(|_| invalid("the image is not valid base64"))?;
    if bytes.len() > max {
        return Err(too_big(max));
    }
    let mime = sniff_image(&bytes)
        .ok_or_else(|| invalid("the image is not a PNG, JPEG, GIF or WebP image"))?;
    Ok((mime, bytes))
}

fn too_big(max: usize) -> Error {
    invalid(format!("the image is larger than {max} bytes"))
}

/// A `data:` URL for an image.
pub fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn check_prompt(v: Option<String>, field: &str) -> Result<String> {
    let v = v.unwrap_or_default();
    let t = v.trim();
    if t.is_empty() {
        return Err(invalid(format!("`{field}` is required")));
    }
    if t.chars().count() > MAX_VISION_PROMPT_CHARS {
        return Err(invalid(format!(
            "`{field}` is longer than {MAX_VISION_PROMPT_CHARS} characters"
        )));
    }
    Ok(t.to_owned())
}

/// Any vision route.
pub(super) fn prepare_vision(cfg: &BrokerConfig, route: Route, body: &Bytes) -> Result<Prepared> {
    let req: VisionRequest = parse_body(body)?;
    let model = check_model(req.model.as_deref().unwrap_or(DEFAULT_VISION_MODEL))?;
    let mut out = VisionRequest {
        model: Some(model.clone()),
        ..VisionRequest::default()
    };
    match (req.image_url, req.image) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "give the image as `image_url` or `image`, not both",
            ))
        }
        (None, None) => return Err(invalid("an image is required: `image_url` or `image`")),
        (Some(u), None) if !u.trim_start().starts_with("data:") => {
            out.image_url = Some(check_fetch_url(cfg, &u, "image_url")?.to_string());
        }
        (Some(inline), None) | (None, Some(inline)) => {
            let (mime, bytes) = decode_inline_image(&inline, MAX_IMAGE_BYTES)?;
            out.image = Some(data_url(mime, &bytes));
        }
    }
    match route {
        Route::Query => out.question = Some(check_prompt(req.question, "question")?),
        Route::Detect | Route::Point => out.target = Some(check_prompt(req.target, "target")?),
        _ => {}
    }
    Ok(Prepared {
        route,
        models: vec![model.clone()],
        model,
        body: encode(&out)?,
        kind: AnswerKind::Json(meter_vision),
        bound: Meter {
            input_tokens: 0,
            output_tokens: 0,
            units: 1,
        },
        fallback_input: 0,
    })
}

fn in_unit(v: f64) -> bool {
    v.is_finite() && (0.0..=1.0).contains(&v)
}

/// Checks the typed answer of the route; one image.
fn meter_vision(prep: &Prepared, body: &[u8]) -> std::result::Result<Meter, String> {
    let bad = |e: serde_json::Error| format!("not a {} answer: {e}", prep.route);
    match prep.route {
        Route::Caption => {
            serde_json::from_slice::<CaptionResponse>(body).map_err(bad)?;
        }
        Route::Query => {
            serde_json::from_slice::<QueryResponse>(body).map_err(bad)?;
        }
        Route::Detect => {
            let r: DetectResponse = serde_json::from_slice(body).map_err(bad)?;
            if !r.objects.iter().all(|b| {
                [b.x_min, b.y_min, b.x_max, b.y_max]
                    .into_iter()
                    .all(in_unit)
            }) {
                return Err("detect answer with coordinates outside 0..1".into());
            }
        }
        Route::Point => {
            let r: PointResponse = serde_json::from_slice(body).map_err(bad)?;
            if !r.points.iter().all(|p| in_unit(p.x) && in_unit(p.y)) {
                return Err("point answer with coordinates outside 0..1".into());
            }
        }
        other => return Err(format!("{other} is not a vision route")),
    }
    Ok(prep.bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_1X1: &[u8] =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn prep(route: Route, v: serde_json::Value) -> Result<Prepared> {
        prepare_vision(&BrokerConfig::default(), route, &Bytes::from(v.to_string()))
    }

    #[test]
    fn inline_images_are_decoded_typed_and_capped() {
        let p = prep(Route::Caption, serde_json::json!({"image": b64(PNG_1X1)})).unwrap();
        assert_eq!(p.model, DEFAULT_VISION_MODEL);
        let sent: VisionRequest = serde_json::from_slice(&p.body).unwrap();
        assert!(sent.image.unwrap().starts_with("data:image/png;base64,"));
        let data = format!("data:image/png;base64,{}", b64(PNG_1X1));
        assert!(prep(Route::Caption, serde_json::json!({"imageUrl": data})).is_ok());
        let mut big = PNG_1X1.to_vec();
        big.resize(MAX_IMAGE_BYTES + 1, 0);
        let err = prep(Route::Caption, serde_json::json!({"image": b64(&big)})).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"image": "!!!"}),
            serde_json::json!({"image": b64(b"just some text")}),
            serde_json::json!({"image": b64(PNG_1X1), "image_url": "https://a.example/x.png"}),
            serde_json::json!({"image_url": "ftp://a.example/x.png"}),
            serde_json::json!({"image_url": "http://169.254.169.254/latest"}),
        ] {
            assert!(prep(Route::Caption, bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_needs_a_question_and_detect_a_target() {
        let img = b64(PNG_1X1);
        assert!(prep(Route::Query, serde_json::json!({"image": img})).is_err());
        assert!(prep(
            Route::Detect,
            serde_json::json!({"image": img, "target": " "})
        )
        .is_err());
        assert!(prep(
            Route::Point,
            serde_json::json!({"image": img, "question": "x"})
        )
        .is_err());
        let p = prep(
            Route::Detect,
            serde_json::json!({"image": img, "target": "cat"}),
        )
        .unwrap();
        let sent: VisionRequest = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent.target.as_deref(), Some("cat"));
        assert!(meter_vision(
            &p,
            br#"{"objects":[{"x_min":0.1,"y_min":0.1,"x_max":0.5,"y_max":0.5}]}"#
        )
        .is_ok());
        assert!(meter_vision(
            &p,
            br#"{"objects":[{"x_min":3,"y_min":0.1,"x_max":0.5,"y_max":0.5}]}"#
        )
        .is_err());
        assert!(meter_vision(&p, br#"{"caption":"x"}"#).is_err());
    }
}
