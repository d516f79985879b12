//! What both binaries' configurations share: the error of an unusable flag and the parsers of flag
//! values. Each binary's flags and their validation live with it (`server::config`, `agent::config`).

use std::net::SocketAddr;
use std::time::Duration;

/// A flag or combination of flags that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `Err(ConfigError(msg))`.
pub fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 5s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} out of range"))
}

/// Parses a byte count with an optional `Ki`, `Mi` or `Gi` suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return Err(format!("{s:?}: expected a byte count such as 65536, 512Ki, 4Mi or 1Gi")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected a byte count such as 4Mi"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?}: too large"))
}

/// `--admin-bind`: `ADDRESS:PORT`, or `off` for none.
pub fn parse_admin_bind(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| ConfigError(format!("--admin-bind {s:?}: expected ADDRESS:PORT or off")))
}

/// A count flag that must be at least 1.
pub fn positive<T: Default + PartialEq>(name: &str, v: T) -> Result<T, ConfigError> {
    if v == T::default() { err(format!("{name} must be at least 1")) } else { Ok(v) }
}

/// A duration flag that must be longer than 0.
pub fn nonzero_duration(name: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() { err(format!("{name} must be longer than 0")) } else { Ok(d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_size("2Mi"), Ok(2 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        for bad in ["", "Mi", "2MB", "-1", "2 Mi", "99999999999999999999Gi"] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }
}

/// A server address: a host name or IP address, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl ServerAddr {
    /// Parses `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT`; `default_port` where none is given. An
    /// unbracketed IPv6 address takes the default port.
    pub fn parse(s: &str, default_port: u16) -> Result<Self, ConfigError> {
        let bad = || ConfigError(format!("server address {s:?}: expected HOST, HOST:PORT or [IPV6]:PORT"));
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (host, port(p)?),
                None if after.is_empty() => (host, default_port),
                None => return Err(bad()),
            }
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            (s, default_port)
        } else {
            match s.rsplit_once(':') {
                Some((host, p)) => (host, port(p)?),
                None => (s, default_port),
            }
        };
        if host.is_empty()
            || host.len() > crate::protocol::MAX_STRING_LEN
            || host.contains(char::is_whitespace)
        {
            return Err(bad());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
