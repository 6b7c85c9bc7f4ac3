//! SSH for leased guests: key pairs, pinned host keys, OpenSSH config, and exec.
