//! The dashboard in a real browser: headless Chromium loads `/` while a firmware-sim fleet
//! publishes, and the page shows what the JSON API reports (connected clients, messages in
//! the log, a non-zero rate, the topic's row). The screenshot is kept under
//! target/test-artifacts/. Opened with a percent-encoded `?token=`, the page is let in and
//! reaches the API with the same token.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;

use tributary_tests::mirror::fleet;
use tributary_tests::{
    chromium, dashboard_dom, dashboard_dom_at, free_port, http_get, workspace_root, Edge,
};

/// Text of the element with `id` in the dumped DOM.
fn by_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no #{id} in the page"))
        + id.len()
        + 6;
    &dom[start..start + dom[start..].find('<').unwrap()]
}

fn number(text: &str) -> u64 {
    text.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a number"))
}

fn overview(edge: &Edge) -> serde_json::Value {
    let (status, body) = http_get(edge.admin, "/api/v1/overview", None).unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

#[test]
fn dashboard_shows_what_the_api_reports_while_devices_publish() {
    let browser = chromium();
    let edge = Edge::start("");
    let work = tempfile::tempdir().unwrap();
    // Long enough to be still publishing while the page samples its rate on a loaded
    // machine; stopped (by its pid) once the page has been read.
    let mut run = fleet(&edge, &work.path().join("run"), 20, 20, 300);
    // Wait until all 20 devices are connected and publishing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while overview(&edge)["mqtt"]["connections"] != 20 {
        assert!(std::time::Instant::now() < deadline, "{}", overview(&edge));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let artifacts = workspace_root().join("target").join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let url = format!("http://{}/", edge.admin);
    let before = overview(&edge);
    let dom = dashboard_dom(edge.admin);
    let after = overview(&edge);
    let shot = artifacts.join("dashboard.png");
    let screenshot = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--virtual-time-budget=5000",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        screenshot.status.success() && shot.exists(),
        "no screenshot"
    );
    let _ = run.kill();
    let _ = run.wait();

    // The page polled the API more than once (rates need two samples).
    let polls = dom
        .split("data-polls=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(number)
        .unwrap_or(0);
    assert!(polls >= 2, "the page polled {polls} times");
    assert_eq!(number(by_id(&dom, "connections")), 20);
    let total = number(by_id(&dom, "total"));
    let (lo, hi) = (
        before["messages_received_total"].as_u64().unwrap(),
        after["messages_received_total"].as_u64().unwrap(),
    );
    assert!(lo <= total && total <= hi, "page {total}, API {lo}..{hi}");
    assert!(lo > 0);
    assert!(number(by_id(&dom, "rate")) > 0, "ingest rate on the page");
    let row = dom
        .split("<tr data-topic=\"mqtt\">")
        .nth(1)
        .expect("the topic's row");
    let end = row
        .split("class=\"end\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .map(number)
        .unwrap();
    assert!(lo <= end && end <= hi, "row {end}, API {lo}..{hi}");
    assert_eq!(by_id(&dom, "uplink"), "none", "no [cloud] section");
}

#[test]
fn dashboard_opened_with_a_percent_encoded_token_reaches_the_api() {
    // `+`, `/`, `=` and `%` all mean something in a query string.
    let token = "plant+7/admin=token%41z";
    let port = free_port();
    let _edge = Edge::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{token}\"\n"
    ));
    let dom = dashboard_dom_at(&format!(
        "http://127.0.0.1:{port}/?token=plant%2B7%2Fadmin%3Dtoken%2541z"
    ));
    let status = by_id(&dom, "status");
    assert!(status.starts_with("updated"), "{status}");
    let polls = dom
        .split("data-polls=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(number)
        .unwrap_or(0);
    assert!(polls >= 2, "the page polled {polls} times");
    assert_eq!(number(by_id(&dom, "connections")), 0);
}
