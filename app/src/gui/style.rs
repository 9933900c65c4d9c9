//! Colours shared by the panels.

use egui::Color32;

/// Before (no transform) and after (the chosen transform), everywhere.
pub const BEFORE: Color32 = Color32::from_rgb(230, 120, 40);
pub const AFTER: Color32 = Color32::from_rgb(40, 140, 230);

/// A colour for a QSUR ratio in [0, 1]: red (poor use of the quantization grid) through yellow
/// to green (good).
pub fn qsur_colour(v: f64) -> Color32 {
    let t = v.clamp(0.0, 1.0) as f32;
    let (r, g) = if t < 0.5 {
        (1.0, t * 2.0)
    } else {
        (2.0 - t * 2.0, 1.0)
    };
    Color32::from_rgb((r * 200.0) as u8 + 30, (g * 170.0) as u8 + 40, 60)
}
