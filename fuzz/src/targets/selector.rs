//! Selector parsing (`Selector::from_str`, as entries, CLIs and attestors
//! use it) and the percent-escaping of raw bytes in selector values.

use sigil_core::selector::{MAX_VALUE_LEN, Selector, escape_bytes, known_types, unescape_bytes};

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    // Any bytes escape losslessly, into text without control characters.
    let escaped = escape_bytes(data);
    assert!(!escaped.chars().any(char::is_control), "{escaped:?}");
    assert_eq!(unescape_bytes(&escaped).as_deref(), Some(data));

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Only canonical escapes are accepted: they re-escape to themselves.
    if let Some(raw) = unescape_bytes(s) {
        assert_eq!(escape_bytes(&raw), s);
    }
    if let Ok(sel) = s.parse::<Selector>() {
        assert_eq!(sel.to_string(), s);
        assert_eq!(sel.as_str(), s);
        assert_eq!(format!("{}:{}", sel.kind(), sel.value()), s);
        assert!(known_types().any(|k| k == sel.kind()));
        assert!(!sel.value().is_empty() && sel.value().len() <= MAX_VALUE_LEN);
        assert_eq!(Selector::new(sel.kind(), sel.value()).ok(), Some(sel));
    }
}
