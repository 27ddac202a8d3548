//! netd, weft's per-host daemon: host setup (bridge, addresses, sysctls),
//! iptables NAT and published ports, endpoints and their addresses, the
//! tunnels to the other hosts, the control API on a Unix socket, and
//! metrics and health over HTTP. `daemon` wires the modules together; see
//! its docs for where each concern lives.

pub mod api;
pub mod command;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod daemon;
pub mod dns;
pub mod endpoints;
pub mod enforce;
pub mod firewall;
pub mod health;
pub mod host;
pub mod install;
pub mod layered;
pub mod mesh;
pub mod metrics;
pub mod nat;
pub mod nft;
pub mod policy;
pub mod services;
pub mod tunnel;

use anyhow::Context;

use crate::config::Config;
use crate::daemon::Daemon;

/// Runs the daemon until SIGTERM or SIGINT. Stopping leaves the kernel state
/// (bridge, routes, iptables, nf_tables) and the DNS server (dnsd, netd's
/// child, [`dns`]) in place, so containers on one host and across hosts
/// over kernel VXLAN keep working, and resolving, while netd restarts; the
/// WireGuard tunnel runs inside netd, so with it cross-host traffic pauses
/// until netd is back.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let daemon = Daemon::start(cfg).await?;
    // DNS after host setup: 169.254.169.250 is on the bridge now.
    let dns = start_dns(&daemon).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Metrics before the control socket: a metrics address in use stops
    // netd before it takes the socket.
    let metrics = match daemon.config().metrics_addr {
        Some(addr) => {
            let state = metrics::MetricsState::new(daemon.clone());
            Some(metrics::serve(addr, state, stop_rx.clone()).await?)
        }
        None => None,
    };
    let socket = daemon.config().socket.clone();
    let listener = api::bind(&socket)?;
    tracing::info!(
        host = %daemon.host_id(), block = %daemon.block().block, socket = %socket.display(),
        "netd ready"
    );
    let maintain = tokio::spawn(daemon.clone().maintain(stop_rx.clone()));
    let policy = tokio::spawn(daemon.clone().run_policy(stop_rx.clone()));
    let health = tokio::spawn(daemon.clone().run_health(stop_rx.clone()));
    let services = tokio::spawn(daemon.clone().run_services(stop_rx.clone()));
    let balancer = tokio::spawn(daemon.clone().run_balancer(stop_rx.clone()));
    let rotation = tokio::spawn(daemon.clone().run_key_rotation(stop_rx.clone()));
    let dns_watch = dns
        .as_ref()
        .map(|d| tokio::spawn(d.clone().watch(stop_rx.clone())));
    let mesh = tokio::spawn(daemon.clone().run_mesh(stop_rx));
    let server = axum::serve(listener, api::router(daemon.clone()))
        .with_graceful_shutdown(weft_sys::signal::shutdown_signal()?);
    let result = server.await.context("serving the control API");
    let _ = stop_tx.send(true);
    let _ = maintain.await;
    let _ = mesh.await;
    let _ = policy.await;
    let _ = health.await;
    let _ = services.await;
    let _ = balancer.await;
    let _ = rotation.await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(w) = dns_watch {
        let _ = w.await;
    }
    let _ = std::fs::remove_file(&socket);
    match dns {
        Some(d) => tracing::info!(
            dnsd = d.pid(),
            "netd stopped; kernel state and dnsd left in place"
        ),
        None => tracing::info!("netd stopped; kernel state left in place"),
    }
    result
}

/// Installs the CNI plugin and conflist on the host (see [`install`]),
/// logging what changed.
pub fn install_cni(cfg: &Config) -> anyhow::Result<install::Report> {
    let report = install::install(&cfg.cni, &cfg.socket)?;
    let word = |o: install::Outcome| match o {
        install::Outcome::Written => "installed",
        install::Outcome::Unchanged => "unchanged",
        install::Outcome::Missing => "missing",
    };
    tracing::info!(path = %report.plugin_path.display(), "CNI plugin {}", word(report.plugin));
    tracing::info!(path = %report.conflist_path.display(), "CNI conflist {}", word(report.conflist));
    for (name, outcome) in &report.extras {
        tracing::info!(plugin = %name, "chained CNI plugin {}", word(*outcome));
    }
    Ok(report)
}

/// Adopts or starts this host's dnsd ([`dns::Dnsd::start`]); with DNS
/// off, stops one left from before.
async fn start_dns(daemon: &Daemon) -> anyhow::Result<Option<std::sync::Arc<dns::Dnsd>>> {
    let cfg = daemon.config();
    let Some(settings) = &cfg.dns else {
        let stopped = dns::stop_all(&cfg.state_dir).await?;
        if stopped > 0 {
            tracing::info!(stopped, "DNS is off: stopped the dnsd left running");
        }
        return Ok(None);
    };
    let spec = dns::Spec::new(cfg, settings)?;
    let dnsd = dns::Dnsd::start(spec, daemon.counters().dnsd_restarts.clone())
        .await
        .context("starting the DNS server (dnsd)")?;
    tracing::info!(dnsd = dnsd.pid(), domain = %cfg.domain, "DNS serving");
    Ok(Some(dnsd))
}

/// Removes everything weft made on this host: dnsd, the container veths on
/// the bridge, the bridge (and with it the gateway and DNS addresses),
/// weft's iptables chains and nf_tables tables, and the control socket. With
/// `release_block`, also this host's endpoint records and block lease in the
/// store.
pub async fn teardown(cfg: &Config, release_block: bool) -> anyhow::Result<()> {
    let stopped = dns::stop_all(&cfg.state_dir).await?;
    if stopped > 0 {
        tracing::info!(stopped, "stopped dnsd");
    }
    let net = host::HostNet::connect()?;
    if let Some(bridge) = net.link(&cfg.bridge).await? {
        for link in net.links().await? {
            if link.controller == Some(bridge.index) {
                net.delete_link(&link.name).await?;
                tracing::info!(link = %link.name, "deleted container veth");
            }
        }
        net.delete_link(&cfg.bridge).await?;
        tracing::info!(bridge = %cfg.bridge, "deleted bridge");
    }
    tunnel::remove_devices(&net).await?;
    let nat = match cfg.iptables {
        Some(b) => nat::Iptables::with_backend(b),
        None => tokio::task::spawn_blocking(nat::Iptables::detect).await??,
    };
    tokio::task::spawn_blocking(move || nat.teardown()).await??;
    tracing::info!("removed weft's iptables chains");
    tokio::task::spawn_blocking(|| nft::Nft::new().teardown()).await??;
    tracing::info!("removed weft's nf_tables tables");
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %cfg.socket.display(), error = %e, "cannot remove the socket")
        }
    }
    if release_block {
        let host_id = config::host_id(cfg)?;
        let store = weft_store::open(&cfg.store).await?;
        let ipam = weft_ipam::Ipam::new(store.clone(), cfg.ipam.clone(), cfg.keys.root()).await?;
        let prefix = cfg.keys.host_endpoints(&host_id);
        for kv in store.get_prefix(&prefix).await?.kvs {
            store.delete(&kv.key).await?;
        }
        let mine = ipam
            .block_leases()
            .await?
            .into_iter()
            .find(|b| b.host_id == host_id);
        if let Some(b) = mine {
            let block = weft_ipam::HostBlock {
                block: b.block,
                host_id: host_id.clone(),
                gateway: weft_ipam::plan::gateway(b.block),
            };
            ipam.release_block(&block).await?;
            tracing::info!(block = %b.block, "released this host's block");
        }
    }
    Ok(())
}
