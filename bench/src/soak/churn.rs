//! Container churn through the real CNI plugin, as a runtime drives it.
//!
//! * [`attach_probes`]: [`PROBES_PER_HOST`] long-lived containers per host
//!   (service [`PROBE_SERVICE`] in stack [`PROBE_STACK`]), never churned.
//! * [`run`]: one thread per host, together `churn_per_s` CNI calls a
//!   second: ADD while the host has fewer than its share of `max_live`
//!   churned containers, else DEL a random one. Each ADD gets a unique id
//!   and name, a service of [`SERVICES`] (its stack fixed by the service),
//!   sometimes an alias and sometimes a published TCP host port (unique on
//!   the host while live). Choices come from the run's seed ([`Rng`]).
//! * Like a runtime: a failed ADD is DELed (nothing may leak); a failed DEL
//!   is retried every [`DEL_RETRY`]; every failed call is a
//!   [`CniFailure`]. Each container's [`Life`] is recorded before the next
//!   call, and its namespace removed after its DEL.
//! * The live churned set is the recorder's lives that are not probes and
//!   have no DEL sent ([`live`]); a DEL claims a container first
//!   ([`delete`]), so the churn and the fault scheduler never both DEL it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use weft_tests::weft::{CniCall, CniOutput};
use weft_tests::Container;

use super::rng::Rng;
use super::timeline::{CniFailure, Life};
use super::{Probe, World, PROBES_PER_HOST};

/// The probes' service and stack (so DNS has `tasks.probe.soak`).
pub const PROBE_SERVICE: &str = "probe";
pub const PROBE_STACK: &str = "soak";
/// The churned containers' services; service `i` is in stack `STACKS[i % 2]`.
pub const SERVICES: [&str; 5] = ["svc0", "svc1", "svc2", "svc3", "svc4"];
pub const STACKS: [&str; 2] = ["stack-a", "stack-b"];
/// The container interface every ADD asks for.
pub const IFNAME: &str = "eth0";
/// Published host ports are picked in this range (TCP, container port 80).
pub const HOST_PORTS: (u16, u16) = (20_000, 29_999);
const CONTAINER_PORT: u16 = 80;
/// How often an ADD gets an alias, and a published port.
const ALIAS_CHANCE: f64 = 0.3;
const PORT_CHANCE: f64 = 0.25;
/// A runtime retries a failed DEL this often...
pub const DEL_RETRY: Duration = Duration::from_millis(500);
/// ...and the soak gives up (an error of the run) after this long.
const DEL_GIVE_UP: Duration = Duration::from_secs(120);

/// What a container is given at ADD (and at DEL: a runtime passes the same
/// runtimeConfig again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub id: String,
    pub host: usize,
    /// Its DNS name (`WEFT_NAME`) and lab container name.
    pub name: String,
    pub service: String,
    pub stack: String,
    pub aliases: Vec<String>,
    pub ports: Vec<u16>,
}

impl Spec {
    /// The `n`th churned container of `host`, its extras drawn from `rng`;
    /// a published port avoids the host ports in `taken`.
    pub fn churned(rng: &mut Rng, host: usize, n: u64, taken: &BTreeSet<u16>) -> Spec {
        let id = format!("c{host}-{n}");
        let svc = rng.below(SERVICES.len() as u64) as usize;
        let aliases = if rng.chance(ALIAS_CHANCE) {
            vec![format!("{id}-alias")]
        } else {
            vec![]
        };
        let mut ports = vec![];
        if rng.chance(PORT_CHANCE) {
            let span = u64::from(HOST_PORTS.1 - HOST_PORTS.0) + 1;
            // A free port exists unless the host has ~10,000 published.
            for _ in 0..64 {
                let p = HOST_PORTS.0 + rng.below(span) as u16;
                if !taken.contains(&p) {
                    ports.push(p);
                    break;
                }
            }
        }
        Spec {
            name: id.clone(),
            id,
            host,
            service: SERVICES[svc].to_owned(),
            stack: STACKS[svc % STACKS.len()].to_owned(),
            aliases,
            ports,
        }
    }

    /// Probe `i` of `host`.
    pub fn probe(host: usize, i: usize) -> Spec {
        Spec {
            id: format!("probe-{host}-{i}"),
            host,
            name: format!("probe-{host}-{i}"),
            service: PROBE_SERVICE.to_owned(),
            stack: PROBE_STACK.to_owned(),
            aliases: vec![],
            ports: vec![],
        }
    }

    /// The spec a recorded container was added with.
    pub fn of(life: &Life) -> Spec {
        Spec {
            id: life.id.clone(),
            host: life.host,
            name: life.name.clone(),
            service: life.service.clone().unwrap_or_default(),
            stack: life.stack.clone().unwrap_or_default(),
            aliases: life.aliases.clone(),
            ports: life.ports.clone(),
        }
    }

    /// `CNI_ARGS`: name, service and stack.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;WEFT_NAME={};WEFT_SERVICE={};WEFT_STACK={}",
            self.name, self.service, self.stack
        )
    }

    /// The network config on stdin: `base` (the host's config) with the
    /// capabilities and the runtimeConfig (published ports, aliases) a
    /// runtime adds.
    pub fn cni_config(&self, base: &str) -> Result<String> {
        let mut conf: Value = serde_json::from_str(base).context("the CNI config")?;
        let net = conf["name"].as_str().unwrap_or("weft").to_owned();
        let obj = conf
            .as_object_mut()
            .ok_or_else(|| anyhow!("the CNI config is not an object"))?;
        obj.insert(
            "capabilities".into(),
            json!({"portMappings": true, "aliases": true}),
        );
        let mappings: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"hostPort": p, "containerPort": CONTAINER_PORT, "protocol": "tcp"}))
            .collect();
        obj.insert(
            "runtimeConfig".into(),
            json!({"portMappings": mappings, "aliases": {net: self.aliases}}),
        );
        Ok(conf.to_string())
    }

    fn life(&self, addr: Ipv4Addr, add_sent_ms: u64, added_ms: u64, probe: bool) -> Life {
        Life {
            id: self.id.clone(),
            host: self.host,
            name: self.name.clone(),
            service: Some(self.service.clone()),
            stack: Some(self.stack.clone()),
            aliases: self.aliases.clone(),
            ports: self.ports.clone(),
            addr,
            add_sent_ms,
            added_ms,
            del_sent_ms: None,
            deleted_ms: None,
            probe,
        }
    }
}

/// One CNI call for `spec` on its host; `Err` carries the plugin's error.
fn cni(w: &World, command: &str, spec: &Spec, netns: &Container) -> Result<CniOutput, String> {
    let config = spec
        .cni_config(&w.cni_configs[spec.host])
        .map_err(|e| format!("{e:#}"))?;
    let out = CniCall {
        host: w.lab.host(spec.host).netns(),
        command,
        container_id: &spec.id,
        netns: &netns.path().display().to_string(),
        ifname: IFNAME,
        args: &spec.cni_args(),
        config: &config,
    }
    .run()
    .map_err(|e| format!("running the plugin: {e}"))?;
    if out.ok() {
        Ok(out)
    } else {
        Err(format!(
            "exit {}: {} {}",
            out.code,
            out.stdout.trim(),
            out.stderr.trim()
        ))
    }
}

fn record_failure(w: &World, command: &str, spec: &Spec, sent_ms: u64, error: String) {
    let t_ms = w.rec.now_ms();
    w.rec.with(|t| {
        t.cni_failures.push(CniFailure {
            sent_ms,
            t_ms,
            host: spec.host,
            command: command.to_owned(),
            id: spec.id.clone(),
            error,
        })
    });
}

/// ADD `spec` in `netns`: its Life (recorded by the caller) or, after a
/// failure (recorded here), the error once the runtime's DEL cleaned up.
fn add(w: &World, spec: &Spec, netns: &Container, probe: bool) -> Result<Option<Life>> {
    let sent = w.rec.now_ms();
    let r = cni(w, "ADD", spec, netns).and_then(|out| out.address().map_err(|e| e.to_string()));
    let added = w.rec.now_ms();
    match r {
        Ok(addr) => Ok(Some(spec.life(addr, sent, added, probe))),
        Err(e) => {
            record_failure(w, "ADD", spec, sent, e);
            del_until_ok(w, spec, netns)?;
            Ok(None)
        }
    }
}

/// DEL until it succeeds (every [`DEL_RETRY`], each failure recorded).
fn del_until_ok(w: &World, spec: &Spec, netns: &Container) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let sent = w.rec.now_ms();
        match cni(w, "DEL", spec, netns) {
            Ok(_) => return Ok(()),
            Err(e) => {
                record_failure(w, "DEL", spec, sent, e.clone());
                if t0.elapsed() > DEL_GIVE_UP {
                    bail!(
                        "CNI DEL {} on host {} failed for {:?}: {e}",
                        spec.id,
                        spec.host,
                        DEL_GIVE_UP
                    );
                }
            }
        }
        std::thread::sleep(DEL_RETRY);
    }
}

/// Attaches the probes: [`PROBES_PER_HOST`] per host, recorded as lives.
pub fn attach_probes(w: &World) -> Result<Vec<Probe>> {
    let mut probes = vec![];
    for host in 0..w.hosts() {
        for i in 0..PROBES_PER_HOST {
            let spec = Spec::probe(host, i);
            let container = w.lab.container(host, &spec.name)?;
            let life = add(w, &spec, &container, true)?
                .ok_or_else(|| anyhow!("CNI ADD of probe {} on host {host} failed", spec.id))?;
            w.rec.with(|t| t.lives.push(life.clone()));
            probes.push(Probe { container, life });
        }
    }
    Ok(probes)
}

/// The churned containers live now (ADD answered, no DEL sent).
pub fn live(w: &World) -> Vec<Life> {
    w.rec.with(|t| {
        t.lives
            .iter()
            .filter(|l| !l.probe && l.del_sent_ms.is_none())
            .cloned()
            .collect()
    })
}

/// Claims churned container `id` for its DEL (sets `del_sent_ms`): None if
/// it is not live or someone else claimed it.
fn claim(w: &World, id: &str) -> Option<Life> {
    let now = w.rec.now_ms();
    w.rec.with(|t| {
        let life = t
            .lives
            .iter_mut()
            .rev()
            .find(|l| l.id == id && !l.probe && l.del_sent_ms.is_none())?;
        life.del_sent_ms = Some(now);
        Some(life.clone())
    })
}

/// DELs churned container `id` as its runtime does (retrying until it
/// succeeds), records when it answered and removes its namespace. False if
/// it was not live or another part is deleting it.
pub fn delete(w: &World, id: &str) -> Result<bool> {
    let Some(life) = claim(w, id) else {
        return Ok(false);
    };
    let spec = Spec::of(&life);
    let netns = w
        .lab
        .containers()
        .into_iter()
        .find(|c| c.host_index() == life.host && c.container_name() == life.name)
        .ok_or_else(|| anyhow!("no lab namespace for container {id}"))?;
    del_until_ok(w, &spec, &netns)?;
    let done = w.rec.now_ms();
    w.rec.with(|t| {
        if let Some(l) = t.lives.iter_mut().rev().find(|l| l.id == id && !l.probe) {
            l.deleted_ms = Some(done);
        }
    });
    w.lab
        .remove_container(&netns)
        .with_context(|| format!("removing the namespace of {id}"))?;
    Ok(true)
}

/// Churns until the run stops: one thread per host.
pub fn run(w: &World) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..w.hosts())
            .map(|h| s.spawn(move || host_churn(w, h)))
            .collect();
        let mut first_err = None;
        for (h, handle) in handles.into_iter().enumerate() {
            let r = handle
                .join()
                .unwrap_or_else(|_| Err(anyhow!("churn of host {h} panicked")));
            if let Err(e) = r {
                w.request_stop();
                first_err.get_or_insert(e.context(format!("churn on host {h}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

/// Host `h`'s share: ADD below its share of `max_live`, else DEL one.
fn host_churn(w: &World, h: usize) -> Result<()> {
    let hosts = w.hosts().max(1);
    let mut rng = Rng::new(w.opts.seed, 1 + h as u64);
    let cap = w.opts.max_live.div_ceil(hosts).max(1);
    if w.opts.churn_per_s <= 0.0 {
        while w.sleep(Duration::from_secs(1)) {}
        return Ok(());
    }
    let interval = Duration::from_secs_f64(hosts as f64 / w.opts.churn_per_s);
    let mut next = Instant::now();
    let mut n = 0u64;
    while !w.stopped() {
        let now = Instant::now();
        if next > now && !w.sleep(next - now) {
            break;
        }
        // On schedule, but no burst after a stall (a DEL retried through
        // a fault).
        next = (next + interval).max(Instant::now());
        let mine: Vec<Life> = live(w).into_iter().filter(|l| l.host == h).collect();
        if mine.len() < cap {
            n += 1;
            let taken: BTreeSet<u16> = mine.iter().flat_map(|l| l.ports.clone()).collect();
            let spec = Spec::churned(&mut rng, h, n, &taken);
            let netns = w.lab.container(h, &spec.name)?;
            match add(w, &spec, &netns, false)? {
                Some(life) => w.rec.with(|t| t.lives.push(life)),
                None => w
                    .lab
                    .remove_container(&netns)
                    .with_context(|| format!("removing the namespace of {}", spec.id))?,
            }
        } else {
            let victim = &mine[rng.below(mine.len() as u64) as usize];
            delete(w, &victim.id)?;
        }
    }
    Ok(())
}

/// DELs every live churned container (per host in parallel), for the final
/// leak checks.
pub fn delete_all(w: &World) -> Result<()> {
    let all = live(w);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..w.hosts())
            .map(|h| {
                let ids: Vec<String> = all
                    .iter()
                    .filter(|l| l.host == h)
                    .map(|l| l.id.clone())
                    .collect();
                s.spawn(move || -> Result<()> {
                    for id in ids {
                        delete(w, &id)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first_err = None;
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a final DEL panicked")));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        r#"{"cniVersion":"1.0.0","name":"weft","type":"weft","socket":"/x/netd.sock"}"#;

    #[test]
    fn churned_specs_are_unique_valid_and_replay() {
        let mut a = Rng::new(42, 1);
        let mut b = Rng::new(42, 1);
        let mut taken = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let (mut with_alias, mut with_port) = (0, 0);
        for n in 1..=400 {
            let s = Spec::churned(&mut a, 1, n, &taken);
            assert_eq!(s, Spec::churned(&mut b, 1, n, &taken));
            assert!(ids.insert(s.id.clone()));
            weft_model::DnsName::new(s.name.clone()).unwrap();
            weft_model::DnsName::new(s.service.clone()).unwrap();
            weft_model::DnsName::new(s.stack.clone()).unwrap();
            for al in &s.aliases {
                weft_model::DnsName::new(al.clone()).unwrap();
            }
            with_alias += usize::from(!s.aliases.is_empty());
            for p in &s.ports {
                assert!((HOST_PORTS.0..=HOST_PORTS.1).contains(p));
                assert!(taken.insert(*p), "port {p} handed out twice");
                with_port += 1;
            }
        }
        assert!(with_alias > 50 && with_alias < 250, "{with_alias}");
        assert!(with_port > 40 && with_port < 200, "{with_port}");
    }

    #[test]
    fn config_carries_ports_and_aliases_and_keeps_the_base() {
        let s = Spec {
            id: "c0-1".into(),
            host: 0,
            name: "c0-1".into(),
            service: "svc1".into(),
            stack: "stack-b".into(),
            aliases: vec!["c0-1-alias".into()],
            ports: vec![20_001],
        };
        let v: Value = serde_json::from_str(&s.cni_config(BASE).unwrap()).unwrap();
        assert_eq!(v["socket"], "/x/netd.sock");
        assert_eq!(v["runtimeConfig"]["portMappings"][0]["hostPort"], 20_001);
        assert_eq!(v["runtimeConfig"]["portMappings"][0]["protocol"], "tcp");
        assert_eq!(v["runtimeConfig"]["aliases"]["weft"][0], "c0-1-alias");
        assert_eq!(
            s.cni_args(),
            "IgnoreUnknown=1;WEFT_NAME=c0-1;WEFT_SERVICE=svc1;WEFT_STACK=stack-b"
        );
        assert_eq!(Spec::of(&s.life(Ipv4Addr::LOCALHOST, 1, 2, false)), s);
    }
}
