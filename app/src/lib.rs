//! The `ostquant` binary's two faces over `ostquant-core`: the desktop app (`gui`) and the
//! command line (`cli`). A library so that the GUI tests can drive the real app state.

pub mod cli;
pub mod gui;
pub mod results;

/// The causes of `e` that its message does not already quote (an error naming a file around
/// an I/O error says the I/O error itself), for printing after it.
pub fn new_causes(e: &anyhow::Error) -> Vec<String> {
    let message = e.to_string();
    e.chain()
        .skip(1)
        .map(|c| c.to_string())
        .filter(|c| !message.contains(c.as_str()))
        .collect()
}
