//! Workload identity from a client certificate: the name a verified mTLS client
//! certificate presents.
//!
//! Precedence: the certificate's URI SAN (a SPIFFE ID such as
//! `spiffe://example.org/ns/payments/sa/api`), else its subject common name (CN). A
//! certificate with more than one URI SAN is refused rather than guessed at (an X.509
//! SVID carries exactly one); one with neither a URI SAN nor a CN has no identity. DNS
//! and IP SANs name hosts, not workloads, and are ignored.
//!
//! This reads a certificate the TLS layer has already verified against the configured
//! client CA; it does not verify anything itself. The bytes still came from the network,
//! so every length is checked before anything is sliced, and nothing here panics on any
//! input (see the tests).

/// Longest identity accepted, in bytes.
pub const MAX_IDENTITY_BYTES: usize = 512;

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    UriSan,
    CommonName,
}

/// The identity a certificate presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub value: String,
    pub source: IdentitySource,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("client certificate is malformed ({0})")]
    Malformed(&'static str),
    #[error("client certificate has neither a URI SAN nor a subject CN")]
    NoIdentity,
    #[error("client certificate has more than one URI SAN")]
    SeveralUris,
    #[error("client certificate identity must be 1-{MAX_IDENTITY_BYTES} printable ASCII characters")]
    BadIdentity,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// `[0]` EXPLICIT, constructed: the version.
const VERSION: u8 = 0xa0;
/// `[3]` EXPLICIT, constructed: the extensions.
const EXTENSIONS: u8 = 0xa3;
/// GeneralName `uniformResourceIdentifier [6] IA5String`, implicit, primitive.
const GENERAL_NAME_URI: u8 = 0x86;
/// id-ce-subjectAltName, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
/// id-at-commonName, 2.5.4.3.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
/// UTF8String, PrintableString, IA5String.
const STRING_TAGS: &[u8] = &[0x0c, 0x13, 0x16];

/// One DER element: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), IdentityError> {
    let (&tag, rest) = input.split_first().ok_or(IdentityError::Malformed("truncated element"))?;
    if tag & 0x1f == 0x1f {
        return Err(IdentityError::Malformed("multi-byte tag"));
    }
    let (&first, rest) = rest.split_first().ok_or(IdentityError::Malformed("truncated length"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(IdentityError::Malformed("bad length"));
        }
        let (bytes, rest) = rest.split_at(n);
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), rest)
    };
    if rest.len() < len {
        return Err(IdentityError::Malformed("element longer than its container"));
    }
    let (content, rest) = rest.split_at(len);
    Ok((tag, content, rest))
}

/// The contents of an element that must have tag `want`.
fn expect<'a>(input: &'a [u8], want: u8, what: &'static str) -> Result<(&'a [u8], &'a [u8]), IdentityError> {
    let (tag, content, rest) = tlv(input)?;
    if tag != want {
        return Err(IdentityError::Malformed(what));
    }
    Ok((content, rest))
}

/// The elements of a constructed element's contents, in order.
fn elements(mut input: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), IdentityError>> {
    std::iter::from_fn(move || {
        if input.is_empty() {
            return None;
        }
        Some(tlv(input).map(|(tag, content, rest)| {
            input = rest;
            (tag, content)
        }))
    })
}

fn identity(bytes: &[u8], source: IdentitySource) -> Result<WorkloadIdentity, IdentityError> {
    let ok = !bytes.is_empty() && bytes.len() <= MAX_IDENTITY_BYTES && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    if !ok {
        return Err(IdentityError::BadIdentity);
    }
    // Checked above: printable ASCII.
    Ok(WorkloadIdentity { value: String::from_utf8_lossy(bytes).into_owned(), source })
}

/// The identity of the DER certificate `cert` (see the module documentation).
pub fn workload_identity(cert: &[u8]) -> Result<WorkloadIdentity, IdentityError> {
    let (certificate, _) = expect(cert, SEQUENCE, "not a certificate")?;
    let (tbs, _) = expect(certificate, SEQUENCE, "no tbsCertificate")?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (subject, mut rest) = expect(rest, SEQUENCE, "no subject")?;
    rest = expect(rest, SEQUENCE, "no subjectPublicKeyInfo")?.1;
    let mut uri = None;
    // issuerUniqueID [1], subjectUniqueID [2], extensions [3].
    for item in elements(rest) {
        let (tag, content) = item?;
        if tag != EXTENSIONS {
            continue;
        }
        let (list, _) = expect(content, SEQUENCE, "extensions are not a sequence")?;
        for ext in elements(list) {
            let (tag, ext) = ext?;
            if tag != SEQUENCE {
                return Err(IdentityError::Malformed("extension is not a sequence"));
            }
            let (oid, mut value) = expect(ext, OID, "extension without an id")?;
            if value.first() == Some(&BOOLEAN) {
                value = tlv(value)?.2;
            }
            let (value, _) = expect(value, OCTET_STRING, "extension without a value")?;
            if oid == SAN_OID {
                let (names, _) = expect(value, SEQUENCE, "subjectAltName is not a sequence")?;
                for name in elements(names) {
                    let (tag, name) = name?;
                    if tag == GENERAL_NAME_URI {
                        if uri.is_some() {
                            return Err(IdentityError::SeveralUris);
                        }
                        uri = Some(name);
                    }
                }
            }
        }
    }
    if let Some(uri) = uri {
        return identity(uri, IdentitySource::UriSan);
    }
    for rdn in elements(subject) {
        let (tag, rdn) = rdn?;
        if tag != SET {
            return Err(IdentityError::Malformed("name component is not a set"));
        }
        for attr in elements(rdn) {
            let (tag, attr) = attr?;
            if tag != SEQUENCE {
                return Err(IdentityError::Malformed("name attribute is not a sequence"));
            }
            let (oid, value) = expect(attr, OID, "name attribute without a type")?;
            if oid == CN_OID {
                let (tag, cn, _) = tlv(value)?;
                if !STRING_TAGS.contains(&tag) {
                    return Err(IdentityError::BadIdentity);
                }
                return identity(cn, IdentitySource::CommonName);
            }
        }
    }
    Err(IdentityError::NoIdentity)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DnType, Ia5String, KeyPair, SanType};

    use super::*;

    const SPIFFE: &str = "spiffe://example.org/ns/payments/sa/api";

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Example");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    #[test]
    fn uri_san_wins_over_the_common_name() {
        let der =
            cert(Some("payments-api"), vec![SanType::DnsName("api.example.org".try_into().unwrap()), uri(SPIFFE)]);
        assert_eq!(
            workload_identity(&der),
            Ok(WorkloadIdentity { value: SPIFFE.into(), source: IdentitySource::UriSan })
        );
    }

    #[test]
    fn without_a_uri_san_the_common_name_is_the_identity() {
        let dns_only = cert(Some("payments-api"), vec![SanType::DnsName("api.example.org".try_into().unwrap())]);
        let no_san = cert(Some("payments-api"), vec![]);
        for der in [dns_only, no_san] {
            assert_eq!(
                workload_identity(&der),
                Ok(WorkloadIdentity { value: "payments-api".into(), source: IdentitySource::CommonName })
            );
        }
    }

    #[test]
    fn certificates_without_one_clear_identity_are_refused() {
        assert_eq!(workload_identity(&cert(None, vec![])), Err(IdentityError::NoIdentity));
        let dns = vec![SanType::DnsName("api.example.org".try_into().unwrap())];
        assert_eq!(workload_identity(&cert(None, dns)), Err(IdentityError::NoIdentity));
        let two = vec![uri(SPIFFE), uri("spiffe://example.org/ns/other/sa/x")];
        assert_eq!(workload_identity(&cert(Some("x"), two)), Err(IdentityError::SeveralUris));
        assert_eq!(workload_identity(&cert(Some("has space"), vec![])), Err(IdentityError::BadIdentity));
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_IDENTITY_BYTES));
        assert_eq!(workload_identity(&cert(None, vec![uri(&long)])), Err(IdentityError::BadIdentity));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let der = cert(Some("payments-api"), vec![uri(SPIFFE)]);
        for n in 0..der.len() {
            assert!(workload_identity(&der[..n]).is_err(), "{n} of {} bytes", der.len());
        }
    }

    proptest! {
        #[test]
        fn random_bytes_and_flipped_bits_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            bit in any::<prop::sample::Index>(),
        ) {
            let _ = workload_identity(&bytes);
            let mut der = cert(Some("payments-api"), vec![uri(SPIFFE)]);
            let i = bit.index(der.len() * 8);
            der[i / 8] ^= 1 << (i % 8);
            let _ = workload_identity(&der);
        }
    }
}
