//! A blocking one-shot HTTP probe for Docker HEALTHCHECKs: images built `FROM scratch` have no
//! shell or curl, so each binary checks itself with `<binary> probe`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// True when `GET path` on `addr` answers 200 within two seconds.
pub fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(&head[9..12] == b"200")
    };
    attempt().unwrap_or(false)
}

/// The loopback address of a listen address (`0.0.0.0:9090` -> `127.0.0.1:9090`).
pub fn loopback_of(listen: SocketAddr) -> SocketAddr {
    let ip = if listen.is_ipv6() {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    };
    SocketAddr::new(ip, listen.port())
}

/// The exit code of a `<binary> probe` run: success when `path` on the loopback side of
/// `listen` answers 200.
pub fn exit_code(listen: SocketAddr, path: &str) -> std::process::ExitCode {
    if http_ok(loopback_of(listen), path) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
