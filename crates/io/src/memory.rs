//! How much memory the machine has free, so that work too big for it can be refused with
//! numbers before it starts instead of being killed half-way.

/// `MemAvailable` of `/proc/meminfo` in bytes, where the system reports it.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_reports_some_free_memory() {
        if cfg!(target_os = "linux") {
            let free = super::available_bytes().expect("MemAvailable on Linux");
            assert!(free > 1 << 20, "{free}");
        }
    }
}
