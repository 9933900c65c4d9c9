//! `ostquant`: the desktop app and the command line over the engine in `ostquant-core`.

use ostquant_app::cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    ensure_runtime_dir();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in ostquant_app::new_causes(&e) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Mesa's Vulkan driver prints "XDG_RUNTIME_DIR is invalid or not set" on every adapter query
/// when the variable is missing (servers, CI, containers). Give it a private directory.
#[cfg(unix)]
fn ensure_runtime_dir() {
    use std::os::unix::fs::PermissionsExt;
    let ok = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if ok {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let dir = std::env::temp_dir().join(format!("ostquant-runtime-{user}"));
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
    {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

#[cfg(not(unix))]
fn ensure_runtime_dir() {}
