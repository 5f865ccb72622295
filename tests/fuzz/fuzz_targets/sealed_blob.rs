//! Arbitrary bytes as a sealed blob: opening never panics and never succeeds; a blob
//! sealed from the same bytes opens to them, and fails after any one-bit flip.
#![no_main]

use credvault::crypto::{open, seal, SecretKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_slice(&[0x42; 32]).expect("32 bytes");
    assert!(open(&key, data, b"fuzz/aad").is_err(), "random bytes opened");
    let blob = seal(&key, data, b"fuzz/aad").expect("seal");
    assert_eq!(open(&key, &blob, b"fuzz/aad").expect("round trip").as_slice(), data);
    if !data.is_empty() {
        let bit = usize::from(data[0]) % (blob.len() * 8);
        let mut flipped = blob.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(open(&key, &flipped, b"fuzz/aad").is_err(), "flipped bit {bit} opened");
    }
});
