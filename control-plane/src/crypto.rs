//! Secrets at rest and their hashes.
//!
//! - Upstream credentials are sealed with AES-256-GCM under the master key
//!   (`RELAY_MASTER_KEY`, 32 bytes base64), a random 96-bit nonce per seal and
//!   the account id as associated data, so a ciphertext cannot be moved to
//!   another row.
//! - Client API keys and admin tokens are 256-bit random strings with a
//!   recognisable prefix; only their keyed hash (HMAC-SHA256 under a key
//!   derived from the master key) is stored. The API-key hash key is sent to
//!   data planes so they can look a key up in O(1).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::path::Path;
use subtle::ConstantTimeEq;

/// Prefix of client API keys ("relay key").
pub const API_KEY_PREFIX: &str = "rk-";
/// Prefix of admin (and data-plane) tokens.
pub const ADMIN_TOKEN_PREFIX: &str = "rat-";
const SEAL_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be 32 bytes, base64-encoded")]
    BadMasterKey,
    #[error("cannot read or write the master key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("a sealed secret could not be opened (wrong master key or corrupted data)")]
    Open,
    #[error("sealing failed")]
    Seal,
}

/// The master key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub fn from_base64(s: &str) -> Result<Self, CryptoError> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| CryptoError::BadMasterKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self { key })
    }

    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Self { key }
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.key)
    }

    /// Reads the key file, or creates it (mode 0600) with a new key when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, CryptoError> {
        let err = |e: std::io::Error| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        relay_runtime::datadir::check_private(path).map_err(|reason| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason,
        })?;
        match std::fs::read_to_string(path) {
            Ok(s) => Self::from_base64(&s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                write_secret_file(path, &key.to_base64()).map_err(err)?;
                Ok(key)
            }
            Err(e) => Err(err(e)),
        }
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_hmac());
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The key for hashing client API keys (shared with data planes).
    pub fn api_key_hash_secret(&self) -> [u8; 32] {
        self.derive("relay/v1/api-key-hash")
    }

    /// The key the web console signs its session cookies and CSRF tokens with: derived from the
    /// master key, so every control-plane replica accepts a session another one issued.
    pub fn console_session_secret(&self) -> [u8; 32] {
        self.derive("relay/v1/console-session")
    }

    fn admin_token_hash_secret(&self) -> [u8; 32] {
        self.derive("relay/v1/admin-token-hash")
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.derive("relay/v1/credential-seal").into())
    }

    /// Encrypts `plaintext`, bound to `context` (e.g. the account id).
    pub fn seal(&self, plaintext: &str, context: &str) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        let mut out = Vec::with_capacity(1 + 12 + ct.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], context: &str) -> Result<String, CryptoError> {
        if sealed.len() < 13 || sealed[0] != SEAL_VERSION {
            return Err(CryptoError::Open);
        }
        let pt = self
            .cipher()
            .decrypt(
                Nonce::from_slice(&sealed[1..13]),
                Payload {
                    msg: &sealed[13..],
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open)?;
        String::from_utf8(pt).map_err(|_| CryptoError::Open)
    }

    pub fn hash_api_key(&self, key: &str) -> String {
        keyed_hash(&self.api_key_hash_secret(), key)
    }

    pub fn hash_admin_token(&self, token: &str) -> String {
        keyed_hash(&self.admin_token_hash_secret(), token)
    }
}

/// `Hmac::new_from_slice` accepts keys of any length; this is never reached.
#[allow(clippy::panic)]
fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC-SHA256 accepts keys of any length")
}

// The keyed hash and its hex are the contract's: a data plane computes the same one.
pub use relay_proto::{hex, keyed_hash};

/// Compares two hashes in constant time.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A new secret: prefix + 32 random bytes in base64url (43 characters).
pub fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The non-secret start of a generated secret, for display: the prefix and 4 characters.
pub fn display_prefix(secret: &str, prefix: &str) -> String {
    let rest: String = secret.strip_prefix(prefix).unwrap_or(secret).chars().take(4).collect();
    format!("{prefix}{rest}…")
}

/// A non-secret hint of an upstream credential: its last four characters.
pub fn credential_hint(credential: &str) -> String {
    let chars: Vec<char> = credential.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("…{tail}")
}

/// Writes a file readable by its owner only (mode 0600), creating parents.
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_binding() {
        let k = MasterKey::generate();
        let sealed = k.seal("sk-ant-secret", "acct-1").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("sk-ant-secret"));
        assert_eq!(k.open(&sealed, "acct-1").unwrap(), "sk-ant-secret");
        assert!(
            k.open(&sealed, "acct-2").is_err(),
            "ciphertext moved to another row must not open"
        );
        assert!(MasterKey::generate().open(&sealed, "acct-1").is_err());
        // Two seals of the same value differ (random nonce).
        assert_ne!(sealed, k.seal("sk-ant-secret", "acct-1").unwrap());
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let a = generate_secret(API_KEY_PREFIX);
        let b = generate_secret(API_KEY_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("rk-"));
        // 32 bytes = 256 bits of randomness.
        assert_eq!(URL_SAFE_NO_PAD.decode(&a[3..]).unwrap().len(), 32);
        assert!(display_prefix(&a, API_KEY_PREFIX).len() < 12);
    }

    #[test]
    fn keyed_hash_depends_on_master_key() {
        let k1 = MasterKey::generate();
        let k2 = MasterKey::generate();
        assert_eq!(k1.hash_api_key("x"), k1.hash_api_key("x"));
        assert_ne!(k1.hash_api_key("x"), k2.hash_api_key("x"));
        assert_ne!(k1.hash_api_key("x"), k1.hash_admin_token("x"));
        assert!(hashes_equal(&k1.hash_api_key("x"), &k1.hash_api_key("x")));
        assert!(!hashes_equal(&k1.hash_api_key("x"), &k1.hash_api_key("y")));
    }

    #[test]
    fn master_key_parsing() {
        assert!(MasterKey::from_base64("short").is_err());
        let k = MasterKey::generate();
        assert_eq!(MasterKey::from_base64(&k.to_base64()).unwrap().key, k.key);
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn key_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/master.key");
        let a = MasterKey::load_or_create(&p).unwrap();
        let b = MasterKey::load_or_create(&p).unwrap();
        assert_eq!(a.key, b.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
