//! The names of one endpoint and of its service, in lowercase wire form:
//! the forms the table's module docs list, sorted by what they answer.

use weft_model::{EndpointRecord, ServiceName};

use crate::wire::name_from_str;

/// A service as the table matches it: lowercase `(service, stack)`.
pub(super) type ServiceId = (String, Option<String>);

/// The table's key for `name` (records and endpoints match case-insensitively).
pub(super) fn service_id(name: &ServiceName) -> ServiceId {
    (
        lower(name.service.as_str()),
        name.stack.as_ref().map(|s| lower(s.as_str())),
    )
}

fn lower(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// The names of one endpoint.
pub(super) struct EndpointNames {
    /// The container's own names: they answer it whatever its health.
    pub container: Vec<Vec<u8>>,
    /// Its service's names: `web.shop.<domain>` and `web.shop` (without a
    /// stack `web.<domain>` and `web`); the first is the FQDN.
    pub service: Vec<Vec<u8>>,
    /// `tasks.` before each service name (Docker's name for the containers
    /// behind a VIP).
    pub tasks: Vec<Vec<u8>>,
    /// Its aliases' names (formed like service names).
    pub aliases: Vec<Vec<u8>>,
    /// Its service, to find the service's record (`None` without a service
    /// or when the service is not one label: such names are round robin).
    pub service_id: Option<ServiceId>,
    /// `<stack>.<domain>` for single-label queries from this endpoint.
    pub stack_suffix: Option<Vec<u8>>,
    pub ptr_target: Option<Vec<u8>>,
}

/// The names of `ep` in `domain` (lowercase, no trailing dot); `None` when
/// one of them is not a valid DNS name (too long together).
pub(super) fn endpoint_names(ep: &EndpointRecord, domain: &str) -> Option<EndpointNames> {
    let opt = |s: Option<&str>| s.map(lower).filter(|s| !s.is_empty());
    let stack = opt(ep.stack.as_deref());
    // Without a name, the short container id (as docker shows it).
    let cname = opt(ep.name.as_deref()).or_else(|| {
        let short: String = ep.container_id.chars().take(12).collect();
        name_from_str(&short).map(|_| short.to_ascii_lowercase())
    });
    let mut container: Vec<String> = Vec::new();
    let mut ptr = None;
    if let Some(c) = &cname {
        match &stack {
            Some(s) => {
                container.push(format!("{c}.{s}.{domain}"));
                container.push(format!("{c}.{s}"));
                ptr = Some(format!("{c}.{s}.{domain}"));
            }
            None => ptr = Some(format!("{c}.{domain}")),
        }
        container.push(format!("{c}.{domain}"));
        container.push(c.clone());
    }
    let service: Vec<String> = opt(ep.service.as_deref())
        .map(|svc| service_texts(&svc, stack.as_deref(), domain))
        .unwrap_or_default();
    let tasks: Vec<String> = service.iter().map(|n| format!("tasks.{n}")).collect();
    let aliases: Vec<String> = ep
        .aliases
        .iter()
        .flat_map(|a| service_texts(&lower(a), stack.as_deref(), domain))
        .collect();
    let stack_suffix = match &stack {
        Some(s) => Some(name_from_str(&format!("{s}.{domain}"))?),
        None => None,
    };
    let ptr_target = match ptr {
        Some(p) => Some(name_from_str(&p)?),
        None => None,
    };
    Some(EndpointNames {
        container: wire_all(&container)?,
        service: wire_all(&service)?,
        tasks: wire_all(&tasks)?,
        aliases: wire_all(&aliases)?,
        service_id: ServiceName::of(ep).map(|n| service_id(&n)),
        stack_suffix,
        ptr_target,
    })
}

/// `svc.stack.<domain>` and `svc.stack`, or `svc.<domain>` and `svc`.
fn service_texts(svc: &str, stack: Option<&str>, domain: &str) -> Vec<String> {
    match stack {
        Some(s) => vec![format!("{svc}.{s}.{domain}"), format!("{svc}.{s}")],
        None => vec![format!("{svc}.{domain}"), svc.to_owned()],
    }
}

fn wire_all(texts: &[String]) -> Option<Vec<Vec<u8>>> {
    texts.iter().map(|t| name_from_str(t)).collect()
}
