//! Quantizers and the quantized-model settings.
pub mod quantizer;
