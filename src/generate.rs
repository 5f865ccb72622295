//! Generated secret values for rotation: random passwords and random bytes. Output is
//! zeroized on drop.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, RngCore as _};
use zeroize::Zeroizing;

const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &[u8] = b"0123456789";
const SYMBOLS: &[u8] = b"!#$%&()*+,-./:;<=>?@[]^_{|}~";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PasswordClasses {
    pub lowercase: bool,
    pub uppercase: bool,
    pub digits: bool,
    pub symbols: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Hex,
    Base64,
}

/// A password of `length` characters with at least one from each chosen class (all
/// classes when none is chosen).
pub fn password(length: usize, classes: PasswordClasses) -> Result<Zeroizing<Vec<u8>>, String> {
    let all = classes == PasswordClasses::default();
    let sets: Vec<&[u8]> = [
        (classes.lowercase || all, LOWER),
        (classes.uppercase || all, UPPER),
        (classes.digits || all, DIGITS),
        (classes.symbols || all, SYMBOLS),
    ]
    .into_iter()
    .filter_map(|(on, set)| on.then_some(set))
    .collect();
    if !(8..=1024).contains(&length) || length < sets.len() {
        return Err(format!("password length must be 8-1024 (got {length})"));
    }
    let pool: Vec<u8> = sets.concat();
    let mut rng = rand::rng();
    let mut out = Zeroizing::new(Vec::with_capacity(length));
    // One from each class, the rest from the union, then shuffle the positions.
    for set in &sets {
        out.push(*set.choose(&mut rng).ok_or("empty character class")?);
    }
    while out.len() < length {
        out.push(*pool.choose(&mut rng).ok_or("empty character pool")?);
    }
    for i in (1..out.len()).rev() {
        let j = rng.random_range(0..=i);
        out.swap(i, j);
    }
    Ok(out)
}

/// `length` random bytes, encoded.
pub fn random_bytes(length: usize, encoding: Encoding) -> Result<Zeroizing<Vec<u8>>, String> {
    if !(1..=4096).contains(&length) {
        return Err(format!("random byte length must be 1-4096 (got {length})"));
    }
    let mut raw = Zeroizing::new(vec![0u8; length]);
    rand::rng().fill_bytes(&mut raw);
    Ok(match encoding {
        Encoding::Raw => raw,
        Encoding::Hex => Zeroizing::new(hex::encode(&*raw).into_bytes()),
        Encoding::Base64 => Zeroizing::new(STANDARD.encode(&*raw).into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_cover_each_chosen_class() {
        for _ in 0..50 {
            let p = password(12, PasswordClasses { digits: true, uppercase: true, ..Default::default() }).unwrap();
            assert_eq!(p.len(), 12);
            assert!(p.iter().any(u8::is_ascii_digit) && p.iter().any(u8::is_ascii_uppercase));
            assert!(p.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
        }
        let all = password(16, PasswordClasses::default()).unwrap();
        assert!(all.iter().any(|b| SYMBOLS.contains(b)) && all.iter().any(u8::is_ascii_lowercase));
        assert_ne!(
            password(32, PasswordClasses::default()).unwrap(),
            password(32, PasswordClasses::default()).unwrap()
        );
        assert!(password(7, PasswordClasses::default()).is_err());
    }

    #[test]
    fn byte_encodings() {
        assert_eq!(random_bytes(16, Encoding::Raw).unwrap().len(), 16);
        let h = random_bytes(16, Encoding::Hex).unwrap();
        assert!(h.len() == 32 && h.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(random_bytes(30, Encoding::Base64).unwrap().len(), 40);
        assert!(random_bytes(0, Encoding::Raw).is_err());
    }
}
