//! The web console: the static files of its build (`web/build`, made by
//! `npm run build` in `web/`) served at `/`. Paths that name no file get
//! `index.html` when the client accepts HTML (a browser navigating), so the
//! console's own routes (`/vms/...`) load it; other clients get a 404. The API
//! keeps `/v1` (an unknown `/v1/...` path is still the API's JSON 404),
//! and `/docs`, `/metrics` and `/healthz` are routed before this.
//!
//! Hashed assets under `/_app/immutable/` are cached for a year; everything
//! else is revalidated. A precompressed `.br` or `.gz` beside a file is
//! sent when the browser accepts it.

use crate::error::AppError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the built console is, if anywhere.
#[derive(Clone, Default)]
pub struct WebDir(pub Arc<Option<PathBuf>>);

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The page at `/` when no console is built.
const NOT_BUILT: &str = "<!doctype html><meta charset=utf-8><title>BytePort</title>\
<h1>BytePort</h1><p>The API is at <a href=/docs>/docs</a>. The web console is not built: \
run <code>npm ci &amp;&amp; npm run build</code> in <code>web/</code> (or <code>cargo xtask up</code>), \
then start <code>byteportd</code> from the repository (or pass <code>--web-dir web/build</code>).</p>\n";

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        _ => "application/octet-stream",
    }
}

/// The file a URL path names under the console's root, or `None` for a
/// path that tries to leave it (or names a hidden file).
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg.starts_with('.') || seg.contains('\\') || seg.contains('\0') || seg.contains('%') {
            return None;
        }
        p.push(seg);
    }
    Some(p)
}

/// Serves the console, or the API's 404 for `/v1` and anything not a GET.
pub async fn serve(State(dir): State<WebDir>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let api = path == "/v1" || path.starts_with("/v1/");
    if api || !matches!(*req.method(), Method::GET | Method::HEAD) {
        return AppError::not_found("route", "for this path").into_response();
    }
    let Some(root) = dir.0.as_ref() else {
        if path == "/" {
            return html(NOT_BUILT.into(), StatusCode::OK);
        }
        return AppError::not_found("route", "for this path").into_response();
    };
    let headers = req.headers();
    let header_of = |h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let accept = header_of(header::ACCEPT_ENCODING);
    // Only a browser navigating (it accepts HTML) gets the page for a path
    // that names no file: another client asking for a file that is not
    // there (cloud-init probing for optional data, say) gets a 404.
    let wants_page = path == "/" || header_of(header::ACCEPT).contains("text/html");
    drop(req);
    let file = match resolve(root, &path) {
        Some(f) if f.is_file() => f,
        Some(_) if path.starts_with("/_app/") => {
            return (StatusCode::NOT_FOUND, "no such file in the web console\n").into_response();
        }
        Some(_) if wants_page => root.join("index.html"),
        Some(_) => return AppError::not_found("route", "for this path").into_response(),
        None => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
    };
    let cache = if path.starts_with("/_app/immutable/") {
        IMMUTABLE
    } else {
        "no-cache"
    };
    send(&file, cache, &accept).await
}

fn html(body: String, status: StatusCode) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn send(file: &Path, cache: &'static str, accept: &str) -> Response {
    let mut encoding = None;
    let mut bytes = None;
    for (enc, ext) in [("br", "br"), ("gzip", "gz")] {
        if accept
            .split(',')
            .any(|a| a.trim().split(';').next() == Some(enc))
        {
            let mut z = file.as_os_str().to_owned();
            z.push(".");
            z.push(ext);
            if let Ok(b) = tokio::fs::read(PathBuf::from(z)).await {
                encoding = Some(enc);
                bytes = Some(b);
                break;
            }
        }
    }
    let bytes = match bytes {
        Some(b) => b,
        None => match tokio::fs::read(file).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "web console file unreadable");
                return (StatusCode::NOT_FOUND, "not found\n").into_response();
            }
        },
    };
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(file)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    if let Some(e) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/srv/web");
        assert_eq!(
            resolve(root, "/_app/immutable/x.js"),
            Some(PathBuf::from("/srv/web/_app/immutable/x.js"))
        );
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/web")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/..%2f..%2fetc"), None);
        assert_eq!(resolve(root, "/.env"), None);
        assert_eq!(resolve(root, "/a\\..\\b"), None);
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("a/b.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.woff2")), "font/woff2");
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }
}
