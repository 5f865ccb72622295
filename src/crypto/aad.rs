//! Associated data: what each ciphertext is bound to. Changing any of these strings
//! makes existing data unreadable, so they are versioned like the blob format.

/// The value of version `version` of `name`. The KEK id is deliberately not part of it:
/// KEK rotation re-wraps only the DEK, and the DEK's own AAD names the KEK.
pub fn value(name: &str, version: u64) -> Vec<u8> {
    place(b"credvault/v1/value", name, version, None)
}

/// The wrapped DEK of version `version` of `name`, under KEK `kek_id`.
pub fn dek(name: &str, version: u64, kek_id: i64) -> Vec<u8> {
    place(b"credvault/v1/dek", name, version, Some(kek_id))
}

/// A KEK wrapped by the master key.
pub fn kek(kek_id: i64) -> Vec<u8> {
    let mut out = b"credvault/v1/kek\0".to_vec();
    out.extend_from_slice(&kek_id.to_be_bytes());
    out
}

/// The blob that proves a master key is the one this database was made with.
pub const VERIFIER: &[u8] = b"credvault/v1/verifier";

fn place(domain: &[u8], name: &str, version: u64, kek_id: Option<i64>) -> Vec<u8> {
    // Length-prefixed name: no two (name, version) pairs share an encoding.
    let mut out = Vec::with_capacity(domain.len() + name.len() + 24);
    out.extend_from_slice(domain);
    out.push(0);
    out.extend_from_slice(&(name.len() as u64).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    if let Some(id) = kek_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out
}
