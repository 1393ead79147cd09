//! Prometheus metrics: request counts and latency histograms by method,
//! route and status. Small enough to keep without a metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let Ok(mut map) = self.series.lock() else {
            return;
        };
        let s = map
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default();
        s.count += 1;
        s.sum += secs;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                s.buckets[i] += 1;
            }
        }
    }

    /// The Prometheus text format.
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP byteport_http_requests_total API requests by method, route and status.\n",
        );
        out.push_str("# TYPE byteport_http_requests_total counter\n");
        let Ok(map) = self.series.lock() else {
            return out;
        };
        for ((m, r, st), s) in map.iter() {
            let _ = writeln!(
                out,
                "byteport_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{st}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP byteport_http_request_duration_seconds API request latency.\n");
        out.push_str("# TYPE byteport_http_request_duration_seconds histogram\n");
        for ((m, r, st), s) in map.iter() {
            let labels = format!("method=\"{m}\",route=\"{r}\",status=\"{st}\"");
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "byteport_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "byteport_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "byteport_http_request_duration_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "byteport_http_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
        out.push_str(extra);
        out
    }
}

/// One histogram without labels, for figures other than requests.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(u64, f64, Vec<u64>)>,
}

/// Bounds for boot times, in seconds (a TCG boot takes a few, a KVM one
/// less than one, a Debian guest with cloud-init a minute or two).
pub const BOOT_BUCKETS: [f64; 11] = [
    0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new((0, 0.0, vec![0; bounds.len()])),
        }
    }

    pub fn observe(&self, secs: f64) {
        let Ok(mut h) = self.inner.lock() else {
            return;
        };
        h.0 += 1;
        h.1 += secs;
        for (i, le) in self.bounds.iter().enumerate() {
            if secs <= *le {
                h.2[i] += 1;
            }
        }
    }

    /// The series in the Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let Ok(h) = self.inner.lock() else {
            return;
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, n) in self.bounds.iter().zip(&h.2) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.0);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.1, h.0);
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new(&BOOT_BUCKETS)
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
