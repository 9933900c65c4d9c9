//! The model's tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`,
//! rendered with minijinja the way transformers renders it).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::LlamaConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Prepend BOS to text (LLaMA-1/2/3 do, SmolLM2 does not).
    pub add_bos: bool,
    pub bos_id: Option<u32>,
    /// Tokens that end a generation: config.json's eos ids plus the tokenizer's eos token.
    pub eos_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
    template: Option<String>,
}

/// `bos_token` and friends are either a string or an AddedToken object with `content`.
fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn load(dir: &Path, config: &LlamaConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(
                &path,
                "tokenizer.json is missing: ostquant needs the Hugging Face tokenizer file beside the weights",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            serde_json::Value::Null
        };
        let bos_token = token_str(cfg.get("bos_token")).unwrap_or_default();
        let eos_token = token_str(cfg.get("eos_token")).unwrap_or_default();
        let bos_id = config
            .bos_token_id
            .as_ref()
            .and_then(|b| b.to_vec().first().copied())
            .or_else(|| inner.token_to_id(&bos_token));
        let mut eos_ids = config.eos_ids();
        if let Some(id) = inner.token_to_id(&eos_token)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        // LLaMA-family tokenizers add BOS unless they say otherwise; LLaMA-3 says so through its
        // post-processor, which we do not run, so trust the config's flag when present.
        // Every id the tokenizer can produce must have an embedding row: a tokenizer from
        // another model (a larger vocabulary) would otherwise fail deep inside the forward.
        let rows = config.vocab_size;
        if let Some((tok, id)) = inner
            .get_vocab(true)
            .into_iter()
            .max_by_key(|&(_, id)| id)
            .filter(|&(_, id)| id as usize >= rows)
        {
            return Err(Error::format(
                &path,
                format!(
                    "token {tok:?} has id {id} but the model has {rows} embedding rows (config.json \
                     vocab_size): the tokenizer belongs to another model"
                ),
            ));
        }
        if let Some(id) = bos_id
            .iter()
            .chain(&eos_ids)
            .find(|&&id| id as usize >= rows)
        {
            return Err(Error::format(
                dir.join("config.json"),
                format!("special token id {id} is outside the vocabulary of {rows} tokens"),
            ));
        }
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(bos_id.is_some() && !bos_token.is_empty());
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            path,
            add_bos,
            bos_id,
            eos_ids,
            bos_token,
            eos_token,
            template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, special tokens in the text recognised, no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::format(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`encode`](Self::encode), with BOS first when the model uses one.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(b)) = (self.add_bos, self.bos_id) {
            ids.push(b);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::format(&self.path, format!("decoding failed: {e}")))
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Render a conversation with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.template else {
            return Err(Error::format(&self.path, "the model has no chat template"));
        };
        render_template(
            template,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
        .map_err(|e| Error::format(&self.path, format!("chat template: {e}")))
    }
}

/// Render a Hugging Face chat template (Jinja) the way transformers does.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| e.to_string())?;
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| e.to_string())
}

/// Turns a growing list of token ids into text pieces as they become printable (a multi-byte
/// character may span tokens: nothing is emitted until it is complete).
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{fffd}') || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
