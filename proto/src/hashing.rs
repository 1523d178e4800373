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
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable_hmac(),
    };
    mac.update(value.as_bytes());
    hex(&mac.finalize().into_bytes())
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
}
