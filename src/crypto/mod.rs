//! Envelope encryption: pure functions and key types, no I/O.
//!
//! ```text
//! passphrase --Argon2id--> master key --wraps--> KEKs --wrap--> one DEK per version --encrypts--> value
//! ```
//!
//! Every ciphertext is `format byte || 96-bit random nonce || AES-256-GCM output`, and every
//! one is sealed with associated data naming its place (see [`aad`]), so a blob copied to
//! another row, version or key fails authentication instead of decrypting.

pub mod aad;
mod keys;

pub use keys::{KdfParams, Kek, KeyRing, MasterKey, SecretKey, KEY_LEN};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

/// Format byte of every blob this version writes.
pub const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The authentication tag did not verify: wrong key, tampered bytes, or a blob moved
    /// to a place its associated data does not name.
    #[error("ciphertext failed authentication (tampered, moved, or wrong key)")]
    Authentication,
    #[error("malformed ciphertext: {0}")]
    Malformed(&'static str),
    #[error("unsupported ciphertext format {0}")]
    UnsupportedFormat(u8),
    #[error("key must be {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("unknown key-encryption key {0}")]
    UnknownKek(i64),
    #[error("the master key does not match this database (wrong passphrase or key file)")]
    WrongMasterKey,
    #[error("encryption failed")]
    Encrypt,
}

/// Encrypts `plaintext` under `key`, binding `aad`.
pub fn seal(key: &SecretKey, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let ct =
        cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad }).map_err(|_| CryptoError::Encrypt)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts a blob made by [`seal`]. Lengths are checked before any slicing.
pub fn open(key: &SecretKey, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let (&format, rest) = blob.split_first().ok_or(CryptoError::Malformed("empty"))?;
    if format != FORMAT_V1 {
        return Err(CryptoError::UnsupportedFormat(format));
    }
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("too short"));
    }
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Authentication)
}

/// A credential version as stored: the value encrypted by a fresh DEK, the DEK wrapped by a KEK.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kek_id: i64,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("kek_id", &self.kek_id)
            .field("wrapped_dek_len", &self.wrapped_dek.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Seals `value` as version `version` of credential `name` under the ring's active KEK.
pub fn seal_value(ring: &KeyRing, name: &str, version: u64, value: &[u8]) -> Result<Sealed, CryptoError> {
    let kek = ring.active();
    let dek = SecretKey::random();
    let ciphertext = seal(&dek, value, &aad::value(name, version))?;
    let wrapped_dek = seal(kek.key(), dek.as_bytes(), &aad::dek(name, version, kek.id()))?;
    Ok(Sealed { kek_id: kek.id(), wrapped_dek, ciphertext })
}

/// Unwraps the DEK of version `version` of `name`; fails if the blob belongs elsewhere.
pub fn unwrap_dek(
    ring: &KeyRing,
    name: &str,
    version: u64,
    kek_id: i64,
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    let kek = ring.get(kek_id).ok_or(CryptoError::UnknownKek(kek_id))?;
    let raw = open(kek.key(), wrapped, &aad::dek(name, version, kek_id))?;
    SecretKey::from_slice(&raw)
}

/// Decrypts version `version` of `name`.
pub fn open_value(
    ring: &KeyRing,
    name: &str,
    version: u64,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let dek = unwrap_dek(ring, name, version, sealed.kek_id, &sealed.wrapped_dek)?;
    open(&dek, &sealed.ciphertext, &aad::value(name, version))
}

/// Re-wraps the DEK of version `version` of `name` from KEK `from` to KEK `to`; the
/// value ciphertext is untouched (it does not name the KEK).
pub fn rewrap_dek(
    ring: &KeyRing,
    name: &str,
    version: u64,
    from: i64,
    wrapped: &[u8],
    to: i64,
) -> Result<Vec<u8>, CryptoError> {
    let dek = unwrap_dek(ring, name, version, from, wrapped)?;
    let kek = ring.get(to).ok_or(CryptoError::UnknownKek(to))?;
    seal(kek.key(), dek.as_bytes(), &aad::dek(name, version, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let master = MasterKey::from_bytes(&[7u8; 32]).unwrap_or_else(|_| unreachable!());
        let (kek, _) = Kek::generate(1, &master).unwrap_or_else(|_| unreachable!());
        KeyRing::new(master, vec![kek], 1).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn round_trip() {
        let ring = ring();
        let s = seal_value(&ring, "a/b", 3, b"hunter2").unwrap();
        assert_eq!(open_value(&ring, "a/b", 3, &s).unwrap().as_slice(), b"hunter2");
        assert_eq!(s.ciphertext.len(), 7 + SEAL_OVERHEAD);
    }

    #[test]
    fn moved_or_tampered_blobs_fail_authentication() {
        let ring = ring();
        let s = seal_value(&ring, "a/b", 3, b"hunter2").unwrap();
        assert_eq!(open_value(&ring, "a/c", 3, &s), Err(CryptoError::Authentication));
        assert_eq!(open_value(&ring, "a/b", 4, &s), Err(CryptoError::Authentication));
        for i in 0..s.ciphertext.len() {
            let mut t = s.clone();
            t.ciphertext[i] ^= 0x01;
            assert!(open_value(&ring, "a/b", 3, &t).is_err(), "flip at byte {i} went unnoticed");
        }
        let mut t = s.clone();
        let last = t.wrapped_dek.len() - 1;
        t.wrapped_dek[last] ^= 0x80;
        assert_eq!(open_value(&ring, "a/b", 3, &t), Err(CryptoError::Authentication));
        // Another version's ciphertext under this version's DEK.
        let other = seal_value(&ring, "a/b", 4, b"hunter3").unwrap();
        let mixed = Sealed { ciphertext: other.ciphertext, ..s };
        assert_eq!(open_value(&ring, "a/b", 3, &mixed), Err(CryptoError::Authentication));
    }

    #[test]
    fn short_or_unknown_blobs_are_rejected_before_slicing() {
        let key = SecretKey::random();
        assert_eq!(open(&key, &[], b""), Err(CryptoError::Malformed("empty")));
        assert_eq!(open(&key, &[FORMAT_V1, 1, 2], b""), Err(CryptoError::Malformed("too short")));
        assert_eq!(open(&key, &[9; 40], b""), Err(CryptoError::UnsupportedFormat(9)));
    }

    #[test]
    fn nonces_are_not_reused() {
        let key = SecretKey::random();
        let a = seal(&key, b"x", b"").unwrap();
        let b = seal(&key, b"x", b"").unwrap();
        assert_ne!(a[1..13], b[1..13]);
    }

    #[test]
    fn rewrap_keeps_the_value_ciphertext() {
        let mut ring = ring();
        let s = seal_value(&ring, "n", 1, b"v").unwrap();
        let (kek2, _) = Kek::generate(2, ring.master()).unwrap();
        ring.add(kek2, true);
        let wrapped = rewrap_dek(&ring, "n", 1, s.kek_id, &s.wrapped_dek, 2).unwrap();
        let r = Sealed { kek_id: 2, wrapped_dek: wrapped, ciphertext: s.ciphertext.clone() };
        assert_eq!(open_value(&ring, "n", 1, &r).unwrap().as_slice(), b"v");
        // The re-wrapped DEK is bound to its new KEK and to its place.
        assert_eq!(open_value(&ring, "n", 1, &Sealed { kek_id: 1, ..r.clone() }), Err(CryptoError::Authentication));
        assert_eq!(open_value(&ring, "m", 1, &r), Err(CryptoError::Authentication));
        assert_eq!(rewrap_dek(&ring, "n", 1, 1, &s.wrapped_dek, 9), Err(CryptoError::UnknownKek(9)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn key(seed: [u8; 32]) -> SecretKey {
            SecretKey::from_slice(&seed).unwrap_or_else(|_| unreachable!("32 bytes"))
        }

        proptest! {
            #[test]
            fn random_blobs_never_open_and_never_panic(
                seed in any::<[u8; 32]>(),
                blob in prop::collection::vec(any::<u8>(), 0..200),
                aad in prop::collection::vec(any::<u8>(), 0..40),
            ) {
                prop_assert!(open(&key(seed), &blob, &aad).is_err());
            }

            #[test]
            fn seal_then_open_round_trips(
                seed in any::<[u8; 32]>(),
                plaintext in prop::collection::vec(any::<u8>(), 0..2048),
                aad in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let k = key(seed);
                let blob = seal(&k, &plaintext, &aad).unwrap_or_else(|_| unreachable!());
                prop_assert_eq!(blob.len(), plaintext.len() + SEAL_OVERHEAD);
                prop_assert_eq!(open(&k, &blob, &aad).map(|p| p.to_vec()), Ok(plaintext));
            }

            #[test]
            fn any_flipped_bit_or_cut_fails_to_open(
                seed in any::<[u8; 32]>(),
                plaintext in prop::collection::vec(any::<u8>(), 0..256),
                aad in prop::collection::vec(any::<u8>(), 1..64),
                at in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let k = key(seed);
                let blob = seal(&k, &plaintext, &aad).unwrap_or_else(|_| unreachable!());
                let mut flipped = blob.clone();
                let i = at.index(flipped.len());
                flipped[i] ^= 1 << bit;
                prop_assert!(open(&k, &flipped, &aad).is_err(), "bit {} of byte {} went unnoticed", bit, i);
                let mut other_aad = aad.clone();
                let j = at.index(other_aad.len());
                other_aad[j] ^= 1 << bit;
                prop_assert_eq!(open(&k, &blob, &other_aad), Err(CryptoError::Authentication));
                prop_assert!(open(&k, &blob[..i], &aad).is_err(), "a blob cut to {} bytes opened", i);
            }

            #[test]
            fn sealed_values_open_only_in_their_place(
                plaintext in prop::collection::vec(any::<u8>(), 1..256),
                version in 1u64..u64::MAX,
                name in "[a-z0-9/]{1,20}",
                at in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let ring = ring();
                let s = seal_value(&ring, &name, version, &plaintext).unwrap_or_else(|_| unreachable!());
                prop_assert_eq!(open_value(&ring, &name, version, &s).map(|p| p.to_vec()), Ok(plaintext));
                prop_assert!(open_value(&ring, &name, version - 1, &s).is_err());
                let moved = format!("{}x", name);
                prop_assert!(open_value(&ring, &moved, version, &s).is_err());
                let mut t = s.clone();
                let i = at.index(t.wrapped_dek.len());
                t.wrapped_dek[i] ^= 1 << bit;
                prop_assert!(open_value(&ring, &name, version, &t).is_err());
                let mut t = s.clone();
                let i = at.index(t.ciphertext.len());
                t.ciphertext[i] ^= 1 << bit;
                prop_assert!(open_value(&ring, &name, version, &t).is_err());
            }
        }
    }
}
