//! The hashes both planes must compute identically: the keyed hash of a client key (the
//! control plane stores it, a data plane looks a presented key up by it) and the lower-case hex
//! every relay hash is written in.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// HMAC-SHA256(`secret`, `value`) in lower-case hex: the stored form of a client API key (under
/// the config's key-hash secret, which data planes receive so that they can look a presented key
/// up in O(1)) and of an admin token (under the control plane's own secret).
pub fn keyed_hash(secret: &[u8], value: &str) -> String {
    hex(&KeyedHasher::new(secret).digest(value))
}

/// [`keyed_hash`] under one secret, keyed once (HMAC's inner and outer key blocks hashed at
/// construction, not per value) and giving the raw 32 bytes: a data plane looks each presented
/// key up with it, without a hex `String` per request.
#[derive(Clone)]
pub struct KeyedHasher(Hmac<Sha256>);

impl KeyedHasher {
    /// A hasher under `secret`.
    pub fn new(secret: &[u8]) -> KeyedHasher {
        match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
            Ok(mac) => KeyedHasher(mac),
            Err(_) => unreachable_hmac(),
        }
    }

    /// HMAC-SHA256(secret, `value`): the bytes whose lower-case hex [`keyed_hash`] writes.
    pub fn digest(&self, value: &str) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedHasher(..)")
    }
}

/// The 32 bytes of a stored keyed hash ([`keyed_hash`]'s form: 64 lower-case hex digits); `None`
/// for anything else, which no [`keyed_hash`] can equal.
pub fn keyed_hash_bytes(stored: &str) -> Option<[u8; 32]> {
    if stored.len() != 64 || stored.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(stored, &mut out).ok()?;
    Some(out)
}

/// `Hmac::new_from_slice` accepts keys of any length; this is never reached.
#[allow(clippy::panic)]
fn unreachable_hmac() -> ! {
    panic!("HMAC-SHA256 accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex(&[]), "");
    }

    /// Pinned: a stored key hash from any earlier release must still match the key it was made
    /// from, on every data plane; changing this value locks every client out.
    #[test]
    fn keyed_hash_is_pinned() {
        // RFC 4231, test case 2.
        assert_eq!(
            keyed_hash(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A relay key under a 32-byte key-hash secret.
        let secret: Vec<u8> = (0u8..32).collect();
        assert_eq!(
            keyed_hash(&secret, "rk-relay-known-key"),
            "14cf74b1fcf9de442fb2e794e642a63cc72bb142acf773c303fbd46535718189"
        );
    }

    #[test]
    fn a_keyed_hasher_digests_what_keyed_hash_writes() {
        let secret: Vec<u8> = (0u8..32).collect();
        let hasher = KeyedHasher::new(&secret);
        for value in ["rk-relay-known-key", "", "another key"] {
            let stored = keyed_hash(&secret, value);
            assert_eq!(keyed_hash_bytes(&stored), Some(hasher.digest(value)), "{value}");
            assert_eq!(hex(&hasher.digest(value)), stored);
        }
        // Only the stored form reads back: 64 lower-case hex digits.
        let stored = keyed_hash(&secret, "rk-relay-known-key");
        assert_eq!(keyed_hash_bytes(&stored.to_uppercase()), None);
        assert_eq!(keyed_hash_bytes(&stored[..62]), None);
        assert_eq!(keyed_hash_bytes(&format!("{}zz", &stored[..62])), None);
        assert_eq!(keyed_hash_bytes(""), None);
    }
}
