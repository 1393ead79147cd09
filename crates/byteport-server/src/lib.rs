//! BytePort's control plane as a library: `http` (thin handlers), `app`
//! (logic), `metrics`, `background` (reconcilers). The `byteportd` binary wires it to a listener.

pub mod app;
pub mod background;
pub mod error;
pub mod http;
pub mod metrics;

pub use app::{App, Settings};
pub use error::{AppError, AppResult};
pub use http::{openapi, router};

/// The OpenAPI document as committed at `openapi/byteport.json`: pretty
/// JSON with a final newline.
pub fn openapi_json() -> String {
    let mut s = openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}
