//! Arbitrary bytes as a signed Advertisement: the envelope parser, the signature check and, for
//! inputs that happen to be signed by the fuzz key, the payload decoder. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::signed::signing_input;
use peervm_protocol::{Advertisement, Payload, Signed};

fuzz_target!(|data: &[u8]| {
    let _ = Signed::<Advertisement>::open(data);
    // Sign the input as a payload so the CBOR decoder and the field checks see it too.
    let key = samples::provider_key();
    let sig = key.sign_raw(&signing_input(<Advertisement as Payload>::KIND, data));
    let env = Signed::<Advertisement>::from_parts(data.to_vec(), key.peer_id(), sig).to_bytes();
    if let Ok(v) = Signed::<Advertisement>::open(&env) {
        let _ = v.body().check_acceptable(T0_UNIX_MS, Some(1));
    }
});
