//! Durations as operators write them: `300`, `300s`, `5m`, `1h`, `2d`, and
//! the bounded form every TTL flag and config key goes through
//! ([`parse_field`]), whose errors name the field and the allowed range.

use std::time::Duration;

/// A duration string could not be parsed, or was out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The string was empty.
    #[error("empty duration (expected e.g. 300, 300s, 5m, 1h)")]
    Empty,
    /// The string was not a number with an optional s/m/h/d suffix.
    #[error("invalid duration {0:?} (expected e.g. 300, 300s, 5m, 1h)")]
    Invalid(String),
    /// The value was zero; zero-length lifetimes are never useful.
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
    /// A leading minus sign: lifetimes are never negative.
    #[error("duration {0:?} must not be negative")]
    Negative(String),
    /// The value does not fit in 64-bit seconds.
    #[error("duration {0:?} is too large")]
    Overflow(String),
    /// The value is above the maximum for its field.
    #[error("duration {value:?} exceeds the maximum of {}", human(*max))]
    TooLong {
        /// What was given.
        value: String,
        /// The largest value allowed.
        max: Duration,
    },
}

/// A duration given for a named field (a CLI flag or a config key) was
/// refused. Always names the field and the allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {}", self.detail())]
pub struct FieldDurationError {
    /// The flag (`--x509-ttl`) or config key (`agent_svid_ttl`).
    pub field: String,
    /// What was wrong.
    pub reason: DurationError,
    /// The largest value the field accepts.
    pub max: Duration,
}

impl FieldDurationError {
    /// The message without the field name, for callers that name the field
    /// their own way (`config key `ca_ttl`: ...`).
    pub fn detail(&self) -> String {
        match self.reason {
            DurationError::TooLong { .. } => self.reason.to_string(),
            _ => format!("{} (allowed: 1s to {})", self.reason, human(self.max)),
        }
    }
}

/// `2592000` seconds as `30d (2592000s)`, `90` as `90s`: the largest whole
/// unit, with the seconds when that is not already the unit.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let unit = [(86_400, 'd'), (3600, 'h'), (60, 'm')]
        .into_iter()
        .find(|(n, _)| s >= *n && s.is_multiple_of(*n));
    match unit {
        Some((n, c)) => format!("{}{c} ({s}s)", s / n),
        None => format!("{s}s"),
    }
}

/// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd` (N a positive integer) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    if t.starts_with('-') {
        return Err(DurationError::Negative(s.to_string()));
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1u64),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::Invalid(s.to_string()));
    }
    let secs = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| DurationError::Overflow(s.to_string()))?;
    if secs == 0 {
        return Err(DurationError::Zero(s.to_string()));
    }
    Ok(Duration::from_secs(secs))
}

/// Parses a duration that must not exceed `max`.
pub fn parse_duration_max(s: &str, max: Duration) -> Result<Duration, DurationError> {
    let d = parse_duration(s).map_err(|e| match e {
        DurationError::Overflow(value) => DurationError::TooLong { value, max },
        other => other,
    })?;
    if d > max {
        return Err(DurationError::TooLong {
            value: s.to_string(),
            max,
        });
    }
    Ok(d)
}

/// Parses the value of `field` (a flag or config key), at most `max`; the
/// error names the field and the allowed range.
pub fn parse_field(field: &str, s: &str, max: Duration) -> Result<Duration, FieldDurationError> {
    parse_duration_max(s, max).map_err(|reason| FieldDurationError {
        field: field.to_string(),
        reason,
        max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn rejects_garbage_zero_and_overflow() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("5x"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(parse_duration("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn bounded_fields_name_the_field_and_the_limit() {
        let max = Duration::from_secs(30 * 86_400);
        assert_eq!(
            parse_field("--x509-ttl", "30d", max),
            Ok(Duration::from_secs(2_592_000))
        );
        for bad in [
            "9223372036854775808",
            "18446744073709551616",
            "31d",
            "999999999d",
            "-5",
            "0",
            "soon",
        ] {
            let e = parse_field("--x509-ttl", bad, max).unwrap_err();
            assert_eq!(e.field, "--x509-ttl");
            let msg = e.to_string();
            assert!(
                msg.starts_with("--x509-ttl: ") && msg.contains("30d (2592000s)"),
                "{bad}: {msg}"
            );
        }
        let e = parse_field("agent_svid_ttl", "999999999d", max).unwrap_err();
        assert!(matches!(e.reason, DurationError::TooLong { .. }), "{e}");
        let e = parse_field("--x509-ttl", "-5", max).unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(3600)), "1h (3600s)");
    }
}
