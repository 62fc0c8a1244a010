//! Pure-Rust reading and writing of the few TPM 2.0 structures the verifier
//! needs (TPM 2.0 Part 2, "Structures"): `TPM2B_PUBLIC`, `TPMS_ATTEST` of a
//! quote, `TPMT_SIGNATURE`. Everything is big-endian; every `TPM2B_*` is a
//! `u16` size followed by that many bytes. Parsers are strict: unknown
//! algorithms are reported, trailing bytes are errors.

use super::TpmError;

/// `TPM_GENERATED_VALUE`: the magic every TPM-produced `TPMS_ATTEST` starts with.
pub(crate) const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub(crate) const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// `TPM_ALG_ID` values (Part 2, table 9) used here.
pub(crate) mod alg {
    pub(crate) const RSA: u16 = 0x0001;
    pub(crate) const HMAC: u16 = 0x0005;
    pub(crate) const AES: u16 = 0x0006;
    pub(crate) const MGF1: u16 = 0x0007;
    pub(crate) const KEYEDHASH: u16 = 0x0008;
    pub(crate) const SHA256: u16 = 0x000B;
    pub(crate) const NULL: u16 = 0x0010;
    pub(crate) const RSASSA: u16 = 0x0014;
    pub(crate) const RSAES: u16 = 0x0015;
    pub(crate) const RSAPSS: u16 = 0x0016;
    pub(crate) const OAEP: u16 = 0x0017;
    pub(crate) const ECDSA: u16 = 0x0018;
    pub(crate) const ECDH: u16 = 0x0019;
    pub(crate) const ECDAA: u16 = 0x001A;
    pub(crate) const SM2: u16 = 0x001B;
    pub(crate) const ECSCHNORR: u16 = 0x001C;
    pub(crate) const ECMQV: u16 = 0x001D;
    pub(crate) const KDF1_SP800_56A: u16 = 0x0020;
    pub(crate) const KDF2: u16 = 0x0021;
    pub(crate) const KDF1_SP800_108: u16 = 0x0022;
    pub(crate) const ECC: u16 = 0x0023;
    pub(crate) const SYMCIPHER: u16 = 0x0025;
    pub(crate) const CFB: u16 = 0x0043;
}

/// `TPM_ECC_CURVE` values used here.
pub(crate) mod curve {
    pub(crate) const NIST_P256: u16 = 0x0003;
    pub(crate) const NIST_P384: u16 = 0x0004;
}

/// `TPMA_OBJECT` bits (Part 2, table 31).
pub(crate) mod attr {
    pub(crate) const FIXED_TPM: u32 = 1 << 1;
    pub(crate) const FIXED_PARENT: u32 = 1 << 4;
    pub(crate) const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub(crate) const RESTRICTED: u32 = 1 << 16;
    pub(crate) const DECRYPT: u32 = 1 << 17;
    pub(crate) const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// A bounds-checked big-endian reader over one structure.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub(crate) fn malformed(&self, reason: impl Into<String>) -> TpmError {
        TpmError::Malformed {
            what: self.what,
            reason: reason.into(),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8], TpmError> {
        if self.buf.len() < n {
            return Err(self.malformed(format!(
                "truncated at {field}: need {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], TpmError> {
        let bytes = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8, TpmError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64, TpmError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A `TPM2B_*`: `u16` size, then the buffer.
    pub(crate) fn tpm2b(&mut self, field: &str) -> Result<&'a [u8], TpmError> {
        let n = self.u16(field)?;
        self.bytes(usize::from(n), field)
    }

    /// Fails when bytes are left over.
    pub(crate) fn finish(self) -> Result<(), TpmError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} unexpected trailing bytes", self.buf.len())))
        }
    }
}

/// Unwraps a `TPM2B_*` that must span `bytes` exactly.
pub(crate) fn unwrap_tpm2b<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a [u8], TpmError> {
    let mut r = Reader::new(bytes, what);
    let inner = r.tpm2b("size")?;
    r.finish()?;
    Ok(inner)
}

/// The contents of a credential blob (`TPM2B_ID_OBJECT`) and an encrypted
/// seed (`TPM2B_ENCRYPTED_SECRET`), each spanning its bytes exactly: the
/// agent's first look at a credential-activation challenge.
pub(crate) fn activation_inputs<'a>(
    credential_blob: &'a [u8],
    encrypted_secret: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), TpmError> {
    Ok((
        unwrap_tpm2b(credential_blob, "TPM2B_ID_OBJECT")?,
        unwrap_tpm2b(encrypted_secret, "TPM2B_ENCRYPTED_SECRET")?,
    ))
}

/// Wraps `inner` as a `TPM2B_*`.
pub(crate) fn tpm2b(inner: &[u8]) -> Result<Vec<u8>, TpmError> {
    let size = u16::try_from(inner.len())
        .map_err(|_| TpmError::Bug(format!("TPM2B of {} bytes", inner.len())))?;
    let mut out = Vec::with_capacity(inner.len() + 2);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(inner);
    Ok(out)
}

/// `TPMT_SYM_DEF_OBJECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SymDef {
    Null,
    Cipher { alg: u16, key_bits: u16, mode: u16 },
}

/// A signing/encryption scheme (`TPMT_RSA_SCHEME`, `TPMT_ECC_SCHEME`): the
/// scheme algorithm and its hash (`NULL` when the scheme has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheme {
    pub(crate) alg: u16,
    pub(crate) hash: u16,
}

/// The key-type-specific part of a `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyParams<'a> {
    Rsa {
        symmetric: SymDef,
        scheme: Scheme,
        key_bits: u16,
        /// The public exponent; 0 in the structure means 65537.
        exponent: u32,
        modulus: &'a [u8],
    },
    Ecc {
        symmetric: SymDef,
        scheme: Scheme,
        curve: u16,
        x: &'a [u8],
        y: &'a [u8],
    },
}

/// A parsed `TPMT_PUBLIC`, borrowing the marshalled bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublicArea<'a> {
    /// The marshalled `TPMT_PUBLIC` (what the object's Name hashes).
    pub(crate) raw: &'a [u8],
    pub(crate) name_alg: u16,
    pub(crate) attributes: u32,
    pub(crate) params: KeyParams<'a>,
}

impl<'a> PublicArea<'a> {
    /// Parses a `TPM2B_PUBLIC` (size-prefixed `TPMT_PUBLIC`) spanning `bytes` exactly.
    pub(crate) fn from_tpm2b(bytes: &'a [u8], what: &'static str) -> Result<Self, TpmError> {
        Self::from_tpmt(unwrap_tpm2b(bytes, what)?, what)
    }

    /// Parses a marshalled `TPMT_PUBLIC` spanning `raw` exactly.
    pub(crate) fn from_tpmt(raw: &'a [u8], what: &'static str) -> Result<Self, TpmError> {
        let mut r = Reader::new(raw, what);
        let typ = r.u16("type")?;
        let name_alg = r.u16("nameAlg")?;
        let attributes = r.u32("objectAttributes")?;
        let _auth_policy = r.tpm2b("authPolicy")?;
        let params = match typ {
            alg::RSA => {
                let symmetric = sym_def_object(&mut r)?;
                let scheme = rsa_scheme(&mut r)?;
                let key_bits = r.u16("keyBits")?;
                let exponent = r.u32("exponent")?;
                let modulus = r.tpm2b("unique.rsa")?;
                KeyParams::Rsa {
                    symmetric,
                    scheme,
                    key_bits,
                    exponent,
                    modulus,
                }
            }
            alg::ECC => {
                let symmetric = sym_def_object(&mut r)?;
                let scheme = ecc_scheme(&mut r)?;
                let curve = r.u16("curveID")?;
                let _kdf = kdf_scheme(&mut r)?;
                let x = r.tpm2b("unique.ecc.x")?;
                let y = r.tpm2b("unique.ecc.y")?;
                KeyParams::Ecc {
                    symmetric,
                    scheme,
                    curve,
                    x,
                    y,
                }
            }
            alg::KEYEDHASH | alg::SYMCIPHER => {
                return Err(TpmError::Unsupported(format!(
                    "{what}: symmetric object type {typ:#06x}, expected an RSA or ECC key"
                )));
            }
            other => return Err(r.malformed(format!("unknown object type {other:#06x}"))),
        };
        r.finish()?;
        Ok(Self {
            raw,
            name_alg,
            attributes,
            params,
        })
    }

    pub(crate) fn has(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }
}

fn sym_def_object(r: &mut Reader<'_>) -> Result<SymDef, TpmError> {
    match r.u16("symmetric.algorithm")? {
        alg::NULL => Ok(SymDef::Null),
        alg => Ok(SymDef::Cipher {
            alg,
            key_bits: r.u16("symmetric.keyBits")?,
            mode: r.u16("symmetric.mode")?,
        }),
    }
}

fn rsa_scheme(r: &mut Reader<'_>) -> Result<Scheme, TpmError> {
    let alg = r.u16("scheme")?;
    let hash = match alg {
        alg::NULL | alg::RSAES => alg::NULL,
        alg::RSASSA | alg::RSAPSS | alg::OAEP => r.u16("scheme.hashAlg")?,
        other => return Err(r.malformed(format!("unknown RSA scheme {other:#06x}"))),
    };
    Ok(Scheme { alg, hash })
}

fn ecc_scheme(r: &mut Reader<'_>) -> Result<Scheme, TpmError> {
    let alg = r.u16("scheme")?;
    let hash = match alg {
        alg::NULL => alg::NULL,
        alg::ECDSA | alg::ECDH | alg::SM2 | alg::ECSCHNORR | alg::ECMQV => {
            r.u16("scheme.hashAlg")?
        }
        alg::ECDAA => {
            let hash = r.u16("scheme.hashAlg")?;
            let _count = r.u16("scheme.count")?;
            hash
        }
        other => return Err(r.malformed(format!("unknown ECC scheme {other:#06x}"))),
    };
    Ok(Scheme { alg, hash })
}

fn kdf_scheme(r: &mut Reader<'_>) -> Result<Scheme, TpmError> {
    let alg = r.u16("kdf")?;
    let hash = match alg {
        alg::NULL => alg::NULL,
        alg::MGF1 | alg::KDF1_SP800_56A | alg::KDF2 | alg::KDF1_SP800_108 => {
            r.u16("kdf.hashAlg")?
        }
        other => return Err(r.malformed(format!("unknown KDF scheme {other:#06x}"))),
    };
    Ok(Scheme { alg, hash })
}

/// A parsed `TPMS_ATTEST` whose `type` is `TPM_ST_ATTEST_QUOTE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuoteAttest<'a> {
    pub(crate) extra_data: &'a [u8],
    /// `TPML_PCR_SELECTION`: (hash algorithm, selection bitmap) per bank.
    pub(crate) pcr_select: Vec<(u16, &'a [u8])>,
    pub(crate) pcr_digest: &'a [u8],
}

impl<'a> QuoteAttest<'a> {
    /// Parses a marshalled `TPMS_ATTEST`; anything but a TPM-generated quote is refused.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST");
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(TpmError::NotAQuote(format!(
                "magic {magic:#010x}, expected TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x}"
            )));
        }
        let typ = r.u16("type")?;
        if typ != TPM_ST_ATTEST_QUOTE {
            return Err(TpmError::NotAQuote(format!(
                "type {typ:#06x}, expected TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x}"
            )));
        }
        let _qualified_signer = r.tpm2b("qualifiedSigner")?;
        let extra_data = r.tpm2b("extraData")?;
        let _clock = r.u64("clockInfo.clock")?;
        let _reset_count = r.u32("clockInfo.resetCount")?;
        let _restart_count = r.u32("clockInfo.restartCount")?;
        let _safe = r.u8("clockInfo.safe")?;
        let _firmware_version = r.u64("firmwareVersion")?;
        let count = r.u32("pcrSelect.count")?;
        // TPM2_NUM_PCR_BANKS is 16 in the reference implementation.
        if count > 16 {
            return Err(r.malformed(format!("{count} PCR selections")));
        }
        let mut pcr_select = Vec::new();
        for _ in 0..count {
            let hash = r.u16("pcrSelections.hash")?;
            let size = r.u8("pcrSelections.sizeofSelect")?;
            let bitmap = r.bytes(usize::from(size), "pcrSelections.pcrSelect")?;
            pcr_select.push((hash, bitmap));
        }
        let pcr_digest = r.tpm2b("pcrDigest")?;
        r.finish()?;
        Ok(Self {
            extra_data,
            pcr_select,
            pcr_digest,
        })
    }
}

/// A parsed `TPMT_SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signature<'a> {
    Rsa {
        scheme: u16,
        hash: u16,
        sig: &'a [u8],
    },
    Ecc {
        scheme: u16,
        hash: u16,
        r: &'a [u8],
        s: &'a [u8],
    },
}

impl<'a> Signature<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMT_SIGNATURE");
        let scheme = r.u16("sigAlg")?;
        let sig = match scheme {
            alg::RSASSA | alg::RSAPSS => Signature::Rsa {
                scheme,
                hash: r.u16("hash")?,
                sig: r.tpm2b("sig")?,
            },
            alg::ECDSA | alg::ECDAA | alg::SM2 | alg::ECSCHNORR => Signature::Ecc {
                scheme,
                hash: r.u16("hash")?,
                r: r.tpm2b("signatureR")?,
                s: r.tpm2b("signatureS")?,
            },
            alg::HMAC | alg::NULL => {
                return Err(TpmError::Unsupported(format!(
                    "TPMT_SIGNATURE with sigAlg {scheme:#06x}, expected an asymmetric signature"
                )));
            }
            other => return Err(r.malformed(format!("unknown sigAlg {other:#06x}"))),
        };
        r.finish()?;
        Ok(sig)
    }
}

/// Left-pads a big-endian integer to `len` bytes; `None` when it is longer.
pub(crate) fn left_pad(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let value = strip_leading_zeros(value);
    if value.len() > len {
        return None;
    }
    let mut out = vec![0u8; len - value.len()];
    out.extend_from_slice(value);
    Some(out)
}

pub(crate) fn strip_leading_zeros(value: &[u8]) -> &[u8] {
    let first = value.iter().position(|b| *b != 0).unwrap_or(value.len());
    &value[first..]
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// `TPM2B_PUBLIC` of a restricted RSA-2048 RSASSA-SHA256 signing key
    /// (the shape tss-esapi's `create_ak` produces), modulus all 0xAB.
    pub(crate) fn rsa_ak_public() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&alg::RSA.to_be_bytes());
        t.extend_from_slice(&alg::SHA256.to_be_bytes());
        t.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        t.extend_from_slice(&0u16.to_be_bytes()); // authPolicy
        t.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
        t.extend_from_slice(&alg::RSASSA.to_be_bytes());
        t.extend_from_slice(&alg::SHA256.to_be_bytes());
        t.extend_from_slice(&2048u16.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&256u16.to_be_bytes());
        t.extend_from_slice(&[0xAB; 256]);
        tpm2b(&t).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::rsa_ak_public;
    use super::*;

    #[test]
    fn parses_an_rsa_signing_key() {
        let bytes = rsa_ak_public();
        let area = PublicArea::from_tpm2b(&bytes, "AK").unwrap();
        assert_eq!(area.name_alg, alg::SHA256);
        assert!(area.has(attr::RESTRICTED | attr::SIGN_ENCRYPT | attr::FIXED_TPM));
        assert!(!area.has(attr::DECRYPT));
        match area.params {
            KeyParams::Rsa {
                symmetric,
                scheme,
                key_bits,
                exponent,
                modulus,
            } => {
                assert_eq!(symmetric, SymDef::Null);
                assert_eq!(
                    scheme,
                    Scheme {
                        alg: alg::RSASSA,
                        hash: alg::SHA256
                    }
                );
                assert_eq!((key_bits, exponent, modulus.len()), (2048, 0, 256));
            }
            KeyParams::Ecc { .. } => panic!("parsed as ECC"),
        }
        assert_eq!(area.raw, &bytes[2..]);
    }

    #[test]
    fn refuses_truncated_and_trailing_bytes() {
        let bytes = rsa_ak_public();
        for cut in [0, 1, 2, 10, bytes.len() - 1] {
            let err = PublicArea::from_tpm2b(&bytes[..cut], "AK").unwrap_err();
            assert!(matches!(err, TpmError::Malformed { .. }), "{cut}: {err}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            PublicArea::from_tpm2b(&long, "AK"),
            Err(TpmError::Malformed { .. })
        ));
        // A TPM2B size that claims one byte less leaves the last byte over.
        let mut short = bytes;
        short[1] -= 1;
        assert!(PublicArea::from_tpm2b(&short, "AK").is_err());
    }

    #[test]
    fn refuses_what_is_not_a_quote() {
        assert!(matches!(
            QuoteAttest::parse(&[0, 0, 0, 0, 0x80, 0x18]),
            Err(TpmError::NotAQuote(_))
        ));
        let mut certify = TPM_GENERATED_VALUE.to_be_bytes().to_vec();
        certify.extend_from_slice(&0x8017u16.to_be_bytes());
        assert!(matches!(
            QuoteAttest::parse(&certify),
            Err(TpmError::NotAQuote(_))
        ));
    }

    #[test]
    fn pads_and_strips_integers() {
        assert_eq!(left_pad(&[0, 0, 1], 2), Some(vec![0, 1]));
        assert_eq!(left_pad(&[1, 2, 3], 2), None);
        assert_eq!(strip_leading_zeros(&[0, 0]), &[] as &[u8]);
    }
}
