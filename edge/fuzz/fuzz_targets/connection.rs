//! Arbitrary bytes through the edge's connection state machine, exactly as a client's bytes
//! reach it: one edge runs in this process (its real listener, session store, appender and
//! log), and each input is one TCP connection that sends the bytes, half-closes, and reads
//! until the edge closes.
//!
//! The first input byte picks what comes before the rest: nothing (the CONNECT parsing and
//! refusal paths), or a valid MQTT 3.1.1 or 5.0 CONNECT with a clean or a persistent
//! session (so the bytes after it reach PUBLISH, SUBSCRIBE, acknowledgements, DISCONNECT,
//! ... of that version, and what a persistent session stores). The edge runs with an ACL
//! (anonymous clients may do everything, and join the durable group `alarms`), so the ACL
//! and consumer-group paths run too.
//!
//! A finding is: a panic anywhere in the edge (the hook below aborts, so a panicking
//! connection task is not hidden by tokio), the edge failing to accept a connection (it
//! died or stopped serving), a connection the edge keeps open after the client's EOF, or,
//! once the connection has closed, any stored entry that does not decode (the oracle runs
//! `edge check`'s decoder over the whole log after every input: what a client sent must
//! never become an entry the edge cannot read back).
//!
//! The log goes to `$TRIBUTARY_FUZZ_DATA` (default: a directory under the system temporary
//! directory named for this process), bounded by a small disk budget.

#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;

/// How long the edge may take to close a connection after the client's EOF. Far above
/// anything a correct edge needs (it commits what it read and closes); a connection still
/// open after this is reported.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

static EDGE: OnceLock<(SocketAddr, std::sync::Arc<edge::log::Log>)> = OnceLock::new();

fn edge() -> &'static (SocketAddr, std::sync::Arc<edge::log::Log>) {
    EDGE.get_or_init(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            std::process::abort();
        }));
        let data_dir = std::env::var_os("TRIBUTARY_FUZZ_DATA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("tributary-fuzz-{}", std::process::id()))
            });
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("the fuzz data directory");
        let acl = data_dir.join("acl");
        std::fs::write(&acl, "topic readwrite #\ngroup read alarms\n").expect("the ACL");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let text = format!(
            "[mqtt]\nlisten = \"127.0.0.1:{port}\"\nconnect_timeout = \"2s\"\nsys_interval = \"0s\"\n\
             [storage]\ndata_dir = {:?}\nfsync = \"never\"\ndisk_budget = \"4MiB\"\n\
             disk_full_policy = \"drop-oldest\"\n\
             [auth]\nacl_file = {:?}\nallow_anonymous = true\n\
             [admin]\nenabled = false\n\
             [[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 4\n\
             [[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nfilter = \"sensors/#\"\nack_timeout = \"1s\"\n",
            data_dir.join("data").display().to_string(),
            acl.display().to_string()
        );
        let config = edge::config::Config::parse(&text, "fuzz").expect("the fuzz config loads");
        let (log_tx, log_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let end = runtime.block_on(edge::server::run_observed(config, move |log| {
                let _ = log_tx.send(log);
            }));
            panic!("the edge stopped serving: {end:?}");
        });
        let log = log_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the edge opened its log");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the edge did not start listening on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (addr, log)
    })
}

/// A CONNECT with keepalive 60 s and client id `fuzz-v{level}` (clean), or
/// `fuzz-p{level}` with a persistent session (3.1.1 clean session 0; 5.0 clean start 0 and
/// a Session Expiry Interval of an hour).
fn connect_packet(level: u8, persistent: bool) -> Vec<u8> {
    let flags = if persistent { 0x00 } else { 0x02 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
    if level == 5 {
        if persistent {
            body.extend_from_slice(&[5, 0x11, 0, 0, 0x0E, 0x10]);
        } else {
            body.push(0); // no properties
        }
    }
    let id = format!("fuzz-{}{level}", if persistent { "p" } else { "v" });
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

fuzz_target!(|data: &[u8]| {
    let (addr, log) = edge();
    let addr = *addr;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = match mode % 5 {
        1 => connect_packet(4, false),
        2 => connect_packet(5, false),
        3 => connect_packet(4, true),
        4 => connect_packet(5, true),
        _ => Vec::new(),
    };
    input.extend_from_slice(rest);

    let mut stream = TcpStream::connect(addr).expect("the edge accepts connections");
    stream
        .set_read_timeout(Some(CLOSE_WITHIN))
        .expect("a read timeout");
    // The edge may close before it has read everything (a protocol error): that is fine.
    let _ = stream.write_all(&input);
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            // libFuzzer's own timers interrupt blocking calls.
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("the edge kept the connection open after the client's EOF: {e}"),
        }
    }
    // The edge commits what a connection sent before it closes it: all of it must decode.
    let report = edge::check::check(log, false).expect("reading the log");
    if !report.bad.is_empty() {
        panic!("stored entries that do not decode: {:?}", report.bad);
    }
});
