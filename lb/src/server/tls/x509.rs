//! The few facts the lb needs from a certificate, read straight from its DER: the DNS names it
//! covers (subjectAltName) and its validity window. rustls does not expose either, and a full
//! X.509 parser would be the largest dependency of the lb for two fields.
//!
//! Only the outer structure is walked (RFC 5280 4.1); signatures are not checked here: the
//! certificate is ours to serve, and clients verify it.

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// dNSName entries of subjectAltName, lower-case, as written (`*.example.com` included).
    pub dns_names: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
const DNS_NAME: u8 = 0x82;
/// 2.5.29.17, subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element: (tag, contents, what follows it).
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    let (&tag, rest) = input.split_first().ok_or("truncated")?;
    let (&first, rest) = rest.split_first().ok_or("truncated")?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("truncated");
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), &'static str> {
    let (tag, body, rest) = element(input)?;
    if tag != want {
        return Err("unexpected element");
    }
    Ok((body, rest))
}

/// Reads the names and validity of one DER certificate.
pub fn parse(der: &[u8]) -> Result<CertInfo, &'static str> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = element(rest)?.2;
    }
    let (_serial, rest) = expect(rest, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, rest) = expect(rest, SEQUENCE)?;
    let (_subject, rest) = expect(rest, SEQUENCE)?;
    let (_spki, mut rest) = expect(rest, SEQUENCE)?;

    let (tag, body, after) = element(validity)?;
    let not_before = time(tag, body)?;
    let (tag, body, _) = element(after)?;
    let not_after = time(tag, body)?;

    let mut dns_names = Vec::new();
    while !rest.is_empty() {
        let (tag, body, next) = element(rest)?;
        rest = next;
        if tag != EXTENSIONS {
            continue;
        }
        let (mut exts, _) = expect(body, SEQUENCE)?;
        while !exts.is_empty() {
            let (ext, next) = expect(exts, SEQUENCE)?;
            exts = next;
            let (oid, mut ext) = expect(ext, OID)?;
            if ext.first() == Some(&BOOLEAN) {
                ext = element(ext)?.2;
            }
            if oid != SUBJECT_ALT_NAME {
                continue;
            }
            let (value, _) = expect(ext, OCTET_STRING)?;
            let (mut names, _) = expect(value, SEQUENCE)?;
            while !names.is_empty() {
                let (tag, name, next) = element(names)?;
                names = next;
                if tag == DNS_NAME {
                    let name = std::str::from_utf8(name).map_err(|_| "dNSName is not text")?;
                    dns_names.push(name.to_ascii_lowercase());
                }
            }
        }
    }
    Ok(CertInfo {
        dns_names,
        not_before,
        not_after,
    })
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950..2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, body: &[u8]) -> Result<i64, &'static str> {
    let digits = |s: &[u8]| -> Result<i64, &'static str> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit()
                .then(|| acc * 10 + i64::from(b - b'0'))
                .ok_or("bad time")
        })
    };
    let (year, rest) = match tag {
        UTC_TIME if body.len() == 13 => {
            let yy = digits(&body[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &body[2..])
        }
        GENERALIZED_TIME if body.len() == 15 => (digits(&body[..4])?, &body[4..]),
        _ => return Err("unsupported time format"),
    };
    if rest[10] != b'Z' {
        return Err("time is not UTC");
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return Err("bad time");
    }
    Ok(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Ok(2_524_607_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20500101000000Z"),
            Ok(2_524_608_000)
        );
        assert!(time(UTC_TIME, b"491231235959+").is_err());
        assert!(time(UTC_TIME, b"4912312359").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b""[..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x02, 0x30],
        ] {
            assert!(parse(input).is_err());
        }
    }
}
