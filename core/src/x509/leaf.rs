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

/// The size of a TLV whose content is `len` bytes.
fn tlv_len(len: usize) -> usize {
    1 + der_len(len).1 + len
}

/// Appends a tag and the DER length of the `len` content bytes the caller
/// writes next: with every length computed first, no level of nesting
/// moves what is already written.
fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    push_len(out, len);
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

/// A Time as a complete TLV: UTCTime through 2049, GeneralizedTime from
/// 2050 (RFC 5280 §4.1.2.5). Returns the bytes and how many are used.
fn time_tlv(t: OffsetDateTime) -> ([u8; 17], usize) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let y = t.year();
    let utc = (1950..2050).contains(&y);
    let mut out = [0u8; 17];
    let mut n = 2;
    let mut two = |v: u32| {
        out[n] = b'0' + (v / 10 % 10) as u8;
        out[n + 1] = b'0' + (v % 10) as u8;
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
    out[n] = b'Z';
    out[0] = if utc { UTC_TIME } else { GENERALIZED_TIME };
    // 13 or 15 characters: always the short length form.
    out[1] = (n - 1) as u8;
    (out, n + 1)
}

/// The content size of an RDN's SEQUENCE { oid, UTF8String value }.
fn atv_len(oid: &[u8], value: &str) -> usize {
    tlv_len(oid.len()) + tlv_len(value.len())
}

/// The size of the RDN SET { SEQUENCE { oid, UTF8String value } }.
fn rdn_len(oid: &[u8], value: &str) -> usize {
    tlv_len(tlv_len(atv_len(oid, value)))
}

/// Appends that RDN.
fn push_rdn(out: &mut Vec<u8>, oid: &[u8], value: &str) {
    let atv = atv_len(oid, value);
    push_header(out, SET, tlv_len(atv));
    push_header(out, SEQUENCE, atv);
    push_tlv(out, OID, oid);
    push_tlv(out, UTF8_STRING, value.as_bytes());
}

/// `spiffe://` before the trust domain in the URI SAN.
const SPIFFE_PREFIX: &[u8] = b"spiffe://";

/// The subject's organization.
const ORGANIZATION: &str = "Sigil";

/// The size of the subjectKeyIdentifier extension: a 20-byte key ID.
const SKI_EXT_LEN: usize = 2 + 5 + 2 + 2 + 20;

/// What every leaf of one CA shares, encoded once.
#[derive(Debug, Clone)]
pub(super) struct Template {
    /// `signature` AlgorithmIdentifier (also the outer signatureAlgorithm).
    pub(super) sig_alg: &'static [u8],
    /// The issuer Name: the CA certificate's subject, byte for byte.
    pub(super) issuer: Vec<u8>,
    /// keyUsage, extKeyUsage and basicConstraints, the same in every leaf.
    fixed_extensions: Vec<u8>,
    /// The subject's first RDN, O=Sigil, the same in every leaf.
    organization: Vec<u8>,
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
    /// Written as `spiffe://` + trust domain + path, without a copy.
    pub(super) spiffe_id: &'a crate::SpiffeId,
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
            organization: {
                let mut o = Vec::new();
                push_rdn(&mut o, OID_ORGANIZATION, ORGANIZATION);
                o
            },
            authority_key_id,
        }
    }

    /// The Certificate of `leaf`: its TBSCertificate is written into the
    /// buffer that is returned, `sign` signs it in place (DER ECDSA), and
    /// the algorithm and signature follow.
    pub(super) fn certificate<E>(
        &self,
        leaf: &Leaf<'_>,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let layout = self.layout(leaf);
        // Room for the outer header: 4 bytes while the certificate is
        // 256..65,535 bytes long (every leaf in practice), adjusted below.
        const ROOM: usize = 4;
        let mut out = Vec::with_capacity(ROOM + tlv_len(layout.tbs) + self.sig_alg.len() + 3 + 73);
        out.resize(ROOM, 0);
        self.write_tbs(&mut out, leaf, &layout);
        let signature = sign(&out[ROOM..])?;
        out.extend_from_slice(self.sig_alg);
        push_header(&mut out, BIT_STRING, 1 + signature.len());
        out.push(0); // no unused bits
        out.extend_from_slice(&signature);
        let body = out.len() - ROOM;
        let (len, n) = der_len(body);
        let header = 1 + n;
        if header <= ROOM {
            let at = ROOM - header;
            out[at] = SEQUENCE;
            out[at + 1..ROOM].copy_from_slice(&len[..n]);
            out.drain(..at);
        } else {
            let mut h = vec![SEQUENCE];
            h.extend_from_slice(&len[..n]);
            out.splice(..ROOM, h);
        }
        Ok(out)
    }

    /// The TBSCertificate of `leaf` on its own (the tests compare it with
    /// a reference encoder).
    #[cfg(test)]
    pub(super) fn tbs(&self, leaf: &Leaf<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_tbs(&mut out, leaf, &self.layout(leaf));
        out
    }

    /// Every length the TBSCertificate of `leaf` needs, and its times,
    /// worked out once before anything is written.
    fn layout(&self, leaf: &Leaf<'_>) -> Layout {
        let uri = SPIFFE_PREFIX.len()
            + leaf.spiffe_id.trust_domain_name().len()
            + leaf.spiffe_id.path().len();
        let names = tlv_len(uri)
            + leaf
                .dns_names
                .iter()
                .map(|d| tlv_len(d.len()))
                .sum::<usize>();
        let san = tlv_len(OID_SUBJECT_ALT_NAME.len()) + tlv_len(tlv_len(names));
        let extensions = self.fixed_extensions.len()
            + tlv_len(san)
            + SKI_EXT_LEN
            + self.authority_key_id.as_ref().map_or(0, Vec::len);
        let subject = self.organization.len()
            + leaf
                .dns_names
                .first()
                .map_or(0, |cn| rdn_len(OID_COMMON_NAME, cn));
        let not_before = time_tlv(leaf.not_before);
        let not_after = time_tlv(leaf.not_after);
        let tbs = 5
            + tlv_len(leaf.serial.len())
            + self.sig_alg.len()
            + self.issuer.len()
            + tlv_len(not_before.1 + not_after.1)
            + tlv_len(subject)
            + leaf.spki.len()
            + tlv_len(tlv_len(extensions));
        Layout {
            uri,
            names,
            san,
            extensions,
            subject,
            not_before,
            not_after,
            tbs,
        }
    }

    /// Appends the TBSCertificate of `leaf` as `l` lays it out.
    fn write_tbs(&self, out: &mut Vec<u8>, leaf: &Leaf<'_>, l: &Layout) {
        let start = out.len();
        push_header(out, SEQUENCE, l.tbs);
        // version [0] EXPLICIT INTEGER 2 (v3)
        out.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]);
        push_tlv(out, INTEGER, leaf.serial);
        out.extend_from_slice(self.sig_alg);
        out.extend_from_slice(&self.issuer);
        let ((nb, nb_len), (na, na_len)) = (l.not_before, l.not_after);
        push_header(out, SEQUENCE, nb_len + na_len);
        out.extend_from_slice(&nb[..nb_len]);
        out.extend_from_slice(&na[..na_len]);
        // Subject: O=Sigil, plus CN=<first DNS name> when there is one.
        push_header(out, SEQUENCE, l.subject);
        out.extend_from_slice(&self.organization);
        if let Some(cn) = leaf.dns_names.first() {
            push_rdn(out, OID_COMMON_NAME, cn);
        }
        out.extend_from_slice(leaf.spki);
        push_header(out, 0xa3, tlv_len(l.extensions));
        push_header(out, SEQUENCE, l.extensions);
        out.extend_from_slice(&self.fixed_extensions);
        // subjectAltName: the SPIFFE ID as the only URI, then DNS names.
        push_header(out, SEQUENCE, l.san);
        push_tlv(out, OID, OID_SUBJECT_ALT_NAME);
        push_header(out, OCTET_STRING, tlv_len(l.names));
        push_header(out, SEQUENCE, l.names);
        push_header(out, 0x86, l.uri);
        out.extend_from_slice(SPIFFE_PREFIX);
        out.extend_from_slice(leaf.spiffe_id.trust_domain_name().as_bytes());
        out.extend_from_slice(leaf.spiffe_id.path().as_bytes());
        for d in leaf.dns_names {
            push_tlv(out, 0x82, d.as_bytes());
        }
        // subjectKeyIdentifier: SHA-256 of the key bits, first 160 bits
        // (RFC 7093 §2 method 1).
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf.public_key);
        let mut key_id = [0u8; 20];
        key_id.copy_from_slice(&digest.as_ref()[..20]);
        push_header(out, SEQUENCE, SKI_EXT_LEN - 2);
        push_tlv(out, OID, OID_SUBJECT_KEY_ID);
        push_header(out, OCTET_STRING, 22);
        push_tlv(out, OCTET_STRING, &key_id);
        if let Some(aki) = &self.authority_key_id {
            out.extend_from_slice(aki);
        }
        debug_assert_eq!(out.len() - start, tlv_len(l.tbs), "TBS length");
    }
}

/// The sizes of one leaf's nested parts (content octets, without their
/// own header) and its two times, encoded.
struct Layout {
    /// The SPIFFE ID as a URI.
    uri: usize,
    /// The SAN's GeneralNames SEQUENCE.
    names: usize,
    /// The subjectAltName extension's SEQUENCE.
    san: usize,
    /// The extensions SEQUENCE.
    extensions: usize,
    /// The subject Name.
    subject: usize,
    not_before: ([u8; 17], usize),
    not_after: ([u8; 17], usize),
    /// The TBSCertificate.
    tbs: usize,
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
        let (t, n) = time_tlv(
            OffsetDateTime::from_unix_timestamp(2_524_607_999).unwrap(), // 2049-12-31T23:59:59Z
        );
        assert_eq!(t[..2], [UTC_TIME, 13]);
        assert_eq!(&t[2..n], b"491231235959Z");
        let (t, n) = time_tlv(
            OffsetDateTime::from_unix_timestamp(2_524_608_000).unwrap(), // 2050-01-01T00:00:00Z
        );
        assert_eq!(t[..2], [GENERALIZED_TIME, 15]);
        assert_eq!(&t[2..n], b"20500101000000Z");
    }

    /// The same leaf the plain way: every level its own buffer, wrapped
    /// by [`tlv`] once its content is complete.
    fn reference_tbs(t: &Template, leaf: &Leaf<'_>) -> Vec<u8> {
        let time = |x| {
            let (b, n) = time_tlv(x);
            b[..n].to_vec()
        };
        let rdn = |oid: &[u8], v: &str| {
            let mut atv = tlv(OID, oid);
            atv.extend(tlv(UTF8_STRING, v.as_bytes()));
            tlv(SET, &tlv(SEQUENCE, &atv))
        };
        let mut subject = rdn(OID_ORGANIZATION, "Sigil");
        if let Some(cn) = leaf.dns_names.first() {
            subject.extend(rdn(OID_COMMON_NAME, cn));
        }
        let mut names = tlv(0x86, leaf.spiffe_id.to_string().as_bytes());
        for d in leaf.dns_names {
            names.extend(tlv(0x82, d.as_bytes()));
        }
        let mut san = tlv(OID, OID_SUBJECT_ALT_NAME);
        san.extend(tlv(OCTET_STRING, &tlv(SEQUENCE, &names)));
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf.public_key);
        let mut ski = tlv(OID, OID_SUBJECT_KEY_ID);
        ski.extend(tlv(
            OCTET_STRING,
            &tlv(OCTET_STRING, &digest.as_ref()[..20]),
        ));
        let mut exts = t.fixed_extensions.clone();
        exts.extend(tlv(SEQUENCE, &san));
        exts.extend(tlv(SEQUENCE, &ski));
        exts.extend(t.authority_key_id.clone().unwrap_or_default());
        let mut validity = time(leaf.not_before);
        validity.extend(time(leaf.not_after));
        let mut body = vec![0xa0, 0x03, 0x02, 0x01, 0x02];
        body.extend(tlv(INTEGER, leaf.serial));
        body.extend(t.sig_alg);
        body.extend(&t.issuer);
        body.extend(tlv(SEQUENCE, &validity));
        body.extend(tlv(SEQUENCE, &subject));
        body.extend(leaf.spki);
        body.extend(tlv(0xa3, &tlv(SEQUENCE, &exts)));
        tlv(SEQUENCE, &body)
    }

    #[test]
    fn leaves_match_the_reference_encoding_at_every_length_boundary() {
        let issuer = tlv(SEQUENCE, &tlv(SET, b"issuer name bytes"));
        let key_id = [7u8; 20];
        let spkis = [vec![0x30u8; 91], vec![0x30u8; 4]];
        let point = [4u8; 65];
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let later = OffsetDateTime::from_unix_timestamp(2_600_000_000).unwrap(); // 2052
        // DNS name lists whose SAN, extensions and certificate cross the
        // one-, two- and three-byte length forms (the last one is over
        // 64 KiB, so the certificate's header does not fit its room).
        let dns_sets: Vec<Vec<String>> = [0usize, 1, 2, 5, 9, 40, 700, 3000]
            .iter()
            .map(|&n| (0..n).map(|i| format!("host-{i}.example.org")).collect())
            .collect();
        let ids = [
            crate::SpiffeId::new("spiffe://example.org").unwrap(),
            crate::SpiffeId::new("spiffe://example.org/ns/prod/sa/agent").unwrap(),
            crate::SpiffeId::new(format!("spiffe://example.org/{}", "p".repeat(300))).unwrap(),
        ];
        let mut sizes = std::collections::BTreeSet::new();
        for (alg, aki) in [(ECDSA_SHA256, Some(&key_id[..])), (ECDSA_SHA384, None)] {
            let t = Template::new(alg, &issuer, aki);
            for dns in &dns_sets {
                for (id, spki) in ids.iter().flat_map(|i| spkis.iter().map(move |k| (i, k))) {
                    for (serial, not_after) in [(&[0x01u8][..], now), (&[0x7fu8; 20][..], later)] {
                        let leaf = Leaf {
                            serial,
                            not_before: now,
                            not_after,
                            spki,
                            public_key: &point,
                            spiffe_id: id,
                            dns_names: dns,
                        };
                        let want = reference_tbs(&t, &leaf);
                        assert_eq!(t.tbs(&leaf), want, "{id} with {} DNS names", dns.len());
                        let mut signed = Vec::new();
                        let sig = [0x30u8, 0x45, 9, 9];
                        let cert = t
                            .certificate(&leaf, |tbs| {
                                signed = tbs.to_vec();
                                Ok::<_, ()>(sig.to_vec())
                            })
                            .unwrap();
                        assert_eq!(signed, want, "the signer is given the TBSCertificate");
                        let mut body = want.clone();
                        body.extend(alg);
                        body.extend(tlv(BIT_STRING, &[&[0u8][..], &sig].concat()));
                        assert_eq!(cert, tlv(SEQUENCE, &body));
                        // The header's size: 2 + the length's extra bytes.
                        sizes.insert(
                            2 + usize::from(cert[1] & 0x80 != 0) * usize::from(cert[1] & 0x7f),
                        );
                    }
                }
            }
        }
        // Headers shorter than the 4 bytes of room, that size, and longer
        // (the fallback) all ran.
        assert_eq!(sizes, [3, 4, 5].into_iter().collect());
    }

    #[test]
    fn a_signer_error_is_returned() {
        let t = Template::new(ECDSA_SHA256, &tlv(SEQUENCE, &[]), None);
        let id = crate::SpiffeId::new("spiffe://example.org/w").unwrap();
        let leaf = Leaf {
            serial: &[1],
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH,
            spki: &[0x30, 0],
            public_key: &[4],
            spiffe_id: &id,
            dns_names: &[],
        };
        assert_eq!(t.certificate(&leaf, |_| Err("no key")), Err("no key"));
    }
}
