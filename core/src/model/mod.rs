//! Checkpoints in, a runnable model out: config, weights, tokenizer and the burn forward.
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod import;
pub mod llama;
pub mod output;
pub mod qformat;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::error::{Error, Result};
use checkpoint::LlamaWeights;
use llama::Llama;
use tokenizer::Tokenizer;

/// A model folder loaded onto a device.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

impl LoadedModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let weights = LlamaWeights::load(dir)?;
        let tokenizer = Tokenizer::load(dir, &weights.config)?;
        let mut model = Llama::new(&weights, device);
        // A quantized folder runs with the online transforms and quantizers it was made for.
        if qformat::is_quantized(dir) {
            model
                .set_options(qformat::read_header(dir)?.forward.options())
                .map_err(|e| Error::format(dir.join(qformat::HEADER), e.to_string()))?;
        }
        Ok(LoadedModel {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
        })
    }
}
