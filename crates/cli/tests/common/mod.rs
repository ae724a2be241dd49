//! Running the `mode` binary from the integration tests.

use std::process::{Command, Output};

/// Runs `mode` with `args` and waits for it.
pub fn mode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mode"))
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a run that must have succeeded (its stderr in the failure message otherwise).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}
