//! The provider's hypervisor layer: guests, images, cgroups and network isolation.
//!
//! It takes a `VmSpec` and knows nothing of libp2p or of the wire format (DESIGN
//! section 2). Its contents arrive with the VMM issue; until then the crate is empty
//! rather than pretending to start guests.
