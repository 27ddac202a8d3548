//! netd: weft's per-host daemon and its operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft_api::client::Client;
use weft_netd::config::{Config, Settings};
use weft_netd::install::CniSettings;
use weft_netd::layered::Overrides;

#[derive(Parser)]
#[command(
    name = "netd",
    version,
    about = "weft's per-host overlay network daemon"
)]
struct Cli {
    /// Config file (TOML). Missing at the default path means all defaults.
    #[arg(long, short, global = true, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (until SIGTERM/SIGINT; kernel state stays in place).
    Run {
        #[command(flatten)]
        overrides: Overrides<Settings>,
    },
    /// Install the CNI plugin and its conflist on the host (idempotent):
    /// copies `weft` into the CNI bin dir atomically and writes
    /// `<conf dir>/10-weft.conflist`, keeping plugins an operator added.
    InstallCni {
        #[command(flatten)]
        overrides: Overrides<Settings>,
        #[command(flatten)]
        cni: Overrides<CniSettings>,
    },
    /// The container entrypoint: install-cni, then run.
    Sidecar {
        #[command(flatten)]
        overrides: Overrides<Settings>,
        #[command(flatten)]
        cni: Overrides<CniSettings>,
    },
    /// Show this host's status.
    Status {
        /// Control socket of the netd to ask.
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List this host's endpoints.
    Endpoints {
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the other hosts this host has tunnels to.
    Peers {
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rotate this host's WireGuard key without dropping traffic: announce
    /// a new key, let the peers read it, switch, drop the old one.
    RotateKey {
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The cluster's network policy: show, replace, edit, and ask what it
    /// decides for a flow.
    Policy {
        /// Control socket of the netd to ask.
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List the services: VIP, mode, balancing, health check and backends.
    Services {
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show or change one service (NAME.STACK, or NAME without a stack).
    Service {
        /// Control socket of the netd to ask.
        #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Remove everything weft made on this host: bridge, container veths,
    /// iptables chains, the control socket. Stop netd first.
    Teardown {
        #[command(flatten)]
        overrides: Overrides<Settings>,
        /// Also give this host's block and endpoint records back to the store.
        #[arg(long)]
        release_block: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the policy document (TOML; `apply` reads it back).
    Get {
        /// Print JSON with the revision instead.
        #[arg(long)]
        json: bool,
    },
    /// Replace the whole policy with a file (TOML, or JSON for `*.json`;
    /// `-` reads standard input).
    Apply { file: PathBuf },
    /// Edit the stored policy: `default=deny`, `stacks.NAME.within_stack=allow`,
    /// `stacks.NAME.within_service=...`, `stacks.NAME.ingress=...`,
    /// `stacks.NAME.linked=a,b`, `rules.NAME.from=stack[/service]`,
    /// `rules.NAME.to=...`, `rules.NAME.ports=tcp/80,udp/53`; an empty
    /// value unsets (`stacks.NAME=` and `rules.NAME=` remove).
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        edits: Vec<String>,
    },
    /// What the policy decides for a flow from FROM to TO, and why. FROM and
    /// TO are `stack`, `stack/service` or `-` (no stack); PORT is `tcp/80`
    /// or `udp/53` (none: a flow without a port, like ICMP).
    Check {
        from: String,
        to: String,
        port: Option<String>,
        /// Decide with this file instead of the stored policy (a dry run).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Show one service.
    Get {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a service's settings (creates its record if needed; the
    /// flags not given keep their values).
    Set {
        name: String,
        #[command(flatten)]
        edit: weft_netd::services::SpecEdit,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Defaults, the settings file, then the environment and flags.
fn load_config(
    path: Option<PathBuf>,
    overrides: &Overrides<Settings>,
    cni: Option<&Overrides<CniSettings>>,
) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref(), overrides, cni)?)
}

fn init_logs(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: container and journal logs stay plain.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { overrides } => {
            let cfg = load_config(cli.config, &overrides, None)?;
            init_logs(&cfg.log_level);
            runtime()?.block_on(weft_netd::run(cfg))
        }
        Command::InstallCni { overrides, cni } => {
            let cfg = load_config(cli.config, &overrides, Some(&cni))?;
            init_logs(&cfg.log_level);
            weft_netd::install_cni(&cfg)?;
            Ok(())
        }
        Command::Sidecar { overrides, cni } => {
            let cfg = load_config(cli.config, &overrides, Some(&cni))?;
            init_logs(&cfg.log_level);
            weft_netd::install_cni(&cfg)?;
            runtime()?.block_on(weft_netd::run(cfg))
        }
        Command::Status { socket, json } => {
            let s = Client::new(socket).status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("host        {}", s.host_id);
                println!(
                    "block       {} (gateway {}, {} of {} addresses used)",
                    s.block, s.gateway, s.endpoints, s.capacity
                );
                println!("cluster     {}", s.cluster_range);
                println!("bridge      {} (mtu {})", s.bridge, s.mtu);
                println!(
                    "store       {} ({})",
                    s.store,
                    if s.store_ok { "ok" } else { "UNREACHABLE" }
                );
                println!("iptables    {}", s.iptables);
                println!("version     {}", s.version);
            }
            Ok(())
        }
        Command::Endpoints { socket, json } => {
            let mut eps = Client::new(socket).list_endpoints()?;
            eps.sort_by_key(|e| e.address.ip());
            if json {
                println!("{}", serde_json::to_string_pretty(&eps)?);
                return Ok(());
            }
            let rows: Vec<[String; 6]> = eps
                .iter()
                .map(|e| {
                    [
                        e.container_id.chars().take(12).collect(),
                        e.ifname.clone(),
                        e.address.to_string(),
                        e.name.clone().unwrap_or_default(),
                        match (&e.service, &e.stack) {
                            (Some(s), Some(st)) => format!("{s}.{st}"),
                            (Some(s), None) => s.clone(),
                            _ => String::new(),
                        },
                        e.port_mappings
                            .iter()
                            .map(|p| {
                                format!(
                                    "{}->{}/{}",
                                    p.host_port,
                                    p.container_port,
                                    p.protocol.as_str()
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            print_table(
                &["CONTAINER", "IF", "ADDRESS", "NAME", "SERVICE", "PORTS"],
                &rows,
            );
            Ok(())
        }
        Command::RotateKey { socket, json } => {
            let r = Client::new(socket).rotate_key()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "WireGuard key rotated: {} -> {}",
                    r.old_public_key, r.new_public_key
                );
            }
            Ok(())
        }
        Command::Peers { socket, json } => {
            let mut peers = Client::new(socket).peers()?;
            peers.sort_by_key(|p| p.block);
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
                return Ok(());
            }
            let rows: Vec<[String; 6]> = peers
                .iter()
                .map(|p| {
                    [
                        p.host_id.clone(),
                        p.underlay.to_string(),
                        p.block.to_string(),
                        p.backend.clone(),
                        p.handshake_age_secs
                            .map_or("-".into(), |s| format!("{s}s ago")),
                        format!("{} / {}", p.rx_bytes, p.tx_bytes),
                    ]
                })
                .collect();
            print_table(
                &[
                    "HOST",
                    "UNDERLAY",
                    "BLOCK",
                    "BACKEND",
                    "HANDSHAKE",
                    "RX / TX BYTES",
                ],
                &rows,
            );
            Ok(())
        }
        Command::Policy { socket, command } => policy(&Client::new(socket), command),
        Command::Services { socket, json } => {
            let services = Client::new(socket).services()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&services)?);
                return Ok(());
            }
            print_services(&services);
            Ok(())
        }
        Command::Service { socket, command } => {
            let client = Client::new(socket);
            match command {
                ServiceCommand::Get { name, json } => {
                    let s = client
                        .service(&name)?
                        .with_context(|| format!("no service {name}"))?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        print_services(std::slice::from_ref(&s));
                    }
                }
                ServiceCommand::Set { name, edit } => {
                    let mut spec = client.service(&name)?.map(|s| s.spec).unwrap_or_default();
                    edit.apply(&mut spec)?;
                    let s = client.put_service(&name, &spec)?;
                    print_services(std::slice::from_ref(&s));
                }
            }
            Ok(())
        }
        Command::Teardown {
            overrides,
            release_block,
        } => {
            let cfg = load_config(cli.config, &overrides, None)?;
            init_logs(&cfg.log_level);
            runtime()?.block_on(weft_netd::teardown(&cfg, release_block))
        }
    }
}

fn policy(client: &Client, command: PolicyCommand) -> anyhow::Result<()> {
    use weft_api::client::ClientError;
    use weft_api::{ErrorKind, PolicyCheck, PutPolicy};
    use weft_netd::policy::edit;
    let read_file = |file: &std::path::Path| -> anyhow::Result<weft_api::Policy> {
        let text = if file == std::path::Path::new("-") {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        Ok(edit::parse_file(file, &text)?)
    };
    match command {
        PolicyCommand::Get { json } => {
            let doc = client.policy()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                match doc.revision {
                    Some(rev) => println!("# weft policy, revision {rev}"),
                    None => println!("# no policy stored: the default applies (allow everything)"),
                }
                print!("{}", edit::to_toml(&doc.policy));
            }
        }
        PolicyCommand::Apply { file } => {
            let policy = read_file(&file)?;
            let doc = client.put_policy(&PutPolicy {
                policy,
                expect_revision: None,
            })?;
            println!(
                "policy applied (revision {})",
                doc.revision.unwrap_or_default()
            );
        }
        PolicyCommand::Set { edits } => {
            // Read, edit, write back only if nobody wrote in between; on a
            // conflict, start again from the newer document.
            let mut attempt = 0;
            let doc = loop {
                let mut doc = client.policy()?;
                edit::apply_set(&mut doc.policy, &edits)?;
                let put = PutPolicy {
                    policy: doc.policy,
                    expect_revision: Some(doc.revision.unwrap_or(0)),
                };
                match client.put_policy(&put) {
                    Err(ClientError::Api(e)) if e.kind == ErrorKind::Conflict && attempt < 5 => {
                        attempt += 1;
                    }
                    other => break other?,
                }
            };
            println!(
                "policy updated (revision {})",
                doc.revision.unwrap_or_default()
            );
        }
        PolicyCommand::Check {
            from,
            to,
            port,
            file,
            json,
        } => {
            let req = PolicyCheck {
                from: from.parse()?,
                to: to.parse()?,
                port: port.as_deref().map(str::parse).transpose()?,
                policy: file.as_deref().map(read_file).transpose()?,
            };
            let verdict = client.check_policy(&req)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
                return Ok(());
            }
            let port = req.port.map_or("(no port)".to_owned(), |p| p.to_string());
            println!("{} -> {} {port}: {}", req.from, req.to, verdict.explanation);
            match (&file, verdict.revision) {
                (Some(f), _) => println!("(policy from {})", f.display()),
                (None, Some(rev)) => println!("(stored policy, revision {rev})"),
                (None, None) => println!("(no policy stored: the default)"),
            }
        }
    }
    Ok(())
}

fn print_services(services: &[weft_api::ServiceInfo]) {
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            let healthy = s.backends.iter().filter(|b| b.healthy).count();
            [
                s.name.to_string(),
                s.spec.mode.to_string(),
                s.vip.map_or("-".into(), |v| v.to_string()),
                format!(
                    "{}{}",
                    s.spec.balance,
                    if s.spec.affinity { "+affinity" } else { "" }
                ),
                s.spec
                    .health
                    .as_ref()
                    .map_or("-".into(), |h| h.probe.to_string()),
                format!("{healthy}/{} healthy", s.backends.len()),
            ]
        })
        .collect();
    print_table(
        &["SERVICE", "MODE", "VIP", "BALANCE", "HEALTH", "BACKENDS"],
        &rows,
    );
    for s in services {
        if let Some(p) = &s.problem {
            println!("{}: {p}", s.name);
        }
        for b in &s.backends {
            let state = if b.healthy { "healthy" } else { "UNHEALTHY" };
            let detail = if b.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", b.detail)
            };
            println!(
                "  {}  {}  host {}  {state}{detail}",
                s.name, b.address, b.host_id
            );
        }
    }
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
