//! IMA measurement logs (the `ima-ng` template): parsing the kernel's
//! binary log and replaying it against a quoted PCR 10, so that the file
//! digests it lists can be trusted as far as the TPM quote is.
//!
//! Two uses: the agent's `ima` workload attestor replays the log against
//! the PCR it reads itself ([`verify_log`], the whole log must match), and
//! the server replays the log a TPM agent sends with its quote
//! ([`verify_quoted_prefix`], Keylime's rule: the log is read after the
//! quote, so it may have grown; the entries up to the point where the
//! replay equals the quoted PCR 10 are vouched for, later ones are ignored).
//!
//! Binary log entry (host byte order, little-endian here):
//! `u32 pcr | template digest (20 bytes SHA-1 log, 32 bytes SHA-256 log) |
//! u32 name length | name ("ima-ng") | u32 data length | data`, where
//! `data` is `u32 len | "<algo>:\0" + file digest` then `u32 len | path\0`.
//! The template digest is the bank's hash of `data`; replay extends PCR 10
//! with each template digest (`pcr = H(pcr || digest)`), except that a
//! violation entry (all-zero digest) is extended as all-ones.

use std::collections::BTreeSet;

/// Largest log an agent sends with its quote (it travels in one gRPC
/// message of at most 1 MiB; about 7,000 ima-ng SHA-256 entries).
pub const MAX_QUOTED_LOG_BYTES: usize = 960 * 1024;

/// A PCR bank the log was kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImaBank {
    /// `binary_runtime_measurements` (SHA-1 template digests).
    Sha1,
    /// `binary_runtime_measurements_sha256`.
    Sha256,
}

impl ImaBank {
    fn len(self) -> usize {
        match self {
            ImaBank::Sha1 => 20,
            ImaBank::Sha256 => 32,
        }
    }

    fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        let alg = match self {
            ImaBank::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            ImaBank::Sha256 => &ring::digest::SHA256,
        };
        let mut ctx = ring::digest::Context::new(alg);
        for p in parts {
            ctx.update(p);
        }
        ctx.finish().as_ref().to_vec()
    }
}

/// The log is malformed or does not match the quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImaError {
    /// The binary log ends inside an entry or has impossible lengths.
    #[error("IMA log entry {entry}: truncated or malformed ({what})")]
    Malformed {
        /// Zero-based entry index.
        entry: usize,
        /// Which field.
        what: &'static str,
    },
    /// An entry's template digest is not the hash of its template data
    /// (the entry was altered after it was measured).
    #[error("IMA log entry {0}: template digest does not match its data")]
    TemplateDigest(usize),
    /// Replaying the log does not give the quoted PCR 10.
    #[error(
        "IMA log does not replay to the quoted PCR 10 (log gives {replayed}, quote has {quoted})"
    )]
    PcrMismatch {
        /// Hex of the replayed value.
        replayed: String,
        /// Hex of the quoted value.
        quoted: String,
    },
}

/// A log that replayed to the quoted PCR: the SHA-256 file digests it
/// measured (lowercase hex). Only [`verify_log`] builds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedImaLog {
    digests: BTreeSet<String>,
    entries: usize,
}

impl VerifiedImaLog {
    /// Whether a file with this SHA-256 (lowercase hex) was measured.
    pub fn contains(&self, sha256_hex: &str) -> bool {
        self.digests.contains(sha256_hex)
    }

    /// Number of entries replayed.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The SHA-256 file digests (lowercase hex), sorted.
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        self.digests.iter().map(String::as_str)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    entry: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ImaError> {
        if self.b.len() < n {
            return Err(ImaError::Malformed {
                entry: self.entry,
                what,
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u32(&mut self, what: &'static str) -> Result<usize, ImaError> {
        let b = self.take(4, what)?;
        let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(v).map_err(|_| ImaError::Malformed {
            entry: self.entry,
            what,
        })
    }
}

/// Parses the `ima-ng` data of one entry: the file digest when it is
/// SHA-256 (other algorithms are replayed but list no digest).
fn ima_ng_sha256(data: &[u8], entry: usize) -> Result<Option<String>, ImaError> {
    let mut r = Reader { b: data, entry };
    let n = r.u32("digest length")?;
    let d = r.take(n, "digest")?;
    let n = r.u32("path length")?;
    r.take(n, "path")?;
    Ok(d.strip_prefix(b"sha256:\0")
        .filter(|x| x.len() == 32)
        .map(hex::encode))
}

/// Replays a binary IMA log for `bank` and compares it with `quoted_pcr10`
/// (the PCR 10 value of a verified quote in the same bank).
pub fn verify_log(
    log: &[u8],
    bank: ImaBank,
    quoted_pcr10: &[u8],
) -> Result<VerifiedImaLog, ImaError> {
    replay_log(log, bank, quoted_pcr10, false)
}

/// Replays a binary IMA log read after a quote: the shortest prefix whose
/// replay equals `quoted_pcr10` is verified and its digests returned;
/// entries after it (measured after the quote, or forged) are not parsed
/// and vouch for nothing. No prefix matching is [`ImaError::PcrMismatch`].
pub fn verify_quoted_prefix(
    log: &[u8],
    bank: ImaBank,
    quoted_pcr10: &[u8],
) -> Result<VerifiedImaLog, ImaError> {
    replay_log(log, bank, quoted_pcr10, true)
}

fn replay_log(
    log: &[u8],
    bank: ImaBank,
    quoted_pcr10: &[u8],
    prefix: bool,
) -> Result<VerifiedImaLog, ImaError> {
    let mut pcr = vec![0u8; bank.len()];
    let mut digests = BTreeSet::new();
    let mut r = Reader { b: log, entry: 0 };
    while !r.b.is_empty() {
        if prefix && pcr == quoted_pcr10 {
            break;
        }
        let pcr_index = r.u32("pcr")?;
        let digest = r.take(bank.len(), "template digest")?;
        let n = r.u32("template name length")?;
        let name = r.take(n, "template name")?;
        let n = r.u32("template data length")?;
        let data = r.take(n, "template data")?;
        if pcr_index == 10 {
            let violation = digest.iter().all(|b| *b == 0);
            let extend = if violation {
                vec![0xffu8; bank.len()]
            } else {
                if bank.hash(&[data]) != digest {
                    return Err(ImaError::TemplateDigest(r.entry));
                }
                if name == b"ima-ng"
                    && let Some(d) = ima_ng_sha256(data, r.entry)?
                {
                    digests.insert(d);
                }
                digest.to_vec()
            };
            pcr = bank.hash(&[&pcr, &extend]);
        }
        r.entry += 1;
    }
    if pcr != quoted_pcr10 {
        return Err(ImaError::PcrMismatch {
            replayed: hex::encode(&pcr),
            quoted: hex::encode(quoted_pcr10),
        });
    }
    Ok(VerifiedImaLog {
        digests,
        entries: r.entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One ima-ng entry for `path` with SHA-256 file digest `file`.
    fn entry(bank: ImaBank, file: &[u8; 32], path: &str) -> Vec<u8> {
        let mut d = b"sha256:\0".to_vec();
        d.extend_from_slice(file);
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        let mut data = Vec::new();
        data.extend_from_slice(&(d.len() as u32).to_le_bytes());
        data.extend_from_slice(&d);
        data.extend_from_slice(&(p.len() as u32).to_le_bytes());
        data.extend_from_slice(&p);
        let mut e = 10u32.to_le_bytes().to_vec();
        e.extend_from_slice(&bank.hash(&[&data]));
        e.extend_from_slice(&6u32.to_le_bytes());
        e.extend_from_slice(b"ima-ng");
        e.extend_from_slice(&(data.len() as u32).to_le_bytes());
        e.extend_from_slice(&data);
        e
    }

    fn replay(bank: ImaBank, log: &[u8]) -> Vec<u8> {
        // Independent replay: the template digests in order.
        let mut pcr = vec![0u8; bank.len()];
        let mut r = Reader { b: log, entry: 0 };
        while !r.b.is_empty() {
            r.u32("pcr").unwrap();
            let d = r.take(bank.len(), "d").unwrap().to_vec();
            let n = r.u32("n").unwrap();
            r.take(n, "n").unwrap();
            let n = r.u32("n").unwrap();
            r.take(n, "n").unwrap();
            let ext = if d.iter().all(|b| *b == 0) {
                vec![0xff; bank.len()]
            } else {
                d
            };
            pcr = bank.hash(&[&pcr, &ext]);
        }
        pcr
    }

    #[test]
    fn a_log_that_replays_to_the_quote_yields_its_digests() {
        for bank in [ImaBank::Sha1, ImaBank::Sha256] {
            let mut log = entry(bank, &[1; 32], "boot_aggregate");
            log.extend(entry(bank, &[0xab; 32], "/usr/bin/triage"));
            let pcr = replay(bank, &log);
            let v = verify_log(&log, bank, &pcr).unwrap();
            assert_eq!(v.entries(), 2);
            assert!(v.contains(&"ab".repeat(32)));
            assert!(!v.contains(&"cd".repeat(32)));
        }
    }

    #[test]
    fn a_quoted_prefix_is_verified_and_later_entries_vouch_for_nothing() {
        let bank = ImaBank::Sha256;
        let mut log = entry(bank, &[1; 32], "boot_aggregate");
        log.extend(entry(bank, &[0xab; 32], "/usr/bin/triage"));
        let pcr = replay(bank, &log);
        let mut longer = log.clone();
        longer.extend(entry(bank, &[0xcd; 32], "/tmp/later"));
        let v = verify_quoted_prefix(&longer, bank, &pcr).unwrap();
        assert_eq!(v.entries(), 2);
        assert!(v.contains(&"ab".repeat(32)));
        assert!(!v.contains(&"cd".repeat(32)));
        // A log the quote does not cover at all.
        let other = entry(bank, &[0xee; 32], "/x");
        let e = verify_quoted_prefix(&other, bank, &pcr).unwrap_err();
        assert!(matches!(e, ImaError::PcrMismatch { .. }), "{e}");
    }

    #[test]
    fn tampered_truncated_or_unquoted_logs_are_refused() {
        let bank = ImaBank::Sha256;
        let mut log = entry(bank, &[1; 32], "boot_aggregate");
        log.extend(entry(bank, &[0xab; 32], "/usr/bin/triage"));
        let pcr = replay(bank, &log);
        // A digest swapped in the data: the template digest no longer matches.
        let mut bad = log.clone();
        let at = bad.len() - 40;
        bad[at] ^= 1;
        assert!(matches!(
            verify_log(&bad, bank, &pcr),
            Err(ImaError::TemplateDigest(1))
        ));
        // An entry added that the TPM never saw.
        let mut longer = log.clone();
        longer.extend(entry(bank, &[0xcd; 32], "/tmp/evil"));
        let e = verify_log(&longer, bank, &pcr).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not replay to the quoted PCR 10"),
            "{e}"
        );
        // Truncated.
        let e = verify_log(&log[..log.len() - 3], bank, &pcr).unwrap_err();
        assert!(matches!(e, ImaError::Malformed { entry: 1, .. }), "{e}");
    }
}
