//! Readers for the fetched corpora: Wikipedia text and the zero-shot tasks.
pub mod arrow;
pub mod tasks;
pub mod wiki;
