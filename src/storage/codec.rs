//! Record framing shared by every file kvnode writes: length, checksums, format version, and the
//! bincode configuration for payloads.
//!
//! A frame is
//!
//! ```text
//! 0        4          8            12        13
//! | len u32 | body_crc | header_crc | version | payload (len - 1 bytes) ...
//! ```
//!
//! All integers are little-endian. `len` counts the body (version byte + payload); `body_crc` is
//! the CRC-32 of the body and `header_crc` the CRC-32 of the first eight bytes, so a flipped bit
//! in the length is caught before the length is trusted. Decoding never panics on any input: it
//! reports what is wrong and the caller decides whether that is a torn tail or corruption.

use bincode::config::{Configuration, standard};

/// Bytes before the body of a frame.
pub const FRAME_HEADER_LEN: usize = 12;

/// The largest body a frame may carry. Larger lengths are treated as damage, never allocated.
pub const MAX_FRAME_BODY: u32 = 256 * 1024 * 1024;

/// The bincode configuration for every payload kvnode stores (varint integers, little-endian).
pub fn bincode_config() -> Configuration {
    standard()
}

/// Appends one frame holding `payload` at format `version` to `out`.
pub fn encode_frame(version: u8, payload: &[u8], out: &mut Vec<u8>) {
    encode_frame_with(version, out, |out| out.extend_from_slice(payload));
}

/// Appends one frame to `out` whose payload is whatever `write_payload` appends (no copy).
pub fn encode_frame_with(version: u8, out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    out.push(version);
    write_payload(out);
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    assert!(
        body_len <= MAX_FRAME_BODY as usize,
        "frame body of {body_len} bytes exceeds the {MAX_FRAME_BODY}-byte limit"
    );
    let body_crc = crc32fast::hash(&out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..start + 8]);
    out[start + 8..start + 12].copy_from_slice(&header_crc.to_le_bytes());
}

/// What [`decode_frame`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole, checksummed frame. `len` is the frame's total size including the header.
    Valid {
        /// Format version byte of the body.
        version: u8,
        /// The payload after the version byte.
        payload: &'a [u8],
        /// Total bytes the frame occupies.
        len: usize,
    },
    /// The buffer ends inside the header or inside the body the header announces.
    Incomplete,
    /// The header's own checksum does not match (the length cannot be trusted).
    BadHeader,
    /// The header is intact but the body's checksum does not match.
    BadBody,
}

/// Decodes the frame that starts at the beginning of `buf`.
pub fn decode_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let body_crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let header_crc = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[0..8]) != header_crc || len == 0 || len > MAX_FRAME_BODY {
        return Frame::BadHeader;
    }
    let total = FRAME_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let body = &buf[FRAME_HEADER_LEN..total];
    if crc32fast::hash(body) != body_crc {
        return Frame::BadBody;
    }
    Frame::Valid {
        version: body[0],
        payload: &body[1..],
        len: total,
    }
}

/// Encodes `value` with kvnode's bincode configuration (native bincode derive).
pub fn encode<T: bincode::Encode>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(value, &mut out);
    out
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: bincode::Encode>(value: &T, out: &mut Vec<u8>) {
    bincode::encode_into_std_write(value, out, bincode_config())
        .expect("encoding into a Vec cannot fail");
}

/// Decodes a whole `bytes` buffer into `T`; trailing bytes are an error.
pub fn decode<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) =
        bincode::decode_from_slice(bytes, bincode_config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the payload",
            bytes.len() - used
        ));
    }
    Ok(value)
}

/// Encodes a serde value (openraft's types) with kvnode's bincode configuration.
pub fn encode_serde<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .expect("encoding a serde value into a Vec cannot fail")
}

/// Decodes a serde value from a whole buffer; trailing bytes are an error.
pub fn decode_serde<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the payload",
            bytes.len() - used
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trips() {
        let mut buf = Vec::new();
        encode_frame(3, b"hello", &mut buf);
        encode_frame(3, b"", &mut buf);
        match decode_frame(&buf) {
            Frame::Valid {
                version,
                payload,
                len,
            } => {
                assert_eq!((version, payload), (3, &b"hello"[..]));
                assert_eq!(
                    decode_frame(&buf[len..]),
                    Frame::Valid {
                        version: 3,
                        payload: b"",
                        len: FRAME_HEADER_LEN + 1
                    }
                );
            }
            other => panic!("expected a valid frame, got {other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_caught() {
        let mut buf = Vec::new();
        encode_frame(1, b"some payload bytes", &mut buf);
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut]), Frame::Incomplete, "cut at {cut}");
        }
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut damaged = buf.clone();
                damaged[i] ^= 1 << bit;
                let got = decode_frame(&damaged);
                assert!(
                    matches!(got, Frame::BadHeader | Frame::BadBody | Frame::Incomplete),
                    "flip of bit {bit} in byte {i} went unnoticed: {got:?}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_round_trip(version: u8, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = Vec::new();
            encode_frame(version, &payload, &mut buf);
            prop_assert_eq!(decode_frame(&buf), Frame::Valid { version, payload: &payload, len: buf.len() });
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
        }
    }
}
