//! ostquant's engine: everything that is not UI. The data path runs down the modules:
//! checkpoint (`model`) → text (`data`) → generation and measurement (`generate`, `eval`).

pub mod analysis;
pub mod assets;
pub mod calib;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod generate;
pub mod model;
pub mod quant;
pub mod runtime;
pub mod transform;

pub use error::{Error, Result};

/// The commit this library was built from ("-dirty" with uncommitted changes under core/ or
/// shaders/, "unknown" outside git): measured results carry it as `measured_by`.
pub const BUILD: &str = env!("OSTQUANT_BUILD");

/// "0.1.0 (abc1234)": the version and the build, as `ostquant --version` prints them.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("OSTQUANT_BUILD"), ")");
