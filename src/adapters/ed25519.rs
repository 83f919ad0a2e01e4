//! The Ed25519 approval key: implements the [`ApprovalSigner`] port with a
//! key kept in a file (`autopoiesis keygen` writes one,
//! `AUTOPOIESIS_APPROVAL_KEY_FILE` names the one `serve` loads).
//!
//! File format: the private key as unencrypted PKCS#8 in PEM
//! (`-----BEGIN PRIVATE KEY-----`, RFC 8410), the format
//! `openssl genpkey -algorithm ed25519` writes, so operators can make,
//! inspect and back up keys with standard tools
//! (`openssl pkey -in KEY -pubout` shows the public key, and
//! `openssl pkey -in KEY -pubout -outform DER | tail -c 32 | sha256sum | cut -c1-16`
//! its key id). Keygen writes PKCS#8 version 1, which every OpenSSL 3 reads.
//!
//! The file is the key's only protection, so it must be readable by its
//! owner alone: keygen creates it with mode 0600 and loading refuses one that
//! group or others can read or write.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{
    DecodePrivateKey, EncodePrivateKey, KeypairBytes, spki::der::pem::LineEnding,
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

use crate::domain::approvals::key_id;
use crate::ports::ApprovalSigner;

/// Why a key file could not be written or loaded. Every message names the
/// file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: already exists; refusing to overwrite an approval key", .0.display())]
    Exists(PathBuf),
    #[error("{}: no such file; create one with `autopoiesis keygen --out {}`", .0.display(), .0.display())]
    Missing(PathBuf),
    #[error(
        "{}: mode {mode:04o} lets group or others access the approval key; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{}: not an Ed25519 private key in PKCS#8 PEM form ({reason})", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

/// A loaded Ed25519 approval key.
pub struct Ed25519ApprovalKey {
    signing: SigningKey,
    /// Derived once: it is stored with every envelope.
    key_id: String,
}

impl Ed25519ApprovalKey {
    fn from_signing_key(signing: SigningKey) -> Self {
        let key_id = key_id(signing.verifying_key().as_bytes());
        Self { signing, key_id }
    }

    /// A new random key, from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`KeyFileError::Random`] when the operating system has no randomness
    /// to give.
    pub fn generate() -> Result<Self, KeyFileError> {
        let mut seed = Zeroizing::new([0_u8; ed25519_dalek::SECRET_KEY_LENGTH]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(Self::from_signing_key(SigningKey::from_bytes(&seed)))
    }

    /// Generates a key and writes it to `path` with mode 0600: the
    /// `keygen` command. Never overwrites a file, and leaves none behind
    /// when writing fails.
    ///
    /// # Errors
    /// [`KeyFileError::Exists`] when `path` exists, [`KeyFileError::Io`]
    /// when it cannot be written, [`KeyFileError::Random`] as in
    /// [`Self::generate`].
    pub fn create_file(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let key = Self::generate()?;
        // PKCS#8 v1, the seed alone: OpenSSL 3.0 refuses the v2 form that
        // also carries the public key, and the public key is derived anyway.
        let mut keypair = KeypairBytes {
            secret_key: key.signing.to_bytes(),
            public_key: None,
        };
        let pem = keypair.to_pkcs8_pem(LineEnding::LF);
        keypair.secret_key.zeroize();
        let pem = pem.map_err(|e| io(std::io::Error::other(e.to_string())))?;
        // A fresh checkout has no data folder yet: make it (and keep the
        // key's folder private to its owner too).
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let mut folder = std::fs::DirBuilder::new();
            folder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
            folder.create(parent).map_err(|source| KeyFileError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let mut options = OpenOptions::new();
        // create_new: an existing key is never replaced, even by a race.
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
        // sync_all: a key reported written survives a crash a moment later.
        let written = file
            .write_all(pem.as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            // A half-written key would be refused on load anyway; removing it
            // lets the operator simply run keygen again.
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        Ok(key)
    }

    /// Loads the key in `path`.
    ///
    /// # Errors
    /// [`KeyFileError::Missing`] when there is no such file,
    /// [`KeyFileError::TooOpen`] when group or others may read or write it,
    /// [`KeyFileError::Malformed`] when it holds no Ed25519 PKCS#8 PEM key,
    /// [`KeyFileError::Io`] when it cannot be read.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                KeyFileError::Missing(path.to_owned())
            } else {
                KeyFileError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let metadata = std::fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            let mode = std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        if !metadata.is_file() {
            return Err(KeyFileError::Malformed {
                path: path.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(io)?);
        let malformed = |reason: String| KeyFileError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let pem = std::str::from_utf8(&bytes).map_err(|_| malformed("not text".into()))?;
        let signing = SigningKey::from_pkcs8_pem(pem).map_err(|e| malformed(e.to_string()))?;
        Ok(Self::from_signing_key(signing))
    }

    /// The public half, for verifying signatures.
    #[must_use]
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The key's id (see [`key_id`]).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.key_id
    }
}

impl ApprovalSigner for Ed25519ApprovalKey {
    fn key_id(&self) -> String {
        self.key_id.clone()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).to_bytes().to_vec()
    }
}

// The permission checks are Unix's, and so are these tests' fixtures.
#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ed25519_dalek::{Signature, Verifier};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn keygen_writes_a_pkcs8_pem_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        Ed25519ApprovalKey::create_file(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        // Version 1 with the Ed25519 OID, as OpenSSL writes and reads it.
        assert!(text.contains("\nMC4CAQAwBQYDK2VwBCIEI"), "{text}");
    }

    #[test]
    fn a_written_key_loads_back_as_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        let written = Ed25519ApprovalKey::create_file(&path).unwrap();
        let loaded = Ed25519ApprovalKey::load(&path).unwrap();
        assert_eq!(loaded.id(), written.id());
        assert_eq!(loaded.verifying_key(), written.verifying_key());
    }

    #[test]
    fn signatures_verify_with_the_public_key() {
        let key = Ed25519ApprovalKey::generate().unwrap();
        let signature = Signature::from_slice(&key.sign(b"plan")).unwrap();
        assert!(key.verifying_key().verify(b"plan", &signature).is_ok());
        assert!(key.verifying_key().verify(b"other", &signature).is_err());
    }

    #[test]
    fn key_id_is_16_hex_characters_of_the_public_key_hash() {
        let key = Ed25519ApprovalKey::generate().unwrap();
        assert_eq!(key.key_id(), key_id(key.verifying_key().as_bytes()));
        assert_eq!(key.id().len(), 16);
        assert!(key.id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(key.id(), Ed25519ApprovalKey::generate().unwrap().id());
    }

    #[test]
    fn keygen_refuses_to_overwrite_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        std::fs::write(&path, "precious").unwrap();
        let error = Ed25519ApprovalKey::create_file(&path).err().unwrap();
        assert!(matches!(error, KeyFileError::Exists(_)), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn loading_a_missing_file_says_how_to_create_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pem");
        let error = Ed25519ApprovalKey::load(&path).err().unwrap();
        assert!(matches!(error, KeyFileError::Missing(_)), "{error}");
        assert!(error.to_string().contains("autopoiesis keygen --out"));
    }

    #[test]
    fn loading_a_key_that_group_or_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        Ed25519ApprovalKey::create_file(&path).unwrap();
        for open in [0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
            let error = Ed25519ApprovalKey::load(&path).err().unwrap();
            assert!(
                matches!(error, KeyFileError::TooOpen { mode, .. } if mode == open),
                "{error}"
            );
            assert!(error.to_string().contains("chmod 600"));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Ed25519ApprovalKey::load(&path).is_ok());
    }

    #[test]
    fn loading_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        let cases: [&[u8]; 4] = [
            b"",
            b"not a key\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            &[0xff, 0xfe, 0x00],
        ];
        for garbage in cases {
            std::fs::write(&path, garbage).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let error = Ed25519ApprovalKey::load(&path).err().unwrap();
            assert!(
                matches!(error, KeyFileError::Malformed { .. }),
                "{garbage:?}: {error}"
            );
        }
    }

    #[test]
    fn a_key_written_by_openssl_loads() {
        // The Ed25519 private key of RFC 8410, section 10.3, as
        // `openssl genpkey -algorithm ed25519` writes keys.
        let openssl = "-----BEGIN PRIVATE KEY-----\n\
                       MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                       -----END PRIVATE KEY-----\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        std::fs::write(&path, openssl).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = Ed25519ApprovalKey::load(&path).unwrap();
        assert_eq!(
            hex::encode(key.verifying_key().as_bytes()),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
    }

    #[test]
    fn a_key_of_another_algorithm_is_refused() {
        // An X25519 key in PKCS#8 PEM (RFC 8410 example): right format,
        // wrong algorithm.
        let x25519 = "-----BEGIN PRIVATE KEY-----\n\
                      MC4CAQAwBQYDK2VuBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                      -----END PRIVATE KEY-----\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approval.pem");
        std::fs::write(&path, x25519).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = Ed25519ApprovalKey::load(&path).err().unwrap();
        assert!(matches!(error, KeyFileError::Malformed { .. }), "{error}");
    }
}
