//! Well-known SPIFFE IDs, the one parser every untrusted SPIFFE ID goes
//! through (with the length bound), and random identifiers.

use ring::rand::{SecureRandom, SystemRandom};
use spiffe::{SpiffeId, TrustDomain};

/// Longest SPIFFE ID accepted anywhere, in bytes. The SPIFFE ID
/// specification (§2.3) requires implementations to support URIs of up to
/// 2048 bytes and forbids generating longer ones; accepting longer ones would
/// only let a caller inflate SVIDs and tokens.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A SPIFFE ID given as text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Longer than [`MAX_SPIFFE_ID_LEN`] (the ID itself is not echoed).
    #[error("a {len}-byte SPIFFE ID exceeds the maximum of {max} bytes", max = MAX_SPIFFE_ID_LEN)]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Not a valid SPIFFE ID (the message quotes it).
    #[error("{0}")]
    Invalid(String),
}

/// Parses an untrusted SPIFFE ID: at most [`MAX_SPIFFE_ID_LEN`] bytes, the
/// `spiffe` crate's syntax rules, and in canonical form.
///
/// The crate lowercases a trust domain given with capitals
/// (`spiffe://EXAMPLE.org/x` parses as `spiffe://example.org/x`), which
/// the SPIFFE ID specification (§2.1) does not allow. Such an ID is
/// refused rather than normalized, so that one identity never has two
/// spellings (in entries, kill lists, tokens) that compare differently as
/// text.
pub fn parse_spiffe_id(s: &str) -> Result<SpiffeId, IdError> {
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    let id = SpiffeId::new(s).map_err(|e| IdError::Invalid(format!("{s:?}: {e}")))?;
    if id.to_string() != s {
        return Err(IdError::Invalid(format!(
            "{s:?}: not in canonical form (the trust domain must be lowercase: {id})"
        )));
    }
    Ok(id)
}

/// The server's SPIFFE ID: `spiffe://<td>/sigil/server`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    #[expect(clippy::expect_used, reason = "constant, valid path segments")]
    SpiffeId::from_segments(td.clone(), &["sigil", "server"]).expect("valid server id")
}

/// The ID of an agent attested by `attestor` with a unique suffix:
/// `spiffe://<td>/sigil/agent/<attestor>/<unique>`.
pub fn agent_id(
    td: &TrustDomain,
    attestor: &str,
    unique: &str,
) -> Result<SpiffeId, spiffe::SpiffeIdError> {
    SpiffeId::from_segments(td.clone(), &["sigil", "agent", attestor, unique])
}

/// Random bytes from the system CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SystemRandom only fails if the OS RNG is unavailable, which is fatal.
    #[expect(clippy::expect_used, reason = "an unavailable OS RNG is unrecoverable")]
    SystemRandom::new().fill(&mut b).expect("system RNG");
    b
}

/// A new random entry ID in UUID (v4) text form.
pub fn new_entry_id() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// SHA-256 of `data`, hex encoded.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_and_agent_ids_are_in_the_trust_domain() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            server_id(&td).to_string(),
            "spiffe://example.org/sigil/server"
        );
        assert_eq!(
            agent_id(&td, "join_token", "abc").unwrap().to_string(),
            "spiffe://example.org/sigil/agent/join_token/abc"
        );
        assert!(agent_id(&td, "join_token", "a/b").is_err());
    }

    #[test]
    fn spiffe_ids_are_bounded_at_2048_bytes() {
        let prefix = "spiffe://example.org/";
        let fits = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(parse_spiffe_id(&fits).unwrap().to_string(), fits);
        let long = format!("{fits}b");
        let e = parse_spiffe_id(&long).unwrap_err();
        assert_eq!(e, IdError::TooLong { len: 2049 });
        let msg = e.to_string();
        assert!(msg.contains("2049") && msg.contains("2048"), "{msg}");
        assert!(!msg.contains("aaaa"), "the ID is not echoed: {msg}");
        assert!(matches!(
            parse_spiffe_id("http://example.org/x"),
            Err(IdError::Invalid(_))
        ));
    }

    #[test]
    fn non_canonical_ids_are_refused_not_normalized() {
        // Found by fuzz/fuzz_targets/spiffe_id.rs: the spiffe crate
        // lowercases the trust domain.
        let e = parse_spiffe_id("spiffe://EXAMPLE.org/x").unwrap_err();
        assert!(e.to_string().contains("canonical"), "{e}");
        assert!(parse_spiffe_id("spiffe://Example.org").is_err());
        assert!(parse_spiffe_id("spiffe://example.org/X").is_ok());
    }

    #[test]
    fn entry_ids_are_unique_uuids() {
        let a = new_entry_id();
        let b = new_entry_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
