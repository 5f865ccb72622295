//! What the cache holds for a credential: its current version, sealed or memoized, and
//! what that costs in memory.

use std::fmt;

use zeroize::Zeroizing;

use super::Entry;
use crate::crypto::Sealed;
use crate::store::{VersionInfo, VersionRow};

/// A credential's current version as cached: its version metadata and either its sealed
/// bytes or, once read under [`super::PlaintextPolicy::Memoize`], its plaintext alone.
///
/// Entries are immutable. Memoizing replaces the entry with a plaintext-only one
/// ([`super::Cache::memoize`]), so a memoized credential does not also keep its ciphertext and
/// wrapped DEK, and readers holding the sealed entry are never disturbed.
pub struct CachedVersion {
    pub info: VersionInfo,
    body: Body,
}

enum Body {
    /// The sealed value (`None` if this version was destroyed).
    Sealed(Option<Sealed>),
    /// The decrypted value, wiped when the entry drops.
    Plain(Zeroizing<Box<[u8]>>),
}

impl CachedVersion {
    pub fn new(row: VersionRow) -> Self {
        CachedVersion { info: row.info, body: Body::Sealed(row.sealed) }
    }

    pub(super) fn memoized(info: VersionInfo, plaintext: &[u8]) -> Self {
        // A fresh exact-size allocation: shrinking the caller's buffer in place could
        // leave a copy of the value behind in freed memory.
        CachedVersion { info, body: Body::Plain(Zeroizing::new(Box::from(plaintext))) }
    }

    pub fn version(&self) -> u64 {
        self.info.version
    }

    /// The sealed value, unless the entry holds plaintext only (or the version was
    /// destroyed).
    pub fn sealed(&self) -> Option<&Sealed> {
        match &self.body {
            Body::Sealed(s) => s.as_ref(),
            Body::Plain(_) => None,
        }
    }

    /// The memoized plaintext, if a previous read kept it.
    pub fn plaintext(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Plain(p) => Some(p),
            Body::Sealed(_) => None,
        }
    }

    /// What this entry costs: the heap blocks it owns with the allocator's rounding,
    /// plus the LRU node and key that hold it.
    pub(super) fn estimated_bytes(&self, name: &str) -> usize {
        let owned = match &self.body {
            Body::Sealed(Some(s)) => heap_block(s.wrapped_dek.len()) + heap_block(s.ciphertext.len()),
            Body::Sealed(None) => 0,
            Body::Plain(p) => heap_block(p.len()),
        };
        heap_block(std::mem::size_of::<CachedVersion>() + 16) + owned + entry_overhead(name)
    }
}

/// An estimate of the heap block behind `n` bytes, laid out as glibc's allocator does (a
/// word of header, 16-byte granules, 32 bytes at least). The daemon's binary allocates
/// with mimalloc, which has no header but rounds up to size classes about an eighth
/// apart, so for a given block the two differ by up to about 15% either way; the bound
/// on the cache's bytes is an estimate of that accuracy.
fn heap_block(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16).max(2) * 16
    }
}

/// The LRU node, its key and its hash-table slot.
pub(super) fn entry_overhead(name: &str) -> usize {
    heap_block(std::mem::size_of::<Box<str>>() + std::mem::size_of::<Entry>() + 16) + heap_block(name.len()) + 16
}

impl fmt::Debug for CachedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedVersion")
            .field("version", &self.version())
            .field("state", &self.info.state)
            .field("plaintext", &self.plaintext().map(|_| "REDACTED"))
            .finish_non_exhaustive()
    }
}
