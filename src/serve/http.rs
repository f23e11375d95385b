//! A small synchronous HTTP/1.1 server for `serve`'s read-only endpoints: one thread per
//! connection, at most [`MAX_CONNECTIONS`] at once ([`MAX_STREAMS`] of them event streams), one
//! request per connection. Every read and write is bounded: the request head must arrive whole
//! within [`HEAD_TIMEOUT`] and fit [`MAX_HEAD`] bytes, a body is never read, a write that
//! cannot go on for [`WRITE_TIMEOUT`] ends the connection. A client can therefore hold at most
//! a thread and a socket for a bounded time, and the watcher never waits for one: it only
//! appends to the hub's bounded event ring.
//!
//! Why not hyper on the tokio that is already linked: a read-only endpoint serving a handful
//! of scrapers and browsers needs no async I/O; this keeps `serve` free of another framework
//! (measured in the README) and works in builds without the etcd feature, which is what brings
//! tokio's runtime in.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hub::Hub;
use crate::observe::metrics::Format;

/// Connections served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Event streams at once (`/api/v1/events`).
pub const MAX_STREAMS: usize = 32;
/// Largest request head.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time for the whole request head to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a write may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An event stream says it is alive this often (and finds out that its client left).
pub const KEEPALIVE: Duration = Duration::from_secs(15);

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The server's shared parts.
struct Server {
    hub: Arc<Hub>,
    /// Whether only loopback clients are expected (then the `Host` header must name this
    /// machine: a web page elsewhere cannot read the dashboard through DNS rebinding).
    loopback: bool,
    connections: AtomicUsize,
    streams: AtomicUsize,
}

/// Serves `listener` on this thread, forever.
pub fn serve(listener: TcpListener, hub: Arc<Hub>) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let server = Arc::new(Server {
        hub,
        loopback,
        connections: AtomicUsize::new(0),
        streams: AtomicUsize::new(0),
    });
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        if server.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            server.connections.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = respond(
                &mut conn,
                503,
                "text/plain",
                b"too many connections\n",
                false,
                &[],
            );
            continue;
        }
        let s = server.clone();
        let spawned = std::thread::Builder::new()
            .name("cachelock-http".into())
            .spawn(move || {
                s.handle(conn);
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            server.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One request's head, as much as is used.
struct Head {
    method: String,
    path: String,
    accept: Option<String>,
    host: Option<String>,
    last_event_id: Option<u64>,
}

/// Reads a request head within [`HEAD_TIMEOUT`] and [`MAX_HEAD`]; `Err` with the status to
/// answer.
fn read_head(conn: &mut TcpStream) -> Result<Head, u16> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(408);
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = match conn.read(&mut buf[len..]) {
            Ok(0) => return Err(400),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(408),
        };
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::to_string)
                };
                return Ok(Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("/").to_string(),
                    accept: header("accept"),
                    host: header("host"),
                    last_event_id: header("last-event-id").and_then(|v| v.trim().parse().ok()),
                });
            }
            Ok(httparse::Status::Partial) if len < buf.len() => {}
            Ok(httparse::Status::Partial) => return Err(431),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

/// Whether `host` (a `Host` header) names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes a whole response (`body` left out for HEAD).
fn respond(
    conn: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; frame-ancestors 'none'\r\n\
         Referrer-Policy: no-referrer\r\nConnection: close\r\n",
        status_text(code),
        body.len()
    );
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut all = out.into_bytes();
    if !head_only {
        all.extend_from_slice(body);
    }
    conn.write_all(&all)?;
    conn.flush()
}

impl Server {
    fn handle(&self, mut conn: TcpStream) {
        let head = match read_head(&mut conn) {
            Ok(h) => h,
            Err(code) => {
                let _ = respond(&mut conn, code, "text/plain", b"bad request\n", false, &[]);
                return;
            }
        };
        let head_only = match head.method.as_str() {
            "GET" => false,
            "HEAD" => true,
            _ => {
                let _ = respond(
                    &mut conn,
                    405,
                    "text/plain",
                    b"this server only reads: GET or HEAD\n",
                    false,
                    &[("Allow", "GET, HEAD")],
                );
                return;
            }
        };
        if self.loopback && !head.host.as_deref().is_some_and(loopback_host) {
            let _ = respond(
                &mut conn,
                403,
                "text/plain",
                b"the Host header does not name this machine\n",
                head_only,
                &[],
            );
            return;
        }
        let path = head.path.split(['?', '#']).next().unwrap_or("/");
        const JSON: &str = "application/json";
        let found = |ctype, body: Vec<u8>| (200, ctype, body);
        let (code, ctype, body) = match path {
            "/" | "/index.html" => found("text/html; charset=utf-8", INDEX.into()),
            "/assets/app.js" => found("text/javascript; charset=utf-8", APP_JS.into()),
            "/assets/style.css" => found("text/css; charset=utf-8", STYLE.into()),
            "/metrics" => {
                let f = Format::from_accept(head.accept.as_deref());
                found(f.content_type(), self.hub.metrics(f).into_bytes())
            }
            "/api/v1/locks" => found(JSON, self.hub.snapshot().json.clone().into_bytes()),
            "/api/v1/waits" => found(JSON, self.hub.waits_json().into_bytes()),
            "/api/v1/cache" if self.hub.snapshot().cache_json.is_some() => found(
                JSON,
                self.hub
                    .snapshot()
                    .cache_json
                    .clone()
                    .unwrap_or_default()
                    .into_bytes(),
            ),
            "/api/v1/events" if !head_only => return self.stream(conn, head.last_event_id),
            "/api/v1/events" => found("text/event-stream", Vec::new()),
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        let _ = respond(&mut conn, code, ctype, &body, head_only, &[]);
    }

    /// `/api/v1/events`: server-sent events from the hub's ring, from `last` on (a reconnecting
    /// browser's `Last-Event-ID`), else from now.
    fn stream(&self, mut conn: TcpStream, last: Option<u64>) {
        if self.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(
                &mut conn,
                503,
                "text/plain",
                b"too many event streams\n",
                false,
                &[],
            );
            return;
        }
        let start = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                     Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
                     Connection: close\r\n\r\nretry: 2000\n\n";
        let mut seq = last.unwrap_or_else(|| self.hub.events.head());
        let mut ok = conn.write_all(start.as_bytes()).is_ok();
        while ok {
            let text = match self.hub.events.after(seq, KEEPALIVE) {
                Ok(evs) if evs.is_empty() => ": alive\n\n".to_string(),
                Ok(evs) => {
                    let mut t = String::new();
                    for (n, event) in evs {
                        t.push_str(&format!("id: {n}\n{event}\n"));
                        seq = n;
                    }
                    t
                }
                // Fell behind the ring: what is gone is gone; go on from the oldest kept.
                Err(oldest) => {
                    let missed = oldest - seq - 1;
                    seq = oldest - 1;
                    format!(": {missed} events missed\n\n")
                }
            };
            ok = conn.write_all(text.as_bytes()).is_ok() && conn.flush().is_ok();
        }
        self.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The address `serve` listens on by default.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9731))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for h in [
            "localhost:9731",
            "127.0.0.1:9731",
            "[::1]:9731",
            "LOCALHOST",
            "127.1.2.3",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:9731",
            "10.0.0.1",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }
}
