//! The approval key port: what signs approval envelopes.
//!
//! The domain never sees key material; a loaded key is something that can
//! name itself and sign.

/// A loaded approval key. Having one is what "approvals unlocked" means.
#[cfg_attr(test, mockall::automock)]
pub trait ApprovalSigner: Send + Sync {
    /// The key's id: the first 16 hex characters of the SHA-256 of its
    /// public key (see [`crate::domain::approvals::key_id`]).
    fn key_id(&self) -> String;

    /// Signs `message` (Ed25519: 64 bytes). Signing with a loaded key cannot
    /// fail.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}
