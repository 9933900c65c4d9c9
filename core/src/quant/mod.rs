//! Quantizers and the quantized-model settings.
pub mod method;
pub mod quantizer;
