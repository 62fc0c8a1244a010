//! Interoperability shim for gRPC C-core clients (grpcio, i.e. py-spiffe).
//!
//! Over a Unix socket those clients send the percent-encoded socket path as
//! the HTTP/2 `:authority` (for example `%2Frun%2Fapi.sock`). The `h2` crate
//! under tonic rejects such a value with `RST_STREAM(PROTOCOL_ERROR)`, so
//! every Python workload would fail. A Unix socket has no authority worth
//! checking, so this filter rewrites the `:authority` of every request on the
//! client-to-server byte stream to `localhost` before h2 parses it.
//!
//! Only the HPACK *layout* is walked (representation prefixes, integer
//! lengths, string lengths); no Huffman decoding or table is needed, because
//! the rewrite happens where the field is first sent. When that field is
//! inserted into the HPACK dynamic table, the server's table receives the
//! rewritten value, and later references resolve to it. The new value is
//! never longer than the old one, so the server's table evicts no earlier
//! than the client's and indices stay aligned.

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame we emit (the HTTP/2 default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// Refuse to buffer header blocks larger than this.
const MAX_BLOCK: usize = 64 * 1024;

/// Stream filter state: feed raw client bytes in, take rewritten bytes out.
#[derive(Default)]
pub struct AuthorityRewriter {
    input: Vec<u8>,
    preface_done: bool,
    /// A HEADERS frame waiting for its CONTINUATIONs: (flags, stream id, priority bytes, block).
    pending: Option<(u8, u32, Vec<u8>, Vec<u8>)>,
    /// Set when the byte stream is not HTTP/2 we understand: pass through untouched.
    passthrough: bool,
}

fn read_int(buf: &[u8], pos: &mut usize, prefix_bits: u8) -> Option<usize> {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    let first = *buf.get(*pos)? & mask;
    *pos += 1;
    if first < mask {
        return Some(first as usize);
    }
    let mut value = mask as usize;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        value = value.checked_add(((b & 0x7f) as usize).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Skips one HPACK string; returns (huffman, start, end) of its bytes.
fn read_str(buf: &[u8], pos: &mut usize) -> Option<(bool, usize, usize)> {
    let huffman = *buf.get(*pos)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)?;
    let start = *pos;
    let end = start.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    *pos = end;
    Some((huffman, start, end))
}

/// Returns the header block with every `:authority` value replaced, or
/// `None` if the block cannot be walked (it is then passed on unchanged).
pub fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut pos = 0;
    while pos < block.len() {
        let start = pos;
        let b = block[pos];
        let prefix = if b & 0x80 != 0 {
            read_int(block, &mut pos, 7)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else if b & 0xc0 == 0x40 {
            6u8
        } else if b & 0xe0 == 0x20 {
            read_int(block, &mut pos, 5)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else {
            4u8
        };
        let name_index = read_int(block, &mut pos, prefix)?;
        let is_authority = if name_index == 0 {
            let (huff, s, e) = read_str(block, &mut pos)?;
            !huff && &block[s..e] == b":authority"
        } else {
            name_index == 1
        };
        let name_end = pos;
        let (_, vs, ve) = read_str(block, &mut pos)?;
        out.extend_from_slice(&block[start..name_end]);
        if is_authority {
            let old_len = ve - vs;
            let new: &[u8] = if old_len >= 9 { b"localhost" } else { b"l" };
            if old_len == 0 {
                out.extend_from_slice(&block[name_end..pos]);
            } else {
                // Plain (non-Huffman) literal; 9 bytes always fit the 7-bit prefix.
                out.push(new.len() as u8);
                out.extend_from_slice(new);
            }
        } else {
            out.extend_from_slice(&block[name_end..pos]);
        }
    }
    Some(out)
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

impl AuthorityRewriter {
    /// Bytes held back, waiting for the rest of a frame or header block:
    /// at most one frame header and payload plus one header block.
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.input.len() + self.pending.as_ref().map_or(0, |p| p.2.len() + p.3.len())
    }

    /// Feeds bytes read from the client; appends what the server should see to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.passthrough {
            out.extend_from_slice(data);
            return;
        }
        self.input.extend_from_slice(data);
        let mut pos = 0;
        if !self.preface_done {
            if self.input.len() < PREFACE_LEN {
                return;
            }
            if &self.input[..PREFACE_LEN] != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
                self.passthrough = true;
                out.append(&mut self.input);
                return;
            }
            out.extend_from_slice(&self.input[..PREFACE_LEN]);
            pos = PREFACE_LEN;
            self.preface_done = true;
        }
        while self.input.len() - pos >= FRAME_HEADER {
            let h = &self.input[pos..pos + FRAME_HEADER];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if len > MAX_FRAME {
                // Larger than the server allows (it never raises
                // SETTINGS_MAX_FRAME_SIZE): stop filtering and let h2 reject
                // it, rather than buffer up to 16 MiB for an unattested peer.
                self.passthrough = true;
                if let Some(p) = self.pending.take() {
                    Self::emit_raw(p, out);
                }
                out.extend_from_slice(&self.input[pos..]);
                self.input.clear();
                return;
            }
            if self.input.len() - pos < FRAME_HEADER + len {
                break;
            }
            let kind = h[3];
            let flags = h[4];
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let payload = &self.input[pos + FRAME_HEADER..pos + FRAME_HEADER + len];
            match (kind, self.pending.take()) {
                (HEADERS, None) => {
                    let mut p = 0;
                    let mut end = payload.len();
                    if flags & PADDED != 0 {
                        let pad = payload.first().copied().unwrap_or(0) as usize;
                        p = 1;
                        end = end.saturating_sub(pad);
                    }
                    let prio = if flags & PRIORITY != 0 {
                        payload.get(p..p + 5).map(<[u8]>::to_vec)
                    } else {
                        Some(vec![])
                    };
                    match prio {
                        Some(prio) if p + prio.len() <= end => {
                            let block = payload[p + prio.len()..end].to_vec();
                            let pending = (flags & !PADDED, stream, prio, block);
                            if flags & END_HEADERS != 0 {
                                Self::emit(pending, out);
                            } else {
                                self.pending = Some(pending);
                            }
                        }
                        _ => out.extend_from_slice(&self.input[pos..pos + FRAME_HEADER + len]),
                    }
                }
                (CONTINUATION, Some(mut pending))
                    if stream == pending.1 && pending.3.len() + len <= MAX_BLOCK =>
                {
                    pending.3.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        pending.0 |= END_HEADERS;
                        Self::emit(pending, out);
                    } else {
                        self.pending = Some(pending);
                    }
                }
                (_, Some(pending)) => {
                    // Protocol violation by the client: hand h2 what it sent so it
                    // can reject it itself.
                    Self::emit_raw(pending, out);
                    out.extend_from_slice(&self.input[pos..pos + FRAME_HEADER + len]);
                }
                (_, None) => out.extend_from_slice(&self.input[pos..pos + FRAME_HEADER + len]),
            }
            pos += FRAME_HEADER + len;
        }
        self.input.drain(..pos);
    }

    fn emit((flags, stream, prio, block): (u8, u32, Vec<u8>, Vec<u8>), out: &mut Vec<u8>) {
        let block = rewrite_block(&block).unwrap_or(block);
        Self::emit_raw((flags | END_HEADERS, stream, prio, block), out);
    }

    /// Writes HEADERS (+ CONTINUATION) frames carrying `block`.
    fn emit_raw((flags, stream, prio, block): (u8, u32, Vec<u8>, Vec<u8>), out: &mut Vec<u8>) {
        let end_headers = flags & END_HEADERS;
        let first_room = MAX_FRAME - prio.len();
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        let first_flags = if rest.is_empty() {
            flags
        } else {
            flags & !END_HEADERS
        };
        frame_header(prio.len() + first.len(), HEADERS, first_flags, stream, out);
        out.extend_from_slice(&prio);
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            let f = if tail.is_empty() { end_headers } else { 0 };
            frame_header(chunk.len(), CONTINUATION, f, stream, out);
            out.extend_from_slice(chunk);
            rest = tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// `:method POST` (indexed 3), `:authority` literal-with-indexing by
    /// static name index 1, a custom header with literal name.
    fn block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x41, authority.len() as u8];
        b.extend_from_slice(authority);
        b.extend_from_slice(&[0x00, 0x01, b'x', 0x01, b'y']);
        b
    }

    fn frames(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        frame_header(payload.len(), kind, flags, 1, &mut v);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn rewrites_percent_encoded_socket_path() {
        let out = rewrite_block(&block(b"%2Ftmp%2Fapi.sock")).unwrap();
        assert_eq!(out, block(b"localhost"));
    }

    #[test]
    fn leaves_other_fields_and_indexed_entries_alone() {
        let b = vec![0x82, 0x86, 0x84, 0xbe, 0x20];
        assert_eq!(rewrite_block(&b).unwrap(), b);
    }

    #[test]
    fn filter_handles_split_reads_padding_and_continuation() {
        let blk = block(b"%2Frun%2Fsigil%2Fapi.sock");
        let (a, b) = blk.split_at(4);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frames(0x4, 0, &[0; 6])); // SETTINGS
        wire.extend(frames(HEADERS, PADDED, &padded));
        wire.extend(frames(CONTINUATION, END_HEADERS, b));
        wire.extend(frames(0x0, 0x1, b"data")); // DATA
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        for byte in &wire {
            rw.feed(std::slice::from_ref(byte), &mut out);
        }
        let mut want = PREFACE.to_vec();
        want.extend(frames(0x4, 0, &[0; 6]));
        want.extend(frames(HEADERS, END_HEADERS, &block(b"localhost")));
        want.extend(frames(0x0, 0x1, b"data"));
        assert_eq!(out, want);
    }

    #[test]
    fn oversized_frames_switch_to_pass_through() {
        let mut wire = PREFACE.to_vec();
        let big = vec![0u8; MAX_FRAME + 1];
        wire.extend(frames(0x0, 0, &big));
        wire.extend(frames(
            HEADERS,
            END_HEADERS,
            &block(b"%2Fx%2Fy%2Fz%2Fapi.sock"),
        ));
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        rw.feed(&wire, &mut out);
        assert_eq!(out, wire, "after an oversized frame nothing is rewritten");
        assert!(rw.passthrough);
    }

    #[test]
    fn non_http2_bytes_pass_through() {
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        rw.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn truncated_blocks_are_passed_on_unchanged() {
        assert!(rewrite_block(&[0x41, 0x7f]).is_none());
        assert!(rewrite_block(&[0x41, 0x05, b'a']).is_none());
    }
}
