//! Integration-test harness for peervm: in-process swarms, `peervm` processes, network
//! namespace hosts and guests. The scenarios live in `tests/tests/`; this crate holds
//! what they share, and grows with them.
