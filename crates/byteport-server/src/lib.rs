//! BytePort's control plane as a library: `http` (thin handlers), `app`
//! (logic), `metrics`. The `byteportd` binary wires it to a listener.

pub mod app;
pub mod error;
pub mod http;
pub mod metrics;

pub use app::{App, Settings};
pub use error::{AppError, AppResult};
pub use http::{openapi, router};
