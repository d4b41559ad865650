//! The PROXY protocol header (HAProxy's; v1 text, v2 binary) on a listener behind an L4
//! balancer: the client's own address arrives first on each connection, before any byte of
//! HTTP or TLS. It is read exactly (nothing behind it is consumed) within a deadline; a
//! connection without a valid header is refused. Whether to believe it is the listener's
//! call, not this module's. Knows nothing of what follows it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v1's longest header (`PROXY TCP6` with the longest addresses and ports, and CRLF).
const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The largest v2 address block (with its TLVs) accepted; the format allows 64 KiB, real
/// balancers send a few hundred bytes.
const V2_MAX_BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header was whole")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Invalid(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header; `Some(source)` for a proxied TCP connection, `None` when the balancer
/// speaks for itself (v1 `UNKNOWN`, v2 `LOCAL`, or another protocol family): then the
/// connection's own peer address stands.
pub async fn read(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Read, not peeked: a connection without a header is refused anyway, and reads wait for
    // bytes where a peek would have to poll. Exact lengths: nothing behind the header is taken.
    let mut start = [0u8; 6];
    read_exact(stream, &mut start).await?;
    if &start == b"PROXY " {
        // v1: one line, at most 107 bytes with its CRLF, read a byte at a time to its end.
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() == V1_MAX {
                return Err(ProxyHeaderError::Invalid("v1 header longer than 107 bytes"));
            }
            let mut byte = [0u8; 1];
            read_exact(stream, &mut byte).await?;
            line.push(byte[0]);
        }
        return parse_v1(&line[..line.len() - 2]);
    }
    if start != V2_SIGNATURE[..6] {
        return Err(ProxyHeaderError::Invalid("no PROXY signature"));
    }
    let mut head = [0u8; 16];
    head[..6].copy_from_slice(&start);
    read_exact(stream, &mut head[6..]).await?;
    if head[..12] != V2_SIGNATURE[..] {
        return Err(ProxyHeaderError::Invalid("no PROXY signature"));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > V2_MAX_BLOCK {
        return Err(ProxyHeaderError::Invalid("v2 address block over 4 KiB"));
    }
    let mut header = head.to_vec();
    header.resize(16 + len, 0);
    read_exact(stream, &mut header[16..]).await?;
    parse_v2(&header)
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyHeaderError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>` or `PROXY UNKNOWN ...` (RFC-less, per
/// HAProxy's proxy-protocol.txt 2.1), without the CRLF.
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Invalid;
    let line = std::str::from_utf8(line).map_err(|_| bad("v1 header is not text"))?;
    let mut words = line.split(' ');
    let _proxy = words.next();
    let v6 = match words.next() {
        Some("UNKNOWN") => return Ok(None),
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => return Err(bad("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(bad("v1 header has the wrong number of fields"));
    };
    let ip: IpAddr = src.parse().map_err(|_| bad("v1 source address"))?;
    if ip.is_ipv6() != v6 {
        return Err(bad("v1 source address is not of the protocol named"));
    }
    if !sport.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("v1 source port"));
    }
    let port: u16 = sport.parse().map_err(|_| bad("v1 source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The 16-byte v2 header and its address block (HAProxy's proxy-protocol.txt 2.2).
fn parse_v2(h: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Invalid;
    let (version, command, family) = (h[12] >> 4, h[12] & 0x0f, h[13]);
    if version != 2 {
        return Err(bad("v2 header version is not 2"));
    }
    match command {
        0 => return Ok(None), // LOCAL: the balancer's own connection (health checks)
        1 => {}
        _ => return Err(bad("v2 command is neither LOCAL nor PROXY")),
    }
    let a = &h[16..];
    match family {
        0x11 if a.len() >= 12 => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[8], a[9]]),
            )))
        }
        0x21 if a.len() >= 36 => {
            let octets: [u8; 16] = a[..16].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([a[32], a[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        0x11 | 0x21 => Err(bad("v2 address block too short")),
        _ => Ok(None), // UNSPEC, UDP or unix sockets: nothing to stand for the client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let v1 = |s: &str| parse_v1(s.as_bytes()).ok().flatten();
        assert_eq!(
            v1("PROXY TCP4 203.0.113.7 192.0.2.1 5555 80"),
            Some("203.0.113.7:5555".parse().unwrap())
        );
        assert_eq!(
            v1("PROXY TCP6 2001:db8::1 2001:db8::2 4000 443"),
            Some("[2001:db8::1]:4000".parse().unwrap())
        );
        assert!(matches!(parse_v1(b"PROXY UNKNOWN"), Ok(None)));
        for bad in [
            "PROXY TCP4 1.2.3.4 5.6.7.8 1",
            "PROXY UDP4 a b 1 2",
            "PROXY TCP4 x y 1 2",
            "PROXY TCP4 2001:db8::1 2001:db8::2 1 2",
            "PROXY TCP4 1.2.3.4 5.6.7.8 +80 80",
        ] {
            assert!(parse_v1(bad.as_bytes()).is_err(), "{bad}");
        }
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 192, 0, 2, 1, 0x1f, 0x90, 0, 80,
        ]);
        assert_eq!(
            parse_v2(&v2).unwrap(),
            Some("198.51.100.9:8080".parse().unwrap())
        );
        v2[12] = 0x20;
        assert_eq!(parse_v2(&v2).unwrap(), None, "LOCAL");
        v2[12] = 0x31;
        assert!(parse_v2(&v2).is_err(), "version 3");
    }
}
