//! The SSH lines of docs/protocol.md section 13 ("Writing a client") are those of the
//! test vectors' keys: the known_hosts line pins the grant vector's host key at its
//! access endpoint, and the public key line is the request vector's `ssh_public_key`.

use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::*;

const DOC: &str = include_str!("../../docs/protocol.md");

/// Standard base64 with padding (RFC 4648), as OpenSSH writes keys.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// `ssh-ed25519 <base64>` of a raw ed25519 key: the OpenSSH wire key is the string
/// `ssh-ed25519` and the key, each after its 4-byte big-endian length (RFC 4253 6.6).
fn openssh_public_key(raw: &[u8; 32]) -> String {
    let mut wire = Vec::new();
    for part in [&b"ssh-ed25519"[..], &raw[..]] {
        wire.extend_from_slice(&(part.len() as u32).to_be_bytes());
        wire.extend_from_slice(part);
    }
    format!("ssh-ed25519 {}", base64(&wire))
}

#[test]
fn base64_matches_rfc_4648() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[test]
fn the_documented_ssh_lines_are_the_vectors_keys() {
    let ReplyOutcome::Granted { access, host_key, .. } = samples::granted(T0_UNIX_MS) else {
        unreachable!("samples::granted is a grant")
    };
    let known_hosts = format!("[{}]:{} {}", access.host, access.port, openssh_public_key(&host_key));
    assert!(DOC.contains(&format!("\n   {known_hosts}\n")), "section 13 should show: {known_hosts}");
    let public = openssh_public_key(&samples::requestor_ssh_public_key());
    assert!(DOC.contains(&format!("`{public}`")), "section 13 should show: {public}");
    let login = format!("-p {} {}@{}", access.port, access.user, access.host);
    assert!(DOC.contains(&login), "section 13's ssh command should end with {login}");
}
