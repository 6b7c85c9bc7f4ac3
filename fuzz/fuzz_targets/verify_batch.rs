//! Arbitrary bytes split into a batch of adverts: batch verification never panics and
//! agrees with single verification item by item.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peervm_protocol::{Advertisement, Signed, verify_batch};

fuzz_target!(|data: &[u8]| {
    let items: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let results = verify_batch::<Advertisement>(&items);
    for (item, result) in items.iter().zip(&results) {
        assert_eq!(Signed::<Advertisement>::open(item).is_ok(), result.is_ok());
    }
});
