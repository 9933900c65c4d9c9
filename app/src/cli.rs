//! Subcommands. Each one parses its arguments, calls core, and prints; no algorithm lives here.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ostquant_core::assets;
use ostquant_core::calib::optim::RotationOptimizer;
use ostquant_core::calib::{Event, Init, Loss, Overrides, Preset, Settings as CalibSettings};
use ostquant_core::data::tasks::parse_task_list;
use ostquant_core::data::wiki;
use ostquant_core::device::{self, ComputeDevice, DeviceChoice};
use ostquant_core::eval::perplexity::{perplexity, score_decoder, text_windows};
use ostquant_core::eval::suite::{Lab, Settings};
use ostquant_core::generate::{Decoder, SamplingParams, Session};
use ostquant_core::model::LoadedModel;
use ostquant_core::model::import::import_gguf;
use ostquant_core::model::qformat;
use ostquant_core::model::tokenizer::ChatMessage;
use ostquant_core::quant::method::{Bits, Method};

#[derive(Parser)]
#[command(
    name = "ostquant",
    version = ostquant_core::VERSION,
    about = "Quantize LLaMA-family models to 4 bits with OSTQuant, and run them",
    long_about = "Quantize LLaMA-family models to 4 bits with OSTQuant, and run them.\n\nWithout a command, opens the desktop app."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Open the desktop app (the default without a command)
    Gui {
        /// A model folder or .gguf to open at start
        #[arg(long)]
        model: Option<PathBuf>,
        /// Compute device: auto, gpu, cpu or software
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Download and verify the default model and data (no-op when done)
    Fetch,
    /// Convert a GGUF file into a Hugging Face model folder
    Import { gguf: PathBuf, out: PathBuf },
    /// Show a model's architecture, size and the compute device
    Info(ModelArgs),
    /// Generate a reply to one prompt, streamed to stdout
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The user's message (wrapped in the model's chat template unless --raw)
        #[arg(long)]
        prompt: String,
        /// Send the prompt as is, without the chat template
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Multi-turn chat in the terminal (/reset clears the conversation, /quit leaves)
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// System prompt (the template's default when absent)
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Quantize with a method and measure it against full precision: Wikipedia perplexity, KL
    /// to FP and top-1 agreement, and the zero-shot tasks (each result cached, so runs resume)
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// fp, rtn, smoothquant, gptq, quarot, quarot-gptq, ostquant, spinquant, or an
        /// OSTQuant ablation (ostquant-nowomi, ostquant-ce, ostquant-rot, ostquant-scale)
        #[arg(long, default_value = "rtn")]
        method: Method,
        /// W4A16KV16, W4A4KV16, W4A4KV4, W8A8KV8, W3A16, …
        #[arg(long, default_value = "W4A16KV16")]
        bits: Bits,
        /// Zero-shot tasks: all, none, or a list such as piqa,arc_easy,winogrande
        #[arg(long, default_value = "none")]
        tasks: String,
        #[command(flatten)]
        measure: MeasureArgs,
        /// Also write the result as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Quantize a model and write it as a 4-bit model folder: learned methods (ostquant,
    /// spinquant, ablations) first calibrate their transforms on the Wikipedia calibration half
    /// (resumable: a checkpoint is saved every few steps; Ctrl-C stops and keeps it)
    Quantize {
        #[command(flatten)]
        model: ModelArgs,
        /// Any method of `eval`; ostquant learns its transforms first
        #[arg(long, default_value = "ostquant")]
        method: Method,
        #[arg(long, default_value = "W4A4KV4")]
        bits: Bits,
        /// Output folder (written atomically: nothing appears unless it succeeds)
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        calib: CalibArgs,
        /// GPTQ calibration windows and their length (Wikipedia calibration half, seed 42)
        #[arg(long, default_value_t = 16)]
        calib_windows: usize,
        #[arg(long, default_value_t = 512)]
        calib_len: usize,
        /// Quantize weights in groups of N input columns instead of per output channel
        #[arg(long)]
        w_group: Option<usize>,
        /// Asymmetric weights (a zero point per channel or group)
        #[arg(long)]
        w_asym: bool,
        /// Round the weights to nearest instead of GPTQ (learned methods; the others name
        /// their rounding: rtn or gptq, quarot or quarot-gptq)
        #[arg(long)]
        w_rtn: bool,
        /// GPTQ takes the input columns by decreasing Hessian diagonal (act-order) instead of
        /// in order (the paper's setting); with --w-group, every group's grid is fixed first
        #[arg(long)]
        act_order: bool,
    },
    /// Benchmark the int4 runtime on a wgpu device or the CPU: int4 and f16 GEMV bandwidth
    /// against the device's read bandwidth, and decode speed of synthetic SmolLM2 / LLaMA-2-7B /
    /// LLaMA-3-8B shaped models (int4 vs f16 weights) and of a model folder
    Bench {
        /// auto or gpu (a real GPU), software (Mesa's Vulkan on the CPU), or cpu (the CPU
        /// runtime's kernels)
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Calls per GEMV shape
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Also decode with this model folder (int4 or unquantized)
        #[arg(long)]
        model: Option<PathBuf>,
        /// Synthetic decode models: none, all, or a list of smollm2-135m, llama2-7b, llama3-8b
        #[arg(long, default_value = "smollm2-135m")]
        synthetic: String,
        /// Tokens timed per decode run (after 4 warm-up tokens)
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        /// Prompt lengths whose prefill is timed on the synthetic models ("none" for none)
        #[arg(long, default_value = "512,2048")]
        prefill: String,
        /// Also write the figures as JSON
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The results table: every method at every bit setting, written to a Markdown file and a
    /// JSON file; resumes from the cache, so rerunning it only measures what is missing
    Results {
        #[command(flatten)]
        model: ModelArgs,
        /// Methods, in table order
        #[arg(
            long,
            default_value = "fp,rtn,smoothquant,gptq,quarot,quarot-gptq,ostquant,spinquant"
        )]
        methods: String,
        /// Bit settings of every quantized method
        #[arg(long, default_value = "W4A16KV16,W4A4KV16,W4A4KV4")]
        bits: String,
        /// One more row, after the others: a learned method at one bit setting, with its own
        /// calibration flags if any: "METHOD BITS [--steps N --lr-scale X …]" (repeatable; the
        /// flags are quantize's)
        #[arg(long = "row", value_name = "SPEC")]
        rows: Vec<String>,
        /// Zero-shot tasks: all, none, or a list
        #[arg(long, default_value = "all")]
        tasks: String,
        #[command(flatten)]
        measure: MeasureArgs,
        /// Markdown table
        #[arg(long, default_value = "RESULTS.md")]
        md: PathBuf,
        /// JSON rows [default: results/<model folder, lower case>.json]
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only rows whose every cell is cached (measure nothing; skipped rows are named)
        #[arg(long)]
        cached_only: bool,
        /// Add a column: each row's zero-shot average minus this method's at the same bits,
        /// compared item by item, with its standard error
        #[arg(long)]
        versus: Option<Method>,
    },
    /// QSUR, eigen-spectra and channel maxima of every quantized input and weight, per layer,
    /// measured on the Wikipedia calibration half, before or after a method's transforms
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// none (the original model), smoothquant, quarot, or a learned method (ostquant,
        /// spinquant, …: its calibrated transforms, learned first if not cached, which takes
        /// tens of minutes on a CPU); nothing is quantized
        #[arg(long, default_value = "none")]
        method: String,
        /// The bit setting a learned method was calibrated for
        #[arg(long, default_value = "W4A4KV4")]
        bits: Bits,
        /// Calibration size of a learned method: cpu (sized for two CPU cores) or paper
        #[arg(long, default_value = "cpu")]
        preset: Preset,
        /// Calibration windows of 512 tokens. An activation gets a QSUR only from more tokens
        /// than its width (SmolLM2: 2 windows for the q/k/v, o and up/gate inputs, 4 for down)
        #[arg(long, default_value_t = 8)]
        windows: usize,
        /// Write every statistic (spectra and max |x| profiles included) as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print the cleaned Wikipedia text that calibration and perplexity use
    Wiki {
        /// `evaluation` or `calibration`
        #[arg(long, default_value = "evaluation")]
        half: String,
    },
    /// Perplexity on the Wikipedia evaluation half or a UTF-8 text file
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        /// `wiki` (the evaluation half of the fetched Wikipedia sample) or a text file
        #[arg(long, default_value = "wiki")]
        text: String,
        /// Context length of each window
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score only the first N windows
        #[arg(long)]
        windows: Option<usize>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder or .gguf file [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// auto (a real GPU if there is one, else the CPU), gpu, cpu, or software (Vulkan on the CPU, for testing)
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

/// How a (method, bits) is measured.
#[derive(Args)]
struct MeasureArgs {
    /// Perplexity context length
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first N perplexity windows (the same ones for every method)
    #[arg(long)]
    windows: Option<usize>,
    /// Items per zero-shot task, spread evenly over the task (the same for every method)
    #[arg(long)]
    limit: Option<usize>,
    /// Calibration windows of GPTQ and SmoothQuant (Wikipedia calibration half, seed 42)
    #[arg(long, default_value_t = 16)]
    calib_windows: usize,
    /// Tokens per calibration window
    #[arg(long, default_value_t = 512)]
    calib_len: usize,
    /// Quantize weights in groups of N input columns instead of per output channel
    #[arg(long)]
    w_group: Option<usize>,
    /// Asymmetric weights (a zero point per channel or group) instead of symmetric
    #[arg(long)]
    w_asym: bool,
    /// Round the weights to nearest instead of GPTQ (learned methods; the others name
    /// their rounding: rtn or gptq, quarot or quarot-gptq)
    #[arg(long)]
    w_rtn: bool,
    /// GPTQ takes the input columns by decreasing Hessian diagonal (act-order) instead of in
    /// order (the paper's setting); with --w-group, every group's grid is fixed first
    #[arg(long)]
    act_order: bool,
    /// Recompute even when a cached result exists
    #[arg(long)]
    fresh: bool,
    /// Keep measured results in DIR instead of ~/.cache/ostquant/results (the repository keeps
    /// the 250-item table's in results/cells)
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Calibration size of the learned methods (ostquant, spinquant): cpu or paper
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    #[command(flatten)]
    calib: OverrideArgs,
}

impl MeasureArgs {
    fn settings(&self, tasks: &str) -> Result<Settings> {
        let tasks = if tasks.eq_ignore_ascii_case("none") {
            Vec::new()
        } else {
            parse_task_list(tasks).map_err(anyhow::Error::msg)?
        };
        check_calib_size(self.calib_windows, self.calib_len)?;
        if self.limit == Some(0) {
            bail!("--limit must be at least 1 (leave it out for every item)");
        }
        Ok(Settings {
            ctx: self.ctx,
            windows: self.windows,
            tasks,
            limit: self.limit,
            calib_windows: self.calib_windows,
            calib_len: self.calib_len,
            w_group: self.w_group,
            w_asym: self.w_asym,
            w_rtn: self.w_rtn,
            act_order: self.act_order,
            fresh: self.fresh,
            cache_dir: self
                .cache
                .clone()
                .unwrap_or_else(ostquant_core::eval::default_cache_dir),
            preset: self.preset,
            calib: self.calib.overrides()?,
        })
    }
}

/// GPTQ and SmoothQuant need at least one calibration window of at least two tokens.
fn check_calib_size(windows: usize, len: usize) -> Result<()> {
    if windows == 0 || len < 2 {
        bail!("--calib-windows must be at least 1 and --calib-len at least 2");
    }
    Ok(())
}

/// Calibration of the learned methods; anything not given comes from the preset.
#[derive(Args)]
struct CalibArgs {
    /// cpu (sized for two CPU cores) or paper (SPEC §5: 100 steps × 16 windows × 2048
    /// tokens) [default: paper on a GPU, cpu otherwise]
    #[arg(long)]
    preset: Option<Preset>,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Start the calibration over instead of resuming its checkpoint
    #[arg(long)]
    fresh: bool,
}

impl CalibArgs {
    /// The method's settings at `bits` with these overrides; None for methods that learn nothing.
    fn settings(&self, method: Method, bits: Bits, gpu: bool) -> Result<Option<CalibSettings>> {
        let preset = self
            .preset
            .unwrap_or(if gpu { Preset::Paper } else { Preset::Cpu });
        let overrides = self.overrides.overrides()?;
        match method.learned_settings(bits, preset) {
            Some(s) => Ok(Some(overrides.apply(s))),
            None => {
                check_learns(method, &overrides)?;
                Ok(None)
            }
        }
    }
}

/// An error where calibration options are given to a method that learns nothing.
fn check_learns(method: Method, overrides: &Overrides) -> Result<()> {
    if !method.is_learned() && !overrides.is_empty() {
        bail!(
            "{method} learns nothing: calibration options apply to ostquant, spinquant and the ostquant ablations"
        );
    }
    Ok(())
}

/// A `results --row`: a method, its bits, and how it differs from the table's settings.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct RowArgs {
    method: Method,
    bits: Bits,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Round the weights to nearest instead of GPTQ
    #[arg(long)]
    w_rtn: bool,
    /// GPTQ in act-order
    #[arg(long)]
    act_order: bool,
    /// Weights of this row in groups of this many input columns
    #[arg(long)]
    w_group: Option<usize>,
    /// Asymmetric weights (a zero point) in this row
    #[arg(long)]
    w_asym: bool,
    /// GPTQ and SmoothQuant calibration windows of this row
    #[arg(long)]
    calib_windows: Option<usize>,
    /// Tokens per calibration window of this row
    #[arg(long)]
    calib_len: Option<usize>,
}

fn parse_row(spec: &str) -> Result<crate::results::Row> {
    let args = RowArgs::try_parse_from(spec.split_whitespace())
        .map_err(|e| anyhow::anyhow!("--row {spec:?}: {}", e.render().to_string().trim()))?;
    let calib = args.overrides.overrides()?;
    let windows_given = args.calib_windows.is_some() || args.calib_len.is_some();
    let method = args.method;
    if windows_given {
        if !method.needs_calibration() {
            bail!(
                "--row {spec:?}: {method} calibrates nothing, so it takes no --calib-windows or --calib-len"
            );
        }
        if args.w_rtn {
            bail!(
                "--row {spec:?}: --w-rtn rounds without GPTQ, so its calibration windows would change nothing"
            );
        }
        check_calib_size(args.calib_windows.unwrap_or(1), args.calib_len.unwrap_or(2))?;
    }
    // The row's rounding, checked now so that a bad row fails before the table measures
    // anything (the table's --w-group is checked again when the row runs).
    let row_weights = Settings {
        w_rtn: args.w_rtn,
        act_order: args.act_order,
        w_group: args.w_group,
        ..Settings::default()
    };
    row_weights
        .rounding(method)
        .map_err(|e| anyhow::anyhow!("--row {spec:?}: {e}"))?;
    let own_grid = args.w_group.is_some() || args.w_asym;
    if !method.is_learned()
        && (!calib.is_empty() || args.w_rtn || !(windows_given || args.act_order || own_grid))
    {
        bail!(
            "--row {spec:?}: {method} learns nothing; a row gives a learned method (ostquant, spinquant, an ostquant ablation) its own calibration, a GPTQ method its own --calib-windows, --calib-len or --act-order, or any method its own --w-group or --w-asym"
        );
    }
    if method == Method::Fp && own_grid {
        bail!("--row {spec:?}: fp quantizes no weights, so it takes no --w-group or --w-asym");
    }
    Ok(crate::results::Row {
        method,
        bits: args.bits,
        calib,
        w_rtn: args.w_rtn,
        act_order: args.act_order,
        w_group: args.w_group,
        w_asym: args.w_asym,
        calib_windows: args.calib_windows,
        calib_len: args.calib_len,
    })
}

/// Changes to a learned method's preset calibration.
#[derive(Args)]
struct OverrideArgs {
    /// Optimiser steps
    #[arg(long)]
    steps: Option<usize>,
    /// Learning rate of the rotations (Riemannian Adam / Cayley SGD)
    #[arg(long)]
    lr_rot: Option<f64>,
    /// Learning rate of the scales (Adam)
    #[arg(long)]
    lr_scale: Option<f64>,
    /// Distinct calibration windows
    #[arg(long)]
    samples: Option<usize>,
    /// Tokens per calibration window
    #[arg(long)]
    seq_len: Option<usize>,
    /// Windows per step
    #[arg(long)]
    batch: Option<usize>,
    /// kl-top (k = 1000), kl-top:K, kl, ce or mse
    #[arg(long)]
    loss: Option<String>,
    /// womi, hadamard or identity
    #[arg(long)]
    init: Option<Init>,
    /// Rotation optimiser: adam (Riemannian Adam) or sgd (Cayley SGD)
    #[arg(long)]
    optimizer: Option<RotationOptimizer>,
    /// Fake-quantize the weights (RTN, straight-through) during calibration: true or false
    /// (the paper's scripts: true at W4A16, false at W4A4, where GPTQ follows)
    #[arg(long, value_name = "BOOL")]
    train_weights: Option<bool>,
}

impl OverrideArgs {
    fn overrides(&self) -> Result<Overrides> {
        Ok(Overrides {
            steps: self.steps,
            lr_rot: self.lr_rot,
            lr_scale: self.lr_scale,
            samples: self.samples,
            seq_len: self.seq_len,
            batch: self.batch,
            loss: self
                .loss
                .as_deref()
                .map(Loss::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            init: self.init,
            optimizer: self.optimizer,
            train_weights: self.train_weights,
        })
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the smallest set of most likely tokens whose probability reaches this
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_p: f32,
    /// Random seed: the same seed and settings pick the same tokens from the same logits on
    /// every device (a 4-bit model's logits can differ between devices in the last bits,
    /// which can change a pick)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most new tokens per reply
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
}

impl SamplingArgs {
    fn params(&self) -> Result<SamplingParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            max_new_tokens: self.max_tokens,
        })
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return crate::gui::run(None, DeviceChoice::Auto);
    };
    match command {
        Command::Gui { model, device } => crate::gui::run(model, device),
        Command::Fetch => Ok(assets::fetch()?),
        Command::Import { gguf, out } => {
            let bar = progress_bar("importing tensors");
            import_gguf(&gguf, &out, &mut |d, t| progress(&bar, d, t))?;
            bar.finish_and_clear();
            println!("imported {} into {}", gguf.display(), out.display());
            Ok(())
        }
        Command::Info(args) => info(&args),
        Command::Generate {
            model,
            prompt,
            raw,
            sampling,
        } => generate(&model, &prompt, raw, &sampling),
        Command::Chat {
            model,
            system,
            sampling,
        } => chat(&model, system, &sampling),
        Command::Eval {
            model,
            method,
            bits,
            tasks,
            measure,
            json,
        } => eval(
            &model,
            method,
            bits,
            &measure.settings(&tasks)?,
            json.as_deref(),
        ),
        Command::Quantize {
            model,
            method,
            bits,
            out,
            calib,
            calib_windows,
            calib_len,
            w_group,
            w_asym,
            w_rtn,
            act_order,
        } => {
            check_calib_size(calib_windows, calib_len)?;
            let s = Settings {
                calib_windows,
                calib_len,
                w_group,
                w_asym,
                w_rtn,
                act_order,
                ..Settings::default()
            };
            quantize(&model, method, bits, &out, &calib, &s)
        }
        Command::Bench {
            device,
            iters,
            model,
            synthetic,
            tokens,
            prefill,
            json,
        } => bench(
            &ostquant_core::runtime::bench::Options {
                device,
                iters: iters.max(1),
                model,
                synthetic,
                tokens: tokens.max(1),
                prefill: prompt_lengths(&prefill)?,
            },
            json.as_deref(),
        ),
        Command::Results {
            model,
            methods,
            bits,
            rows,
            tasks,
            measure,
            md,
            json,
            cached_only,
            versus,
        } => crate::results::results(
            model.model.as_deref(),
            model.device,
            &measure.settings(&tasks)?,
            &crate::results::Table {
                methods: &methods,
                bits: &bits,
                rows: &rows
                    .iter()
                    .map(|r| parse_row(r))
                    .collect::<Result<Vec<_>>>()?,
                md: &md,
                json: json.as_deref(),
                cached_only,
                versus,
            },
        ),
        Command::Inspect {
            model,
            method,
            bits,
            preset,
            windows,
            json,
        } => inspect(&model, &method, bits, preset, windows, json.as_deref()),
        Command::Wiki { half } => {
            let split = wiki_split()?;
            match half.as_str() {
                "evaluation" => print!("{}", split.evaluation),
                "calibration" => print!("{}", split.calibration),
                other => bail!("--half must be evaluation or calibration, not '{other}'"),
            }
            Ok(())
        }
        Command::Ppl {
            model,
            text,
            ctx,
            windows,
        } => ppl(&model, &text, ctx, windows),
    }
}

fn progress_bar(msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

fn progress(bar: &ProgressBar, done: usize, total: usize) {
    bar.set_length(total as u64);
    bar.set_position(done as u64);
}

fn load(args: &ModelArgs) -> Result<(LoadedModel, ComputeDevice)> {
    let bar = progress_bar("importing tensors");
    let dir = assets::resolve_model(args.model.as_deref(), &mut |d, t| progress(&bar, d, t))?;
    bar.finish_and_clear();
    let dev = device::select(args.device)?;
    eprintln!("ostquant: {} on {dev}", dir.display());
    let model = LoadedModel::load(&dir, &dev.device)?;
    Ok((model, dev))
}

fn info(args: &ModelArgs) -> Result<()> {
    let (m, dev) = load(args)?;
    let c = &m.model.config;
    println!("model:      {}", m.dir.display());
    println!(
        "arch:       {} ({})",
        c.model_type,
        c.architectures.join(", ")
    );
    // A quantized folder stores the head apart from the embedding (the residual rotation
    // makes them differ), so it counts one more vocab × hidden matrix than its original.
    let untied = if !c.tie_word_embeddings && ostquant_core::model::qformat::is_quantized(&m.dir) {
        " (embedding and head stored apart)"
    } else {
        ""
    };
    println!("params:     {:.1} M{untied}", c.n_params() as f64 / 1e6);
    println!(
        "layers:     {}, hidden {}, ffn {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size
    );
    println!(
        "heads:      {} query, {} key/value, head dim {}",
        c.num_attention_heads,
        c.n_kv_heads(),
        c.head_dim()
    );
    println!(
        "vocab:      {} (tied embeddings: {})",
        c.vocab_size, c.tie_word_embeddings
    );
    println!(
        "rope:       theta {}, scaling {:?}",
        c.rope_theta,
        c.rope_scaling.as_ref().map(|r| &r.rope_type)
    );
    println!("context:    {}", c.max_position_embeddings);
    if qformat::is_quantized(&m.dir) {
        let h = qformat::read_header(&m.dir)?;
        let f = &h.forward;
        println!(
            "quantized:  {} {} (weights {}; online Hadamards: down {}, Q/K {})",
            h.method,
            h.bits,
            h.weight.map_or("unquantized".to_string(), |w| format!(
                "int{} {}{}",
                w.bits,
                if w.sym { "sym" } else { "asym" },
                w.group
                    .map_or(", per channel".to_string(), |g| format!(", groups of {g}"))
            )),
            f.down_hadamard,
            f.qk_hadamard
        );
    }
    println!("device:     {dev}");
    for a in device::adapters() {
        println!("adapter:    {a}");
    }
    Ok(())
}

/// Stop flag for the running generation; Ctrl-C sets it, a second Ctrl-C exits.
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    flag
}

fn generate(args: &ModelArgs, prompt: &str, raw: bool, sampling: &SamplingArgs) -> Result<()> {
    let params = sampling.params()?;
    if prompt.trim().is_empty() {
        bail!("--prompt is empty");
    }
    let (m, dev) = load(args)?;
    let tok = &m.tokenizer;
    let text = if raw || !tok.has_chat_template() {
        prompt.to_string()
    } else {
        tok.render_chat(&[ChatMessage::new("user", prompt)], true)?
    };
    let ids = tok.encode_with_bos(&text)?;
    let stop = stop_flag();
    let mut session = Session::with_decoder(decoder(&m, args.device, &dev)?);
    let mut out = Printer::new();
    let (_, stats) = session.generate(tok, &ids, params, &mut |piece| {
        out.print(piece) && !stop.load(Ordering::SeqCst)
    })?;
    if !out.print("\n") {
        // The reader went away (`| head`): what it wanted was printed.
        return Ok(());
    }
    eprintln!(
        "[{} prompt tokens at {:.1} tok/s, {} new tokens at {:.1} tok/s]",
        stats.prompt_tokens,
        stats.prefill_tokens_per_sec(),
        stats.new_tokens,
        stats.decode_tokens_per_sec()
    );
    Ok(())
}

/// The decoder `generate` and `chat` run, announced on stderr.
fn decoder<'m>(
    m: &'m LoadedModel,
    choice: DeviceChoice,
    dev: &ComputeDevice,
) -> Result<Box<dyn Decoder + 'm>> {
    let (d, what) = ostquant_core::generate::decoder(m, choice, dev);
    eprintln!("ostquant: {what}");
    Ok(d)
}

fn chat(args: &ModelArgs, system: Option<String>, sampling: &SamplingArgs) -> Result<()> {
    let params = sampling.params()?;
    let (m, dev) = load(args)?;
    let tok = &m.tokenizer;
    if !tok.has_chat_template() {
        bail!(
            "{}: the model has no chat template; use `generate --raw`",
            m.dir.display()
        );
    }
    let base: Vec<ChatMessage> = system
        .map(|s| vec![ChatMessage::new("system", s)])
        .unwrap_or_default();
    let mut history = base.clone();
    let mut session = Session::with_decoder(decoder(&m, args.device, &dev)?);
    let stop = stop_flag();
    eprintln!(
        "chat with {} — /reset clears, /quit or Ctrl-D leaves",
        m.dir.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history = base.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let ids = tok.encode_with_bos(&tok.render_chat(&history, true)?)?;
        stop.store(false, Ordering::SeqCst);
        let mut reply = String::new();
        let mut out = Printer::new();
        let (_, stats) = session.generate(tok, &ids, params, &mut |piece| {
            reply.push_str(piece);
            out.print(piece) && !stop.load(Ordering::SeqCst)
        })?;
        if !out.print("\n") {
            return Ok(());
        }
        eprintln!(
            "[{} new prompt tokens, {} reply tokens at {:.1} tok/s]",
            stats.prompt_tokens,
            stats.new_tokens,
            stats.decode_tokens_per_sec()
        );
        history.push(ChatMessage::new("assistant", reply));
    }
    eprintln!();
    Ok(())
}

/// Streamed text on stdout, flushed piece by piece; once a write fails (the reader closed the
/// pipe) it prints nothing more and says so, so the generation can stop.
struct Printer {
    out: std::io::StdoutLock<'static>,
    open: bool,
}

impl Printer {
    fn new() -> Self {
        Printer {
            out: std::io::stdout().lock(),
            open: true,
        }
    }

    /// Print `text`; false once stdout is gone.
    fn print(&mut self, text: &str) -> bool {
        self.open = self.open
            && write!(self.out, "{text}")
                .and_then(|_| self.out.flush())
                .is_ok();
        self.open
    }
}

/// Read a text file for perplexity: it must be non-empty UTF-8 text.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if bytes.contains(&0) {
        bail!(
            "{}: binary file (contains NUL bytes), expected UTF-8 text",
            path.display()
        );
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the file is empty", path.display());
    }
    Ok(text)
}

fn ppl(args: &ModelArgs, text: &str, ctx: usize, windows: Option<usize>) -> Result<()> {
    let (name, body) = if text == "wiki" {
        (wiki::WIKI_NAME.to_string(), wiki_split()?.evaluation)
    } else {
        (text.to_string(), read_text(Path::new(text))?)
    };
    let (m, dev) = load(args)?;
    let bar = progress_bar("perplexity");
    // An int4 folder on a wgpu device is scored through the runtime's kernels, and compared
    // with the burn forward of the same folder position by position.
    let (mut decoder, what) = ostquant_core::generate::decoder(&m, args.device, &dev);
    if what.starts_with("int4 runtime") {
        eprintln!("ostquant: scoring through the {what}");
        let wins = text_windows(&m.model, &m.tokenizer, &body, ctx, windows)?;
        let r = score_decoder(decoder.as_mut(), Some(&m.model), &wins, &mut |d, t| {
            progress(&bar, d, t)
        })?;
        bar.finish_and_clear();
        println!(
            "{name}: perplexity {:.3} (ctx {}, {} windows, {} tokens scored, {what}); the burn forward of the same folder (prefill): perplexity {:.3}, KL to it {:.5}, top-1 agreement {:.2}%",
            r.ppl,
            r.ctx,
            r.windows,
            r.tokens_scored,
            r.reference_ppl.unwrap_or(f64::NAN),
            r.kl.unwrap_or(f64::NAN),
            100.0 * r.top1.unwrap_or(f64::NAN)
        );
        return Ok(());
    }
    drop(decoder);
    let r = perplexity(&m.model, &m.tokenizer, &body, ctx, windows, &mut |d, t| {
        progress(&bar, d, t)
    })?;
    bar.finish_and_clear();
    println!(
        "{name}: perplexity {:.3} (ctx {}, {} windows, {} tokens scored, {dev})",
        r.ppl, r.ctx, r.windows, r.tokens_scored
    );
    Ok(())
}

/// The fetched Wikipedia sample, cleaned and split into calibration and evaluation halves.
fn wiki_split() -> Result<wiki::WikiSplit> {
    assets::ensure_fetched()?;
    Ok(wiki::split(&wiki::read_articles(&assets::wiki_dump())?))
}

/// A progress bar for a job made of stages; the callback names the stage. Without a terminal
/// (scripts, servers, logs) the bar is hidden: a line when a stage starts and ends, and at most
/// one every 30 s between.
pub fn stage_bar() -> (ProgressBar, impl FnMut(&str, usize, usize)) {
    let bar = progress_bar("");
    let b = bar.clone();
    // The stage last printed, when, and whether as finished.
    let mut last: Option<(String, std::time::Instant, bool)> = None;
    (bar, move |what: &str, d, t| {
        let done = t > 0 && d >= t;
        let print = match &last {
            None => true,
            Some((w, at, was_done)) => {
                w != what || (done && !was_done) || (!done && at.elapsed().as_secs() >= 30)
            }
        };
        if b.is_hidden() && print {
            eprintln!("ostquant: {what} {d}/{t}");
            last = Some((what.to_string(), std::time::Instant::now(), done));
        }
        b.set_message(what.to_string());
        progress(&b, d, t)
    })
}

fn quantize(
    args: &ModelArgs,
    method: Method,
    bits: Bits,
    out: &Path,
    calib: &CalibArgs,
    s: &Settings,
) -> Result<()> {
    Lab::check_export_bits(bits)?;
    s.rounding(method)?;
    // Before the calibration, not after it: a bad --out fails at once.
    ostquant_core::model::qformat::check_out(out)?;
    let t0 = std::time::Instant::now();
    let mut lab = open_lab(args.model.as_deref(), args.device)?;
    let gpu = lab.device().description.starts_with("wgpu");
    let learned_settings = calib.settings(method, bits, gpu)?;
    let cancel = stop_flag();
    let learned = match &learned_settings {
        Some(ls) => {
            eprintln!(
                "ostquant: calibrating {method} at {bits}: {} steps × {} windows × {} tokens, loss {}, init {:?}",
                ls.steps,
                ls.batch,
                ls.seq_len,
                ls.loss.name(),
                ls.init
            );
            let bar = ProgressBar::new(ls.steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "calibrating [{bar:30}] step {pos}/{len} {msg} {elapsed_precise} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            let learned = lab.learn(
                method,
                ls,
                calib.fresh,
                &mut |e| match e {
                    Event::Started { start, .. } => bar.set_position(*start as u64),
                    Event::Step {
                        step,
                        loss,
                        lr_rot,
                        lr_scale,
                        seconds,
                        ..
                    } => {
                        bar.set_position(*step as u64);
                        let line = format!(
                            "loss {loss:.4} lr {lr_rot:.2e}/{lr_scale:.2e} {seconds:.1} s/step"
                        );
                        // Without a terminal (scripts, servers, logs) the bar is hidden: a line
                        // per step instead.
                        if bar.is_hidden() {
                            eprintln!("ostquant: step {step}/{} {line}", ls.steps);
                        }
                        bar.set_message(line);
                    }
                },
                &cancel,
            );
            bar.finish_and_clear();
            match learned {
                Err(ostquant_core::Error::Cancelled) => bail!(
                    "cancelled; the calibration checkpoint is kept, run the same command to resume"
                ),
                other => Some(other?),
            }
        }
        None => None,
    };
    if let Some(l) = &learned
        && let (Some(first), Some(last)) = (l.losses.first(), l.losses.last())
    {
        eprintln!(
            "ostquant: calibration loss {first:.4} → {last:.4} over {} steps",
            l.losses.len()
        );
    }
    let (bar, mut prog) = stage_bar();
    let bytes = match lab.export(method, bits, s, learned.as_ref(), out, &mut prog, &cancel) {
        Err(ostquant_core::Error::Cancelled) => bail!("cancelled; nothing was written"),
        other => other?,
    };
    bar.finish_and_clear();
    println!(
        "wrote {} ({method} {bits}, {:.1} MB) in {:.0} s",
        out.display(),
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--prefill`: "none" or comma-separated prompt lengths.
fn prompt_lengths(s: &str) -> Result<Vec<usize>> {
    if s == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow::anyhow!("--prefill: '{v}' is not a prompt length"))
        })
        .collect()
}

fn bench(o: &ostquant_core::runtime::bench::Options, json: Option<&Path>) -> Result<()> {
    let report = ostquant_core::runtime::bench::run(o, &mut std::io::stdout())?;
    if let Some(path) = json {
        crate::results::write_atomic(path, &serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Open the lab on the model of `args`.
pub fn open_lab(model: Option<&Path>, choice: DeviceChoice) -> Result<Lab> {
    let bar = progress_bar("importing tensors");
    let dir = assets::resolve_model(model, &mut |d, t| progress(&bar, d, t))?;
    bar.finish_and_clear();
    let dev = device::select(choice)?;
    eprintln!("ostquant: {} on {dev}", dir.display());
    Ok(Lab::open(&dir, dev)?)
}

fn eval(
    args: &ModelArgs,
    method: Method,
    bits: Bits,
    settings: &Settings,
    json: Option<&Path>,
) -> Result<()> {
    check_learns(method, &settings.calib)?;
    let mut lab = open_lab(args.model.as_deref(), args.device)?;
    let (bar, mut prog) = stage_bar();
    let row = lab.evaluate(method, bits, settings, &mut prog, &AtomicBool::new(false))?;
    bar.finish_and_clear();
    if row.from_cache {
        eprintln!("ostquant: cached result (--fresh measures again)");
    }
    let w = &row.wiki;
    println!(
        "{method} {}: {} perplexity {:.3}, KL to FP {}, top-1 agreement {} ({} tokens, ctx {}, {:.0} s)",
        row.bits,
        wiki::WIKI_NAME,
        w.ppl,
        w.kl.map_or("-".into(), |k| format!("{k:.4}")),
        w.top1.map_or("-".into(), |t| format!("{:.2}%", 100.0 * t)),
        w.tokens_scored,
        w.ctx,
        w.seconds
    );
    for t in &row.zeroshot {
        println!(
            "  {:<15} acc {:>6.2}  acc_norm {:>6}{}{}  ({} items, {:.0} s)",
            t.task.name(),
            100.0 * t.acc,
            t.acc_norm
                .map_or("-".into(), |a| format!("{:.2}", 100.0 * a)),
            t.ppl.map_or(String::new(), |p| format!("  ppl {p:.2}")),
            shares(t),
            t.items,
            t.seconds
        );
    }
    if let (Some(avg), Some(se)) = (row.zeroshot_avg(), row.zeroshot_se()) {
        println!(
            "  {:<15} {avg:.2} ± {se:.2} (acc_norm where a task has it, else acc; ± standard error)",
            "average"
        );
    }
    if let Some(path) = json {
        crate::results::write_atomic(
            path,
            &serde_json::to_string_pretty(&row.to_json(settings.limit))?,
        )?;
    }
    Ok(())
}

/// "  picks 63/37 of gold 38/62": how often each choice (by position) was picked beside how
/// often it is right, in percent; empty for tasks with no choices (LAMBADA) or old cached cells.
fn shares(t: &ostquant_core::eval::zeroshot::TaskScores) -> String {
    if t.picks.is_empty() {
        return String::new();
    }
    let percents = |xs: &[f64]| {
        xs.iter()
            .map(|x| format!("{:.0}", 100.0 * x))
            .collect::<Vec<_>>()
            .join("/")
    };
    format!(
        "  picks {} of gold {}",
        percents(&t.picks),
        percents(&t.golds)
    )
}

fn inspect(
    args: &ModelArgs,
    method: &str,
    bits: Bits,
    preset: Preset,
    windows: usize,
    json: Option<&Path>,
) -> Result<()> {
    let m: Method = if method == "none" {
        Method::Fp
    } else {
        method.parse().map_err(anyhow::Error::msg)?
    };
    if windows == 0 {
        bail!("--windows must be at least 1");
    }
    let bar = progress_bar("importing tensors");
    let dir = assets::resolve_model(args.model.as_deref(), &mut |d, t| progress(&bar, d, t))?;
    bar.finish_and_clear();
    let dev = device::select(args.device)?;
    eprintln!("ostquant: inspecting {} ({method}) on {dev}", dir.display());
    let lab = Lab::open(&dir, dev)?;
    let learned = match m.learned_settings(bits, preset) {
        Some(ls) => {
            let bar = progress_bar("calibrating");
            let l = lab.learn(
                m,
                &ls,
                false,
                &mut |e| {
                    if let Event::Step { step, steps, .. } = e {
                        progress(&bar, *step, *steps)
                    }
                },
                &stop_flag(),
            )?;
            bar.finish_and_clear();
            Some(l)
        }
        None => None,
    };
    let bar = progress_bar("inspecting");
    // Ctrl-C ends the process: nothing is written before the end.
    let never = AtomicBool::new(false);
    let ins = lab.inspect(
        m,
        learned.as_ref(),
        windows,
        &mut |d, t| progress(&bar, d, t),
        &never,
    )?;
    bar.finish_and_clear();
    let names = ostquant_core::analysis::inspect::TENSOR_NAMES;
    println!(
        "QSUR per dimension (1 = ideal; '-' where there are no more samples than dimensions: an activation over too few calibration tokens for its width, more --windows help; a weight with no more rows than columns) of {} after '{method}', {} calibration tokens",
        dir.display(),
        ins.tokens
    );
    print!("layer");
    for n in names {
        print!(" {n:>9}");
    }
    println!();
    for layer in 0..lab.weights().layers.len() {
        print!("{layer:>5}");
        for n in names {
            match ins.get(layer, n).and_then(|s| s.qsur) {
                Some(q) => print!(" {:>9.4}", q.rel),
                None => print!(" {:>9}", "-"),
            }
        }
        println!();
    }
    let means = ins.mean_by_name();
    print!(" mean");
    for n in names {
        match means.get(n) {
            Some(m) => print!(" {m:>9.4}"),
            None => print!(" {:>9}", "-"),
        }
    }
    println!();
    if let Some(path) = json {
        crate::results::write_atomic(path, &serde_json::to_string(&ins)?)?;
        eprintln!("ostquant: wrote {}", path.display());
    }
    Ok(())
}
