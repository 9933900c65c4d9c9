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
