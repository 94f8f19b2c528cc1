//! A server process owned by a test.
//!
//! It dies with the test: dropped on success or panic, and `PR_SET_PDEATHSIG` kills it if the test
//! process itself is killed. Its stdout and stderr go to a log file that is printed (the last
//! lines) when the test panics, and kept on disk.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How a [`ManagedProcess`] is (re)started.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct ManagedProcess {
    spec: Spec,
    log_path: PathBuf,
    child: Option<Child>,
}

impl ManagedProcess {
    /// Starts the process; its output is appended to `<cwd>/<name>.log`.
    pub fn spawn(spec: Spec) -> anyhow::Result<ManagedProcess> {
        let log_path = spec.cwd.join(format!("{}.log", spec.name));
        let mut p = ManagedProcess {
            spec,
            log_path,
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .current_dir(&self.spec.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it only asks
        // the kernel to SIGKILL the child when the spawning thread's process goes away.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!(
                "cannot start {} ({}): {e}",
                self.spec.name,
                self.spec.program.display()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit status once the process has ended on its own.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns how long the process took to exit on
    /// its own (`None`: it had to be killed, or was not running).
    pub fn stop(&mut self, grace: std::time::Duration) -> Option<std::time::Duration> {
        let started = std::time::Instant::now();
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: kill(2) through libc on a pid we own.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = started + grace;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return Some(started.elapsed());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        None
    }

    /// Starts the process again with the same spec (after [`kill9`](Self::kill9) or
    /// [`stop`](Self::stop)).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.start()
    }

    /// The last `max_bytes` of the log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let Ok(mut f) = File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}), last lines ----\n{}\n---- end of {} log ----",
                self.spec.name,
                self.log_path.display(),
                self.log_tail(4000),
                self.spec.name
            );
        }
    }
}

/// A scratch directory for a test's servers. Kept (and its path printed) when the test panics.
#[derive(Debug)]
pub struct WorkDir {
    dir: Option<tempfile::TempDir>,
}

impl WorkDir {
    pub fn new(prefix: &str) -> anyhow::Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("redis-repl-{prefix}-"))
            .tempdir()?;
        Ok(WorkDir { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// A new empty subdirectory.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping test directory {}", d.keep().display());
            }
        }
    }
}
