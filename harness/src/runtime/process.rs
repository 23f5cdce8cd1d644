//! A child process with the fault verbs a scenario needs. Output goes to a log file so a failing
//! test can show it; the process is killed when the handle drops.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How to (re)start the process.
#[derive(Clone, Debug)]
struct Spec {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// A running (or stopped) child process.
pub struct Process {
    name: String,
    spec: Spec,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `program args` with `env` added, stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        let spec = Spec {
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
        };
        let mut p = Process {
            name: name.into(),
            spec,
            log: log.to_path_buf(),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// Starts it again after `stop` or `kill`, with the same command line.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.spec.program)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.spec.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process is alive (a paused one is).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// If the process has exited since the last look: its status (the handle then counts as stopped).
    /// How a watcher tells a crash from a stop the harness made.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// The process's name, as given to [`Process::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Graceful stop: SIGTERM, then SIGKILL after `grace`. Returns the exit code if it exited.
    pub async fn stop(&mut self, grace: Duration) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => {
                child.kill().await?;
                Ok(None)
            }
        }
    }

    /// A crash: SIGKILL, no cleanup by the process (sockets and lock files stay behind).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Crash and start again.
    pub async fn bounce(&mut self) -> Result<()> {
        self.kill().await?;
        self.start()
    }

    /// Freezes the process (SIGSTOP): it holds its sockets but answers nothing, like a hung server.
    /// Returns once every thread is stopped: the signal is only queued by `kill`, and a thread busy
    /// on the other core was seen answering a request sent right after it (openbao_runtime on CI).
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        // Bounded: 2 s, then paused is taken on trust (the signal is queued and will land).
        while started.elapsed() < Duration::from_secs(2) {
            if all_threads_stopped(pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Undoes [`Process::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .with_context(|| format!("{} is not running", self.name))?;
        kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("{sig} to {}", self.name))
    }

    /// What the process wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                // A paused process cannot act on SIGKILL until it is continued on some kernels' views
                // of the job; continue first so nothing is left behind.
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            }
            let _ = child.start_kill();
        }
    }
}

/// Whether every thread of `pid` is in state `T` (stopped) per `/proc/<pid>/task/*/stat`.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            // The state follows the command name, which is in parentheses and may hold spaces.
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
            })
            .unwrap_or(false)
    })
}
