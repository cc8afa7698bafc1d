//! HTTPS at the edge, end to end: real `uload edge` (and `uload admin`)
//! processes with a TLS listener whose self-signed certificates are made
//! here, at test time (rcgen), and rustls clients for HTTP/1.1 and HTTP/2
//! (the `h2` crate). Covers redirects and HSTS over both protocols, the
//! plain-HTTP → HTTPS 308 (health checks excepted), `x-forwarded-proto`,
//! certificate reload on SIGHUP and on a graceful upgrade, refusing to
//! start with a bad certificate or key, and certificates outside their
//! validity period (served at start-up, refused by a reload and by
//! `check-config`, their `notAfter` exported).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{KEY, Response, free_port, metric, request, wait_until};
use pingora::tls::{
    CertificateDer, ClientConfig, ClientTlsStream, RootCertStore, ServerName, TlsConnector,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds every network wait of the clients below, so that a broken edge
/// fails a test instead of hanging it. Never asserted on.
const IO_LIMIT: Duration = Duration::from_secs(15);

type Tls = ClientTlsStream<TcpStream>;

/// A self-signed certificate for `localhost`, as PEM files and DER.
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn make_cert(serial: u64, name: &str) -> Cert {
    make_cert_valid(serial, name, None)
}

/// Like [`make_cert`], valid from 1 January of the first year to 1 January
/// of the second (rcgen's default: 1975 to 4096).
fn make_cert_valid(serial: u64, name: &str, years: Option<(i32, i32)>) -> Cert {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    if let Some((from, to)) = years {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Cert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// Writes `cert.pem` and `key.pem` in `dir` (each through a rename, as a
/// deployment tool would).
fn install(dir: &Path, cert_pem: &str, key_pem: &str) {
    for (name, text) in [("cert.pem", cert_pem), ("key.pem", key_pem)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An edge with plain and HTTPS listeners, and an admin (the real one, or
/// an upstream given by the test).
struct Edge {
    dir: tempfile::TempDir,
    config: PathBuf,
    plain: SocketAddr,
    https: SocketAddr,
    edge: Option<Proc>,
    admin: Option<Proc>,
    /// The certificates the clients trust.
    roots: RootCertStore,
}

impl Edge {
    /// Writes `cert` as the edge's certificate and a config with `edge_extra`
    /// and `tls_extra` lines in the `edge:` and `tls:` sections, then starts the admin (unless
    /// `upstream` names another one) and the edge, and waits until both
    /// listeners answer `/health`.
    fn start(cert: &Cert, edge_extra: &str, tls_extra: &str, upstream: Option<SocketAddr>) -> Self {
        pingora::tls::install_default_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        let (plain, https, admin_addr) = (port(), port(), port());
        let upstream_addr = upstream.unwrap_or(admin_addr);
        install(dir.path(), &cert.cert_pem, &cert.key_pem);
        std::fs::write(
            dir.path().join("pingora.yaml"),
            format!(
                "---\nversion: 1\nthreads: 2\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let config = dir.path().join("uload.yaml");
        // Certificate paths are relative: to the config file's directory.
        std::fs::write(
            &config,
            format!(
                "data_dir: {data}\npublic_base_url: https://localhost:{https_port}\nedge:\n  listen: {plain}\n  admin_upstreams: [\"{upstream_addr}\"]\n  health_check_interval_ms: 100\n  admin_connect_timeout_ms: 300\n  admin_read_timeout_ms: 2000\n  pingora_conf: pingora.yaml\n{edge_extra}admin:\n  listen: {admin_addr}\n  api_key: {KEY}\ntls:\n  listen: {https}\n  cert_path: cert.pem\n  key_path: key.pem\n{tls_extra}",
                data = dir.path().join("data").display(),
                https_port = https.port(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(cert.der.clone())).unwrap();
        let mut edge = Self {
            dir,
            config,
            plain,
            https,
            edge: None,
            admin: None,
            roots,
        };
        if upstream.is_none() {
            edge.admin = Some(edge.spawn(&["admin"], "admin"));
            wait_until(Duration::from_secs(30), "admin /api/health", || {
                request(admin_addr, "GET", "/api/health", &[], b"").is_ok_and(|r| r.status == 200)
            });
        }
        edge.edge = Some(edge.spawn(&["edge"], "edge"));
        edge.wait_ready();
        edge
    }

    /// `uload ARGS --config FILE`, stderr appended to `LOG.stderr`.
    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{log}.stderr")))
            .unwrap();
        let mut cmd = common::uload_command(self.dir.path());
        cmd.args(args).arg("--config").arg(&self.config);
        Proc(
            cmd.env("RUST_LOG", "warn,uload=info")
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        )
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.stderr"))).unwrap_or_default()
    }

    fn edge_pid(&self) -> u32 {
        self.edge.as_ref().unwrap().0.id()
    }

    /// Both listeners answer `/health` (plain HTTP, and HTTPS from a new
    /// connection).
    fn wait_ready(&self) {
        let plain = self.plain;
        wait_until(Duration::from_secs(30), "edge /health", || {
            request(plain, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
        });
        let rt = runtime();
        wait_until(Duration::from_secs(30), "edge /health over HTTPS", || {
            rt.block_on(async {
                let Ok(mut s) = try_connect(self.https, &self.roots, &[b"http/1.1"]).await else {
                    return false;
                };
                h1(&mut s, "GET", "/health", &[], b"").await.status == 200
            })
        });
    }

    /// Waits until `/api/health` answers through the edge over HTTPS (its
    /// health check has seen the admin).
    async fn wait_api(&self) {
        for _ in 0..3_000 {
            let mut s = connect(self.https, &self.roots, &[b"http/1.1"]).await;
            if h1(&mut s, "GET", "/api/health", &[], b"").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("/api never answered through the edge over HTTPS");
    }

    fn signal(&self, sig: &str, pid: u32) {
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.edge.take();
        self.admin.take();
        if std::thread::panicking() {
            for name in ["edge", "edge-new", "admin"] {
                eprintln!("---- {name} stderr ----\n{}", self.log(name));
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn try_connect(
    addr: SocketAddr,
    roots: &RootCertStore,
    alpn: &[&[u8]],
) -> std::io::Result<Tls> {
    // A fresh config per connection: no session is resumed, so every
    // handshake shows the certificate the edge serves now.
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost".to_owned()).unwrap();
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    };
    tokio::time::timeout(IO_LIMIT, connect)
        .await
        .map_err(|_| std::io::Error::other("TLS connect timed out"))?
}

async fn connect(addr: SocketAddr, roots: &RootCertStore, alpn: &[&[u8]]) -> Tls {
    try_connect(addr, roots, alpn)
        .await
        .unwrap_or_else(|e| panic!("TLS connect to {addr}: {e}"))
}

/// The leaf certificate the edge presented on `s`.
fn leaf(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn alpn(s: &Tls) -> Option<Vec<u8>> {
    s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// One HTTP/1.1 request on a kept-alive TLS connection; reads exactly one
/// response (by `content-length`, or chunked).
async fn h1(
    s: &mut Tls,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let exchange = async {
        s.write_all(&bytes).await?;
        s.flush().await?;
        read_response(s, method == "HEAD").await
    };
    tokio::time::timeout(IO_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

async fn read_response(s: &mut Tls, head: bool) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if s.read_buf(&mut buf).await? == 0 || buf.len() > 1 << 20 {
            return Err(std::io::Error::other(format!(
                "no response header: {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if head || status == 204 || status == 304 {
        body.clear();
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        while body.len() < len {
            if s.read_buf(&mut body).await? == 0 {
                return Err(std::io::Error::other("body cut short"));
            }
        }
        body.truncate(len);
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while !body.ends_with(b"0\r\n\r\n") {
            if s.read_buf(&mut body).await? == 0 {
                return Err(std::io::Error::other("chunked body cut short"));
            }
        }
        body = dechunk(&body);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line]).unwrap().trim(), 16).unwrap();
        data = &data[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// An HTTP/2 connection over `s` (ALPN h2); the connection task runs on
/// the test's runtime.
async fn h2_client(s: Tls) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = tokio::time::timeout(IO_LIMIT, h2::client::handshake(s))
        .await
        .expect("h2 handshake timed out")
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One HTTP/2 request (no body).
async fn h2_req(send: &h2::client::SendRequest<Bytes>, method: &str, path: &str) -> Response {
    let exchange = async {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .body(())
            .unwrap();
        let mut send = send.clone().ready().await?;
        let (resp, _) = send.send_request(req, true)?;
        let resp = resp.await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        let mut recv = resp.into_body();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            recv.flow_control().release_capacity(chunk.len())?;
            body.extend_from_slice(&chunk);
        }
        Ok::<_, h2::Error>(Response {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(IO_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("h2 {method} {path}: no response"))
        .unwrap_or_else(|e| panic!("h2 {method} {path}: {e}"))
}

/// Creates `code` → `url` over HTTPS and waits until the edge serves it.
async fn create_link(edge: &Edge, code: &str, url: &str) {
    edge.wait_api().await;
    let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
    let auth = format!("Bearer {KEY}");
    let body = format!(r#"{{"url":"{url}","code":"{code}"}}"#);
    let r = h1(
        &mut s,
        "POST",
        "/api/links",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    // The admin's answer came through the edge over TLS: HSTS on it too.
    assert!(r.header("strict-transport-security").is_some(), "{r:?}");
    for _ in 0..2_000 {
        if h1(&mut s, "GET", &format!("/{code}"), &[], b"")
            .await
            .status
            == 302
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("/{code} never served");
}

const HSTS: &str = "max-age=31536000; includeSubDomains";

#[test]
fn redirects_over_https_h1_and_h2_carry_hsts() {
    let cert = make_cert(1, "uload test A");
    let edge = Edge::start(&cert, "", "  hsts_include_subdomains: true\n", None);
    let rt = runtime();
    rt.block_on(async {
        create_link(&edge, "docs", "https://example.com/docs?a=1").await;

        // HTTP/1.1 over TLS (the client offers only http/1.1), two requests
        // on one connection.
        let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        assert_eq!(leaf(&s), cert.der);
        assert_eq!(alpn(&s).as_deref(), Some(&b"http/1.1"[..]));
        for _ in 0..2 {
            let r = h1(&mut s, "GET", "/docs", &[], b"").await;
            assert_eq!(r.status, 302);
            assert_eq!(r.header("location"), Some("https://example.com/docs?a=1"));
            assert_eq!(r.header("strict-transport-security"), Some(HSTS));
        }
        let r = h1(&mut s, "GET", "/nope", &[], b"").await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("strict-transport-security"), Some(HSTS));

        // HTTP/2: offered first, so chosen; several streams on one connection.
        let s = connect(edge.https, &edge.roots, &[b"h2", b"http/1.1"]).await;
        assert_eq!(alpn(&s).as_deref(), Some(&b"h2"[..]));
        let send = h2_client(s).await;
        for _ in 0..3 {
            let r = h2_req(&send, "GET", "/docs").await;
            assert_eq!(r.status, 302);
            assert_eq!(r.header("location"), Some("https://example.com/docs?a=1"));
            assert_eq!(r.header("strict-transport-security"), Some(HSTS));
        }
        let r = h2_req(&send, "HEAD", "/docs").await;
        assert_eq!(r.status, 302);
        assert_eq!(r.header("location"), Some("https://example.com/docs?a=1"));
        let r = h2_req(&send, "GET", "/health").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("strict-transport-security"), Some(HSTS));
        // Proxied to the admin over h2 as well.
        let r = h2_req(&send, "GET", "/api/health").await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("strict-transport-security"), Some(HSTS));
        let r = h2_req(&send, "DELETE", "/docs").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    });

    // Plain HTTP still serves (redirect_http is off), without HSTS.
    let r = common::get(edge.plain, "/docs");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("https://example.com/docs?a=1"));
    assert_eq!(r.header("strict-transport-security"), None);
}

#[test]
fn plain_http_is_redirected_to_https_except_health() {
    let cert = make_cert(2, "uload test redirect");
    let edge = Edge::start(&cert, "", "  redirect_http: true\n", None);
    let tls_port = edge.https.port();
    let plain = edge.plain;

    // Everything but the health checks: 308 to the same path and query on
    // https, on the HTTPS port; no HSTS on plain HTTP.
    for (method, target) in [
        ("GET", "/docs?x=1&y=%20"),
        ("HEAD", "/docs"),
        ("GET", "/"),
        ("GET", "/api/health"),
        ("POST", "/api/links"),
        ("DELETE", "/api/links/docs"),
    ] {
        let r = request(plain, method, target, &[], b"").unwrap();
        assert_eq!(r.status, 308, "{method} {target}");
        assert_eq!(
            r.header("location").map(str::to_owned),
            Some(format!("https://127.0.0.1:{tls_port}{target}")),
            "{method} {target}"
        );
        assert_eq!(r.header("strict-transport-security"), None);
    }
    // The host named by the request is kept; its port is replaced.
    let head = raw_head(
        plain,
        "GET /docs?q HTTP/1.1\r\nHost: ulo.ad:80\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 308"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "\r\nlocation: https://ulo.ad:{tls_port}/docs?q\r\n"
        )),
        "{head}"
    );
    // Without a usable host there is nowhere to send the client.
    let head = raw_head(
        plain,
        "GET /docs HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    for target in ["/health", "/health/ready"] {
        let r = common::get(plain, target);
        assert_ne!(r.status, 308, "{target}");
        assert_eq!(r.header("strict-transport-security"), None);
    }
    assert_eq!(common::get(plain, "/health").status, 200);

    // The Location is followed over HTTPS: the API and redirects work there.
    let rt = runtime();
    rt.block_on(async {
        create_link(&edge, "docs", "https://example.com/d").await;
        let location = common::get(plain, "/docs")
            .header("location")
            .unwrap()
            .to_owned();
        let path = location
            .strip_prefix(&format!("https://127.0.0.1:{tls_port}"))
            .unwrap();
        let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        let r = h1(&mut s, "GET", path, &[], b"").await;
        assert_eq!(r.status, 302);
        assert_eq!(r.header("location"), Some("https://example.com/d"));
        assert_eq!(
            r.header("strict-transport-security"),
            Some("max-age=31536000")
        );
        let send = h2_client(connect(edge.https, &edge.roots, &[b"h2"]).await).await;
        let r = h2_req(&send, "GET", path).await;
        assert_eq!(r.status, 302);
        assert_eq!(
            r.header("strict-transport-security"),
            Some("max-age=31536000")
        );
    });
}

/// Sends `raw` over plain TCP and returns the response header.
fn raw_head(addr: SocketAddr, raw: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_LIMIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned() + "\r\n"
}

/// An upstream standing in for the admin: answers every request 200 with
/// the `x-forwarded-proto` it received as the body.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(100_000) {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(IO_LIMIT)).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 1 << 16 {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let proto = text
                    .lines()
                    .find_map(|l| l.strip_prefix("x-forwarded-proto:"))
                    .map_or("(none)", str::trim)
                    .to_owned();
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{proto}",
                        proto.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    addr
}

#[test]
fn the_admin_is_told_which_protocol_the_client_used() {
    let cert = make_cert(3, "uload test proto");
    let edge = Edge::start(&cert, "", "", Some(echo_upstream()));
    let rt = runtime();
    rt.block_on(async {
        edge.wait_api().await;
        let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        // A client's own claim is replaced.
        let r = h1(
            &mut s,
            "GET",
            "/api/x",
            &[("X-Forwarded-Proto", "gopher")],
            b"",
        )
        .await;
        assert_eq!((r.status, &r.body[..]), (200, &b"https"[..]));
        let send = h2_client(connect(edge.https, &edge.roots, &[b"h2"]).await).await;
        let r = h2_req(&send, "GET", "/api/x").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"https"[..]));
    });
    let r = request(
        edge.plain,
        "GET",
        "/api/x",
        &[("X-Forwarded-Proto", "https")],
        b"",
    )
    .unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"http"[..]));
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    let old = make_cert(10, "uload test old");
    let new = make_cert(11, "uload test new");
    let mut edge = Edge::start(&old, "", "", None);
    edge.roots
        .add(CertificateDer::from(new.der.clone()))
        .unwrap();
    let rt = runtime();
    rt.block_on(async {
        create_link(&edge, "k", "https://example.com/k").await;
        // Connections opened before the reload, one of each protocol.
        let mut h1_conn = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        assert_eq!(leaf(&h1_conn), old.der);
        assert_eq!(h1(&mut h1_conn, "GET", "/k", &[], b"").await.status, 302);
        let h2_tls = connect(edge.https, &edge.roots, &[b"h2"]).await;
        assert_eq!(leaf(&h2_tls), old.der);
        let h2_conn = h2_client(h2_tls).await;
        assert_eq!(h2_req(&h2_conn, "GET", "/k").await.status, 302);

        // A key that does not match the certificate: refused, logged, and
        // the old certificate stays.
        install(edge.dir.path(), &new.cert_pem, &old.key_pem);
        edge.signal("-HUP", edge.edge_pid());
        wait_until(Duration::from_secs(30), "the failed reload logged", || {
            edge.log("edge").contains("certificate reload failed")
        });
        assert!(
            edge.log("edge").contains("tls.key_path"),
            "{}",
            edge.log("edge")
        );
        let s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        assert_eq!(leaf(&s), old.der, "a bad pair must not be served");

        // The right pair: new handshakes get the new certificate.
        install(edge.dir.path(), &new.cert_pem, &new.key_pem);
        edge.signal("-HUP", edge.edge_pid());
        let mut seen = false;
        for _ in 0..3_000 {
            let s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
            if leaf(&s) == new.der {
                seen = true;
                break;
            }
            assert_eq!(leaf(&s), old.der);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "the new certificate was never served");
        let mut s = connect(edge.https, &edge.roots, &[b"h2", b"http/1.1"]).await;
        assert_eq!(leaf(&s), new.der);
        assert_eq!(alpn(&s).as_deref(), Some(&b"h2"[..]));
        let _ = s.shutdown().await;

        // The connections opened before keep working, on the old session.
        for _ in 0..3 {
            assert_eq!(h1(&mut h1_conn, "GET", "/k", &[], b"").await.status, 302);
            assert_eq!(h2_req(&h2_conn, "GET", "/k").await.status, 302);
        }
        assert_eq!(leaf(&h1_conn), old.der);
    });
    // Same process all along.
    let child = &mut edge.edge.as_mut().unwrap().0;
    assert!(child.try_wait().unwrap().is_none(), "the edge exited");
}

/// 2021-01-01 and 2099-01-01 in Unix seconds.
const Y2021: f64 = 1_609_459_200.0;
const Y2099: f64 = 4_070_908_800.0;

#[test]
fn a_certificate_outside_its_validity_is_refused_by_reload_and_check_config_but_served_at_start() {
    let good = make_cert_valid(40, "uload test good", Some((2025, 2099)));
    let expired = make_cert_valid(41, "uload test expired", Some((2020, 2021)));
    let future = make_cert_valid(42, "uload test future", Some((2099, 2100)));
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut edge = Edge::start(
        &good,
        "",
        &format!("metrics:\n  listen: {metrics_addr}\n"),
        None,
    );
    for c in [&expired, &future] {
        edge.roots.add(CertificateDer::from(c.der.clone())).unwrap();
    }
    let scrape = || {
        let r = request(metrics_addr, "GET", "/metrics", &[], b"").unwrap();
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    };
    let not_after = "tls_certificate_not_after_timestamp_seconds";
    let failures = "tls_certificate_reload_failures_total";
    let failing = "tls_certificate_reload_failing";
    let text = scrape();
    assert_eq!(metric(&text, not_after), Y2099, "{text}");
    assert!(text.contains(&format!("{failures} 0")), "{text}");
    assert!(text.contains(&format!("{failing} 0")), "{text}");
    let rt = runtime();

    // Expired, then not valid yet: each reload is refused and counted, the
    // good certificate stays, and the log says why.
    for (n, (cert, why)) in [
        (&expired, "expired at 2021-01-01T00:00:00.000Z"),
        (&future, "not valid before 2099-01-01T00:00:00.000Z"),
    ]
    .into_iter()
    .enumerate()
    {
        install(edge.dir.path(), &cert.cert_pem, &cert.key_pem);
        edge.signal("-HUP", edge.edge_pid());
        wait_until(Duration::from_secs(30), "the refused reload logged", || {
            edge.log("edge")
                .matches("certificate reload failed")
                .count()
                == n + 1
        });
        assert!(edge.log("edge").contains(why), "{}", edge.log("edge"));
        let text = scrape();
        assert_eq!(metric(&text, failures), (n + 1) as f64, "{text}");
        assert_eq!(metric(&text, failing), 1.0, "{text}");
        assert_eq!(metric(&text, not_after), Y2099, "{text}");
        rt.block_on(async {
            let s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
            assert_eq!(
                leaf(&s),
                good.der,
                "a certificate outside its validity was served"
            );
        });
    }

    // `check-config` refuses the expired certificate, naming key and file.
    install(edge.dir.path(), &expired.cert_pem, &expired.key_pem);
    let out = common::uload_command(edge.dir.path())
        .arg("check-config")
        .arg(&edge.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check-config passed an expired certificate"
    );
    assert!(
        stderr.contains("tls.cert_path")
            && stderr.contains("cert.pem")
            && stderr.contains("expired at 2021"),
        "{stderr}"
    );

    // An edge (re)started with it still starts and serves redirects over
    // plain HTTP, says so in its log, and exports the notAfter for the
    // alert; a verifying client refuses the certificate itself.
    rt.block_on(create_link(&edge, "x", "https://example.com/x"));
    edge.edge.take();
    edge.edge = Some(edge.spawn(&["edge"], "edge-new"));
    let plain = edge.plain;
    wait_until(Duration::from_secs(30), "edge /health", || {
        request(plain, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    wait_until(Duration::from_secs(30), "edge /metrics", || {
        request(metrics_addr, "GET", "/metrics", &[], b"").is_ok_and(|r| r.status == 200)
    });
    let r = request(plain, "GET", "/x", &[], b"").unwrap();
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("https://example.com/x"))
    );
    assert!(
        edge.log("edge-new").contains("outside its validity period"),
        "{}",
        edge.log("edge-new")
    );
    assert_eq!(metric(&scrape(), not_after), Y2021);
    let refused = rt.block_on(try_connect(edge.https, &edge.roots, &[b"http/1.1"]));
    let Err(e) = refused else {
        panic!("a client accepted an expired certificate");
    };
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
}

#[test]
fn a_graceful_upgrade_serves_the_new_certificate() {
    let old = make_cert(20, "uload test before upgrade");
    let new = make_cert(21, "uload test after upgrade");
    let mut edge = Edge::start(&old, "", "", None);
    edge.roots
        .add(CertificateDer::from(new.der.clone()))
        .unwrap();
    let rt = runtime();
    let new_edge = rt.block_on(async {
        create_link(&edge, "u", "https://example.com/u").await;
        let mut before = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        assert_eq!(h1(&mut before, "GET", "/u", &[], b"").await.status, 302);

        install(edge.dir.path(), &new.cert_pem, &new.key_pem);
        let mut new_edge = edge.spawn(&["edge", "-u"], "edge-new");
        let sock = edge.dir.path().join("upgrade.sock");
        wait_until(
            Duration::from_secs(30),
            "the new edge's upgrade socket",
            || sock.exists(),
        );
        let old_pid = edge.edge_pid();
        edge.signal("-QUIT", old_pid);
        // The old process keeps serving the connection it has while it
        // drains (Pingora keeps accepting for 5 s after SIGQUIT, then
        // finishes what is in flight).
        assert_eq!(h1(&mut before, "GET", "/u", &[], b"").await.status, 302);
        assert_eq!(leaf(&before), old.der);

        let mut old_proc = edge.edge.take().unwrap();
        let exited = old_proc.0.wait().unwrap();
        eprintln!("old edge exited: {exited:?}");
        // Only the new process is left: every handshake shows the new
        // certificate.
        for _ in 0..3 {
            let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
            assert_eq!(leaf(&s), new.der);
            assert_eq!(h1(&mut s, "GET", "/u", &[], b"").await.status, 302);
        }
        assert!(new_edge.0.try_wait().unwrap().is_none(), "new edge running");
        new_edge
    });
    edge.edge = Some(new_edge);
}

/// A graceful upgrade (`uload edge -u`) on a certificate outside its
/// validity period stops before it takes any socket: the running edge goes
/// on serving HTTPS with its own certificate. (It used to take the sockets
/// and serve the new one, so that every handshake failed once the old edge
/// had drained, where a SIGHUP reload refuses such a certificate.)
#[test]
fn an_upgrade_on_a_certificate_outside_its_validity_leaves_the_running_edge_serving() {
    let good = make_cert_valid(50, "uload test good", Some((2025, 2099)));
    let future = make_cert_valid(51, "uload test future", Some((2099, 2100)));
    let mut edge = Edge::start(&good, "", "", None);
    install(edge.dir.path(), &future.cert_pem, &future.key_pem);
    let mut new_edge = edge.spawn(&["edge", "-u"], "edge-new");
    // An operator (or deploy.sh) tells the running edge to hand over once
    // the new one waits on the upgrade socket; it must never get there.
    let sock = edge.dir.path().join("upgrade.sock");
    let mut status = None;
    wait_until(
        Duration::from_secs(30),
        "the new edge to exit or wait for the sockets",
        || {
            status = new_edge.0.try_wait().unwrap();
            status.is_some() || sock.exists()
        },
    );
    let log = edge.log("edge-new");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the new edge waits for the running edge's sockets\n{log}"
    );
    assert!(
        log.contains("not valid before 2099-01-01T00:00:00.000Z"),
        "{log}"
    );
    // The running edge was not asked to hand over, and serves as before.
    assert!(edge.edge.as_mut().unwrap().0.try_wait().unwrap().is_none());
    runtime().block_on(async {
        create_link(&edge, "v", "https://example.com/v").await;
        let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        assert_eq!(leaf(&s), good.der);
        assert_eq!(h1(&mut s, "GET", "/v", &[], b"").await.status, 302);
    });
}

#[test]
fn a_bad_certificate_or_key_stops_the_edge_and_check_config() {
    let good = make_cert(30, "uload test good");
    let other = make_cert(31, "uload test other");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("uload.yaml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "data_dir: {}\nedge:\n  listen: 127.0.0.1:{}\ntls:\n  listen: 127.0.0.1:{port}\n  cert_path: cert.pem\n  key_path: key.pem\n",
            dir.path().join("data").display(),
            free_port(),
        ),
    )
    .unwrap();
    let run = |sub: &[&str]| {
        let mut cmd = common::uload_command(dir.path());
        cmd.args(sub);
        if sub[0] == "check-config" {
            cmd.arg(&config);
        } else {
            cmd.arg("--config").arg(&config);
        }
        let log = dir.path().join("stderr");
        let mut child = Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        // It must exit by itself; an edge that started anyway is killed
        // (by the guard) and fails the test.
        let mut status = None;
        wait_until(Duration::from_secs(30), "uload to exit", || {
            status = child.0.try_wait().unwrap();
            status.is_some()
        });
        let stderr = std::fs::read_to_string(&log).unwrap();
        (status.unwrap().success(), stderr)
    };
    let cert = dir.path().join("cert.pem").display().to_string();
    let key = dir.path().join("key.pem").display().to_string();
    let cases: [(Option<&str>, Option<&str>, &str, &str); 4] = [
        (None, Some(&good.key_pem), "tls.cert_path", &cert),
        (Some(&good.cert_pem), None, "tls.key_path", &key),
        (
            Some("not a certificate\n"),
            Some(&good.key_pem),
            "tls.cert_path",
            &cert,
        ),
        (
            Some(&good.cert_pem),
            Some(&other.key_pem),
            "tls.key_path",
            &key,
        ),
    ];
    for (cert_pem, key_pem, bad_key, bad_file) in cases {
        for (name, text) in [("cert.pem", cert_pem), ("key.pem", key_pem)] {
            let path = dir.path().join(name);
            match text {
                Some(t) => std::fs::write(&path, t).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        for sub in [&["check-config"][..], &["edge"][..]] {
            let (ok, stderr) = run(sub);
            assert!(!ok, "{sub:?} accepted a bad {bad_key}");
            assert!(
                stderr.contains(bad_key) && stderr.contains(bad_file),
                "{sub:?}: {stderr}"
            );
        }
    }
    // And the good pair passes the check.
    install(dir.path(), &good.cert_pem, &good.key_pem);
    let (ok, stderr) = run(&["check-config"]);
    assert!(ok, "{stderr}");
}

#[test]
fn a_silent_connection_is_closed_whatever_its_protocol() {
    let cert = make_cert(40, "uload test silent");
    let edge = Edge::start(
        &cert,
        "  client_header_timeout_ms: 300\n  keepalive_timeout_ms: 300\n",
        "",
        None,
    );
    let rt = runtime();
    rt.block_on(async {
        // After the TLS handshake: no HTTP/2 preface, no HTTP/1.1 request,
        // or an HTTP/2 connection with no request. Each is closed by the
        // edge (read returns 0, or an error for a close without TLS
        // close_notify) rather than held open.
        for (proto, preface) in [
            (&b"h2"[..], false),
            (&b"http/1.1"[..], false),
            (&b"h2"[..], true),
        ] {
            let mut s = connect(edge.https, &edge.roots, &[proto]).await;
            assert_eq!(alpn(&s).as_deref(), Some(proto));
            if preface {
                s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                    .await
                    .unwrap();
            }
            let mut buf = [0u8; 1024];
            let closed = async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {} // the server's SETTINGS, GOAWAY
                    }
                }
            };
            tokio::time::timeout(IO_LIMIT, closed)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{:?} (preface sent: {preface}) still open",
                        String::from_utf8_lossy(proto)
                    )
                });
        }
        // A well-behaved client is served as before.
        let send = h2_client(connect(edge.https, &edge.roots, &[b"h2"]).await).await;
        assert_eq!(h2_req(&send, "GET", "/health").await.status, 200);
    });
}

/// The 408 for a header that did not come in time is written by the edge's
/// connection handling, outside Pingora's modules, which add HSTS to every
/// other HTTPS answer: over TLS it carries HSTS too (it did not; found by
/// review), and over plain HTTP it does not.
#[test]
fn a_408_over_tls_carries_hsts() {
    let cert = make_cert(42, "uload test 408");
    let edge = Edge::start(
        &cert,
        "  client_header_timeout_ms: 300\n",
        "  hsts_include_subdomains: true\n",
        None,
    );
    let partial = b"GET /abc HTTP/1.1\r\nHost: localhost\r\n";
    let rt = runtime();
    let over_tls = rt.block_on(async {
        let mut s = connect(edge.https, &edge.roots, &[b"http/1.1"]).await;
        s.write_all(partial).await.unwrap();
        s.flush().await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "no answer within 10 s");
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(over_tls.starts_with("HTTP/1.1 408 "), "{over_tls}");
    assert!(
        over_tls.to_ascii_lowercase().contains(&format!(
            "strict-transport-security: {}\r\n",
            HSTS.to_ascii_lowercase()
        )),
        "{over_tls}"
    );
    let mut s = std::net::TcpStream::connect(edge.plain).unwrap();
    s.write_all(partial).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let plain = String::from_utf8_lossy(&out);
    assert!(plain.starts_with("HTTP/1.1 408 "), "{plain}");
    assert!(
        !plain
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "{plain}"
    );
}

/// `edge.client_header_timeout_ms` is the time a client has from connecting
/// for its first request, and a connection that sent nothing is closed then.
/// On the HTTPS listener the clock started only after the TLS handshake,
/// which Pingora bounds at a fixed 60 s: a client that connected and never
/// sent its ClientHello (or sent part of it) held the connection 60 s
/// whatever the limit said (found by review). Now its ClientHello must be
/// whole within the header time (`tls::ClientHelloDeadline`); the test
/// waits at most 10 s for the close, with a limit of 300 ms.
#[test]
fn a_connection_that_never_finishes_its_tls_handshake_is_closed_within_the_header_time() {
    let cert = make_cert(41, "uload test silent handshake");
    let edge = Edge::start(
        &cert,
        "  client_header_timeout_ms: 300\n  keepalive_timeout_ms: 300\n",
        "",
        None,
    );
    // The same silence on the plain listener: closed within the limit.
    let limit = Duration::from_secs(10);
    for (what, addr, bytes) in [
        ("plain, nothing sent", edge.plain, &b""[..]),
        ("TLS, nothing sent", edge.https, &b""[..]),
        (
            "TLS, part of a ClientHello",
            edge.https,
            &b"\x16\x03\x01\x02\x00\x01"[..],
        ),
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s.set_read_timeout(Some(limit)).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "closed".to_owned(),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break "open".to_owned();
                }
                Err(e) => break format!("reset ({e})"),
            }
        };
        assert_ne!(
            end,
            "open",
            "{what}: still open after {:?} (client_header_timeout_ms: 300)",
            started.elapsed()
        );
    }
}
