//! The judged items of one zero-shot task, one JSON line per item appended as soon as it is
//! judged, so that a task stopped part way (Ctrl-C, the end of a session) resumes at the item
//! where it stopped, and a larger `--limit` judges only the items it adds: every limit's items
//! include those of the limits that divide it (`Task::subset_indices`). A full task of
//! HellaSwag takes about four hours on two CPU cores; without this it could never finish in a
//! session.
//!
//! Each line names the build that judged the item, so a cell assembled from items of several
//! builds says so (its `measured_by`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::zeroshot::Judgement;
use crate::data::tasks::Task;
use crate::error::{Error, Result};

#[derive(Serialize, Deserialize)]
struct Line {
    /// The item's position in the task's file order.
    item: usize,
    /// (log-likelihood, greedy) per request. The log-likelihood as Rust writes an f64 (the
    /// shortest text that reads back to it), read back by Rust, exactly: serde_json's own float
    /// parsing may land a unit in the last place off, and a resumed task must score as one
    /// run through.
    judged: Vec<(String, bool)>,
    by: String,
}

pub struct Journal {
    path: PathBuf,
    items: HashMap<usize, (Vec<Judgement>, String)>,
    /// Opened for appending at the first item judged.
    file: Option<File>,
}

impl Journal {
    /// The journal at `path` for `task` (empty where there is none yet). Every line must be an
    /// item of `task` with one judgement per request (a later line for an item replaces an
    /// earlier one); a last line cut short, as a run stopped while writing it leaves it, is
    /// dropped and cut from the file.
    pub fn open(path: &Path, task: &Task) -> Result<Self> {
        let mut items = HashMap::new();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        for (n, line) in text[..whole].lines().enumerate() {
            let bad = |what: String| {
                Error::other(format!(
                    "{}: line {}: {what} (delete the file to judge {}'s items again)",
                    path.display(),
                    n + 1,
                    task.name.name()
                ))
            };
            let l: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let Some(item) = task.items.get(l.item) else {
                return Err(bad(format!(
                    "item {} of a task with {} items",
                    l.item,
                    task.items.len()
                )));
            };
            let judged: Vec<Judgement> = l
                .judged
                .iter()
                .filter_map(|(loglik, greedy)| {
                    let loglik = loglik.parse::<f64>().ok().filter(|v| v.is_finite())?;
                    Some(Judgement {
                        loglik,
                        greedy: *greedy,
                    })
                })
                .collect();
            if judged.len() != item.requests.len() || judged.len() != l.judged.len() {
                return Err(bad(format!(
                    "{} finite log-likelihoods wanted for item {}, one per choice",
                    item.requests.len(),
                    l.item
                )));
            }
            items.insert(l.item, (judged, l.by));
        }
        if whole < text.len() {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            f.set_len(whole as u64).map_err(|e| Error::io(path, e))?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            items,
            file: None,
        })
    }

    /// Item `item`'s judgements, and the build that judged it, where the journal has them.
    pub fn get(&self, item: usize) -> Option<(&[Judgement], &str)> {
        self.items
            .get(&item)
            .map(|(j, by)| (j.as_slice(), by.as_str()))
    }

    /// Append item `item`'s judgements by this build (finite: `judge` refuses others), written
    /// to the file before it returns.
    pub fn record(&mut self, item: usize, judged: &[Judgement]) -> Result<()> {
        let line = Line {
            item,
            judged: judged
                .iter()
                .map(|j| (j.loglik.to_string(), j.greedy))
                .collect(),
            by: crate::BUILD.to_string(),
        };
        let mut text = serde_json::to_string(&line).expect("journal lines serialize");
        text.push('\n');
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.items
            .insert(item, (judged.to_vec(), crate::BUILD.to_string()));
        Ok(())
    }
}
