//! The control API: JSON over HTTP/1.1 on a Unix socket (mode 0600). The
//! routes and types are documented in the `weft-api` crate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use weft_api::{ApiError, ErrorKind};

use crate::daemon::Daemon;

struct Failure(ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

type Answer<T> = Result<Json<T>, Failure>;

/// Decodes a JSON body with an error that says what is wrong with it.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        Failure(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("invalid request body: {e}"),
        ))
    })
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/endpoints", get(list).post(add))
        .route(
            "/v1/endpoints/{container_id}/{ifname}",
            get(get_one).delete(delete),
        )
        .route("/v1/gc", axum::routing::post(gc))
        .route("/v1/peers", get(peers))
        .route("/v1/policy", get(get_policy).put(put_policy))
        .route("/v1/policy/check", axum::routing::post(check_policy))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service))
        .route("/v1/wireguard/rotate-key", axum::routing::post(rotate_key))
        .fallback(|| async { Failure(ApiError::new(ErrorKind::NotFound, "no such API route")) })
        .with_state(daemon)
}

async fn status(State(d): State<Arc<Daemon>>) -> Answer<weft_api::Status> {
    Ok(Json(d.status().await?))
}

async fn list(State(d): State<Arc<Daemon>>) -> Answer<Vec<weft_api::Endpoint>> {
    Ok(Json(d.own_endpoints().await?))
}

async fn add(State(d): State<Arc<Daemon>>, bytes: Bytes) -> Answer<weft_api::Endpoint> {
    Ok(Json(d.add_endpoint(body(&bytes)?).await?))
}

async fn get_one(
    State(d): State<Arc<Daemon>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Answer<weft_api::Endpoint> {
    Ok(Json(d.get_endpoint(&container_id, &ifname).await?))
}

async fn delete(
    State(d): State<Arc<Daemon>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Answer<weft_api::Deleted> {
    Ok(Json(d.delete_endpoint(&container_id, &ifname).await?))
}

async fn peers(State(d): State<Arc<Daemon>>) -> Answer<Vec<weft_api::PeerInfo>> {
    Ok(Json(d.peer_info()))
}

async fn get_policy(State(d): State<Arc<Daemon>>) -> Answer<weft_api::PolicyDoc> {
    Ok(Json(d.get_policy().await?))
}

async fn put_policy(State(d): State<Arc<Daemon>>, bytes: Bytes) -> Answer<weft_api::PolicyDoc> {
    Ok(Json(d.put_policy(body(&bytes)?).await?))
}

async fn check_policy(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Answer<weft_api::PolicyVerdict> {
    Ok(Json(d.check_policy(body(&bytes)?).await?))
}

async fn list_services(State(d): State<Arc<Daemon>>) -> Answer<Vec<weft_api::ServiceInfo>> {
    Ok(Json(d.list_services().await?))
}

async fn get_service(
    State(d): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Answer<weft_api::ServiceInfo> {
    Ok(Json(d.get_service(&name).await?))
}

async fn put_service(
    State(d): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Answer<weft_api::ServiceInfo> {
    Ok(Json(d.put_service(&name, body(&bytes)?).await?))
}

async fn rotate_key(State(d): State<Arc<Daemon>>) -> Answer<weft_api::KeyRotation> {
    Ok(Json(d.rotate_key().await?))
}

async fn gc(State(d): State<Arc<Daemon>>, bytes: Bytes) -> Answer<weft_api::GcResult> {
    Ok(Json(d.gc(body(&bytes)?).await?))
}

/// Binds the control socket: refuses to take over a socket another netd
/// still answers on, replaces a stale one, and makes it mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another netd is already serving {} (stop it first, or use another --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}
