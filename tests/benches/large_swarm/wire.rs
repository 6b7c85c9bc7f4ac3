//! What the coordinator and its workers say to each other: one JSON object per line, a
//! command on the worker's stdin, exactly one reply to it on the worker's stdout, in order.
//! Node indices are global (0..n); times are nanoseconds on the shared clock
//! (`process_stats::mono_ns`). Peer ids travel as their text form.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub enum Command {
    /// Start the bootstrap nodes (worker 0 only); answered by `Booted`.
    Boot,
    /// Start this worker's other nodes, each dialing one of `boot` (round robin by index);
    /// answered by `Joined`.
    Join { boot: Vec<String> },
    /// Every node's connected-peer count; answered by `Degrees`.
    Degrees,
    /// The nodes among `nodes` that this worker runs publish an advert each, at once, as
    /// their own provider; answered by `Published` as soon as the commands are sent.
    Publish { nodes: Vec<usize> },
    /// How many of this worker's nodes hold each of `providers`; answered by `Held`.
    Held { providers: Vec<String> },
    /// When each of this worker's nodes stored each of `providers`; answered by `Arrivals`.
    Arrivals { providers: Vec<String> },
    /// Dial failures by cause and disconnections so far; answered by `Tally`.
    Tally,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Booted {
        addrs: Vec<String>,
    },
    Joined {
        started: usize,
        errors: Vec<String>,
    },
    /// `None`: that node's swarm task did not answer within 5 s.
    Degrees {
        degrees: Vec<Option<usize>>,
    },
    Published {
        adverts: Vec<Publication>,
    },
    Held {
        held: Vec<usize>,
    },
    Arrivals {
        per_provider: Vec<ProviderArrivals>,
        nodes: usize,
        lacking_any: usize,
        /// The peer count of each node that lacks an advert of the batch.
        lacking_degrees: Vec<usize>,
    },
    Tally {
        dial_failures: Vec<(String, u64)>,
        disconnections: u64,
        /// The nodes' upkeep counters summed (`peervm_discovery_walks_total`, connections
        /// closed by reason, discovery dials refused), by name.
        upkeep: Vec<(String, u64)>,
    },
    /// The command could not be carried out.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    pub node: usize,
    pub provider: String,
    pub sent_ns: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProviderArrivals {
    /// When each node that stored the advert stored it (its `AdvertStored` event; for the
    /// publishing node, when its publish command was answered).
    pub at_ns: Vec<u64>,
    /// Nodes that hold the advert but whose event was lost (their watcher lagged).
    pub untimed: usize,
    /// The publish answer of this advert, if this worker published it: Ok(answered at) or
    /// the error.
    pub ack: Option<Result<u64, String>>,
}
