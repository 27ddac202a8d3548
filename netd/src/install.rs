//! `netd install-cni`: puts weft's CNI plugin and network config on the
//! host, the way flannel and Calico install theirs from a sidecar.
//!
//! * The plugin binary is copied into the host's CNI bin dir atomically: a
//!   temporary file in the same directory, fsync, rename, so a runtime never
//!   executes a half-written file.
//! * The conflist (`<conf dir>/10-weft.conflist`) lists `weft` first, then the
//!   optional `portmap` and `tuning`. An existing conflist keeps the plugins
//!   an operator added (every type but `weft`, in their order) and its other
//!   top-level keys; only the `weft` entry is replaced.
//! * Idempotent: a file whose bytes would not change is not written again.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::layered;

pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CONF_NAME: &str = "10-weft.conflist";
pub const DEFAULT_EXTRA_PLUGINS_DIR: &str = "/usr/lib/cni";
/// The network name, and the plugin's `type`.
pub const NETWORK: &str = "weft";
/// The cniVersion of a new conflist.
pub const CNI_VERSION: &str = "1.0.0";

/// What to install where: the `[cni]` table of the settings file, and the
/// flags and `WEFT_CNI_*` variables of `install-cni` and `sidecar` (see
/// [`crate::layered`] for the order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "cni")]
#[command(next_help_heading = "CNI install ([cni] in the file)")]
pub struct CniSettings {
    /// The host's CNI plugin directory.
    #[arg(long = "cni-bin-dir", env = "WEFT_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub bin_dir: PathBuf,
    /// The host's CNI network config directory.
    #[arg(long = "cni-conf-dir", env = "WEFT_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub conf_dir: PathBuf,
    /// The conflist's file name in the config directory.
    #[arg(long = "cni-conf-name", env = "WEFT_CNI_CONF_NAME", default_value = DEFAULT_CONF_NAME)]
    pub conf_name: String,
    /// The weft plugin binary to install (default: `weft` next to netd).
    #[arg(long, env = "WEFT_CNI_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// Chain the reference `portmap` plugin after weft; it then publishes
    /// ports instead of weft.
    #[arg(long, env = "WEFT_CNI_WITH_PORTMAP")]
    pub with_portmap: bool,
    /// Chain the reference `tuning` plugin after weft.
    #[arg(long, env = "WEFT_CNI_WITH_TUNING")]
    pub with_tuning: bool,
    /// Where to copy `portmap`/`tuning` from if the host's bin dir has none.
    #[arg(long, env = "WEFT_CNI_EXTRA_PLUGINS_DIR", default_value = DEFAULT_EXTRA_PLUGINS_DIR)]
    pub extra_plugins_dir: PathBuf,
}

impl Default for CniSettings {
    fn default() -> Self {
        layered::builtin()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the weft CNI plugin at {0} (build it, or pass --plugin PATH)")]
    NoPlugin(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a conflist weft can merge into ({why}); fix or remove it")]
    BadConflist { path: PathBuf, why: String },
    #[error("invalid CNI setting {setting}: {why}")]
    Invalid { setting: &'static str, why: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written (new or changed).
    Written,
    /// Already had these bytes; not touched.
    Unchanged,
    /// Wanted but not available (an optional plugin nobody provides).
    Missing,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub plugin_path: PathBuf,
    pub plugin: Outcome,
    pub conflist_path: PathBuf,
    pub conflist: Outcome,
    /// The optional reference plugins (`portmap`, `tuning`) asked for.
    pub extras: Vec<(String, Outcome)>,
}

/// The plugin to install: the explicit path, or `weft` beside this netd.
pub fn find_plugin(explicit: Option<&Path>) -> Result<PathBuf, InstallError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(io_err("find", Path::new("the running netd binary")))?
            .with_file_name(NETWORK),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(InstallError::NoPlugin(path))
    }
}

/// Installs the plugin and the conflist. `socket` is netd's control socket
/// as the host sees it (the plugin runs on the host).
pub fn install(s: &CniSettings, socket: &Path) -> Result<Report, InstallError> {
    if s.conf_name.contains('/') || !s.conf_name.ends_with(".conflist") {
        return Err(InstallError::Invalid {
            setting: "conf_name",
            why: format!("{:?}: a file name ending in .conflist", s.conf_name),
        });
    }
    let plugin_src = find_plugin(s.plugin.as_deref())?;
    std::fs::create_dir_all(&s.bin_dir).map_err(io_err("create", &s.bin_dir))?;
    std::fs::create_dir_all(&s.conf_dir).map_err(io_err("create", &s.conf_dir))?;

    let plugin_path = s.bin_dir.join(NETWORK);
    let bytes = std::fs::read(&plugin_src).map_err(io_err("read", &plugin_src))?;
    let plugin = write_atomic(&plugin_path, &bytes, 0o755)?;

    let mut extras = Vec::new();
    for (wanted, name) in [(s.with_portmap, "portmap"), (s.with_tuning, "tuning")] {
        if wanted {
            extras.push((name.to_owned(), install_extra(s, name)?));
        }
    }

    let conflist_path = s.conf_dir.join(&s.conf_name);
    let existing =
        match std::fs::read(&conflist_path) {
            Ok(b) => Some(serde_json::from_slice::<Value>(&b).map_err(|e| {
                InstallError::BadConflist {
                    path: conflist_path.clone(),
                    why: e.to_string(),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &conflist_path)(e)),
        };
    let want = Wanted {
        socket: socket.to_path_buf(),
        portmap: s.with_portmap,
        tuning: s.with_tuning,
    };
    let merged =
        merge_conflist(existing.as_ref(), &want).map_err(|why| InstallError::BadConflist {
            path: conflist_path.clone(),
            why,
        })?;
    let mut text = serde_json::to_string_pretty(&merged).map_err(|e| InstallError::Invalid {
        setting: "conflist",
        why: e.to_string(),
    })?;
    text.push('\n');
    let conflist = write_atomic(&conflist_path, text.as_bytes(), 0o644)?;
    warn_about_shadowing(&s.conf_dir, &s.conf_name);
    Ok(Report {
        plugin_path,
        plugin,
        conflist_path,
        conflist,
        extras,
    })
}

/// A reference plugin the conflist chains: present on the host, or copied
/// from the extra plugins dir (the image ships Debian's), or missing.
fn install_extra(s: &CniSettings, name: &str) -> Result<Outcome, InstallError> {
    let dst = s.bin_dir.join(name);
    if dst.is_file() {
        return Ok(Outcome::Unchanged);
    }
    let src = s.extra_plugins_dir.join(name);
    if !src.is_file() {
        tracing::warn!(plugin = name, bin_dir = %s.bin_dir.display(),
            "the conflist chains {name}, but neither the host nor {} has it: install the reference CNI plugins",
            s.extra_plugins_dir.display());
        return Ok(Outcome::Missing);
    }
    let bytes = std::fs::read(&src).map_err(io_err("read", &src))?;
    write_atomic(&dst, &bytes, 0o755)
}

/// Runtimes take the first config (by file name) of a network: say so if
/// another file also defines network `weft`.
fn warn_about_shadowing(dir: &Path, ours: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ours || !(name.ends_with(".conflist") || name.ends_with(".conf")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let named_weft = serde_json::from_str::<Value>(&text)
            .ok()
            .is_some_and(|v| v.get("name").and_then(Value::as_str) == Some(NETWORK));
        if named_weft {
            tracing::warn!(file = %e.path().display(), ours,
                "another CNI config also defines network \"weft\"; runtimes use the first by name");
        }
    }
}

/// What the conflist must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub socket: PathBuf,
    pub portmap: bool,
    pub tuning: bool,
}

/// weft's own entry. It publishes ports itself unless `portmap` is chained
/// (two plugins must not both DNAT the same ports).
pub fn weft_entry(socket: &Path, ports: bool) -> Value {
    let mut caps = Map::new();
    if ports {
        caps.insert("portMappings".into(), Value::Bool(true));
    }
    caps.insert("aliases".into(), Value::Bool(true));
    json!({
        "type": NETWORK,
        "socket": socket.display().to_string(),
        "capabilities": caps,
    })
}

fn plugin_type(p: &Value) -> Option<&str> {
    p.get("type").and_then(Value::as_str)
}

/// The conflist to write, from the one on disk (if any). Pure: the unit
/// tests pin it down.
pub fn merge_conflist(existing: Option<&Value>, want: &Wanted) -> Result<Value, String> {
    let mut top = match existing {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("the top level is not a JSON object".into()),
    };
    let old_plugins = match top.remove("plugins") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("\"plugins\" is not a list".into()),
    };
    if old_plugins.iter().any(|p| !p.is_object()) {
        return Err("a \"plugins\" entry is not an object".into());
    }
    // The operator's plugins: every type but weft, in their order.
    let mut others: Vec<Value> = old_plugins
        .into_iter()
        .filter(|p| plugin_type(p) != Some(NETWORK))
        .collect();
    for (wanted, name) in [(want.portmap, "portmap"), (want.tuning, "tuning")] {
        if wanted && !others.iter().any(|p| plugin_type(p) == Some(name)) {
            others.push(reference_entry(name));
        }
    }
    let portmap_chained = others.iter().any(|p| plugin_type(p) == Some("portmap"));
    let mut plugins = vec![weft_entry(&want.socket, !portmap_chained)];
    plugins.extend(others);
    top.insert("name".into(), Value::String(NETWORK.into()));
    if !top.get("cniVersion").is_some_and(Value::is_string) {
        top.insert("cniVersion".into(), Value::String(CNI_VERSION.into()));
    }
    top.insert("plugins".into(), Value::Array(plugins));
    Ok(Value::Object(top))
}

fn reference_entry(name: &str) -> Value {
    match name {
        "portmap" => {
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true})
        }
        other => json!({ "type": other }),
    }
}

/// Writes `bytes` to `path` unless it already holds exactly them: a
/// temporary file in the same directory, fsync, chmod, rename, fsync of the
/// directory. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<Outcome, InstallError> {
    if let Ok(current) = std::fs::read(path) {
        let mode_ok = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777 == mode)
            .unwrap_or(false);
        if current == bytes && mode_ok {
            return Ok(Outcome::Unchanged);
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.weft-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        // The rename itself must survive a crash too.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Outcome::Written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(portmap: bool, tuning: bool) -> Wanted {
        Wanted {
            socket: "/run/weft/netd.sock".into(),
            portmap,
            tuning,
        }
    }

    fn types(v: &Value) -> Vec<String> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn new_conflist_has_weft_first() {
        let v = merge_conflist(None, &want(false, false)).unwrap();
        assert_eq!(v["name"], "weft");
        assert_eq!(v["cniVersion"], CNI_VERSION);
        assert_eq!(types(&v), ["weft"]);
        assert_eq!(v["plugins"][0]["socket"], "/run/weft/netd.sock");
        assert_eq!(v["plugins"][0]["capabilities"]["portMappings"], true);
        let v = merge_conflist(None, &want(true, true)).unwrap();
        assert_eq!(types(&v), ["weft", "portmap", "tuning"]);
        assert!(
            v["plugins"][0]["capabilities"]
                .get("portMappings")
                .is_none(),
            "portmap publishes the ports, not weft too"
        );
    }

    #[test]
    fn keeps_the_operators_plugins_and_replaces_only_weft() {
        let existing = json!({
            "cniVersion": "0.4.0",
            "name": "weft",
            "disableCheck": true,
            "plugins": [
                {"type": "weft", "socket": "/old.sock", "mtu": 1},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}},
                {"type": "firewall", "backend": "iptables"}
            ]
        });
        let v = merge_conflist(Some(&existing), &want(false, true)).unwrap();
        assert_eq!(types(&v), ["weft", "bandwidth", "firewall", "tuning"]);
        assert_eq!(v["cniVersion"], "0.4.0", "the operator's version stays");
        assert_eq!(v["disableCheck"], true);
        assert_eq!(v["plugins"][0]["socket"], "/run/weft/netd.sock");
        assert!(v["plugins"][0].get("mtu").is_none());
        assert_eq!(v["plugins"][2]["backend"], "iptables");
    }

    #[test]
    fn merging_again_changes_nothing() {
        let once = merge_conflist(None, &want(true, true)).unwrap();
        let twice = merge_conflist(Some(&once), &want(true, true)).unwrap();
        assert_eq!(once, twice);
        // Without the flags the second time, chained plugins stay.
        let again = merge_conflist(Some(&once), &want(false, false)).unwrap();
        assert_eq!(types(&again), ["weft", "portmap", "tuning"]);
    }

    #[test]
    fn an_operators_portmap_is_kept_as_it_is() {
        let existing = json!({"plugins": [{"type": "portmap", "snat": false,
            "capabilities": {"portMappings": true}}]});
        let v = merge_conflist(Some(&existing), &want(true, false)).unwrap();
        assert_eq!(types(&v), ["weft", "portmap"]);
        assert_eq!(v["plugins"][1]["snat"], false);
    }

    #[test]
    fn refuses_what_it_cannot_merge() {
        assert!(merge_conflist(Some(&json!([1])), &want(false, false)).is_err());
        assert!(merge_conflist(Some(&json!({"plugins": {}})), &want(false, false)).is_err());
        assert!(merge_conflist(Some(&json!({"plugins": [3]})), &want(false, false)).is_err());
    }

    #[test]
    fn install_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("weft-src");
        std::fs::write(&plugin, b"#!/bin/true\n").unwrap();
        let s = CniSettings {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            plugin: Some(plugin.clone()),
            with_portmap: true,
            extra_plugins_dir: dir.path().join("none"),
            ..CniSettings::default()
        };
        let sock = Path::new("/run/weft/netd.sock");
        let r = install(&s, sock).unwrap();
        assert_eq!(r.plugin, Outcome::Written);
        assert_eq!(r.conflist, Outcome::Written);
        assert_eq!(r.extras, [("portmap".to_owned(), Outcome::Missing)]);
        let installed = s.bin_dir.join("weft");
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/true\n");
        let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let conf = std::fs::read(&r.conflist_path).unwrap();
        let mtime = std::fs::metadata(&r.conflist_path)
            .unwrap()
            .modified()
            .unwrap();

        let r2 = install(&s, sock).unwrap();
        assert_eq!(
            (r2.plugin, r2.conflist),
            (Outcome::Unchanged, Outcome::Unchanged)
        );
        assert_eq!(std::fs::read(&r.conflist_path).unwrap(), conf);
        assert_eq!(
            std::fs::metadata(&r.conflist_path)
                .unwrap()
                .modified()
                .unwrap(),
            mtime
        );
        // No temporary files are left behind.
        for d in [&s.bin_dir, &s.conf_dir] {
            let names: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.iter().all(|n| !n.contains("weft-tmp")), "{names:?}");
        }
        // A new plugin version replaces the old one.
        std::fs::write(&plugin, b"#!/bin/false\n").unwrap();
        assert_eq!(install(&s, sock).unwrap().plugin, Outcome::Written);
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/false\n");
    }

    #[test]
    fn broken_conflist_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("weft-src");
        std::fs::write(&plugin, b"x").unwrap();
        let s = CniSettings {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            plugin: Some(plugin),
            ..CniSettings::default()
        };
        std::fs::create_dir_all(&s.conf_dir).unwrap();
        let path = s.conf_dir.join(DEFAULT_CONF_NAME);
        std::fs::write(&path, "{not json").unwrap();
        let e = install(&s, Path::new("/s")).unwrap_err();
        assert!(matches!(e, InstallError::BadConflist { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not json");
    }

    #[test]
    fn missing_plugin_is_a_clear_error() {
        let e = find_plugin(Some(Path::new("/nonexistent/weft"))).unwrap_err();
        assert!(e.to_string().contains("--plugin"), "{e}");
    }
}
