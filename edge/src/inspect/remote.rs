//! `edge read --admin [--follow]`: a running node's records through its admin API, printed
//! as `edge read` prints a stopped node's, in the same order (topic by topic, partition by
//! partition). With `--follow` it polls every [`POLL_INTERVAL`] for what was appended since,
//! until SIGINT or SIGTERM, and fails when the node stops answering.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use super::admin_client::{AdminClient, AdminClientError, PAGE};
use super::TopicView;

/// Time between two polls of `--follow` that found nothing new.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What `edge read --admin` was asked.
#[derive(Debug, Clone, Default)]
pub struct ReadArgs {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this partition.
    pub partition: Option<u32>,
    /// First offset of each partition (default: the first held; with `follow`, the end).
    pub from: Option<u64>,
    /// Most records in total.
    pub limit: Option<usize>,
    /// JSON lines instead of text.
    pub json: bool,
    /// Keep reading what is appended.
    pub follow: bool,
}

/// Why reading a running node stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteReadError {
    /// The admin API failed or refused.
    #[error(transparent)]
    Admin(#[from] AdminClientError),
    /// The partition asked for does not exist.
    #[error("topic {topic:?} has no partition {partition} (it has {count})")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// Partitions it has.
        count: usize,
    },
    /// The edge went away while `--follow` was reading it.
    #[error("the edge went away while following it: {0}")]
    WentAway(AdminClientError),
    /// Standard output failed.
    #[error("writing the records: {0}")]
    Output(std::io::Error),
    /// The signal handlers could not be installed.
    #[error("watching for SIGINT and SIGTERM: {0}")]
    Signals(std::io::Error),
}

/// Reads and prints, to standard output, the records `args` asks for.
pub async fn read(client: &AdminClient, args: &ReadArgs) -> Result<(), RemoteReadError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = if args.follow {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).map_err(RemoteReadError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(RemoteReadError::Signals)?;
        // Lines are written between awaits, so a signal never cuts one in half.
        tokio::select! {
            r = read_into(client, args, &mut out) => r,
            _ = interrupt.recv() => Ok(()),
            _ = terminate.recv() => Ok(()),
        }
    } else {
        read_into(client, args, &mut out).await
    };
    let flushed = out.flush().map_err(RemoteReadError::Output);
    match result.and(flushed) {
        Err(RemoteReadError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Where each partition read stands.
type Positions = BTreeMap<(usize, u32), u64>;

/// Reads into `out`: the records up to each partition's end as first seen, and with
/// `follow` on and on.
pub async fn read_into(
    client: &AdminClient,
    args: &ReadArgs,
    out: &mut impl Write,
) -> Result<(), RemoteReadError> {
    let mut remaining = args.limit.unwrap_or(usize::MAX);
    let topics = chosen(client, client.topics().await?, args)?;
    if !args.follow {
        // One pass up to the ends seen at the start: a busy node does not keep it going.
        for t in &topics {
            for p in &t.partitions {
                if args.partition.is_some_and(|only| only != p.partition) {
                    continue;
                }
                let mut from = args.from.unwrap_or(0);
                while remaining > 0 && from < p.end_offset {
                    let page = client
                        .records(&t.topic, p.partition, from, remaining.min(PAGE))
                        .await?;
                    let Some(last) = page.last() else { break };
                    from = last.offset + 1;
                    for r in page.iter().filter(|r| r.offset < p.end_offset) {
                        write_line(out, r, args.json)?;
                        remaining -= 1;
                    }
                }
            }
        }
        return Ok(());
    }
    let mut next: Positions = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for t in &topics {
        add_topic(&mut next, &mut names, t, args, &|end| {
            args.from.unwrap_or(end)
        });
    }
    while remaining > 0 {
        let mut printed = 0;
        for ((topic, partition), from) in next.iter_mut() {
            let name = &names[*topic];
            let page = client
                .records(name, *partition, *from, remaining.min(PAGE))
                .await
                .map_err(went_away)?;
            if let Some(last) = page.last() {
                *from = last.offset + 1;
            }
            for r in &page {
                write_line(out, r, args.json)?;
                printed += 1;
                remaining -= 1;
            }
            if remaining == 0 {
                break;
            }
        }
        out.flush().map_err(RemoteReadError::Output)?;
        if printed == 0 {
            tokio::time::sleep(POLL_INTERVAL).await;
            // A topic created since (without --topic) is read from its start: every record
            // in it came after the follow began.
            let topics = chosen(client, client.topics().await.map_err(went_away)?, args)?;
            for t in &topics {
                add_topic(&mut next, &mut names, t, args, &|_| args.from.unwrap_or(0));
            }
        }
    }
    Ok(())
}

fn went_away(e: AdminClientError) -> RemoteReadError {
    match e {
        e @ AdminClientError::Unreachable { .. } => RemoteReadError::WentAway(e),
        other => RemoteReadError::Admin(other),
    }
}

/// Adds the partitions of `t` not read yet, starting where `start` says for their end.
fn add_topic(
    next: &mut Positions,
    names: &mut Vec<String>,
    t: &TopicView,
    args: &ReadArgs,
    start: &dyn Fn(u64) -> u64,
) {
    let index = match names.iter().position(|n| *n == t.topic) {
        Some(i) => i,
        None => {
            names.push(t.topic.clone());
            names.len() - 1
        }
    };
    for p in &t.partitions {
        if args.partition.is_some_and(|only| only != p.partition) {
            continue;
        }
        next.entry((index, p.partition))
            .or_insert_with(|| start(p.end_offset));
    }
}

/// The topics `args` names (all without `--topic`), checked as `edge read` checks a
/// stopped node's: each must have the `--partition` asked for.
fn chosen(
    client: &AdminClient,
    topics: Vec<TopicView>,
    args: &ReadArgs,
) -> Result<Vec<TopicView>, RemoteReadError> {
    let topics = match &args.topic {
        None => topics,
        Some(name) => match topics.into_iter().find(|t| t.topic == *name) {
            Some(t) => vec![t],
            None => {
                return Err(RemoteReadError::Admin(AdminClientError::UnknownTopic {
                    url: client.url().to_string(),
                    topic: name.clone(),
                }))
            }
        },
    };
    if let Some(p) = args.partition {
        if let Some(t) = topics.iter().find(|t| p as usize >= t.partitions.len()) {
            return Err(RemoteReadError::UnknownPartition {
                topic: t.topic.clone(),
                partition: p,
                count: t.partitions.len(),
            });
        }
    }
    Ok(topics)
}

fn write_line(
    out: &mut impl Write,
    r: &super::RecordView,
    json: bool,
) -> Result<(), RemoteReadError> {
    let line = if json {
        r.to_json_line()
    } else {
        r.to_text_line()
    };
    writeln!(out, "{line}").map_err(RemoteReadError::Output)
}
