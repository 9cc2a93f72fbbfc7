//! The sealed-value text format, pure: `sealed:v1:<tenant>:<key-id>:<base64url(nonce||ciphertext||tag)>`.
//!
//! Self-describing so a reader (e.g. `audit tail`) can tell a sealed value
//! from plain text, see whose key it needs and which generation, and say why
//! it cannot open it, without any other bookkeeping. The tenant and key id
//! are also bound into the AEAD's associated data, so editing them in the
//! text (to move a value to another tenant) makes it fail to open.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::KeyError;

/// Every sealed value starts with this.
pub const TOKEN_PREFIX: &str = "sealed:v1:";

/// ChaCha20-Poly1305 nonce and tag lengths.
pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;

/// Largest sealed value [`Token::parse`] accepts (1 MiB of text).
pub const MAX_TOKEN: usize = 1 << 20;

/// A parsed sealed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub tenant: String,
    pub key_id: u32,
    /// nonce || ciphertext || tag.
    pub sealed: Vec<u8>,
}

/// Whether `s` looks like a sealed value (cheap; does not validate it).
pub fn is_sealed(s: &str) -> bool {
    s.starts_with(TOKEN_PREFIX)
}

/// Tenant names are DNS labels (the same rule as the mesh's names): they
/// become file names here, so nothing else may pass.
pub fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Token {
    pub fn encode(&self) -> String {
        encode(&self.tenant, self.key_id, &self.sealed)
    }

    /// Parses the text form. Never panics; checks shape only (the AEAD
    /// decides whether it is genuine).
    pub fn parse(s: &str) -> Result<Token, KeyError> {
        let bad = |why: &str| KeyError::Malformed(why.to_string());
        if s.len() > MAX_TOKEN {
            return Err(bad("longer than 1 MiB"));
        }
        let rest = s
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad("does not start with `sealed:v1:`"))?;
        let mut parts = rest.splitn(3, ':');
        let tenant = parts.next().unwrap_or_default();
        let key_id = parts.next().ok_or_else(|| bad("no key id"))?;
        let body = parts.next().ok_or_else(|| bad("no ciphertext"))?;
        if !valid_tenant(tenant) {
            return Err(bad("the tenant is not a valid name"));
        }
        let key_id: u32 = key_id
            .parse()
            .map_err(|_| bad("the key id is not a number"))?;
        let sealed = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("the ciphertext is not base64url"))?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(bad("the ciphertext is too short"));
        }
        Ok(Token {
            tenant: tenant.to_string(),
            key_id,
            sealed,
        })
    }
}

/// The text form of a token, written into one string.
pub(crate) fn encode(tenant: &str, key_id: u32, sealed: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(
        TOKEN_PREFIX.len()
            + tenant.len()
            + 12
            + base64::encoded_len(sealed.len(), false).unwrap_or(0),
    );
    s.push_str(TOKEN_PREFIX);
    s.push_str(tenant);
    // Writing into a String cannot fail.
    let _ = write!(s, ":{key_id}:");
    URL_SAFE_NO_PAD.encode_string(sealed, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_refuses_junk() {
        let t = Token {
            tenant: "acme".into(),
            key_id: 7,
            sealed: vec![1; NONCE_LEN + TAG_LEN + 3],
        };
        let s = t.encode();
        assert!(is_sealed(&s));
        assert_eq!(Token::parse(&s).expect("parse"), t);
        for junk in [
            "",
            "sealed:v1:",
            "sealed:v2:acme:1:AAAA",
            "sealed:v1:Acme:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "sealed:v1:acme:x:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "sealed:v1:acme:1:AAAA",
            "sealed:v1:acme:1:!!!!",
            "sealed:v1:../etc:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(Token::parse(junk).is_err(), "{junk}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}", tail in "\\PC{0,80}") {
            let _ = Token::parse(&s);
            let _ = Token::parse(&format!("{TOKEN_PREFIX}{tail}"));
        }
    }
}
