//! Byte sizes and durations as the config file writes them: `"64KiB"`, `"500ms"`, `"7d"`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A duration in humantime syntax: `"500ms"`, `"10s"`, `"5m"`, `"12h"`, `"7d"`, or units
/// combined, as `"1h30m"` or `"1h 30m"` (the same syntax as firmware-sim's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        // humantime reads a trailing bare number ("1h30") as if a unit followed it: refuse
        // it rather than guess.
        let parsed = if t.ends_with(|c: char| c.is_ascii_digit()) {
            Err("a unit is missing at the end".to_string())
        } else {
            humantime::parse_duration(t).map_err(|e| e.to_string())
        };
        parsed
            .map(HumanDuration)
            .map_err(|e| {
                format!("\"{s}\" is not a duration ({e}): write a number and a unit, as \"500ms\", \"10s\", \"5m\", \"12h\" or \"7d\", or several, as \"1h30m\"")
            })
    }
}

impl fmt::Display for HumanDuration {
    /// The shortest form that reads back as the same duration: `"7d"`, `"1h30m"`, `"1500ms"`
    /// becomes `"1s500ms"`, zero `"0s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ns = self.0.as_nanos();
        if ns == 0 {
            return write!(f, "0s");
        }
        for (unit, per) in [
            ("d", 86_400_000_000_000u128),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ] {
            if ns >= per {
                write!(f, "{}{unit}", ns / per)?;
                ns %= per;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A byte count written as a number or as `"64KiB"`, `"512MiB"`, `"10GiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let bad = || {
            format!("\"{s}\" is not a size: write a number of bytes or a number with a unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl std::fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly (`"16MiB"`), else bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 != 0 && self.0.trailing_zeros() >= 10 {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(
            "7d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7 * 86400)
        );
        assert!("10".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn durations_combine_units_and_print_back_to_the_same_value() {
        for (text, ms, printed) in [
            ("1h30m", 5_400_000, "1h30m"),
            ("1h 30m", 5_400_000, "1h30m"),
            ("90m", 5_400_000, "1h30m"),
            ("1500ms", 1500, "1s500ms"),
            ("2days", 172_800_000, "2d"),
            ("0s", 0, "0s"),
        ] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.0, Duration::from_millis(ms), "{text}");
            assert_eq!(d.to_string(), printed, "{text}");
            assert_eq!(printed.parse::<HumanDuration>().unwrap(), d, "{printed}");
        }
        for bad in ["10", "1h30", "soon", "-5s", ""] {
            let e = bad.parse::<HumanDuration>().unwrap_err();
            assert!(
                e.contains("is not a duration") && e.contains("1h30m"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit_and_read_back() {
        for (n, text) in [
            (16 << 20, "16MiB"),
            (3 << 10, "3KiB"),
            (1536, "1536"),
            (1000, "1000"),
            (0, "0"),
        ] {
            assert_eq!(ByteSize(n).to_string(), text);
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(n));
        }
    }
}
