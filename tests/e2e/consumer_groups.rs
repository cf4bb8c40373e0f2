//! Durable consumer groups (issue #9), with paho-mqtt members (tests/clients/group_member.py)
//! against the release edge: partitions shared out one owner each, every record exactly once
//! when all acknowledge, a leaving member's unacknowledged records redelivered to the others
//! with DUP, a backlog kept for an offline group, and resumption after kill -9.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::{
    assert_readme_names_metrics, client_script, dashboard_dom, http_get, metric, python, Edge,
};

const GROUP_CONFIG: &str = r#"
[[routes]]
match = "sensors/+/#"
topic = "telemetry"
key = "{1}"
partitions = 6

[[groups]]
name = "alarms"
topics = ["telemetry"]
filter = "sensors/#"
"#;

/// One JSON line a member wrote per message.
#[derive(Debug, Clone)]
struct Got {
    payload: String,
    dup: bool,
    acked: bool,
}

impl Got {
    /// (device, sequence) of a payload `{prefix}:dev{d}:{i}`.
    fn device_seq(&self) -> (String, u64) {
        let mut parts = self.payload.rsplitn(3, ':');
        let seq = parts.next().unwrap().parse().unwrap();
        let device = parts.next().unwrap().to_string();
        (device, seq)
    }
}

struct Member {
    child: Child,
    out: PathBuf,
}

impl Member {
    fn start(edge: &Edge, dir: &Path, client_id: &str, extra: &[&str]) -> Member {
        let out = dir.join(format!("{client_id}.jsonl"));
        let child = Command::new(python())
            .arg(client_script("group_member.py"))
            .args([
                "consume",
                "127.0.0.1",
                &edge.addr.port().to_string(),
                client_id,
            ])
            .arg("$share/alarms/sensors/#")
            .arg(&out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a paho member");
        Member { child, out }
    }

    /// Waits until the member has received the message it leaves after.
    fn wait_leaving(&self) {
        let marker = PathBuf::from(format!("{}.leaving", self.out.display()));
        wait_until("the member reached the message it leaves after", || {
            marker.exists()
        });
    }

    /// Waits for the member to end; returns what it received, in order.
    fn finish(mut self) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "member failed: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "member did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        read_got(&self.out)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_got(path: &Path) -> Vec<Got> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Got {
                payload: v["payload"].as_str().unwrap().to_string(),
                dup: v["dup"].as_bool().unwrap(),
                acked: v["acked"].as_bool().unwrap(),
            }
        })
        .collect()
}

/// The payloads a member acknowledged, and those it did not.
fn split_acked(got: &[Got]) -> (HashSet<&str>, HashSet<&str>) {
    let payloads = |acked: bool| {
        got.iter()
            .filter(|r| r.acked == acked)
            .map(|r| r.payload.as_str())
            .collect()
    };
    (payloads(true), payloads(false))
}

/// One member alone in the group reads until every partition is processed, then leaves;
/// what it received, in order.
fn drain_alone(edge: &Edge, dir: &Path, client_id: &str, what: &str) -> Vec<Got> {
    let stop = dir.join(format!("{client_id}.stop"));
    let member = Member::start(
        edge,
        dir,
        client_id,
        &["--until-file", stop.to_str().unwrap()],
    );
    wait_until(what, || members_online(edge) == 1 && drained(edge));
    std::fs::write(&stop, b"").unwrap();
    member.finish()
}

fn publish(edge: &Edge, client_id: &str, devices: u32, per_device: u32, prefix: &str) {
    let out = Command::new(python())
        .arg(client_script("group_member.py"))
        .args([
            "publish",
            "127.0.0.1",
            &edge.addr.port().to_string(),
            client_id,
        ])
        .args([
            devices.to_string(),
            per_device.to_string(),
            prefix.to_string(),
        ])
        .output()
        .expect("running the paho publisher");
    assert!(out.status.success(), "publisher failed: {out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["acked"],
        devices * per_device,
        "every publish is acknowledged"
    );
}

fn published(devices: u32, per_device: u32, prefix: &str) -> HashSet<String> {
    (0..devices)
        .flat_map(|d| (0..per_device).map(move |i| format!("{prefix}:dev{d}:{i}")))
        .collect()
}

fn group_status(edge: &Edge) -> serde_json::Value {
    let (code, body) = http_get(edge.admin, "/api/v1/groups", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["groups"][0].clone()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn members_online(edge: &Edge) -> usize {
    group_status(edge)["members"].as_array().unwrap().len()
}

/// Every partition processed up to its end, nothing in flight, positions stored.
fn drained(edge: &Edge) -> bool {
    let g = group_status(edge);
    g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["lag"] == 0 && p["in_flight"] == 0)
}

fn sum(g: &serde_json::Value, field: &str) -> u64 {
    g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_u64().unwrap())
        .sum()
}

/// Each device's records arrive in the order they were published.
fn assert_device_order(who: &str, got: &[Got]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for g in got {
        let (device, seq) = g.device_seq();
        if let Some(prev) = last.insert(device.clone(), seq) {
            assert!(
                seq > prev,
                "{who} got {device}:{seq} after {device}:{prev}: per-device order broken"
            );
        }
    }
}

#[test]
fn three_members_share_six_partitions_and_get_every_record_once() {
    let edge = Edge::start(GROUP_CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let stop_arg = stop.to_str().unwrap().to_string();
    let mut members = Vec::new();
    for (i, id) in ["m-a", "m-b", "m-c"].iter().enumerate() {
        members.push(Member::start(
            &edge,
            dir.path(),
            id,
            &["--until-file", &stop_arg],
        ));
        wait_until(&format!("{} members are online", i + 1), || {
            members_online(&edge) == i + 1
        });
    }
    let g = group_status(&edge);
    let mut owned: BTreeMap<String, usize> = BTreeMap::new();
    for p in g["partitions"].as_array().unwrap() {
        let owner = p["owner"].as_str().expect("every partition has an owner");
        *owned.entry(owner.to_string()).or_default() += 1;
    }
    assert_eq!(
        owned.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "six partitions over three members: {owned:?}"
    );

    publish(&edge, "pub-1", 12, 100, "w1");
    wait_until("the group has processed every record", || drained(&edge));
    std::fs::write(&stop, b"").unwrap();
    let got: Vec<(String, Vec<Got>)> = ["m-a", "m-b", "m-c"]
        .iter()
        .zip(members)
        .map(|(id, m)| (id.to_string(), m.finish()))
        .collect();

    let mut seen: HashMap<String, String> = HashMap::new();
    let mut device_owner: HashMap<String, String> = HashMap::new();
    for (id, list) in &got {
        assert!(!list.is_empty(), "{id} received nothing");
        assert_device_order(id, list);
        for r in list {
            assert!(
                !r.dup,
                "{id} got {} with DUP, nothing was redelivered",
                r.payload
            );
            if let Some(other) = seen.insert(r.payload.clone(), id.clone()) {
                panic!("{} reached both {other} and {id}", r.payload);
            }
            let (device, _) = r.device_seq();
            let owner = device_owner.entry(device.clone()).or_insert(id.clone());
            assert_eq!(owner, id, "{device}'s partition has one owner");
        }
    }
    let all: HashSet<String> = seen.into_keys().collect();
    assert_eq!(all, published(12, 100, "w1"), "every record exactly once");
    let g = group_status(&edge);
    assert_eq!(g["acknowledged"], 1200);
    assert_eq!(sum(&g, "committed"), 1200);
    // The members' processes have ended; the edge sees them go within a round.
    wait_until("the members have left", || members_online(&edge) == 0);
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(
        metric(
            &text,
            "tributary_group_records_acknowledged_total{group=\"alarms\"}"
        ),
        1200.0
    );
    assert_eq!(
        metric(&text, "tributary_group_members{group=\"alarms\"}"),
        0.0
    );
    assert_readme_names_metrics(&text);
}

#[test]
fn a_leaving_members_unacknowledged_records_reach_the_others() {
    let edge = Edge::start(GROUP_CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let stop_arg = stop.to_str().unwrap().to_string();
    // m-a acknowledges 50 records, then leaves after receiving 200.
    let leave = dir.path().join("leave");
    let leaver = Member::start(
        &edge,
        dir.path(),
        "m-a",
        &[
            "--ack-first",
            "50",
            "--leave-after",
            "200",
            "--until-file",
            leave.to_str().unwrap(),
        ],
    );
    wait_until("m-a is online", || members_online(&edge) == 1);
    let mut stayers = Vec::new();
    for (i, id) in ["m-b", "m-c"].iter().enumerate() {
        stayers.push(Member::start(
            &edge,
            dir.path(),
            id,
            &["--until-file", &stop_arg],
        ));
        wait_until(&format!("{} members are online", i + 2), || {
            members_online(&edge) == i + 2
        });
    }
    publish(&edge, "pub-1", 24, 50, "w1");
    leaver.wait_leaving();
    wait_until("the edge has m-a's 50 acknowledgements", || {
        group_status(&edge)["acknowledged"].as_u64().unwrap() >= 50
    });
    std::fs::write(&leave, b"").unwrap();
    let left = leaver.finish();
    wait_until("m-a has left", || members_online(&edge) == 2);
    wait_until("the group has processed every record", || drained(&edge));
    std::fs::write(&stop, b"").unwrap();
    let stayed: Vec<Vec<Got>> = stayers.into_iter().map(Member::finish).collect();

    assert_eq!(left.len(), 200, "m-a left after its 200th record");
    assert_device_order("m-a", &left);
    let (acked_by_leaver, unacked_by_leaver) = split_acked(&left);
    assert_eq!((acked_by_leaver.len(), unacked_by_leaver.len()), (50, 150));

    let mut by_stayers: HashSet<String> = HashSet::new();
    for (i, list) in stayed.iter().enumerate() {
        assert_device_order(&format!("stayer {i}"), list);
        for r in list {
            assert!(
                !acked_by_leaver.contains(r.payload.as_str()),
                "{} was acknowledged by m-a and must not be redelivered",
                r.payload
            );
            if unacked_by_leaver.contains(r.payload.as_str()) {
                assert!(r.dup, "{} is redelivered and must carry DUP", r.payload);
            }
            assert!(
                by_stayers.insert(r.payload.clone()),
                "{} reached the remaining members twice",
                r.payload
            );
        }
    }
    for p in &unacked_by_leaver {
        assert!(
            by_stayers.contains(*p),
            "{p}, left unacknowledged by m-a, never reached the others"
        );
    }
    let processed: HashSet<String> = by_stayers
        .into_iter()
        .chain(acked_by_leaver.iter().map(|p| p.to_string()))
        .collect();
    assert_eq!(processed, published(24, 50, "w1"), "every record processed");
}

#[test]
fn an_offline_group_keeps_its_backlog_and_resumes_after_kill9() {
    let mut edge = Edge::start(GROUP_CONFIG);
    let dir = tempfile::tempdir().unwrap();
    // Nobody online: the group waits.
    publish(&edge, "pub-1", 10, 1000, "w1");
    wait_until("the group reports the backlog", || {
        sum(&group_status(&edge), "end") == 10_000
    });
    let g = group_status(&edge);
    assert_eq!(sum(&g, "lag"), 10_000, "the backlog waits for the group");
    assert_eq!(g["delivered"], 0);
    // The dashboard shows it too.
    let (_, body) = http_get(edge.admin, "/api/v1/overview", None).unwrap();
    let overview: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(overview["groups"][0]["lag_records"], 10_000);
    let dom = dashboard_dom(edge.admin);
    let row = &dom[dom
        .find("data-group=\"alarms\"")
        .expect("a dashboard row for the group")..];
    let lag = &row[row.find("class=\"lag\">").unwrap() + 12..];
    assert_eq!(&lag[..lag.find('<').unwrap()], "10,000", "{row}");

    let got = drain_alone(&edge, dir.path(), "m-1", "m-1 has processed the backlog");
    assert_device_order("m-1", &got);
    let payloads: Vec<&str> = got.iter().map(|r| r.payload.as_str()).collect();
    let unique: HashSet<String> = payloads.iter().map(|p| p.to_string()).collect();
    assert_eq!(payloads.len(), 10_000, "each backlog record once");
    assert_eq!(unique, published(10, 1000, "w1"));

    // Second wave: m-2 acknowledges the first 1,000 of 2,000 records, receives 200 more
    // and leaves; the edge is killed once the position is stored.
    publish(&edge, "pub-2", 10, 200, "w2");
    let leave = dir.path().join("leave-2");
    let m2 = Member::start(
        &edge,
        dir.path(),
        "m-2",
        &[
            "--ack-first",
            "1000",
            "--leave-after",
            "1200",
            "--until-file",
            leave.to_str().unwrap(),
        ],
    );
    m2.wait_leaving();
    wait_until("the edge has m-2's 1,000 acknowledgements", || {
        group_status(&edge)["acknowledged"].as_u64().unwrap() == 11_000
    });
    std::fs::write(&leave, b"").unwrap();
    let m2 = m2.finish();
    assert_eq!(m2.len(), 1200);
    // Each partition's records arrive in offset order, so the 1,000 acknowledged ones are a
    // prefix of each partition: the stored positions move on by exactly 1,000.
    let stored_before = 11_000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = group_status(&edge);
        if sum(&g, "committed") == stored_before && g["members"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m-2's acknowledgements are not stored: {g:#}\nm-2 got: {:?}",
            m2.iter().map(|r| (&r.payload, r.acked)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    edge.kill9();
    edge.restart();

    let g = group_status(&edge);
    assert_eq!(
        sum(&g, "committed"),
        stored_before,
        "the group resumes from its stored position"
    );
    let m3 = drain_alone(&edge, dir.path(), "m-3", "m-3 has processed the rest");
    assert_device_order("m-3", &m3);

    let (acked_by_m2, unacked_by_m2) = split_acked(&m2);
    let mut after: HashSet<String> = HashSet::new();
    for r in &m3 {
        assert!(
            !acked_by_m2.contains(r.payload.as_str()),
            "{} was acknowledged and stored before the crash",
            r.payload
        );
        if unacked_by_m2.contains(r.payload.as_str()) {
            assert!(
                r.dup,
                "{} was sent before the crash and must carry DUP",
                r.payload
            );
        }
        assert!(after.insert(r.payload.clone()), "{} twice", r.payload);
    }
    let processed: HashSet<String> = after
        .into_iter()
        .chain(acked_by_m2.iter().map(|p| p.to_string()))
        .collect();
    assert_eq!(
        processed,
        published(10, 200, "w2"),
        "nothing lost across kill -9"
    );
}

#[test]
fn retention_losses_are_counted_and_positions_can_be_reset() {
    let config = format!("{GROUP_CONFIG}\n[topics.telemetry]\nretention_bytes = \"32KiB\"\n");
    let mut edge = Edge::start_with("", "retention_check_interval = \"1s\"\n", &config);
    let dir = tempfile::tempdir().unwrap();
    // No member online while retention deletes most of what is published.
    publish(&edge, "pub-1", 24, 500, "w1");
    wait_until("retention has deleted records the group never read", || {
        sum(&group_status(&edge), "lost") > 0
    });
    // Retention runs every second: once two checks delete nothing more, the topic is within
    // its budget and nothing it holds now is deleted later.
    let mut before = sum(&group_status(&edge), "lost");
    loop {
        std::thread::sleep(Duration::from_millis(2500));
        let now = sum(&group_status(&edge), "lost");
        if now == before {
            break;
        }
        before = now;
    }
    let got = drain_alone(&edge, dir.path(), "m-1", "m-1 has processed what is left");
    let g = group_status(&edge);
    let lost = sum(&g, "lost");
    assert_eq!(
        g["lost"], lost,
        "the group total is the sum of its partitions"
    );
    assert!(
        lost > 0 && !got.is_empty(),
        "lost {lost}, received {}",
        got.len()
    );
    let unique: HashSet<&str> = got.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(unique.len(), got.len(), "nothing twice");
    assert_eq!(
        got.len() as u64 + lost,
        24 * 500,
        "every record was either received or counted as lost"
    );
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(
        metric(
            &text,
            "tributary_group_records_lost_total{group=\"alarms\"}"
        ),
        lost as f64
    );

    // On a stopped node the group goes back to the first record held.
    edge.stop();
    let (status, out, err) = edge.cli(&[
        "--config",
        edge.config_path().to_str().unwrap(),
        "groups",
        "reset",
        "--group",
        "alarms",
        "--to",
        "earliest",
    ]);
    assert!(status.success(), "{err}");
    assert_eq!(out.lines().count(), 6, "one line per partition: {out}");
    let (status, out, err) = edge.cli(&[
        "--config",
        edge.config_path().to_str().unwrap(),
        "groups",
        "--json",
    ]);
    assert!(status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["edge_running"], false);
    let lag: u64 = doc["groups"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_u64().unwrap())
        .sum();
    assert_eq!(lag, got.len() as u64, "the lag is every record still held");
    let (status, _, err) = edge.cli(&["groups", "reset", "--group", "alarms", "--to", "x"]);
    assert!(
        !status.success() && err.contains("earliest, latest or an offset"),
        "{err}"
    );

    edge.restart();
    let again: HashSet<String> = drain_alone(
        &edge,
        dir.path(),
        "m-2",
        "m-2 has processed everything again",
    )
    .into_iter()
    .map(|r| r.payload)
    .collect();
    let first: HashSet<String> = got.into_iter().map(|r| r.payload).collect();
    assert_eq!(
        again, first,
        "after the reset the group reads every record held again"
    );
}
