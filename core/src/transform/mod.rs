//! Function-preserving transforms of a LLaMA model: Hadamard rotations, RMSNorm folding, fusion.
pub mod fuse;
pub mod hadamard;
