//! Device diagnostics of the machine the node runs on, reported when it
//! registers as the broker's own [`DeviceDiagnostics`]: the broker derives
//! the node's tier from `gpu.memory_mb`.
//!
//! Read from `/proc/cpuinfo`, `/proc/meminfo`, `/etc/os-release`, `df` for
//! the disk and `nvidia-smi` for an NVIDIA GPU; anything unreadable is left
//! out (`None`) rather than guessed. Each parser is a plain function over text so it
//! is testable on any machine.

use std::time::Duration;

use cxmpute_core::wire::{CapacityInfo, CpuInfo, DeviceDiagnostics, GpuInfo, OsInfo};

/// Diagnoses the machine.
pub async fn diagnose() -> DeviceDiagnostics {
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
    DeviceDiagnostics {
        os: Some(OsInfo {
            family: Some(std::env::consts::OS.to_owned()),
            name: parse_os_release(&os_release),
            kernel: non_empty(&kernel),
        }),
        cpu: Some(parse_cpuinfo(&cpuinfo)),
        memory: parse_meminfo(&meminfo),
        storage: parse_df(&df),
        gpu: smi.as_deref().and_then(parse_nvidia_smi),
    }
}

/// `text` trimmed, unless nothing is left.
fn non_empty(text: &str) -> Option<String> {
    Some(text.trim())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
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
fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut name = None;
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
            "model name" | "Model" | "Hardware" if name.is_none() => name = non_empty(v),
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
        cores: Some(cores).filter(|&n| n > 0),
        threads: Some(threads).filter(|&n| n > 0),
        architecture: Some(std::env::consts::ARCH.to_owned()),
    }
}

/// Memory from `/proc/meminfo` (`MemTotal`, `MemAvailable`, in kB); `None`
/// without a total.
fn parse_meminfo(text: &str) -> Option<CapacityInfo> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let total = field("MemTotal")? / 1024;
    let free = field("MemAvailable").or_else(|| field("MemFree"));
    Some(CapacityInfo {
        total_mb: Some(total),
        used_mb: free.map(|f| total.saturating_sub(f / 1024)),
        free_mb: free.map(|f| f / 1024),
    })
}

/// The root file system from `df -Pk /` (1 KiB blocks); `None` when the
/// output is not that.
fn parse_df(text: &str) -> Option<CapacityInfo> {
    let line = text.lines().nth(1)?;
    let cols: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|c| c.parse().ok())
        .collect();
    match cols[..] {
        [total, used, free] => Some(CapacityInfo {
            total_mb: Some(total / 1024),
            used_mb: Some(used / 1024),
            free_mb: Some(free / 1024),
        }),
        _ => None,
    }
}

/// The distribution's `PRETTY_NAME` from `/etc/os-release`.
fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .and_then(|v| non_empty(v.trim().trim_matches('"')))
}

/// GPUs from `nvidia-smi --query-gpu=name,memory.total,driver_version
/// --format=csv,noheader,nounits`: the largest one (its memory in MiB is what
/// the tier is decided by), and how many there are.
fn parse_nvidia_smi(text: &str) -> Option<GpuInfo> {
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
        name: non_empty(&name),
        memory_mb: Some(memory_mb),
        integrated: Some(false),
        cuda: Some(true),
        count: Some(count),
        driver: non_empty(&driver),
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
            (c.name.as_deref(), c.cores, c.threads),
            (Some("AMD EPYC 7B13"), Some(2), Some(3))
        );
        let m = parse_meminfo(
            "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n",
        )
        .unwrap();
        assert_eq!(
            (m.total_mb, m.free_mb, m.used_mb),
            (Some(16000), Some(8000), Some(8000))
        );
        let d = parse_df("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 10485760 4194304 6291456 40% /\n").unwrap();
        assert_eq!(
            (d.total_mb, d.used_mb, d.free_mb),
            (Some(10240), Some(4096), Some(6144))
        );
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n").as_deref(),
            Some("Debian GNU/Linux 12")
        );
        let g =
            parse_nvidia_smi("NVIDIA A10G, 23028, 535.104\nNVIDIA T4, 15360, 535.104\n").unwrap();
        assert_eq!(
            (g.name.as_deref(), g.memory_mb, g.count),
            (Some("NVIDIA A10G"), Some(23028), Some(2))
        );
        assert!(parse_nvidia_smi("").is_none());
        assert!(parse_df("garbage").is_none());
    }

    #[test]
    fn unreadable_sources_are_left_empty() {
        let c = parse_cpuinfo("");
        assert_eq!((c.name, c.cores, c.threads), (None, None, None));
        assert!(parse_meminfo("").is_none());
        let m = parse_meminfo("MemTotal: 2048 kB\n").unwrap();
        assert_eq!((m.total_mb, m.free_mb, m.used_mb), (Some(2), None, None));
        assert!(parse_os_release("NAME=x\n").is_none());
        assert!(parse_os_release("PRETTY_NAME=\"\"\n").is_none());
    }

    #[test]
    fn the_report_yields_the_tier_of_its_gpu() {
        let gpu = parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564, 550.54\n");
        let d = DeviceDiagnostics {
            gpu,
            ..DeviceDiagnostics::default()
        };
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["gpu"]["memory_mb"], 24564);
        let parsed = DeviceDiagnostics::from_json(&json).unwrap();
        assert_eq!(parsed, d);
        assert_eq!(parsed.tier(), 4, "the broker reads what the node sends");
        assert_eq!(DeviceDiagnostics::default().tier(), 1);
    }

    #[tokio::test]
    async fn this_machine_is_diagnosed() {
        let d = diagnose().await;
        let cpu = d.cpu.unwrap();
        assert!(cpu.threads.unwrap() >= 1);
        assert!(d.memory.unwrap().total_mb.unwrap() > 0);
        assert!(cpu.architecture.is_some_and(|a| !a.is_empty()));
        assert!(d.os.unwrap().family.is_some());
    }
}
