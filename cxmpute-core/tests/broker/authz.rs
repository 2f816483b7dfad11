//! The authorization matrix: every route of the HTTP API, called over real
//! sockets as anonymous, a user (session, cookie and API key), another user,
//! a provider, another provider and an admin (session, API key, and a key of
//! the admin's restricted by a credit limit, which must not administer). Each
//! answer has the expected status, every refusal is OpenAI's error JSON, and
//! no answer carries another account's data or anyone's secret.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{StandInNode, TestHost, EMBED, MODEL};
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

/// Who calls, in the order of the expectation arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anon,
    ASession,
    AKey,
    ACookie,
    BSession,
    BKey,
    ProvA,
    ProvB,
    AdminSession,
    AdminKey,
    /// A key of the admin's account with a credit limit: a gateway key only.
    AdminLimitedKey,
}

use Caller::*;

const CALLERS: [Caller; 11] = [
    Anon,
    ASession,
    AKey,
    ACookie,
    BSession,
    BKey,
    ProvA,
    ProvB,
    AdminSession,
    AdminKey,
    AdminLimitedKey,
];

/// Run order: user A's session callers last, so a route that only user A may
/// change (revoke its key) is tried by everyone else first. The admin's
/// limited key goes before the admin, so an admin route it wrongly passed
/// would show (a disconnect, a delete) rather than answer 404.
const ORDER: [Caller; 11] = [
    Anon,
    AKey,
    BSession,
    BKey,
    ProvA,
    ProvB,
    AdminLimitedKey,
    AdminSession,
    AdminKey,
    ASession,
    ACookie,
];

/// The accounts a caller acts for, for the leak check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Account {
    UserA,
    UserB,
    ProvA,
    ProvB,
    Admin,
}

fn account_of(c: Caller) -> Option<Account> {
    match c {
        Anon => None,
        ASession | AKey | ACookie => Some(Account::UserA),
        BSession | BKey => Some(Account::UserB),
        ProvA => Some(Account::ProvA),
        ProvB => Some(Account::ProvB),
        AdminSession | AdminKey | AdminLimitedKey => Some(Account::Admin),
    }
}

type Expect = [u16; 11];

/// In an expectation: any answer but 401 and 403 (the caller is let in; what
/// the route then says about the body or capacity is not this test's matter).
const IN: u16 = 0;

//                      anon a-ses a-key a-ck b-ses b-key pr-a pr-b adm-s adm-k adm-lk
const GATEWAY: Expect = [401, 401, 200, 401, 401, 200, 401, 401, 401, 200, 200];
const GATEWAY_IN: Expect = [401, 401, IN, 401, 401, IN, 401, 401, 401, IN, IN];
const ME: Expect = [401, 200, 401, 200, 200, 401, 401, 401, 200, 401, 401];
const PROV_ACCOUNT: Expect = [401, 200, 401, 200, 200, 401, 200, 200, 200, 401, 401];
const STATS_ME: Expect = [401, 200, 200, 200, 200, 200, 401, 401, 200, 200, 200];
/// An admin route: the admin's limited key is refused like a user's key.
const fn admin_only(ses: u16, key: u16) -> Expect {
    [401, 403, 403, 403, 403, 403, 401, 401, ses, key, 403]
}
const fn everyone(s: u16) -> Expect {
    [s; 11]
}
const fn providers(a: u16, b: u16) -> Expect {
    [401, 401, 401, 401, 401, 401, a, b, 401, 401, 401]
}
/// A route on one of user A's keys: A changes it, B and the admin (as a user)
/// do not see it.
const fn a_key(ses: u16, cookie: u16) -> Expect {
    [401, ses, 401, cookie, 404, 401, 401, 401, 404, 401, 401]
}

struct Route {
    method: &'static str,
    path: String,
    /// The body for a caller (unique emails where a route creates things).
    body: Box<dyn Fn(Caller) -> Option<Value>>,
    expect: Expect,
}

fn route(
    method: &'static str,
    path: impl Into<String>,
    body: Option<Value>,
    expect: Expect,
) -> Route {
    Route {
        method,
        path: path.into(),
        body: Box::new(move |_| body.clone()),
        expect,
    }
}

struct World {
    h: TestHost,
    creds: std::collections::HashMap<&'static str, String>,
    /// Strings that belong to one account: ids, emails, secrets.
    markers: Vec<(Account, String)>,
    /// Strings nobody may ever be shown again (keys, tokens, node secrets).
    secrets: Vec<String>,
    /// The stand-in nodes, alive as long as the world.
    nodes: Vec<StandInNode>,
}

impl World {
    fn cred(&self, name: &'static str) -> String {
        self.creds[name].clone()
    }

    fn mark(&mut self, a: Account, s: impl Into<String>) {
        self.markers.push((a, s.into()));
    }

    fn secret(&mut self, a: Account, s: impl Into<String>) {
        let s = s.into();
        self.markers.push((a, s.clone()));
        self.secrets.push(s);
    }
}

async fn signed_in(h: &TestHost, email: &str, credits: i64) -> (User, Secret, ApiKey, Secret) {
    let acc = h.broker.accounts();
    let user = acc.ensure_account(email).await.unwrap();
    if credits > 0 {
        h.broker
            .admin()
            .grant_credits(&user.id, Credits::whole(credits), "test", "setup")
            .await
            .unwrap();
    }
    let session = h.broker.sessions().start_session(&user).await.unwrap();
    let (key, secret) = acc
        .create_key(&user, CreateKeyRequest::default())
        .await
        .unwrap();
    (user, session.access_token, key, secret)
}

async fn world() -> World {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // Every caller asks for a sign-in code from this one address: more than
    // a client's default allowance, which is not what this test is about.
    let mut auth = AuthConfig::default().with_admin_emails(["boss@admins.test".to_owned()]);
    auth.codes_per_client = cxmpute_core::sessions::RateLimit::new(100, Duration::from_secs(60));
    let h = TestHost::start_with(store, |b| b.auth(auth)).await;
    let mut w = World {
        h,
        creds: Default::default(),
        markers: Vec::new(),
        secrets: Vec::new(),
        nodes: Vec::new(),
    };
    let h = &w.h;

    let (ua, a_tok, a_key, a_secret) = signed_in(h, "alice@users.test", 10).await;
    let (ub, b_tok, b_key, b_secret) = signed_in(h, "bob@users.test", 10).await;
    let (adm, adm_tok, adm_key, adm_secret) = signed_in(h, "boss@admins.test", 10).await;
    let admin_api_key = w.h.admin_key.clone();
    let stored_admin = h
        .broker
        .store()
        .user_by_email("admin@cxmpute.test")
        .await
        .unwrap();
    h.broker
        .admin()
        .grant_credits(&stored_admin.id, Credits::whole(10), "test", "setup")
        .await
        .unwrap();
    // Keys of the admin's account narrowed by a credit limit, or to one
    // route: gateway keys, never admin credentials.
    let (adm_limited, adm_limited_secret) = h
        .broker
        .admin()
        .create_api_key(
            &stored_admin.id,
            "limited",
            Some(Credits::whole(5)),
            Vec::new(),
        )
        .await
        .unwrap();
    let (adm_routed, adm_routed_secret) = h
        .broker
        .admin()
        .create_api_key(
            &stored_admin.id,
            "chat only",
            None,
            vec![cxmpute_core::Route::ChatCompletions],
        )
        .await
        .unwrap();
    let (pa, pa_key) = w.h.provider().await;
    let (pb, pb_key) = w.h.provider().await;
    // A second key of A's to be revoked by the matrix.
    let (a_spare, a_spare_secret) =
        w.h.broker
            .accounts()
            .create_key(&ua, CreateKeyRequest::default())
            .await
            .unwrap();

    // Nodes: A's serve both gateway routes; one spare of A's to end, one of
    // B's for the admin to disconnect.
    let node = StandInNode::start("a").await;
    let enode = StandInNode::start("e").await;
    let n_chat = w.h.add_node(&pa, &node, Service::Chat, MODEL).await;
    let n_embed = w.h.add_node(&pa, &enode, Service::Embeddings, EMBED).await;
    let spare_url = StandInNode::dead_url().await;
    w.h.offer(Service::Chat, "spare:1b").await;
    w.h.offer(Service::Chat, "other:1b").await;
    let n_spare =
        w.h.add_node_at(&pa, &spare_url, Service::Chat, "spare:1b", None)
            .await;
    let n_b =
        w.h.add_node_at(&pb, &spare_url, Service::Chat, "other:1b", None)
            .await;
    w.nodes.push(node);
    w.nodes.push(enode);
    // A node of A's that walks the lifecycle (registered, start, ready, end).
    let n_life =
        w.h.broker
            .network()
            .register_provision(
                &pa,
                RegisterProvisionRequest {
                    endpoint: None,
                    services: vec![],
                    device: json!({"gpu": {"memory_mb": 8192}}),
                    location: Location::default(),
                },
            )
            .await
            .unwrap()
            .provision_id;

    let note =
        w.h.broker
            .admin()
            .put_notification(
                None,
                NotificationRequest {
                    title: "maintenance".into(),
                    banner: String::new(),
                    popup: String::new(),
                    starts_at: w.h.clock.now(),
                    ends_at: w.h.clock.now().plus(std::time::Duration::from_secs(3600)),
                    placements: vec![Placement::Homepage],
                },
            )
            .await
            .unwrap();

    for (name, v) in [
        ("a_tok", a_tok.expose()),
        ("a_key", a_secret.expose()),
        ("b_tok", b_tok.expose()),
        ("b_key", b_secret.expose()),
        ("pa_key", pa_key.expose()),
        ("pb_key", pb_key.expose()),
        ("adm_tok", adm_tok.expose()),
        ("adm_key", admin_api_key.expose()),
        ("adm_limited_key", adm_limited_secret.expose()),
        ("adm_routed_key", adm_routed_secret.expose()),
    ] {
        w.creds.insert(name, v.to_owned());
    }
    for (name, v) in [
        ("ua", ua.id.to_string()),
        ("ub", ub.id.to_string()),
        ("pa", pa.id.to_string()),
        ("pb", pb.id.to_string()),
        ("a_key_id", a_key.id.to_string()),
        ("a_spare_id", a_spare.id.to_string()),
        ("n_chat", n_chat.to_string()),
        ("n_spare", n_spare.to_string()),
        ("n_b", n_b.to_string()),
        ("n_life", n_life.to_string()),
        ("spare_url", spare_url.clone()),
        ("note", note.id.to_string()),
    ] {
        w.creds.insert(name, v);
    }

    let store = w.h.broker.store().clone();
    for (a, u) in [
        (Account::UserA, &ua),
        (Account::UserB, &ub),
        (Account::Admin, &adm),
    ] {
        w.mark(a, u.id.to_string());
        w.mark(a, u.email.clone());
        let p = store.provider_by_user(&u.id).await.unwrap();
        w.mark(a, p.id.to_string());
    }
    w.mark(Account::UserA, a_key.id.to_string());
    w.mark(Account::UserA, a_spare.id.to_string());
    w.mark(Account::UserB, b_key.id.to_string());
    w.mark(Account::Admin, adm_key.id.to_string());
    w.secret(Account::UserA, a_tok.expose());
    w.secret(Account::UserA, a_secret.expose());
    w.secret(Account::UserA, a_spare_secret.expose());
    w.secret(Account::UserB, b_tok.expose());
    w.secret(Account::UserB, b_secret.expose());
    w.secret(Account::Admin, adm_tok.expose());
    w.secret(Account::Admin, adm_secret.expose());
    w.secret(Account::Admin, admin_api_key.expose());
    w.secret(Account::Admin, adm_limited_secret.expose());
    w.secret(Account::Admin, adm_routed_secret.expose());
    w.mark(Account::Admin, adm_limited.id.to_string());
    w.mark(Account::Admin, adm_routed.id.to_string());
    w.mark(Account::ProvA, pa.id.to_string());
    w.mark(Account::ProvA, pa.email.clone());
    w.mark(Account::ProvB, pb.id.to_string());
    w.mark(Account::ProvB, pb.email.clone());
    w.secret(Account::ProvA, pa_key.expose());
    w.secret(Account::ProvB, pb_key.expose());
    for (a, id) in [
        (Account::ProvA, &n_chat),
        (Account::ProvA, &n_embed),
        (Account::ProvA, &n_spare),
        (Account::ProvA, &n_life),
        (Account::ProvB, &n_b),
    ] {
        w.mark(a, id.to_string());
        let p = store.provision(id).await.unwrap();
        w.secret(a, p.node_secret);
    }
    w
}

fn headers_for(w: &World, c: Caller) -> Vec<(&'static str, String)> {
    let bearer = |k: &'static str| vec![("authorization", format!("Bearer {}", w.cred(k)))];
    match c {
        Anon => vec![],
        ASession => bearer("a_tok"),
        AKey => bearer("a_key"),
        ACookie => vec![(
            "cookie",
            format!("theme=dark; cx_access={}", w.cred("a_tok")),
        )],
        BSession => bearer("b_tok"),
        BKey => bearer("b_key"),
        ProvA => bearer("pa_key"),
        ProvB => bearer("pb_key"),
        AdminSession => bearer("adm_tok"),
        AdminKey => bearer("adm_key"),
        AdminLimitedKey => bearer("adm_limited_key"),
    }
}

async fn call(w: &World, r: &Route, c: Caller) -> (u16, String) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
    let mut req = client.request(method, format!("{}{}", w.h.url, r.path));
    for (k, v) in headers_for(w, c) {
        req = req.header(k, v);
    }
    if let Some(b) = (r.body)(c) {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn chat() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

fn notification() -> Value {
    json!({"title": "t", "starts_at": 0, "ends_at": 1, "placements": ["homepage"]})
}

fn routes(w: &World) -> Vec<Route> {
    let ub = w.cred("ub");
    let pb = w.cred("pb");
    let a_key_id = w.cred("a_key_id");
    let a_spare = w.cred("a_spare_id");
    let n_chat = w.cred("n_chat");
    let n_spare = w.cred("n_spare");
    let n_b = w.cred("n_b");
    let n_life = w.cred("n_life");
    let spare_url = w.cred("spare_url");
    let note = w.cred("note");
    let price = json!({"service": "chat", "model": MODEL, "per_request": 1000,
        "per_million_input_tokens": 0, "per_million_output_tokens": 0, "per_million_units": 0});
    let mut v = vec![
        // Public.
        route("GET", "/healthz", None, everyone(200)),
        route("GET", "/v1/models", None, everyone(200)),
        route("GET", "/v1/catalogue", None, everyone(200)),
        route("GET", "/v1/notifications", None, everyone(200)),
        route("GET", "/v1/nothing-here", None, everyone(404)),
        route("GET", "/openapi.json", None, everyone(200)),
        route("GET", "/metrics", None, everyone(200)),
        route("GET", "/dashboard", None, everyone(200)),
        route("GET", "/dashboard/app.js", None, everyone(200)),
        route("GET", "/dashboard/style.css", None, everyone(200)),
        // A canary's page: public, and none by this token (literally `{token}`).
        route("GET", "/pages/{token}", None, everyone(404)),
        route("GET", "/v1/stats/network", None, everyone(200)),
        // Statistics of one's own account; money only for admins.
        route("GET", "/v1/stats/me", None, STATS_ME),
        route("GET", "/v1/stats/provider", None, PROV_ACCOUNT),
        route("GET", "/v1/stats/admin", None, admin_only(200, 200)),
        route(
            "POST",
            "/v1/auth/verify",
            Some(json!({"email": "nobody@users.test", "code": "00000000"})),
            everyone(401),
        ),
        route("POST", "/v1/auth/refresh", Some(json!({})), everyone(401)),
        // Gateway.
        route("POST", "/v1/chat/completions", Some(chat()), GATEWAY),
        route(
            "POST",
            "/v1/embeddings",
            Some(json!({"model": EMBED, "input": "hi"})),
            GATEWAY,
        ),
        route(
            "POST",
            "/v1/audio/speech",
            Some(json!({"model": "kokoro", "input": "hi"})),
            GATEWAY_IN,
        ),
        route("POST", "/v1/tts", Some(json!({"text": "hi"})), GATEWAY_IN),
        route(
            "POST",
            "/v1/scrape",
            Some(json!({"urls": ["https://example.com"]})),
            GATEWAY_IN,
        ),
        route(
            "POST",
            "/v1/m/caption",
            Some(json!({"imageUrl": "https://example.com/a.png"})),
            GATEWAY_IN,
        ),
        route(
            "POST",
            "/v1/m/query",
            Some(json!({"question": "?", "imageUrl": "https://example.com/a.png"})),
            GATEWAY_IN,
        ),
        route(
            "POST",
            "/v1/m/detect",
            Some(json!({"target": "cat", "imageUrl": "https://example.com/a.png"})),
            GATEWAY_IN,
        ),
        route(
            "POST",
            "/v1/m/point",
            Some(json!({"target": "cat", "imageUrl": "https://example.com/a.png"})),
            GATEWAY_IN,
        ),
        // The signed-in user's own account.
        route("GET", "/v1/me", None, ME),
        route("GET", "/v1/me/usage?days=7", None, ME),
        route("GET", "/v1/me/keys", None, ME),
        route("POST", "/v1/me/keys", Some(json!({"name": "matrix"})), {
            let mut e = ME;
            for i in [1, 3, 4, 8] {
                e[i] = 201;
            }
            e
        }),
        route(
            "PATCH",
            format!("/v1/me/keys/{a_key_id}"),
            Some(json!({"name": "renamed", "credit_limit": null})),
            a_key(200, 200),
        ),
        route(
            "DELETE",
            format!("/v1/me/keys/{a_spare}"),
            None,
            a_key(204, 404),
        ),
        // The provider's own account.
        route("GET", "/v1/provider/account", None, PROV_ACCOUNT),
        route("GET", "/v1/provider/account/earnings", None, PROV_ACCOUNT),
        route("GET", "/v1/provider/account/provisions", None, PROV_ACCOUNT),
        route("POST", "/v1/provider/account/key", None, PROV_ACCOUNT),
        // Node lifecycle: provider keys only, own nodes only.
        route("GET", "/v1/provider/provisions", None, providers(200, 200)),
        route(
            "POST",
            "/v1/provider/provisions",
            Some(json!({"device": {"gpu": {"memory_mb": 4096}}})),
            providers(200, 200),
        ),
        route(
            "GET",
            format!("/v1/provider/provisions/{n_chat}"),
            None,
            providers(200, 404),
        ),
        route(
            "POST",
            format!("/v1/provider/provisions/{n_chat}/heartbeat"),
            None,
            providers(204, 404),
        ),
        route(
            "POST",
            format!("/v1/provider/provisions/{n_life}/start"),
            Some(json!({})),
            providers(200, 404),
        ),
        route(
            "POST",
            format!("/v1/provider/provisions/{n_life}/ready"),
            Some(json!({"endpoint": spare_url, "services": [{"service": "chat", "model": MODEL}]})),
            providers(200, 404),
        ),
        route(
            "POST",
            format!("/v1/provider/provisions/{n_life}/end"),
            None,
            providers(204, 404),
        ),
        route(
            "DELETE",
            format!("/v1/provider/provisions/{n_spare}"),
            None,
            providers(204, 404),
        ),
        // Admin.
        route(
            "GET",
            "/v1/admin/users?q=users.test",
            None,
            admin_only(200, 200),
        ),
        route(
            "GET",
            format!("/v1/admin/users/{ub}"),
            None,
            admin_only(200, 200),
        ),
        route(
            "POST",
            format!("/v1/admin/users/{ub}/credits"),
            Some(json!({"amount": 1000, "reason": "matrix"})),
            admin_only(200, 200),
        ),
        route(
            "POST",
            format!("/v1/admin/users/{ub}/suspend"),
            Some(json!({"reason": "matrix"})),
            admin_only(204, 204),
        ),
        route(
            "POST",
            format!("/v1/admin/users/{ub}/unsuspend"),
            None,
            admin_only(204, 204),
        ),
        route(
            "PATCH",
            format!("/v1/admin/keys/{a_key_id}"),
            Some(json!({"rpm": null, "tpm": null})),
            admin_only(200, 200),
        ),
        route(
            "GET",
            format!("/v1/admin/providers/{pb}"),
            None,
            admin_only(200, 200),
        ),
        route(
            "POST",
            format!("/v1/admin/providers/{pb}/suspend"),
            Some(json!({"reason": "matrix"})),
            admin_only(204, 204),
        ),
        route(
            "POST",
            format!("/v1/admin/providers/{pb}/unsuspend"),
            None,
            admin_only(204, 204),
        ),
        route("GET", "/v1/admin/provisions", None, admin_only(200, 200)),
        route(
            "DELETE",
            format!("/v1/admin/provisions/{n_b}"),
            None,
            admin_only(204, 404),
        ),
        route("GET", "/v1/admin/prices", None, admin_only(200, 200)),
        route("PUT", "/v1/admin/prices", Some(price), admin_only(200, 200)),
        route("GET", "/v1/admin/catalogue", None, admin_only(200, 200)),
        route(
            "PUT",
            "/v1/admin/catalogue",
            Some(
                json!({"service": "chat", "model": "matrix:1b", "min_tier": 1, "target_nodes": 1}),
            ),
            admin_only(200, 200),
        ),
        route(
            "DELETE",
            "/v1/admin/catalogue/chat/matrix:1b",
            None,
            admin_only(200, 404),
        ),
        route("GET", "/v1/admin/aliases", None, admin_only(200, 200)),
        route(
            "PUT",
            "/v1/admin/aliases",
            Some(json!({"alias": "matrix-fast", "models": [MODEL]})),
            admin_only(200, 200),
        ),
        route(
            "DELETE",
            "/v1/admin/aliases/matrix-fast",
            None,
            admin_only(204, 404),
        ),
        route("GET", "/v1/admin/reward", None, admin_only(200, 200)),
        route("GET", "/v1/admin/notifications", None, admin_only(200, 200)),
        route(
            "POST",
            "/v1/admin/notifications",
            Some(notification()),
            admin_only(201, 201),
        ),
        route(
            "PUT",
            format!("/v1/admin/notifications/{note}"),
            Some(notification()),
            admin_only(200, 200),
        ),
        route(
            "DELETE",
            format!("/v1/admin/notifications/{note}"),
            None,
            admin_only(204, 404),
        ),
    ];
    // Routes that create accounts need a fresh email per caller.
    v.push(Route {
        method: "POST",
        path: "/v1/admin/users".into(),
        body: Box::new(|c| Some(json!({"email": format!("new-{c:?}@users.test").to_lowercase()}))),
        expect: admin_only(200, 200),
    });
    v.push(Route {
        method: "POST",
        path: "/v1/admin/providers".into(),
        body: Box::new(|c| {
            Some(json!({"email": format!("new-{c:?}@providers.test").to_lowercase()}))
        }),
        expect: admin_only(200, 200),
    });
    v.push(Route {
        method: "POST",
        path: "/v1/auth/code".into(),
        body: Box::new(|c| Some(json!({"email": format!("code-{c:?}@users.test").to_lowercase()}))),
        expect: everyone(202),
    });
    // Last: logging out with the session ends it.
    v.push(route("POST", "/v1/auth/logout", None, everyone(204)));
    v
}

/// The route a concrete path was made from: ids become `{id}`.
fn template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    if path.starts_with("/v1/admin/catalogue/") {
        return "/v1/admin/catalogue/{service}/{model}".into();
    }
    if path.starts_with("/v1/admin/aliases/") {
        return "/v1/admin/aliases/{alias}".into();
    }
    path.split('/')
        .map(|seg| {
            let id = ["usr_", "prv_", "node_", "key_", "ntf_"]
                .iter()
                .any(|p| seg.starts_with(p));
            if id {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_served_route_is_in_the_matrix() {
    let w = world().await;
    let covered: std::collections::HashSet<String> =
        routes(&w).iter().map(|r| template(&r.path)).collect();
    let missing: Vec<String> = cxmpute_core::http::paths()
        .into_iter()
        .filter(|p| !covered.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without authorization expectations: {missing:?}"
    );
}

#[tokio::test]
async fn every_route_answers_each_caller_as_expected_and_leaks_nothing() {
    let mut w = world().await;
    let routes = routes(&w);
    let mut failures = Vec::new();
    for r in &routes {
        for c in ORDER {
            let i = CALLERS.iter().position(|x| *x == c).unwrap();
            let want = r.expect[i];
            let (got, body) = call(&w, r, c).await;
            let matches = if want == IN {
                got != 401 && got != 403
            } else {
                got == want
            };
            if !matches {
                failures.push(format!(
                    "{} {} as {c:?}: want {want}, got {got}: {body}",
                    r.method, r.path
                ));
                continue;
            }
            if got >= 400 {
                // Every refusal is OpenAI's error JSON.
                if serde_json::from_str::<ErrorBody>(&body).is_err() {
                    failures.push(format!(
                        "{} {} as {c:?}: not an error body: {body}",
                        r.method, r.path
                    ));
                }
            }
            // Nobody is shown another account's things; admins see accounts
            // but never a secret.
            let me = account_of(c);
            let admin = me == Some(Account::Admin) && r.path.starts_with("/v1/admin");
            for (owner, m) in &w.markers {
                let foreign = Some(*owner) != me;
                let bad = if admin {
                    w.secrets.contains(m)
                } else {
                    foreign
                };
                // An id the caller sent in the path may be echoed in a 404.
                let echoed = r.path.contains(m.as_str());
                if bad && !echoed && body.contains(m.as_str()) {
                    failures.push(format!(
                        "{} {} as {c:?} shows {owner:?}'s `{}..`",
                        r.method,
                        r.path,
                        &m[..m.len().min(12)]
                    ));
                }
            }
            // A rotated provider key replaces the caller's credential.
            if r.path == "/v1/provider/account/key" && got == 200 {
                let v: ProviderKeyResponse = serde_json::from_str(&body).unwrap();
                let (name, acct) = match c {
                    ProvA => ("pa_key", Some(Account::ProvA)),
                    ProvB => ("pb_key", Some(Account::ProvB)),
                    _ => ("", None),
                };
                if let Some(a) = acct {
                    w.creds.insert(name, v.provider_key.expose().to_owned());
                    w.secret(a, v.provider_key.expose());
                }
            }
            // A session or key secret shown once becomes a secret to watch.
            if got == 201 && r.path == "/v1/me/keys" {
                let v: CreateKeyResponse = serde_json::from_str(&body).unwrap();
                w.secret(me.unwrap(), v.api_key.expose());
                w.mark(me.unwrap(), v.key.key_id.to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // After logout, the sessions that logged out are over.
    let me = route("GET", "/v1/me", None, ME);
    for c in [ASession, BSession, AdminSession] {
        assert_eq!(call(&w, &me, c).await.0, 401, "{c:?} still signed in");
    }
    w.h.assert_ledger().await;
}

#[tokio::test]
async fn a_suspended_admin_and_a_demoted_account_lose_the_admin_api_at_once() {
    let w = world().await;
    let r = route("GET", "/v1/admin/users", None, admin_only(200, 200));
    assert_eq!(call(&w, &r, AdminSession).await.0, 200);
    // The configured admin suspends the stored one; the stored admin's key stops at once.
    let stored_admin =
        w.h.broker
            .store()
            .user_by_email("admin@cxmpute.test")
            .await
            .unwrap();
    let suspend = route(
        "POST",
        format!("/v1/admin/users/{}/suspend", stored_admin.id),
        Some(json!({"reason": "test"})),
        admin_only(204, 204),
    );
    assert_eq!(call(&w, &suspend, AdminSession).await.0, 204);
    assert_eq!(call(&w, &r, AdminKey).await.0, 403);
    // An admin cannot lock itself out.
    let me =
        w.h.broker
            .store()
            .user_by_email("boss@admins.test")
            .await
            .unwrap();
    let own = route(
        "POST",
        format!("/v1/admin/users/{}/suspend", me.id),
        Some(json!({"reason": "oops"})),
        admin_only(409, 409),
    );
    assert_eq!(call(&w, &own, AdminSession).await.0, 409);
}

/// Calls `r` with `bearer` as the credential: the status and the body.
async fn call_with(w: &World, r: &Route, bearer: &str) -> (u16, String) {
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{}", w.h.url, r.path))
        .bearer_auth(bearer);
    if let Some(b) = (r.body)(AdminLimitedKey) {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn restricted_keys_of_an_admin_never_administer() {
    let w = world().await;
    let admin_routes: Vec<Route> = routes(&w)
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/admin") || r.path == "/v1/stats/admin")
        .collect();
    assert!(admin_routes.len() > 15);
    // A key of the admin's that may call one route only: 403 on every admin
    // route, in OpenAI's error JSON, with nothing of anyone's in it.
    let routed = w.cred("adm_routed_key");
    for r in &admin_routes {
        let (status, body) = call_with(&w, r, &routed).await;
        assert_eq!(status, 403, "{} {}: {body}", r.method, r.path);
        let e: ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(e.error.code.as_deref(), Some("forbidden"), "{body}");
        assert!(!body.contains("@"), "{body}");
    }
    // It is still a working gateway key for its route.
    let chat = route("POST", "/v1/chat/completions", Some(chat()), GATEWAY);
    assert_eq!(call_with(&w, &chat, &routed).await.0, 200);

    // Restricting the admin's own key (a credit limit) ends its admin use at
    // once; lifting the limit gives it back.
    let users = route("GET", "/v1/admin/users", None, admin_only(200, 200));
    assert_eq!(call(&w, &users, AdminKey).await.0, 200);
    let store = w.h.broker.store();
    let key = store
        .api_key_by_hash(&Secret::new(w.cred("adm_key")).hash())
        .await
        .unwrap();
    let limit = |l: Option<Credits>| ApiKeyUpdate {
        credit_limit: Some(l),
        ..ApiKeyUpdate::default()
    };
    store
        .update_api_key(&key.id, &limit(Some(Credits::whole(1))))
        .await
        .unwrap();
    assert_eq!(call(&w, &users, AdminKey).await.0, 403);
    store.update_api_key(&key.id, &limit(None)).await.unwrap();
    assert_eq!(call(&w, &users, AdminKey).await.0, 200);
    w.h.assert_ledger().await;
}

#[tokio::test]
async fn forged_and_expired_access_tokens_are_refused() {
    let w = world().await;
    let me = route("GET", "/v1/me", None, ME);
    let tok = w.cred("a_tok");
    // Change the claims (another user) and keep the signature.
    let parts: Vec<&str> = tok.split('.').collect();
    // The signature covers the encoded text: changing any character breaks it.
    let mut forged_claims = parts[1].to_owned();
    let c = if forged_claims.starts_with('A') {
        'B'
    } else {
        'A'
    };
    forged_claims.replace_range(..1, &c.to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    let none_alg = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
    for bad in [forged, none_alg, "a.b.c".to_owned(), format!("{tok}x")] {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/me", w.h.url))
            .bearer_auth(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    assert_eq!(call(&w, &me, ASession).await.0, 200);
    // Past its lifetime (by the broker's clock) the token is dead.
    w.h.clock
        .advance(std::time::Duration::from_secs(15 * 60 + 1));
    assert_eq!(call(&w, &me, ASession).await.0, 401);
}
