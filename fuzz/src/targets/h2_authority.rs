//! The HTTP/2 `:authority` rewriter in front of the Workload API
//! (`agentd/src/h2_authority.rs`): any byte stream, fed in chunks of any
//! size, gives the same output as fed at once, never more bytes than came
//! in, and a bounded amount held back; a rewritten stream rewrites to
//! itself.
//!
//! Input: 4 bytes seeding the chunk sizes, then the client's byte stream.

use crate::Splits;
use sigil_agent::h2_authority::AuthorityRewriter;

/// One frame header and payload of the largest size filtered, plus one
/// buffered header block (64 KiB) with its priority fields.
const BOUND: usize = 9 + 16_384 + 5 + 64 * 1024;

fn rewrite(stream: &[u8]) -> (Vec<u8>, usize) {
    let mut rw = AuthorityRewriter::default();
    let mut out = Vec::new();
    rw.feed(stream, &mut out);
    (out, rw.buffered())
}

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let (seed, stream) = data.split_at(data.len().min(4));
    let (whole, held) = rewrite(stream);
    assert!(
        whole.len() + held <= stream.len(),
        "{} out + {held} held > {} in",
        whole.len(),
        stream.len()
    );

    let mut splits = Splits::new(seed);
    let mut rw = AuthorityRewriter::default();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = splits.next(stream.len() - pos);
        rw.feed(&stream[pos..pos + n], &mut out);
        pos += n;
        assert!(rw.buffered() <= BOUND, "{} bytes held", rw.buffered());
    }
    assert_eq!(out, whole, "chunking changed the output");
    assert_eq!(rw.buffered(), held);

    // Idempotent: the rewritten part of the stream passes unchanged.
    let (again, _) = rewrite(&whole);
    assert_eq!(again, whole, "rewriting the output changed it");
}
