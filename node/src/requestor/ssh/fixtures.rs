//! Test fixtures shared by the SSH modules' tests.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use russh::keys::ssh_key::rand_core::{Infallible, TryCryptoRng, TryRng};

use super::target::{SshTarget, host_alias};

/// The OS generator for ssh-key's rand_core (this crate's `rand` is another version).
pub(super) struct TestRng;

impl TryRng for TestRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand::random())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand::random())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, dst);
        Ok(())
    }
}

impl TryCryptoRng for TestRng {}

pub(super) fn target(dir: &Path, host_key: [u8; 32]) -> SshTarget {
    SshTarget {
        host: "127.0.0.1".into(),
        port: 2222,
        user: "peervm".into(),
        key_path: dir.join("id_ed25519"),
        host_key,
        alias: host_alias(&"ab".repeat(16)),
    }
}

pub(super) fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
