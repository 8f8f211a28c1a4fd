//! A throwaway `redis-server` for tests and drills.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// How long [`LocalRedis::start`] waits for the server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on a loopback port, without persistence, killed when
/// dropped. For tests and drills; not for production.
///
/// ```no_run
/// use portcullis_redis::LocalRedis;
/// let redis = LocalRedis::start()?; // fails with `Error::ServerNotFound` without redis-server
/// println!("{}", redis.url()); // redis://127.0.0.1:<port>/
/// # Ok::<(), portcullis_redis::Error>(())
/// ```
#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
}

impl LocalRedis {
    /// Starts `redis-server` on a free loopback port and waits until it answers `PING`.
    pub fn start() -> Result<LocalRedis, Error> {
        // Ask the OS for a free port, then release it for the server.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::ServerStart(format!("no free port: {e}")))?
            .port();
        LocalRedis::start_on(port)
    }

    /// Starts `redis-server` on `port` (to restart one on the port of a stopped one).
    pub fn start_on(port: u16) -> Result<LocalRedis, Error> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ServerNotFound);
            }
            Err(e) => return Err(Error::ServerStart(e.to_string())),
        };
        let mut server = LocalRedis { child, port };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Error::ServerStart(format!(
                    "redis-server exited with {status} (port {port} in use?)"
                )));
            }
            if ping(port) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(Error::ServerStart(format!(
                    "no answer to PING on port {port} within {START_TIMEOUT:?}"
                )));
            }
            // Polling a child process: real time is the only clock there is.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server now (as a crash would) and waits for it to exit.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let timeout = Duration::from_millis(200);
    let Ok(mut s) = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
