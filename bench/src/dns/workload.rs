//! The workload: which names exist ([`plan`]), how each server is told about
//! them (dnsd's store, dnsmasq's hosts file, unbound's `local-data`), and the
//! query mix dnsperf replays.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use weft_model::{ContainerId, DnsConfig, DnsName, EndpointRecord, HostId, IfName};
use weft_store::{SqliteStore, Store};

/// The domain dnsd serves by default (it runs without `--domain` here).
const DOMAIN: &str = weft_model::DEFAULT_DOMAIN;

pub(super) struct Service {
    pub(super) stack: String,
    pub(super) name: String,
    pub(super) containers: Vec<(String, Ipv4Addr)>,
}

pub(super) fn plan(services: usize) -> Vec<Service> {
    let mut out = Vec::with_capacity(services);
    let mut n = 0u32;
    for i in 0..services {
        let stack = format!("stack{}", i / 10);
        let name = format!("svc{}", i % 10);
        let mut containers = Vec::new();
        for k in 0..2 {
            // 250 addresses per /24 block, from 10.42.0.2 on.
            let addr = Ipv4Addr::new(10, 42, (n / 250) as u8, (2 + n % 250) as u8);
            n += 1;
            containers.push((format!("{name}-{k}"), addr));
        }
        out.push(Service {
            stack,
            name,
            containers,
        });
    }
    out
}

/// A deterministic generator for the query mix.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn ptr_name(a: Ipv4Addr) -> String {
    let o = a.octets();
    format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    ServiceFqdn,
    ServiceShort,
    ContainerFqdn,
    Ptr,
    NxDomain,
}

pub(super) fn query_for(kind: Kind, s: &Service, k: usize, salt: u64) -> (String, &'static str) {
    match kind {
        Kind::ServiceFqdn => (format!("{}.{}.{DOMAIN}", s.name, s.stack), "A"),
        Kind::ServiceShort => (format!("{}.{}", s.name, s.stack), "A"),
        Kind::ContainerFqdn => (format!("{}.{}.{DOMAIN}", s.containers[k].0, s.stack), "A"),
        Kind::Ptr => (ptr_name(s.containers[k].1), "PTR"),
        Kind::NxDomain => (format!("nosuch{}.{}.{DOMAIN}", salt % 1000, s.stack), "A"),
    }
}

pub(super) fn query_file(plan: &[Service], path: &Path, lines: usize) -> Result<()> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut text = String::with_capacity(lines * 40);
    for _ in 0..lines {
        let r = rng.below(100);
        let kind = match r {
            0..=34 => Kind::ServiceFqdn,
            35..=59 => Kind::ServiceShort,
            60..=74 => Kind::ContainerFqdn,
            75..=89 => Kind::Ptr,
            _ => Kind::NxDomain,
        };
        let s = &plan[rng.below(plan.len())];
        let k = rng.below(2);
        let salt = rng.next();
        let (name, t) = query_for(kind, s, k, salt);
        let _ = writeln!(text, "{name} {t}");
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes every container of the plan as an endpoint record, the way netd
/// does (the model's record type and key layout).
pub(super) async fn fill_store(plan: &[Service], path: &Path) -> Result<()> {
    let store = SqliteStore::open(path)?;
    let keys = weft_model::Keys::default();
    let name = |s: &str| DnsName::new(s).with_context(|| format!("bench name {s:?}"));
    for s in plan {
        for (cname, addr) in &s.containers {
            let id = format!("{}-{cname}", s.stack);
            let record = EndpointRecord {
                container_id: ContainerId::new(id.as_str())?,
                ifname: IfName::new("eth0")?,
                netns: String::new(),
                host_id: HostId::new("bench")?,
                address: format!("{addr}/24").parse()?,
                gateway: Ipv4Addr::new(10, 42, 0, 1),
                mtu: 1420,
                bridge: IfName::new("weft0")?,
                name: Some(name(cname)?),
                service: Some(name(&s.name)?),
                stack: Some(name(&s.stack)?),
                aliases: Vec::new(),
                port_mappings: Vec::new(),
                dns: DnsConfig {
                    domain: DOMAIN.into(),
                    ..DnsConfig::default()
                },
                created_at_ms: 0,
            };
            store
                .put(
                    &keys.endpoint("bench", &id, "eth0"),
                    &serde_json::to_vec(&record)?,
                    None,
                )
                .await?;
        }
    }
    Ok(())
}

pub(super) fn dnsmasq_hosts(plan: &[Service], path: &Path) -> Result<()> {
    let mut text = String::new();
    for s in plan {
        for (cname, addr) in &s.containers {
            // The first name is what PTR answers.
            let _ = writeln!(
                text,
                "{addr} {cname}.{st}.{DOMAIN} {svc}.{st}.{DOMAIN} {svc}.{st} {cname}.{st}",
                st = s.stack,
                svc = s.name
            );
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub(super) fn unbound_conf(
    plan: &[Service],
    dir: &Path,
    port: u16,
    threads: u32,
) -> Result<PathBuf> {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: {threads}\n  so-reuseport: yes\n  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n  module-config: \"iterator\"\n  rrset-roundrobin: yes\n  minimal-responses: yes\n  local-zone: \"{DOMAIN}.\" static\n  local-zone: \"42.10.in-addr.arpa.\" static",
        dir = dir.display()
    );
    let mut stacks: Vec<&str> = plan.iter().map(|s| s.stack.as_str()).collect();
    stacks.dedup();
    for st in stacks {
        let _ = writeln!(c, "  local-zone: \"{st}.\" static");
    }
    for s in plan {
        for (cname, addr) in &s.containers {
            let st = &s.stack;
            let svc = &s.name;
            let _ = writeln!(c, "  local-data: \"{svc}.{st}.{DOMAIN}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data: \"{svc}.{st}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data: \"{cname}.{st}.{DOMAIN}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data-ptr: \"{addr} 1 {cname}.{st}.{DOMAIN}.\"");
        }
    }
    c.push_str("remote-control:\n  control-enable: no\n");
    let path = dir.join("unbound.conf");
    std::fs::write(&path, c).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// dnsd reads what the bench writes: every container of the plan is an
    /// endpoint record of the model's type under the endpoints prefix.
    #[tokio::test]
    async fn store_holds_a_record_per_container() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("store.db");
        let plan = plan(12);
        fill_store(&plan, &db).await.unwrap();
        let store = SqliteStore::open(&db).unwrap();
        let listed = store
            .get_prefix(&weft_model::Keys::default().endpoints())
            .await
            .unwrap();
        let containers: usize = plan.iter().map(|s| s.containers.len()).sum();
        assert_eq!(listed.kvs.len(), containers);
        let first = &plan[0];
        let records: Vec<EndpointRecord> = listed
            .kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).unwrap())
            .collect();
        let r = records
            .iter()
            .find(|r| r.address.ip() == first.containers[0].1)
            .unwrap();
        assert_eq!(r.service.as_ref().unwrap().as_str(), first.name);
        assert_eq!(r.stack.as_ref().unwrap().as_str(), first.stack);
        assert_eq!(r.dns.domain, DOMAIN);
    }
}
