//! A compiled WGSL compute kernel and the one way the runtime dispatches it: a uniform block
//! of parameters at binding 0, then storage buffers at bindings 1, 2, … in order.

use burn::tensor::wgpu::wgpu;

use super::Gpu;

pub struct Kernel {
    name: &'static str,
    pipeline: wgpu::ComputePipeline,
}

impl Kernel {
    /// Compile `source` (entry point `main`).
    pub fn new(gpu: &Gpu, name: &'static str, source: &str) -> Self {
        Self::entry(gpu, name, source, "main")
    }

    /// Compile the entry point `entry` of `source`.
    pub fn entry(gpu: &Gpu, name: &'static str, source: &str, entry: &str) -> Self {
        let module = gpu
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        Kernel { name, pipeline }
    }

    /// Record one dispatch of `groups` workgroups with `params` (a `#[repr(C)]` Pod struct,
    /// padded to 16 bytes) and `buffers` bound in order from binding 1.
    pub fn record<P: bytemuck::Pod>(
        &self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) {
        use wgpu::util::DeviceExt;
        let uniform = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(self.name),
                contents: bytemuck::bytes_of(params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(&uniform)
            .chain(buffers.iter().copied())
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }
}
