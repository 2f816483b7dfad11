//! The OpenAPI document: served, valid, and listing exactly the routes the
//! router serves.
//!
//! The router is asked, path by path, which methods it allows (axum answers
//! an unsupported method with 405 and an `Allow` header), so a route added
//! without documentation, or documentation left behind by a removed route,
//! fails here.

use std::collections::BTreeSet;
use std::sync::Arc;

use cxmpute_core::testkit::TestHost;
use cxmpute_core::*;
use serde_json::Value;

/// `{id}` and friends become a concrete segment.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "x"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The (method, path) pairs the router serves.
async fn served(h: &TestHost) -> BTreeSet<(String, String)> {
    let client = reqwest::Client::new();
    let trace = reqwest::Method::from_bytes(b"TRACE").unwrap();
    let mut out = BTreeSet::new();
    for path in cxmpute_core::http::paths() {
        let r = client
            .request(trace.clone(), format!("{}{}", h.url, concrete(&path)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path} answers TRACE");
        let allow = r.headers()["allow"].to_str().unwrap().to_owned();
        for m in allow.split(',').map(|m| m.trim().to_ascii_lowercase()) {
            // axum answers HEAD wherever it answers GET; OpenAPI leaves it implied.
            if m != "head" && !m.is_empty() {
                out.insert((m, path.clone()));
            }
        }
    }
    out
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if [
                "get", "put", "post", "delete", "patch", "options", "head", "trace",
            ]
            .contains(&method.as_str())
            {
                assert!(op["responses"].is_object(), "{method} {path} has responses");
                out.insert((method.clone(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_document_lists_every_route_the_router_serves() {
    let h = TestHost::start(Arc::new(MemoryStore::new())).await;
    let r = reqwest::get(format!("{}/openapi.json", h.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    let served = served(&h).await;
    let documented = documented(&doc);
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "served but not in the OpenAPI document: {missing:?}"
    );
    assert!(stale.is_empty(), "documented but not served: {stale:?}");
    // Sanity: the walk saw every area of the API, methods included.
    for (m, p) in [
        ("post", "/v1/chat/completions"),
        ("get", "/v1/stats/network"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/dashboard"),
        ("post", "/v1/auth/code"),
        ("patch", "/v1/me/keys/{id}"),
        ("delete", "/v1/me/keys/{id}"),
        ("post", "/v1/provider/provisions/{id}/ready"),
        ("get", "/v1/provider/account/earnings"),
        ("put", "/v1/admin/prices"),
    ] {
        let op = (m.to_owned(), p.to_owned());
        assert!(served.contains(&op), "{m} {p} is served");
    }
}

#[tokio::test]
async fn the_document_is_valid_openapi() {
    let Some(validator) = cxmpute_core::testkit::service_env("CXMPUTE_TEST_OPENAPI_VALIDATOR")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("cxmpute-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("openapi.json");
    std::fs::write(&file, cxmpute_core::http::openapi::document()).unwrap();
    let out = std::process::Command::new(&validator)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {validator}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the validator refused the document:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
