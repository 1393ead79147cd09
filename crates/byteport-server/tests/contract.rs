//! The HTTP API against its own OpenAPI document, by generated requests.
//!
//! Every operation of the committed `openapi/byteport.json` gets a fixed
//! number of requests generated from its parameters and request body
//! schema: VALID ones (the document allows them) and INVALID ones (a valid
//! request mutated so that the document forbids it, or sent in a shape the
//! API does not take). Each answer is checked against the document:
//!
//! * no 5xx (a 503 or 504 the operation documents is an answer, not a crash);
//! * its status is one the operation lists (or the operation has `default`);
//! * a JSON body matches the schema documented for that status;
//! * a valid request is never refused as malformed (`invalid_json`,
//!   `invalid_body`, `invalid_query`, `unsupported_media_type`,
//!   `body_too_large`);
//! * a request the schema clearly forbids is never accepted with a 2xx.
//!
//! Findings are collected over the whole run and the test fails once, at
//! the end, with the list grouped by kind. A run is deterministic for its
//! seed: `BYTEPORT_FUZZ_SEED` (decimal or 0x-hex; the seed is printed) and
//! `BYTEPORT_FUZZ_CASES` requests per operation (12 by default);
//! `BYTEPORT_FUZZ_VERBOSE=1` prints every request with its answer.
//!
//! Left out: operations that upgrade to a WebSocket (they document a 101),
//! and `/auth/logout` (it would end the admin's session the requests use).
//! A `text/event-stream` answer is checked by its status and headers only,
//! and dropped.

use axum::body::Body;
use axum::http::{Method, Request};
use byteport_testkit::{SimNode, TestServer, backends};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The seed used when `BYTEPORT_FUZZ_SEED` is not set.
const DEFAULT_SEED: u64 = 0x0B17_E5EE_D000_0001;
/// Requests per operation when `BYTEPORT_FUZZ_CASES` is not set.
const DEFAULT_CASES: usize = 12;
/// How long one request may take before it counts as hung.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The admin's password, as `TestServer::start` bootstraps it.
const ADMIN_PASSWORD: &str = "admin-password";
/// Error codes that mean "the request could not even be parsed".
const PARSE_LEVEL_CODES: &[&str] = &[
    "invalid_json",
    "invalid_body",
    "invalid_query",
    "unsupported_media_type",
    "body_too_large",
];
/// Strings generated at their documented maximum length only up to this
/// size, so that a valid body stays well within any request body limit.
const LONGEST_GENERATED_STRING: u64 = 70_000;
/// Path parameter values that are valid strings but unlikely names: they
/// probe decoding, lengths and lookups.
const JUNK: &[&str] = &[
    "..",
    "\0",
    "ünïcödé",
    " ",
    "/",
    "0",
    "-1",
    "null",
    "'; DROP TABLE vms;--",
];

// ---------------------------------------------------------------------------
// Settings and randomness
// ---------------------------------------------------------------------------

/// What this run does, from the environment.
struct Settings {
    seed: u64,
    cases: usize,
    /// `BYTEPORT_FUZZ_VERBOSE=1`: print every request and its status.
    verbose: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let seed = std::env::var("BYTEPORT_FUZZ_SEED")
            .ok()
            .map(|s| {
                let s = s.trim();
                let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                    None => s.replace('_', "").parse(),
                };
                parsed.unwrap_or_else(|_| panic!("BYTEPORT_FUZZ_SEED={s} is not a number"))
            })
            .unwrap_or(DEFAULT_SEED);
        let cases = std::env::var("BYTEPORT_FUZZ_CASES")
            .ok()
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("BYTEPORT_FUZZ_CASES={s} is not a count"))
            })
            .unwrap_or(DEFAULT_CASES);
        let verbose = std::env::var("BYTEPORT_FUZZ_VERBOSE").is_ok_and(|v| v == "1");
        Settings {
            seed,
            cases,
            verbose,
        }
    }
}

/// SplitMix64: a small generator giving the same sequence for a seed on
/// every platform and with every dependency version.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: i128, hi: i128) -> i128 {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo) as u128 + 1;
        let r = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
        lo + (r % span) as i128
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    /// A random (version 4) UUID.
    fn uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(b).into_uuid().to_string()
    }
}

// ---------------------------------------------------------------------------
// The document
// ---------------------------------------------------------------------------

/// The OpenAPI document, with `$ref` resolution.
struct Doc {
    root: Value,
}

/// Where a parameter goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum In {
    Path,
    Query,
    Header,
    Cookie,
}

/// One parameter of an operation.
#[derive(Clone, Debug)]
struct Param {
    name: String,
    location: In,
    required: bool,
    schema: Value,
}

/// An operation's request body.
#[derive(Clone, Debug)]
struct RequestBody {
    content_type: String,
    schema: Value,
    required: bool,
}

/// One operation: a method on a path template.
#[derive(Clone, Debug)]
struct Operation {
    method: Method,
    path: String,
    params: Vec<Param>,
    body: Option<RequestBody>,
    /// Response objects (with `$ref`s into `#/components/responses`
    /// resolved) by status code, `4XX`-style range, or `default`.
    responses: BTreeMap<String, Value>,
}

impl Operation {
    fn label(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The documented response for a status, if any.
    fn response(&self, status: u16) -> Option<&Value> {
        let range = format!("{}XX", status / 100);
        self.responses
            .get(&status.to_string())
            .or_else(|| {
                self.responses
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&range))
                    .map(|(_, v)| v)
            })
            .or_else(|| self.responses.get("default"))
    }

    /// Why this operation is left out, if it is.
    fn skipped(&self) -> Option<&'static str> {
        if self.responses.contains_key("101") {
            Some("upgrades to a WebSocket (101)")
        } else if self.path.contains("/auth/logout") {
            Some("would end the admin's session")
        } else {
            None
        }
    }
}

impl Doc {
    fn load() -> Doc {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/byteport.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let root: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
        Doc { root }
    }

    /// What a local reference (`#/components/...`) points at.
    fn target(&self, reference: &str) -> &Value {
        reference
            .strip_prefix('#')
            .and_then(|p| self.root.pointer(p))
            .unwrap_or_else(|| panic!("the document has no {reference}"))
    }

    /// Follows `$ref`s to the schema (or object) they name.
    fn deref<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..64 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => v = self.target(r),
                None => return v,
            }
        }
        panic!("a $ref cycle at {v}");
    }

    /// Every operation, in path order.
    fn operations(&self) -> Vec<Operation> {
        let mut ops = Vec::new();
        let paths = self.root["paths"]
            .as_object()
            .expect("the document has paths");
        for (path, item) in paths {
            let item = self.deref(item);
            let shared: Vec<Value> = item
                .get("parameters")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(m) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                if !matches!(
                    method.as_str(),
                    "get" | "put" | "post" | "delete" | "patch" | "head" | "options" | "trace"
                ) {
                    continue;
                }
                let mut params: Vec<Param> = Vec::new();
                let own = op.get("parameters").and_then(Value::as_array);
                for p in shared.iter().chain(own.into_iter().flatten()) {
                    let p = self.deref(p);
                    let location = match p["in"].as_str() {
                        Some("path") => In::Path,
                        Some("query") => In::Query,
                        Some("header") => In::Header,
                        Some("cookie") => In::Cookie,
                        other => panic!("{method} {path}: a parameter in {other:?}"),
                    };
                    let name = p["name"].as_str().expect("a parameter name").to_owned();
                    // An operation's own parameter replaces a shared one.
                    params.retain(|q| !(q.name == name && q.location == location));
                    params.push(Param {
                        name,
                        location,
                        required: p["required"].as_bool().unwrap_or(location == In::Path),
                        schema: p
                            .get("schema")
                            .cloned()
                            .unwrap_or(json!({"type": "string"})),
                    });
                }
                // A path template segment that no parameter documents is
                // still filled in, as a string.
                for seg in path.split('/') {
                    if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
                        && !params
                            .iter()
                            .any(|p| p.location == In::Path && p.name == name)
                    {
                        params.push(Param {
                            name: name.to_owned(),
                            location: In::Path,
                            required: true,
                            schema: json!({"type": "string"}),
                        });
                    }
                }
                let body = op.get("requestBody").map(|b| {
                    let b = self.deref(b);
                    let content = b["content"].as_object().cloned().unwrap_or_default();
                    let (content_type, media) = content
                        .iter()
                        .find(|(k, _)| is_json_media(k))
                        .or_else(|| content.iter().next())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .unwrap_or_else(|| ("application/json".into(), json!({})));
                    RequestBody {
                        content_type,
                        schema: media.get("schema").cloned().unwrap_or(json!(true)),
                        required: b["required"].as_bool().unwrap_or(false),
                    }
                });
                let responses = op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), self.deref(v).clone()))
                    .collect();
                ops.push(Operation {
                    method: m,
                    path: path.clone(),
                    params,
                    body,
                    responses,
                });
            }
        }
        ops
    }
}

/// A media type without its parameters, in lower case.
fn media_base(media: &str) -> String {
    media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a documented media type (maybe `text/*` or `*/*`) covers an
/// actual one.
fn media_matches(documented: &str, actual: &str) -> bool {
    let d = media_base(documented);
    if actual.is_empty() {
        return false;
    }
    d == actual
        || d == "*/*"
        || d.strip_suffix("/*")
            .is_some_and(|top| actual.split('/').next() == Some(top))
}

/// Whether a media type is JSON (`application/json`, `…+json`).
fn is_json_media(media: &str) -> bool {
    let m = media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || m.ends_with("+json")
}

// ---------------------------------------------------------------------------
// Patterns: the regular-expression subset schema patterns use
// ---------------------------------------------------------------------------

/// No upper bound on a repetition.
const UNBOUNDED: u32 = u32::MAX;

/// One element of a parsed pattern.
#[derive(Clone, Debug)]
enum Re {
    Char(char),
    /// Inclusive character ranges; `true` when negated.
    Set(Vec<(char, char)>, bool),
    Any,
    Alt(Vec<Vec<Re>>),
    Rep(Box<Re>, u32, u32),
}

/// A parsed pattern: anchored at its start and end or not.
#[derive(Clone, Debug)]
struct Pattern {
    seq: Vec<Re>,
    start: bool,
    end: bool,
}

impl Pattern {
    /// Parses literals, escapes (`\d \w \s` …), classes, groups,
    /// alternation and quantifiers; `None` for anything else (lookaround,
    /// backreferences, inner anchors), which is then neither generated
    /// from nor checked.
    fn parse(p: &str) -> Option<Pattern> {
        let mut c: Vec<char> = p.chars().collect();
        let start = c.first() == Some(&'^');
        if start {
            c.remove(0);
        }
        let escaped_end = c.len() >= 2 && c[c.len() - 2] == '\\';
        let end = c.last() == Some(&'$') && !escaped_end;
        if end {
            c.pop();
        }
        let mut pos = 0;
        let alts = parse_alts(&c, &mut pos)?;
        (pos == c.len()).then_some(Pattern {
            seq: vec![Re::Alt(alts)],
            start,
            end,
        })
    }

    fn matches(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        let starts = if self.start { 0..=0 } else { 0..=chars.len() };
        for st in starts {
            let len = chars.len();
            let end = self.end;
            if match_seq(&self.seq, &chars, st, &mut |j| !end || j == len) {
                return true;
            }
        }
        false
    }

    fn generate(&self, rng: &mut Rng) -> String {
        let mut out = String::new();
        for r in &self.seq {
            gen_re(r, rng, &mut out);
        }
        out
    }
}

fn parse_alts(c: &[char], pos: &mut usize) -> Option<Vec<Vec<Re>>> {
    let mut alts = vec![Vec::new()];
    while *pos < c.len() {
        match c[*pos] {
            ')' => break,
            '|' => {
                *pos += 1;
                alts.push(Vec::new());
            }
            _ => {
                let atom = parse_atom(c, pos)?;
                let atom = parse_quantifier(c, pos, atom)?;
                alts.last_mut()?.push(atom);
            }
        }
    }
    Some(alts)
}

fn parse_atom(c: &[char], pos: &mut usize) -> Option<Re> {
    let ch = c[*pos];
    *pos += 1;
    Some(match ch {
        '(' => {
            if c.get(*pos) == Some(&'?') {
                if c.get(*pos + 1) != Some(&':') {
                    return None;
                }
                *pos += 2;
            }
            let alts = parse_alts(c, pos)?;
            if c.get(*pos) != Some(&')') {
                return None;
            }
            *pos += 1;
            Re::Alt(alts)
        }
        '[' => parse_set(c, pos)?,
        '.' => Re::Any,
        '\\' => escape(c, pos)?,
        '^' | '$' | '*' | '+' | '?' | '{' | '}' | ']' => return None,
        other => Re::Char(other),
    })
}

/// The escape after a backslash at `c[*pos]`: a class (`\d`), a control
/// character, a code point (`\x21`, `\u00e9`) or the character itself.
fn escape(c: &[char], pos: &mut usize) -> Option<Re> {
    let e = *c.get(*pos)?;
    *pos += 1;
    let hex = |n: usize, pos: &mut usize| -> Option<Re> {
        let digits: String = c.get(*pos..*pos + n)?.iter().collect();
        *pos += n;
        Some(Re::Char(char::from_u32(
            u32::from_str_radix(&digits, 16).ok()?,
        )?))
    };
    match e {
        'x' => return hex(2, pos),
        'u' => return hex(4, pos),
        _ => {}
    }
    let digits = vec![('0', '9')];
    let word = vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')];
    let space = vec![(' ', ' '), ('\t', '\t'), ('\n', '\n'), ('\r', '\r')];
    Some(match e {
        'd' => Re::Set(digits, false),
        'D' => Re::Set(digits, true),
        'w' => Re::Set(word, false),
        'W' => Re::Set(word, true),
        's' => Re::Set(space, false),
        'S' => Re::Set(space, true),
        'n' => Re::Char('\n'),
        't' => Re::Char('\t'),
        'r' => Re::Char('\r'),
        c if c.is_ascii_alphanumeric() => return None,
        c => Re::Char(c),
    })
}

fn parse_set(c: &[char], pos: &mut usize) -> Option<Re> {
    let negated = c.get(*pos) == Some(&'^');
    if negated {
        *pos += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let ch = *c.get(*pos)?;
        *pos += 1;
        if ch == ']' && !first {
            break;
        }
        first = false;
        let lo = if ch == '\\' {
            match escape(c, pos)? {
                Re::Char(x) => x,
                Re::Set(r, false) => {
                    ranges.extend(r);
                    continue;
                }
                _ => return None,
            }
        } else {
            ch
        };
        if c.get(*pos) == Some(&'-') && c.get(*pos + 1).is_some_and(|n| *n != ']') {
            *pos += 1;
            let mut hi = *c.get(*pos)?;
            *pos += 1;
            if hi == '\\' {
                let Re::Char(x) = escape(c, pos)? else {
                    return None;
                };
                hi = x;
            }
            if hi < lo {
                return None;
            }
            ranges.push((lo, hi));
        } else {
            ranges.push((lo, lo));
        }
    }
    Some(Re::Set(ranges, negated))
}

fn parse_quantifier(c: &[char], pos: &mut usize, atom: Re) -> Option<Re> {
    let (lo, hi) = match c.get(*pos) {
        Some('?') => {
            *pos += 1;
            (0, 1)
        }
        Some('*') => {
            *pos += 1;
            (0, UNBOUNDED)
        }
        Some('+') => {
            *pos += 1;
            (1, UNBOUNDED)
        }
        Some('{') => {
            let close = c[*pos..].iter().position(|x| *x == '}')? + *pos;
            let inner: String = c[*pos + 1..close].iter().collect();
            let (lo, hi) = match inner.split_once(',') {
                None => {
                    let n = inner.trim().parse().ok()?;
                    (n, n)
                }
                Some((a, b)) if b.trim().is_empty() => (a.trim().parse().ok()?, UNBOUNDED),
                Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            };
            if hi < lo {
                return None;
            }
            *pos = close + 1;
            (lo, hi)
        }
        _ => return Some(atom),
    };
    // A lazy quantifier matches the same strings.
    if c.get(*pos) == Some(&'?') {
        *pos += 1;
    }
    Some(Re::Rep(Box::new(atom), lo, hi))
}

fn set_has(ranges: &[(char, char)], negated: bool, ch: char) -> bool {
    ranges.iter().any(|(a, b)| *a <= ch && ch <= *b) != negated
}

fn match_seq(seq: &[Re], s: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match seq.split_first() {
        None => k(i),
        Some((first, rest)) => match_one(first, s, i, &mut |j| match_seq(rest, s, j, k)),
    }
}

fn match_one(re: &Re, s: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match re {
        Re::Char(c) => i < s.len() && s[i] == *c && k(i + 1),
        Re::Set(r, neg) => i < s.len() && set_has(r, *neg, s[i]) && k(i + 1),
        Re::Any => i < s.len() && s[i] != '\n' && k(i + 1),
        Re::Alt(alts) => alts.iter().any(|seq| match_seq(seq, s, i, k)),
        Re::Rep(r, lo, hi) => match_rep(r, *lo, *hi, s, i, 0, k),
    }
}

fn match_rep(
    r: &Re,
    lo: u32,
    hi: u32,
    s: &[char],
    i: usize,
    n: u32,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    // Greedy: one more first, then stop if enough were taken.
    (n < hi
        && match_one(r, s, i, &mut |j| {
            j != i && match_rep(r, lo, hi, s, j, n + 1, k)
        }))
        || (n >= lo && k(i))
}

fn gen_re(re: &Re, rng: &mut Rng, out: &mut String) {
    match re {
        Re::Char(c) => out.push(*c),
        Re::Set(ranges, false) if !ranges.is_empty() => {
            let (a, b) = *rng.pick(ranges);
            let span = u64::from(b) - u64::from(a) + 1;
            let c = char::from_u32(a as u32 + rng.below(span) as u32).unwrap_or(a);
            out.push(c);
        }
        Re::Set(ranges, negated) => {
            for _ in 0..200 {
                let c = char::from(0x21 + rng.below(0x5e) as u8);
                if set_has(ranges, *negated, c) {
                    out.push(c);
                    return;
                }
            }
        }
        Re::Any => out.push(char::from(b'a' + rng.below(26) as u8)),
        Re::Alt(alts) => {
            for r in rng.pick(alts) {
                gen_re(r, rng, out);
            }
        }
        Re::Rep(r, lo, hi) => {
            let hi = if *hi == UNBOUNDED { lo + 12 } else { *hi };
            let n = if hi - lo > 10 {
                if rng.chance(0.1) {
                    hi
                } else {
                    lo + rng.below(11) as u32
                }
            } else {
                lo + rng.below(u64::from(hi - lo) + 1) as u32
            };
            for _ in 0..n {
                gen_re(r, rng, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Validation: the JSON Schema subset utoipa emits
// ---------------------------------------------------------------------------

/// An integer JSON number as i128.
fn as_int(v: &Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
}

/// An integer as a JSON number (a float past 64 bits).
fn int_value(i: i128) -> Value {
    if let Ok(x) = i64::try_from(i) {
        json!(x)
    } else if let Ok(x) = u64::try_from(i) {
        json!(x)
    } else {
        json!(i as f64)
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => {
            as_int(v).is_some()
                || v.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
        }
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    }
}

/// `a < b`, `a == b` or `a > b` for two JSON numbers, exactly for integers.
fn num_cmp(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn short(v: &Value) -> String {
    excerpt(&v.to_string(), 80)
}

impl Doc {
    /// Whether `v` matches `schema`.
    fn valid(&self, schema: &Value, v: &Value) -> bool {
        let mut errs = Vec::new();
        self.validate(schema, v, "$", &mut errs);
        errs.is_empty()
    }

    /// Adds a line to `errs` for each way `v` fails `schema` (up to 20).
    fn validate(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        if errs.len() >= 20 {
            return;
        }
        let s = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => {
                errs.push(format!("{at}: no value is allowed here"));
                return;
            }
            Value::Object(s) => s,
            _ => return,
        };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            self.validate(self.target(r), v, at, errs);
        }
        match s.get("type") {
            Some(Value::String(t)) if !type_matches(t, v) => {
                errs.push(format!(
                    "{at}: expected {t}, got {} {}",
                    json_type(v),
                    short(v)
                ));
                return;
            }
            Some(Value::Array(ts))
                if !ts.iter().any(|t| type_matches(t.as_str().unwrap_or(""), v)) =>
            {
                let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
                errs.push(format!(
                    "{at}: expected {}, got {} {}",
                    names.join(" or "),
                    json_type(v),
                    short(v)
                ));
                return;
            }
            _ => {}
        }
        if let Some(Value::Array(options)) = s.get("enum")
            && !options.contains(v)
        {
            errs.push(format!(
                "{at}: {} is not one of {}",
                short(v),
                short(&Value::Array(options.clone()))
            ));
        }
        if let Some(c) = s.get("const")
            && c != v
        {
            errs.push(format!("{at}: {} is not {}", short(v), short(c)));
        }
        match v {
            Value::Object(m) => self.validate_object(s, m, at, errs),
            Value::Array(items) => {
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.validate(item, x, &format!("{at}[{i}]"), errs);
                    }
                }
                if let Some(n) = s.get("minItems").and_then(Value::as_u64)
                    && (items.len() as u64) < n
                {
                    errs.push(format!(
                        "{at}: {} items, fewer than minItems {n}",
                        items.len()
                    ));
                }
                if let Some(n) = s.get("maxItems").and_then(Value::as_u64)
                    && (items.len() as u64) > n
                {
                    errs.push(format!(
                        "{at}: {} items, more than maxItems {n}",
                        items.len()
                    ));
                }
                if s.get("uniqueItems") == Some(&Value::Bool(true)) {
                    let distinct: BTreeSet<String> = items.iter().map(|x| x.to_string()).collect();
                    if distinct.len() != items.len() {
                        errs.push(format!("{at}: items are not unique"));
                    }
                }
            }
            Value::String(text) => {
                let len = text.chars().count() as u64;
                if let Some(n) = s.get("minLength").and_then(Value::as_u64)
                    && len < n
                {
                    errs.push(format!("{at}: {len} characters, fewer than minLength {n}"));
                }
                if let Some(n) = s.get("maxLength").and_then(Value::as_u64)
                    && len > n
                {
                    errs.push(format!("{at}: {len} characters, more than maxLength {n}"));
                }
                if let Some(p) = s.get("pattern").and_then(Value::as_str)
                    && text.len() <= 4096
                    && let Some(re) = Pattern::parse(p)
                    && !re.matches(text)
                {
                    errs.push(format!("{at}: {} does not match the pattern {p}", short(v)));
                }
                match s.get("format").and_then(Value::as_str) {
                    Some("uuid") if uuid::Uuid::parse_str(text).is_err() => {
                        errs.push(format!("{at}: {} is not a uuid", short(v)));
                    }
                    Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                        errs.push(format!("{at}: {} is not an RFC 3339 date-time", short(v)));
                    }
                    _ => {}
                }
            }
            Value::Number(_) => {
                use std::cmp::Ordering::*;
                let bound = |k: &str| s.get(k).filter(|b| b.is_number());
                if let Some(b) = bound("minimum")
                    && num_cmp(v, b) == Some(Less)
                {
                    errs.push(format!("{at}: {v} is below the minimum {b}"));
                }
                if let Some(b) = bound("maximum")
                    && num_cmp(v, b) == Some(Greater)
                {
                    errs.push(format!("{at}: {v} is above the maximum {b}"));
                }
                if let Some(b) = bound("exclusiveMinimum")
                    && num_cmp(v, b) != Some(Greater)
                {
                    errs.push(format!("{at}: {v} is not above the exclusive minimum {b}"));
                }
                if let Some(b) = bound("exclusiveMaximum")
                    && num_cmp(v, b) != Some(Less)
                {
                    errs.push(format!("{at}: {v} is not below the exclusive maximum {b}"));
                }
            }
            _ => {}
        }
        if let Some(Value::Array(parts)) = s.get("allOf") {
            for p in parts {
                self.validate(p, v, at, errs);
            }
        }
        if let Some(Value::Array(alts)) = s.get("anyOf")
            && !alts.iter().any(|a| self.valid(a, v))
        {
            errs.push(format!(
                "{at}: {} matches none of anyOf: {}",
                short(v),
                self.why_not(alts, v)
            ));
        }
        if let Some(Value::Array(alts)) = s.get("oneOf") {
            let n = alts.iter().filter(|a| self.valid(a, v)).count();
            if n == 0 {
                errs.push(format!(
                    "{at}: {} matches none of oneOf: {}",
                    short(v),
                    self.why_not(alts, v)
                ));
            } else if n > 1 {
                errs.push(format!(
                    "{at}: {} matches {n} branches of oneOf, not exactly one",
                    short(v)
                ));
            }
        }
        if let Some(not) = s.get("not")
            && self.valid(not, v)
        {
            errs.push(format!("{at}: {} matches a schema it must not", short(v)));
        }
    }

    fn validate_object(
        &self,
        s: &Map<String, Value>,
        m: &Map<String, Value>,
        at: &str,
        errs: &mut Vec<String>,
    ) {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_str()
                && !m.contains_key(r)
            {
                errs.push(format!("{at}: the required `{r}` is missing"));
            }
        }
        for (k, x) in m {
            let here = format!("{at}.{k}");
            if let Some(ps) = props.and_then(|p| p.get(k)) {
                self.validate(ps, x, &here, errs);
            } else {
                match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errs.push(format!("{at}: `{k}` is not a documented property"))
                    }
                    Some(ap @ Value::Object(_)) => self.validate(ap, x, &here, errs),
                    _ => {}
                }
            }
            if let Some(names) = s.get("propertyNames") {
                self.validate(
                    names,
                    &Value::String(k.clone()),
                    &format!("{at} key {k:?}"),
                    errs,
                );
            }
        }
        if let Some(n) = s.get("minProperties").and_then(Value::as_u64)
            && (m.len() as u64) < n
        {
            errs.push(format!("{at}: fewer than minProperties {n}"));
        }
        if let Some(n) = s.get("maxProperties").and_then(Value::as_u64)
            && (m.len() as u64) > n
        {
            errs.push(format!("{at}: more than maxProperties {n}"));
        }
    }

    /// The first reason of each branch, for a failed oneOf/anyOf.
    fn why_not(&self, alts: &[Value], v: &Value) -> String {
        alts.iter()
            .map(|a| {
                let mut e = Vec::new();
                self.validate(a, v, "$", &mut e);
                e.into_iter().next().unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// The schema a valid value actually matched: through `$ref`s and into
    /// the first matching branch of a `oneOf`/`anyOf`.
    fn branch_of(&self, schema: &Value, v: &Value) -> Value {
        let s = self.deref(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(alts) = s.get(key).and_then(Value::as_array)
                && let Some(a) = alts.iter().find(|a| self.valid(a, v))
            {
                return self.branch_of(a, v);
            }
        }
        if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
            return self.merge_all_of(parts);
        }
        s.clone()
    }

    /// One object schema from the parts of an `allOf`.
    fn merge_all_of(&self, parts: &[Value]) -> Value {
        let mut out = Map::new();
        let mut props = Map::new();
        let mut required = Vec::new();
        for p in parts {
            let p = self.deref(p);
            let p = match p.get("allOf").and_then(Value::as_array) {
                Some(inner) => self.merge_all_of(inner),
                None => p.clone(),
            };
            for (k, v) in p.as_object().into_iter().flatten() {
                match k.as_str() {
                    "properties" => props.extend(v.as_object().cloned().unwrap_or_default()),
                    "required" => required.extend(v.as_array().cloned().unwrap_or_default()),
                    _ => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if !props.is_empty() {
            out.insert("properties".into(), Value::Object(props));
        }
        if !required.is_empty() {
            out.insert("required".into(), Value::Array(required));
        }
        Value::Object(out)
    }

    /// The JSON types a schema allows (`None`: any).
    fn allowed_types(&self, schema: &Value) -> Option<BTreeSet<&'static str>> {
        const ALL: [&str; 7] = [
            "null", "boolean", "integer", "number", "string", "array", "object",
        ];
        let s = self.deref(schema);
        let canon = |t: &str| ALL.iter().copied().find(|x| *x == t);
        let mut types: Option<BTreeSet<&'static str>> = match s.get("type") {
            Some(Value::String(t)) => canon(t).map(|t| BTreeSet::from([t])),
            Some(Value::Array(ts)) => Some(ts.iter().filter_map(|t| canon(t.as_str()?)).collect()),
            _ => None,
        };
        if types.is_none()
            && let Some(Value::Array(vals)) = s.get("enum")
        {
            types = Some(vals.iter().map(json_type).collect());
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(alts) = s.get(key).and_then(Value::as_array) {
                let mut u = BTreeSet::new();
                for a in alts {
                    u.extend(self.allowed_types(a)?);
                }
                types = Some(match types {
                    Some(t) => t.intersection(&u).copied().collect(),
                    None => u,
                });
            }
        }
        if let Some(t) = &mut types
            && t.contains("number")
        {
            t.insert("integer");
        }
        types
    }
}

// ---------------------------------------------------------------------------
// Resources to point path parameters at
// ---------------------------------------------------------------------------

/// Names and ids of things that exist, by kind.
#[derive(Default)]
struct Pool {
    by_kind: BTreeMap<&'static str, Vec<String>>,
}

impl Pool {
    fn add(&mut self, kind: &'static str, v: impl Into<String>) {
        let v = v.into();
        let list = self.by_kind.entry(kind).or_default();
        if !v.is_empty() && !list.contains(&v) {
            list.push(v);
        }
    }

    fn get(&self, kind: &str) -> &[String] {
        self.by_kind.get(kind).map_or(&[], Vec::as_slice)
    }

    /// Adds the `id` and `name` of each object of a list (or a page).
    fn add_all(&mut self, kind: &'static str, list: &Value) {
        let items = list.get("items").unwrap_or(list);
        for x in items.as_array().into_iter().flatten() {
            for k in ["id", "name"] {
                if let Some(v) = x.get(k).and_then(Value::as_str) {
                    self.add(kind, v);
                }
            }
        }
    }
}

/// The kind of thing a path parameter names, from the segment before it
/// (`/vms/{id}`) or else its own name (`{project}`).
fn path_kind(prev: Option<&str>, name: &str) -> Option<&'static str> {
    let by_segment = match prev {
        Some("projects") => Some("project"),
        Some("vms") | Some("orphans") | Some("metadata") => Some("vm"),
        Some("images") => Some("image"),
        Some("users") | Some("members") => Some("user"),
        Some("tokens") => Some("token"),
        Some("nodes") => Some("node"),
        Some("environments") => Some("environment"),
        Some("runs") => Some("run"),
        Some("flavors") => Some("flavor"),
        Some("image-files") => Some("sha256"),
        Some("files") => Some("file"),
        _ => None,
    };
    by_segment.or_else(|| field_kind(name))
}

/// The kind of thing a body property or query parameter names.
fn field_kind(name: &str) -> Option<&'static str> {
    Some(match name {
        "project" => "project",
        "image" | "os_prefixes" => "image",
        "flavor" => "flavor",
        "user" | "owner" => "user",
        "vm" => "vm",
        "env" | "environment" => "environment",
        "node" => "node",
        "document" => "document",
        "file" => "file",
        "sha256" => "sha256",
        "language" => "language",
        _ => return None,
    })
}

/// Creates the things the requests point at, and lists what exists.
async fn seed(s: &TestServer, notes: &mut Vec<String>) -> Pool {
    let post = Method::POST;
    let mut pool = Pool::default();
    let (st, p) = s
        .call(
            post.clone(),
            "/v1/projects",
            Some(&s.admin),
            Some(json!({"name": "fuzz"})),
        )
        .await;
    assert!(st.is_success(), "creating the project fuzz: {st} {p}");
    s.image("tiny").await;
    let (st, vm) = s
        .call(
            post.clone(),
            "/v1/vms",
            Some(&s.admin),
            Some(json!({"name": "vm-1", "image": "tiny", "flavor": "m1.tiny"})),
        )
        .await;
    assert_eq!(st.as_u16(), 202, "creating vm-1: {vm}");
    pool.add_all("vm", &json!([vm]));
    s.user("alice").await;
    let (st, t) = s
        .call(
            post.clone(),
            "/v1/tokens",
            Some(&s.admin),
            Some(json!({"name": "fuzz-token"})),
        )
        .await;
    match t.pointer("/token/id").and_then(Value::as_str) {
        Some(id) if st.is_success() => pool.add("token", id),
        _ => notes.push(format!("seeding: no API token ({st} {t})")),
    }
    let node = SimNode::join(s, "node-1", 4096).await;
    pool.add("node", node.id.clone());
    pool.add("node", "node-1");
    let (st, env) = s
        .call(
            post,
            "/v1/environments",
            Some(&s.admin),
            Some(json!({"name": "env-1", "project": "fuzz", "os_prefixes": ["tiny"], "flavor": "m1.tiny"})),
        )
        .await;
    if st.is_success() {
        pool.add_all("environment", &json!([env]));
    } else {
        notes.push(format!(
            "seeding: no environment ({st} {})",
            excerpt(&env.to_string(), 160)
        ));
    }
    for (kind, path) in [
        ("project", "/v1/projects"),
        ("image", "/v1/images"),
        ("user", "/v1/users"),
        ("flavor", "/v1/flavors"),
        ("vm", "/v1/vms"),
        ("node", "/v1/nodes"),
        ("environment", "/v1/environments"),
        ("token", "/v1/tokens"),
        ("run", "/v1/runs"),
    ] {
        let (st, list) = s.call(Method::GET, path, Some(&s.admin), None).await;
        if st.is_success() {
            pool.add_all(kind, &list);
        }
        if kind == "image" {
            for img in list.as_array().into_iter().flatten() {
                for k in ["sha256", "kernel_sha256", "initrd_sha256"] {
                    if let Some(h) = img.get(k).and_then(Value::as_str) {
                        pool.add("sha256", h);
                    }
                }
            }
        }
    }
    // The fixed words of the API where a path names a role rather than a
    // record: an image's files and a guest's NoCloud documents.
    for f in ["image", "kernel", "initrd"] {
        pool.add("file", f);
    }
    for d in ["meta-data", "user-data", "vendor-data", "network-config"] {
        pool.add("document", d);
    }
    for l in ["shell", "python", "node", "rust"] {
        pool.add("language", l);
    }
    pool
}

// ---------------------------------------------------------------------------
// Generating values from schemas
// ---------------------------------------------------------------------------

/// Makes values that match schemas, preferring boundaries and things
/// that exist.
struct Gen<'a> {
    doc: &'a Doc,
    pool: &'a Pool,
    rng: Rng,
    /// Set when a value was made for a schema the generator cannot honour
    /// for sure (a pattern it cannot parse): such a case is sent but not
    /// held to "a valid request is never refused".
    uncertain: bool,
    /// Counts the requests that need a value never sent before.
    serial: u64,
}

impl Gen<'_> {
    /// A value for `schema`; `hint` names the kind of thing it refers to.
    fn value(&mut self, schema: &Value, hint: Option<&'static str>, depth: usize) -> Value {
        let s = self.doc.deref(schema);
        if !s.is_object() {
            return json!("fuzz");
        }
        if let Some(Value::Array(options)) = s.get("enum")
            && !options.is_empty()
        {
            return self.rng.pick(options).clone();
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(kind) = hint
            && self.rng.chance(0.6)
        {
            let known = self.pool.get(kind);
            if !known.is_empty() {
                let v = Value::String(self.rng.pick(known).clone());
                if self.doc.valid(s, &v) {
                    return v;
                }
            }
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(alts) = s.get(key).and_then(Value::as_array)
                && !alts.is_empty()
            {
                let non_null: Vec<&Value> = alts
                    .iter()
                    .filter(|a| self.doc.deref(a).get("type") != Some(&json!("null")))
                    .collect();
                let alt = if !non_null.is_empty() && (depth > 6 || self.rng.chance(0.8)) {
                    *self.rng.pick(&non_null)
                } else {
                    self.rng.pick(alts)
                };
                return self.value(alt, hint, depth + 1);
            }
        }
        if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
            let merged = self.doc.merge_all_of(parts);
            return self.value(&merged, hint, depth + 1);
        }
        let ty = self.pick_type(s, depth);
        match ty.as_str() {
            "null" => Value::Null,
            "boolean" => Value::Bool(self.rng.chance(0.5)),
            "integer" => int_value(self.integer(s)),
            "number" => self.number(s),
            "string" => Value::String(self.string(s)),
            "array" => self.array(s, hint, depth),
            "object" => self.object(s, depth),
            _ => json!("fuzz"),
        }
    }

    fn pick_type(&mut self, s: &Value, depth: usize) -> String {
        match s.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                let non_null: Vec<&Value> = ts.iter().filter(|t| *t != "null").collect();
                let t = if !non_null.is_empty() && (depth > 6 || self.rng.chance(0.8)) {
                    *self.rng.pick(&non_null)
                } else {
                    self.rng.pick(ts)
                };
                t.as_str().unwrap_or("string").to_owned()
            }
            _ if s.get("properties").is_some() => "object".into(),
            _ if s.get("items").is_some() => "array".into(),
            _ => "string".into(),
        }
    }

    /// The inclusive range an integer schema allows.
    fn int_bounds(s: &Value) -> (i128, i128) {
        let (mut lo, mut hi) = match s.get("format").and_then(Value::as_str) {
            Some("int8") => (i128::from(i8::MIN), i128::from(i8::MAX)),
            Some("int16") => (i128::from(i16::MIN), i128::from(i16::MAX)),
            Some("int32") => (i128::from(i32::MIN), i128::from(i32::MAX)),
            Some("uint8") => (0, i128::from(u8::MAX)),
            Some("uint16") => (0, i128::from(u16::MAX)),
            Some("uint32") => (0, i128::from(u32::MAX)),
            Some("uint64") => (0, i128::from(u64::MAX)),
            _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
        };
        let f = |k: &str| s.get(k).and_then(Value::as_f64);
        if let Some(m) = f("minimum") {
            lo = lo.max(m.ceil() as i128);
        }
        if let Some(m) = f("exclusiveMinimum") {
            lo = lo.max(m.floor() as i128 + 1);
        }
        if let Some(m) = f("maximum") {
            hi = hi.min(m.floor() as i128);
        }
        if let Some(m) = f("exclusiveMaximum") {
            hi = hi.min(m.ceil() as i128 - 1);
        }
        (lo, hi)
    }

    fn integer(&mut self, s: &Value) -> i128 {
        let (lo, hi) = Self::int_bounds(s);
        let r = self.rng.below(100);
        if r < 22 {
            lo
        } else if r < 37 {
            hi
        } else if r < 45 {
            (lo + 1).min(hi)
        } else {
            let base = if lo < -1000 && hi > 1000 { -1000 } else { lo };
            self.rng.between(base, hi.min(base + 1000))
        }
    }

    fn number(&mut self, s: &Value) -> Value {
        let lo = s.get("minimum").and_then(Value::as_f64).unwrap_or(-1e6);
        let hi = s.get("maximum").and_then(Value::as_f64).unwrap_or(1e6);
        let r = self.rng.below(100);
        let x = if r < 20 {
            lo
        } else if r < 35 {
            hi
        } else {
            lo + (hi - lo) * (self.rng.below(1_000_000) as f64 / 1e6)
        };
        json!(x)
    }

    fn string(&mut self, s: &Value) -> String {
        let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0);
        let max = s.get("maxLength").and_then(Value::as_u64);
        if let Some(p) = s.get("pattern").and_then(Value::as_str) {
            return self.patterned(p, min, max);
        }
        match s.get("format").and_then(Value::as_str) {
            Some("uuid") => return self.rng.uuid(),
            Some("date-time") => {
                return format!(
                    "20{:02}-0{}-1{}T0{}:1{}:2{}Z",
                    30 + self.rng.below(40),
                    1 + self.rng.below(9),
                    self.rng.below(9),
                    self.rng.below(9),
                    self.rng.below(9),
                    self.rng.below(9)
                );
            }
            Some("date") => {
                return format!("2031-0{}-1{}", 1 + self.rng.below(9), self.rng.below(9));
            }
            Some("email") => return format!("fuzz{}@example.com", self.rng.below(1000)),
            Some("uri") | Some("url") => {
                return format!("https://example.com/{}", self.rng.below(1000));
            }
            _ => {}
        }
        let len = self.length(min, max, 16);
        if max == Some(len) || len > 64 {
            // At a boundary: plain ASCII, so characters and bytes agree.
            return (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
        }
        // Characters that are valid in a JSON string but test escaping,
        // encodings and storage (a NUL is valid JSON, `\u0000`).
        const ODD: &[char] = &[
            'é', 'ü', '✓', '😀', ' ', '_', '/', '.', '-', '\'', '"', '\\', '\0', '\n',
        ];
        (0..len)
            .map(|_| {
                if self.rng.chance(0.1) {
                    *self.rng.pick(ODD)
                } else {
                    let c = self.rng.below(36) as u8;
                    char::from(if c < 26 { b'a' + c } else { b'0' + c - 26 })
                }
            })
            .collect()
    }

    /// A length between `min` and `max`, often at one of them.
    fn length(&mut self, min: u64, max: Option<u64>, typical: u64) -> u64 {
        let upper = max.unwrap_or(min + typical).max(min);
        let r = self.rng.below(100);
        if r < 20 {
            min
        } else if r < 35 && max.is_some() && upper <= LONGEST_GENERATED_STRING {
            upper
        } else {
            self.rng
                .between(i128::from(min), i128::from(upper.min(min + typical))) as u64
        }
    }

    /// A string matching a pattern (and the length limits). A lowercase
    /// name pattern gets `[a-z]([a-z0-9-]*[a-z0-9])?`: names that are
    /// plainly fine, whatever extra rules a name has beyond its pattern.
    fn patterned(&mut self, p: &str, min: u64, max: Option<u64>) -> String {
        let fits = |s: &str| {
            let n = s.chars().count() as u64;
            n >= min && max.is_none_or(|m| n <= m)
        };
        let parsed = Pattern::parse(p);
        if p.contains("a-z0-9") {
            for _ in 0..8 {
                let len = self
                    .length(min.max(1), Some(max.unwrap_or(63).min(255)), 10)
                    .max(1);
                let mut s = String::new();
                for i in 0..len {
                    let c = if i == 0 {
                        b'a' + self.rng.below(26) as u8
                    } else {
                        let c = self.rng.below(if i + 1 == len { 36 } else { 37 }) as u8;
                        match c {
                            0..=25 => b'a' + c,
                            26..=35 => b'0' + c - 26,
                            _ => b'-',
                        }
                    };
                    s.push(char::from(c));
                }
                if fits(&s) && parsed.as_ref().is_some_and(|re| re.matches(&s)) {
                    return s;
                }
            }
        }
        if let Some(re) = &parsed {
            for _ in 0..32 {
                let s = re.generate(&mut self.rng);
                if fits(&s) && re.matches(&s) {
                    return s;
                }
            }
        }
        self.uncertain = true;
        "a".repeat(min.max(1) as usize)
    }

    fn array(&mut self, s: &Value, hint: Option<&'static str>, depth: usize) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = s.get("maxItems").and_then(Value::as_u64);
        let n = if depth > 6 {
            min
        } else {
            let n = self.length(min, max.filter(|m| *m <= 64), 3);
            n.min(max.unwrap_or(u64::MAX))
        };
        let items = s.get("items").cloned().unwrap_or(json!({"type": "string"}));
        let unique = s.get("uniqueItems") == Some(&Value::Bool(true));
        let mut out: Vec<Value> = Vec::new();
        let mut tries = 0;
        while (out.len() as u64) < n && tries < n * 8 + 8 {
            tries += 1;
            let v = self.value(&items, hint, depth + 1);
            if !unique || !out.contains(&v) {
                out.push(v);
            }
        }
        Value::Array(out)
    }

    fn object(&mut self, s: &Value, depth: usize) -> Value {
        let required: BTreeSet<&str> = s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut out = Map::new();
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, ps) in props {
                if required.contains(k.as_str()) || (depth <= 6 && self.rng.chance(0.5)) {
                    let v = self.value(ps, field_kind(k), depth + 1);
                    out.insert(k.clone(), v);
                }
            }
        }
        for r in &required {
            if !out.contains_key(*r) {
                out.insert((*r).to_owned(), json!("fuzz"));
            }
        }
        if let Some(ap @ Value::Object(_)) = s.get("additionalProperties")
            && depth <= 6
        {
            let names = s
                .get("propertyNames")
                .cloned()
                .unwrap_or(json!({"type": "string"}));
            for _ in 0..self.rng.below(3) {
                let mut k = self.value(&names, None, depth + 1);
                if let Value::String(key) = &mut k {
                    if key.is_empty() {
                        key.push('k');
                    }
                    let v = self.value(ap, None, depth + 1);
                    out.insert(key.clone(), v);
                }
            }
        }
        Value::Object(out)
    }
}

// ---------------------------------------------------------------------------
// Cases: requests made from an operation
// ---------------------------------------------------------------------------

/// What goes in the request body.
#[derive(Clone, Debug)]
enum Payload {
    None,
    /// Sent as `Content-Type: application/json`.
    Json(Value),
    /// Sent as given, with this content type or none.
    Raw(Vec<u8>, Option<String>),
}

/// One step in a JSON document.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn show_path(p: &[Seg]) -> String {
    let mut s = String::from("$");
    for seg in p {
        match seg {
            Seg::Key(k) => {
                let _ = write!(s, ".{k}");
            }
            Seg::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

fn at_mut<'v>(v: &'v mut Value, p: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = v;
    for seg in p {
        cur = match seg {
            Seg::Key(k) => cur.get_mut(k.as_str())?,
            Seg::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// One request to send.
#[derive(Clone, Debug)]
struct Case {
    /// `valid`, or what the mutation did.
    label: String,
    valid: bool,
    /// An invalid case whose request the schema clearly forbids: it must
    /// not get a 2xx.
    forbidden: bool,
    /// A valid case the generator could not be sure of.
    uncertain: bool,
    /// The path with its parameters filled in (percent-encoded).
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Payload,
}

impl Case {
    fn uri(&self) -> String {
        let mut u = self.path.clone();
        for (i, (k, v)) in self.query.iter().enumerate() {
            u.push(if i == 0 { '?' } else { '&' });
            u.push_str(&encode(k));
            u.push('=');
            u.push_str(&encode(v));
        }
        u
    }

    /// The request, in a line.
    fn summary(&self, method: &Method) -> String {
        let mut s = format!("{method} {}", excerpt(&self.uri(), 160));
        for (k, v) in &self.headers {
            let _ = write!(s, " [{k}: {}]", excerpt(v, 40));
        }
        match &self.body {
            Payload::None => {}
            Payload::Json(v) => {
                let _ = write!(s, " body={}", excerpt(&v.to_string(), 200));
            }
            Payload::Raw(b, ct) => {
                let _ = write!(
                    s,
                    " body={} [content-type: {}]",
                    excerpt(&String::from_utf8_lossy(b), 120),
                    ct.as_deref().unwrap_or("none")
                );
            }
        }
        format!("{s} ({})", self.label)
    }

    /// What makes two cases the same request.
    fn key(&self, method: &Method) -> String {
        let body = match &self.body {
            Payload::None => String::new(),
            Payload::Json(v) => v.to_string(),
            Payload::Raw(b, ct) => format!("{ct:?}{}", String::from_utf8_lossy(b)),
        };
        format!("{method} {} {:?} {body}", self.uri(), self.headers)
    }
}

/// Percent-encodes all but the unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn excerpt(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        let head: String = one_line.chars().take(n).collect();
        format!("{head}… ({} chars)", s.chars().count())
    }
}

/// A query or header value as text (`None`: leave it out).
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// Whether a query parameter is the length of a wait (`timeout_secs`):
/// valid cases keep it at its smallest values so that a wait for a state
/// the VM never reaches ends at once instead of after its default.
fn is_wait(p: &Param) -> bool {
    let n = p.name.to_ascii_lowercase();
    n.contains("timeout") || n.ends_with("_secs") || n == "wait"
}

/// One way to make a valid case invalid.
#[derive(Clone, Debug)]
struct Mutation {
    kind: &'static str,
    label: String,
    forbidden: bool,
    edit: Edit,
}

#[derive(Clone, Debug)]
enum Edit {
    Remove(Vec<Seg>, String),
    Set(Vec<Seg>, Value),
    Insert(Vec<Seg>, String, Value),
    Body(Payload),
    Query(String, Option<String>),
    DropHeader(String),
}

/// Mutation kinds in the order invalid cases take turns at them.
const MUTATION_KINDS: &[&str] = &[
    "missing required field",
    "unknown field",
    "wrong JSON type",
    "below minimum",
    "past maximum",
    "past maxLength",
    "below minLength",
    "too few items",
    "too many items",
    "not in enum",
    "body not JSON",
    "no Content-Type",
    "missing required query parameter",
    "query value of the wrong type",
    "query value out of range",
    "query value past maxLength",
    "oversized query value",
    "missing required header",
];

/// A part of a JSON body, with the schema it matched.
struct Site {
    path: Vec<Seg>,
    /// The schema the value matched (through refs and oneOf branches).
    matched: Value,
    /// The schema the document declares here.
    declared: Value,
    /// Required in its parent object (the root: when the body is required).
    required: bool,
}

impl Doc {
    fn sites(
        &self,
        declared: &Value,
        v: &Value,
        path: Vec<Seg>,
        required: bool,
        out: &mut Vec<Site>,
    ) {
        let matched = self.branch_of(declared, v);
        match v {
            Value::Object(m) => {
                let props = matched.get("properties").and_then(Value::as_object);
                let req: BTreeSet<&str> = matched
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                for (k, child) in m {
                    let mut p = path.clone();
                    p.push(Seg::Key(k.clone()));
                    if let Some(ps) = props.and_then(|ps| ps.get(k)) {
                        self.sites(ps, child, p, req.contains(k.as_str()), out);
                    } else if let Some(ap @ Value::Object(_)) = matched.get("additionalProperties")
                    {
                        self.sites(ap, child, p, true, out);
                    }
                }
            }
            Value::Array(a) => {
                if let Some(items) = matched.get("items") {
                    for (i, child) in a.iter().enumerate() {
                        let mut p = path.clone();
                        p.push(Seg::Index(i));
                        self.sites(items, child, p, true, out);
                    }
                }
            }
            _ => {}
        }
        out.push(Site {
            path,
            matched,
            declared: declared.clone(),
            required,
        });
    }
}

impl Gen<'_> {
    /// A value of a JSON type the schema does not allow.
    fn wrong_type(&mut self, declared: &Value) -> Option<Value> {
        let allowed = self.doc.allowed_types(declared)?;
        let candidates: Vec<Value> = [
            ("string", json!("fuzz-wrong-type")),
            ("integer", json!(7)),
            ("number", json!(1.5)),
            ("boolean", json!(true)),
            ("array", json!([1])),
            ("object", json!({"k": 1})),
            ("null", Value::Null),
        ]
        .into_iter()
        .filter(|(t, _)| !allowed.contains(t))
        .map(|(_, v)| v)
        .collect();
        (!candidates.is_empty()).then(|| self.rng.pick(&candidates).clone())
    }

    /// Every mutation that applies to a valid case of `op`.
    fn mutations(&mut self, op: &Operation, case: &Case) -> Vec<Mutation> {
        let mut out = Vec::new();
        if let (Some(rb), Payload::Json(body)) = (&op.body, &case.body) {
            let mut sites = Vec::new();
            self.doc
                .sites(&rb.schema, body, Vec::new(), rb.required, &mut sites);
            for site in &sites {
                self.site_mutations(site, &mut out);
            }
            out.push(Mutation {
                kind: "body not JSON",
                label: "body not JSON".into(),
                forbidden: rb.required,
                edit: Edit::Body(Payload::Raw(
                    b"{\"name\": \"fuzz\", ".to_vec(),
                    Some("application/json".into()),
                )),
            });
            out.push(Mutation {
                kind: "no Content-Type",
                label: "JSON body without Content-Type".into(),
                forbidden: rb.required,
                edit: Edit::Body(Payload::Raw(body.to_string().into_bytes(), None)),
            });
        }
        for p in &op.params {
            let present = match p.location {
                In::Query => case.query.iter().any(|(k, _)| *k == p.name),
                In::Header => case
                    .headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case(&p.name)),
                _ => false,
            };
            if p.location == In::Header && p.required && present {
                out.push(Mutation {
                    kind: "missing required header",
                    label: format!("without the required header {}", p.name),
                    forbidden: true,
                    edit: Edit::DropHeader(p.name.clone()),
                });
            }
            if p.location == In::Query {
                self.query_mutations(p, present, &mut out);
            }
        }
        out
    }

    fn site_mutations(&mut self, site: &Site, out: &mut Vec<Mutation>) {
        let at = show_path(&site.path);
        let m = &site.matched;
        let value_here = |label: String, kind: &'static str, forbidden: bool, v: Value| Mutation {
            kind,
            label,
            forbidden,
            edit: Edit::Set(site.path.clone(), v),
        };
        if m.get("properties").is_some() || m.get("type") == Some(&json!("object")) {
            for r in m
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(r) = r.as_str() {
                    out.push(Mutation {
                        kind: "missing required field",
                        label: format!("without the required {at}.{r}"),
                        forbidden: true,
                        edit: Edit::Remove(site.path.clone(), r.to_owned()),
                    });
                }
            }
            if m.get("additionalProperties") == Some(&Value::Bool(false)) {
                out.push(Mutation {
                    kind: "unknown field",
                    label: format!("with an unknown field {at}.fuzz_unknown"),
                    forbidden: true,
                    edit: Edit::Insert(site.path.clone(), "fuzz_unknown".into(), json!("x")),
                });
            }
        }
        if let Some(v) = self.wrong_type(&site.declared) {
            let label = format!(
                "{at} of the wrong JSON type ({}){}",
                short(&v),
                if site.required {
                    ""
                } else {
                    ", an optional field"
                }
            );
            out.push(value_here(label, "wrong JSON type", site.required, v));
        }
        let is_int = self
            .doc
            .allowed_types(m)
            .is_some_and(|t| !t.contains("number"));
        let num = |k: &str| m.get(k).filter(|b| b.is_number()).cloned();
        let step = |b: &Value, up: bool| -> Value {
            match as_int(b) {
                Some(i) if is_int => int_value(if up { i + 1 } else { i - 1 }),
                _ => {
                    let f = b.as_f64().unwrap_or(0.0);
                    json!(if up { f + 1.0 } else { f - 1.0 })
                }
            }
        };
        if let Some(b) = num("minimum") {
            let v = step(&b, false);
            out.push(value_here(
                format!("{at} = {v}, below the minimum {b}"),
                "below minimum",
                true,
                v,
            ));
        }
        if let Some(b) = num("exclusiveMinimum") {
            out.push(value_here(
                format!("{at} = {b}, at the exclusive minimum"),
                "below minimum",
                true,
                b.clone(),
            ));
        }
        if let Some(b) = num("maximum") {
            let v = step(&b, true);
            out.push(value_here(
                format!("{at} = {v}, past the maximum {b}"),
                "past maximum",
                true,
                v,
            ));
        }
        if let Some(b) = num("exclusiveMaximum") {
            out.push(value_here(
                format!("{at} = {b}, at the exclusive maximum"),
                "past maximum",
                true,
                b.clone(),
            ));
        }
        if let Some(n) = m.get("maxLength").and_then(Value::as_u64)
            && n < 900_000
        {
            let v = Value::String("a".repeat(n as usize + 1));
            out.push(value_here(
                format!("{at} of {} characters, past maxLength {n}", n + 1),
                "past maxLength",
                true,
                v,
            ));
        }
        if let Some(n) = m.get("minLength").and_then(Value::as_u64)
            && n >= 1
        {
            let v = Value::String("a".repeat(n as usize - 1));
            out.push(value_here(
                format!("{at} of {} characters, below minLength {n}", n - 1),
                "below minLength",
                true,
                v,
            ));
        }
        if let Some(n) = m.get("minItems").and_then(Value::as_u64)
            && n >= 1
        {
            out.push(value_here(
                format!("{at} = [], below minItems {n}"),
                "too few items",
                true,
                json!([]),
            ));
        }
        if let Some(n) = m.get("maxItems").and_then(Value::as_u64)
            && n < 10_000
        {
            let items = m.get("items").cloned().unwrap_or(json!({}));
            let v: Vec<Value> = (0..=n).map(|_| self.value(&items, None, 4)).collect();
            out.push(value_here(
                format!("{at} of {} items, past maxItems {n}", n + 1),
                "too many items",
                true,
                Value::Array(v),
            ));
        }
        if m.get("enum").is_some() {
            let v = json!("fuzz-not-in-enum");
            if !self.doc.valid(&site.declared, &v) {
                let label = format!(
                    "{at} = \"fuzz-not-in-enum\", not one of its values{}",
                    if site.required {
                        ""
                    } else {
                        ", an optional field"
                    }
                );
                out.push(value_here(label, "not in enum", site.required, v));
            }
        }
    }

    fn query_mutations(&mut self, p: &Param, present: bool, out: &mut Vec<Mutation>) {
        let s = self.doc.deref(&p.schema).clone();
        let name = &p.name;
        let q = |kind: &'static str, label: String, forbidden: bool, v: Option<String>| Mutation {
            kind,
            label,
            forbidden,
            edit: Edit::Query(name.clone(), v),
        };
        if p.required && present {
            out.push(q(
                "missing required query parameter",
                format!("without the required query parameter {name}"),
                true,
                None,
            ));
        }
        let types = self.doc.allowed_types(&s);
        let typed = types
            .as_ref()
            .is_some_and(|t| !t.contains("string") && !t.is_empty());
        if typed || s.get("enum").is_some() {
            let v = "fuzz-not-a-value".to_owned();
            out.push(q(
                "query value of the wrong type",
                format!("{name}={v}, not a value its schema allows"),
                true,
                Some(v),
            ));
        }
        let is_int = types
            .as_ref()
            .is_some_and(|t| t.contains("integer") && !t.contains("number"));
        let num = |k: &str| s.get(k).filter(|b| b.is_number()).cloned();
        let shift = |b: &Value, by: i128| -> String {
            match as_int(b) {
                Some(i) if is_int => (i + by).to_string(),
                _ => (b.as_f64().unwrap_or(0.0) + by as f64).to_string(),
            }
        };
        if let Some(b) = num("minimum") {
            let v = shift(&b, -1);
            out.push(q(
                "query value out of range",
                format!("{name}={v}, below the minimum {b}"),
                true,
                Some(v),
            ));
        }
        if let Some(b) = num("maximum") {
            let v = shift(&b, 1);
            out.push(q(
                "query value out of range",
                format!("{name}={v}, past the maximum {b}"),
                true,
                Some(v),
            ));
        }
        if let Some(n) = s.get("maxLength").and_then(Value::as_u64)
            && n < 100_000
        {
            let v = "a".repeat(n as usize + 1);
            out.push(q(
                "query value past maxLength",
                format!("{name} of {} characters, past maxLength {n}", n + 1),
                true,
                Some(v),
            ));
        }
        let numeric = types
            .as_ref()
            .is_some_and(|t| t.contains("integer") || t.contains("number"));
        let (v, what) = if numeric && !types.as_ref().is_some_and(|t| t.contains("string")) {
            ("9".repeat(400), "a 400-digit number")
        } else {
            ("a".repeat(9000), "9000 characters")
        };
        out.push(q(
            "oversized query value",
            format!("{name} = {what}"),
            false,
            Some(v),
        ));
    }

    /// Applies a mutation to a copy of a valid case.
    fn apply(&self, op: &Operation, case: &Case, m: &Mutation) -> Option<Case> {
        let mut c = case.clone();
        c.valid = false;
        c.uncertain = false;
        c.label = format!("invalid: {}", m.label);
        c.forbidden = m.forbidden;
        match &m.edit {
            Edit::Remove(p, k) => {
                let Payload::Json(body) = &mut c.body else {
                    return None;
                };
                at_mut(body, p)?.as_object_mut()?.remove(k)?;
            }
            Edit::Insert(p, k, v) => {
                let Payload::Json(body) = &mut c.body else {
                    return None;
                };
                at_mut(body, p)?
                    .as_object_mut()?
                    .insert(k.clone(), v.clone());
            }
            Edit::Set(p, v) => {
                let Payload::Json(body) = &mut c.body else {
                    return None;
                };
                *at_mut(body, p)? = v.clone();
            }
            Edit::Body(b) => c.body = b.clone(),
            Edit::Query(name, v) => {
                c.query.retain(|(k, _)| k != name);
                if let Some(v) = v {
                    c.query.push((name.clone(), v.clone()));
                }
            }
            Edit::DropHeader(name) => c.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
        }
        // A body edit must really break the schema, else it is no
        // invalid case.
        if let (Some(rb), Payload::Json(body)) = (&op.body, &c.body)
            && matches!(m.edit, Edit::Remove(..) | Edit::Insert(..) | Edit::Set(..))
            && self.doc.valid(&rb.schema, body)
        {
            return None;
        }
        Some(c)
    }

    /// A path parameter's value: something that exists, a random UUID, or
    /// junk; always a value its schema allows.
    fn path_value(&mut self, kind: Option<&'static str>, p: &Param) -> String {
        let known = kind.map(|k| self.pool.get(k)).unwrap_or(&[]);
        for _ in 0..16 {
            let r = self.rng.below(100);
            let v = if r < 60 && !known.is_empty() {
                self.rng.pick(known).clone()
            } else if r < 78 {
                self.rng.uuid()
            } else if r < 84 {
                "a".repeat(300)
            } else {
                (*self.rng.pick(JUNK)).to_owned()
            };
            if self.doc.valid(&p.schema, &Value::String(v.clone())) {
                return v;
            }
        }
        match self.value(&p.schema, kind, 0) {
            Value::String(s) => s,
            other => as_text(&other).unwrap_or_default(),
        }
    }

    /// A valid case of `op`.
    fn valid_case(&mut self, op: &Operation) -> Case {
        self.uncertain = false;
        let segments: Vec<&str> = op.path.split('/').collect();
        let mut path = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let p = op
                        .params
                        .iter()
                        .find(|p| p.location == In::Path && p.name == name)
                        .expect("every template segment has a parameter")
                        .clone();
                    let prev = i
                        .checked_sub(1)
                        .map(|j| segments[j])
                        .filter(|s| !s.starts_with('{'));
                    let kind = path_kind(prev, name);
                    path.push(encode(&self.path_value(kind, &p)));
                }
                None => path.push((*seg).to_owned()),
            }
        }
        let last_literal = segments
            .iter()
            .rev()
            .find(|s| !s.starts_with('{') && !s.is_empty())
            .copied();
        let mut query = Vec::new();
        let mut headers = Vec::new();
        for p in &op.params {
            if !matches!(p.location, In::Query | In::Header) {
                continue;
            }
            let wait = p.location == In::Query && is_wait(p);
            if !p.required && !wait && !self.rng.chance(0.5) {
                continue;
            }
            let kind = match p.name.as_str() {
                "name" | "id" => path_kind(last_literal, ""),
                n => field_kind(n),
            };
            let schema = self.doc.deref(&p.schema).clone();
            let mut v = Value::Null;
            let mut ok = false;
            for _ in 0..8 {
                v = if wait
                    && self
                        .doc
                        .allowed_types(&schema)
                        .is_some_and(|t| t.contains("integer"))
                {
                    let (lo, hi) = Self::int_bounds(&schema);
                    let lo = lo.max(0);
                    int_value(if self.rng.chance(0.7) {
                        lo
                    } else {
                        (lo + 1).min(hi)
                    })
                } else {
                    self.value(&schema, kind, 0)
                };
                if p.location == In::Header
                    && let Value::String(s) = &mut v
                {
                    s.retain(|c| c.is_ascii_graphic());
                    if p.name.to_ascii_lowercase().contains("idempotency") {
                        // A fresh key for every request: a repeated key
                        // is a replay (or a 422 for another body).
                        self.serial += 1;
                        let tag = format!("k{:x}-", self.serial);
                        let rest: String = s.chars().skip(tag.len()).collect();
                        *s = format!("{tag}{rest}");
                    }
                }
                if self.doc.valid(&schema, &v) && !(p.required && v.is_null()) {
                    ok = true;
                    break;
                }
            }
            if !ok {
                self.uncertain = true;
            }
            if let Some(text) = as_text(&v) {
                let list = if p.location == In::Query {
                    &mut query
                } else {
                    &mut headers
                };
                match &v {
                    Value::Array(items) if p.location == In::Query => {
                        for x in items {
                            if let Some(t) = as_text(x) {
                                list.push((p.name.clone(), t));
                            }
                        }
                    }
                    _ => list.push((p.name.clone(), text)),
                }
            }
        }
        let body = match &op.body {
            None => Payload::None,
            Some(rb) if !rb.required && self.rng.chance(0.2) => Payload::None,
            Some(rb) if is_json_media(&rb.content_type) => {
                let mut v = Value::Null;
                let mut ok = false;
                for _ in 0..8 {
                    v = self.value(&rb.schema, None, 0);
                    if self.doc.valid(&rb.schema, &v) {
                        ok = true;
                        break;
                    }
                }
                if !ok {
                    self.uncertain = true;
                }
                Payload::Json(v)
            }
            Some(rb) => {
                let n = self.rng.below(64) as usize;
                let bytes = (0..n).map(|_| self.rng.below(256) as u8).collect();
                Payload::Raw(bytes, Some(rb.content_type.clone()))
            }
        };
        Case {
            label: if self.uncertain {
                "valid, unsure: a pattern the generator cannot honour".into()
            } else {
                "valid".into()
            },
            valid: true,
            forbidden: false,
            uncertain: self.uncertain,
            path: path.join("/"),
            query,
            headers,
            body,
        }
    }
}

// ---------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------

/// What came back.
enum Outcome {
    Answer {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    Hung,
    Panicked(String),
}

fn build(method: &Method, case: &Case, token: &str) -> Option<Request<Body>> {
    let mut b = Request::builder()
        .method(method.clone())
        .uri(case.uri())
        .header("authorization", format!("Bearer {token}"));
    for (k, v) in &case.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let body = match &case.body {
        Payload::None => Body::empty(),
        Payload::Json(v) => {
            b = b.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        Payload::Raw(bytes, ct) => {
            if let Some(ct) = ct {
                b = b.header("content-type", ct.as_str());
            }
            Body::from(bytes.clone())
        }
    };
    b.body(body).ok()
}

/// Sends a request through the router in a task of its own (so that a
/// panic in a handler is an outcome, not the end of the test), within
/// [`REQUEST_DEADLINE`]. An event stream's body is not read.
async fn send(router: &axum::Router, req: Request<Body>) -> Outcome {
    let router = router.clone();
    let task = tokio::spawn(async move {
        let resp = router.oneshot(req).await.expect("the router is infallible");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if content_type.starts_with("text/event-stream") {
            return (status, content_type, Vec::new());
        }
        let body = axum::body::to_bytes(resp.into_body(), 32 << 20)
            .await
            .map(|b| b.to_vec())
            .unwrap_or_else(|e| format!("<the body could not be read: {e}>").into_bytes());
        (status, content_type, body)
    });
    let abort = task.abort_handle();
    match tokio::time::timeout(REQUEST_DEADLINE, task).await {
        Ok(Ok((status, content_type, body))) => Outcome::Answer {
            status,
            content_type,
            body,
        },
        Ok(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Outcome::Panicked(msg)
        }
        Ok(Err(e)) => Outcome::Panicked(e.to_string()),
        Err(_) => {
            abort.abort();
            Outcome::Hung
        }
    }
}

// ---------------------------------------------------------------------------
// Checks and the report
// ---------------------------------------------------------------------------

/// Kinds of findings, in the order the report lists them.
const FINDING_KINDS: &[&str] = &[
    "server error (5xx)",
    "handler panicked",
    "no answer in time",
    "status not documented",
    "body does not match the documented schema",
    "valid request refused as malformed",
    "the server accepted what its document forbids",
];

/// One thing an answer got wrong.
struct Finding {
    kind: &'static str,
    backend: String,
    op: String,
    request: String,
    status: String,
    detail: String,
    body: String,
}

/// Counts for the summary.
#[derive(Default)]
struct Stats {
    operations: usize,
    valid: usize,
    invalid: usize,
    forbidden: usize,
    statuses: BTreeMap<u16, usize>,
}

/// One backend's run: the server, its admin token, and what was found.
struct Run<'a> {
    s: &'a TestServer,
    admin: String,
    backend: String,
    findings: Vec<Finding>,
    notes: Vec<String>,
    stats: Stats,
    last_request: String,
    verbose: bool,
    /// Valid requests refused by a check the document does not state (a
    /// 400 with a code of its own): by operation, status and code, with
    /// a count and one message. Not findings; they show limits the
    /// document could say.
    refusals: BTreeMap<(String, u16, String), (usize, String)>,
}

impl Run<'_> {
    fn find(
        &mut self,
        kind: &'static str,
        op: &Operation,
        case: &Case,
        status: &str,
        detail: String,
        body: &str,
    ) {
        self.findings.push(Finding {
            kind,
            backend: self.backend.clone(),
            op: op.label(),
            request: case.summary(&op.method),
            status: status.to_owned(),
            detail,
            body: excerpt(body, 300),
        });
    }

    /// Sends a case; if the admin's session stopped working, logs in again
    /// and sends it once more.
    async fn send_case(&mut self, op: &Operation, case: &Case) -> Option<Outcome> {
        let Some(req) = build(&op.method, case, &self.admin) else {
            self.notes.push(format!(
                "could not build the request {}",
                case.summary(&op.method)
            ));
            return None;
        };
        let mut out = send(&self.s.router, req).await;
        if matches!(out, Outcome::Answer { status: 401, .. }) && !self.admin_ok().await {
            self.notes.push(format!(
                "the admin's session stopped working (after {}; at {}); logged in again",
                self.last_request,
                case.summary(&op.method)
            ));
            self.admin = self.s.login("admin", ADMIN_PASSWORD).await;
            out = send(&self.s.router, build(&op.method, case, &self.admin)?).await;
        }
        self.last_request = case.summary(&op.method);
        Some(out)
    }

    async fn admin_ok(&self) -> bool {
        let (st, _) = self
            .s
            .call(Method::GET, "/v1/auth/whoami", Some(&self.admin), None)
            .await;
        st.is_success()
    }

    /// Checks one answer against the document.
    fn check(&mut self, doc: &Doc, op: &Operation, case: &Case, out: Outcome) {
        let (status, content_type, body) = match out {
            Outcome::Answer {
                status,
                content_type,
                body,
            } => (status, content_type, body),
            Outcome::Hung => {
                let detail = format!(
                    "no answer within {} s{}",
                    REQUEST_DEADLINE.as_secs(),
                    if case.forbidden {
                        " to a request its document forbids"
                    } else {
                        ""
                    }
                );
                self.find("no answer in time", op, case, "-", detail, "");
                return;
            }
            Outcome::Panicked(msg) => {
                self.find("handler panicked", op, case, "-", msg, "");
                return;
            }
        };
        *self.stats.statuses.entry(status).or_default() += 1;
        let text = String::from_utf8_lossy(&body).into_owned();
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let code = json
            .as_ref()
            .and_then(|v| v.pointer("/error/code"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let st = status.to_string();
        let documented = op.response(status);
        // (a) No 5xx, but a 503/504 the operation documents.
        if status >= 500 && (status == 500 || documented.is_none()) {
            let detail = format!(
                "{status}{}",
                if documented.is_none() {
                    ", not documented either"
                } else {
                    ""
                }
            );
            self.find("server error (5xx)", op, case, &st, detail, &text);
        } else if documented.is_none() {
            // (b) The status is one the operation lists.
            let listed: Vec<&str> = op.responses.keys().map(String::as_str).collect();
            let detail = format!("{status} is not among {}", listed.join(", "));
            self.find("status not documented", op, case, &st, detail, &text);
        }
        // (c) The body is of a documented media type, and a JSON body
        // matches the documented schema. Other media types are not read.
        if let Some(resp) = documented
            && let Some(content) = resp.get("content").and_then(Value::as_object)
            && !content.is_empty()
        {
            let actual = media_base(&content_type);
            let listed = content.keys().cloned().collect::<Vec<_>>().join(", ");
            let matched = content
                .iter()
                .find(|(k, _)| media_matches(k, &actual))
                .or_else(|| {
                    // No content type: held to the JSON one, if any.
                    (actual.is_empty())
                        .then(|| content.iter().find(|(k, _)| is_json_media(k)))
                        .flatten()
                });
            let mismatch = "body does not match the documented schema";
            match matched {
                None => {
                    let detail = format!(
                        "answered as {}; documented: {listed}",
                        if actual.is_empty() {
                            "no content type"
                        } else {
                            &actual
                        }
                    );
                    self.find(mismatch, op, case, &st, detail, &text);
                }
                Some((media_type, media)) if is_json_media(media_type) => {
                    let schema = media.get("schema").cloned().unwrap_or(json!(true));
                    match &json {
                        None => {
                            let what = if body.is_empty() {
                                "an empty body"
                            } else {
                                "a body that is not JSON"
                            };
                            let detail = format!("documented as {media_type}, got {what}");
                            self.find(mismatch, op, case, &st, detail, &text);
                        }
                        Some(v) => {
                            let mut errs = Vec::new();
                            doc.validate(&schema, v, "$", &mut errs);
                            if !errs.is_empty() {
                                self.find(mismatch, op, case, &st, errs.join("; "), &text);
                            }
                        }
                    }
                }
                Some(_) => {}
            }
        }
        // (d) A valid request is never refused at parse level.
        if case.valid && !case.uncertain && matches!(status, 400 | 413 | 415 | 422) {
            if PARSE_LEVEL_CODES.contains(&code.as_str()) {
                let detail = format!("{status} {code}: the document allows this request");
                self.find(
                    "valid request refused as malformed",
                    op,
                    case,
                    &st,
                    detail,
                    &text,
                );
            } else if code.is_empty() {
                let detail = format!(
                    "{status} without the API's error body: the document allows this request"
                );
                self.find(
                    "valid request refused as malformed",
                    op,
                    case,
                    &st,
                    detail,
                    &text,
                );
            } else {
                let message = json
                    .as_ref()
                    .and_then(|v| v.pointer("/error/message"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let e = self
                    .refusals
                    .entry((op.label(), status, code.clone()))
                    .or_insert_with(|| (0, excerpt(message, 160)));
                e.0 += 1;
            }
        }
        // (e) A request the schema forbids is never accepted.
        if case.forbidden && (200..300).contains(&status) {
            let detail = format!("{status} to a request the document forbids");
            self.find(
                "the server accepted what its document forbids",
                op,
                case,
                &st,
                detail,
                &text,
            );
        }
    }

    /// Every case of one operation: valid and invalid in turn (invalid
    /// ones taking the kinds of mutation that apply in turn), each distinct
    /// request sent once.
    async fn operation(&mut self, doc: &Doc, g: &mut Gen<'_>, op: &Operation, cases: usize) {
        self.stats.operations += 1;
        let mut seen = BTreeSet::new();
        let (mut sent, mut attempts, mut invalid_turn) = (0, 0, 0usize);
        while sent < cases && attempts < cases * 4 {
            attempts += 1;
            let valid = g.valid_case(op);
            let case = if attempts % 2 == 0 {
                let all = g.mutations(op, &valid);
                let kinds: Vec<&str> = MUTATION_KINDS
                    .iter()
                    .copied()
                    .filter(|k| all.iter().any(|m| m.kind == *k))
                    .collect();
                if kinds.is_empty() {
                    valid
                } else {
                    let kind = kinds[invalid_turn % kinds.len()];
                    invalid_turn += 1;
                    let of_kind: Vec<&Mutation> = all.iter().filter(|m| m.kind == kind).collect();
                    let m = (*g.rng.pick(&of_kind)).clone();
                    match g.apply(op, &valid, &m) {
                        Some(c) => c,
                        None => continue,
                    }
                }
            } else {
                valid
            };
            if !seen.insert(case.key(&op.method)) {
                continue;
            }
            sent += 1;
            if case.valid {
                self.stats.valid += 1;
            } else {
                self.stats.invalid += 1;
                if case.forbidden {
                    self.stats.forbidden += 1;
                }
            }
            let Some(out) = self.send_case(op, &case).await else {
                continue;
            };
            let hung = matches!(out, Outcome::Hung);
            if self.verbose {
                let st = match &out {
                    Outcome::Answer { status, body, .. } => {
                        format!("{status} {}", excerpt(&String::from_utf8_lossy(body), 100))
                    }
                    Outcome::Hung => "hung".into(),
                    Outcome::Panicked(m) => format!("panicked: {m}"),
                };
                println!("  {} -> {st}", case.summary(&op.method));
            }
            self.check(doc, op, &case, out);
            if hung {
                self.notes.push(format!(
                    "{}: stopped after a request that did not answer",
                    op.label()
                ));
                break;
            }
        }
    }
}

/// The findings, grouped by kind and then by operation, status and
/// detail, each with one example request.
fn report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for kind in FINDING_KINDS {
        let of_kind: Vec<&Finding> = findings.iter().filter(|f| f.kind == *kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let mut groups: BTreeMap<(String, String, String), Vec<&Finding>> = BTreeMap::new();
        for f in &of_kind {
            groups
                .entry((f.op.clone(), f.status.clone(), f.detail.clone()))
                .or_default()
                .push(f);
        }
        let _ = writeln!(
            out,
            "\n== {kind}: {} ({} distinct) ==",
            of_kind.len(),
            groups.len()
        );
        for ((op, status, detail), fs) in &groups {
            let f = fs[0];
            let backends: BTreeSet<&str> = fs.iter().map(|f| f.backend.as_str()).collect();
            let _ = writeln!(
                out,
                "- {op} -> {status} (x{}, {}): {}",
                fs.len(),
                backends.into_iter().collect::<Vec<_>>().join("+"),
                excerpt(detail, 600)
            );
            let _ = writeln!(out, "    request: {}", f.request);
            if !f.body.is_empty() {
                let _ = writeln!(out, "    answer:  {}", f.body);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_answers_what_its_document_says() {
    let settings = Settings::from_env();
    let doc = Doc::load();
    let ops = doc.operations();
    // Deletions last, so that what they remove was there for the others.
    let (mut ordered, deletes): (Vec<&Operation>, Vec<&Operation>) =
        ops.iter().partition(|o| o.method != Method::DELETE);
    ordered.extend(deletes);
    println!(
        "contract fuzz: seed {:#x} (BYTEPORT_FUZZ_SEED), {} cases per operation (BYTEPORT_FUZZ_CASES), {} operations in the document",
        settings.seed,
        settings.cases,
        ops.len()
    );
    let mut findings = Vec::new();
    for backend in backends() {
        let started = Instant::now();
        let s = TestServer::start(backend).await;
        let mut notes = Vec::new();
        let pool = seed(&s, &mut notes).await;
        let mut g = Gen {
            doc: &doc,
            pool: &pool,
            rng: Rng(settings.seed),
            uncertain: false,
            serial: 0,
        };
        let mut run = Run {
            s: &s,
            admin: s.admin.clone(),
            backend: backend.to_string(),
            findings: Vec::new(),
            notes,
            stats: Stats::default(),
            last_request: "seeding".into(),
            verbose: settings.verbose,
            refusals: BTreeMap::new(),
        };
        let mut skipped = Vec::new();
        for op in &ordered {
            if let Some(why) = op.skipped() {
                skipped.push(format!("{} ({why})", op.label()));
                continue;
            }
            run.operation(&doc, &mut g, op, settings.cases).await;
        }
        let st = &run.stats;
        let statuses: Vec<String> = st
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        println!(
            "[{backend}] {} operations exercised, {} cases sent ({} valid, {} invalid of which {} clearly forbidden) in {:.1} s",
            st.operations,
            st.valid + st.invalid,
            st.valid,
            st.invalid,
            st.forbidden,
            started.elapsed().as_secs_f64()
        );
        println!("[{backend}] statuses seen: {}", statuses.join(" "));
        println!("[{backend}] skipped: {}", skipped.join("; "));
        for n in &run.notes {
            println!("[{backend}] note: {n}");
        }
        if !run.refusals.is_empty() {
            println!(
                "[{backend}] valid requests refused by checks the document does not state (not failures; limits it could document):"
            );
            for ((op, status, code), (n, message)) in &run.refusals {
                println!("[{backend}]   {op} -> {status} {code} (x{n}): {message}");
            }
        }
        println!("[{backend}] findings: {}", run.findings.len());
        findings.append(&mut run.findings);
    }
    if !findings.is_empty() {
        panic!(
            "{} answers disagree with openapi/byteport.json (seed {:#x}):\n{}",
            findings.len(),
            settings.seed,
            report(&findings)
        );
    }
}

/// The harness's own parts, on the real document, so that a passing run
/// means something: what the generator makes passes the validator, every
/// mutation it offers breaks the schema, the validator refuses what it
/// must, and the pattern subset reads the document's patterns.
#[test]
fn the_harness_checks_what_it_claims() {
    let doc = Doc::load();
    let pool = Pool::default();
    let mut g = Gen {
        doc: &doc,
        pool: &pool,
        rng: Rng(7),
        uncertain: false,
        serial: 0,
    };
    let schemas = doc.root["components"]["schemas"]
        .as_object()
        .expect("component schemas");
    let mut made = 0;
    for (name, schema) in schemas {
        for _ in 0..10 {
            g.uncertain = false;
            let v = g.value(schema, None, 0);
            if g.uncertain {
                continue;
            }
            let mut errs = Vec::new();
            doc.validate(schema, &v, "$", &mut errs);
            if !errs.is_empty() {
                // A union may need another try (oneOf branches that
                // overlap for one value); the request generator retries
                // too. Two misses in a row are a generator bug.
                let again = g.value(schema, None, 0);
                assert!(
                    doc.valid(schema, &again),
                    "{name}: the generated {v} fails its schema: {errs:?}"
                );
            }
            made += 1;
            let mut sites = Vec::new();
            doc.sites(schema, &v, Vec::new(), true, &mut sites);
            for site in &sites {
                let mut ms = Vec::new();
                g.site_mutations(site, &mut ms);
                for m in ms {
                    let mut w = v.clone();
                    let applied = match &m.edit {
                        Edit::Remove(p, k) => at_mut(&mut w, p)
                            .and_then(Value::as_object_mut)
                            .and_then(|o| o.remove(k))
                            .is_some(),
                        Edit::Insert(p, k, x) => at_mut(&mut w, p)
                            .and_then(Value::as_object_mut)
                            .map(|o| o.insert(k.clone(), x.clone()))
                            .is_some(),
                        Edit::Set(p, x) => at_mut(&mut w, p).map(|t| *t = x.clone()).is_some(),
                        _ => false,
                    };
                    // A clear violation must be one; a lenient mutation
                    // may happen to leave the value valid (the request
                    // generator drops those).
                    if applied && m.forbidden {
                        assert!(
                            !doc.valid(schema, &w),
                            "{name}: `{}` left {w} valid",
                            m.label
                        );
                    }
                }
            }
        }
    }
    assert!(made > schemas.len(), "values were made for the schemas");

    // The validator refuses what it must.
    let error_body = json!({"$ref": "#/components/schemas/ErrorBody"});
    assert!(doc.valid(
        &error_body,
        &json!({"error": {"code": "x", "message": "y"}})
    ));
    assert!(!doc.valid(&error_body, &json!({"error": {"code": 1, "message": "y"}})));
    assert!(!doc.valid(&error_body, &json!({"error": {"message": "y"}})));
    assert!(!doc.valid(&error_body, &json!([])));
    let one_of = json!({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]});
    assert!(doc.valid(&one_of, &json!(-1)));
    assert!(
        !doc.valid(&one_of, &json!(1)),
        "two branches match: not exactly one"
    );
    assert!(doc.valid(&one_of, &json!(1.5)));
    let closed = json!({"type": "object", "properties": {"a": {"type": ["string", "null"], "maxLength": 2}},
        "required": ["a"], "additionalProperties": false});
    assert!(doc.valid(&closed, &json!({"a": null})));
    assert!(doc.valid(&closed, &json!({"a": "ab"})));
    assert!(!doc.valid(&closed, &json!({"a": "abc"})));
    assert!(!doc.valid(&closed, &json!({"a": "a", "b": 1})));
    assert!(!doc.valid(&closed, &json!({})));
    let bounded = json!({"type": "integer", "minimum": 1, "maximum": 500});
    assert!(doc.valid(&bounded, &json!(500)));
    assert!(!doc.valid(&bounded, &json!(501)));
    assert!(!doc.valid(&bounded, &json!(0)));
    assert!(!doc.valid(&bounded, &json!(1.5)));
    let id = json!({"type": "string", "format": "uuid"});
    assert!(!doc.valid(&id, &json!("vm-1")));

    // Patterns: every one in the document is read; a name pattern behaves.
    let mut patterns = BTreeSet::new();
    fn collect(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("pattern", Value::String(p)) => {
                            out.insert(p.clone());
                        }
                        _ => collect(x, out),
                    }
                }
            }
            Value::Array(xs) => xs.iter().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    collect(&doc.root, &mut patterns);
    for p in &patterns {
        let Some(re) = Pattern::parse(p) else {
            println!("pattern not in the supported subset (neither generated nor checked): {p}");
            continue;
        };
        let mut rng = Rng(3);
        for _ in 0..50 {
            let s = re.generate(&mut rng);
            assert!(re.matches(&s), "{p}: generated {s:?} does not match");
        }
    }
    let name = Pattern::parse("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$").expect("the name pattern");
    for ok in ["a", "vm-1", "m1.tiny", &"a".repeat(63)] {
        assert!(name.matches(ok), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
        assert!(!name.matches(bad), "{bad}");
    }
    let visible = Pattern::parse("^[\\x21-\\x7e]+$").expect("a \\x range");
    assert!(visible.matches("k1-abc"));
    assert!(!visible.matches("a b"));
    assert!(
        Pattern::parse("^(?=a)").is_none(),
        "lookahead is not in the subset"
    );
}
