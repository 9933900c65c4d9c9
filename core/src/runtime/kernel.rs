//! A compiled WGSL compute kernel and the one way the runtime dispatches it: a uniform block
//! of parameters at binding 0, then storage buffers at bindings 1, 2, … in order.
//!
//! A [`Dispatch`] binds a kernel to its buffers and parameters once; the decode loop builds all
//! of a token's dispatches at load time and replays them every step in one compute pass, so a
//! token costs a handful of small parameter writes on the host instead of hundreds of bind
//! groups and uniform buffers.

use burn::tensor::wgpu::wgpu;

use super::Gpu;

/// A storage buffer bound to a kernel: all of it, or a range (offsets a multiple of the
/// device's `min_storage_buffer_offset_alignment`), e.g. q, k and v in one buffer.
#[derive(Clone, Copy)]
pub struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    /// Bytes; None: to the end of the buffer.
    pub size: Option<std::num::NonZeroU64>,
}

impl<'a> From<&'a wgpu::Buffer> for Bind<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Bind {
            buffer,
            offset: 0,
            size: None,
        }
    }
}

impl<'a> Bind<'a> {
    /// `len` (> 0) f32 values of `buffer` from value `start` on.
    pub fn f32_range(buffer: &'a wgpu::Buffer, start: usize, len: usize) -> Self {
        // A zero size would mean "to the end of the buffer" to wgpu.
        let size =
            std::num::NonZeroU64::new(len as u64 * 4).expect("a range of at least one value");
        Bind {
            buffer,
            offset: start as u64 * 4,
            size: Some(size),
        }
    }
}

/// `OSTQUANT_TRUSTED_SHADERS=1`: compile the kernels without the checks naga adds to the
/// code it generates (a bound on every loop, guards on integer division, index clamps), to
/// measure what they cost (tests/device/run.sh times the benchmark both ways). Off by default.
pub fn trusted_shaders() -> bool {
    std::env::var_os("OSTQUANT_TRUSTED_SHADERS").is_some_and(|v| v == "1")
}

#[derive(Clone)]
pub struct Kernel {
    name: &'static str,
    pipeline: wgpu::ComputePipeline,
}

/// One kernel launch, bound and ready to record (any number of times).
pub struct Dispatch {
    /// The kernel's name (for timings split by kernel).
    pub name: &'static str,
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    params: wgpu::Buffer,
    groups: (u32, u32, u32),
}

impl Kernel {
    /// Compile `source` (entry point `main`).
    pub fn new(gpu: &Gpu, name: &'static str, source: &str) -> Self {
        Self::entry(gpu, name, source, "main")
    }

    /// Compile the entry point `entry` of `source`.
    pub fn entry(gpu: &Gpu, name: &'static str, source: &str, entry: &str) -> Self {
        Self::specialized(gpu, name, source, entry, &[])
    }

    /// Compile the entry point `entry` of `source` with its `override` constants set.
    pub fn specialized(
        gpu: &Gpu,
        name: &'static str,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Self {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if trusted_shaders() {
            let checks = wgpu::ShaderRuntimeChecks {
                bounds_checks: false,
                force_loop_bounding: false,
                int_div_checks: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            };
            // SAFETY: every loop in shaders/ ends (bounded by its parameters or constants),
            // every divisor is a nonzero constant or a parameter the host checks, and every
            // index stays inside its buffer on the shapes the host admits (the kernel tests
            // check the results against f64 on odd and real shapes). Where the device has
            // robust buffer access, wgpu keeps it on regardless.
            unsafe { gpu.device.create_shader_module_trusted(desc, checks) }
        } else {
            gpu.device.create_shader_module(desc)
        };
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    // Every kernel writes its shared memory before reading it: zeroing it at
                    // the start of each workgroup would only add stores and a barrier.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        Kernel { name, pipeline }
    }

    /// Bind `params` (a `#[repr(C)]` Pod struct, padded to 16 bytes) and `buffers` (bindings 1,
    /// 2, …) for a launch of `groups` workgroups.
    pub fn dispatch<'b, P: bytemuck::Pod, B: Into<Bind<'b>> + Copy>(
        &self,
        gpu: &Gpu,
        params: &P,
        buffers: &[B],
        groups: (u32, u32, u32),
    ) -> Dispatch {
        use wgpu::util::DeviceExt;
        let uniform = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(self.name),
                contents: bytemuck::bytes_of(params),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
        let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(Bind::from(&uniform))
            .chain(buffers.iter().map(|&b| b.into()))
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: b.size,
                }),
            })
            .collect();
        let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Dispatch {
            name: self.name,
            pipeline: self.pipeline.clone(),
            bind,
            params: uniform,
            groups,
        }
    }
}

impl Dispatch {
    /// Replace the parameters (same type as at creation) for the launches recorded from now on.
    pub fn set_params<P: bytemuck::Pod>(&self, gpu: &Gpu, params: &P) {
        gpu.queue
            .write_buffer(&self.params, 0, bytemuck::bytes_of(params));
    }

    /// Add this launch to an open compute pass (wgpu orders the pass's launches by their
    /// buffer reads and writes).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        let (x, y, z) = self.groups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// Record this launch in a compute pass of its own.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder) {
        let mut pass = enc.begin_compute_pass(&Default::default());
        self.encode(&mut pass);
    }
}

/// Record `dispatches` in order in one compute pass.
pub fn record_all<'a>(
    enc: &mut wgpu::CommandEncoder,
    dispatches: impl IntoIterator<Item = &'a Dispatch>,
) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    for d in dispatches {
        d.encode(&mut pass);
    }
}
