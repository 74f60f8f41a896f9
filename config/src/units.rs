//! Durations (`15s`, `1h30m`) and byte sizes (`10MB`, `1GiB`) written the way Prometheus writes them.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A Prometheus duration: `[0-9]+(ms|s|m|h|d|w|y)` repeated, largest unit first, e.g. `1h30m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    /// The std duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

const UNITS: [(&str, u64); 7] = [
    ("y", 365 * 24 * 3600 * 1000),
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a valid duration string: {s:?} (expected e.g. 15s, 1m30s, 500ms)");
        if s == "0" {
            return Ok(Self::default());
        }
        if s.is_empty() {
            return Err("empty duration string".to_owned());
        }
        let mut rest = s;
        let mut total: u64 = 0;
        let mut last_rank = usize::MAX;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            // "ms" must be tried before "m".
            let (rank, unit_ms, len) = if rest.starts_with("ms") {
                (6, 1, 2)
            } else {
                let c = rest.get(..1).ok_or_else(bad)?;
                let rank = UNITS.iter().position(|(u, _)| *u == c).ok_or_else(bad)?;
                (rank, UNITS[rank].1, 1)
            };
            if last_rank != usize::MAX && rank <= last_rank {
                return Err(bad());
            }
            last_rank = rank;
            total = n
                .checked_mul(unit_ms)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("duration out of range: {s:?}"))?;
            rest = &rest[len..];
        }
        Ok(Self::from_millis(total))
    }
}

impl fmt::Display for Duration {
    /// Formats like Prometheus's `model.Duration.String()`, e.g. `1m30s`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis() as u64;
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in UNITS {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 15s, 1m30s or 500ms")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                if v == 0 {
                    Ok(Duration::default())
                } else {
                    Err(E::custom(format!("duration {v} has no unit (expected e.g. {v}s)")))
                }
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A byte size: a plain number of bytes or a number with a unit. `KB`/`MB`/`GB`/`TB` and
/// `KiB`/`MiB`/`GiB`/`TiB` are all powers of 1024, as in Prometheus's `body_size_limit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("not a valid size: {s:?} (expected e.g. 512MiB, 1GiB, 10MB)"));
        }
        let n: u64 = t[..digits].parse().map_err(|_| format!("size out of range: {s:?}"))?;
        let mult: u64 = match t[digits..].trim() {
            "" | "B" => 1,
            "KB" | "KiB" | "K" | "k" | "kB" => 1 << 10,
            "MB" | "MiB" | "M" => 1 << 20,
            "GB" | "GiB" | "G" => 1 << 30,
            "TB" | "TiB" | "T" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (expected B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size out of range: {s:?}"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 10MB or 1GiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `storage.wal_fsync`: when WAL appends reach stable storage. `never` leaves it to the
/// kernel (survives a process crash or `kill -9`, not a node crash or power loss); a duration
/// such as `1s` syncs at that interval (a node crash loses at most that much); `always` syncs
/// every append before the scrape finishes (nothing acknowledged is lost; costs a disk flush
/// per scrape and remote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalFsync {
    /// Leave flushing to the kernel.
    Never,
    /// Sync at this interval.
    Interval(Duration),
    /// Sync every append.
    Always,
}

impl fmt::Display for WalFsync {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            WalFsync::Never => f.write_str("never"),
            WalFsync::Always => f.write_str("always"),
            WalFsync::Interval(d) => write!(f, "{d}"),
        }
    }
}

impl std::str::FromStr for WalFsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(WalFsync::Never),
            "always" => Ok(WalFsync::Always),
            other => match other.parse::<Duration>() {
                Ok(d) if d.get().is_zero() => Err("an interval of 0 would never sync; use `never` or `always`".into()),
                Ok(d) => Ok(WalFsync::Interval(d)),
                Err(_) => Err(format!("{other:?} is not `never`, `always` or a duration such as 1s")),
            },
        }
    }
}

impl<'de> Deserialize<'de> for WalFsync {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WalFsync;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`never`, `always` or a duration such as 1s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WalFsync, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for WalFsync {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_like_prometheus() {
        for (text, ms) in [
            ("15s", 15_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("0", 0),
            ("2d", 172_800_000),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.0.as_millis() as u64, ms, "{text}");
        }
        assert_eq!(Duration::from_millis(90_500).to_string(), "1m30s500ms");
        assert!("15".parse::<Duration>().is_err());
        assert!("1s1m".parse::<Duration>().is_err());
        assert!("1.5s".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("10MB".parse::<ByteSize>().unwrap().0, 10 << 20);
        assert_eq!("123".parse::<ByteSize>().unwrap().0, 123);
        assert!("10XB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
    }
}
