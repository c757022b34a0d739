//! Test support: a real, throwaway PostgreSQL server (Debian's `postgresql` package),
//! started in a temporary directory on a free port and stopped on drop.
//!
//! Tests that need it call [`Postgres::start`]; when the server binaries are missing it
//! returns an error saying why, and the test skips loudly — unless
//! `TOKENFAB_REQUIRE_POSTGRES=1` (set by `.ci/run`), where a missing server is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
    next_db: std::sync::atomic::AtomicU32,
}

fn find_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    dirs.sort();
    dirs.into_iter().rev().find(|d| d.join("initdb").exists())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Postgres {
    /// Whether CI demands a real server (so a missing one fails instead of skipping).
    pub fn required() -> bool {
        std::env::var("TOKENFAB_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
    }

    /// Start a server, or say why not. Call from tests: `Err` means skip (loudly) unless
    /// [`required`](Self::required).
    pub fn start() -> Result<Postgres, String> {
        let bin = find_bin().ok_or(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin \
             (apt-get install postgresql)",
        )?;
        // initdb refuses to run as root: run the server as the package's `postgres` user.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let run_as = root.then_some("postgres");
        let base = std::env::temp_dir().join(format!(
            "tokenfab-pg-{}-{}",
            std::process::id(),
            free_port().map_err(|e| e.to_string())?
        ));
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let pg = Postgres {
            dir: base,
            bin,
            port: free_port().map_err(|e| e.to_string())?,
            run_as,
            next_db: std::sync::atomic::AtomicU32::new(0),
        };
        if let Some(user) = run_as {
            pg.run("chown", &["-R", user, &pg.dir.display().to_string()], false)?;
        }
        let data = pg.dir.join("data").display().to_string();
        let initdb = pg.bin.join("initdb").display().to_string();
        pg.run(
            &initdb,
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            true,
        )?;
        let pg_ctl = pg.bin.join("pg_ctl").display().to_string();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            pg.port,
            pg.dir.display()
        );
        let log = pg.dir.join("log").display().to_string();
        pg.run(
            &pg_ctl,
            &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
            true,
        )?;
        Ok(pg)
    }

    fn run(&self, prog: &str, args: &[&str], as_user: bool) -> Result<(), String> {
        let mut cmd = match (as_user, self.run_as) {
            (true, Some(user)) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", prog]);
                c
            }
            _ => Command::new(prog),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("{prog}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{prog} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A new empty database on this server; its URL.
    pub fn database(&self) -> Result<String, String> {
        let n = self
            .next_db
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{n}");
        let createdb = self.bin.join("createdb").display().to_string();
        self.run(
            &createdb,
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ],
            true,
        )?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let _ = self.run(&pg_ctl, &["-D", &data, "-m", "immediate", "stop"], true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start a server or, when one cannot run here, print why and return `None` (panics
/// instead when [`Postgres::required`]).
pub fn postgres_or_skip(test: &str) -> Option<Postgres> {
    match Postgres::start() {
        Ok(pg) => Some(pg),
        Err(why) if Postgres::required() => {
            panic!("{test}: PostgreSQL required (TOKENFAB_REQUIRE_POSTGRES=1) but: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: no PostgreSQL server: {why}");
            None
        }
    }
}
