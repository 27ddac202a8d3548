//! `dnsd`: weft's service-discovery DNS server. netd runs it as its child
//! (a process of its own that outlives netd's restarts); it also runs
//! alone. The flags are [`weft_dnsd::cli::DnsdArgs`].

use std::path::Path;

use anyhow::{Context, Result};
use clap::Parser;
use weft_dnsd::cli::DnsdArgs;
use weft_dnsd::DnsServer;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = DnsdArgs::parse();
    let store = weft_store::open(&args.store)
        .await
        .with_context(|| format!("opening the store {}", args.store))?;
    let cfg = args.dns_config();
    let server = DnsServer::start(cfg, store)
        .await
        .context("starting dnsd")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let (_, task) = weft_dnsd::metrics::serve(addr, server.stats_handle(), stopped)
                .await
                .context("serving metrics")?;
            Some(task)
        }
        None => None,
    };
    // Serving: say so (the supervisor waits for this file to name us).
    if let Some(path) = &args.pidfile {
        write_pidfile(path).with_context(|| format!("writing the pidfile {}", path.display()))?;
    }
    let signal = weft_sys::signal::shutdown_signal()?;
    signal.await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    if let Some(task) = metrics {
        let _ = task.await;
    }
    server.stop().await;
    if let Some(path) = &args.pidfile {
        remove_pidfile_if_mine(path);
    }
    Ok(())
}

/// Writes this process's id to `path` atomically (a reader sees the old
/// id or the new one, never a partial file).
fn write_pidfile(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pidfile unless a newer dnsd has written its id there since.
fn remove_pidfile_if_mine(path: &Path) {
    let mine = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if mine {
        let _ = std::fs::remove_file(path);
    }
}
