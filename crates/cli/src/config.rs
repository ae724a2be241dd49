//! `--config run.toml`: a run's flags in a file. Each key is a flag of the subcommand
//! (`batch_tokens = 2048` is `--batch-tokens 2048`); flags given on the command line win.
//!
//! ```toml
//! backbone = "smollm2-135m"
//! data = ["data/code=0.5", "data/math=0.5"]   # arrays repeat the flag
//! steps = 400
//! lr = 5e-4
//! freeze_experts = true                       # true adds the switch, false leaves it out
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The value of `--config PATH` / `--config=PATH` in `args`, if any.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
        if s == "--" {
            break;
        }
    }
    None
}

/// The flags `path` sets, leaving out those already on the command line.
pub fn flags_from_config(path: &Path, args: &[OsString]) -> Result<Vec<OsString>> {
    let text = mode_io::input::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line} column {column}")
        });
        anyhow::anyhow!("{}: invalid TOML{at}: {}", path.display(), e.message())
    })?;
    let given: Vec<String> = args
        .iter()
        .filter_map(|a| {
            let s = a.to_string_lossy();
            s.starts_with("--")
                .then(|| s.split('=').next().unwrap_or_default().to_string())
        })
        .collect();
    let mut out = Vec::new();
    for (key, value) in &table {
        if key == "config" {
            bail!("{}: `config` cannot name another file", path.display());
        }
        let flag = format!("--{}", key.replace('_', "-"));
        if given.contains(&flag) {
            continue;
        }
        let mut push = |v: &toml::Value| -> Result<()> {
            match v {
                toml::Value::Boolean(true) => out.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => out.extend([flag.clone().into(), s.into()]),
                toml::Value::Integer(i) => out.extend([flag.clone().into(), i.to_string().into()]),
                toml::Value::Float(f) => out.extend([flag.clone().into(), f.to_string().into()]),
                other => bail!(
                    "{}: `{key}` must be a string, number, boolean or an array of them, not {}",
                    path.display(),
                    other.type_str()
                ),
            }
            Ok(())
        };
        match value {
            toml::Value::Array(items) => items.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    Ok(out)
}

/// When clap refused a flag that came from the config file `path` (`from_config`, the flags it
/// added), the error as a message naming the file and the key; `None` for other errors.
pub fn blame(path: &Path, from_config: &[OsString], e: &clap::Error) -> Option<String> {
    let arg = match e.get(clap::error::ContextKind::InvalidArg)? {
        clap::error::ContextValue::String(s) => s.clone(),
        _ => return None,
    };
    // `--steps <STEPS>` or `--stepz`: the flag is the first word.
    let flag = arg.split([' ', '=']).next().unwrap_or_default();
    if !flag.starts_with("--") || !from_config.iter().any(|f| f.to_str() == Some(flag)) {
        return None;
    }
    let key = flag.trim_start_matches('-').replace('-', "_");
    let rendered = e.render().to_string();
    let what = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    Some(format!("{}: key `{key}`: {what}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "steps = 400\nlr = 5e-4\ndata = [\"a=0.5\", \"b=0.5\"]\nfreeze_experts = true\nrestart = false\nbatch_tokens = 2048\n",
        )
        .unwrap();
        let args = os(&["mode", "compose", "--config", "run.toml", "--steps=10"]);
        assert_eq!(config_path(&args), Some(PathBuf::from("run.toml")));
        let flags: Vec<String> = flags_from_config(&path, &args)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            flags,
            [
                "--batch-tokens",
                "2048",
                "--data",
                "a=0.5",
                "--data",
                "b=0.5",
                "--freeze-experts",
                "--lr",
                "0.0005"
            ]
        );
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "steps = \n").unwrap();
        let e = format!("{:#}", flags_from_config(&path, &[]).unwrap_err());
        assert!(e.contains("bad.toml"), "{e}");
        std::fs::write(&path, "[section]\nx = 1\n").unwrap();
        let e = format!("{:#}", flags_from_config(&path, &[]).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("section"), "{e}");
        let e = format!(
            "{:#}",
            flags_from_config(&dir.path().join("missing.toml"), &[]).unwrap_err()
        );
        assert!(e.contains("missing.toml"), "{e}");
    }
}
