//! Registration entries from the wire (`Entry::from_proto`, as the agent
//! reads each entry of a sync update and the server each admin request),
//! with a `to_proto` round-trip.
//!
//! Input: a protobuf-encoded `sigil.common.Entry`.

use prost::Message;
use sigil_core::TrustDomain;
use sigil_core::entry::Entry;
use sigil_proto::common::Entry as PbEntry;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let Ok(p) = PbEntry::decode(data) else {
        return;
    };
    let td = TrustDomain::new("example.org").expect("valid");
    let Ok(e) = Entry::from_proto(&p, &td) else {
        return;
    };
    assert_eq!(e.id, p.id);
    assert!(e.spiffe_id.is_member_of(&td));
    let back = e.to_proto();
    let again = Entry::from_proto(&back, &td).expect("an accepted entry round-trips");
    assert_eq!(again, e);
    assert_eq!(again.to_proto(), back);
}
