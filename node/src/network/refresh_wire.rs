//! `/peervm/refresh/1` on the wire (docs/protocol.md, section 9a): one request carries a
//! batch of 24-byte refresh records (section 4a), the answer is `"Ok"` or `"RateLimited"`.
//! What the records mean, and whether they are accepted, is `peervm_protocol::refresh`'s
//! and the store's business; the event loop's `refresh` module moves them.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use super::sync::Envelope;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/refresh/1");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshRequest {
    pub version: u32,
    /// 1 to 4,096 records of 24 bytes, concatenated, as one CBOR byte string.
    pub records: Envelope,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefreshResponse {
    Ok,
    /// The server throttled this peer (docs/protocol.md, section 10.4).
    RateLimited,
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use libp2p::request_response::Codec;
    use libp2p::request_response::cbor::codec::Codec as CborCodec;

    use super::*;

    fn request_bytes(request: RefreshRequest) -> Vec<u8> {
        let mut codec = CborCodec::<RefreshRequest, RefreshResponse>::default();
        let mut out = futures::io::Cursor::new(Vec::new());
        block_on(codec.write_request(&PROTOCOL, &mut out, request)).expect("encode");
        out.into_inner()
    }

    fn response_bytes(response: RefreshResponse) -> Vec<u8> {
        let mut codec = CborCodec::<RefreshRequest, RefreshResponse>::default();
        let mut out = futures::io::Cursor::new(Vec::new());
        block_on(codec.write_response(&PROTOCOL, &mut out, response)).expect("encode");
        out.into_inner()
    }

    /// The frames are the ones section 9a spells out, byte for byte, through the codec
    /// the swarm uses: a second implementation writes them from the document.
    #[test]
    fn frames_are_the_ones_the_protocol_document_gives() {
        let mut want = vec![0xa2, 0x67];
        want.extend_from_slice(b"version");
        want.extend_from_slice(&[0x01, 0x67]);
        want.extend_from_slice(b"records");
        want.extend_from_slice(&[0x58, 24]);
        want.extend_from_slice(&[0xab; 24]);
        assert_eq!(request_bytes(RefreshRequest { version: 1, records: Envelope(vec![0xab; 24]) }), want);

        for (response, text) in [(RefreshResponse::Ok, "Ok"), (RefreshResponse::RateLimited, "RateLimited")] {
            let mut want = vec![0x60 + text.len() as u8];
            want.extend_from_slice(text.as_bytes());
            assert_eq!(response_bytes(response), want, "{text}");
        }
    }
}
