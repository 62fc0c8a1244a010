//! Sigil's fuzz targets and what they share: the input layout of
//! multi-part targets and the fixed trust material (`fixtures/`, written by
//! `fuzz/gen-seeds` together with the seed corpora) that chain, bundle and
//! token targets verify against.
//!
//! Each target is a module of [`targets`] with `run(data: &[u8])`, which
//! panics when one of its oracles fails. Two drivers call the same code:
//! the libFuzzer bins in `fuzz_targets/` (`scripts/fuzz`, coverage-guided)
//! and `tests/tests/fuzz_smoke.rs` in the main workspace (corpus replay and
//! deterministic mutations in `cargo test`), which compiles this file as a
//! module, so it depends on nothing but the main workspace's crates.

#![forbid(unsafe_code)]

/// One module per fuzz target, named as its bin and corpus directory.
pub mod targets {
    pub mod bundle;
    pub mod config_agent;
    pub mod config_server;
    pub mod csr;
    pub mod duration;
    pub mod entry;
    pub mod h2_authority;
    pub mod jwt;
    pub mod selector;
    pub mod spiffe_id;
    pub mod svid_chain;
    pub mod sync;
    pub mod tpm;
    pub mod wit;
    pub mod x509pop;
}

/// Unix time the fixtures were made: the targets verify as of ten minutes
/// later, so the seed SVIDs, CRLs and tokens are valid.
pub fn fixture_now() -> i64 {
    let made: i64 = include_str!("../fixtures/now").trim().parse().unwrap_or(0);
    made + 600
}

/// DER certificate of the `example.org` CA the SVID seeds chain to.
pub const CA_DER: &[u8] = include_bytes!("../fixtures/ca.der");
/// JWKS of the JWT key the token seeds are signed with.
pub const JWKS: &[u8] = include_bytes!("../fixtures/jwks.json");
/// DER root the x509pop seeds chain to.
pub const X509POP_ROOT: &[u8] = include_bytes!("../fixtures/x509pop-root.der");

/// Splits `data` into `u16` big-endian length-prefixed parts; a length
/// running past the end takes what is left, and a lone trailing byte is a
/// last part of its own.
pub fn parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 2 {
            out.push(data);
            break;
        }
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (p, tail) = rest.split_at(n.min(rest.len()));
        out.push(p);
        data = tail;
    }
    out
}

/// Part `i` of `ps`, empty when there are fewer.
pub fn part<'a>(ps: &[&'a [u8]], i: usize) -> &'a [u8] {
    ps.get(i).copied().unwrap_or_default()
}

/// A deterministic generator of chunk lengths (xorshift32), so that a
/// crashing split reproduces from the input alone.
pub struct Splits(u32);

impl Splits {
    /// Seeded by up to four bytes.
    pub fn new(seed: &[u8]) -> Self {
        let mut s = [0u8; 4];
        for (d, b) in s.iter_mut().zip(seed) {
            *d = *b;
        }
        Self(u32::from_le_bytes(s) | 1)
    }

    /// The next chunk length, 1..=max.
    pub fn next(&mut self, max: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        // Mostly small chunks, sometimes large ones.
        let n = if x & 3 == 0 { x >> 2 } else { (x >> 2) & 15 };
        1 + (n as usize) % max.max(1)
    }
}
