//! Quantizers, the baseline methods, and the quantized-model settings.
pub mod gptq;
pub mod method;
pub mod quantizer;
pub mod smoothquant;
