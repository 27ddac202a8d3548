//! The persistent TUN device: create or reattach by name, MTU, up, remove.
//!
//! Everything works on the calling thread's network namespace: the device is
//! created where `/dev/net/tun` is opened, and the link ioctls go through a
//! socket made in the same namespace. Once open, the file descriptor stays
//! bound to that device whichever thread uses it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use super::error::WgError;

const TUN_PATH: &CStr = c"/dev/net/tun";

/// Flags weft's TUN uses: every read and write starts with a virtio-net
/// header (see [`super::offload`]). Reattaching needs the same TUN/TAP type
/// and multi-queue setting as the device was created with; the other flags
/// are taken from whoever attaches.
const TUN_FLAGS: libc::c_int = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Offloads asked for: the kernel may hand us TCP/IPv4 packets of up to
/// 64 KiB and leave checksums for us to complete.
const OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN;

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub(crate) fn check_ifname(name: &str) -> Result<(), WgError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(WgError::IfName(name.to_string()))
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The index of interface `name` in the calling thread's namespace, if it
/// exists.
pub(crate) fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// An open TUN queue (IFF_TUN | IFF_NO_PI, nonblocking).
#[derive(Debug)]
pub(crate) struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Attaches `queues` (at least one) queues to the multi-queue TUN device
    /// `name`, creating it if it does not exist, and makes it persistent (it
    /// outlives this process with its addresses and routes). The kernel
    /// spreads the packets it sends to the device over the queues by flow
    /// hash, so one flow's packets stay on one queue, in order. A device
    /// left by an earlier version without multi-queue is removed and created
    /// again (its routes go with it; the caller re-adds them). Returns
    /// whether the device was created.
    pub(crate) fn open_persistent(name: &str, queues: usize) -> Result<(Vec<Tun>, bool), WgError> {
        check_ifname(name)?;
        let existed = ifindex_of(name).is_some();
        if existed {
            refuse_if_attached(name)?;
        }
        let (first, created) = match Tun::attach(name, true) {
            Ok(t) => (t, !existed),
            Err((_, e)) if existed && e.raw_os_error() == Some(libc::EINVAL) => {
                // Attached the old way, cleared, closed: the device is gone.
                let old =
                    Tun::attach(name, false).map_err(|(what, e)| WgError::tun(name, what, e))?;
                old.set_persist(false)?;
                drop(old);
                tracing::info!(
                    ifname = name,
                    "re-creating the TUN device with multiple queues"
                );
                let t = Tun::attach(name, true).map_err(|(what, e)| WgError::tun(name, what, e))?;
                (t, true)
            }
            Err((what, e)) => return Err(WgError::tun(name, what, e)),
        };
        first.set_persist(true)?;
        let mut tuns = vec![first];
        for _ in 1..queues.max(1) {
            tuns.push(Tun::attach(name, true).map_err(|(what, e)| WgError::tun(name, what, e))?);
        }
        Ok((tuns, created))
    }

    fn set_persist(&self, on: bool) -> Result<(), WgError> {
        let what = if on {
            "make the device persistent (TUNSETPERSIST)"
        } else {
            "clear persistence (TUNSETPERSIST 0)"
        };
        // SAFETY: TUNSETPERSIST takes an integer argument.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(on),
            )
        })
        .map(drop)
        .map_err(|e| WgError::tun(&self.name, what, e))
    }

    /// Opens one queue of `name` (multi-queue or not), creating the device
    /// if it does not exist. On failure: the step and the error.
    fn attach(name: &str, multi_queue: bool) -> Result<Tun, (&'static str, io::Error)> {
        // SAFETY: a valid path and flags; the result is checked.
        let fd = unsafe {
            libc::open(
                TUN_PATH.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        let fd = cvt(fd).map_err(|e| ("open /dev/net/tun", e))?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name);
        let flags = if multi_queue {
            TUN_FLAGS | libc::IFF_MULTI_QUEUE
        } else {
            TUN_FLAGS
        };
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })
            .map_err(|e| ("attach (TUNSETIFF)", e))?;
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                OFFLOADS as libc::c_ulong,
            )
        };
        if let Err(e) = cvt(rc) {
            // Without offloads the kernel simply sends one packet per read.
            tracing::warn!(ifname = name, error = %e, "TUN offloads (TSO) unavailable; reading packet by packet");
        }
        Ok(Tun {
            fd,
            name: name.to_string(),
        })
    }

    /// Wraps any packet-oriented file descriptor (a SOCK_SEQPACKET socket
    /// pair in unit tests) as if it were the TUN.
    #[cfg(test)]
    pub(crate) fn from_fd(fd: OwnedFd, name: &str) -> Tun {
        Tun {
            fd,
            name: name.to_string(),
        }
    }

    #[allow(dead_code)]
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe a live, writable buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one plain packet (prefixed with an empty virtio-net header).
    pub(crate) fn write_packet(&self, pkt: &[u8]) -> io::Result<usize> {
        const NO_OFFLOAD: [u8; super::offload::VNET_HDR_LEN] = [0; super::offload::VNET_HDR_LEN];
        self.write_iov(&[&NO_OFFLOAD, pkt])
    }

    /// Writes a frame that starts with its own virtio-net header.
    pub(crate) fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.write_iov(&[frame])
    }

    /// Writes one frame given in pieces. A TUN never pushes back, but should
    /// the file descriptor ever be full, wait a little for room instead of
    /// dropping.
    fn write_iov(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let n = parts.len().min(iov.len());
        for (v, p) in iov.iter_mut().zip(parts) {
            *v = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
        }
        let mut waited = false;
        loop {
            // SAFETY: the iovecs describe live buffers.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if !waited => {
                    waited = true;
                    let mut p = libc::pollfd {
                        fd: self.fd.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 100) };
                }
                _ => return Err(e),
            }
        }
    }
}

/// Link settings through ioctls on a socket of the calling thread's
/// namespace.
pub(crate) struct Link {
    sock: OwnedFd,
    name: String,
}

impl Link {
    pub(crate) fn new(name: &str) -> Result<Link, WgError> {
        check_ifname(name)?;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        let fd = cvt(fd).map_err(|e| WgError::tun(name, "open a control socket", e))?;
        Ok(Link {
            // SAFETY: `fd` was just created and is owned by nobody else.
            sock: unsafe { OwnedFd::from_raw_fd(fd) },
            name: name.to_string(),
        })
    }

    fn ioctl(&self, req: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here reads/writes one struct ifreq.
        cvt(unsafe { libc::ioctl(self.sock.as_raw_fd(), req, ifr as *mut libc::ifreq) })?;
        Ok(())
    }

    pub(crate) fn set_mtu(&self, mtu: u32) -> Result<(), WgError> {
        let mut ifr = ifreq(&self.name);
        ifr.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl(libc::SIOCSIFMTU, &mut ifr)
            .map_err(|e| WgError::tun(&self.name, format!("set MTU {mtu}"), e))
    }

    pub(crate) fn mtu(&self) -> Result<u32, WgError> {
        let mut ifr = ifreq(&self.name);
        self.ioctl(libc::SIOCGIFMTU, &mut ifr)
            .map_err(|e| WgError::tun(&self.name, "read the MTU", e))?;
        // SAFETY: SIOCGIFMTU filled the mtu member.
        Ok(unsafe { ifr.ifr_ifru.ifru_mtu } as u32)
    }

    /// Whether some process has a queue of this TUN open: a TUN has carrier
    /// exactly while a queue is attached. A multi-queue device lets anyone
    /// attach one more queue, so this is how a second netd (or `destroy`
    /// during a run) is refused. The carrier is read over netlink: the
    /// `IFF_RUNNING` flag follows it up to a second late.
    pub(crate) fn attached(&self) -> Result<bool, WgError> {
        let index = self.index()?;
        carrier(index).map_err(|e| WgError::tun(&self.name, "read the carrier (RTM_GETLINK)", e))
    }

    pub(crate) fn set_up(&self) -> Result<(), WgError> {
        let mut ifr = ifreq(&self.name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut ifr)
            .map_err(|e| WgError::tun(&self.name, "read the link flags", e))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut ifr)
            .map_err(|e| WgError::tun(&self.name, "bring the link up", e))
    }

    pub(crate) fn index(&self) -> Result<u32, WgError> {
        let mut ifr = ifreq(&self.name);
        self.ioctl(libc::SIOCGIFINDEX, &mut ifr)
            .map_err(|e| WgError::tun(&self.name, "read the interface index", e))?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member.
        Ok(unsafe { ifr.ifr_ifru.ifru_ifindex } as u32)
    }
}

/// Whether link `ifindex` of the calling thread's namespace has carrier
/// (one RTM_GETLINK request).
fn carrier(ifindex: u32) -> io::Result<bool> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
    );
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0)?;
    let mut buf = Vec::with_capacity(32 * 1024);
    sock.recv(&mut buf, 0)?;
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
        .map_err(|e| bad(format!("netlink reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => Ok(m
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Carrier(1)))),
        NetlinkPayload::Error(e) => Err(e
            .code
            .map(|c| io::Error::from_raw_os_error(-c.get()))
            .unwrap_or_else(|| bad("netlink error without a code".into()))),
        other => Err(bad(format!("unexpected netlink reply {other:?}"))),
    }
}

/// `EBUSY` (with its hint) when a process has the device open.
fn refuse_if_attached(name: &str) -> Result<(), WgError> {
    if Link::new(name)?.attached()? {
        return Err(WgError::tun(
            name,
            "attach (a queue is open)",
            io::Error::from_raw_os_error(libc::EBUSY),
        ));
    }
    Ok(())
}

/// Removes the persistent TUN device `name` from the calling thread's
/// namespace. A device that does not exist is not an error; one in use by a
/// running process is (`EBUSY`).
pub fn destroy(name: &str) -> Result<(), super::WgError> {
    check_ifname(name)?;
    if ifindex_of(name).is_none() {
        return Ok(());
    }
    refuse_if_attached(name)?;
    // A device made by an earlier version is single-queue.
    let tun = Tun::attach(name, true)
        .or_else(|_| Tun::attach(name, false))
        .map_err(|(what, e)| WgError::tun(name, what, e))?;
    tun.set_persist(false)?;
    // Closing the last file descriptor of a non-persistent device removes it.
    drop(tun);
    tracing::info!(ifname = name, "removed the WireGuard TUN device");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        assert!(check_ifname("weft-wg").is_ok());
        assert!(check_ifname("a234567890abcde").is_ok());
        assert!(check_ifname("a234567890abcdef").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("..").is_err());
    }
}
