//! Arbitrary bytes into the credential-name parser and the list-prefix checker: no
//! panic; whatever parses has the documented shape; errors carry no control characters.
#![no_main]

use credvault::names::{check_prefix, CredentialName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    match CredentialName::parse(&s, 256) {
        Ok(name) => {
            let n = name.as_str();
            assert!(!n.starts_with('/') && !n.ends_with('/') && !n.contains("//"));
            assert!(n.split('/').all(|seg| seg != "." && seg != ".."));
            assert!(check_prefix(n, 256).is_ok(), "a valid name is a valid prefix");
        }
        Err(e) => assert!(!e.0.chars().any(char::is_control), "{:?}", e.0),
    }
    if let Err(e) = check_prefix(&s, 256) {
        assert!(!e.0.chars().any(char::is_control), "{:?}", e.0);
    }
});
