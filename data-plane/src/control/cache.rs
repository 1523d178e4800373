//! The on-disk copy of the last config applied, so a data plane restarted
//! while the control plane is down serves at once.
//!
//! The file holds the complete config (credentials included), sealed with
//! AES-256-GCM under a key of the data plane's own (`RELAY_DP_CACHE_KEY`, or
//! `cache.key` in the data directory, created with mode 0600). It is written
//! to a temporary file, fsynced, and renamed over the old one, so a crash at
//! any point leaves either the old or the new config, never a mix.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use prost::Message;
use rand::RngCore;
use relay_proto::v1 as pb;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "config.cache";
const MAGIC: &[u8; 8] = b"RLYCFG01";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("config cache I/O on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the cache key must be 32 bytes, base64")]
    BadKey,
    #[error("the config cache cannot be opened (other key, or corrupted)")]
    Corrupt,
    #[error("{0}")]
    LooseKey(String),
}

pub struct ConfigCache {
    dir: PathBuf,
    cipher: Aes256Gcm,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl ConfigCache {
    /// Opens the cache in `dir` with the key from `env_key` (base64) or the key file.
    pub fn open(dir: &Path, env_key: Option<&str>) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key: Vec<u8> = match env_key {
            Some(k) => STANDARD.decode(k.trim()).map_err(|_| CacheError::BadKey)?,
            None => {
                let path = dir.join("cache.key");
                crate::datadir::check_private(&path).map_err(CacheError::LooseKey)?;
                match std::fs::read_to_string(&path) {
                    Ok(s) => STANDARD.decode(s.trim()).map_err(|_| CacheError::BadKey)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let mut k = [0u8; 32];
                        rand::thread_rng().fill_bytes(&mut k);
                        write_private(&path, STANDARD.encode(k).as_bytes()).map_err(io(&path))?;
                        k.to_vec()
                    }
                    Err(e) => return Err(io(&path)(e)),
                }
            }
        };
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| CacheError::BadKey)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cipher,
        })
    }

    /// When the cached config was written (unix ms), if there is one.
    pub fn written_at_ms(&self) -> Option<i64> {
        let modified = std::fs::metadata(self.dir.join(FILE)).ok()?.modified().ok()?;
        let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        i64::try_from(since.as_millis()).ok()
    }

    /// The cached config, if any. A corrupt cache is an error (the caller logs
    /// it and starts without one).
    pub fn load(&self) -> Result<Option<(pb::ConfigVersion, pb::Resources)>, CacheError> {
        let path = self.dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        if bytes.len() < MAGIC.len() + 12 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(CacheError::Corrupt);
        }
        let nonce = &bytes[MAGIC.len()..MAGIC.len() + 12];
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), &bytes[MAGIC.len() + 12..])
            .map_err(|_| CacheError::Corrupt)?;
        let u = pb::ConfigUpdate::decode(plain.as_slice()).map_err(|_| CacheError::Corrupt)?;
        match (u.version, u.resources) {
            (Some(v), Some(r)) => Ok(Some((v, r))),
            _ => Err(CacheError::Corrupt),
        }
    }

    /// Replaces the cached config atomically.
    pub fn store(&self, version: pb::ConfigVersion, resources: &pb::Resources) -> Result<(), CacheError> {
        let msg = pb::ConfigUpdate {
            version: Some(version),
            full: true,
            resources: Some(resources.clone()),
            ..Default::default()
        };
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), msg.encode_to_vec().as_slice())
            .map_err(|_| CacheError::Corrupt)?;
        let mut out = Vec::with_capacity(MAGIC.len() + 12 + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let path = self.dir.join(FILE);
        write_private(&tmp, &out).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_encrypted_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let c = ConfigCache::open(dir.path(), None).unwrap();
        assert!(c.load().unwrap().is_none());
        let mut r = pb::Resources::default();
        r.accounts.push(pb::Account {
            id: "a".into(),
            credential: "sk-ant-SECRET-credential".into(),
            ..Default::default()
        });
        c.store(pb::ConfigVersion::new(1, 7), &r).unwrap();
        let raw = std::fs::read(dir.path().join(FILE)).unwrap();
        assert!(
            !String::from_utf8_lossy(&raw).contains("SECRET"),
            "credentials are encrypted on disk"
        );
        let (v, got) = ConfigCache::open(dir.path(), None).unwrap().load().unwrap().unwrap();
        assert_eq!(v, pb::ConfigVersion::new(1, 7));
        assert_eq!(got, r);
        assert!(!dir.path().join("config.cache.tmp").exists());
        // Another key cannot open it.
        let other = ConfigCache::open(dir.path(), Some(&STANDARD.encode([9u8; 32]))).unwrap();
        assert!(matches!(other.load(), Err(CacheError::Corrupt)));
    }
}
