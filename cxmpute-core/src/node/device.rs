//! Device diagnostics of the machine the node runs on, reported when it
//! registers: the broker derives the node's tier from `gpu.memory_mb`.
//!
//! Read from `/proc/cpuinfo`, `/proc/meminfo`, `/etc/os-release`, `df` for
//! the disk and `nvidia-smi` for an NVIDIA GPU; anything unreadable is left
//! empty rather than guessed. Each parser is a plain function over text so it
//! is testable on any machine.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the node reports about its machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The operating system.
    pub os: OsInfo,
    /// The processor.
    pub cpu: CpuInfo,
    /// Main memory.
    pub memory: Capacity,
    /// The disk holding the root file system.
    pub storage: Capacity,
    /// The GPU, when one is found.
    pub gpu: Option<GpuInfo>,
}

/// The operating system.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    /// `linux`, `macos`...
    pub family: String,
    /// The distribution's pretty name, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub name: String,
    /// The kernel release.
    pub kernel: String,
}

/// The processor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Its model name.
    pub name: String,
    /// Physical cores.
    pub cores: u32,
    /// Hardware threads.
    pub threads: u32,
    /// `x86_64`, `aarch64`...
    pub architecture: String,
}

/// A capacity in MiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Total.
    pub total_mb: u64,
    /// In use.
    pub used_mb: u64,
    /// Free for use.
    pub free_mb: u64,
}

/// A GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Its name, e.g. `NVIDIA GeForce RTX 4090`.
    pub name: String,
    /// Its memory in MiB (the largest GPU's, when there are several).
    pub memory_mb: u64,
    /// How many GPUs the machine has.
    pub count: u32,
    /// Whether it shares main memory.
    pub integrated: bool,
    /// Whether CUDA is available.
    pub cuda: bool,
    /// The driver version.
    pub driver: String,
}

/// Diagnoses the machine.
pub async fn diagnose() -> DeviceReport {
    let read =
        |p: &'static str| async move { tokio::fs::read_to_string(p).await.unwrap_or_default() };
    let cpuinfo = read("/proc/cpuinfo").await;
    let meminfo = read("/proc/meminfo").await;
    let os_release = read("/etc/os-release").await;
    let kernel = read("/proc/sys/kernel/osrelease").await;
    let df = run("df", &["-Pk", "/"]).await.unwrap_or_default();
    let smi = run(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader,nounits",
        ],
    )
    .await;
    DeviceReport {
        os: OsInfo {
            family: std::env::consts::OS.to_owned(),
            name: parse_os_release(&os_release),
            kernel: kernel.trim().to_owned(),
        },
        cpu: parse_cpuinfo(&cpuinfo),
        memory: parse_meminfo(&meminfo),
        storage: parse_df(&df),
        gpu: smi.as_deref().and_then(parse_nvidia_smi),
    }
}

/// Runs a diagnostic program (arguments, never a shell) for its output; `None`
/// when it is missing, fails or hangs.
async fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        _ => None,
    }
}

/// The CPU from `/proc/cpuinfo`: model name, threads (processor entries),
/// cores (distinct physical id and core id pairs, else threads).
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut name = String::new();
    let mut threads = 0u32;
    let mut cores = std::collections::HashSet::new();
    let mut physical = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => threads += 1,
            "model name" | "Model" | "Hardware" if name.is_empty() => name = v.to_owned(),
            "physical id" => physical = v.to_owned(),
            "core id" => {
                cores.insert((physical.clone(), v.to_owned()));
            }
            _ => {}
        }
    }
    let cores = if cores.is_empty() {
        threads
    } else {
        cores.len() as u32
    };
    CpuInfo {
        name,
        cores,
        threads,
        architecture: std::env::consts::ARCH.to_owned(),
    }
}

/// Memory from `/proc/meminfo` (`MemTotal`, `MemAvailable`, in kB).
pub fn parse_meminfo(text: &str) -> Capacity {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let total = field("MemTotal").unwrap_or(0) / 1024;
    let free = field("MemAvailable")
        .or_else(|| field("MemFree"))
        .unwrap_or(0)
        / 1024;
    Capacity {
        total_mb: total,
        used_mb: total.saturating_sub(free),
        free_mb: free,
    }
}

/// The root file system from `df -Pk /` (1 KiB blocks).
pub fn parse_df(text: &str) -> Capacity {
    let Some(line) = text.lines().nth(1) else {
        return Capacity::default();
    };
    let cols: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|c| c.parse().ok())
        .collect();
    match cols[..] {
        [total, used, free] => Capacity {
            total_mb: total / 1024,
            used_mb: used / 1024,
            free_mb: free / 1024,
        },
        _ => Capacity::default(),
    }
}

/// The distribution's `PRETTY_NAME` from `/etc/os-release`.
pub fn parse_os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// GPUs from `nvidia-smi --query-gpu=name,memory.total,driver_version
/// --format=csv,noheader,nounits`: the largest one, and how many there are.
pub fn parse_nvidia_smi(text: &str) -> Option<GpuInfo> {
    let mut gpus: Vec<(String, u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(',').map(str::trim);
            let name = parts.next()?.to_owned();
            let mem = parts.next()?.parse::<u64>().ok()?;
            let driver = parts.next().unwrap_or_default().to_owned();
            Some((name, mem, driver))
        })
        .collect();
    let count = gpus.len() as u32;
    gpus.sort_by_key(|g| std::cmp::Reverse(g.1));
    let (name, memory_mb, driver) = gpus.into_iter().next()?;
    Some(GpuInfo {
        name,
        memory_mb,
        count,
        integrated: false,
        cuda: true,
        driver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_read_real_formats() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                   processor\t: 1\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                   processor\t: 2\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t\t: 1\n";
        let c = parse_cpuinfo(cpu);
        assert_eq!(
            (c.name.as_str(), c.cores, c.threads),
            ("AMD EPYC 7B13", 2, 3)
        );
        let m = parse_meminfo(
            "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n",
        );
        assert_eq!((m.total_mb, m.free_mb, m.used_mb), (16000, 8000, 8000));
        let d = parse_df("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 10485760 4194304 6291456 40% /\n");
        assert_eq!((d.total_mb, d.used_mb, d.free_mb), (10240, 4096, 6144));
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n"),
            "Debian GNU/Linux 12"
        );
        let g =
            parse_nvidia_smi("NVIDIA A10G, 23028, 535.104\nNVIDIA T4, 15360, 535.104\n").unwrap();
        assert_eq!(
            (g.name.as_str(), g.memory_mb, g.count),
            ("NVIDIA A10G", 23028, 2)
        );
        assert!(parse_nvidia_smi("").is_none());
        assert_eq!(parse_df("garbage"), Capacity::default());
    }

    #[tokio::test]
    async fn this_machine_is_diagnosed() {
        let d = diagnose().await;
        assert!(d.cpu.threads >= 1);
        assert!(d.memory.total_mb > 0);
        assert!(!d.cpu.architecture.is_empty());
    }
}
