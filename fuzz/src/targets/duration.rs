//! Duration parsing (`300`, `5m`, `1h`, `2d`), as every TTL flag and config
//! key reads it, with and without a bound.

use std::time::Duration;

use sigil_core::duration::{human, parse_duration, parse_duration_max, parse_field};

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let max = Duration::from_secs(30 * 86_400);
    let field = parse_field("ttl", s, max);
    match parse_duration(s) {
        Ok(d) => {
            assert!(d.as_secs() > 0 && d.subsec_nanos() == 0);
            let unit = match s.trim().chars().last() {
                Some('m') => 60,
                Some('h') => 3600,
                Some('d') => 86_400,
                _ => 1,
            };
            assert_eq!(d.as_secs() % unit, 0, "{s:?} -> {d:?}");
            // The plain-seconds form means the same.
            assert_eq!(parse_duration(&d.as_secs().to_string()), Ok(d));
            assert_eq!(parse_duration_max(s, d), Ok(d));
            if d.as_secs() > 1 {
                assert!(parse_duration_max(s, d - Duration::from_secs(1)).is_err());
            }
            assert_eq!(field.is_ok(), d <= max);
            let _ = human(d);
        }
        Err(_) => {
            assert!(field.is_err());
            assert!(parse_duration_max(s, Duration::MAX).is_err());
        }
    }
    if let Err(e) = field {
        assert!(e.to_string().starts_with("ttl: "));
    }
}
