//! The edge's own process as `/proc/self` shows it, for the standard `process_*` metric
//! families. Linux only; every figure is optional, so a field the kernel does not give is
//! left out rather than reported as zero.

/// One look at the process.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub(crate) cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub(crate) resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub(crate) virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub(crate) open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub(crate) max_fds: Option<u64>,
    /// Start of the process, seconds since the Unix epoch.
    pub(crate) start_time_seconds: Option<f64>,
}

/// Reads the process's figures now.
pub(crate) fn process_stats() -> ProcessStats {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as u64;
    let mut stats = read("/proc/self/stat")
        .map(|text| from_stat(&text, ticks, page))
        .unwrap_or_default();
    if let (Some(since_boot), Some(boot)) = (
        stats.start_time_seconds,
        read("/proc/stat").and_then(|t| boot_time(&t)),
    ) {
        stats.start_time_seconds = Some(boot as f64 + since_boot);
    } else {
        stats.start_time_seconds = None;
    }
    stats.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    stats.max_fds = read("/proc/self/limits").and_then(|t| soft_open_files(&t));
    stats
}

/// CPU time, memory and the start (in seconds after boot, not yet since the epoch) from
/// `/proc/self/stat`. The command name in parentheses may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn from_stat(text: &str, ticks: f64, page: u64) -> ProcessStats {
    let Some((_, rest)) = text.rsplit_once(')') else {
        return ProcessStats::default();
    };
    // `rest` starts at field 3 (state) of proc(5).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
    let ticks = (ticks > 0.0).then_some(ticks);
    ProcessStats {
        cpu_seconds: ticks.and_then(|t| Some((field(14)? + field(15)?) as f64 / t)),
        resident_bytes: field(24).map(|pages| pages.saturating_mul(page)),
        virtual_bytes: field(23),
        start_time_seconds: ticks.and_then(|t| Some(field(22)? as f64 / t)),
        ..ProcessStats::default()
    }
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of the `Max open files` line of `/proc/self/limits`.
fn soft_open_files(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as a process may name itself.
        let stat = "4242 (ed ge) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 12345 104857600 2560 18446744073709551615";
        let s = from_stat(stat, 100.0, 4096);
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.start_time_seconds, Some(123.45));
        assert_eq!(s.virtual_bytes, Some(104_857_600));
        assert_eq!(s.resident_bytes, Some(2560 * 4096));
        assert_eq!(from_stat("garbage", 100.0, 4096), ProcessStats::default());
    }

    #[test]
    fn boot_time_and_open_file_limit_are_found() {
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1764800000\nprocesses 9\n"),
            Some(1_764_800_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            65536                524288               files\n";
        assert_eq!(soft_open_files(limits), Some(65536));
        assert_eq!(
            soft_open_files("Max open files unlimited unlimited files"),
            None
        );
    }

    #[test]
    fn this_process_is_seen() {
        let s = process_stats();
        assert!(s.resident_bytes.is_some_and(|b| b > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{start} vs {now}"
        );
    }
}
