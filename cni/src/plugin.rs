//! The CNI commands, and the mapping of every internal error to a CNI error
//! code (the edge of the plugin).
//!
//! | code | when |
//! |---|---|
//! | 1 | unsupported `cniVersion` (the message lists the supported ones); CHECK with a version before 0.4.0; GC/STATUS before 1.1.0 |
//! | 4 | `CNI_COMMAND` missing or unknown; `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_NETNS` missing or invalid (namespace missing, not a network namespace, or the plugin's own); `CNI_ARGS` malformed, with unknown keys and no `IgnoreUnknown=1`, or with invalid `WEFT_*` names |
//! | 5 | stdin cannot be read; `CNI_NETNS` cannot be opened or entered |
//! | 6 | the configuration (or its `prevResult`) does not decode |
//! | 7 | the configuration is invalid (no name, bad port mappings or aliases, CHECK without `prevResult`, GC without `cni.dev/valid-attachments`) |
//! | 11 | netd is down, restarting or temporarily unable, or gave no complete answer: socket missing, connection refused or reset, closed or cut short in the headers or body, timed out (ADD, DEL, CHECK, GC); the cause is in `details` |
//! | 50 | STATUS: netd does not answer, or its store is down |
//! | 100 | ADD: the host's address block is full |
//! | 101 | ADD: the attachment exists already (host veth or `CNI_IFNAME` in the container) |
//! | 102 | the kernel refused to create, configure or delete the interfaces |
//! | 103 | netd refused the request, or its complete answer made no sense |
//! | 104 | CHECK: the attachment differs from what it should be (every difference is listed) |
//! | 105 | ADD: netd's bridge does not exist in the plugin's network namespace |

use std::collections::HashSet;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use weft_api::client::{Client, ClientError};
use weft_api::{AddEndpoint, ErrorKind, GcRequest};
use weft_model::{ContainerId, IfName};

use crate::args::CniArgs;
use crate::check::{diagnose, Expected, Observed};
use crate::config::{peek_version, NetConf};
use crate::error::{code, CniError};
use crate::netlink::{NetError, Netlink, VethConfig};
use crate::result::{CniResult, Dns, Interface, IpConfig, Route};
use crate::version::{version_json, CniVersion};
use weft_model::host_veth_name;

/// How long one request to netd may take.
pub const NETD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long STATUS waits for netd.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The CNI commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// The `CNI_*` environment (empty values count as unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
    /// `WEFT_CNI_TIMING=1`: print how long each step took to stderr.
    pub timing: bool,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Env {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
            timing: var("WEFT_CNI_TIMING").is_some_and(|v| v != "0"),
        }
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub success: bool,
}

/// Step timings for `WEFT_CNI_TIMING`.
struct Timer {
    on: bool,
    start: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Timer {
    fn new(on: bool) -> Timer {
        let now = Instant::now();
        Timer {
            on,
            start: now,
            last: now,
            steps: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        if self.on {
            let now = Instant::now();
            self.steps.push((name, now - self.last));
            self.last = now;
        }
    }

    fn report(&self, command: &str) {
        if !self.on {
            return;
        }
        let mut line = format!(
            "weft cni {command}: total {:.3} ms",
            self.start.elapsed().as_secs_f64() * 1e3
        );
        for (name, d) in &self.steps {
            line.push_str(&format!(", {name} {:.3} ms", d.as_secs_f64() * 1e3));
        }
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// Runs one plugin invocation.
pub fn run(env: &Env, stdin: &[u8]) -> Output {
    let fail = |e: CniError, version: &str| Output {
        stdout: e.to_json(version),
        success: false,
    };
    let peeked = || peek_version(stdin).unwrap_or_else(|| CniVersion::LATEST.to_string());
    let command = match env.command.as_deref() {
        None => {
            return fail(
                CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not set (ADD, DEL, CHECK, VERSION, GC or STATUS)",
                ),
                &peeked(),
            )
        }
        Some(c) => match Command::parse(c) {
            Some(c) => c,
            None => {
                return fail(
                    CniError::new(
                        code::INVALID_ENV,
                        format!(
                            "CNI_COMMAND {c:?} is unknown (ADD, DEL, CHECK, VERSION, GC or STATUS)"
                        ),
                    ),
                    &peeked(),
                )
            }
        },
    };
    if command == Command::Version {
        return Output {
            stdout: version_json(peek_version(stdin).as_deref()),
            success: true,
        };
    }
    let mut timer = Timer::new(env.timing);
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return fail(e, &peeked()),
    };
    timer.step("config");
    let outcome = match command {
        Command::Add => add(env, &conf, &mut timer).map(Some),
        Command::Del => del(env, &conf).map(|()| None),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Version => Ok(None),
    };
    timer.report(env.command.as_deref().unwrap_or(""));
    match outcome {
        Ok(stdout) => Output {
            stdout: stdout.unwrap_or_default(),
            success: true,
        },
        Err(e) => fail(e, conf.version.as_str()),
    }
}

fn invalid_env(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENV, msg)
}

fn container_id(env: &Env) -> Result<ContainerId, CniError> {
    let id = env
        .container_id
        .as_deref()
        .ok_or_else(|| invalid_env("CNI_CONTAINERID is not set"))?;
    ContainerId::new(id)
        .map_err(|e| invalid_env(format!("CNI_CONTAINERID {id:?} is invalid ({})", e.allowed)))
}

fn ifname(env: &Env) -> Result<IfName, CniError> {
    let name = env
        .ifname
        .as_deref()
        .ok_or_else(|| invalid_env("CNI_IFNAME is not set"))?;
    IfName::new(name).map_err(|e| {
        invalid_env(format!(
            "CNI_IFNAME {name:?} is not a valid interface name ({})",
            e.allowed
        ))
    })
}

fn netns(env: &Env) -> Result<&str, CniError> {
    env.netns
        .as_deref()
        .ok_or_else(|| invalid_env("CNI_NETNS is not set"))
}

/// Maps kernel-side errors to CNI errors.
fn net_error(e: NetError) -> CniError {
    let msg = e.to_string();
    match e {
        NetError::NetnsMissing { .. } | NetError::NotNetns { .. } | NetError::SameNetns { .. } => {
            CniError::new(code::INVALID_ENV, format!("CNI_NETNS: {msg}"))
        }
        NetError::NetnsOpen { .. } | NetError::Setns { .. } => {
            CniError::new(code::IO_FAILURE, format!("CNI_NETNS: {msg}"))
        }
        NetError::InvalidName(_) => CniError::new(code::INVALID_ENV, msg),
        NetError::NoBridge { .. } => CniError::new(
            code::NO_BRIDGE,
            format!("{msg} (is netd running, in this network namespace?)"),
        ),
        NetError::HostVethExists { .. } | NetError::IfnameExists { .. } => {
            CniError::new(code::ALREADY_EXISTS, msg)
        }
        NetError::Socket(_)
        | NetError::Runtime(_)
        | NetError::Thread
        | NetError::Netlink { .. } => CniError::new(
            code::INTERFACE_SETUP,
            format!("setting up the container's network interface failed: {msg}"),
        ),
    }
}

/// Maps netd client errors to CNI errors: anything short of a complete
/// answer from netd (and netd's own "try again later") is 11, with the cause
/// in the details; only a complete answer can be a 10x.
fn netd_error(e: ClientError, doing: &str) -> CniError {
    if e.is_try_again() {
        return CniError::new(
            code::TRY_AGAIN,
            format!("netd is not available, try again later ({doing})"),
        )
        .with_details(e.to_string());
    }
    match e {
        ClientError::Api(api) if api.kind == ErrorKind::PoolExhausted => CniError::new(
            code::POOL_EXHAUSTED,
            format!(
                "no free container address left on this host: {}",
                api.message
            ),
        ),
        other => CniError::new(code::NETD_ERROR, format!("netd refused {doing}: {other}")),
    }
}

fn client(conf: &NetConf, timeout: Duration) -> Client {
    Client::new(&conf.socket).with_timeout(timeout)
}

fn add(env: &Env, conf: &NetConf, timer: &mut Timer) -> Result<String, CniError> {
    let id = &container_id(env)?;
    let ifname = &ifname(env)?;
    let netns = netns(env)?;
    let args = CniArgs::parse(env.args.as_deref().unwrap_or(""))?;
    let meta = args.metadata()?;

    let nl = Netlink::new().map_err(net_error)?;
    let sandbox = nl.sandbox(netns).map_err(net_error)?;
    timer.step("netns");
    let host_veth = host_veth_name(id, ifname);
    // Refuse an existing attachment before netd is even asked, so that the
    // rollback below can never release the address of a live container.
    if nl.link(&host_veth).map_err(net_error)?.is_some() {
        return Err(CniError::new(
            code::ALREADY_EXISTS,
            format!(
                "container {id} interface {ifname} is attached already \
                 (host interface {host_veth} exists); DEL it first"
            ),
        ));
    }
    if sandbox.has_link(ifname).map_err(net_error)? {
        return Err(CniError::new(
            code::ALREADY_EXISTS,
            format!("interface {ifname} exists already in CNI_NETNS {netns}"),
        ));
    }
    timer.step("prechecks");

    let netd = client(conf, NETD_TIMEOUT);
    let request = AddEndpoint {
        container_id: id.to_string(),
        ifname: ifname.to_string(),
        netns: netns.to_string(),
        name: meta.name.map(String::from),
        service: meta.service.map(String::from),
        stack: meta.stack.map(String::from),
        aliases: conf.runtime.aliases.iter().map(|a| a.to_string()).collect(),
        port_mappings: conf.runtime.port_mappings.clone(),
        service_mode: meta.service_mode,
    };
    let ep = netd
        .add_endpoint(&request)
        .map_err(|e| netd_error(e, "the new endpoint"))?;
    timer.step("netd");

    let cfg = VethConfig {
        ifname: ifname.to_string(),
        host_veth: host_veth.clone(),
        bridge: ep.bridge.clone(),
        // An older netd does not send the MAC; the rule is the same.
        mac: ep
            .mac
            .unwrap_or_else(|| weft_model::Mac::for_addr(ep.address.ip())),
        address: ep.address,
        gateway: ep.gateway,
        mtu: ep.mtu,
    };
    let attached = match sandbox.attach(&cfg) {
        Ok(a) => a,
        Err(e) => {
            // attach() removed what it made; give the address back too.
            let mut err = net_error(e);
            if let Err(de) = netd.delete_endpoint(id, ifname) {
                err = err.with_details(format!(
                    "releasing {} in netd failed as well ({de}); a DEL or GC will release it",
                    ep.address
                ));
            }
            return Err(err);
        }
    };
    timer.step("netlink");

    let gw = Some(IpAddr::V4(ep.gateway));
    let route = |dst: Ipv4Addr, prefix: u8| {
        Ipv4Network::new(dst, prefix).map(|dst| Route {
            dst: IpNetwork::V4(dst),
            gw,
            extra: Default::default(),
        })
    };
    let routes = [
        route(Ipv4Addr::UNSPECIFIED, 0),
        route(weft_api::DNS_ADDR, 32),
    ]
    .into_iter()
    .flatten()
    .collect();
    let own = CniResult {
        interfaces: vec![
            Interface {
                name: attached.host_veth,
                mac: attached.host_mac,
                mtu: Some(ep.mtu),
                ..Default::default()
            },
            Interface {
                name: attached.ifname,
                mac: attached.container_mac,
                mtu: Some(ep.mtu),
                sandbox: Some(netns.to_string()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: IpNetwork::V4(ep.address),
            gateway: gw,
            interface: Some(1),
        }],
        routes,
        dns: Dns::from(&ep.dns),
    };
    let result = match &conf.prev_result {
        Some(prev) => {
            let mut r = prev.clone();
            r.append(own);
            r
        }
        None => own,
    };
    Ok(result.to_json(conf.version))
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let id = &container_id(env)?;
    let ifname = &ifname(env)?;
    // The veth first (it needs nothing but the name), then the address.
    // Neither a missing namespace nor an unknown container is an error.
    let host_veth = host_veth_name(id, ifname);
    let local = Netlink::new().and_then(|nl| nl.delete_link(&host_veth));
    let remote = client(conf, NETD_TIMEOUT).delete_endpoint(id, ifname);
    let remote = match remote {
        Err(ClientError::Api(e)) if e.kind == ErrorKind::NotFound => Ok(()),
        other => other.map(|_| ()),
    };
    match (local, remote) {
        (Ok(_), Ok(())) => Ok(()),
        (local, Err(e)) => {
            let err = netd_error(e, "releasing the endpoint");
            match local {
                Err(le) => Err(err.add_details(format!(
                    "deleting host interface {host_veth} failed as well: {le}"
                ))),
                Ok(_) => Err(err),
            }
        }
        (Err(e), Ok(())) => Err(CniError::new(
            code::INTERFACE_SETUP,
            format!("deleting host interface {host_veth} failed: {e}"),
        )),
    }
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if !conf.version.has_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK is not supported with cniVersion {} (0.4.0 and later)",
                conf.version
            ),
        ));
    }
    let id = &container_id(env)?;
    let ifname = &ifname(env)?;
    let netns = netns(env)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult (the result of the ADD being checked)",
        )
    })?;
    let ep = client(conf, NETD_TIMEOUT)
        .get_endpoint(id, ifname)
        .map_err(|e| netd_error(e, "looking up the endpoint"))?
        .ok_or_else(|| {
            CniError::new(
                code::CHECK_FAILED,
                format!("netd has no endpoint for container {id} interface {ifname}"),
            )
        })?;
    let nl = Netlink::new().map_err(net_error)?;
    let sandbox = nl.sandbox(netns).map_err(net_error)?;
    let host_veth = host_veth_name(id, ifname);
    let host = nl.link(&host_veth).map_err(net_error)?;
    let bridge = if IfName::is_valid(&ep.bridge) {
        nl.link(&ep.bridge).map_err(net_error)?
    } else {
        None
    };
    let iface = sandbox.inspect(ifname).map_err(net_error)?;
    let problems = diagnose(
        &Expected {
            endpoint: &ep,
            ifname,
            netns,
            host_veth: &host_veth,
        },
        prev,
        &Observed {
            host: host.as_ref(),
            bridge: bridge.as_ref(),
            iface: iface.as_ref(),
        },
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "container {id} interface {ifname} is not as expected: {}",
                problems.join("; ")
            ),
        ))
    }
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    if !conf.version.is_1_1() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "GC is not supported with cniVersion {} (1.1.0 and later)",
                conf.version
            ),
        ));
    }
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (refusing to release every endpoint)",
        )
    })?;
    // Stale host veths first: those of our naming scheme that belong to no
    // valid attachment (their containers' peers go with them).
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let mut failures = Vec::new();
    match Netlink::new().and_then(|nl| nl.host_veths().map(|v| (nl, v))) {
        Ok((nl, veths)) => {
            for name in veths.iter().filter(|n| !keep.contains(*n)) {
                if let Err(e) = nl.delete_link(name) {
                    failures.push(format!("deleting stale host interface {name}: {e}"));
                }
            }
        }
        Err(e) => failures.push(format!("listing host interfaces: {e}")),
    }
    client(conf, NETD_TIMEOUT)
        .gc(&GcRequest { valid })
        .map_err(|e| {
            let err = netd_error(e, "garbage collection");
            if failures.is_empty() {
                err
            } else {
                err.add_details(failures.join("; "))
            }
        })?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::INTERFACE_SETUP, failures.join("; ")))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    if !conf.version.is_1_1() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "STATUS is not supported with cniVersion {} (1.1.0 and later)",
                conf.version
            ),
        ));
    }
    match client(conf, STATUS_TIMEOUT).status() {
        Ok(s) if s.store_ok => Ok(()),
        Ok(s) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "netd cannot allocate addresses now: its store ({}) is unavailable",
                s.store
            ),
        )),
        Err(e) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("netd is not available: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: Some(command.into()),
            ..Default::default()
        }
    }

    fn code_of(out: &Output) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn commands() {
        for (s, c) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("VERSION", Command::Version),
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
        ] {
            assert_eq!(Command::parse(s), Some(c));
        }
        assert_eq!(Command::parse("add"), None);
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        let out = run(&Env::default(), b"{}");
        assert!(!out.success);
        assert_eq!(code_of(&out), 4);
        let out = run(&env("FROB"), br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(code_of(&out), 4);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(&env("VERSION"), b"");
        assert!(out.success);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn env_validation() {
        let conf = br#"{"cniVersion":"1.0.0","name":"weft","socket":"/nonexistent/x.sock"}"#;
        let mut e = env("ADD");
        assert_eq!(code_of(&run(&e, conf)), 4); // no CNI_CONTAINERID
        e.container_id = Some("-bad".into());
        assert_eq!(code_of(&run(&e, conf)), 4);
        e.container_id = Some("abc".into());
        assert_eq!(code_of(&run(&e, conf)), 4); // no CNI_IFNAME
        e.ifname = Some("eth0/x".into());
        assert_eq!(code_of(&run(&e, conf)), 4);
        e.ifname = Some("eth0".into());
        assert_eq!(code_of(&run(&e, conf)), 4); // no CNI_NETNS
        e.netns = Some("/nonexistent/netns".into());
        let out = run(&e, conf);
        assert_eq!(code_of(&out), 4);
        assert!(out.stdout.contains("CNI_NETNS"), "{}", out.stdout);
        e.args = Some("NOPE=1".into());
        assert_eq!(code_of(&run(&e, conf)), 4);
    }

    #[test]
    fn maps_netd_errors() {
        let down = Client::new("/nonexistent/netd.sock").status().unwrap_err();
        assert_eq!(netd_error(down, "x").code, code::TRY_AGAIN);
        let full = ClientError::Api(weft_api::ApiError::new(
            ErrorKind::PoolExhausted,
            "block full",
        ));
        let e = netd_error(full, "x");
        assert_eq!(e.code, code::POOL_EXHAUSTED);
        assert!(e.msg.contains("block full"));
        let busy = ClientError::Api(weft_api::ApiError::new(ErrorKind::TryAgainLater, "store"));
        assert_eq!(netd_error(busy, "x").code, code::TRY_AGAIN);
        let bad = ClientError::Api(weft_api::ApiError::new(ErrorKind::InvalidRequest, "no"));
        assert_eq!(netd_error(bad, "x").code, code::NETD_ERROR);
    }

    /// Fake netds that misbehave, for the mapping of incomplete answers.
    mod fake {
        pub use weft_api::testing::{http, read_request, socket_path as path, FakeNetd as Netd};
    }

    /// What ADD's mapping makes of asking `socket` for a new endpoint.
    fn add_error(socket: &std::path::Path, timeout: Duration) -> CniError {
        let req = AddEndpoint {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/nonexistent".into(),
            name: None,
            service: None,
            stack: None,
            aliases: Vec::new(),
            port_mappings: Vec::new(),
            service_mode: None,
        };
        let e = Client::new(socket)
            .with_timeout(timeout)
            .add_endpoint(&req)
            .unwrap_err();
        netd_error(e, "the new endpoint")
    }

    /// The error a whole CHECK run prints against `socket` (CHECK asks netd
    /// before it looks at any namespace, so this needs no root).
    fn check_error(socket: &std::path::Path) -> serde_json::Value {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft",
            "socket": socket,
            "prevResult": {"cniVersion": "1.0.0"},
        });
        let env = Env {
            command: Some("CHECK".into()),
            container_id: Some("abc".into()),
            ifname: Some("eth0".into()),
            netns: Some("/nonexistent".into()),
            ..Default::default()
        };
        let out = run(&env, conf.to_string().as_bytes());
        assert!(!out.success, "{}", out.stdout);
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// Code 11, saying what to do, with `cause` in the details.
    #[track_caller]
    fn assert_try_again(e: &CniError, cause: &str) {
        assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
        assert!(e.msg.contains("try again later"), "{e:?}");
        let details = e.details.as_deref().unwrap_or_default();
        assert!(details.contains(cause), "details lack {cause:?}: {e:?}");
        assert!(details.contains("the runtime should retry"), "{e:?}");
    }

    #[track_caller]
    fn assert_check_try_again(v: &serde_json::Value, cause: &str) {
        assert_eq!(v["code"], code::TRY_AGAIN, "{v}");
        let details = v["details"].as_str().unwrap_or_default();
        assert!(details.contains(cause), "details lack {cause:?}: {v}");
    }

    const T: Duration = Duration::from_secs(10);

    // (a)
    #[test]
    fn missing_socket_is_try_again() {
        let (_dir, socket) = fake::path();
        assert_try_again(&add_error(&socket, T), "No such file");
        assert_check_try_again(&check_error(&socket), "No such file");
    }

    // (b)
    #[test]
    fn refused_connection_is_try_again() {
        let (_dir, socket) = fake::path();
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists(), "the socket file stays behind");
        assert_try_again(&add_error(&socket, T), "refused");
        assert_check_try_again(&check_error(&socket), "refused");
    }

    // (c)
    #[test]
    fn close_without_answer_is_try_again() {
        let netd = fake::Netd::answer(2, "");
        assert_try_again(&add_error(netd.socket(), T), "before any answer");
        assert_check_try_again(&check_error(netd.socket()), "before any answer");
        netd.join();
    }

    // (d) The issue: this was 103 "unexpected answer from netd ...: no end
    // of headers".
    #[test]
    fn close_in_the_headers_is_try_again() {
        for half in ["HTTP/1.", "HTTP/1.1 200 OK\r\ncontent-len"] {
            let netd = fake::Netd::answer(2, half);
            assert_try_again(
                &add_error(netd.socket(), T),
                "before the end of the headers",
            );
            assert_check_try_again(&check_error(netd.socket()), "before the end of the headers");
            netd.join();
        }
    }

    // (e)
    #[test]
    fn close_in_the_body_is_try_again() {
        let netd = fake::Netd::answer(
            2,
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
        );
        assert_try_again(&add_error(netd.socket(), T), "after 10 of 100 body bytes");
        assert_check_try_again(&check_error(netd.socket()), "after 10 of 100 body bytes");
        netd.join();
    }

    // (f)
    #[test]
    fn silent_netd_is_try_again_after_the_timeout() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let netd = fake::Netd::serve(1, move |mut s| {
            fake::read_request(&mut s);
            let _ = wait.recv(); // hold the connection open, silent
        });
        let e = add_error(netd.socket(), Duration::from_millis(300));
        assert_try_again(&e, "no complete answer within 300ms");
        drop(release);
        netd.join();
    }

    // (g) Closing a Unix socket with unread input resets the peer.
    #[test]
    fn reset_is_try_again() {
        let netd = fake::Netd::serve(2, |mut s| {
            // One byte: the request (written in one go) has arrived; the
            // rest stays unread.
            std::io::Read::read_exact(&mut s, &mut [0u8; 1]).unwrap();
        });
        assert_try_again(&add_error(netd.socket(), T), "reset");
        assert_check_try_again(&check_error(netd.socket()), "reset");
        netd.join();
    }

    // (h)
    #[test]
    fn complete_answer_with_bad_json_is_netd_error() {
        let netd = fake::Netd::answer(2, fake::http(200, "{\"not\": \"an endpoint\"}"));
        let e = add_error(netd.socket(), T);
        assert_eq!(e.code, code::NETD_ERROR, "{e:?}");
        assert!(e.msg.contains("decoding answer"), "{e:?}");
        assert_eq!(check_error(netd.socket())["code"], code::NETD_ERROR);
        netd.join();
    }

    // (i)
    #[test]
    fn complete_error_answers_map_by_kind() {
        for (kind, want) in [
            (ErrorKind::TryAgainLater, code::TRY_AGAIN),
            (ErrorKind::PoolExhausted, code::POOL_EXHAUSTED),
            (ErrorKind::InvalidRequest, code::NETD_ERROR),
            (ErrorKind::Internal, code::NETD_ERROR),
        ] {
            let body = serde_json::to_string(&weft_api::ApiError::new(kind, "because")).unwrap();
            let netd = fake::Netd::answer(2, fake::http(kind.http_status(), &body));
            let e = add_error(netd.socket(), T);
            assert_eq!(e.code, want, "{kind:?}: {e:?}");
            assert!(
                e.msg.contains("because") || e.details.as_deref().unwrap_or("").contains("because"),
                "{e:?}"
            );
            assert_eq!(check_error(netd.socket())["code"], want, "{kind:?}");
            netd.join();
        }
    }

    #[test]
    fn maps_net_errors() {
        let p = std::path::PathBuf::from("/x");
        assert_eq!(
            net_error(NetError::NetnsMissing { path: p.clone() }).code,
            code::INVALID_ENV
        );
        assert_eq!(
            net_error(NetError::SameNetns { path: p }).code,
            code::INVALID_ENV
        );
        assert_eq!(
            net_error(NetError::NoBridge { bridge: "b".into() }).code,
            code::NO_BRIDGE
        );
        assert_eq!(
            net_error(NetError::IfnameExists {
                ifname: "eth0".into()
            })
            .code,
            code::ALREADY_EXISTS
        );
        assert_eq!(
            net_error(NetError::Netlink {
                op: "x".into(),
                errno: Some(22),
                message: "Invalid argument".into()
            })
            .code,
            code::INTERFACE_SETUP
        );
    }
}
