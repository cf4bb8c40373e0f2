//! A durable consumer group is not an open door: a member joins only with the group's own
//! filter (and, with an ACL, read rights and a `group read` grant), so no subscriber can make
//! the group commit past records no member received; a member that never acknowledges loses
//! its partitions to one that does.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::{Duration, Instant};

use tributary_tests::{http_get, mosquitto_passwd, ConnectOpts, Edge, Got, Proto, RawClient};

const GROUP: &str = r#"
[[routes]]
match = "sensors/+/#"
topic = "telemetry"
key = "{1}"
partitions = 2

[[groups]]
name = "alarms"
topics = ["telemetry"]
filter = "sensors/#"
"#;

fn group_status(edge: &Edge) -> serde_json::Value {
    let (code, body) = http_get(edge.admin, "/api/v1/groups", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["groups"][0].clone()
}

fn committed(edge: &Edge) -> u64 {
    group_status(edge)["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["committed"].as_u64().unwrap())
        .sum()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes `n` QoS 1 records over 4 devices, each acknowledged.
async fn publish(edge: &Edge, n: u16, prefix: &str) {
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("publisher"))
        .await
        .unwrap();
    for i in 1..=n {
        let topic = format!("sensors/dev{}/t", i % 4);
        c.publish(&topic, 1, i, format!("{prefix}-{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(i, 0));
    }
}

/// Receives `n` records; acknowledges them when `ack`. Returns (payload, dup) in order.
async fn receive(c: &mut RawClient, n: usize, ack: bool) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        match c.recv_within(Duration::from_secs(60)).await.unwrap() {
            Got::Publish {
                payload, pkid, dup, ..
            } => {
                if ack {
                    c.ack(0x40, pkid).await.unwrap();
                }
                got.push((String::from_utf8(payload).unwrap(), dup));
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_groups_own_filter_joins_and_nothing_is_committed_unseen() {
    let edge = Edge::start(GROUP);
    publish(&edge, 60, "a").await;

    // The attack: a member that filters everything out would make the group commit records
    // no member received. Any filter but the group's is refused, with either protocol.
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("intruder"))
        .await
        .unwrap();
    for filter in [
        "$share/alarms/none/x",
        "$share/alarms/#",
        "$share/alarms/sensors/+/t",
    ] {
        assert_eq!(
            c.subscribe(1, &[(filter, 1)]).await.unwrap(),
            vec![0x87],
            "{filter}"
        );
    }
    drop(c);
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("intruder-3"))
        .await
        .unwrap();
    assert_eq!(
        c.subscribe(1, &[("$share/alarms/none/x", 1)])
            .await
            .unwrap(),
        vec![0x80]
    );
    drop(c);
    // A share name that is no declared group stays an ordinary shared subscription.
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("live"))
        .await
        .unwrap();
    assert_eq!(
        c.subscribe(1, &[("$share/other/none/x", 1)]).await.unwrap(),
        vec![1]
    );
    drop(c);
    assert_eq!(
        committed(&edge),
        0,
        "nothing committed by the refused members"
    );
    assert!(group_status(&edge)["members"]
        .as_array()
        .unwrap()
        .is_empty());

    // The group's own filter joins and gets every record.
    let (mut m, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("member"))
        .await
        .unwrap();
    assert_eq!(
        m.subscribe(1, &[("$share/alarms/sensors/#", 1)])
            .await
            .unwrap(),
        vec![1]
    );
    let got = receive(&mut m, 60, true).await;
    assert_eq!(got.len(), 60);
    wait_until("all 60 committed", || committed(&edge) == 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_acl_a_member_needs_a_group_grant() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for user in ["alice", "bob"] {
        mosquitto_passwd(&passwd, user, "pw");
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read sensors/#\ngroup read alarms\nuser bob\ntopic read sensors/#\n",
    )
    .unwrap();
    let edge = Edge::start(&format!(
        "{GROUP}\n[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
        passwd.display().to_string(),
        acl.display().to_string()
    ));
    let join = |user: &'static str| {
        let addr = edge.addr;
        async move {
            let (mut c, ack) =
                RawClient::connect_as(addr, Proto::V5, &ConnectOpts::new(user), user, "pw")
                    .await
                    .unwrap();
            assert_eq!(ack.connack(), Some((0, false)));
            c.subscribe(1, &[("$share/alarms/sensors/#", 1)])
                .await
                .unwrap()
        }
    };
    assert_eq!(
        join("bob").await,
        vec![0x87],
        "read rights alone are not enough"
    );
    assert_eq!(join("alice").await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_acknowledges_loses_its_partitions_to_one_that_does() {
    let edge = Edge::start(&GROUP.replace(
        "filter = \"sensors/#\"",
        "filter = \"sensors/#\"\nack_timeout = \"1s\"",
    ));
    publish(&edge, 40, "b").await;
    let (mut silent, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("silent"))
        .await
        .unwrap();
    assert_eq!(
        silent
            .subscribe(1, &[("$share/alarms/sensors/#", 1)])
            .await
            .unwrap(),
        vec![1]
    );
    let held = receive(&mut silent, 40, false).await;
    assert!(held.iter().all(|(_, dup)| !dup));
    wait_until("the silent member timed out", || {
        group_status(&edge)["ack_timeouts"].as_u64() == Some(1)
    });

    // A member that acknowledges gets everything the silent one held, with DUP, and the
    // group commits all of it; the silent member, still connected, owns nothing.
    let (mut good, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("good"))
        .await
        .unwrap();
    assert_eq!(
        good.subscribe(1, &[("$share/alarms/sensors/#", 1)])
            .await
            .unwrap(),
        vec![1]
    );
    let got = receive(&mut good, 40, true).await;
    assert!(
        got.iter().all(|(_, dup)| *dup),
        "records another member held carry DUP"
    );
    let mut payloads: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    payloads.sort_unstable();
    payloads.dedup();
    assert_eq!(payloads.len(), 40);
    wait_until("all 40 committed", || committed(&edge) == 40);
    let g = group_status(&edge);
    for p in g["partitions"].as_array().unwrap() {
        assert_eq!(p["owner"], "good", "{g:#}");
    }
    drop(silent);
}
