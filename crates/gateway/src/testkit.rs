//! Test support: a real, throwaway Redis server (Debian's `redis-server` package) on a
//! free port, without persistence, stopped on drop.
//!
//! When the binary is missing, [`redis_or_skip`] prints why and the test skips loudly —
//! unless `TOKENFAB_REQUIRE_REDIS=1` (set by `.ci/run`), where that is a failure.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    pub fn required() -> bool {
        std::env::var("TOKENFAB_REQUIRE_REDIS").is_ok_and(|v| v == "1")
    }

    /// Start a server, or say why not.
    pub fn start() -> Result<Redis, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
        let mut redis = Redis { child, port };
        for _ in 0..100 {
            if redis.ping() {
                return Ok(redis);
            }
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!("redis-server exited at start: {status}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("redis-server did not answer PING within 5 s".into())
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stop the server now (to test what happens when Redis goes away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Start a server or, when one cannot run here, print why and return `None` (panics
/// instead when [`Redis::required`]).
pub fn redis_or_skip(test: &str) -> Option<Redis> {
    match Redis::start() {
        Ok(r) => Some(r),
        Err(why) if Redis::required() => {
            panic!("{test}: Redis required (TOKENFAB_REQUIRE_REDIS=1) but: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: no Redis server: {why}");
            None
        }
    }
}
