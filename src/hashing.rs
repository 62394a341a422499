//! SHA-256 digests as lower-case hexadecimal, for cache keys, dataset fingerprints and kohya's file hashes.

use sha2::{Digest, Sha256};

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
