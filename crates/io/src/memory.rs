//! How much memory the machine has free, so that work too big for it can be refused with
//! numbers before it starts instead of being killed half-way.

/// `MemAvailable` of `/proc/meminfo` in bytes, where the system reports it.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Makes the C allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// A training step allocates and frees tensors of tens to hundreds of MB (gradients, logit
/// chunks, optimizer inputs). glibc serves blocks that large with `mmap` and unmaps them when
/// freed, so every step paid again for page faults on freshly zeroed pages: 15-18% of a full
/// fine-tuning step on the 2-core machine (`mode bench train --mode full`). With this, large
/// blocks come from the heap and stay there. Peak memory is unchanged; memory is simply not
/// returned between steps. A process-wide setting, so only the program's entry point calls it.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any worker thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
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
