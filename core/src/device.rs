//! Which burn device runs the compute: `--device auto|gpu|cpu|software`.
//!
//! `auto` takes a real GPU adapter when wgpu finds one and burn's CPU backend (flex) otherwise:
//! a software Vulkan adapter (lavapipe/llvmpipe) is several times slower than flex for big
//! matmuls, so it is used only when asked for (`software`), to test GPU code without a GPU.

use std::fmt;
use std::str::FromStr;

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Gpu,
    Cpu,
    Software,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            "software" | "lavapipe" => Ok(Self::Software),
            _ => Err(format!(
                "unknown device '{s}' (expected auto, gpu, cpu or software)"
            )),
        }
    }
}

/// A selected device and a line that says what it is, for logs and the GUI.
#[derive(Clone)]
pub struct ComputeDevice {
    pub device: Device,
    pub description: String,
}

impl ComputeDevice {
    /// burn's CPU backend (not a wgpu device, which may still be a CPU rasterizer).
    pub fn is_cpu(&self) -> bool {
        self.device == Device::flex()
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// A wgpu adapter of this machine and its own memory, where the backend reports it.
pub struct Adapter {
    pub info: wgpu::AdapterInfo,
    /// Bytes of device-local memory (Vulkan heaps; None on backends that do not say).
    pub memory: Option<u64>,
}

impl Adapter {
    /// A real GPU (discrete, integrated or virtual), not a CPU rasterizer.
    pub fn is_gpu(&self) -> bool {
        use wgpu::DeviceType as T;
        matches!(
            self.info.device_type,
            T::DiscreteGpu | T::IntegratedGpu | T::VirtualGpu
        )
    }

    /// Reached through OpenGL: the window's fallback renderer, not a compute device.
    pub fn is_opengl(&self) -> bool {
        self.info.backend == wgpu::Backend::Gl
    }
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        write!(f, "{} ({:?}, {:?}", i.name, i.backend, i.device_type)?;
        match self.memory {
            Some(b) => write!(f, ", {:.1} GiB)", b as f64 / (1u64 << 30) as f64),
            None => f.write_str(")"),
        }
    }
}

/// The wgpu adapters of this machine.
pub fn adapters() -> Vec<Adapter> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| Adapter {
            info: a.get_info(),
            memory: adapter_memory(&a),
        })
        .collect()
}

/// Device-local memory of `adapter`: the sum of its Vulkan heaps flagged DEVICE_LOCAL (for a
/// CPU or integrated adapter that is system memory it may use). wgpu has no portable query.
#[cfg(not(any(target_vendor = "apple", target_arch = "wasm32")))]
pub fn adapter_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    use ash::vk;
    // SAFETY: the hal adapter is only read (a memory-properties query), never destroyed.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe {
        hal.shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device())
    };
    let heaps = &props.memory_heaps[..props.memory_heap_count as usize];
    Some(
        heaps
            .iter()
            .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .sum(),
    )
}

#[cfg(any(target_vendor = "apple", target_arch = "wasm32"))]
pub fn adapter_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

/// The one wgpu device that burn, the int4 runtime and the window share: opened by burn (its
/// compiler needs the device features it asks for), then handed to the others.
pub struct SharedWgpu {
    pub setup: burn::tensor::wgpu::WgpuSetup,
    /// burn's device on those handles.
    pub device: Device,
    pub info: wgpu::AdapterInfo,
    pub memory: Option<u64>,
}

impl SharedWgpu {
    fn serves(&self, choice: DeviceChoice) -> bool {
        match choice {
            DeviceChoice::Cpu => false,
            DeviceChoice::Software => !is_hardware(&self.info),
            DeviceChoice::Gpu | DeviceChoice::Auto => is_hardware(&self.info),
        }
    }

    /// Bytes this process holds on the device (buffers of burn, the runtime and the window,
    /// as wgpu's allocator reserved them), where the backend reports it.
    pub fn reserved_bytes(&self) -> Option<u64> {
        self.setup
            .device
            .generate_allocator_report()
            .map(|r| r.total_reserved_bytes)
    }
}

static SHARED: std::sync::OnceLock<SharedWgpu> = std::sync::OnceLock::new();

/// Open the wgpu device that `choice` computes on, through burn, and keep its handles so that
/// [`select`], the int4 runtime and the window all use it. `Ok(None)` where `choice` computes
/// on the CPU (`cpu`, or `auto` on a machine without a GPU). Call it once, before anything
/// else opens a device; later calls return the first one's device.
pub fn share_wgpu(choice: DeviceChoice) -> Result<Option<&'static SharedWgpu>> {
    if let Some(s) = SHARED.get() {
        return Ok(s.serves(choice).then_some(s));
    }
    let kind = match choice {
        DeviceChoice::Cpu => return Ok(None),
        // The software device is shared only where it is all there is: with a GPU present the
        // window should draw there, not on the CPU cores the compute uses.
        DeviceChoice::Software if adapters().iter().any(|a| is_hardware(&a.info)) => {
            return Ok(None);
        }
        DeviceChoice::Software => DeviceKind::Cpu,
        DeviceChoice::Gpu | DeviceChoice::Auto => {
            if !adapters().iter().any(|a| is_hardware(&a.info)) {
                return match choice {
                    DeviceChoice::Auto => Ok(None),
                    _ => select(choice).map(|_| None), // its error names what wgpu sees
                };
            }
            DeviceKind::DefaultDevice
        }
    };
    let (device, setup) = Device::wgpu_options()
        .device_kind(kind)
        .init_with_setup()
        .map_err(|e| {
            Error::other(format!(
                "cannot open the wgpu device for --device {choice:?}: {e}"
            ))
        })?;
    let info = setup.adapter.get_info();
    let memory = adapter_memory(&setup.adapter);
    let shared = SHARED.get_or_init(|| SharedWgpu {
        setup,
        device,
        info,
        memory,
    });
    Ok(shared.serves(choice).then_some(shared))
}

/// The shared device, where [`share_wgpu`] opened one and it is the one `choice` computes on.
pub fn shared_wgpu(choice: DeviceChoice) -> Option<&'static SharedWgpu> {
    SHARED.get().filter(|s| s.serves(choice))
}

fn is_hardware(info: &wgpu::AdapterInfo) -> bool {
    !matches!(info.device_type, wgpu::DeviceType::Cpu)
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!(
        "wgpu: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    )
}

/// The processor's model name where the OS says it (Linux), so that CPU figures name their
/// machine: floating-point sums, and so calibrations, differ in their last bits between CPUs.
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .filter(|m| !m.is_empty())
}

pub fn select(choice: DeviceChoice) -> Result<ComputeDevice> {
    let flex = || ComputeDevice {
        device: Device::flex(),
        // burn's CPU ops and matmuls run on rayon's global pool (RAYON_NUM_THREADS sizes it).
        description: format!(
            "cpu: burn flex backend, {} thread{}{}",
            rayon::current_num_threads(),
            if rayon::current_num_threads() == 1 {
                ""
            } else {
                "s"
            },
            cpu_model().map_or(String::new(), |m| format!(" on {m}")),
        ),
    };
    if let Some(s) = shared_wgpu(choice) {
        return Ok(ComputeDevice {
            device: s.device.clone(),
            description: format!("{}, shared with the window", describe(&s.info)),
        });
    }
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        DeviceChoice::Auto | DeviceChoice::Gpu => {
            let all: Vec<_> = adapters().into_iter().map(|a| a.info).collect();
            match all.iter().find(|a| is_hardware(a)) {
                Some(info) => Ok(ComputeDevice {
                    device: Device::wgpu(DeviceKind::DefaultDevice),
                    description: describe(info),
                }),
                None if choice == DeviceChoice::Auto => Ok(flex()),
                None => Err(Error::other(format!(
                    "no GPU adapter found (wgpu sees: {}); use --device cpu, or --device software for the software Vulkan device",
                    if all.is_empty() {
                        "nothing".to_string()
                    } else {
                        all.iter().map(describe).collect::<Vec<_>>().join("; ")
                    }
                ))),
            }
        }
        DeviceChoice::Software => {
            let all: Vec<_> = adapters().into_iter().map(|a| a.info).collect();
            match all.iter().find(|a| !is_hardware(a)) {
                Some(info) => Ok(ComputeDevice {
                    device: Device::wgpu(DeviceKind::Cpu),
                    description: describe(info),
                }),
                None => Err(Error::other(
                    "no software wgpu adapter found: install Mesa's Vulkan drivers (assets/setup does)",
                )),
            }
        }
    }
}
