//! What a run does: device classes, their numbers and rates, and timed fleet events.
//!
//! A plan comes either from command-line options (one class) or from a scenario file (TOML),
//! whose class fields fall back to the command-line values. The scenario format:
//!
//! ```toml
//! duration = "5m"            # optional; --duration wins
//! # count = 1000             # optional messages per device; --count wins
//!
//! [[class]]
//! name = "temperature"
//! devices = 10000
//! rate = 1.0                 # messages per second per device
//! jitter = 0.1               # each interval varies by up to ±10 %
//! qos = 1
//! payload = "json"           # or "binary"
//! size = 0                   # binary: exact size; json: padded to this size
//! topic = "sensors/{device}/temperature"
//! device_id = "temp-{k}"
//! client_id = "sim-{device}"
//! session = "clean"          # or "persistent"
//! inflight = 16
//!
//! [[class]]
//! name = "vibration"
//! devices = 100
//! rate = 200.0
//! payload = "binary"
//! size = 1024
//! topic = "sensors/{device}/vibration"
//! device_id = "vib-{k}"
//!
//! [[event]]
//! at = "30s"
//! kind = "reconnect-storm"   # every selected device drops its connection and reconnects at once
//!
//! [[event]]
//! at = "60s"
//! kind = "offline"           # selected devices drop and stay away for `for`
//! for = "20s"
//! fraction = 0.1             # share of the selected classes' devices (default 1.0)
//! classes = ["temperature"]  # default: every class
//!
//! [[event]]
//! at = "90s"
//! kind = "burst"             # selected devices publish `messages` messages back to back
//! messages = 50
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::SessionKind;
use crate::error::SimError;
use crate::payload::{PayloadKind, PayloadSpec, RunId, HEADER_LEN};
use crate::template::{Names, Template};

/// One kind of device and how many of them.
#[derive(Debug, Clone)]
pub struct ClassPlan {
    /// Class name (used by `{class}` and by event selectors).
    pub name: String,
    /// Number of devices.
    pub devices: u32,
    /// Messages per second per device.
    pub rate: f64,
    /// Relative jitter of each publish interval, in `[0, 1)`.
    pub jitter: f64,
    /// QoS of every publish.
    pub qos: u8,
    /// Payload kind and size.
    pub payload: PayloadSpec,
    /// Topic template.
    pub topic: Template,
    /// Topic template as written, for the manifest.
    pub topic_text: String,
    /// Device-name template.
    pub device_id: Template,
    /// Client-id template.
    pub client_id: Template,
    /// Clean or persistent sessions.
    pub session: SessionKind,
    /// Most unacknowledged QoS 1/2 publishes per device.
    pub inflight: u16,
    /// Messages per device before it stops, if limited.
    pub count: Option<u64>,
}

/// What a fleet event does to the devices it selects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FleetAction {
    /// Drop the connection and reconnect immediately.
    ReconnectStorm,
    /// Drop the connection and stay offline for this long.
    Offline(Duration),
    /// Publish this many messages back to back.
    Burst(u32),
}

/// A timed event of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPlan {
    /// Time from the start of the run.
    pub at: Duration,
    /// What happens.
    pub action: FleetAction,
    /// Indices of the classes it applies to; empty means all.
    pub classes: Vec<u16>,
    /// Share of those devices it applies to, in `(0, 1]`.
    pub fraction: f64,
}

impl EventPlan {
    /// Whether the device is selected; `salt` makes different events pick different devices.
    pub fn selects(&self, device_index: u32, class: u16, salt: u64) -> bool {
        if !self.classes.is_empty() && !self.classes.contains(&class) {
            return false;
        }
        if self.fraction >= 1.0 {
            return true;
        }
        let mut x = u64::from(device_index) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x as f64 / u64::MAX as f64) < self.fraction
    }
}

/// Everything a run does.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    /// Device classes, in fleet order (class 0's devices get the first indices).
    pub classes: Vec<ClassPlan>,
    /// Timed events.
    pub events: Vec<EventPlan>,
    /// Stop publishing after this long.
    pub duration: Option<Duration>,
    /// The run, for `{run}` in templates.
    pub run: RunId,
}

impl FleetPlan {
    /// Total number of devices.
    pub fn device_count(&self) -> u64 {
        self.classes.iter().map(|c| u64::from(c.devices)).sum()
    }
}

/// Class settings as command-line options give them; also the defaults of scenario classes.
#[derive(Debug, Clone)]
pub struct ClassDefaults {
    /// `--devices`.
    pub devices: u32,
    /// `--rate`.
    pub rate: f64,
    /// `--jitter`.
    pub jitter: f64,
    /// `--qos`.
    pub qos: u8,
    /// `--payload`.
    pub payload: PayloadKind,
    /// `--payload-size`.
    pub size: Option<usize>,
    /// `--topic`.
    pub topic: String,
    /// `--device-id`.
    pub device_id: String,
    /// `--client-id`.
    pub client_id: String,
    /// `--session`.
    pub session: SessionKind,
    /// `--inflight`.
    pub inflight: u16,
    /// `--count`.
    pub count: Option<u64>,
}

/// Default binary payload size.
pub const DEFAULT_BINARY_SIZE: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    duration: Option<String>,
    count: Option<u64>,
    #[serde(default, rename = "class")]
    classes: Vec<ClassEntry>,
    #[serde(default, rename = "event")]
    events: Vec<EventEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassEntry {
    name: String,
    devices: u32,
    rate: Option<f64>,
    jitter: Option<f64>,
    qos: Option<u8>,
    payload: Option<PayloadKind>,
    size: Option<usize>,
    topic: Option<String>,
    device_id: Option<String>,
    client_id: Option<String>,
    session: Option<SessionKind>,
    inflight: Option<u16>,
    count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum EventKind {
    ReconnectStorm,
    Offline,
    Burst,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventEntry {
    at: String,
    kind: EventKind,
    #[serde(rename = "for")]
    for_: Option<String>,
    messages: Option<u32>,
    fraction: Option<f64>,
    classes: Option<Vec<String>>,
}

/// Parses a duration such as `10s`, `500ms`, `2m` or `1h 30m`.
pub fn parse_duration(option: &str, text: &str) -> Result<Duration, SimError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        SimError::invalid(
            option,
            format!("{text:?} is not a duration ({e}); write e.g. 10s, 500ms, 2m"),
        )
    })
}

fn check_class(option: &str, class: &ClassPlan) -> Result<(), SimError> {
    if class.devices == 0 {
        return Err(SimError::invalid(
            format!("{option}devices"),
            "must be at least 1",
        ));
    }
    if !(class.rate.is_finite() && class.rate > 0.0) {
        return Err(SimError::invalid(
            format!("{option}rate"),
            format!(
                "must be > 0 messages per second per device (got {})",
                class.rate
            ),
        ));
    }
    if class.rate > 1_000_000.0 {
        return Err(SimError::invalid(
            format!("{option}rate"),
            "more than 1,000,000 messages per second per device; use --flood for maximum throughput",
        ));
    }
    if !(0.0..1.0).contains(&class.jitter) {
        return Err(SimError::invalid(
            format!("{option}jitter"),
            format!("must be in [0, 1) (got {})", class.jitter),
        ));
    }
    if class.qos > 2 {
        return Err(SimError::invalid(
            format!("{option}qos"),
            format!("must be 0, 1 or 2 (got {})", class.qos),
        ));
    }
    if class.payload.kind == PayloadKind::Binary && class.payload.size < HEADER_LEN {
        return Err(SimError::invalid(
            format!("{option}size"),
            format!(
                "a binary payload needs at least {HEADER_LEN} bytes for its header (got {})",
                class.payload.size
            ),
        ));
    }
    if class.inflight == 0 {
        return Err(SimError::invalid(
            format!("{option}inflight"),
            "must be at least 1",
        ));
    }
    if class.count == Some(0) {
        return Err(SimError::invalid(
            format!("{option}count"),
            "must be at least 1",
        ));
    }
    Ok(())
}

fn build_class(
    option_prefix: &str,
    name: String,
    devices: u32,
    entry: Option<&ClassEntry>,
    defaults: &ClassDefaults,
) -> Result<ClassPlan, SimError> {
    let pick = |o: Option<String>, d: &String| o.unwrap_or_else(|| d.clone());
    let kind = entry.and_then(|e| e.payload).unwrap_or(defaults.payload);
    let size = entry
        .and_then(|e| e.size)
        .or(defaults.size)
        .unwrap_or(match kind {
            PayloadKind::Binary => DEFAULT_BINARY_SIZE,
            PayloadKind::Json => 0,
        });
    let opt = |cli: &str, field: &str| {
        if option_prefix.is_empty() {
            cli.to_string()
        } else {
            format!("{option_prefix}{field}")
        }
    };
    let topic_text = pick(entry.and_then(|e| e.topic.clone()), &defaults.topic);
    let topic = Template::parse(&opt("--topic", "topic"), &topic_text, true)?;
    if topic_text.contains('+') || topic_text.contains('#') || topic_text.is_empty() {
        return Err(SimError::invalid(
            opt("--topic", "topic"),
            format!("{topic_text:?} must be a non-empty topic name without wildcards"),
        ));
    }
    let device_id = Template::parse(
        &opt("--device-id", "device_id"),
        &pick(entry.and_then(|e| e.device_id.clone()), &defaults.device_id),
        false,
    )?;
    let client_id = Template::parse(
        &opt("--client-id", "client_id"),
        &pick(entry.and_then(|e| e.client_id.clone()), &defaults.client_id),
        true,
    )?;
    let class = ClassPlan {
        name,
        devices,
        rate: entry.and_then(|e| e.rate).unwrap_or(defaults.rate),
        jitter: entry.and_then(|e| e.jitter).unwrap_or(defaults.jitter),
        qos: entry.and_then(|e| e.qos).unwrap_or(defaults.qos),
        payload: PayloadSpec { kind, size },
        topic,
        topic_text,
        device_id,
        client_id,
        session: entry.and_then(|e| e.session).unwrap_or(defaults.session),
        inflight: entry.and_then(|e| e.inflight).unwrap_or(defaults.inflight),
        count: entry.and_then(|e| e.count).or(defaults.count),
    };
    let prefix = if option_prefix.is_empty() {
        "--".to_string()
    } else {
        option_prefix.to_string()
    };
    check_class(&prefix, &class)?;
    Ok(class)
}

impl FleetPlan {
    /// A single-class plan from command-line options.
    pub fn from_options(
        run: RunId,
        defaults: &ClassDefaults,
        duration: Option<Duration>,
    ) -> Result<Self, SimError> {
        let class = build_class("", "sensor".into(), defaults.devices, None, defaults)?;
        let plan = FleetPlan {
            classes: vec![class],
            events: Vec::new(),
            duration,
            run,
        };
        plan.check_names()?;
        Ok(plan)
    }

    /// A plan from a scenario file; `duration` and `defaults.count` from the command line win
    /// over the file's.
    pub fn from_scenario(
        run: RunId,
        path: &Path,
        text: &str,
        defaults: &ClassDefaults,
        duration: Option<Duration>,
    ) -> Result<Self, SimError> {
        let file: ScenarioFile = toml::from_str(text).map_err(|e| SimError::Scenario {
            path: path.to_path_buf(),
            reason: e.to_string().trim_end().to_string(),
        })?;
        let in_file = |reason: SimError| SimError::Scenario {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if file.classes.is_empty() {
            return Err(in_file(SimError::invalid(
                "class",
                "the scenario has no [[class]] table; add at least one",
            )));
        }
        let mut defaults = defaults.clone();
        if defaults.count.is_none() {
            defaults.count = file.count;
        }
        let mut classes = Vec::with_capacity(file.classes.len());
        let mut seen = HashSet::new();
        for entry in &file.classes {
            if !seen.insert(entry.name.clone()) {
                return Err(in_file(SimError::invalid(
                    format!("class {:?}", entry.name),
                    "two classes have this name",
                )));
            }
            let prefix = format!("class {:?}.", entry.name);
            classes.push(
                build_class(
                    &prefix,
                    entry.name.clone(),
                    entry.devices,
                    Some(entry),
                    &defaults,
                )
                .map_err(in_file)?,
            );
        }
        let duration = match (duration, &file.duration) {
            (Some(d), _) => Some(d),
            (None, Some(text)) => Some(parse_duration("duration", text).map_err(in_file)?),
            (None, None) => None,
        };
        let mut events = Vec::with_capacity(file.events.len());
        for (i, entry) in file.events.iter().enumerate() {
            let option = format!("event[{i}]");
            let at = parse_duration(&format!("{option}.at"), &entry.at).map_err(in_file)?;
            let action = match entry.kind {
                EventKind::ReconnectStorm => {
                    if entry.for_.is_some() || entry.messages.is_some() {
                        return Err(in_file(SimError::invalid(
                            option,
                            "a reconnect-storm takes neither `for` nor `messages`",
                        )));
                    }
                    FleetAction::ReconnectStorm
                }
                EventKind::Offline => {
                    let text = entry.for_.as_deref().ok_or_else(|| {
                        in_file(SimError::invalid(
                            &option,
                            "an offline event needs `for`, e.g. for = \"20s\"",
                        ))
                    })?;
                    if entry.messages.is_some() {
                        return Err(in_file(SimError::invalid(
                            option,
                            "an offline event does not take `messages`",
                        )));
                    }
                    FleetAction::Offline(
                        parse_duration(&format!("{option}.for"), text).map_err(in_file)?,
                    )
                }
                EventKind::Burst => {
                    let messages = entry.messages.filter(|&m| m > 0).ok_or_else(|| {
                        in_file(SimError::invalid(
                            &option,
                            "a burst needs `messages` >= 1, e.g. messages = 50",
                        ))
                    })?;
                    if entry.for_.is_some() {
                        return Err(in_file(SimError::invalid(
                            option,
                            "a burst does not take `for`",
                        )));
                    }
                    FleetAction::Burst(messages)
                }
            };
            let fraction = entry.fraction.unwrap_or(1.0);
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(in_file(SimError::invalid(
                    format!("{option}.fraction"),
                    format!("must be in (0, 1] (got {fraction})"),
                )));
            }
            let mut class_ids = Vec::new();
            for name in entry.classes.iter().flatten() {
                let id = classes
                    .iter()
                    .position(|c| &c.name == name)
                    .ok_or_else(|| {
                        in_file(SimError::invalid(
                            format!("{option}.classes"),
                            format!("no class is named {name:?}"),
                        ))
                    })?;
                class_ids.push(id as u16);
            }
            events.push(EventPlan {
                at,
                action,
                classes: class_ids,
                fraction,
            });
        }
        events.sort_by_key(|e| e.at);
        let plan = FleetPlan {
            classes,
            events,
            duration,
            run,
        };
        plan.check_names().map_err(in_file)?;
        Ok(plan)
    }

    /// Every device gets a distinct name and client id; a template that would give two devices
    /// the same client id makes them kick each other off the broker, so it is refused here.
    fn check_names(&self) -> Result<(), SimError> {
        let total = self.device_count();
        if total > u64::from(u32::MAX) {
            return Err(SimError::invalid(
                "--devices",
                "more than 4,294,967,295 devices",
            ));
        }
        let mut names = HashSet::with_capacity(total as usize);
        let mut client_ids = HashSet::with_capacity(total as usize);
        for device in self.devices() {
            if !names.insert(device.name.clone()) {
                return Err(SimError::invalid(
                    "--device-id",
                    format!(
                        "two devices are both named {:?}; the device id template needs {{n}} (or {{k}} with {{class}})",
                        device.name
                    ),
                ));
            }
            if !client_ids.insert(device.client_id) {
                return Err(SimError::invalid(
                    "--client-id",
                    format!(
                        "two devices would both connect as {:?}; the client id template needs {{device}} or {{n}}",
                        device.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The fleet's devices in index order.
    pub fn devices(&self) -> impl Iterator<Item = DeviceIdentity> + '_ {
        let run = self.run.to_string();
        let mut n = 0u64;
        self.classes
            .iter()
            .enumerate()
            .flat_map(move |(class_index, class)| {
                let run = run.clone();
                let start = n;
                n += u64::from(class.devices);
                (0..u64::from(class.devices)).map(move |k| {
                    let mut names = Names {
                        device: None,
                        n: start + k + 1,
                        k: k + 1,
                        class: &class.name,
                        run: &run,
                    };
                    let name = class.device_id.render(&names);
                    names.device = Some(&name);
                    DeviceIdentity {
                        index: (start + k) as u32,
                        class: class_index as u16,
                        client_id: class.client_id.render(&names),
                        topic: class.topic.render(&names),
                        name,
                    }
                })
            })
    }
}

/// Names of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Index in the fleet.
    pub index: u32,
    /// Index of its class.
    pub class: u16,
    /// Device name.
    pub name: String,
    /// MQTT client id.
    pub client_id: String,
    /// Topic it publishes to.
    pub topic: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ClassDefaults {
        ClassDefaults {
            devices: 3,
            rate: 1.0,
            jitter: 0.1,
            qos: 1,
            payload: PayloadKind::Json,
            size: None,
            topic: "sensors/{device}/temperature".into(),
            device_id: "dev-{n}".into(),
            client_id: "sim-{device}".into(),
            session: SessionKind::Clean,
            inflight: 16,
            count: None,
        }
    }

    fn scenario(text: &str) -> Result<FleetPlan, SimError> {
        FleetPlan::from_scenario(RunId(1), Path::new("s.toml"), text, &defaults(), None)
    }

    #[test]
    fn options_make_one_class_with_named_devices() {
        let plan = FleetPlan::from_options(RunId(1), &defaults(), None).unwrap();
        let devices: Vec<_> = plan.devices().collect();
        assert_eq!(devices.len(), 3);
        assert_eq!(devices[0].name, "dev-1");
        assert_eq!(devices[2].client_id, "sim-dev-3");
        assert_eq!(devices[1].topic, "sensors/dev-2/temperature");
    }

    #[test]
    fn zero_rate_is_refused_naming_the_option() {
        let mut d = defaults();
        d.rate = 0.0;
        let err = FleetPlan::from_options(RunId(1), &d, None).unwrap_err();
        assert!(err.to_string().starts_with("--rate:"), "{err}");
    }

    #[test]
    fn binary_payload_smaller_than_its_header_is_refused() {
        let mut d = defaults();
        d.payload = PayloadKind::Binary;
        d.size = Some(8);
        let err = FleetPlan::from_options(RunId(1), &d, None).unwrap_err();
        assert!(err.to_string().contains("--size"), "{err}");
    }

    #[test]
    fn shared_client_id_is_refused() {
        let mut d = defaults();
        d.client_id = "sim".into();
        let err = FleetPlan::from_options(RunId(1), &d, None).unwrap_err();
        assert!(err.to_string().starts_with("--client-id:"), "{err}");
    }

    #[test]
    fn scenario_mixes_classes_and_numbers_devices_across_them() {
        let plan = scenario(
            r#"
            duration = "2m"
            [[class]]
            name = "temperature"
            devices = 2
            device_id = "temp-{k}"
            [[class]]
            name = "vibration"
            devices = 2
            rate = 200.0
            payload = "binary"
            size = 1024
            device_id = "vib-{k}"
            topic = "sensors/{device}/vibration"
            [[event]]
            at = "30s"
            kind = "reconnect-storm"
            [[event]]
            at = "10s"
            kind = "offline"
            for = "5s"
            fraction = 0.5
            classes = ["vibration"]
            [[event]]
            at = "40s"
            kind = "burst"
            messages = 20
            "#,
        )
        .unwrap();
        assert_eq!(plan.duration, Some(Duration::from_secs(120)));
        let devices: Vec<_> = plan.devices().collect();
        assert_eq!(devices[2].name, "vib-1");
        assert_eq!(devices[2].index, 2);
        assert_eq!(devices[2].class, 1);
        assert_eq!(devices[3].topic, "sensors/vib-2/vibration");
        assert_eq!(plan.classes[1].payload.size, 1024);
        assert_eq!(plan.classes[1].rate, 200.0);
        assert_eq!(plan.classes[0].rate, 1.0, "falls back to --rate");
        assert_eq!(
            plan.events[0].action,
            FleetAction::Offline(Duration::from_secs(5))
        );
        assert_eq!(plan.events[0].classes, vec![1]);
        assert_eq!(plan.events[2].action, FleetAction::Burst(20));
    }

    #[test]
    fn unknown_scenario_key_is_refused_naming_file_and_key() {
        let err = scenario("[[class]]\nname = \"a\"\ndevices = 1\nrat = 5.0\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("s.toml"), "{text}");
        assert!(text.contains("rat"), "{text}");
    }

    #[test]
    fn offline_event_without_duration_is_refused() {
        let err = scenario(
            "[[class]]\nname = \"a\"\ndevices = 1\n[[event]]\nat = \"1s\"\nkind = \"offline\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("for"), "{err}");
    }

    #[test]
    fn event_naming_a_missing_class_is_refused() {
        let err = scenario(
            "[[class]]\nname = \"a\"\ndevices = 1\n[[event]]\nat = \"1s\"\nkind = \"burst\"\nmessages = 3\nclasses = [\"b\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
    }

    #[test]
    fn fraction_selects_roughly_that_share_of_devices() {
        let event = EventPlan {
            at: Duration::ZERO,
            action: FleetAction::ReconnectStorm,
            classes: vec![],
            fraction: 0.25,
        };
        let selected = (0..10_000).filter(|&i| event.selects(i, 0, 3)).count();
        assert!((2_000..3_000).contains(&selected), "{selected}");
    }
}
