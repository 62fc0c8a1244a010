//! `[telemetry]` in server.toml and agent.toml.
//!
//! Off unless `prometheus_port` is set. `prometheus_host` is an IP address
//! (default `127.0.0.1`: metrics name SPIFFE IDs and counts that are not for
//! the network unless the operator says so). Port 0 binds a free port,
//! which the process logs (tests use it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Deserialize;

/// The table as written; [`RawTelemetry::validate`] checks it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    prometheus_port: Option<u16>,
    prometheus_host: Option<String>,
}

/// The validated table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Where `/metrics`, `/ready` and `/live` are served; `None`: not at all.
    pub listen: Option<SocketAddr>,
}

impl RawTelemetry {
    /// Checks the keys; an error names the key (`telemetry.…`) and why.
    pub fn validate(self) -> Result<TelemetryConfig, (&'static str, String)> {
        let host = match &self.prometheus_host {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(h) => h.parse::<IpAddr>().map_err(|_| {
                (
                    "telemetry.prometheus_host",
                    format!("{h:?} is not an IP address"),
                )
            })?,
        };
        match self.prometheus_port {
            Some(port) => Ok(TelemetryConfig {
                listen: Some(SocketAddr::new(host, port)),
            }),
            None if self.prometheus_host.is_some() => Err((
                "telemetry.prometheus_host",
                "set without telemetry.prometheus_port".into(),
            )),
            None => Ok(TelemetryConfig { listen: None }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TelemetryConfig, (&'static str, String)> {
        let raw: RawTelemetry = toml::from_str(s).map_err(|e| ("toml", e.to_string()))?;
        raw.validate()
    }

    #[test]
    fn off_by_default_and_loopback_when_on() {
        assert_eq!(parse("").unwrap().listen, None);
        assert_eq!(
            parse("prometheus_port = 9988").unwrap().listen,
            Some("127.0.0.1:9988".parse().unwrap())
        );
        assert_eq!(
            parse("prometheus_port = 0\nprometheus_host = \"::\"")
                .unwrap()
                .listen,
            Some("[::]:0".parse().unwrap())
        );
    }

    #[test]
    fn bad_keys_are_named() {
        assert_eq!(
            parse("prometheus_port = 1\nprometheus_host = \"localhost\"")
                .unwrap_err()
                .0,
            "telemetry.prometheus_host"
        );
        assert_eq!(
            parse("prometheus_host = \"127.0.0.1\"").unwrap_err().0,
            "telemetry.prometheus_host"
        );
        assert!(parse("prometheus_port = 70000").is_err());
        assert!(parse("port = 1").is_err());
    }
}
