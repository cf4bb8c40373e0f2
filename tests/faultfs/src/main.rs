//! `faultfs BACKING MOUNTPOINT --control SOCKET [--strict]`: mounts the fault-injecting
//! file system (see the library's documentation for the model) and takes commands on a
//! Unix socket, for tests that are not written in Rust or that want the mount in another
//! process.
//!
//! The protocol: one command a line, one answer a line, `ok` (`ok N` for `space-used`) or
//! `error: ...`.
//!
//! ```text
//! power-cut                 drop everything unsynced (processes on the mount killed first)
//! fail-fsync on|off         fsync and directory fsync return EIO
//! fail-writes on|off        write, ftruncate and fallocate return EIO
//! space-budget BYTES|none   writes past BYTES of space used return ENOSPC
//! delay-fsync MILLIS        every fsync waits that long first (0: no delay)
//! space-used                the space used as the budget counts it
//! unmount                   unmount cleanly (everything pending made durable) and exit;
//!                           if the mount is busy, detach it lazily, answer the error and
//!                           exit with status 1
//! ```
//!
//! SIGINT and SIGTERM unmount cleanly too.

// Signal masks go through libc; each site states its SAFETY.
#![allow(unsafe_code)]

use anyhow::{bail, Context};
use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tributary_faultfs::{Durability, FaultFs};

#[derive(Parser)]
#[command(about = "A fault-injecting FUSE file system for crash tests")]
struct Args {
    /// The directory that holds what is durable.
    backing: PathBuf,
    /// Where to mount (an existing directory).
    mountpoint: PathBuf,
    /// The Unix socket to take commands on (created; removed on exit).
    #[arg(long)]
    control: PathBuf,
    /// Directory changes are durable only after an fsync of their directory (POSIX at its
    /// letter) instead of after any fsync (ext4, XFS).
    #[arg(long)]
    strict: bool,
}

type Shared = Arc<Mutex<Option<FaultFs>>>;

fn on_off(word: Option<&str>) -> anyhow::Result<bool> {
    match word {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        other => bail!("expected on or off, got {other:?}"),
    }
}

fn run_command(mounted: &Shared, line: &str) -> anyhow::Result<Option<String>> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or_default();
    let argument = words.next();
    let mut guard = mounted
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let fs = guard.as_mut().context("already unmounted")?;
    match command {
        "power-cut" => fs.power_cut()?,
        "fail-fsync" => fs.fail_fsync(on_off(argument)?),
        "fail-writes" => fs.fail_writes(on_off(argument)?),
        "space-budget" => fs.set_space_budget(match argument {
            Some("none") => None,
            Some(bytes) => Some(bytes.parse().context("space-budget BYTES|none")?),
            None => bail!("space-budget BYTES|none"),
        }),
        "delay-fsync" => {
            let millis: u64 = argument.context("delay-fsync MILLIS")?.parse()?;
            fs.delay_fsync(Duration::from_millis(millis));
        }
        "space-used" => return Ok(Some(fs.space_used().to_string())),
        "unmount" => {
            if let Some(fs) = guard.take() {
                fs.unmount()?;
            }
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(None)
}

fn serve(mounted: Shared, control: &Path, stream: UnixStream) -> anyhow::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let answer = match run_command(&mounted, &line) {
            Ok(None) => "ok".to_string(),
            Ok(Some(value)) => format!("ok {value}"),
            Err(e) => format!("error: {e:#}"),
        };
        writeln!(writer, "{answer}")?;
        if line.trim() == "unmount" {
            let _ = std::fs::remove_file(control);
            std::process::exit(if answer == "ok" { 0 } else { 1 });
        }
    }
    Ok(())
}

/// Blocks SIGINT and SIGTERM in every thread (call before any is spawned) so that one
/// thread can wait for them.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the calls
    // get valid pointers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let signals = block_termination_signals();
    let durability = if args.strict {
        Durability::Strict
    } else {
        Durability::Journaled
    };
    let fs = FaultFs::mount_with(&args.backing, &args.mountpoint, durability)?;
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .with_context(|| format!("binding the control socket {}", args.control.display()))?;
    let mounted: Shared = Arc::new(Mutex::new(Some(fs)));

    let accepting = Arc::clone(&mounted);
    let control = Arc::new(args.control.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mounted = Arc::clone(&accepting);
            let control = Arc::clone(&control);
            std::thread::spawn(move || serve(mounted, &control, stream));
        }
    });

    let mut signal = 0;
    // SAFETY: `signals` is an initialised set and `signal` a valid place for the answer.
    unsafe { libc::sigwait(&signals, &mut signal) };
    let fs = mounted.lock().unwrap_or_else(|p| p.into_inner()).take();
    let _ = std::fs::remove_file(&args.control);
    if let Some(fs) = fs {
        fs.unmount()?;
    }
    Ok(())
}
