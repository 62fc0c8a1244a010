//! The DER encoding of X.509-SVID leaves.
//!
//! Every leaf the CA issues has the same shape; only the serial, the
//! validity, the key, the SANs and (with DNS names) the CN change. This
//! module writes that TBSCertificate directly from a template computed once
//! per CA (issuer name, signature algorithm, authority key ID), so minting
//! costs one ECDSA signature plus a few hundred bytes of copying — the
//! `mint` benchmark compares it with raw signatures per second.

use time::OffsetDateTime;

/// DER tags used below.
pub(super) const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
pub(super) const INTEGER: u8 = 0x02;
pub(super) const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
pub(super) const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const BOOLEAN_TRUE: &[u8] = &[0x01, 0x01, 0xff];

/// Content octets of the OIDs used below.
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
const OID_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
const OID_AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
const OID_EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
const OID_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const OID_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// AlgorithmIdentifier ecdsa-with-SHA256 / -SHA384 (no parameters).
pub(super) const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
pub(super) const ECDSA_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

/// A DER length in the shortest form: the bytes and how many are used.
fn der_len(len: usize) -> ([u8; 1 + size_of::<usize>()], usize) {
    let mut out = [0u8; 1 + size_of::<usize>()];
    if len < 0x80 {
        out[0] = len as u8;
        return (out, 1);
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let n = bytes.len() - skip;
    out[0] = 0x80 | n as u8;
    out[1..=n].copy_from_slice(&bytes[skip..]);
    (out, 1 + n)
}

/// Appends a DER length.
fn push_len(out: &mut Vec<u8>, len: usize) {
    let (bytes, n) = der_len(len);
    out.extend_from_slice(&bytes[..n]);
}

/// Appends one TLV.
fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

/// One TLV as a new buffer.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    push_tlv(&mut out, tag, content);
    out
}

/// Appends `tag`, then what `body` writes, with the DER length between
/// them: everything is written into one buffer and the header is inserted
/// afterwards (a short move of the body), with no buffer per level.
fn nest(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    body(out);
    let len = out.len() - start;
    let (bytes, n) = der_len(len);
    // Grow by the header, move the body up, write the header in the gap
    // (`Vec::splice` does the same through a generic, slower path).
    out.resize(out.len() + 1 + n, 0);
    out.copy_within(start..start + len, start + 1 + n);
    out[start] = tag;
    out[start + 1..start + 1 + n].copy_from_slice(&bytes[..n]);
}

/// Appends an Extension { extnID, critical?, extnValue OCTET STRING }.
fn push_extension(out: &mut Vec<u8>, oid: &[u8], critical: bool, value: &[u8]) {
    let mut ext = tlv(OID, oid);
    if critical {
        ext.extend_from_slice(BOOLEAN_TRUE);
    }
    push_tlv(&mut ext, OCTET_STRING, value);
    push_tlv(out, SEQUENCE, &ext);
}

/// Appends a Time: UTCTime through 2049, GeneralizedTime from 2050
/// (RFC 5280 §4.1.2.5).
fn push_time(out: &mut Vec<u8>, t: OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let y = t.year();
    let utc = (1950..2050).contains(&y);
    let mut text = [0u8; 15];
    let mut n = 0;
    let mut two = |v: u32| {
        text[n] = b'0' + (v / 10 % 10) as u8;
        text[n + 1] = b'0' + (v % 10) as u8;
        n += 2;
    };
    let y = y.clamp(0, 9999) as u32;
    if !utc {
        two(y / 100);
    }
    two(y % 100);
    two(u8::from(t.month()).into());
    two(t.day().into());
    two(t.hour().into());
    two(t.minute().into());
    two(t.second().into());
    text[n] = b'Z';
    let tag = if utc { UTC_TIME } else { GENERALIZED_TIME };
    push_tlv(out, tag, &text[..=n]);
}

/// What every leaf of one CA shares, encoded once.
#[derive(Debug, Clone)]
pub(super) struct Template {
    /// `signature` AlgorithmIdentifier (also the outer signatureAlgorithm).
    pub(super) sig_alg: &'static [u8],
    /// The issuer Name: the CA certificate's subject, byte for byte.
    pub(super) issuer: Vec<u8>,
    /// keyUsage, extKeyUsage and basicConstraints, the same in every leaf.
    fixed_extensions: Vec<u8>,
    /// The complete authorityKeyIdentifier extension, if the CA has a
    /// subject key identifier.
    authority_key_id: Option<Vec<u8>>,
}

/// The variable parts of one leaf.
pub(super) struct Leaf<'a> {
    /// Positive, without a leading zero byte.
    pub(super) serial: &'a [u8],
    pub(super) not_before: OffsetDateTime,
    pub(super) not_after: OffsetDateTime,
    /// The SubjectPublicKeyInfo, as DER, copied from the CSR.
    pub(super) spki: &'a [u8],
    /// The public key bits, for the subject key identifier.
    pub(super) public_key: &'a [u8],
    pub(super) spiffe_id: &'a str,
    pub(super) dns_names: &'a [String],
}

impl Template {
    pub(super) fn new(sig_alg: &'static [u8], issuer: &[u8], ca_key_id: Option<&[u8]>) -> Template {
        let mut fixed_extensions = Vec::new();
        // keyUsage: digitalSignature only (bit 0; 7 unused bits).
        push_extension(
            &mut fixed_extensions,
            OID_KEY_USAGE,
            true,
            &[BIT_STRING, 0x02, 0x07, 0x80],
        );
        // extKeyUsage: serverAuth, clientAuth.
        let mut eku = tlv(OID, OID_SERVER_AUTH);
        push_tlv(&mut eku, OID, OID_CLIENT_AUTH);
        push_extension(
            &mut fixed_extensions,
            OID_EXT_KEY_USAGE,
            false,
            &tlv(SEQUENCE, &eku),
        );
        // basicConstraints: CA:FALSE (the DEFAULT, so an empty SEQUENCE).
        push_extension(
            &mut fixed_extensions,
            OID_BASIC_CONSTRAINTS,
            true,
            &[SEQUENCE, 0x00],
        );
        let authority_key_id = ca_key_id.map(|id| {
            let mut ext = Vec::new();
            // AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] ... }
            push_extension(
                &mut ext,
                OID_AUTHORITY_KEY_ID,
                false,
                &tlv(SEQUENCE, &tlv(0x80, id)),
            );
            ext
        });
        Template {
            sig_alg,
            issuer: issuer.to_vec(),
            fixed_extensions,
            authority_key_id,
        }
    }

    /// The TBSCertificate of `leaf`.
    pub(super) fn tbs(&self, leaf: &Leaf<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(640);
        nest(&mut out, SEQUENCE, |b| {
            // version [0] EXPLICIT INTEGER 2 (v3)
            b.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]);
            push_tlv(b, INTEGER, leaf.serial);
            b.extend_from_slice(self.sig_alg);
            b.extend_from_slice(&self.issuer);
            nest(b, SEQUENCE, |v| {
                push_time(v, leaf.not_before);
                push_time(v, leaf.not_after);
            });
            nest(b, SEQUENCE, |name| subject(name, leaf.dns_names.first()));
            b.extend_from_slice(leaf.spki);
            nest(b, 0xa3, |e| nest(e, SEQUENCE, |x| self.extensions(x, leaf)));
        });
        out
    }

    fn extensions(&self, x: &mut Vec<u8>, leaf: &Leaf<'_>) {
        x.extend_from_slice(&self.fixed_extensions);
        // subjectAltName: the SPIFFE ID as the only URI, then DNS names.
        nest(x, SEQUENCE, |ext| {
            push_tlv(ext, OID, OID_SUBJECT_ALT_NAME);
            nest(ext, OCTET_STRING, |o| {
                nest(o, SEQUENCE, |names| {
                    push_tlv(names, 0x86, leaf.spiffe_id.as_bytes());
                    for d in leaf.dns_names {
                        push_tlv(names, 0x82, d.as_bytes());
                    }
                })
            });
        });
        // subjectKeyIdentifier: SHA-256 of the key bits, first 160 bits
        // (RFC 7093 §2 method 1).
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf.public_key);
        let key_id = digest.as_ref().get(..20).unwrap_or_default();
        nest(x, SEQUENCE, |ext| {
            push_tlv(ext, OID, OID_SUBJECT_KEY_ID);
            nest(ext, OCTET_STRING, |o| push_tlv(o, OCTET_STRING, key_id));
        });
        if let Some(aki) = &self.authority_key_id {
            x.extend_from_slice(aki);
        }
    }

    /// The Certificate: `tbs`, the algorithm, and `signature` (DER ECDSA).
    pub(super) fn certificate(&self, tbs: &[u8], signature: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(tbs.len() + signature.len() + 24);
        nest(&mut out, SEQUENCE, |b| {
            b.extend_from_slice(tbs);
            b.extend_from_slice(self.sig_alg);
            nest(b, BIT_STRING, |bits| {
                bits.push(0); // no unused bits
                bits.extend_from_slice(signature);
            });
        });
        out
    }
}

/// The subject Name's RDNs: O=Sigil, plus CN=<first DNS name> when there is
/// one.
fn subject(name: &mut Vec<u8>, cn: Option<&String>) {
    let mut rdn = |oid: &[u8], value: &str| {
        nest(name, SET, |set| {
            nest(set, SEQUENCE, |atv| {
                push_tlv(atv, OID, oid);
                push_tlv(atv, UTF8_STRING, value.as_bytes());
            })
        })
    };
    rdn(OID_ORGANIZATION, "Sigil");
    if let Some(cn) = cn {
        rdn(OID_COMMON_NAME, cn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_shortest_form() {
        for (len, want) in [
            (0usize, vec![0x00]),
            (0x7f, vec![0x7f]),
            (0x80, vec![0x81, 0x80]),
            (0xff, vec![0x81, 0xff]),
            (0x100, vec![0x82, 0x01, 0x00]),
            (0x1_0000, vec![0x83, 0x01, 0x00, 0x00]),
        ] {
            let mut out = Vec::new();
            push_len(&mut out, len);
            assert_eq!(out, want, "length {len}");
        }
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let mut out = Vec::new();
        push_time(
            &mut out,
            OffsetDateTime::from_unix_timestamp(2_524_607_999).unwrap(), // 2049-12-31T23:59:59Z
        );
        assert_eq!(out[0], UTC_TIME);
        assert_eq!(&out[2..], b"491231235959Z");
        out.clear();
        push_time(
            &mut out,
            OffsetDateTime::from_unix_timestamp(2_524_608_000).unwrap(), // 2050-01-01T00:00:00Z
        );
        assert_eq!(out[0], GENERALIZED_TIME);
        assert_eq!(&out[2..], b"20500101000000Z");
    }
}
