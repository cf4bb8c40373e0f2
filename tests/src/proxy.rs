//! A TCP proxy that can stall: while stalled it moves no byte in either direction and
//! accepts no new connection, but closes nothing, as a link that drops packets does (the
//! peers see no reset, only silence, until their own time-outs). Resumed, what was held
//! flows on.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a blocked pump or the acceptor looks at the flags again.
const TICK: Duration = Duration::from_millis(20);

struct Flags {
    stalled: AtomicBool,
    stopping: AtomicBool,
}

/// Proxies each `(listen port, target port)` pair on 127.0.0.1; stopped when dropped.
pub struct StallingProxy {
    flags: Arc<Flags>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    ports: Vec<u16>,
}

impl StallingProxy {
    /// Starts forwarding `127.0.0.1:listen` to `127.0.0.1:target` for each pair.
    pub fn start(pairs: &[(u16, u16)]) -> std::io::Result<StallingProxy> {
        let flags = Arc::new(Flags {
            stalled: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let threads = Arc::new(Mutex::new(Vec::new()));
        let streams = Arc::new(Mutex::new(Vec::new()));
        for &(listen, target) in pairs {
            let listener = TcpListener::bind(("127.0.0.1", listen))?;
            listener.set_nonblocking(true)?;
            let (f, t, s) = (flags.clone(), threads.clone(), streams.clone());
            let acceptor = std::thread::spawn(move || accept(listener, target, f, t, s));
            threads.lock().expect("threads").push(acceptor);
        }
        Ok(StallingProxy {
            flags,
            threads,
            streams,
            ports: pairs.iter().map(|p| p.0).collect(),
        })
    }

    /// The proxy's listen addresses, comma-separated, as a Kafka bootstrap list.
    pub fn bootstrap(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// From now on nothing moves and no connection is accepted.
    pub fn stall(&self) {
        self.flags.stalled.store(true, Ordering::SeqCst);
    }

    /// Bytes flow again, held ones first, and waiting connections are accepted.
    pub fn resume(&self) {
        self.flags.stalled.store(false, Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.flags.stopping.store(true, Ordering::SeqCst);
        for s in self.streams.lock().expect("streams").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> =
            self.threads.lock().expect("threads").drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept(
    listener: TcpListener,
    target: u16,
    flags: Arc<Flags>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
) {
    while !flags.stopping.load(Ordering::SeqCst) {
        if flags.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => return,
        };
        let Ok(server) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], target))) else {
            // The node is down: the client sees its connection closed, as it would by the node.
            continue;
        };
        let pumps = [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ];
        {
            let mut s = streams.lock().expect("streams");
            s.push(client);
            s.push(server);
        }
        for (from, to) in pumps {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let f = flags.clone();
            let pump = std::thread::spawn(move || pump(from, to, f));
            threads.lock().expect("threads").push(pump);
        }
    }
}

/// Copies `from` to `to` while not stalled; at EOF or an error closes `to`'s writing side.
fn pump(mut from: TcpStream, mut to: TcpStream, flags: Arc<Flags>) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if flags.stopping.load(Ordering::SeqCst) {
            return;
        }
        if flags.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        // Read just before a stall: held until the link comes back.
        while flags.stalled.load(Ordering::SeqCst) && !flags.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
