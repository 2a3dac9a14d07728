//! Length-prefixed frames on a byte stream: a big-endian `u32` length, then the body (the
//! layout of tokio-util's `LengthDelimitedCodec`, which this replaces).
//!
//! `LengthDelimitedCodec` reserves exactly the body it lacks (and `bytes` caps the
//! buffer's view there), and once it has split a body off it reserves room for the next
//! length while the body still shares the buffer, which then moves to a new allocation.
//! A reader kept its buffer for frames of a few MB only in name: 45 large allocations to
//! read 63 such frames (`tests/frame_buffers.rs`), each faulted in afresh. This codec
//! reserves room to read ahead past a body, and nothing once a body is split off.

use super::FrameError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The length prefix of a frame.
pub(super) const LENGTH_PREFIX: usize = 4;

/// What a read asks room for beyond the bytes a frame still lacks: the next frames' length
/// prefixes and small bodies arrive in the same read.
pub(super) const READ_AHEAD: usize = 8 << 10;

#[derive(Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// The length of the body being read, once its prefix was.
    body: Option<usize>,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame,
            body: None,
        }
    }

    pub fn set_max_frame_length(&mut self, max: usize) {
        self.max_frame = max;
    }

    /// A body of `len` bytes is within the limit, read or written.
    fn check(&self, len: usize) -> Result<(), FrameError> {
        match len > self.max_frame {
            true => Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            }),
            false => Ok(()),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let body = match self.body {
            Some(body) => body,
            None if src.len() < LENGTH_PREFIX => {
                src.reserve(LENGTH_PREFIX - src.len() + READ_AHEAD);
                return Ok(None);
            }
            None => {
                let body = src.get_u32() as usize;
                self.check(body)?;
                self.body = Some(body);
                body
            }
        };
        if src.len() < body {
            src.reserve(body - src.len() + READ_AHEAD);
            return Ok(None);
        }
        self.body = None;
        Ok(Some(src.split_to(body)))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.check(body.len())?;
        dst.reserve(LENGTH_PREFIX + body.len());
        // Fits: the limit is below u32::MAX (MAX_FRAME_SIZE).
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut codec = FrameCodec::new(1 << 20);
        let mut out = BytesMut::new();
        for body in bodies {
            codec
                .encode(Bytes::copy_from_slice(body), &mut out)
                .unwrap();
        }
        out.to_vec()
    }

    #[test]
    fn frames_come_back_whole_however_the_bytes_arrive() {
        let bodies: [&[u8]; 4] = [b"first", b"", &[7u8; 20_000], b"last"];
        let wire = framed(&bodies);
        for step in [1, 3, 4, 5, 4096, wire.len()] {
            let mut codec = FrameCodec::new(1 << 20);
            let mut buffer = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                buffer.extend_from_slice(piece);
                while let Some(frame) = codec.decode(&mut buffer).unwrap() {
                    got.push(frame.to_vec());
                }
            }
            let expected: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_vec()).collect();
            assert_eq!(got, expected, "arriving {step} bytes at a time");
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn a_length_over_the_limit_is_an_error_before_the_body_is_read() {
        let mut codec = FrameCodec::new(10);
        let mut buffer = BytesMut::from(&11u32.to_be_bytes()[..]);
        let error = codec.decode(&mut buffer).unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { len: 11, max: 10 }));
        let sent = codec.encode(Bytes::from_static(&[0; 11]), &mut BytesMut::new());
        assert!(matches!(
            sent,
            Err(FrameError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn a_body_awaited_leaves_room_to_read_past_it() {
        let mut codec = FrameCodec::new(1 << 20);
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&100_000u32.to_be_bytes());
        buffer.extend_from_slice(&[1; 10]);
        assert!(codec.decode(&mut buffer).unwrap().is_none());
        assert!(buffer.capacity() >= 100_000 + READ_AHEAD);
    }
}
