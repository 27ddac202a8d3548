//! Links by name: look one up, delete one, and read a kernel link message
//! into a [`LinkState`].

use futures_util::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::Handle;

use super::error::{errno, libc_enodev, nl_err};
use super::{LinkState, NetError};

pub(super) fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn link_state(msg: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        name: String::new(),
        index: msg.header.index,
        kind: None,
        mac: None,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        master: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => state.name = n.clone(),
            LinkAttribute::Address(a) => state.mac = Some(format_mac(a)),
            LinkAttribute::Mtu(m) => state.mtu = Some(*m),
            LinkAttribute::Controller(m) => state.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        state.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    state
}

pub(super) async fn link_by_name(
    h: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc_enodev()) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn delete_by_name(h: &Handle, name: &str) -> Result<bool, NetError> {
    let Some(link) = link_by_name(h, name)
        .await
        .map_err(nl_err(format!("looking up {name}")))?
    else {
        return Ok(false);
    };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        // Gone in between (e.g. its container namespace was just deleted).
        Err(e) if errno(&e) == Some(libc_enodev()) => Ok(false),
        Err(e) => Err(nl_err(format!("deleting {name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_macs() {
        assert_eq!(
            format_mac(&[0xaa, 0, 0x0b, 1, 2, 0xff]),
            "aa:00:0b:01:02:ff"
        );
        assert_eq!(format_mac(&[]), "");
    }
}
