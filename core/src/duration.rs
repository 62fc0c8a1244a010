//! Durations as operators write them: `300`, `300s`, `5m`, `1h`, `2d`.

use std::time::Duration;

/// A duration string could not be parsed.
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
}

/// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd` (N a positive integer) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
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
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::Invalid(s.to_string()))?;
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| DurationError::Invalid(s.to_string()))?;
    if secs == 0 {
        return Err(DurationError::Zero(s.to_string()));
    }
    Ok(Duration::from_secs(secs))
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
            Err(DurationError::Invalid(_))
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
            Err(DurationError::Invalid(_))
        ));
    }
}
