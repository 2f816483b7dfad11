//! No secret reaches a log: a whole flow under a TRACE subscriber.
//!
//! Alone in its own test binary on purpose: the subscriber is scoped to this
//! test's thread, and tracing's per-callsite interest cache can race with
//! other tests' threads registering the same callsites in one process.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use cxmpute_core::testkit::StandInNode;
use cxmpute_core::wire::*;
use serde_json::json;

/// A writer into a shared buffer, for a test subscriber.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_reaches_the_logs_through_a_whole_flow() {
    // Everything (server, nodes, client) runs on this test's one thread, so a
    // thread-scoped subscriber at TRACE sees every event of the flow.
    let buf = LogBuf::default();
    let writer = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(sub);

    let (h, outbox) = host().await;
    let node = StandInNode::start("a").await;
    let mut secrets: Vec<String> = vec![h.admin_key.expose().to_owned()];

    let email = "quiet@users.test";
    assert_eq!(request_code(&h, email).await.status(), 202);
    let code = outbox.last_code(email);
    secrets.push(code.clone());
    assert_eq!(verify(&h, email, "00000000").await.status(), 401);
    let s1: SessionResponse = verify(&h, email, &code).await.json().await.unwrap();
    let s2: SessionResponse = call(&h, "POST", "/v1/auth/refresh")
        .cookie(format!("cx_refresh={}", s1.refresh_token.expose()))
        .ok()
        .await;
    // Reuse: logged as a warning, without the token.
    assert_eq!(
        call(&h, "POST", "/v1/auth/refresh")
            .json(json!({"refresh_token": s1.refresh_token.expose()}))
            .status()
            .await,
        401
    );
    let s3 = sign_in(&h, &outbox, email).await;
    secrets.push(outbox.last_code(email));
    let tok = s3.access_token.expose().to_owned();
    grant(&h, &s3.user_id, 1).await;
    let k: CreateKeyResponse = call(&h, "POST", "/v1/me/keys")
        .bearer(&tok)
        .json(json!({}))
        .ok()
        .await;
    let pk: ProviderKeyResponse = call(&h, "POST", "/v1/provider/account/key")
        .bearer(&tok)
        .ok()
        .await;
    let reg: RegisterProvisionResponse = call(&h, "POST", "/v1/provider/provisions")
        .bearer(pk.provider_key.expose())
        .json(json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}]}))
        .ok()
        .await;
    node.require_secret(reg.node_secret.expose());
    let r = call(&h, "POST", "/v1/chat/completions")
        .bearer(k.api_key.expose())
        .json(chat())
        .send()
        .await;
    assert_eq!(r.status(), 200);
    let r = call(&h, "POST", "/v1/chat/completions")
        .bearer(format!("{}x", k.api_key.expose()))
        .json(chat())
        .send()
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        call(&h, "POST", "/v1/auth/logout")
            .bearer(&tok)
            .status()
            .await,
        204
    );
    for s in [&s1, &s2, &s3] {
        secrets.push(s.access_token.expose().to_owned());
        secrets.push(s.refresh_token.expose().to_owned());
    }
    secrets.push(k.api_key.expose().to_owned());
    secrets.push(pk.provider_key.expose().to_owned());
    secrets.push(reg.node_secret.expose().to_owned());

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("signed in"), "the subscriber saw the flow");
    // The line each call writes names its request.
    let settled = log.lines().find(|l| l.contains("request settled"));
    let settled = settled.expect("a line per call");
    assert!(settled.contains("request_id=\"req_"), "{settled}");
    // ... as a field of its own (after the message), not only through the
    // (DEBUG) span's context, so an INFO log names it too.
    let (_, own) = settled.split_once("request settled").unwrap();
    assert!(own.contains("request_id=\"req_"), "{settled}");
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "a secret `{}..` is in the log",
            &s[..4]
        );
    }
}
