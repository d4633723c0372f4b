//! The daemon: one worker (one warm model, one writer of the memory store) serving many
//! clients over a Unix domain socket in the data dir, with batch mode's JSON Lines
//! protocol ([`crate::worker::protocol`]) plus memory notices pushed to every client.
//!
//! - [`claim`] takes the data dir for a daemon: an OS lock on `DATA_DIR/daemon.pid`, which
//!   holds the daemon's pid and socket path (a second daemon is refused, naming the pid;
//!   a crashed daemon's lock goes with its process).
//! - [`DaemonLock::bind`] listens on the socket (mode 0600), replacing a stale socket file
//!   that nothing answers on.
//! - [`server::serve`] serves connections; [`client::connect`] gives a front end a
//!   [`crate::worker::WorkerHandle`] whose requests go to the daemon, so the app, batch
//!   mode and the commands run unchanged on either.

pub mod client;
pub mod server;

use std::fs::{self, File, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

pub use client::connect;
pub use server::{serve, ServeOptions};

/// The socket's name in the data dir, unless `serve --socket` says otherwise.
pub const SOCKET_FILE: &str = "memlora.sock";
/// The daemon's lock, pid and socket path.
pub const PID_FILE: &str = "daemon.pid";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a memlora daemon ({}) already serves data dir {}", holder(*.pid), .dir.display())]
    Running { dir: PathBuf, pid: Option<u32> },

    #[error("socket {} is in use by another process", .path.display())]
    SocketInUse { path: PathBuf },

    #[error("{} exists and is not a socket; not replacing it", .path.display())]
    NotASocket { path: PathBuf },

    #[error("no memlora daemon serves data dir {}", .dir.display())]
    NotRunning { dir: PathBuf },

    #[error("cannot {action} {}: {error}", .path.display())]
    Io { action: &'static str, path: PathBuf, error: io::Error },
}

fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".into(), |pid| format!("pid {pid}"))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DaemonError {
    let path = path.to_owned();
    move |error| DaemonError::Io { action, path, error }
}

/// The default socket of a data dir.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Where a data dir's daemon is (or was last): its pid and socket.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonInfo {
    pub pid: Option<u32>,
    pub socket: PathBuf,
}

/// What `DATA_DIR/daemon.pid` says, or the default socket when there is no such file.
pub fn locate(data_dir: &Path) -> DaemonInfo {
    let text = fs::read_to_string(data_dir.join(PID_FILE)).unwrap_or_default();
    parse_info(&text).unwrap_or_else(|| DaemonInfo { pid: None, socket: default_socket(data_dir) })
}

fn parse_info(text: &str) -> Option<DaemonInfo> {
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok();
    let socket = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from)?;
    Some(DaemonInfo { pid, socket })
}

/// The data dir, held by this process's daemon until dropped (the socket file is removed
/// then; the OS releases the lock even if the process dies).
pub struct DaemonLock {
    socket: PathBuf,
    bound: bool,
    _file: File,
}

/// Takes the data dir for a daemon listening on `socket`, or names the daemon that has it.
pub fn claim(data_dir: &Path, socket: &Path) -> Result<DaemonLock, DaemonError> {
    let path = data_dir.join(PID_FILE);
    let mut file =
        File::options().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io_error("open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = file.read_to_string(&mut text).ok().and_then(|_| parse_info(&text)).and_then(|info| info.pid);
            return Err(DaemonError::Running { dir: data_dir.to_owned(), pid });
        }
        Err(TryLockError::Error(error)) => return Err(DaemonError::Io { action: "lock", path, error }),
    }
    file.set_len(0).map_err(io_error("write", &path))?;
    // An absolute socket path, so that clients started elsewhere find it.
    let socket = std::path::absolute(socket).map_err(io_error("resolve", socket))?;
    file.write_all(format!("{}\n{}\n", std::process::id(), socket.display()).as_bytes()).map_err(io_error("write", &path))?;
    file.sync_all().map_err(io_error("write", &path))?;
    Ok(DaemonLock { socket, bound: false, _file: file })
}

impl DaemonLock {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Listens on the socket, readable and writable by the user only. A socket file that
    /// nothing answers on is a crashed daemon's and is replaced; one that answers belongs
    /// to another process, and anything else is not ours to remove.
    pub fn bind(&mut self) -> Result<UnixListener, DaemonError> {
        let path = &self.socket;
        match fs::symlink_metadata(path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(DaemonError::Io { action: "look at", path: path.clone(), error }),
            Ok(meta) if !meta.file_type().is_socket() => return Err(DaemonError::NotASocket { path: path.clone() }),
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(DaemonError::SocketInUse { path: path.clone() }),
                Err(_) => fs::remove_file(path).map_err(io_error("remove the stale socket", path))?,
            },
        }
        let listener = UnixListener::bind(path).map_err(io_error("listen on", path))?;
        self.bound = true;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_error("set permissions of", path))?;
        Ok(listener)
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        if self.bound {
            let _ = fs::remove_file(&self.socket);
        }
    }
}

/// The running daemon of `data_dir`, if there is one: its pid, when the lock is held.
pub fn running(data_dir: &Path) -> Option<DaemonInfo> {
    let file = File::open(data_dir.join(PID_FILE)).ok()?;
    match file.try_lock_shared() {
        Err(TryLockError::WouldBlock) => Some(locate(data_dir)),
        _ => None,
    }
}

/// Asks the daemon of `data_dir` to stop (SIGTERM: it stops answers, lets a memory write
/// finish and removes its socket) and waits up to `wait` for it to be gone.
pub fn stop(data_dir: &Path, wait: std::time::Duration) -> Result<DaemonInfo, DaemonError> {
    let info = running(data_dir).ok_or_else(|| DaemonError::NotRunning { dir: data_dir.to_owned() })?;
    let pid = info.pid.ok_or_else(|| DaemonError::Running { dir: data_dir.to_owned(), pid: None })?;
    // SAFETY: sending a signal to a pid has no memory effects here.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        return Err(DaemonError::Io { action: "signal the daemon of", path: data_dir.to_owned(), error: io::Error::last_os_error() });
    }
    let deadline = std::time::Instant::now() + wait;
    while running(data_dir).is_some() {
        if std::time::Instant::now() > deadline {
            return Err(DaemonError::Io {
                action: "stop the daemon of",
                path: data_dir.to_owned(),
                error: io::Error::new(io::ErrorKind::TimedOut, format!("pid {pid} is still running")),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(info)
}
