//! SPIFFE bundle documents (`parse_spiffe_bundle`, as federation fetches
//! them) and JWKS documents (`JwtBundle::from_jwks`, as the agent and the
//! server read JWT authorities), with an encode/parse round-trip.

use sigil_core::bundle::{parse_spiffe_bundle, spiffe_bundle};
use sigil_core::jwt::JwtBundle;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let _ = JwtBundle::from_jwks(data);
    let Ok(b) = parse_spiffe_bundle(data) else {
        return;
    };
    let seq = b.sequence.unwrap_or(0);
    let hint = b.refresh_hint.unwrap_or(0);
    // What we parsed, we can publish again, and it reads back the same.
    if let Ok(doc) = spiffe_bundle(&b.x509_authorities, &b.jwt_authorities, seq, hint) {
        let text = serde_json::to_vec(&doc).expect("json");
        let again = parse_spiffe_bundle(&text).expect("re-encoded bundle parses");
        assert_eq!(again.x509_authorities, b.x509_authorities);
        assert_eq!(again.jwt_authorities.len(), b.jwt_authorities.len());
        assert_eq!(again.sequence, Some(seq));
        assert_eq!(again.refresh_hint, Some(hint));
        let _ = JwtBundle::from_jwks(&text);
    }
}
