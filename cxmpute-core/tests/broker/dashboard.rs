//! The dashboard in a real headless browser (Chromium through its WebDriver):
//! pages load, sign-in with a mailed code works, charts draw seeded data.
//!
//! Needs `CXMPUTE_TEST_CHROMEDRIVER` (the driver program; the test script
//! installs it) and, for sign-in, the SMTP sink of the test script
//! (`CXMPUTE_TEST_SMTP`, `CXMPUTE_TEST_MAILDIR`). Without them the tests
//! skip with a notice, unless `CXMPUTE_REQUIRE_SERVICES=1`.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{service_env, sign_in_code, SmtpSink, StandInNode, TestHost, MODEL};
use cxmpute_core::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// A WebDriver server this test started; stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The driver runs in its own process group with the browsers it
        // started: end the whole group, so a failed test leaves no browser.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn driver() -> Option<Driver> {
    let program = service_env("CXMPUTE_TEST_CHROMEDRIVER")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&program)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let d = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // Ready when its status endpoint answers; bounded, as the driver may fail.
    let status = format!("{}/status", d.url);
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&status).await {
            if r.status().is_success() {
                return Some(d);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the WebDriver server did not start");
}

async fn browser(d: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    let mut opts = json!({"args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-crash-reporter", "--disable-breakpad",
        "--window-size=1280,1000",
    ]});
    if let Ok(bin) = std::env::var("CXMPUTE_TEST_CHROMIUM") {
        opts["binary"] = Value::String(bin);
    }
    caps.insert("goog:chromeOptions".into(), opts);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&d.url)
        .await
        .expect("a browser session")
}

/// Waits for the page to finish rendering `view` (the app marks it).
async fn ready(c: &Client, view: &str) {
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(&format!("main[data-ready='{view}']")))
        .await
        .unwrap_or_else(|e| panic!("view {view} never became ready: {e}"));
}

/// Waits for an element; on a time-out, fails with what the page says.
async fn wait_for(c: &Client, css: &str) {
    if let Err(e) = c
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
    {
        let said = c.find(Locator::Css("#status")).await.ok();
        let said = match said {
            Some(el) => el.text().await.unwrap_or_default(),
            None => String::new(),
        };
        panic!("{css} never appeared ({e}); the page says {said:?}");
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn status_text(c: &Client) -> String {
    text(c, "#status").await
}

/// The drawn marks of a chart and the largest value it was given.
async fn chart(c: &Client, id: &str) -> (usize, f64) {
    let v = c
        .execute(
            "const s = document.querySelector(`svg[data-chart='${arguments[0]}']`);
             if (!s) return null;
             return [s.querySelectorAll('.point, .bar').length, Number(s.dataset.max)];",
            vec![json!(id)],
        )
        .await
        .unwrap();
    assert!(!v.is_null(), "chart {id} is not on the page");
    (v[0].as_u64().unwrap() as usize, v[1].as_f64().unwrap())
}

async fn rows(c: &Client, table: &str) -> usize {
    c.find_all(Locator::Css(&format!("#{table} tbody tr")))
        .await
        .unwrap()
        .len()
}

async fn type_into(c: &Client, css: &str, s: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(s)
        .await
        .unwrap();
}

/// Replaces what an input holds with `s`.
async fn set_field(c: &Client, css: &str, s: &str) {
    let field = c.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(s).await.unwrap();
}

/// Waits until `css`'s text contains `part`; fails with the text last seen.
async fn wait_text(c: &Client, css: &str, part: &str) -> String {
    let mut seen = String::new();
    for _ in 0..200 {
        seen = text(c, css).await;
        if seen.contains(part) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css} never said {part:?}; it says {seen:?}");
}

/// The rate limits `user`'s first key holds in the store.
async fn key_limits(h: &TestHost, user: &UserId) -> RateLimits {
    h.broker.store().api_keys(user).await.unwrap()[0].rate_limits
}

async fn key_budget(h: &TestHost, user: &UserId) -> Option<Budget> {
    h.broker.store().api_keys(user).await.unwrap()[0].budget
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Saves a screenshot when `CXMPUTE_TEST_SCREENSHOTS` names a folder.
async fn shot(c: &Client, name: &str) {
    if let Ok(dir) = std::env::var("CXMPUTE_TEST_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

struct Seeded {
    h: TestHost,
    _nodes: Vec<StandInNode>,
    user: User,
    key: Secret,
    provider_key: Secret,
}

/// A host with two nodes, a user with traffic on two days, and a network snapshot.
async fn seeded(mailer: Option<Arc<dyn Mailer>>) -> Seeded {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let h = TestHost::start_with(store, move |b| {
        let b = b.reward_policy(Arc::new(FlatReward(Credits(400))));
        match mailer {
            Some(m) => b.mailer(m),
            None => b,
        }
    })
    .await;
    h.broker
        .admin()
        .put_price(PriceEntry {
            service: Service::Chat,
            model: None,
            per_request: Credits(2_000),
            per_million_input_tokens: Credits(1_000_000),
            per_million_output_tokens: Credits(2_000_000),
            per_million_units: Credits::ZERO,
        })
        .await
        .unwrap();
    let a = StandInNode::start("a").await;
    let b = StandInNode::start("b").await;
    let (p, provider_key) = h.provider().await;
    h.add_node(&p, &a, Service::Chat, MODEL).await;
    h.add_node(&p, &b, Service::Chat, MODEL).await;
    let email = format!("dash-{}@users.test", h.url.rsplit(':').next().unwrap());
    let (user, _, key) = h
        .broker
        .admin()
        .create_user(&email, Credits::whole(5), false)
        .await
        .unwrap();
    let call = |stream: bool, app: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", h.url))
            .bearer_auth(key.expose())
            .header("X-Title", app)
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}))
            .send()
    };
    h.broker.record_network_snapshot();
    for i in 0..2 {
        let r = call(i == 1, "Notebook").await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    h.clock.advance(Duration::from_secs(86_400));
    h.broker.record_network_snapshot();
    for _ in 0..2 {
        let r = call(false, "Planner").await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    // The last one asks first for a model no node serves: it falls back.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(key.expose())
        .header("X-Title", "Planner")
        .json(&json!({"models": ["llama3.2:1b", MODEL], "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    h.broker.flush_stats().await.unwrap();
    Seeded {
        h,
        _nodes: vec![a, b],
        user,
        key,
        provider_key,
    }
}

#[tokio::test]
async fn dashboard_pages_load_and_draw_seeded_data() {
    let Some(d) = driver().await else { return };
    let s = seeded(None).await;
    let c = browser(&d).await;
    let base = format!("{}/dashboard", s.h.url);

    // Public network view: tiles, charts over 30 days, pools.
    c.goto(&base).await.unwrap();
    ready(&c, "network").await;
    assert_eq!(status_text(&c).await, "");
    assert_eq!(text(&c, "#tile-requests .value").await, "5");
    assert_eq!(text(&c, "#tile-nodes .value").await, "2");
    let (marks, max) = chart(&c, "requests").await;
    assert_eq!(marks, 30, "a point per day");
    assert_eq!(max, 3.0, "the busiest day had 3 requests");
    let (bars, nodes) = chart(&c, "nodes").await;
    assert_eq!((bars, nodes), (30, 2.0));
    assert_eq!(rows(&c, "pools-now").await, 1);
    shot(&c, "network").await;

    // A narrower range through the form.
    let today = s.h.broker.now().day();
    let yesterday = today.plus_days(-1);
    c.execute(
        "document.getElementById('range-from').value = arguments[0];
         document.getElementById('range-to').value = arguments[1];",
        vec![json!(yesterday.to_string()), json!(today.to_string())],
    )
    .await
    .unwrap();
    click(&c, "#range button").await;
    ready(&c, "network").await;
    assert_eq!(chart(&c, "requests").await, (2, 3.0));

    // A user's usage with an API key.
    c.goto(&format!("{base}#/me")).await.unwrap();
    ready(&c, "me").await;
    type_into(&c, "#apikey-input", s.key.expose()).await;
    click(&c, "#apikey-use").await;
    wait_for(&c, "#tile-charged").await;
    ready(&c, "me").await;
    assert_eq!(text(&c, "#tile-requests .value").await, "5");
    let charged = s.h.broker.store().ledger_totals().await.unwrap().charged;
    let shown = text(&c, "#tile-charged .value").await;
    assert_eq!(shown, credits_text(charged), "charges are shown exactly");
    assert_eq!(rows(&c, "my-apps").await, 2);
    shot(&c, "me-key").await;

    // The provider's nodes and earnings with its key.
    c.goto(&format!("{base}#/provider")).await.unwrap();
    ready(&c, "provider").await;
    type_into(&c, "#provider-key-input", s.provider_key.expose()).await;
    click(&c, "#provider-key-use").await;
    wait_for(&c, "#tile-earned").await;
    ready(&c, "provider").await;
    assert_eq!(rows(&c, "nodes").await, 2);
    let (marks, max) = chart(&c, "earnings").await;
    assert_eq!(marks, 2, "the range chosen above holds across views");
    assert!(max > 0.0, "earnings are drawn");
    shot(&c, "provider").await;

    // Operators, with the admin's key.
    c.goto(&format!("{base}#/admin")).await.unwrap();
    ready(&c, "admin").await;
    type_into(&c, "#admin-key-input", s.h.admin_key.expose()).await;
    click(&c, "#admin-key-use").await;
    wait_for(&c, "#top-users").await;
    ready(&c, "admin").await;
    assert_eq!(rows(&c, "top-users").await, 1);
    assert_eq!(text(&c, "#top-users tbody td").await, s.user.id.as_str());
    assert_eq!(rows(&c, "top-apps").await, 2);
    // Money per day, newest first: what was charged, rewarded and kept.
    assert_eq!(rows(&c, "money-days").await, 2);
    let stats: Value = reqwest::Client::new()
        .get(format!("{base_api}/v1/stats/admin", base_api = s.h.url))
        .bearer_auth(s.h.admin_key.expose())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = stats["days"].as_array().unwrap().last().unwrap().clone();
    let platform = Credits(last["platform"].as_i64().unwrap());
    assert!(platform > Credits::ZERO);
    assert_eq!(
        Credits(last["charged"].as_i64().unwrap()),
        Credits(last["rewarded"].as_i64().unwrap()).saturating_add(platform)
    );
    let cell = text(&c, "#money-days tbody tr:first-child td:nth-child(4)").await;
    assert_eq!(cell, credits_text(platform));
    shot(&c, "admin").await;

    // The admin sets a user's key's rate limits by its id; a bad value is
    // refused in the broker's words.
    let key_id = s.h.broker.store().api_keys(&s.user.id).await.unwrap()[0]
        .id
        .clone();
    type_into(&c, "#admin-limits-key", key_id.as_str()).await;
    type_into(&c, "#admin-limits-rpm", "0").await;
    click(&c, "#admin-limits-save").await;
    wait_text(&c, "#status", "`rpm` must be at least 1").await;
    assert_eq!(key_limits(&s.h, &s.user.id).await, RateLimits::NONE);
    set_field(&c, "#admin-limits-rpm", "60").await;
    type_into(&c, "#admin-limits-tpm", "100000").await;
    click(&c, "#admin-limits-save").await;
    wait_text(
        &c,
        "#admin-limits-result",
        "60 requests, 100,000 tokens a minute",
    )
    .await;
    assert_eq!(status_text(&c).await, "");
    let set = RateLimits {
        rpm: Some(60),
        tpm: Some(100_000),
    };
    assert_eq!(key_limits(&s.h, &s.user.id).await, set);
    shot(&c, "admin-limits").await;
    // And the user's account budget and alerts, by its id.
    type_into(&c, "#admin-account-user", s.user.id.as_str()).await;
    type_into(&c, "#admin-account-budget", "2.5").await;
    type_into(&c, "#admin-account-budget_percent", "101").await;
    click(&c, "#admin-account button").await;
    wait_text(&c, "#status", "budget_percent").await;
    assert_eq!(
        s.h.broker.store().user(&s.user.id).await.unwrap().budget,
        None
    );
    set_field(&c, "#admin-account-budget_percent", "80").await;
    click(&c, "#admin-account button").await;
    wait_text(&c, "#admin-account-result", "2.50 a day").await;
    let u = s.h.broker.store().user(&s.user.id).await.unwrap();
    assert_eq!(
        u.budget,
        Some(Budget {
            limit: Credits(2_500_000),
            period: BudgetPeriod::Day
        })
    );
    assert_eq!(u.alerts.budget_percent, Some(80));
    // The catalogue: the reward policy above it; add a model, then remove it.
    let builtin = network::Catalogue::original().models().len();
    assert_eq!(rows(&c, "catalogue").await, builtin);
    assert!(text(&c, "#reward-policy").await.contains("flat"));
    type_into(&c, "#catalogue-model", "dash-model:1b").await;
    click(&c, "#catalogue-add").await;
    let added = "button.remove[data-model='chat:dash-model:1b']";
    wait_for(&c, added).await;
    ready(&c, "admin").await;
    assert_eq!(rows(&c, "catalogue").await, builtin + 1);
    assert!(status_text(&c).await.contains("Saved chat dash-model:1b"));
    let listed = s.h.broker.admin().catalogue();
    assert!(listed.iter().any(|m| m.model == "dash-model:1b"));
    click(&c, added).await;
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//div[@id='status'][contains(., 'Removed chat dash-model:1b')]",
        ))
        .await
        .unwrap();
    assert_eq!(rows(&c, "catalogue").await, builtin);
    assert_eq!(s.h.broker.admin().catalogue().len(), builtin);
    // Aliases: define one, see it listed, remove it.
    assert_eq!(rows(&c, "aliases").await, 0);
    type_into(&c, "#alias-name", "dash-fast").await;
    type_into(&c, "#alias-models", "llama3.2:3b, llama3.2:1b").await;
    click(&c, "#alias-save").await;
    let added = "button.remove[data-alias='dash-fast']";
    wait_for(&c, added).await;
    ready(&c, "admin").await;
    assert_eq!(rows(&c, "aliases").await, 1);
    assert!(text(&c, "#aliases")
        .await
        .contains("llama3.2:3b → llama3.2:1b"));
    let want = ModelAlias {
        alias: "dash-fast".into(),
        models: vec!["llama3.2:3b".into(), "llama3.2:1b".into()],
    };
    assert_eq!(s.h.broker.admin().aliases(), vec![want]);
    shot(&c, "admin-aliases").await;
    click(&c, added).await;
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//div[@id='status'][contains(., 'Removed alias dash-fast')]",
        ))
        .await
        .unwrap();
    assert!(s.h.broker.admin().aliases().is_empty());

    c.close().await.unwrap();
}

/// Credits as the page shows them: exact, at least two decimals.
fn credits_text(c: Credits) -> String {
    let whole = c.0 / 1_000_000;
    let mut frac = format!("{:06}", c.0 % 1_000_000)
        .trim_end_matches('0')
        .to_owned();
    while frac.len() < 2 {
        frac.push('0');
    }
    format!("{whole}.{frac}")
}

#[tokio::test]
async fn signing_in_with_a_mailed_code_shows_usage_and_keys() {
    let Some(d) = driver().await else { return };
    let Some(sink) = SmtpSink::from_env() else {
        return;
    };
    let mailer = sink.mailer();
    let s = seeded(Some(mailer)).await;
    let c = browser(&d).await;
    c.goto(&format!("{}/dashboard#/me", s.h.url)).await.unwrap();
    ready(&c, "me").await;
    assert!(c.find(Locator::Css("#signin-form")).await.is_ok());

    type_into(&c, "#signin-email", &s.user.email).await;
    click(&c, "#signin-send").await;
    wait_for(&c, "#signin-code-form:not([hidden])").await;
    assert_eq!(status_text(&c).await, "");
    let mail = sink.new_mail(&s.user.email, &mut HashSet::new());
    let code = mail
        .first()
        .and_then(|m| sign_in_code(m))
        .expect("a mailed code");
    assert_eq!(code.len(), 8);
    type_into(&c, "#signin-code", &code).await;
    click(&c, "#signin-verify").await;
    wait_for(&c, "#me-who").await;
    ready(&c, "me").await;
    assert!(text(&c, "#me-who").await.starts_with(&s.user.email));
    assert_eq!(text(&c, "#tile-requests .value").await, "5");
    assert_eq!(rows(&c, "my-keys").await, 1, "the user's one key is listed");
    // The latest requests name the model asked for where another served.
    assert_eq!(rows(&c, "my-latest").await, 5);
    let latest = text(&c, "#my-latest").await;
    assert_eq!(latest.matches("(fell back)").count(), 1, "{latest}");
    assert!(latest.contains("llama3.2:1b (fell back)"), "{latest}");

    // The user's key's limits, shown and changed in place (empty: none).
    let key_id = s.h.broker.store().api_keys(&s.user.id).await.unwrap()[0]
        .id
        .clone();
    let field = |name: &str| format!("#limits-{key_id}-{name}");
    set_field(&c, &field("rpm"), "30").await;
    click(&c, &format!("#limits-{key_id} button")).await;
    for _ in 0..200 {
        if key_limits(&s.h, &s.user.id).await.rpm == Some(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let set = RateLimits {
        rpm: Some(30),
        tpm: None,
    };
    assert_eq!(key_limits(&s.h, &s.user.id).await, set);
    wait_for(&c, &format!("{}[value='30']", field("rpm"))).await;
    // And its budget, in credits a day or month (empty: none).
    set_field(&c, &field("budget"), "0.25").await;
    c.execute(
        &format!("document.getElementById('limits-{key_id}-period').value = 'month'"),
        vec![],
    )
    .await
    .unwrap();
    click(&c, &format!("#limits-{key_id} button")).await;
    let monthly = Some(Budget {
        limit: Credits(250_000),
        period: BudgetPeriod::Month,
    });
    for _ in 0..200 {
        if key_budget(&s.h, &s.user.id).await == monthly {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(key_budget(&s.h, &s.user.id).await, monthly);
    assert_eq!(key_limits(&s.h, &s.user.id).await, set, "the limits stay");
    wait_for(&c, &format!("{}[value='0.25']", field("budget"))).await;
    ready(&c, "me").await;
    // The account's own budget and alerts: shown with this period's spending.
    wait_for(
        &c,
        "#me-account-budget", // the form, once the page settled (below)
    )
    .await;
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//p[@id='me-budget'][contains(., 'No account budget')]",
        ))
        .await
        .unwrap();
    ready(&c, "me").await;
    set_field(&c, "#me-account-budget", "1").await;
    set_field(&c, "#me-account-balance_below", "0.5").await;
    click(&c, "#me-account button").await;
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//p[@id='me-budget'][contains(., 'Spent this day: 0')]",
        ))
        .await
        .unwrap();
    let u = s.h.broker.store().user(&s.user.id).await.unwrap();
    assert_eq!(u.budget.map(|b| b.limit), Some(Credits(1_000_000)));
    assert_eq!(u.alerts.balance_below, Some(Credits(500_000)));
    wait_for(&c, "#me-account-balance_below[value='0.5']").await;
    ready(&c, "me").await;
    c.execute(
        "document.getElementById('my-keys').scrollIntoView()",
        vec![],
    )
    .await
    .unwrap();
    shot(&c, "me-keys").await;
    let (marks, max) = chart(&c, "my-requests").await;
    assert_eq!((marks, max), (30, 3.0));
    shot(&c, "me-session").await;

    // The latest requests are listed; one answered from the response
    // cache says so once the page is drawn again (saving the key's limits
    // as they are draws it).
    assert!(rows(&c, "my-latest").await >= 1);
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 5});
    for _ in 0..2 {
        let r =
            s.h.post_request("/v1/chat/completions", &s.key, &body)
                .header("x-cxmpute-cache", "ttl=60")
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    click(&c, &format!("#limits-{key_id} button")).await;
    let mut marked = false;
    for _ in 0..200 {
        if c.find(Locator::Css("#my-latest")).await.is_ok()
            && text(&c, "#my-latest").await.contains("from cache")
        {
            marked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(marked, "a cache hit is marked in the recent requests");

    // Signing out returns to the sign-in form.
    click(&c, "#signout").await;
    wait_for(&c, "#signin-form").await;
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_quarantined_node_shows_in_its_providers_view_and_the_admins() {
    use cxmpute_core::testkit::Answers;
    let Some(d) = driver().await else { return };
    let h = TestHost::start_market(Credits(1_000)).await;
    let mut nodes = Vec::new();
    for (i, answers) in [Answers::model(1), Answers::model(1), Answers::model(2)]
        .into_iter()
        .enumerate()
    {
        let n = StandInNode::start(&format!("n{i}")).await;
        n.set_answers(answers);
        let (p, key) = h.provider().await;
        h.add_node(&p, &n, Service::Chat, MODEL).await;
        nodes.push((n, key));
    }
    for _ in 0..2 {
        h.broker.run_canaries().await.unwrap();
    }
    let c = browser(&d).await;
    let base = format!("{}/dashboard", h.url);
    c.goto(&format!("{base}#/provider")).await.unwrap();
    ready(&c, "provider").await;
    type_into(&c, "#provider-key-input", nodes[2].1.expose()).await;
    click(&c, "#provider-key-use").await;
    wait_for(&c, "#nodes").await;
    ready(&c, "provider").await;
    assert_eq!(
        text(&c, "#nodes tbody td:nth-child(4)").await,
        "quarantined"
    );
    shot(&c, "provider-quarantined").await;

    c.goto(&format!("{base}#/admin")).await.unwrap();
    ready(&c, "admin").await;
    type_into(&c, "#admin-key-input", h.admin_key.expose()).await;
    click(&c, "#admin-key-use").await;
    wait_for(&c, "#admin-nodes").await;
    ready(&c, "admin").await;
    assert_eq!(rows(&c, "admin-nodes").await, 1);
    let why = text(&c, "#admin-nodes tbody td:nth-child(5)").await;
    assert!(why.contains("differed"), "{why}");
    c.close().await.unwrap();
}
