//! What the GUI and `inspect` show: QSUR, eigenvalue spectra, per-channel statistics.
pub mod inspect;
pub mod qsur;
