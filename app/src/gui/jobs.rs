//! Background jobs: the engine runs on its own thread and reports through a channel; the UI
//! drains the channel once per frame, so it never waits for the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

enum Msg<E, T> {
    Progress(String, usize, usize),
    Event(E),
    Done(Result<T, String>),
}

/// The job's side: progress, events and the cancellation flag.
pub struct Reporter<E, T> {
    tx: mpsc::Sender<Msg<E, T>>,
    ctx: egui::Context,
    pub cancel: Arc<AtomicBool>,
}

impl<E, T> Reporter<E, T> {
    pub fn progress(&self, what: &str, done: usize, total: usize) {
        let _ = self.tx.send(Msg::Progress(what.to_string(), done, total));
        // At most ten frames a second for progress (a loader may report thousands of steps).
        self.ctx
            .request_repaint_after(std::time::Duration::from_millis(100));
    }

    pub fn event(&self, e: E) {
        let _ = self.tx.send(Msg::Event(e));
        self.ctx.request_repaint();
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The UI's side of a running job.
pub struct Job<E, T> {
    rx: mpsc::Receiver<Msg<E, T>>,
    cancel: Arc<AtomicBool>,
    pub title: String,
    pub progress: Option<(String, usize, usize)>,
    pub started: Instant,
}

impl<E: Send + 'static, T: Send + 'static> Job<E, T> {
    /// Run `work` on a new thread. Its error (with its causes) becomes the job's message; a
    /// panic becomes an error too, never a crash of the window.
    pub fn spawn(
        ctx: &egui::Context,
        title: impl Into<String>,
        work: impl FnOnce(&Reporter<E, T>) -> anyhow::Result<T> + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let reporter = Reporter {
            tx,
            ctx: ctx.clone(),
            cancel: cancel.clone(),
        };
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&reporter)));
            let result = match result {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(std::iter::once(e.to_string())
                    .chain(crate::new_causes(&e))
                    .collect::<Vec<_>>()
                    .join(": ")),
                Err(p) => Err(format!(
                    "internal error: {}",
                    p.downcast_ref::<String>()
                        .map(String::as_str)
                        .or(p.downcast_ref::<&str>().copied())
                        .unwrap_or("the job panicked")
                )),
            };
            let _ = reporter.tx.send(Msg::Done(result));
            reporter.ctx.request_repaint();
        });
        Job {
            rx,
            cancel,
            title: title.into(),
            progress: None,
            started: Instant::now(),
        }
    }
}

impl<E, T> Job<E, T> {
    /// Take what the job sent since the last frame: events go to `on_event`; the result comes
    /// back once, when the job has finished.
    pub fn poll(&mut self, mut on_event: impl FnMut(E)) -> Option<Result<T, String>> {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Progress(what, d, t)) => self.progress = Some((what, d, t)),
                Ok(Msg::Event(e)) => on_event(e),
                Ok(Msg::Done(r)) => return Some(r),
                Err(mpsc::TryRecvError::Empty) => return None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Some(Err("the job stopped without a result".into()));
                }
            }
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelling(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// A progress bar with the stage, the counts and the elapsed time.
    pub fn show(&self, ui: &mut egui::Ui) {
        let secs = self.started.elapsed().as_secs();
        let (text, fraction) = match &self.progress {
            Some((what, d, t)) if *t > 0 => (
                format!("{}: {what} {d}/{t} · {secs} s", self.title),
                *d as f32 / *t as f32,
            ),
            _ => (format!("{} · {secs} s", self.title), 0.0),
        };
        let text = if self.is_cancelling() {
            format!("{text} · cancelling…")
        } else {
            text
        };
        // No animation: an animated bar repaints every frame, and without a GPU each frame is
        // drawn on the CPU the job runs on. Progress events repaint; the clock ticks once a
        // second.
        ui.add(egui::ProgressBar::new(fraction).text(text));
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_secs(1));
    }
}

/// Map a job's finished result into `slot` and an error line.
pub fn finish<T>(result: Result<T, String>, error: &mut Option<String>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            *error = Some(e);
            None
        }
    }
}
