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

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// The wgpu adapters of this machine: (name, backend, device type).
pub fn adapters() -> Vec<wgpu::AdapterInfo> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
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

pub fn select(choice: DeviceChoice) -> Result<ComputeDevice> {
    let flex = || ComputeDevice {
        device: Device::flex(),
        description: format!(
            "cpu: burn flex backend, {} threads",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    };
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        DeviceChoice::Auto | DeviceChoice::Gpu => {
            let all = adapters();
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
            let all = adapters();
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
