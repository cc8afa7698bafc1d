//! `uload admin`: the link management HTTP API (JSON over HTTP, axum), and
//! the only writer of the data dir.
//!
//! Every change is validated, appended to the link log and fsynced before it
//! is acknowledged; reads come from an in-memory view without a lock. The
//! routes, bodies and error codes are specified in `docs/api.md`.
//!
//! - [`AdminState`]: the store, the view and the write path (`state.rs`).
//! - [`app`]: the router; tests call it directly.
//! - [`serve`]: runs the app on a bound listener until a shutdown future
//!   resolves; [`run`] is the `uload admin` entry point.
//!
//! `examples/admin_api.rs` serves it in-process: `cargo run --example admin_api`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = uload::config::Config::load(None)?;
//! let state = uload::admin::AdminState::open(&config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
//! uload::admin::serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! // ULOAD_API_KEY=a-long-enough-secret cargo run -- admin
//! // curl -H 'Authorization: Bearer a-long-enough-secret' -H 'Content-Type: application/json' \
//! //      -d '{"url":"https://example.com/"}' 127.0.0.1:8081/api/links
//! ```

mod auth;
pub mod backup_task;
pub(crate) mod codes;
mod error;
mod json;
mod limits;
mod links;
mod metrics;
mod routes;
mod state;
mod url;

use std::future::Future;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};

pub use auth::Caller;
pub use codes::{RESERVED_CODES, is_reserved};
pub use error::{ApiError, ErrorCode};
pub use json::parse_json;
pub use links::{CreateLink, LinkBody, UpdateLink};
pub use routes::{DEFAULT_PAGE, MAX_PAGE};
pub use state::{AdminError, AdminState, WritesHeld};
pub use url::normalize_target;

use crate::config::Config;

/// The admin API's router. Every `/api` route but `/api/health` requires an
/// API key; bodies above `admin.max_body_bytes` get 413.
pub fn app(state: AdminState) -> Router {
    let max_body = state.settings().max_body_bytes;
    let api = Router::new()
        .route(
            "/api/links",
            post(routes::create_link).get(routes::list_links),
        )
        .route(
            "/api/links/{code}",
            get(routes::get_link)
                .patch(routes::update_link)
                .delete(routes::delete_link)
                .post(routes::post_to_code),
        )
        .route("/api", any(routes::not_found))
        .route("/api/", any(routes::not_found))
        .route("/api/{*rest}", any(routes::not_found))
        // Everything above needs a key; the check runs before any handler.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .route("/api/health", get(routes::health))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state);
    // Around the whole router: a route's method router adds `Allow` after
    // every layer given to the router itself.
    Router::new()
        .fallback_service(api)
        .layer(middleware::map_response(no_allow_on_401))
}

/// axum's method router adds `Allow` (the route's methods) to whatever the
/// method-not-allowed fallback answers, its 401 included: a caller without
/// a key would learn which routes exist and what they take.
async fn no_allow_on_401(mut res: Response) -> Response {
    if res.status() == axum::http::StatusCode::UNAUTHORIZED {
        res.headers_mut().remove(axum::http::header::ALLOW);
    }
    res
}

/// Logs and counts each request (never its headers: they hold the API key).
async fn log_request(
    axum::extract::State(state): axum::extract::State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let health = req.uri().path() == "/api/health";
    // The path and client are copied only when the debug line is logged:
    // two allocations per request otherwise spent for nothing.
    let debug = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let forwarded_for = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (req.uri().path().to_owned(), forwarded_for)
    });
    let response = next.run(req).await;
    let route = if health {
        crate::metrics::RouteLabel::Health
    } else {
        crate::metrics::RouteLabel::Api
    };
    state.metrics().http.record(
        crate::metrics::MethodLabel::of(&method),
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    if let Some((path, forwarded_for)) = debug {
        tracing::debug!(
            %method,
            path,
            status = response.status().as_u16(),
            us = started.elapsed().as_micros() as u64,
            forwarded_for,
            "admin: request"
        );
    }
    response
}

/// Serves the API on `listener` until `shutdown` resolves, then lets open
/// requests finish (graceful shutdown). Tests bind `127.0.0.1:0`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `uload admin`: opens the data dir, listens on `admin.listen` and serves
/// until SIGTERM or SIGINT.
pub fn run(config: &Config) -> Result<(), AdminError> {
    // A write past RLIMIT_FSIZE must fail with EFBIG (answered 507), not
    // kill the process with SIGXFSZ.
    crate::store::datadir::ignore_file_size_signal();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("uload-admin")
        .build()
        .map_err(AdminError::Runtime)?;
    let state = AdminState::open(config)?;
    // Scheduled backups (backup.dir), off the request path.
    let backups =
        backup_task::BackupTask::start(&config.data_dir, &config.backup, state.backup_status());
    let addr = config.admin.listen;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %local, "admin: listening");
        if let Some(maddr) = config.admin_metrics_listen {
            let mlistener = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(|source| AdminError::BindMetrics {
                    addr: maddr,
                    source,
                })?;
            let app = metrics::metrics_app(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(mlistener, app).await {
                    tracing::error!(error = %e, "admin: metrics listener stopped");
                }
            });
        }
        serve(listener, state.clone(), shutdown_signal())
            .await
            .map_err(AdminError::Serve)?;
        // A compaction is crash-safe, but let a running one finish.
        let deadline = Instant::now() + Duration::from_secs(60);
        while state.is_compacting() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("admin: stopped");
        Ok(())
    });
    if let Some(backups) = backups {
        backups.stop(Duration::from_secs(10));
    }
    served
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "admin: cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "admin: cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("admin: SIGINT, shutting down"),
        () = terminate => tracing::info!("admin: SIGTERM, shutting down"),
    }
}
