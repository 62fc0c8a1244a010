//! SPIFFE ID and trust domain parsing (`sigil_core::ids::parse_spiffe_id`,
//! `TrustDomain::new`), differential against a reference implementation of
//! the SPIFFE ID specification (§2) written here, and round-trips.

use sigil_core::TrustDomain;
use sigil_core::ids::{MAX_SPIFFE_ID_LEN, parse_spiffe_id};

/// Trust domain name per SPIFFE ID §2.1: lowercase letters, digits,
/// dots, dashes and underscores, 1 to 255 bytes.
fn spec_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// SPIFFE ID per §2: `spiffe://` + trust domain + path, where the path is
/// empty or `/`-separated non-empty segments of letters, digits, dots,
/// dashes and underscores, none `.` or `..`.
fn spec_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    if !spec_trust_domain(td) {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    })
}

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let ours = parse_spiffe_id(s);
    let want = s.len() <= MAX_SPIFFE_ID_LEN && spec_id(s);
    assert_eq!(
        ours.is_ok(),
        want,
        "parse_spiffe_id({s:?}) = {ours:?}, the specification says {want}"
    );
    if let Ok(id) = ours {
        // No normalization: what is accepted is the canonical form.
        assert_eq!(id.to_string(), s);
        let td = TrustDomain::new(id.trust_domain_name()).expect("trust domain of a valid ID");
        assert!(id.is_member_of(&td));
        assert_eq!(format!("{}{}", td.id_string(), id.path()), s);
        assert_eq!(parse_spiffe_id(&id.to_string()).ok(), Some(id));
    }

    // Trust domain names as configs and federation carry them. The crate
    // also accepts a SPIFFE ID and keeps its trust domain without checking
    // the path, and lowercases ASCII capitals: intended differences (names
    // come from operators' configs; the result is always a valid name).
    let lower = s.to_ascii_lowercase();
    match TrustDomain::new(s) {
        Ok(td) => {
            let name = td.to_string();
            assert!(spec_trust_domain(&name), "{s:?} -> {name:?}");
            assert!(
                name == lower
                    || lower
                        .strip_prefix(&td.id_string())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
                "TrustDomain::new({s:?}) = {name:?}"
            );
            assert_eq!(TrustDomain::new(&name).ok(), Some(td));
        }
        Err(_) => assert!(!spec_trust_domain(&lower), "trust domain {s:?} refused"),
    }
}
