//! Accuracy measurements, and the cache that lets an interrupted results table resume.
pub mod journal;
pub mod perplexity;
pub mod suite;
pub mod zeroshot;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::assets;
use crate::error::{Error, Result};

/// Where measurements are cached unless told otherwise: `~/.cache/ostquant/results`.
pub fn default_cache_dir() -> PathBuf {
    assets::home().join("results")
}

/// One cached result under `root`: keyed by model, method, bits, task and item limit.
pub fn cache_path(
    root: &Path,
    model: &Path,
    method: &str,
    bits: &str,
    task: &str,
    limit: Option<usize>,
) -> PathBuf {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let limit = limit.map_or("all".to_string(), |l| l.to_string());
    root.join(name)
        .join(format!("{method}-{bits}-{task}-{limit}.json"))
}

pub fn cache_get<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The journal of the items of `task` judged by a method at `bits` (any limit): in the folder
/// `items` beside its cells, see [`journal`].
pub fn journal_path(root: &Path, model: &Path, method: &str, bits: &str, task: &str) -> PathBuf {
    let cell = cache_path(root, model, method, bits, task, None);
    let dir = cell.parent().expect("cache paths have a parent");
    dir.join("items")
        .join(format!("{method}-{bits}-{task}.jsonl"))
}

/// Write atomically (temp file, then rename), so an interrupted run never leaves half a result.
/// The result is stamped with the build that measured it (`measured_by`).
pub fn cache_put<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    cache_put_by(path, value, crate::BUILD)
}

/// [`cache_put`] of a result measured by `builds` (several joined by "+": a zero-shot cell
/// whose items were judged by more than one build, see [`journal`]).
pub fn cache_put_by<T: Serialize>(path: &Path, value: &T, builds: &str) -> Result<()> {
    let dir = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut value = serde_json::to_value(value).expect("results serialize");
    if let Some(obj) = value.as_object_mut() {
        obj.insert("measured_by".into(), builds.into());
    }
    let text = serde_json::to_string_pretty(&value).expect("results serialize");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
