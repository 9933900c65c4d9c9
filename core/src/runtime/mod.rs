//! The wgpu inference engine for int4 model folders: hand-written WGSL kernels (shaders/)
//! driven directly through wgpu, on the same wgpu version burn uses.
//!

pub mod attention;
pub mod bench;
pub mod cpu;
pub mod hadamard;
pub mod host;
pub mod kernel;
pub mod linear;
pub mod model;
pub mod ops;

use burn::tensor::wgpu::wgpu;

use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// An int4 model folder loaded for decoding: on a wgpu device (WGSL kernels) or on the CPU.
pub enum Runtime {
    Gpu(Box<model::GpuModel>),
    Cpu(Box<cpu::CpuModel>),
}

impl Runtime {
    /// Load `dir` for `choice`: `cpu` runs on the CPU, `gpu` and `software` on that wgpu
    /// device, and `auto` on a real GPU when there is one, else on the CPU.
    pub fn load(dir: &std::path::Path, choice: DeviceChoice, max_seq: usize) -> Result<Self> {
        let host = host::HostModel::load(dir)?;
        let gpu = match choice {
            DeviceChoice::Cpu => None,
            DeviceChoice::Auto => Gpu::open(DeviceChoice::Gpu).ok(),
            DeviceChoice::Gpu | DeviceChoice::Software => Some(Gpu::open(choice)?),
        };
        let what = |e: Error| Error::other(format!("{}: {e}", dir.display()));
        Ok(match gpu {
            Some(gpu) => Runtime::Gpu(Box::new(
                model::GpuModel::upload(&host, gpu, max_seq).map_err(what)?,
            )),
            None => Runtime::Cpu(Box::new(cpu::CpuModel::new(host, max_seq).map_err(what)?)),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        match self {
            Runtime::Gpu(m) => &m.config,
            Runtime::Cpu(m) => &m.model.config,
        }
    }

    /// What the model runs on, for logs and the GUI.
    pub fn device_name(&self) -> String {
        match self {
            Runtime::Gpu(m) => format!("{} (WGSL kernels)", m.device_name()),
            Runtime::Cpu(m) => m.device_name(),
        }
    }

    /// Run one token at the next position and return its logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        match self {
            Runtime::Gpu(m) => m.step(token),
            Runtime::Cpu(m) => m.step(token),
        }
    }

    /// Run `tokens` at the next positions and return the logits of the last one: many
    /// positions per launch on a GPU with int4 linears (prefill GEMMs), one by one otherwise.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self {
            Runtime::Gpu(m) => m.prefill(tokens),
            Runtime::Cpu(m) => m.forward(tokens),
        }
    }

    /// Run `ids` and pick the next token with `sampler`: on the GPU the logits never leave the
    /// device (shaders/sample.wgsl, with the sampler's own uniform number); on the CPU the
    /// host sampler picks.
    pub fn sample_next(
        &mut self,
        ids: &[u32],
        sampler: &mut crate::generate::Sampler,
    ) -> Result<u32> {
        match self {
            Runtime::Gpu(m) => m.next_token(ids, gpu_pick(sampler)),
            Runtime::Cpu(_) => {
                let logits = self.prefill(ids)?;
                Ok(sampler.sample(&logits))
            }
        }
    }

    /// Decode from `first` (the token after the positions held), handing each token `sampler`
    /// picks to `on_token` until it returns `false` or the cache is full; afterwards the cache
    /// holds `first` and every token handed over but the last. On a GPU the next token's work
    /// is submitted before the host reads the current one ([`GpuModel::stream`]); on the CPU,
    /// step by step.
    pub fn stream(
        &mut self,
        first: u32,
        sampler: &mut crate::generate::Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        // Where the embedding table does not fit the device, step by step (the host looks
        // the rows up), as on the CPU.
        let streams = match self {
            Runtime::Gpu(m) => m.prepare_streaming().is_ok(),
            Runtime::Cpu(_) => false,
        };
        match self {
            Runtime::Gpu(m) if streams => m.stream(first, &mut || gpu_pick(sampler), on_token),
            _ => crate::generate::stream_step_by_step(self, first, sampler, on_token),
        }
    }

    /// Forget every position.
    pub fn reset(&mut self) {
        match self {
            Runtime::Gpu(m) => m.len = 0,
            Runtime::Cpu(m) => m.reset(),
        }
    }

    /// Positions the cache holds.
    pub fn max_seq(&self) -> usize {
        match self {
            Runtime::Gpu(m) => m.max_seq(),
            Runtime::Cpu(m) => m.max_seq(),
        }
    }

    /// Bytes of weights one decode step reads: every linear and the head.
    pub fn weight_bytes_per_token(&self) -> usize {
        match self {
            Runtime::Gpu(m) => m.weight_bytes_per_token(),
            Runtime::Cpu(m) => m.model.weight_bytes_per_token(),
        }
    }

    /// Memory the model holds on its device: GPU buffers (weights, caches, scratch), or on
    /// the CPU the weights, head and embedding.
    pub fn device_bytes(&self) -> usize {
        match self {
            Runtime::Gpu(m) => m.gpu_bytes(),
            Runtime::Cpu(m) => m.model.weight_bytes_per_token() + m.model.embed.len() * 4,
        }
    }
}

/// [`Gpu::checked`] for a device whose `Gpu` `f` consumes.
fn checked<T>(device: &wgpu::Device, name: &str, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = f();
    let invalid = pollster::block_on(invalid.pop());
    let oom = pollster::block_on(oom.pop());
    // The underlying cause, not the error's one-word Display.
    let detail = |e: wgpu::Error| match e {
        wgpu::Error::Validation { source, .. }
        | wgpu::Error::Internal { source, .. }
        | wgpu::Error::OutOfMemory { source } => {
            let mut s = source.to_string();
            let mut cause = source.source();
            while let Some(c) = cause {
                s = format!("{s}: {c}");
                cause = c.source();
            }
            s
        }
    };
    match (oom, invalid) {
        (Some(e), _) => Err(Error::other(format!(
            "{what}: out of GPU memory on {name} ({})",
            detail(e)
        ))),
        (None, Some(e)) => {
            // Most refusals are sizes over a limit; name the largest binding then.
            let detail = detail(e);
            let limit = if detail.contains("limit") || detail.contains("exceed") {
                format!(
                    " (more than the adapter allows; its largest binding is {:.2} GB)",
                    device.limits().max_storage_buffer_binding_size as f64 / 1e9
                )
            } else {
                String::new()
            };
            Err(Error::other(format!(
                "{what}: {name} refused it{limit}: {detail}"
            )))
        }
        (None, None) => Ok(value),
    }
}

/// A wgpu device and queue for the runtime's kernels.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// Lanes per subgroup the kernels may count on: the adapter's smallest subgroup size (up
    /// to 32) where the device has subgroup operations, else 1.
    pub subgroup_lanes: u32,
    /// Bytes of the storage buffers created through [`Gpu::storage`] and [`Gpu::output`].
    allocated: std::sync::atomic::AtomicUsize,
}

impl Gpu {
    /// Open a hardware adapter (`Gpu`, or `Auto` when one exists) or the software Vulkan
    /// device (`Software`); `Cpu` has no wgpu device. Where the app shares one device between
    /// burn, the window and the runtime ([`crate::device::share_wgpu`]), this is that device.
    pub fn open(choice: DeviceChoice) -> Result<Self> {
        if let Some(s) = crate::device::shared_wgpu(choice) {
            return Ok(Gpu::new(
                s.setup.device.clone(),
                s.setup.queue.clone(),
                s.info.clone(),
            ));
        }
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let software =
            |a: &wgpu::Adapter| matches!(a.get_info().device_type, wgpu::DeviceType::Cpu);
        let adapter = match choice {
            DeviceChoice::Software => adapters.into_iter().find(software),
            DeviceChoice::Gpu | DeviceChoice::Auto => adapters.into_iter().find(|a| !software(a)),
            DeviceChoice::Cpu => None,
        }
        .ok_or_else(|| Error::other(format!("no wgpu adapter for --device {choice:?}")))?;
        let info = adapter.get_info();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ostquant runtime"),
            required_features: adapter.features() & wgpu::Features::SUBGROUP,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| Error::other(format!("{}: cannot open the device: {e}", info.name)))?;
        Ok(Gpu::new(device, queue, info))
    }

    fn new(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let subgroup_lanes = if device.features().contains(wgpu::Features::SUBGROUP) {
            Some(info.subgroup_min_size.min(32))
                .filter(|n| n.is_power_of_two())
                .unwrap_or(1)
        } else {
            1
        };
        Gpu {
            device,
            queue,
            info,
            subgroup_lanes,
            allocated: Default::default(),
        }
    }

    /// Run `f` (allocations, pipelines, bind groups) and turn any error the device raises
    /// meanwhile — out of memory, a buffer over the adapter's limits — into an `Err` naming
    /// `what`, instead of wgpu's default of a panic.
    pub fn checked<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        checked(&self.device, &self.info.name, what, f)
    }

    /// An empty f32 storage buffer of `n` values that kernels write and the host can read.
    pub fn output(&self, label: &str, n: usize) -> wgpu::Buffer {
        self.count(n.max(1) * 4);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (n.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Submit `enc` and read `n` f32 values of `buf` back.
    pub fn finish_f32(
        &self,
        enc: wgpu::CommandEncoder,
        buf: &wgpu::Buffer,
        n: usize,
    ) -> Result<Vec<f32>> {
        self.queue.submit([enc.finish()]);
        self.read_f32(buf, n)
    }

    /// A read-only storage buffer holding `data`.
    pub fn storage<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        // wgpu rejects empty bindings: keep at least one element.
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let zero = [0u8; 4];
        self.count(bytes.len().max(4));
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: if bytes.is_empty() { &zero } else { bytes },
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            })
    }

    fn count(&self, bytes: usize) {
        self.allocated
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of GPU memory this context has allocated for weights, caches and scratch.
    pub fn allocated_bytes(&self) -> usize {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Copy `n` f32 values of `buf` back to the host (waits for the queue).
    pub fn read_f32(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let size = (n * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::other(format!("{}: {e}", self.info.name)))?;
        rx.recv()
            .map_err(|e| Error::other(e.to_string()))?
            .map_err(|e| Error::other(format!("{}: reading a buffer back: {e}", self.info.name)))?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::other(format!("{}: mapping a buffer: {e}", self.info.name)))?;
        let out = bytemuck::cast_slice(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// The GPU sampler's rule for `sampler`'s next draw (greedy, or top-p with its uniform number).
fn gpu_pick(sampler: &mut crate::generate::Sampler) -> ops::Pick {
    let params = sampler.params();
    match sampler.draw() {
        None => ops::Pick::Greedy,
        Some(u) => ops::Pick::TopP {
            temperature: params.temperature,
            top_p: params.top_p,
            u,
        },
    }
}
