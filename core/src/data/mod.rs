//! Readers for the fetched corpora.
pub mod wiki;
