//! Native file dialogs (rfd) on a background thread, and what to say when none can open: on a
//! Linux desktop without a file-chooser portal or zenity, rfd returns at once with nothing,
//! exactly as if the user had cancelled.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::jobs::Job;

/// What the dialog is for.
pub enum Pick {
    Folder,
    Gguf,
    /// A new folder to write, `name` proposed.
    Save(String),
}

/// A dialog's answer: the chosen path, and whether it came back too fast for a person to have
/// seen it (no dialog could open).
pub struct Picked {
    pub path: Option<PathBuf>,
    pub no_dialog: bool,
}

/// Said when a dialog returned at once with nothing.
pub const NO_DIALOG: &str = "no file dialog could open on this desktop (it needs xdg-desktop-portal or zenity installed): type the path in the box at the top instead";

/// Run a dialog titled `title` on its own thread: the window keeps drawing meanwhile.
pub fn pick(ctx: &egui::Context, title: &'static str, what: Pick) -> Job<(), Picked> {
    Job::spawn(ctx, "choosing a path", move |_| {
        let start = Instant::now();
        let dialog = rfd::AsyncFileDialog::new().set_title(title);
        let picked = match what {
            Pick::Folder => pollster::block_on(dialog.pick_folder()),
            Pick::Gguf => pollster::block_on(dialog.add_filter("GGUF", &["gguf"]).pick_file()),
            Pick::Save(name) => pollster::block_on(dialog.set_file_name(name).save_file()),
        };
        let path = picked.map(|f| f.path().to_path_buf());
        Ok(Picked {
            no_dialog: path.is_none() && start.elapsed() < Duration::from_millis(300),
            path,
        })
    })
}

/// A typed-path box beside a dialog button (for desktops where no dialog opens, and for
/// people who would rather paste a path): the path when Enter is pressed in it.
pub fn path_box(
    ui: &mut egui::Ui,
    enabled: bool,
    text: &mut String,
    hint: &str,
) -> Option<PathBuf> {
    let typed = ui.add_enabled(
        enabled,
        egui::TextEdit::singleline(text)
            .hint_text(hint)
            .desired_width(230.0),
    );
    let path = text.trim();
    let entered = typed.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
    (entered && !path.is_empty()).then(|| PathBuf::from(path))
}
