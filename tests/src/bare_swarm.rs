//! A bare libp2p swarm for the tests' hand-made peers (a recording sync server, a raw
//! refresh relay): TCP, Noise and Yamux as a node speaks them, a fresh identity, and only
//! the behaviour the test gives it, so it says exactly what the test makes it say.

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, noise, tcp, yamux};

/// A swarm running `behaviour` and nothing else; idle connections stay a minute, longer
/// than any test waits on one.
pub fn bare_swarm<B: NetworkBehaviour>(behaviour: B) -> Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|_| behaviour)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}
