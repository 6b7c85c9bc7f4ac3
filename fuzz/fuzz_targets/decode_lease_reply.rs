//! Arbitrary bytes as a signed LeaseReply: the envelope parser, the signature check and, for
//! inputs that happen to be signed by the fuzz key, the payload decoder. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peervm_protocol::samples;
use peervm_protocol::signed::signing_input;
use peervm_protocol::{LeaseReply, Payload, Signed};

fuzz_target!(|data: &[u8]| {
    let _ = Signed::<LeaseReply>::open(data);
    // Sign the input as a payload so the CBOR decoder and the field checks see it too.
    let key = samples::provider_key();
    let sig = key.sign_raw(&signing_input(<LeaseReply as Payload>::KIND, data));
    let env = Signed::<LeaseReply>::from_parts(data.to_vec(), key.peer_id(), sig).to_bytes();
    if let Ok(v) = Signed::<LeaseReply>::open(&env) {
        // Whatever decodes must survive our own encoder and decoder unchanged.
        let again = peervm_protocol::encoding::to_cbor(v.body());
        let back: LeaseReply = peervm_protocol::encoding::from_cbor(&again, "reply").expect("own encoding decodes");
        assert_eq!(&back, v.body());
    }
});
