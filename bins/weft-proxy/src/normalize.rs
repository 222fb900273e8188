//! Request path normalization, before authorization and routing see the path, as Envoy's
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action` do (Istio's
//! `meshConfig.pathNormalization`). Without it `/./admin`, `/x/../admin` and `/%61dmin` would pass a
//! policy on `/admin*` while the application serves `/admin`.

use std::borrow::Cow;

use serde::Serialize;

/// What the HTTP connection manager does to a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PathNormalization {
    /// RFC 3986: unreserved percent-escapes decoded, other escapes upper-cased, `\` read as `/`,
    /// dot segments removed (Envoy's `normalize_path`).
    pub rfc3986: bool,
    /// `//` becomes `/`.
    pub merge_slashes: bool,
    /// `%2F` and `%5C` are decoded to `/` and `\` first (`UNESCAPE_AND_FORWARD`).
    pub decode_slashes: bool,
}

/// The normalized path (no query), or `None` when it cannot be normalized safely (a path that does
/// not start with `/`), which Envoy answers with 400. Most paths are already normal and are returned
/// as they are, without a copy: this runs on every request.
pub fn normalize(path: &str, how: PathNormalization) -> Option<Cow<'_, str>> {
    if !(how.rfc3986 || how.merge_slashes || how.decode_slashes) {
        return Some(Cow::Borrowed(path));
    }
    if !path.starts_with('/') && !path.starts_with('\\') {
        return None;
    }
    let may_change = path.bytes().any(|b| b == b'%' || b == b'\\')
        || (how.rfc3986 && path.contains("/."))
        || (how.merge_slashes && path.contains("//"));
    if !may_change {
        return Some(Cow::Borrowed(path));
    }
    let mut out = if how.rfc3986 || how.decode_slashes {
        decode_escapes(path, how)
    } else {
        path.to_string()
    };
    if how.rfc3986 {
        out = out.replace('\\', "/");
        out = remove_dot_segments(&out);
    }
    if how.merge_slashes {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    Some(Cow::Owned(out))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Percent-escapes: unreserved characters (and slashes, when asked) are decoded; the rest keep their
/// escape in upper case, so `%2e` and `%2E` are one spelling. Invalid escapes are left as they are.
fn decode_escapes(path: &str, how: PathNormalization) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let c = h * 16 + l;
            let unreserved = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
            let slash = matches!(c, b'/' | b'\\');
            if (how.rfc3986 && unreserved) || (how.decode_slashes && slash) {
                out.push(c);
            } else {
                out.push(b'%');
                out.extend(format!("{c:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII escapes were decoded, so the bytes are as valid UTF-8 as the input was.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// RFC 3986 §5.2.4, on segments: `.` disappears, `..` removes the segment before it and never climbs
/// above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                segments.pop();
                trailing_slash = i == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PathNormalization = PathNormalization {
        rfc3986: true,
        merge_slashes: false,
        decode_slashes: false,
    };
    const MERGE: PathNormalization = PathNormalization {
        rfc3986: true,
        merge_slashes: true,
        decode_slashes: false,
    };
    const DECODE_MERGE: PathNormalization = PathNormalization {
        rfc3986: true,
        merge_slashes: true,
        decode_slashes: true,
    };

    #[test]
    fn spellings_of_one_path_become_one() {
        for (raw, how, want) in [
            ("/admin", BASE, "/admin"),
            ("/./admin", BASE, "/admin"),
            ("/x/../admin", BASE, "/admin"),
            ("/%61dmin", BASE, "/admin"),
            ("/%2e/admin", BASE, "/admin"),
            ("/%2E%2E/admin", BASE, "/admin"),
            ("/../../admin", BASE, "/admin"),
            ("/a/b/../../admin/", BASE, "/admin/"),
            ("/admin/.", BASE, "/admin/"),
            ("/admin/x/..", BASE, "/admin/"),
            ("/..", BASE, "/"),
            ("/x\\..\\admin", BASE, "/admin"),
            ("/a%2fb", BASE, "/a%2Fb"),
            ("/a%20b", BASE, "/a%20b"),
            ("/bad%zzescape", BASE, "/bad%zzescape"),
            ("//admin", BASE, "//admin"),
            ("//admin", MERGE, "/admin"),
            ("/a//./b", MERGE, "/a/b"),
            ("/a%2F%2Fadmin", MERGE, "/a%2F%2Fadmin"),
            ("/x%2F..%2Fadmin", DECODE_MERGE, "/admin"),
            ("/a%2f%2fadmin", DECODE_MERGE, "/a/admin"),
        ] {
            assert_eq!(normalize(raw, how).as_deref(), Some(want), "{raw} {how:?}");
        }
        assert_eq!(
            normalize("/./x", PathNormalization::default()).as_deref(),
            Some("/./x"),
            "NONE leaves the path alone"
        );
        assert_eq!(normalize("admin", BASE), None, "not a path");
    }
}
