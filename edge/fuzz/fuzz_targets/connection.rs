//! Arbitrary bytes through the edge's connection state machine, exactly as a client's bytes
//! reach it: one edge runs in this process (its real listener, session store, appender and
//! log), and each input is one TCP connection that sends the bytes, half-closes, and reads
//! until the edge closes.
//!
//! The first input byte picks what comes before the rest: nothing (the CONNECT parsing and
//! refusal paths), a valid MQTT 3.1.1 CONNECT, or a valid MQTT 5.0 CONNECT (so the bytes
//! after it reach PUBLISH, SUBSCRIBE, acknowledgements, DISCONNECT, ... of that version).
//!
//! A finding is: a panic anywhere in the edge (the hook below aborts, so a panicking
//! connection task is not hidden by tokio), the edge failing to accept a connection (it
//! died or stopped serving), or a connection the edge keeps open after the client's EOF.
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

static EDGE: OnceLock<SocketAddr> = OnceLock::new();

fn edge() -> SocketAddr {
    *EDGE.get_or_init(|| {
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let text = format!(
            "[mqtt]\nlisten = \"127.0.0.1:{port}\"\nconnect_timeout = \"2s\"\nsys_interval = \"0s\"\n\
             [storage]\ndata_dir = {:?}\nfsync = \"never\"\ndisk_budget = \"64MiB\"\n\
             disk_full_policy = \"drop-oldest\"\n\
             [admin]\nenabled = false\n\
             [[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 4\n",
            data_dir.display().to_string()
        );
        let config = edge::config::Config::parse(&text, "fuzz").expect("the fuzz config loads");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let end = runtime.block_on(edge::server::run(config));
            panic!("the edge stopped serving: {end:?}");
        });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the edge did not start listening on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        addr
    })
}

/// A CONNECT with clean start, keepalive 60 s and client id `fuzz-v{level}`.
fn connect_packet(level: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
    if level == 5 {
        body.push(0); // no properties
    }
    let id = format!("fuzz-v{level}");
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

fuzz_target!(|data: &[u8]| {
    let addr = edge();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = match mode % 3 {
        1 => connect_packet(4),
        2 => connect_packet(5),
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
});
