//! Reachability probes run by the test binary itself, no process per probe:
//! a [`ProbeServer`] answers on TCP and UDP ports inside a container's
//! network namespace, and [`probe_all`] tries many targets from one
//! namespace in parallel with a short timeout each. A [`Flow`] is a port
//! ([`Target`]) or an ICMP echo, which the kernel itself answers
//! ([`ping`]); [`probe_flows`] tries those.
//!
//! A socket keeps the namespace it was created in, so both are made on a
//! thread that entered the namespace ([`crate::in_netns`]); the threads
//! serving or probing may run anywhere. Threads spawned from inside the
//! namespace inherit it, which is how one source probes many targets at
//! once.
//!
//! Every answer is one line, `<tag> <proto>/<port> <peer address>`: the
//! probe checks the tag (it reached the container it meant to) and the
//! peer address (it left from the namespace it meant to). A TCP
//! connection then echoes what it is sent until the client closes it, so
//! a test can hold a connection open and see when it stops being answered.
//! An answered echo reads [`echo_answer`]: the reply came from the
//! address probed, to the namespace that probed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft_model::Protocol;

use crate::{Error, Result};

mod ping;
pub use ping::Pinger;

/// How often a connection thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// A server answering on some TCP and UDP ports (all addresses) in one
/// namespace. Stops and closes its sockets on drop.
pub struct ProbeServer {
    stop: Arc<AtomicBool>,
    /// The listening and UDP sockets' fds, shut down on drop to wake the
    /// threads blocked on them.
    fds: Vec<i32>,
    threads: Vec<JoinHandle<()>>,
}

impl ProbeServer {
    /// Binds `tcp` and `udp` ports on 0.0.0.0 inside the namespace at
    /// `netns` (`None`: this thread's own) and serves them, answering with
    /// `tag`.
    pub fn start(netns: Option<&Path>, tag: &str, tcp: &[u16], udp: &[u16]) -> Result<Self> {
        let bind = || -> std::io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
            let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let listeners = tcp
                .iter()
                .map(|&p| TcpListener::bind(any(p)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let sockets = udp
                .iter()
                .map(|&p| UdpSocket::bind(any(p)))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((listeners, sockets))
        };
        let (listeners, sockets) = match netns {
            Some(path) => crate::in_netns(path, bind),
            None => bind(),
        }
        .map_err(|e| Error::io("binding the probe server's ports", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = ProbeServer {
            stop: stop.clone(),
            fds: Vec::new(),
            threads: Vec::new(),
        };
        for (listener, &port) in listeners.into_iter().zip(tcp) {
            server.fds.push(listener.as_raw_fd());
            let (stop, tag) = (stop.clone(), tag.to_owned());
            server.threads.push(std::thread::spawn(move || {
                serve_tcp(&listener, &stop, &format!("{tag} tcp/{port}"))
            }));
        }
        for (socket, &port) in sockets.into_iter().zip(udp) {
            server.fds.push(socket.as_raw_fd());
            let (stop, tag) = (stop.clone(), tag.to_owned());
            server.threads.push(std::thread::spawn(move || {
                serve_udp(&socket, &stop, &format!("{tag} udp/{port}"))
            }));
        }
        Ok(server)
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for &fd in &self.fds {
            // SAFETY: the fd belongs to a socket owned by one of our threads,
            // which only exits after seeing the stop flag, so it is still
            // open here. shutdown(2) wakes a blocked accept/recvfrom.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Accepts until stopped; each connection on a thread of its own, all of
/// them joined before it returns (so a stopped server answers nothing more).
fn serve_tcp(listener: &TcpListener, stop: &Arc<AtomicBool>, answer: &str) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok((conn, peer)) = listener.accept() else {
            continue;
        };
        // The answer goes out from here (no thread start on the way of a
        // probe's answer); the echo runs on its own thread.
        let line = format!("{answer} {}\n", peer.ip());
        let mut conn = conn;
        if conn.write_all(line.as_bytes()).is_err() {
            continue;
        }
        let stop = stop.clone();
        conns.retain(|c| !c.is_finished());
        conns.push(std::thread::spawn(move || serve_conn(conn, &stop)));
    }
    for conn in conns {
        let _ = conn.join();
    }
}

/// Echoes until EOF, an error or the stop flag.
fn serve_conn(mut conn: TcpStream, stop: &AtomicBool) {
    if conn.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool, answer: &str) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        if let Some(peer) = recv_from(socket, &mut buf) {
            let _ = socket.send_to(format!("{answer} {}\n", peer.ip()).as_bytes(), peer);
        }
    }
}

/// The sender of the next datagram, `None` when there is none (the socket
/// was shut down). std's `recv_from` asserts on the address length, which a
/// shut-down socket returns as 0, and so panicked on every server drop.
fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> Option<SocketAddrV4> {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let want = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let mut len = want;
    // SAFETY: buf and addr are valid for the lengths given, and the fd is
    // open for the call (the socket is borrowed).
    let n = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if n < 0 || len < want || i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// One probe: a protocol, address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub proto: Protocol,
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.proto.as_str(), self.addr, self.port)
    }
}

/// One probe of any kind, as the model sees a flow (`Policy::decide`'s
/// `l4`): a TCP or UDP port, or no port (`None`), probed with an ICMP echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub addr: Ipv4Addr,
    pub l4: Option<(Protocol, u16)>,
}

impl Flow {
    /// An ICMP echo to `addr`.
    pub fn echo(addr: Ipv4Addr) -> Self {
        Flow { addr, l4: None }
    }

    /// `tcp/80`, `udp/53` or `icmp`.
    pub fn kind(&self) -> String {
        match self.l4 {
            Some((proto, port)) => format!("{}/{port}", proto.as_str()),
            None => "icmp".to_owned(),
        }
    }
}

impl From<Target> for Flow {
    fn from(t: Target) -> Self {
        Flow {
            addr: t.addr,
            l4: Some((t.proto, t.port)),
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.l4 {
            Some((proto, port)) => write!(f, "{}/{}:{port}", proto.as_str(), self.addr),
            None => write!(f, "icmp/{}", self.addr),
        }
    }
}

/// The answer line of an echo to `addr` that was answered.
pub fn echo_answer(addr: Ipv4Addr) -> String {
    format!("echo reply from {addr}")
}

/// What a probe got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server's answer line (without the newline).
    Answered(String),
    /// Nothing within the timeout (dropped).
    NoAnswer,
    /// Refused at once (TCP reset or ICMP unreachable).
    Refused,
    /// Any other error.
    Failed(String),
}

impl Outcome {
    pub fn answered(&self) -> bool {
        matches!(self, Outcome::Answered(_))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered(line) => write!(f, "answered {line:?}"),
            Outcome::NoAnswer => f.write_str("no answer"),
            Outcome::Refused => f.write_str("refused"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Probes every target from the namespace at `netns` (`None`: this
/// thread's own), all at once, each waiting at most `timeout`. The
/// outcomes are in the order of `targets`.
pub fn probe_all(netns: Option<&Path>, targets: &[Target], timeout: Duration) -> Vec<Outcome> {
    let flows: Vec<Flow> = targets.iter().map(|&t| Flow::from(t)).collect();
    probe_flows(netns, &flows, timeout)
}

/// [`probe_all`] for flows of any kind: a thread per port, and one thread
/// for all the echoes ([`ping::echo_all`]).
pub fn probe_flows(netns: Option<&Path>, flows: &[Flow], timeout: Duration) -> Vec<Outcome> {
    let run = || {
        std::thread::scope(|s| {
            let echoes: Vec<Ipv4Addr> = flows
                .iter()
                .filter(|f| f.l4.is_none())
                .map(|f| f.addr)
                .collect();
            let echoed = s.spawn(move || {
                let got = ping::echo_all(&echoes, timeout);
                got.into_iter()
                    .zip(echoes)
                    .map(|(r, addr)| echo_outcome(addr, r))
                    .collect::<Vec<_>>()
            });
            let ports: Vec<_> = flows
                .iter()
                .filter(|f| f.l4.is_some())
                .map(|f| s.spawn(move || probe_flow(f, timeout)))
                .collect();
            let panicked = || Outcome::Failed("probe thread panicked".into());
            let mut echoed = echoed.join().unwrap_or_default().into_iter();
            let mut ports = ports.into_iter();
            flows
                .iter()
                .map(|f| {
                    let got = match f.l4 {
                        None => echoed.next(),
                        Some(_) => ports
                            .next()
                            .map(|h| h.join().unwrap_or_else(|_| panicked())),
                    };
                    got.unwrap_or_else(panicked)
                })
                .collect()
        })
    };
    match netns {
        Some(path) => crate::in_netns(path, run),
        None => run(),
    }
}

/// One probe from this thread's namespace.
pub fn probe(target: &Target, timeout: Duration) -> Outcome {
    probe_flow(&Flow::from(*target), timeout)
}

/// One probe of any kind from this thread's namespace.
pub fn probe_flow(flow: &Flow, timeout: Duration) -> Outcome {
    let addr = flow.addr;
    let result = match flow.l4 {
        Some((Protocol::Tcp, port)) => probe_tcp(addr, port, timeout),
        Some((Protocol::Udp, port)) => probe_udp(addr, port, timeout),
        None => return echo_outcome(addr, ping::echo(addr, timeout)),
    };
    match result {
        Ok(line) => Outcome::Answered(line),
        Err(e) => classify(&e),
    }
}

fn echo_outcome(addr: Ipv4Addr, result: std::io::Result<()>) -> Outcome {
    match result {
        Ok(()) => Outcome::Answered(echo_answer(addr)),
        Err(e) => classify(&e),
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => Outcome::NoAnswer,
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable => {
            Outcome::Refused
        }
        _ => Outcome::Failed(e.to_string()),
    }
}

fn probe_tcp(addr: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<String> {
    let start = Instant::now();
    let conn = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), timeout)?;
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    conn.set_read_timeout(Some(left))?;
    read_line(conn)
}

fn read_line(conn: TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Sends a datagram, and a second one halfway through the timeout in case
/// the first was lost (e.g. while the neighbour entry resolved).
fn probe_udp(addr: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<String> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(SocketAddr::from((addr, port)))?;
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    for attempt in 0..2u32 {
        socket.send(b"probe")?;
        let until = timeout * (attempt + 1) / 2;
        socket.set_read_timeout(Some(
            until
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1)),
        ))?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()),
            Err(e) if classify(&e) == Outcome::NoAnswer => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no UDP answer",
    ))
}

/// A TCP connection held open from one namespace to a [`ProbeServer`],
/// to see whether an established connection keeps being answered.
pub struct HeldConnection {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
    /// The server's first line.
    pub greeting: String,
}

impl HeldConnection {
    /// Connects from the namespace at `netns` (`None`: this thread's own)
    /// and reads the answer line.
    pub fn open(
        netns: Option<&Path>,
        addr: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        let connect = || TcpStream::connect_timeout(&SocketAddr::from((addr, port)), timeout);
        let conn = match netns {
            Some(path) => crate::in_netns(path, connect),
            None => connect(),
        }
        .map_err(|e| Error::io(format!("connecting to {addr}:{port}"), e))?;
        let io = |e| Error::io(format!("reading the answer of {addr}:{port}"), e);
        conn.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut reader = BufReader::new(conn.try_clone().map_err(io)?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).map_err(io)?;
        Ok(HeldConnection {
            conn,
            reader,
            greeting: greeting.trim_end().to_owned(),
        })
    }

    /// Writes one line and waits up to `timeout` for its echo: `Ok(())`
    /// when it came back, the error (write failed, timeout, reset) if not.
    pub fn echo(&mut self, line: &str, timeout: Duration) -> std::io::Result<()> {
        self.conn.set_read_timeout(Some(timeout))?;
        self.conn.write_all(format!("{line}\n").as_bytes())?;
        let mut back = String::new();
        self.reader.read_line(&mut back)?;
        if back.trim_end() == line {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("echo {back:?} instead of {line:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback in this namespace (no root needed): every port answers with
    /// its tag, a closed port is refused, a held connection echoes.
    #[test]
    fn answers_on_every_port_and_echoes() {
        let (tcp, udp) = ([47311, 47312], [47313, 47314]);
        let server = ProbeServer::start(None, "c1", &tcp, &udp).unwrap();
        let lo = Ipv4Addr::LOCALHOST;
        let mut targets: Vec<Target> = tcp
            .iter()
            .map(|&port| Target {
                proto: Protocol::Tcp,
                addr: lo,
                port,
            })
            .chain(udp.iter().map(|&port| Target {
                proto: Protocol::Udp,
                addr: lo,
                port,
            }))
            .collect();
        targets.push(Target {
            proto: Protocol::Tcp,
            addr: lo,
            port: 47315,
        });
        let got = probe_all(None, &targets, Duration::from_secs(2));
        assert_eq!(got[0], Outcome::Answered("c1 tcp/47311 127.0.0.1".into()));
        assert_eq!(got[1], Outcome::Answered("c1 tcp/47312 127.0.0.1".into()));
        assert_eq!(got[2], Outcome::Answered("c1 udp/47313 127.0.0.1".into()));
        assert_eq!(got[3], Outcome::Answered("c1 udp/47314 127.0.0.1".into()));
        assert_eq!(got[4], Outcome::Refused);
        let mut held = HeldConnection::open(None, lo, 47311, Duration::from_secs(2)).unwrap();
        assert_eq!(held.greeting, "c1 tcp/47311 127.0.0.1");
        held.echo("one", Duration::from_secs(2)).unwrap();
        held.echo("two", Duration::from_secs(2)).unwrap();
        drop(server);
        // Stopped: the held connection is no longer answered.
        assert!(held.echo("three", Duration::from_millis(500)).is_err());
    }

    /// Needs root (a raw ICMP socket): echoes on loopback are answered,
    /// several at once, next to port probes.
    #[test]
    fn echoes_answer() {
        crate::require_root!();
        let lo = Ipv4Addr::LOCALHOST;
        let flows = [
            Flow::echo(lo),
            Flow::echo(lo),
            Flow::echo(Ipv4Addr::new(127, 0, 0, 2)),
            Flow::from(Target {
                proto: Protocol::Tcp,
                addr: lo,
                port: 47316,
            }),
        ];
        let got = probe_flows(None, &flows, Duration::from_secs(2));
        assert_eq!(got[0], Outcome::Answered(echo_answer(lo)));
        assert_eq!(got[1], Outcome::Answered(echo_answer(lo)));
        assert_eq!(
            got[2],
            Outcome::Answered(echo_answer(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(got[3], Outcome::Refused);
        assert_eq!(flows[0].kind(), "icmp");
        assert_eq!(flows[3].kind(), "tcp/47316");
        assert_eq!(flows[3].to_string(), "tcp/127.0.0.1:47316");
    }
}
