//! Content codings an upstream may apply although relay asked for `identity`.
//!
//! relay must read every answer it bills (and every error it classifies), so a complete body that
//! arrives compressed (a CDN or proxy in front of a compatible endpoint may do this) is decoded here,
//! and the client gets the decoded bytes without the `content-encoding` header: what the client
//! reads and what relay bills are the same bytes. Decoding is bounded: the decoded size may not pass
//! the cap the caller gives (a small compressed body cannot inflate into gigabytes). A compressed
//! event stream is not decoded (it is refused, and the request goes to another account).
//!
//! Crates: `flate2` (gzip, zlib/deflate; pure Rust backend), `brotli`, `ruzstd` (pure Rust zstd):
//! the well-kept decoders of each format, none needing a C library.

use http::HeaderMap;
use std::io::Read;

/// A content coding relay can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("content-encoding {0:?} is not supported")]
    Unsupported(String),
    #[error("the {0:?} body could not be decoded")]
    Corrupt(&'static str),
    #[error("the decoded body is larger than {0} bytes")]
    TooLarge(usize),
}

impl Encoding {
    /// The coding named by the `content-encoding` headers (absent, empty or `identity`: identity).
    /// Several codings stacked on one body are refused.
    pub fn of(headers: &HeaderMap) -> Result<Encoding, DecodeError> {
        let mut found = Encoding::Identity;
        for value in headers.get_all(http::header::CONTENT_ENCODING) {
            let value = value
                .to_str()
                .map_err(|_| DecodeError::Unsupported("(not ASCII)".into()))?;
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let this = match name.to_ascii_lowercase().as_str() {
                    "identity" => continue,
                    "gzip" | "x-gzip" => Encoding::Gzip,
                    "deflate" => Encoding::Deflate,
                    "br" => Encoding::Brotli,
                    "zstd" => Encoding::Zstd,
                    other => return Err(DecodeError::Unsupported(other.chars().take(40).collect())),
                };
                if found != Encoding::Identity {
                    return Err(DecodeError::Unsupported(value.chars().take(40).collect()));
                }
                found = this;
            }
        }
        Ok(found)
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// Decodes a whole body; at most `cap` decoded bytes.
    pub fn decode(self, data: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
        let corrupt = |_| DecodeError::Corrupt(self.name());
        match self {
            Encoding::Identity => {
                if data.len() > cap {
                    return Err(DecodeError::TooLarge(cap));
                }
                Ok(data.to_vec())
            }
            Encoding::Gzip => read_capped(flate2::read::MultiGzDecoder::new(data), cap).map_err(corrupt)?,
            // RFC 9110 "deflate" is the zlib format; some servers send a raw deflate stream instead.
            Encoding::Deflate => match read_capped(flate2::read::ZlibDecoder::new(data), cap) {
                Ok(r) => r,
                Err(_) => read_capped(flate2::read::DeflateDecoder::new(data), cap).map_err(corrupt)?,
            },
            Encoding::Brotli => read_capped(brotli::Decompressor::new(data, 4096), cap).map_err(corrupt)?,
            Encoding::Zstd => {
                let decoder =
                    ruzstd::decoding::StreamingDecoder::new(data).map_err(|_| DecodeError::Corrupt("zstd"))?;
                read_capped(decoder, cap).map_err(corrupt)?
            }
        }
    }
}

/// Reads all of `r`, failing (inner `Err`) when it has more than `cap` bytes.
fn read_capped(r: impl Read, cap: usize) -> std::io::Result<Result<Vec<u8>, DecodeError>> {
    let mut out = Vec::new();
    r.take(cap as u64 + 1).read_to_end(&mut out)?;
    if out.len() > cap {
        return Ok(Err(DecodeError::TooLarge(cap)));
    }
    Ok(Ok(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    const TEXT: &[u8] = br#"{"type":"message","usage":{"input_tokens":12,"output_tokens":34}}"#;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_ENCODING, v.parse().unwrap());
        h
    }

    fn encoded(e: Encoding) -> Vec<u8> {
        match e {
            Encoding::Identity => TEXT.to_vec(),
            Encoding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                w.write_all(TEXT).unwrap();
                w.finish().unwrap()
            }
            Encoding::Deflate => {
                let mut w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                w.write_all(TEXT).unwrap();
                w.finish().unwrap()
            }
            Encoding::Brotli => {
                let mut out = Vec::new();
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    w.write_all(TEXT).unwrap();
                }
                out
            }
            Encoding::Zstd => ruzstd::encoding::compress_to_vec(TEXT, ruzstd::encoding::CompressionLevel::Fastest),
        }
    }

    #[test]
    fn every_coding_decodes_to_the_same_bytes() {
        for (name, e) in [
            ("identity", Encoding::Identity),
            ("gzip", Encoding::Gzip),
            ("deflate", Encoding::Deflate),
            ("br", Encoding::Brotli),
            ("zstd", Encoding::Zstd),
        ] {
            assert_eq!(Encoding::of(&headers(name)).unwrap(), e);
            let body = encoded(e);
            assert_eq!(e.decode(&body, 1 << 20).unwrap(), TEXT, "{name}");
        }
    }

    #[test]
    fn raw_deflate_is_accepted_too() {
        let mut w = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(TEXT).unwrap();
        let raw = w.finish().unwrap();
        assert_eq!(Encoding::Deflate.decode(&raw, 1 << 20).unwrap(), TEXT);
    }

    #[test]
    fn bombs_stop_at_the_cap_and_garbage_is_an_error() {
        let zeros = vec![0u8; 1 << 20];
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        w.write_all(&zeros).unwrap();
        let bomb = w.finish().unwrap();
        assert!(bomb.len() < 8 << 10);
        assert_eq!(
            Encoding::Gzip.decode(&bomb, 64 << 10),
            Err(DecodeError::TooLarge(64 << 10))
        );
        assert_eq!(
            Encoding::Gzip.decode(b"not gzip", 1 << 20),
            Err(DecodeError::Corrupt("gzip"))
        );
        assert!(Encoding::Zstd.decode(b"not zstd", 1 << 20).is_err());
    }

    #[test]
    fn unknown_or_stacked_codings_are_refused() {
        assert!(matches!(
            Encoding::of(&headers("compress")),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            Encoding::of(&headers("gzip, br")),
            Err(DecodeError::Unsupported(_))
        ));
        assert_eq!(Encoding::of(&HeaderMap::new()).unwrap(), Encoding::Identity);
        assert_eq!(Encoding::of(&headers("identity")).unwrap(), Encoding::Identity);
    }
}
