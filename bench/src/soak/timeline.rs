//! What a soak run saw, as plain data: the one format shared by the parts
//! that produce it (the churn, the traffic probes, the fault scheduler and
//! the sampler, each appending to a [`Recorder`]) and the parts that judge
//! it (the pure checkers in `invariants.rs`) and draw it (`report.rs`).
//!
//! Every time is milliseconds since the run started (`t_ms`, from one
//! monotonic clock: [`Recorder::now_ms`]), so the wall clock jump fault
//! cannot bend the timeline.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Milliseconds since the run started.
pub type Ms = u64;

/// A container's lifecycle as the runtime (the churn) saw it: the CNI ADD
/// answered at `added_ms` with `addr`; the CNI DEL answered at `deleted_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Life {
    /// The CNI container id.
    pub id: String,
    /// The lab host index it runs on.
    pub host: usize,
    /// Its DNS name (the container name), service, stack and aliases as
    /// given in CNI_ARGS.
    pub name: String,
    pub service: Option<String>,
    pub stack: Option<String>,
    pub aliases: Vec<String>,
    /// Published host ports (TCP), if any.
    pub ports: Vec<u16>,
    pub addr: Ipv4Addr,
    /// When the ADD was sent and when it answered.
    pub add_sent_ms: Ms,
    pub added_ms: Ms,
    /// When the DEL was sent and when it answered (None: still live at the end).
    pub del_sent_ms: Option<Ms>,
    pub deleted_ms: Option<Ms>,
    /// Long-lived probe containers (DNS clients, flow ends) are never churned.
    pub probe: bool,
}

/// A CNI call that failed (a violation unless a fault explains it: see
/// `invariants.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniFailure {
    /// When the call was sent (a call that times out fails seconds later).
    #[serde(default)]
    pub sent_ms: Ms,
    /// When it failed.
    pub t_ms: Ms,
    pub host: usize,
    pub command: String,
    pub id: String,
    pub error: String,
}

/// What one DNS query got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsAnswer {
    /// NOERROR with these A records (possibly none).
    Addrs(Vec<Ipv4Addr>),
    NxDomain,
    /// SERVFAIL, REFUSED, ... (the rcode).
    Error(u8),
    /// No answer within the client's timeout, or ICMP unreachable.
    Timeout,
}

/// The kind of name queried, so the checker knows what the answer must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsQuery {
    /// A container's name (or one of its aliases): must answer its address
    /// while it is live.
    Container { id: String },
    /// `tasks.<service>[.<stack>]`: the addresses of the service's live
    /// containers.
    Tasks {
        service: String,
        stack: Option<String>,
    },
    /// A name that never existed: must be NXDOMAIN.
    Absent,
}

/// One query: what was asked, from which host, when sent and when answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSample {
    pub host: usize,
    pub name: String,
    pub query: DnsQuery,
    pub sent_ms: Ms,
    pub answered_ms: Ms,
    pub answer: DnsAnswer,
}

/// DNS queries are many (1,000/s): the clients judge each answer as it
/// comes (`invariants::judge_dns`, against the lives recorded so far) and
/// keep per second counts, and the whole sample only of a query that
/// failed or was judged wrong (at most `DNS_KEPT_MAX` of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSecond {
    /// Whole seconds since the start.
    pub t_s: u64,
    pub sent: u64,
    /// Answered and judged right.
    pub right: u64,
    /// Answered and judged wrong (stale, missing, wrong address).
    pub wrong: u64,
    /// No answer in time, or an error rcode.
    pub failed: u64,
}

/// How many failed or wrong DNS samples a run keeps in full.
pub const DNS_KEPT_MAX: usize = 10_000;

/// The kind of a probe flow between two long-lived containers on different
/// hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowKind {
    /// ICMP echo every 10 ms.
    Ping,
    /// UDP request/answer every 10 ms.
    Udp,
    /// A long TCP stream (writes and reads continuously).
    Tcp,
}

/// A period in which a flow got no answer / made no progress: from the
/// last good packet before to the first good one after (`end_ms` None: it
/// never came back before the end of the run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub flow: String,
    pub kind: FlowKind,
    pub start_ms: Ms,
    pub end_ms: Option<Ms>,
}

/// A TCP stream that ended with an error (reset, broken pipe, ...) while
/// both ends were live: always a violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    pub flow: String,
    pub t_ms: Ms,
    pub error: String,
}

/// The faults the scheduler injects.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
pub enum FaultKind {
    NetdTerm,
    NetdKill,
    EtcdStop,
    EtcdKill,
    IptablesFlush,
    IptablesRestore,
    NftFlush,
    VethDeleted,
    UnderlayDown,
    ClockJump,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::NetdTerm,
        FaultKind::NetdKill,
        FaultKind::EtcdStop,
        FaultKind::EtcdKill,
        FaultKind::IptablesFlush,
        FaultKind::IptablesRestore,
        FaultKind::NftFlush,
        FaultKind::VethDeleted,
        FaultKind::UnderlayDown,
        FaultKind::ClockJump,
    ];

    /// How long after the fault ends it must be healed: the stated time of
    /// the "every fault heals by itself within a stated time".
    pub fn heal_limit_ms(self) -> Ms {
        match self {
            // netd back and ready, every probe answering again.
            FaultKind::NetdTerm | FaultKind::NetdKill => 10_000,
            // every netd sees the store again.
            FaultKind::EtcdStop | FaultKind::EtcdKill => 15_000,
            // weft's rules back: detection, not the 30 s resync.
            FaultKind::IptablesFlush | FaultKind::IptablesRestore | FaultKind::NftFlush => 5_000,
            // the runtime's DEL of the broken container cleans it up.
            FaultKind::VethDeleted => 5_000,
            // the tunnel carries traffic again after the link is up.
            FaultKind::UnderlayDown => 10_000,
            // nothing may break: flows and the store's leases carry on.
            FaultKind::ClockJump => 10_000,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::NetdTerm => "netd SIGTERM + restart",
            FaultKind::NetdKill => "netd SIGKILL + restart",
            FaultKind::EtcdStop => "etcd stop/start",
            FaultKind::EtcdKill => "etcd SIGKILL + start",
            FaultKind::IptablesFlush => "iptables -F/-X of weft's chains",
            FaultKind::IptablesRestore => "iptables-restore without weft",
            FaultKind::NftFlush => "nft flush ruleset",
            FaultKind::VethDeleted => "container veth deleted",
            FaultKind::UnderlayDown => "underlay link down/up",
            FaultKind::ClockJump => "wall clock jump",
        }
    }
}

/// One injected fault: on which host (None: the store, or every host), when
/// the injection started and ended (e.g. the link went down at `start_ms`
/// and up at `end_ms`), and when the scheduler saw it healed (None: not
/// within the limit; a violation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub host: Option<usize>,
    pub start_ms: Ms,
    pub end_ms: Ms,
    pub healed_ms: Option<Ms>,
    /// What was done and what healing was waited for, for the report.
    pub detail: String,
}

/// One sample of a host's state (every second or so). Counts, so the
/// checkers can compare them with the live set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSample {
    pub t_ms: Ms,
    pub host: usize,
    /// netd's pid (changes on restart), RSS in KiB, open fds, sockets.
    pub netd_pid: Option<u32>,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub sockets: Option<u64>,
    /// The pids of the processes named `dnsd` in the host's namespace (one;
    /// two briefly while a replacement takes over, none until a dead one
    /// is started again), and, when there is exactly one, its RSS in KiB,
    /// open fds and sockets.
    #[serde(default)]
    pub dnsd_pids: Vec<u32>,
    #[serde(default)]
    pub dnsd_rss_kib: Option<u64>,
    #[serde(default)]
    pub dnsd_fds: Option<u64>,
    #[serde(default)]
    pub dnsd_sockets: Option<u64>,
    /// Container veths on the bridge (names).
    pub veths: Vec<String>,
    /// Routes in the main table via the tunnel device (peer blocks).
    pub tunnel_routes: usize,
    /// Rules in weft's iptables chains, and whether every jump into them
    /// from the built-in chains is there.
    pub iptables_rules: usize,
    pub iptables_jumps_ok: bool,
    /// weft's nf_tables tables present.
    pub nft_tables: Vec<String>,
    /// Conntrack entries whose source or destination is a cluster address
    /// that no live container holds (after the DEL answered plus a grace).
    pub conntrack_dead: Vec<Ipv4Addr>,
}

/// One sample of the store (every few seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSample {
    pub t_ms: Ms,
    /// Addresses IPAM has handed out (ipam/addrs/...), with the key's holder.
    pub ipam_addrs: Vec<(Ipv4Addr, String)>,
    /// Endpoint records (container id, address).
    pub endpoints: Vec<(String, Ipv4Addr)>,
    /// Whether the store answered at all (false during a store fault).
    pub reachable: bool,
}

/// Everything a soak run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub lives: Vec<Life>,
    pub cni_failures: Vec<CniFailure>,
    pub dns_seconds: Vec<DnsSecond>,
    /// Failed or wrong queries, in full (at most [`DNS_KEPT_MAX`]).
    pub dns_kept: Vec<DnsSample>,
    pub gaps: Vec<Gap>,
    pub stream_errors: Vec<StreamError>,
    pub faults: Vec<Fault>,
    pub hosts: Vec<HostSample>,
    pub store: Vec<StoreSample>,
    /// When the run (churn, traffic, faults) ended; the final checks after.
    pub end_ms: Ms,
}

/// The shared, thread-safe sink every part of a run appends to.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    inner: Arc<Mutex<Timeline>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            inner: Arc::new(Mutex::new(Timeline::default())),
        }
    }

    /// Milliseconds since the run started (monotonic).
    pub fn now_ms(&self) -> Ms {
        self.start.elapsed().as_millis() as Ms
    }

    /// Appends under the lock: `rec.with(|t| t.gaps.push(gap))`.
    pub fn with<T>(&self, f: impl FnOnce(&mut Timeline) -> T) -> T {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut t)
    }

    /// A copy of everything so far.
    pub fn snapshot(&self) -> Timeline {
        self.with(|t| t.clone())
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}
