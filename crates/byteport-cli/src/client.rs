//! A small synchronous client for the `/v1` API.

use anyhow::{Context, Result};
use byteport_types::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{BufReader, Read};

/// The most a text or error body may hold (console tails are at most 1 MiB).
const MAX_TEXT_BODY: u64 = 8 << 20;

/// A failed API call: the server's status and error body.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[derive(Clone, Copy, Debug)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

pub struct Client {
    agent: ureq::Agent,
    pub base: String,
    token: Option<String>,
    /// The roots the server's certificate is checked against.
    pub trust: byteport_trust::Trust,
}

/// Percent-encodes one path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(base: &str, token: Option<String>, trust: byteport_trust::Trust) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(trust.ureq())
            .build()
            .into();
        Client {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            token,
            trust,
        }
    }

    pub fn with_token(&self, token: Option<String>) -> Client {
        Client {
            agent: self.agent.clone(),
            base: self.base.clone(),
            token,
            trust: self.trust.clone(),
        }
    }

    /// The `Authorization` header's value, when the client has a token.
    pub fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// Sends one request; `Ok(None)` for an empty success body.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<Value>> {
        let url = format!("{}{path}", self.base);
        let auth = self.bearer();
        macro_rules! prep {
            ($rb:expr) => {{
                let mut rb = $rb;
                if let Some(a) = &auth {
                    rb = rb.header("Authorization", a.as_str());
                }
                for (k, v) in query {
                    rb = rb.query(*k, v.as_str());
                }
                rb.header("Accept", "application/json")
            }};
        }
        let sent = match method {
            Method::Get => prep!(self.agent.get(&url)).call(),
            Method::Delete => prep!(self.agent.delete(&url)).call(),
            Method::Post => {
                let rb = prep!(self.agent.post(&url));
                match body {
                    Some(b) => rb.send_json(b),
                    None => rb.send_empty(),
                }
            }
            Method::Put => {
                let rb = prep!(self.agent.put(&url));
                match body {
                    Some(b) => rb.send_json(b),
                    None => rb.send_empty(),
                }
            }
            Method::Patch => {
                let rb = prep!(self.agent.patch(&url));
                match body {
                    Some(b) => rb.send_json(b),
                    None => rb.send_empty(),
                }
            }
        };
        self.json_response(sent)
    }

    /// Streams `len` bytes from `reader` as the raw body of a PUT; the
    /// file is never held in memory.
    pub fn upload(&self, path: &str, reader: &mut dyn Read, len: u64) -> Result<Value> {
        self.upload_with(path, &[], reader, len)
    }

    /// [`Client::upload`] with a query string.
    pub fn upload_with(
        &self,
        path: &str,
        query: &[(&str, String)],
        reader: &mut dyn Read,
        len: u64,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut rb = self
            .agent
            .put(&url)
            .header("Accept", "application/json")
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string());
        if let Some(a) = self.bearer() {
            rb = rb.header("Authorization", a);
        }
        for (k, v) in query {
            rb = rb.query(*k, v.as_str());
        }
        let sent = rb.send(ureq::SendBody::from_reader(reader));
        self.json_response(sent)?
            .context("the server sent an empty response")
    }

    /// A GET whose success body is returned as bytes (plain text, say).
    pub fn get_bytes(&self, path: &str, query: &[(&str, String)]) -> Result<Vec<u8>> {
        let mut resp = self.get_ok(path, query)?;
        resp.body_mut()
            .with_config()
            .limit(MAX_TEXT_BODY)
            .read_to_vec()
            .with_context(|| format!("cannot read the response from {}", self.base))
    }

    /// A GET's response when it succeeded; the server's error otherwise.
    fn get_ok(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.agent.get(&url);
        if let Some(a) = self.bearer() {
            rb = rb.header("Authorization", a);
        }
        for (k, v) in query {
            rb = rb.query(*k, v.as_str());
        }
        let resp = rb.call().map_err(|e| self.transport(e))?;
        self.success(resp)
    }

    /// The response itself when its status is a success; the server's
    /// error (read from its body) otherwise.
    fn success(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_TEXT_BODY)
            .read_to_vec()
            .with_context(|| format!("cannot read the response from {}", self.base))?;
        Err(api_error(status, &bytes).into())
    }

    /// A GET whose success body is read as it arrives, with the value of
    /// one response header.
    pub fn download(
        &self,
        path: &str,
        query: &[(&str, String)],
        header: &str,
    ) -> Result<(Option<String>, ureq::BodyReader<'static>)> {
        let resp = self.get_ok(path, query)?;
        let value = resp
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((value, resp.into_body().into_reader()))
    }

    /// POSTs a JSON body and hands back the success body as a reader, to
    /// be consumed as it arrives (an NDJSON stream, say).
    pub fn post_stream(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &Value,
        accept: &str,
    ) -> Result<BufReader<ureq::BodyReader<'static>>> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.agent.post(&url).header("Accept", accept);
        for (k, v) in query {
            rb = rb.query(*k, v.as_str());
        }
        if let Some(a) = self.bearer() {
            rb = rb.header("Authorization", a);
        }
        let resp = self.success(rb.send_json(body).map_err(|e| self.transport(e))?)?;
        Ok(BufReader::new(resp.into_body().into_reader()))
    }

    /// Why the server could not be reached, with what to do about a
    /// certificate this host does not trust.
    fn transport(&self, e: ureq::Error) -> anyhow::Error {
        let text = e.to_string();
        let e = anyhow::Error::new(e).context(format!("cannot reach {}", self.base));
        match byteport_trust::hint(&text) {
            Some(h) => e.context(h),
            None => e,
        }
    }

    /// A JSON response: its body on success, the server's error otherwise.
    fn json_response(
        &self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Option<Value>> {
        let mut resp = sent.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("cannot read the response from {}", self.base))?;
        if (200..300).contains(&status) {
            if text.trim().is_empty() {
                return Ok(None);
            }
            let v = serde_json::from_str(&text)
                .with_context(|| format!("the server sent invalid JSON (HTTP {status})"))?;
            return Ok(Some(v));
        }
        Err(api_error(status, text.as_bytes()).into())
    }

    /// A request whose success must carry a JSON body.
    pub fn value(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value> {
        self.request(method, path, query, body)?
            .context("the server sent an empty response")
    }

    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.value(Method::Get, path, query, None)
    }
}

/// The error a failed call's body describes: the API's own error body, or
/// the status and text when the body is something else.
pub fn api_error(status: u16, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ApiError {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ApiError {
            status,
            code: "http".into(),
            message: format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()),
        },
    }
}

/// Decodes a response body into an API type.
pub fn decode<T: DeserializeOwned>(v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).context("the server sent an unexpected response")
}
