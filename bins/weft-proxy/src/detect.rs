//! Protocol detection from a connection's first bytes, as Envoy's `http_inspector` and `tls_inspector`
//! do: an HTTP/1.x request line, the HTTP/2 connection preface, or a TLS ClientHello with its SNI and
//! ALPN. Pure: the caller peeks and decides how long to wait.

/// What the first bytes say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    Tls {
        sni: Option<String>,
        alpn: Vec<String>,
    },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Done(Detected),
    /// The bytes so far fit a protocol but do not settle it yet.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
/// Past this, a ClientHello is not worth waiting for.
pub const MAX_PEEK: usize = 16 * 1024;

impl Detected {
    /// Envoy's `application_protocols` values for this detection (`http/1.1`, `h2c`, or the ALPN list).
    pub fn application_protocols(&self) -> Vec<String> {
        match self {
            Self::Http1 => vec!["http/1.1".into(), "http/1.0".into()],
            Self::Http2 => vec!["h2c".into()],
            Self::Tls { alpn, .. } => alpn.clone(),
            Self::Unknown => vec![],
        }
    }

    /// Envoy's `transport_protocol`: `tls` or `raw_buffer`.
    pub fn transport_protocol(&self) -> &'static str {
        if matches!(self, Self::Tls { .. }) {
            "tls"
        } else {
            "raw_buffer"
        }
    }

    pub fn server_name(&self) -> Option<&str> {
        match self {
            Self::Tls { sni, .. } => sni.as_deref(),
            _ => None,
        }
    }
}

pub fn detect(buf: &[u8]) -> Progress {
    if buf.is_empty() {
        return Progress::NeedMore;
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return if buf.len() >= H2_PREFACE.len() {
            Progress::Done(Detected::Http2)
        } else {
            Progress::NeedMore
        };
    }
    if buf[0] == 0x16 {
        return tls(buf);
    }
    http1(buf)
}

fn http1(buf: &[u8]) -> Progress {
    for m in METHODS {
        let n = buf.len().min(m.len() + 1);
        let want: Vec<u8> = m.iter().copied().chain([b' ']).collect();
        if buf[..n] == want[..n] {
            if buf.len() <= m.len() {
                return Progress::NeedMore;
            }
            return Progress::Done(Detected::Http1);
        }
    }
    Progress::Done(Detected::Unknown)
}

/// Reads SNI and ALPN out of a ClientHello record.
fn tls(buf: &[u8]) -> Progress {
    if buf.len() < 5 {
        return Progress::NeedMore;
    }
    if buf[1] != 0x03 {
        return Progress::Done(Detected::Unknown);
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return if 5 + record_len > MAX_PEEK {
            Progress::Done(Detected::Tls {
                sni: None,
                alpn: vec![],
            })
        } else {
            Progress::NeedMore
        };
    }
    let hello = &buf[5..5 + record_len];
    Progress::Done(parse_client_hello(hello).unwrap_or(Detected::Tls {
        sni: None,
        alpn: vec![],
    }))
}

/// A byte cursor that returns `None` when the data runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u16_prefixed(&mut self) -> Option<Cursor<'a>> {
        let n = self.u16()?;
        self.take(n).map(Cursor)
    }
}

fn parse_client_hello(hello: &[u8]) -> Option<Detected> {
    let mut c = Cursor(hello);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    c.take(3)?; // handshake length
    c.take(2 + 32)?; // client version, random
    let session = c.u8()?;
    c.take(session)?;
    c.u16_prefixed()?; // cipher suites
    let compression = c.u8()?;
    c.take(compression)?;
    let mut extensions = c.u16_prefixed()?;
    let (mut sni, mut alpn) = (None, Vec::new());
    while let Some(kind) = extensions.u16() {
        let mut body = extensions.u16_prefixed()?;
        match kind {
            0 => {
                let mut names = body.u16_prefixed()?;
                while let Some(name_type) = names.u8() {
                    let name = names.u16_prefixed()?;
                    if name_type == 0 {
                        sni = Some(String::from_utf8_lossy(name.0).into_owned());
                    }
                }
            }
            16 => {
                let mut list = body.u16_prefixed()?;
                while let Some(n) = list.u8() {
                    alpn.push(String::from_utf8_lossy(list.take(n)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(Detected::Tls { sni, alpn })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with the given SNI and ALPN protocols.
    fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        let name = sni.as_bytes();
        let mut sni_body = vec![0u8];
        sni_body.extend((name.len() as u16).to_be_bytes());
        sni_body.extend(name);
        let mut sni_ext = (sni_body.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend(sni_body);
        ext.extend([0, 0]);
        ext.extend((sni_ext.len() as u16).to_be_bytes());
        ext.extend(sni_ext);
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend(p.as_bytes());
        }
        let mut alpn_ext = (list.len() as u16).to_be_bytes().to_vec();
        alpn_ext.extend(list);
        ext.extend([0, 16]);
        ext.extend((alpn_ext.len() as u16).to_be_bytes());
        ext.extend(alpn_ext);
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(hs);
        record
    }

    #[test]
    fn detection_table() {
        let hello = client_hello(
            "outbound_.9080_._.backend.test.svc.cluster.local",
            &["istio-peer-exchange", "istio"],
        );
        let cases: Vec<(&str, Vec<u8>, Progress)> = vec![
            (
                "h1 GET",
                b"GET / HTTP/1.1\r\n".to_vec(),
                Progress::Done(Detected::Http1),
            ),
            (
                "h1 POST",
                b"POST /x HTTP/1.1\r\n".to_vec(),
                Progress::Done(Detected::Http1),
            ),
            ("h1 partial method", b"GE".to_vec(), Progress::NeedMore),
            (
                "h1 method without space yet",
                b"GET".to_vec(),
                Progress::NeedMore,
            ),
            (
                "h2 preface",
                H2_PREFACE.to_vec(),
                Progress::Done(Detected::Http2),
            ),
            (
                "h2 partial preface",
                b"PRI * HT".to_vec(),
                Progress::NeedMore,
            ),
            (
                "mysql-like binary",
                vec![0x4a, 0, 0, 0, 0x0a],
                Progress::Done(Detected::Unknown),
            ),
            (
                "text that is not http",
                b"HELLO there".to_vec(),
                Progress::Done(Detected::Unknown),
            ),
            (
                "GETX is not a method",
                b"GETX / HTTP/1.1".to_vec(),
                Progress::Done(Detected::Unknown),
            ),
            ("tls partial", hello[..20].to_vec(), Progress::NeedMore),
            (
                "tls client hello",
                hello.clone(),
                Progress::Done(Detected::Tls {
                    sni: Some("outbound_.9080_._.backend.test.svc.cluster.local".into()),
                    alpn: vec!["istio-peer-exchange".into(), "istio".into()],
                }),
            ),
            ("nothing yet", vec![], Progress::NeedMore),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(detect(&bytes), want, "{name}");
        }
    }

    #[test]
    fn envoy_protocol_names() {
        assert_eq!(
            Detected::Http1.application_protocols(),
            ["http/1.1", "http/1.0"]
        );
        assert_eq!(Detected::Http2.application_protocols(), ["h2c"]);
        assert_eq!(Detected::Unknown.transport_protocol(), "raw_buffer");
        assert_eq!(
            Detected::Tls {
                sni: None,
                alpn: vec![]
            }
            .transport_protocol(),
            "tls"
        );
    }
}
