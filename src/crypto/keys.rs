//! Key newtypes. None of them derives `Debug`, `Clone` or `Serialize`: their `Debug`
//! prints `REDACTED`, and the bytes are zeroized when the value is dropped.

use std::collections::BTreeMap;
use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::{aad, open, seal, CryptoError};

pub const KEY_LEN: usize = 32;

/// 256 bits of key material, zeroized on drop.
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    pub fn random() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(k.as_mut());
        SecretKey(k)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        Ok(SecretKey(Zeroizing::new(arr)))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(REDACTED)")
    }
}

/// Argon2id cost parameters, stored beside the salt so a database keeps its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// OWASP's first recommended Argon2id setting (19 MiB, 2 passes, 1 lane) is the floor;
    /// the default spends more memory because unlock happens once per daemon start.
    pub const MINIMUM: KdfParams = KdfParams { m_cost: 19 * 1024, t_cost: 2, p_cost: 1 };
    pub const DEFAULT: KdfParams = KdfParams { m_cost: 64 * 1024, t_cost: 3, p_cost: 1 };

    pub fn check(&self) -> Result<(), CryptoError> {
        let m = Self::MINIMUM;
        if self.m_cost < m.m_cost || self.t_cost < m.t_cost || self.p_cost < m.p_cost {
            return Err(CryptoError::Kdf(format!(
                "Argon2id parameters m={} KiB t={} p={} are below the minimum m={} t={} p={}",
                self.m_cost, self.t_cost, self.p_cost, m.m_cost, m.t_cost, m.p_cost
            )));
        }
        Ok(())
    }
}

/// The root of the key hierarchy. Lives only in memory.
pub struct MasterKey(SecretKey);

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        SecretKey::from_slice(bytes).map(MasterKey)
    }

    /// Derives the master key from a passphrase with Argon2id. Slow on purpose (tens of
    /// milliseconds): call it from `spawn_blocking`.
    pub fn derive(passphrase: &SecretString, salt: &[u8], params: KdfParams) -> Result<Self, CryptoError> {
        params.check()?;
        let p = Params::new(params.m_cost, params.t_cost, params.p_cost, Some(KEY_LEN))
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
            .hash_password_into(passphrase.expose_secret().as_bytes(), salt, out.as_mut())
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(MasterKey(SecretKey(out)))
    }

    /// A blob that only this master key opens; stored in the keyring to detect a wrong key.
    pub fn make_verifier(&self) -> Result<Vec<u8>, CryptoError> {
        seal(&self.0, aad::VERIFIER, aad::VERIFIER)
    }

    pub fn check_verifier(&self, verifier: &[u8]) -> Result<(), CryptoError> {
        match open(&self.0, verifier, aad::VERIFIER) {
            Ok(v) if v.as_slice() == aad::VERIFIER => Ok(()),
            _ => Err(CryptoError::WrongMasterKey),
        }
    }

    fn key(&self) -> &SecretKey {
        &self.0
    }

    /// A key for another purpose, derived with HKDF-SHA256 (`info` names the purpose), so
    /// every daemon holding this master key derives the same one and nothing is stored.
    pub fn derive_subkey(&self, info: &[u8]) -> SecretKey {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        // Cannot fail: 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
        let _ = hkdf::Hkdf::<sha2::Sha256>::new(None, self.0.as_bytes()).expand(info, out.as_mut());
        SecretKey(out)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(REDACTED)")
    }
}

/// A key-encryption key: wraps DEKs; itself stored wrapped by the master key.
pub struct Kek {
    id: i64,
    key: SecretKey,
}

impl Kek {
    /// A fresh KEK and its wrapped form for storage.
    pub fn generate(id: i64, master: &MasterKey) -> Result<(Kek, Vec<u8>), CryptoError> {
        let key = SecretKey::random();
        let wrapped = seal(master.key(), key.as_bytes(), &aad::kek(id))?;
        Ok((Kek { id, key }, wrapped))
    }

    pub fn unwrap(id: i64, wrapped: &[u8], master: &MasterKey) -> Result<Kek, CryptoError> {
        let raw = open(master.key(), wrapped, &aad::kek(id))?;
        Ok(Kek { id, key: SecretKey::from_slice(&raw)? })
    }

    /// This KEK wrapped under another master key (for a passphrase change).
    pub fn wrap_under(&self, master: &MasterKey) -> Result<Vec<u8>, CryptoError> {
        seal(master.key(), self.key.as_bytes(), &aad::kek(self.id))
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).field("key", &"REDACTED").finish()
    }
}

/// The unlocked keys of a daemon: the master key and every KEK, one of them active.
pub struct KeyRing {
    master: MasterKey,
    keks: BTreeMap<i64, Kek>,
    active: i64,
}

impl KeyRing {
    pub fn new(master: MasterKey, keks: Vec<Kek>, active: i64) -> Result<Self, CryptoError> {
        let keks: BTreeMap<i64, Kek> = keks.into_iter().map(|k| (k.id, k)).collect();
        if !keks.contains_key(&active) {
            return Err(CryptoError::UnknownKek(active));
        }
        Ok(KeyRing { master, keks, active })
    }

    pub fn active(&self) -> &Kek {
        // `new` and `add` keep `active` a key of the map.
        &self.keks[&self.active]
    }

    pub fn active_id(&self) -> i64 {
        self.active
    }

    pub fn get(&self, id: i64) -> Option<&Kek> {
        self.keks.get(&id)
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    pub fn contains(&self, id: i64) -> bool {
        self.keks.contains_key(&id)
    }

    /// Makes a KEK already in the ring the one new DEKs are wrapped with.
    pub fn set_active(&mut self, id: i64) -> Result<(), CryptoError> {
        if !self.keks.contains_key(&id) {
            return Err(CryptoError::UnknownKek(id));
        }
        self.active = id;
        Ok(())
    }

    /// Swaps in a new master key (after a rekey has re-wrapped every KEK under it).
    pub fn replace_master(&mut self, master: MasterKey) {
        self.master = master;
    }

    pub fn add(&mut self, kek: Kek, make_active: bool) {
        let id = kek.id;
        self.keks.insert(id, kek);
        if make_active {
            self.active = id;
        }
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("kek_ids", &self.keks.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let master = MasterKey::from_bytes(&[0xAB; 32]).unwrap();
        let (kek, _) = Kek::generate(1, &master).unwrap();
        let ring = KeyRing::new(master, vec![kek], 1).unwrap();
        let text = format!("{:?} {:?} {:?}", ring, ring.active(), SecretKey::from_slice(&[0xAB; 32]).unwrap());
        assert!(!text.to_lowercase().contains("ab, ab") && !text.contains("171"), "{text}");
        assert!(text.contains("REDACTED"));
    }

    #[test]
    fn passphrase_derivation_is_deterministic_and_verifiable() {
        let salt = [1u8; 16];
        let p = KdfParams::MINIMUM;
        let a = MasterKey::derive(&SecretString::from("correct horse"), &salt, p).unwrap();
        let b = MasterKey::derive(&SecretString::from("correct horse"), &salt, p).unwrap();
        let c = MasterKey::derive(&SecretString::from("wrong horse"), &salt, p).unwrap();
        let v = a.make_verifier().unwrap();
        assert_eq!(b.check_verifier(&v), Ok(()));
        assert_eq!(c.check_verifier(&v), Err(CryptoError::WrongMasterKey));
    }

    #[test]
    fn weak_kdf_parameters_are_refused() {
        let weak = KdfParams { m_cost: 1024, t_cost: 1, p_cost: 1 };
        assert!(matches!(MasterKey::derive(&SecretString::from("x"), &[0; 16], weak), Err(CryptoError::Kdf(_))));
    }

    #[test]
    fn kek_wrapping_is_bound_to_its_id() {
        let master = MasterKey::from_bytes(&[3; 32]).unwrap();
        let (_, wrapped) = Kek::generate(5, &master).unwrap();
        assert!(Kek::unwrap(5, &wrapped, &master).is_ok());
        assert_eq!(Kek::unwrap(6, &wrapped, &master).err(), Some(CryptoError::Authentication));
    }
}
