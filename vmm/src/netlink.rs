//! Links and addresses over rtnetlink, in process: what vmm did with `ip link` and
//! `ip addr` (docs/vmm.md "Network").
//!
//! A netlink socket acts in the network namespace it was opened in, for as long as it
//! lives. The host's is opened on any thread; a lease namespace's is opened on a thread
//! inside that namespace (`netns::enter`) and keeps working there after the thread ends.
//! Every error names the link or address and keeps the kernel's errno.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};

use crate::error::VmmError;
use crate::netns;

/// A connection to the kernel's routing netlink in one namespace.
pub(crate) struct Netlink {
    handle: Handle,
    /// `None`: the host's (the process's own) namespace.
    netns: Option<String>,
}

impl Netlink {
    /// A connection in the host namespace. Needs a Tokio runtime: the connection runs as a
    /// task of its own, which ends when the `Netlink` is dropped.
    pub(crate) fn host() -> Result<Self, VmmError> {
        Self::open_here(None)
    }

    /// A connection inside the namespace `name`.
    pub(crate) async fn inside(name: &str) -> Result<Self, VmmError> {
        let runtime = tokio::runtime::Handle::current();
        let ns = name.to_string();
        netns::enter(name, move || {
            // the socket's reactor registration is the runtime's, made on this thread
            let _in_runtime = runtime.enter();
            Self::open_here(Some(ns))
        })
        .await
    }

    /// A connection in the calling thread's namespace, labelled `netns` in errors.
    fn open_here(netns: Option<String>) -> Result<Self, VmmError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| VmmError::Netlink {
            netns: netns.clone(),
            action: "open a netlink socket",
            source,
        })?;
        tokio::spawn(connection);
        Ok(Netlink { handle, netns })
    }

    /// Creates the veth pair `name` (here) and `peer`, the peer directly inside the
    /// namespace `peer_netns` (opened): no temporary name in this namespace to leak.
    pub(crate) async fn add_veth_into(&self, name: &str, peer: &str, peer_netns: &File) -> Result<(), VmmError> {
        let message = veth_into_message(name, peer, peer_netns.as_raw_fd());
        self.handle.link().add(message).execute().await.map_err(|e| self.link_error(name, "create (veth)", e))
    }

    /// Moves the link `name` of this namespace into the namespace `to`, renamed `new_name`
    /// (`ip link set NAME netns NS name NEW`).
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(crate) async fn move_into(&self, name: &str, to: &File, new_name: &str) -> Result<(), VmmError> {
        // by index: the name attribute carries the new name
        let index = self.index(name).await?;
        let message = LinkUnspec::new_with_index(index).setns_by_fd(to.as_raw_fd()).name(new_name.to_string()).build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| self.link_error(name, "move into the lease namespace", e))
    }

    /// Creates the bridge `name`, up.
    pub(crate) async fn add_bridge(&self, name: &str) -> Result<(), VmmError> {
        let message = LinkBridge::new(name).build();
        self.handle.link().add(message).execute().await.map_err(|e| self.link_error(name, "create (bridge)", e))
    }

    /// The interface index of `name`.
    pub(crate) async fn index(&self, name: &str) -> Result<u32, VmmError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| self.link_error(name, "look up", e))?;
        found.map(|m| m.header.index).ok_or_else(|| VmmError::Link {
            name: name.into(),
            netns: self.netns.clone(),
            action: "look up",
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    /// Sets `name` up or down, with `controller` (an index) as its bridge if given.
    pub(crate) async fn set(&self, name: &str, controller: Option<u32>, up: bool) -> Result<(), VmmError> {
        let mut message = LinkUnspec::new_with_name(name);
        message = if up { message.up() } else { message.down() };
        if let Some(index) = controller {
            message = message.controller(index);
        }
        let action = if up { "set up" } else { "set down" };
        self.handle.link().set(message.build()).execute().await.map_err(|e| self.link_error(name, action, e))
    }

    /// Adds `addr`/`prefix_len` to the link `name` (index `index`).
    pub(crate) async fn add_address(
        &self,
        name: &str,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), VmmError> {
        self.handle.address().add(index, IpAddr::V4(addr), prefix_len).execute().await.map_err(|e| VmmError::Address {
            addr: format!("{addr}/{prefix_len}"),
            link: name.into(),
            source: to_io(e),
        })
    }

    /// Deletes the link `name` (a veth takes its peer with it). Whether it was there.
    pub(crate) async fn delete(&self, name: &str) -> Result<bool, VmmError> {
        let message = LinkUnspec::new_with_name(name).build();
        match self.handle.link().del_with_message(message).execute().await.map_err(to_io) {
            Ok(()) => Ok(true),
            Err(e) if is_absent(&e) => Ok(false),
            Err(source) => {
                Err(VmmError::Link { name: name.into(), netns: self.netns.clone(), action: "delete", source })
            }
        }
    }

    /// The names of the namespace's links (`ip link show`).
    pub(crate) async fn link_names(&self) -> Result<Vec<String>, VmmError> {
        let messages: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| VmmError::Netlink {
                netns: self.netns.clone(),
                action: "list the links",
                source: to_io(e),
            })?;
        Ok(messages.iter().filter_map(link_name).map(str::to_string).collect())
    }

    fn link_error(&self, name: &str, action: &'static str, e: rtnetlink::Error) -> VmmError {
        VmmError::Link { name: name.into(), netns: self.netns.clone(), action, source: to_io(e) }
    }
}

/// `ip link add <name> type veth peer name <peer> netns <fd>`, as a message.
fn veth_into_message(name: &str, peer: &str, peer_netns_fd: i32) -> LinkMessage {
    let peer = LinkUnspec::new_with_name(peer).setns_by_fd(peer_netns_fd).build();
    LinkVeth::new(name, "").set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build()
}

/// A link's name, from its `IFLA_IFNAME` (what `ip -o link show` printed before `@`).
fn link_name(message: &LinkMessage) -> Option<&str> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// The kernel's errno where the kernel refused; rtnetlink's own error otherwise.
fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => io::Error::other(other),
    }
}

/// The link was not there.
fn is_absent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENODEV)
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::{InfoKind, LinkInfo};

    use super::*;

    #[test]
    fn the_veth_peer_is_made_inside_the_lease_namespace() {
        let m = veth_into_message("pv0123456789ab", "uplink", 42);
        assert_eq!(link_name(&m), Some("pv0123456789ab"));
        let infos = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })
            .expect("link info");
        assert!(infos.contains(&LinkInfo::Kind(InfoKind::Veth)));
        let peer = infos
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p),
                _ => None,
            })
            .expect("one peer");
        assert_eq!(link_name(peer), Some("uplink"));
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(42)));
        // one peer: the placeholder name of LinkVeth::new is replaced, not kept beside it
        assert_eq!(infos.iter().filter(|i| matches!(i, LinkInfo::Data(_))).count(), 1);
    }

    #[test]
    fn link_names_come_from_ifname_alone() {
        let mut m = LinkMessage::default();
        assert_eq!(link_name(&m), None);
        m.attributes.push(LinkAttribute::Mtu(1500));
        m.attributes.push(LinkAttribute::IfName("pt0123456789ab".into()));
        // a veth's `@peer` of `ip -o link show` is not part of the name
        assert_eq!(link_name(&m), Some("pt0123456789ab"));
    }

    #[test]
    fn only_enodev_means_absent() {
        let mut gone = rtnetlink::packet_core::ErrorMessage::default();
        gone.code = std::num::NonZeroI32::new(-libc::ENODEV);
        let e = to_io(rtnetlink::Error::NetlinkError(gone));
        assert!(is_absent(&e), "{e}");
        let mut busy = rtnetlink::packet_core::ErrorMessage::default();
        busy.code = std::num::NonZeroI32::new(-libc::EBUSY);
        assert!(!is_absent(&to_io(rtnetlink::Error::NetlinkError(busy))));
        assert!(!is_absent(&to_io(rtnetlink::Error::RequestFailed)));
    }
}
