//! Writing a model folder: into a hidden folder beside the target first, then swapped in, so a
//! failed or cancelled job leaves no half-written folder; and never over a folder this tool did
//! not write (`--out ~/models` or `--out .` must not wipe what is there).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Check that `out` may receive a new folder: it does not exist, is an empty folder, or holds
/// `marker` (a file only this kind of folder has, e.g. a quantized folder's header). Run it
/// before long work, so a bad `--out` fails at once.
pub fn check_target(out: &Path, marker: Option<&str>) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::other(format!(
            "{}: exists and is not a folder; choose another output",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .next()
        .is_none();
    if empty || marker.is_some_and(|m| out.join(m).is_file()) {
        return Ok(());
    }
    Err(Error::other(format!(
        "{}: exists and is not a folder this tool wrote{}; choose another output or remove it",
        out.display(),
        marker.map_or(String::new(), |m| format!(" (it has no {m})"))
    )))
}

/// A new, empty hidden folder beside `out` to write into.
pub fn staging_dir(out: &Path) -> Result<PathBuf> {
    let (parent, name) = parent_and_name(out)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

/// Move the finished `tmp` (from [`staging_dir`]) to `out`. A folder already at `out` (which
/// [`check_target`] must allow) is renamed aside first and deleted only once the new one is in
/// place; on failure it is put back and `tmp` removed.
pub fn install(tmp: &Path, out: &Path, marker: Option<&str>) -> Result<()> {
    let result = (|| {
        check_target(out, marker)?;
        if !out.exists() {
            return std::fs::rename(tmp, out).map_err(|e| Error::io(out, e));
        }
        let (parent, name) = parent_and_name(out)?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        if let Err(e) = std::fs::rename(tmp, out) {
            let _ = std::fs::rename(&old, out);
            return Err(Error::io(out, e));
        }
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

/// The folder that holds `out` and `out`'s own name, with `.` and `..` resolved (`--out .`
/// names the current folder, whose parent is one up).
fn parent_and_name(out: &Path) -> Result<(PathBuf, String)> {
    let abs = if out.exists() {
        out.canonicalize()
    } else {
        std::path::absolute(out)
    }
    .map_err(|e| Error::io(out, e))?;
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string_lossy().into_owned())),
        _ => Err(Error::other(format!(
            "{}: cannot write a model folder here (choose a folder inside another)",
            out.display()
        ))),
    }
}
