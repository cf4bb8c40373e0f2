//! The last warnings and errors the edge logged, for the admin API and the dashboard.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Entries kept.
const KEEP: usize = 50;

/// One logged warning or error.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields.
    pub message: String,
}

static RECENT: Mutex<VecDeque<Entry>> = Mutex::new(VecDeque::new());

/// The kept entries, oldest first.
pub fn entries() -> Vec<Entry> {
    RECENT
        .lock()
        .expect("recent lock")
        .iter()
        .cloned()
        .collect()
}

/// A tracing layer that keeps the last warnings and errors.
pub struct RecentErrors;

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let entry = Entry {
            at_ms: crate::log::appender::now_ms(),
            level: level.to_string(),
            target: event.metadata().target().to_string(),
            message: text.0,
        };
        let mut recent = RECENT.lock().expect("recent lock");
        if recent.len() == KEEP {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}
