//! The access log: one line per request (JSON or text), for the requests a sample picks, on
//! standard output. Knows nothing of how a request was served: the request path hands it a
//! finished `Record`.
//!
//! The request path never waits on it: a record goes into a bounded queue (`try_send`), a
//! thread of its own formats and writes it, and a record that finds the queue full is dropped
//! and counted (`lb_access_log_dropped_total`). A slow or blocked standard output costs lines,
//! never requests.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Version};
use prometheus::IntCounter;

use crate::config::AccessLogFormat;
use crate::time::format_utc;

/// What one request was and what became of it.
pub struct Record {
    pub unix_ms: u64,
    pub request_id: HeaderValue,
    pub client: SocketAddr,
    pub method: Method,
    /// As the client sent it (target authority or `Host`).
    pub host: String,
    /// Path and query, as routed and forwarded.
    pub target: String,
    pub version: Version,
    pub status: u16,
    /// The request body's declared length (`None`: not declared, streamed).
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
    /// Until the response's last byte went out (or the exchange broke off).
    pub duration: Duration,
    /// Until the backend's response head arrived; `None` when the lb answered itself.
    pub ttfb: Option<Duration>,
    pub route: String,
    pub backend: Option<String>,
    pub attempts: u32,
    /// Why the lb answered itself, or `incomplete` for a response cut off.
    pub error: Option<&'static str>,
}

/// The log's sending half, shared by the request path.
pub struct AccessLog {
    /// The sample rate in millionths (1,000,000: every request).
    sample_ppm: u32,
    queue: SyncSender<Record>,
    dropped: IntCounter,
    /// Lines queued, and lines written and flushed: `finish` waits for the two to meet.
    queued: AtomicU64,
    flushed: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer thread; it ends when the log is dropped.
    pub fn start(
        format: AccessLogFormat,
        sample: f64,
        buffer: usize,
        lines: IntCounter,
        dropped: IntCounter,
    ) -> std::io::Result<AccessLog> {
        let (queue, rx) = sync_channel(buffer.max(1));
        let flushed = Arc::new(AtomicU64::new(0));
        let done = flushed.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, format, std::io::stdout(), &lines, &done))?;
        Ok(AccessLog {
            sample_ppm: (sample.clamp(0.0, 1.0) * 1e6).round() as u32,
            queue,
            dropped,
            queued: AtomicU64::new(0),
            flushed,
        })
    }

    /// Waits, `within` at most, until every line queued so far is written: at shutdown,
    /// after the last connections closed (their lines included).
    pub async fn finish(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.flushed.load(Ordering::Acquire) < self.queued.load(Ordering::Acquire)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether this request is to be logged.
    pub fn sampled(&self) -> bool {
        self.sample_ppm >= 1_000_000 || fastrand::u32(..1_000_000) < self.sample_ppm
    }

    /// Queues a record; a full queue drops it, counted.
    pub fn write(&self, r: Record) {
        match self.queue.try_send(r) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// How long the writer lets lines gather while they keep coming.
const GATHER: Duration = Duration::from_millis(10);

/// The writer: waits for a line, then, while lines keep coming, takes what gathered every
/// `GATHER` and writes it in one go. Under load the request path never wakes it (a sender
/// wakes only a writer blocked on the empty queue) and lines go out in large writes; a line
/// after a quiet spell goes out at once.
fn write_lines(
    rx: Receiver<Record>,
    format: AccessLogFormat,
    out: impl Write,
    lines: &IntCounter,
    flushed: &AtomicU64,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut written = 0u64;
    let mut line = Vec::with_capacity(512);
    let mut clock = Clock::default();
    let mut next = rx.recv().ok();
    while let Some(first) = next.take() {
        let mut r = Some(first);
        let mut open = true;
        while let Some(record) = r {
            line.clear();
            render(&record, format, &mut clock, &mut line);
            if out.write_all(&line).is_err() {
                return;
            }
            lines.inc();
            written += 1;
            r = match rx.try_recv() {
                Ok(record) => Some(record),
                Err(e) => {
                    open = e == std::sync::mpsc::TryRecvError::Empty;
                    None
                }
            };
        }
        if out.flush().is_err() || !open {
            return;
        }
        flushed.store(written, Ordering::Release);
        std::thread::sleep(GATHER);
        next = match rx.try_recv() {
            Ok(record) => Some(record),
            // Quiet: wait for the next line, however long.
            Err(std::sync::mpsc::TryRecvError::Empty) => rx.recv().ok(),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        };
    }
}

/// The wall clock's second, formatted once per second rather than once per line.
#[derive(Default)]
struct Clock {
    second: u64,
    text: String,
}

impl Clock {
    /// `2026-12-05T04:05:06.789Z`.
    fn write(&mut self, unix_ms: u64, b: &mut Vec<u8>) {
        let second = unix_ms / 1000;
        if self.text.is_empty() || second != self.second {
            self.second = second;
            self.text = format_utc(second as i64);
        }
        // The cached text ends in `Z`: the milliseconds go before it.
        b.extend_from_slice(&self.text.as_bytes()[..self.text.len() - 1]);
        let _ = write!(b, ".{:03}Z", unix_ms % 1000);
    }
}

/// Milliseconds with three decimals, in integers.
fn write_ms(b: &mut Vec<u8>, d: Duration) {
    let us = d.as_micros();
    let _ = write!(b, "{}.{:03}", us / 1000, us % 1000);
}

/// One line, newline included.
fn render(r: &Record, format: AccessLogFormat, clock: &mut Clock, b: &mut Vec<u8>) {
    let id = std::str::from_utf8(r.request_id.as_bytes()).unwrap_or("-");
    let version = version(r.version);
    match format {
        AccessLogFormat::Json => {
            b.extend_from_slice(b"{\"time\":\"");
            clock.write(r.unix_ms, b);
            b.extend_from_slice(b"\",\"request_id\":");
            json_str(b, id);
            let _ = write!(b, ",\"client\":\"{}\"", r.client);
            b.extend_from_slice(b",\"method\":");
            json_str(b, r.method.as_str());
            b.extend_from_slice(b",\"host\":");
            json_str(b, &r.host);
            b.extend_from_slice(b",\"path\":");
            json_str(b, &r.target);
            b.extend_from_slice(b",\"protocol\":");
            json_str(b, version);
            let _ = write!(b, ",\"status\":{},\"bytes_in\":", r.status);
            match r.bytes_in {
                Some(n) => {
                    let _ = write!(b, "{n}");
                }
                None => b.extend_from_slice(b"null"),
            }
            let _ = write!(b, ",\"bytes_out\":{},\"duration_ms\":", r.bytes_out);
            write_ms(b, r.duration);
            b.extend_from_slice(b",\"ttfb_ms\":");
            match r.ttfb {
                Some(t) => write_ms(b, t),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b",\"route\":");
            json_str(b, &r.route);
            b.extend_from_slice(b",\"backend\":");
            match &r.backend {
                Some(a) => json_str(b, a),
                None => b.extend_from_slice(b"null"),
            }
            let _ = write!(b, ",\"attempts\":{},\"error\":", r.attempts);
            match r.error {
                Some(e) => json_str(b, e),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b"}\n");
        }
        AccessLogFormat::Text => {
            // Quoted fields escape `"` and `\` and control bytes, so a line is always one
            // line and its fields split unambiguously.
            clock.write(r.unix_ms, b);
            b.push(b' ');
            text_into(b, id);
            let _ = write!(b, " {} \"", r.client);
            text_into(b, r.method.as_str());
            b.push(b' ');
            text_into(b, &r.target);
            let _ = write!(b, " {version}\" {} host=", r.status);
            text_into(b, if r.host.is_empty() { "-" } else { &r.host });
            b.extend_from_slice(b" in=");
            match r.bytes_in {
                Some(n) => {
                    let _ = write!(b, "{n}");
                }
                None => b.push(b'-'),
            }
            let _ = write!(b, " out={} dur_ms=", r.bytes_out);
            write_ms(b, r.duration);
            b.extend_from_slice(b" ttfb_ms=");
            match r.ttfb {
                Some(t) => write_ms(b, t),
                None => b.push(b'-'),
            }
            b.extend_from_slice(b" route=");
            text_into(b, if r.route.is_empty() { "-" } else { &r.route });
            let _ = writeln!(
                b,
                " backend={} attempts={} error={}",
                r.backend.as_deref().unwrap_or("-"),
                r.attempts,
                r.error.unwrap_or("-")
            );
        }
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// Visible ASCII as it is; space, `"`, `\`, control and other bytes as `\xHH`.
fn text_into(b: &mut Vec<u8>, s: &str) {
    for &c in s.as_bytes() {
        if c.is_ascii_graphic() && c != b'"' && c != b'\\' {
            b.push(c);
        } else {
            let _ = write!(b, "\\x{c:02x}");
        }
    }
}

/// A JSON string (RFC 8259 7).
fn json_str(b: &mut Vec<u8>, s: &str) {
    b.push(b'"');
    // Most values need no escape: copied whole.
    if !s.bytes().any(|c| c < 0x20 || c == b'"' || c == b'\\') {
        b.extend_from_slice(s.as_bytes());
        b.push(b'"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => b.extend_from_slice(b"\\\""),
            '\\' => b.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(b, "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0; 4];
                b.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    b.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            unix_ms: 1_796_443_506_789,
            request_id: HeaderValue::from_static("abc123"),
            client: "192.0.2.7:5555".parse().unwrap(),
            method: Method::GET,
            host: "shop.example".into(),
            target: "/cart?q=\"x\"".into(),
            version: Version::HTTP_11,
            status: 200,
            bytes_in: Some(0),
            bytes_out: 1234,
            duration: Duration::from_micros(1500),
            ttfb: Some(Duration::from_micros(900)),
            route: "*/".into(),
            backend: Some("10.0.0.5:8000".into()),
            attempts: 1,
            error: None,
        }
    }

    #[test]
    fn times() {
        let mut clock = Clock::default();
        for (ms, want) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_796_443_506_789, "2026-12-05T04:05:06.789Z"),
            (1_796_443_506_001, "2026-12-05T04:05:06.001Z"),
            (1_796_443_507_010, "2026-12-05T04:05:07.010Z"),
        ] {
            let mut b = Vec::new();
            clock.write(ms, &mut b);
            assert_eq!(String::from_utf8(b).unwrap(), want);
        }
    }

    #[test]
    fn a_json_line_parses_back() {
        let mut b = Vec::new();
        render(
            &record(),
            AccessLogFormat::Json,
            &mut Clock::default(),
            &mut b,
        );
        assert_eq!(b.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["time"], "2026-12-05T04:05:06.789Z");
        assert_eq!(v["path"], "/cart?q=\"x\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["ttfb_ms"], 0.9);
        assert_eq!(v["backend"], "10.0.0.5:8000");
        assert_eq!(v["error"], serde_json::Value::Null);
    }

    #[test]
    fn a_text_line_is_one_line_whatever_it_holds() {
        let mut r = record();
        r.target = "/a b\n\"c\"".into();
        r.backend = None;
        r.ttfb = None;
        r.error = Some("no_backend");
        r.status = 503;
        let mut b = Vec::new();
        render(&r, AccessLogFormat::Text, &mut Clock::default(), &mut b);
        let line = String::from_utf8(b).unwrap();
        assert_eq!(
            line,
            "2026-12-05T04:05:06.789Z abc123 192.0.2.7:5555 \"GET /a\\x20b\\x0a\\x22c\\x22 HTTP/1.1\" \
             503 host=shop.example in=0 out=1234 dur_ms=1.500 ttfb_ms=- route=*/ backend=- \
             attempts=1 error=no_backend\n"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (queue, rx) = sync_channel(2);
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog {
            sample_ppm: 1_000_000,
            queue,
            dropped: dropped.clone(),
            queued: AtomicU64::new(0),
            flushed: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..5 {
            log.write(record());
        }
        assert_eq!(dropped.get(), 3);
        drop(log);
        let lines = IntCounter::new("l", "l").unwrap();
        let mut out = Vec::new();
        write_lines(
            rx,
            AccessLogFormat::Text,
            &mut out,
            &lines,
            &AtomicU64::new(0),
        );
        assert_eq!(lines.get(), 2);
        assert_eq!(out.iter().filter(|&&c| c == b'\n').count(), 2);
    }
}
