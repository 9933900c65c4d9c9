//! The `ostquant` binary's two faces over `ostquant-core`: the desktop app (`gui`) and the
//! command line (`cli`). A library so that the GUI tests can drive the real app state.

pub mod cli;
pub mod gui;
pub mod results;
