//! Listings: scoped scans with bounded work, and sealed page tokens.
//!
//! A scoped caller's listing scans only the name ranges its policy can grant `list` in
//! ([`Policy::list_ranges`](crate::policy::Policy::list_ranges)), skips the names it may
//! not see, and keeps scanning until the page is full, the ranges end, or the request's
//! budget (`limits.max_list_scan_rows` rows, [`MAX_LIST_QUERIES`] queries) is spent. Then
//! the page (possibly short, even empty) comes back with a token to go on.
//!
//! A page token is the position to resume from, sealed with AES-256-GCM under a key
//! derived from the master key, with associated data naming the caller's token id, the
//! prefix and `include_deleted`. It is opaque (the position may be a name the caller may
//! not list), its length is fixed, and it opens only for the same caller and query, on
//! any daemon holding the same master key, for [`PAGE_TOKEN_TTL`].
//!
//! **Invariant:** nothing a listing returns (items or token) reveals a name the caller
//! may not list.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{Page, Vault, VaultError};
use crate::auth::Caller;
use crate::crypto::{self, CryptoError, SecretKey};
use crate::names;
use crate::policy::{Capability, MAX_PATTERN_BYTES};
use crate::store::{CredentialHead, CredentialStore as _, ListQuery, Micros};

/// How long a page token stays good.
pub const PAGE_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Issue times this far ahead of the local clock are accepted (daemons' clocks differ).
const CLOCK_SKEW_MICROS: Micros = 300_000_000;
/// Longer `page_token`s are refused before decoding.
const MAX_PAGE_TOKEN_CHARS: usize = 4096;
/// Store queries one listing request makes at most (a policy can have many ranges).
pub const MAX_LIST_QUERIES: usize = 64;
/// Rows one store query returns at most; batches grow from the page size up to this.
const MAX_BATCH: usize = 1000;
/// Issue time (8 bytes) and resume length (2 bytes) before the resume point.
const HEADER: usize = 10;

const PAGE_KEY_INFO: &[u8] = b"credvault/v1/page-token-key";
const PAGE_AAD_DOMAIN: &[u8] = b"credvault/v1/page-token";

/// What a page token is bound to: the caller and the query.
#[derive(Debug, Clone, Copy)]
pub struct PageBinding<'a> {
    pub token_id: &'a str,
    pub prefix: &'a str,
    pub include_deleted: bool,
}

impl PageBinding<'_> {
    fn aad(&self) -> Vec<u8> {
        // Length-prefixed fields: no two bindings share an encoding.
        let mut out = Vec::with_capacity(PAGE_AAD_DOMAIN.len() + self.token_id.len() + self.prefix.len() + 18);
        out.extend_from_slice(PAGE_AAD_DOMAIN);
        out.push(0);
        for field in [self.token_id, self.prefix] {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.push(u8::from(self.include_deleted));
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error("page_token is malformed; pass back a next_page_token unchanged")]
    Malformed,
    #[error(
        "page_token does not belong to this listing: it was altered, or issued to another token, for another \
         prefix or include_deleted setting, or under another master key; pass back next_page_token unchanged, \
         or start over without one"
    )]
    Foreign,
    #[error("page_token has expired (page tokens are good for {} minutes); start the listing over without one", PAGE_TOKEN_TTL.as_secs() / 60)]
    Expired,
}

/// The key page tokens are sealed under.
pub fn page_key(master: &crypto::MasterKey) -> SecretKey {
    master.derive_subkey(PAGE_KEY_INFO)
}

/// Seals `resume` (where the next page starts, inclusive). The plaintext is padded to
/// `pad` bytes so a token's length says nothing about the position.
pub fn seal_page_token(
    key: &SecretKey,
    binding: &PageBinding<'_>,
    resume: &str,
    issued_at: Micros,
    pad: usize,
) -> Result<String, CryptoError> {
    let len = u16::try_from(resume.len()).map_err(|_| CryptoError::Malformed("resume point too long"))?;
    let mut plain = Vec::with_capacity(HEADER + pad.max(resume.len()));
    plain.extend_from_slice(&issued_at.to_be_bytes());
    plain.extend_from_slice(&len.to_be_bytes());
    plain.extend_from_slice(resume.as_bytes());
    plain.resize(plain.len().max(HEADER + pad), 0);
    let blob = crypto::seal(key, &plain, &binding.aad())?;
    Ok(URL_SAFE_NO_PAD.encode(blob))
}

/// Opens a token made by [`seal_page_token`] for the same binding; returns the resume point.
pub fn open_page_token(
    key: &SecretKey,
    binding: &PageBinding<'_>,
    token: &str,
    now: Micros,
) -> Result<String, PageTokenError> {
    if token.len() > MAX_PAGE_TOKEN_CHARS {
        return Err(PageTokenError::Malformed);
    }
    let blob = URL_SAFE_NO_PAD.decode(token).map_err(|_| PageTokenError::Malformed)?;
    let plain = crypto::open(key, &blob, &binding.aad()).map_err(|e| match e {
        CryptoError::Authentication => PageTokenError::Foreign,
        _ => PageTokenError::Malformed,
    })?;
    let (issued, rest) = plain.split_first_chunk::<8>().ok_or(PageTokenError::Malformed)?;
    let (len, rest) = rest.split_first_chunk::<2>().ok_or(PageTokenError::Malformed)?;
    let resume = rest.get(..usize::from(u16::from_be_bytes(*len))).ok_or(PageTokenError::Malformed)?;
    let issued = Micros::from_be_bytes(*issued);
    let ttl = Micros::try_from(PAGE_TOKEN_TTL.as_micros()).unwrap_or(Micros::MAX);
    if issued > now.saturating_add(CLOCK_SKEW_MICROS) || now.saturating_sub(issued) > ttl {
        return Err(PageTokenError::Expired);
    }
    let resume_ok =
        resume.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b',' | b'~'));
    if !resume_ok {
        return Err(PageTokenError::Malformed);
    }
    // Checked above: ASCII only.
    Ok(String::from_utf8_lossy(resume).into_owned())
}

impl Vault {
    /// One page of the credentials under `prefix` that `caller` may list, in name order.
    /// The token resumes just after the last name returned (or, when the scan budget ran
    /// out first, after the last name scanned), so names created between pages behind
    /// the cursor are not repeated and those ahead of it appear.
    pub async fn list(
        &self,
        caller: &Caller,
        prefix: &str,
        page_size: u32,
        page_token: &str,
        include_deleted: bool,
    ) -> Result<Page, VaultError> {
        let limits = &self.inner.limits;
        self.check_prefix(prefix)?;
        let size = match page_size {
            0 => limits.default_page_size,
            n if n > limits.max_page_size => {
                return Err(VaultError::InvalidArgument(format!(
                    "page_size {n} is over the limit of {}",
                    limits.max_page_size
                )))
            }
            n => n,
        } as usize;
        let binding = PageBinding { token_id: &caller.token_id, prefix, include_deleted };
        let key = self.with_keys(|r| page_key(r.master()));
        let now = self.now();
        let resume = match page_token {
            "" => String::new(),
            t => open_page_token(&key, &binding, t, now).map_err(|e| VaultError::InvalidArgument(e.to_string()))?,
        };
        let policy = &caller.policy;
        let budget = limits.max_list_scan_rows.max(1);
        let want = size + 1;
        let mut found: Vec<CredentialHead> = Vec::with_capacity(want.min(MAX_BATCH));
        let (mut scanned, mut queries) = (0usize, 0usize);
        let mut batch = want.min(MAX_BATCH);
        // Where the next page starts; `None` when the ranges are done.
        let mut next: Option<String> = None;
        'ranges: for range in policy.list_ranges(Capability::List, prefix) {
            if range.end <= resume {
                continue;
            }
            let mut start = range.start.clone().max(resume.clone());
            loop {
                if scanned >= budget || queries >= MAX_LIST_QUERIES {
                    // Out of budget: the page may be short; the caller pages on.
                    next = Some(start);
                    break 'ranges;
                }
                let limit = batch.min(budget - scanned);
                let query = ListQuery {
                    start: &start,
                    end: &range.end,
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                    include_deleted,
                };
                let rows = self.inner.store.list_credentials(&query).await?;
                queries += 1;
                scanned += rows.len();
                let exhausted = rows.len() < limit;
                for row in rows {
                    start = names::after(&row.name);
                    if policy.allows(Capability::List, &row.name) {
                        found.push(row);
                        if found.len() == want {
                            // One more than the page: there is a next page, and it
                            // starts just after the last name returned.
                            found.truncate(size);
                            next = found.last().map(|r| names::after(&r.name));
                            break 'ranges;
                        }
                    }
                }
                if exhausted {
                    break;
                }
                batch = (batch * 2).min(MAX_BATCH);
            }
        }
        metrics::counter!(crate::telemetry::names::LIST_ROWS_SCANNED).increment(scanned as u64);
        let next_page_token = match next {
            None => String::new(),
            Some(resume) => {
                let pad = limits.max_name_bytes.max(MAX_PATTERN_BYTES) + 2;
                seal_page_token(&key, &binding, &resume, now, pad)
                    .map_err(|e| VaultError::Internal(format!("sealing a page token: {e}")))?
            }
        };
        Ok(Page { credentials: found, next_page_token })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: Micros = 1_800_000_000_000_000;

    fn key(b: u8) -> SecretKey {
        page_key(&crypto::MasterKey::from_bytes(&[b; 32]).unwrap())
    }

    fn binding<'a>(token_id: &'a str, prefix: &'a str) -> PageBinding<'a> {
        PageBinding { token_id, prefix, include_deleted: false }
    }

    #[test]
    fn tokens_are_bound_to_caller_query_key_and_time() {
        let k = key(1);
        let b = binding("abc123abc123", "team-a/");
        let t = seal_page_token(&k, &b, "team-b/hidden,", NOW, 258).unwrap();
        assert_eq!(open_page_token(&k, &b, &t, NOW + 1).unwrap(), "team-b/hidden,");
        let foreign = [
            binding("def456def456", "team-a/"),
            binding("abc123abc123", "team-"),
            PageBinding { include_deleted: true, ..b },
        ];
        for other in foreign {
            assert_eq!(open_page_token(&k, &other, &t, NOW), Err(PageTokenError::Foreign), "{other:?}");
        }
        assert_eq!(open_page_token(&key(2), &b, &t, NOW), Err(PageTokenError::Foreign), "another master key");
        let ttl = PAGE_TOKEN_TTL.as_micros() as Micros;
        assert_eq!(open_page_token(&k, &b, &t, NOW + ttl + 1), Err(PageTokenError::Expired));
        assert_eq!(open_page_token(&k, &b, &t, NOW - CLOCK_SKEW_MICROS - 1), Err(PageTokenError::Expired));
        for garbage in ["", "!!!", "djE6dGVhbS1h", &"A".repeat(MAX_PAGE_TOKEN_CHARS + 1)] {
            assert_eq!(open_page_token(&k, &b, garbage, NOW), Err(PageTokenError::Malformed), "{garbage:?}");
        }
        // Fixed length, whatever the position; no plaintext inside.
        let short = seal_page_token(&k, &b, "a", NOW, 258).unwrap();
        assert_eq!(short.len(), t.len());
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"team-b"));
    }

    proptest! {
        #[test]
        fn random_tokens_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), text in "\\PC{0,64}") {
            let k = key(3);
            let b = binding("abc123abc123", "");
            let _ = open_page_token(&k, &b, &URL_SAFE_NO_PAD.encode(&bytes), NOW);
            let _ = open_page_token(&k, &b, &text, NOW);
        }

        #[test]
        fn round_trip_and_any_flipped_bit_fails(resume in "[a-z0-9/,~-]{0,300}", bit in any::<prop::sample::Index>()) {
            let k = key(4);
            let b = binding("abc123abc123", "x");
            let t = seal_page_token(&k, &b, &resume, NOW, 258).unwrap();
            prop_assert_eq!(open_page_token(&k, &b, &t, NOW).unwrap(), resume);
            let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
            let i = bit.index(raw.len() * 8);
            raw[i / 8] ^= 1 << (i % 8);
            let err = open_page_token(&k, &b, &URL_SAFE_NO_PAD.encode(&raw), NOW).unwrap_err();
            prop_assert!(matches!(err, PageTokenError::Foreign | PageTokenError::Malformed));
        }
    }
}
