//! Accuracy measurements.
pub mod perplexity;
